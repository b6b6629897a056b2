//! The global group's operator calls (`lifeboat.v1.ControlService`), typed: each asks the
//! coordinators of `conn` in turn (any one forwards to the global leader) until one answers.
//!
//! A refusal (`FAILED_PRECONDITION`, `INVALID_ARGUMENT`, `PERMISSION_DENIED`) ends the search
//! at once: every coordinator would refuse the same way; its message and, when the server coded
//! it, the `[CODE]` of its `lifeboat_common::wire_error` detail are in the error. Any other
//! failure (a coordinator down, partitioned, without a leader) moves on to the next address.

use std::future::Future;

use anyhow::{anyhow, bail};
use lifeboat_common::wire_error::WireError;
use lifeboat_proto::control_service_client::ControlServiceClient;
use lifeboat_proto::{
    change_topology_request, AuditEntry, AuditRequest, ChangeTopologyRequest, ConflictKeep,
    DrillPlan, DrillRequest, GlobalMember, GlobalStatusReply, GlobalStatusRequest,
    PeekReportRequest, RegionReport, ResolveConflictReply, ResolveConflictRequest,
    ShowTopologyRequest, SwitchoverReply, SwitchoverRequest, TopologyReply,
};
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::conn::ConnArgs;

/// A `ControlService` client on `ch` (message size limits as every Lifeboat client).
pub fn control_client(ch: Channel) -> ControlServiceClient<Channel> {
    ControlServiceClient::new(ch)
        .max_decoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES)
}

/// Whether `s` is a refusal every coordinator would repeat (no point asking the next one).
pub fn is_refusal(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
    )
}

/// `what: message [CODE]` for a refusal.
fn refusal(what: &str, s: &Status) -> anyhow::Error {
    match WireError::code_of(s) {
        Some(code) => anyhow!("{what}: {} [{code}]", s.message()),
        None => anyhow!("{what}: {}", s.message()),
    }
}

/// Runs one `ControlService` call (`f`, named `what` in errors) on the first coordinator of
/// `conn` that answers.
///
/// Errors: a refusal (see the module docs), or no coordinator answered (each one's error).
pub async fn on_any<R, F, Fut>(conn: &ConnArgs, what: &str, f: F) -> anyhow::Result<R>
where
    F: Fn(ControlServiceClient<Channel>) -> Fut,
    Fut: Future<Output = Result<Response<R>, Status>>,
{
    let mut errors = Vec::new();
    for addr in &conn.coordinators {
        match f(control_client(conn.channel(addr)?)).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if is_refusal(&s) => return Err(refusal(what, &s)),
            Err(s) => errors.push(format!("{addr}: {}", s.message())),
        }
    }
    bail!("{what}: no coordinator answered ({})", errors.join("; "))
}

/// The global group's status (committed state, leader, lease, region reports).
///
/// Errors: as [`on_any`].
pub async fn global_status(conn: &ConnArgs) -> anyhow::Result<GlobalStatusReply> {
    on_any(conn, "status", |mut c| async move {
        c.global_status(GlobalStatusRequest {}).await
    })
    .await
}

/// Asks for a switchover (or failback); returns once the global leader accepted it (it runs
/// asynchronously: poll [`global_status`]).
///
/// Errors: as [`on_any`]; a refused switchover names why (`[STALE_EPOCH]` for an order computed
/// under an older epoch).
pub async fn switchover(
    conn: &ConnArgs,
    req: SwitchoverRequest,
) -> anyhow::Result<SwitchoverReply> {
    let what = if req.failback {
        "failback"
    } else {
        "switchover"
    };
    on_any(conn, what, |mut c| {
        let req = req.clone();
        async move { c.switchover(req).await }
    })
    .await
}

/// The plan a failover to `to` (default: the policy's pick) would follow now.
///
/// Errors: as [`on_any`].
pub async fn drill(conn: &ConnArgs, to: Option<String>) -> anyhow::Result<DrillPlan> {
    on_any(conn, "drill", |mut c| {
        let to = to.clone();
        async move { c.drill(DrillRequest { to }).await }
    })
    .await
}

/// The last `limit` committed audit entries (0: 100), oldest first.
///
/// Errors: as [`on_any`].
pub async fn audit(conn: &ConnArgs, limit: u32) -> anyhow::Result<Vec<AuditEntry>> {
    let r = on_any(conn, "audit", |mut c| async move {
        c.audit(AuditRequest { limit }).await
    })
    .await?;
    Ok(r.entries)
}

/// The committed topology of the global group.
///
/// Errors: as [`on_any`].
pub async fn show_topology(conn: &ConnArgs) -> anyhow::Result<TopologyReply> {
    on_any(conn, "topology", |mut c| async move {
        c.show_topology(ShowTopologyRequest {}).await
    })
    .await
}

/// Adds `member` to the global group (it must be running with `[global] join = true`).
///
/// Errors: as [`on_any`].
pub async fn add_voter(
    conn: &ConnArgs,
    member: GlobalMember,
    actor: String,
) -> anyhow::Result<TopologyReply> {
    change_topology(conn, change_topology_request::Change::Add(member), actor).await
}

/// Removes voter `id` from the global group.
///
/// Errors: as [`on_any`].
pub async fn remove_voter(
    conn: &ConnArgs,
    id: u64,
    actor: String,
) -> anyhow::Result<TopologyReply> {
    change_topology(conn, change_topology_request::Change::Remove(id), actor).await
}

async fn change_topology(
    conn: &ConnArgs,
    change: change_topology_request::Change,
    actor: String,
) -> anyhow::Result<TopologyReply> {
    on_any(conn, "topology", |mut c| {
        let req = ChangeTopologyRequest {
            change: Some(change.clone()),
            actor: actor.clone(),
        };
        async move { c.change_topology(req).await }
    })
    .await
}

/// Settles the conflict at `path`, keeping `keep`; asked of each coordinator until the active
/// region's regional leader answers.
///
/// Errors: as [`on_any`] (a path without exactly one conflict is a refusal).
pub async fn resolve_conflict(
    conn: &ConnArgs,
    path: &str,
    keep: ConflictKeep,
) -> anyhow::Result<ResolveConflictReply> {
    on_any(conn, "resolve", |mut c| {
        let req = ResolveConflictRequest {
            path: path.to_string(),
            keep: keep as i32,
        };
        async move { c.resolve_conflict(req).await }
    })
    .await
}

/// What the first coordinator of `conn` that answers says about its region, leaving its
/// pending audit entries for the global leader.
///
/// Errors: as [`on_any`].
pub async fn peek_report(conn: &ConnArgs) -> anyhow::Result<RegionReport> {
    on_any(conn, "report", |mut c| async move {
        c.peek_report(PeekReportRequest {}).await
    })
    .await
}
