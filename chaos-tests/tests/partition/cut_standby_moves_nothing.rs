//! Issue 3, partition where the active region keeps the witness: regions a and b and the witness
//! each run in a network namespace of their own; site B is cut from A and from the witness's
//! site W. A and W hold 4 of the 7 global votes, so nothing moves: for well over lease +
//! detection + drift, the record stays a at epoch 1 and b's own leader never holds a lease.
//!
//! Writes in a under `[global] synchronous = true` (the default, non-strict): a batch is committed
//! in a but acknowledged only once a standby region confirmed it; with b unreachable, intake waits
//! `sync_timeout_ms` (10 s by default), so for those 10 s the agent keeps the change pending.
//! Then a **degrades** (like Patroni's non-strict synchronous mode): the global group records it
//! first (`state.sync_degraded`, audit `sync-degraded`), then a acknowledges after its own
//! majority commit and reports `sync_degraded`. After the heal, b catches up and confirms, a
//! leaves degraded mode, the record is cleared (audit `sync-resumed`), and b holds the change
//! byte for byte.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::leases::{leased_samples, LeaseSampler};
use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts, WITNESS_SITE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_of_the_standby_moves_nothing_and_degrades_synchronous_writes(
) -> anyhow::Result<()> {
    run("t25", |dir| async move {
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                netns: true,
                ..Default::default()
            },
        )?;
        let t0 = Instant::now();
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(
            src.join("before.txt"),
            b"acknowledged before the partition\n",
        )?;
        let (cfg, data) =
            regions
                .region("a")
                .write_agent_config("agent-a", &[("data", &src)], "")?;
        regions.region_mut("a").start_agent(&cfg)?;
        let st = settle(&data).await?;
        let acked_before = st["changes_acked"].as_u64().unwrap_or(0);
        assert!(acked_before >= 1, "{st}");

        let sampler = LeaseSampler::start(&regions);
        regions.net().partition("b", "a")?;
        regions.net().partition("b", WITNESS_SITE)?;
        let cut = Instant::now();
        std::fs::write(src.join("during.txt"), b"written while b is cut off\n")?;

        // Observe for 16 s: longer than lease (1.5 s) + detection (1 s) + drift (0.25 s) many
        // times over, and longer than sync_timeout_ms (10 s), so the batch wait ran out and a
        // degraded.
        let mut polls = 0;
        let mut saw_pending = false;
        let mut acked_at = None;
        while cut.elapsed() < Duration::from_secs(16) {
            if let Some(s) = regions.control_status().await {
                assert_eq!(s.epoch(), 1, "no failover while a keeps the witness: {s:?}");
                assert!(s.is_active_in("a"), "{s:?}");
                polls += 1;
            }
            if let Some(rb) = regions.report("b").await {
                assert!(!rb.leased, "b must never hold a lease: {rb:?}");
                assert_eq!(rb.epoch, 1, "{rb:?}");
            }
            let st = agent_status(&data).expect("status.json");
            let acked = st["changes_acked"].as_u64().unwrap_or(0);
            if acked > acked_before && acked_at.is_none() {
                acked_at = Some(cut.elapsed());
            }
            if cut.elapsed() < Duration::from_millis(9_500) {
                assert_eq!(
                    acked, acked_before,
                    "a acknowledged before sync_timeout_ms with no standby: {st}"
                );
                saw_pending |= st["pending_changes"].as_u64().unwrap_or(0) >= 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            polls >= 10,
            "the global group (A + W) kept answering: {polls} polls"
        );
        assert!(saw_pending, "the agent saw during.txt and kept it pending");
        let acked_at = acked_at.expect("a acknowledged during.txt once degraded");
        eprintln!("during.txt acknowledged {acked_at:?} after the cut (degraded)");
        let ra = regions.report("a").await.expect("a's regional leader");
        assert!(ra.leased, "a keeps its lease: {ra:?}");
        assert!(ra.sync_degraded, "a reports degraded mode: {ra:?}");
        // ... and the global group recorded it before the first batch was acknowledged alone,
        // so that any later global leader knows a standby may lack acknowledged changes.
        let s = regions.control_status().await.expect("global status");
        let state = s.state();
        let degraded = state.sync_degraded.clone().unwrap_or_default();
        assert_eq!(degraded.region, "a", "{s:?}");
        assert_eq!(degraded.epoch, 1, "{s:?}");
        let recorded_at = state
            .audit
            .iter()
            .find(|e| e.action == "sync-degraded" && e.epoch == 1)
            .map(|e| e.at_ms)
            .expect("a sync-degraded audit entry");
        assert!(recorded_at > 0, "{s:?}");

        // Heal: b catches up and confirms; a leaves degraded mode and b holds the change.
        regions.net().heal()?;
        let healed = Instant::now();
        settle(&data).await?;
        loop {
            let ra = regions.report("a").await;
            if ra.as_ref().is_some_and(|r| !r.sync_degraded) {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(60),
                "a still degraded after the heal: {ra:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("heal -> synchronous again after {:?}", healed.elapsed());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = regions.control_status().await;
            let cleared = s.as_ref().is_some_and(|s| {
                let state = s.state();
                state.sync_degraded.is_none()
                    && state.audit.iter().any(|e| e.action == "sync-resumed")
            });
            if cleared {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the record still says degraded after the heal: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let restored = dir.join("restored-b");
        restore_latest(regions.region("b"), "data", &restored).await?;
        invariants::restore_equals(&src, &restored.join("data"))?;

        // The batch was acknowledged once: one version of the file.
        let (all, _) = files::list(
            &regions.region("b").conn(),
            "data/during.txt",
            None,
            true,
            false,
        )
        .await?;
        assert_eq!(all.len(), 1, "one version of data/during.txt in b: {all:?}");
        let s = regions.wait_active("a", 1, Duration::from_secs(30)).await?;
        assert_eq!(s.epoch(), 1, "{s:?}");
        let samples = sampler.finish().await?;
        invariants::one_lease_holder(&samples)?;
        assert!(
            leased_samples(&samples, "b").is_empty(),
            "b was never leased"
        );
        assert!(!leased_samples(&samples, "a").is_empty(), "a was leased");
        eprintln!("{} lease samples, total {:?}", samples.len(), t0.elapsed());
        Ok(())
    })
    .await
}
