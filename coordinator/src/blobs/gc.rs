//! Garbage collection: expired catalog history and the blobs nothing references any more.
//!
//! A pass runs on the region's leader (every `[gc] interval`, or at once by `lifeboat gc`):
//!
//! 1. **History pruning**: `PruneHistory { cutoff_ms = now - keep_history }` through Raft removes
//!    every version superseded at or before the cutoff (the newest version of a path, a
//!    tombstone included, is always kept; see `raft::state_machine`).
//! 2. **Sweep**: the leader lists its blob store; blobs older than `grace` that no stored
//!    version references (`catalog.refs`) are proposed in `ForgetBlobs` entries. Applying one
//!    re-checks the references, records the rest in `catalog.condemned`, and every node then
//!    deletes them from its own local store (a shared S3 store: this pass deletes them, once
//!    they are condemned).
//!
//! **Safety** (no blob still referenced, or about to be, is deleted):
//! - Every intake batch (and every standby replication batch) holds [`GcLock`] shared from its
//!   first blob existence check or write until its commit is applied; a pass holds it exclusive
//!   while it proposes `ForgetBlobs` and until they are applied (and, for a shared store,
//!   deleted). So no batch that found a blob present, or skipped writing it because it was
//!   present, is between its check and its commit when the blob is condemned.
//! - Both start only once the leader applied an entry of its own term
//!   ([`wait_term_applied`]): every entry of an earlier leader (a `ForgetBlobs` a deposed
//!   leader proposed) is applied by then, so no check can precede such a deletion.
//! - A part that is condemned counts as missing: the intake answers `base_missing` for a reused
//!   one (the agent forgets its acknowledged-blob cache entry and sends the data again) and
//!   stores and copies a sent one again, listing it in the commit's `restored`. Applying a
//!   commit that references a condemned part it does not list is rejected whole (a
//!   deterministic backstop; the intake turns it into `base_missing`).
//! - A blob copied to a follower carries the leader's last `ForgetBlobs` index
//!   ([`GC_INDEX_HEADER`]); the follower stores it only after it applied that index (and its
//!   deletions), so a deletion decided earlier never removes the new copy.
//! - Blobs younger than `grace` are never candidates (parts `PutParts` stored ahead of the
//!   commit of a running snapshot; a local `put` of an existing blob renews its mtime).
//!
//! Gap: with a shared (S3) store the deletions are requests of the leader; a deposed leader
//! paused between its leadership check and a DeleteObject, while its successor stores the same
//! content again, could remove that new copy. Each batch of deletions re-checks leadership
//! first (`ensure_linearizable`), which makes the window milliseconds.

// Catalog reads return openraft's `StorageError` (224 bytes), fixed by its storage traits.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::blob::BlobHash;
use serde::Serialize;
use tonic::Status;

use crate::blobs::Blobs;
use crate::config::GcConfig;
use crate::leader::LeaderInfo;
use crate::raft::{Catalog, CatalogCommand, RegionRaft};

/// Serializes intake batches (shared) with garbage collection passes (exclusive).
pub type GcLock = Arc<tokio::sync::RwLock<()>>;

/// Request header of a blob copy to a follower (`PutBlobs`): the log index of the newest
/// `ForgetBlobs` the leader applied; the follower stores the copy only after applying it.
pub const GC_INDEX_HEADER: &str = "x-lifeboat-gc-index";

/// Hashes per `ForgetBlobs` entry (each hash is about 100 bytes of JSON in the log).
const FORGET_CHUNK: usize = 2000;
/// How long intake waits for a new leader to apply its first entry.
const TERM_WAIT: Duration = Duration::from_secs(10);

/// Waits until this node, as leader, applied an entry of its current term (every entry of
/// earlier leaders is then applied). Returns at once in the steady state.
///
/// Errors: `UNAVAILABLE` when that does not happen within 10 s (not leader any more, no quorum).
pub async fn wait_term_applied(raft: &RegionRaft) -> Result<(), Status> {
    let ok = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
        m.last_applied
            .is_some_and(|l| l.leader_id.term == m.current_term)
    };
    if ok(&raft.metrics().borrow()) {
        return Ok(());
    }
    raft.wait(Some(TERM_WAIT))
        .metrics(ok, "leader applied an entry of its term")
        .await
        .map(|_| ())
        .map_err(|e| {
            Status::unavailable(format!(
                "the leader has not applied an entry of its term yet ({e}); retry"
            ))
        })
}

/// What one pass did (or, dry run, would do).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Versions superseded at or before this time (ms since the Unix epoch) were pruned.
    pub cutoff_ms: i64,
    /// Versions removed from the catalog.
    pub versions_pruned: u64,
    /// Blobs in the leader's store.
    pub blobs_listed: u64,
    /// Blobs condemned (and deleted).
    pub blobs_condemned: u64,
    /// Stored bytes of the condemned blobs (per copy).
    pub bytes_freed: u64,
    /// Blobs kept because a version references them.
    pub kept_referenced: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub kept_young: u64,
    /// Condemned blobs the pass failed to delete from a shared store (left behind; a later
    /// pass finds them again).
    pub delete_failed: u64,
}

/// Runs garbage collection passes on this node while it leads the region.
#[derive(Clone)]
pub struct Gc {
    /// Regional Raft.
    pub raft: RegionRaft,
    /// Catalog reads.
    pub catalog: Catalog,
    /// Blob store access.
    pub blobs: Blobs,
    /// Shared with the intake and the replicator.
    pub lock: GcLock,
    /// `[gc]`.
    pub cfg: GcConfig,
    /// Leader lookup.
    pub leader: LeaderInfo,
    /// Region name (for logs).
    pub region: String,
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Runs a catalog read on the blocking pool.
///
/// Errors: INTERNAL naming the storage failure.
async fn catalog_read<T: Send + 'static>(
    catalog: &Catalog,
    f: impl FnOnce(&Catalog) -> Result<T, crate::raft::types::StorageError> + Send + 'static,
) -> Result<T, Status> {
    let cat = catalog.clone();
    tokio::task::spawn_blocking(move || f(&cat).map_err(|e| e.to_string()))
        .await
        .map_err(internal)?
        .map_err(|e| Status::internal(format!("catalog read: {e}")))
}

impl Gc {
    /// One pass now (see the module doc). `dry_run` changes nothing and reports what would go
    /// (the blobs counted then are those unreferenced once the prunable versions are gone).
    ///
    /// Errors: `UNAVAILABLE` (redirect) when this node is not the leader; Raft or store
    /// failures.
    pub async fn run_pass(&self, dry_run: bool) -> Result<GcReport, Status> {
        let r = self.pass(dry_run).await;
        crate::metrics::COUNTERS.gc_pass(dry_run, &r);
        r
    }

    /// [`Gc::run_pass`] without counting it in `/metrics`.
    async fn pass(&self, dry_run: bool) -> Result<GcReport, Status> {
        self.leader.ensure_leader()?;
        wait_term_applied(&self.raft).await?;
        let now = lifeboat_common::now_ms();
        let cutoff_ms = now.saturating_sub(self.cfg.keep_history.as_millis_i64());
        let mut report = GcReport {
            dry_run,
            cutoff_ms,
            ..Default::default()
        };
        // References the prunable versions hold (dry run only: they are still stored).
        let mut pruned_refs: HashMap<BlobHash, u64> = HashMap::new();
        if dry_run {
            let doomed = catalog_read(&self.catalog, move |c| c.prunable(cutoff_ms)).await?;
            report.versions_pruned = doomed.len() as u64;
            for p in doomed.iter().flat_map(|v| v.v.parts.iter()) {
                *pruned_refs.entry(p.hash).or_default() += 1;
            }
        } else {
            let resp = self
                .raft
                .client_write(CatalogCommand::PruneHistory { cutoff_ms })
                .await
                .map_err(|e| self.leader.commit_error(e))?;
            report.versions_pruned = resp.data.pruned;
        }

        // Candidates: listed outside the lock (a blob stored or reused meanwhile is either
        // young or referenced when `ForgetBlobs` is applied, which re-checks).
        let listed = self.blobs.store.list().await.map_err(internal)?;
        report.blobs_listed = listed.len() as u64;
        let young_after = now.saturating_sub(self.cfg.grace.as_millis_i64());
        let (old, young): (Vec<_>, Vec<_>) = listed
            .into_iter()
            .partition(|b| b.modified_ms <= young_after);
        let hashes: Vec<BlobHash> = old.iter().map(|b| b.hash).collect();
        let counts = catalog_read(&self.catalog, move |c| c.refcounts(&hashes)).await?;
        let mut candidates = Vec::new();
        let mut sizes: HashMap<BlobHash, u64> = HashMap::new();
        for (b, n) in old.iter().zip(counts) {
            let n = n.saturating_sub(pruned_refs.get(&b.hash).copied().unwrap_or(0));
            if n > 0 {
                report.kept_referenced += 1;
            } else {
                candidates.push(b.hash);
                sizes.insert(b.hash, b.stored_bytes);
            }
        }
        // Young blobs: referenced or not, they stay; count the unreferenced ones.
        let young_hashes: Vec<BlobHash> = young.iter().map(|b| b.hash).collect();
        let young_counts = catalog_read(&self.catalog, move |c| c.refcounts(&young_hashes)).await?;
        for n in young_counts {
            if n > 0 {
                report.kept_referenced += 1;
            } else {
                report.kept_young += 1;
            }
        }
        if dry_run {
            report.blobs_condemned = candidates.len() as u64;
            report.bytes_freed = sizes.values().sum();
            return Ok(report);
        }
        if candidates.is_empty() {
            return Ok(report);
        }

        let _exclusive = self.lock.write().await;
        self.leader.ensure_leader()?;
        wait_term_applied(&self.raft).await?;
        let mut condemned = Vec::new();
        for chunk in candidates.chunks(FORGET_CHUNK) {
            let resp = self
                .raft
                .client_write(CatalogCommand::ForgetBlobs {
                    hashes: chunk.to_vec(),
                })
                .await
                .map_err(|e| self.leader.commit_error(e))?;
            report.kept_referenced += (chunk.len() - resp.data.condemned.len()) as u64;
            condemned.extend(resp.data.condemned);
        }
        report.blobs_condemned = condemned.len() as u64;
        report.bytes_freed = condemned
            .iter()
            .map(|h| sizes.get(h).copied().unwrap_or(0))
            .sum();
        if self.blobs.store.is_shared() {
            for chunk in condemned.chunks(256) {
                if self.raft.ensure_linearizable().await.is_err() {
                    report.delete_failed += chunk.len() as u64;
                    continue;
                }
                for h in chunk {
                    if let Err(e) = self.blobs.store.delete(h).await {
                        report.delete_failed += 1;
                        tracing::warn!(blob = %h, error = %e, "could not delete a condemned blob from the shared store");
                    }
                }
            }
        }
        Ok(report)
    }

    /// Runs a pass every `[gc] interval` while this node leads (none when the interval is 0).
    pub fn spawn_timer(self) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.cfg.interval.0;
        if every.is_zero() {
            return None;
        }
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if self.leader.leader_id() != Some(self.leader.node_id) {
                    continue;
                }
                match self.run_pass(false).await {
                    Ok(r) => {
                        tracing::info!(region = %self.region, node = self.leader.node_id, versions_pruned = r.versions_pruned, blobs_condemned = r.blobs_condemned, bytes_freed = r.bytes_freed, kept_referenced = r.kept_referenced, kept_young = r.kept_young, "garbage collection pass")
                    }
                    Err(e) => {
                        tracing::warn!(region = %self.region, node = self.leader.node_id, error = %e.message(), "garbage collection pass failed")
                    }
                }
            }
        }))
    }
}
