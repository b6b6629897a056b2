//! What every demo and benchmark run shares: `lifeboat demo`'s options, the run directory (never
//! one that held anything before), the working copy, sizes and progress messages.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use lifeboat_lab::tree;

/// Options of `lifeboat demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Directory to protect. It is copied into a working copy under the workdir and never
    /// modified. Default: a generated tree of about 2,000 files including one of 200 MB.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Where the cluster, working copy and restore go (default: a new directory in /tmp,
    /// removed afterwards unless --keep). A directory that already exists is never removed nor
    /// emptied: the demo works in a new `lifeboat-demo-*` directory inside it and removes only
    /// that. Must not lie inside --source.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Files in the generated tree.
    #[arg(long, default_value_t = 2000)]
    pub files: usize,
    /// Size of the generated large file, MB (10^6 bytes).
    #[arg(long, default_value_t = 200)]
    pub large_mb: u64,
    /// Keep the workdir afterwards (it is always kept when the demo fails).
    #[arg(long)]
    pub keep: bool,
    /// Run the single-region demo instead (3 coordinators, a Raft leader SIGKILLed mid-stream,
    /// restart and catch-up, restore throughput).
    #[arg(long)]
    pub single_region: bool,
    /// Two-region demo only: also run a Redis and a PostgreSQL per region (when `redis-server`
    /// and `/usr/lib/postgresql/*/bin` are installed; skipped with a message otherwise), write
    /// to both during the drill, and show after the region kill that region b's are primaries
    /// holding every acknowledged write (`db_rpo_redis`, `db_rpo_postgres`).
    #[arg(long)]
    pub with_databases: bool,
}

/// The directory a demo or benchmark run works in, and the only thing it may remove afterwards.
///
/// Never a directory that held anything before the run: without `--workdir` a new directory in
/// the temp dir; with `--workdir DIR` that does not exist, DIR (created); with an existing DIR
/// (empty or not), a new `DIR/lifeboat-<what>-XXXXXX`. So removing [`RunDir::path`] removes
/// only what the run created, and files already in DIR (a `--source` among them) are untouched.
#[derive(Debug)]
pub struct RunDir {
    /// Where the run writes everything (cluster, working copy, restores, logs).
    pub path: PathBuf,
}

impl RunDir {
    /// Picks and creates the run directory for `--workdir` (`what` names the command, e.g.
    /// `demo`), first refusing a run directory that would lie inside `source` (the demo's
    /// `--source`, which is never modified).
    ///
    /// Errors: `--workdir` inside `--source` (or equal to it), `--source` missing, I/O.
    pub fn create(
        workdir: &Option<PathBuf>,
        what: &str,
        source: Option<&Path>,
    ) -> anyhow::Result<RunDir> {
        let parent_of_new = match workdir {
            Some(d) => d.clone(),
            None => std::env::temp_dir(),
        };
        if let Some(src) = source {
            let s = src
                .canonicalize()
                .with_context(|| format!("--source {}", src.display()))?;
            if !s.is_dir() {
                bail!("--source {} is not a directory", src.display());
            }
            let w = canonical_prefix(&parent_of_new)?;
            if w.starts_with(&s) {
                bail!(
                    "--workdir {} is inside --source {}: the {what} would write its cluster and working copy into the source, which it never modifies; choose a --workdir outside the source",
                    parent_of_new.display(),
                    src.display()
                );
            }
        }
        let path = match workdir {
            Some(d) if d.exists() => {
                if !d.is_dir() {
                    bail!("--workdir {} exists and is not a directory", d.display());
                }
                let p = tempfile::Builder::new()
                    .prefix(&format!("lifeboat-{what}-"))
                    .tempdir_in(d)
                    .with_context(|| format!("create a run directory in {}", d.display()))?
                    .keep();
                eprintln!(
                    "{what}: --workdir {} already exists: working in {} (only that is removed afterwards)",
                    d.display(),
                    p.display()
                );
                p
            }
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("create --workdir {}", d.display()))?;
                d.clone()
            }
            None => tempfile::Builder::new()
                .prefix(&format!("lifeboat-{what}-"))
                .tempdir()?
                .keep(),
        };
        Ok(RunDir { path })
    }

    /// Removes the run directory (everything in it was created by the run).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `p` canonicalized, for a `p` that may not exist yet: its nearest existing ancestor
/// canonicalized, with the missing components appended.
fn canonical_prefix(p: &Path) -> anyhow::Result<PathBuf> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return Ok(out);
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return Ok(abs),
        }
    }
}

pub(crate) fn dir_size(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                files += 1;
                bytes += md.len();
            }
        }
    }
    (files, bytes)
}

pub(crate) fn say(json: bool, msg: &str) {
    if !json {
        eprintln!("demo: {msg}");
    }
}

/// Prepares the demo's working copy `wd/work/data`: a copy of `--source` or a generated tree.
///
/// Errors: I/O, or `--source` not a directory.
pub(crate) fn prepare_work(args: &DemoArgs, wd: &Path, json: bool) -> anyhow::Result<PathBuf> {
    let work = wd.join("work/data");
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(work.parent().unwrap())?;
    match &args.source {
        Some(src) => {
            if !src.is_dir() {
                bail!("--source {} is not a directory", src.display());
            }
            say(
                json,
                &format!(
                    "copying {} into the working copy {}",
                    src.display(),
                    work.display()
                ),
            );
            let st = std::process::Command::new("cp")
                .arg("-a")
                .arg(src)
                .arg(&work)
                .status()?;
            if !st.success() {
                bail!("cp -a {} {} failed", src.display(), work.display());
            }
        }
        None => {
            say(
                json,
                &format!(
                    "generating {} files + one {} MB file in {}",
                    args.files,
                    args.large_mb,
                    work.display()
                ),
            );
            tree::generate(&work, args.files, args.large_mb * 1_000_000, 42)?;
        }
    }
    Ok(work)
}
