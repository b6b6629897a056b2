//! Cross-region replication.
//!
//! **Serving** ([`ReplicationServer`], `ReplicationService.SubscribeCatalog`, on every
//! coordinator): committed catalog versions in sequence order from a given sequence number, in
//! batches, then (with `follow`) new batches as they commit and an empty keepalive batch every
//! [`KEEPALIVE`] carrying the newest sequence number. Only the leader serves unless the subscriber
//! asks for `any_node`; followers redirect with `UNAVAILABLE` + `x-lifeboat-leader`.
//!
//! **Following** ([`Replicator`], only in a standby region, i.e. with `[replication] upstream`):
//! while this node leads its regional group, a task subscribes to an upstream coordinator from
//! `upstream_seq + 1` (the committed progress in the local catalog), and for each batch
//!
//! 1. fetches the parts the local store lacks with `BlobService.FetchBlobs` from the same
//!    upstream node, verifies each ([`lifeboat_common::blob::decode`]), stores it durably and
//!    copies it to a majority of the local voters ([`Blobs::start_replication`]);
//! 2. commits `Request::ApplyReplicated` through the local Raft log (new local sequence numbers,
//!    original commit times, and the new `upstream_seq` in the same entry);
//! 3. only then reads the next batch.
//!
//! A new leader restarts from the committed `upstream_seq`; the state machine skips rows at or
//! below it, so a batch proposed by a deposed leader and again by its successor is applied once.
//! Upstream failures rotate through the configured addresses with a backoff of 100 ms doubling to
//! 5 s; after a whole round of failures the subscriber accepts any upstream node's (committed)
//! catalog for a while ([`ANY_NODE_SESSION`]).
//!
//! **Lag** ([`ReplicationStatus`]): the leader measures the age of the oldest upstream change not
//! yet applied against the upstream's clock (each batch carries it), and, while the upstream is
//! silent for more than [`STALE_AFTER`], at least the time since it last answered.
//! **Architecture Invariant**: a replicated version is committed only after every blob it
//! references is durable on a majority of the local voters (or in the shared store).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::catalog::FileVersion;
use lifeboat_common::tls::TlsConfig;
use lifeboat_common::LEADER_HEADER;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::replication_service_client::ReplicationServiceClient;
use lifeboat_proto::replication_service_server::ReplicationService;
use lifeboat_proto::{CatalogBatch, FetchBlobsRequest, SubscribeRequest};
use openraft::ServerState;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument;

use crate::blobs::Blobs;
use crate::config::ReplicationConfig;
use crate::leader::LeaderInfo;
use crate::raft::{Catalog, CatalogCommand, NodeId, RegionRaft};

/// Interval of keepalive batches on an idle subscription.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Fallback poll interval of a following subscription (new commits also wake it at once).
const POLL: Duration = Duration::from_millis(200);
/// Rows per batch when the subscriber does not say.
const DEFAULT_ROWS: usize = 500;
/// Most rows per batch whatever the subscriber asks.
const MAX_ROWS: usize = 5000;
/// A batch is cut once its encoded rows exceed this many bytes (well under the message limit).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// A subscription that delivers nothing (not even a keepalive) for this long is dropped.
const SILENCE: Duration = Duration::from_secs(5);
/// An upstream silent for longer than this counts in the lag (see [`ReplicationStatus`]).
pub const STALE_AFTER: Duration = Duration::from_secs(2);
/// Longest subscription to a non-leader (`any_node`); then the leader is tried again.
pub const ANY_NODE_SESSION: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Blobs asked for in one `FetchBlobs` call.
const FETCH_CHUNK: usize = 32;
/// Blob verifications and writes in flight.
const MAX_PUTS_IN_FLIGHT: usize = 8;

// ---------------------------------------------------------------------------------------------
// Serving side.

/// gRPC `ReplicationService`: streams this node's committed catalog to a subscriber.
pub struct ReplicationServer {
    /// Local catalog (reads only).
    pub catalog: Catalog,
    /// Leader lookup (for redirects).
    pub leader: LeaderInfo,
    /// This region's name, sent in every batch.
    pub region: String,
    /// Upstream sequence numbers confirmed by each standby region (`ConfirmApplied`).
    pub confirmed: Arc<tokio::sync::watch::Sender<std::collections::BTreeMap<String, u64>>>,
    /// TLS for forwarding a `ConfirmApplied` received while not leading to the leader.
    pub tls: TlsConfig,
}

/// Metadata key marking a `ConfirmApplied` forwarded by a follower (never forwarded again).
const FORWARDED_HEADER: &str = "x-lifeboat-forwarded";

#[tonic::async_trait]
impl ReplicationService for ReplicationServer {
    type SubscribeCatalogStream =
        Pin<Box<dyn futures::Stream<Item = Result<CatalogBatch, Status>> + Send>>;

    async fn subscribe_catalog(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeCatalogStream>, Status> {
        let r = req.into_inner();
        let leader = if r.any_node {
            None
        } else {
            self.leader.ensure_leader()?;
            Some(self.leader.clone())
        };
        let max_rows = match r.max_rows {
            0 => DEFAULT_ROWS,
            n => (n as usize).min(MAX_ROWS),
        };
        let (tx, rx) = mpsc::channel(2);
        let feed = Feed {
            catalog: self.catalog.clone(),
            leader,
            region: self.region.clone(),
            next: r.from_seq.max(1),
            follow: r.follow,
            max_rows,
        };
        let span = tracing::info_span!("subscription", region = %self.region, node = self.leader.node_id, from = r.from_seq);
        tokio::spawn(feed.run(tx).instrument(span));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn confirm_applied(
        &self,
        req: Request<lifeboat_proto::ConfirmAppliedRequest>,
    ) -> Result<Response<lifeboat_proto::ConfirmAppliedReply>, Status> {
        let forwarded = req.metadata().contains_key(FORWARDED_HEADER);
        let r = req.into_inner();
        if r.region.is_empty() || r.region.len() > 128 {
            return Err(Status::invalid_argument("region must be 1..128 bytes"));
        }
        // A subscriber reading a follower's catalog (`any_node`, e.g. right after a partition
        // healed) confirms to that follower; only the leader's intake waits for confirmations
        // (synchronous acknowledgement), so pass it on, or writes stall until the subscriber
        // returns to the leader.
        if !forwarded && self.leader.ensure_leader().is_err() {
            if let Some(addr) = self.leader.leader_addr() {
                let tls = self.tls.clone();
                let fwd = r.clone();
                tokio::spawn(async move {
                    let Ok(ch) = tls.channel(&addr) else { return };
                    let mut req = Request::new(fwd);
                    req.metadata_mut().insert(
                        FORWARDED_HEADER,
                        tonic::metadata::MetadataValue::from_static("1"),
                    );
                    let mut client = ReplicationServiceClient::new(ch);
                    let call = client.confirm_applied(req);
                    if let Err(e) = tokio::time::timeout(Duration::from_secs(2), call).await {
                        tracing::debug!(error = %e, %addr, "forwarding ConfirmApplied to the leader timed out");
                    }
                });
            }
        }
        self.confirmed.send_if_modified(|m| {
            let e = m.entry(r.region).or_insert(0);
            if r.upstream_seq > *e {
                *e = r.upstream_seq;
                true
            } else {
                false
            }
        });
        Ok(Response::new(lifeboat_proto::ConfirmAppliedReply {}))
    }
}

/// One subscription being served.
struct Feed {
    catalog: Catalog,
    /// Set unless `any_node`: the stream ends with a redirect when this node stops leading.
    leader: Option<LeaderInfo>,
    region: String,
    next: u64,
    follow: bool,
    max_rows: usize,
}

impl Feed {
    /// Rows from `self.next` (at most `max_rows`, about [`MAX_BATCH_BYTES`]) and the newest
    /// sequence number, as one batch.
    async fn cut(&self) -> Result<CatalogBatch, Status> {
        let (catalog, next, max_rows) = (self.catalog.clone(), self.next, self.max_rows);
        let (last_seq, last_cum, rows) = tokio::task::spawn_blocking(move || {
            let (last, cum) = catalog.last_seq_and_bytes().map_err(|e| e.to_string())?;
            let rows = catalog
                .changes_since(next, max_rows)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((last, cum, rows))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("catalog read: {e}")))?;
        let mut batch = CatalogBatch {
            rows: Vec::with_capacity(rows.len()),
            last_seq,
            leader_time_ms: lifeboat_common::now_ms(),
            region: self.region.clone(),
            last_cum_bytes: last_cum,
            rows_cum_bytes: 0,
        };
        let mut bytes = 0;
        for fv in rows {
            let row = fv.to_pb();
            bytes += row.encoded_len();
            if !batch.rows.is_empty() && bytes > MAX_BATCH_BYTES {
                break;
            }
            batch.rows.push(row);
        }
        if let Some(l) = batch.rows.last() {
            batch.last_seq = batch.last_seq.max(l.seq);
            let (catalog, seq) = (self.catalog.clone(), l.seq);
            batch.rows_cum_bytes = tokio::task::spawn_blocking(move || {
                catalog.cum_bytes_through(seq).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("catalog read: {e}")))?;
            batch.last_cum_bytes = batch.last_cum_bytes.max(batch.rows_cum_bytes);
        }
        Ok(batch)
    }

    async fn run(mut self, tx: mpsc::Sender<Result<CatalogBatch, Status>>) {
        let mut changed = self.catalog.watch_last_seq();
        let mut sent_any = false;
        let mut last_sent = Instant::now();
        loop {
            if let Some(l) = &self.leader {
                if let Err(s) = l.ensure_leader() {
                    tracing::info!("no longer the leader: ending the subscription with a redirect");
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            }
            changed.borrow_and_update();
            let batch = match self.cut().await {
                Ok(b) => b,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            let has_rows = !batch.rows.is_empty();
            if let Some(l) = batch.rows.last() {
                self.next = l.seq + 1;
            }
            if has_rows || !sent_any || (self.follow && last_sent.elapsed() >= KEEPALIVE) {
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
                sent_any = true;
                last_sent = Instant::now();
                if has_rows {
                    continue;
                }
            }
            if !self.follow {
                return;
            }
            let wait = POLL.min(KEEPALIVE.saturating_sub(last_sent.elapsed()));
            tokio::select! {
                r = changed.changed() => if r.is_err() { tokio::time::sleep(wait).await },
                _ = tokio::time::sleep(wait) => {}
                _ = tx.closed() => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lag and state.

/// What `Status` reports about replication (see `lifeboat.v1.StatusReply`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicationReport {
    /// `"source"` or `"standby"`.
    pub role: String,
    /// Highest upstream sequence number committed here.
    pub upstream_seq: u64,
    /// Newest upstream sequence number known.
    pub upstream_last_seq: u64,
    /// `upstream_last_seq - upstream_seq`.
    pub lag_entries: u64,
    /// Bytes of the upstream versions not yet committed here (their content sizes).
    pub lag_bytes: u64,
    /// Age of the oldest upstream change not applied yet, ms (0 when caught up).
    pub lag_ms: i64,
    /// `"healthy"`, `"degraded"`, `"failed"`; `"unknown"` on a standby follower; empty on a source.
    pub state: String,
    /// Last replication error seen by the leader.
    pub error: String,
    /// How long the upstream has been silent, ms, once more than [`STALE_AFTER`] (0 while it
    /// answers). `lag_ms` counts this silence; region health does not (see
    /// [`ReplicationReport::failed_in_contact`]).
    pub upstream_silent_ms: u64,
    /// The state from the lag measured against what the upstream last announced, without the
    /// silence: `"failed"` here means this standby could not keep up while in contact.
    pub state_in_contact: String,
}

impl ReplicationReport {
    /// True when the lag as of the upstream's last answer is at or above `lag_failed_ms`
    /// (this standby could not keep up while in contact): the region is then unfit to take
    /// over. A standby whose lag grew only because the upstream went silent
    /// (the active region is lost, the case failover exists for) stays fit: the failover's RPO
    /// rules weigh that lag (`failover::standby_rpo_ms`).
    pub fn failed_in_contact(&self) -> bool {
        self.state_in_contact == "failed"
    }
}

/// Live replication progress of this node (meaningful while it leads a standby region), shared
/// by the follower task and the admin API.
#[derive(Clone)]
pub struct ReplicationStatus {
    cfg: ReplicationConfig,
    live: Arc<Mutex<Live>>,
}

#[derive(Default)]
struct Live {
    /// The follower task runs on this node.
    running: bool,
    /// When it started.
    started: Option<Instant>,
    /// Newest upstream sequence number announced.
    upstream_last_seq: u64,
    /// Upstream commit time (upstream clock, ms) of the oldest change known not to be applied.
    oldest_pending_ms: Option<i64>,
    /// When this node learned that changes are pending without knowing their commit time.
    pending_since: Option<Instant>,
    /// Upstream clock minus local clock, ms (from the last batch).
    clock_offset_ms: i64,
    /// Last message from the upstream.
    last_contact: Option<Instant>,
    /// Upstream cumulative committed bytes at `upstream_last_seq`.
    last_cum_bytes: u64,
    /// Upstream cumulative committed bytes through the last row of the newest batch.
    batch_cum_bytes: u64,
    /// Upstream cumulative committed bytes through the upstream seq committed here (known once a
    /// batch arrived).
    applied_cum_bytes: Option<u64>,
    last_error: String,
}

impl Live {
    /// Content bytes of the upstream versions not committed here, given `lag_entries` (0 until a
    /// batch told the upstream's cumulative byte counters).
    fn lag_bytes(&self, lag_entries: u64) -> u64 {
        match (lag_entries, self.applied_cum_bytes) {
            (0, _) | (_, None) => 0,
            (_, Some(a)) => self.last_cum_bytes.saturating_sub(a),
        }
    }
}

impl ReplicationStatus {
    /// Status holder for `cfg`.
    pub fn new(cfg: ReplicationConfig) -> Self {
        ReplicationStatus {
            cfg,
            live: Arc::new(Mutex::new(Live::default())),
        }
    }

    fn start(&self) {
        *self.live.lock() = Live {
            running: true,
            started: Some(Instant::now()),
            ..Live::default()
        };
    }

    /// The follower task of this node stopped (or was aborted): no live figures any more.
    pub fn stop(&self) {
        self.live.lock().running = false;
    }

    fn error(&self, e: &str) {
        self.live.lock().last_error = e.to_string();
    }

    /// A message arrived from the upstream; `applied` is the upstream seq applied here.
    fn contact(&self, batch: &CatalogBatch, applied: u64) {
        let now = lifeboat_common::now_ms();
        let mut l = self.live.lock();
        l.last_contact = Some(Instant::now());
        l.upstream_last_seq = batch
            .last_seq
            .max(batch.rows.last().map(|r| r.seq).unwrap_or(0));
        l.clock_offset_ms = batch.leader_time_ms.saturating_sub(now);
        l.last_cum_bytes = l.last_cum_bytes.max(batch.last_cum_bytes);
        if !batch.rows.is_empty() {
            // Rows start right after `applied`: what precedes them is committed here.
            let in_batch: u64 = batch
                .rows
                .iter()
                .filter(|r| !r.deleted)
                .map(|r| r.size)
                .sum();
            l.batch_cum_bytes = batch.rows_cum_bytes;
            l.applied_cum_bytes = Some(batch.rows_cum_bytes.saturating_sub(in_batch));
        }
        if batch.last_seq < applied {
            l.last_error = format!(
                "upstream catalog ends at seq {} but this standby already applied upstream seq {applied}: was the active region's catalog reset?",
                batch.last_seq
            );
        }
        if l.upstream_last_seq <= applied {
            l.oldest_pending_ms = None;
            l.pending_since = None;
        } else if let Some(first) = batch.rows.iter().find(|r| r.seq > applied) {
            l.oldest_pending_ms = Some(first.commit_time_ms);
        } else if l.oldest_pending_ms.is_none() && l.pending_since.is_none() {
            l.pending_since = Some(Instant::now());
        }
    }

    /// A batch up to upstream seq `applied` (last row committed upstream at `commit_ms`) is
    /// committed here.
    fn applied(&self, applied: u64, commit_ms: i64) {
        let mut l = self.live.lock();
        l.last_error.clear();
        l.applied_cum_bytes = Some(l.batch_cum_bytes);
        if l.upstream_last_seq <= applied {
            l.oldest_pending_ms = None;
            l.pending_since = None;
        } else {
            // The next row committed no earlier than the last one applied: a safe upper bound on
            // its age until its batch arrives.
            l.oldest_pending_ms = Some(commit_ms);
        }
    }

    /// The report for `Status`: live figures on the node running the follower task, committed
    /// ones elsewhere.
    ///
    /// Errors: [`ReplicationError::Storage`] when the catalog cannot be read.
    pub fn report(&self, catalog: &Catalog) -> Result<ReplicationReport, ReplicationError> {
        let committed = catalog
            .replication()
            .map_err(|e| ReplicationError::Storage(e.to_string()))?;
        let upstream_seq = committed.upstream_seq;
        // A standby by configuration, or one following the active region of the global group
        // (the follower task runs here).
        if !self.cfg.is_standby() && !self.live.lock().running {
            return Ok(ReplicationReport {
                role: "source".into(),
                upstream_seq,
                upstream_last_seq: committed.upstream_last_seq,
                ..Default::default()
            });
        }
        let l = self.live.lock();
        if !l.running {
            let last = committed.upstream_last_seq.max(upstream_seq);
            return Ok(ReplicationReport {
                role: "standby".into(),
                upstream_seq,
                upstream_last_seq: last,
                lag_entries: last - upstream_seq,
                lag_bytes: 0,
                lag_ms: 0,
                state: "unknown".into(),
                error: String::new(),
                upstream_silent_ms: 0,
                state_in_contact: "unknown".into(),
            });
        }
        let last = if l.last_contact.is_some() {
            l.upstream_last_seq.max(upstream_seq)
        } else {
            committed.upstream_last_seq.max(upstream_seq)
        };
        let lag_entries = last - upstream_seq;
        let now = lifeboat_common::now_ms();
        let mut lag_ms = 0i64;
        if lag_entries > 0 {
            if let Some(c) = l.oldest_pending_ms {
                lag_ms = now.saturating_add(l.clock_offset_ms).saturating_sub(c);
            } else if let Some(t) = l.pending_since {
                lag_ms = t.elapsed().as_millis() as i64;
            }
        }
        let silent = l
            .last_contact
            .or(l.started)
            .map(|t| t.elapsed())
            .unwrap_or_default();
        // The lag when the upstream last answered: entries it announced cannot be fetched
        // while it is silent, so their age since then says nothing about this standby.
        let mut in_contact = state_of(lag_ms, &self.cfg);
        let mut upstream_silent_ms = 0;
        if silent > STALE_AFTER {
            upstream_silent_ms = silent.as_millis() as u64;
            in_contact = state_of(lag_ms.saturating_sub(silent.as_millis() as i64), &self.cfg);
            lag_ms = lag_ms.max(silent.as_millis() as i64);
        }
        let lag_ms = lag_ms.max(0);
        let lag_bytes = l.lag_bytes(lag_entries);
        Ok(ReplicationReport {
            role: "standby".into(),
            upstream_seq,
            upstream_last_seq: last,
            lag_entries,
            lag_bytes,
            lag_ms,
            state: state_of(lag_ms, &self.cfg).into(),
            error: l.last_error.clone(),
            upstream_silent_ms,
            state_in_contact: in_contact.into(),
        })
    }
}

/// `"healthy"`, `"degraded"` or `"failed"` for a lag of `lag_ms` under `cfg`'s thresholds.
pub fn state_of(lag_ms: i64, cfg: &ReplicationConfig) -> &'static str {
    let lag = lag_ms.max(0) as u64;
    if lag >= cfg.lag_failed_ms {
        "failed"
    } else if lag >= cfg.lag_degraded_ms {
        "degraded"
    } else {
        "healthy"
    }
}

// ---------------------------------------------------------------------------------------------
// Following side.

/// Errors of one subscription of the follower task.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The upstream node is not its region's leader; the leader is at `leader`.
    #[error("upstream {addr} is not the leader; following the redirect to {leader}")]
    Redirect {
        /// Node asked.
        addr: String,
        /// Leader it named.
        leader: String,
    },
    /// An RPC to the upstream failed.
    #[error("upstream {addr}: {op} failed ({code:?}): {message}")]
    Rpc {
        /// Node asked.
        addr: String,
        /// `SubscribeCatalog` or `FetchBlobs`.
        op: &'static str,
        /// gRPC code.
        code: Code,
        /// Status message.
        message: String,
    },
    /// The subscription went silent or ended.
    #[error("upstream {addr}: {reason}")]
    Stream {
        /// Node asked.
        addr: String,
        /// What happened.
        #[source]
        reason: StreamEnd,
    },
    /// The upstream sent something invalid (bad row, unrequested or corrupted blob).
    #[error("upstream {addr} sent invalid data: {message}")]
    Invalid {
        /// Node asked.
        addr: String,
        /// What was wrong.
        message: String,
    },
    /// The local blob store failed or the blobs did not reach a majority of local voters.
    #[error("local blobs: {0}")]
    Blobs(String),
    /// The local Raft commit failed (e.g. leadership lost).
    #[error("local commit of replicated versions failed: {0}")]
    Commit(String),
    /// Local catalog read failed.
    #[error("local catalog: {0}")]
    Storage(String),
    /// TLS files or address.
    #[error(transparent)]
    Tls(#[from] lifeboat_common::tls::TlsError),
}

/// How a subscription ended without an RPC error.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// No message (not even a keepalive) within the silence limit.
    #[error("no batch or keepalive for {0:?}")]
    Silent(Duration),
    /// The server closed the stream.
    #[error("subscription closed by the server")]
    Closed,
}

fn rpc_error(addr: &str, op: &'static str, s: Status) -> ReplicationError {
    if s.code() == Code::Unavailable {
        if let Some(l) = s
            .metadata()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != addr)
        {
            return ReplicationError::Redirect {
                addr: addr.to_string(),
                leader: l.to_string(),
            };
        }
    }
    ReplicationError::Rpc {
        addr: addr.to_string(),
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Aborts the follower task when the supervisor is dropped or aborted (after a failover the
/// control runtime aborts the supervisor of the old upstream).
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// The follower of a standby region: runs on whichever node leads the regional group.
#[derive(Clone)]
pub struct Replicator {
    /// Local Raft.
    pub raft: RegionRaft,
    /// This node's id.
    pub node_id: NodeId,
    /// Local region name (for logs).
    pub region: String,
    /// Local catalog (reads `upstream_seq`).
    pub catalog: Catalog,
    /// Local blob access (store + copy to a majority).
    pub blobs: Blobs,
    /// TLS for connections to the upstream.
    pub tls: TlsConfig,
    /// `[replication]`.
    pub cfg: ReplicationConfig,
    /// Shared progress for `Status`.
    pub status: ReplicationStatus,
    /// Name of the upstream region when known (global group): progress is read for it, and
    /// versions that originated in this region are not copied back.
    pub upstream_region: Option<String>,
    /// Held shared per batch, from the blob checks to the commit (see [`crate::blobs::gc`]).
    pub gc_lock: crate::blobs::gc::GcLock,
}

impl Replicator {
    /// Starts the supervisor: it runs the follower task while this node is the leader and stops
    /// it when leadership is lost. Ends when Raft shuts down (or when the handle is aborted).
    pub fn spawn(self) -> JoinHandle<()> {
        let span = tracing::info_span!("replication", region = %self.region, node = self.node_id);
        tokio::spawn(self.supervise().instrument(span))
    }

    async fn supervise(self) {
        let mut metrics = self.raft.metrics();
        let mut task = AbortOnDrop(None);
        loop {
            let leading = metrics.borrow_and_update().state == ServerState::Leader;
            if leading && task.0.as_ref().is_none_or(|t| t.is_finished()) {
                tracing::info!(upstream = ?self.cfg.upstream, "leading a standby region: copying the upstream catalog");
                self.status.start();
                let me = self.clone();
                task.0 = Some(tokio::spawn(
                    async move { me.follow().await }.in_current_span(),
                ));
            } else if !leading {
                if let Some(t) = task.0.take() {
                    tracing::info!("leadership lost: replication stops on this node");
                    t.abort();
                    self.status.stop();
                }
            }
            if metrics.changed().await.is_err() {
                break;
            }
        }
        if let Some(t) = task.0.take() {
            t.abort();
        }
        self.status.stop();
    }

    async fn follow(&self) {
        // Apply every entry of earlier terms first: the upstream_seq read below must include a
        // batch a previous leader committed.
        let mut backoff = BACKOFF_START;
        while let Err(e) = self.raft.ensure_linearizable().await {
            self.status.error(&format!("waiting to lead: {e}"));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let n = self.cfg.upstream.len().max(1);
        let mut backoff = BACKOFF_START;
        let mut idx = 0usize;
        let mut redirect: Option<String> = None;
        let mut failures = 0usize;
        loop {
            let (addr, redirected) = match redirect.take() {
                Some(a) => (a, true),
                None => (self.cfg.upstream[idx % n].clone(), false),
            };
            // After a whole round of failures, accept any upstream node's committed catalog.
            let any_node = failures >= n;
            let mut progressed = false;
            let res = if any_node {
                match tokio::time::timeout(
                    ANY_NODE_SESSION,
                    self.session(&addr, true, &mut progressed),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => {
                        // Time to try the leader again.
                        failures = 0;
                        continue;
                    }
                }
            } else {
                self.session(&addr, false, &mut progressed).await
            };
            if progressed {
                failures = 0;
                backoff = BACKOFF_START;
            }
            match res {
                Err(ReplicationError::Redirect { leader, .. }) if !redirected => {
                    tracing::debug!(from = %addr, to = %leader, "following the upstream leader");
                    redirect = Some(leader);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, any_node, "replication from the upstream interrupted; trying the next upstream coordinator");
                    self.status.error(&e.to_string());
                    if !redirected {
                        idx += 1;
                    }
                    failures += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Ok(()) => {}
            }
        }
    }

    /// One subscription to `addr`: copies batches until an error. Sets `progressed` once any
    /// message arrived.
    async fn session(
        &self,
        addr: &str,
        any_node: bool,
        progressed: &mut bool,
    ) -> Result<(), ReplicationError> {
        let ch = self.tls.channel(addr)?;
        let max = lifeboat_common::MAX_MESSAGE_BYTES;
        let mut sub = ReplicationServiceClient::new(ch.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let mut fetch = BlobServiceClient::new(ch)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let mut applied = match &self.upstream_region {
            Some(r) => self.catalog.upstream_seq_of(r),
            None => self.catalog.upstream_seq(),
        }
        .map_err(|e| ReplicationError::Storage(e.to_string()))?;
        let mut stream = sub
            .subscribe_catalog(SubscribeRequest {
                from_seq: applied + 1,
                follow: true,
                max_rows: self.cfg.batch_rows,
                any_node,
            })
            .await
            .map_err(|s| rpc_error(addr, "SubscribeCatalog", s))?
            .into_inner();
        tracing::info!(upstream = %addr, from_seq = applied + 1, any_node, "subscribed to the upstream catalog");
        loop {
            let batch = match tokio::time::timeout(SILENCE, stream.message()).await {
                Err(_) => {
                    return Err(ReplicationError::Stream {
                        addr: addr.into(),
                        reason: StreamEnd::Silent(SILENCE),
                    })
                }
                Ok(Err(s)) => return Err(rpc_error(addr, "SubscribeCatalog", s)),
                Ok(Ok(None)) => {
                    return Err(ReplicationError::Stream {
                        addr: addr.into(),
                        reason: StreamEnd::Closed,
                    })
                }
                Ok(Ok(Some(b))) => b,
            };
            *progressed = true;
            self.status.contact(&batch, applied);
            if batch.rows.is_empty() {
                continue;
            }
            let mut versions = parse_rows(addr, &batch, applied)?;
            let Some(last) = versions.last() else {
                continue;
            };
            let (last_seq, last_commit) = (last.seq, last.commit_time_ms);
            if self.upstream_region.is_some() {
                // Versions that originated here came back from the new active region after a
                // failover: this catalog already has them.
                versions.retain(|v| v.v.region != self.region);
            }
            let started = Instant::now();
            // Garbage collection waits until these blobs are referenced (see `crate::blobs::gc`).
            let gc_shared = self.gc_lock.read().await;
            crate::blobs::gc::wait_term_applied(&self.raft)
                .await
                .map_err(|e| ReplicationError::Commit(e.message().to_string()))?;
            let (copied, restored) = self.copy_blobs(&mut fetch, addr, &versions).await?;
            let n = versions.len();
            self.raft
                .client_write(CatalogCommand::ApplyReplicated {
                    versions,
                    upstream_region: batch.region.clone(),
                    upstream_last_seq: batch.last_seq,
                    skip_through: last_seq,
                    restored,
                })
                .await
                .map_err(|e| ReplicationError::Commit(e.to_string()))?;
            drop(gc_shared);
            applied = last_seq;
            // Tell the upstream (synchronous acknowledgement of its agents' changes).
            let confirm = sub.confirm_applied(lifeboat_proto::ConfirmAppliedRequest {
                region: self.region.clone(),
                upstream_seq: applied,
            });
            if let Err(e) = tokio::time::timeout(Duration::from_secs(2), confirm).await {
                tracing::debug!(error = %e, "ConfirmApplied timed out");
            }
            self.status.applied(applied, last_commit);
            tracing::debug!(
                rows = n,
                blobs = copied,
                upstream_seq = applied,
                upstream_last_seq = batch.last_seq,
                ms = started.elapsed().as_millis() as u64,
                "replicated batch committed"
            );
        }
    }

    /// Fetches, verifies and stores the parts of `versions` the local store lacks (or that
    /// garbage collection condemned here), and waits until a majority of local voters holds
    /// them. Returns how many blobs were copied, and the condemned ones among them.
    async fn copy_blobs(
        &self,
        client: &mut BlobServiceClient<Channel>,
        addr: &str,
        versions: &[FileVersion],
    ) -> Result<(usize, Vec<BlobHash>), ReplicationError> {
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        let all: Vec<BlobHash> = versions
            .iter()
            .flat_map(|v| v.v.parts.iter().map(|p| p.hash))
            .filter(|h| seen.insert(*h))
            .collect();
        let condemned = self
            .catalog
            .condemned_among(&all)
            .map_err(|e| ReplicationError::Storage(e.to_string()))?;
        // Held here is enough only when a committed version references the blob (then it is
        // on a majority). A copy no version references (left by a batch that failed before its
        // copies finished) is sent to the local followers again from here.
        let refs = self
            .catalog
            .refcounts(&all)
            .map_err(|e| ReplicationError::Storage(e.to_string()))?;
        let mut local_only = Vec::new();
        for (h, n) in all.into_iter().zip(refs) {
            let here = !condemned.contains(&h)
                && self
                    .blobs
                    .store
                    .contains(&h)
                    .await
                    .map_err(|e| ReplicationError::Blobs(e.to_string()))?;
            match (here, n > 0) {
                (false, _) => missing.push(h),
                (true, false) => local_only.push(h),
                (true, true) => {}
            }
        }
        if missing.is_empty() && local_only.is_empty() {
            return Ok((0, condemned));
        }
        let session = self.blobs.start_replication();
        for h in &local_only {
            session.send(*h);
        }
        let fanout = session.fanout();
        let mut puts: JoinSet<Result<(), ReplicationError>> = JoinSet::new();
        for chunk in missing.chunks(FETCH_CHUNK) {
            let want: HashSet<BlobHash> = chunk.iter().copied().collect();
            let mut s = client
                .fetch_blobs(FetchBlobsRequest {
                    hashes: chunk.iter().map(BlobHash::to_hex).collect(),
                })
                .await
                .map_err(|e| rpc_error(addr, "FetchBlobs", e))?
                .into_inner();
            let mut got = HashSet::new();
            while let Some(b) = s
                .message()
                .await
                .map_err(|e| rpc_error(addr, "FetchBlobs", e))?
            {
                let invalid = |message: String| ReplicationError::Invalid {
                    addr: addr.to_string(),
                    message,
                };
                let h = BlobHash::from_hex(&b.hash).map_err(|e| invalid(e.to_string()))?;
                if !want.contains(&h) || !got.insert(h) {
                    return Err(invalid(format!("blob {h} was not asked for")));
                }
                while puts.len() >= MAX_PUTS_IN_FLIGHT {
                    if let Some(r) = puts.join_next().await {
                        r.map_err(|e| ReplicationError::Blobs(e.to_string()))??;
                    }
                }
                let (store, fanout, addr) =
                    (self.blobs.store.clone(), fanout.clone(), addr.to_string());
                puts.spawn(async move {
                    let stored = b.stored;
                    let stored = tokio::task::spawn_blocking(move || {
                        blob::decode(&h, &stored, lifeboat_common::PART_SIZE).map(|_| stored)
                    })
                    .await
                    .map_err(|e| ReplicationError::Blobs(e.to_string()))?
                    .map_err(|e| ReplicationError::Invalid {
                        addr,
                        message: e.to_string(),
                    })?;
                    store
                        .put(&h, stored)
                        .await
                        .map_err(|e| ReplicationError::Blobs(e.to_string()))?;
                    // Durable here: now copy it to the local followers.
                    for f in fanout {
                        let _ = f.send(h);
                    }
                    Ok(())
                });
            }
            if got.len() != want.len() {
                return Err(ReplicationError::Invalid {
                    addr: addr.to_string(),
                    message: format!("sent {} of {} blobs asked for", got.len(), want.len()),
                });
            }
        }
        while let Some(r) = puts.join_next().await {
            r.map_err(|e| ReplicationError::Blobs(e.to_string()))??;
        }
        // Every sender must be gone before `finish`, or the copies to followers never end.
        drop(fanout);
        session
            .finish(true)
            .await
            .map_err(|e| ReplicationError::Blobs(e.to_string()))?;
        Ok((missing.len(), condemned))
    }
}

/// Checks and converts a batch's rows above `applied`; sequence numbers must increase.
fn parse_rows(
    addr: &str,
    batch: &CatalogBatch,
    applied: u64,
) -> Result<Vec<FileVersion>, ReplicationError> {
    let invalid = |message: String| ReplicationError::Invalid {
        addr: addr.to_string(),
        message,
    };
    let mut out: Vec<FileVersion> = Vec::with_capacity(batch.rows.len());
    for r in &batch.rows {
        if r.seq <= applied {
            continue;
        }
        let fv = FileVersion::from_pb(r).map_err(|e| invalid(format!("row seq {}: {e}", r.seq)))?;
        if let Some(from) = &fv.v.rename_from {
            lifeboat_common::path::validate_rel_path(from)
                .map_err(|e| invalid(format!("row seq {}: rename_from: {e}", r.seq)))?;
        }
        if out.last().is_some_and(|p| p.seq >= fv.seq) {
            return Err(invalid(format!("row seq {} out of order", fv.seq)));
        }
        out.push(fv);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ReplicationConfig {
        ReplicationConfig {
            upstream: vec!["10.1.0.1:7101".into()],
            ..Default::default()
        }
    }

    #[test]
    fn state_follows_the_thresholds() {
        let c = cfg();
        assert_eq!(state_of(0, &c), "healthy");
        assert_eq!(state_of(4999, &c), "healthy");
        assert_eq!(state_of(5000, &c), "degraded");
        assert_eq!(state_of(29_999, &c), "degraded");
        assert_eq!(state_of(30_000, &c), "failed");
        assert_eq!(state_of(-5, &c), "healthy");
    }

    fn row(seq: u64, commit_time_ms: i64) -> lifeboat_proto::VersionRow {
        lifeboat_proto::VersionRow {
            seq,
            path: format!("data/f{seq}"),
            kind: lifeboat_common::catalog::EntryKind::Dir.to_pb(),
            commit_time_ms,
            ..Default::default()
        }
    }

    #[test]
    fn rows_are_checked_and_old_ones_skipped() {
        let mut b = CatalogBatch {
            rows: vec![row(3, 1), row(4, 2), row(6, 3)],
            last_seq: 6,
            ..Default::default()
        };
        let v = parse_rows("a:1", &b, 3).unwrap();
        assert_eq!(v.iter().map(|v| v.seq).collect::<Vec<_>>(), vec![4, 6]);
        b.rows.push(row(5, 4));
        assert!(parse_rows("a:1", &b, 0)
            .unwrap_err()
            .to_string()
            .contains("out of order"));
        b.rows = vec![row(7, 1)];
        b.rows[0].path = "../etc".into();
        assert!(matches!(
            parse_rows("a:1", &b, 0),
            Err(ReplicationError::Invalid { .. })
        ));
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_pending_change() {
        let st = ReplicationStatus::new(cfg());
        st.start();
        let now = lifeboat_common::now_ms();
        // Upstream clock 1 s ahead; seq 11 committed 3 s ago (upstream time) is pending.
        let batch = CatalogBatch {
            rows: vec![row(11, now + 1000 - 3000), row(12, now)],
            last_seq: 20,
            leader_time_ms: now + 1000,
            region: "a".into(),
            ..Default::default()
        };
        st.contact(&batch, 10);
        let l = st.live.lock();
        assert_eq!(l.oldest_pending_ms, Some(now - 2000));
        assert_eq!(l.upstream_last_seq, 20);
        let age = now + l.clock_offset_ms - l.oldest_pending_ms.unwrap();
        assert!((2900..=3100).contains(&age), "{age}");
        drop(l);
        // Caught up: no lag.
        st.applied(20, now);
        assert_eq!(st.live.lock().oldest_pending_ms, None);
        // A keepalive announcing more without rows: pending since now.
        st.contact(
            &CatalogBatch {
                last_seq: 25,
                leader_time_ms: now,
                ..Default::default()
            },
            20,
        );
        assert!(st.live.lock().pending_since.is_some());
    }

    #[test]
    fn lag_bytes_come_from_the_upstream_counters() {
        let st = ReplicationStatus::new(cfg());
        st.start();
        let mut rows = vec![row(11, 0), row(12, 0), row(13, 0)];
        rows[0].size = 100;
        rows[1].size = 50;
        rows[2].deleted = true;
        rows[2].size = 7; // a tombstone adds nothing
                          // Through seq 13 the upstream committed 1150 bytes, through seq 20 2000 bytes.
        st.contact(
            &CatalogBatch {
                rows,
                last_seq: 20,
                last_cum_bytes: 2000,
                rows_cum_bytes: 1150,
                ..Default::default()
            },
            10,
        );
        assert_eq!(st.live.lock().lag_bytes(10), 1000);
        st.applied(13, 0);
        assert_eq!(st.live.lock().lag_bytes(7), 850);
        assert_eq!(st.live.lock().lag_bytes(0), 0, "caught up: no lag");
    }
}
