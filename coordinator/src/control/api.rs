//! JSON documents of the `AdminService.Control` RPC: `op` selects the operation, `body` and the
//! reply are the JSON of the types below. Decoding rejects unknown or malformed documents with
//! `INVALID_ARGUMENT`.
//!
//! | op | body | reply | served by |
//! |---|---|---|---|
//! | `renew` | [`RenewRequest`] | [`RenewReply`] | global leader |
//! | `report` | [`ReportRequest`] (`{}`) | [`RegionReport`] | any coordinator (about itself) |
//! | `status` | `{}` | [`ControlStatus`] | global leader (forwarded) |
//! | `switchover` | [`SwitchoverRequest`] | [`SwitchoverReply`] | global leader (forwarded) |
//! | `drill` | [`DrillRequest`] | [`DrillPlan`] | global leader (forwarded) |
//! | `audit` | [`AuditRequest`] | `Vec<AuditEntry>` | any global voter (committed state) |
//! | `topology` | [`TopologyRequest`] | [`TopologyReply`] | global leader (forwarded) |

use serde::{Deserialize, Serialize};

use super::record::{AuditEntry, ControlState};

/// Lease renewal asked by the active region's leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// Asking region.
    pub region: String,
    /// Epoch it believes current.
    pub epoch: u64,
    /// Asking node.
    pub node_id: u64,
    /// It asks to acknowledge without a standby region's confirmation (true), or every change
    /// it acknowledged is confirmed (false): the global leader records the change
    /// (`ControlCommand::SetSyncDegraded`) before answering. See `crate::intake::SyncAck`.
    #[serde(default)]
    pub sync_degraded: bool,
}

/// Answer to a renewal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewReply {
    /// Granted?
    pub granted: bool,
    /// Lease length, ms, measured by the holder from when it sent the request.
    pub lease_ms: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Current active region.
    pub active_region: String,
    /// Why it was refused.
    pub reason: String,
    /// The committed state says the asking region is degraded at `epoch` (it may acknowledge
    /// alone).
    #[serde(default)]
    pub sync_degraded_recorded: bool,
}

/// `report`: the global leader sends `{}` (the answer carries, and so hands over, the node's
/// pending audit entries); monitors and tests send `{"peek": true}` to leave them in place.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// Do not drain `pending_audit` (the reply's list is then empty).
    #[serde(default)]
    pub peek: bool,
}

/// Body of the `observe` op. The global leader could not reach `region`'s coordinators itself;
/// the asked coordinator (another observer, in another region or the witness) polls them and
/// relays their report, so a region is lost only when no observer reachable from the quorum
/// hears it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ObserveRequest {
    /// Region to observe.
    pub region: String,
}

/// What one coordinator says about its region (the global leader polls these).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegionReport {
    /// Region.
    pub region: String,
    /// Answering node.
    pub node_id: u64,
    /// Node that relayed this report to the global leader (`observe`), 0 when it came directly.
    #[serde(default)]
    pub observed_via: u64,
    /// The node leads its regional group.
    pub regional_leader: bool,
    /// Regional health as the leader sees it (a leader with a quorum; agents' checks).
    pub healthy: bool,
    /// Why not healthy.
    pub detail: String,
    /// `active` or `standby`.
    pub role: String,
    /// Highest epoch this region completed promotion for.
    pub promoted_epoch: u64,
    /// The leader holds a valid lease now.
    pub leased: bool,
    /// Epoch this node's role follows (the committed record it knows; a partitioned region's
    /// may be old).
    #[serde(default)]
    pub epoch: u64,
    /// Local expiry of the lease it holds (or last held), ms since the Unix epoch; 0 if none.
    /// With `at_ms`, tests check that no two regions' lease windows overlap.
    #[serde(default)]
    pub lease_until_ms: u64,
    /// The node's clock when it made this report, ms since the Unix epoch.
    #[serde(default)]
    pub at_ms: u64,
    /// Replication lag behind the active region (standby), ms.
    pub lag_ms: u64,
    /// Replication lag, entries.
    pub lag_entries: u64,
    /// Replication lag, bytes (content sizes of the upstream versions not yet committed here).
    pub lag_bytes: u64,
    /// Synchronous replication degraded: the region acknowledges without a standby's
    /// confirmation because none confirmed within `sync_timeout_ms` (see `intake::SyncAck`).
    #[serde(default)]
    pub sync_degraded: bool,
    /// Highest upstream sequence committed here (standby).
    pub upstream_seq: u64,
    /// Highest local catalog sequence.
    pub last_seq: u64,
    /// Agents heard from in the last 5 s.
    pub agents: u64,
    /// Traffic hooks this region would run on promotion.
    pub hooks: Vec<String>,
    /// Audit entries of orders this region executed, not yet committed by the global leader.
    pub pending_audit: Vec<AuditEntry>,
}

/// `lifeboat status` view of the global group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlStatus {
    /// Committed state (record, policy, audit tail trimmed to the last 20).
    pub state: ControlState,
    /// Global leader node id.
    pub global_leader: u64,
    /// The leader's lease expiry for the active region, ms since the Unix epoch.
    pub lease_expiry_ms: u64,
    /// The leader's clock, ms since the Unix epoch.
    pub now_ms: u64,
    /// Latest report of each region.
    pub regions: Vec<RegionReport>,
    /// Why an automatic failover is currently refused, if it is.
    pub blocked: Option<String>,
    /// Whether automatic failover is allowed by the topology (else the reason).
    pub automatic: Result<(), String>,
    /// A switchover in progress: target region.
    pub switchover_to: Option<String>,
}

/// Planned switchover (or failback when `to` is None and `failback` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// Target region.
    pub to: Option<String>,
    /// Back to the previous active region.
    #[serde(default)]
    pub failback: bool,
    /// Who asked (for the audit log).
    pub actor: String,
    /// Longest wait for the target to catch up, ms (default 60000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Epoch the order was computed under (`lifeboat switchover --expect-epoch`). Refused with
    /// `stale_epoch` unless it is still the committed epoch; the decision that moves the active
    /// region carries it as its compare-and-set epoch, so the global state machine also refuses
    /// it if the epoch moves on meanwhile. `None`: the current epoch.
    #[serde(default)]
    pub expect_epoch: Option<u64>,
}

/// Switchover accepted (it runs asynchronously; poll `status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchoverReply {
    /// From region.
    pub from: String,
    /// To region.
    pub to: String,
    /// Epoch before the switchover (the new one is this + 1).
    pub epoch: u64,
}

/// `lifeboat drill --simulate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    /// Region to fail over to (default: the one the policy would pick).
    pub to: Option<String>,
}

/// The exact plan a failover would follow now, without acting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillPlan {
    /// Active region now.
    pub from: String,
    /// Target.
    pub to: String,
    /// Epoch after the failover.
    pub new_epoch: u64,
    /// Steps in order.
    pub steps: Vec<String>,
    /// Hooks the target would run.
    pub hooks: Vec<String>,
    /// Expected RPO: lag of the target now (ms, entries). 0 with synchronous replication.
    pub expected_rpo_ms: u64,
    /// Expected RPO in catalog entries.
    pub expected_rpo_entries: u64,
    /// Whether synchronous replication guarantees RPO 0 for acknowledged changes.
    pub synchronous: bool,
    /// Why the policy would refuse this failover now, if it would.
    pub refused: Option<String>,
    /// Expected time until the target takes writes, ms (detection + lease + drift).
    pub expected_rto_ms: u64,
}

/// `lifeboat audit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRequest {
    /// Most entries, newest last (default 100).
    pub limit: Option<usize>,
}

/// Body of `topology`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TopologyRequest {
    /// `show`, `add` or `remove`.
    pub action: String,
    /// Node id (add, remove).
    #[serde(default)]
    pub id: Option<u64>,
    /// gRPC address (add).
    #[serde(default)]
    pub addr: Option<String>,
    /// Region, or the witness site's name (add).
    #[serde(default)]
    pub region: Option<String>,
    /// The node is a witness (add).
    #[serde(default)]
    pub witness: bool,
    /// Who asks (audit log).
    #[serde(default)]
    pub actor: String,
}

/// Reply of `topology`: the committed topology after the request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopologyReply {
    /// Voters of the global group (committed topology).
    pub members: Vec<crate::config::GlobalMember>,
    /// Regions in failover preference order.
    pub regions: Vec<String>,
    /// Voter ids of the global Raft membership.
    pub voters: Vec<u64>,
    /// Whether automatic failover is allowed by this topology (`Err`: why not).
    pub automatic: Result<(), String>,
}
