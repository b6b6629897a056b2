//! Intake of file changes from agents (`AgentService`). One `PushChanges` call is one batch:
//!
//! 1. every part is rebuilt (full content, or an rsync-style delta applied with
//!    `fast_rsync::apply_limited` against a stored blob) and its blake3 checked against the hash
//!    the agent declared; new blobs are encoded and stored durably while the stream continues
//!    (a blob already here counts as stored only if a committed version references it, so one
//!    left by a failed batch, or condemned by garbage collection, is copied again);
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
use lifeboat_common::treehash::{self, ChainingValue};
use lifeboat_common::wire_error::{ErrorCode, WireError};
use lifeboat_proto::agent_service_server::AgentService;
use lifeboat_proto::part_data::Body;
use lifeboat_proto::push_message::Msg;
use lifeboat_proto::{
    Ack, FileChange, HeartbeatReply, HeartbeatRequest, PartData, PushMessage, PushReply,
    PutPartsReply,
};
use parking_lot::Mutex;
use tokio::task::JoinSet;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::blobs::gc::GcLock;
use crate::blobs::{Blobs, BlobsError};
use crate::control::role::Role;
use crate::leader::LeaderInfo;
use crate::raft::{Catalog, CatalogCommand, RegionRaft};

/// Last heartbeat of each agent.
pub type AgentTable = Arc<Mutex<HashMap<String, (Instant, HeartbeatRequest)>>>;

/// Most part encodes/writes in flight per batch (bounds memory to about 16 x 2 x 4 MiB).
const MAX_PUTS_IN_FLIGHT: usize = 16;
/// Reused blobs of one file read back at once.
const MAX_READS_IN_FLIGHT: usize = 4;
/// Parts of one `PutParts` call verified at once (decoded and hashed on blocking threads).
const VERIFY_AHEAD: usize = 3;
/// Parts one `PutParts` call may store (64 GiB of 4 MiB parts).
const MAX_PUT_PARTS: usize = 16_384;

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
    /// Chaining values of parts verified by `PutParts` (see [`CvCache`]).
    pub part_cvs: Arc<Mutex<CvCache>>,
    /// Catalog reads (blobs condemned by garbage collection).
    pub catalog: Catalog,
    /// Held shared by every batch from its first blob check to its commit (see [`crate::blobs::gc`]).
    pub gc_lock: GcLock,
}

/// Chaining values (`lifeboat_common::treehash`) of parts this leader verified in `PutParts`,
/// by (blob hash, offset in bytes): the later `PushChanges` of the whole file checks its blake3
/// from them instead of reading every part back. Bounded ([`CvCache::CAPACITY`], oldest out
/// first); only a time saver (a miss reads the part back).
#[derive(Debug, Default)]
pub struct CvCache {
    map: HashMap<(BlobHash, u64), ChainingValue>,
    order: std::collections::VecDeque<(BlobHash, u64)>,
}

impl CvCache {
    /// Entries kept (about 80 bytes each: 20 MB; 1 TiB of 4 MiB parts).
    pub const CAPACITY: usize = 262_144;

    fn insert(&mut self, key: (BlobHash, u64), cv: ChainingValue) {
        if self.map.insert(key, cv).is_none() {
            self.order.push_back(key);
            while self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, key: &(BlobHash, u64)) -> Option<ChainingValue> {
        self.map.get(key).copied()
    }
}

pub use crate::control::role::STANDBY_REFUSAL;

/// Synchronous replication to the standby regions: a batch is acknowledged only once one
/// standby region confirmed (`ConfirmApplied`) an upstream sequence at or above the batch's.
///
/// When no standby confirms within `timeout` (every standby region down or cut off), a strict
/// `SyncAck` answers `UNAVAILABLE` (nothing is acknowledged that a standby does not hold). A
/// non-strict one (the default, like Patroni's non-strict `synchronous_mode`) switches to
/// **degraded** mode, acknowledging after the local majority commit without waiting, but only
/// once the global group has **recorded** it degraded (`ControlCommand::SetSyncDegraded`,
/// asked for in the next lease renewal, see [`SyncAck::renewal_flag`]); until then, or when the
/// global group cannot be reached, it answers `UNAVAILABLE` and the agent retries. It resumes
/// waiting once a standby confirmed every sequence of the catalog, and the record is cleared in
/// the renewal after that. So a record that does not say degraded means every acknowledged
/// change was confirmed by a standby region, whichever node leads the global group (this is
/// the order Patroni follows with its `/sync` key: the DCS records the change first). A
/// failover under the consistency-first policy relies on it (see
/// `crate::control::failover::standby_rpo_ms`).
#[derive(Clone)]
pub struct SyncAck {
    /// Highest confirmed upstream sequence per standby region.
    pub confirmed: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, u64>>,
    /// How long to wait for a confirmation before degrading (or, strict, answering
    /// `UNAVAILABLE`; the agent retries); also how long to wait for the global group to record
    /// the degradation.
    pub timeout: std::time::Duration,
    /// Never acknowledge without a standby's confirmation.
    pub strict: bool,
    gate: Arc<SyncGate>,
}

/// State shared by the clones of one [`SyncAck`] (one per coordinator).
struct SyncGate {
    state: Mutex<GateState>,
    /// Mirrors [`GateState::recorded`], for waiters.
    recorded: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct GateState {
    /// A confirmation timed out and no standby has confirmed the whole catalog since: this
    /// region asks to acknowledge alone.
    wanted: bool,
    /// The global group recorded this region degraded (the last renewal's answer), and
    /// `wanted` held throughout: batches may be acknowledged alone.
    recorded: bool,
}

impl SyncAck {
    /// A synchronous acknowledgement gate fed by `confirmed`; see the fields.
    pub fn new(
        confirmed: tokio::sync::watch::Receiver<std::collections::BTreeMap<String, u64>>,
        timeout: std::time::Duration,
        strict: bool,
    ) -> Self {
        SyncAck {
            confirmed,
            timeout,
            strict,
            gate: Arc::new(SyncGate {
                state: Mutex::new(GateState::default()),
                recorded: tokio::sync::watch::channel(false).0,
            }),
        }
    }

    fn best_confirmed(&self) -> Option<u64> {
        self.confirmed.borrow().values().copied().max()
    }

    /// Waits until some standby region confirmed `seq`, or (non-strict) until the global group
    /// recorded this region degraded; returns at once while it is.
    ///
    /// Errors: `UNAVAILABLE` after the timeout when strict, or when the degradation was not
    /// recorded within a second timeout (the global group unreachable: this region is about
    /// to lose its lease anyway).
    pub async fn wait(&self, seq: u64) -> Result<(), Status> {
        if self.gate.state.lock().recorded {
            return Ok(());
        }
        // Resolves once some standby confirmed `seq` (false if the sender is gone).
        let confirmed_seq = || {
            let mut rx = self.confirmed.clone();
            async move {
                rx.wait_for(|m| m.values().copied().max().is_some_and(|s| s >= seq))
                    .await
                    .is_ok()
            }
        };
        let ok = tokio::time::timeout(self.timeout, confirmed_seq())
            .await
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if self.strict {
            return Err(Status::unavailable(format!(
                "no standby region confirmed seq {seq} within {} ms; not acknowledged (synchronous_strict)",
                self.timeout.as_millis()
            )));
        }
        {
            let mut st = self.gate.state.lock();
            if st.recorded {
                return Ok(());
            }
            if !st.wanted {
                st.wanted = true;
                tracing::warn!(
                    seq,
                    timeout_ms = self.timeout.as_millis() as u64,
                    "no standby region confirmed in time: asking the global group to record degraded synchronous replication"
                );
            }
        }
        let mut recorded = self.gate.recorded.subscribe();
        let outcome = tokio::time::timeout(self.timeout, async {
            tokio::select! {
                c = confirmed_seq() => c,
                r = recorded.wait_for(|r| *r) => r.is_ok(),
            }
        })
        .await
        .unwrap_or(false);
        if outcome && (self.gate.state.lock().recorded || self.best_confirmed() >= Some(seq)) {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "no standby region confirmed seq {seq}, and the global group did not record degraded synchronous replication within {} ms; not acknowledged",
            self.timeout.as_millis()
        )))
    }

    /// Degraded or about to be: this region asked to acknowledge without a standby's
    /// confirmation and no standby has confirmed the whole catalog since (region reports).
    pub fn degraded(&self) -> bool {
        self.gate.state.lock().wanted
    }

    /// The flag this region's next lease renewal carries (`RenewRequest::sync_degraded`), as
    /// its regional leader: true while degraded. The global record saying degraded
    /// (`recorded_degraded`) makes this node degraded too (a new regional leader inherits it),
    /// until a standby confirmed `head_seq()`, the catalog's last sequence, read under the
    /// gate's lock so that no batch is acknowledged alone past it.
    pub fn renewal_flag(&self, recorded_degraded: bool, head_seq: impl FnOnce() -> u64) -> bool {
        let mut st = self.gate.state.lock();
        st.wanted |= recorded_degraded;
        if !st.wanted {
            return false;
        }
        let head = head_seq();
        if self.best_confirmed().unwrap_or(0) >= head {
            st.wanted = false;
            st.recorded = false;
            self.gate.recorded.send_replace(false);
            tracing::warn!(
                head,
                "a standby region confirmed the whole catalog: synchronous replication resumes"
            );
            return false;
        }
        true
    }

    /// Takes the renewal's answer: the global group records this region degraded
    /// (`recorded`). Batches are acknowledged alone only while this node still asks for it.
    pub fn renewal_answer(&self, recorded: bool) {
        let mut st = self.gate.state.lock();
        st.recorded = recorded && st.wanted;
        self.gate.recorded.send_replace(st.recorded);
    }
}

/// Reused parts of one file being checked in parallel, in part order: each yields the part's
/// chaining value when the file has several parts (`None` for a one-part file, whose hash is
/// the part's).
#[derive(Default)]
struct Readback {
    reads:
        std::collections::VecDeque<tokio::task::JoinHandle<Result<Option<ChainingValue>, Status>>>,
}

impl Readback {
    /// Starts checking the reused part `pref`: present here with a cached chaining value at
    /// `cv_offset` (`Some` for multi-part files), or else read (locally, else from a peer) and
    /// verified, its chaining value computed from the content.
    fn start(
        &mut self,
        blobs: &Blobs,
        cached: Option<ChainingValue>,
        pref: PartRef,
        cv_offset: Option<u64>,
    ) {
        let blobs = blobs.clone();
        let task = tokio::spawn(async move {
            if let Some(cv) = cached {
                if blobs.store.contains(&pref.hash).await.unwrap_or(false) {
                    return Ok(Some(cv));
                }
            }
            let raw = blobs.get_raw(&pref.hash).await.map_err(base_missing)?;
            if raw.len() as u64 != pref.size {
                return Err(bad(format!(
                    "reused blob {} has {} bytes, part declares {}",
                    pref.hash,
                    raw.len(),
                    pref.size
                )));
            }
            match cv_offset {
                None => Ok(None),
                Some(o) => tokio::task::spawn_blocking(move || Some(treehash::part_cv(o, &raw)))
                    .await
                    .map_err(|e| Status::internal(e.to_string())),
            }
        });
        self.reads.push_back(task);
    }

    /// Adds finished checks to `cvs` in order until at most `keep` remain in flight.
    ///
    /// Errors: FAILED_PRECONDITION `base_missing` when a blob cannot be read; INVALID_ARGUMENT
    /// when its size differs from the part's.
    async fn drain(&mut self, cvs: &mut Vec<ChainingValue>, keep: usize) -> Result<(), Status> {
        while self.reads.len() > keep {
            let Some(task) = self.reads.pop_front() else {
                break;
            };
            if let Some(cv) = task.await.map_err(|e| Status::internal(e.to_string()))?? {
                cvs.push(cv);
            }
        }
        Ok(())
    }
}

/// The hash and size of `part`, checked against [`lifeboat_common::PART_SIZE`] (an empty
/// file has no parts, so a part of 0 bytes is refused too).
///
/// Errors: INVALID_ARGUMENT.
fn part_ref(part: &PartData) -> Result<PartRef, Status> {
    let hash = BlobHash::from_hex(&part.hash).map_err(|e| bad(e.to_string()))?;
    check_part_size(part)?;
    Ok(PartRef {
        hash,
        size: part.size,
    })
}

/// Checks `part.size` against [`lifeboat_common::PART_SIZE`] (not 0, not larger).
///
/// Errors: INVALID_ARGUMENT.
fn check_part_size(part: &PartData) -> Result<(), Status> {
    if part.size == 0 {
        return Err(bad("part of 0 bytes"));
    }
    if part.size > lifeboat_common::PART_SIZE as u64 {
        return Err(bad(format!(
            "part of {} bytes exceeds {}",
            part.size,
            lifeboat_common::PART_SIZE
        )));
    }
    Ok(())
}

/// A verified part's blob, new to this store: its stored form.
struct NewBlob {
    bytes: Vec<u8>,
}

struct Pending {
    change: FileChange,
    kind: EntryKind,
    parts: Vec<PartRef>,
    /// Chaining values of the parts so far (files of two or more parts): the whole-file hash
    /// is merged from them (`treehash::file_hash`) and checked against the declared one.
    cvs: Vec<ChainingValue>,
}

impl Pending {
    /// Offset of the next part when the whole-file hash needs its chaining value.
    fn cv_offset(&self) -> Option<u64> {
        (self.change.part_count >= 2)
            .then(|| self.parts.len() as u64 * lifeboat_common::PART_SIZE as u64)
    }
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// `FAILED_PRECONDITION` coded [`ErrorCode::BaseMissing`]: the agent resends the parts whole.
fn base_missing(e: impl std::fmt::Display) -> Status {
    WireError::new(ErrorCode::BaseMissing)
        .status(format!("base missing: {e}; resend the parts in full"))
}

/// Codes an uncoded `INVALID_ARGUMENT` about change `blamed` (`change_id`, wire path) as
/// [`ErrorCode::InvalidChange`], so that the agent drops that change alone.
fn blame(s: Status, blamed: Option<&(u64, String)>) -> Status {
    match blamed {
        Some((id, path)) if s.code() == Code::InvalidArgument && WireError::of(&s).is_none() => {
            WireError::new(ErrorCode::InvalidChange)
                .change(*id, path.clone())
                .status(s.message())
        }
        _ => s,
    }
}

impl Intake {
    /// Whether a committed version references `hash`: then its blob was durable on a majority
    /// when that version was committed, and garbage collection keeps it. A blob that is only
    /// present here (left by a batch that failed before its copies finished, or condemned) is
    /// not known to be on a majority.
    ///
    /// Errors: INTERNAL on a catalog read failure.
    fn referenced(&self, hash: &BlobHash) -> Result<bool, Status> {
        self.catalog
            .refcount(hash)
            .map(|n| n > 0)
            .map_err(|e| Status::internal(format!("catalog read: {e}")))
    }

    /// Whether garbage collection condemned `hash` (its copies are deleted or being deleted).
    ///
    /// Errors: INTERNAL on a catalog read failure.
    fn condemned(&self, hash: &BlobHash) -> Result<bool, Status> {
        self.catalog
            .condemned_among(std::slice::from_ref(hash))
            .map(|c| !c.is_empty())
            .map_err(|e| Status::internal(format!("catalog read: {e}")))
    }

    fn check_change(&self, c: &FileChange, epoch: u64) -> Result<EntryKind, Status> {
        validate_rel_path(&c.path).map_err(|e| bad(e.to_string()))?;
        if !c.rename_from.is_empty() {
            validate_rel_path(&c.rename_from).map_err(|e| bad(e.to_string()))?;
        }
        if c.epoch != 0 && c.epoch < epoch {
            return Err(WireError::new(ErrorCode::StaleEpoch)
                .epoch(epoch)
                .status(format!(
                    "stale epoch: change stamped with epoch {} but the current epoch is {epoch}",
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
            let got = match p.parts.as_slice() {
                [] => BlobHash::of(b""),
                // One part: the file is the part, whose content hashes to its hash (checked).
                [one] => one.hash,
                parts => {
                    let shape: Vec<(u64, ChainingValue)> = parts
                        .iter()
                        .map(|x| x.size)
                        .zip(p.cvs.iter().copied())
                        .collect();
                    let h = (shape.len() == parts.len())
                        .then(|| treehash::file_hash(lifeboat_common::PART_SIZE as u64, &shape))
                        .flatten()
                        .ok_or_else(|| {
                            bad(format!(
                                "{}: parts do not form a file of {}-byte parts",
                                c.path,
                                lifeboat_common::PART_SIZE
                            ))
                        })?;
                    BlobHash(*h.as_bytes())
                }
            };
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

    /// Rebuilds one `full`, `encoded` or `delta` part, returns its ref, when the blob is new its
    /// stored form to store, and with `cv_offset` its chaining value at that offset. With
    /// `unhashed_ok` (`PutParts`), a `full` or `encoded` part may come without a hash: its
    /// content's blake3 is computed here and is its address.
    async fn rebuild_part(
        &self,
        part: PartData,
        fresh: &HashSet<BlobHash>,
        cv_offset: Option<u64>,
        unhashed_ok: bool,
    ) -> Result<(PartRef, Option<NewBlob>, Option<ChainingValue>), Status> {
        let unhashed = unhashed_ok
            && part.hash.is_empty()
            && matches!(part.body, Some(Body::Full(_) | Body::Encoded(_)));
        let declared = if unhashed {
            check_part_size(&part)?;
            None
        } else {
            Some(part_ref(&part)?.hash)
        };
        let size = part.size as usize;
        let mut given: Option<Vec<u8>> = None;
        let (raw, hash) = match (part.body, declared) {
            (None, _) => return Err(bad("part without body")),
            (Some(Body::Reuse(_)), _) => {
                return Err(Status::internal("reused parts are checked by `Readback`"));
            }
            // Checked against `hash` below, with the chaining value.
            (Some(Body::Full(data)), Some(hash)) => (data, hash),
            (Some(Body::Full(data)), None) => tokio::task::spawn_blocking(move || {
                let hash = BlobHash::of(&data);
                (data, hash)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?,
            (Some(Body::Encoded(enc)), declared) => {
                // Compressed by the agent: decoding checks the magic, codec, size bound and
                // that the content hashes to `hash` (or computes it); these bytes are then
                // stored as they are.
                let (raw, hash, enc) = tokio::task::spawn_blocking(move || {
                    let max = lifeboat_common::PART_SIZE;
                    match declared {
                        Some(h) => blob::decode(&h, &enc, max).map(|raw| (raw, h, enc)),
                        None => blob::decode_unhashed(&enc, max).map(|(raw, h)| (raw, h, enc)),
                    }
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| bad(format!("encoded part: {e}")))?;
                given = Some(enc);
                (raw, hash)
            }
            (Some(Body::Delta(_)), None) => {
                return Err(Status::internal("an unhashed part is full or encoded"));
            }
            (Some(Body::Delta(delta)), Some(hash)) => {
                let base_hash =
                    BlobHash::from_hex(&part.base_hash).map_err(|e| bad(e.to_string()))?;
                let base = match self.blobs.get_raw(&base_hash).await {
                    Ok(b) => b,
                    Err(e @ BlobsError::Store(_)) => return Err(base_missing(e)),
                    Err(e) => return Err(base_missing(e)),
                };
                let raw = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(size);
                    fast_rsync::apply_limited(&base, &delta, &mut out, size)
                        .map(|_| out)
                        .map_err(|e| bad(format!("bad delta: {e}")))
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
                (raw, hash)
            }
        };
        if raw.len() != size {
            return Err(bad(format!(
                "part content is {} bytes, declared {size}",
                raw.len()
            )));
        }
        // Still verify what was sent when the blob is stored already.
        // Present here is not enough: a blob no committed version references may be here only
        // (left by a batch that failed before its copies finished) or condemned. Such a blob is
        // stored again (a no-op here) and copied to the followers, which skip what they hold.
        let stored = fresh.contains(&hash)
            || (self.referenced(&hash)? && self.blobs.store.contains(&hash).await.unwrap_or(false));
        // Decoding checked (or computed) the hash of an encoded part; an unhashed full part's
        // hash was computed from this content.
        let check = given.is_none() && !unhashed;
        let (encoded, cv) = tokio::task::spawn_blocking(move || {
            if check && BlobHash::of(&raw) != hash {
                return Err(bad(format!("part content does not hash to {hash}")));
            }
            let cv = cv_offset.map(|o| treehash::part_cv(o, &raw));
            let new = (!stored).then(|| {
                let bytes = given.unwrap_or_else(|| blob::encode(&raw));
                NewBlob { bytes }
            });
            Ok((new, cv))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok((
            PartRef {
                hash,
                size: part.size,
            },
            encoded,
            cv,
        ))
    }

    /// Stores `enc` (the new blob `h`) in a task of `puts` (at most [`MAX_PUTS_IN_FLIGHT`]
    /// at once; waits for one to finish first) and, once it is durable here, hands `h` to the
    /// copies to the followers (each decodes and checks it).
    ///
    /// Errors: an earlier put of `puts` failed (UNAVAILABLE).
    async fn spawn_put(
        &self,
        puts: &mut JoinSet<Result<(), Status>>,
        replication: &crate::blobs::ReplicationSession,
        h: BlobHash,
        enc: NewBlob,
    ) -> Result<(), Status> {
        while puts.len() >= MAX_PUTS_IN_FLIGHT {
            if let Some(r) = puts.join_next().await {
                r.map_err(|e| Status::internal(e.to_string()))??;
            }
        }
        let store = self.blobs.store.clone();
        let fanout = replication.fanout();
        puts.spawn(async move {
            store
                .put(&h, enc.bytes)
                .await
                .map_err(|e| Status::unavailable(format!("blob store: {e}")))?;
            // Durable here: now copy it to the followers.
            for f in fanout {
                let _ = f.send(h);
            }
            Ok(())
        });
        Ok(())
    }

    /// `PutParts`: stores every `full` or `encoded` part of the stream as a blob (verified,
    /// durable here, then copied until a majority of voters holds it) and returns their hashes
    /// (computed here for a part sent without one: the agent's snapshot pre-upload leaves the
    /// hashing to the leader, which hashes the content to verify it anyway).
    /// At most [`MAX_PUT_PARTS`] parts per call.
    ///
    /// Errors: INVALID_ARGUMENT for a part that is neither `full` nor `encoded`, too large, not
    /// decodable or not hashing to its declared hash; UNAVAILABLE when the blob store or the
    /// majority copy fails.
    async fn put_parts_stream(
        &self,
        mut stream: Streaming<PartData>,
    ) -> Result<PutPartsReply, Status> {
        let mut fresh: HashSet<BlobHash> = HashSet::new();
        let mut stored = Vec::new();
        let mut cvs = Vec::new();
        let mut puts: JoinSet<Result<(), Status>> = JoinSet::new();
        let replication = self.blobs.start_replication();
        // Parts are verified [`VERIFY_AHEAD`] at a time, in order; whether a blob is new is
        // decided when its verification completes (`fresh`), not before.
        let no_fresh = HashSet::new();
        let mut verifying = futures::stream::FuturesOrdered::new();
        let (mut received, mut input_open) = (0usize, true);
        loop {
            tokio::select! {
                biased;
                Some(done) = verifying.next(), if !verifying.is_empty() => {
                    let ((pref, encoded, cv), offset): ((PartRef, Option<NewBlob>, Option<ChainingValue>), u64) = done?;
                    if let Some(enc) = encoded {
                        if fresh.insert(pref.hash) {
                            self.spawn_put(&mut puts, &replication, pref.hash, enc)
                                .await?;
                        }
                    }
                    if let Some(cv) = cv {
                        cvs.push(((pref.hash, offset), cv));
                    }
                    stored.push(pref.hash.to_hex());
                }
                part = stream.next(), if input_open && verifying.len() < VERIFY_AHEAD => {
                    let Some(part) = part else {
                        input_open = false;
                        continue;
                    };
                    let part = part?;
                    if !matches!(part.body, Some(Body::Full(_) | Body::Encoded(_))) {
                        return Err(bad("PutParts takes full or encoded parts only"));
                    }
                    if received >= MAX_PUT_PARTS {
                        return Err(bad(format!(
                            "more than {MAX_PUT_PARTS} parts in one PutParts"
                        )));
                    }
                    received += 1;
                    let offset = u64::from(part.index) * lifeboat_common::PART_SIZE as u64;
                    let verify = self.rebuild_part(part, &no_fresh, Some(offset), true);
                    verifying.push_back(async move { verify.await.map(|r| (r, offset)) });
                }
                else => break,
            }
        }
        while let Some(r) = puts.join_next().await {
            r.map_err(|e| Status::internal(e.to_string()))??;
        }
        replication
            .finish(!fresh.is_empty())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut cache = self.part_cvs.lock();
        for (k, cv) in cvs {
            cache.insert(k, cv);
        }
        Ok(PutPartsReply { stored })
    }

    async fn push(
        &self,
        mut stream: Streaming<PushMessage>,
        epoch: u64,
    ) -> Result<PushReply, Status> {
        // Garbage collection waits until this batch is committed (or failed), and no deletion
        // an earlier leader decided is still to be applied (see `crate::blobs::gc`).
        let gc_shared = self.gc_lock.read().await;
        crate::blobs::gc::wait_term_applied(&self.raft).await?;
        let mut versions = Vec::new();
        let mut change_ids = Vec::new();
        let mut current: Option<Pending> = None;
        let mut fresh: HashSet<BlobHash> = HashSet::new();
        let mut new_blobs: Vec<BlobHash> = Vec::new();
        let mut puts: JoinSet<Result<(), Status>> = JoinSet::new();
        let replication = self.blobs.start_replication();
        let mut readback = Readback::default();
        // The change whose header or parts are being checked: an invalid one is named in the
        // refusal (`blame`).
        let mut blamed: Option<(u64, String)> = None;
        let received: Result<(), Status> = async {
            while let Some(msg) = stream.next().await {
                let msg = msg?;
                match msg.msg {
                    None => return Err(bad("empty message")),
                    Some(Msg::Change(c)) => {
                        if let Some(mut p) = current.take() {
                            readback.drain(&mut p.cvs, 0).await?;
                            versions.push(self.finish(p, epoch)?);
                        }
                        blamed = Some((c.change_id, c.path.clone()));
                        let kind = self.check_change(&c, epoch)?;
                        change_ids.push(c.change_id);
                        current = Some(Pending {
                            change: c,
                            kind,
                            parts: Vec::new(),
                            cvs: Vec::new(),
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
                        let cv_offset = p.cv_offset();
                        if matches!(part.body, Some(Body::Reuse(_))) {
                            // Check several reused parts at once; their chaining values join the
                            // whole-file hash in part order.
                            let pref = part_ref(&part)?;
                            if !fresh.contains(&pref.hash) && self.condemned(&pref.hash)? {
                                return Err(base_missing(format!(
                                    "reused blob {} was removed by garbage collection",
                                    pref.hash
                                )));
                            }
                            let cached =
                                cv_offset.and_then(|o| self.part_cvs.lock().get(&(pref.hash, o)));
                            readback.start(&self.blobs, cached, pref.clone(), cv_offset);
                            readback.drain(&mut p.cvs, MAX_READS_IN_FLIGHT).await?;
                            p.parts.push(pref);
                            continue;
                        }
                        readback.drain(&mut p.cvs, 0).await?;
                        let (pref, encoded, cv) =
                            self.rebuild_part(part, &fresh, cv_offset, false).await?;
                        if let Some(cv) = cv {
                            p.cvs.push(cv);
                        }
                        if let Some(enc) = encoded {
                            fresh.insert(pref.hash);
                            new_blobs.push(pref.hash);
                            self.spawn_put(&mut puts, &replication, pref.hash, enc)
                                .await?;
                        }
                        p.parts.push(pref);
                    }
                }
            }
            if let Some(mut p) = current.take() {
                readback.drain(&mut p.cvs, 0).await?;
                versions.push(self.finish(p, epoch)?);
            }
            Ok(())
        }
        .await;
        received.map_err(|s| blame(s, blamed.as_ref()))?;
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
        let content_bytes: u64 = versions.iter().map(|v| v.size).sum();
        // Parts garbage collection had condemned were stored and copied again above (reused
        // ones were refused): the commit says so.
        let mut hashes: Vec<BlobHash> = versions
            .iter()
            .flat_map(|v| v.parts.iter().map(|p| p.hash))
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        let restored = self
            .catalog
            .condemned_among(&hashes)
            .map_err(|e| Status::internal(format!("catalog read: {e}")))?;
        let checked = Instant::now();
        let resp = self
            .raft
            .client_write(CatalogCommand::CommitVersions {
                versions,
                commit_time_ms: lifeboat_common::now_ms(),
                restored,
            })
            .await
            .map_err(|e| self.leader.commit_error(e))?;
        // Committed (or rejected): garbage collection may run again.
        drop(gc_shared);
        if let Some(h) = resp.data.rejected.first() {
            return Err(base_missing(format!(
                "blob {h} (and {} more) was removed by garbage collection",
                resp.data.rejected.len() - 1
            )));
        }
        let seqs = resp.data.seqs;
        if seqs.len() != n {
            return Err(Status::internal(
                "state machine returned a wrong number of sequence numbers",
            ));
        }
        let committed = Instant::now();
        if let (Some(sync), Some(&max)) = (&self.sync, seqs.iter().max()) {
            sync.wait(max).await?;
        }
        tracing::debug!(
            commit_ms = committed.duration_since(checked).as_millis() as u64,
            sync_ms = committed.elapsed().as_millis() as u64,
            "batch stages"
        );
        // Acknowledge only under a still valid lease of the same epoch: a region fenced while
        // the batch was in flight must not acknowledge it (rule 1 and 2).
        let now_epoch = self.role.write_gate()?;
        if now_epoch != epoch {
            return Err(Status::unavailable(format!(
                "epoch changed from {epoch} to {now_epoch} during the batch; not acknowledged"
            )));
        }
        crate::metrics::COUNTERS.acked(n, content_bytes);
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

    async fn put_parts(
        &self,
        req: Request<Streaming<PartData>>,
    ) -> Result<Response<PutPartsReply>, Status> {
        let epoch = self.role.write_gate()?;
        self.leader.ensure_leader()?;
        let span = tracing::info_span!("put_parts", region = %self.region, node = self.leader.node_id, epoch);
        let started = Instant::now();
        let reply = self
            .put_parts_stream(req.into_inner())
            .instrument(span.clone())
            .await;
        match &reply {
            Ok(r) => {
                tracing::debug!(parent: &span, parts = r.stored.len(), ms = started.elapsed().as_millis() as u64, "parts stored")
            }
            Err(s) => {
                tracing::warn!(parent: &span, code = ?s.code(), message = s.message(), "parts refused")
            }
        }
        reply.map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        crate::authz::ensure_agent(&req, &req.get_ref().agent_id)?;
        let hb = req.into_inner();
        if hb.agent_id.is_empty() || hb.agent_id.len() > 256 {
            return Err(bad("agent_id must be 1..256 bytes"));
        }
        // A leader probe carries no checks or database roles: it must not replace the agent's
        // last report (region health and promotion waits read it).
        if !hb.probe {
            self.agents
                .lock()
                .insert(hb.agent_id.clone(), (Instant::now(), hb));
        }
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
