//! Blob access of a coordinator: the configured [`BlobStore`], copying new blobs to a majority of
//! voters when the store is local (so an acknowledged blob survives the loss of any minority), and
//! fetching blobs a node lacks from its peers. Also the `BlobService` gRPC server.

pub mod gc;
pub mod repair;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::blobstore::{BlobStore, BlobStoreError};
use lifeboat_common::tls::TlsConfig;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::blob_service_server::BlobService;
use lifeboat_proto::{
    BlobHealthReply, BlobHealthRequest, FetchBlobsRequest, PutBlobsReply, StoredBlob,
};
use tokio::task::JoinSet;
use tonic::{Request, Response, Status, Streaming};

use crate::blobs::gc::GC_INDEX_HEADER;
use crate::raft::{Catalog, NodeId, RegionRaft};

/// How long a follower waits to apply the leader's last `ForgetBlobs` before refusing a copy.
const GC_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Blobs a follower verifies and writes concurrently within one `PutBlobs` call.
const PUTS_IN_FLIGHT: usize = 16;

/// Request header: answer from the local store only (set on node-to-node fetches, so a missing
/// blob never bounces between peers).
pub const NO_FORWARD_HEADER: &str = "x-lifeboat-no-forward";
/// Request header: verify each blob before sending and, if the local copy is corrupted or
/// missing, fetch an intact copy from a peer (repairing the local one).
pub const VERIFY_HEADER: &str = "x-lifeboat-verify";

/// Blob access shared by intake, admin and the blob service.
#[derive(Clone)]
pub struct Blobs {
    /// The backend.
    pub store: Arc<dyn BlobStore>,
    tls: TlsConfig,
    node_id: NodeId,
    raft: Option<RegionRaft>,
    catalog: Option<Catalog>,
}

/// Errors of blob access.
#[derive(Debug, thiserror::Error)]
pub enum BlobsError {
    /// Backend failure.
    #[error(transparent)]
    Store(#[from] BlobStoreError),
    /// Stored bytes failed verification.
    #[error(transparent)]
    Corrupt(#[from] blob::BlobError),
    /// Not enough followers stored the blobs.
    #[error(
        "blob replication reached {got} of {needed} coordinators needed for a majority: {detail}"
    )]
    NoMajority {
        /// Copies confirmed (including the leader's).
        got: usize,
        /// Copies needed.
        needed: usize,
        /// Last error seen.
        detail: String,
    },
}

impl Blobs {
    /// New blob access for node `node_id`.
    pub fn new(store: Arc<dyn BlobStore>, tls: TlsConfig, node_id: NodeId) -> Self {
        Blobs {
            store,
            tls,
            node_id,
            raft: None,
            catalog: None,
        }
    }

    /// Attaches the catalog: copies to followers then carry the last `ForgetBlobs` index
    /// ([`GC_INDEX_HEADER`]) and copies received wait until it is applied here.
    pub fn set_catalog(&mut self, catalog: Catalog) {
        self.catalog = Some(catalog);
    }

    /// Log index of the newest `ForgetBlobs` applied here (0 without a catalog).
    fn gc_index(&self) -> u64 {
        self.catalog
            .as_ref()
            .and_then(|c| c.gc_meta().ok())
            .map(|g| g.forget_index)
            .unwrap_or(0)
    }

    /// Attaches the Raft handle (membership tells where peers are).
    pub fn set_raft(&mut self, raft: RegionRaft) {
        self.raft = Some(raft);
    }

    /// Voters (id -> addr) other than this node, from the current membership.
    fn peers(&self) -> (usize, BTreeMap<NodeId, String>) {
        let Some(raft) = &self.raft else {
            return (1, BTreeMap::new());
        };
        let m = raft.metrics().borrow().membership_config.clone();
        let voters: Vec<NodeId> = m.membership().voter_ids().collect();
        let mut peers = BTreeMap::new();
        for (id, node) in m.membership().nodes() {
            if *id != self.node_id {
                peers.insert(*id, node.addr.clone());
            }
        }
        let n = voters.len().max(1);
        peers.retain(|id, _| voters.contains(id));
        (n, peers)
    }

    /// Blob service client of the peer at `addr`.
    pub(crate) fn client(
        &self,
        addr: &str,
    ) -> Result<BlobServiceClient<tonic::transport::Channel>, Status> {
        let ch = self
            .tls
            .channel(addr)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(BlobServiceClient::new(ch)
            .max_decoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES))
    }

    /// Stored bytes of `hash`: local store first, then each peer (the copy fetched is verified and
    /// kept locally).
    ///
    /// Errors: NotFound when no node has it; [`BlobsError::Corrupt`] when only corrupted copies exist.
    pub async fn get_stored(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobsError> {
        let local_err = match self.store.get(hash).await {
            Ok(b) => match blob::decode(hash, &b, lifeboat_common::PART_SIZE) {
                Ok(_) => return Ok(b),
                Err(e) => {
                    crate::metrics::COUNTERS
                        .integrity_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    BlobsError::Corrupt(e)
                }
            },
            Err(e) => BlobsError::Store(e),
        };
        if self.store.is_shared() {
            return Err(local_err);
        }
        let (_, peers) = self.peers();
        for addr in peers.values() {
            let Ok(mut c) = self.client(addr) else {
                continue;
            };
            let mut req = Request::new(FetchBlobsRequest {
                hashes: vec![hash.to_hex()],
            });
            req.metadata_mut()
                .insert(NO_FORWARD_HEADER, "1".parse().expect("ascii"));
            let Ok(resp) = c.fetch_blobs(req).await else {
                continue;
            };
            let mut s = resp.into_inner();
            if let Some(Ok(b)) = s.next().await {
                if blob::decode(hash, &b.stored, lifeboat_common::PART_SIZE).is_ok() {
                    // Repair the local copy (fetched from a peer, verified above).
                    match self.store.replace(hash, b.stored.clone()).await {
                        Ok(()) => {
                            tracing::warn!(blob = %hash, peer = %addr, "local blob copy was missing or corrupted; repaired from a peer")
                        }
                        Err(e) => {
                            tracing::error!(blob = %hash, error = %e, "repair of local blob copy failed")
                        }
                    }
                    return Ok(b.stored);
                }
            }
        }
        Err(local_err)
    }

    /// Raw content of `hash` (verified).
    ///
    /// Errors: as [`Self::get_stored`].
    pub async fn get_raw(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobsError> {
        let stored = self.get_stored(hash).await?;
        let h = *hash;
        tokio::task::spawn_blocking(move || blob::decode(&h, &stored, lifeboat_common::PART_SIZE))
            .await
            .map_err(|e| BlobsError::Store(BlobStoreError::Config(e.to_string())))?
            .map_err(BlobsError::from)
    }

    /// Starts copying blobs to the followers for one batch: each hash given to the returned
    /// session (once the blob is durable here) is streamed to every voter at once, while the
    /// batch is still arriving. No-op session for a shared store or a single voter.
    pub fn start_replication(&self) -> ReplicationSession {
        let (voters, peers) = self.peers();
        let needed = voters / 2 + 1;
        let mut s = ReplicationSession {
            senders: Vec::new(),
            tasks: JoinSet::new(),
            needed,
            active: !self.store.is_shared() && needed > 1,
        };
        if !s.active {
            return s;
        }
        for (id, addr) in peers {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Queued>();
            let me = self.clone();
            s.senders.push(tx);
            s.tasks
                .spawn(async move { (id, me.push_stream(&addr, rx).await) });
        }
        s
    }

    /// Copies `hashes` (already durable here) to followers until a majority of voters holds each
    /// of them durably. Copies to the remaining followers continue in the background.
    /// No-op for a shared store.
    ///
    /// Errors: [`BlobsError::NoMajority`].
    pub async fn replicate(&self, hashes: Vec<BlobHash>) -> Result<(), BlobsError> {
        let s = self.start_replication();
        for h in hashes {
            s.send(h);
        }
        s.finish(true).await
    }

    /// Streams the blobs whose hashes arrive on `rx` to the peer at `addr` (reading them from the
    /// local store), until `rx` closes; Ok once the peer confirmed every blob durable.
    async fn push_stream(
        &self,
        addr: &str,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    ) -> Result<(), Status> {
        let mut client = self.client(addr)?;
        let gc_index = self.gc_index();
        let (tx, out) = tokio::sync::mpsc::channel::<StoredBlob>(4);
        let store = self.store.clone();
        let producer = tokio::spawn(async move {
            while let Some(h) = rx.recv().await {
                match store.get(&h).await {
                    Ok(stored) => {
                        if tx
                            .send(StoredBlob {
                                hash: h.to_hex(),
                                stored,
                                stored_blake3: Vec::new(),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(blob = %h, error = %e, "cannot read blob to replicate");
                        return;
                    }
                }
            }
        });
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(out));
        if gc_index > 0 {
            req.metadata_mut().insert(
                GC_INDEX_HEADER,
                gc_index.to_string().parse().expect("digits are ascii"),
            );
        }
        let res = client.put_blobs(req).await;
        producer.abort();
        res.map(|_| ())
    }
}

/// A blob queued for the followers (durable on this node): its hash.
pub type Queued = BlobHash;

/// Blob copies to the followers for one batch (see [`Blobs::start_replication`]).
pub struct ReplicationSession {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Queued>>,
    tasks: JoinSet<(NodeId, Result<(), Status>)>,
    needed: usize,
    active: bool,
}

impl ReplicationSession {
    /// Queues a blob (durable locally) for every follower; each follower decodes and checks it.
    pub fn send(&self, hash: BlobHash) {
        for s in &self.senders {
            let _ = s.send(hash);
        }
    }

    /// A handle that queues blobs, for tasks that finish local writes: send the hash once the
    /// blob is durable here.
    pub fn fanout(&self) -> Vec<tokio::sync::mpsc::UnboundedSender<Queued>> {
        self.senders.clone()
    }

    /// Ends the batch and waits until a majority of voters (this node included) confirmed every
    /// queued blob durable; `any_blobs` false skips the wait (nothing was sent). The remaining
    /// copies finish in the background.
    ///
    /// Errors: [`BlobsError::NoMajority`].
    pub async fn finish(mut self, any_blobs: bool) -> Result<(), BlobsError> {
        self.senders.clear();
        if !self.active || !any_blobs {
            tokio::spawn(async move { while self.tasks.join_next().await.is_some() {} });
            return Ok(());
        }
        let mut got = 1;
        let mut detail = String::from("no follower answered");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        while got < self.needed {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok((_, Ok(()))))) => got += 1,
                Ok(Some(Ok((id, Err(e))))) => detail = format!("node {id}: {}", e.message()),
                Ok(Some(Err(e))) => detail = e.to_string(),
                Ok(None) => break,
                Err(_) => {
                    detail = "timed out after 120 s".into();
                    break;
                }
            }
        }
        let needed = self.needed;
        tokio::spawn(async move { while self.tasks.join_next().await.is_some() {} });
        if got >= needed {
            Ok(())
        } else {
            Err(BlobsError::NoMajority {
                got,
                needed,
                detail,
            })
        }
    }
}

/// gRPC `BlobService`: followers store blobs sent by the leader; anyone may fetch.
pub struct BlobServer {
    /// Blob access.
    pub blobs: Blobs,
    /// Repair state (answers `BlobHealth`).
    pub repair: crate::blobs::repair::Repair,
}

#[tonic::async_trait]
impl BlobService for BlobServer {
    async fn put_blobs(
        &self,
        req: Request<Streaming<StoredBlob>>,
    ) -> Result<Response<PutBlobsReply>, Status> {
        // Deletions decided before the copy (a `ForgetBlobs` the leader applied) must run
        // here first, or one could remove the copy.
        let gc_index: u64 = req
            .metadata()
            .get(GC_INDEX_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if gc_index > 0 {
            let applied = match &self.blobs.catalog {
                Some(c) => c.wait_applied(gc_index, GC_APPLY_WAIT).await,
                None => true,
            };
            if !applied {
                return Err(Status::unavailable(format!(
                    "this node has not applied log index {gc_index} (garbage collection) yet"
                )));
            }
        }
        let mut s = req.into_inner();
        let mut n = 0;
        // Verify and store up to PUTS_IN_FLIGHT blobs at once (each put waits for its fsyncs);
        // reply only when every one is durable.
        let mut puts: JoinSet<Result<(), Status>> = JoinSet::new();
        while let Some(b) = s.next().await {
            let b = b?;
            let hash =
                BlobHash::from_hex(&b.hash).map_err(|e| Status::invalid_argument(e.to_string()))?;
            while puts.len() >= PUTS_IN_FLIGHT {
                if let Some(r) = puts.join_next().await {
                    r.map_err(|e| Status::internal(e.to_string()))??;
                }
            }
            let store = self.blobs.store.clone();
            puts.spawn(async move {
                // Every copy is decoded and its content hash checked before it counts as held,
                // whoever sent it (an authorized peer may still be wrong or hostile); the store
                // replaces an existing file that does not hold this blob.
                let stored = b.stored;
                let stored = tokio::task::spawn_blocking(move || {
                    blob::decode(&hash, &stored, lifeboat_common::PART_SIZE).map(|_| stored)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
                store
                    .put(&hash, stored)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))
            });
            n += 1;
        }
        while let Some(r) = puts.join_next().await {
            r.map_err(|e| Status::internal(e.to_string()))??;
        }
        Ok(Response::new(PutBlobsReply { stored: n }))
    }

    async fn blob_health(
        &self,
        req: Request<BlobHealthRequest>,
    ) -> Result<Response<BlobHealthReply>, Status> {
        Ok(Response::new(self.repair.health(req.into_inner().rescan)))
    }

    type FetchBlobsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<StoredBlob, Status>> + Send>>;

    async fn fetch_blobs(
        &self,
        req: Request<FetchBlobsRequest>,
    ) -> Result<Response<Self::FetchBlobsStream>, Status> {
        let no_forward = req.metadata().contains_key(NO_FORWARD_HEADER);
        let verify = req.metadata().contains_key(VERIFY_HEADER);
        let mut hashes = Vec::new();
        for h in req.into_inner().hashes {
            hashes
                .push(BlobHash::from_hex(&h).map_err(|e| Status::invalid_argument(e.to_string()))?);
        }
        let blobs = self.blobs.clone();
        let s = futures::stream::iter(hashes).then(move |h| {
            let blobs = blobs.clone();
            async move {
                let res = if verify && !no_forward {
                    blobs.get_stored(&h).await
                } else {
                    match blobs.store.get(&h).await {
                        // Missing, or an encrypted copy that fails authentication (the plain
                        // form's corruption is caught by the fetcher's decode and retried with
                        // verification): fetch a verified copy from a peer and repair ours.
                        Err(BlobStoreError::NotFound(_) | BlobStoreError::Envelope(_))
                            if !no_forward =>
                        {
                            blobs.get_stored(&h).await
                        }
                        other => other.map_err(BlobsError::from),
                    }
                };
                match res {
                    Ok(stored) => Ok(StoredBlob {
                        hash: h.to_hex(),
                        stored,
                        // Fetchers decode and check every blob themselves.
                        stored_blake3: Vec::new(),
                    }),
                    Err(BlobsError::Store(BlobStoreError::NotFound(h))) => Err(Status::not_found(
                        format!("blob {h} not found on any coordinator"),
                    )),
                    Err(e @ BlobsError::Corrupt(_)) => Err(Status::data_loss(e.to_string())),
                    Err(e) => Err(Status::internal(e.to_string())),
                }
            }
        });
        Ok(Response::new(Box::pin(s)))
    }
}
