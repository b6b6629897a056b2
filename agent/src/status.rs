//! Progress counters and `<data_dir>/status.json`, written atomically (temp file in the same
//! directory, fsync, rename). Tests and `lifeboat demo` poll it: `idle == true` means the initial
//! scan is done, nothing is dirty, no batch is in flight and the watcher holds no pending events,
//! i.e. everything seen so far is acknowledged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::files::watch::Activity;
use crate::push::SendCounters;

/// File name of the status file inside `data_dir`.
pub const STATUS_FILE: &str = "status.json";

/// Contents of `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's id.
    pub agent_id: String,
    /// Highest epoch seen.
    pub epoch: u64,
    /// Paths with acknowledged state.
    pub files_tracked: u64,
    /// Work items queued plus changes in flight.
    pub pending_changes: u64,
    /// Payload bytes (full + delta bodies) sent since the process started.
    pub bytes_sent: u64,
    /// Content bytes of parts sent whole since start (counted before compression: whole parts
    /// travel zstd-compressed as `encoded` bodies).
    pub payload_bytes_full: u64,
    /// Bytes of `delta` bodies sent since start.
    pub payload_bytes_delta: u64,
    /// Bytes of snapshot parts stored while the snapshot was spooled (`PutParts`), since start:
    /// those parts then travel as `reuse`, not in `payload_bytes_full`.
    #[serde(default)]
    pub bytes_preuploaded: u64,
    /// Changes acknowledged since start.
    pub changes_acked: u64,
    /// Batches acknowledged since start.
    pub batches_acked: u64,
    /// The initial scan of every root has been planned.
    pub scan_complete: bool,
    /// Scan complete, nothing dirty, nothing in flight, no pending watcher events.
    pub idle: bool,
    /// Last watcher event taken by the agent, ms since the Unix epoch (0 = none).
    pub last_event_ms: i64,
    /// Last acknowledgement, ms since the Unix epoch (0 = none).
    pub last_ack_ms: i64,
    /// `host:port` calls currently go to.
    pub leader: String,
    /// Warm standby: the lowest catalog sequence number applied by every `[[replicas]]` entry
    /// (0 without replicas).
    #[serde(default)]
    pub replica_applied_seq: u64,
    /// Warm standby: catalog rows known (newest sequence number the region's coordinators
    /// reported) but not yet applied, summed over replicas.
    #[serde(default)]
    pub replica_lag_entries: u64,
    /// Warm standby: rows refused since start (unsafe path, e.g. a symlink on the way), logged
    /// as errors and skipped.
    #[serde(default)]
    pub replica_refused: u64,
    /// Warm standby: catalog rows applied (files, directories, symlinks, tombstones written)
    /// since start, summed over replicas; counted once durable.
    #[serde(default)]
    pub replica_rows_applied: u64,
    /// Warm standby: file content bytes written since start, summed over replicas.
    #[serde(default)]
    pub replica_bytes_written: u64,
    /// Warm standby: apply rate of the last batch each replica applied (rows of the batch per
    /// second of wall time, fetching, writing, fsync and persisting included), summed over
    /// replicas; 0 before the first batch.
    #[serde(default)]
    pub replica_entries_per_s: u64,
    /// Role of every directory: catalog root name → `"source"` or `"replica"` (see
    /// `crate::roles`).
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, String>,
    /// Role switches completed since start (promotions and demotions).
    #[serde(default)]
    pub role_switches: u64,
    /// Local changes handed to the active region as conflicts since start.
    #[serde(default)]
    pub conflicts_kept: u64,
    /// Outcome of every `[[checks]]` entry at the last heartbeat (as sent to the coordinators),
    /// in config order; empty before the first heartbeat or without checks.
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// Every protected root and replica directory: health, problem, held deletions (see
    /// [`crate::files::guard`]).
    #[serde(default)]
    pub roots: Vec<crate::files::guard::RootStatus>,
    /// Mass deletions and root adoptions accepted by an operator since start (audit).
    #[serde(default)]
    pub accepted_deletions: Vec<crate::files::guard::AcceptedDeletions>,
    /// When this file was written, ms since the Unix epoch.
    pub updated_ms: i64,
}

/// One health check's outcome in `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// Check name.
    pub name: String,
    /// The check passed.
    pub ok: bool,
    /// What it saw (e.g. `primary: 127.0.0.1:6379 primary, ...` or the connection error).
    pub detail: String,
}

/// Live progress of one warm-standby replica.
#[derive(Debug, Default)]
pub struct ReplicaProgress {
    /// Last catalog sequence number durably applied.
    pub applied_seq: AtomicU64,
    /// Newest catalog sequence number the coordinators reported.
    pub known_seq: AtomicU64,
    /// Rows refused (unsafe path) since start.
    pub refused: AtomicU64,
    /// Rows applied since start (counted once durable).
    pub rows_applied: AtomicU64,
    /// File content bytes written since start.
    pub bytes_written: AtomicU64,
    /// Rows per second of the last batch applied (wall time).
    pub entries_per_s: AtomicU64,
    /// Name, directory and current problem of the replica directory (see
    /// [`crate::files::guard::replica_dir_ready`]); `problem` is `None` while healthy.
    pub dir: std::sync::Mutex<crate::files::guard::RootStatus>,
}

/// Live progress of the agent, shared by its tasks.
#[derive(Debug, Default)]
pub struct Progress {
    /// Highest epoch seen.
    pub epoch: AtomicU64,
    /// Paths with acknowledged state.
    pub files_tracked: AtomicU64,
    /// Work items queued plus changes in flight.
    pub pending_changes: AtomicU64,
    /// Payload bytes sent.
    pub sent: Arc<SendCounters>,
    /// Changes acknowledged since start.
    pub changes_acked: AtomicU64,
    /// Batches acknowledged since start.
    pub batches_acked: AtomicU64,
    /// Initial scan planned.
    pub scan_complete: AtomicBool,
    /// Work is queued or a batch is in flight.
    pub busy: AtomicBool,
    /// Last watcher event taken, ms since the Unix epoch.
    pub last_event_ms: AtomicI64,
    /// Last acknowledgement, ms since the Unix epoch.
    pub last_ack_ms: AtomicI64,
    /// One entry per `[[replicas]]` entry being applied.
    pub replicas: std::sync::Mutex<Vec<Arc<ReplicaProgress>>>,
    /// Role of every directory (catalog root name → `"source"` / `"replica"`).
    pub roles: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// Role switches completed since start.
    pub role_switches: AtomicU64,
    /// Local changes handed to the active region as conflicts since start.
    pub conflicts_kept: AtomicU64,
    /// Outcomes of the `[[checks]]` at the last heartbeat.
    pub checks: std::sync::Mutex<Vec<CheckStatus>>,
    /// Health of the `[[paths]]` roots (replicas report through [`ReplicaProgress::dir`]).
    pub roots: std::sync::Mutex<Vec<crate::files::guard::RootStatus>>,
    /// Accepted mass deletions (audit).
    pub accepted_deletions: std::sync::Mutex<Vec<crate::files::guard::AcceptedDeletions>>,
}

impl Progress {
    /// A snapshot for `status.json`. `activity` (if watching) and `quiet_ms` (how long raw
    /// events must have been quiet, ms) decide whether the watcher may still hold events.
    pub fn snapshot(
        &self,
        agent_id: &str,
        leader: String,
        activity: Option<&Activity>,
        quiet_ms: i64,
    ) -> Status {
        let now = lifeboat_common::now_ms();
        let full = self.sent.full.load(Ordering::Relaxed);
        let delta = self.sent.delta.load(Ordering::Relaxed);
        let scan_complete = self.scan_complete.load(Ordering::Relaxed);
        let watcher_quiet = activity.is_none_or(|a| {
            a.queued.load(Ordering::Relaxed) <= 0
                && now - a.last_raw_ms.load(Ordering::Relaxed) > quiet_ms
        });
        let (mut replica_applied_seq, mut replica_lag_entries, mut replica_refused) =
            (u64::MAX, 0, 0);
        let (mut replica_rows_applied, mut replica_bytes_written, mut replica_entries_per_s) =
            (0, 0, 0);
        for r in self
            .replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let applied = r.applied_seq.load(Ordering::Relaxed);
            replica_applied_seq = replica_applied_seq.min(applied);
            replica_lag_entries += r.known_seq.load(Ordering::Relaxed).saturating_sub(applied);
            replica_refused += r.refused.load(Ordering::Relaxed);
            replica_rows_applied += r.rows_applied.load(Ordering::Relaxed);
            replica_bytes_written += r.bytes_written.load(Ordering::Relaxed);
            replica_entries_per_s += r.entries_per_s.load(Ordering::Relaxed);
        }
        if replica_applied_seq == u64::MAX {
            replica_applied_seq = 0;
        }
        let roots = self.root_statuses();
        Status {
            agent_id: agent_id.to_string(),
            epoch: self.epoch.load(Ordering::Relaxed),
            files_tracked: self.files_tracked.load(Ordering::Relaxed),
            pending_changes: self.pending_changes.load(Ordering::Relaxed),
            bytes_sent: full + delta,
            payload_bytes_full: full,
            payload_bytes_delta: delta,
            bytes_preuploaded: self.sent.preuploaded.load(Ordering::Relaxed),
            changes_acked: self.changes_acked.load(Ordering::Relaxed),
            batches_acked: self.batches_acked.load(Ordering::Relaxed),
            scan_complete,
            idle: scan_complete && !self.busy.load(Ordering::Relaxed) && watcher_quiet,
            last_event_ms: self.last_event_ms.load(Ordering::Relaxed),
            last_ack_ms: self.last_ack_ms.load(Ordering::Relaxed),
            leader,
            replica_applied_seq,
            replica_lag_entries,
            replica_refused,
            replica_rows_applied,
            replica_bytes_written,
            replica_entries_per_s,
            roles: self.roles.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            role_switches: self.role_switches.load(Ordering::Relaxed),
            conflicts_kept: self.conflicts_kept.load(Ordering::Relaxed),
            checks: self
                .checks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            roots,
            accepted_deletions: self
                .accepted_deletions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            updated_ms: now,
        }
    }

    /// Every root's and replica directory's status, sources first.
    pub fn root_statuses(&self) -> Vec<crate::files::guard::RootStatus> {
        let mut out = self.roots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for r in self
            .replicas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let d = r.dir.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !d.name.is_empty() {
                out.push(d);
            }
        }
        out
    }

    /// The roots' health as heartbeat checks: `root:<name>` (a `[[paths]]` root) or
    /// `replica:<name>`, failing while the directory is missing or replaced; held deletions are
    /// reported in an ok check's detail (nothing is lost while they are held).
    pub fn root_checks(&self) -> Vec<lifeboat_proto::CheckResult> {
        self.root_statuses()
            .into_iter()
            .map(|r| {
                let detail = if !r.healthy {
                    r.problem.clone()
                } else if let Some(h) = &r.held {
                    format!(
                        "{} deletions held (hold {}): run `lifeboat-agent accept-deletions --root {}` to push them",
                        h.deletions, h.hold, r.name
                    )
                } else {
                    String::new()
                };
                let kind = if r.kind == "replica" { "replica" } else { "root" };
                lifeboat_proto::CheckResult {
                    name: format!("{kind}:{}", r.name),
                    ok: r.healthy,
                    detail,
                }
            })
            .collect()
    }
}

/// Writes `<dir>/status.json` atomically: temp file in `dir`, fsync, rename.
///
/// Errors: I/O errors.
pub fn write_atomic(dir: &Path, status: &Status) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{STATUS_FILE}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(STATUS_FILE))
}

/// Reads `<dir>/status.json`.
///
/// Errors: I/O errors, or `InvalidData` for malformed JSON.
pub fn read(dir: &Path) -> std::io::Result<Status> {
    let b = std::fs::read(dir.join(STATUS_FILE))?;
    serde_json::from_slice(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Path of the status file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATUS_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_and_fields() {
        let d = tempfile::tempdir().unwrap();
        let p = Progress::default();
        p.sent.full.store(10, Ordering::Relaxed);
        p.sent.delta.store(5, Ordering::Relaxed);
        p.scan_complete.store(true, Ordering::Relaxed);
        let s = p.snapshot("a1", "h:1".into(), None, 0);
        assert!(s.idle);
        assert_eq!(s.bytes_sent, 15);
        write_atomic(d.path(), &s).unwrap();
        assert_eq!(read(d.path()).unwrap(), s);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path(d.path())).unwrap()).unwrap();
        for k in [
            "agent_id",
            "epoch",
            "files_tracked",
            "pending_changes",
            "bytes_sent",
            "payload_bytes_full",
            "payload_bytes_delta",
            "changes_acked",
            "batches_acked",
            "scan_complete",
            "idle",
            "last_event_ms",
            "last_ack_ms",
            "leader",
            "replica_applied_seq",
            "replica_lag_entries",
            "replica_refused",
            "replica_rows_applied",
            "replica_bytes_written",
            "replica_entries_per_s",
            "updated_ms",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        let r = Arc::new(ReplicaProgress::default());
        r.applied_seq.store(7, Ordering::Relaxed);
        r.known_seq.store(10, Ordering::Relaxed);
        r.rows_applied.store(6, Ordering::Relaxed);
        r.bytes_written.store(600, Ordering::Relaxed);
        r.entries_per_s.store(120, Ordering::Relaxed);
        p.replicas.lock().unwrap().push(r);
        let s = p.snapshot("a1", String::new(), None, 0);
        assert_eq!((s.replica_applied_seq, s.replica_lag_entries), (7, 3));
        assert_eq!(
            (
                s.replica_rows_applied,
                s.replica_bytes_written,
                s.replica_entries_per_s
            ),
            (6, 600, 120)
        );
        // Busy or a recent raw event: not idle.
        p.busy.store(true, Ordering::Relaxed);
        assert!(!p.snapshot("a1", String::new(), None, 0).idle);
        p.busy.store(false, Ordering::Relaxed);
        let act = Activity::new(PathBuf::from("/nonexistent"));
        act.last_raw_ms
            .store(lifeboat_common::now_ms(), Ordering::Relaxed);
        assert!(!p.snapshot("a1", String::new(), Some(&act), 10_000).idle);
        // Only the final file is left behind.
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
