//! Catch-up of a coordinator that missed part of the regional Raft log: by replaying its redb log
//! (the leader still holds the entries it missed), and by installing a snapshot (the leader has
//! purged them). In both cases the node must end with the same catalog as the leader, and a
//! restore served by that node alone must rebuild the tree byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lifeboat_chaos_tests::{agent_once, files, run, settled_leader, tree, Cluster, ClusterOpts};
use lifeboat_client::conn::{admin_client, ConnArgs};
use lifeboat_common::catalog::FileVersion;
use lifeboat_lab::harness::{bin_dir, spawn_logged};
use lifeboat_proto::{ListVersionsRequest, StatusReply, TriggerSnapshotRequest};

/// Latest live versions under `prefix`, read from coordinator `addr` itself (no switch to the
/// leader, unlike `files::list`).
async fn list_on(cluster: &Cluster, addr: &str, prefix: &str) -> anyhow::Result<Vec<FileVersion>> {
    let mut c = admin_client(cluster.conn().channel(addr)?);
    let mut s = c
        .list_versions(ListVersionsRequest {
            prefix: prefix.to_string(),
            at_ms: 0,
            all_versions: false,
            include_deleted: false,
        })
        .await
        .map_err(|e| anyhow::anyhow!("list versions on {addr}: {}", e.message()))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(row) = s
        .message()
        .await
        .map_err(|e| anyhow::anyhow!("list on {addr}: {}", e.message()))?
    {
        out.push(FileVersion::from_pb(&row)?);
    }
    Ok(out)
}

/// Waits until coordinator `f` has applied at least the leader's last applied index and holds the
/// same catalog counters. Returns (leader status, follower status).
async fn wait_caught_up(
    cluster: &Cluster,
    f: usize,
    timeout: Duration,
) -> anyhow::Result<(StatusReply, StatusReply)> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let li = settled_leader(cluster).await?;
        if let (Some(l), Some(s)) = (cluster.status_of(li).await, cluster.status_of(f).await) {
            if li != f
                && s.last_applied >= l.last_applied
                && s.versions == l.versions
                && s.entries == l.entries
                && s.bytes == l.bytes
            {
                return Ok((l, s));
            }
            last = Some((l, s));
        }
        if Instant::now() > deadline {
            bail!(
                "coordinator index {f} did not catch up within {timeout:?}; last (leader, node): {last:?}; logs in {}",
                cluster.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restores `prefix` through coordinator `f` only (catalog listed on `f`, blobs fetched from `f`)
/// into `to`, and compares `to/<prefix>` with `src`.
async fn restore_through(
    cluster: &Cluster,
    f: usize,
    prefix: &str,
    src: &Path,
    to: &Path,
) -> anyhow::Result<()> {
    let addr = cluster.coords[f].addr.clone();
    let rows = list_on(cluster, &addr, prefix).await?;
    anyhow::ensure!(
        !rows.is_empty(),
        "node {addr} lists nothing under {prefix:?}"
    );
    let only_f = ConnArgs {
        coordinators: vec![addr.clone()],
        ..cluster.conn()
    };
    let rep = files::restore(&only_f, &addr, rows, to, false)
        .await
        .with_context(|| format!("restore through {addr}"))?;
    anyhow::ensure!(
        rep.files > 0,
        "restore through {addr} wrote no file: {rep:?}"
    );
    let cmp = tree::compare(src, &to.join(prefix))?;
    anyhow::ensure!(
        cmp.equal(),
        "restore through {addr} differs from the source in {} paths: {:#?}",
        cmp.different,
        cmp.differences
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_catches_up_from_its_redb_log() -> anyhow::Result<()> {
    run("t03-redb-log", |scratch| async move {
        let src = scratch.join("src");
        tree::generate(&src, 120, 0, 301)?;
        let mut cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        let (cfg, agent_data) = cluster.write_agent_config("agent1", &[("data", &src)], "batch_max_changes = 20\n")?;

        let st = agent_once(&cluster, &cfg, &agent_data).await?;
        assert_eq!(st["pending_changes"].as_u64(), Some(0), "first sync left changes: {st}");
        let li = settled_leader(&cluster).await?;
        let f = (li + 1) % cluster.coords.len();
        // The follower has the first sync before it dies.
        let (_, before) = wait_caught_up(&cluster, f, Duration::from_secs(20)).await?;

        cluster.kill_coordinator(f);
        let m = tree::mutate(&src, 60, 302)?;
        eprintln!("mutations while node {} is down: {m:?}", cluster.coords[f].id);
        agent_once(&cluster, &cfg, &agent_data).await?;
        let li = settled_leader(&cluster).await?;
        let grown = cluster.status_of(li).await.context("leader status")?;
        assert!(
            grown.last_applied > before.last_applied && grown.versions > before.versions,
            "the second sync committed nothing while the node was down: before {before:?} after {grown:?}"
        );

        cluster.start_coordinator(f)?;
        let t = Instant::now();
        let (l, s) = wait_caught_up(&cluster, f, Duration::from_secs(30)).await?;
        eprintln!(
            "node {} caught up in {:?}: last_applied {} (leader {}), versions {}, entries {}, snapshot_index {}",
            s.node_id,
            t.elapsed(),
            s.last_applied,
            l.last_applied,
            s.versions,
            s.entries,
            s.snapshot_index
        );
        assert_eq!(s.versions, l.versions);
        assert_eq!(s.entries, l.entries);

        restore_through(&cluster, f, "data", &src, &scratch.join("restore")).await?;
        anyhow::Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_coordinator_catches_up_by_snapshot() -> anyhow::Result<()> {
    run("t03-snapshot", |scratch| async move {
        let src = scratch.join("src");
        tree::generate(&src, 100, 0, 311)?;
        let opts = ClusterOpts {
            snapshot_logs: 10,
            logs_kept: 0,
            ..ClusterOpts::default()
        };
        let mut cluster = Cluster::start(&scratch.join("cluster"), &opts)?;
        let li = settled_leader(&cluster).await?;
        let f = (li + 1) % cluster.coords.len();
        // Let the follower learn the initial membership, then kill it before any push.
        let (_, early) = wait_caught_up(&cluster, f, Duration::from_secs(20)).await?;
        cluster.kill_coordinator(f);

        // Small batches so that every sync adds many log entries.
        let (cfg, agent_data) =
            cluster.write_agent_config("agent1", &[("data", &src)], "batch_max_changes = 4\n")?;
        agent_once(&cluster, &cfg, &agent_data).await?;
        for round in 0..3u64 {
            tree::mutate(&src, 25, 320 + round)?;
            agent_once(&cluster, &cfg, &agent_data).await?;
        }
        let li = settled_leader(&cluster).await?;
        let leader_addr = cluster.coords[li].addr.clone();
        let mut admin = admin_client(cluster.conn().channel(&leader_addr)?);
        let snap = admin
            .trigger_snapshot(TriggerSnapshotRequest {})
            .await
            .map_err(|e| anyhow::anyhow!("trigger snapshot: {}", e.message()))?
            .into_inner();
        let l = cluster.status_of(li).await.context("leader status")?;
        eprintln!(
            "follower stopped at {}, leader last_applied {} snapshot {}",
            early.last_applied, l.last_applied, snap.snapshot_index
        );
        assert!(
            l.last_applied >= early.last_applied + 30,
            "the log grew by only {} entries while the follower was down",
            l.last_applied - early.last_applied
        );
        assert!(
            snap.snapshot_index > early.last_applied + 10,
            "leader snapshot {} does not cover the follower's gap (it stopped at {})",
            snap.snapshot_index,
            early.last_applied
        );

        // Restart with openraft's info logs so the snapshot installation is visible.
        let mut cmd = Command::new(bin_dir()?.join("lifeboat-coordinator"));
        cmd.arg("--config")
            .arg(&cluster.coords[f].config)
            .env("LIFEBOAT_LOG", "info,openraft=info");
        let log = cluster.coords[f].log.clone();
        let log_len_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        cluster.coords[f].child = Some(spawn_logged(cmd, &log)?);

        let t = Instant::now();
        let (l, s) = wait_caught_up(&cluster, f, Duration::from_secs(30)).await?;
        eprintln!(
            "node {} caught up in {:?}: last_applied {} (leader {}), versions {}, entries {}, snapshot_index {}",
            s.node_id,
            t.elapsed(),
            s.last_applied,
            l.last_applied,
            s.versions,
            s.entries,
            s.snapshot_index
        );
        assert_eq!(s.versions, l.versions);
        assert_eq!(s.entries, l.entries);
        assert!(s.snapshot_index > 0, "node reports no snapshot: {s:?}");
        let text = std::fs::read(&log)?;
        let after_restart = String::from_utf8_lossy(&text[log_len_before as usize..]);
        assert!(
            after_restart.contains("install_full_snapshot")
                || after_restart.contains("install complete snapshot"),
            "the restarted node did not install a snapshot from the leader (see {})",
            log.display()
        );

        restore_through(&cluster, f, "data", &src, &scratch.join("restore")).await?;
        anyhow::Ok(())
    })
    .await
}
