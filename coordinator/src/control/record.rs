//! The global group's replicated state ([`ControlState`]) and the commands that change it
//! ([`ControlCommand`]), as pure logic: the redb state machine ([`super::store`]) only loads,
//! applies and saves.
//!
//! Only decisions are committed (docs/failover.md): the first record, a change of phase or of
//! active region (each a compare-and-set on the epoch, so the stale decision of a deposed global
//! leader is refused), the active region's synchronous replication degrading or resuming
//! ([`SyncDegraded`]), policy changes and audit entries. Lease renewals and health observations
//! stay in the global leader's memory; a new global leader assumes a lease may have been granted
//! until one full lease after it took over (see `crate::control::lease::on_became_leader`).

use serde::{Deserialize, Serialize};

use crate::config::GlobalMember;
use crate::control::failover::{ControlRecord, Policy};

/// Most audit entries kept in the control state (oldest dropped first).
pub const AUDIT_KEEP: usize = 1000;

/// One audit log entry: who or what decided, when, under which epoch, and the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number in the audit log (assigned when applied, from 1).
    #[serde(default)]
    pub seq: u64,
    /// Wall-clock time of the event, ms since the Unix epoch (the proposer's clock).
    pub at_ms: u64,
    /// Epoch the event belongs to.
    pub epoch: u64,
    /// Who decided: `global-leader node N`, `operator (node N)`, `region R leader node N`.
    pub actor: String,
    /// What: `failover`, `switchover`, `failback`, `promote`, `traffic-hook`, `suspect`,
    /// `recovered`, `blocked`, `completed`, `init`.
    pub action: String,
    /// Details (regions, reasons, hook output (truncated), measured RTO).
    pub detail: String,
    /// `ok`, `failed`, `refused` or `started`.
    pub outcome: String,
}

/// What the global group holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ControlState {
    /// The control record (None until the group's first leader creates it).
    pub record: Option<ControlRecord>,
    /// Failover policy.
    pub policy: Policy,
    /// Regions in failover preference order (from the config of the node that created the
    /// record).
    pub regions: Vec<String>,
    /// Whether a witness votes.
    pub witness: bool,
    /// Voters of the global group (every coordinator and the witness): from the config of the
    /// node that created the record, then changed by `lifeboat topology add|remove`. Empty in
    /// states written before topology changes existed (the config's list applies).
    #[serde(default)]
    pub members: Vec<GlobalMember>,
    /// Region active before the last change (target of `lifeboat failback`).
    pub previous_region: Option<String>,
    /// Measured RTO of the last completed failover or switchover (ms from detection start, or
    /// from the operator's command, until the new region confirmed promotion and hooks).
    pub last_rto_ms: Option<u64>,
    /// Audit log, oldest first, at most [`AUDIT_KEEP`] entries.
    pub audit: Vec<AuditEntry>,
    /// Next audit sequence number.
    pub next_audit_seq: u64,
    /// The active region acknowledges without a standby region's confirmation (degraded
    /// synchronous replication), recorded before it acknowledged the first such batch. `None`
    /// (or a record of another region or epoch): every change it acknowledged at this epoch
    /// was confirmed by a standby region first. See [`ControlState::sync_degraded_at`].
    #[serde(default)]
    pub sync_degraded: Option<SyncDegraded>,
}

/// A committed fact: `region`, active at `epoch`, may acknowledge changes no standby region
/// confirmed (see `crate::intake::SyncAck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncDegraded {
    /// The active region.
    pub region: String,
    /// Its epoch.
    pub epoch: u64,
    /// When it was recorded, ms since the Unix epoch (the global leader's clock).
    pub since_ms: u64,
}

/// A command of the global group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// Creates the record if there is none (every founding node may propose it; the first wins).
    Init {
        /// The first record.
        record: ControlRecord,
        /// Policy.
        policy: Policy,
        /// Regions in preference order.
        regions: Vec<String>,
        /// Whether a witness votes.
        witness: bool,
        /// Founding voters.
        #[serde(default)]
        members: Vec<GlobalMember>,
    },
    /// A decision of the global leader: replaces the record if the committed epoch still equals
    /// `expect_epoch` (compare-and-set), and appends `audit`.
    Decide {
        /// Epoch the decision was computed from.
        expect_epoch: u64,
        /// The new record.
        record: ControlRecord,
        /// Region active before, when this decision changes the active region.
        previous_region: Option<String>,
        /// Measured RTO when this decision completes a failover or switchover (ms).
        rto_ms: Option<u64>,
        /// Audit entries of the decision.
        audit: Vec<AuditEntry>,
    },
    /// Appends audit entries (order outcomes reported by regions, operator commands).
    Audit {
        /// Entries.
        entries: Vec<AuditEntry>,
    },
    /// Replaces the policy.
    SetPolicy {
        /// New policy.
        policy: Policy,
    },
    /// A topology change (`lifeboat topology add|remove`), after the Raft membership change.
    SetTopology {
        /// Voters now.
        members: Vec<GlobalMember>,
        /// Regions in preference order now.
        regions: Vec<String>,
        /// Whether a witness votes now.
        witness: bool,
        /// Policy now (`automatic` follows whether the new topology allows it).
        policy: Policy,
        /// Audit entry of the change.
        audit: Vec<AuditEntry>,
    },
    /// The active region's synchronous replication degrades (`degraded`: it asked to
    /// acknowledge without a standby's confirmation) or resumes (every change it acknowledged
    /// is confirmed). Refused unless `region` is the active region at `epoch`.
    SetSyncDegraded {
        /// The active region.
        region: String,
        /// Its epoch.
        epoch: u64,
        /// Degraded (true) or synchronous again (false).
        degraded: bool,
        /// When, ms since the Unix epoch.
        at_ms: u64,
        /// Audit entry of the change.
        audit: Vec<AuditEntry>,
    },
}

impl ControlState {
    /// Applies one command; returns whether it took effect.
    pub fn apply(&mut self, cmd: ControlCommand) -> bool {
        match cmd {
            ControlCommand::Init {
                record,
                policy,
                regions,
                witness,
                members,
            } => {
                if self.record.is_some() {
                    return false;
                }
                self.members = members;
                let epoch = record.epoch;
                let active = record.active_region().to_string();
                self.record = Some(record);
                self.policy = policy;
                self.regions = regions;
                self.witness = witness;
                self.push_audit(vec![AuditEntry {
                    seq: 0,
                    at_ms: 0,
                    epoch,
                    actor: "config".into(),
                    action: "init".into(),
                    detail: format!("control record created: {active} active"),
                    outcome: "ok".into(),
                }]);
                true
            }
            ControlCommand::Decide {
                expect_epoch,
                record,
                previous_region,
                rto_ms,
                audit,
            } => {
                let Some(cur) = &self.record else {
                    return false;
                };
                if cur.epoch != expect_epoch || record.epoch < cur.epoch {
                    return false;
                }
                if previous_region.is_some() {
                    self.previous_region = previous_region;
                }
                if rto_ms.is_some() {
                    self.last_rto_ms = rto_ms;
                }
                self.record = Some(record);
                self.push_audit(audit);
                true
            }
            ControlCommand::Audit { entries } => {
                self.push_audit(entries);
                true
            }
            ControlCommand::SetPolicy { policy } => {
                self.policy = policy;
                true
            }
            ControlCommand::SetTopology {
                members,
                regions,
                witness,
                policy,
                audit,
            } => {
                self.members = members;
                self.regions = regions;
                self.witness = witness;
                self.policy = policy;
                self.push_audit(audit);
                true
            }
            ControlCommand::SetSyncDegraded {
                region,
                epoch,
                degraded,
                at_ms,
                audit,
            } => {
                let current = self
                    .record
                    .as_ref()
                    .is_some_and(|r| r.epoch == epoch && r.active_region() == region);
                if !current || self.sync_degraded_at(&region, epoch) == degraded {
                    return false;
                }
                self.sync_degraded = degraded.then_some(SyncDegraded {
                    region,
                    epoch,
                    since_ms: at_ms,
                });
                self.push_audit(audit);
                true
            }
        }
    }

    /// Whether `region`, active at `epoch`, is recorded as possibly acknowledging changes no
    /// standby region confirmed. False for any other region or epoch: a new epoch starts
    /// synchronous.
    pub fn sync_degraded_at(&self, region: &str, epoch: u64) -> bool {
        self.sync_degraded
            .as_ref()
            .is_some_and(|d| d.region == region && d.epoch == epoch)
    }

    /// Voters of the global group: the committed list, or `config` when none was committed.
    pub fn members_or(&self, config: &[GlobalMember]) -> Vec<GlobalMember> {
        if self.members.is_empty() {
            config.to_vec()
        } else {
            self.members.clone()
        }
    }

    fn push_audit(&mut self, entries: Vec<AuditEntry>) {
        for mut e in entries {
            self.next_audit_seq = self.next_audit_seq.max(1);
            e.seq = self.next_audit_seq;
            self.next_audit_seq += 1;
            self.audit.push(e);
        }
        if self.audit.len() > AUDIT_KEEP {
            let drop = self.audit.len() - AUDIT_KEEP;
            self.audit.drain(..drop);
        }
    }

    /// Active region and epoch, if the record exists.
    pub fn active(&self) -> Option<(String, u64)> {
        self.record
            .as_ref()
            .map(|r| (r.active_region().to_string(), r.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> ControlState {
        let mut s = ControlState::default();
        let p = Policy::default();
        assert!(s.apply(ControlCommand::Init {
            record: ControlRecord::new("a", 0, &p),
            policy: p,
            regions: vec!["a".into(), "b".into()],
            witness: true,
            members: Vec::new(),
        }));
        s
    }

    #[test]
    fn init_once_and_stale_decisions_are_refused() {
        let mut s = init();
        let p = Policy::default();
        assert!(!s.apply(ControlCommand::Init {
            record: ControlRecord::new("b", 0, &p),
            policy: p.clone(),
            regions: vec![],
            witness: false,
            members: Vec::new(),
        }));
        assert_eq!(s.active(), Some(("a".into(), 1)));
        let mut next = s.record.clone().unwrap();
        next.epoch = 2;
        next.phase = crate::control::failover::Phase::Active { region: "b".into() };
        let d = ControlCommand::Decide {
            expect_epoch: 1,
            record: next.clone(),
            previous_region: Some("a".into()),
            rto_ms: Some(2000),
            audit: vec![],
        };
        assert!(s.apply(d.clone()));
        assert_eq!(s.active(), Some(("b".into(), 2)));
        // The same decision again (a deposed leader's copy) is refused: the epoch moved on.
        assert!(!s.apply(d));
        assert_eq!(s.previous_region.as_deref(), Some("a"));
        assert_eq!(s.last_rto_ms, Some(2000));
    }

    #[test]
    fn sync_degraded_is_recorded_only_for_the_active_region_and_ends_with_its_epoch() {
        let mut s = init();
        let set = |region: &str, epoch: u64, degraded: bool| ControlCommand::SetSyncDegraded {
            region: region.into(),
            epoch,
            degraded,
            at_ms: 5,
            audit: vec![],
        };
        assert!(!s.sync_degraded_at("a", 1));
        // A standby region, or a stale epoch, cannot record itself degraded.
        assert!(!s.apply(set("b", 1, true)));
        assert!(!s.apply(set("a", 0, true)));
        assert!(s.apply(set("a", 1, true)));
        assert!(s.sync_degraded_at("a", 1));
        // Recording the same state again changes nothing.
        assert!(!s.apply(set("a", 1, true)));
        assert!(s.apply(set("a", 1, false)));
        assert!(!s.sync_degraded_at("a", 1));
        assert!(s.apply(set("a", 1, true)));
        // A new epoch (b promoted) starts synchronous.
        let mut next = s.record.clone().unwrap();
        next.epoch = 2;
        next.phase = crate::control::failover::Phase::Active { region: "b".into() };
        assert!(s.apply(ControlCommand::Decide {
            expect_epoch: 1,
            record: next,
            previous_region: Some("a".into()),
            rto_ms: None,
            audit: vec![],
        }));
        assert!(!s.sync_degraded_at("b", 2));
        assert!(!s.apply(set("a", 1, false)), "a's epoch is over");
    }

    #[test]
    fn audit_is_numbered_and_bounded() {
        let mut s = init();
        let e = AuditEntry {
            seq: 0,
            at_ms: 1,
            epoch: 1,
            actor: "x".into(),
            action: "blocked".into(),
            detail: String::new(),
            outcome: "refused".into(),
        };
        for _ in 0..AUDIT_KEEP + 10 {
            s.apply(ControlCommand::Audit {
                entries: vec![e.clone()],
            });
        }
        assert_eq!(s.audit.len(), AUDIT_KEEP);
        assert_eq!(s.audit.last().unwrap().seq, AUDIT_KEEP as u64 + 11);
        assert!(s.audit.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
    }
}
