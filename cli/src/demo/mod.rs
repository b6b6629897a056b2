//! `lifeboat demo`, `bench`, `bench-failover` and `bench-lag`, on the test bed of
//! `lifeboat-lab`: [`setup`] (options, run directory, working copy) is shared; [`single`] is the
//! one-region demo and `bench`; [`regions`] the two-region demo (the default) and the failover
//! and lag benchmarks, with [`dbs`] for `--with-databases`. Only this file dispatches between
//! them, so no file here imports another that imports it back.

pub mod dbs;
pub mod regions;
pub mod setup;
pub mod single;

pub use setup::DemoArgs;
pub use single::{run_bench, BenchArgs};

/// Runs `lifeboat demo`: two regions by default, one with `--single-region`. Ctrl-C stops it
/// and its children.
///
/// Errors: any step failing, or the restore differing from the source (the run directory is
/// kept then, and named in the error).
pub async fn run_demo(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    if args.single_region {
        single::run(args, json).await
    } else {
        regions::run(args, json).await
    }
}
