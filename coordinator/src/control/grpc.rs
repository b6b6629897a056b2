//! The gRPC edge of the global group: `lifeboat.v1.ControlService` (operators; any
//! coordinator answers and forwards to the global leader where needed) and
//! `lifeboat.v1.GlobalService` (coordinators and the witness only). Who may call what is checked
//! before these handlers run, per method ([`lifeboat_common::authz::method_allowed`]).
//!
//! | call | answered by |
//! |---|---|
//! | `GlobalStatus`, `Switchover`, `Drill`, `ShowTopology`, `ChangeTopology`, `Renew` | global leader (forwarded) |
//! | `Audit` | any global voter (committed state) |
//! | `Report`, `PeekReport` | any coordinator, about itself |
//! | `Observe` | any coordinator (relays another region's report) |
//! | `ResolveConflict` | the active region's regional leader (others answer `UNAVAILABLE`) |

use std::sync::Arc;
use std::time::Duration;

use lifeboat_proto::control_service_client::ControlServiceClient;
use lifeboat_proto::control_service_server::ControlService;
use lifeboat_proto::global_service_client::GlobalServiceClient;
use lifeboat_proto::global_service_server::GlobalService;
use lifeboat_proto::{
    change_topology_request, AuditReply, AuditRequest, ChangeTopologyRequest, DrillPlan,
    DrillRequest, GlobalStatusReply, GlobalStatusRequest, ObserveRequest, PeekReportRequest,
    RegionReport, RenewReply, RenewRequest, ReportRequest, ResolveConflictReply,
    ResolveConflictRequest, ShowTopologyRequest, SwitchoverReply, SwitchoverRequest, TopologyReply,
};
use tonic::{Request, Response, Status};

use super::runtime::{rpc, ControlRuntime, TopologyChange};
use crate::admin::Admin;

/// Longest wait for the global leader's answer to a forwarded call.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The global group's runtime, or the refusal of a coordinator without `[global]`.
fn runtime(c: &Option<Arc<ControlRuntime>>) -> Result<&Arc<ControlRuntime>, Status> {
    c.as_ref().ok_or_else(|| {
        Status::failed_precondition(
            "this coordinator has no [global] section: regions, failover and switchover need the global group",
        )
    })
}

/// The actor recorded in the audit log: a human caller's certificate identity, never what the
/// client wrote; a coordinator or witness forwarding an operator's call keeps the actor it was
/// given (and so does an insecure, certificate-less setup).
fn actor_of<T>(req: &Request<T>, claimed: String) -> String {
    match crate::authz::caller(req) {
        Some(id) if !id.role.is_peer() => id.uri(),
        _ => claimed,
    }
}

/// Forwards a call to the global leader unless this node is the leader (`None`: serve it
/// here).
macro_rules! forward_to_leader {
    ($rt:expr, $client:ident, $method:ident, $req:expr) => {
        if !$rt.leads_global_group() {
            let addr = $rt.global_leader_addr()?;
            let req = $req;
            return rpc(
                $rt.channels(),
                &addr,
                stringify!($method),
                FORWARD_TIMEOUT,
                |c| async move { $client::new(c).$method(req).await },
            )
            .await
            .map(Response::new);
        }
    };
}

/// `ControlService`, served by every coordinator and the witness.
pub struct ControlServer {
    /// The coordinator's admin state (conflict resolution runs on its regional leader).
    pub admin: Arc<Admin>,
}

#[tonic::async_trait]
impl ControlService for ControlServer {
    async fn global_status(
        &self,
        _req: Request<GlobalStatusRequest>,
    ) -> Result<Response<GlobalStatusReply>, Status> {
        let rt = runtime(&self.admin.control)?;
        forward_to_leader!(
            rt,
            ControlServiceClient,
            global_status,
            GlobalStatusRequest {}
        );
        rt.confirmed_status().await.map(Response::new)
    }

    async fn switchover(
        &self,
        req: Request<SwitchoverRequest>,
    ) -> Result<Response<SwitchoverReply>, Status> {
        let rt = runtime(&self.admin.control)?;
        let actor = actor_of(&req, req.get_ref().actor.clone());
        let mut r = req.into_inner();
        r.actor = actor;
        forward_to_leader!(rt, ControlServiceClient, switchover, r);
        rt.switchover(r).map(Response::new)
    }

    async fn drill(&self, req: Request<DrillRequest>) -> Result<Response<DrillPlan>, Status> {
        let rt = runtime(&self.admin.control)?;
        let r = req.into_inner();
        forward_to_leader!(rt, ControlServiceClient, drill, r);
        rt.drill(r).map(Response::new)
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditReply>, Status> {
        let rt = runtime(&self.admin.control)?;
        let limit = req.get_ref().limit as usize;
        Ok(Response::new(AuditReply {
            entries: rt.audit_tail(limit),
        }))
    }

    async fn show_topology(
        &self,
        _req: Request<ShowTopologyRequest>,
    ) -> Result<Response<TopologyReply>, Status> {
        let rt = runtime(&self.admin.control)?;
        forward_to_leader!(
            rt,
            ControlServiceClient,
            show_topology,
            ShowTopologyRequest {}
        );
        rt.topology(None, String::new()).await.map(Response::new)
    }

    async fn change_topology(
        &self,
        req: Request<ChangeTopologyRequest>,
    ) -> Result<Response<TopologyReply>, Status> {
        let rt = runtime(&self.admin.control)?;
        let actor = actor_of(&req, req.get_ref().actor.clone());
        let mut r = req.into_inner();
        r.actor = actor;
        let change = match r.change.clone() {
            Some(change_topology_request::Change::Add(m)) => TopologyChange::Add(m.into()),
            Some(change_topology_request::Change::Remove(id)) => TopologyChange::Remove(id),
            None => {
                return Err(Status::invalid_argument(
                    "a topology change names a member to add or a node id to remove",
                ))
            }
        };
        forward_to_leader!(rt, ControlServiceClient, change_topology, r);
        rt.topology(Some(change), r.actor).await.map(Response::new)
    }

    async fn resolve_conflict(
        &self,
        req: Request<ResolveConflictRequest>,
    ) -> Result<Response<ResolveConflictReply>, Status> {
        runtime(&self.admin.control)?;
        crate::xregion::conflicts::resolve(&self.admin, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn peek_report(
        &self,
        _req: Request<PeekReportRequest>,
    ) -> Result<Response<RegionReport>, Status> {
        let rt = runtime(&self.admin.control)?;
        Ok(Response::new(rt.report_with(false)))
    }
}

/// `GlobalService`, served by every coordinator and the witness (callers: peers only).
pub struct GlobalServer {
    /// The global group's runtime (None without `[global]`).
    pub control: Option<Arc<ControlRuntime>>,
}

#[tonic::async_trait]
impl GlobalService for GlobalServer {
    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewReply>, Status> {
        let rt = runtime(&self.control)?;
        let r = req.into_inner();
        forward_to_leader!(rt, GlobalServiceClient, renew, r);
        rt.handle_renew(r).await.map(Response::new)
    }

    async fn report(&self, _req: Request<ReportRequest>) -> Result<Response<RegionReport>, Status> {
        let rt = runtime(&self.control)?;
        Ok(Response::new(rt.report_with(true)))
    }

    async fn observe(
        &self,
        req: Request<ObserveRequest>,
    ) -> Result<Response<RegionReport>, Status> {
        let rt = runtime(&self.control)?;
        rt.observe(req.into_inner()).await.map(Response::new)
    }
}
