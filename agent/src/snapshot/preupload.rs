//! Snapshot parts uploaded while the snapshot is still being taken.
//!
//! A snapshot (Redis RDB, PostgreSQL base backup, exec dump) is spooled to a local file first and
//! then sent through the regular file pipeline. Done one after the other, the upload doubles the
//! time a snapshot takes. A [`Preupload`] overlaps them: the spool's writer thread
//! ([`crate::snapshot::spool::SpoolFile`]) offers every part (aligned to the agent's part size from byte
//! 0, exactly as `delta::plan_file` cuts the finished file) here; it goes to the region's leader
//! in one `PutParts` call, compressed here in the stored blob form (`encoded`) and **without a
//! hash**: the leader, which must hash the content to verify it anyway, computes the part's
//! blake3 and stores the part as a blob durable on a majority of voters (or in S3). The agent
//! thus hashes a snapshot once (the whole-file blake3, in the spool) instead of twice. The
//! hashes the leader names are recorded as stored in the agent's state and in the spool's
//! digest, so the later `PushChanges` of the finished file sends those parts as `reuse`; the
//! leader then checks the agent's whole-file blake3 against the parts' chaining values, which
//! catches a leader that named a part wrongly as much as a part that differs from the file.
//!
//! Purely an optimisation, never on the correctness path: when the upload falls behind for
//! [`OFFER_WAIT`] or fails (no leader, a standby region, a refused part), the spool goes on
//! without it and the regular push sends the parts not confirmed. Parts are held in memory only
//! while queued (at most [`QUEUE_PARTS`] parts).

use std::sync::Arc;

use lifeboat_common::blob::{self, BlobHash};
use lifeboat_proto as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::files::state::StateDb;
use crate::push::{PushClient, SendCounters};
use crate::snapshot::block::SharedBlock;

/// Parts waiting for the upload at most (with 4 MiB parts: 32 MiB of memory).
pub const QUEUE_PARTS: usize = 8;

/// Parts compressed at once, ahead of the stream (keeps the upload from waiting on one
/// compression at a time).
pub const ENCODE_AHEAD: usize = 2;

/// How long [`Preupload::finish`] waits for the leader's reply after the last part.
pub const FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a source needs to pre-upload: the agent's client, state and part size.
#[derive(Debug, Clone)]
pub struct Uploader {
    client: Arc<PushClient>,
    state: Arc<StateDb>,
    part_size: usize,
    counters: Arc<SendCounters>,
}

impl Uploader {
    /// An uploader sending parts of `part_size` bytes through `client`, recording stored hashes
    /// in `state` and their bytes in `counters.preuploaded`.
    pub fn new(
        client: Arc<PushClient>,
        state: Arc<StateDb>,
        part_size: usize,
        counters: Arc<SendCounters>,
    ) -> Uploader {
        Uploader {
            client,
            state,
            part_size,
            counters,
        }
    }

    /// Starts the upload of one snapshot.
    pub fn start(&self) -> Preupload {
        let (tx, rx) = mpsc::channel(QUEUE_PARTS);
        let client = self.client.clone();
        let task = tokio::spawn(upload(client, rx));
        Preupload {
            tx: Some(tx),
            part_size: self.part_size,
            task: Some(task),
            state: Some(self.state.clone()),
            counters: Some(self.counters.clone()),
        }
    }
}

/// One snapshot's upload in progress. The spool's writer thread ([`crate::snapshot::spool::SpoolFile`])
/// [`PartSender::offer`]s each part after hashing it, then the spool calls
/// [`Preupload::finish`]. Dropping it without `finish` abandons the upload (nothing recorded).
#[derive(Debug)]
pub struct Preupload {
    tx: Option<mpsc::Sender<(u32, Arc<SharedBlock>)>>,
    part_size: usize,
    task: Option<JoinHandle<Vec<(u32, BlobHash, u64)>>>,
    state: Option<Arc<StateDb>>,
    counters: Option<Arc<SendCounters>>,
}

/// How long [`PartSender::offer`] waits for room in the upload queue before it gives up on the
/// pre-upload of the rest of the snapshot (the regular push then sends those parts).
pub const OFFER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The sending end of a [`Preupload`], used from the spool's writer thread (blocking).
#[derive(Debug)]
pub struct PartSender {
    tx: Option<mpsc::Sender<(u32, Arc<SharedBlock>)>>,
    handle: tokio::runtime::Handle,
    /// Parts not offered (queue full past [`OFFER_WAIT`], or the upload ended).
    pub skipped: u32,
}

impl PartSender {
    /// Queues part `index` (content `data`) for the upload, waiting up to [`OFFER_WAIT`] for
    /// room: the upload is what the snapshot's acknowledgement waits for, so the spool follows
    /// its pace rather than leave parts for later. When the wait runs out or the upload ended
    /// (failed), nothing more is offered. Returns whether the part was queued (if not, the
    /// caller hashes it). Call from a blocking thread only.
    pub fn offer(&mut self, index: u32, data: &Arc<SharedBlock>) -> bool {
        let Some(tx) = &self.tx else {
            self.skipped += 1;
            return false;
        };
        let item = (index, Arc::clone(data));
        let sent = match tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(item)) => self
                .handle
                .block_on(tokio::time::timeout(OFFER_WAIT, tx.send(item)))
                .is_ok_and(|r| r.is_ok()),
        };
        if !sent {
            tracing::debug!(
                index,
                "pre-upload stops: the upload ended or fell behind; the push sends the remaining parts"
            );
            self.tx = None;
            self.skipped += 1;
        }
        sent
    }
}

impl Preupload {
    /// A pre-upload that does nothing (no uploader configured).
    pub fn disabled() -> Preupload {
        Preupload {
            tx: None,
            part_size: 0,
            task: None,
            state: None,
            counters: None,
        }
    }

    /// Part size in bytes the spool must cut parts with (`None` when disabled).
    pub fn part_size(&self) -> Option<usize> {
        (self.part_size > 0).then_some(self.part_size)
    }

    /// The sender for the spool's writer thread (`None` when disabled or already taken).
    /// Call from within the runtime.
    pub fn take_sender(&mut self) -> Option<PartSender> {
        let tx = self.tx.take()?;
        Some(PartSender {
            tx: Some(tx),
            handle: tokio::runtime::Handle::current(),
            skipped: 0,
        })
    }

    /// Waits for the leader's reply (the writer thread has ended, so the last part was sent)
    /// and records the parts it stored as acknowledged blobs. With the spool's `parts` (every
    /// part's size, in order, cut at [`Preupload::part_size`], and its blake3 when the spool
    /// hashed it: the leader names the others) and `whole` (the blake3 of the file), also
    /// records its [`crate::files::spool_digest::SpoolDigest`] when every part's hash is known, so
    /// planning `spool` (complete and fsync'd) skips reading it back. Returns how many parts
    /// were stored (0 when disabled or failed).
    pub async fn finish(
        mut self,
        whole: blake3::Hash,
        mut parts: Vec<(Option<BlobHash>, u64)>,
        spool: &std::path::Path,
    ) -> usize {
        self.tx = None;
        let stored = match self.task.take() {
            None => Vec::new(),
            Some(task) => match tokio::time::timeout(FINISH_TIMEOUT, task).await {
                Ok(r) => r.unwrap_or_default(),
                Err(_) => {
                    tracing::debug!(
                        "pre-upload of snapshot parts not confirmed in time; the push sends them"
                    );
                    Vec::new()
                }
            },
        };
        let named = name_parts(&mut parts, &stored);
        if let Some(state) = &self.state {
            let complete: Option<Vec<(BlobHash, u64)>> =
                parts.iter().map(|(h, n)| h.map(|h| (h, *n))).collect();
            match complete {
                Some(parts) if !parts.is_empty() && named => {
                    if let Ok(meta) = std::fs::metadata(spool) {
                        state.spool_digests().record(
                            &meta,
                            crate::files::spool_digest::SpoolDigest {
                                size: 0,
                                mtime: (0, 0),
                                part_size: self.part_size,
                                blake3: BlobHash(*whole.as_bytes()),
                                parts,
                            },
                        );
                    }
                }
                _ => tracing::debug!(
                    "snapshot parts not all hashed; planning the push reads the spool back"
                ),
            }
        }
        if stored.is_empty() || !named {
            return 0;
        }
        if let Some(state) = &self.state {
            let hashes: Vec<BlobHash> = stored.iter().map(|(_, h, _)| *h).collect();
            if let Err(e) = state.record_stored_blobs(&hashes) {
                tracing::warn!(error = %e, "cannot record pre-uploaded parts; they will be sent again");
                return 0;
            }
        }
        if let Some(c) = &self.counters {
            let bytes: u64 = stored.iter().map(|(_, _, n)| n).sum();
            c.preuploaded
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::debug!(
            stored = stored.len(),
            "snapshot parts stored while spooling"
        );
        stored.len()
    }
}

/// Fills the hashes of `parts` (size, hash if the spool computed it) from the leader's
/// `stored` (index, hash, size). Returns false, changing nothing, when `stored` does not fit:
/// an index out of range, a size that differs, or a part the spool hashed itself.
fn name_parts(parts: &mut [(Option<BlobHash>, u64)], stored: &[(u32, BlobHash, u64)]) -> bool {
    let fits = stored.iter().all(|(i, _, n)| {
        parts
            .get(*i as usize)
            .is_some_and(|(h, size)| h.is_none() && size == n)
    });
    if !fits {
        tracing::warn!("the leader's reply does not match the parts offered; ignoring it");
        return false;
    }
    for (i, h, _) in stored {
        parts[*i as usize].0 = Some(*h);
    }
    true
}

impl Drop for Preupload {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The `PutParts` call fed from `rx`, each part sent without a hash (the leader computes it);
/// the (index, hash the leader named, size) of every part sent, in order, once the leader
/// confirmed them all stored (empty on any failure).
async fn upload(
    client: Arc<PushClient>,
    rx: mpsc::Receiver<(u32, Arc<SharedBlock>)>,
) -> Vec<(u32, BlobHash, u64)> {
    use futures::StreamExt;
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(u32, u64)>();
    // Compressed here, [`ENCODE_AHEAD`] parts at a time (in order): the leader decodes and
    // stores these bytes as they are.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    })
    .map(|(index, data)| async move {
        let size = data.bytes().len() as u64;
        let encoded = tokio::task::spawn_blocking(move || blob::encode(data.bytes())).await;
        (index, size, encoded)
    })
    .buffered(ENCODE_AHEAD)
    .take_while(|(_, _, encoded)| std::future::ready(encoded.is_ok()))
    .map(move |(index, size, encoded)| {
        let _ = sent_tx.send((index, size));
        pb::PartData {
            index,
            hash: String::new(),
            size,
            body: encoded.ok().map(pb::part_data::Body::Encoded),
            base_hash: String::new(),
        }
    });
    let reply = match client.put_parts(stream, 0).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "pre-upload of snapshot parts failed; the push sends them");
            return Vec::new();
        }
    };
    let mut sent = Vec::new();
    while let Ok(p) = sent_rx.try_recv() {
        sent.push(p);
    }
    // The leader names every part it stored, in the order sent: all of them or nothing.
    let named: Option<Vec<BlobHash>> = (reply.stored.len() == sent.len())
        .then(|| {
            reply
                .stored
                .iter()
                .map(|h| BlobHash::from_hex(h).ok())
                .collect()
        })
        .flatten();
    let Some(named) = named else {
        tracing::debug!(
            sent = sent.len(),
            stored = reply.stored.len(),
            "the leader's reply does not list the parts sent; the push sends them"
        );
        return Vec::new();
    };
    sent.into_iter()
        .zip(named)
        .map(|((index, size), hash)| (index, hash, size))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_names_fill_only_the_offered_parts() {
        let (a, b, c) = (BlobHash::of(b"a"), BlobHash::of(b"b"), BlobHash::of(b"c"));
        // Part 1 was not offered (hashed by the spool); 0 and 2 were.
        let mut parts = vec![(None, 4), (Some(b), 4), (None, 2)];
        assert!(name_parts(&mut parts, &[(0, a, 4), (2, c, 2)]));
        assert_eq!(parts, vec![(Some(a), 4), (Some(b), 4), (Some(c), 2)]);

        // A reply that does not fit changes nothing: a size that differs, an index out of
        // range, a part the spool hashed itself.
        for bad in [vec![(0, a, 3)], vec![(3, a, 4)], vec![(0, a, 4), (1, c, 4)]] {
            let mut parts = vec![(None, 4), (Some(b), 4)];
            assert!(!name_parts(&mut parts, &bad), "{bad:?}");
            assert_eq!(parts, vec![(None, 4), (Some(b), 4)]);
        }
    }
}
