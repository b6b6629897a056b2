//! What `/metrics` shows of the control path ([`ControlMetrics`]): the committed control record
//! (every member of the global group), and the global leader's working view (leases, health and
//! expected RPO of every region). Read at scrape time; plain data, no JSON.

use super::*;

/// The control path as `/metrics` shows it.
#[derive(Debug, Clone, Default)]
pub struct ControlMetrics {
    /// Regions in failover preference order (committed).
    pub regions: Vec<String>,
    /// Active region of the committed record (the failover target while failing over); None
    /// before the first record.
    pub active_region: Option<String>,
    /// Committed epoch (0 before the first record).
    pub epoch: u64,
    /// Committed phase: `active`, `suspect` or `failing-over` (empty before the first record).
    pub phase: &'static str,
    /// RPO budget of the policy, ms.
    pub rpo_budget_ms: u64,
    /// Lease length of the policy, ms.
    pub lease_ms: u64,
    /// Measured RTO of the last completed failover or switchover, ms.
    pub last_rto_ms: Option<u64>,
    /// When the last failover or switchover completed (its audit entry), ms since the Unix
    /// epoch.
    pub last_failover_at_ms: Option<u64>,
    /// The active region acknowledges without a standby's confirmation (recorded degraded
    /// synchronous replication at the current epoch).
    pub sync_degraded: bool,
    /// The global leader's working view; None on other members.
    pub leader: Option<LeaderMetrics>,
}

/// The global leader's working view.
#[derive(Debug, Clone, Default)]
pub struct LeaderMetrics {
    /// Expiry of the active region's lease by this leader's clock, ms since the Unix epoch.
    pub lease_expiry_ms: u64,
    /// Every region of the committed record.
    pub regions: Vec<RegionMetrics>,
}

/// One region in the global leader's view.
#[derive(Debug, Clone, Default)]
pub struct RegionMetrics {
    /// Region name.
    pub region: String,
    /// Healthy in the last failover step (fresh report of its regional leader; the active
    /// region's lease renewals too).
    pub healthy: bool,
    /// Expected loss if this standby were promoted now, ms (`failover::standby_rpo_ms`); None
    /// for the active region or when no fresh report gives one.
    pub expected_rpo_ms: Option<u64>,
    /// Age of its newest report, ms; None if never heard from.
    pub report_age_ms: Option<u64>,
}

impl ControlRuntime {
    /// The control path for `/metrics`: committed record, and the working view when this node
    /// is the global leader.
    pub fn metrics(&self) -> ControlMetrics {
        let state = self.store.state();
        let now = now_ms();
        let mut m = ControlMetrics {
            regions: state.regions.clone(),
            rpo_budget_ms: state.policy.rpo_budget_ms,
            lease_ms: state.policy.lease_ms,
            last_rto_ms: state.last_rto_ms,
            last_failover_at_ms: state
                .audit
                .iter()
                .rev()
                .find(|a| a.action == "completed" && a.outcome == "ok")
                .map(|a| a.at_ms),
            ..Default::default()
        };
        if let Some(rec) = &state.record {
            m.active_region = Some(rec.active_region().to_string());
            m.epoch = rec.epoch;
            m.phase = match rec.phase {
                Phase::Active { .. } => "active",
                Phase::Suspect { .. } => "suspect",
                Phase::FailingOver { .. } => "failing-over",
            };
            m.sync_degraded = state.sync_degraded_at(rec.active_region(), rec.epoch);
        }
        if !self.is_global_leader() {
            return m;
        }
        let l = self.leader.lock();
        let Some(w) = l.as_ref() else { return m };
        let active = w.rec.active_region();
        m.leader = Some(LeaderMetrics {
            lease_expiry_ms: w.rec.lease_expiry_ms,
            regions: w
                .views
                .iter()
                .map(|v| RegionMetrics {
                    region: v.region.clone(),
                    healthy: v.healthy,
                    expected_rpo_ms: (v.region != active && v.lag_ms < u64::MAX / 4)
                        .then_some(v.lag_ms),
                    report_age_ms: w
                        .reports
                        .get(&v.region)
                        .map(|(t, _)| now.saturating_sub(*t)),
                })
                .collect(),
        });
        m
    }
}
