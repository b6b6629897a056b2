//! The write lease of the active region (docs/failover.md, safety rule 1), as pure logic:
//! times are inputs (ms), so the same code runs in the coordinator, in the deterministic
//! simulation (`tests/sim_control.rs`) and in unit tests.
//!
//! Two sides:
//! - the **holder** ([`LeaseHolder`]), kept by the regional leader of the active region, measures
//!   the lease on its own local clock, *from the moment it sent the renewal request*: the grant
//!   can only have been made after that, so the holder's view ends no later than the grantor's
//!   (up to the clock-rate drift between the two over one lease period);
//! - the **grantor** ([`grant`], [`on_became_leader`]), the global leader, extends
//!   `ControlRecord::lease_expiry_ms` to cover every lease it ever granted; the failover state
//!   machine ([`crate::control::failover::step`]) only moves the active region once that expiry plus
//!   `Policy::max_clock_drift_ms` has passed.
//!
//! Safety argument (rule 1): a holder's lease ends at `sent + lease_ms` on its clock; the grantor
//! granted at a later instant and covers `grant + lease_ms` on its clock; a new leader assumes a
//! lease until `became_leader + lease_ms`, which is later than any grant of its predecessor
//! (leadership is checked at grant time). The failover waits a further `max_clock_drift_ms`, which
//! must bound how much two clocks can disagree about the length of one lease period.

use crate::control::failover::{ControlRecord, Phase, Policy};

/// Holder side: kept by the regional leader of the active region. Times are the holder's LOCAL
/// clock (ms), which must be monotonic.
#[derive(Debug, Clone, Default)]
pub struct LeaseHolder {
    /// Epoch of the held (or last held) lease; 0 if none ever.
    epoch: u64,
    /// Local expiry (ms) of the held lease, `None` when no lease is held.
    valid_until: Option<u64>,
}

impl LeaseHolder {
    /// A holder without a lease (epoch 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// A renewal sent at local time `sent_local_ms` was granted for `lease_ms` under `epoch`:
    /// valid until `sent_local_ms + lease_ms`.
    ///
    /// - never shortened by a late reply to an older request (the later expiry is kept);
    /// - a grant for a newer epoch replaces the old lease;
    /// - a grant for an older epoch than the one held is ignored.
    ///
    /// A late grant arriving after [`LeaseHolder::on_refused`] is accepted: the grantor counted
    /// it in `lease_expiry_ms` when it granted it, so it cannot overlap a newer region's lease.
    pub fn on_grant(&mut self, sent_local_ms: u64, lease_ms: u64, epoch: u64) {
        let until = sent_local_ms.saturating_add(lease_ms);
        if epoch < self.epoch {
            return;
        }
        if epoch > self.epoch {
            self.epoch = epoch;
            self.valid_until = Some(until);
            return;
        }
        self.valid_until = Some(self.valid_until.map_or(until, |u| u.max(until)));
    }

    /// The grantor refused (the region is no longer active or the epoch moved on): the lease is
    /// dropped at once. The epoch is kept, so older grants stay ignored.
    pub fn on_refused(&mut self) {
        self.valid_until = None;
    }

    /// May this region take writes under `epoch` at local time `now_local_ms`? True when `epoch`
    /// equals the held epoch and `now_local_ms < valid_until`.
    pub fn valid(&self, now_local_ms: u64, epoch: u64) -> bool {
        epoch == self.epoch && self.valid_until.is_some_and(|u| now_local_ms < u)
    }

    /// Local expiry (ms), if a lease is held (it may already have passed).
    pub fn valid_until_ms(&self) -> Option<u64> {
        self.valid_until
    }

    /// Epoch of the held lease (0 if none ever).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Why a renewal is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefused {
    /// The asking region is not the active one (or the failover to it is not confirmed yet).
    #[error("lease refused: region {region} is not active (the control record names {active})")]
    NotActive {
        /// The asking region.
        region: String,
        /// The region the control record names as active (the failover target while failing
        /// over, whose promotion is not yet confirmed).
        active: String,
    },
    /// The asking region is active but asked under another epoch.
    #[error("lease refused: asked under epoch {asked} but the current epoch is {current}")]
    StaleEpoch {
        /// Epoch in the request.
        asked: u64,
        /// Epoch of the control record.
        current: u64,
    },
    /// The asking region is suspect (looked lost): its lease is left to expire.
    #[error("lease refused: region {region} is suspect; its lease is left to expire")]
    Suspect {
        /// The asking region.
        region: String,
    },
}

/// Grantor side (global leader, in memory): grants a renewal requested by `region` for `epoch` at
/// the grantor's `now_ms`.
///
/// Granted only when `rec.phase` is `Active { region }` and `epoch == rec.epoch`; then
/// `rec.lease_holder = Some(region)`, `rec.lease_expiry_ms = max(rec.lease_expiry_ms, now_ms +
/// policy.lease_ms)`, `rec.last_healthy_ms = now_ms`, and the lease length `policy.lease_ms`
/// (ms) is returned. The caller must be the current leader (checked against a quorum) at the
/// moment of the grant.
///
/// Errors: [`LeaseRefused`] saying why; `rec` is unchanged then.
pub fn grant(
    rec: &mut ControlRecord,
    region: &str,
    epoch: u64,
    now_ms: u64,
    policy: &Policy,
) -> Result<u64, LeaseRefused> {
    match &rec.phase {
        Phase::Active { region: active } if active == region => {}
        Phase::Suspect { region: active, .. } if active == region => {
            return Err(LeaseRefused::Suspect {
                region: region.to_string(),
            })
        }
        _ => {
            return Err(LeaseRefused::NotActive {
                region: region.to_string(),
                active: rec.active_region().to_string(),
            })
        }
    }
    if epoch != rec.epoch {
        return Err(LeaseRefused::StaleEpoch {
            asked: epoch,
            current: rec.epoch,
        });
    }
    rec.lease_holder = Some(region.to_string());
    rec.lease_expiry_ms = rec
        .lease_expiry_ms
        .max(now_ms.saturating_add(policy.lease_ms));
    rec.last_healthy_ms = now_ms;
    Ok(policy.lease_ms)
}

/// A node just became global leader at `now_ms` (its clock) with the committed record `rec`
/// (lease fields are not committed on every renewal): it assumes the previous leader may have
/// granted a lease until `now_ms + policy.lease_ms`.
///
/// Sets `rec.lease_expiry_ms = max(rec.lease_expiry_ms, now_ms + lease_ms)`, `rec.lease_holder =
/// Some(active region)` if the phase is `Active` or `Suspect` (a failing-over record keeps no
/// holder: the old region's lease was surely expired before the failover started), and
/// `rec.last_healthy_ms = now_ms` (detection starts afresh).
pub fn on_became_leader(rec: &mut ControlRecord, now_ms: u64, policy: &Policy) {
    rec.lease_expiry_ms = rec
        .lease_expiry_ms
        .max(now_ms.saturating_add(policy.lease_ms));
    match &rec.phase {
        Phase::Active { region } | Phase::Suspect { region, .. } => {
            rec.lease_holder = Some(region.clone());
        }
        Phase::FailingOver { .. } => {}
    }
    rec.last_healthy_ms = now_ms;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::failover::{step, RegionView};

    #[test]
    fn holder_lease_runs_from_the_send_time_and_is_never_shortened() {
        let mut h = LeaseHolder::new();
        assert_eq!(h.epoch(), 0);
        assert_eq!(h.valid_until_ms(), None);
        assert!(!h.valid(0, 0));
        h.on_grant(1000, 2000, 1);
        assert_eq!(h.valid_until_ms(), Some(3000));
        assert!(h.valid(2999, 1));
        assert!(!h.valid(3000, 1));
        assert!(!h.valid(2000, 2), "another epoch is never valid");
        // A newer request's reply, then a late reply to an older one: the later expiry stays.
        h.on_grant(1500, 2000, 1);
        h.on_grant(1200, 2000, 1);
        assert_eq!(h.valid_until_ms(), Some(3500));
    }

    #[test]
    fn holder_epochs_replace_and_old_epochs_are_ignored() {
        let mut h = LeaseHolder::new();
        h.on_grant(5000, 2000, 3);
        // A newer epoch replaces, even with an earlier expiry.
        h.on_grant(4000, 2000, 4);
        assert_eq!((h.epoch(), h.valid_until_ms()), (4, Some(6000)));
        h.on_grant(9000, 2000, 3);
        assert_eq!((h.epoch(), h.valid_until_ms()), (4, Some(6000)));
        assert!(!h.valid(5000, 3));
        assert!(h.valid(5000, 4));
    }

    #[test]
    fn holder_refusal_drops_the_lease_at_once() {
        let mut h = LeaseHolder::new();
        h.on_grant(0, 2000, 1);
        h.on_refused();
        assert!(!h.valid(10, 1));
        assert_eq!(h.valid_until_ms(), None);
        assert_eq!(h.epoch(), 1);
        h.on_grant(100, 2000, 0);
        assert!(!h.valid(200, 0), "older epoch ignored after a refusal too");
    }

    #[test]
    fn grant_only_to_the_active_region_under_its_epoch() {
        let p = Policy {
            lease_ms: 2000,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        assert_eq!(grant(&mut r, "a", 1, 500, &p), Ok(2000));
        assert_eq!(r.lease_expiry_ms, 2500);
        assert_eq!(r.last_healthy_ms, 500);
        assert_eq!(r.lease_holder.as_deref(), Some("a"));
        let before = r.clone();
        assert_eq!(
            grant(&mut r, "b", 1, 600, &p),
            Err(LeaseRefused::NotActive {
                region: "b".into(),
                active: "a".into()
            })
        );
        assert_eq!(
            grant(&mut r, "a", 0, 600, &p),
            Err(LeaseRefused::StaleEpoch {
                asked: 0,
                current: 1
            })
        );
        assert_eq!(r, before, "a refusal leaves the record unchanged");
        // The expiry never moves backwards (a grant with an earlier clock reading).
        r.lease_expiry_ms = 9000;
        grant(&mut r, "a", 1, 700, &p).unwrap();
        assert_eq!(r.lease_expiry_ms, 9000);
        let e = grant(&mut r, "b", 1, 600, &p).unwrap_err();
        assert!(e.to_string().contains("not active"), "{e}");
    }

    #[test]
    fn suspect_and_failing_over_regions_get_no_lease() {
        let p = Policy {
            lease_ms: 2000,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        let lost = |promoted: u64| {
            vec![
                RegionView {
                    region: "a".into(),
                    healthy: false,
                    lag_ms: 0,
                    promoted_epoch: 0,
                },
                RegionView {
                    region: "b".into(),
                    healthy: true,
                    lag_ms: 0,
                    promoted_epoch: promoted,
                },
            ]
        };
        step(&mut r, &lost(0), 1500, &p);
        assert!(matches!(r.phase, Phase::Suspect { .. }));
        assert_eq!(
            grant(&mut r, "a", 1, 1600, &p),
            Err(LeaseRefused::Suspect { region: "a".into() })
        );
        step(&mut r, &lost(0), 2000 + 250, &p);
        assert!(matches!(r.phase, Phase::FailingOver { .. }));
        // Neither the old region nor the unconfirmed target gets a lease.
        assert!(matches!(
            grant(&mut r, "a", 1, 2300, &p),
            Err(LeaseRefused::NotActive { .. })
        ));
        assert!(matches!(
            grant(&mut r, "b", 2, 2300, &p),
            Err(LeaseRefused::NotActive { .. })
        ));
        step(&mut r, &lost(2), 2400, &p);
        assert_eq!(grant(&mut r, "b", 2, 2500, &p), Ok(2000));
        assert_eq!(
            grant(&mut r, "a", 1, 2500, &p),
            Err(LeaseRefused::NotActive {
                region: "a".into(),
                active: "b".into()
            })
        );
    }

    #[test]
    fn a_new_leader_assumes_a_lease_granted_until_now_plus_lease() {
        let p = Policy {
            lease_ms: 2000,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        // Committed record from long ago: lease expiry 2000, last healthy 0.
        on_became_leader(&mut r, 10_000, &p);
        assert_eq!(r.lease_expiry_ms, 12_000);
        assert_eq!(r.last_healthy_ms, 10_000);
        assert_eq!(r.lease_holder.as_deref(), Some("a"));
        // Detection starts afresh: no suspicion before the detection timeout...
        let a_lost = vec![RegionView {
            region: "a".into(),
            healthy: false,
            lag_ms: 0,
            promoted_epoch: 0,
        }];
        assert!(step(&mut r, &a_lost, 10_500, &p).is_empty());
        // ...and the expiry never moves backwards.
        on_became_leader(&mut r, 1_000, &p);
        assert_eq!(r.lease_expiry_ms, 12_000);
        // Failing over: no holder is invented.
        r.phase = Phase::FailingOver {
            from: "a".into(),
            to: "b".into(),
            started_ms: 0,
        };
        r.lease_holder = None;
        on_became_leader(&mut r, 20_000, &p);
        assert_eq!(r.lease_holder, None);
        assert_eq!(r.lease_expiry_ms, 22_000);
    }
}
