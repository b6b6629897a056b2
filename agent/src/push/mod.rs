//! The wire side: a `PushChanges` client-streaming call per batch (parts read lazily, one at a
//! time, as the stream is polled), heartbeats, and leader following.
//!
//! Leader following: a follower answers `UNAVAILABLE` with the leader's `host:port` in the
//! [`LEADER_HEADER`] metadata; the agent switches to it at once. Any other transport failure moves
//! to the next configured coordinator (the caller backs off exponentially).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::tls::{TlsConfig, TlsError};
use lifeboat_common::wire_error::{ErrorCode, WireError};
use lifeboat_common::{LEADER_HEADER, MAX_MESSAGE_BYTES};
use lifeboat_proto as pb;
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::{part_data::Body as PbBody, push_message::Msg};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::files::batch::PlannedChange;
use crate::files::delta::{self, Body};

/// Timeout of one heartbeat call.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Base timeout of one `PushChanges` call; one more second is allowed per MiB of payload.
pub const PUSH_BASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call did not succeed, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A follower named the leader: switch to it and retry at once.
    #[error("not the leader; leader is {leader}")]
    NotLeader {
        /// `host:port` of the leader.
        leader: String,
    },
    /// The coordinator lacks a blob the batch referenced (`reuse` or a delta base): resend the
    /// batch with every part full.
    #[error("coordinator is missing a base blob: {0}")]
    BaseMissing(String),
    /// The coordinator refused a change as invalid (bad path, ...): drop that change (named by
    /// `change_id` when the refusal is coded [`ErrorCode::InvalidChange`], else bisect).
    #[error("coordinator refused the batch as invalid: {message}")]
    Invalid {
        /// The refused change, if the coordinator named it.
        change_id: Option<u64>,
        /// Status message.
        message: String,
    },
    /// The change or order carries an older epoch than the current one, `current`: adopt it
    /// and resend.
    #[error("stale epoch (current epoch is {current}): {message}")]
    StaleEpoch {
        /// The current epoch.
        current: u64,
        /// Status message.
        message: String,
    },
    /// A file changed between planning and streaming; the batch was cancelled.
    #[error("{path} changed while it was sent")]
    Changed {
        /// Filesystem path.
        path: PathBuf,
    },
    /// Connection failure, timeout, or a server-side failure: try the next coordinator.
    #[error("transport error talking to {addr}: {message}")]
    Transport {
        /// Coordinator address.
        addr: String,
        /// What happened.
        message: String,
    },
    /// Any other refusal (e.g. a failed precondition other than a missing base): back off.
    #[error("coordinator {addr} refused the call ({code:?}): {message}")]
    Rejected {
        /// Coordinator address.
        addr: String,
        /// gRPC code.
        code: Code,
        /// Status message.
        message: String,
    },
    /// TLS files or the address could not be turned into a channel.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Classifies a status returned by coordinator `addr`: by its coded detail
/// ([`WireError`]) first, then by its gRPC code. Never by the message text.
pub fn classify(addr: &str, status: &Status) -> PushError {
    let message = status.message().to_string();
    match WireError::of(status) {
        Some(WireError {
            code: ErrorCode::BaseMissing,
            ..
        }) => return PushError::BaseMissing(message),
        Some(WireError {
            code: ErrorCode::StaleEpoch,
            epoch: Some(current),
            ..
        }) => return PushError::StaleEpoch { current, message },
        Some(WireError {
            code: ErrorCode::InvalidChange,
            change_id,
            ..
        }) => return PushError::Invalid { change_id, message },
        _ => {}
    }
    match status.code() {
        Code::Unavailable => {
            let leader = status
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|l| !l.is_empty() && *l != addr);
            match leader {
                Some(l) => PushError::NotLeader {
                    leader: l.to_string(),
                },
                None => PushError::Transport {
                    addr: addr.to_string(),
                    message,
                },
            }
        }
        Code::InvalidArgument => PushError::Invalid {
            change_id: None,
            message,
        },
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Unknown
        | Code::Internal
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::DataLoss => PushError::Transport {
            addr: addr.to_string(),
            message,
        },
        code => PushError::Rejected {
            addr: addr.to_string(),
            code,
            message,
        },
    }
}

/// Index in `changes` of the change with `change_id`, if any.
pub fn blamed_change(change_id: Option<u64>, changes: &[PlannedChange]) -> Option<usize> {
    let id = change_id?;
    changes.iter().position(|c| c.change_id == id)
}

/// Which coordinator the agent talks to.
#[derive(Debug)]
pub struct Coordinators {
    addrs: Vec<String>,
    cur: Mutex<(String, usize)>,
    /// Address last confirmed to be the leader (empty: none).
    confirmed: Mutex<String>,
}

impl Coordinators {
    /// Starts with the first configured address.
    pub fn new(addrs: Vec<String>) -> Coordinators {
        let first = addrs.first().cloned().unwrap_or_default();
        Coordinators {
            addrs,
            cur: Mutex::new((first, 0)),
            confirmed: Mutex::new(String::new()),
        }
    }

    /// Records that `addr` answered as the leader.
    pub fn confirm(&self, addr: &str) {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = addr.to_string();
    }

    /// Whether `addr` was confirmed as the leader since the last switch.
    pub fn is_confirmed(&self, addr: &str) -> bool {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) == addr
    }

    fn unconfirm(&self) {
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The address calls go to now.
    pub fn current(&self) -> String {
        self.cur.lock().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// Switches to the leader a coordinator named. Returns whether it changed.
    pub fn redirect(&self, leader: &str) -> bool {
        let mut cur = self.cur.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 == leader {
            return false;
        }
        tracing::info!(leader, previous = %cur.0, "following the leader");
        cur.0 = leader.to_string();
        self.unconfirm();
        true
    }

    /// After a failure talking to `failed`, moves to the next configured coordinator (only if
    /// nobody moved already).
    pub fn rotate(&self, failed: &str) {
        let mut cur = self.cur.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != failed || self.addrs.is_empty() {
            return;
        }
        let next = match self.addrs.iter().position(|a| a == failed) {
            Some(i) => (i + 1) % self.addrs.len(),
            None => cur.1 % self.addrs.len(),
        };
        *cur = (self.addrs[next].clone(), next + 1);
        self.unconfirm();
        tracing::debug!(next = %cur.0, failed, "trying the next coordinator");
    }
}

/// Cumulative payload counters (bytes of `full` and `delta` bodies put on the wire since start).
#[derive(Debug, Default)]
pub struct SendCounters {
    /// Bytes of `full` bodies.
    pub full: AtomicU64,
    /// Bytes of `delta` bodies.
    pub delta: AtomicU64,
    /// Bytes of snapshot parts stored with `PutParts` while spooling (`crate::snapshot::preupload`).
    pub preuploaded: AtomicU64,
}

/// The gRPC client of the agent: one lazily connecting channel per coordinator address.
pub struct PushClient {
    tls: TlsConfig,
    channels: Mutex<HashMap<String, Channel>>,
    /// Where calls go.
    pub coordinators: Coordinators,
    part_size: usize,
    /// Agent id used when probing for the leader (empty: never probe).
    pub agent_id: String,
}

impl std::fmt::Debug for PushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushClient")
            .field("coordinators", &self.coordinators)
            .finish()
    }
}

/// Options of one `PushChanges` attempt.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// Send every part whole (after `base_missing`).
    pub force_full: bool,
    /// Epoch stamped on every change.
    pub epoch: u64,
}

impl PushClient {
    /// A client for `coordinators` (`host:port`), TLS per `tls`, streaming parts of `part_size`
    /// bytes.
    pub fn new(tls: TlsConfig, coordinators: Vec<String>, part_size: usize) -> PushClient {
        PushClient {
            tls,
            channels: Mutex::new(HashMap::new()),
            coordinators: Coordinators::new(coordinators),
            part_size,
            agent_id: String::new(),
        }
    }

    fn client(&self, addr: &str) -> Result<AgentServiceClient<Channel>, TlsError> {
        let mut ch = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match ch.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.tls.channel(addr)?;
                ch.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(AgentServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Streams one batch to the current coordinator and waits for the acknowledgement.
    ///
    /// Errors: [`PushError`], classified for the retry policy (see [`classify`]).
    pub async fn push(
        &self,
        batch: Arc<Vec<PlannedChange>>,
        opts: SendOptions,
        counters: Arc<SendCounters>,
    ) -> Result<pb::PushReply, PushError> {
        let addr = self.coordinators.current();
        let mut client = self.client(&addr)?;
        self.probe_leader(&addr, &mut client, opts.epoch).await?;
        let payload: u64 = if opts.force_full {
            batch.iter().map(|c| c.size).sum()
        } else {
            batch.iter().map(|c| c.payload_bytes()).sum()
        };
        let timeout = PUSH_BASE_TIMEOUT + Duration::from_secs(payload / (1024 * 1024));
        let (abort_tx, abort_rx) = oneshot::channel();
        let stream = batch_stream(batch, opts, self.part_size, counters, abort_tx);
        let call = tokio::time::timeout(timeout, client.push_changes(stream));
        tokio::select! {
            r = call => match r {
                Err(_) => Err(PushError::Transport { addr, message: format!("no reply within {} s", timeout.as_secs()) }),
                Ok(Err(status)) => Err(classify(&addr, &status)),
                Ok(Ok(reply)) => {
                    self.coordinators.confirm(&addr);
                    Ok(reply.into_inner())
                }
            },
            Ok(path) = abort_rx => Err(PushError::Changed { path }),
        }
    }

    /// Asks `addr` who leads before streaming (a follower's refusal would otherwise arrive only
    /// after HTTP/2 flow control let megabytes of parts go out), unless it was confirmed already
    /// or the client has no agent id.
    ///
    /// Errors: [`PushError::NotLeader`] naming the leader, or the probe's failure.
    async fn probe_leader(
        &self,
        addr: &str,
        client: &mut AgentServiceClient<Channel>,
        epoch: u64,
    ) -> Result<(), PushError> {
        if self.agent_id.is_empty() || self.coordinators.is_confirmed(addr) {
            return Ok(());
        }
        let probe = pb::HeartbeatRequest {
            agent_id: self.agent_id.clone(),
            epoch,
            probe: true,
            ..Default::default()
        };
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(probe)).await {
            Err(_) => Err(PushError::Transport {
                addr: addr.to_string(),
                message: "leader probe timed out".into(),
            }),
            Ok(Err(status)) => Err(classify(addr, &status)),
            Ok(Ok(r)) => {
                let leader = r.into_inner().leader_addr;
                if leader == addr {
                    self.coordinators.confirm(addr);
                } else if !leader.is_empty() {
                    return Err(PushError::NotLeader { leader });
                }
                Ok(())
            }
        }
    }

    /// Streams whole parts to the leader with `PutParts` (see `crate::snapshot::preupload`) and returns
    /// its reply: the hashes stored durably. Follows one leader redirect before streaming.
    ///
    /// Errors: [`PushError`] as for [`PushClient::push`].
    pub async fn put_parts(
        &self,
        parts: impl Stream<Item = pb::PartData> + Send + 'static,
        epoch: u64,
    ) -> Result<pb::PutPartsReply, PushError> {
        let mut addr = self.coordinators.current();
        let mut client = self.client(&addr)?;
        if let Err(e) = self.probe_leader(&addr, &mut client, epoch).await {
            let PushError::NotLeader { leader } = e else {
                return Err(e);
            };
            self.coordinators.redirect(&leader);
            addr = leader;
            client = self.client(&addr)?;
            self.probe_leader(&addr, &mut client, epoch).await?;
        }
        match client.put_parts(parts).await {
            Err(status) => Err(classify(&addr, &status)),
            Ok(r) => Ok(r.into_inner()),
        }
    }

    /// Sends one heartbeat to the current coordinator.
    ///
    /// Errors: [`PushError`] as for [`PushClient::push`].
    pub async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatReply, PushError> {
        let addr = self.coordinators.current();
        let mut client = self.client(&addr)?;
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(req)).await {
            Err(_) => Err(PushError::Transport {
                addr,
                message: "heartbeat timed out".into(),
            }),
            Ok(Err(status)) => Err(classify(&addr, &status)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

struct StreamState {
    batch: Arc<Vec<PlannedChange>>,
    opts: SendOptions,
    part_size: usize,
    counters: Arc<SendCounters>,
    abort: Option<oneshot::Sender<PathBuf>>,
    change: usize,
    /// Next part of the current change; `None` = its header is next.
    part: Option<usize>,
}

fn msg(m: Msg) -> pb::PushMessage {
    pb::PushMessage { msg: Some(m) }
}

/// Builds the part message, reading from disk unless the plan kept the payload.
async fn part_message(
    c: &PlannedChange,
    i: usize,
    opts: SendOptions,
    part_size: usize,
) -> std::io::Result<pb::PartData> {
    let p = &c.parts[i];
    let mut out = pb::PartData {
        index: p.index,
        hash: p.hash.to_hex(),
        size: p.size,
        body: None,
        base_hash: String::new(),
    };
    let read = |hash: BlobHash| {
        let path = c.fs_path.clone();
        let (index, size) = (p.index, p.size);
        async move {
            tokio::task::spawn_blocking(move || {
                delta::read_part(&path, index, part_size, size, &hash)
            })
            .await
            .map_err(std::io::Error::other)?
        }
    };
    // Whole parts travel compressed in the stored blob form (the leader decodes, checks and
    // stores the bytes as they are).
    let encode = |data: Vec<u8>| async move {
        tokio::task::spawn_blocking(move || PbBody::Encoded(blob::encode(&data)))
            .await
            .map_err(std::io::Error::other)
    };
    let body = match (&p.body, opts.force_full) {
        // A retained payload of a `full` part is its content: good for forced-full resends too.
        (Body::Full, _) if p.retained.is_some() => {
            encode(p.retained.clone().unwrap_or_default()).await?
        }
        (Body::Reuse, false) => PbBody::Reuse(true),
        (Body::Delta { base, base_sig, .. }, false) => {
            out.base_hash = base.to_hex();
            match &p.retained {
                Some(d) => PbBody::Delta(d.clone()),
                None => {
                    let data = read(p.hash).await?;
                    let sig = base_sig.clone();
                    let d = tokio::task::spawn_blocking(move || delta::delta(&sig, &data))
                        .await
                        .map_err(std::io::Error::other)?
                        .ok_or_else(|| std::io::Error::other("stored signature is unusable"))?;
                    PbBody::Delta(d)
                }
            }
        }
        _ => encode(read(p.hash).await?).await?,
    };
    out.body = Some(body);
    Ok(out)
}

/// The lazy message stream of one batch: each change's header, then its parts, each part read
/// from disk only when the stream is polled. If a file changed since it was planned, the path is
/// sent on `abort` and the stream stalls (the caller cancels the call).
fn batch_stream(
    batch: Arc<Vec<PlannedChange>>,
    opts: SendOptions,
    part_size: usize,
    counters: Arc<SendCounters>,
    abort: oneshot::Sender<PathBuf>,
) -> impl Stream<Item = pb::PushMessage> + Send + 'static {
    let st = StreamState {
        batch,
        opts,
        part_size,
        counters,
        abort: Some(abort),
        change: 0,
        part: None,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            let batch = st.batch.clone();
            let c = batch.get(st.change)?;
            match st.part {
                None => {
                    st.part = Some(0);
                    return Some((msg(Msg::Change(c.header(st.opts.epoch))), st));
                }
                Some(i) if i < c.parts.len() => {
                    match part_message(c, i, st.opts, st.part_size).await {
                        Ok(p) => {
                            match &p.body {
                                Some(PbBody::Full(_) | PbBody::Encoded(_)) => {
                                    // Content bytes (before compression).
                                    st.counters.full.fetch_add(p.size, Ordering::Relaxed);
                                }
                                Some(PbBody::Delta(b)) => {
                                    st.counters
                                        .delta
                                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                                }
                                _ => {}
                            }
                            st.part = Some(i + 1);
                            return Some((msg(Msg::Part(p)), st));
                        }
                        Err(e) => {
                            tracing::info!(path = %c.fs_path.display(), error = %e, "file changed while being sent; cancelling the batch to plan it again");
                            if let Some(a) = st.abort.take() {
                                let _ = a.send(c.fs_path.clone());
                            }
                            futures::future::pending::<()>().await;
                            return None;
                        }
                    }
                }
                Some(_) => {
                    st.change += 1;
                    st.part = None;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_common::catalog::EntryKind;

    fn change(id: u64, path: &str) -> PlannedChange {
        PlannedChange {
            change_id: id,
            root: 0,
            root_name: "data".into(),
            rel: path.trim_start_matches("data/").into(),
            path: path.into(),
            fs_path: PathBuf::from("/nonexistent"),
            kind: EntryKind::File,
            deleted: false,
            size: 0,
            mode: 0o644,
            mtime_ns: 0,
            blake3: None,
            symlink_target: None,
            rename_from: None,
            parts: vec![],
        }
    }

    #[test]
    fn classifies_statuses() {
        let mut s = Status::unavailable("not leader");
        s.metadata_mut()
            .insert(LEADER_HEADER, "10.0.0.2:7101".parse().unwrap());
        assert!(
            matches!(classify("10.0.0.1:7101", &s), PushError::NotLeader { leader } if leader == "10.0.0.2:7101")
        );
        // Pointing at itself or without a header: a transport problem.
        assert!(matches!(
            classify("10.0.0.2:7101", &s),
            PushError::Transport { .. }
        ));
        assert!(matches!(
            classify("a:1", &Status::unavailable("down")),
            PushError::Transport { .. }
        ));
        // Decisions follow the coded detail, never the text.
        assert!(matches!(
            classify("a:1", &Status::failed_precondition("base_missing: abc")),
            PushError::Rejected { .. }
        ));
        assert!(matches!(
            classify(
                "a:1",
                &WireError::new(ErrorCode::BaseMissing).status("anything")
            ),
            PushError::BaseMissing(_)
        ));
        assert!(matches!(
            classify(
                "a:1",
                &Status::failed_precondition("stale_epoch: the current epoch is 12")
            ),
            PushError::Rejected { .. }
        ));
        assert!(matches!(
            classify(
                "a:1",
                &WireError::new(ErrorCode::StaleEpoch).epoch(12).status("x")
            ),
            PushError::StaleEpoch { current: 12, .. }
        ));
        assert!(matches!(
            classify("a:1", &Status::invalid_argument("bad path")),
            PushError::Invalid {
                change_id: None,
                ..
            }
        ));
        assert!(matches!(
            classify(
                "a:1",
                &WireError::new(ErrorCode::InvalidChange)
                    .change(11, "data/ab")
                    .status("bad path")
            ),
            PushError::Invalid {
                change_id: Some(11),
                ..
            }
        ));
    }

    #[test]
    fn finds_blamed_change() {
        let cs = vec![
            change(10, "data/a"),
            change(11, "data/ab"),
            change(12, "data/c"),
        ];
        assert_eq!(blamed_change(Some(11), &cs), Some(1));
        assert_eq!(blamed_change(Some(1), &cs), None);
        assert_eq!(blamed_change(None, &cs), None);
    }

    #[test]
    fn rotates_and_redirects() {
        let c = Coordinators::new(vec!["a:1".into(), "b:2".into(), "c:3".into()]);
        assert_eq!(c.current(), "a:1");
        c.rotate("a:1");
        assert_eq!(c.current(), "b:2");
        c.rotate("a:1"); // stale failure report: no move
        assert_eq!(c.current(), "b:2");
        assert!(c.redirect("z:9"));
        assert!(!c.redirect("z:9"));
        c.rotate("z:9");
        assert_eq!(c.current(), "c:3");
        c.rotate("c:3");
        assert_eq!(c.current(), "a:1");
    }
}
