//! Issue 3, flapping health → no ping-pong (loopback: health comes from the agents' checks, no
//! partition needed). Policy: `min_failover_interval_ms = 20000`.
//!
//! 1. Region a's agent has an exec check (`test -f FLAG`) that the test flips down 1.5 s / up
//!    1.5 s for about 12 s. The global group notices (a `suspect` entry in the audit log); it
//!    may fail over to b once (the first change is not limited by the interval), and then phase
//!    2 starts at once.
//! 2. Once b is active at epoch 2 (the test keeps a's check down until it is, if phase 1 did not
//!    fail over), a is healthy again and b's agent check flaps (down 4.5 s / up 1.5 s) within the
//!    minimum interval: b is suspect each time but the record never moves back to a; the audit
//!    log says the failover was blocked by the minimum interval. Finally exactly one region
//!    holds a lease, b at epoch 2, and the audit log holds exactly one failover.

use std::path::Path;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_proto::AuditEntry;

const MIN_INTERVAL_MS: u64 = 20_000;

fn set(flag: &Path, up: bool) -> anyhow::Result<()> {
    if up {
        std::fs::write(flag, b"")?;
    } else if flag.exists() {
        std::fs::remove_file(flag)?;
    }
    Ok(())
}

fn check_toml(flag: &Path) -> String {
    format!(
        "[[checks]]\nname = \"service\"\nkind = \"exec\"\ncommand = [\"test\", \"-f\", \"{}\"]\n",
        flag.display()
    )
}

/// Every audit entry (not just the status document's last 20).
async fn audit(regions: &Regions) -> anyhow::Result<Vec<AuditEntry>> {
    regions.audit().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_health_changes_the_active_region_at_most_once() -> anyhow::Result<()> {
    run("t26", |dir| async move {
        let flag_a = dir.join("service-a-up");
        let flag_b = dir.join("service-b-up");
        set(&flag_a, true)?;
        set(&flag_b, true)?;
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                policy_toml: format!("min_failover_interval_ms = {MIN_INTERVAL_MS}\n"),
                ..Default::default()
            },
        )?;
        let t0 = Instant::now();
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        for (r, flag) in [("a", &flag_a), ("b", &flag_b)] {
            let src = dir.join(format!("src-{r}"));
            std::fs::create_dir_all(&src)?;
            let (cfg, _) = regions.region(r).write_agent_config(
                &format!("agent-{r}"),
                &[(&format!("data-{r}"), &src)],
                &check_toml(flag),
            )?;
            regions.region_mut(r).start_agent(&cfg)?;
        }
        // Both regions' agents report (healthy) before the flapping starts.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = regions.control_status().await.unwrap_or_default();
            let agents_ok = ["a", "b"]
                .iter()
                .all(|r| s.region(r).is_some_and(|x| x.agents >= 1 && x.healthy));
            if agents_ok {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "agents did not report: {s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Phase 1: a's health flaps, 1.5 s down / 1.5 s up.
        let start = Instant::now();
        let mut epochs = vec![1u64];
        let mut down = false;
        let mut flipped = Instant::now();
        set(&flag_a, false)?;
        down = !down;
        while start.elapsed() < Duration::from_secs(12) {
            if flipped.elapsed() >= Duration::from_millis(1500) {
                down = !down;
                set(&flag_a, !down)?;
                flipped = Instant::now();
            }
            if let Some(s) = regions.control_status().await {
                let e = s.epoch();
                if epochs.last() != Some(&e) {
                    epochs.push(e);
                }
            }
            if epochs.len() > 1 {
                // The flapping caused a failover: go straight to phase 2, which must run
                // within the minimum interval that starts now.
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        set(&flag_a, true)?;
        eprintln!("phase 1: epochs seen {epochs:?}");
        assert!(
            epochs.len() <= 2,
            "the epoch changed more than once: {epochs:?}"
        );
        let log = audit(&regions).await?;
        let count = |a: &str| log.iter().filter(|e| e.action == a).count();
        assert!(count("suspect") >= 1, "the flapping was noticed: {log:?}");
        assert!(count("failover") <= 1, "{log:?}");
        if count("failover") == 0 {
            assert!(
                count("recovered") >= 1,
                "no failover: a recovered each time: {log:?}"
            );
        }

        // Phase 2: make sure b is active (a down until it is), then a is healthy again.
        if count("failover") == 0 {
            set(&flag_a, false)?;
        }
        let s = regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        set(&flag_a, true)?;
        let last_change = s
            .record()
            .and_then(|r| r.last_change_ms)
            .expect("last_change_ms after a failover");
        // b flaps, 4.5 s down / 1.5 s up, while the minimum interval surely still runs (2 s margin
        // for b's agent to report it is up again).
        let window_end = last_change + MIN_INTERVAL_MS - 2_000;
        let mut b_downs = 0;
        while lifeboat_common::now_ms() as u64 + 4_500 < window_end {
            set(&flag_b, false)?;
            b_downs += 1;
            tokio::time::sleep(Duration::from_millis(4_500)).await;
            set(&flag_b, true)?;
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
        set(&flag_b, true)?;
        assert!(
            b_downs >= 1,
            "no time left in the minimum interval to flap b (machine too slow?)"
        );
        let s = regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        assert_eq!(s.epoch(), 2, "no ping-pong back to a: {s:?}");
        let log = audit(&regions).await?;
        invariants::epochs_never_go_back(&log)?;
        let count = |a: &str| log.iter().filter(|e| e.action == a).count();
        assert_eq!(count("failover"), 1, "exactly one failover: {log:?}");
        let blocked: Vec<&AuditEntry> = log
            .iter()
            .filter(|e| e.action == "blocked" && e.detail.contains("minimum interval"))
            .collect();
        assert!(
            !blocked.is_empty(),
            "the failover back to a was blocked by the minimum interval: {log:?}"
        );
        assert!(
            log.iter().any(|e| e.action == "suspect" && e.epoch == 2),
            "b's flapping was noticed: {log:?}"
        );
        // One leased region: b.
        let leased: Vec<String> = s
            .regions
            .iter()
            .filter(|r| r.leased)
            .map(|r| r.region.clone())
            .collect();
        assert_eq!(leased, vec!["b".to_string()], "{s:?}");
        eprintln!(
            "phase 2: {b_downs} downs of b, {} blocked entries; total {:?}",
            blocked.len(),
            t0.elapsed()
        );
        Ok(())
    })
    .await
}
