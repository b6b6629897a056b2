//! The work queue of dirty paths and the planner that turns it into batches of changes.
//!
//! Everything the agent has to look at is a [`Work`] item: a path to compare with the state
//! (optionally its subtree), a directory to list, or a sweep of acknowledged paths under a prefix
//! that may have disappeared. The initial scan is just one `Path { walk, sweep }` item per root;
//! watcher events become the same items. Directories are listed one at a time and their children
//! queued in front (depth first), so memory stays bounded by the current directory chain, not by
//! the tree.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;

use lifeboat_common::blob::BlobHash;
use lifeboat_common::catalog::{EntryKind, PartRef};
use lifeboat_proto as pb;

use crate::files::delta::{self, Known, PartPlan};
use crate::files::scan::{self, Found, Roots};
use crate::files::state::{AckedChange, EntryState, StateDb, StateError, StateReader};

/// Acknowledged paths looked at per sweep step.
const SWEEP_CHUNK: usize = 256;

/// One thing to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Compare the entry at `rel` of root `root` with the state and plan an upsert or delete.
    /// `walk`: if it is a directory, also look at everything below it. `sweep`: also delete
    /// acknowledged entries below it that are gone. `rename_from`: wire path it was renamed from.
    Path {
        /// Root index.
        root: usize,
        /// Path relative to the root (`""` for the root itself).
        rel: String,
        /// Wire path this entry was renamed from, if the watcher said so.
        rename_from: Option<String>,
        /// Descend into directories.
        walk: bool,
        /// Delete acknowledged entries below that are gone.
        sweep: bool,
    },
    /// List directory `rel` and queue its children (with `walk`).
    Walk {
        /// Root index.
        root: usize,
        /// Directory relative to the root.
        rel: String,
        /// Wire path the directory was renamed from (children map below it).
        rename_from: Option<String>,
    },
    /// Delete acknowledged entries whose wire path starts with `prefix` (ending in `/`) and that
    /// no longer exist (or are no longer included), in key order after `after`.
    Sweep {
        /// Root index.
        root: usize,
        /// Wire prefix, ending in `/`.
        prefix: String,
        /// Resume point (exclusive).
        after: Option<String>,
        /// Only the direct children of `prefix` (not deeper descendants).
        shallow: bool,
    },
}

impl Work {
    /// Full look at a root (the initial scan and rescans).
    pub fn scan_root(root: usize) -> Work {
        Work::Path {
            root,
            rel: String::new(),
            rename_from: None,
            walk: true,
            sweep: true,
        }
    }

    /// The root index the item belongs to.
    pub fn root(&self) -> usize {
        match self {
            Work::Path { root, .. } | Work::Walk { root, .. } | Work::Sweep { root, .. } => *root,
        }
    }

    fn key(&self) -> Option<String> {
        match self {
            Work::Path {
                root,
                rel,
                rename_from,
                walk,
                sweep,
            } => Some(format!(
                "p{root}\0{rel}\0{walk}{sweep}\0{}",
                rename_from.as_deref().unwrap_or("")
            )),
            Work::Sweep {
                root,
                prefix,
                after: None,
                shallow: true,
            } => Some(format!("s{root}\0{prefix}")),
            Work::Walk { .. } | Work::Sweep { .. } => None,
        }
    }
}

/// Queue of [`Work`], deduplicating identical path items, plus a change planned for a batch that
/// was already full.
#[derive(Debug, Default)]
pub struct WorkQueue {
    items: VecDeque<Work>,
    keys: HashSet<String>,
    /// A change planned but left for the next batch (it did not fit).
    pub carried: Option<PlannedChange>,
    /// Roots that are unhealthy (missing, replaced, see [`crate::files::guard`]): their items are
    /// dropped unplanned (the root is rescanned once it is healthy again).
    pub blocked: HashSet<usize>,
}

impl WorkQueue {
    /// Appends `w` unless an identical path item is queued.
    pub fn push_back(&mut self, w: Work) {
        if let Some(k) = w.key() {
            if !self.keys.insert(k) {
                return;
            }
        }
        self.items.push_back(w);
    }

    /// Puts `w` first unless an identical path item is queued.
    pub fn push_front(&mut self, w: Work) {
        if let Some(k) = w.key() {
            if !self.keys.insert(k) {
                return;
            }
        }
        self.items.push_front(w);
    }

    fn pop_front(&mut self) -> Option<Work> {
        let w = self.items.pop_front()?;
        if let Some(k) = w.key() {
            self.keys.remove(&k);
        }
        Some(w)
    }

    /// Queued items plus the carried change.
    pub fn len(&self) -> usize {
        self.items.len() + usize::from(self.carried.is_some())
    }

    /// Nothing queued and nothing carried.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One change ready to be streamed.
#[derive(Debug, Clone)]
pub struct PlannedChange {
    /// Agent-local id, echoed in the ack.
    pub change_id: u64,
    /// Root index.
    pub root: usize,
    /// Root name (the `root` field on the wire).
    pub root_name: String,
    /// Path relative to the root.
    pub rel: String,
    /// Wire path `"<root>/<rel>"`.
    pub path: String,
    /// Where the content is read from.
    pub fs_path: PathBuf,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Tombstone.
    pub deleted: bool,
    /// Content bytes.
    pub size: u64,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// ns since the Unix epoch.
    pub mtime_ns: i64,
    /// blake3 of the content (files).
    pub blake3: Option<BlobHash>,
    /// Link text (symlinks).
    pub symlink_target: Option<String>,
    /// Wire path this change was renamed from.
    pub rename_from: Option<String>,
    /// Content parts (files).
    pub parts: Vec<PartPlan>,
}

impl PlannedChange {
    /// Payload bytes of all parts as planned.
    pub fn payload_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.payload_bytes()).sum()
    }

    /// The header message.
    pub fn header(&self, epoch: u64) -> pb::FileChange {
        pb::FileChange {
            change_id: self.change_id,
            path: self.path.clone(),
            kind: self.kind.to_pb(),
            deleted: self.deleted,
            size: self.size,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            blake3: self.blake3.map(|h| h.to_hex()).unwrap_or_default(),
            symlink_target: self.symlink_target.clone().unwrap_or_default(),
            part_count: self.parts.len() as u32,
            epoch,
            rename_from: self.rename_from.clone().unwrap_or_default(),
            root: self.root_name.clone(),
        }
    }

    /// What the state records once the change is acknowledged with catalog sequence `seq`.
    pub fn acked(&self, seq: u64) -> AckedChange {
        if self.deleted {
            return AckedChange::Delete {
                path: self.path.clone(),
            };
        }
        AckedChange::Upsert {
            path: self.path.clone(),
            entry: EntryState {
                kind: self.kind,
                size: self.size,
                mode: self.mode,
                mtime_ns: self.mtime_ns,
                blake3: self.blake3,
                parts: self.parts.iter().map(|p| p.part_ref()).collect(),
                symlink_target: self.symlink_target.clone(),
                seq,
            },
            signatures: self.parts.iter().map(|p| p.signature.clone()).collect(),
        }
    }

    /// The work item that plans this path again (after an aborted or unacknowledged send).
    pub fn requeue(&self) -> Work {
        Work::Path {
            root: self.root,
            rel: self.rel.clone(),
            rename_from: self.rename_from.clone(),
            walk: false,
            sweep: false,
        }
    }
}

/// Bounds of one batch and of planning.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payload bytes per batch (a larger single change goes alone).
    pub max_bytes: u64,
    /// Changes per batch.
    pub max_changes: usize,
    /// Content bytes per part.
    pub part_size: usize,
    /// Payload bytes per batch kept in memory from planning instead of read again when streamed.
    pub retain_bytes: u64,
}

/// Payload bytes per batch kept in memory from planning (small files are not read twice).
pub const DEFAULT_RETAIN_BYTES: u64 = 16 * 1024 * 1024;

/// The previous version the delta is planned against: the path's own acknowledged state, or for a
/// new path that was renamed, the state of the source.
struct KnownFor<'a> {
    reader: &'a StateReader,
    /// Part hashes sent earlier in the same batch (the coordinator accepts `reuse` of those).
    in_batch: &'a HashSet<BlobHash>,
    base_path: String,
    base: Option<EntryState>,
}

impl Known for KnownFor<'_> {
    fn old_part(&self, index: usize) -> Option<PartRef> {
        let b = self.base.as_ref()?;
        (b.kind == EntryKind::File)
            .then(|| b.parts.get(index).cloned())
            .flatten()
    }
    fn old_signature(&self, index: usize) -> Option<Vec<u8>> {
        self.base.as_ref()?;
        self.reader
            .signature(&self.base_path, index as u32)
            .ok()
            .flatten()
    }
    fn is_acked(&self, hash: &BlobHash) -> bool {
        self.in_batch.contains(hash) || self.reader.is_acked_blob(hash).unwrap_or(false)
    }
    fn spool_digest(
        &self,
        meta: &std::fs::Metadata,
    ) -> Option<crate::files::spool_digest::SpoolDigest> {
        self.reader.take_spool_digest(meta)
    }
}

/// Builds batches from a [`WorkQueue`] against one read view of the state.
struct Planner<'a> {
    roots: &'a Roots,
    reader: StateReader,
    limits: Limits,
    next_id: &'a mut u64,
    batch: Vec<PlannedChange>,
    paths: HashSet<String>,
    bytes: u64,
    retain_left: u64,
    /// Part buffer reused across files.
    scratch: Vec<u8>,
    /// Hashes of the parts in this batch (earlier parts carry the content of later equal ones).
    part_hashes: HashSet<BlobHash>,
}

/// Plans the next batch: takes work from the front of `queue` until the batch holds
/// `max_changes` changes or `max_bytes` payload bytes, the queue is empty, or the next item touches
/// a path already in the batch (it then waits for the next batch). Change ids are taken from
/// `next_id`.
///
/// Errors: [`StateError`] reading the state.
pub fn build_batch(
    queue: &mut WorkQueue,
    roots: &Roots,
    db: &StateDb,
    limits: Limits,
    next_id: &mut u64,
) -> Result<Vec<PlannedChange>, StateError> {
    let mut p = Planner {
        roots,
        reader: db.reader()?,
        limits,
        next_id,
        batch: Vec::new(),
        paths: HashSet::new(),
        bytes: 0,
        retain_left: limits.retain_bytes,
        scratch: Vec::new(),
        part_hashes: HashSet::new(),
    };
    if let Some(c) = queue.carried.take() {
        if !queue.blocked.contains(&c.root) {
            p.add(c);
        }
    }
    while !p.full() {
        let Some(w) = queue.pop_front() else { break };
        if queue.blocked.contains(&w.root()) {
            continue;
        }
        if !p.step(queue, w)? {
            break;
        }
    }
    Ok(p.batch)
}

impl Planner<'_> {
    fn full(&self) -> bool {
        self.batch.len() >= self.limits.max_changes || self.bytes >= self.limits.max_bytes
    }

    fn add(&mut self, c: PlannedChange) {
        self.bytes += c.payload_bytes();
        self.part_hashes.extend(c.parts.iter().map(|p| p.hash));
        self.paths.insert(c.path.clone());
        self.batch.push(c);
    }

    /// Adds `c` or carries it to the next batch if it would overflow the byte bound. Returns
    /// whether the batch can take more.
    fn offer(&mut self, queue: &mut WorkQueue, mut c: PlannedChange) -> bool {
        c.change_id = *self.next_id;
        *self.next_id += 1;
        if !self.batch.is_empty() && self.bytes + c.payload_bytes() > self.limits.max_bytes {
            queue.carried = Some(c);
            return false;
        }
        self.add(c);
        true
    }

    /// Processes one item; returns false when the batch must be closed.
    fn step(&mut self, queue: &mut WorkQueue, w: Work) -> Result<bool, StateError> {
        match w {
            Work::Path {
                root,
                ref rel,
                ref rename_from,
                walk,
                sweep,
            } => {
                let wire = self.roots.wire_path(root, rel);
                if self.paths.contains(&wire) {
                    queue.push_front(w);
                    return Ok(false);
                }
                let (change, follow) =
                    self.plan_path(root, rel, rename_from.as_deref(), walk, sweep)?;
                for f in follow.into_iter().rev() {
                    queue.push_front(f);
                }
                if let Some(c) = change {
                    return Ok(self.offer(queue, c));
                }
                Ok(true)
            }
            Work::Walk {
                root,
                rel,
                rename_from,
            } => {
                self.walk(queue, root, &rel, rename_from.as_deref());
                Ok(true)
            }
            Work::Sweep {
                root,
                prefix,
                after,
                shallow,
            } => self.sweep(queue, root, prefix, after, shallow),
        }
    }

    fn walk(&mut self, queue: &mut WorkQueue, root: usize, rel: &str, rename_from: Option<&str>) {
        let dir = self.roots.fs_path(root, rel);
        let (names, bad) = match scan::list_dir(&dir) {
            Ok(x) => x,
            Err(e) if scan::is_gone(&e) => return,
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot list directory; skipping it");
                return;
            }
        };
        for b in bad {
            tracing::warn!(path = %b.display(), "skipping entry whose name is not valid UTF-8");
        }
        for name in names.into_iter().rev() {
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if lifeboat_common::path::validate_rel_path(&child).is_err() {
                tracing::warn!(path = %dir.join(&name).display(), "skipping entry whose name cannot be replicated");
                continue;
            }
            if self.roots.is_own(&dir.join(&name)) {
                continue;
            }
            queue.push_front(Work::Path {
                root,
                rel: child,
                rename_from: rename_from.map(|f| format!("{f}/{name}")),
                walk: true,
                sweep: false,
            });
        }
    }

    fn sweep(
        &mut self,
        queue: &mut WorkQueue,
        root: usize,
        prefix: String,
        after: Option<String>,
        shallow: bool,
    ) -> Result<bool, StateError> {
        let root_dir = &self.roots.roots[root].path;
        if !matches!(scan::lstat(root_dir), Ok(Found::Entry(ref m)) if m.kind == EntryKind::Dir) {
            tracing::error!(root = %root_dir.display(), "protected root is missing or not a directory; not deleting anything under it");
            return Ok(true);
        }
        let chunk = self
            .reader
            .paths_under(&prefix, after.as_deref(), SWEEP_CHUNK)?;
        let name_len = self.roots.roots[root].name.len() + 1;
        let mut last = after;
        for (path, kind) in &chunk {
            if self.full() {
                queue.push_front(Work::Sweep {
                    root,
                    prefix,
                    after: last,
                    shallow,
                });
                return Ok(false);
            }
            last = Some(path.clone());
            if self.paths.contains(path) || (shallow && path[prefix.len()..].contains('/')) {
                continue;
            }
            let rel = &path[name_len..];
            let gone = match scan::lstat(&self.roots.fs_path(root, rel)) {
                Ok(Found::Entry(_)) => !self.roots.roots[root].filter.includes(rel),
                Ok(Found::Missing | Found::Unsupported(_)) => true,
                Err(e) => {
                    tracing::warn!(path = %path, error = %e, "cannot stat; keeping it");
                    false
                }
            };
            if gone {
                let c = self.delete(root, rel, *kind);
                if !self.offer(queue, c) {
                    queue.push_front(Work::Sweep {
                        root,
                        prefix,
                        after: last,
                        shallow,
                    });
                    return Ok(false);
                }
            }
        }
        if chunk.len() == SWEEP_CHUNK {
            queue.push_front(Work::Sweep {
                root,
                prefix,
                after: last,
                shallow,
            });
        }
        Ok(true)
    }

    fn base(&self, root: usize, rel: &str) -> PlannedChange {
        PlannedChange {
            change_id: 0,
            root,
            root_name: self.roots.roots[root].name.clone(),
            rel: rel.to_string(),
            path: self.roots.wire_path(root, rel),
            fs_path: self.roots.fs_path(root, rel),
            kind: EntryKind::File,
            deleted: false,
            size: 0,
            mode: 0,
            mtime_ns: 0,
            blake3: None,
            symlink_target: None,
            rename_from: None,
            parts: Vec::new(),
        }
    }

    fn delete(&self, root: usize, rel: &str, kind: EntryKind) -> PlannedChange {
        PlannedChange {
            kind,
            deleted: true,
            ..self.base(root, rel)
        }
    }

    /// Plans one path: the change (if any) and follow-up work (walk, sweep).
    fn plan_path(
        &mut self,
        root: usize,
        rel: &str,
        rename_from: Option<&str>,
        walk: bool,
        sweep: bool,
    ) -> Result<(Option<PlannedChange>, Vec<Work>), StateError> {
        let wire = self.roots.wire_path(root, rel);
        let fs_path = self.roots.fs_path(root, rel);
        let st = self.reader.get(&wire)?;
        let filter = &self.roots.roots[root].filter;
        let mut follow = Vec::new();
        let sweep_work = || Work::Sweep {
            root,
            prefix: format!("{wire}/"),
            after: None,
            shallow: false,
        };
        let was_dir = st.as_ref().is_some_and(|s| s.kind == EntryKind::Dir);
        let found = match scan::lstat(&fs_path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %fs_path.display(), error = %e, "cannot stat; will look again on the next event or scan");
                return Ok((None, follow));
            }
        };
        let meta = match found {
            Found::Entry(m) => m,
            Found::Missing | Found::Unsupported(_) => {
                if let Found::Unsupported(why) = found {
                    tracing::debug!(path = %fs_path.display(), why, "skipping entry");
                }
                if rel.is_empty() {
                    tracing::error!(root = %fs_path.display(), "protected root is missing or not a directory; not deleting anything under it");
                    return Ok((None, follow));
                }
                if !sweep && self.roots.roots[root].name == crate::config::SNAPSHOTS_ROOT {
                    // Snapshot files leave the disk once acknowledged: a missing one is no
                    // deletion. Only retention removes snapshots from the catalog (a sweep item,
                    // see `Agent::expire_snapshots`).
                    return Ok((None, follow));
                }
                if sweep || was_dir {
                    follow.push(sweep_work());
                }
                if st.is_none() {
                    // Gone and never acknowledged: the event may stand for `rename(x, p)` then
                    // `unlink(p)` within one debounce window, which the debouncer reports as
                    // the removal of `p` alone, losing `x`. Look at p's siblings for
                    // acknowledged entries that are gone.
                    let parent = rel.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    follow.push(Work::Sweep {
                        root,
                        prefix: format!("{}/", self.roots.wire_path(root, parent)),
                        after: None,
                        shallow: true,
                    });
                }
                let change = st.map(|s| self.delete(root, rel, s.kind));
                return Ok((change, follow));
            }
        };
        let is_dir = meta.kind == EntryKind::Dir;
        if is_dir && walk && !filter.is_excluded(rel) {
            follow.push(Work::Walk {
                root,
                rel: rel.to_string(),
                rename_from: rename_from.map(str::to_string),
            });
        }
        if sweep || (was_dir && !is_dir) {
            follow.push(sweep_work());
        }
        if !filter.includes(rel) {
            if was_dir && is_dir && !sweep {
                follow.push(sweep_work());
            }
            let change = st.map(|s| self.delete(root, rel, s.kind));
            return Ok((change, follow));
        }
        if st.as_ref().is_some_and(|s| scan::unchanged(&meta, s)) {
            return Ok((None, follow));
        }
        let rename_from = match rename_from {
            Some(f) if f != wire => self.reader.get(f)?.map(|s| (f.to_string(), s)),
            _ => None,
        };
        let mut c = self.base(root, rel);
        c.kind = meta.kind;
        c.mode = meta.mode;
        c.mtime_ns = meta.mtime_ns;
        c.symlink_target = meta.symlink_target.clone();
        c.rename_from = rename_from.as_ref().map(|(f, _)| f.clone());
        if meta.kind == EntryKind::File {
            let known = match (&st, rename_from) {
                (Some(_), _) | (None, None) => KnownFor {
                    reader: &self.reader,
                    in_batch: &self.part_hashes,
                    base_path: wire.clone(),
                    base: st.clone(),
                },
                (None, Some((from, from_state))) => KnownFor {
                    reader: &self.reader,
                    in_batch: &self.part_hashes,
                    base_path: from,
                    base: Some(from_state),
                },
            };
            let mut retain = self.retain_left;
            // Snapshot files are written once and never changed: no signatures for deltas.
            let signatures = self.roots.roots[root].name != crate::config::SNAPSHOTS_ROOT;
            match delta::plan_file(
                &fs_path,
                self.limits.part_size,
                &known,
                &mut retain,
                false,
                signatures,
                &mut self.scratch,
            ) {
                Ok(plan) => {
                    self.retain_left = retain;
                    c.size = plan.size;
                    c.mtime_ns = plan.mtime_ns;
                    c.mode = plan.mode;
                    c.blake3 = Some(plan.blake3);
                    c.parts = plan.parts;
                }
                Err(e) if scan::is_gone(&e) => {
                    let change = st.map(|s| self.delete(root, rel, s.kind));
                    return Ok((change, follow));
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    // Replaced by something else between lstat and open: look again.
                    follow.push(Work::Path {
                        root,
                        rel: rel.to_string(),
                        rename_from: None,
                        walk,
                        sweep,
                    });
                    return Ok((None, follow));
                }
                Err(e) => {
                    tracing::warn!(path = %fs_path.display(), error = %e, "cannot read file; will look again on the next event or scan");
                    return Ok((None, follow));
                }
            }
        }
        Ok((Some(c), follow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PathConfig;

    fn setup(exclude: &[&str]) -> (tempfile::TempDir, Roots, StateDb) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let roots = Roots::new(
            &[PathConfig {
                name: "data".into(),
                path: root,
                include: vec!["**".into()],
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
                follow_active: true,
                max_delete_share: None,
                max_delete_files: None,
            }],
            &d.path().join("state"),
        )
        .unwrap();
        let db = StateDb::open(&d.path().join("state")).unwrap();
        (d, roots, db)
    }

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 30,
        max_changes: 1000,
        part_size: 4096,
        retain_bytes: 0,
    };

    fn plan_all(queue: &mut WorkQueue, roots: &Roots, db: &StateDb) -> Vec<PlannedChange> {
        let mut id = 1;
        let mut all = Vec::new();
        while !queue.is_empty() {
            all.extend(build_batch(queue, roots, db, LIMITS, &mut id).unwrap());
        }
        all
    }

    fn ack(db: &StateDb, changes: &[PlannedChange]) {
        let acked: Vec<_> = changes.iter().map(|c| c.acked(1)).collect();
        db.commit(&acked, 0, 0).unwrap();
    }

    /// A snapshot file that left the disk after its acknowledgement is not a deletion; a sweep
    /// item for it (what retention queues) is.
    #[test]
    fn missing_snapshot_file_is_deleted_only_by_retention() {
        let (d, mut roots, db) = setup(&[]);
        let snaps = d.path().join("snaps");
        std::fs::create_dir_all(snaps.join("src")).unwrap();
        roots.roots.push(scan::Root {
            name: crate::config::SNAPSHOTS_ROOT.into(),
            path: snaps.clone(),
            filter: scan::Filter::default_all(),
        });
        let idx = roots.roots.len() - 1;
        std::fs::write(snaps.join("src/a.snap"), b"snapshot").unwrap();
        let item = |sweep| Work::Path {
            root: idx,
            rel: "src/a.snap".into(),
            rename_from: None,
            walk: false,
            sweep,
        };
        let mut q = WorkQueue::default();
        q.push_back(item(false));
        let sent = plan_all(&mut q, &roots, &db);
        assert_eq!(sent.len(), 1);
        assert!(!sent[0].deleted);
        ack(&db, &sent);
        std::fs::remove_file(snaps.join("src/a.snap")).unwrap();
        q.push_back(item(false));
        assert!(
            plan_all(&mut q, &roots, &db).is_empty(),
            "gone locally: no tombstone"
        );
        q.push_back(item(true));
        let del = plan_all(&mut q, &roots, &db);
        assert_eq!(del.len(), 1);
        assert!(del[0].deleted && del[0].path == "_snapshots/src/a.snap");
    }

    #[test]
    fn scan_tree_with_symlink_not_followed() {
        let (d, roots, db) = setup(&["*.tmp"]);
        let root = roots.roots[0].path.clone();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), b"must not be sent").unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), vec![7u8; 10_000]).unwrap();
        std::fs::write(root.join("top.txt"), b"hello").unwrap();
        std::fs::write(root.join("skip.tmp"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let changes = plan_all(&mut q, &roots, &db);
        let paths: Vec<(&str, EntryKind)> =
            changes.iter().map(|c| (c.path.as_str(), c.kind)).collect();
        assert_eq!(
            paths,
            vec![
                ("data", EntryKind::Dir),
                ("data/a", EntryKind::Dir),
                ("data/a/b", EntryKind::Dir),
                ("data/a/b/f.txt", EntryKind::File),
                ("data/link", EntryKind::Symlink),
                ("data/top.txt", EntryKind::File),
            ]
        );
        let link = &changes[4];
        assert_eq!(
            link.symlink_target.as_deref(),
            Some(outside.to_str().unwrap())
        );
        assert!(link.parts.is_empty());
        let f = &changes[3];
        assert_eq!(f.size, 10_000);
        assert_eq!(f.parts.len(), 3);
        assert_eq!(f.blake3, Some(BlobHash::of(&[7u8; 10_000])));
        // Parts 0 and 1 are equal: part 1 reuses part 0, sent earlier in the same batch.
        let bodies: Vec<u64> = f.parts.iter().map(|p| p.payload_bytes()).collect();
        assert_eq!(bodies, vec![4096, 0, 10_000 - 2 * 4096]);
        assert!(changes.iter().all(|c| c.change_id > 0));
        let ids: Vec<u64> = changes.iter().map(|c| c.change_id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));

        // Resume: once acknowledged, a second scan plans nothing.
        ack(&db, &changes);
        q.push_back(Work::scan_root(0));
        assert!(plan_all(&mut q, &roots, &db).is_empty());

        // A touched file (mtime only) is planned with every part reused.
        let t = std::fs::File::options()
            .write(true)
            .open(root.join("a/b/f.txt"))
            .unwrap();
        t.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        drop(t);
        // Deleted subtree: tombstones for the dir and everything below it.
        std::fs::remove_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/new.txt"), b"new").unwrap();
        std::fs::remove_file(root.join("top.txt")).unwrap();
        q.push_back(Work::scan_root(0));
        let changes = plan_all(&mut q, &roots, &db);
        let mut got: Vec<(String, bool)> = changes
            .iter()
            .map(|c| (c.path.clone(), c.deleted))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("data".into(), false),
                ("data/a".into(), false),
                ("data/a/b".into(), true),
                ("data/a/b/f.txt".into(), true),
                ("data/a/new.txt".into(), false),
                ("data/top.txt".into(), true),
            ]
        );
    }

    #[test]
    fn touched_file_reuses_all_parts_and_batches_are_bounded() {
        let (_d, roots, db) = setup(&[]);
        let root = roots.roots[0].path.clone();
        for i in 0..5 {
            std::fs::write(root.join(format!("f{i}")), vec![i as u8; 9000]).unwrap();
        }
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let mut id = 1;
        let limits = Limits {
            max_changes: 2,
            ..LIMITS
        };
        let mut batches = Vec::new();
        while !q.is_empty() {
            let b = build_batch(&mut q, &roots, &db, limits, &mut id).unwrap();
            assert!(b.len() <= 2);
            ack(&db, &b);
            batches.push(b);
        }
        assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 6);
        // Byte bound: each file is 9000 bytes of payload; 10000 allows one per batch.
        // Content without repeated parts (equal parts would be deduplicated).
        let varied =
            |seed: u32| -> Vec<u8> { (0..9000u32).map(|i| ((i * i + seed) % 251) as u8).collect() };
        std::fs::write(root.join("f0"), varied(1)).unwrap();
        std::fs::write(root.join("f1"), varied(2)).unwrap();
        let mut q = WorkQueue::default();
        for f in ["f0", "f1"] {
            q.push_back(Work::Path {
                root: 0,
                rel: f.into(),
                rename_from: None,
                walk: false,
                sweep: false,
            });
        }
        let limits = Limits {
            max_bytes: 10_000,
            ..LIMITS
        };
        let b1 = build_batch(&mut q, &roots, &db, limits, &mut id).unwrap();
        assert_eq!(b1.len(), 1);
        assert!(q.carried.is_some());
        let b2 = build_batch(&mut q, &roots, &db, limits, &mut id).unwrap();
        assert_eq!(b2.len(), 1);
        assert!(q.is_empty());
        assert!(b1[0].change_id < b2[0].change_id);
        ack(&db, &b1);
        ack(&db, &b2);

        // mtime-only change: header with every part reused.
        let t = std::fs::File::options()
            .write(true)
            .open(root.join("f2"))
            .unwrap();
        t.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(77))
            .unwrap();
        drop(t);
        q.push_back(Work::scan_root(0));
        let b = plan_all(&mut q, &roots, &db);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].path, "data/f2");
        assert_eq!(b[0].parts.len(), 3);
        assert_eq!(b[0].payload_bytes(), 0);
    }

    /// `rename(x, y)` then `unlink(y)` within one debounce window reaches the agent as the
    /// removal of `y` only (notify-debouncer-full keeps the rename in `y`'s queue and replaces it
    /// by the removal): `x`, acknowledged before, must still be deleted.
    #[test]
    fn removal_of_an_unknown_path_deletes_its_vanished_siblings() {
        let (_d, roots, db) = setup(&[]);
        let root = roots.roots[0].path.clone();
        std::fs::create_dir_all(root.join("dir/sub")).unwrap();
        std::fs::write(root.join("dir/x"), b"x").unwrap();
        std::fs::write(root.join("dir/keep"), b"k").unwrap();
        std::fs::write(root.join("dir/sub/deep"), b"d").unwrap();
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let all = plan_all(&mut q, &roots, &db);
        ack(&db, &all);
        std::fs::rename(root.join("dir/x"), root.join("dir/y")).unwrap();
        std::fs::remove_file(root.join("dir/y")).unwrap();
        // A deeper entry gone too is not the concern of this shallow look (its own event is).
        std::fs::remove_file(root.join("dir/sub/deep")).unwrap();
        q.push_back(Work::Path {
            root: 0,
            rel: "dir/y".into(),
            rename_from: None,
            walk: true,
            sweep: true,
        });
        let b = plan_all(&mut q, &roots, &db);
        let summary: Vec<(&str, bool)> = b.iter().map(|c| (c.path.as_str(), c.deleted)).collect();
        assert_eq!(summary, vec![("data/dir/x", true)]);
    }

    #[test]
    fn rename_reuses_content() {
        let (_d, roots, db) = setup(&[]);
        let root = roots.roots[0].path.clone();
        std::fs::create_dir(root.join("dir")).unwrap();
        std::fs::write(root.join("dir/x"), vec![3u8; 5000]).unwrap();
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let all = plan_all(&mut q, &roots, &db);
        ack(&db, &all);
        std::fs::rename(root.join("dir"), root.join("moved")).unwrap();
        q.push_back(Work::Path {
            root: 0,
            rel: "dir".into(),
            rename_from: None,
            walk: false,
            sweep: true,
        });
        q.push_back(Work::Path {
            root: 0,
            rel: "moved".into(),
            rename_from: Some("data/dir".into()),
            walk: true,
            sweep: true,
        });
        let b = plan_all(&mut q, &roots, &db);
        let summary: Vec<(&str, bool, Option<&str>, u64)> = b
            .iter()
            .map(|c| {
                (
                    c.path.as_str(),
                    c.deleted,
                    c.rename_from.as_deref(),
                    c.payload_bytes(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("data/dir", true, None, 0),
                ("data/dir/x", true, None, 0),
                ("data/moved", false, Some("data/dir"), 0),
                ("data/moved/x", false, Some("data/dir/x"), 0),
            ]
        );
    }

    #[test]
    fn own_data_dir_and_missing_root_are_safe() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let state_dir = root.join(".lifeboat");
        std::fs::create_dir_all(&state_dir).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        let db = StateDb::open(&state_dir).unwrap();
        let roots = Roots::new(
            &[PathConfig {
                name: "data".into(),
                path: root.clone(),
                include: vec!["**".into()],
                exclude: vec![],
                follow_active: true,
                max_delete_share: None,
                max_delete_files: None,
            }],
            &state_dir,
        )
        .unwrap();
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let changes = plan_all(&mut q, &roots, &db);
        let paths: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
        // The agent's own state directory is never replicated.
        assert_eq!(paths, vec!["data", "data/f"]);
        ack(&db, &changes);
        drop(db);

        // A vanished root (unmounted disk, typo) must not turn into tombstones.
        let (d2, roots2, db2) = setup(&[]);
        std::fs::write(roots2.roots[0].path.join("g"), b"y").unwrap();
        let mut q = WorkQueue::default();
        q.push_back(Work::scan_root(0));
        let changes = plan_all(&mut q, &roots2, &db2);
        ack(&db2, &changes);
        std::fs::remove_dir_all(&roots2.roots[0].path).unwrap();
        q.push_back(Work::scan_root(0));
        assert!(plan_all(&mut q, &roots2, &db2).is_empty());
        drop(d2);
    }
}
