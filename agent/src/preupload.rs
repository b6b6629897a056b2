//! Snapshot parts uploaded while the snapshot is still being taken.
//!
//! A snapshot (Redis RDB, PostgreSQL base backup, exec dump) is spooled to a local file first and
//! then sent through the regular file pipeline. Done one after the other, the upload doubles the
//! time a snapshot takes. A [`Preupload`] overlaps them: every whole part the spool receives
//! (aligned to the agent's part size from byte 0, exactly as `delta::plan_file` will cut the
//! finished file) goes to the region's leader in one `PutParts` call, which stores each part as
//! a blob durable on a majority of voters (or in S3). The hashes the leader confirms are recorded
//! as stored in the agent's state, so the later `PushChanges` of the finished file sends those
//! parts as `reuse` (the leader still reads each back and checks the whole-file blake3).
//!
//! Purely an optimisation, never on the correctness path: the spool is never slowed down (a part
//! that finds the upload queue full is skipped; the regular push sends it), and on any failure
//! (no leader, a standby region, a refused part) nothing is recorded and the regular push sends
//! every part whole. Parts are held in memory only while queued (at most [`QUEUE_PARTS`] parts).

use std::sync::Arc;

use lifeboat_common::blob::BlobHash;
use lifeboat_proto as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::push::{PushClient, SendCounters};
use crate::state::StateDb;

/// Parts waiting for the upload at most (with 4 MiB parts: 32 MiB of memory).
pub const QUEUE_PARTS: usize = 8;

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
            buf: Vec::with_capacity(self.part_size),
            part_size: self.part_size,
            index: 0,
            skipped: 0,
            task: Some(task),
            state: Some(self.state.clone()),
            counters: Some(self.counters.clone()),
        }
    }
}

/// One snapshot's upload in progress: [`Preupload::feed`] the spooled bytes in order, then
/// [`Preupload::finish`]. Dropping it without `finish` abandons the upload (nothing recorded).
#[derive(Debug)]
pub struct Preupload {
    tx: Option<mpsc::Sender<(u32, Vec<u8>)>>,
    buf: Vec<u8>,
    part_size: usize,
    index: u32,
    skipped: u32,
    task: Option<JoinHandle<Vec<(BlobHash, u64)>>>,
    state: Option<Arc<StateDb>>,
    counters: Option<Arc<SendCounters>>,
}

impl Preupload {
    /// A pre-upload that does nothing (no uploader configured).
    pub fn disabled() -> Preupload {
        Preupload {
            tx: None,
            buf: Vec::new(),
            part_size: 0,
            index: 0,
            skipped: 0,
            task: None,
            state: None,
            counters: None,
        }
    }

    /// Takes the next bytes of the snapshot. Never waits: a whole part that finds the queue full
    /// is dropped (the regular push will send it).
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.tx.is_none() {
            return;
        }
        while !data.is_empty() {
            let take = (self.part_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.part_size {
                let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
                self.send(part);
            }
        }
    }

    fn send(&mut self, part: Vec<u8>) {
        let index = self.index;
        self.index += 1;
        let Some(tx) = &self.tx else { return };
        match tx.try_send((index, part)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.skipped += 1,
            // The upload ended (failed): stop queueing.
            Err(mpsc::error::TrySendError::Closed(_)) => self.tx = None,
        }
    }

    /// Sends the last (short) part, waits for the leader's reply and records the stored hashes
    /// as acknowledged blobs. Returns how many parts were stored (0 when disabled or failed).
    pub async fn finish(mut self) -> usize {
        if !self.buf.is_empty() {
            let part = std::mem::take(&mut self.buf);
            self.send(part);
        }
        self.tx = None;
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
            let hashes: Vec<BlobHash> = stored.iter().map(|(h, _)| *h).collect();
            if let Err(e) = state.record_stored_blobs(&hashes) {
                tracing::warn!(error = %e, "cannot record pre-uploaded parts; they will be sent again");
                return 0;
            }
        }
        if let Some(c) = &self.counters {
            let bytes: u64 = stored.iter().map(|(_, n)| n).sum();
            c.preuploaded
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::debug!(
            stored = stored.len(),
            skipped = self.skipped,
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

/// The `PutParts` call fed from `rx`; the hashes the leader confirmed (empty on any failure).
async fn upload(
    client: Arc<PushClient>,
    rx: mpsc::Receiver<(u32, Vec<u8>)>,
) -> Vec<(BlobHash, u64)> {
    let (hashes_tx, mut hashes_rx) = mpsc::unbounded_channel::<(BlobHash, u64)>();
    let stream = futures::stream::unfold((rx, hashes_tx), |(mut rx, hashes_tx)| async move {
        let (index, data) = rx.recv().await?;
        let size = data.len() as u64;
        let (hash, data) = tokio::task::spawn_blocking(move || (BlobHash::of(&data), data))
            .await
            .ok()?;
        let _ = hashes_tx.send((hash, size));
        let part = pb::PartData {
            index,
            hash: hash.to_hex(),
            size,
            body: Some(pb::part_data::Body::Full(data)),
            base_hash: String::new(),
        };
        Some((part, (rx, hashes_tx)))
    });
    let reply = match client.put_parts(stream, 0).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "pre-upload of snapshot parts failed; the push sends them");
            return Vec::new();
        }
    };
    let mut sent = std::collections::HashMap::new();
    while let Ok((h, n)) = hashes_rx.try_recv() {
        sent.insert(h, n);
    }
    // Only hashes both sent by us and confirmed by the leader.
    reply
        .stored
        .iter()
        .filter_map(|h| BlobHash::from_hex(h).ok())
        .filter_map(|h| sent.remove(&h).map(|n| (h, n)))
        .collect()
}
