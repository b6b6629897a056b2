//! Issue 3, automatic failback (`[global.policy] automatic_failback = true`): region A is lost
//! and B takes over at epoch 2; B's agent writes new data. When A comes back it rejoins as a
//! standby, catches up, and once it has been healthy and caught up for `failback_stable_ms` the
//! global leader moves back to A on its own (a planned switchover: fence B, zero lag, promote A)
//! at epoch 3. A then holds every change acknowledged in either region, and the record stays at
//! epoch 3 (no ping-pong).

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_lab::tree;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovered_preferred_region_is_failed_back_automatically() -> anyhow::Result<()> {
    run("t31", |dir| async move {
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                policy_toml: "automatic_failback = true\nfailback_stable_ms = 3000\nmin_failover_interval_ms = 0\n".into(),
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let src = dir.join("src");
        tree::generate(&src, 30, 4096, 3)?;
        let (cfg, data) = regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &src)], "")?;
        regions.region_mut("a").start_agent(&cfg)?;
        let st = settle(&data).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        // Replication is asynchronous here and the policy consistency-first: B is promoted only
        // if it holds every acknowledged change, so let it catch up before A is lost.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut acked = 0;
            for i in 0..regions.region("a").coords.len() {
                if let Some(s) = regions.region("a").status_of(i).await {
                    acked = acked.max(s.versions);
                }
            }
            let mut caught_up = false;
            for i in 0..regions.region("b").coords.len() {
                if let Some(s) = regions.region("b").status_of(i).await {
                    caught_up |= acked > 0 && s.upstream_seq >= acked && s.lag_entries == 0;
                }
            }
            if caught_up {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "region b did not catch up with a's {acked} versions in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        regions.kill_region("a");
        regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        let src_b = dir.join("src-b");
        tree::generate(&src_b, 10, 2048, 4)?;
        let (cfg_b, data_b) = regions
            .region("b")
            .write_agent_config("agent-b", &[("data-b", &src_b)], "")?;
        regions.region_mut("b").start_agent(&cfg_b)?;
        let st = settle(&data_b).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");

        // A comes back; no operator acts. The global leader fails back once A is stable.
        regions.start_region("a")?;
        let s = regions.wait_active("a", 3, Duration::from_secs(90)).await?;
        assert_eq!(s.epoch(), 3, "exactly one more move: {s:?}");
        let audit = json(&run_cli(&regions, &["audit", "--output", "json"]));
        let failback = audit
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "failback")
            .unwrap_or_else(|| panic!("no failback entry in the audit log: {audit}"));
        assert!(
            failback["actor"]
                .as_str()
                .unwrap_or_default()
                .starts_with("automatic failback"),
            "the failback was decided by the policy, not an operator: {failback}"
        );
        assert_eq!(failback["epoch"], 3);

        // Nothing acknowledged in either region was lost.
        for (prefix, tree_src) in [("data", &src), ("data-b", &src_b)] {
            let restored = dir.join(format!("restored-{prefix}"));
            restore_latest(regions.region("a"), prefix, &restored).await?;
            invariants::restore_equals(tree_src, &restored.join(prefix))?;
        }

        // No ping-pong: A stays active at epoch 3 while both regions are healthy.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let s = regions.wait_active("a", 3, Duration::from_secs(10)).await?;
        assert_eq!(s.epoch(), 3, "{s:?}");
        Ok(())
    })
    .await
}
