//! The control path at run time (docs/failover.md): every coordinator runs
//!
//! - the **global leader loop** (acts only on the global group's leader): polls every region's
//!   coordinators for a [`RegionReport`], keeps the working control record in memory (leases
//!   granted, last renewal per region), runs [`failover::step`] every tick and commits its
//!   decisions (suspect, recovered, failover start and completion, audit) through the global
//!   Raft group; drives planned switchovers;
//! - the **region loop** (acts only on a regional leader): follows the committed record into
//!   [`Role`], renews the lease while its region is active, promotes its region when the record
//!   names it (stops copying, runs the traffic hooks, then reports the promotion), and copies the
//!   active region's catalog while standby.
//!
//! The witness runs the global leader loop only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::tls::TlsConfig;
use lifeboat_common::wire_error::{ErrorCode, WireError};
use lifeboat_proto::global_service_client::GlobalServiceClient;
use lifeboat_proto::{
    DrillPlan, DrillRequest, ObserveRequest, RegionReport, RenewReply, RenewRequest,
    SwitchoverReply, SwitchoverRequest, TopologyReply,
};
use openraft::ServerState;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tonic::Status;

use super::hooks::{self, HookContext};
use super::record::{AuditEntry, ControlCommand, ControlState};
use super::role::{now_ms, Role};
use super::store::ControlStore;
use crate::config::{GlobalConfig, GlobalMember};
use crate::control::failover::{self, Action, ControlRecord, Phase, RegionView};
use crate::control::lease;
use crate::intake::AgentTable;
use crate::raft::{Catalog, RegionRaft, Request as RaftRequest, TypeConfig};
use crate::xregion::replication::{ReplicationStatus, Replicator};
pub use metrics::{ControlMetrics, LeaderMetrics, RegionMetrics};

mod global;
mod metrics;
mod region;
mod renewals;
mod service;

/// The openraft handle of the global group (the control record). Everything of
/// `openraft::Raft` is reachable through `Deref`, except that [`GlobalRaft::client_write`]
/// takes only a [`ControlCommand`]: a catalog command cannot be proposed to the global group.
#[derive(Clone)]
pub struct GlobalRaft(pub openraft::Raft<TypeConfig>);

impl GlobalRaft {
    /// Proposes `cmd` and waits until it is committed and applied here.
    ///
    /// Errors: not the leader (with the leader, if known), or the group cannot commit.
    pub async fn client_write(
        &self,
        cmd: ControlCommand,
    ) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, crate::raft::WriteError> {
        self.0.client_write(RaftRequest::Control(cmd)).await
    }
}

impl std::ops::Deref for GlobalRaft {
    type Target = openraft::Raft<TypeConfig>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Tick of both loops.
const TICK: Duration = Duration::from_millis(50);
/// Timeout of one report or renewal RPC.
const RPC_TIMEOUT: Duration = Duration::from_millis(400);
/// How long one control-loop pass waits for other observers to relay an unreachable region's
/// report.
const OBSERVE_WAIT: Duration = Duration::from_millis(200);

/// gRPC channels to other coordinators, kept open between calls (the control loops call every
/// coordinator every tick; a new TLS connection per call would dominate detection time).
pub struct Channels {
    tls: TlsConfig,
    map: Mutex<HashMap<String, tonic::transport::Channel>>,
}

impl Channels {
    /// An empty cache.
    pub fn new(tls: TlsConfig) -> Self {
        Channels {
            tls,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, addr: &str) -> Result<tonic::transport::Channel, Status> {
        if let Some(c) = self.map.lock().get(addr) {
            return Ok(c.clone());
        }
        let c = self
            .tls
            .channel(addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.map.lock().insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn forget(&self, addr: &str) {
        self.map.lock().remove(addr);
    }
}

/// Runs one RPC to another coordinator at `addr` within `timeout`: `f` gets the cached
/// channel and makes the call (`what` names it in errors). A transport failure drops the cached
/// channel so the next call reconnects.
///
/// Errors: `DEADLINE_EXCEEDED` after `timeout`, or the server's `Status`.
pub async fn rpc<R, F, Fut>(
    channels: &Channels,
    addr: &str,
    what: &str,
    timeout: Duration,
    f: F,
) -> Result<R, Status>
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
{
    match tokio::time::timeout(timeout, f(channels.get(addr)?)).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "{what} to {addr} timed out"
        ))),
        Ok(Err(s)) => {
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                channels.forget(addr);
            }
            Err(s)
        }
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// `GlobalService.Renew` on `addr`.
async fn call_renew(
    channels: &Channels,
    addr: &str,
    req: RenewRequest,
    timeout: Duration,
) -> Result<RenewReply, Status> {
    rpc(channels, addr, "renew", timeout, |c| async move {
        GlobalServiceClient::new(c).renew(req).await
    })
    .await
}

/// `GlobalService.Report` on `addr` (hands over its pending audit entries).
async fn call_report(
    channels: &Channels,
    addr: &str,
    timeout: Duration,
) -> Result<RegionReport, Status> {
    rpc(channels, addr, "report", timeout, |c| async move {
        GlobalServiceClient::new(c)
            .report(lifeboat_proto::ReportRequest {})
            .await
    })
    .await
}

/// Parts of a regional coordinator the region loop drives (absent on the witness).
#[derive(Clone)]
pub struct Regional {
    /// Regional Raft.
    pub raft: RegionRaft,
    /// Catalog.
    pub catalog: Catalog,
    /// Replication progress.
    pub replication: ReplicationStatus,
    /// Agent heartbeats.
    pub agents: AgentTable,
    /// Template of the replicator (its upstream is replaced by the active region's).
    pub replicator: Replicator,
    /// Synchronous replication of intake (None when asynchronous).
    pub sync: Option<crate::intake::SyncAck>,
}

struct LeaderWork {
    /// Global Raft term this work belongs to (a new term re-runs `on_became_leader`).
    term: u64,
    /// Decisions computed but not yet committed: no lease is granted meanwhile.
    pending: bool,
    rec: ControlRecord,
    committed_epoch: u64,
    last_renew: HashMap<String, u64>,
    reports: BTreeMap<String, (u64, RegionReport)>,
    blocked: Option<String>,
    /// When the active region was last known healthy before the current failover (RTO start).
    failover_start_ms: Option<u64>,
    switchover: Option<Switchover>,
    /// Since when the preferred region is healthy and caught up while another region is active
    /// (automatic failback).
    home_ready_since: Option<u64>,
    /// Each standby's measured lag (ms) when the active region was last heard from (see
    /// [`failover::standby_rpo_ms`]).
    lag_at_contact: BTreeMap<String, u64>,
    /// The views of the last tick (health and expected RPO per region), for `/metrics`.
    views: Vec<RegionView>,
}

#[derive(Clone)]
struct Switchover {
    from: String,
    to: String,
    actor: String,
    started_ms: u64,
    deadline_ms: u64,
    failback: bool,
    /// Compare-and-set epoch of the decision that starts it (the operator's, if given).
    expect_epoch: u64,
}

#[derive(Default)]
struct RegionLocal {
    promoting: Option<u64>,
    pending_audit: Vec<AuditEntry>,
    /// Database role outcomes already audited (see `dbs::new_entries`).
    db_audited: std::collections::HashSet<crate::control::dbs::AuditKey>,
    replicating_from: Option<(String, JoinHandle<()>)>,
    last_renew_ms: u64,
}

/// The control runtime of one coordinator.
pub struct ControlRuntime {
    /// This node.
    pub node_id: u64,
    /// This node's region (the witness's site name on the witness).
    pub region: String,
    /// This node is the witness.
    pub witness: bool,
    /// Global Raft.
    pub global: GlobalRaft,
    /// Global state machine.
    pub store: ControlStore,
    /// `[global]`.
    pub cfg: GlobalConfig,
    /// TLS for RPCs to other coordinators.
    pub tls: TlsConfig,
    /// Open channels to other coordinators.
    channels: Arc<Channels>,
    /// Role shared with intake.
    pub role: Arc<Role>,
    /// Regional parts (None on the witness).
    pub regional: Option<Regional>,
    leader: Mutex<Option<LeaderWork>>,
    local: Mutex<RegionLocal>,
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("bad control request: {e}"))
}

/// A change of the global group's topology (`ControlService.ChangeTopology`).
#[derive(Debug, Clone)]
pub enum TopologyChange {
    /// Add this voter.
    Add(GlobalMember),
    /// Remove the voter with this node id.
    Remove(u64),
}

fn audit(epoch: u64, actor: String, action: &str, detail: String, outcome: &str) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at_ms: now_ms(),
        epoch,
        actor,
        action: action.into(),
        detail,
        outcome: outcome.into(),
    }
}

impl ControlRuntime {
    /// Builds the runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: u64,
        region: String,
        witness: bool,
        global: GlobalRaft,
        store: ControlStore,
        cfg: GlobalConfig,
        tls: TlsConfig,
        role: Arc<Role>,
        regional: Option<Regional>,
    ) -> Arc<Self> {
        Arc::new(ControlRuntime {
            node_id,
            region,
            witness,
            global,
            store,
            cfg,
            channels: Arc::new(Channels::new(tls.clone())),
            tls,
            role,
            regional,
            leader: Mutex::new(None),
            local: Mutex::new(RegionLocal::default()),
        })
    }

    /// Starts both loops; they end when the process does.
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        use tracing::Instrument;
        let mut v = Vec::new();
        let me = self.clone();
        let span = tracing::info_span!("global", node = self.node_id, region = %self.region);
        v.push(tokio::spawn(
            async move {
                loop {
                    me.global_tick().await;
                    tokio::time::sleep(TICK).await;
                }
            }
            .instrument(span),
        ));
        if self.regional.is_some() {
            let me = self.clone();
            let span =
                tracing::info_span!("region_control", node = self.node_id, region = %self.region);
            v.push(tokio::spawn(
                async move {
                    loop {
                        me.region_tick().await;
                        tokio::time::sleep(TICK).await;
                    }
                }
                .instrument(span),
            ));
        }
        v
    }

    fn global_leader(&self) -> Option<(u64, String)> {
        let m = self.global.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    fn is_global_leader(&self) -> bool {
        self.global.metrics().borrow().state == ServerState::Leader
    }

    fn global_term(&self) -> u64 {
        self.global.metrics().borrow().current_term
    }

    async fn propose(&self, cmd: ControlCommand) -> Result<bool, String> {
        match self.global.client_write(cmd).await {
            Ok(r) => Ok(r.data.accepted),
            Err(e) => Err(e.to_string()),
        }
    }
}
