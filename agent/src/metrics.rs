//! `/metrics` of an agent (`metrics_addr` in the config; off when unset): one
//! `prometheus_client` collector that reads the agent's live [`Progress`] at scrape time
//! (queue, acknowledgements, replicas, checks, roots), the spool's size on disk, the
//! certificate's expiry, and the snapshot outcomes per source that the sources and the loop
//! record here ([`snapshot_failed`], [`snapshot_acked`]). Metric names are listed in
//! `deploy/README.md`. Layer: after `snapshot`, before `sources` (which record into it).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use lifeboat_common::metrics::prometheus_client::collector::Collector;
use lifeboat_common::metrics::prometheus_client::encoding::DescriptorEncoder;
use lifeboat_common::metrics::prometheus_client::registry::Registry;
use lifeboat_common::metrics::{ms_to_s, Emit, MetricsError};

use crate::config::Config;
use crate::status::Progress;

/// Snapshot outcomes of one source since the process started.
#[derive(Debug, Clone, Copy, Default)]
struct SourceOutcomes {
    /// Snapshots taken and then acknowledged (sidecar in the catalog).
    acked: u64,
    /// Snapshots that failed (nothing recorded).
    failed: u64,
    /// When the last acknowledged one was acknowledged, ms since the Unix epoch.
    last_ok_ms: u64,
}

static SNAPSHOTS: Mutex<BTreeMap<String, SourceOutcomes>> = Mutex::new(BTreeMap::new());

fn record(source: &str, f: impl FnOnce(&mut SourceOutcomes)) {
    let mut m = SNAPSHOTS.lock().unwrap_or_else(|p| p.into_inner());
    f(m.entry(source.to_string()).or_default());
}

/// Records a failed snapshot of `source` (nothing was recorded for it).
pub fn snapshot_failed(source: &str) {
    record(source, |o| o.failed += 1);
}

/// Records that a snapshot of `source` was acknowledged (its sidecar is in the catalog).
pub fn snapshot_acked(source: &str) {
    record(source, |o| {
        o.acked += 1;
        o.last_ok_ms = lifeboat_common::now_ms().max(0) as u64;
    });
}

/// Declares `source` (every configured one shows in `/metrics` from the start, at 0).
fn declare(source: &str) {
    record(source, |_| {});
}

/// Bytes of the regular files under `dir` (recursively; symlinks not followed); 0 if absent.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// The agent's collector.
struct AgentCollector {
    progress: Arc<Progress>,
    data_dir: PathBuf,
    cert_not_after_s: Option<i64>,
}

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCollector")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Collector for AgentCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let p = &self.progress;
        let mut e = Emit::new(enc);
        let spool = crate::snapshot::spool_dir(&self.data_dir);
        let trash = dir_bytes(&crate::snapshot::trash_dir(&self.data_dir));
        let spool_bytes = dir_bytes(&spool).saturating_sub(trash)
            + dir_bytes(&crate::snapshot::snapshots_dir(&self.data_dir));
        for (name, help, v) in [
            (
                "lifeboat_agent_queue_depth",
                "Changes queued or in flight, not yet acknowledged.",
                p.pending_changes.load(Relaxed),
            ),
            (
                "lifeboat_agent_spool_bytes",
                "Bytes of snapshots on local disk not yet acknowledged (spool and finished snapshots).",
                spool_bytes,
            ),
            (
                "lifeboat_agent_epoch",
                "Highest epoch this agent has seen.",
                p.epoch.load(Relaxed),
            ),
            (
                "lifeboat_agent_files_tracked",
                "Paths with acknowledged state.",
                p.files_tracked.load(Relaxed),
            ),
        ] {
            e.gauge(name, help, v as f64)?;
        }
        for (name, help, v) in [
            (
                "lifeboat_agent_batches_acked",
                "Batches acknowledged by the coordinators.",
                p.batches_acked.load(Relaxed),
            ),
            (
                "lifeboat_agent_changes_acked",
                "Changes acknowledged by the coordinators.",
                p.changes_acked.load(Relaxed),
            ),
        ] {
            e.counter(name, help, v)?;
        }
        e.counters(
            "lifeboat_agent_sent_bytes",
            "Payload bytes sent by kind: full (content of whole parts before compression), delta (delta bodies), preuploaded (snapshot parts stored while spooling).",
            "kind",
            [
                ("full".to_string(), p.sent.full.load(Relaxed)),
                ("delta".to_string(), p.sent.delta.load(Relaxed)),
                ("preuploaded".to_string(), p.sent.preuploaded.load(Relaxed)),
            ],
        )?;
        let last_ack = p.last_ack_ms.load(Relaxed);
        if last_ack > 0 {
            e.gauge(
                "lifeboat_agent_last_ack_timestamp_seconds",
                "When the last batch was acknowledged, seconds since the Unix epoch.",
                ms_to_s(last_ack as u64),
            )?;
        }
        let replicas = p.replicas.lock().map(|r| r.clone()).unwrap_or_default();
        if !replicas.is_empty() {
            e.gauge(
                "lifeboat_agent_replica_lag_entries",
                "Warm standby: catalog rows known but not yet applied, summed over replicas.",
                replicas
                    .iter()
                    .map(|r| {
                        r.known_seq
                            .load(Relaxed)
                            .saturating_sub(r.applied_seq.load(Relaxed))
                    })
                    .sum::<u64>() as f64,
            )?;
        }
        let checks = p.checks.lock().map(|c| c.clone()).unwrap_or_default();
        e.gauges(
            "lifeboat_agent_check_ok",
            "1 when the [[checks]] entry passed at the last heartbeat, else 0.",
            "check",
            checks
                .iter()
                .map(|c| (c.name.clone(), if c.ok { 1.0 } else { 0.0 })),
        )?;
        e.gauges(
            "lifeboat_agent_root_healthy",
            "1 when the protected root or replica directory is healthy (present, same identity, no held deletions), else 0.",
            "root",
            p.root_statuses()
                .iter()
                .map(|r| (r.name.clone(), if r.healthy { 1.0 } else { 0.0 })),
        )?;
        let snaps = SNAPSHOTS.lock().map(|m| m.clone()).unwrap_or_default();
        e.counters(
            "lifeboat_snapshot_acked",
            "Snapshots acknowledged (sidecar in the catalog) per source.",
            "source",
            snaps.iter().map(|(s, o)| (s.clone(), o.acked)),
        )?;
        e.counters(
            "lifeboat_snapshot_failures",
            "Snapshots that failed (nothing recorded) per source.",
            "source",
            snaps.iter().map(|(s, o)| (s.clone(), o.failed)),
        )?;
        e.gauges(
            "lifeboat_snapshot_last_success_timestamp_seconds",
            "When the source's last snapshot was acknowledged, seconds since the Unix epoch (absent before the first).",
            "source",
            snaps
                .iter()
                .filter(|(_, o)| o.last_ok_ms > 0)
                .map(|(s, o)| (s.clone(), ms_to_s(o.last_ok_ms))),
        )?;
        if let Some(t) = self.cert_not_after_s {
            e.gauge(
                "lifeboat_certificate_expiry_timestamp_seconds",
                "notAfter of this process's TLS certificate, seconds since the Unix epoch.",
                t as f64,
            )?;
        }
        Ok(())
    }
}

/// Starts the `/metrics` listener when `metrics_addr` is set; the task ends with the process.
///
/// Errors: a bad address, a bind failure, or an unreadable certificate.
pub async fn start(
    cfg: &Config,
    progress: Arc<Progress>,
) -> Result<Option<tokio::task::JoinHandle<()>>, MetricsError> {
    let Some(addr) = &cfg.metrics_addr else {
        return Ok(None);
    };
    let addr = lifeboat_common::metrics::parse_addr(addr)?;
    let cert_not_after_s = match (&cfg.tls.cert, cfg.tls.insecure) {
        (Some(p), false) => Some(lifeboat_common::metrics::cert_not_after(p)?),
        _ => None,
    };
    cfg.exec_sources.iter().for_each(|s| declare(&s.name));
    cfg.redis_sources.iter().for_each(|s| declare(&s.name));
    cfg.postgres_sources.iter().for_each(|s| declare(&s.name));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector {
        progress,
        data_dir: cfg.data_dir.clone(),
        cert_not_after_s,
    }));
    let (_, task) = lifeboat_common::metrics::serve(addr, Arc::new(registry)).await?;
    Ok(Some(task))
}
