//! Accessors on the generated control-plane messages, so callers read the committed record
//! without unwrapping nested options at every use.

use crate::v1::{
    control_record::Phase, ControlRecord, ControlState, GlobalStatusReply, RegionReport,
};

impl ControlRecord {
    /// The region whose primaries take writes (the failover target while failing over); empty
    /// without a phase.
    pub fn active_region(&self) -> &str {
        match &self.phase {
            Some(Phase::Active(p)) => &p.region,
            Some(Phase::Suspect(p)) => &p.region,
            Some(Phase::FailingOver(p)) => &p.to,
            None => "",
        }
    }

    /// `active`, `suspect`, `failing_over`, or `none`.
    pub fn phase_name(&self) -> &'static str {
        match &self.phase {
            Some(Phase::Active(_)) => "active",
            Some(Phase::Suspect(_)) => "suspect",
            Some(Phase::FailingOver(_)) => "failing_over",
            None => "none",
        }
    }

    /// The phase is `Active` with `region` taking writes (not suspect, not failing over).
    pub fn is_active_in(&self, region: &str) -> bool {
        matches!(&self.phase, Some(Phase::Active(p)) if p.region == region)
    }
}

impl GlobalStatusReply {
    /// The committed state (empty when the server sent none).
    pub fn state(&self) -> ControlState {
        self.state.clone().unwrap_or_default()
    }

    /// The committed control record, if the group created one.
    pub fn record(&self) -> Option<&ControlRecord> {
        self.state.as_ref().and_then(|s| s.record.as_ref())
    }

    /// The committed epoch (0 before the first record).
    pub fn epoch(&self) -> u64 {
        self.record().map(|r| r.epoch).unwrap_or(0)
    }

    /// `region` is active (phase `Active`) at the committed epoch.
    pub fn is_active_in(&self, region: &str) -> bool {
        self.record().is_some_and(|r| r.is_active_in(region))
    }

    /// The latest report of `region`, if the leader has one.
    pub fn region(&self, region: &str) -> Option<&RegionReport> {
        self.regions.iter().find(|r| r.region == region)
    }
}

impl RegionReport {
    /// The region is a standby and its regional leader says it is healthy (fit to take over).
    pub fn is_healthy_standby(&self) -> bool {
        self.role == "standby" && self.healthy
    }
}
