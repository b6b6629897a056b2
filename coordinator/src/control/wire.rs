//! Conversions between the global group's domain types ([`super::record`],
//! [`crate::control::failover`], [`crate::config::GlobalMember`]) and the typed wire of
//! `lifeboat.v1.ControlService` / `GlobalService` (`proto/lifeboat/v1/control.proto`). The
//! domain types stay the ones the state machine persists and the pure failover logic reads;
//! these are the only places that map them.

use lifeboat_proto as pb;

use super::record::{AuditEntry, ControlState, SyncDegraded};
use crate::config::GlobalMember;
use crate::control::failover::{ControlRecord, FailoverMode, Phase, Policy};

impl From<&AuditEntry> for pb::AuditEntry {
    fn from(e: &AuditEntry) -> Self {
        pb::AuditEntry {
            seq: e.seq,
            at_ms: e.at_ms,
            epoch: e.epoch,
            actor: e.actor.clone(),
            action: e.action.clone(),
            detail: e.detail.clone(),
            outcome: e.outcome.clone(),
        }
    }
}

impl From<pb::AuditEntry> for AuditEntry {
    fn from(e: pb::AuditEntry) -> Self {
        AuditEntry {
            seq: e.seq,
            at_ms: e.at_ms,
            epoch: e.epoch,
            actor: e.actor,
            action: e.action,
            detail: e.detail,
            outcome: e.outcome,
        }
    }
}

impl From<&GlobalMember> for pb::GlobalMember {
    fn from(m: &GlobalMember) -> Self {
        pb::GlobalMember {
            id: m.id,
            addr: m.addr.clone(),
            region: m.region.clone(),
            witness: m.witness,
        }
    }
}

impl From<pb::GlobalMember> for GlobalMember {
    fn from(m: pb::GlobalMember) -> Self {
        GlobalMember {
            id: m.id,
            addr: m.addr,
            region: m.region,
            witness: m.witness,
        }
    }
}

impl From<&Phase> for pb::control_record::Phase {
    fn from(p: &Phase) -> Self {
        use pb::control_record::Phase as W;
        match p {
            Phase::Active { region } => W::Active(pb::PhaseActive {
                region: region.clone(),
            }),
            Phase::Suspect { region, since_ms } => W::Suspect(pb::PhaseSuspect {
                region: region.clone(),
                since_ms: *since_ms,
            }),
            Phase::FailingOver {
                from,
                to,
                started_ms,
            } => W::FailingOver(pb::PhaseFailingOver {
                from: from.clone(),
                to: to.clone(),
                started_ms: *started_ms,
            }),
        }
    }
}

impl From<&ControlRecord> for pb::ControlRecord {
    fn from(r: &ControlRecord) -> Self {
        pb::ControlRecord {
            phase: Some((&r.phase).into()),
            epoch: r.epoch,
            lease_holder: r.lease_holder.clone(),
            lease_expiry_ms: r.lease_expiry_ms,
            last_change_ms: r.last_change_ms,
            last_healthy_ms: r.last_healthy_ms,
        }
    }
}

impl From<FailoverMode> for pb::FailoverMode {
    fn from(m: FailoverMode) -> Self {
        match m {
            FailoverMode::ConsistencyFirst => pb::FailoverMode::ConsistencyFirst,
            FailoverMode::AvailabilityFirst => pb::FailoverMode::AvailabilityFirst,
        }
    }
}

impl From<&Policy> for pb::Policy {
    fn from(p: &Policy) -> Self {
        pb::Policy {
            detection_timeout_ms: p.detection_timeout_ms,
            lease_ms: p.lease_ms,
            max_clock_drift_ms: p.max_clock_drift_ms,
            rpo_budget_ms: p.rpo_budget_ms,
            mode: pb::FailoverMode::from(p.mode) as i32,
            min_failover_interval_ms: p.min_failover_interval_ms,
            automatic: p.automatic,
            automatic_failback: p.automatic_failback,
            failback_stable_ms: p.failback_stable_ms,
        }
    }
}

impl From<&SyncDegraded> for pb::SyncDegraded {
    fn from(s: &SyncDegraded) -> Self {
        pb::SyncDegraded {
            region: s.region.clone(),
            epoch: s.epoch,
            since_ms: s.since_ms,
        }
    }
}

impl From<&ControlState> for pb::ControlState {
    fn from(s: &ControlState) -> Self {
        pb::ControlState {
            record: s.record.as_ref().map(Into::into),
            policy: Some((&s.policy).into()),
            regions: s.regions.clone(),
            witness: s.witness,
            members: s.members.iter().map(Into::into).collect(),
            previous_region: s.previous_region.clone(),
            last_rto_ms: s.last_rto_ms,
            audit: s.audit.iter().map(Into::into).collect(),
            sync_degraded: s.sync_degraded.as_ref().map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_phase_and_policy_map_field_by_field() {
        let policy = Policy {
            mode: FailoverMode::AvailabilityFirst,
            ..Policy::default()
        };
        let mut rec = ControlRecord::new("a", 1_000, &policy);
        rec.phase = Phase::FailingOver {
            from: "a".into(),
            to: "b".into(),
            started_ms: 7,
        };
        rec.epoch = 3;
        let w = pb::ControlRecord::from(&rec);
        assert_eq!(w.epoch, 3);
        assert_eq!(w.lease_holder.as_deref(), Some("a"));
        assert_eq!(
            w.phase,
            Some(pb::control_record::Phase::FailingOver(
                pb::PhaseFailingOver {
                    from: "a".into(),
                    to: "b".into(),
                    started_ms: 7
                }
            ))
        );
        let p = pb::Policy::from(&policy);
        assert_eq!(p.mode(), pb::FailoverMode::AvailabilityFirst);
        assert_eq!(p.lease_ms, policy.lease_ms);
    }

    #[test]
    fn audit_entry_round_trips() {
        let e = AuditEntry {
            seq: 4,
            at_ms: 5,
            epoch: 6,
            actor: "operator".into(),
            action: "switchover".into(),
            detail: "a -> b".into(),
            outcome: "ok".into(),
        };
        assert_eq!(AuditEntry::from(pb::AuditEntry::from(&e)), e);
    }
}
