//! Issue 3, old orders (lower epoch) are refused, end to end through the gRPC API of real
//! processes. Regions a and b plus a witness on loopback; a planned `lifeboat switchover --to b
//! --expect-epoch 1` moves the active region to b at epoch 2. Then, with the epoch at 2:
//!
//! - an operator order computed under epoch 1 (`lifeboat switchover --to a --expect-epoch 1`) is
//!   refused with `stale_epoch` and changes nothing (record, audit log);
//! - a lease renewal asked under epoch 1 is refused by the global leader;
//! - an agent push stamped with epoch 1 is refused by b's leader with `stale_epoch` naming the
//!   current epoch (which the agent's parser reads back), while the same push stamped with epoch 2
//!   is acknowledged, and only that one is in b's catalog;
//! - the old active region a, now a standby, refuses the push outright.

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_cli::regions::{Regions, RegionsOpts};
use lifeboat_common::tls::TlsConfig;
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::push_message::Msg;
use lifeboat_proto::{FileChange, PushMessage, PushReply};
use serde_json::{json, Value};

fn run_cli(regions: &Regions, args: &[&str]) -> std::process::Output {
    let bin = lifeboat_cli::harness::bin_dir().unwrap().join("lifeboat");
    let conn = regions.conn();
    std::process::Command::new(bin)
        .args(args)
        .arg("--coordinator")
        .arg(conn.coordinators.join(","))
        .arg("--tls-dir")
        .arg(conn.tls_dir.unwrap())
        .output()
        .expect("run lifeboat")
}

/// Pushes one empty file `orders/<name>` stamped with `epoch` to `addr`, as an agent would.
async fn push_empty_file(
    tls: &TlsConfig,
    addr: &str,
    name: &str,
    epoch: u64,
) -> Result<PushReply, tonic::Status> {
    let ch = tls
        .channel(addr)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut client = AgentServiceClient::new(ch);
    let change = FileChange {
        change_id: 7,
        path: format!("orders/{name}"),
        kind: lifeboat_proto::EntryKind::File as i32,
        deleted: false,
        size: 0,
        mode: 0o644,
        mtime_ns: lifeboat_common::now_ms() * 1_000_000,
        blake3: blake3::hash(b"").to_hex().to_string(),
        symlink_target: String::new(),
        part_count: 0,
        epoch,
        rename_from: String::new(),
        root: "orders".into(),
    };
    let msgs = vec![PushMessage {
        msg: Some(Msg::Change(change)),
    }];
    client
        .push_changes(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

fn audit_count(audit: &Value, action: &str) -> usize {
    audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == action)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_under_an_older_epoch_are_refused() -> anyhow::Result<()> {
    run("t21", |dir| async move {
        let regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;

        // A planned switchover ordered under the current epoch 1 is carried out.
        let out = run_cli(
            &regions,
            &[
                "switchover",
                "--to",
                "b",
                "--expect-epoch",
                "1",
                "--output",
                "json",
            ],
        );
        let sw = json(&out);
        assert_eq!(sw["to"], "b");
        assert_eq!(sw["epoch"], 2);
        regions.wait_active("b", 2, Duration::from_secs(30)).await?;

        // 1. An operator order computed under epoch 1 is refused and changes nothing.
        let audit_before = regions
            .control_on(
                &regions.all_addrs(),
                "audit",
                json!({"limit": 1000}),
                Duration::from_secs(5),
            )
            .await?;
        let out = run_cli(
            &regions,
            &[
                "switchover",
                "--to",
                "a",
                "--expect-epoch",
                "1",
                "--output",
                "json",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a stale switchover must fail");
        assert!(
            err.contains("stale_epoch") && err.contains("current epoch is 2"),
            "{err}"
        );
        let s = regions.wait_active("b", 2, Duration::from_secs(10)).await?;
        assert_eq!(s["state"]["record"]["epoch"], 2, "{s}");
        assert!(s["switchover_to"].is_null(), "no switchover started: {s}");
        let audit_after = regions
            .control_on(
                &regions.all_addrs(),
                "audit",
                json!({"limit": 1000}),
                Duration::from_secs(5),
            )
            .await?;
        for a in ["switchover", "failover", "promote"] {
            assert_eq!(
                audit_count(&audit_before, a),
                audit_count(&audit_after, a),
                "the stale order left no {a} entry: {audit_after}"
            );
        }

        // 2. A lease renewal under epoch 1 is refused by the global leader (for the active
        //    region b, and for the old region a).
        let rb = regions.report("b").await.expect("b's leader");
        for (region, node) in [("b", rb["node_id"].clone()), ("a", json!(1))] {
            let r = regions
                .control_on(
                    &regions.all_addrs(),
                    "renew",
                    json!({"region": region, "epoch": 1, "node_id": node}),
                    Duration::from_secs(5),
                )
                .await?;
            assert_eq!(
                r["granted"], false,
                "renewal of {region} under epoch 1: {r}"
            );
            assert_eq!(r["epoch"], 2, "{r}");
        }

        // 3. Agent pushes: stamped with epoch 1 refused (stale_epoch), with epoch 2 acknowledged.
        let certs = &regions.region("b").certs;
        lifeboat_common::tls::issue_cert(certs, "agent-orders", &[])?;
        let tls = TlsConfig::from_dir(certs, "agent-orders");
        let leader_b = regions
            .region("b")
            .coords
            .iter()
            .find(|c| Some(c.id) == rb["node_id"].as_u64())
            .expect("b's leader is a coordinator of b")
            .addr
            .clone();
        let e = push_empty_file(&tls, &leader_b, "stale.txt", 1)
            .await
            .expect_err("a push stamped with epoch 1 must be refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().starts_with("stale_epoch"), "{e:?}");
        assert_eq!(
            lifeboat_agent::push::stale_epoch(e.message()),
            Some(2),
            "the refusal names the current epoch: {e:?}"
        );
        let ok = push_empty_file(&tls, &leader_b, "fresh.txt", 2)
            .await
            .map_err(|e| anyhow::anyhow!("a push stamped with epoch 2 is acknowledged: {e:?}"))?;
        assert_eq!(ok.epoch, 2);
        assert_eq!(ok.acks.len(), 1, "{ok:?}");
        assert_eq!(ok.acks[0].change_id, 7);
        let (rows, _) =
            restore::list(&regions.region("b").conn(), "orders", None, false, false).await?;
        let paths: Vec<&str> = rows.iter().map(|r| r.v.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["orders/fresh.txt"],
            "only the current-epoch push is in b"
        );
        assert!(rows.iter().all(|r| r.v.epoch == 2), "{rows:?}");

        // 4. The old active region refuses pushes whatever their epoch.
        let ra = regions.report("a").await.expect("a's leader");
        let leader_a = regions
            .region("a")
            .coords
            .iter()
            .find(|c| Some(c.id) == ra["node_id"].as_u64())
            .expect("a's leader")
            .addr
            .clone();
        let e = push_empty_file(&tls, &leader_a, "to-a.txt", 2)
            .await
            .expect_err("a standby refuses pushes");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("standby region"), "{e:?}");
        Ok(())
    })
    .await
}
