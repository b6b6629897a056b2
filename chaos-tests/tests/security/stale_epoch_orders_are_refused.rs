//! Issue 3, old orders (lower epoch) are refused, end to end through the gRPC API of real
//! processes. Regions a and b plus a witness on loopback; a planned `lifeboat switchover --to b
//! --expect-epoch 1` moves the active region to b at epoch 2. Then, with the epoch at 2:
//!
//! - an operator order computed under epoch 1 (`lifeboat switchover --to a --expect-epoch 1`) is
//!   refused as STALE_EPOCH and changes nothing (record, audit log);
//! - a lease renewal asked under epoch 1 is refused by the global leader;
//! - an agent push stamped with epoch 1 is refused by b's leader, coded STALE_EPOCH with the
//!   current epoch in the error details (which the agent acts on), while the same push stamped with epoch 2
//!   is acknowledged, and only that one is in b's catalog;
//! - the old active region a, now a standby, refuses the push outright.
//!
//! A second test covers database role orders: b's agent (with a `[[redis_sources]]` entry) saw
//! epoch 2 and promoted b's Redis; restarted against a stale coordinator that still says "a
//! active at epoch 1", it ignores that order (its epoch is persisted), while an agent that never
//! saw epoch 2 obeys the same coordinator and turns b's Redis into a replica of a's.

use std::time::Duration;

use lifeboat_chaos_tests::redis_server::start_redis;
use lifeboat_chaos_tests::*;
use lifeboat_common::tls::TlsConfig;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::global_service_client::GlobalServiceClient;
use lifeboat_proto::push_message::Msg;
use lifeboat_proto::{AuditEntry, RenewReply, RenewRequest};
use lifeboat_proto::{FileChange, PushMessage, PushReply};
use serde_json::json;

/// Asks `GlobalService.Renew` with `conn`'s certificate on each of `addrs` until one answers;
/// returns that reply, or the last refusal (its gRPC status, code intact).
async fn renew_as(
    conn: &lifeboat_client::conn::ConnArgs,
    addrs: &[String],
    req: RenewRequest,
) -> Result<RenewReply, tonic::Status> {
    let mut last = tonic::Status::unavailable("no address");
    for a in addrs {
        let ch = conn
            .channel(a)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        match GlobalServiceClient::new(ch).renew(req.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if s.code() == tonic::Code::PermissionDenied => return Err(s),
            Err(s) => last = s,
        }
    }
    Err(last)
}

fn run_cli(regions: &Regions, args: &[&str]) -> std::process::Output {
    let bin = lifeboat_lab::harness::bin_dir().unwrap().join("lifeboat");
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

/// `lifeboat ARGS`, retried while no global leader answers (an election right after start-up);
/// any other outcome, success or refusal, is returned.
async fn run_cli_settled(regions: &Regions, args: &[&str]) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = run_cli(regions, args);
        let transient = !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("no coordinator answered");
        if !transient || std::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the global leader has a fresh report saying `region`'s leader is healthy (a
/// switchover to it is refused before).
async fn wait_healthy(regions: &Regions, region: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = regions.control_status().await.unwrap_or_default();
        let ok = s
            .region(region)
            .is_some_and(|r| r.healthy && r.regional_leader);
        if ok {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{region} not healthy: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

fn audit_count(audit: &[AuditEntry], action: &str) -> usize {
    audit.iter().filter(|e| e.action == action).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_under_an_older_epoch_are_refused() -> anyhow::Result<()> {
    run("t27", |dir| async move {
        let regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        wait_healthy(&regions, "b").await?;

        // A planned switchover ordered under the current epoch 1 is carried out.
        let out = run_cli_settled(
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
        )
        .await;
        let sw = json(&out);
        assert_eq!(sw["to"], "b");
        assert_eq!(sw["epoch"], 2);
        regions.wait_active("b", 2, Duration::from_secs(30)).await?;

        // 1. An operator order computed under epoch 1 is refused and changes nothing.
        let audit_before = regions.audit().await?;
        let out = run_cli_settled(
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
        )
        .await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a stale switchover must fail");
        assert!(
            err.contains("[STALE_EPOCH]") && err.contains("current epoch is 2"),
            "{err}"
        );
        let s = regions.wait_active("b", 2, Duration::from_secs(10)).await?;
        assert_eq!(s.epoch(), 2, "{s:?}");
        assert!(s.switchover_to.is_none(), "no switchover started: {s:?}");
        let audit_after = regions.audit().await?;
        invariants::epochs_never_go_back(&audit_after)?;
        for a in ["switchover", "failover", "promote"] {
            assert_eq!(
                audit_count(&audit_before, a),
                audit_count(&audit_after, a),
                "the stale order left no {a} entry: {audit_after:?}"
            );
        }

        // 2. A lease renewal under epoch 1 is refused by the global leader (for the active
        //    region b, and for the old region a).
        let rb = regions.report("b").await.expect("b's leader");
        // Renewals are the coordinators' own business: an admin certificate is refused outright.
        let renewal = |region: &str, node_id: u64| RenewRequest {
            region: region.into(),
            epoch: 1,
            node_id,
            sync_degraded: false,
        };
        let e = renew_as(
            &regions.conn(),
            &regions.all_addrs(),
            renewal("b", rb.node_id),
        )
        .await
        .expect_err("an admin certificate renewed a lease");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // A coordinator's certificate may ask, and is refused under the stale epoch.
        let b_certs = &regions.region("b").certs;
        let coord = format!("coord{}", regions.region("b").coords[0].id);
        let mut as_coord = regions.conn();
        as_coord.cert = Some(b_certs.join(format!("{coord}.pem")));
        as_coord.key = Some(b_certs.join(format!("{coord}.key")));
        for (region, node) in [("b", rb.node_id), ("a", 1)] {
            let r = renew_as(&as_coord, &regions.all_addrs(), renewal(region, node)).await?;
            assert!(!r.granted, "renewal of {region} under epoch 1: {r:?}");
            assert_eq!(r.epoch, 2, "{r:?}");
        }

        // 3. Agent pushes: stamped with epoch 1 refused (coded STALE_EPOCH), with epoch 2 acknowledged.
        let certs = &regions.region("b").certs;
        lifeboat_lab::harness::issue(certs, Role::Agent, "b", "agent-orders")?;
        let tls = TlsConfig::from_dir(certs, "agent-orders");
        let leader_b = regions
            .region("b")
            .coords
            .iter()
            .find(|c| c.id == rb.node_id)
            .expect("b's leader is a coordinator of b")
            .addr
            .clone();
        let e = push_empty_file(&tls, &leader_b, "stale.txt", 1)
            .await
            .expect_err("a push stamped with epoch 1 must be refused");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        let coded = lifeboat_common::wire_error::WireError::of(&e).expect("a coded refusal");
        assert_eq!(
            coded.code,
            lifeboat_common::wire_error::ErrorCode::StaleEpoch,
            "{e:?}"
        );
        assert_eq!(
            coded.epoch,
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
            files::list(&regions.region("b").conn(), "orders", None, false, false).await?;
        let paths: Vec<&str> = rows.iter().map(|r| r.v.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["orders/fresh.txt"],
            "only the current-epoch push is in b"
        );
        assert!(rows.iter().all(|r| r.v.epoch == 2), "{rows:?}");
        invariants::no_stale_epoch_applied(&rows)?;

        // 4. The old active region refuses pushes whatever their epoch.
        let ra = regions.report("a").await.expect("a's leader");
        let leader_a = regions
            .region("a")
            .coords
            .iter()
            .find(|c| c.id == ra.node_id)
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

async fn redis_role(c: &mut redis::aio::MultiplexedConnection) -> String {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(c)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("role:"))
        .unwrap_or("")
        .trim()
        .to_string()
}

async fn wait_role(
    c: &mut redis::aio::MultiplexedConnection,
    want: &str,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while redis_role(c).await != want {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{what}: redis never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ignores_database_orders_older_than_its_epoch() -> anyhow::Result<()> {
    run("t27db", |dir| async move {
        let redis_a = start_redis(&dir.join("redis-a"), &[])?;
        let redis_b = start_redis(&dir.join("redis-b"), &[])?;
        let mut cb = redis_b.con().await?;
        let regions = Regions::start(&dir.join("regions"), &RegionsOpts::default())?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let source = format!(
            "[[redis_sources]]\nname = \"cache\"\naddr = \"{}\"\ninterval_s = 3600\nprimary_by_region = {{ a = \"{}\", b = \"{}\" }}\n",
            redis_b.addr(),
            redis_a.addr(),
            redis_b.addr()
        );
        let (cfg, data) = regions
            .region("b")
            .write_agent_config("agent-b", &[], &source)?;
        let mut agent = regions.region("b").spawn_agent(&cfg, false)?;
        wait_role(&mut cb, "slave", "epoch 1: b's redis follows a's").await?;

        // Epoch 2: b active, its Redis promoted; the agent persists epoch 2.
        wait_healthy(&regions, "b").await?;
        json(
            &run_cli_settled(
                &regions,
                &["switchover", "--to", "b", "--expect-epoch", "1", "--output", "json"],
            )
            .await,
        );
        wait_role(&mut cb, "master", "epoch 2: b's redis promoted").await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while agent_status(&data).map(|s| s["epoch"].clone()) != Some(json!(2)) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "agent never reported epoch 2");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = agent.kill();
        let _ = agent.wait();

        // A stale coordinator: a single-region cluster named a, static role, epoch 1 (what a
        // partitioned old region would still say).
        let stale = Cluster::start(
            &dir.join("stale-a"),
            &ClusterOpts {
                coordinators: 1,
                region: "a".into(),
                ca_from: Some(regions.region("b").certs.clone()),
                ..Default::default()
            },
        )?;
        stale.wait_leader(Duration::from_secs(30), None).await?;
        let stale_addrs: Vec<String> = stale.addrs().iter().map(|a| format!("\"{a}\"")).collect();
        let toml = std::fs::read_to_string(&cfg)?;
        let coords_line = toml
            .lines()
            .find(|l| l.starts_with("coordinators = "))
            .expect("coordinators line")
            .to_string();
        let to_stale = toml.replace(&coords_line, &format!("coordinators = [{}]", stale_addrs.join(", ")));
        std::fs::write(&cfg, &to_stale)?;
        let mut agent = regions.region("b").spawn_agent(&cfg, false)?;
        // Several heartbeats (every 500 ms) answer "a active at epoch 1": ignored.
        let until = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < until {
            assert_eq!(redis_role(&mut cb).await, "master", "an order of epoch 1 was applied after epoch 2");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = agent_status(&data).expect("status.json");
        assert_eq!(st["epoch"], 2, "the agent keeps its persisted epoch: {st}");
        let _ = agent.kill();
        let _ = agent.wait();

        // Control: an agent that never saw epoch 2 obeys the same stale coordinator, so the
        // order really reached the first one.
        let fresh_data = dir.join("agent-fresh");
        let fresh_cfg = dir.join("agent-fresh.toml");
        std::fs::write(
            &fresh_cfg,
            to_stale.replace(&data.display().to_string(), &fresh_data.display().to_string()),
        )?;
        let mut fresh = regions.region("b").spawn_agent(&fresh_cfg, false)?;
        wait_role(&mut cb, "slave", "an agent at epoch 0 follows the stale order").await?;
        let _ = fresh.kill();
        let _ = fresh.wait();
        Ok(())
    })
    .await
}
