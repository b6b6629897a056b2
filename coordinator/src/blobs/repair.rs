//! Blob repair (backfill, anti-entropy) and per-member health.
//!
//! With a local blob store the leader copies each new blob to a majority of voters only, and a
//! node that was down, or joined later, lacks what was written meanwhile. Every node runs
//! [`Repair::spawn`]: every `[blobs] repair_interval_ms` it walks its own catalog's referenced
//! blobs (`catalog.refs`, every committed part, in pages of [`PAGE`] hashes) against its local
//! store, and pulls what it lacks from its peers (`FetchBlobs` with `x-lifeboat-no-forward`,
//! [`FETCH_BATCH`] per call, at most `repair_max_bytes_per_s`), verifying each blob's hash
//! before storing it (temp + fsync + rename). Memory is bounded: at most [`MISSING_CAP`] missing
//! hashes are kept per scan; the next scan finds the rest. A restart simply scans again: blobs
//! already fetched are on disk (resumable).
//!
//! Garbage collection: only blobs that are referenced and not condemned are fetched; after a
//! store, if a `ForgetBlobs` was applied meanwhile and condemned the blob, the copy is deleted
//! again (the state machine may have deleted the old copy before this one landed), so repair
//! never resurrects a condemned blob.
//!
//! The same task answers `BlobHealth` (the last scan) and probes every member once a second
//! ([`PROBE_EVERY`]), which gives `lifeboat status` each member's reachability, last contact,
//! applied index and blob completeness, and lets membership changes check blob durability.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_proto::{BlobHealthReply, BlobHealthRequest, FetchBlobsRequest};
use parking_lot::Mutex;
use tonic::Request;

use crate::blobs::{Blobs, NO_FORWARD_HEADER};
use crate::raft::{Catalog, NodeId, RegionRaft};

/// Referenced hashes read per catalog read transaction during a scan.
pub const PAGE: usize = 1024;
/// Missing hashes kept (and reported) per scan.
pub const MISSING_CAP: usize = 10_000;
/// Blobs asked for in one `FetchBlobs` call.
pub const FETCH_BATCH: usize = 32;
/// How often each member is probed (`BlobHealth`).
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A member that answered a probe within this long counts as reachable.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(3);

/// `[blobs]` repair settings.
#[derive(Debug, Clone, Copy)]
pub struct RepairSettings {
    /// Time between two scans, ms.
    pub interval_ms: u64,
    /// Upper bound of the repair fetch rate, bytes per second of stored (compressed) data.
    pub max_bytes_per_s: u64,
}

/// What this node's last scan found.
#[derive(Debug, Clone, Default)]
struct LocalHealth {
    scanned: bool,
    referenced: u64,
    missing: Vec<BlobHash>,
    missing_count: u64,
    truncated: bool,
    scan_applied: u64,
    repaired: u64,
}

/// The last probe of one member.
#[derive(Debug, Clone, Default)]
pub struct PeerSeen {
    /// When it last answered.
    pub last_ok: Option<Instant>,
    /// Its last answer.
    pub reply: Option<BlobHealthReply>,
}

/// Blob repair and member health of one node (cheap to clone).
#[derive(Clone)]
pub struct Repair {
    blobs: Blobs,
    catalog: Catalog,
    raft: RegionRaft,
    node_id: NodeId,
    settings: RepairSettings,
    local: Arc<Mutex<LocalHealth>>,
    peers: Arc<Mutex<HashMap<NodeId, PeerSeen>>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Repair {
    /// Repair for node `node_id`.
    pub fn new(
        blobs: Blobs,
        catalog: Catalog,
        raft: RegionRaft,
        node_id: NodeId,
        settings: RepairSettings,
    ) -> Self {
        Repair {
            blobs,
            catalog,
            raft,
            node_id,
            settings,
            local: Default::default(),
            peers: Default::default(),
            wake: Default::default(),
        }
    }

    /// Whether the blob store is shared (S3): nothing to repair.
    pub fn shared(&self) -> bool {
        self.blobs.store.is_shared()
    }

    /// Starts the scan/repair loop and the prober; abort the handles to stop.
    pub fn spawn(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let me = self.clone();
        let scan = tokio::spawn(async move {
            loop {
                if let Err(e) = me.pass().await {
                    tracing::warn!(error = %e, "blob repair pass failed; retrying at the next interval");
                }
                let _ = tokio::time::timeout(
                    Duration::from_millis(me.settings.interval_ms.max(50)),
                    me.wake.notified(),
                )
                .await;
            }
        });
        let me = self.clone();
        let probe = tokio::spawn(async move {
            loop {
                me.probe_all().await;
                tokio::time::sleep(PROBE_EVERY).await;
            }
        });
        vec![scan, probe]
    }

    /// This node's `BlobHealth` answer; `rescan` wakes the scan loop.
    pub fn health(&self, rescan: bool) -> BlobHealthReply {
        if rescan {
            self.wake.notify_one();
        }
        let l = self.local.lock().clone();
        BlobHealthReply {
            node_id: self.node_id,
            shared_store: self.shared(),
            scanned: l.scanned,
            referenced: l.referenced,
            missing: l.missing_count,
            missing_hashes: l.missing.iter().map(|h| h.to_hex()).collect(),
            missing_truncated: l.truncated,
            last_applied: self.catalog.applied_index(),
            scan_applied: l.scan_applied,
            repaired: l.repaired,
        }
    }

    /// The last probe of every member other than this node.
    pub fn peers(&self) -> HashMap<NodeId, PeerSeen> {
        self.peers.lock().clone()
    }

    /// Every member of the current membership (voters and learners) with its address.
    fn members(&self) -> BTreeMap<NodeId, String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// Asks `addr` for its blob health, within `timeout`.
    async fn ask(&self, addr: &str, rescan: bool, timeout: Duration) -> Option<BlobHealthReply> {
        let mut c = self.blobs.client(addr).ok()?;
        let mut req = Request::new(BlobHealthRequest { rescan });
        req.set_timeout(timeout);
        tokio::time::timeout(timeout, c.blob_health(req))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// Probes every other member once (concurrently) and records the answers.
    pub async fn probe_all(&self) {
        self.probe(false).await;
    }

    async fn probe(&self, rescan: bool) {
        let members = self.members();
        let asks =
            members
                .iter()
                .filter(|(id, _)| **id != self.node_id)
                .map(|(id, addr)| async move {
                    (
                        *id,
                        self.ask(addr, rescan, Duration::from_millis(900)).await,
                    )
                });
        let answers = futures::future::join_all(asks).await;
        let mut peers = self.peers.lock();
        peers.retain(|id, _| members.contains_key(id));
        for (id, reply) in answers {
            let e = peers.entry(id).or_default();
            if let Some(r) = reply {
                e.last_ok = Some(Instant::now());
                e.reply = Some(r);
            }
        }
    }

    /// Fresh blob health of each of `ids` (this node answers from its own state), after asking
    /// them to rescan; a node that does not answer within 2 s maps to `None`.
    pub async fn fresh_health(&self, ids: &[NodeId]) -> BTreeMap<NodeId, Option<BlobHealthReply>> {
        let members = self.members();
        let asks = ids.iter().map(|id| {
            let addr = members.get(id).cloned();
            async move {
                if *id == self.node_id {
                    return (*id, Some(self.health(true)));
                }
                let r = match addr {
                    Some(a) => self.ask(&a, true, Duration::from_secs(2)).await,
                    None => None,
                };
                (*id, r)
            }
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// One scan of the referenced blobs, then a fetch of what is missing.
    ///
    /// Errors: catalog read failures (store and peer errors are logged and retried later).
    async fn pass(&self) -> anyhow::Result<()> {
        if self.shared() {
            let mut l = self.local.lock();
            l.scanned = true;
            l.scan_applied = self.catalog.applied_index();
            return Ok(());
        }
        let scan_applied = self.catalog.applied_index();
        let mut after: Option<BlobHash> = None;
        let mut referenced = 0u64;
        let mut missing = Vec::new();
        let mut missing_count = 0u64;
        loop {
            let page = self.catalog.referenced_page(after.as_ref(), PAGE)?;
            let Some(last) = page.last().copied() else {
                break;
            };
            for h in page {
                referenced += 1;
                if !self.blobs.store.contains(&h).await.unwrap_or(false) {
                    missing_count += 1;
                    if missing.len() < MISSING_CAP {
                        missing.push(h);
                    }
                }
            }
            after = Some(last);
        }
        {
            let mut l = self.local.lock();
            l.scanned = true;
            l.referenced = referenced;
            l.truncated = missing_count > missing.len() as u64;
            l.missing = missing.clone();
            l.missing_count = missing_count;
            l.scan_applied = scan_applied;
        }
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(
            missing = missing_count,
            referenced,
            "blob repair: fetching committed blobs this node lacks from its peers"
        );
        for chunk in missing.chunks(FETCH_BATCH) {
            let fetched = self.repair_batch(chunk).await?;
            let mut l = self.local.lock();
            l.missing.retain(|h| !fetched.contains(h));
            l.missing_count = l.missing_count.saturating_sub(fetched.len() as u64);
            l.repaired += fetched.len() as u64;
        }
        Ok(())
    }

    /// Fetches `hashes` (those still referenced and not condemned) from the peers, verifies and
    /// stores them; returns the ones now held (stored here, or no longer needed).
    ///
    /// Errors: catalog read failures.
    async fn repair_batch(&self, hashes: &[BlobHash]) -> anyhow::Result<Vec<BlobHash>> {
        let refs = self.catalog.refcounts(hashes)?;
        let condemned = self.catalog.condemned_among(hashes)?;
        let mut done = Vec::new();
        let mut want: Vec<BlobHash> = Vec::new();
        for (h, n) in hashes.iter().zip(refs) {
            if n == 0 || condemned.contains(h) {
                // Garbage collection's (or a pruned version's): not to be fetched.
                done.push(*h);
            } else {
                want.push(*h);
            }
        }
        let forget_before = self.catalog.gc_meta()?.forget_index;
        let members = self.members();
        for (id, addr) in members.iter().filter(|(id, _)| **id != self.node_id) {
            if want.is_empty() {
                break;
            }
            let Ok(mut c) = self.blobs.client(addr) else {
                continue;
            };
            let mut req = Request::new(FetchBlobsRequest {
                hashes: want.iter().map(|h| h.to_hex()).collect(),
            });
            req.metadata_mut()
                .insert(NO_FORWARD_HEADER, "1".parse().expect("ascii"));
            let Ok(resp) = c.fetch_blobs(req).await else {
                continue;
            };
            let mut s = resp.into_inner();
            let started = Instant::now();
            let mut bytes = 0u64;
            // The stream stops at the first blob the peer lacks: the rest is asked of the next.
            while let Some(Ok(b)) = s.next().await {
                let Ok(h) = BlobHash::from_hex(&b.hash) else {
                    break;
                };
                if !want.contains(&h) {
                    break;
                }
                bytes += b.stored.len() as u64;
                let stored = b.stored;
                let ok = tokio::task::spawn_blocking(move || {
                    blob::decode(&h, &stored, lifeboat_common::PART_SIZE)
                        .is_ok()
                        .then_some(stored)
                })
                .await
                .ok()
                .flatten();
                let Some(stored) = ok else {
                    tracing::warn!(blob = %h, peer = id, "peer's copy failed verification; trying another");
                    continue;
                };
                if !self.blobs.store.contains(&h).await.unwrap_or(false) {
                    if let Err(e) = self.blobs.store.put(&h, stored).await {
                        tracing::warn!(blob = %h, error = %e, "blob repair could not store a blob");
                        continue;
                    }
                }
                want.retain(|w| *w != h);
                done.push(h);
                self.throttle(started, bytes).await;
            }
        }
        // A ForgetBlobs applied while fetching may have deleted the old (absent) copy before
        // ours landed: delete what it condemned, as its apply would have.
        if self.catalog.gc_meta()?.forget_index != forget_before {
            for h in self.catalog.condemned_among(&done)? {
                let _ = self.blobs.store.delete(&h).await;
                tracing::info!(blob = %h, "blob repair dropped a copy garbage collection condemned meanwhile");
            }
        }
        if !want.is_empty() {
            tracing::warn!(
                still_missing = want.len(),
                "blob repair: no reachable peer holds some committed blobs; retrying later"
            );
        }
        Ok(done)
    }

    /// Sleeps so that `bytes` since `started` stay within the configured rate.
    async fn throttle(&self, started: Instant, bytes: u64) {
        let rate = self.settings.max_bytes_per_s;
        if rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
        let spent = started.elapsed();
        if due > spent {
            tokio::time::sleep(due - spent).await;
        }
    }
}

/// Blob durability of a set of voters computed from their health answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durability {
    /// Committed blobs not confirmed on every voter.
    pub under_replicated: u64,
    /// Committed blobs confirmed on fewer than a majority of the voters.
    pub below_majority: u64,
    /// Every voter answered with a complete, untruncated scan.
    pub complete: bool,
}

/// Durability of the committed blobs over `voters` (answers: `None` = no answer). A voter
/// that did not answer, has not scanned, or truncated its missing list confirms no blob.
/// `referenced` is the number of committed blobs (the largest count reported).
pub fn durability(voters: &[Option<&BlobHealthReply>]) -> Durability {
    let n = voters.len();
    if n == 0 {
        return Durability::default();
    }
    let majority = n / 2 + 1;
    let referenced = voters
        .iter()
        .flatten()
        .map(|r| r.referenced)
        .max()
        .unwrap_or(0);
    if voters.iter().flatten().any(|r| r.shared_store) {
        return Durability {
            complete: true,
            ..Default::default()
        };
    }
    let good: Vec<&BlobHealthReply> = voters
        .iter()
        .flatten()
        .filter(|r| r.scanned && !r.missing_truncated)
        .copied()
        .collect();
    let confirming = good.len();
    let mut lacking: HashMap<&str, usize> = HashMap::new();
    for r in &good {
        for h in &r.missing_hashes {
            *lacking.entry(h.as_str()).or_default() += 1;
        }
    }
    // Blobs no good voter lacks have `confirming` copies; the others fewer.
    let under = if confirming < n {
        referenced
    } else {
        lacking.len() as u64
    };
    let below = if confirming < majority {
        referenced
    } else {
        lacking
            .values()
            .filter(|&&k| confirming - k < majority)
            .count() as u64
    };
    Durability {
        under_replicated: under,
        below_majority: below,
        complete: confirming == n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(referenced: u64, missing: &[&str]) -> BlobHealthReply {
        BlobHealthReply {
            scanned: true,
            referenced,
            missing: missing.len() as u64,
            missing_hashes: missing.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn durability_counts_copies() {
        let a = r(10, &[]);
        let b = r(10, &["x", "y"]);
        let c = r(10, &["x"]);
        let d = durability(&[Some(&a), Some(&b), Some(&c)]);
        assert_eq!(
            d,
            Durability {
                under_replicated: 2,
                below_majority: 1,
                complete: true
            }
        );
        // A missing voter confirms nothing: every blob lacks a copy; x has 1 of 2 needed.
        let d = durability(&[Some(&a), Some(&c), None]);
        assert_eq!(d.under_replicated, 10);
        assert_eq!(d.below_majority, 1);
        assert!(!d.complete);
        // Fewer confirming voters than a majority: nothing is confirmed on a majority.
        let d = durability(&[Some(&a), None, None]);
        assert_eq!(d.below_majority, 10);
        // A truncated list confirms nothing either.
        let mut t = r(10, &["x"]);
        t.missing_truncated = true;
        let d = durability(&[Some(&a), Some(&t), Some(&b)]);
        assert_eq!(d.below_majority, 2);
        assert!(!d.complete);
    }
}
