//! Warm standby (DESIGN.md 3.4, last step): keeps each `[[replicas]]` directory equal to the
//! region's catalog under `"<name>/"`.
//!
//! One task per replica subscribes (`ReplicationService.SubscribeCatalog`, `follow = true`) to
//! the agent's own region's coordinators from the last sequence number it applied (persisted in
//! the agent's redb state), following the leader redirect ([`crate::push::classify`],
//! [`Coordinators`]) and rotating through the configured addresses with a backoff of 100 ms
//! doubling to 5 s on other failures. Every path sees its rows in sequence order: file rows
//! whose paths are distinct (none inside another) are written together, [`APPLY_CONCURRENCY`]
//! at once; a row whose path is, contains or lies inside one of theirs (a directory being
//! created excepted: creating parents is idempotent) waits until they are written; other rows
//! (directories, symlinks, tombstones) are applied at once, one by one:
//!
//! - a file: its blobs fetched with `BlobService.FetchBlobs` from the same coordinator, each
//!   verified, the whole file verified, written to a temp file in the destination directory,
//!   fsync'd with mode and mtime, renamed into place ([`lifeboat_common::apply::write_file`]);
//! - a directory: created (a non-directory in the way is replaced), mode and mtime set; the
//!   mode and mtime are recorded (persisted) and set again at the end of every batch that
//!   writes inside the directory, so its mtime stays the source's, as after a restore;
//! - a symlink: created as a link (an existing entry is replaced, never followed), with the
//!   link's own mtime;
//! - a tombstone: the entry removed (a symlink is unlinked, never followed); a directory only
//!   once empty: a directory tombstone applied while children remain is kept pending (persisted)
//!   and retried after every batch, so children tombstones later in the catalog empty it first.
//!
//! Every path goes through [`lifeboat_common::path::safe_join`]: a row whose path is unsafe (e.g.
//! a symlink planted on the way) is refused with an error logged and skipped (counted in
//! `replica_refused`); nothing is written outside the replica directory. Other failures (RPC,
//! verification, I/O) restart the subscription from the last applied sequence number.
//!
//! **Invariant**: the applied sequence number is persisted only after every row up to it is
//! durably applied (files fsync'd before the rename, touched directories and their ancestors
//! fsync'd after). Progress (rows, bytes, rows per second of the last batch) is in
//! [`ReplicaProgress`] (`status.json`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use futures::StreamExt;
use lifeboat_common::apply::{self, ApplyError, BlobClient};
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_common::path::safe_join;
use lifeboat_common::tls::TlsConfig;
use lifeboat_common::MAX_MESSAGE_BYTES;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::replication_service_client::ReplicationServiceClient;
use lifeboat_proto::SubscribeRequest;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::config::ReplicaConfig;
use crate::files::state::{AckedChange, EntryState, StateDb};
use crate::push::{classify, Coordinators, PushError};
use crate::status::ReplicaProgress;

/// Seconds between two looks for local changes in a replica that follows the active region.
pub const LOCAL_CHECK: Duration = Duration::from_secs(3);

/// Looks for local changes in a replica that follows the active region and hands them to the
/// active region as conflicts ([`crate::roles::keep_local_changes`]), between batches.
#[derive(Clone)]
pub struct Watchdog {
    /// The agent's configuration as written.
    pub cfg: Arc<crate::Config>,
    /// The newest order of the control record (from the heartbeat replies).
    pub order: watch::Receiver<Option<crate::roles::Order>>,
    /// Content bytes per part.
    pub part_size: usize,
    /// Counters (`conflicts_kept`).
    pub progress: Arc<crate::status::Progress>,
}

/// What a [`Replica`] task applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every version under `"<name>/"`: a warm-standby directory.
    Replica,
    /// Only versions committed by `lifeboat resolve` (agent id
    /// [`lifeboat_common::catalog::RESOLVE_AGENT_ID`]) into a *source* directory, and only when
    /// newer than what this agent acknowledged for the path while the file on disk is still
    /// that acknowledged version (a local change made since wins and is pushed as usual).
    Resolved,
}

/// The acknowledged state matching an applied version (no signatures: the next change of the
/// file is sent full, later ones as deltas).
pub fn entry_of(v: &FileVersion) -> EntryState {
    EntryState {
        kind: v.v.kind,
        size: v.v.size,
        mode: v.v.mode,
        mtime_ns: v.v.mtime_ns,
        blake3: v.v.blake3,
        parts: v.v.parts.clone(),
        symlink_target: v.v.symlink_target.clone(),
        seq: v.seq,
    }
}

/// The state record of an applied version.
fn acked_of(v: &FileVersion) -> AckedChange {
    if v.v.deleted {
        AckedChange::Delete {
            path: v.v.path.clone(),
        }
    } else {
        AckedChange::Upsert {
            path: v.v.path.clone(),
            entry: entry_of(v),
            signatures: Vec::new(),
        }
    }
}

/// Prefix of the temp files written next to their destination.
pub const TEMP_PREFIX: &str = ".lifeboat-replica-";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a subscription session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Push(#[from] PushError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    State(#[from] crate::files::state::StateError),
    #[error("{0}")]
    Other(String),
}

/// One replica being kept up to date.
pub struct Replica {
    cfg: ReplicaConfig,
    tls: TlsConfig,
    coordinators: Coordinators,
    channels: HashMap<String, Channel>,
    state: Arc<StateDb>,
    progress: Arc<ReplicaProgress>,
    root: PathBuf,
    applied: u64,
    pending_rmdirs: BTreeSet<String>,
    mode: Mode,
    /// Record applied versions as acknowledged state (directories that follow the active
    /// region: a later promotion re-sends nothing).
    record: bool,
    watchdog: Option<Watchdog>,
    last_check: Option<Instant>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("name", &self.cfg.name)
            .field("path", &self.cfg.path)
            .field("applied", &self.applied)
            .finish()
    }
}

/// The directory holding `rel` (fsync'd once the batch is applied).
fn parent_of(root: &Path, rel: &str) -> PathBuf {
    match rel.rsplit_once('/') {
        Some((parent, _)) => root.join(parent),
        None => root.to_path_buf(),
    }
}

fn is_unsafe_path(e: &ApplyError) -> bool {
    matches!(e, ApplyError::Path(_))
}

/// Files of one batch written at the same time, at most (distinct paths, see [`FileGroup`]):
/// as many as a restore writes.
pub const APPLY_CONCURRENCY: usize = lifeboat_common::apply::WRITERS;

/// Rows a group of files holds before it is written.
const GROUP_ROWS: usize = 256;

/// What a batch applied so far, recorded when it is persisted.
#[derive(Default)]
struct Applied {
    /// Directories whose entries changed (absolute paths), fsync'd before the seq is recorded.
    touched: BTreeSet<PathBuf>,
    /// Versions to record as acknowledged state (`record` only).
    acked: Vec<AckedChange>,
    /// Relative path (`""`: the replica directory) → `(mode, mtime_ns)` of the directory row
    /// applied there, `None` where a non-directory row or a directory tombstone was.
    dirs: HashMap<String, Option<(u32, i64)>>,
    /// Rows applied.
    rows: u64,
    /// File content bytes written.
    bytes: u64,
}

impl Applied {
    /// Counts applied version `v` (`bytes` of content written), acknowledged if `record`.
    fn applied(&mut self, v: &FileVersion, record: bool, bytes: u64) {
        self.rows += 1;
        self.bytes += bytes;
        if record {
            self.acked.push(acked_of(v));
        }
    }
}

/// Consecutive file rows of a batch written concurrently: their paths are distinct and none
/// lies inside another (so no two writes touch the same entry, and their order does not
/// matter).
#[derive(Default)]
struct FileGroup {
    rows: Vec<(FileVersion, String)>,
    paths: std::collections::HashSet<String>,
    /// Every proper ancestor of a path in `paths`.
    ancestors: std::collections::HashSet<String>,
}

impl FileGroup {
    /// Whether a row at `rel` must wait for the group: `rel` is, contains or lies inside a
    /// path of the group. A directory being created (`mkdir`) may contain paths of the group:
    /// creating it is idempotent, like the creation of the parents of every file, and its mode
    /// and mtime are set again once the batch is written.
    fn conflicts(&self, rel: &str, mkdir: bool) -> bool {
        self.paths.contains(rel)
            || (!mkdir && self.ancestors.contains(rel))
            || ancestors(rel).any(|a| self.paths.contains(a))
    }

    fn push(&mut self, v: FileVersion, rel: String) {
        for a in ancestors(&rel) {
            if !self.ancestors.insert(a.to_string()) {
                break;
            }
        }
        self.paths.insert(rel.clone());
        self.rows.push((v, rel));
    }
}

/// The proper ancestors of relative path `rel`, nearest first (`a/b/c` → `a/b`, `a`).
fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    let mut cur = rel;
    std::iter::from_fn(move || {
        let (parent, _) = cur.rsplit_once('/')?;
        cur = parent;
        Some(parent)
    })
}

/// Sets mode and mtime of directory `rel` under `root` (`""`: `root` itself) unless it already
/// has them; nothing if no directory is there any more.
fn reset_dir_meta(root: &Path, rel: &str, mode: u32, mtime_ns: i64) -> Result<(), ApplyError> {
    use std::os::unix::fs::PermissionsExt;
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        safe_join(root, rel, false)?
    };
    let Ok(md) = std::fs::symlink_metadata(&p) else {
        return Ok(());
    };
    if !md.is_dir()
        || (md.permissions().mode() & 0o7777 == mode & 0o7777
            && crate::files::scan::mtime_ns(&md) == mtime_ns)
    {
        return Ok(());
    }
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(
        |error| ApplyError::Io {
            context: format!("chmod {}", p.display()),
            error,
        },
    )?;
    if let Ok(f) = std::fs::File::open(&p) {
        let _ = f.set_modified(apply::mtime(mtime_ns));
    }
    Ok(())
}

impl Replica {
    /// A replica task for `cfg`, talking to `coordinators` with `tls`.
    pub fn new(
        cfg: ReplicaConfig,
        tls: TlsConfig,
        coordinators: Vec<String>,
        state: Arc<StateDb>,
        progress: Arc<ReplicaProgress>,
    ) -> Replica {
        Replica {
            root: cfg.path.clone(),
            cfg,
            tls,
            coordinators: Coordinators::new(coordinators),
            channels: HashMap::new(),
            state,
            progress,
            applied: 0,
            pending_rmdirs: BTreeSet::new(),
            mode: Mode::Replica,
            record: false,
            watchdog: None,
            last_check: None,
        }
    }

    /// Hands local changes to the active region between batches (see [`Watchdog`]).
    pub fn watching(mut self, w: Option<Watchdog>) -> Replica {
        self.watchdog = w;
        self
    }

    /// Runs the [`Watchdog`] when due; failures are logged (the changes stay and are tried
    /// again).
    async fn check_local(&mut self) {
        let Some(w) = &self.watchdog else { return };
        if self.last_check.is_some_and(|t| t.elapsed() < LOCAL_CHECK) {
            return;
        }
        self.last_check = Some(Instant::now());
        let Some(order) = w.order.borrow().clone() else {
            return;
        };
        match crate::roles::keep_local_changes(
            &w.cfg,
            &self.state,
            &self.cfg.name,
            &order,
            w.part_size,
        )
        .await
        {
            Ok(0) => {}
            Ok(n) => {
                w.progress.conflicts_kept.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(replica = %self.cfg.name, error = %e, "cannot hand local changes to the active region yet; they stay and are tried again")
            }
        }
    }

    /// A follower of the `lifeboat resolve` versions for source directory `name` at `path`
    /// ([`Mode::Resolved`]); its progress is kept apart from a replica's.
    pub fn resolved(
        name: &str,
        path: PathBuf,
        tls: TlsConfig,
        coordinators: Vec<String>,
        state: Arc<StateDb>,
    ) -> Replica {
        let mut r = Replica::new(
            ReplicaConfig {
                name: name.to_string(),
                path,
                follow_active: true,
            },
            tls,
            coordinators,
            state,
            Arc::new(ReplicaProgress::default()),
        );
        r.mode = Mode::Resolved;
        r.record = true;
        r
    }

    /// Records applied versions as acknowledged state too (see [`crate::roles`]).
    pub fn recording(mut self, record: bool) -> Replica {
        self.record = record;
        self
    }

    /// Key of this task's progress in the state (`/` cannot occur in a root name).
    fn state_key(&self) -> String {
        match self.mode {
            Mode::Replica => self.cfg.name.clone(),
            Mode::Resolved => format!("/resolved/{}", self.cfg.name),
        }
    }

    /// Applies every version committed so far (the stream without `follow`), then returns.
    ///
    /// Errors: the first failure (nothing is lost: progress is persisted batch by batch).
    pub async fn catch_up(&mut self) -> Result<(), String> {
        loop {
            match self.session(false).await {
                Ok(()) => return Ok(()),
                Err(SessionError::Push(PushError::NotLeader { leader })) => {
                    if !self.coordinators.redirect(&leader) {
                        return Err(format!("not the leader; leader is {leader}"));
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn channel(&mut self, addr: &str) -> Result<Channel, PushError> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let c = self.tls.channel(addr)?;
        self.channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Runs until `stop` carries a deadline.
    pub async fn run(mut self, mut stop: watch::Receiver<Option<Instant>>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let res = tokio::select! {
                r = self.session(true) => r,
                _ = stop.wait_for(|d| d.is_some()) => return,
            };
            let wait = match res {
                Ok(()) => BACKOFF_MIN,
                Err(SessionError::Push(PushError::NotLeader { leader })) => {
                    self.coordinators.redirect(&leader);
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Err(e) => {
                    let addr = self.coordinators.current();
                    tracing::warn!(replica = %self.cfg.name, coordinator = %addr, error = %e, retry_in_ms = backoff.as_millis() as u64, "replica subscription interrupted");
                    if matches!(e, SessionError::Push(_)) {
                        self.coordinators.rotate(&addr);
                    }
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|d| d.is_some()) => return,
            }
        }
    }

    async fn load(&mut self) -> Result<(), SessionError> {
        let path = self.cfg.path.clone();
        self.check_dir().await?;
        self.root = path
            .canonicalize()
            .map_err(|e| SessionError::Other(format!("{}: {e}", path.display())))?;
        let (state, name) = (self.state.clone(), self.state_key());
        let (applied, pending) = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::files::state::StateError>((
                state.replica_seq(&name)?,
                state.replica_pending_rmdirs(&name)?,
            ))
        })
        .await
        .map_err(|e| SessionError::Other(e.to_string()))??;
        self.applied = applied;
        self.pending_rmdirs = pending.into_iter().collect();
        self.progress.applied_seq.store(applied, Ordering::Relaxed);
        Ok(())
    }

    /// The directory's health before applying (see [`crate::files::guard::replica_dir_ready`]): a
    /// replica directory is created only while nothing was applied to it, a source directory
    /// (`Resolved`) never; a populated one that is missing or replaced is reported unhealthy
    /// (`status.json` `roots`, check `replica:<name>`) and nothing is applied.
    async fn check_dir(&mut self) -> Result<(), SessionError> {
        let (state, key, path) = (
            self.state.clone(),
            format!("/dir{}", self.state_key()),
            self.cfg.path.clone(),
        );
        let (name, mode) = (self.state_key(), self.mode);
        let res = tokio::task::spawn_blocking(move || {
            let populated = mode == Mode::Replica && state.replica_seq(&name)? > 0;
            Ok::<_, crate::files::state::StateError>(crate::files::guard::replica_dir_ready(
                &state,
                &key,
                &path,
                populated,
                mode == Mode::Replica,
            ))
        })
        .await
        .map_err(|e| SessionError::Other(e.to_string()))??;
        if self.mode == Mode::Replica {
            let mut d = self.progress.dir.lock().unwrap_or_else(|e| e.into_inner());
            let was_healthy = d.healthy || d.name.is_empty();
            *d = crate::files::guard::RootStatus {
                name: self.cfg.name.clone(),
                path: self.cfg.path.display().to_string(),
                kind: "replica".into(),
                healthy: res.is_ok(),
                problem_kind: res
                    .as_ref()
                    .err()
                    .map(|p| p.kind().to_string())
                    .unwrap_or_default(),
                problem: res
                    .as_ref()
                    .err()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                held: None,
            };
            if let (Err(p), true) = (&res, was_healthy) {
                tracing::error!(replica = %self.cfg.name, problem = p.kind(), "replica directory is unhealthy; nothing is applied to it: {p}");
            }
        }
        res.map_err(|p| SessionError::Other(p.to_string()))
    }

    async fn session(&mut self, follow: bool) -> Result<(), SessionError> {
        self.load().await?;
        let addr = self.coordinators.current();
        let ch = self.channel(&addr)?;
        let mut repl =
            ReplicationServiceClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let blobs: BlobClient = BlobServiceClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut stream = repl
            .subscribe_catalog(SubscribeRequest {
                from_seq: self.applied + 1,
                follow,
                max_rows: 0,
                any_node: false,
            })
            .await
            .map_err(|s| classify(&addr, &s))?
            .into_inner();
        tracing::info!(replica = %self.cfg.name, coordinator = %addr, from_seq = self.applied + 1, "replica subscribed to the region's catalog");
        self.coordinators.confirm(&addr);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|s| classify(&addr, &s))?;
            self.check_local().await;
            self.progress
                .known_seq
                .fetch_max(batch.last_seq, Ordering::Relaxed);
            let Some(last) = batch.rows.last().map(|r| r.seq) else {
                continue;
            };
            let started = Instant::now();
            let mut out = Applied::default();
            let mut group = FileGroup::default();
            for row in &batch.rows {
                if row.seq <= self.applied {
                    continue;
                }
                if self.mode == Mode::Resolved
                    && row.agent_id != lifeboat_common::catalog::RESOLVE_AGENT_ID
                {
                    continue;
                }
                let v = match FileVersion::from_pb(row) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(replica = %self.cfg.name, seq = row.seq, path = ?row.path, error = %e, "bad catalog row refused; skipped");
                        self.progress.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                // Files of distinct paths are written together; a row whose path is related to
                // one in the group waits until the group is written, so every path sees its
                // rows in catalog order. Other rows are applied at once.
                let rel = self.rel_of(&v.v.path);
                let related = match rel.as_ref() {
                    Some(Some(rel)) => {
                        group.conflicts(rel, v.v.kind == EntryKind::Dir && !v.v.deleted)
                    }
                    _ => false,
                };
                if related {
                    self.flush(&blobs, &mut group, &mut out).await?;
                }
                let file_rel = match rel {
                    Some(Some(rel)) if v.v.kind == EntryKind::File && !v.v.deleted => Some(rel),
                    _ => None,
                };
                if self.mode == Mode::Resolved && !self.resolution_applies(&v).await? {
                    continue;
                }
                if let Some(rel) = file_rel {
                    group.push(v, rel);
                    if group.rows.len() >= GROUP_ROWS {
                        self.flush(&blobs, &mut group, &mut out).await?;
                    }
                    continue;
                }
                match self.apply(&blobs, &v, &mut out).await {
                    Ok(true) => out.applied(&v, self.record, 0),
                    Ok(false) => {}
                    Err(e) if is_unsafe_path(&e) => self.refuse(&v, &e),
                    Err(e) => return Err(e.into()),
                }
            }
            self.flush(&blobs, &mut group, &mut out).await?;
            self.retry_rmdirs(&mut out.touched);
            let (rows, bytes) = (out.rows, out.bytes);
            self.persist(last, out).await?;
            self.progress
                .rows_applied
                .fetch_add(rows, Ordering::Relaxed);
            self.progress
                .bytes_written
                .fetch_add(bytes, Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            self.progress
                .entries_per_s
                .store((rows as f64 / secs).round() as u64, Ordering::Relaxed);
        }
        if follow {
            return Err(SessionError::Other(
                "the coordinator ended the subscription".into(),
            ));
        }
        Ok(())
    }

    /// [`Mode::Resolved`]: whether version `v` (committed by `lifeboat resolve`) should be
    /// written: newer than the acknowledged state of its path, and the disk still holds that
    /// state (or nothing, for a path this agent never had).
    async fn resolution_applies(&self, v: &FileVersion) -> Result<bool, SessionError> {
        let Some(rel) =
            v.v.path
                .strip_prefix(self.cfg.name.as_str())
                .and_then(|r| r.strip_prefix('/'))
        else {
            return Ok(false);
        };
        let (state, path, disk) = (
            self.state.clone(),
            v.v.path.clone(),
            safe_join(&self.root, rel, true).ok(),
        );
        let seq = v.seq;
        let ok = tokio::task::spawn_blocking(move || {
            let entry = state.reader()?.get(&path)?;
            if entry.as_ref().is_some_and(|e| e.seq >= seq) {
                return Ok::<_, SessionError>(false);
            }
            let Some(disk) = disk else { return Ok(false) };
            let found = crate::files::scan::lstat(&disk)
                .map_err(|e| SessionError::Other(format!("lstat {}: {e}", disk.display())))?;
            Ok(match (found, entry) {
                (crate::files::scan::Found::Missing, _) => true,
                (crate::files::scan::Found::Entry(m), Some(e)) => {
                    crate::files::scan::unchanged(&m, &e)
                }
                _ => false,
            })
        })
        .await
        .map_err(|e| SessionError::Other(e.to_string()))??;
        if !ok {
            tracing::warn!(path = %v.v.path, seq = v.seq, "resolved version not written: the path changed here since (the local version is pushed and wins)");
        } else {
            tracing::info!(path = %v.v.path, seq = v.seq, "writing the version chosen by `lifeboat resolve`");
        }
        Ok(ok)
    }

    /// Gives every touched directory (and its ancestors up to the replica directory) the mode
    /// and mtime of its newest directory row again (writing inside moved its mtime to "now"),
    /// fsyncs them, then records `seq`, the pending removals, the acknowledged versions and the
    /// directory rows durably.
    async fn persist(&mut self, seq: u64, out: Applied) -> Result<(), SessionError> {
        let (state, name, root) = (self.state.clone(), self.state_key(), self.root.clone());
        let pending: Vec<String> = self.pending_rmdirs.iter().cloned().collect();
        tokio::task::spawn_blocking(move || {
            let mut dirs = BTreeSet::new();
            for d in &out.touched {
                let mut d = d.as_path();
                while let Ok(rel) = d.strip_prefix(&root) {
                    let Some(rel) = rel.to_str() else { break };
                    if !dirs.insert(rel.to_string()) {
                        break;
                    }
                    match d.parent() {
                        Some(p) => d = p,
                        None => break,
                    }
                }
            }
            let dirs: Vec<String> = dirs.into_iter().collect();
            let stored = state.replica_dir_metas(&name, &dirs)?;
            for (rel, stored) in dirs.iter().zip(stored) {
                let meta = match out.dirs.get(rel) {
                    Some(m) => *m,
                    None => stored,
                };
                if let Some((mode, mtime_ns)) = meta {
                    reset_dir_meta(&root, rel, mode, mtime_ns)?;
                }
            }
            for rel in &dirs {
                let d = root.join(rel);
                // A directory removed later in the batch has nothing left to sync.
                if let Ok(f) = std::fs::File::open(&d) {
                    f.sync_all()
                        .map_err(|e| SessionError::Other(format!("fsync {}: {e}", d.display())))?;
                }
            }
            let dir_rows: Vec<(String, Option<(u32, i64)>)> = out.dirs.into_iter().collect();
            state.replica_commit(&name, seq, &pending, &out.acked, &dir_rows)?;
            Ok::<(), SessionError>(())
        })
        .await
        .map_err(|e| SessionError::Other(e.to_string()))??;
        self.applied = seq;
        self.progress.applied_seq.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Logs and counts a row refused for its path.
    fn refuse(&self, v: &FileVersion, e: &ApplyError) {
        tracing::error!(replica = %self.cfg.name, seq = v.seq, path = %v.v.path, error = %e, "replica refused an unsafe path; skipped, nothing written");
        self.progress.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Where catalog path `path` goes: `None` under another root, `Some(None)` for the root
    /// itself, `Some(Some(rel))` for an entry `rel` under the replica directory.
    fn rel_of(&self, path: &str) -> Option<Option<String>> {
        let name = self.cfg.name.as_str();
        if path == name {
            return Some(None);
        }
        path.strip_prefix(name)
            .and_then(|r| r.strip_prefix('/'))
            .map(|r| Some(r.to_string()))
    }

    /// Writes the files of `group` ([`APPLY_CONCURRENCY`] at once) and records the ones written
    /// in `out`; empties `group`. A file whose path is refused is counted and skipped.
    ///
    /// Errors: the first other failure (files of the group written meanwhile are not recorded:
    /// the batch is applied again from the last persisted sequence number).
    async fn flush(
        &mut self,
        blobs: &BlobClient,
        group: &mut FileGroup,
        out: &mut Applied,
    ) -> Result<(), SessionError> {
        if group.rows.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(group).rows;
        let root = Arc::new(self.root.clone());
        let writes: Vec<_> = rows
            .into_iter()
            .map(|(v, rel)| {
                let (blobs, root) = (blobs.clone(), root.clone());
                async move {
                    let r = apply::write_file(&blobs, &root, &rel, &v, TEMP_PREFIX, true).await;
                    (v, rel, r)
                }
            })
            .collect();
        let mut results = futures::stream::iter(writes).buffer_unordered(APPLY_CONCURRENCY);
        let mut done = Vec::new();
        while let Some((v, rel, r)) = results.next().await {
            match r {
                Ok(n) => done.push((v, rel, n)),
                Err(e) if is_unsafe_path(&e) => self.refuse(&v, &e),
                Err(e) => return Err(e.into()),
            }
        }
        drop(results);
        done.sort_unstable_by_key(|(v, _, _)| v.seq);
        for (v, rel, n) in done {
            self.keep_dirs(&rel);
            out.touched.insert(parent_of(&root, &rel));
            out.dirs.insert(rel, None);
            out.applied(&v, self.record, n);
        }
        Ok(())
    }

    /// A row creates something at `rel`: neither it nor its ancestors may be removed any more.
    fn keep_dirs(&mut self, rel: &str) {
        let mut p = rel;
        loop {
            self.pending_rmdirs.remove(p);
            match p.rsplit_once('/') {
                Some((parent, _)) => p = parent,
                None => break,
            }
        }
    }

    /// Applies `v` if it lies under this replica's root; returns whether it did. Touched
    /// directories and directory rows are noted in `out`.
    async fn apply(
        &mut self,
        blobs: &BlobClient,
        v: &FileVersion,
        out: &mut Applied,
    ) -> Result<bool, ApplyError> {
        let Some(rel) = self.rel_of(&v.v.path) else {
            // Another root: not ours.
            return Ok(false);
        };
        let root = self.root.clone();
        let Some(rel) = rel else {
            // The root itself: its mode and mtime only (never removed).
            if v.v.kind == EntryKind::Dir && !v.v.deleted {
                reset_dir_meta(&root, "", v.v.mode, v.v.mtime_ns)?;
                out.dirs
                    .insert(String::new(), Some((v.v.mode, v.v.mtime_ns)));
                out.touched.insert(root);
            }
            return Ok(true);
        };
        if v.v.deleted {
            if v.v.kind == EntryKind::Dir {
                out.dirs.insert(rel.clone(), None);
            }
            return self
                .remove(&root, &rel, v.v.kind, &mut out.touched)
                .map(|()| true);
        }
        match v.v.kind {
            EntryKind::File => {
                out.bytes += apply::write_file(blobs, &root, &rel, v, TEMP_PREFIX, true).await?;
                out.dirs.insert(rel.clone(), None);
            }
            EntryKind::Dir => {
                let p = apply::mkdirs(&root, &rel)?;
                apply::set_dir_meta(&root, &rel, v.v.mode, v.v.mtime_ns)?;
                out.dirs.insert(rel.clone(), Some((v.v.mode, v.v.mtime_ns)));
                out.touched.insert(p);
            }
            EntryKind::Symlink => {
                let target = v.v.symlink_target.clone().unwrap_or_default();
                apply::write_symlink(&root, &rel, &target, v.v.mtime_ns, true)?;
                out.dirs.insert(rel.clone(), None);
            }
        }
        self.keep_dirs(&rel);
        out.touched.insert(parent_of(&root, &rel));
        Ok(true)
    }

    /// Applies a tombstone: unlinks a file or symlink (never following it); a directory is
    /// removed once empty (kept pending until then).
    fn remove(
        &mut self,
        root: &Path,
        rel: &str,
        kind: EntryKind,
        touched: &mut BTreeSet<PathBuf>,
    ) -> Result<(), ApplyError> {
        let p = safe_join(root, rel, true)?;
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(ApplyError::Io {
                    context: format!("stat {}", p.display()),
                    error,
                })
            }
        };
        if md.is_dir() {
            if kind == EntryKind::Dir {
                self.pending_rmdirs.insert(rel.to_string());
            } else {
                tracing::warn!(replica = %self.cfg.name, path = rel, "tombstone of a {kind:?} but a directory is there; left alone");
            }
            return Ok(());
        }
        if kind == EntryKind::Dir {
            // Replaced by a file or link since; the newer row owns the path.
            return Ok(());
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(ApplyError::Io {
                    context: format!("remove {}", p.display()),
                    error,
                })
            }
        }
        touched.insert(parent_of(root, rel));
        Ok(())
    }

    /// Removes pending directories that are empty now (deepest first).
    fn retry_rmdirs(&mut self, touched: &mut BTreeSet<PathBuf>) {
        if self.pending_rmdirs.is_empty() {
            return;
        }
        let mut pending: Vec<String> = self.pending_rmdirs.iter().cloned().collect();
        pending.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        let root = self.root.clone();
        for rel in pending {
            let done = match safe_join(&root, &rel, true) {
                Err(e) => {
                    tracing::error!(replica = %self.cfg.name, path = %rel, error = %e, "replica refused an unsafe path; directory left alone");
                    true
                }
                Ok(p) => match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => match std::fs::remove_dir(&p) {
                        Ok(()) => {
                            touched.insert(parent_of(&root, &rel));
                            true
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => false,
                        Err(e) => {
                            tracing::warn!(replica = %self.cfg.name, path = %rel, error = %e, "cannot remove a deleted directory; will retry");
                            false
                        }
                    },
                    _ => true,
                },
            };
            if done {
                self.pending_rmdirs.remove(&rel);
            }
        }
    }
}

/// Starts one task per replica of `cfg`, registering their progress in `progress`; replicas
/// that follow the active region get `watchdog`.
pub fn spawn_all(
    cfg: &crate::Config,
    state: Arc<StateDb>,
    progress: &crate::status::Progress,
    stop: watch::Receiver<Option<Instant>>,
    watchdog: Option<Watchdog>,
) -> Vec<tokio::task::JoinHandle<()>> {
    use tracing::Instrument;
    cfg.replicas
        .iter()
        .map(|r| {
            let p = Arc::new(ReplicaProgress::default());
            progress
                .replicas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(p.clone());
            let rep = Replica::new(
                r.clone(),
                cfg.tls.clone(),
                cfg.coordinators.clone(),
                state.clone(),
                p,
            )
            .recording(r.follow_active)
            .watching(watchdog.clone().filter(|_| r.follow_active));
            tokio::spawn(rep.run(stop.clone()).in_current_span())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(root: &Path, data: &Path) -> Replica {
        let state = Arc::new(StateDb::open(data).unwrap());
        let mut r = Replica::new(
            ReplicaConfig {
                name: "data".into(),
                path: root.to_path_buf(),
                follow_active: true,
            },
            TlsConfig::default(),
            vec!["127.0.0.1:1".into()],
            state,
            Arc::new(ReplicaProgress::default()),
        );
        r.root = root.canonicalize().unwrap();
        r
    }

    fn fv(path: &str) -> FileVersion {
        FileVersion::from_pb(&lifeboat_proto::VersionRow {
            path: path.into(),
            kind: EntryKind::File.to_pb(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn file_groups_hold_only_unrelated_paths() {
        assert_eq!(ancestors("a/b/c").collect::<Vec<_>>(), vec!["a/b", "a"]);
        assert_eq!(ancestors("a").count(), 0);
        let mut g = FileGroup::default();
        g.push(fv("data/a/b/f"), "a/b/f".into());
        g.push(fv("data/a/g"), "a/g".into());
        // The same path, a path inside a file, a directory holding a file: wait.
        assert!(g.conflicts("a/b/f", false));
        assert!(g.conflicts("a/g/x", false));
        assert!(g.conflicts("a/b", false));
        assert!(g.conflicts("a", false));
        // Creating a directory that holds files of the group need not wait, a file in the way
        // of the directory must.
        assert!(!g.conflicts("a/b", true));
        assert!(g.conflicts("a/g", true));
        assert!(g.conflicts("a/g/sub", true));
        // Unrelated paths do not wait.
        assert!(!g.conflicts("a/b/f2", false));
        assert!(!g.conflicts("ab", false));
        assert!(!g.conflicts("a/bb/f", false));
    }

    #[test]
    fn directory_meta_is_set_again_only_when_changed() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("x/y")).unwrap();
        reset_dir_meta(&root, "x", 0o750, 1_000_000_000_000_000_123).unwrap();
        reset_dir_meta(&root, "", 0o700, 5).unwrap();
        let md = std::fs::metadata(root.join("x")).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123));
        assert_eq!(md.permissions().mode() & 0o7777, 0o750);
        let md = std::fs::metadata(&root).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (0, 5));
        // Gone or no longer a directory: nothing done, no error.
        reset_dir_meta(&root, "missing", 0o700, 5).unwrap();
        std::fs::write(root.join("x/f"), b"").unwrap();
        reset_dir_meta(&root, "x/f", 0o700, 5).unwrap();
        assert_ne!(std::fs::metadata(root.join("x/f")).unwrap().mtime(), 0);
    }

    #[test]
    fn tombstones_remove_entries_and_empty_dirs_only() {
        let d = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let root = d.path().join("replica");
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/sub/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("dir/link")).unwrap();
        let mut r = replica(&root, data.path());
        let root = r.root.clone();
        let mut touched = BTreeSet::new();
        // The directory's tombstone before its children's: kept pending.
        r.remove(&root, "dir", EntryKind::Dir, &mut touched)
            .unwrap();
        r.remove(&root, "dir/sub", EntryKind::Dir, &mut touched)
            .unwrap();
        r.retry_rmdirs(&mut touched);
        assert!(root.join("dir/sub").is_dir());
        assert_eq!(r.pending_rmdirs.len(), 2);
        r.remove(&root, "dir/sub/f", EntryKind::File, &mut touched)
            .unwrap();
        // The link is removed itself, never followed.
        r.remove(&root, "dir/link", EntryKind::Symlink, &mut touched)
            .unwrap();
        assert!(outside.path().join("keep").exists());
        // Missing entries are fine.
        r.remove(&root, "dir/nope", EntryKind::File, &mut touched)
            .unwrap();
        r.retry_rmdirs(&mut touched);
        assert!(!root.join("dir").exists());
        assert!(r.pending_rmdirs.is_empty());
        // A new entry under a pending directory keeps it.
        std::fs::create_dir_all(root.join("k/j")).unwrap();
        r.remove(&root, "k", EntryKind::Dir, &mut touched).unwrap();
        r.keep_dirs("k/j/new");
        assert!(r.pending_rmdirs.is_empty());
        // Through a planted symlink: refused as an unsafe path.
        std::os::unix::fs::symlink(outside.path(), root.join("evil")).unwrap();
        let e = r
            .remove(&root, "evil/keep", EntryKind::File, &mut touched)
            .unwrap_err();
        assert!(is_unsafe_path(&e), "{e}");
        assert!(outside.path().join("keep").exists());
    }
}
