//! Issue 3, partition where the active region keeps the witness: regions a and b and the witness
//! each run in a network namespace of their own; site B is cut from A and from the witness's
//! site W. A and W hold 4 of the 7 global votes, so nothing moves: for well over lease +
//! detection + drift, the record stays a at epoch 1 and b's own leader never holds a lease.
//!
//! Writes in a under `[global] synchronous = true` (the default): a batch is committed in a but
//! acknowledged only once a standby region confirmed it; with b unreachable, intake waits
//! `sync_timeout_ms` (10 s by default) and answers `UNAVAILABLE` ("no standby region confirmed
//! ..."), and the agent keeps the change pending and retries. So a does not acknowledge while
//! its only standby is cut off (consistency first, RPO 0). After the heal, b catches up, confirms,
//! the agent's change is acknowledged and b holds it byte for byte.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::leases::{check_no_overlap, leased_samples, LeaseSampler};
use lifeboat_chaos_tests::*;
use lifeboat_cli::regions::{Regions, RegionsOpts, WITNESS_SITE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_of_the_standby_moves_nothing_and_stalls_synchronous_writes() -> anyhow::Result<()>
{
    run("t19", |dir| async move {
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

        // Observe for 12 s: longer than lease (1.5 s) + detection (1 s) + drift (0.25 s) many
        // times over, and longer than sync_timeout_ms (10 s), so at least one batch wait ran
        // out.
        let mut polls = 0;
        let mut saw_pending = false;
        while cut.elapsed() < Duration::from_secs(12) {
            if let Some(s) = regions.control_status().await {
                let rec = &s["state"]["record"];
                assert_eq!(
                    rec["epoch"], 1,
                    "no failover while a keeps the witness: {s}"
                );
                assert_eq!(rec["phase"]["phase"], "active", "{s}");
                assert_eq!(rec["phase"]["region"], "a", "{s}");
                polls += 1;
            }
            if let Some(rb) = regions.report("b").await {
                assert_eq!(rb["leased"], false, "b must never hold a lease: {rb}");
                assert_eq!(rb["epoch"], 1, "{rb}");
            }
            let st = agent_status(&data).expect("status.json");
            assert_eq!(
                st["changes_acked"].as_u64().unwrap_or(0),
                acked_before,
                "a acknowledged a change no standby confirmed: {st}"
            );
            saw_pending |= st["pending_changes"].as_u64().unwrap_or(0) >= 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            polls >= 10,
            "the global group (A + W) kept answering: {polls} polls"
        );
        assert!(saw_pending, "the agent saw during.txt and kept it pending");
        let ra = regions.report("a").await.expect("a's regional leader");
        assert_eq!(ra["leased"], true, "a keeps its lease: {ra}");
        // The write was held for sync_timeout_ms and then refused, as documented.
        let refused = regions.region("a").coords.iter().any(|c| {
            std::fs::read_to_string(&c.log)
                .is_ok_and(|l| l.contains("no standby region confirmed seq"))
        });
        assert!(
            refused,
            "a's leader logged the synchronous-replication refusal"
        );

        // Heal: b catches up and confirms, the pending change is acknowledged and is in b.
        regions.net().heal()?;
        let healed = Instant::now();
        let st = settle(&data).await?;
        eprintln!("heal -> change acknowledged after {:?}", healed.elapsed());
        assert!(
            st["changes_acked"].as_u64().unwrap_or(0) > acked_before,
            "{st}"
        );
        let restored = dir.join("restored-b");
        restore_latest(regions.region("b"), "data", &restored).await?;
        let c = tree::compare(&src, &restored.join("data"))?;
        assert!(c.equal(), "{:?}", c.differences);

        // Each refused batch was committed in a before the wait ran out, and is committed
        // again when the agent resends it: report how many versions of the file exist.
        let (all, _) = restore::list(
            &regions.region("b").conn(),
            "data/during.txt",
            None,
            true,
            false,
        )
        .await?;
        eprintln!("versions of data/during.txt in b: {}", all.len());
        let s = regions.wait_active("a", 1, Duration::from_secs(30)).await?;
        assert_eq!(s["state"]["record"]["epoch"], 1, "{s}");
        let samples = sampler.finish().await?;
        check_no_overlap(&samples)?;
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
