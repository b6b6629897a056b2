//! A role per certificate on every RPC (issue 17, items 1 and 2), on real coordinators.
//!
//! Proves with certificates of each role, all signed by the cluster's own CA: an **agent**
//! certificate cannot change membership, collect garbage, send Raft messages, store blobs,
//! confirm replication, order a switchover, renew a lease or heartbeat under another agent's
//! id; a **viewer** reads status but cannot restore (fetch blobs) or change membership; an
//! **admin** is not a Raft peer. Every refusal is `PERMISSION_DENIED` naming the role needed
//! and the identity presented, and the refused calls changed nothing (membership unchanged,
//! node still leading). The CLI reports a refusal as such.

use lifeboat_chaos_tests::*;
use lifeboat_proto::admin_service_client::AdminServiceClient;
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::control_service_client::ControlServiceClient;
use lifeboat_proto::global_service_client::GlobalServiceClient;
use lifeboat_proto::raft_service_client::RaftServiceClient;
use lifeboat_proto::replication_service_client::ReplicationServiceClient;
use lifeboat_proto::{
    AddMemberRequest, ChangeTopologyRequest, ConfirmAppliedRequest, FetchBlobsRequest, GcRequest,
    HeartbeatRequest, RaftMessage, RemoveMemberRequest, RenewRequest, ReportRequest, StatusRequest,
    StoredBlob, SwitchoverRequest,
};
use tonic::transport::Channel;
use tonic::Code;

/// A channel to the leader presenting certificate `name` (issued with `role` if missing).
fn channel_as(cluster: &Cluster, lead: usize, role: Role, name: &str) -> anyhow::Result<Channel> {
    if !cluster.certs.join(format!("{name}.pem")).exists() {
        issue(&cluster.certs, role, &cluster.region, name)?;
    }
    let mut c = cluster.conn();
    c.cert = Some(cluster.certs.join(format!("{name}.pem")));
    c.key = Some(cluster.certs.join(format!("{name}.key")));
    c.channel(&cluster.coords[lead].addr)
}

/// A Vote request (its body never reaches the Raft core when refused).
async fn vote(
    raft: &mut RaftServiceClient<Channel>,
) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
    raft.vote(RaftMessage {
        group: "regional".into(),
        data: b"{}".to_vec(),
    })
    .await
}

/// Asserts `r` is PERMISSION_DENIED naming `needed` and the presented `who`.
fn assert_denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needed: &str, who: &str) {
    let e = r.expect_err("the call was allowed");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains(needed) && e.message().contains(who),
        "the refusal names the role needed ({needed}) and the identity ({who}): {}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_calls_only_what_it_may() -> anyhow::Result<()> {
    run("authz_roles", |dir| async move {
        let cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        let lead = settled_leader(&cluster).await?;
        let members_before = leader_status(&cluster).await?.members.len();

        // ----- an agent's certificate -----
        let agent = channel_as(&cluster, lead, Role::Agent, "a1")?;
        let who = "/agent/a1";
        let mut admin = AdminServiceClient::new(agent.clone());
        assert_denied(
            admin
                .add_member(AddMemberRequest {
                    id: 99,
                    addr: "127.0.0.1:1".into(),
                    voter: true,
                })
                .await,
            "admin",
            who,
        );
        assert_denied(admin.remove_member(RemoveMemberRequest { id: 1 }).await, "admin", who);
        assert_denied(admin.collect_garbage(GcRequest { dry_run: false }).await, "admin", who);
        let mut control = ControlServiceClient::new(agent.clone());
        let mut global = GlobalServiceClient::new(agent.clone());
        let switchover = SwitchoverRequest {
            to: Some("b".into()),
            actor: "me".into(),
            ..Default::default()
        };
        assert_denied(control.switchover(switchover).await, "role", who);
        let add = ChangeTopologyRequest {
            change: Some(lifeboat_proto::change_topology_request::Change::Remove(1)),
            actor: "me".into(),
        };
        assert_denied(control.change_topology(add).await, "role", who);
        assert_denied(global.renew(RenewRequest::default()).await, "role", who);
        assert_denied(global.report(ReportRequest {}).await, "role", who);
        // A forged Raft append from "node 99" never reaches the Raft core.
        let mut raft = RaftServiceClient::new(agent.clone());
        assert_denied(
            raft.append_entries(RaftMessage {
                group: "regional".into(),
                data: br#"{"vote":{"leader_id":{"term":99,"node_id":99},"committed":true},"prev_log_id":null,"entries":[],"leader_commit":null}"#.to_vec(),
            })
            .await,
            "coordinator or witness",
            who,
        );
        assert_denied(vote(&mut raft).await, "coordinator or witness", who);
        let mut blobs = BlobServiceClient::new(agent.clone());
        let poison = StoredBlob {
            hash: "00".repeat(32),
            stored: b"garbage".to_vec(),
            ..Default::default()
        };
        assert_denied(
            blobs.put_blobs(futures::stream::iter(vec![poison])).await,
            "coordinator",
            who,
        );
        let mut repl = ReplicationServiceClient::new(agent.clone());
        assert_denied(
            repl.confirm_applied(ConfirmAppliedRequest {
                region: "b".into(),
                upstream_seq: u64::MAX / 2,
            })
            .await,
            "coordinator",
            who,
        );
        // The agent id is bound to the certificate.
        let mut intake = AgentServiceClient::new(agent.clone());
        let hb = |id: &str| HeartbeatRequest {
            agent_id: id.into(),
            ..Default::default()
        };
        let e = intake.heartbeat(hb("someone-else")).await.expect_err("foreign agent id");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        intake.heartbeat(hb("a1")).await?;
        // Reads are open to it.
        admin.status(StatusRequest {}).await?;

        // ----- a viewer's certificate -----
        let viewer = channel_as(&cluster, lead, Role::Viewer, "watcher")?;
        let who = "/viewer/watcher";
        let mut admin = AdminServiceClient::new(viewer.clone());
        admin.status(StatusRequest {}).await?;
        assert_denied(admin.remove_member(RemoveMemberRequest { id: 1 }).await, "admin", who);
        let mut blobs = BlobServiceClient::new(viewer.clone());
        assert_denied(
            blobs
                .fetch_blobs(FetchBlobsRequest {
                    hashes: vec!["00".repeat(32)],
                })
                .await,
            "operator",
            who,
        );
        let mut intake = AgentServiceClient::new(viewer);
        assert_denied(intake.heartbeat(hb("watcher")).await, "agent", who);

        // ----- the admin certificate is a human's, not a Raft peer's -----
        let (_, _) = cluster.conn().admin().await?;
        let admin_ch = cluster.conn().channel(&cluster.coords[lead].addr)?;
        let mut raft = RaftServiceClient::new(admin_ch);
        assert_denied(vote(&mut raft).await, "coordinator or witness", "/admin/admin");

        // Nothing the refused calls asked for happened.
        let st = leader_status(&cluster).await?;
        assert_eq!(st.members.len(), members_before, "{:?}", st.members);
        assert_eq!(st.term, cluster.status_of(lead).await.unwrap().term);
        assert!(st.has_leader);

        // The CLI with a viewer's certificate: the refusal is reported, exit non-zero.
        let out = std::process::Command::new(lifeboat_lab::harness::bin_dir()?.join("lifeboat"))
            .args(["gc", "--dry-run", "--coordinator"])
            .arg(cluster.addrs().join(","))
            .arg("--ca")
            .arg(cluster.certs.join("ca.pem"))
            .arg("--cert")
            .arg(cluster.certs.join("watcher.pem"))
            .arg("--key")
            .arg(cluster.certs.join("watcher.key"))
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "gc as a viewer succeeded: {err}");
        assert!(err.contains("needs role admin"), "{err}");
        Ok(())
    })
    .await
}
