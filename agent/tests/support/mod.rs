//! Test-only fake of the coordinator's `AgentService` with the wire semantics the agent relies on:
//! a batch is validated whole (framing, hashes, delta bases, `reuse` of stored blobs only) and
//! then acknowledged with one catalog sequence number per change; a "follower" answers
//! UNAVAILABLE with the leader in `x-lifeboat-leader`. It counts payload bytes.
#![allow(dead_code)]

use lifeboat_common::wire_error::{ErrorCode, WireError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lifeboat_agent::{Config, PathConfig};
use lifeboat_common::blob::BlobHash;
use lifeboat_common::{LEADER_HEADER, MAX_MESSAGE_BYTES};
use lifeboat_proto::agent_service_server::{AgentService, AgentServiceServer};
use lifeboat_proto::{
    part_data::Body, push_message::Msg, Ack, EntryKind, FileChange, HeartbeatReply,
    HeartbeatRequest, PartData, PushMessage, PushReply, PutPartsReply,
};
use tonic::{Request, Response, Status, Streaming};

/// One committed catalog version.
#[derive(Debug, Clone)]
pub struct Version {
    pub seq: u64,
    pub kind: i32,
    pub deleted: bool,
    pub size: u64,
    pub mode: u32,
    pub blake3: String,
    pub parts: Vec<BlobHash>,
    pub symlink_target: String,
    pub rename_from: String,
    pub root: String,
    pub epoch: u64,
}

#[derive(Debug, Default)]
pub struct FakeState {
    /// Stored blobs (content), unless `store_content` is off (then only hashes are kept).
    pub blobs: HashMap<BlobHash, Vec<u8>>,
    pub store_content: bool,
    /// Latest version per path.
    pub catalog: BTreeMap<String, Version>,
    /// Every committed change, in order (path, version).
    pub log: Vec<(String, Version)>,
    pub payload_full: u64,
    pub payload_delta: u64,
    pub reuse_parts: u64,
    pub calls: u64,
    pub batches_acked: u64,
    pub seq: u64,
    pub epoch: u64,
    pub heartbeats: u64,
    /// Act as a follower: refuse with this leader address.
    pub redirect_to: Option<String>,
    /// Refuse batches containing these paths with INVALID_ARGUMENT naming the path.
    pub reject_paths: HashSet<String>,
    pub base_missing_errors: u64,
    /// Wait this long before reading the stream of the first `slow_calls` calls (ms).
    pub slow_ms: u64,
    pub slow_calls: u64,
    /// Calls whose request stream broke (cancelled by the agent).
    pub broken_streams: u64,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub state: Arc<Mutex<FakeState>>,
}

impl Fake {
    pub fn new() -> Fake {
        let f = Fake::default();
        f.state.lock().unwrap().store_content = true;
        f
    }
    pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
    /// Reassembles the stored content of `path`.
    pub fn content(&self, path: &str) -> Option<Vec<u8>> {
        let st = self.st();
        let v = st.catalog.get(path)?;
        if v.deleted {
            return None;
        }
        let mut out = Vec::new();
        for h in &v.parts {
            out.extend_from_slice(st.blobs.get(h)?);
        }
        Some(out)
    }
    /// Live (not deleted) paths.
    pub fn live_paths(&self) -> Vec<String> {
        self.st()
            .catalog
            .iter()
            .filter(|(_, v)| !v.deleted)
            .map(|(p, _)| p.clone())
            .collect()
    }
    pub fn payload(&self) -> (u64, u64) {
        let st = self.st();
        (st.payload_full, st.payload_delta)
    }
}

fn bad(msg: String) -> Status {
    Status::invalid_argument(msg)
}

struct Pending {
    change: FileChange,
    parts: Vec<BlobHash>,
    hasher: blake3::Hasher,
    complete_content: bool,
}

#[tonic::async_trait]
impl AgentService for Fake {
    async fn put_parts(
        &self,
        _: Request<Streaming<PartData>>,
    ) -> Result<Response<PutPartsReply>, Status> {
        Err(Status::unimplemented(
            "the fake stores parts only in batches",
        ))
    }

    async fn push_changes(
        &self,
        request: Request<Streaming<PushMessage>>,
    ) -> Result<Response<PushReply>, Status> {
        {
            let mut st = self.st();
            st.calls += 1;
            if let Some(l) = &st.redirect_to {
                let mut s = Status::unavailable("not the leader");
                s.metadata_mut().insert(LEADER_HEADER, l.parse().unwrap());
                return Err(s);
            }
        }
        let slow = {
            let mut st = self.st();
            if st.slow_calls > 0 {
                st.slow_calls -= 1;
                Some(std::time::Duration::from_millis(st.slow_ms))
            } else {
                None
            }
        };
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let mut stream = request.into_inner();
        let mut done: Vec<(FileChange, Vec<BlobHash>)> = Vec::new();
        let mut new_blobs: HashMap<BlobHash, Vec<u8>> = HashMap::new();
        let mut cur: Option<Pending> = None;
        let (mut full, mut delta, mut reuse) = (0u64, 0u64, 0u64);
        let finish = |p: Pending,
                      done: &mut Vec<(FileChange, Vec<BlobHash>)>|
         -> Result<(), Status> {
            if p.parts.len() != p.change.part_count as usize {
                return Err(bad(format!("path {:?}: missing parts", p.change.path)));
            }
            if p.change.kind == EntryKind::File as i32 && !p.change.deleted && p.complete_content {
                let got = p.hasher.finalize().to_hex().to_string();
                if got != p.change.blake3 {
                    return Err(bad(format!(
                        "path {:?}: content hash mismatch",
                        p.change.path
                    )));
                }
            }
            done.push((p.change, p.parts));
            Ok(())
        };
        loop {
            let m = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    self.st().broken_streams += 1;
                    return Err(e);
                }
            };
            match m.msg {
                Some(Msg::Change(c)) => {
                    if let Some(p) = cur.take() {
                        finish(p, &mut done)?;
                    }
                    lifeboat_common::path::validate_rel_path(&c.path)
                        .map_err(|e| bad(e.to_string()))?;
                    if !(c.path == c.root || c.path.starts_with(&format!("{}/", c.root))) {
                        return Err(bad(format!(
                            "path {:?} is not under root {:?}",
                            c.path, c.root
                        )));
                    }
                    if self.st().reject_paths.contains(&c.path) {
                        return Err(WireError::new(ErrorCode::InvalidChange)
                            .change(c.change_id, c.path.clone())
                            .status(format!("path {:?} refused by policy", c.path)));
                    }
                    cur = Some(Pending {
                        change: c,
                        parts: Vec::new(),
                        hasher: blake3::Hasher::new(),
                        complete_content: true,
                    });
                }
                Some(Msg::Part(p)) => {
                    let Some(pending) = cur.as_mut() else {
                        return Err(bad("part before any change".into()));
                    };
                    if p.index as usize != pending.parts.len() {
                        return Err(bad(format!(
                            "path {:?}: part out of order",
                            pending.change.path
                        )));
                    }
                    let hash = BlobHash::from_hex(&p.hash).map_err(|e| bad(e.to_string()))?;
                    let lookup = |h: &BlobHash| -> Result<Option<Vec<u8>>, Status> {
                        if let Some(b) = new_blobs.get(h) {
                            return Ok(Some(b.clone()));
                        }
                        let st = self.st();
                        match st.blobs.get(h) {
                            Some(b) if st.store_content => Ok(Some(b.clone())),
                            Some(_) => Ok(None),
                            None => {
                                drop(st);
                                self.st().base_missing_errors += 1;
                                Err(WireError::new(ErrorCode::BaseMissing)
                                    .status(format!("base missing: {h}")))
                            }
                        }
                    };
                    let content = match p.body {
                        Some(Body::Full(b)) => {
                            full += b.len() as u64;
                            Some(b)
                        }
                        Some(Body::Encoded(e)) => {
                            let b = lifeboat_common::blob::decode(
                                &hash,
                                &e,
                                lifeboat_common::PART_SIZE,
                            )
                            .map_err(|e| bad(e.to_string()))?;
                            full += b.len() as u64;
                            Some(b)
                        }
                        Some(Body::Delta(d)) => {
                            delta += d.len() as u64;
                            let base_hash =
                                BlobHash::from_hex(&p.base_hash).map_err(|e| bad(e.to_string()))?;
                            let base = lookup(&base_hash)?
                                .ok_or_else(|| Status::internal("delta without stored content"))?;
                            let mut out = Vec::new();
                            fast_rsync::apply(&base, &d, &mut out)
                                .map_err(|e| bad(format!("bad delta: {e}")))?;
                            Some(out)
                        }
                        Some(Body::Reuse(_)) => {
                            reuse += 1;
                            lookup(&hash)?
                        }
                        None => return Err(bad("part without body".into())),
                    };
                    match content {
                        Some(c) => {
                            if c.len() as u64 != p.size || BlobHash::of(&c) != hash {
                                return Err(bad(format!(
                                    "path {:?}: part {} does not match its hash",
                                    pending.change.path, p.index
                                )));
                            }
                            pending.hasher.update(&c);
                            if self.st().store_content {
                                new_blobs.insert(hash, c);
                            } else {
                                new_blobs.insert(hash, Vec::new());
                            }
                        }
                        None => pending.complete_content = false,
                    }
                    pending.parts.push(hash);
                }
                None => return Err(bad("empty message".into())),
            }
        }
        if let Some(p) = cur.take() {
            finish(p, &mut done)?;
        }
        // Commit the whole batch.
        let mut st = self.st();
        st.payload_full += full;
        st.payload_delta += delta;
        st.reuse_parts += reuse;
        for (h, b) in new_blobs {
            st.blobs.insert(h, b);
        }
        let mut acks = Vec::new();
        for (c, parts) in done {
            st.seq += 1;
            let v = Version {
                seq: st.seq,
                kind: c.kind,
                deleted: c.deleted,
                size: c.size,
                mode: c.mode,
                blake3: c.blake3.clone(),
                parts,
                symlink_target: c.symlink_target.clone(),
                rename_from: c.rename_from.clone(),
                root: c.root.clone(),
                epoch: c.epoch,
            };
            st.catalog.insert(c.path.clone(), v.clone());
            st.log.push((c.path.clone(), v));
            acks.push(Ack {
                change_id: c.change_id,
                seq: st.seq,
            });
        }
        st.batches_acked += 1;
        Ok(Response::new(PushReply {
            acks,
            log_index: st.seq,
            epoch: st.epoch,
        }))
    }

    async fn heartbeat(
        &self,
        _request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let mut st = self.st();
        st.heartbeats += 1;
        if let Some(l) = &st.redirect_to {
            let mut s = Status::unavailable("not the leader");
            s.metadata_mut().insert(LEADER_HEADER, l.parse().unwrap());
            return Err(s);
        }
        Ok(Response::new(HeartbeatReply {
            epoch: st.epoch,
            leader_addr: String::new(),
            active_region: String::new(),
            region: String::new(),
            active_coordinators: Vec::new(),
        }))
    }
}

/// Serves `fake` on 127.0.0.1:0 (plaintext); returns `host:port`.
pub async fn serve(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(
                AgentServiceServer::new(fake)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// A free loopback port nobody listens on.
pub fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

/// A test layout: `<tmp>/root` protected as "data", state in `<tmp>/state`.
pub struct Layout {
    pub tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub data_dir: PathBuf,
}

impl Layout {
    pub fn new() -> Layout {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let data_dir = tmp.path().join("state");
        Layout {
            tmp,
            root,
            data_dir,
        }
    }
    pub fn config(&self, coordinators: Vec<String>) -> Config {
        let mut c = Config::new("agent-test", self.data_dir.clone(), coordinators);
        c.debounce_ms = 50;
        c.heartbeat_ms = 100;
        c.paths = vec![PathConfig {
            name: "data".into(),
            path: self.root.clone(),
            include: vec!["**".into()],
            exclude: vec!["*.tmp".into()],
            follow_active: true,
            max_delete_share: None,
            max_delete_files: None,
        }];
        c
    }
    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

/// Deterministic incompressible bytes.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Polls `data_dir/status.json` until `pred` holds (panics after `secs`).
pub async fn wait_status(
    data_dir: &Path,
    secs: u64,
    what: &str,
    pred: impl Fn(&lifeboat_agent::Status) -> bool,
) -> lifeboat_agent::Status {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = lifeboat_agent::status::read(data_dir) {
            if pred(&s) {
                return s;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; last status {s:?}");
            }
        } else if std::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; no status file");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
