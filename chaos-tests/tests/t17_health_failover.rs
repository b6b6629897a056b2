//! Issue 3, health and fencing: region a's coordinators stay up, but its agent's `[[checks]]`
//! entry (an exec check) starts failing. The regional leader reports the region unhealthy, the
//! global group stops renewing a's lease, waits until it surely expired, and fails over to b
//! under epoch 2; the audit log names the failing check. Region a, alive but fenced, no longer
//! acknowledges its agent's changes: a file written in a afterwards stays pending and never
//! reaches b's catalog.

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_cli::regions::{Regions, RegionsOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_agent_check_fails_the_region_over_and_fences_it() -> anyhow::Result<()> {
    run("t17", |dir| async move {
        let flag = dir.join("service-up");
        std::fs::write(&flag, b"")?;
        let mut regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("before.txt"), b"acknowledged before the failover\n")?;
        let check = format!(
            "[[checks]]\nname = \"service\"\nkind = \"exec\"\ncommand = [\"test\", \"-f\", \"{}\"]\n",
            flag.display()
        );
        let (cfg, data) = regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &src)], &check)?;
        regions.region_mut("a").start_agent(&cfg)?;
        let st = settle(&data).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");

        // The service in region a goes down; its coordinators stay up.
        std::fs::remove_file(&flag)?;
        let s = regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        let audit = s["state"]["audit"].to_string();
        assert!(
            audit.contains("check service failed"),
            "the audit log names the failing check: {audit}"
        );
        // Region a is fenced: a new change there is never acknowledged.
        std::fs::write(src.join("after.txt"), b"written in the fenced region\n")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let st = agent_status(&data).expect("status.json");
        assert!(
            st["pending_changes"].as_u64().unwrap_or(0) >= 1,
            "the fenced region must not acknowledge: {st}"
        );
        let restored = dir.join("restored");
        restore_latest(regions.region("b"), "data", &restored).await?;
        assert!(restored.join("data/before.txt").exists());
        assert!(
            !restored.join("data/after.txt").exists(),
            "a change made in the fenced region reached b"
        );
        let a = regions.control_status().await.expect("status");
        let ra = a["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == "a")
            .cloned()
            .unwrap_or_default();
        assert_eq!(ra["role"], "standby", "{ra}");
        assert_eq!(ra["leased"], false, "{ra}");
        Ok(())
    })
    .await
}
