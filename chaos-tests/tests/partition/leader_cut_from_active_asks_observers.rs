//! Issue 3, several observers: only the global leader's own link to the active region is down.
//! Regions a and b and the witness each run in a network namespace of their own. Leadership of
//! the global group is moved to site B (the leading coordinator is restarted until a node of b
//! leads), then A is cut from B only. A is still reachable from the witness's site, which is part
//! of the quorum: it is not lost. The global leader hears a's
//! report through another observer (`observe`), a's renewals reach it through another
//! coordinator, so nothing moves: the record stays a at epoch 1, a keeps its lease, b never
//! holds one, and a change written in a is acknowledged.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::leases::{leased_samples, LeaseSampler};
use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts, WITNESS_SITE};

/// The site of node `id`: its region, or [`WITNESS_SITE`].
fn site_of(regions: &Regions, id: u64) -> Option<String> {
    for (name, c) in &regions.regions {
        if c.index_of(id).is_some() {
            return Some(name.clone());
        }
    }
    regions
        .witness
        .as_ref()
        .and_then(|w| w.index_of(id))
        .map(|_| WITNESS_SITE.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_region_cut_from_the_global_leader_only_is_not_lost() -> anyhow::Result<()> {
    run("t33", |dir| async move {
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                netns: true,
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;

        // Move the global leadership to site B (restart whichever coordinator leads elsewhere):
        // then A is cut from the leader's site B, and reaches only the witness's site W.
        let mut leader_site = String::new();
        for _ in 0..12 {
            let s = regions.wait_active("a", 1, Duration::from_secs(60)).await?;
            let leader = s.global_leader;
            let site = site_of(&regions, leader).expect("the leader is a member");
            if site == "b" {
                leader_site = site;
                break;
            }
            let cluster = if site == WITNESS_SITE {
                regions.witness.as_mut().expect("witness")
            } else {
                regions.region_mut(&site)
            };
            let i = cluster.index_of(leader).expect("member of its site");
            cluster.kill_coordinator(i);
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.start_coordinator(i)?;
        }
        anyhow::ensure!(
            !leader_site.is_empty(),
            "the global leadership never moved to site b"
        );
        eprintln!("global leader in site {leader_site}");
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;

        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("before.txt"), b"before the cut\n")?;
        let (cfg, data) =
            regions
                .region("a")
                .write_agent_config("agent-a", &[("data", &src)], "")?;
        regions.region_mut("a").start_agent(&cfg)?;
        let st = settle(&data).await?;
        let acked_before = st["changes_acked"].as_u64().unwrap_or(0);
        assert!(acked_before >= 1, "{st}");

        let sampler = LeaseSampler::start(&regions);
        regions.net().partition("a", &leader_site)?;
        let cut = Instant::now();
        std::fs::write(
            src.join("during.txt"),
            b"written while cut from the leader\n",
        )?;
        // Longer than detection + lease + drift many times over, and than sync_timeout_ms (a,
        // cut from its standby, acknowledges in degraded mode after it).
        let mut relayed = false;
        while cut.elapsed() < Duration::from_secs(15) {
            if let Some(s) = regions.control_status().await {
                assert_eq!(s.epoch(), 1, "no failover: a is reachable: {s:?}");
                assert!(s.is_active_in("a"), "{s:?}");
                relayed |= s.regions.iter().any(|r| r.observed_via != 0);
            }
            if let Some(rb) = regions.report("b").await {
                assert!(!rb.leased, "b must never hold a lease: {rb:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            relayed,
            "a's report reached the global leader through another observer"
        );
        let ra = regions.report("a").await.expect("a's regional leader");
        assert!(ra.leased, "a keeps its lease: {ra:?}");
        let st = settle(&data).await?;
        assert!(
            st["changes_acked"].as_u64().unwrap_or(0) > acked_before,
            "a acknowledged during.txt while cut from the global leader only: {st}"
        );
        regions.net().heal()?;
        let samples = sampler.finish().await?;
        invariants::one_lease_holder(&samples)?;
        assert!(
            leased_samples(&samples, "b").is_empty(),
            "b was never leased"
        );
        let s = regions.wait_active("a", 1, Duration::from_secs(30)).await?;
        assert_eq!(s.epoch(), 1, "{s:?}");
        // b catches up with what a acknowledged in degraded mode.
        let healed = Instant::now();
        loop {
            let restored = dir.join("restored-b");
            let _ = std::fs::remove_dir_all(&restored);
            restore_latest(regions.region("b"), "data", &restored).await?;
            let c = tree::compare(&src, &restored.join("data"))?;
            if c.equal() {
                break;
            }
            assert!(
                healed.elapsed() < Duration::from_secs(60),
                "b did not catch up after the heal: {:?}",
                c.differences
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    })
    .await
}
