//! Protected roots that vanish, and mass deletions (issue 15, defect 2), on real processes.
//!
//! Proves: a protected root moved away while the agent was stopped (a volume not mounted) is
//! never recreated and yields **zero tombstones**; the agent reports it unhealthy in
//! `status.json` and through its heartbeat (`lifeboat status` shows the failing `root:<name>`
//! check); an empty directory in its place (an empty mount point) is "replaced", again with
//! zero tombstones; when the original directory is back, the root is healthy and the catalog is
//! unchanged. A deletion of most of a root is held (reported, not pushed) until
//! `lifeboat-agent accept-deletions` accepts exactly that set; a small deletion passes.

use std::path::Path;
use std::time::Duration;

use lifeboat_chaos_tests::*;

/// The `roots[]` entry of `status.json` for root `name`.
fn root_entry(data: &Path, name: &str) -> Option<serde_json::Value> {
    let s = agent_status(data)?;
    s["roots"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name && r["kind"] == "source")
        .cloned()
}

/// Waits up to `timeout` until root `name`'s status entry satisfies `pred`; returns it.
async fn wait_root(
    data: &Path,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let e = root_entry(data, name);
        if let Some(e) = e.as_ref().filter(|e| pred(e)) {
            return Ok(e.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}; last root status {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Live catalog paths of files named `f*.txt` under `prefix` (the root's own entry left out).
fn live_files(cluster: &Cluster, prefix: &str) -> usize {
    catalog_paths(cluster, prefix)
        .iter()
        .filter(|p| p.ends_with(".txt"))
        .count()
}

/// Tombstones (newest version deleted) under `prefix`.
fn tombstones(cluster: &Cluster, prefix: &str) -> usize {
    catalog_with_deleted(cluster, prefix)
        .iter()
        .filter(|(_, d)| *d)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmounted_root_yields_no_tombstones_and_is_reported() -> anyhow::Result<()> {
    run("root_guard_unmounted", |dir| async move {
        let src = dir.join("vol");
        tree::generate(&src, 80, 0, 31)?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        settled_leader(&cluster).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;
        let before = catalog_paths(&cluster, "data");
        assert!(
            before.len() >= 80,
            "catalog holds the tree: {}",
            before.len()
        );
        assert_eq!(tombstones(&cluster, "data"), 0);

        // The volume is not mounted when the agent starts again.
        let away = dir.join("vol.away");
        std::fs::rename(&src, &away)?;
        cluster.start_agent(&cfg)?;
        let e = wait_root(
            &data,
            "data",
            Duration::from_secs(30),
            "root reported missing",
            |r| r["healthy"] == false && r["problem_kind"] == "missing",
        )
        .await?;
        assert!(
            e["problem"].as_str().unwrap_or("").contains("vol"),
            "the problem names the root: {e}"
        );
        // The region sees it: the agent's heartbeat carries the failing root check.
        wait_until(
            Duration::from_secs(15),
            "status shows the failing root check",
            || {
                let out = lifeboat(&cluster, &["status", "--output", "json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                v["agents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|a| a["failing_checks"].as_array().cloned().unwrap_or_default())
                    .any(|c| c["name"] == "root:data")
            },
        )
        .await?;
        // Give the agent several root checks and rescans' worth of time to do damage.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!src.exists(), "the agent recreated the missing root");
        assert_eq!(
            tombstones(&cluster, "data"),
            0,
            "a missing root became tombstones"
        );
        assert_eq!(catalog_paths(&cluster, "data"), before);

        // An empty mount point: a directory with another identity at the path.
        std::fs::create_dir(&src)?;
        wait_root(
            &data,
            "data",
            Duration::from_secs(30),
            "root reported replaced",
            |r| r["healthy"] == false && r["problem_kind"] == "replaced",
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            tombstones(&cluster, "data"),
            0,
            "an empty mount point became tombstones"
        );
        assert_eq!(catalog_paths(&cluster, "data"), before);

        // The volume is mounted again: healthy, rescanned, nothing deleted, new files flow.
        std::fs::remove_dir(&src)?;
        std::fs::rename(&away, &src)?;
        wait_root(
            &data,
            "data",
            Duration::from_secs(30),
            "root healthy again",
            |r| r["healthy"] == true,
        )
        .await?;
        std::fs::write(src.join("after-mount.txt"), b"back")?;
        settle(&data).await?;
        wait_until(
            Duration::from_secs(30),
            "the new file is in the catalog",
            || {
                catalog_paths(&cluster, "data")
                    .iter()
                    .any(|p| p.ends_with("after-mount.txt"))
            },
        )
        .await?;
        assert_eq!(tombstones(&cluster, "data"), 0);
        assert_eq!(catalog_paths(&cluster, "data").len(), before.len() + 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_deletion_is_held_until_accepted() -> anyhow::Result<()> {
    run("root_guard_mass_delete", |dir| async move {
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        for i in 0..40 {
            std::fs::write(src.join(format!("f{i:02}.txt")), format!("file {i}"))?;
        }
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        settled_leader(&cluster).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        cluster.start_agent(&cfg)?;
        settle(&data).await?;
        wait_until(Duration::from_secs(30), "40 files in the catalog", || {
            live_files(&cluster, "data") == 40
        })
        .await?;

        // A small deletion is pushed as usual.
        std::fs::remove_file(src.join("f00.txt"))?;
        settle(&data).await?;
        wait_until(Duration::from_secs(30), "one tombstone", || {
            tombstones(&cluster, "data") == 1
        })
        .await?;

        // 30 of the remaining 39 go at once (77% > 50%): held, not pushed.
        for i in 1..31 {
            std::fs::remove_file(src.join(format!("f{i:02}.txt")))?;
        }
        let e = wait_root(
            &data,
            "data",
            Duration::from_secs(30),
            "deletions held",
            |r| r["held"]["deletions"] == 30,
        )
        .await?;
        assert_eq!(e["healthy"], true, "held deletions lose nothing: {e}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(tombstones(&cluster, "data"), 1, "a held set was pushed");
        assert_eq!(live_files(&cluster, "data"), 39);

        // The operator accepts exactly that set.
        let out = cluster
            .command(lifeboat_lab::harness::bin_dir()?.join("lifeboat-agent"))
            .args(["accept-deletions", "--root", "data", "--config"])
            .arg(&cfg)
            .output()?;
        assert!(
            out.status.success(),
            "accept-deletions: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("30 deletions"),
            "it says what it accepts: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_until(
            Duration::from_secs(30),
            "the accepted set is pushed",
            || tombstones(&cluster, "data") == 31,
        )
        .await?;
        assert_eq!(live_files(&cluster, "data"), 9);
        let st = settle(&data).await?;
        let acc = st["accepted_deletions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(acc.len(), 1, "the acceptance is recorded: {st}");
        assert_eq!(acc[0]["deletions"], 30);
        let e = root_entry(&data, "data").unwrap();
        assert!(e["held"].is_null(), "nothing held any more: {e}");
        Ok(())
    })
    .await
}
