//! The control path at run time (DESIGN.md section 4): every coordinator runs
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
use lifeboat_proto::admin_service_client::AdminServiceClient;
use lifeboat_proto::ControlRequest;
use openraft::ServerState;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use tonic::Status;

use super::api::*;
use super::hooks::{self, HookContext};
use super::record::{AuditEntry, ControlCommand, ControlState};
use super::role::{now_ms, Role};
use super::store::ControlStore;
use crate::config::{GlobalConfig, GlobalMember};
use crate::failover::{self, Action, ControlRecord, Phase, RegionView};
use crate::intake::AgentTable;
use crate::lease;
use crate::raft::{Catalog, RegionRaft, Request as RaftRequest, TypeConfig};
use crate::replication::{ReplicationStatus, Replicator};

/// The openraft handle of the global group.
pub type GlobalRaft = openraft::Raft<TypeConfig>;

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

/// Calls `op` on `addr` with a JSON body and decodes the JSON reply.
///
/// Errors: transport or server errors as `Status`.
pub async fn call<B: Serialize, R: DeserializeOwned>(
    channels: &Channels,
    addr: &str,
    op: &str,
    body: &B,
    timeout: Duration,
) -> Result<R, Status> {
    let mut c = AdminServiceClient::new(channels.get(addr)?);
    let req = ControlRequest {
        op: op.into(),
        body: serde_json::to_vec(body).map_err(|e| Status::internal(e.to_string()))?,
    };
    let reply = match tokio::time::timeout(timeout, c.control(req)).await {
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "{op} to {addr} timed out"
            )))
        }
        Ok(Err(s)) => {
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                channels.forget(addr);
            }
            return Err(s);
        }
        Ok(Ok(r)) => r,
    };
    serde_json::from_slice(&reply.into_inner().body)
        .map_err(|e| Status::internal(format!("bad {op} reply from {addr}: {e}")))
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
    db_audited: std::collections::HashSet<super::dbs::AuditKey>,
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
        match self.global.client_write(RaftRequest::Control(cmd)).await {
            Ok(r) => Ok(r.data.accepted),
            Err(e) => Err(e.to_string()),
        }
    }

    // ----- global leader loop -------------------------------------------------------------

    async fn global_tick(&self) {
        if !self.is_global_leader() {
            *self.leader.lock() = None;
            return;
        }
        let state = self.store.state();
        let Some(committed) = state.record.clone() else {
            let topo = self.cfg.topology();
            let mut policy = self.cfg.policy.clone();
            if let Err(e) = topo.check() {
                if policy.automatic {
                    tracing::error!(reason = %e, "automatic failover disabled");
                }
                policy.automatic = false;
            }
            let rec = ControlRecord::new(&self.cfg.initial_active, now_ms(), &policy);
            match self
                .propose(ControlCommand::Init {
                    record: rec,
                    policy,
                    regions: topo.regions,
                    witness: topo.witness,
                    members: self.cfg.members.clone(),
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(active = %self.cfg.initial_active, "control record created")
                }
                Err(e) => tracing::warn!(error = %e, "creating the control record failed"),
            }
            return;
        };
        let now = now_ms();
        let term = self.global_term();
        {
            let mut l = self.leader.lock();
            let stale = l.as_ref().is_some_and(|w| {
                w.term != term || (w.committed_epoch != committed.epoch && w.switchover.is_none())
            });
            if l.is_none() || stale {
                let mut rec = committed.clone();
                lease::on_became_leader(&mut rec, now, &state.policy);
                let mut last_renew = HashMap::new();
                last_renew.insert(rec.active_region().to_string(), now);
                let prev = l.take();
                tracing::info!(epoch = rec.epoch, active = %rec.active_region(), "global leader: control loop starts");
                *l = Some(LeaderWork {
                    term,
                    pending: false,
                    failover_start_ms: prev.as_ref().and_then(|p| p.failover_start_ms),
                    rec,
                    committed_epoch: committed.epoch,
                    last_renew,
                    lag_at_contact: prev
                        .as_ref()
                        .map(|p| p.lag_at_contact.clone())
                        .unwrap_or_default(),
                    reports: prev.map(|p| p.reports).unwrap_or_default(),
                    blocked: None,
                    switchover: None,
                    home_ready_since: None,
                });
            }
        }
        let reports = self
            .poll_reports(&state.members_or(&self.cfg.members))
            .await;
        let now = now_ms();
        let mut commits: Vec<ControlCommand> = Vec::new();
        {
            let mut guard = self.leader.lock();
            let Some(w) = guard.as_mut() else { return };
            for r in reports {
                if !r.pending_audit.is_empty() {
                    commits.push(ControlCommand::Audit {
                        entries: r.pending_audit.clone(),
                    });
                }
                w.reports.insert(r.region.clone(), (now, r));
            }
            let policy = state.policy.clone();
            let active = w.rec.active_region().to_string();
            // Expected RPO of each standby (acknowledged changes, not silence): see
            // `failover::standby_rpo_ms`.
            let epoch_now = w.rec.epoch;
            // Whether it may have acknowledged alone is committed (`intake::SyncAck`): known
            // to every global leader, also one that never heard from the active region.
            let recorded_degraded = state.sync_degraded_at(&active, epoch_now);
            let active_progress = Some(match w.reports.get(&active) {
                Some((t, r)) => {
                    let age = now.saturating_sub(*t);
                    failover::ActiveProgress {
                        report_age_ms: age,
                        fresh: age <= policy.detection_timeout_ms && r.regional_leader,
                        sync_degraded: r.sync_degraded || recorded_degraded,
                    }
                }
                None => failover::ActiveProgress {
                    report_age_ms: u64::MAX,
                    fresh: false,
                    sync_degraded: recorded_degraded,
                },
            });
            let best_upstream_seq = w
                .reports
                .iter()
                .filter(|(region, (_, r))| **region != active && r.epoch == epoch_now)
                .map(|(_, (_, r))| r.upstream_seq)
                .max()
                .unwrap_or(0);
            if active_progress.is_some_and(|a| a.fresh) {
                let measured: Vec<(String, u64)> = w
                    .reports
                    .iter()
                    .filter(|(region, _)| **region != active)
                    .map(|(region, (_, r))| (region.clone(), r.lag_ms))
                    .collect();
                w.lag_at_contact = measured.into_iter().collect();
            }
            let views: Vec<RegionView> = state
                .regions
                .iter()
                .map(|region| {
                    let fresh = w
                        .reports
                        .get(region)
                        .filter(|(t, _)| now.saturating_sub(*t) <= policy.detection_timeout_ms);
                    let mut healthy = fresh.is_some_and(|(_, r)| r.regional_leader && r.healthy);
                    if *region == active
                        && matches!(w.rec.phase, Phase::Active { .. } | Phase::Suspect { .. })
                    {
                        // The active region's renewals are its heartbeat to the global group.
                        let renewed = w.last_renew.get(region).copied().unwrap_or(0);
                        healthy &= now.saturating_sub(renewed) <= policy.detection_timeout_ms;
                    }
                    let (lag_ms, promoted) = fresh
                        .map(|(_, r)| {
                            let rpo = failover::standby_rpo_ms(
                                self.cfg.synchronous,
                                active_progress,
                                r.upstream_seq,
                                best_upstream_seq,
                                r.lag_ms,
                                w.lag_at_contact.get(region).copied(),
                                &policy,
                            );
                            (rpo, r.promoted_epoch)
                        })
                        .unwrap_or((u64::MAX / 4, 0));
                    RegionView {
                        region: region.clone(),
                        healthy,
                        lag_ms: if *region == active { 0 } else { lag_ms },
                        promoted_epoch: promoted,
                    }
                })
                .collect();
            if w.switchover.is_none() {
                self.consider_failback(w, &views, now, &policy);
            }
            if let Some(sw) = w.switchover.clone() {
                self.drive_switchover(w, &sw, &views, now, &policy, &mut commits);
            } else {
                let before = w.rec.clone();
                let actions = failover::step(&mut w.rec, &views, now, &policy);
                let mut audit_entries = Vec::new();
                let mut decide = false;
                let mut previous = None;
                let mut rto = None;
                let actor = format!("global leader node {}", self.node_id);
                for a in actions {
                    match a {
                        Action::RenewLease { .. } => {}
                        Action::Suspect { region } => {
                            decide = true;
                            w.blocked = None;
                            w.failover_start_ms = Some(before.last_healthy_ms);
                            let why = w
                                .reports
                                .get(&region)
                                .map(|(t, r)| {
                                    let age = now.saturating_sub(*t);
                                    if age > policy.detection_timeout_ms {
                                        format!("no report for {age} ms")
                                    } else if r.detail.is_empty() {
                                        "no lease renewal".to_string()
                                    } else {
                                        r.detail.clone()
                                    }
                                })
                                .unwrap_or_else(|| "never reported".into());
                            audit_entries.push(audit(
                                w.rec.epoch,
                                actor.clone(),
                                "suspect",
                                format!(
                                    "{region} unhealthy for {} ms ({why}): lease renewals refused",
                                    policy.detection_timeout_ms
                                ),
                                "started",
                            ));
                        }
                        Action::Recovered { region } => {
                            decide = true;
                            w.blocked = None;
                            w.failover_start_ms = None;
                            audit_entries.push(audit(
                                w.rec.epoch,
                                actor.clone(),
                                "recovered",
                                format!(
                                    "{region} healthy again before its lease could be taken over"
                                ),
                                "ok",
                            ));
                        }
                        Action::StartFailover {
                            from,
                            to,
                            epoch,
                            expected_rpo_ms,
                        } => {
                            decide = true;
                            previous = Some(from.clone());
                            w.blocked = None;
                            audit_entries.push(audit(epoch, actor.clone(), "failover", format!("{from} lost (lease expired + {} ms drift); promoting {to} at epoch {epoch}; expected RPO {expected_rpo_ms} ms; {from} fenced", policy.max_clock_drift_ms), "started"));
                            tracing::warn!(%from, %to, epoch, "failover started");
                        }
                        Action::CompleteFailover { region, epoch } => {
                            decide = true;
                            rto = w.failover_start_ms.take().map(|s| now.saturating_sub(s));
                            w.last_renew.insert(region.clone(), now);
                            audit_entries.push(audit(
                                epoch,
                                actor.clone(),
                                "completed",
                                format!(
                                    "{region} active at epoch {epoch}; measured RTO {} ms",
                                    rto.unwrap_or(0)
                                ),
                                "ok",
                            ));
                            tracing::warn!(%region, epoch, rto_ms = rto.unwrap_or(0), "failover completed");
                        }
                        Action::Blocked { reason } => {
                            // One audit entry per kind of refusal, not one per tick: the
                            // reasons carry changing figures (ms since the last change, lag).
                            let key = |r: &str| -> String {
                                r.chars().filter(|c| !c.is_ascii_digit()).collect()
                            };
                            if w.blocked.as_deref().map(key) != Some(key(&reason)) {
                                commits.push(ControlCommand::Audit {
                                    entries: vec![audit(
                                        w.rec.epoch,
                                        actor.clone(),
                                        "blocked",
                                        reason.clone(),
                                        "refused",
                                    )],
                                });
                                tracing::warn!(%reason, "failover refused");
                            }
                            w.blocked = Some(reason);
                        }
                    }
                }
                if decide {
                    commits.push(ControlCommand::Decide {
                        expect_epoch: w.committed_epoch,
                        record: w.rec.clone(),
                        previous_region: previous,
                        rto_ms: rto,
                        audit: audit_entries,
                    });
                }
            }
            // Set under the same lock that changed the in-memory record: no renewal is granted
            // under a decision before it is committed.
            if commits
                .iter()
                .any(|c| matches!(c, ControlCommand::Decide { .. }))
            {
                w.pending = true;
            }
        }
        for c in commits {
            let decide_epoch = match &c {
                ControlCommand::Decide { record, .. } => Some(record.epoch),
                _ => None,
            };
            match self.propose(c).await {
                Ok(true) => {
                    if let Some(e) = decide_epoch {
                        if let Some(w) = self.leader.lock().as_mut() {
                            w.committed_epoch = e;
                            w.pending = false;
                        }
                    }
                }
                Ok(false) => {
                    tracing::warn!(
                        "decision refused by the state machine (stale epoch): reloading the record"
                    );
                    *self.leader.lock() = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "committing a control decision failed");
                    *self.leader.lock() = None;
                }
            }
        }
    }

    /// Automatic failback ([`failover::Policy::automatic_failback`]): starts a planned
    /// switchover back to the preferred region once it has been healthy and caught up for
    /// `failback_stable_ms` and the minimum interval since the last change passed.
    fn consider_failback(
        &self,
        w: &mut LeaderWork,
        views: &[RegionView],
        now: u64,
        policy: &failover::Policy,
    ) {
        let home = &self.cfg.initial_active;
        let away = match &w.rec.phase {
            Phase::Active { region } if region != home => region.clone(),
            _ => {
                w.home_ready_since = None;
                return;
            }
        };
        if !(policy.automatic && policy.automatic_failback) {
            return;
        }
        let ready = views
            .iter()
            .any(|v| v.region == *home && v.healthy && v.lag_ms == 0);
        if !ready {
            w.home_ready_since = None;
            return;
        }
        let since = *w.home_ready_since.get_or_insert(now);
        let last_change = w.rec.last_change_ms.unwrap_or(0);
        if now.saturating_sub(since) < policy.failback_stable_ms
            || now.saturating_sub(last_change) < policy.min_failover_interval_ms
        {
            return;
        }
        tracing::warn!(from = %away, to = %home, "automatic failback: fencing {away}");
        w.home_ready_since = None;
        w.switchover = Some(Switchover {
            from: away,
            to: home.clone(),
            actor: format!(
                "automatic failback (global leader node {}; {home} healthy and caught up for {} ms)",
                self.node_id,
                now.saturating_sub(since)
            ),
            started_ms: now,
            deadline_ms: now + 60_000,
            failback: true,
            expect_epoch: w.committed_epoch,
        });
    }

    fn drive_switchover(
        &self,
        w: &mut LeaderWork,
        sw: &Switchover,
        views: &[RegionView],
        now: u64,
        policy: &failover::Policy,
        commits: &mut Vec<ControlCommand>,
    ) {
        let actor = sw.actor.clone();
        let what = if sw.failback {
            "failback"
        } else {
            "switchover"
        };
        if now > sw.deadline_ms {
            commits.push(ControlCommand::Audit {
                entries: vec![audit(
                    w.rec.epoch,
                    actor,
                    what,
                    format!(
                        "{} -> {}: {} did not catch up in time; {} stays active",
                        sw.from, sw.to, sw.to, sw.from
                    ),
                    "failed",
                )],
            });
            w.switchover = None;
            w.last_renew.insert(sw.from.clone(), now);
            return;
        }
        match w.rec.phase.clone() {
            Phase::Active { region } | Phase::Suspect { region, .. } if region == sw.from => {
                // Fenced: renewals of `from` are refused while a switchover is pending. Move on
                // once its lease surely expired or it reported that it holds none.
                let from_report = w.reports.get(&sw.from).map(|(_, r)| r.clone());
                let unleased = from_report
                    .as_ref()
                    .is_some_and(|r| r.regional_leader && !r.leased);
                let expired = now >= w.rec.lease_expiry_ms + policy.max_clock_drift_ms;
                if !(unleased || expired) {
                    return;
                }
                // Zero data loss: the target holds everything the old region committed.
                let from_last = from_report.map(|r| r.last_seq);
                let to_seq = w
                    .reports
                    .get(&sw.to)
                    .map(|(_, r)| r.upstream_seq)
                    .unwrap_or(0);
                let caught_up = match from_last {
                    Some(l) => to_seq >= l,
                    None => expired && views.iter().any(|v| v.region == sw.to && v.lag_ms == 0),
                };
                let to_healthy = views.iter().any(|v| v.region == sw.to && v.healthy);
                if !caught_up || !to_healthy {
                    return;
                }
                w.rec.epoch += 1;
                w.rec.lease_holder = None;
                w.rec.last_change_ms = Some(now);
                w.rec.phase = Phase::FailingOver {
                    from: sw.from.clone(),
                    to: sw.to.clone(),
                    started_ms: now,
                };
                w.failover_start_ms = Some(sw.started_ms);
                commits.push(ControlCommand::Decide {
                    // The order's epoch: refused by the state machine if it moved on.
                    expect_epoch: sw.expect_epoch,
                    record: w.rec.clone(),
                    previous_region: Some(sw.from.clone()),
                    rto_ms: None,
                    audit: vec![audit(
                        w.rec.epoch,
                        actor,
                        what,
                        format!(
                            "{} fenced and {} caught up (seq {to_seq}); promoting {} at epoch {}",
                            sw.from, sw.to, sw.to, w.rec.epoch
                        ),
                        "started",
                    )],
                });
            }
            Phase::FailingOver { to, .. } if to == sw.to => {
                if views
                    .iter()
                    .any(|v| v.region == sw.to && v.promoted_epoch >= w.rec.epoch)
                {
                    w.rec.phase = Phase::Active {
                        region: sw.to.clone(),
                    };
                    w.rec.last_healthy_ms = now;
                    w.rec.lease_holder = Some(sw.to.clone());
                    w.rec.lease_expiry_ms = now + policy.lease_ms;
                    w.last_renew.insert(sw.to.clone(), now);
                    let rto = now.saturating_sub(sw.started_ms);
                    commits.push(ControlCommand::Decide {
                        expect_epoch: w.committed_epoch,
                        record: w.rec.clone(),
                        previous_region: None,
                        rto_ms: Some(rto),
                        audit: vec![audit(w.rec.epoch, actor, "completed", format!("{what} to {} done at epoch {}: writes paused {rto} ms, no acknowledged change lost", sw.to, w.rec.epoch), "ok")],
                    });
                    w.switchover = None;
                    w.failover_start_ms = None;
                }
            }
            _ => {
                w.switchover = None;
            }
        }
    }

    async fn poll_reports(&self, members: &[GlobalMember]) -> Vec<RegionReport> {
        let mut set = tokio::task::JoinSet::new();
        for m in members.iter().filter(|m| !m.witness) {
            let channels = self.channels.clone();
            let addr = m.addr.clone();
            let local = m.id == self.node_id;
            let me_report = local.then(|| self.report());
            set.spawn(async move {
                if let Some(r) = me_report {
                    return Some(r);
                }
                call::<_, RegionReport>(
                    &channels,
                    &addr,
                    "report",
                    &serde_json::json!({}),
                    RPC_TIMEOUT,
                )
                .await
                .ok()
            });
        }
        let mut best: BTreeMap<String, RegionReport> = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                let replace = match best.get(&r.region) {
                    None => true,
                    Some(b) => !b.regional_leader && r.regional_leader,
                };
                if replace {
                    best.insert(r.region.clone(), r);
                }
            }
        }
        // Regions whose leader did not answer the global leader: ask other observers (other
        // regions' coordinators, the witness) to reach them.
        let unheard: Vec<String> = members
            .iter()
            .filter(|m| !m.witness)
            .map(|m| m.region.clone())
            .filter(|r| !best.get(r).is_some_and(|b| b.regional_leader))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for region in unheard {
            if let Some(r) = self.observe_via_others(members, &region).await {
                best.insert(region, r);
            }
        }
        best.into_values().collect()
    }

    /// Asks every coordinator outside `region` (other regions' and the witness) to poll
    /// `region`'s coordinators, concurrently; the first regional leader's report wins.
    async fn observe_via_others(
        &self,
        members: &[GlobalMember],
        region: &str,
    ) -> Option<RegionReport> {
        let others = members
            .iter()
            .filter(|m| m.region != region && m.id != self.node_id);
        let mut set = tokio::task::JoinSet::new();
        for m in others {
            let channels = self.channels.clone();
            let (addr, id) = (m.addr.clone(), m.id);
            let req = ObserveRequest {
                region: region.to_string(),
            };
            set.spawn(async move {
                call::<_, RegionReport>(&channels, &addr, "observe", &req, RPC_TIMEOUT * 2)
                    .await
                    .ok()
                    .map(|mut r| {
                        r.observed_via = id;
                        r
                    })
            });
        }
        // Bounded: a region that is really gone must not slow the control loop (a reachable
        // one answers through an observer within milliseconds).
        tokio::time::timeout(OBSERVE_WAIT, async {
            while let Some(r) = set.join_next().await {
                if let Ok(Some(r)) = r {
                    if r.regional_leader {
                        tracing::debug!(%region, via = r.observed_via, "region heard through another observer");
                        return Some(r);
                    }
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// The `observe` op: polls `region`'s coordinators (peek: audit entries stay for the
    /// leader's own poll) and returns its regional leader's report.
    ///
    /// Errors: `UNAVAILABLE` when no coordinator of `region` answered as its leader.
    async fn observe(&self, req: ObserveRequest) -> Result<RegionReport, Status> {
        let members = self.store.state().members_or(&self.cfg.members);
        let mut set = tokio::task::JoinSet::new();
        for m in members
            .iter()
            .filter(|m| m.region == req.region && !m.witness && m.id != self.node_id)
        {
            let channels = self.channels.clone();
            let addr = m.addr.clone();
            set.spawn(async move {
                call::<_, RegionReport>(
                    &channels,
                    &addr,
                    "report",
                    &ReportRequest { peek: true },
                    RPC_TIMEOUT,
                )
                .await
                .ok()
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                if r.regional_leader {
                    return Ok(r);
                }
            }
        }
        Err(Status::unavailable(format!(
            "no coordinator of region {} answered as its leader",
            req.region
        )))
    }

    // ----- region loop --------------------------------------------------------------------

    /// This node's report about its region. Drains the pending audit entries (they are
    /// committed by the global leader that asked).
    pub fn report(&self) -> RegionReport {
        self.report_with(true)
    }

    /// This node's report; `drain`: hand over the pending audit entries (only the global
    /// leader's poll does; a peek leaves them for it).
    pub fn report_with(&self, drain: bool) -> RegionReport {
        let now = now_ms();
        let Some(reg) = &self.regional else {
            return RegionReport {
                region: self.region.clone(),
                node_id: self.node_id,
                at_ms: now,
                ..Default::default()
            };
        };
        let m = reg.raft.metrics().borrow().clone();
        let leading = m.state == ServerState::Leader;
        let view = self.role.view();
        let repl = reg.replication.report(&reg.catalog).ok();
        let last_seq = reg.catalog.last_seq().unwrap_or(0);
        let agents = reg
            .agents
            .lock()
            .values()
            .filter(|(t, _)| t.elapsed() < Duration::from_secs(5))
            .count() as u64;
        let standby = self.role.is_standby();
        // Failing agent checks (`[[checks]]`) of agents heard from in the last 5 s.
        let failing: Vec<String> = reg
            .agents
            .lock()
            .iter()
            .filter(|(_, (t, _))| t.elapsed() < Duration::from_secs(5))
            .flat_map(|(id, (_, hb))| {
                hb.checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(move |c| format!("agent {id} check {} failed: {}", c.name, c.detail))
            })
            .collect();
        let (healthy, detail) = if !leading {
            (false, "not the regional leader".to_string())
        } else if standby {
            match &repl {
                Some(r) if r.failed_in_contact() => {
                    (false, format!("replication failed: {}", r.error))
                }
                // Lost contact with the active region: still fit to take over (its lag is
                // weighed by the RPO rules, not by health).
                Some(r) if r.state == "failed" => (
                    true,
                    format!(
                        "upstream silent for {} ms: {}",
                        r.upstream_silent_ms, r.error
                    ),
                ),
                _ => (true, String::new()),
            }
        } else {
            (true, String::new())
        };
        let (healthy, detail) = if healthy && !failing.is_empty() {
            (false, failing.join("; "))
        } else {
            (healthy, detail)
        };
        let pending = if leading && drain {
            std::mem::take(&mut self.local.lock().pending_audit)
        } else {
            Vec::new()
        };
        RegionReport {
            region: self.region.clone(),
            node_id: self.node_id,
            observed_via: 0,
            regional_leader: leading,
            healthy,
            detail,
            role: if standby { "standby" } else { "active" }.into(),
            promoted_epoch: view.promoted_epoch,
            leased: view.lease.valid(now, view.epoch),
            epoch: view.epoch,
            lease_until_ms: view.lease.valid_until_ms().unwrap_or(0),
            at_ms: now,
            lag_ms: repl.as_ref().map(|r| r.lag_ms.max(0) as u64).unwrap_or(0),
            lag_entries: repl.as_ref().map(|r| r.lag_entries).unwrap_or(0),
            lag_bytes: repl.as_ref().map(|r| r.lag_bytes).unwrap_or(0),
            sync_degraded: reg.sync.as_ref().is_some_and(|s| s.degraded()),
            upstream_seq: repl.as_ref().map(|r| r.upstream_seq).unwrap_or(0),
            last_seq,
            agents,
            hooks: self
                .cfg
                .traffic_hooks
                .iter()
                .map(|h| h.name().to_string())
                .collect(),
            pending_audit: pending,
        }
    }

    async fn region_tick(self: &Arc<Self>) {
        let Some(reg) = self.regional.clone() else {
            return;
        };
        let state = self.store.state();
        let Some(rec) = state.record.clone() else {
            return;
        };
        let active = rec.active_region().to_string();
        let epoch = rec.epoch;
        self.role.set_record(&active, epoch);
        let leading = reg.raft.metrics().borrow().state == ServerState::Leader;
        if active != self.region {
            self.role.lease_refused();
            if leading {
                self.ensure_replicating(&reg, &active);
                self.audit_db_outcomes(&reg, epoch, false, &state.audit);
            } else {
                self.stop_replicating();
            }
            return;
        }
        self.stop_replicating();
        if !leading {
            self.role.lease_refused();
            return;
        }
        let view = self.role.view();
        if view.promoted_epoch < epoch {
            match &rec.phase {
                Phase::FailingOver {
                    from, started_ms, ..
                } => self.start_promotion(epoch, from.clone(), *started_ms),
                // Already promoted earlier (this node became regional leader afterwards), or the
                // initial record.
                _ => self.role.set_promoted(epoch),
            }
            return;
        }
        // Suspect: keep asking. The renewals are refused, but they are this region's heartbeat
        // to the global leader, which lets it recover once healthy again.
        if !matches!(rec.phase, Phase::Active { .. } | Phase::Suspect { .. }) {
            return;
        }
        if self.local.lock().promoting.is_none() {
            self.audit_db_outcomes(&reg, epoch, true, &state.audit);
        }
        let now = now_ms();
        let interval = (state.policy.lease_ms / 4).max(50);
        // Synchronous replication degrading or resuming is recorded by the global group in a
        // renewal, before a batch is acknowledged alone (see `intake::SyncAck`).
        let sync_flag = reg.sync.as_ref().map(|s| {
            let flag = s.renewal_flag(state.sync_degraded_at(&self.region, epoch), || {
                reg.catalog.last_seq().unwrap_or(u64::MAX)
            });
            (s, flag)
        });
        let sync_change = sync_flag
            .as_ref()
            .is_some_and(|(_, flag)| *flag != state.sync_degraded_at(&self.region, epoch));
        {
            // Renew every quarter lease, and at once while no valid lease is held (right after a
            // promotion completes, or a lost renewal) or the synchronous state changes.
            let mut l = self.local.lock();
            let held = view.lease.valid(now, epoch);
            if held && !sync_change && now.saturating_sub(l.last_renew_ms) < interval {
                return;
            }
            if (!held || sync_change)
                && now.saturating_sub(l.last_renew_ms) < TICK.as_millis() as u64
            {
                return;
            }
            l.last_renew_ms = now;
        }
        let recorded = self
            .renew(epoch, sync_flag.as_ref().is_some_and(|(_, f)| *f))
            .await;
        if let Some((sync, _)) = sync_flag {
            sync.renewal_answer(recorded.unwrap_or(false));
        }
    }

    /// Asks the global leader for a lease renewal, carrying `sync_degraded` (see
    /// [`RenewRequest`]). Returns whether the global group records this region degraded, when
    /// an answer came (granted or not).
    async fn renew(&self, epoch: u64, sync_degraded: bool) -> Option<bool> {
        let req = RenewRequest {
            region: self.region.clone(),
            epoch,
            node_id: self.node_id,
            sync_degraded,
        };
        let sent = now_ms();
        let reply = if self.is_global_leader() {
            self.handle_renew(req).await
        } else {
            let direct = match self.global_leader() {
                Some((leader, addr)) => (
                    leader,
                    call::<_, RenewReply>(&self.channels, &addr, "renew", &req, RPC_TIMEOUT).await,
                ),
                None => (0, Err(Status::unavailable("no global leader known here"))),
            };
            match direct {
                (leader, Err(e)) => {
                    // The link to the global leader may be the only one down (this node then
                    // does not even know the leader: it keeps standing for election): other
                    // coordinators forward the renewal to it, measured from `sent` all the same.
                    self.renew_via_others(leader, &req).await.ok_or(e)
                }
                (_, r) => r,
            }
        };
        match reply {
            Ok(r) if r.granted => {
                self.role.lease_granted(sent, r.lease_ms, r.epoch);
                Some(r.sync_degraded_recorded && r.epoch == epoch)
            }
            Ok(r) => {
                if self.role.view().lease.valid(now_ms(), epoch) {
                    tracing::warn!(reason = %r.reason, "lease renewal refused: writes stop");
                } else {
                    tracing::debug!(reason = %r.reason, "lease renewal refused");
                }
                self.role.lease_refused();
                Some(r.sync_degraded_recorded && r.epoch == epoch)
            }
            Err(e) => {
                tracing::debug!(error = %e, "lease renewal failed; the lease runs out unless renewed");
                None
            }
        }
    }

    /// Sends `req` through every coordinator of the other regions and the witness but the
    /// leader (they forward it to the global leader), concurrently; the first reply wins.
    async fn renew_via_others(&self, leader: u64, req: &RenewRequest) -> Option<RenewReply> {
        let members = self.store.state().members_or(&self.cfg.members);
        let mut set = tokio::task::JoinSet::new();
        for m in members
            .iter()
            .filter(|m| m.id != self.node_id && m.id != leader && m.region != self.region)
        {
            let (channels, addr, req) = (self.channels.clone(), m.addr.clone(), req.clone());
            set.spawn(async move {
                call::<_, RenewReply>(&channels, &addr, "renew", &req, RPC_TIMEOUT)
                    .await
                    .ok()
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                return Some(r);
            }
        }
        None
    }

    /// Grantor side of a renewal (global leader only). Leadership is confirmed with a quorum
    /// first (a deposed leader that still believes it leads must not grant: rule 1), and no
    /// lease is granted while a decision is computed but not yet committed.
    ///
    /// Errors: `UNAVAILABLE` when this node does not lead the global group.
    pub async fn handle_renew(&self, req: RenewRequest) -> Result<RenewReply, Status> {
        let term = self.global_term();
        match tokio::time::timeout(RPC_TIMEOUT, self.global.ensure_linearizable()).await {
            Ok(Ok(_)) => {}
            _ => {
                return Err(Status::unavailable(
                    "leadership of the global group not confirmed by a quorum",
                ))
            }
        }
        let recorded = self.record_sync_state(&req).await;
        let mut guard = self.leader.lock();
        let Some(w) = guard.as_mut() else {
            return Err(Status::unavailable("not the global leader (or not ready)"));
        };
        if w.term != term || w.pending {
            return Err(Status::unavailable(
                "a control decision is being committed; retry",
            ));
        }
        let policy = self.store.state().policy;
        if w.switchover.as_ref().is_some_and(|s| s.from == req.region) {
            return Ok(RenewReply {
                granted: false,
                lease_ms: 0,
                epoch: w.rec.epoch,
                active_region: w.rec.active_region().into(),
                reason: "switchover in progress: this region is fenced".into(),
                sync_degraded_recorded: recorded,
            });
        }
        let now = now_ms();
        // Health is decided from the region reports (`views`), not from renewals alone: a
        // region whose agents' checks fail keeps renewing until it is suspect.
        let last_healthy = w.rec.last_healthy_ms;
        let granted = lease::grant(&mut w.rec, &req.region, req.epoch, now, &policy);
        w.rec.last_healthy_ms = last_healthy;
        match granted {
            Ok(ms) => {
                w.last_renew.insert(req.region.clone(), now);
                Ok(RenewReply {
                    granted: true,
                    lease_ms: ms,
                    epoch: w.rec.epoch,
                    active_region: w.rec.active_region().into(),
                    reason: String::new(),
                    sync_degraded_recorded: recorded,
                })
            }
            Err(e) => {
                if matches!(e, lease::LeaseRefused::Suspect { .. }) {
                    // Refused, but the region reached us: its heartbeat (see the views in
                    // `global_tick`), without which a suspect region could never recover.
                    w.last_renew.insert(req.region.clone(), now);
                }
                Ok(RenewReply {
                    granted: false,
                    lease_ms: 0,
                    epoch: w.rec.epoch,
                    active_region: w.rec.active_region().into(),
                    reason: e.to_string(),
                    sync_degraded_recorded: recorded,
                })
            }
        }
    }

    /// Commits `req.sync_degraded` for the asking region when it is the active region at
    /// `req.epoch` and the committed state differs; returns what the committed state says
    /// afterwards (false when it is not the active region at that epoch).
    async fn record_sync_state(&self, req: &RenewRequest) -> bool {
        let state = self.store.state();
        let active = state
            .active()
            .is_some_and(|(region, epoch)| region == req.region && epoch == req.epoch);
        let now_recorded = state.sync_degraded_at(&req.region, req.epoch);
        if !active || now_recorded == req.sync_degraded {
            return now_recorded;
        }
        let (action, detail) = if req.sync_degraded {
            (
                "sync-degraded",
                format!(
                    "no standby region confirmed in time: {} acknowledges after its local majority commit",
                    req.region
                ),
            )
        } else {
            (
                "sync-resumed",
                format!(
                    "a standby region confirmed every change {} acknowledged: synchronous again",
                    req.region
                ),
            )
        };
        let now = now_ms();
        let cmd = ControlCommand::SetSyncDegraded {
            region: req.region.clone(),
            epoch: req.epoch,
            degraded: req.sync_degraded,
            at_ms: now,
            audit: vec![audit(
                req.epoch,
                format!("region {} leader node {}", req.region, req.node_id),
                action,
                detail,
                "ok",
            )],
        };
        match tokio::time::timeout(RPC_TIMEOUT, self.propose(cmd)).await {
            Ok(Ok(_)) => {
                tracing::warn!(region = %req.region, epoch = req.epoch, degraded = req.sync_degraded, "synchronous replication state recorded");
            }
            Ok(Err(e)) => {
                tracing::warn!(region = %req.region, error = %e, "recording the synchronous replication state failed")
            }
            Err(_) => {
                tracing::warn!(region = %req.region, "recording the synchronous replication state timed out")
            }
        }
        self.store.state().sync_degraded_at(&req.region, req.epoch)
    }

    /// Queues audit entries for database role outcomes at `epoch` reported by this region's
    /// agents and not audited yet (late promotions, old primaries fenced or following).
    fn audit_db_outcomes(
        &self,
        reg: &Regional,
        epoch: u64,
        active: bool,
        committed: &[AuditEntry],
    ) {
        let all = super::dbs::outcomes(&reg.agents);
        if all.is_empty() {
            return;
        }
        let mut l = self.local.lock();
        let entries = super::dbs::new_entries(&all, epoch, active, &mut l.db_audited, committed);
        for e in &entries {
            tracing::warn!(epoch, actor = %e.actor, action = %e.action, outcome = %e.outcome, detail = %e.detail, "database role audited");
        }
        l.pending_audit.extend(entries);
    }

    fn start_promotion(self: &Arc<Self>, epoch: u64, previous: String, decided_ms: u64) {
        {
            let mut l = self.local.lock();
            if l.promoting.is_some_and(|e| e >= epoch) {
                return;
            }
            l.promoting = Some(epoch);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let started = now_ms();
            tracing::warn!(epoch, %previous, "promoting this region");
            let ctx = HookContext {
                epoch,
                active_region: me.region.clone(),
                previous_region: previous.clone(),
                node_id: me.node_id,
            };
            let mut entries = vec![audit(
                epoch,
                format!("region {} leader node {}", me.region, me.node_id),
                "promote",
                format!("replication from {previous} stopped; this region takes writes at epoch {epoch} once the global group confirms"),
                "ok",
            )];
            // Traffic moves only once the databases are primaries (or the wait timed out).
            if let Some(reg) = &me.regional {
                let w = super::dbs::await_promotion(
                    &reg.agents,
                    epoch,
                    Duration::from_millis(me.cfg.db_promotion_timeout_ms),
                    Some(decided_ms),
                )
                .await;
                if w.total > 0 {
                    tracing::warn!(
                        epoch,
                        promoted = w.promoted,
                        total = w.total,
                        ms = w.waited.as_millis() as u64,
                        timed_out = w.timed_out,
                        "databases of this region promoted; moving traffic"
                    );
                }
                me.local.lock().db_audited.extend(w.audited);
                entries.extend(w.entries);
            }
            for h in &me.cfg.traffic_hooks {
                entries.push(hooks::run(h, &ctx).await);
            }
            me.role.set_promoted(epoch);
            let mut l = me.local.lock();
            l.pending_audit.extend(entries);
            l.promoting = None;
            tracing::warn!(
                epoch,
                ms = now_ms() - started,
                "promotion done; waiting for the global group to confirm"
            );
        });
    }

    /// Queues an entry for the global audit log (shipped with this node's next region report
    /// while it leads its region).
    pub fn note_audit(&self, epoch: u64, actor: String, action: &str, detail: String) {
        self.local
            .lock()
            .pending_audit
            .push(audit(epoch, actor, action, detail, "ok"));
    }

    fn ensure_replicating(&self, reg: &Regional, active: &str) {
        let mut l = self.local.lock();
        if let Some((from, h)) = &l.replicating_from {
            if from == active && !h.is_finished() {
                return;
            }
        }
        if let Some((_, h)) = l.replicating_from.take() {
            h.abort();
            reg.replication.stop();
        }
        let mut r = reg.replicator.clone();
        r.cfg.upstream =
            crate::config::addrs_of(&self.store.state().members_or(&self.cfg.members), active);
        r.upstream_region = Some(active.to_string());
        tracing::info!(%active, "standby: copying the active region");
        l.replicating_from = Some((active.to_string(), r.spawn()));
    }

    fn stop_replicating(&self) {
        if let Some((from, h)) = self.local.lock().replicating_from.take() {
            tracing::info!(%from, "replication stopped");
            h.abort();
            if let Some(reg) = &self.regional {
                reg.replication.stop();
            }
        }
    }

    // ----- admin ops ----------------------------------------------------------------------

    /// Serves one `Control` op (forwarding to the global leader where needed).
    ///
    /// Errors: `INVALID_ARGUMENT` for bad documents or unknown ops, `UNAVAILABLE` without a
    /// global leader, `FAILED_PRECONDITION` for refused switchovers.
    pub async fn handle(&self, op: &str, body: &[u8]) -> Result<Vec<u8>, Status> {
        fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, Status> {
            serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))
        }
        let leader_only = matches!(op, "renew" | "status" | "switchover" | "drill" | "topology");
        if leader_only && !self.is_global_leader() {
            let (_, addr) = self
                .global_leader()
                .ok_or_else(|| Status::unavailable("no global leader elected"))?;
            let v: serde_json::Value = serde_json::from_slice(body).map_err(bad)?;
            let r: serde_json::Value =
                call(&self.channels, &addr, op, &v, Duration::from_secs(10)).await?;
            return enc(&r);
        }
        match op {
            "renew" => enc(&self
                .handle_renew(serde_json::from_slice(body).map_err(bad)?)
                .await?),
            "observe" => enc(&self
                .observe(serde_json::from_slice(body).map_err(bad)?)
                .await?),
            "report" => {
                let r: ReportRequest = if body.is_empty() {
                    ReportRequest::default()
                } else {
                    serde_json::from_slice(body).map_err(bad)?
                };
                enc(&self.report_with(!r.peek))
            }
            "status" => {
                // A deposed global leader cut off from the majority still believes it leads;
                // its view (record, reports, lease) may be stale, so it must not answer as the
                // leader.
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    self.global.ensure_linearizable(),
                )
                .await
                {
                    Ok(Ok(_)) => enc(&self.status()?),
                    _ => Err(Status::unavailable(
                        "leadership of the global group not confirmed by a quorum (partitioned from the majority?); ask another coordinator",
                    )),
                }
            }
            "audit" => {
                let r: AuditRequest = serde_json::from_slice(body).map_err(bad)?;
                let s = self.store.state();
                let n = r.limit.unwrap_or(100);
                let skip = s.audit.len().saturating_sub(n);
                enc(&s.audit[skip..].to_vec())
            }
            "switchover" => enc(&self.switchover(serde_json::from_slice(body).map_err(bad)?)?),
            "drill" => enc(&self.drill(serde_json::from_slice(body).map_err(bad)?)?),
            "topology" => enc(&self
                .topology(serde_json::from_slice(body).map_err(bad)?)
                .await?),
            other => Err(Status::invalid_argument(format!(
                "unknown control op {other:?}"
            ))),
        }
    }

    fn status(&self) -> Result<ControlStatus, Status> {
        let mut state: ControlState = self.store.state();
        let automatic = crate::config::topology_of(&state.members_or(&self.cfg.members))
            .check()
            .map_err(|e| e.to_string());
        let skip = state.audit.len().saturating_sub(20);
        state.audit.drain(..skip);
        let l = self.leader.lock();
        let w = l
            .as_ref()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        Ok(ControlStatus {
            state,
            global_leader: self.node_id,
            lease_expiry_ms: w.rec.lease_expiry_ms,
            now_ms: now_ms(),
            regions: w
                .reports
                .values()
                .map(|(t, r)| {
                    let mut r = r.clone();
                    let age = now_ms().saturating_sub(*t);
                    if age > 1000 {
                        r.healthy = false;
                        r.regional_leader = false;
                        r.leased = false;
                        r.detail = format!("unreachable: no report for {age} ms");
                    }
                    r
                })
                .collect(),
            blocked: w.blocked.clone(),
            automatic,
            switchover_to: w.switchover.as_ref().map(|s| s.to.clone()),
        })
    }

    fn switchover(&self, req: SwitchoverRequest) -> Result<SwitchoverReply, Status> {
        let state = self.store.state();
        let mut l = self.leader.lock();
        let w = l
            .as_mut()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        if w.switchover.is_some() {
            return Err(Status::failed_precondition(
                "a switchover is already in progress",
            ));
        }
        // An order computed under an older epoch is refused (fencing token on operator orders).
        if let Some(e) = req.expect_epoch {
            if e != w.committed_epoch {
                return Err(WireError::new(ErrorCode::StaleEpoch)
                    .epoch(w.committed_epoch)
                    .status(format!(
                        "stale epoch: switchover ordered under epoch {e} but the current epoch is {}",
                        w.committed_epoch
                    )));
            }
        }
        let Phase::Active { region: from } = w.rec.phase.clone() else {
            return Err(Status::failed_precondition(format!(
                "the control record is not in a steady state ({:?}); retry when it is",
                w.rec.phase
            )));
        };
        let to = match (&req.to, req.failback) {
            (Some(t), _) => t.clone(),
            (None, true) => state.previous_region.clone().ok_or_else(|| {
                Status::failed_precondition("no previous active region to fail back to")
            })?,
            (None, false) => return Err(Status::invalid_argument("switchover needs --to REGION")),
        };
        if !state.regions.contains(&to) {
            return Err(Status::invalid_argument(format!(
                "unknown region {to:?}; regions are {:?}",
                state.regions
            )));
        }
        if to == from {
            return Err(Status::failed_precondition(format!(
                "{to} is already active"
            )));
        }
        let now = now_ms();
        let healthy = w
            .reports
            .get(&to)
            .is_some_and(|(t, r)| now.saturating_sub(*t) < 2000 && r.regional_leader && r.healthy);
        if !healthy {
            return Err(Status::failed_precondition(format!(
                "{to} is not healthy (no recent report from its regional leader); switchover refused"
            )));
        }
        w.switchover = Some(Switchover {
            from: from.clone(),
            to: to.clone(),
            actor: req.actor,
            started_ms: now,
            deadline_ms: now + req.timeout_ms.unwrap_or(60_000),
            failback: req.failback,
            expect_epoch: req.expect_epoch.unwrap_or(w.committed_epoch),
        });
        tracing::warn!(%from, %to, "switchover requested: fencing {from}");
        Ok(SwitchoverReply {
            from,
            to,
            epoch: w.rec.epoch,
        })
    }

    /// `topology`: shows the global group's voters, or adds / removes one. An added node must
    /// be running (with `[global] join = true`) and reachable; it joins as a learner, catches
    /// up, then becomes a voter. A removed voter is dropped from the committed topology first,
    /// then from the Raft membership. Either way `automatic` is re-evaluated against the
    /// topology check (e.g. adding a witness to two regions allows automatic failover).
    ///
    /// Errors: `INVALID_ARGUMENT` for a bad request, `FAILED_PRECONDITION` for a change that
    /// would leave the active region without coordinators or remove the global leader itself,
    /// `UNAVAILABLE` when the membership change fails.
    async fn topology(&self, req: TopologyRequest) -> Result<TopologyReply, Status> {
        use openraft::{BasicNode, ChangeMembers};
        let state = self.store.state();
        let mut members = state.members_or(&self.cfg.members);
        let action = req.action.as_str();
        let detail = match action {
            "show" => None,
            "add" => {
                let m = GlobalMember {
                    id: req.id.ok_or_else(|| bad("add needs id"))?,
                    addr: req
                        .addr
                        .clone()
                        .filter(|a| !a.is_empty())
                        .ok_or_else(|| bad("add needs addr"))?,
                    region: req
                        .region
                        .clone()
                        .filter(|r| !r.is_empty())
                        .ok_or_else(|| bad("add needs region"))?,
                    witness: req.witness,
                };
                if m.id == 0 {
                    return Err(bad("node id 0 is reserved"));
                }
                if let Some(o) = members.iter().find(|o| o.id == m.id || o.addr == m.addr) {
                    return Err(bad(format!(
                        "node {} at {} is already a member",
                        o.id, o.addr
                    )));
                }
                self.global
                    .add_learner(m.id, BasicNode { addr: m.addr.clone() }, true)
                    .await
                    .map_err(|e| Status::unavailable(format!("adding node {} as a learner failed (is it running with [global] join = true, at {}?): {e}", m.id, m.addr)))?;
                self.global
                    .change_membership(ChangeMembers::AddVoterIds([m.id].into()), false)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("making node {} a voter failed: {e}", m.id))
                    })?;
                let d = format!(
                    "node {} at {} added to the global group ({})",
                    m.id,
                    m.addr,
                    if m.witness {
                        "witness".to_string()
                    } else {
                        format!("region {}", m.region)
                    }
                );
                members.push(m);
                Some(d)
            }
            "remove" => {
                let id = req.id.ok_or_else(|| bad("remove needs id"))?;
                let Some(pos) = members.iter().position(|m| m.id == id) else {
                    return Err(bad(format!("node {id} is not a member")));
                };
                if id == self.node_id {
                    return Err(Status::failed_precondition(format!(
                        "node {id} is the global leader; stop it (another leader is elected) or transfer leadership, then remove it"
                    )));
                }
                let gone = members.remove(pos);
                let active = state.active().map(|(r, _)| r).unwrap_or_default();
                if !gone.witness
                    && gone.region == active
                    && !members.iter().any(|m| !m.witness && m.region == active)
                {
                    return Err(Status::failed_precondition(format!(
                        "node {id} is the last coordinator of the active region {active}; switch over first"
                    )));
                }
                Some(format!(
                    "node {id} at {} removed from the global group",
                    gone.addr
                ))
            }
            other => {
                return Err(bad(format!(
                    "unknown topology action {other:?} (show, add, remove)"
                )))
            }
        };
        if let Some(detail) = detail {
            let topo = crate::config::topology_of(&members);
            let mut policy = state.policy.clone();
            policy.automatic = self.cfg.policy.automatic && topo.check().is_ok();
            let epoch = state.active().map(|(_, e)| e).unwrap_or(0);
            let cmd = ControlCommand::SetTopology {
                members: members.clone(),
                regions: {
                    // Keep the preference order; new regions go last.
                    let mut r: Vec<String> = state
                        .regions
                        .iter()
                        .filter(|r| topo.regions.contains(r))
                        .cloned()
                        .collect();
                    r.extend(
                        topo.regions
                            .iter()
                            .filter(|x| !r.contains(x))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    r
                },
                witness: topo.witness,
                policy,
                audit: vec![audit(epoch, req.actor.clone(), "topology", detail, "ok")],
            };
            self.propose(cmd)
                .await
                .map_err(|e| Status::unavailable(format!("committing the topology failed: {e}")))?;
            if action == "remove" {
                let id = req.id.unwrap_or_default();
                self.global
                    .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                    .await
                    .map_err(|e| Status::unavailable(format!("removing voter {id} failed: {e}")))?;
                self.global
                    .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                    .await
                    .map_err(|e| Status::unavailable(format!("removing node {id} failed: {e}")))?;
            }
            *self.leader.lock() = None;
        }
        let state = self.store.state();
        let members = state.members_or(&self.cfg.members);
        let voters: Vec<u64> = self
            .global
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        Ok(TopologyReply {
            automatic: crate::config::topology_of(&members)
                .check()
                .map_err(|e| e.to_string()),
            members,
            regions: state.regions.clone(),
            voters,
        })
    }

    fn drill(&self, req: DrillRequest) -> Result<DrillPlan, Status> {
        let state = self.store.state();
        let l = self.leader.lock();
        let w = l
            .as_ref()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        let from = w.rec.active_region().to_string();
        let p = &state.policy;
        let mut candidates: Vec<&RegionReport> = w
            .reports
            .values()
            .map(|(_, r)| r)
            .filter(|r| r.region != from)
            .collect();
        candidates.sort_by_key(|r| (!(r.regional_leader && r.healthy), r.lag_ms));
        let target =
            match &req.to {
                Some(t) => w.reports.get(t).map(|(_, r)| r).ok_or_else(|| {
                    Status::invalid_argument(format!("no report from region {t:?}"))
                })?,
                None => candidates
                    .first()
                    .copied()
                    .ok_or_else(|| Status::failed_precondition("no other region reports"))?,
            };
        let mut refused = None;
        if !(target.regional_leader && target.healthy) {
            refused = Some(format!(
                "{} is not healthy: {}",
                target.region, target.detail
            ));
        } else if !self.cfg.synchronous
            && p.mode == failover::FailoverMode::ConsistencyFirst
            && target.lag_ms > p.rpo_budget_ms
        {
            refused = Some(format!(
                "{} lags {} ms, above the RPO budget of {} ms (consistency-first)",
                target.region, target.lag_ms, p.rpo_budget_ms
            ));
        } else if let Err(e) =
            crate::config::topology_of(&state.members_or(&self.cfg.members)).check()
        {
            refused = Some(format!("automatic failover refused: {e}"));
        }
        let e2 = w.rec.epoch + 1;
        let to = target.region.clone();
        let steps = vec![
            format!("detect: {from} unhealthy for {} ms (its lease renewals and reports stop)", p.detection_timeout_ms),
            format!("fence {from}: refuse its lease renewals; its coordinators stop acknowledging writes when their lease ({} ms) runs out", p.lease_ms),
            format!("wait until {from}'s lease surely expired: expiry + max clock drift {} ms", p.max_clock_drift_ms),
            format!("commit FailingOver({from} -> {to}) at epoch {e2} in the global group"),
            format!("promote {to}: stop copying {from}, agents apply the new role to their databases (REPLICAOF NO ONE / pg_promote) and refuse orders older than epoch {e2}"),
            format!("run {} traffic hook(s) in {to}: {:?}", target.hooks.len(), target.hooks),
            format!("commit Active({to}) at epoch {e2}; {to} renews its lease and takes writes; {from} rejoins as standby when it returns"),
        ];
        Ok(DrillPlan {
            from,
            to,
            new_epoch: e2,
            steps,
            hooks: target.hooks.clone(),
            expected_rpo_ms: if self.cfg.synchronous {
                0
            } else {
                target.lag_ms
            },
            expected_rpo_entries: if self.cfg.synchronous {
                0
            } else {
                target.lag_entries
            },
            synchronous: self.cfg.synchronous,
            refused,
            expected_rto_ms: p.detection_timeout_ms.max(p.lease_ms) + p.max_clock_drift_ms + 500,
        })
    }
}
