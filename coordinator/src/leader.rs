//! Who leads the regional group, and the `UNAVAILABLE` + `x-lifeboat-leader` answer followers give
//! so that clients follow the leader.

use lifeboat_common::LEADER_HEADER;
use tonic::Status;

use crate::raft::{NodeId, RegionRaft};

/// Leader lookup from Raft metrics.
#[derive(Clone)]
pub struct LeaderInfo {
    /// The local Raft.
    pub raft: RegionRaft,
    /// This node's id.
    pub node_id: NodeId,
}

impl LeaderInfo {
    /// Current leader's id, if known.
    pub fn leader_id(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Current leader's address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// `Ok` when this node is the leader; otherwise `UNAVAILABLE` naming the leader.
    ///
    /// Errors: the status to return to the client.
    pub fn ensure_leader(&self) -> Result<(), Status> {
        if self.leader_id() == Some(self.node_id) {
            Ok(())
        } else {
            Err(self.not_leader_status(self.leader_addr()))
        }
    }

    /// `UNAVAILABLE` with the leader's address in the `x-lifeboat-leader` header (when known).
    pub fn not_leader_status(&self, leader: Option<String>) -> Status {
        let mut s = Status::unavailable(match &leader {
            Some(a) => format!("not the leader; the leader is at {a}"),
            None => "no leader elected yet; retry shortly".to_string(),
        });
        if let Some(a) = leader {
            if let Ok(v) = a.parse() {
                s.metadata_mut().insert(LEADER_HEADER, v);
            }
        }
        s
    }

    /// The status for a failed regional `client_write`: a redirect to the leader, else
    /// `UNAVAILABLE` naming the cause.
    pub fn commit_error(
        &self,
        e: openraft::error::RaftError<
            u64,
            openraft::error::ClientWriteError<u64, openraft::BasicNode>,
        >,
    ) -> Status {
        match e {
            openraft::error::RaftError::APIError(
                openraft::error::ClientWriteError::ForwardToLeader(f),
            ) => self.not_leader_status(f.leader_node.map(|n| n.addr)),
            other => Status::unavailable(format!("raft commit failed: {other}")),
        }
    }
}
