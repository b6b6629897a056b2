//! Issue 3, topology by admin RPC: two regions without a witness refuse automatic failover (a
//! partition would leave no majority). A witness is started later and added with
//! `lifeboat topology add --witness`: the global group grows to 7 voters, automatic failover is
//! allowed, and losing region A then fails over to B (which needs the witness's vote: B's 3 of
//! the 6 region voters are no majority). A lost coordinator of A is then removed with
//! `lifeboat topology remove`; every change is in the audit log.

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_added_by_rpc_enables_automatic_failover() -> anyhow::Result<()> {
    run("t30", |dir| async move {
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                witness: false,
                // This test is about the topology, not the RPO budget: right after the
                // membership change the global leader may move, and B's last word from A can be
                // a few seconds old when A is lost (see the wait below). With the default budget
                // of 0 ms such a standby is no candidate.
                policy_toml: "rpo_budget_ms = 10000\n".into(),
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let t = json(&run_cli(
            &regions,
            &["topology", "show", "--output", "json"],
        ));
        assert_eq!(t["members"].as_array().unwrap().len(), 6, "{t}");
        let why = t["automatic_refused"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(why.contains("no witness"), "refused, with the reason: {t}");

        let (id, addr) = regions.start_joining_witness()?;
        let id_s = id.to_string();
        let t = json(&run_cli(
            &regions,
            &[
                "topology",
                "add",
                "--id",
                &id_s,
                "--addr",
                &addr,
                "--region",
                "witness",
                "--witness",
                "--output",
                "json",
            ],
        ));
        assert!(
            t["automatic_refused"].is_null(),
            "a witness allows automatic failover: {t}"
        );
        assert!(
            t["voters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v.as_u64() == Some(id)),
            "the witness votes: {t}"
        );
        assert_eq!(t["members"].as_array().unwrap().len(), 7, "{t}");
        // The global leader may be moving right after the membership change: status is
        // retried until one answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let s = loop {
            if let Some(s) = regions.control_status().await {
                break s;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no control status within 30 s of the membership change"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(s.automatic_refused.is_none(), "{s:?}");
        assert!(s.state().policy.is_some_and(|p| p.automatic), "{s:?}");

        // The groups settle after the membership change before A is lost: A holds a current
        // lease and B is in sync, for 3 s in a row. Under the default consistency-first policy
        // (RPO budget 0 ms) a standby that has not heard from A for over 2 s is no candidate,
        // and during the change the global leader may move, so A's lease renewals and B's
        // keepalives from A can pause.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut settled_since: Option<std::time::Instant> = None;
        loop {
            let s = regions.control_status().await.unwrap_or_default();
            let b_in_sync = s.region("b").is_some_and(|r| r.healthy && r.lag_ms == 0);
            let a_leased = s
                .record()
                .is_some_and(|r| r.lease_holder.as_deref() == Some("a"))
                && s.lease_expiry_ms > s.now_ms
                && s.region("a").is_some_and(|r| r.leased);
            if b_in_sync && a_leased {
                let since = *settled_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(3) {
                    break;
                }
            } else {
                settled_since = None;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "a leased and b in sync not seen for 3 s within 60 s: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // Region A lost: only B's 3 voters and the witness remain, 4 of 7.
        regions.kill_region("a");
        regions.wait_active("b", 2, Duration::from_secs(60)).await?;

        // Decommission one of A's lost coordinators (node 3).
        let t = json(&run_cli(
            &regions,
            &["topology", "remove", "--id", "3", "--output", "json"],
        ));
        assert_eq!(t["members"].as_array().unwrap().len(), 6, "{t}");
        assert!(
            !t["voters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v.as_u64() == Some(3)),
            "{t}"
        );
        // An unknown node is refused with a clear error.
        let out = run_cli(&regions, &["topology", "remove", "--id", "99"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a member"));

        let audit = json(&run_cli(&regions, &["audit", "--output", "json"]));
        let topo: Vec<&serde_json::Value> = audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "topology")
            .collect();
        assert_eq!(topo.len(), 2, "the add and the remove are audited: {audit}");
        regions.wait_active("b", 2, Duration::from_secs(30)).await?;
        Ok(())
    })
    .await
}
