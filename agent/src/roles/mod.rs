//! Directory roles follow the active region (issue 3, item 7).
//!
//! With a global group (a heartbeat reply carries a non-empty `active_region`), every
//! `[[paths]]` and `[[replicas]]` entry with `follow_active = true` (the default) is a **source**
//! (watched and pushed under its catalog name) while this agent's region is active, and a
//! **replica** (the region's catalog applied to it) otherwise. The role of each directory and the
//! epoch that ordered it are persisted ([`StateDb::set_roles`]); the agent runs with the
//! [`effective`] configuration and only acts on an epoch at least as new as the newest seen.
//!
//! A switch stops the agent's loop (the batch in flight may finish), runs the transitions below
//! with nothing watching or applying, persists the new roles and starts the loop again:
//!
//! - **replica → source** ([`promote`]): the replica applies everything committed in the
//!   region's catalog (complete up to the failover under synchronous replication); the versions
//!   it applied are already recorded as acknowledged state, so only real changes made after the
//!   promotion are pushed. Directory mtimes (changed by writing their children) are adopted.
//! - **source → replica** ([`demote`]): every local change the active region lacks (a file or
//!   symlink whose content differs from the acknowledged state: pending when the region was
//!   fenced, or made since) is pushed to the ACTIVE region's coordinators (addresses from the
//!   heartbeat reply) at [`conflict_path`]`(my region, epoch, path)`. Only once that batch is
//!   acknowledged is the directory made equal to the active region's catalog (the target
//!   version wins on disk, the source version is kept in the catalog: a conflict). When the
//!   active region cannot be reached the directory is left alone and the switch is retried with
//!   a backoff: local changes are never dropped. Local deletions and directory-only changes are
//!   not kept (there is no content to keep).

pub mod databases;
pub mod replica;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lifeboat_common::apply::{self, BlobClient};
use lifeboat_common::catalog::{conflict_path, EntryKind, FileVersion, CONFLICTS_ROOT};
use lifeboat_common::path::safe_join;
use lifeboat_common::MAX_MESSAGE_BYTES;
use lifeboat_proto as pb;
use lifeboat_proto::admin_service_client::AdminServiceClient;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::replication_service_client::ReplicationServiceClient;

use crate::config::{Config, PathConfig, ReplicaConfig};
use crate::files::batch::{build_batch, Limits, PlannedChange, Work, WorkQueue};
use crate::files::scan::{self, Filter, Found, Roots};
use crate::files::state::{AckedChange, DirRole, StateDb};
use crate::push::{PushClient, PushError, SendCounters, SendOptions};
use crate::roles::replica::{entry_of, Replica, TEMP_PREFIX};

/// How long one transition may keep trying before the switch is retried later.
pub const TRANSITION_TIMEOUT: Duration = Duration::from_secs(120);

/// An order from the control record: `active_region` takes writes under `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Epoch of the control record.
    pub epoch: u64,
    /// The active region.
    pub active_region: String,
    /// Its coordinators (`host:port`).
    pub active_coordinators: Vec<String>,
}

/// One directory of the config that may change roles.
#[derive(Debug, Clone)]
struct Dir {
    name: String,
    path: PathBuf,
    configured_source: bool,
    follow: bool,
    paths_entry: Option<PathConfig>,
}

fn dirs(cfg: &Config) -> Vec<Dir> {
    let mut out: Vec<Dir> = cfg
        .paths
        .iter()
        .map(|p| Dir {
            name: p.name.clone(),
            path: p.path.clone(),
            configured_source: true,
            follow: p.follow_active,
            paths_entry: Some(p.clone()),
        })
        .collect();
    out.extend(cfg.replicas.iter().map(|r| Dir {
        name: r.name.clone(),
        path: r.path.clone(),
        configured_source: false,
        follow: r.follow_active,
        paths_entry: None,
    }));
    out
}

fn current(d: &Dir, roles: &BTreeMap<String, DirRole>) -> bool {
    match roles.get(&d.name) {
        Some(r) if d.follow => r.source,
        _ => d.configured_source,
    }
}

fn as_path(d: &Dir) -> PathConfig {
    d.paths_entry.clone().unwrap_or_else(|| PathConfig {
        name: d.name.clone(),
        path: d.path.clone(),
        include: crate::config::defaults::INCLUDE
            .iter()
            .map(|s| s.to_string())
            .collect(),
        exclude: Vec::new(),
        follow_active: d.follow,
        max_delete_share: None,
        max_delete_files: None,
    })
}

/// The configuration the agent runs with: `cfg` with every following directory placed under
/// `[[paths]]` or `[[replicas]]` by its persisted role (the configured role when none is).
pub fn effective(cfg: &Config, roles: &BTreeMap<String, DirRole>) -> Config {
    let mut out = cfg.clone();
    out.paths.clear();
    out.replicas.clear();
    for d in dirs(cfg) {
        if current(&d, roles) {
            out.paths.push(as_path(&d));
        } else {
            out.replicas.push(ReplicaConfig {
                name: d.name.clone(),
                path: d.path.clone(),
                follow_active: d.follow,
            });
        }
    }
    out
}

/// Directories whose role must change under `order` for an agent of `cfg.region`: `(name,
/// becomes source)`. Empty without a global group (no active region) and when `order` is older
/// than a persisted role (refused).
pub fn switches(
    cfg: &Config,
    roles: &BTreeMap<String, DirRole>,
    order: &Order,
) -> Vec<(String, bool)> {
    if order.active_region.is_empty() || roles.values().any(|r| r.epoch > order.epoch) {
        return Vec::new();
    }
    let want = order.active_region == cfg.region;
    dirs(cfg)
        .into_iter()
        .filter(|d| d.follow && current(d, roles) != want)
        .map(|d| (d.name, want))
        .collect()
}

/// Following directories with no persisted role yet whose role `order` confirms: their role to
/// record (no transition needed).
pub fn unrecorded(
    cfg: &Config,
    roles: &BTreeMap<String, DirRole>,
    order: &Order,
) -> Vec<(String, DirRole)> {
    if order.active_region.is_empty() {
        return Vec::new();
    }
    let want = order.active_region == cfg.region;
    dirs(cfg)
        .into_iter()
        .filter(|d| d.follow && !roles.contains_key(&d.name) && current(d, roles) == want)
        .map(|d| {
            (
                d.name,
                DirRole {
                    source: want,
                    epoch: order.epoch,
                },
            )
        })
        .collect()
}

/// The role of every directory of `cfg` as `status.json` shows it.
pub fn describe(cfg: &Config, roles: &BTreeMap<String, DirRole>) -> BTreeMap<String, String> {
    dirs(cfg)
        .iter()
        .map(|d| {
            let r = if current(d, roles) {
                "source"
            } else {
                "replica"
            };
            (d.name.clone(), r.to_string())
        })
        .collect()
}

/// Runs the transition of directory `name` to `source` (see the module docs) and persists the
/// role. Does nothing but persist when the role does not change. Returns the number of local
/// changes kept as conflicts.
///
/// Errors: a message; nothing on disk was changed by a failed demotion before its conflicts
/// were acknowledged.
pub async fn transition(
    cfg: &Config,
    state: &Arc<StateDb>,
    roles: &BTreeMap<String, DirRole>,
    name: &str,
    source: bool,
    order: &Order,
    part_size: usize,
) -> Result<u64, String> {
    let d = dirs(cfg)
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| format!("no directory {name:?} in the config"))?;
    let was = current(&d, roles);
    let work = async {
        match (was, source) {
            (false, true) => promote(cfg, state, &d).await.map(|()| 0),
            (true, false) => demote(cfg, state, &d, order, part_size).await,
            _ => Ok(0),
        }
    };
    let kept = tokio::time::timeout(TRANSITION_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!("{name}: transition did not finish within {TRANSITION_TIMEOUT:?}")
        })??;
    let st = state.clone();
    let role = (
        name.to_string(),
        DirRole {
            source,
            epoch: order.epoch,
        },
    );
    tokio::task::spawn_blocking(move || st.set_roles(&[role]))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(kept)
}

/// Replica → source: apply everything committed, adopt directory metadata.
async fn promote(cfg: &Config, state: &Arc<StateDb>, d: &Dir) -> Result<(), String> {
    tracing::warn!(dir = %d.name, path = %d.path.display(), "promotion: this directory becomes a source; applying the rest of the region's catalog first");
    let mut r = Replica::new(
        ReplicaConfig {
            name: d.name.clone(),
            path: d.path.clone(),
            follow_active: true,
        },
        cfg.tls.clone(),
        cfg.coordinators.clone(),
        state.clone(),
        Arc::new(crate::status::ReplicaProgress::default()),
    )
    .recording(true);
    r.catch_up().await?;
    let (st, name, root) = (state.clone(), d.name.clone(), d.path.clone());
    tokio::task::spawn_blocking(move || adopt_dirs(&st, &name, &root))
        .await
        .map_err(|e| e.to_string())??;
    tracing::warn!(dir = %d.name, "promotion done: changes from now on are pushed");
    Ok(())
}

/// Records the on-disk mtime and mode of every acknowledged directory under `name` (writing
/// children changed them; the content is what the catalog holds).
fn adopt_dirs(state: &StateDb, name: &str, root: &Path) -> Result<(), String> {
    let e = |e: crate::files::state::StateError| e.to_string();
    let r = state.reader().map_err(e)?;
    let mut paths = vec![(name.to_string(), EntryKind::Dir)];
    let prefix = format!("{name}/");
    let mut after: Option<String> = None;
    loop {
        let page = r.paths_under(&prefix, after.as_deref(), 1024).map_err(e)?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        paths.extend(page.into_iter().filter(|(_, k)| *k == EntryKind::Dir));
    }
    let mut changes = Vec::new();
    for (wire, _) in paths {
        let Some(mut entry) = r.get(&wire).map_err(e)? else {
            continue;
        };
        let rel = wire.strip_prefix(&prefix).unwrap_or("");
        let disk = if rel.is_empty() {
            root.to_path_buf()
        } else {
            match safe_join(root, rel, true) {
                Ok(p) => p,
                Err(_) => continue,
            }
        };
        if let Ok(Found::Entry(m)) = scan::lstat(&disk) {
            if m.kind == EntryKind::Dir && entry.kind == EntryKind::Dir {
                entry.mtime_ns = m.mtime_ns;
                entry.mode = m.mode;
                changes.push(AckedChange::Upsert {
                    path: wire,
                    entry,
                    signatures: Vec::new(),
                });
            }
        }
    }
    drop(r);
    state.commit(&changes, 0, 0).map_err(e)
}

/// A replica directory that follows the active region: local changes made in it (e.g. by an
/// application of a fenced region still writing after the directory became a replica) are
/// handed to the active region as conflicts, then the active region's version of those paths is
/// put back (or the path removed when it has none). Returns how many were kept.
///
/// Call with nothing else writing into the directory (the replica task calls it between
/// batches). Errors: a message; nothing on disk is changed before the conflicts are
/// acknowledged.
pub async fn keep_local_changes(
    cfg: &Config,
    state: &Arc<StateDb>,
    name: &str,
    order: &Order,
    part_size: usize,
) -> Result<u64, String> {
    let Some(d) = dirs(cfg).into_iter().find(|d| d.name == name) else {
        return Ok(0);
    };
    if order.active_region.is_empty() || order.active_region == cfg.region {
        return Ok(0);
    }
    let kept = push_conflicts(cfg, state, &d, order, part_size).await?;
    if kept.is_empty() {
        return Ok(0);
    }
    tracing::warn!(dir = %name, conflicts = kept.len(), active = %order.active_region, epoch = order.epoch, "local changes in a replica kept as conflicts (see `lifeboat conflicts`); the active region's versions are put back");
    let root = d.path.canonicalize().map_err(|e| e.to_string())?;
    let rows = list_active(cfg, order, name).await?;
    let mut acked = Vec::new();
    let mut blobs: Option<BlobClient> = None;
    for path in &kept {
        let rel = path.strip_prefix(&format!("{name}/")).unwrap_or(path);
        match rows.iter().find(|v| &v.v.path == path) {
            Some(v) if v.v.kind == EntryKind::File => {
                write_active(cfg, order, &mut blobs, &root, rel, v).await?;
                acked.push(AckedChange::Upsert {
                    path: path.clone(),
                    entry: entry_of(v),
                    signatures: Vec::new(),
                });
            }
            Some(v) if v.v.kind == EntryKind::Symlink => {
                let target = v.v.symlink_target.clone().unwrap_or_default();
                apply::write_symlink(&root, rel, &target, v.v.mtime_ns, true)
                    .map_err(|e| e.to_string())?;
                acked.push(AckedChange::Upsert {
                    path: path.clone(),
                    entry: entry_of(v),
                    signatures: Vec::new(),
                });
            }
            _ => {
                let p = safe_join(&root, rel, true).map_err(|e| e.to_string())?;
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove a file the active region does not have");
                }
                acked.push(AckedChange::Delete { path: path.clone() });
            }
        }
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.commit(&acked, 0, 0))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(kept.len() as u64)
}

/// Source → replica: conflicts to the active region, then the directory made equal to its
/// catalog.
async fn demote(
    cfg: &Config,
    state: &Arc<StateDb>,
    d: &Dir,
    order: &Order,
    part_size: usize,
) -> Result<u64, String> {
    if order.active_coordinators.is_empty() {
        return Err(format!(
            "the heartbeat reply names no coordinator of the active region {}; cannot hand over {}",
            order.active_region, d.name
        ));
    }
    tracing::warn!(dir = %d.name, active = %order.active_region, epoch = order.epoch, "this region is no longer active: keeping local changes as conflicts in the active region, then this directory becomes a replica");
    let kept_paths = push_conflicts(cfg, state, d, order, part_size).await?;
    let kept = kept_paths.len() as u64;
    if kept > 0 {
        tracing::warn!(dir = %d.name, conflicts = kept, active = %order.active_region, epoch = order.epoch, "local changes kept as conflicts (see `lifeboat conflicts`)");
    }
    // Own catalog position first: every row at or below it is in the active region's catalog
    // read next (the standby copies the active region).
    let own_seq = own_last_seq(cfg).await?;
    let rows = list_active(cfg, order, &d.name).await?;
    let acked = reconcile(cfg, state, d, order, &rows, &kept_paths).await?;
    let (st, name) = (state.clone(), d.name.clone());
    tokio::task::spawn_blocking(move || st.replica_commit(&name, own_seq, &[], &acked, &[]))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    tracing::warn!(dir = %d.name, entries = rows.len(), from_seq = own_seq + 1, "directory equals the active region's catalog; following it as a replica");
    Ok(kept)
}

/// Plans every local change of `d` against the acknowledged state and pushes the files and
/// symlinks whose content the active region lacks as conflicts. Returns how many.
async fn push_conflicts(
    cfg: &Config,
    state: &Arc<StateDb>,
    d: &Dir,
    order: &Order,
    part_size: usize,
) -> Result<Vec<String>, String> {
    let pc = as_path(d);
    let roots = Arc::new(Roots::new(&[pc], &cfg.data_dir).map_err(|e| e.to_string())?);
    let mut queue = WorkQueue::default();
    queue.push_back(Work::scan_root(0));
    let client = PushClient::new(
        cfg.tls.clone(),
        order.active_coordinators.clone(),
        part_size,
    );
    let counters = Arc::new(SendCounters::default());
    let limits = Limits {
        max_bytes: cfg.batch_max_bytes,
        max_changes: cfg.batch_max_changes,
        part_size,
        retain_bytes: crate::files::batch::DEFAULT_RETAIN_BYTES.min(cfg.batch_max_bytes),
    };
    let mut next_id = 1u64;
    let mut kept = Vec::new();
    while !queue.is_empty() {
        let (st, r) = (state.clone(), roots.clone());
        let (q, n, planned) = tokio::task::spawn_blocking(move || {
            let mut q = queue;
            let mut n = next_id;
            let res = build_batch(&mut q, &r, &st, limits, &mut n);
            (q, n, res)
        })
        .await
        .map_err(|e| e.to_string())?;
        queue = q;
        next_id = n;
        let planned = planned.map_err(|e| e.to_string())?;
        let reader = state.reader().map_err(|e| e.to_string())?;
        let mut batch = Vec::new();
        for mut c in planned {
            let temp = c
                .rel
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX));
            if temp {
                continue; // a replica's unfinished write
            }
            if c.deleted || c.kind == EntryKind::Dir {
                if c.deleted && c.kind != EntryKind::Dir {
                    tracing::warn!(path = %c.path, "a deletion made here is not kept: the active region's version comes back");
                }
                continue;
            }
            let old = reader.get(&c.path).map_err(|e| e.to_string())?;
            let same = old.is_some_and(|o| {
                o.kind == c.kind && o.blake3 == c.blake3 && o.symlink_target == c.symlink_target
            });
            if same {
                continue; // metadata only: nothing to keep
            }
            kept.push(c.path.clone());
            c.path = conflict_path(&cfg.region, order.epoch, &c.path);
            c.root_name = CONFLICTS_ROOT.to_string();
            c.rename_from = None;
            batch.push(c);
        }
        drop(reader);
        if batch.is_empty() {
            continue;
        }
        send_until_acked(&client, batch, order.epoch, &counters).await?;
    }
    Ok(kept)
}

/// Pushes `batch` to the active region until acknowledged (leader following, full resend on a
/// missing base, backoff); gives up with an error on a refusal or after [`TRANSITION_TIMEOUT`]
/// (the caller's timeout).
async fn send_until_acked(
    client: &PushClient,
    batch: Vec<PlannedChange>,
    epoch: u64,
    counters: &Arc<SendCounters>,
) -> Result<(), String> {
    let batch = Arc::new(batch);
    let mut force_full = false;
    let mut backoff = Duration::from_millis(200);
    let mut failures = 0u32;
    loop {
        let opts = SendOptions { force_full, epoch };
        match client.push(batch.clone(), opts, counters.clone()).await {
            Ok(reply) => {
                let acked: BTreeSet<u64> = reply.acks.iter().map(|a| a.change_id).collect();
                if batch.iter().all(|c| acked.contains(&c.change_id)) {
                    return Ok(());
                }
                return Err("the active region did not acknowledge every conflict".into());
            }
            Err(PushError::NotLeader { leader }) => {
                client.coordinators.redirect(&leader);
                continue;
            }
            Err(PushError::BaseMissing(_)) if !force_full => force_full = true,
            Err(e @ (PushError::Invalid { .. } | PushError::Changed { .. })) => {
                return Err(format!("conflict batch not accepted: {e}"))
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, failures, "cannot push conflicts to the active region; retrying");
                let failed = client.coordinators.current();
                client.coordinators.rotate(&failed);
                if failures > 12 {
                    return Err(format!("active region unreachable: {e}"));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A channel to `addr`, or `None` with the reason noted in `errors`.
fn channel_to(
    cfg: &Config,
    addr: &str,
    errors: &mut Vec<String>,
) -> Option<tonic::transport::Channel> {
    match cfg.tls.channel(addr) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(format!("{addr}: {e}"));
            None
        }
    }
}

/// Newest sequence number of this region's catalog (any coordinator's committed prefix).
async fn own_last_seq(cfg: &Config) -> Result<u64, String> {
    let mut errors = Vec::new();
    for addr in &cfg.coordinators {
        let Some(ch) = channel_to(cfg, addr, &mut errors) else {
            continue;
        };
        let mut c = ReplicationServiceClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let req = pb::SubscribeRequest {
            from_seq: u64::MAX,
            follow: false,
            max_rows: 1,
            any_node: true,
        };
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = c.subscribe_catalog(req).await?.into_inner();
            s.message().await
        })
        .await;
        match res {
            Ok(Ok(Some(b))) => return Ok(b.last_seq),
            Ok(Ok(None)) => errors.push(format!("{addr}: empty answer")),
            Ok(Err(s)) => errors.push(format!("{addr}: {}", s.message())),
            Err(_) => errors.push(format!("{addr}: timeout")),
        }
    }
    Err(format!(
        "cannot read this region's catalog position: {}",
        errors.join("; ")
    ))
}

/// The active region's latest live versions under `name`.
async fn list_active(cfg: &Config, order: &Order, name: &str) -> Result<Vec<FileVersion>, String> {
    let mut errors = Vec::new();
    for addr in &order.active_coordinators {
        let Some(ch) = channel_to(cfg, addr, &mut errors) else {
            continue;
        };
        let mut c = AdminServiceClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let res = tokio::time::timeout(Duration::from_secs(60), async {
            let mut s = c
                .list_versions(pb::ListVersionsRequest {
                    prefix: name.to_string(),
                    at_ms: 0,
                    all_versions: false,
                    include_deleted: false,
                })
                .await?
                .into_inner();
            let mut rows = Vec::new();
            while let Some(r) = s.next().await {
                rows.push(r?);
            }
            Ok::<_, tonic::Status>(rows)
        })
        .await;
        match res {
            Ok(Ok(rows)) => {
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let v = FileVersion::from_pb(r).map_err(|e| format!("bad row: {e}"))?;
                    if v.v.path == name || v.v.path.starts_with(&format!("{name}/")) {
                        out.push(v);
                    }
                }
                out.sort_by(|a, b| a.v.path.cmp(&b.v.path));
                return Ok(out);
            }
            Ok(Err(s)) => errors.push(format!("{addr}: {}", s.message())),
            Err(_) => errors.push(format!("{addr}: timeout")),
        }
    }
    Err(format!(
        "cannot list the active region's catalog: {}",
        errors.join("; ")
    ))
}

/// Makes `d` equal to `rows` (the active region's latest versions): differing entries written
/// (verified, temp + fsync + rename, never through a symlink), entries the catalog lacks
/// removed (excluded ones and the agent's data dir left alone). A file or symlink the catalog
/// lacks that is neither in `kept` (handed over as a conflict) nor equal to its acknowledged
/// state was written after the conflicts were planned: it is left in place, and the replica's
/// watchdog keeps it as a conflict on its next look (`keep_local_changes`), never deleted
/// unkept. Returns the acknowledged state to record: every row, and a removal for every other
/// path recorded under the root.
async fn reconcile(
    cfg: &Config,
    state: &Arc<StateDb>,
    d: &Dir,
    order: &Order,
    rows: &[FileVersion],
    kept: &[String],
) -> Result<Vec<AckedChange>, String> {
    std::fs::create_dir_all(&d.path).map_err(|e| format!("{}: {e}", d.path.display()))?;
    let root = d.path.canonicalize().map_err(|e| e.to_string())?;
    let filter = Filter::new(&as_path(d)).map_err(|e| e.to_string())?;
    let data_dir = cfg
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| cfg.data_dir.clone());
    let mut blobs: Option<BlobClient> = None;
    let prefix = format!("{}/", d.name);
    let mut wanted = BTreeSet::new();
    let mut acked = Vec::new();
    for v in rows {
        acked.push(AckedChange::Upsert {
            path: v.v.path.clone(),
            entry: entry_of(v),
            signatures: Vec::new(),
        });
        let Some(rel) = v.v.path.strip_prefix(&prefix) else {
            continue; // the root itself
        };
        wanted.insert(rel.to_string());
        let disk = safe_join(&root, rel, true).map_err(|e| e.to_string())?;
        let found = scan::lstat(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        match v.v.kind {
            EntryKind::Dir => {
                apply::mkdirs(&root, rel).map_err(|e| e.to_string())?;
                apply::set_dir_meta(&root, rel, v.v.mode, v.v.mtime_ns)
                    .map_err(|e| e.to_string())?;
            }
            EntryKind::Symlink => {
                let target = v.v.symlink_target.clone().unwrap_or_default();
                let same = matches!(&found, Found::Entry(m) if m.symlink_target.as_deref() == Some(target.as_str()));
                if !same {
                    apply::write_symlink(&root, rel, &target, v.v.mtime_ns, true)
                        .map_err(|e| e.to_string())?;
                }
            }
            EntryKind::File => {
                let same = match &found {
                    Found::Entry(m) if m.kind == EntryKind::File && m.size == v.v.size => {
                        lifeboat_common::blob::BlobHash::of_file(&disk).ok() == v.v.blake3
                    }
                    _ => false,
                };
                if same {
                    set_file_meta(&disk, v.v.mode, v.v.mtime_ns)
                        .map_err(|e| format!("{}: {e}", disk.display()))?;
                    continue;
                }
                write_active(cfg, order, &mut blobs, &root, rel, v).await?;
            }
        }
    }
    // Entries the active region does not have: removed (deepest first).
    let mut extra = Vec::new();
    walk(&root, "", &mut extra).map_err(|e| format!("{}: {e}", root.display()))?;
    extra.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (rel, is_dir) in extra {
        if wanted.contains(&rel) || filter.is_excluded(&rel) || !filter.includes(&rel) {
            continue;
        }
        let p = root.join(&rel);
        if data_dir.starts_with(&p) || p.starts_with(&data_dir) {
            continue;
        }
        let wire = format!("{prefix}{rel}");
        let temp = rel
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if !is_dir && !temp && !kept.contains(&wire) && unkept_change(state, &wire, &p) {
            tracing::warn!(path = %p.display(), "changed after the hand-over was planned: left for the replica's next look, which keeps it as a conflict");
            continue;
        }
        let r = if is_dir {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => {
                tracing::info!(path = %p.display(), "removed: the active region does not have it (kept as a conflict when it had content)")
            }
            Err(e) => tracing::debug!(path = %p.display(), error = %e, "left in place"),
        }
    }
    // State: forget what this root had beyond the active region's rows.
    let keep: BTreeSet<String> = rows.iter().map(|v| v.v.path.clone()).collect();
    let r = state.reader().map_err(|e| e.to_string())?;
    let mut after: Option<String> = None;
    loop {
        let page = r
            .paths_under(&prefix, after.as_deref(), 1024)
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        for (path, _) in page {
            if !keep.contains(&path) {
                acked.push(AckedChange::Delete { path });
            }
        }
    }
    Ok(acked)
}

/// Sets mode and mtime of the regular file `p` (already checked with `lstat`).
/// Whether the entry at `p` (wire path `wire`) differs from its acknowledged state here (or has
/// none): a local change. Unreadable state counts as a change (nothing is deleted on doubt).
fn unkept_change(state: &StateDb, wire: &str, p: &Path) -> bool {
    let acked = match state.reader().and_then(|r| r.get(wire)) {
        Ok(Some(a)) => a,
        _ => return true,
    };
    match scan::lstat(p) {
        Ok(Found::Entry(m)) if m.kind == acked.kind => match m.kind {
            EntryKind::File => lifeboat_common::blob::BlobHash::of_file(p).ok() != acked.blake3,
            EntryKind::Symlink => m.symlink_target != acked.symlink_target,
            EntryKind::Dir => false,
        },
        Ok(Found::Entry(_)) => true,
        _ => false,
    }
}

fn set_file_meta(p: &Path, mode: u32, mtime_ns: i64) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    f.set_modified(apply::mtime(mtime_ns))?;
    f.sync_all()
}

/// Every entry under `dir` (relative to the walk's root `rel`), symlinks not followed:
/// `(relative path, is a directory)`.
fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, bool)>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = e.file_type()?.is_dir();
        if is_dir {
            walk(&e.path(), &r, out)?;
        }
        out.push((r, is_dir));
    }
    Ok(())
}

/// Writes file version `v` of the active region at `rel` under `root` (verified, temp + fsync +
/// rename), connecting `blobs` on first use.
async fn write_active(
    cfg: &Config,
    order: &Order,
    blobs: &mut Option<BlobClient>,
    root: &Path,
    rel: &str,
    v: &FileVersion,
) -> Result<(), String> {
    if blobs.is_none() {
        *blobs = Some(blob_client(cfg, order)?);
    }
    let c = blobs.as_ref().expect("set above");
    apply::write_file(c, root, rel, v, TEMP_PREFIX, true)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A blob client on the first active-region coordinator (blobs are on every node).
fn blob_client(cfg: &Config, order: &Order) -> Result<BlobClient, String> {
    let addr = order
        .active_coordinators
        .first()
        .ok_or("no coordinator of the active region")?;
    let ch = cfg.tls.channel(addr).map_err(|e| e.to_string())?;
    Ok(BlobServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let mut c = Config::new("a1", "/var/lib/agent".into(), vec!["127.0.0.1:1".into()]);
        c.region = "a".into();
        c.paths.push(PathConfig {
            name: "data".into(),
            path: "/srv/data".into(),
            include: vec!["**".into()],
            exclude: vec!["*.tmp".into()],
            follow_active: true,
            max_delete_share: None,
            max_delete_files: None,
        });
        c.paths.push(PathConfig {
            name: "pinned".into(),
            path: "/srv/pinned".into(),
            include: vec!["**".into()],
            exclude: vec![],
            follow_active: false,
            max_delete_share: None,
            max_delete_files: None,
        });
        c.replicas.push(ReplicaConfig {
            name: "other".into(),
            path: "/srv/replica/other".into(),
            follow_active: true,
        });
        c
    }

    fn order(epoch: u64, active: &str) -> Order {
        Order {
            epoch,
            active_region: active.into(),
            active_coordinators: vec!["127.0.0.1:2".into()],
        }
    }

    #[test]
    fn roles_follow_the_active_region() {
        let c = cfg();
        let mut roles = BTreeMap::new();
        // Without a global group nothing changes.
        assert!(switches(&c, &roles, &order(0, "")).is_empty());
        assert!(unrecorded(&c, &roles, &order(0, "")).is_empty());
        // Region a active: the replica becomes a source; data is confirmed as one.
        assert_eq!(
            switches(&c, &roles, &order(1, "a")),
            vec![("other".to_string(), true)]
        );
        assert_eq!(
            unrecorded(&c, &roles, &order(1, "a")),
            vec![(
                "data".to_string(),
                DirRole {
                    source: true,
                    epoch: 1
                }
            )]
        );
        // b active at epoch 2: every following directory is a replica, the pinned one stays.
        assert_eq!(
            switches(&c, &roles, &order(2, "b")),
            vec![("data".to_string(), false)]
        );
        roles.insert(
            "data".to_string(),
            DirRole {
                source: false,
                epoch: 2,
            },
        );
        let eff = effective(&c, &roles);
        let names = |v: &[PathConfig]| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&eff.paths), vec!["pinned"]);
        assert_eq!(
            eff.replicas
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            vec!["data", "other"]
        );
        eff.validate().unwrap();
        // An order older than a persisted role is refused.
        assert!(switches(&c, &roles, &order(1, "a")).is_empty());
        // Failback at epoch 3: data is a source again with its globs.
        roles.insert(
            "data".to_string(),
            DirRole {
                source: true,
                epoch: 3,
            },
        );
        let eff = effective(&c, &roles);
        let data = eff.paths.iter().find(|p| p.name == "data").unwrap();
        assert_eq!(data.exclude, vec!["*.tmp"]);
        // A replica promoted gets every entry.
        roles.insert(
            "other".to_string(),
            DirRole {
                source: true,
                epoch: 3,
            },
        );
        let eff = effective(&c, &roles);
        assert!(eff.replicas.is_empty());
        assert_eq!(names(&eff.paths), vec!["data", "pinned", "other"]);
        assert_eq!(
            describe(&c, &roles).get("other").map(String::as_str),
            Some("source")
        );
    }
}
