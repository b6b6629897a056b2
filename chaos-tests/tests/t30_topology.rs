//! Issue 3, topology by admin RPC: two regions without a witness refuse automatic failover (a
//! partition would leave no majority). A witness is started later and added with
//! `lifeboat topology add --witness`: the global group grows to 7 voters, automatic failover is
//! allowed, and losing region A then fails over to B (which needs the witness's vote: B's 3 of
//! the 6 region voters are no majority). A lost coordinator of A is then removed with
//! `lifeboat topology remove`; every change is in the audit log.

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_cli::regions::{Regions, RegionsOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_added_by_rpc_enables_automatic_failover() -> anyhow::Result<()> {
    run("t30", |dir| async move {
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                witness: false,
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let t = json(&run_cli(
            &regions,
            &["topology", "show", "--output", "json"],
        ));
        assert_eq!(t["members"].as_array().unwrap().len(), 6, "{t}");
        let why = t["automatic"]["Err"]
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
            t["automatic"].get("Ok").is_some(),
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
        let s = regions.control_status().await.expect("status");
        assert!(s["automatic"].get("Ok").is_some(), "{s}");
        assert_eq!(s["state"]["policy"]["automatic"], true, "{s}");

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
