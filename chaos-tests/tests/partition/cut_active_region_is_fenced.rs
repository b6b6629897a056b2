//! Issue 3, partition with real processes in network namespaces: regions a and b (3
//! coordinators each) and the witness each run in a site of their own. The global leader is
//! moved into region a first. Site A is cut from B and from the witness's site W (the test host
//! still reaches every site). B and W hold 4 of the 7
//! global votes: b becomes active at epoch 2 once a's lease surely expired, and the audit log
//! has the failover. Region a, alive on its side of the partition, is fenced: its own regional
//! leader says it holds no lease, and a file written there afterwards is never acknowledged and
//! never reaches b. Sampling both regions' leaders throughout shows no two leases ever
//! overlapped. After the heal, a rejoins as a standby of b (epoch stays 2) and catches up with
//! a change acknowledged in b.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::leases::{leased_samples, LeaseSampler};
use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts, WITNESS_SITE};

/// Paths of the latest live versions under `prefix` in `cluster`'s catalog.
async fn catalog_paths(cluster: &Cluster, prefix: &str) -> anyhow::Result<Vec<String>> {
    let (rows, _) = files::list(&cluster.conn(), prefix, None, false, false).await?;
    Ok(rows.into_iter().map(|r| r.v.path).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_a_from_b_and_witness_fails_over_to_b_and_fences_a() -> anyhow::Result<()> {
    run("t24", |dir| async move {
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
        assert_eq!(st["pending_changes"], 0, "{st}");
        let acked_before = st["changes_acked"].as_u64().unwrap_or(0);
        assert!(acked_before >= 1, "{st}");

        // The hardest case: the global leader is lost with the active region, so that the
        // leader elected on b's side never heard from a and must rely on the committed record
        // (a never recorded degraded synchronous replication: b holds every acknowledged change).
        let leader = regions
            .move_global_leader_to("a", Duration::from_secs(60))
            .await?;
        eprintln!("global leader: node {leader} in region a");
        regions.wait_active("a", 1, Duration::from_secs(30)).await?;
        let st = settle(&data).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");

        let sampler = LeaseSampler::start(&regions);
        // Cut site A from B and from W.
        let net = regions.net();
        net.partition("a", "b")?;
        net.partition("a", WITNESS_SITE)?;
        let cut = Instant::now();
        let s = regions.wait_active("b", 2, Duration::from_secs(60)).await?;
        invariants::one_active_region(&s)?;
        eprintln!(
            "partition -> b active at epoch 2 after {:?} (setup {:?})",
            cut.elapsed(),
            t0.elapsed() - cut.elapsed()
        );
        assert_eq!(s.epoch(), 2, "{s:?}");

        // The audit log (committed on B's side) has the failover a -> b at epoch 2.
        let b_side: Vec<String> = regions
            .region("b")
            .addrs()
            .into_iter()
            .chain(regions.witness.iter().flat_map(|w| w.addrs()))
            .collect();
        let audit = regions.audit_on(&b_side, Duration::from_secs(5)).await?;
        invariants::epochs_never_go_back(&audit)?;
        let failovers: Vec<_> = audit.iter().filter(|e| e.action == "failover").collect();
        assert_eq!(failovers.len(), 1, "one failover: {audit:?}");
        assert_eq!(failovers[0].epoch, 2, "{audit:?}");
        let detail = &failovers[0].detail;
        assert!(
            detail.starts_with("a lost") && detail.contains("promoting b"),
            "{detail}"
        );
        assert!(
            audit
                .iter()
                .any(|e| e.action == "completed" && e.epoch == 2),
            "{audit:?}"
        );

        // Region a is fenced: its own regional leader holds no valid lease, and it still
        // follows epoch 1 (it cannot learn epoch 2 across the partition).
        let ra = regions
            .report("a")
            .await
            .expect("a's regional leader answers the test host");
        assert!(!ra.leased, "a must be fenced: {ra:?}");
        assert_eq!(ra.epoch, 1, "{ra:?}");

        // A file written in a now (a's lease expired before b was promoted) is never
        // acknowledged by a.
        std::fs::write(src.join("after.txt"), b"written in the fenced region\n")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = agent_status(&data).expect("status.json");
            if st["pending_changes"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent never saw after.txt: {st}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let watch_until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < watch_until {
            let st = agent_status(&data).expect("status.json");
            assert!(
                st["pending_changes"].as_u64().unwrap_or(0) >= 1,
                "the fenced region acknowledged a change: {st}"
            );
            assert_eq!(
                st["changes_acked"].as_u64().unwrap_or(0),
                acked_before,
                "the fenced region acknowledged a change: {st}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let in_b = catalog_paths(regions.region("b"), "data").await?;
        assert!(in_b.iter().any(|p| p == "data/before.txt"), "{in_b:?}");
        assert!(
            !in_b.iter().any(|p| p == "data/after.txt"),
            "a change made in the fenced region reached b: {in_b:?}"
        );
        let ra = regions.report("a").await.expect("a's regional leader");
        assert!(!ra.leased, "{ra:?}");

        // Heal. What a's agent does after the heal is not this test's subject: stop it.
        for mut a in regions.region_mut("a").agents.drain(..) {
            let _ = a.kill();
            let _ = a.wait();
        }
        regions.net().heal()?;
        let healed = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = regions.control_status().await;
            let ok = s.as_ref().is_some_and(|s| {
                s.epoch() == 2
                    && s.is_active_in("b")
                    && s.region("a").is_some_and(|r| r.is_healthy_standby())
            });
            if ok {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "a did not rejoin as a healthy standby of b at epoch 2: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!("heal -> a standby after {:?}", healed.elapsed());

        // A change acknowledged in b (synchronous: a standby confirmed it) reaches a.
        let src_b = dir.join("src-b");
        tree::generate(&src_b, 5, 2048, 18)?;
        let (cfg_b, data_b) =
            regions
                .region("b")
                .write_agent_config("agent-b", &[("data-b", &src_b)], "")?;
        regions.region_mut("b").start_agent(&cfg_b)?;
        let st = settle(&data_b).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        let restored = dir.join("restored-a");
        restore_latest(regions.region("a"), "data-b", &restored).await?;
        invariants::restore_equals(&src_b, &restored.join("data-b"))?;

        let s = regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        assert_eq!(s.epoch(), 2, "epoch stays 2 after the heal: {s:?}");
        let ra = regions.report("a").await.expect("a's regional leader");
        assert!(!ra.leased, "{ra:?}");
        assert_eq!(ra.epoch, 2, "a follows epoch 2 after the heal: {ra:?}");

        // Never two regions leased at once, as each region's own leader said.
        let samples = sampler.finish().await?;
        invariants::one_lease_holder(&samples)?;
        let a_leased = leased_samples(&samples, "a");
        let b_leased = leased_samples(&samples, "b");
        assert!(
            !a_leased.is_empty(),
            "a was leased before the partition: sampler saw nothing"
        );
        assert!(
            !b_leased.is_empty(),
            "b was leased after the failover: sampler saw nothing"
        );
        assert!(
            a_leased.iter().all(|s| s.epoch == 1),
            "a leased only at epoch 1"
        );
        assert!(
            b_leased.iter().all(|s| s.epoch == 2),
            "b leased only at epoch 2"
        );
        eprintln!(
            "{} lease samples ({} a leased, {} b leased), total {:?}",
            samples.len(),
            a_leased.len(),
            b_leased.len(),
            t0.elapsed()
        );
        Ok(())
    })
    .await
}
