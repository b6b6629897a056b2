//! Issue 3, health and fencing: region a's coordinators stay up, but its agent's `[[checks]]`
//! entry (an exec check) starts failing. The regional leader reports the region unhealthy, the
//! global group stops renewing a's lease, waits until it surely expired, and fails over to b
//! under epoch 2; the audit log names the failing check. Region a, alive but fenced, no longer
//! acknowledges its agent's changes: a file written in a afterwards never reaches b's `data`
//! tree. Once a's agent learns b is active it hands that file to b as a conflict
//! (`_conflicts/a/e2/data/after.txt`, listed by `lifeboat conflicts`) and its directory becomes
//! a replica of b (the file leaves a's directory; it is kept only as the conflict).

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};

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
        let audit = format!("{:?}", s.state().audit);
        assert!(
            audit.contains("check service failed"),
            "the audit log names the failing check: {audit}"
        );
        // Region a is fenced: a new change there is not acknowledged as `data/after.txt`; it
        // becomes a conflict in b, and a's directory follows b.
        std::fs::write(src.join("after.txt"), b"written in the fenced region\n")?;
        let conflict = "_conflicts/a/e2/data/after.txt";
        let mut listed = serde_json::Value::Null;
        wait_until(Duration::from_secs(120), "the fenced change is a conflict", || {
            let out = lifeboat(regions.region("b"), &["conflicts", "--output", "json"]);
            listed = serde_json::from_slice(&out.stdout).unwrap_or_default();
            listed
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c["conflict"] == conflict))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {listed}"))?;
        wait_until(Duration::from_secs(120), "a's directory follows b", || {
            agent_status(&data).is_some_and(|s| s["roles"]["data"] == "replica")
                && !src.join("after.txt").exists()
        })
        .await?;
        let restored = dir.join("restored");
        restore_latest(regions.region("b"), "data", &restored).await?;
        assert!(restored.join("data/before.txt").exists());
        assert!(
            !restored.join("data/after.txt").exists(),
            "a change made in the fenced region reached b's data tree"
        );
        restore_latest(regions.region("b"), conflict, &restored).await?;
        assert_eq!(
            std::fs::read(restored.join(conflict))?,
            b"written in the fenced region\n"
        );
        invariants::restore_equals(&src, &restored.join("data"))?;
        let a = regions.control_status().await.expect("status");
        let ra = a.region("a").cloned().unwrap_or_default();
        assert_eq!(ra.role, "standby", "{ra:?}");
        assert!(!ra.leased, "{ra:?}");
        Ok(())
    })
    .await
}
