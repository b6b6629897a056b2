//! Issue 3, item 7: after a failover the new active region's agents are the source; the old
//! region, alive but fenced, rejoins as a replica and its unreplicated changes become
//! conflicts.
//!
//! Region a's agent protects a directory, region b's agent keeps a warm replica of it. a's
//! health check fails: the global group fails over to b under epoch 2 while a's coordinators
//! stay up (fenced). In a, one file is edited before the agent learns it, one more is edited and
//! one is created. Once a's agent learns b is active, it hands the three changes to b as
//! conflicts (`lifeboat conflicts --output json` lists them), and a's directory becomes equal to
//! b's. b's agent turned its replica into a source without re-sending a file. `lifeboat resolve`
//! keep-source puts a's bytes into b's directory and catalog, keep-both adds the side file,
//! keep-target discards; the list is empty afterwards. A planned failback swaps the roles back.

use std::path::Path;
use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_common::catalog::EntryKind;
use lifeboat_lab::regions::{Regions, RegionsOpts};

fn conflicts(regions: &Regions) -> serde_json::Value {
    let out = lifeboat_regions(regions, &["conflicts", "--output", "json"]);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn role(data: &Path, name: &str) -> String {
    agent_status(data)
        .and_then(|s| s["roles"][name].as_str().map(String::from))
        .unwrap_or_default()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_region_changes_become_conflicts_and_resolve() -> anyhow::Result<()> {
    run("t28", |dir| async move {
        let flag = dir.join("service-up");
        std::fs::write(&flag, b"")?;
        let mut regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let src = dir.join("src-a");
        std::fs::create_dir_all(src.join("sub"))?;
        std::fs::write(src.join("keep-source.txt"), b"v1 of keep-source\n")?;
        std::fs::write(src.join("sub/keep-both.txt"), b"v1 of keep-both\n")?;
        std::fs::write(src.join("untouched.txt"), b"same everywhere\n")?;
        let check = format!(
            "[[checks]]\nname = \"service\"\nkind = \"exec\"\ncommand = [\"test\", \"-f\", \"{}\"]\n",
            flag.display()
        );
        let (cfg_a, data_a) = regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &src)], &check)?;
        regions.region_mut("a").start_agent(&cfg_a)?;
        let rep = dir.join("replica-b");
        let (cfg_b, data_b) = regions.region("b").write_agent_config(
            "agent-b",
            &[],
            &format!("[[replicas]]\nname = \"data\"\npath = \"{}\"\n", rep.display()),
        )?;
        regions.region_mut("b").start_agent(&cfg_b)?;
        let st = settle(&data_a).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        wait_until(Duration::from_secs(120), "b's replica equals a", || {
            tree::compare(&src, &rep).map(|c| c.equal()).unwrap_or(false)
        })
        .await?;
        assert_eq!(role(&data_a, "data"), "source");
        assert_eq!(role(&data_b, "data"), "replica");

        // a's service fails: failover to b under epoch 2; a's coordinators stay up, fenced.
        std::fs::remove_file(&flag)?;
        regions.wait_active("b", 2, Duration::from_secs(60)).await?;
        // Changes in a after the fencing: an edit, another edit, a new file.
        std::fs::write(src.join("keep-source.txt"), b"edited in the fenced region a\n")?;
        std::fs::write(src.join("sub/keep-both.txt"), b"a's side of keep-both\n")?;
        std::fs::write(src.join("new-in-a.txt"), b"created in the fenced region a\n")?;

        // a's agent hands them to b as conflicts, then follows b.
        let mut last = serde_json::Value::Null;
        wait_until(Duration::from_secs(180), "three conflicts listed", || {
            last = conflicts(&regions);
            last.as_array().is_some_and(|a| a.len() == 3)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; last: {last}"))?;
        let list = last.as_array().unwrap().clone();
        let by_path = |p: &str| {
            list.iter()
                .find(|c| c["path"] == p)
                .cloned()
                .unwrap_or_else(|| panic!("no conflict for {p}: {list:?}"))
        };
        let ks = by_path("data/keep-source.txt");
        assert_eq!(ks["from_region"], "a");
        assert_eq!(ks["epoch"], 2);
        assert_eq!(ks["size"], 30);
        assert_eq!(
            ks["blake3"],
            blake3::hash(b"edited in the fenced region a\n").to_hex().as_str()
        );
        assert_eq!(
            ks["current"]["blake3"],
            blake3::hash(b"v1 of keep-source\n").to_hex().as_str()
        );
        assert!(by_path("data/new-in-a.txt")["current"].is_null());
        by_path("data/sub/keep-both.txt");

        // Both directories hold b's tree; the roles are swapped.
        wait_until(Duration::from_secs(120), "a's directory equals b's", || {
            role(&data_a, "data") == "replica"
                && role(&data_b, "data") == "source"
                && tree::compare(&src, &rep).map(|c| c.equal()).unwrap_or(false)
        })
        .await?;
        assert_eq!(read(&src.join("keep-source.txt")), b"v1 of keep-source\n");
        assert!(!src.join("new-in-a.txt").exists());
        // b's promotion re-sent no file: every file version in b's catalog came from a.
        let (all, _) =
            files::list(&regions.region("b").conn(), "data", None, true, false).await?;
        let resent: Vec<&str> = all
            .iter()
            .filter(|v| v.v.region == "b" && v.v.kind == EntryKind::File)
            .map(|v| v.v.path.as_str())
            .collect();
        assert!(resent.is_empty(), "files re-sent on promotion: {resent:?}");
        // b's agent is the source now: a new file there is acknowledged by b.
        std::fs::write(rep.join("written-in-b.txt"), b"written in b after the failover\n")?;
        let st = settle(&data_b).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        let restored = dir.join("restored-b");
        restore_latest(regions.region("b"), "data", &restored).await?;
        assert_eq!(
            read(&restored.join("data/written-in-b.txt")),
            b"written in b after the failover\n"
        );
        // ... and reaches a's replica.
        wait_until(Duration::from_secs(120), "a's replica has b's new file", || {
            read(&src.join("written-in-b.txt")) == b"written in b after the failover\n"
        })
        .await?;

        // keep-source: a's bytes become the current version, in b's directory and catalog.
        let r = json(&lifeboat_regions(
            &regions,
            &["resolve", "data/keep-source.txt", "--keep", "source", "--output", "json"],
        ));
        assert_eq!(r["from_region"], "a");
        wait_until(Duration::from_secs(60), "keep-source written in b", || {
            read(&rep.join("keep-source.txt")) == b"edited in the fenced region a\n"
        })
        .await?;
        let restored = dir.join("restored-ks");
        restore_latest(regions.region("b"), "data/keep-source.txt", &restored).await?;
        assert_eq!(
            read(&restored.join("data/keep-source.txt")),
            b"edited in the fenced region a\n"
        );
        // keep-both: the side file next to b's version.
        json(&lifeboat_regions(
            &regions,
            &["resolve", "data/sub/keep-both.txt", "--keep", "both", "--output", "json"],
        ));
        wait_until(Duration::from_secs(60), "keep-both side file in b", || {
            read(&rep.join("sub/keep-both.txt.conflict-a-e2")) == b"a's side of keep-both\n"
        })
        .await?;
        assert_eq!(read(&rep.join("sub/keep-both.txt")), b"v1 of keep-both\n");
        // keep-target: nothing changes in b.
        json(&lifeboat_regions(
            &regions,
            &["resolve", "data/new-in-a.txt", "--keep", "target", "--output", "json"],
        ));
        let left = conflicts(&regions);
        assert_eq!(left.as_array().map(|a| a.len()), Some(0), "{left}");
        assert!(!rep.join("new-in-a.txt").exists());
        // b's agent took the resolved files as acknowledged: nothing pending, and a's replica
        // converges on b's tree.
        let st = settle(&data_b).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        wait_until(Duration::from_secs(120), "a's replica equals b after resolving", || {
            tree::compare(&src, &rep).map(|c| c.equal()).unwrap_or(false)
        })
        .await?;
        let audit = json(&lifeboat_regions(&regions, &["audit", "--output", "json"])).to_string();
        assert!(audit.contains("\"resolve\""), "audit names the resolutions: {audit}");

        // Failback: a active again under epoch 3; a's agent a source, b's a replica.
        std::fs::write(&flag, b"")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let healthy = regions
                .control_status()
                .await
                .is_some_and(|s| s.region("a").is_some_and(|r| r.is_healthy_standby()));
            if healthy {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "a is not a healthy standby again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let fb = json(&lifeboat_regions(&regions, &["failback", "--output", "json"]));
        assert_eq!(fb["to"], "a");
        wait_until(Duration::from_secs(120), "roles swapped back", || {
            role(&data_a, "data") == "source" && role(&data_b, "data") == "replica"
        })
        .await?;
        std::fs::write(src.join("after-failback.txt"), b"written in a after the failback\n")?;
        let st = settle(&data_a).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        wait_until(Duration::from_secs(120), "trees equal after the failback", || {
            tree::compare(&src, &rep).map(|c| c.equal()).unwrap_or(false)
        })
        .await?;
        let left = conflicts(&regions);
        assert_eq!(left.as_array().map(|a| a.len()), Some(0), "{left}");
        Ok(())
    })
    .await
}
