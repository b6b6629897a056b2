//! The operator API (`AdminService`): status, catalog listing, membership changes, snapshots.
//! Reads are served by any node from its local catalog; membership changes need the leader.

use std::collections::BTreeSet;

use lifeboat_proto::admin_service_server::AdminService;
use lifeboat_proto::{
    AddMemberRequest, AgentInfo, GcReply, GcRequest, ListVersionsRequest, Member, MembershipReply,
    RemoveMemberRequest, StatusReply, StatusRequest, TriggerSnapshotReply, TriggerSnapshotRequest,
    VersionRow,
};
use openraft::{BasicNode, ChangeMembers};
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::control::role::Role;
use crate::control::runtime::ControlRuntime;
use crate::intake::AgentTable;
use crate::leader::LeaderInfo;
use crate::raft::{Catalog, RegionRaft};
use crate::replication::ReplicationStatus;

/// The `AdminService` implementation.
pub struct Admin {
    /// Raft handle.
    pub raft: RegionRaft,
    /// Catalog reads.
    pub catalog: Catalog,
    /// Leader lookup.
    pub leader: LeaderInfo,
    /// Region name.
    pub region: String,
    /// Role and epoch.
    pub role: Arc<Role>,
    /// Agent heartbeats.
    pub agents: AgentTable,
    /// Cross-region replication progress (role, lag).
    pub replication: ReplicationStatus,
    /// Control runtime of the global group (None without `[global]`).
    pub control: Option<Arc<ControlRuntime>>,
    /// Garbage collection (`CollectGarbage`).
    pub gc: crate::gc::Gc,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Admin {
    fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let m = self.raft.metrics().borrow().clone();
        let stats = self.catalog.stats().map_err(internal)?;
        let repl = self.replication.report(&self.catalog).map_err(internal)?;
        let agents = self
            .agents
            .lock()
            .iter()
            .map(|(id, (t, hb))| AgentInfo {
                agent_id: id.clone(),
                last_seen_ms_ago: t.elapsed().as_millis() as u64,
                files_tracked: hb.files_tracked,
                pending_changes: hb.pending_changes,
                bytes_sent: hb.bytes_sent,
                changes_acked: hb.changes_acked,
            })
            .collect();
        Ok(Response::new(StatusReply {
            node_id: self.leader.node_id,
            region: self.region.clone(),
            leader_id: m.current_leader.unwrap_or(0),
            leader_addr: self.leader.leader_addr().unwrap_or_default(),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            members: self.members(),
            agents,
            entries: stats.live_entries,
            bytes: stats.live_bytes,
            versions: stats.versions,
            epoch: self.role.epoch(),
            snapshot_index: m.snapshot.map(|s| s.index).unwrap_or(0),
            state: format!("{:?}", m.state),
            role: if self.role.is_global() {
                if self.role.is_standby() {
                    "standby".into()
                } else {
                    "active".into()
                }
            } else {
                repl.role
            },
            upstream_seq: repl.upstream_seq,
            upstream_last_seq: repl.upstream_last_seq,
            lag_entries: repl.lag_entries,
            lag_bytes: repl.lag_bytes,
            lag_ms: repl.lag_ms,
            replication_state: repl.state,
            replication_error: repl.error,
        }))
    }

    type ListVersionsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<VersionRow, Status>> + Send>>;

    async fn list_versions(
        &self,
        req: Request<ListVersionsRequest>,
    ) -> Result<Response<Self::ListVersionsStream>, Status> {
        let r = req.into_inner();
        if !r.prefix.is_empty() {
            lifeboat_common::path::validate_rel_path(r.prefix.trim_end_matches('/'))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let at = (r.at_ms != 0).then_some(r.at_ms);
        let rows = self
            .catalog
            .list(
                r.prefix.trim_end_matches('/'),
                at,
                r.all_versions,
                r.include_deleted,
            )
            .map_err(internal)?;
        let s = futures::stream::iter(rows.into_iter().map(|v| Ok(v.to_pb())));
        Ok(Response::new(Box::pin(s)))
    }

    async fn add_member(
        &self,
        req: Request<AddMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.leader.ensure_leader()?;
        let r = req.into_inner();
        if r.id == 0 || r.addr.is_empty() {
            return Err(Status::invalid_argument(
                "id must be > 0 and addr host:port",
            ));
        }
        self.raft
            .add_learner(r.id, BasicNode { addr: r.addr }, true)
            .await
            .map_err(|e| Status::failed_precondition(format!("add learner {}: {e}", r.id)))?;
        if r.voter {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([r.id].into()), false)
                .await
                .map_err(|e| {
                    Status::failed_precondition(format!("promote {} to voter: {e}", r.id))
                })?;
        }
        Ok(Response::new(MembershipReply {
            members: self.members(),
        }))
    }

    async fn remove_member(
        &self,
        req: Request<RemoveMemberRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        self.leader.ensure_leader()?;
        let id = req.into_inner().id;
        let m = self.raft.metrics().borrow().membership_config.clone();
        if m.membership().voter_ids().any(|v| v == id) {
            self.raft
                .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                .await
                .map_err(|e| Status::failed_precondition(format!("remove voter {id}: {e}")))?;
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
            .await
            .map_err(|e| Status::failed_precondition(format!("remove node {id}: {e}")))?;
        Ok(Response::new(MembershipReply {
            members: self.members(),
        }))
    }

    async fn collect_garbage(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let dry_run = req.into_inner().dry_run;
        let span = tracing::info_span!("collect_garbage", region = %self.region, node = self.leader.node_id, dry_run);
        let r = tracing::Instrument::instrument(self.gc.run_pass(dry_run), span.clone()).await?;
        tracing::info!(parent: &span, versions_pruned = r.versions_pruned, blobs_condemned = r.blobs_condemned, bytes_freed = r.bytes_freed, kept_referenced = r.kept_referenced, kept_young = r.kept_young, "garbage collection pass (admin)");
        Ok(Response::new(GcReply {
            dry_run: r.dry_run,
            cutoff_ms: r.cutoff_ms,
            versions_pruned: r.versions_pruned,
            blobs_listed: r.blobs_listed,
            blobs_condemned: r.blobs_condemned,
            bytes_freed: r.bytes_freed,
            kept_referenced: r.kept_referenced,
            kept_young: r.kept_young,
            delete_failed: r.delete_failed,
            region: self.region.clone(),
        }))
    }

    async fn trigger_snapshot(
        &self,
        _req: Request<TriggerSnapshotRequest>,
    ) -> Result<Response<TriggerSnapshotReply>, Status> {
        let target = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        self.raft.trigger().snapshot().await.map_err(internal)?;
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let idx = rx.borrow().snapshot.map(|s| s.index).unwrap_or(0);
            if idx >= target {
                return Ok(Response::new(TriggerSnapshotReply {
                    snapshot_index: idx,
                }));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(Status::deadline_exceeded(
                    "snapshot did not complete within 30 s",
                ));
            }
        }
    }

    async fn control(
        &self,
        req: Request<lifeboat_proto::ControlRequest>,
    ) -> Result<Response<lifeboat_proto::ControlReply>, Status> {
        let Some(c) = &self.control else {
            return Err(Status::failed_precondition(
                "this coordinator has no [global] section: regions, failover and switchover need the global group",
            ));
        };
        let r = req.into_inner();
        if r.body.len() > 1 << 20 {
            return Err(Status::invalid_argument("control body over 1 MiB"));
        }
        let body = if r.body.is_empty() {
            b"{}".to_vec()
        } else {
            r.body
        };
        if r.op == "resolve" {
            // A catalog write of this region (its regional leader, under the active lease).
            let req = serde_json::from_slice(&body)
                .map_err(|e| Status::invalid_argument(format!("bad resolve request: {e}")))?;
            let reply = crate::conflicts::resolve(self, req).await?;
            let out = serde_json::to_vec(&reply).map_err(internal)?;
            return Ok(Response::new(lifeboat_proto::ControlReply { body: out }));
        }
        let out = c.handle(&r.op, &body).await?;
        Ok(Response::new(lifeboat_proto::ControlReply { body: out }))
    }
}
