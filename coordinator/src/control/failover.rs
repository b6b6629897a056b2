//! The failover state machine of the global group (docs/failover.md), as pure logic:
//! time is an input (`now_ms`), so the same code runs in the coordinator, in the deterministic
//! simulation and in unit tests.
//!
//! ```text
//! Active(A, e) ──A unhealthy for detection_timeout──► Suspect(A, e)
//! Suspect(A, e) ──A healthy again──► Active(A, e)                    (no epoch change)
//! Suspect(A, e) ──A's lease surely expired (expiry + max drift), B healthy, B within the RPO
//!                 budget (or availability first), min interval since the last failover──►
//!                 FailingOver(A → B, e + 1)
//! FailingOver(A → B, e + 1) ──B confirms promotion (orders done)──► Active(B, e + 1)
//! FailingOver(A → B, e + 1) ──B unhealthy for detection_timeout before confirming, C healthy
//!                 (C may be A), min interval since the last failover──► FailingOver(B → C, e + 2)
//! ```
//!
//! Safety (the invariants the simulation checks):
//! 1. A lease is only granted to the active region, and a new region is only made active after
//!    the old lease expired by more than the configured maximum clock drift, so at most one
//!    region holds a valid lease at any instant (rule 1).
//! 2. The epoch grows by exactly one at every change of active region and never otherwise.
//! 3. In consistency mode, no failover to a region whose replication lag exceeds the RPO budget.
//!
//! Liveness knobs: `detection_timeout_ms` tolerates lost heartbeats, `min_failover_interval_ms`
//! stops ping-pong between flapping regions.

use serde::{Deserialize, Serialize};

/// Whether a failover may lose acknowledged changes beyond the RPO budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverMode {
    /// Fail over only to a region within the RPO budget (default).
    #[default]
    ConsistencyFirst,
    /// Fail over to the healthiest region even beyond the RPO budget.
    AvailabilityFirst,
}

/// Failover policy, part of the control record. Times in ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// How long the active region must look unhealthy before it is suspect (ms, default 1000).
    pub detection_timeout_ms: u64,
    /// Lease length granted to the active region (ms, default 1500). The active region renews
    /// every quarter lease; a lost region is replaced about `lease + max_clock_drift` after its
    /// last renewal.
    pub lease_ms: u64,
    /// Largest clock difference assumed between any two nodes (ms, default 250).
    pub max_clock_drift_ms: u64,
    /// Largest replication lag a failover target may have in consistency mode (ms, default 0:
    /// the target must be fully caught up).
    pub rpo_budget_ms: u64,
    /// Consistency or availability first.
    pub mode: FailoverMode,
    /// Minimum time between two changes of active region (ms, default 30000).
    pub min_failover_interval_ms: u64,
    /// Automatic failover enabled (refused without a witness: see [`Topology::check`]).
    pub automatic: bool,
    /// Automatic failback (default false): when the preferred region (`[global]
    /// initial_active`) is not active but has been healthy and fully caught up for
    /// `failback_stable_ms`, and `min_failover_interval_ms` passed since the last change, the
    /// global leader starts a planned switchover back to it (fence, wait for zero lag, promote:
    /// no acknowledged change is lost). Needs `automatic`.
    pub automatic_failback: bool,
    /// How long the preferred region must stay healthy and caught up before an automatic
    /// failback (ms, default 60000).
    pub failback_stable_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            detection_timeout_ms: 1000,
            lease_ms: 1500,
            max_clock_drift_ms: 250,
            rpo_budget_ms: 0,
            mode: FailoverMode::ConsistencyFirst,
            min_failover_interval_ms: 30_000,
            automatic: true,
            automatic_failback: false,
            failback_stable_ms: 60_000,
        }
    }
}

/// Regions and witness of the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Region names in preference order for failover.
    pub regions: Vec<String>,
    /// Whether a witness site votes in the global group.
    pub witness: bool,
}

/// Why a topology cannot fail over automatically.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    /// Two regions, no witness: a partition leaves no majority side.
    #[error("automatic failover refused: {regions} regions and no witness. In a partition between the two regions neither side holds a majority of the global group, so an automatic failover could create two active regions. Add a witness in a third site, or set automatic = false and use `lifeboat switchover`")]
    NoWitness {
        /// Number of regions.
        regions: usize,
    },
    /// Fewer than two regions.
    #[error("failover needs at least two regions, found {0}")]
    TooFewRegions(usize),
}

impl Topology {
    /// Checks that automatic failover is safe for this topology.
    ///
    /// Errors: [`TopologyError`] explaining why not.
    pub fn check(&self) -> Result<(), TopologyError> {
        if self.regions.len() < 2 {
            return Err(TopologyError::TooFewRegions(self.regions.len()));
        }
        if self.regions.len() == 2 && !self.witness {
            return Err(TopologyError::NoWitness { regions: 2 });
        }
        Ok(())
    }
}

/// What the global leader currently knows of one region (from its regional leader's reports and
/// the other regions' observations; not committed through Raft).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionView {
    /// Region name.
    pub region: String,
    /// Its own coordinators and a quorum of observers agree it is healthy.
    pub healthy: bool,
    /// Replication lag behind the active region (ms); 0 for the active region itself.
    pub lag_ms: u64,
    /// The region confirmed it executed the promotion orders of this epoch.
    pub promoted_epoch: u64,
}

/// What the global leader last heard from the active region's leader, for [`standby_rpo_ms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveProgress {
    /// Age of its newest report (ms); `u64::MAX` when this global leader never heard from it.
    pub report_age_ms: u64,
    /// The report is recent enough to count the region as reachable (within the detection
    /// timeout).
    pub fresh: bool,
    /// It acknowledged without a standby's confirmation (degraded synchronous replication).
    pub sync_degraded: bool,
}

/// Expected loss, in ms of acknowledged changes, if a standby were promoted now: the lag
/// compared with [`Policy::rpo_budget_ms`] in consistency-first failover.
///
/// - Active region reachable (`fresh`), or no [`ActiveProgress`] given: the standby's measured
///   lag.
/// - Active region gone (or never heard from by this global leader: `report_age_ms` is then
///   `u64::MAX`), synchronous replication not degraded (`synchronous` and not `sync_degraded`:
///   neither its last report nor the committed record says so), and this standby holds the
///   highest upstream sequence of any standby (`upstream_seq >= best_upstream_seq`): **0**.
///   Every acknowledged batch was confirmed by a standby first, and standbys commit a prefix
///   of the active region's catalog, so the most advanced one holds all of them; the silence
///   since the loss is not lag. (The active region acknowledges alone only after the global
///   group recorded it degraded, `ControlCommand::SetSyncDegraded`, so the record tells even
///   a global leader elected after the loss.)
/// - Otherwise (asynchronous or degraded): the standby's lag when the active region was last
///   heard from (`lag_at_contact_ms`, else `measured_lag_ms`) plus the time the active region
///   may have gone on acknowledging after that: the report's age, at most one lease plus the
///   clock drift (it acknowledges nothing without a valid lease).
pub fn standby_rpo_ms(
    synchronous: bool,
    active: Option<ActiveProgress>,
    upstream_seq: u64,
    best_upstream_seq: u64,
    measured_lag_ms: u64,
    lag_at_contact_ms: Option<u64>,
    policy: &Policy,
) -> u64 {
    let Some(a) = active.filter(|a| !a.fresh) else {
        return measured_lag_ms;
    };
    if synchronous && !a.sync_degraded && upstream_seq >= best_upstream_seq {
        return 0;
    }
    lag_at_contact_ms.unwrap_or(measured_lag_ms).saturating_add(
        a.report_age_ms
            .min(policy.lease_ms + policy.max_clock_drift_ms),
    )
}

/// Phase of the control record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// `region` takes writes under `epoch`.
    Active {
        /// Active region.
        region: String,
    },
    /// The active region looks lost since `since_ms`; its lease is no longer renewed.
    Suspect {
        /// Suspect (still formally active) region.
        region: String,
        /// When it was first seen unhealthy (ms).
        since_ms: u64,
    },
    /// Orders to promote `to` under the current epoch are out; `from` is fenced.
    FailingOver {
        /// Previous active region.
        from: String,
        /// New active region.
        to: String,
        /// When the failover started (ms).
        started_ms: u64,
    },
}

/// The control record held by the global group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRecord {
    /// Current phase.
    pub phase: Phase,
    /// Fencing token: bumped at every change of active region.
    pub epoch: u64,
    /// Region holding the lease, if any.
    pub lease_holder: Option<String>,
    /// Lease expiry (ms, by the global leader's clock).
    pub lease_expiry_ms: u64,
    /// When the active region last changed (ms), for hysteresis.
    pub last_change_ms: Option<u64>,
    /// When the active region was last seen healthy (ms).
    pub last_healthy_ms: u64,
}

impl ControlRecord {
    /// A new record: `region` active at `epoch` 1, holding a lease from `now_ms`.
    pub fn new(region: &str, now_ms: u64, policy: &Policy) -> Self {
        ControlRecord {
            phase: Phase::Active {
                region: region.to_string(),
            },
            epoch: 1,
            lease_holder: Some(region.to_string()),
            lease_expiry_ms: now_ms + policy.lease_ms,
            last_change_ms: None,
            last_healthy_ms: now_ms,
        }
    }

    /// The region whose primaries take writes (the failover target while failing over).
    pub fn active_region(&self) -> &str {
        match &self.phase {
            Phase::Active { region } | Phase::Suspect { region, .. } => region,
            Phase::FailingOver { to, .. } => to,
        }
    }

    /// Whether `region` holds a valid lease at `now_ms` by a clock that may be off by up to
    /// `drift_ms` in either direction: true if it might still consider itself leased.
    pub fn lease_possibly_valid(&self, region: &str, now_ms: u64, drift_ms: u64) -> bool {
        self.lease_holder.as_deref() == Some(region) && now_ms < self.lease_expiry_ms + drift_ms
    }
}

/// What the global leader must do after a step (each is committed or sent with the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Extend the active region's lease to `until_ms`.
    RenewLease {
        /// Region.
        region: String,
        /// New expiry (ms).
        until_ms: u64,
    },
    /// The active region became suspect: stop renewing its lease.
    Suspect {
        /// Region.
        region: String,
    },
    /// The suspect region recovered before its lease could be taken over.
    Recovered {
        /// Region.
        region: String,
    },
    /// Start a failover: fence `from`, promote `to` and run traffic hooks, all under `epoch`.
    StartFailover {
        /// Old active region.
        from: String,
        /// New active region.
        to: String,
        /// New epoch.
        epoch: u64,
        /// Expected data loss (lag of `to`, ms).
        expected_rpo_ms: u64,
    },
    /// The new region confirmed its promotion: it is active and leased.
    CompleteFailover {
        /// New active region.
        region: String,
        /// Its epoch.
        epoch: u64,
    },
    /// A failover is needed but refused; the reason says why (shown in status and audit).
    Blocked {
        /// Why.
        reason: String,
    },
}

/// Advances the record by one observation at `now_ms`. Deterministic: the same inputs give the
/// same outputs.
pub fn step(
    rec: &mut ControlRecord,
    views: &[RegionView],
    now_ms: u64,
    policy: &Policy,
) -> Vec<Action> {
    let mut out = Vec::new();
    let view = |r: &str| views.iter().find(|v| v.region == r);
    match rec.phase.clone() {
        Phase::Active { region } => {
            let healthy = view(&region).is_some_and(|v| v.healthy);
            if healthy {
                rec.last_healthy_ms = now_ms;
                let until = now_ms + policy.lease_ms;
                if until > rec.lease_expiry_ms {
                    rec.lease_expiry_ms = until;
                }
                rec.lease_holder = Some(region.clone());
                out.push(Action::RenewLease {
                    region,
                    until_ms: rec.lease_expiry_ms,
                });
            } else if now_ms.saturating_sub(rec.last_healthy_ms) >= policy.detection_timeout_ms {
                rec.phase = Phase::Suspect {
                    region: region.clone(),
                    since_ms: rec.last_healthy_ms,
                };
                out.push(Action::Suspect { region });
            }
        }
        Phase::Suspect { region, .. } => {
            if view(&region).is_some_and(|v| v.healthy) {
                rec.last_healthy_ms = now_ms;
                rec.phase = Phase::Active {
                    region: region.clone(),
                };
                out.push(Action::Recovered {
                    region: region.clone(),
                });
                // It may renew only if its lease has not lapsed: a lapsed lease is taken again
                // from scratch, which is the same as renewing from now.
                let until = now_ms + policy.lease_ms;
                rec.lease_expiry_ms = rec.lease_expiry_ms.max(until);
                rec.lease_holder = Some(region.clone());
                out.push(Action::RenewLease {
                    region,
                    until_ms: rec.lease_expiry_ms,
                });
                return out;
            }
            if !policy.automatic {
                out.push(Action::Blocked {
                    reason: format!(
                        "{region} is lost but automatic failover is off: use `lifeboat switchover`"
                    ),
                });
                return out;
            }
            if now_ms < rec.lease_expiry_ms + policy.max_clock_drift_ms {
                return out; // wait until the old lease has surely expired (rule 1)
            }
            start_failover(rec, views, &region, now_ms, policy, &mut out);
        }
        Phase::FailingOver { to, .. } => {
            let target = view(&to);
            if target.is_some_and(|v| v.healthy && v.promoted_epoch < rec.epoch) {
                rec.last_healthy_ms = now_ms;
            } else if target.is_none_or(|v| v.promoted_epoch < rec.epoch)
                && now_ms.saturating_sub(rec.last_healthy_ms) >= policy.detection_timeout_ms
            {
                // The target was lost before it confirmed its promotion. It never held a lease
                // (granted only once active) and the old region's lease expired before this
                // failover started, so no region can hold one: fail over again, to another
                // region, under a new epoch (subject to the same interval and RPO rules).
                if !policy.automatic {
                    out.push(Action::Blocked {
                        reason: format!(
                            "failover target {to} is lost but automatic failover is off: use `lifeboat switchover`"
                        ),
                    });
                    return out;
                }
                // Defensive: a new leader assumes a lease until its start + lease_ms (see
                // `lease::on_became_leader`), in case an uncommitted completion was granted.
                if now_ms < rec.lease_expiry_ms + policy.max_clock_drift_ms {
                    return out;
                }
                start_failover(rec, views, &to, now_ms, policy, &mut out);
                return out;
            }
            if target.is_some_and(|v| v.promoted_epoch >= rec.epoch) {
                rec.phase = Phase::Active { region: to.clone() };
                rec.last_healthy_ms = now_ms;
                rec.lease_holder = Some(to.clone());
                rec.lease_expiry_ms = now_ms + policy.lease_ms;
                out.push(Action::CompleteFailover {
                    region: to.clone(),
                    epoch: rec.epoch,
                });
                out.push(Action::RenewLease {
                    region: to,
                    until_ms: rec.lease_expiry_ms,
                });
            }
        }
    }
    out
}

/// Moves the record to `FailingOver(lost → best candidate, epoch + 1)`, or explains in a
/// `Blocked` action why not (minimum interval since the last change, no healthy candidate, RPO
/// budget). The caller has checked that no region can still hold a lease.
fn start_failover(
    rec: &mut ControlRecord,
    views: &[RegionView],
    region: &str,
    now_ms: u64,
    policy: &Policy,
    out: &mut Vec<Action>,
) {
    if let Some(last) = rec.last_change_ms {
        if now_ms < last + policy.min_failover_interval_ms {
            out.push(Action::Blocked {
                reason: format!(
                    "last change of active region {} ms ago; minimum interval is {} ms",
                    now_ms.saturating_sub(last),
                    policy.min_failover_interval_ms
                ),
            });
            return;
        }
    }
    // Candidates: healthy regions other than the lost one, in topology order (views
    // are given in that order), lowest lag first.
    let mut candidates: Vec<&RegionView> = views
        .iter()
        .filter(|v| v.region != region && v.healthy)
        .collect();
    candidates.sort_by_key(|v| v.lag_ms);
    let target = match policy.mode {
        FailoverMode::ConsistencyFirst => {
            candidates.iter().find(|v| v.lag_ms <= policy.rpo_budget_ms)
        }
        FailoverMode::AvailabilityFirst => candidates.first(),
    };
    match target {
        None => out.push(Action::Blocked {
            reason: if candidates.is_empty() {
                "no healthy region to fail over to".to_string()
            } else {
                format!(
                    "every healthy region lags more than the RPO budget of {} ms (best: {} at {} ms); policy is consistency-first",
                    policy.rpo_budget_ms, candidates[0].region, candidates[0].lag_ms
                )
            },
        }),
        Some(t) => {
            rec.epoch += 1;
            rec.lease_holder = None;
            rec.last_change_ms = Some(now_ms);
            // The target is healthy now: its loss during the failover is timed from here.
            rec.last_healthy_ms = now_ms;
            rec.phase = Phase::FailingOver {
                from: region.to_string(),
                to: t.region.clone(),
                started_ms: now_ms,
            };
            out.push(Action::StartFailover {
                from: region.to_string(),
                to: t.region.clone(),
                epoch: rec.epoch,
                expected_rpo_ms: t.lag_ms,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn views(a: (bool, u64), b: (bool, u64), promoted_b: u64) -> Vec<RegionView> {
        vec![
            RegionView {
                region: "a".into(),
                healthy: a.0,
                lag_ms: a.1,
                promoted_epoch: 0,
            },
            RegionView {
                region: "b".into(),
                healthy: b.0,
                lag_ms: b.1,
                promoted_epoch: promoted_b,
            },
        ]
    }

    #[test]
    fn standby_rpo_counts_acknowledged_changes_not_silence() {
        let p = Policy::default();
        let gone = |degraded| {
            Some(ActiveProgress {
                report_age_ms: 60_000,
                fresh: false,
                sync_degraded: degraded,
            })
        };
        let alive = Some(ActiveProgress {
            report_age_ms: 50,
            fresh: true,
            sync_degraded: false,
        });
        // Reachable active region: what the standby measures.
        assert_eq!(standby_rpo_ms(true, alive, 10, 10, 120, None, &p), 120);
        assert_eq!(standby_rpo_ms(true, None, 10, 10, 120, None, &p), 120);
        // Lost, synchronous: the most advanced standby loses nothing, however long the silence.
        assert_eq!(
            standby_rpo_ms(true, gone(false), 10, 10, 60_000, None, &p),
            0
        );
        // ... a standby behind another one may.
        assert_eq!(
            standby_rpo_ms(true, gone(false), 9, 10, 60_000, Some(30), &p),
            30 + 1750
        );
        // Degraded or asynchronous: lag at the last contact plus at most lease + drift.
        assert_eq!(
            standby_rpo_ms(true, gone(true), 10, 10, 60_000, Some(0), &p),
            1750
        );
        assert_eq!(
            standby_rpo_ms(false, gone(false), 10, 10, 60_000, Some(200), &p),
            1950
        );
        let recent = Some(ActiveProgress {
            report_age_ms: 300,
            fresh: false,
            sync_degraded: false,
        });
        assert_eq!(standby_rpo_ms(false, recent, 10, 10, 900, None, &p), 1200);
        // A global leader elected after the loss never heard from the active region: the
        // committed record decides. Not degraded: nothing lost; degraded: lease + drift.
        let never = |degraded| {
            Some(ActiveProgress {
                report_age_ms: u64::MAX,
                fresh: false,
                sync_degraded: degraded,
            })
        };
        assert_eq!(
            standby_rpo_ms(true, never(false), 10, 10, 3567, None, &p),
            0
        );
        assert_eq!(
            standby_rpo_ms(true, never(true), 10, 10, 3567, None, &p),
            3567 + 1750
        );
    }

    #[test]
    fn two_regions_without_witness_refuse_automatic_failover() {
        let t = Topology {
            regions: vec!["a".into(), "b".into()],
            witness: false,
        };
        let e = t.check().unwrap_err();
        assert!(e.to_string().contains("witness"), "{e}");
        assert!(Topology {
            witness: true,
            ..t.clone()
        }
        .check()
        .is_ok());
        assert!(Topology {
            regions: vec!["a".into(), "b".into(), "c".into()],
            witness: false
        }
        .check()
        .is_ok());
    }

    #[test]
    fn region_loss_fails_over_only_after_the_lease_surely_expired() {
        let p = Policy::default();
        let mut r = ControlRecord::new("a", 0, &p);
        step(&mut r, &views((true, 0), (true, 0), 0), 500, &p);
        assert_eq!(r.lease_expiry_ms, 2000);
        // A lost at t=500: suspect after the detection timeout.
        assert!(step(&mut r, &views((false, 0), (true, 0), 0), 1000, &p).is_empty());
        let a = step(&mut r, &views((false, 0), (true, 0), 0), 1500, &p);
        assert_eq!(a, vec![Action::Suspect { region: "a".into() }]);
        // Lease expiry 2000 + drift 250: nothing before 2250.
        assert!(step(&mut r, &views((false, 0), (true, 0), 0), 2249, &p).is_empty());
        let a = step(&mut r, &views((false, 0), (true, 0), 0), 2250, &p);
        assert!(
            matches!(&a[0], Action::StartFailover { to, epoch: 2, .. } if to == "b"),
            "{a:?}"
        );
        assert_eq!(r.lease_holder, None);
        // B confirms promotion under epoch 2: active and leased.
        let a = step(&mut r, &views((false, 0), (true, 0), 2), 2900, &p);
        assert_eq!(
            a[0],
            Action::CompleteFailover {
                region: "b".into(),
                epoch: 2
            }
        );
        assert_eq!(r.active_region(), "b");
        assert_eq!(r.epoch, 2);
    }

    #[test]
    fn a_short_blip_does_not_fail_over() {
        let p = Policy::default();
        let mut r = ControlRecord::new("a", 0, &p);
        step(&mut r, &views((false, 0), (true, 0), 0), 1200, &p); // suspect (no renewal since 0)
        assert!(matches!(r.phase, Phase::Suspect { .. }));
        let a = step(&mut r, &views((true, 0), (true, 0), 0), 1500, &p);
        assert_eq!(a[0], Action::Recovered { region: "a".into() });
        assert_eq!(r.epoch, 1);
        assert_eq!(r.active_region(), "a");
    }

    #[test]
    fn consistency_first_blocks_a_lagging_target_availability_first_does_not() {
        let mut p = Policy {
            rpo_budget_ms: 100,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        for t in [1000, 3000] {
            step(&mut r, &views((false, 0), (true, 5000), 0), t, &p);
        }
        let a = step(&mut r, &views((false, 0), (true, 5000), 0), 3100, &p);
        assert!(
            matches!(&a[0], Action::Blocked { reason } if reason.contains("RPO budget")),
            "{a:?}"
        );
        assert_eq!(r.epoch, 1);
        p.mode = FailoverMode::AvailabilityFirst;
        let a = step(&mut r, &views((false, 0), (true, 5000), 0), 3200, &p);
        assert!(
            matches!(
                &a[0],
                Action::StartFailover {
                    expected_rpo_ms: 5000,
                    ..
                }
            ),
            "{a:?}"
        );
    }

    #[test]
    fn flapping_regions_do_not_ping_pong() {
        let p = Policy {
            min_failover_interval_ms: 30_000,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        let mut t = 0;
        let mut changes = 0;
        // A fails, B takes over, then B fails while A is back: blocked by the minimum interval.
        for _ in 0..200 {
            t += 100;
            let (ha, hb) = if r.active_region() == "a" {
                (false, true)
            } else {
                (true, false)
            };
            let v = vec![
                RegionView {
                    region: "a".into(),
                    healthy: ha,
                    lag_ms: 0,
                    promoted_epoch: r.epoch,
                },
                RegionView {
                    region: "b".into(),
                    healthy: hb,
                    lag_ms: 0,
                    promoted_epoch: r.epoch,
                },
            ];
            for a in step(&mut r, &v, t, &p) {
                if matches!(a, Action::StartFailover { .. }) {
                    changes += 1;
                }
            }
        }
        assert_eq!(
            changes, 1,
            "20 s of flapping must cause exactly one failover"
        );
    }

    /// Seeded random runs: random health, lag, promotion confirmations and time steps; after
    /// every step check rule 1 (at most one region possibly leased, by any clock within the
    /// drift bound) and that the epoch only grows, by one per change of active region.
    #[test]
    fn seeded_random_runs_keep_the_safety_rules() {
        let seeds: u64 = std::env::var("LIFEBOAT_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2000);
        for seed in 0..seeds {
            let mut rng = StdRng::seed_from_u64(seed);
            let p = Policy {
                detection_timeout_ms: rng.random_range(200..2000),
                lease_ms: rng.random_range(500..3000),
                max_clock_drift_ms: rng.random_range(0..500),
                rpo_budget_ms: rng.random_range(0..1000),
                mode: if rng.random_bool(0.5) {
                    FailoverMode::ConsistencyFirst
                } else {
                    FailoverMode::AvailabilityFirst
                },
                min_failover_interval_ms: rng.random_range(0..10_000),
                automatic: true,
                ..Policy::default()
            };
            let regions = ["a", "b", "c"];
            let mut r = ControlRecord::new("a", 0, &p);
            let mut t = 0u64;
            // Leases each region believes it holds: (region, expiry by the leader's clock).
            let mut granted: Vec<(String, u64)> = vec![("a".into(), r.lease_expiry_ms)];
            let mut active_changes = 0;
            let mut prev_active = r.active_region().to_string();
            let mut prev_epoch = r.epoch;
            for _ in 0..300 {
                t += rng.random_range(1..400);
                let v: Vec<RegionView> = regions
                    .iter()
                    .map(|name| RegionView {
                        region: name.to_string(),
                        healthy: rng.random_bool(0.7),
                        lag_ms: rng.random_range(0..2000),
                        promoted_epoch: if rng.random_bool(0.5) { r.epoch } else { 0 },
                    })
                    .collect();
                for a in step(&mut r, &v, t, &p) {
                    if let Action::RenewLease { region, until_ms } = &a {
                        granted.push((region.clone(), *until_ms));
                    }
                    if let Action::StartFailover {
                        to,
                        expected_rpo_ms,
                        ..
                    } = &a
                    {
                        if p.mode == FailoverMode::ConsistencyFirst {
                            assert!(
                                *expected_rpo_ms <= p.rpo_budget_ms,
                                "seed {seed}: failover to {to} beyond RPO budget"
                            );
                        }
                    }
                }
                // Rule 1: at any instant, the regions that may still believe in a lease (any
                // clock within +-drift) are at most one.
                let holders: std::collections::BTreeSet<&str> = granted
                    .iter()
                    .filter(|(_, exp)| t < exp + p.max_clock_drift_ms)
                    .map(|(reg, _)| reg.as_str())
                    .collect();
                assert!(holders.len() <= 1, "seed {seed} t={t}: leases held by {holders:?} (replay: LIFEBOAT_SIM_SEEDS, seed {seed})");
                if r.active_region() != prev_active {
                    active_changes += 1;
                    assert_eq!(
                        r.epoch,
                        prev_epoch + 1,
                        "seed {seed}: epoch must grow by one per change"
                    );
                    prev_active = r.active_region().to_string();
                } else {
                    assert_eq!(
                        r.epoch, prev_epoch,
                        "seed {seed}: epoch changed without a change of region"
                    );
                }
                prev_epoch = r.epoch;
            }
            assert!(active_changes <= 300);
        }
    }
    #[test]
    fn a_target_lost_before_confirming_is_replaced_after_the_minimum_interval() {
        let p = Policy {
            min_failover_interval_ms: 5000,
            lease_ms: 2000,
            ..Default::default()
        };
        let mut r = ControlRecord::new("a", 0, &p);
        // A lost: failover to B at 2250 (lease 2000 + drift 250).
        for t in (100..=2300).step_by(100) {
            step(&mut r, &views((false, 0), (true, 0), 0), t, &p);
        }
        assert!(matches!(&r.phase, Phase::FailingOver { to, .. } if to == "b"));
        assert_eq!((r.epoch, r.last_change_ms), (2, Some(2300)));
        // B is lost before confirming; A is back. Detection timeout, then the minimum interval.
        let a = step(&mut r, &views((true, 0), (false, 0), 0), 3200, &p);
        assert!(a.is_empty(), "{a:?}");
        let a = step(&mut r, &views((true, 0), (false, 0), 0), 3300, &p);
        assert!(
            matches!(&a[0], Action::Blocked { reason } if reason.contains("minimum interval")),
            "{a:?}"
        );
        assert_eq!(r.epoch, 2);
        let a = step(&mut r, &views((true, 0), (false, 0), 0), 7300, &p);
        assert_eq!(
            a,
            vec![Action::StartFailover {
                from: "b".into(),
                to: "a".into(),
                epoch: 3,
                expected_rpo_ms: 0
            }]
        );
        assert_eq!(r.lease_holder, None);
        // A healthy target that is merely slow to confirm is not replaced.
        let mut r2 = r.clone();
        for t in (7400..20_000).step_by(100) {
            assert!(step(&mut r2, &views((true, 0), (true, 0), 0), t, &p).is_empty());
        }
        assert_eq!(r2.epoch, 3);
    }
}
