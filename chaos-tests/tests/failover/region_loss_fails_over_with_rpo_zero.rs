//! Issue 3: two regions of 3 coordinators and a witness form one global group. Region A is
//! active; its agent's changes are acknowledged only once region B committed them (synchronous
//! replication). Every process of A is SIGKILLed: the global group (B's 3 + witness = 4 of 7)
//! fails B over under epoch 2 after A's lease surely expired, B's traffic hook runs with the
//! epoch and regions in its environment, and a restore from B is byte-equal with every
//! acknowledged change (RPO 0). B's agent, which kept a warm replica of A's directory, turns it
//! into a source: nothing is re-sent on the switch, and a file written there afterwards is
//! acknowledged by B. A restarts and rejoins as a standby that refuses writes; a planned
//! `lifeboat failback` then moves back to A under epoch 3 with nothing lost, and B's directory
//! becomes a replica again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_lab::tree;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_loss_fails_over_with_rpo_zero_and_failback_loses_nothing() -> anyhow::Result<()> {
    run("t15", |dir| async move {
        let hook_out = dir.join("hook-b.out");
        let mut hooks = BTreeMap::new();
        hooks.insert(
            "b".to_string(),
            format!(
                "[[global.traffic_hooks]]\nkind = \"exec\"\nname = \"move-dns\"\ncommand = [\"sh\", \"-c\", \"echo $LIFEBOAT_EPOCH $LIFEBOAT_ACTIVE_REGION $LIFEBOAT_PREVIOUS_REGION >> {}\"]\n",
                hook_out.display()
            ),
        );
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                hooks_toml: hooks,
                ..Default::default()
            },
        )?;
        let s = regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        assert_eq!(s.epoch(), 1);
        assert!(
            s.automatic_refused.is_none(),
            "2 regions + witness: automatic failover allowed: {s:?}"
        );

        // Drill: the plan names the target, the new epoch and the hook, and acts on nothing.
        let drill = json(&lifeboat_regions(&regions, &["drill", "--simulate", "--output", "json"]));
        assert_eq!(drill["to"], "b");
        assert_eq!(drill["new_epoch"], 2);
        assert_eq!(drill["hooks"][0], "move-dns");
        assert_eq!(drill["expected_rpo_entries"], 0);

        // Region A's agent replicates a tree; every acknowledged change is in B.
        let src = dir.join("src");
        tree::generate(&src, 60, 4096, 7)?;
        let (cfg, data) = regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &src)], "")?;
        regions.region_mut("a").start_agent(&cfg)?;
        let st = settle(&data).await?;
        assert!(st["changes_acked"].as_u64().unwrap() > 0, "{st}");
        assert_eq!(st["pending_changes"], 0, "{st}");
        // Region B's agent keeps a warm replica of it (its role follows the active region).
        let rep_b = dir.join("replica-b");
        let (cfg_rb, data_rb) = regions.region("b").write_agent_config(
            "agent-rb",
            &[],
            &format!("[[replicas]]\nname = \"data\"\npath = \"{}\"\n", rep_b.display()),
        )?;
        regions.region_mut("b").start_agent(&cfg_rb)?;
        wait_until(Duration::from_secs(120), "b's replica equals a's tree", || {
            tree::compare(&src, &rep_b).map(|c| c.equal()).unwrap_or(false)
        })
        .await?;

        // Lose region A entirely.
        let killed = Instant::now();
        regions.kill_region("a");
        let s = regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        invariants::one_active_region(&s)?;
        let rto = killed.elapsed();
        eprintln!("failover: b active at epoch 2 after {rto:?}; status {s:?}");
        let hook = std::fs::read_to_string(&hook_out)?;
        assert_eq!(hook.trim(), "2 b a", "hook environment: epoch, active, previous");
        assert!(s.state().last_rto_ms.is_some(), "measured RTO recorded");

        // RPO 0: B holds every acknowledged change.
        let restored = dir.join("restored-b");
        restore_latest(regions.region("b"), "data", &restored).await?;
        invariants::restore_equals(&src, &restored.join("data"))?;

        // The audit log has the failover, the promotion, the hook and the completion.
        let audit = json(&lifeboat_regions(&regions, &["audit", "--output", "json"]));
        let actions: Vec<&str> = audit
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        for a in ["failover", "promote", "traffic-hook", "completed"] {
            assert!(actions.contains(&a), "audit lacks {a}: {audit}");
        }

        // B's agent promoted its replica to a source without re-sending a single file.
        wait_until(Duration::from_secs(120), "b's agent is a source of data", || {
            agent_status(&data_rb).is_some_and(|s| s["roles"]["data"] == "source")
        })
        .await?;
        let (all, _) = files::list(&regions.region("b").conn(), "data", None, true, false).await?;
        let resent: Vec<&str> = all
            .iter()
            .filter(|v| v.v.region == "b" && v.v.kind == lifeboat_common::catalog::EntryKind::File)
            .map(|v| v.v.path.as_str())
            .collect();
        assert!(resent.is_empty(), "files re-sent on promotion: {resent:?}");

        // A comes back: standby of B, refusing agent writes (its lease is gone).
        regions.start_region("a")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = regions.control_status().await;
            let a_standby = s.as_ref().is_some_and(|s| {
                s.region("a").is_some_and(|r| r.is_healthy_standby())
            });
            if a_standby {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "a did not rejoin as standby: {s:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Changes made in B (through B's own agent) reach A once it is standby.
        let src_b = dir.join("src-b");
        tree::generate(&src_b, 10, 2048, 9)?;
        let (cfg_b, data_b) = regions
            .region("b")
            .write_agent_config("agent-b", &[("data-b", &src_b)], "")?;
        regions.region_mut("b").start_agent(&cfg_b)?;
        settle(&data_b).await?;
        // A file written in B's promoted directory is acknowledged by B and restorable from B.
        std::fs::write(rep_b.join("written-in-b.txt"), b"written in region b after the failover\n")?;
        let st = settle(&data_rb).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");
        let restored = dir.join("restored-b-new");
        restore_latest(regions.region("b"), "data", &restored).await?;
        invariants::restore_equals(&rep_b, &restored.join("data"))?;
        assert_eq!(
            std::fs::read(restored.join("data/written-in-b.txt"))?,
            b"written in region b after the failover\n"
        );

        // Planned failback: back to A under epoch 3, nothing lost.
        let out = lifeboat_regions(&regions, &["failback", "--output", "json"]);
        let fb = json(&out);
        assert_eq!(fb["to"], "a");
        assert_eq!(fb["epoch"], 3);
        let restored = dir.join("restored-a");
        restore_latest(regions.region("a"), "data-b", &restored).await?;
        invariants::restore_equals(&src_b, &restored.join("data-b"))?;
        let restored = dir.join("restored-a2");
        restore_latest(regions.region("a"), "data", &restored).await?;
        invariants::restore_equals(&rep_b, &restored.join("data"))?;
        // B's directory follows A again: a replica.
        wait_until(Duration::from_secs(120), "b's agent is a replica of data", || {
            agent_status(&data_rb).is_some_and(|s| s["roles"]["data"] == "replica")
        })
        .await?;
        Ok(())
    })
    .await
}
