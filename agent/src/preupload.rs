//! Snapshot parts uploaded while the snapshot is still being taken.
//!
//! A snapshot (Redis RDB, PostgreSQL base backup, exec dump) is spooled to a local file first and
//! then sent through the regular file pipeline. Done one after the other, the upload doubles the
//! time a snapshot takes. A [`Preupload`] overlaps them: the spool's writer thread
//! ([`crate::spool::SpoolFile`]) hashes every part (aligned to the agent's part size from byte
//! 0, exactly as `delta::plan_file` cuts the finished file) and offers it here; it goes to the
//! region's leader in one `PutParts` call, compressed here in the stored blob form (`encoded`),
//! and the leader stores each part as a blob durable on a majority of voters (or in S3). The
//! hashes the leader confirms are recorded as stored in the agent's state, so the later
//! `PushChanges` of the finished file sends those parts as `reuse` (the leader checks the
//! whole-file blake3 from the parts' chaining values).
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

use crate::push::{PushClient, SendCounters};
use crate::spool::SharedBlock;
use crate::state::StateDb;

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

/// One snapshot's upload in progress. The spool's writer thread ([`crate::spool::SpoolFile`])
/// [`PartSender::offer`]s each part after hashing it, then the spool calls
/// [`Preupload::finish`]. Dropping it without `finish` abandons the upload (nothing recorded).
#[derive(Debug)]
pub struct Preupload {
    tx: Option<mpsc::Sender<(u32, BlobHash, Arc<SharedBlock>)>>,
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
    tx: Option<mpsc::Sender<(u32, BlobHash, Arc<SharedBlock>)>>,
    handle: tokio::runtime::Handle,
    /// Parts not offered (queue full past [`OFFER_WAIT`], or the upload ended).
    pub skipped: u32,
}

impl PartSender {
    /// Queues part `index` (content `data`, blake3 `hash`) for the upload, waiting up to
    /// [`OFFER_WAIT`] for room: the upload is what the snapshot's acknowledgement waits for, so
    /// the spool follows its pace rather than leave parts for later. When the wait runs out or
    /// the upload ended (failed), nothing more is offered. Call from a blocking thread only.
    pub fn offer(&mut self, index: u32, hash: BlobHash, data: &Arc<SharedBlock>) {
        let Some(tx) = &self.tx else {
            self.skipped += 1;
            return;
        };
        let item = (index, hash, Arc::clone(data));
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
    /// and records the stored hashes as acknowledged blobs. With the spool's `parts` (every
    /// part's blake3 and size, in order, cut at [`Preupload::part_size`]) and `whole` (the
    /// blake3 of the file), also records its [`crate::spool_digest::SpoolDigest`] so planning
    /// `spool` (complete and fsync'd) skips reading it back. Returns how many parts were
    /// stored (0 when disabled or failed).
    pub async fn finish(
        mut self,
        whole: blake3::Hash,
        parts: Vec<(BlobHash, u64)>,
        spool: &std::path::Path,
    ) -> usize {
        self.tx = None;
        if let Some(state) = &self.state {
            if !parts.is_empty() {
                if let Ok(meta) = std::fs::metadata(spool) {
                    state.spool_digests().record(
                        &meta,
                        crate::spool_digest::SpoolDigest {
                            size: 0,
                            mtime: (0, 0),
                            part_size: self.part_size,
                            blake3: BlobHash(*whole.as_bytes()),
                            parts,
                        },
                    );
                }
            }
        }
        let Some(task) = self.task.take() else {
            return 0;
        };
        let stored = match tokio::time::timeout(FINISH_TIMEOUT, task).await {
            Ok(r) => r.unwrap_or_default(),
            Err(_) => {
                tracing::debug!(
                    "pre-upload of snapshot parts not confirmed in time; the push sends them"
                );
                Vec::new()
            }
        };
        if stored.is_empty() {
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

impl Drop for Preupload {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The `PutParts` call fed from `rx`; the (index, hash, size) of every part sent, in order, once
/// the leader confirmed them all stored (empty on any failure).
async fn upload(
    client: Arc<PushClient>,
    rx: mpsc::Receiver<(u32, BlobHash, Arc<SharedBlock>)>,
) -> Vec<(u32, BlobHash, u64)> {
    use futures::StreamExt;
    let (hashes_tx, mut hashes_rx) = mpsc::unbounded_channel::<(u32, BlobHash, u64)>();
    // Compressed here, [`ENCODE_AHEAD`] parts at a time (in order): the leader decodes and
    // stores these bytes as they are.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    })
    .map(|(index, hash, data)| async move {
        let size = data.bytes().len() as u64;
        let encoded = tokio::task::spawn_blocking(move || blob::encode(data.bytes())).await;
        (index, hash, size, encoded)
    })
    .buffered(ENCODE_AHEAD)
    .take_while(|(_, _, _, encoded)| std::future::ready(encoded.is_ok()))
    .map(move |(index, hash, size, encoded)| {
        let _ = hashes_tx.send((index, hash, size));
        pb::PartData {
            index,
            hash: hash.to_hex(),
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
    while let Ok(p) = hashes_rx.try_recv() {
        sent.push(p);
    }
    // The leader lists every part it stored, in the order sent: all of them or nothing.
    let confirmed = reply.stored.len() == sent.len()
        && reply
            .stored
            .iter()
            .zip(&sent)
            .all(|(h, (_, mine, _))| BlobHash::from_hex(h).is_ok_and(|h| h == *mine));
    if !confirmed {
        tracing::debug!(
            sent = sent.len(),
            stored = reply.stored.len(),
            "the leader's reply does not list the parts sent; the push sends them"
        );
        return Vec::new();
    }
    sent
}
