//! F3: SIGKILL of the Raft leader while the agent streams loses no acknowledged change; the
//! killed node restarts from its redb data and catches up.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_during_streaming_loses_no_acknowledged_change() -> anyhow::Result<()> {
    let mut s = Scratch::new("t02");
    let src = s.dir.join("src");
    tree::generate(&src, 400, 30_000_000, 5)?;
    let mut cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    let leader = cluster.wait_leader(Duration::from_secs(30), None).await?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    cluster.start_agent(&cfg)?;
    // Wait until some changes are acknowledged, but the sync is still running.
    let deadline = Instant::now() + Duration::from_secs(60);
    let acked_before = loop {
        if let Some(st) = agent_status(&data) {
            let acked = st["changes_acked"].as_u64().unwrap_or(0);
            if acked > 0 {
                break acked;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing acknowledged in 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let li = cluster.index_of(leader).unwrap();
    cluster.kill_coordinator(li);
    let new_leader = cluster
        .wait_leader(Duration::from_secs(30), Some(leader))
        .await?;
    assert_ne!(new_leader, leader);
    // Keep changing files during the leader change.
    tree::mutate(&src, 60, 6)?;
    cluster.start_coordinator(li)?;
    let st = settle(&data).await?;
    assert!(st["changes_acked"].as_u64().unwrap() > acked_before);

    // Everything the agent considers acknowledged is in the catalog: the restore equals the tree
    // (the agent never re-sends a change it saw acknowledged, so a lost ack would show here).
    let out = s.dir.join("restored");
    restore_latest(&cluster, "data", &out).await?;
    let cmp = tree::compare(&src, &out.join("data"))?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(
        cmp.equal(),
        "differences after leader kill: {:?}",
        cmp.differences
    );

    // Every blob of the catalog is on the disk of a majority of coordinators (local backend).
    let (rows, _) = files::list(&cluster.conn(), "data", None, true, false).await?;
    let mut checked = 0;
    for v in &rows {
        for p in &v.v.parts {
            let copies = cluster.local_blob_copies(&p.hash);
            assert!(
                copies >= 2,
                "blob {} of {} on {copies} of 3 coordinators",
                p.hash,
                v.v.path
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "checked {checked} blobs");

    // The killed node catches up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lead = cluster.wait_leader(Duration::from_secs(10), None).await?;
        let ls = cluster.status_of(cluster.index_of(lead).unwrap()).await;
        let rs = cluster.status_of(li).await;
        if let (Some(ls), Some(rs)) = (ls, rs) {
            if rs.last_applied >= ls.last_applied && rs.versions == ls.versions {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "restarted node did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
