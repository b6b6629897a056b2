//! Shared helpers of the integration tests: a cluster in a temp dir, a seeded tree, waiting for
//! the agent, restoring and comparing. The test bed itself (clusters, regions, servers) is
//! `lifeboat-lab`; restores go through the `lifeboat-restore` engine.

#![warn(missing_docs)]

pub mod invariants;
pub mod leases;
pub mod pg_server;
pub mod redis_server;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use lifeboat_lab::harness::{
    agent_status, issue, wait_agent_idle, Cluster, ClusterOpts, Role, ANY_REGION,
};
pub use lifeboat_lab::tree;
pub use lifeboat_restore::files;

/// A test's scratch space: a temp dir kept on failure (set `LIFEBOAT_KEEP=1` to keep always).
pub struct Scratch {
    /// The directory.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Scratch {
    /// A new scratch dir named after the test.
    pub fn new(name: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("lifeboat-test-{name}-"))
            .tempdir()
            .expect("tempdir");
        if std::env::var("LIFEBOAT_KEEP").is_ok() {
            // Keep the directory itself (dropping the TempDir would delete it).
            return Scratch {
                dir: tmp.keep(),
                _tmp: None,
            };
        }
        Scratch {
            dir: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    /// Keeps the directory (call on failure paths to leave logs behind).
    pub fn keep(&mut self) {
        if let Some(t) = self._tmp.take() {
            let _ = t.keep();
        }
    }
}

/// Runs the `lifeboat` CLI against every coordinator (and the witness) of `regions`.
///
/// Panics if the binary cannot be spawned (a test setup bug).
pub fn run_cli(regions: &lifeboat_lab::regions::Regions, args: &[&str]) -> std::process::Output {
    let bin = lifeboat_lab::harness::bin_dir()
        .expect("binaries built")
        .join("lifeboat");
    let conn = regions.conn();
    std::process::Command::new(bin)
        .args(args)
        .arg("--coordinator")
        .arg(conn.coordinators.join(","))
        .arg("--tls-dir")
        .arg(conn.tls_dir.expect("dev CA"))
        .output()
        .expect("run lifeboat")
}

/// Restores the latest version of `prefix` through `cluster` into `to`.
///
/// Errors: restore failures.
pub async fn restore_latest(
    cluster: &Cluster,
    prefix: &str,
    to: &Path,
) -> anyhow::Result<files::RestoreReport> {
    let conn = cluster.conn();
    let (rows, addr) = files::list(&conn, prefix, None, false, false).await?;
    files::restore(&conn, &addr, rows, to, false).await
}

/// Waits until the agent whose data dir is `data` is idle (1 s without events), up to 5 minutes.
///
/// Errors: timeout.
pub async fn settle(data: &Path) -> anyhow::Result<serde_json::Value> {
    wait_agent_idle(data, Duration::from_millis(1000), Duration::from_secs(300)).await
}

/// Runs `lifeboat-agent --once` with `cfg` and returns its final status.json.
///
/// Errors: the agent failing.
pub async fn agent_once(
    cluster: &Cluster,
    cfg: &Path,
    data: &Path,
) -> anyhow::Result<serde_json::Value> {
    let mut ch = cluster.spawn_agent(cfg, true)?;
    let st = tokio::task::spawn_blocking(move || ch.wait()).await??;
    anyhow::ensure!(
        st.success(),
        "agent --once exited with {st}; log {}",
        cfg.with_extension("log").display()
    );
    agent_status(data).ok_or_else(|| anyhow::anyhow!("no status.json in {}", data.display()))
}

/// Flips one byte in the middle of blob `h` on every coordinator of `cluster` (after waiting up to
/// 30 s for each to hold a copy) and checks that it no longer decodes.
///
/// Errors: the blob missing on a coordinator, I/O.
pub async fn corrupt_blob_everywhere(
    cluster: &Cluster,
    h: &lifeboat_common::blob::BlobHash,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cluster.local_blob_copies(h) < cluster.coords.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "blob {h} not on every coordinator"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &cluster.coords {
        let p = c.data_dir.join("blobs").join(h.key());
        let mut b = std::fs::read(&p)?;
        let at = (b.len() / 2).max(5);
        b[at] ^= 0x5a;
        std::fs::write(&p, &b)?;
        anyhow::ensure!(
            lifeboat_common::blob::decode(h, &b, lifeboat_common::PART_SIZE).is_err(),
            "blob {h} still decodes after the flip"
        );
    }
    Ok(())
}

/// Index of the settled leader (every running coordinator agrees on it), waiting up to 30 s.
///
/// Errors: no settled leader.
pub async fn settled_leader(cluster: &Cluster) -> anyhow::Result<usize> {
    let id = cluster.wait_leader(Duration::from_secs(30), None).await?;
    cluster
        .index_of(id)
        .ok_or_else(|| anyhow::anyhow!("leader {id} is not a member"))
}

/// Runs a test body with a fresh scratch dir named `name`, keeping the dir (and printing where)
/// when the body fails or panics.
///
/// Errors: the body's error.
pub async fn run<F, Fut>(name: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::FutureExt;
    let mut scratch = Scratch::new(name);
    let res = std::panic::AssertUnwindSafe(body(scratch.dir.clone()))
        .catch_unwind()
        .await;
    if !matches!(res, Ok(Ok(()))) {
        scratch.keep();
        eprintln!("scratch kept in {}", scratch.dir.display());
    }
    match res {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Runs the real `lifeboat` binary: `lifeboat ARGS --coordinator <all of cluster> --tls-dir
/// <cluster certs>`.
pub fn lifeboat(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    lifeboat_then(cluster, args, &[])
}

/// Runs `lifeboat ARGS <connection flags> TAIL` (TAIL: `--exec -- CMD...`, which must come last).
pub fn lifeboat_then(cluster: &Cluster, args: &[&str], tail: &[&str]) -> std::process::Output {
    lifeboat_cmd(cluster, args, tail)
        .output()
        .expect("run lifeboat")
}

/// The command `lifeboat ARGS --coordinator <all of cluster> --tls-dir <cluster certs> TAIL`.
fn lifeboat_cmd(cluster: &Cluster, args: &[&str], tail: &[&str]) -> std::process::Command {
    let bin = lifeboat_lab::harness::bin_dir().unwrap().join("lifeboat");
    let coords: Vec<String> = cluster.coords.iter().map(|c| c.addr.clone()).collect();
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .arg("--coordinator")
        .arg(coords.join(","))
        .arg("--tls-dir")
        .arg(&cluster.certs)
        .args(tail);
    cmd
}

/// Like [`lifeboat`], but the run must end within `limit` (a command that must fail, not hang):
/// killed and reported as an error otherwise.
///
/// Errors: spawn failure, or still running after `limit`.
pub async fn lifeboat_within(
    cluster: &Cluster,
    args: &[&str],
    limit: std::time::Duration,
) -> anyhow::Result<std::process::Output> {
    let mut cmd = tokio::process::Command::from(lifeboat_cmd(cluster, args, &[]));
    cmd.kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(out) => Ok(out?),
        Err(_) => anyhow::bail!("lifeboat {args:?} still running after {limit:?} (hangs)"),
    }
}

/// Runs the real `lifeboat` binary against every coordinator of every region and the witness of
/// `regions` (same CA): `lifeboat ARGS --coordinator <all> --tls-dir <certs>`.
pub fn lifeboat_regions(
    regions: &lifeboat_lab::regions::Regions,
    args: &[&str],
) -> std::process::Output {
    let bin = lifeboat_lab::harness::bin_dir().unwrap().join("lifeboat");
    let conn = regions.conn();
    std::process::Command::new(bin)
        .args(args)
        .arg("--coordinator")
        .arg(conn.coordinators.join(","))
        .arg("--tls-dir")
        .arg(conn.tls_dir.expect("regions have a CA"))
        .output()
        .expect("run lifeboat")
}

/// Lines of the log of the agent configured by `cfg` (`<cfg>.log`) that contain `needle`
/// (0 when there is no log yet).
pub fn agent_log_lines(cfg: &Path, needle: &str) -> usize {
    std::fs::read_to_string(cfg.with_extension("log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Restores the latest version of `root` through `cluster` into `to` and asserts it equals
/// `src` (paths, kinds, blake3 of contents, modes).
///
/// Errors: restore or comparison failures; panics when the trees differ.
pub async fn assert_restores_equal(
    cluster: &Cluster,
    root: &str,
    src: &Path,
    to: &Path,
) -> anyhow::Result<()> {
    restore_latest(cluster, root, to).await?;
    let cmp = tree::compare(src, &to.join(root))?;
    assert!(cmp.equal(), "{:?}", cmp.differences);
    Ok(())
}

/// Parses a successful `lifeboat --output json` run; panics with its stderr otherwise.
pub fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "lifeboat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}

/// Live catalog paths under `prefix` (`lifeboat ls PREFIX`; empty on failure).
pub fn catalog_paths(cluster: &Cluster, prefix: &str) -> Vec<String> {
    let out = lifeboat(cluster, &["ls", prefix, "--output", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .collect()
}

/// `(path, deleted)` of the newest version of every path under `prefix`, tombstones included
/// (`lifeboat ls PREFIX --deleted`; empty on failure).
pub fn catalog_with_deleted(cluster: &Cluster, prefix: &str) -> Vec<(String, bool)> {
    let out = lifeboat(cluster, &["ls", prefix, "--deleted", "--output", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|r| Some((r["path"].as_str()?.to_string(), r["deleted"].as_bool()?)))
        .collect()
}

/// Parses the JSON report of a `lifeboat ... --output json` run that must have failed (non-zero
/// exit; the report is still on stdout); panics naming `what` otherwise.
pub fn failed_json(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(!out.status.success(), "{what}: lifeboat succeeded");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON report ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts region A (active) and region B (standby of A, same CA) under `dir`, each with a settled
/// leader.
pub async fn two_regions(dir: &std::path::Path) -> anyhow::Result<(Cluster, Cluster)> {
    let a = Cluster::start(
        &dir.join("region-a"),
        &ClusterOpts {
            region: "eu-west".into(),
            ..Default::default()
        },
    )?;
    let upstream: Vec<String> = a.addrs().iter().map(|x| format!("\"{x}\"")).collect();
    let b = Cluster::start(
        &dir.join("region-b"),
        &ClusterOpts {
            region: "us-east".into(),
            ca_from: Some(a.certs.clone()),
            extra_coordinator_toml: format!(
                "\n[replication]\nupstream = [{}]\nbatch_rows = 200\n",
                upstream.join(", ")
            ),
            ..Default::default()
        },
    )?;
    settled_leader(&a).await?;
    settled_leader(&b).await?;
    Ok((a, b))
}

/// Status from the leader of `cluster` (through the CLI's leader discovery).
pub async fn leader_status(cluster: &Cluster) -> anyhow::Result<lifeboat_proto::StatusReply> {
    let (mut admin, _) = cluster.conn().admin().await?;
    Ok(admin
        .status(lifeboat_proto::StatusRequest {})
        .await?
        .into_inner())
}

/// Polls `cond` every 200 ms until it holds, for at most `timeout`.
///
/// Errors: `cond` still false after `timeout` (the message names `what`).
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Connection settings presenting agent `name`'s certificate (issued in `cluster`'s certificate
/// directory when missing), for tests that speak the agent protocol themselves.
///
/// Errors: certificate generation.
pub fn agent_conn(
    cluster: &Cluster,
    name: &str,
) -> anyhow::Result<lifeboat_client::conn::ConnArgs> {
    if !cluster.certs.join(format!("{name}.pem")).exists() {
        issue(&cluster.certs, Role::Agent, &cluster.region, name)?;
    }
    let mut c = cluster.conn();
    c.cert = Some(cluster.certs.join(format!("{name}.pem")));
    c.key = Some(cluster.certs.join(format!("{name}.key")));
    Ok(c)
}
