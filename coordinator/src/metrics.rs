//! `/metrics` of a coordinator (`metrics_addr` in the config; off when unset): one
//! `prometheus_client` collector, [`CoordinatorCollector`], that reads the node's state at
//! scrape time (both Raft groups, the control record and the global leader's view, the lease,
//! replication, blob health, the certificate), plus the process counters in [`COUNTERS`] that
//! intake, GC and the blob store ([`MeteredStore`]) bump. Every metric is listed in
//! `deploy/README.md`; alert rules and the dashboard are in `deploy/prometheus/` and
//! `deploy/grafana/`.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::blob::BlobHash;
use lifeboat_common::blobstore::{BlobStore, BlobStoreError, ListedBlob};
use lifeboat_common::metrics::prometheus_client::collector::Collector;
use lifeboat_common::metrics::prometheus_client::encoding::DescriptorEncoder;
use lifeboat_common::metrics::prometheus_client::registry::Registry;
use lifeboat_common::metrics::{ms_to_s, Emit, Labels};
use openraft::ServerState;

use crate::blobs::repair::Repair;
use crate::config::CoordinatorConfig;
use crate::control::role::{now_ms, Role};
use crate::control::runtime::ControlRuntime;
use crate::intake::AgentTable;
use crate::raft::{Catalog, RaftHandle};
use crate::xregion::replication::ReplicationStatus;

/// Process-wide counters of a coordinator (monotonic since the process started).
#[derive(Debug, Default)]
pub struct Counters {
    /// Agent batches acknowledged (`PushChanges` answered with acks).
    pub batches_acked: AtomicU64,
    /// Changes (file versions) acknowledged.
    pub changes_acked: AtomicU64,
    /// File content bytes of the versions acknowledged (their sizes).
    pub bytes_acked: AtomicU64,
    /// Encoded bytes written to the blob store (`put` and `replace`).
    pub store_written_bytes: AtomicU64,
    /// Blob store errors by operation: put, get, delete, list (`NotFound` is not an error).
    pub store_errors: [AtomicU64; 4],
    /// Local blob copies that did not decode to their hash (corruption found on read).
    pub integrity_errors: AtomicU64,
    /// Stored bytes of the blob store at its last listing (by garbage collection); -1 before.
    pub store_listed_bytes: AtomicI64,
    /// Blobs in the store at its last listing; -1 before.
    pub store_listed_blobs: AtomicI64,
    /// Completed garbage collection passes (not dry runs).
    pub gc_runs_ok: AtomicU64,
    /// Failed garbage collection passes (a redirect to the leader is not counted).
    pub gc_runs_failed: AtomicU64,
    /// Bytes freed by garbage collection.
    pub gc_bytes_freed: AtomicU64,
    /// When the last completed pass ended, ms since the Unix epoch (0: none).
    pub gc_last_ok_ms: AtomicU64,
}

/// Help of `lifeboat_lease_remaining_seconds`.
const LEASE_HELP: &str = "Seconds until the active region's lease expires: side=grantor by the global leader's clock (on the global leader), side=holder by the active regional leader's own clock (on that leader); negative once expired.";

/// Names of the blob store operations of [`Counters::store_errors`], in order.
const STORE_OPS: [&str; 4] = ["put", "get", "delete", "list"];

/// The counters of this process.
pub static COUNTERS: Counters = Counters {
    batches_acked: AtomicU64::new(0),
    changes_acked: AtomicU64::new(0),
    bytes_acked: AtomicU64::new(0),
    store_written_bytes: AtomicU64::new(0),
    store_errors: [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ],
    integrity_errors: AtomicU64::new(0),
    store_listed_bytes: AtomicI64::new(-1),
    store_listed_blobs: AtomicI64::new(-1),
    gc_runs_ok: AtomicU64::new(0),
    gc_runs_failed: AtomicU64::new(0),
    gc_bytes_freed: AtomicU64::new(0),
    gc_last_ok_ms: AtomicU64::new(0),
};

impl Counters {
    /// One acknowledged batch of `changes` versions holding `bytes` bytes of content.
    pub fn acked(&self, changes: usize, bytes: u64) {
        self.batches_acked.fetch_add(1, Relaxed);
        self.changes_acked.fetch_add(changes as u64, Relaxed);
        self.bytes_acked.fetch_add(bytes, Relaxed);
    }

    /// The outcome of a garbage collection pass (dry runs are not counted).
    pub fn gc_pass(&self, dry_run: bool, r: &Result<crate::blobs::gc::GcReport, tonic::Status>) {
        match r {
            _ if dry_run => {}
            Ok(r) => {
                self.gc_runs_ok.fetch_add(1, Relaxed);
                self.gc_bytes_freed.fetch_add(r.bytes_freed, Relaxed);
                self.gc_last_ok_ms.store(now_ms(), Relaxed);
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {}
            Err(_) => {
                self.gc_runs_failed.fetch_add(1, Relaxed);
            }
        }
    }

    /// Counts a write of `n` bytes by its outcome and passes the outcome on.
    fn written(&self, n: u64, r: Result<(), BlobStoreError>) -> Result<(), BlobStoreError> {
        self.store_result(0, &r);
        if r.is_ok() {
            self.store_written_bytes.fetch_add(n, Relaxed);
        }
        r
    }

    fn store_result<T>(&self, op: usize, r: &Result<T, BlobStoreError>) {
        if let Err(e) = r {
            if !matches!(e, BlobStoreError::NotFound(_)) {
                self.store_errors[op].fetch_add(1, Relaxed);
            }
        }
    }
}

/// A blob store that counts written bytes, errors and the size of its last listing in
/// [`COUNTERS`] (wraps the configured store; behaviour unchanged).
pub struct MeteredStore(pub Arc<dyn BlobStore>);

#[async_trait::async_trait]
impl BlobStore for MeteredStore {
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let n = stored.len() as u64;
        COUNTERS.written(n, self.0.put(hash, stored).await)
    }

    async fn replace(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let n = stored.len() as u64;
        COUNTERS.written(n, self.0.replace(hash, stored).await)
    }

    async fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobStoreError> {
        let r = self.0.get(hash).await;
        COUNTERS.store_result(1, &r);
        r
    }

    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError> {
        let r = self.0.contains(hash).await;
        COUNTERS.store_result(1, &r);
        r
    }

    async fn list(&self) -> Result<Vec<ListedBlob>, BlobStoreError> {
        let r = self.0.list().await;
        COUNTERS.store_result(3, &r);
        if let Ok(l) = &r {
            let bytes: u64 = l.iter().map(|b| b.stored_bytes).sum();
            COUNTERS
                .store_listed_bytes
                .store(bytes.min(i64::MAX as u64) as i64, Relaxed);
            COUNTERS.store_listed_blobs.store(l.len() as i64, Relaxed);
        }
        r
    }

    async fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError> {
        let r = self.0.delete(hash).await;
        COUNTERS.store_result(2, &r);
        r
    }

    async fn put_keeping(
        &self,
        hash: &BlobHash,
        stored: Vec<u8>,
        keep: lifeboat_common::blobstore::KeepExisting,
    ) -> Result<(), BlobStoreError> {
        let n = stored.len() as u64;
        COUNTERS.written(n, self.0.put_keeping(hash, stored, keep).await)
    }

    async fn read_prefix(&self, hash: &BlobHash, len: usize) -> Result<Vec<u8>, BlobStoreError> {
        let r = self.0.read_prefix(hash, len).await;
        COUNTERS.store_result(1, &r);
        r
    }

    async fn put_aux(&self, name: &str, data: Vec<u8>) -> Result<(), BlobStoreError> {
        self.0.put_aux(name, data).await
    }

    async fn get_aux(&self, name: &str) -> Result<Option<Vec<u8>>, BlobStoreError> {
        self.0.get_aux(name).await
    }

    async fn list_aux(&self, dir: &str) -> Result<Vec<String>, BlobStoreError> {
        self.0.list_aux(dir).await
    }

    fn is_shared(&self) -> bool {
        self.0.is_shared()
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

/// What the collector reads at each scrape.
pub struct Sources {
    /// This node's region (the witness's site name on the witness).
    pub region: String,
    /// This node is the witness (no regional group).
    pub witness: bool,
    /// Regional Raft.
    pub raft: RaftHandle,
    /// Global Raft (with `[global]`).
    pub global: Option<RaftHandle>,
    /// Control runtime (with `[global]`).
    pub control: Option<Arc<ControlRuntime>>,
    /// This region's role and lease.
    pub role: Arc<Role>,
    /// Standby replication progress.
    pub replication: ReplicationStatus,
    /// `[replication] lag_degraded_ms`: the lag budget, ms.
    pub lag_budget_ms: u64,
    /// Catalog.
    pub catalog: Catalog,
    /// Blob health of this node.
    pub repair: Repair,
    /// Agents' heartbeats.
    pub agents: AgentTable,
    /// `notAfter` of this node's certificate, s since the Unix epoch (None: no TLS).
    pub cert_not_after_s: Option<i64>,
}

/// The coordinator's collector (see the module doc).
pub struct CoordinatorCollector(Sources);

impl fmt::Debug for CoordinatorCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorCollector")
            .field("region", &self.0.region)
            .finish_non_exhaustive()
    }
}

fn bool_f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The Raft metrics of this node in each group: labels `group` (`region` or `global`) and
/// `region` (this node's region).
fn raft_metrics(e: &mut Emit, region: &str, groups: &[(&str, &RaftHandle)]) -> fmt::Result {
    type M = openraft::RaftMetrics<u64, openraft::BasicNode>;
    let ms: Vec<(&str, M)> = groups
        .iter()
        .map(|(g, r)| (*g, r.metrics().borrow().clone()))
        .collect();
    let each = |f: &dyn Fn(&M) -> Option<f64>| -> Vec<(Labels, f64)> {
        ms.iter()
            .filter_map(|(g, m)| {
                let labels = vec![
                    ("group".to_string(), g.to_string()),
                    ("region".to_string(), region.to_string()),
                ];
                f(m).map(|v| (labels, v))
            })
            .collect()
    };
    e.gauge_family(
        "lifeboat_raft_term",
        "Current Raft term of this node, per group (region or global).",
        each(&|m| Some(m.current_term as f64)),
    )?;
    e.gauge_family(
        "lifeboat_raft_leader_id",
        "Node id of the Raft leader this node knows, per group; 0 when it knows none (no quorum, or an election running).",
        each(&|m| Some(m.current_leader.unwrap_or(0) as f64)),
    )?;
    e.gauge_family(
        "lifeboat_raft_is_leader",
        "1 when this node is the Raft leader of the group, else 0.",
        each(&|m| Some(bool_f(m.state == ServerState::Leader))),
    )?;
    e.gauge_family(
        "lifeboat_raft_commit_index",
        "Highest Raft log index committed and applied on this node, per group (openraft 0.9 reports the applied index; the committed index is at least this).",
        each(&|m| Some(m.last_applied.map(|l| l.index).unwrap_or(0) as f64)),
    )?;
    e.gauge_family(
        "lifeboat_raft_last_log_index",
        "Highest Raft log index stored on this node, per group.",
        each(&|m| Some(m.last_log_index.unwrap_or(0) as f64)),
    )?;
    e.gauge_family(
        "lifeboat_raft_quorum_ack_age_seconds",
        "On the leader: seconds since a quorum last acknowledged it, per group (absent on followers).",
        each(&|m| m.millis_since_quorum_ack.map(|x| x as f64 / 1000.0)),
    )
}

impl Collector for CoordinatorCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let mut e = Emit::new(enc);
        let now = now_ms();
        let mut groups: Vec<(&str, &RaftHandle)> = Vec::new();
        if !s.witness {
            groups.push(("region", &s.raft));
        }
        if let Some(g) = &s.global {
            groups.push(("global", g));
        }
        raft_metrics(&mut e, &s.region, &groups)?;

        // The control record: committed on every global member; the static role without one.
        let view = s.role.view();
        let cm = s.control.as_ref().map(|c| c.metrics());
        let (active, epoch, regions) = match &cm {
            Some(c) => (
                c.active_region.clone().unwrap_or_default(),
                c.epoch,
                c.regions.clone(),
            ),
            None => (
                view.active_region.clone(),
                view.epoch,
                vec![s.region.clone()],
            ),
        };
        let mut all: Vec<String> = regions.clone();
        if !active.is_empty() && !all.contains(&active) {
            all.push(active.clone());
        }
        if !active.is_empty() {
            e.gauges(
                "lifeboat_active_region",
                "1 for the region the committed control record names active (the failover target while failing over), 0 for the others.",
                "region",
                all.iter().map(|r| (r.clone(), bool_f(*r == active))),
            )?;
            e.gauge(
                "lifeboat_epoch",
                "Epoch (fencing token) of the committed control record; bumped by every failover and switchover.",
                epoch as f64,
            )?;
        }
        let mut lease: Vec<(String, f64)> = Vec::new();
        if let Some(c) = &cm {
            if !c.phase.is_empty() {
                e.gauges(
                    "lifeboat_control_phase",
                    "1 for the committed phase of the control record (active, suspect, failing-over), 0 for the others.",
                    "phase",
                    ["active", "suspect", "failing-over"]
                        .iter()
                        .map(|p| (p.to_string(), bool_f(*p == c.phase))),
                )?;
            }
            e.gauge(
                "lifeboat_rpo_budget_seconds",
                "RPO budget of the failover policy, seconds.",
                ms_to_s(c.rpo_budget_ms),
            )?;
            if let Some(rto) = c.last_rto_ms {
                e.gauge(
                    "lifeboat_last_failover_rto_seconds",
                    "Measured RTO of the last completed failover or switchover, seconds (detection start or command until the new region took writes).",
                    ms_to_s(rto),
                )?;
            }
            if let Some(at) = c.last_failover_at_ms {
                e.gauge(
                    "lifeboat_last_failover_timestamp_seconds",
                    "When the last failover or switchover completed, seconds since the Unix epoch.",
                    ms_to_s(at),
                )?;
            }
            e.gauge(
                "lifeboat_sync_degraded",
                "1 when the active region's synchronous replication is recorded degraded (acknowledging without a standby's confirmation) at the current epoch.",
                bool_f(c.sync_degraded),
            )?;
            if let Some(l) = &c.leader {
                lease.push((
                    "grantor".to_string(),
                    (l.lease_expiry_ms as f64 - now as f64) / 1000.0,
                ));
                e.gauges(
                    "lifeboat_region_healthy",
                    "Global leader's view: 1 when the region's leader reports it healthy (and the active region renews its lease), else 0.",
                    "region",
                    l.regions
                        .iter()
                        .map(|r| (r.region.clone(), bool_f(r.healthy))),
                )?;
                e.gauges(
                    "lifeboat_expected_rpo_seconds",
                    "Global leader's view: acknowledged changes (in seconds) that would be lost if this standby region were promoted now.",
                    "region",
                    l.regions.iter().filter_map(|r| {
                        r.expected_rpo_ms.map(|x| (r.region.clone(), ms_to_s(x)))
                    }),
                )?;
                e.gauges(
                    "lifeboat_region_report_age_seconds",
                    "Global leader's view: seconds since the region's leader last reported.",
                    "region",
                    l.regions
                        .iter()
                        .filter_map(|r| r.report_age_ms.map(|x| (r.region.clone(), ms_to_s(x)))),
                )?;
            }
        }

        if s.witness {
            e.gauges(
                "lifeboat_lease_remaining_seconds",
                LEASE_HELP,
                "side",
                lease,
            )?;
            return cert(&mut e, s.cert_not_after_s);
        }
        let leading = s.raft.metrics().borrow().state == ServerState::Leader;
        let rl = |v: f64| [(s.region.clone(), v)];
        if leading && !view.active_region.is_empty() && view.active_region == s.region {
            if let Some(until) = view.lease.valid_until_ms() {
                lease.push(("holder".to_string(), (until as f64 - now as f64) / 1000.0));
            }
        }
        e.gauges(
            "lifeboat_lease_remaining_seconds",
            LEASE_HELP,
            "side",
            lease,
        )?;
        if leading && s.role.is_standby() {
            if let Ok(r) = s.replication.report(&s.catalog) {
                e.gauges(
                    "lifeboat_replication_lag_seconds",
                    "On a standby region's leader: age of the oldest upstream change not yet applied, seconds.",
                    "region",
                    rl(r.lag_ms.max(0) as f64 / 1000.0),
                )?;
                e.gauges(
                    "lifeboat_replication_lag_bytes",
                    "On a standby region's leader: content bytes committed upstream and not yet applied.",
                    "region",
                    rl(r.lag_bytes as f64),
                )?;
                e.gauges(
                    "lifeboat_replication_lag_entries",
                    "On a standby region's leader: catalog rows committed upstream and not yet applied.",
                    "region",
                    rl(r.lag_entries as f64),
                )?;
                e.gauges(
                    "lifeboat_replication_lag_budget_seconds",
                    "[replication] lag_degraded_ms of this standby region, seconds: the lag budget.",
                    "region",
                    rl(ms_to_s(s.lag_budget_ms)),
                )?;
            }
        }
        let (last_seq, cum_bytes) = s.catalog.last_seq_and_bytes().unwrap_or((0, 0));
        let agents = s
            .agents
            .lock()
            .values()
            .filter(|(t, _)| t.elapsed() < Duration::from_secs(5))
            .count() as u64;
        let h = s.repair.health(false);
        let c = &COUNTERS;
        for (name, help, v) in [
            (
                "lifeboat_catalog_last_seq",
                "Newest catalog sequence number applied on this node.",
                last_seq,
            ),
            (
                "lifeboat_agents_connected",
                "Agents whose heartbeat reached this node in the last 5 s (the leader's view).",
                agents,
            ),
            (
                "lifeboat_blobs_referenced",
                "Blobs the catalog references, at this node's last repair scan.",
                h.referenced,
            ),
            (
                "lifeboat_blobs_missing",
                "Referenced blobs missing or unreadable in this node's store at its last repair scan.",
                h.missing,
            ),
        ] {
            e.gauge(name, help, v as f64)?;
        }
        for (name, help, v) in [
            (
                "lifeboat_catalog_committed_bytes",
                "Content bytes of every version committed to the catalog (cumulative, replicated rows included).",
                cum_bytes,
            ),
            (
                "lifeboat_batches_acked",
                "Agent batches acknowledged by this node (as regional leader).",
                c.batches_acked.load(Relaxed),
            ),
            (
                "lifeboat_changes_acked",
                "File versions acknowledged to agents by this node.",
                c.changes_acked.load(Relaxed),
            ),
            (
                "lifeboat_acked_bytes",
                "Content bytes of the file versions acknowledged to agents by this node.",
                c.bytes_acked.load(Relaxed),
            ),
            (
                "lifeboat_blobstore_written_bytes",
                "Encoded bytes written to this node's blob store.",
                c.store_written_bytes.load(Relaxed),
            ),
            (
                "lifeboat_blob_integrity_errors",
                "Local blob copies found corrupted (not decoding to their hash) on read.",
                c.integrity_errors.load(Relaxed),
            ),
            (
                "lifeboat_blobs_repaired",
                "Blobs this node's repair loop restored from a peer.",
                h.repaired,
            ),
            (
                "lifeboat_gc_freed_bytes",
                "Bytes freed by garbage collection on this node.",
                c.gc_bytes_freed.load(Relaxed),
            ),
        ] {
            e.counter(name, help, v)?;
        }
        e.counters(
            "lifeboat_blobstore_errors",
            "Blob store errors by operation (put, get, delete, list).",
            "op",
            STORE_OPS
                .iter()
                .zip(&c.store_errors)
                .map(|(op, n)| (op.to_string(), n.load(Relaxed))),
        )?;
        e.counters(
            "lifeboat_gc_runs",
            "Garbage collection passes on this node by outcome (ok, failed).",
            "outcome",
            [
                ("ok".to_string(), c.gc_runs_ok.load(Relaxed)),
                ("failed".to_string(), c.gc_runs_failed.load(Relaxed)),
            ],
        )?;
        let listed = c.store_listed_bytes.load(Relaxed);
        if listed >= 0 {
            e.gauge(
                "lifeboat_blobstore_stored_bytes",
                "Stored bytes in the blob store at its last listing (by garbage collection).",
                listed as f64,
            )?;
            e.gauge(
                "lifeboat_blobstore_blobs",
                "Blobs in the blob store at its last listing (by garbage collection).",
                c.store_listed_blobs.load(Relaxed) as f64,
            )?;
        }
        let gc_last = c.gc_last_ok_ms.load(Relaxed);
        if gc_last > 0 {
            e.gauge(
                "lifeboat_gc_last_success_timestamp_seconds",
                "When the last garbage collection pass on this node completed, seconds since the Unix epoch.",
                ms_to_s(gc_last),
            )?;
        }
        cert(&mut e, s.cert_not_after_s)
    }
}

fn cert(e: &mut Emit, not_after: Option<i64>) -> fmt::Result {
    match not_after {
        Some(t) => e.gauge(
            "lifeboat_certificate_expiry_timestamp_seconds",
            "notAfter of this process's TLS certificate, seconds since the Unix epoch.",
            t as f64,
        ),
        None => Ok(()),
    }
}

/// Starts the `/metrics` listener when `metrics_addr` is set.
///
/// Errors: a bad address, a bind failure, or an unreadable certificate.
pub async fn start(
    cfg: &CoordinatorConfig,
    mut sources: Sources,
) -> Result<Option<tokio::task::JoinHandle<()>>, lifeboat_common::metrics::MetricsError> {
    let Some(addr) = &cfg.metrics_addr else {
        return Ok(None);
    };
    let addr = lifeboat_common::metrics::parse_addr(addr)?;
    sources.cert_not_after_s = match (&cfg.tls.cert, cfg.tls.insecure) {
        (Some(p), false) => Some(lifeboat_common::metrics::cert_not_after(p)?),
        _ => None,
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CoordinatorCollector(sources)));
    let (_, task) = lifeboat_common::metrics::serve(addr, Arc::new(registry)).await?;
    Ok(Some(task))
}
