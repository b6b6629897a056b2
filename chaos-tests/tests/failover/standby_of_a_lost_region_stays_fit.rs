//! A standby region whose upstream (the active region) is lost stays fit to take over, however
//! long the loss lasts: its replication state turns `failed` once the silence passes
//! `lag_failed_ms`, but only a failure while in contact (falling behind, failing to apply)
//! makes the region unhealthy. Before, the region reported itself unhealthy ("replication
//! failed") and a failover that had not started by then (here: a 5 s lease still to expire)
//! found no healthy region, forever.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_lost_its_upstream_is_still_promoted() -> anyhow::Result<()> {
    run("t36", |dir| async move {
        let mut extra = BTreeMap::new();
        extra.insert(
            "b".to_string(),
            "\n[replication]\nlag_degraded_ms = 1000\nlag_failed_ms = 1500\n".to_string(),
        );
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                hooks_toml: extra,
                // The failover waits for a's lease (5 s) to expire: b's replication state is
                // `failed` (silence > 1.5 s) well before.
                policy_toml: "lease_ms = 5000\n".into(),
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = regions.control_status().await.unwrap_or_default();
            let b_ok = s
                .region("b")
                .is_some_and(|r| r.healthy && r.regional_leader);
            let st = leader_status(regions.region("b")).await.ok();
            if b_ok && st.is_some_and(|st| st.replication_state == "healthy") {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "b never healthy and replicating: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let killed = Instant::now();
        regions.kill_region("a");
        // b's replication state turns `failed` (silence), before any failover.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(st) = leader_status(regions.region("b")).await {
                if st.replication_state == "failed" {
                    break;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "b's replication never reported failed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = regions.control_status().await.unwrap_or_default();
        assert_eq!(
            s.epoch(),
            1,
            "no failover yet while b's replication is failed: {s:?}"
        );
        // Still promoted: b is active under epoch 2 and takes writes.
        let s = regions.wait_active("b", 2, Duration::from_secs(60)).await?;
        eprintln!(
            "b active at epoch 2, {:?} after a was lost: {s:?}",
            killed.elapsed()
        );
        assert!(s.region("b").is_some_and(|b| b.healthy), "{s:?}");

        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("after.txt"), b"written after the failover")?;
        let (cfg, data) =
            regions
                .region("b")
                .write_agent_config("agent-b", &[("data", &src)], "")?;
        regions.region_mut("b").start_agent(&cfg)?;
        let st = settle(&data).await?;
        assert_eq!(st["pending_changes"], 0, "b acknowledges writes: {st}");
        assert!(st["changes_acked"].as_u64().unwrap_or(0) > 0, "{st}");
        Ok(())
    })
    .await
}
