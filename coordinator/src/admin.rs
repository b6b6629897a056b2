//! The operator API (`AdminService`): status, catalog listing, membership changes, snapshots.
//! Reads are served by any node from its local catalog; membership changes need the leader.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lifeboat_common::blobstore::BlobStore as _;
use lifeboat_proto::admin_service_server::AdminService;
use lifeboat_proto::{
    AddMemberRequest, AgentInfo, BlobHealthReply, DataKeyInfo, DataKeyStatusReply,
    DataKeyStatusRequest, GcReply, GcRequest, ListVersionsRequest, Member, MembershipReply,
    RemoveMemberRequest, RotateDataKeyRequest, StatusReply, StatusRequest, TriggerSnapshotReply,
    TriggerSnapshotRequest, VersionRow,
};
use openraft::{BasicNode, ChangeMembers};
use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::control::role::Role;
use crate::control::runtime::ControlRuntime;
use crate::intake::AgentTable;
use crate::leader::LeaderInfo;
use crate::raft::{Catalog, NodeId, RegionRaft};
use crate::xregion::replication::ReplicationStatus;

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
    pub gc: crate::blobs::gc::Gc,
    /// Config problems found at start (membership drift), shown by `Status`.
    pub config_warnings: Arc<Vec<String>>,
    /// Blob repair and member probes (per-member health, backfill checks).
    pub repair: crate::blobs::repair::Repair,
    /// This coordinator's encrypted blob store (`RotateDataKey`, `DataKeyStatus`); `None` when
    /// its store is in plaintext.
    pub keys: Option<Arc<lifeboat_common::blobstore::EncryptedStore>>,
}

/// How long `AddMember` waits for a new member's blob backfill before it leaves it a learner.
const BACKFILL_WAIT: Duration = Duration::from_secs(600);
/// How long `RemoveMember` waits for the remaining voters to hold every committed blob on a
/// majority before it refuses.
const DURABLE_WAIT: Duration = Duration::from_secs(15);
/// Interval between two checks while waiting.
const POLL: Duration = Duration::from_millis(250);

/// Whether a fresh health answer covers everything committed up to `target` and lacks nothing.
fn backfilled(r: &Option<BlobHealthReply>, target: u64) -> bool {
    r.as_ref().is_some_and(|r| {
        r.shared_store || (r.scanned && r.scan_applied >= target && r.missing == 0)
    })
}

/// Why a set of voters does not hold every committed blob on a majority (None: it does).
fn durability_problem(
    health: &BTreeMap<NodeId, Option<BlobHealthReply>>,
    target: u64,
) -> Option<String> {
    let mut why = Vec::new();
    for (id, r) in health {
        match r {
            None => why.push(format!("node {id} does not answer")),
            Some(r) if r.shared_store => {}
            Some(r) if !r.scanned || r.scan_applied < target => {
                why.push(format!("node {id} has not finished a blob scan"))
            }
            Some(r) if r.missing > 0 => why.push(format!(
                "node {id} lacks {} of {} committed blobs",
                r.missing, r.referenced
            )),
            Some(_) => {}
        }
    }
    let answers: Vec<Option<&BlobHealthReply>> = health
        .values()
        .map(|r| {
            r.as_ref()
                .filter(|r| r.shared_store || (r.scanned && r.scan_applied >= target))
        })
        .collect();
    let d = crate::blobs::repair::durability(&answers);
    (d.below_majority > 0).then(|| {
        format!(
            "{} committed blobs would be on fewer than a majority ({}) of the remaining voters ({})",
            d.below_majority,
            health.len() / 2 + 1,
            why.join("; ")
        )
    })
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

impl Admin {
    /// This node's `DataKeyStatusReply` (keys, current, blobs per key).
    async fn key_status(&self) -> Result<DataKeyStatusReply, Status> {
        let mut reply = DataKeyStatusReply {
            node_id: self.leader.node_id,
            region: self.region.clone(),
            ..Default::default()
        };
        let Some(store) = &self.keys else {
            reply.store = self.gc.blobs.store.describe();
            return Ok(reply);
        };
        let u = store.usage().await.map_err(internal)?;
        reply.store = store.describe();
        reply.encrypted = true;
        reply.plaintext_blobs = u.plaintext_blobs;
        reply.unknown_blobs = u.unknown_blobs;
        reply.keys = u
            .keys
            .into_iter()
            .map(|k| DataKeyInfo {
                key_id: k.key_id.to_string(),
                current: k.current,
                blobs: k.blobs,
                created_ms: k.created_ms,
            })
            .collect();
        Ok(reply)
    }

    fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        m.membership()
            .nodes()
            .map(|(id, n)| Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                ..Default::default()
            })
            .collect()
    }

    /// Members with their health as this node sees it, and the blob durability over the voters.
    fn members_with_health(&self) -> (Vec<Member>, crate::blobs::repair::Durability) {
        let m = self.raft.metrics().borrow().clone();
        let me = self.leader.node_id;
        let leading = m.current_leader == Some(me);
        let matched = m.replication.clone().unwrap_or_default();
        let last_log = m.last_log_index.unwrap_or(0);
        let peers = self.repair.peers();
        let own = self.repair.health(false);
        let mut members = self.members();
        let mut voter_health: Vec<Option<BlobHealthReply>> = Vec::new();
        for mem in &mut members {
            let (reachable, contact, health) = if mem.id == me {
                (true, 0, Some(own.clone()))
            } else {
                let seen = peers.get(&mem.id);
                let last_ok = seen.and_then(|s| s.last_ok);
                let reachable =
                    last_ok.is_some_and(|t| t.elapsed() <= crate::blobs::repair::REACHABLE_WITHIN);
                let contact = last_ok
                    .map(|t| t.elapsed().as_millis() as i64)
                    .unwrap_or(-1);
                (
                    reachable,
                    contact,
                    seen.and_then(|s| s.reply.clone()).filter(|_| reachable),
                )
            };
            mem.reachable = reachable;
            mem.last_contact_ms = contact;
            if leading {
                mem.match_from_leader = true;
                mem.match_index = if mem.id == me {
                    last_log
                } else {
                    matched
                        .get(&mem.id)
                        .copied()
                        .flatten()
                        .map(|l| l.index)
                        .unwrap_or(0)
                };
            } else if let Some(h) = &health {
                mem.match_index = h.last_applied;
            }
            mem.lag_entries = last_log.saturating_sub(mem.match_index);
            if let Some(h) = &health {
                mem.blobs_known = h.scanned;
                mem.blobs_referenced = h.referenced;
                mem.blobs_missing = h.missing;
                mem.blobs_missing_truncated = h.missing_truncated;
                mem.blobs_repaired = h.repaired;
            }
            if mem.voter {
                voter_health.push(health);
            }
        }
        let d = crate::blobs::repair::durability(
            &voter_health.iter().map(|h| h.as_ref()).collect::<Vec<_>>(),
        );
        (members, d)
    }

    /// Waits until `ids` answer fresh blob scans covering `target` that satisfy `ok`, or `wait`
    /// passes; returns the last answers.
    /// Waits up to [`DURABLE_WAIT`] until every committed blob is on a majority of `remaining`
    /// (the voters left once `id` is removed).
    ///
    /// Errors: FAILED_PRECONDITION saying why, followed by `hint`.
    async fn durable_without(
        &self,
        id: NodeId,
        remaining: &[NodeId],
        hint: &str,
    ) -> Result<(), Status> {
        let target = self.catalog.applied_index();
        let h = self
            .wait_health(remaining, DURABLE_WAIT, |h| {
                durability_problem(h, target).is_none()
            })
            .await;
        match durability_problem(&h, target) {
            Some(why) => Err(Status::failed_precondition(format!(
                "refusing to remove voter {id}: {why}. {hint}"
            ))),
            None => Ok(()),
        }
    }

    async fn wait_health(
        &self,
        ids: &[NodeId],
        wait: Duration,
        ok: impl Fn(&BTreeMap<NodeId, Option<BlobHealthReply>>) -> bool,
    ) -> BTreeMap<NodeId, Option<BlobHealthReply>> {
        let deadline = Instant::now() + wait;
        loop {
            let h = self.repair.fresh_health(ids).await;
            if ok(&h) || Instant::now() >= deadline {
                return h;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether `m` names a leader that can still commit: some leader is known and, when this node
/// is that leader, a quorum acknowledged it within two maximal election timeouts
/// (`election_timeout_max_ms`). openraft keeps an isolated leader in the Leader state, so
/// without this a node cut off from its quorum would report itself as a working leader.
pub fn leader_known(
    m: &openraft::RaftMetrics<u64, BasicNode>,
    election_timeout_max_ms: u64,
) -> bool {
    match m.current_leader {
        None => false,
        Some(l) if l == m.id => m
            .millis_since_quorum_ack
            .is_some_and(|ms| ms <= 2 * election_timeout_max_ms),
        Some(_) => true,
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let m = self.raft.metrics().borrow().clone();
        let (members, durability) = self.members_with_health();
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
                failing_checks: hb.checks.iter().filter(|c| !c.ok).cloned().collect(),
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
            members,
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
            config_warnings: self.config_warnings.as_ref().clone(),
            has_leader: leader_known(&m, self.raft.config().election_timeout_max),
            blob_store_shared: self.repair.shared(),
            blobs_under_replicated: durability.under_replicated,
            blobs_below_majority: durability.below_majority,
            blob_health_complete: durability.complete,
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
        let is_voter = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == r.id);
        if r.voter && !is_voter {
            // A new voter counts toward blob durability: backfill it first (its repair pulls
            // every committed blob), then check again with intake held off and promote.
            let id = r.id;
            let target = self.catalog.applied_index();
            let h = self
                .wait_health(&[id], BACKFILL_WAIT, |h| backfilled(&h[&id], target))
                .await;
            let not_yet = |h: &BTreeMap<NodeId, Option<BlobHealthReply>>| match &h[&id] {
                None => format!("learner {id} does not answer blob health probes"),
                Some(x) => format!(
                    "learner {id} holds {} of {} committed blobs",
                    x.referenced.saturating_sub(x.missing),
                    x.referenced
                ),
            };
            if !backfilled(&h[&id], target) {
                return Err(Status::deadline_exceeded(format!(
                    "{} after {} s of backfill; it stays a learner and keeps copying; run `lifeboat member add` again to promote it once `lifeboat status` shows 0 blobs missing",
                    not_yet(&h),
                    BACKFILL_WAIT.as_secs()
                )));
            }
            let _exclusive = self.gc.lock.write().await;
            let target = self.catalog.applied_index();
            let h = self
                .wait_health(&[id], DURABLE_WAIT, |h| backfilled(&h[&id], target))
                .await;
            if !backfilled(&h[&id], target) {
                return Err(Status::unavailable(format!(
                    "{} (blobs committed meanwhile); it stays a learner; retry `lifeboat member add`",
                    not_yet(&h)
                )));
            }
            self.raft
                .change_membership(ChangeMembers::AddVoterIds([r.id].into()), false)
                .await
                .map_err(|e| {
                    Status::failed_precondition(format!("promote {} to voter: {e}", r.id))
                })?;
            tracing::info!(
                node = id,
                "new member backfilled with every committed blob; promoted to voter"
            );
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
        let remaining: Vec<NodeId> = m.membership().voter_ids().filter(|v| *v != id).collect();
        let _exclusive = if m.membership().voter_ids().any(|v| v == id) {
            if remaining.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {id} is the only voter; add another member first"
                )));
            }
            // Every committed blob must stay on a majority of the remaining voters. Wait a
            // little for repair, then check again with intake (new blobs) held off.
            self.durable_without(
                id,
                &remaining,
                "Bring the missing nodes back or wait until `lifeboat status` shows 0 blobs below majority, then retry",
            )
            .await?;
            let exclusive = self.gc.lock.write().await;
            self.durable_without(id, &remaining, "Retry once repair has copied them")
                .await?;
            Some(exclusive)
        } else {
            None
        };
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

    async fn rotate_data_key(
        &self,
        _req: Request<RotateDataKeyRequest>,
    ) -> Result<Response<DataKeyStatusReply>, Status> {
        let Some(store) = &self.keys else {
            return Err(Status::failed_precondition(format!(
                "node {}: {}",
                self.leader.node_id,
                crate::node::PLAINTEXT_WARNING
            )));
        };
        let id = store.rotate().await.map_err(internal)?;
        tracing::info!(node = self.leader.node_id, key_id = %id, store = %store.describe(), "data key rotated (admin)");
        let mut reply = self.key_status().await?;
        reply.rotated_to = id.to_string();
        Ok(Response::new(reply))
    }

    async fn data_key_status(
        &self,
        _req: Request<DataKeyStatusRequest>,
    ) -> Result<Response<DataKeyStatusReply>, Status> {
        Ok(Response::new(self.key_status().await?))
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
}
