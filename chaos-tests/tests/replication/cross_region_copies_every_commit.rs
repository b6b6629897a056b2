//! F4: cross-region replication. Region A (eu-west, active: 3 coordinators and an agent) and
//! region B (us-east, standby: 3 coordinators with `[replication] upstream` = A). B's leader copies
//! A's catalog and blobs into B's own Raft group and disks: a restore from B, with region A
//! killed entirely, is byte-equal with the source tree; B survives the SIGKILL of its leader while
//! A's agent streams; agents pointed at B are refused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_common::catalog::FileVersion;
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::{PushMessage, StatusReply};

/// Message of the standby's refusal (`lifeboat_coordinator::intake::STANDBY_REFUSAL`).
const STANDBY_REFUSAL: &str = "standby region: writes go to the active region";

/// Waits until B's leader reports that it has applied everything A's leader committed (and A has
/// at least `min_versions` versions). Returns B's status.
async fn wait_caught_up(
    a: &Cluster,
    b: &Cluster,
    min_versions: u64,
    timeout: Duration,
) -> anyhow::Result<StatusReply> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let (Ok(sa), Ok(sb)) = (leader_status(a).await, leader_status(b).await) {
            if sa.versions >= min_versions
                && sb.upstream_seq == sa.versions
                && sb.lag_entries == 0
                && sb.replication_state == "healthy"
            {
                return Ok(sb);
            }
            last = Some((sa.versions, sb));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "standby did not catch up within {timeout:?}; last (A versions, B status): {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Output of `lifeboat status` (JSON or text) against `cluster`.
fn lifeboat_status(cluster: &Cluster, json: bool) -> String {
    let bin = lifeboat_lab::harness::bin_dir().unwrap().join("lifeboat");
    let out = std::process::Command::new(bin)
        .args(["status", "--output", if json { "json" } else { "text" }])
        .arg("--coordinator")
        .arg(cluster.addrs().join(","))
        .arg("--tls-dir")
        .arg(&cluster.certs)
        .output()
        .expect("run lifeboat");
    assert!(
        out.status.success(),
        "lifeboat status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything of a version except its (region-local) sequence number.
fn key(v: &FileVersion) -> String {
    format!(
        "{} t={} del={} kind={:?} size={} mode={:o} mtime={} b3={:?} parts={:?} link={:?} epoch={} region={} from={:?}",
        v.v.path,
        v.commit_time_ms,
        v.v.deleted,
        v.v.kind,
        v.v.size,
        v.v.mode,
        v.v.mtime_ns,
        v.v.blake3,
        v.v.parts,
        v.v.symlink_target,
        v.v.epoch,
        v.v.region,
        v.v.rename_from
    )
}

/// Every version of A's catalog is in B's, with the same commit time, epoch and region, once.
async fn assert_same_catalog(a: &Cluster, b: &Cluster) -> anyhow::Result<Vec<FileVersion>> {
    let (ra, _) = files::list(&a.conn(), "", None, true, true).await?;
    let (rb, _) = files::list(&b.conn(), "", None, true, true).await?;
    let ka: Vec<String> = ra.iter().map(key).collect();
    let kb: Vec<String> = rb.iter().map(key).collect();
    assert_eq!(ka.len(), kb.len(), "version count A vs B");
    for (x, y) in ka.iter().zip(&kb) {
        assert_eq!(x, y, "catalog row differs between A and B");
    }
    assert!(rb.iter().all(|v| v.v.region == "eu-west"));
    Ok(rb)
}

/// Every blob referenced by `rows` is on the disks of at least two of B's coordinators.
fn assert_blobs_on_majority(b: &Cluster, rows: &[FileVersion]) -> usize {
    let mut checked = HashSet::new();
    for v in rows {
        for p in &v.v.parts {
            if !checked.insert(p.hash) {
                continue;
            }
            let copies = b.local_blob_copies(&p.hash);
            assert!(
                copies >= 2,
                "blob {} of {} on {copies} of B's coordinators",
                p.hash,
                v.v.path
            );
        }
    }
    checked.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_region_holds_a_byte_equal_copy() -> anyhow::Result<()> {
    let mut s = Scratch::new("t10a");
    let src = s.dir.join("src");
    tree::generate(&src, 300, 9_000_000, 10)?;
    let (mut a, b) = two_regions(&s.dir).await?;
    let (cfg, data) = a.write_agent_config("a1", &[("data", &src)], "")?;
    a.start_agent(&cfg)?;
    settle(&data).await?;
    let first = wait_caught_up(&a, &b, 1, Duration::from_secs(120)).await?;
    assert_eq!(first.role, "standby");
    assert_eq!(first.lag_ms, 0, "caught up: {first:?}");
    let mid_ms = lifeboat_common::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // More history while B follows: creates, edits, renames, deletes, chmods.
    tree::mutate(&src, 120, 11)?;
    std::fs::remove_dir_all(src.join("d02"))?;
    settle(&data).await?;
    let sb = wait_caught_up(&a, &b, first.upstream_seq + 1, Duration::from_secs(120)).await?;
    assert_eq!(sb.role, "standby");
    assert_eq!(sb.upstream_last_seq, sb.upstream_seq);
    assert!(sb.replication_error.is_empty(), "{sb:?}");
    let sa = leader_status(&a).await?;
    assert_eq!(sa.role, "source");
    assert_eq!(sa.replication_state, "");
    assert_eq!(
        (sb.versions, sb.entries, sb.bytes),
        (sa.versions, sa.entries, sa.bytes)
    );
    // B's followers know the committed progress too.
    for i in 0..b.coords.len() {
        let st = b.status_of(i).await.expect("B coordinator answers");
        assert_eq!(st.role, "standby");
        if st.node_id != st.leader_id {
            assert_eq!(st.replication_state, "unknown");
        }
    }

    // Same rows (commit times, epochs, regions) in both catalogs; point-in-time views agree.
    let rows = assert_same_catalog(&a, &b).await?;
    let (pa, _) = files::list(&a.conn(), "data", Some(mid_ms), false, false).await?;
    let (pb, _) = files::list(&b.conn(), "data", Some(mid_ms), false, false).await?;
    assert!(!pb.is_empty());
    assert_eq!(
        pa.iter().map(key).collect::<Vec<_>>(),
        pb.iter().map(key).collect::<Vec<_>>(),
        "point-in-time listing differs"
    );
    let blobs = assert_blobs_on_majority(&b, &rows);
    assert!(blobs > 100, "checked {blobs} blobs");

    // `lifeboat status` shows the role and lag, as text and JSON.
    let js = lifeboat_status(&b, true);
    let js: serde_json::Value = serde_json::from_str(&js)?;
    assert_eq!(js["role"], "standby", "{js}");
    assert_eq!(js["replication_state"], "healthy", "{js}");
    assert_eq!(js["lag_entries"].as_u64(), Some(0), "{js}");
    assert_eq!(js["upstream_seq"].as_u64(), Some(sa.versions), "{js}");
    let text = lifeboat_status(&b, false);
    assert!(text.contains("replication: standby, healthy"), "{text}");
    assert!(lifeboat_status(&a, false).contains("replication: source"));

    // Region A is lost entirely: B alone restores the latest tree byte-for-byte.
    drop(a);
    let out = s.dir.join("restored");
    let report = restore_latest(&b, "data", &out).await?;
    let cmp = tree::compare(&src, &out.join("data"))?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "differences: {:?}", cmp.differences);
    assert_eq!(report.files, cmp.files);
    assert!(
        !out.join("data/d02").exists(),
        "deleted directory came back"
    );
    // With A gone, B's leader reports the silence as lag.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let gone = leader_status(&b).await?;
    assert!(gone.lag_ms >= 2000, "A silent for 2.5 s: {gone:?}");
    assert!(!gone.replication_error.is_empty(), "{gone:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_survives_its_leader_kill() -> anyhow::Result<()> {
    let mut s = Scratch::new("t10b");
    let src = s.dir.join("src");
    tree::generate(&src, 300, 20_000_000, 12)?;
    let (mut a, mut b) = two_regions(&s.dir).await?;
    let (cfg, data) = a.write_agent_config("a1", &[("data", &src)], "")?;
    a.start_agent(&cfg)?;
    // Keep A's agent streaming: a round of mutations every 150 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, src) = (stop.clone(), src.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                tree::mutate(&src, 10, 100 + rounds)?;
                rounds += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            Ok(rounds)
        })
    };
    // Wait until B has copied something.
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        if let Ok(st) = leader_status(&b).await {
            if st.upstream_seq > 0 {
                break st;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "B copied nothing in 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let old = at_kill.node_id;
    let oi = b.index_of(old).unwrap();
    b.kill_coordinator(oi);
    let killed_at = Instant::now();
    let new = b.wait_leader(Duration::from_secs(30), Some(old)).await?;
    assert_ne!(new, old);
    // B keeps copying under the new leader while A's agent still streams.
    let deadline = Instant::now() + Duration::from_secs(60);
    let during = loop {
        if let Ok(st) = leader_status(&b).await {
            if st.node_id == new && st.upstream_seq > at_kill.upstream_seq {
                break st;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "B's new leader copied nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let resumed_ms = killed_at.elapsed().as_millis();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = churn.await??;
    settle(&data).await?;
    let sb = wait_caught_up(&a, &b, during.upstream_seq + 1, Duration::from_secs(180)).await?;
    assert_eq!(sb.node_id, new, "the new leader replicates");
    // Exactly A's versions, each once, although B's old leader died mid-batch.
    let rows = assert_same_catalog(&a, &b).await?;
    assert_blobs_on_majority(&b, &rows);

    // The killed node comes back and catches up through B's own Raft group.
    b.start_coordinator(oi)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = b.status_of(oi).await {
            if st.upstream_seq == sb.upstream_seq && st.versions == sb.versions {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "restarted B node did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(a);
    let out = s.dir.join("restored");
    restore_latest(&b, "data", &out).await?;
    let cmp = tree::compare(&src, &out.join("data"))?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "differences: {:?}", cmp.differences);
    eprintln!(
        "t10b: B leader {old} killed at upstream seq {}; new leader {new} copying again {resumed_ms} ms later (seq {}), {rounds} mutation rounds, final upstream seq {}",
        at_kill.upstream_seq, during.upstream_seq, sb.upstream_seq
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_pointed_at_standby_is_refused() -> anyhow::Result<()> {
    let s = Scratch::new("t10c");
    let src = s.dir.join("src");
    tree::generate(&src, 10, 0, 14)?;
    let (_a, mut b) = two_regions(&s.dir).await?;

    // Every coordinator of B refuses pushes, leader or not (asked with an agent's certificate).
    let conn = agent_conn(&b, "b0")?;
    for c in &b.coords {
        let mut client = AgentServiceClient::new(conn.channel(&c.addr)?);
        let err = client
            .push_changes(futures::stream::iter(Vec::<PushMessage>::new()))
            .await
            .expect_err("standby accepted a push");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert_eq!(err.message(), STANDBY_REFUSAL);
        assert_eq!(
            lifeboat_common::wire_error::WireError::code_of(&err),
            Some(lifeboat_common::wire_error::ErrorCode::StandbyRegion),
            "{err:?}"
        );
    }

    // A real agent gets the same answer and has nothing acknowledged.
    let (cfg, data) = b.write_agent_config("b1", &[("data", &src)], "")?;
    b.start_agent(&cfg)?;
    let log = cfg.with_extension("log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(STANDBY_REFUSAL) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent log never showed the refusal: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = agent_status(&data).expect("status.json");
    assert_eq!(st["changes_acked"].as_u64(), Some(0), "{st}");
    let sb = leader_status(&b).await?;
    assert_eq!(sb.entries, 0, "nothing from the agent reached B's catalog");
    Ok(())
}
