//! Raft RPCs over tonic (mutual TLS). Each request and reply is the JSON of openraft's serde types
//! inside a `lifeboat.v1.RaftMessage`; a reply carries `Result<Response, RaftError>` so remote
//! Raft errors reach openraft intact. Pattern from openraft's `examples/raft-kv-memstore-grpc`.

use lifeboat_common::tls::TlsConfig;
use lifeboat_proto::raft_service_client::RaftServiceClient;
use lifeboat_proto::raft_service_server::RaftService;
use lifeboat_proto::RaftMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::types::{NodeId, TypeConfig};
use super::RaftHandle;

/// Creates per-peer Raft clients for one group.
#[derive(Clone)]
pub struct Network {
    /// TLS settings for outgoing connections.
    pub tls: TlsConfig,
    /// Raft group name sent in every message.
    pub group: String,
}

/// Client of one peer.
pub struct Connection {
    target: NodeId,
    client: Option<RaftServiceClient<Channel>>,
    addr: String,
    tls: TlsConfig,
    group: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            client: None,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            group: self.group.clone(),
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.client.is_none() {
            let ch = self
                .tls
                .channel(&self.addr)
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            self.client = Some(
                RaftServiceClient::new(ch)
                    .max_decoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES),
            );
        }
        let client = self.client.as_mut().expect("client set above");
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let msg = RaftMessage {
            group: self.group.clone(),
            data,
        };
        let fut = async {
            match which {
                "append" => client.append_entries(msg).await,
                "vote" => client.vote(msg).await,
                _ => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{which} to node {} timed out", self.target),
                );
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Err(status)) => {
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let res: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&reply.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call("vote", &rpc, &option).await
    }
}

/// Server side: hands incoming Raft RPCs to the local openraft instance of the named group
/// (`region` or `global`).
pub struct RaftServer {
    /// The local Raft of the regional group.
    pub raft: RaftHandle,
    /// The local Raft of the global group, when configured.
    pub global: Option<RaftHandle>,
}

impl RaftServer {
    fn pick<T: DeserializeOwned>(&self, m: &RaftMessage) -> Result<(&RaftHandle, T), Status> {
        let raft = match (m.group.as_str(), &self.global) {
            ("region", _) => &self.raft,
            ("global", Some(g)) => g,
            _ => {
                return Err(Status::not_found(format!(
                    "unknown raft group {:?}",
                    m.group
                )))
            }
        };
        let v = serde_json::from_slice(&m.data)
            .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
        Ok((raft, v))
    }
}

/// Checks the shape of an `AppendEntries` request before openraft sees it: its entries follow
/// `prev_log_id` without a gap or repeat (indexes `prev + 1, prev + 2, ...`, or from 0 without a
/// previous entry), their terms never decrease, start at or after `prev_log_id`'s and never
/// exceed the sender's vote. openraft trusts this shape; a request without it would make the log
/// store hold a gap and stop the Raft core for good.
///
/// Errors: the first violation, described.
pub fn check_append(r: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let vote_term = r.vote.leader_id().term;
    let first = r.prev_log_id.map(|p| p.index + 1).unwrap_or(0);
    let mut term = r.prev_log_id.map(|p| p.leader_id.term).unwrap_or(0);
    if term > vote_term {
        return Err(format!(
            "prev_log_id term {term} is above the sender's vote term {vote_term}"
        ));
    }
    for (index, e) in (first..).zip(r.entries.iter()) {
        if e.log_id.index != index {
            return Err(format!(
                "entry at index {} where index {index} must follow",
                e.log_id.index
            ));
        }
        let t = e.log_id.leader_id.term;
        if t < term || t > vote_term {
            return Err(format!(
                "entry {index} has term {t}: terms must not decrease ({term}) nor exceed the vote's ({vote_term})"
            ));
        }
        term = t;
    }
    Ok(())
}

fn encode<T: Serialize>(group: &str, v: &T) -> Result<tonic::Response<RaftMessage>, Status> {
    Ok(tonic::Response::new(RaftMessage {
        group: group.into(),
        data: serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl RaftService for RaftServer {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, Status> {
        let (raft, r): (_, AppendEntriesRequest<TypeConfig>) = self.pick(req.get_ref())?;
        check_append(&r)
            .map_err(|e| Status::invalid_argument(format!("bad AppendEntries: {e}")))?;
        encode(&req.get_ref().group, &raft.append_entries(r).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, Status> {
        let (raft, r): (_, InstallSnapshotRequest<TypeConfig>) = self.pick(req.get_ref())?;
        encode(&req.get_ref().group, &raft.install_snapshot(r).await)
    }

    async fn vote(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, Status> {
        let (raft, r): (_, VoteRequest<NodeId>) = self.pick(req.get_ref())?;
        encode(&req.get_ref().group, &raft.vote(r).await)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn req(
        vote_term: u64,
        prev: Option<(u64, u64)>,
        entries: Vec<Entry<TypeConfig>>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(vote_term, 1),
            prev_log_id: prev.map(|(t, i)| LogId::new(CommittedLeaderId::new(t, 1), i)),
            entries,
            leader_commit: None,
        }
    }

    #[test]
    fn append_entries_must_follow_prev_without_gaps_and_within_the_vote_term() {
        assert!(check_append(&req(3, Some((2, 13)), vec![entry(2, 14), entry(3, 15)])).is_ok());
        assert!(check_append(&req(1, None, vec![entry(0, 0), entry(1, 1)])).is_ok());
        assert!(check_append(&req(3, Some((2, 13)), vec![])).is_ok());
        // The reported attack: an entry at index 16 right after 13.
        let e = check_append(&req(3, Some((2, 13)), vec![entry(3, 16)])).unwrap_err();
        assert!(e.contains("index 16") && e.contains("14"), "{e}");
        // A repeat, a decreasing term, a term above the sender's vote.
        assert!(check_append(&req(3, Some((2, 13)), vec![entry(2, 14), entry(2, 14)])).is_err());
        assert!(check_append(&req(3, Some((2, 13)), vec![entry(3, 14), entry(2, 15)])).is_err());
        assert!(check_append(&req(3, Some((2, 13)), vec![entry(13, 14)])).is_err());
        assert!(check_append(&req(3, Some((2, 13)), vec![entry(1, 14)])).is_err());
    }
}
