//! Intake of file changes from agents (`AgentService`). One `PushChanges` call is one batch:
//!
//! 1. every part is rebuilt (full content, or an rsync-style delta applied with
//!    `fast_rsync::apply_limited` against a stored blob) and its blake3 checked against the hash
//!    the agent declared; new blobs are encoded and stored durably while the stream continues;
//! 2. at the end of the stream the new blobs are copied to a majority of voters (local backend);
//! 3. the batch's versions are committed through the regional Raft log;
//! 4. only then the reply acknowledges every change with its catalog sequence number.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::catalog::{EntryKind, NewVersion, PartRef};
use lifeboat_common::path::validate_rel_path;
use lifeboat_proto::agent_service_server::AgentService;
use lifeboat_proto::part_data::Body;
use lifeboat_proto::push_message::Msg;
use lifeboat_proto::{
    Ack, FileChange, HeartbeatReply, HeartbeatRequest, PartData, PushMessage, PushReply,
};
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::blobs::{Blobs, BlobsError};
use crate::control::role::Role;
use crate::leader::LeaderInfo;
use crate::raft::{RegionRaft, Request as RaftRequest};

/// Last heartbeat of each agent.
pub type AgentTable = Arc<Mutex<HashMap<String, (Instant, HeartbeatRequest)>>>;

/// Most part encodes/writes in flight per batch (bounds memory to about 16 x 2 x 4 MiB).
const MAX_PUTS_IN_FLIGHT: usize = 16;

/// The `AgentService` implementation.
pub struct Intake {
    /// Raft handle.
    pub raft: RegionRaft,
    /// Blob access.
    pub blobs: Blobs,
    /// Leader lookup.
    pub leader: LeaderInfo,
    /// Region name stamped on versions.
    pub region: String,
    /// Active/standby, epoch (fencing token) and lease: asked before accepting and before
    /// acknowledging a batch.
    pub role: Arc<Role>,
    /// Heartbeats.
    pub agents: AgentTable,
    /// Synchronous cross-region acknowledgement (RPO 0), when configured.
    pub sync: Option<SyncAck>,
    /// Coordinator addresses of every region (`[global].members`, witness excluded; empty
    /// without a global group): the heartbeat reply names the active region's.
    pub region_addrs: Arc<std::collections::BTreeMap<String, Vec<String>>>,
}

pub use crate::control::role::STANDBY_REFUSAL;

/// Synchronous replication to the standby regions: a batch is acknowledged only once one
/// standby region confirmed (`ConfirmApplied`) an upstream sequence at or above the batch's.
///
/// When no standby confirms within `timeout` (every standby region down or cut off), a strict
/// `SyncAck` answers `UNAVAILABLE` (nothing is acknowledged that a standby does not hold); a
/// non-strict one (the default, like Patroni's non-strict `synchronous_mode`) switches to
/// **degraded** mode: it acknowledges after the local majority commit without waiting, until a
/// standby confirms a sequence at or above the one that timed out (it caught up), then waits
/// again. A failover under the consistency-first policy still never promotes a region missing
/// acknowledged changes: a standby that lost contact reports a replication lag of at least the
/// time since it last heard from the active region.
#[derive(Clone)]
pub struct SyncAck {
    /// Highest confirmed upstream sequence per standby region.
    pub confirmed: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, u64>>,
    /// How long to wait for a confirmation before degrading (or, strict, answering
    /// `UNAVAILABLE`; the agent retries).
    pub timeout: std::time::Duration,
    /// Never acknowledge without a standby's confirmation.
    pub strict: bool,
    /// Degraded since this sequence number (0 = synchronous); shared by all clones.
    pub degraded_since_seq: Arc<std::sync::atomic::AtomicU64>,
}

impl SyncAck {
    /// Waits until some standby region confirmed `seq` (returns at once while degraded).
    ///
    /// Errors: `UNAVAILABLE` after the timeout when strict.
    pub async fn wait(&self, seq: u64) -> Result<(), Status> {
        use std::sync::atomic::Ordering;
        let mut rx = self.confirmed.clone();
        let best = |m: &std::collections::BTreeMap<String, u64>| m.values().copied().max();
        if self.degraded() {
            return Ok(());
        }
        let ok = tokio::time::timeout(self.timeout, async {
            rx.wait_for(|m| best(m).is_some_and(|s| s >= seq))
                .await
                .is_ok()
        })
        .await
        .unwrap_or(false);
        match (ok, self.strict) {
            (true, _) => Ok(()),
            (false, true) => Err(Status::unavailable(format!(
                "no standby region confirmed seq {seq} within {} ms; not acknowledged (synchronous_strict)",
                self.timeout.as_millis()
            ))),
            (false, false) => {
                if self
                    .degraded_since_seq
                    .compare_exchange(0, seq, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::warn!(
                        seq,
                        timeout_ms = self.timeout.as_millis() as u64,
                        "no standby region confirmed in time: synchronous replication degraded, acknowledging after the local majority commit until a standby catches up"
                    );
                }
                Ok(())
            }
        }
    }

    /// Degraded: acknowledging without a standby's confirmation. A standby that has since
    /// confirmed the sequence that timed out ends degraded mode (also between writes).
    pub fn degraded(&self) -> bool {
        use std::sync::atomic::Ordering;
        let since = self.degraded_since_seq.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        let caught_up = self.confirmed.borrow().values().any(|&s| s >= since);
        if caught_up
            && self
                .degraded_since_seq
                .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                since,
                "a standby region caught up: synchronous replication resumed"
            );
        }
        !caught_up
    }
}

struct Pending {
    change: FileChange,
    kind: EntryKind,
    parts: Vec<PartRef>,
    /// blake3 of the content rebuilt so far, checked against the declared whole-file hash.
    hasher: blake3::Hasher,
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn base_missing(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(format!("base_missing: {e}; resend the parts in full"))
}

impl Intake {
    fn check_change(&self, c: &FileChange, epoch: u64) -> Result<EntryKind, Status> {
        validate_rel_path(&c.path).map_err(|e| bad(e.to_string()))?;
        if !c.rename_from.is_empty() {
            validate_rel_path(&c.rename_from).map_err(|e| bad(e.to_string()))?;
        }
        if c.epoch != 0 && c.epoch < epoch {
            return Err(Status::failed_precondition(format!(
                "stale_epoch: change stamped with epoch {} but the current epoch is {epoch}",
                c.epoch
            )));
        }
        let kind = lifeboat_common::catalog::EntryKind::from_pb(c.kind)
            .ok_or_else(|| bad(format!("{}: unknown entry kind {}", c.path, c.kind)))?;
        if !c.deleted && kind == EntryKind::File {
            let max_parts = c.size.div_ceil(lifeboat_common::PART_SIZE as u64);
            if c.part_count as u64 != max_parts {
                return Err(bad(format!(
                    "{}: size {} needs {} parts of {} bytes, got part_count {}",
                    c.path,
                    c.size,
                    max_parts,
                    lifeboat_common::PART_SIZE,
                    c.part_count
                )));
            }
            BlobHash::from_hex(&c.blake3).map_err(|e| bad(format!("{}: {e}", c.path)))?;
        } else if c.part_count != 0 {
            return Err(bad(format!("{}: only live files have parts", c.path)));
        }
        if kind == EntryKind::Symlink && !c.deleted && c.symlink_target.is_empty() {
            return Err(bad(format!("{}: symlink without target", c.path)));
        }
        Ok(kind)
    }

    fn finish(&self, p: Pending, epoch: u64) -> Result<NewVersion, Status> {
        let c = p.change;
        if p.parts.len() != c.part_count as usize {
            return Err(bad(format!(
                "{}: stream ended after {} of {} parts",
                c.path,
                p.parts.len(),
                c.part_count
            )));
        }
        if !c.deleted && p.kind == EntryKind::File {
            let got = BlobHash(*p.hasher.finalize().as_bytes());
            if got.to_hex() != c.blake3 {
                return Err(bad(format!(
                    "{}: content hashes to {got}, the change declares {}; refusing a version no restore could verify",
                    c.path, c.blake3
                )));
            }
        }
        let sum: u64 = p.parts.iter().map(|x| x.size).sum();
        if !c.deleted && p.kind == EntryKind::File && sum != c.size {
            return Err(bad(format!(
                "{}: parts add up to {sum} bytes, size says {}",
                c.path, c.size
            )));
        }
        Ok(NewVersion {
            path: c.path,
            kind: p.kind,
            deleted: c.deleted,
            size: if c.deleted { 0 } else { c.size },
            mode: c.mode & 0o7777,
            mtime_ns: c.mtime_ns,
            blake3: if p.kind == EntryKind::File && !c.deleted {
                Some(BlobHash::from_hex(&c.blake3).map_err(|e| bad(e.to_string()))?)
            } else {
                None
            },
            parts: p.parts,
            symlink_target: (p.kind == EntryKind::Symlink && !c.deleted)
                .then_some(c.symlink_target),
            epoch,
            region: self.region.clone(),
            agent_id: String::new(),
            rename_from: (!c.rename_from.is_empty()).then_some(c.rename_from),
        })
    }

    /// Rebuilds one part, returns its ref and, when the blob is new, its encoded bytes to store.
    async fn rebuild_part(
        &self,
        part: PartData,
        fresh: &HashSet<BlobHash>,
        hasher: &mut blake3::Hasher,
    ) -> Result<(PartRef, Option<Vec<u8>>), Status> {
        let hash = BlobHash::from_hex(&part.hash).map_err(|e| bad(e.to_string()))?;
        if part.size > lifeboat_common::PART_SIZE as u64 {
            return Err(bad(format!(
                "part of {} bytes exceeds {}",
                part.size,
                lifeboat_common::PART_SIZE
            )));
        }
        let size = part.size as usize;
        let pref = PartRef {
            hash,
            size: part.size,
        };
        let raw = match part.body {
            None => return Err(bad("part without body")),
            Some(Body::Reuse(_)) => {
                // Read (locally, else from a peer after a leader change) and verify the blob: its
                // content is part of the whole-file hash checked in `finish`.
                let raw = self.blobs.get_raw(&hash).await.map_err(base_missing)?;
                if raw.len() != size {
                    return Err(bad(format!(
                        "reused blob {hash} has {} bytes, part declares {size}",
                        raw.len()
                    )));
                }
                hasher.update(&raw);
                return Ok((pref, None));
            }
            Some(Body::Full(data)) => data,
            Some(Body::Delta(delta)) => {
                let base_hash =
                    BlobHash::from_hex(&part.base_hash).map_err(|e| bad(e.to_string()))?;
                let base = match self.blobs.get_raw(&base_hash).await {
                    Ok(b) => b,
                    Err(e @ BlobsError::Store(_)) => return Err(base_missing(e)),
                    Err(e) => return Err(base_missing(e)),
                };
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(size);
                    fast_rsync::apply_limited(&base, &delta, &mut out, size)
                        .map(|_| out)
                        .map_err(|e| bad(format!("bad delta: {e}")))
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))??
            }
        };
        if raw.len() != size {
            return Err(bad(format!(
                "part content is {} bytes, declared {size}",
                raw.len()
            )));
        }
        hasher.update(&raw);
        if fresh.contains(&hash) || self.blobs.store.contains(&hash).await.unwrap_or(false) {
            // Still verify what was sent.
            if BlobHash::of(&raw) != hash {
                return Err(bad(format!("part content does not hash to {hash}")));
            }
            return Ok((pref, None));
        }
        let encoded = tokio::task::spawn_blocking(move || {
            if BlobHash::of(&raw) != hash {
                return Err(bad(format!("part content does not hash to {hash}")));
            }
            Ok(blob::encode(&raw))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok((pref, Some(encoded)))
    }

    async fn push(
        &self,
        mut stream: Streaming<PushMessage>,
        epoch: u64,
    ) -> Result<PushReply, Status> {
        let mut versions = Vec::new();
        let mut change_ids = Vec::new();
        let mut current: Option<Pending> = None;
        let mut fresh: HashSet<BlobHash> = HashSet::new();
        let mut new_blobs: Vec<BlobHash> = Vec::new();
        let mut puts: JoinSet<Result<(), Status>> = JoinSet::new();
        let replication = self.blobs.start_replication();
        while let Some(msg) = stream.next().await {
            let msg = msg?;
            match msg.msg {
                None => return Err(bad("empty message")),
                Some(Msg::Change(c)) => {
                    if let Some(p) = current.take() {
                        versions.push(self.finish(p, epoch)?);
                    }
                    let kind = self.check_change(&c, epoch)?;
                    change_ids.push(c.change_id);
                    current = Some(Pending {
                        change: c,
                        kind,
                        parts: Vec::new(),
                        hasher: blake3::Hasher::new(),
                    });
                }
                Some(Msg::Part(part)) => {
                    let p = current
                        .as_mut()
                        .ok_or_else(|| bad("part before any change header"))?;
                    if part.index as usize != p.parts.len()
                        || p.parts.len() >= p.change.part_count as usize
                    {
                        return Err(bad(format!(
                            "{}: part index {} out of order (expected {} of {})",
                            p.change.path,
                            part.index,
                            p.parts.len(),
                            p.change.part_count
                        )));
                    }
                    let reuses_fresh = matches!(part.body, Some(Body::Reuse(_)))
                        && BlobHash::from_hex(&part.hash).is_ok_and(|h| fresh.contains(&h));
                    if reuses_fresh {
                        // The blob came earlier in this batch: let its write finish first.
                        while let Some(r) = puts.join_next().await {
                            r.map_err(|e| Status::internal(e.to_string()))??;
                        }
                    }
                    let (pref, encoded) = self.rebuild_part(part, &fresh, &mut p.hasher).await?;
                    if let Some(enc) = encoded {
                        fresh.insert(pref.hash);
                        new_blobs.push(pref.hash);
                        while puts.len() >= MAX_PUTS_IN_FLIGHT {
                            if let Some(r) = puts.join_next().await {
                                r.map_err(|e| Status::internal(e.to_string()))??;
                            }
                        }
                        let store = self.blobs.store.clone();
                        let h = pref.hash;
                        let fanout = replication.fanout();
                        puts.spawn(async move {
                            store
                                .put(&h, enc)
                                .await
                                .map_err(|e| Status::unavailable(format!("blob store: {e}")))?;
                            // Durable here: now copy it to the followers.
                            for f in fanout {
                                let _ = f.send(h);
                            }
                            Ok(())
                        });
                    }
                    p.parts.push(pref);
                }
            }
        }
        if let Some(p) = current.take() {
            versions.push(self.finish(p, epoch)?);
        }
        while let Some(r) = puts.join_next().await {
            r.map_err(|e| Status::internal(e.to_string()))??;
        }
        if versions.is_empty() {
            return Ok(PushReply {
                acks: vec![],
                log_index: 0,
                epoch,
            });
        }
        replication
            .finish(!new_blobs.is_empty())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let n = versions.len();
        let resp = self
            .raft
            .client_write(RaftRequest::CommitVersions {
                versions,
                commit_time_ms: lifeboat_common::now_ms(),
            })
            .await
            .map_err(|e| self.leader.commit_error(e))?;
        let seqs = resp.data.seqs;
        if seqs.len() != n {
            return Err(Status::internal(
                "state machine returned a wrong number of sequence numbers",
            ));
        }
        if let (Some(sync), Some(&max)) = (&self.sync, seqs.iter().max()) {
            sync.wait(max).await?;
        }
        // Acknowledge only under a still valid lease of the same epoch: a region fenced while
        // the batch was in flight must not acknowledge it (rule 1 and 2).
        let now_epoch = self.role.write_gate()?;
        if now_epoch != epoch {
            return Err(Status::unavailable(format!(
                "epoch changed from {epoch} to {now_epoch} during the batch; not acknowledged"
            )));
        }
        Ok(PushReply {
            acks: change_ids
                .into_iter()
                .zip(seqs)
                .map(|(change_id, seq)| Ack { change_id, seq })
                .collect(),
            log_index: resp.log_id.index,
            epoch,
        })
    }
}

#[tonic::async_trait]
impl AgentService for Intake {
    async fn push_changes(
        &self,
        req: Request<Streaming<PushMessage>>,
    ) -> Result<Response<PushReply>, Status> {
        let epoch = self.role.write_gate()?;
        self.leader.ensure_leader()?;
        let span = tracing::info_span!("push_changes", region = %self.region, node = self.leader.node_id, epoch);
        let started = Instant::now();
        let reply = self
            .push(req.into_inner(), epoch)
            .instrument(span.clone())
            .await;
        match &reply {
            Ok(r) => {
                tracing::debug!(parent: &span, changes = r.acks.len(), ms = started.elapsed().as_millis() as u64, "batch committed")
            }
            Err(s) => {
                tracing::warn!(parent: &span, code = ?s.code(), message = s.message(), "batch refused")
            }
        }
        reply.map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let hb = req.into_inner();
        if hb.agent_id.is_empty() || hb.agent_id.len() > 256 {
            return Err(bad("agent_id must be 1..256 bytes"));
        }
        self.agents
            .lock()
            .insert(hb.agent_id.clone(), (Instant::now(), hb));
        let v = self.role.view();
        Ok(Response::new(HeartbeatReply {
            epoch: v.epoch,
            leader_addr: self.leader.leader_addr().unwrap_or_default(),
            active_coordinators: self
                .region_addrs
                .get(&v.active_region)
                .cloned()
                .unwrap_or_default(),
            active_region: v.active_region,
            region: self.region.clone(),
        }))
    }
}
