//! Leases of the active region (DESIGN.md section 5, rule 1), as pure logic: times are inputs
//! (ms). The holder (the active region's regional leader) measures its lease from the moment it
//! *sent* the renewal, by its own clock; the grantor (the global leader) measures it from when it
//! granted, by its clock, and waits `lease + max clock drift` past its expiry before another
//! region may become active.

use crate::failover::{ControlRecord, Phase, Policy};

/// Holder side: kept by the regional leader of the active region (local clock, ms).
#[derive(Debug, Clone, Default)]
pub struct LeaseHolder {
    valid_until: Option<u64>,
    epoch: u64,
}

impl LeaseHolder {
    /// No lease held.
    pub fn new() -> Self {
        Self::default()
    }

    /// A renewal sent at `sent_local_ms` was granted for `lease_ms` under `epoch`.
    pub fn on_grant(&mut self, sent_local_ms: u64, lease_ms: u64, epoch: u64) {
        if epoch < self.epoch {
            return;
        }
        let until = sent_local_ms + lease_ms;
        if epoch > self.epoch {
            self.epoch = epoch;
            self.valid_until = Some(until);
        } else {
            self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
        }
    }

    /// The grantor refused: the lease is dropped at once.
    pub fn on_refused(&mut self) {
        self.valid_until = None;
    }

    /// May this region take writes under `epoch` at `now_local_ms`?
    pub fn valid(&self, now_local_ms: u64, epoch: u64) -> bool {
        epoch == self.epoch && self.valid_until.is_some_and(|v| now_local_ms < v)
    }

    /// Local expiry, if a lease is held.
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
    /// Another region is active.
    #[error("lease refused: {region} is not the active region ({active} is)")]
    NotActive {
        /// Asking region.
        region: String,
        /// Active region.
        active: String,
    },
    /// The epoch moved on.
    #[error("lease refused: epoch {asked} is stale (current {current})")]
    StaleEpoch {
        /// Asked epoch.
        asked: u64,
        /// Current epoch.
        current: u64,
    },
    /// The region is suspect (or being failed over from).
    #[error("lease refused: {region} is suspect; its lease is not renewed")]
    Suspect {
        /// Region.
        region: String,
    },
}

/// Grantor side: grants a renewal asked by `region` for `epoch` at `now_ms`.
///
/// Errors: [`LeaseRefused`] unless the record is `Active { region }` at `epoch`.
pub fn grant(
    rec: &mut ControlRecord,
    region: &str,
    epoch: u64,
    now_ms: u64,
    policy: &Policy,
) -> Result<u64, LeaseRefused> {
    match &rec.phase {
        Phase::Active { region: a } if a == region => {}
        Phase::Suspect { region: a, .. } if a == region => {
            return Err(LeaseRefused::Suspect {
                region: region.into(),
            })
        }
        _ => {
            return Err(LeaseRefused::NotActive {
                region: region.into(),
                active: rec.active_region().into(),
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
    rec.lease_expiry_ms = rec.lease_expiry_ms.max(now_ms + policy.lease_ms);
    rec.last_healthy_ms = now_ms;
    Ok(policy.lease_ms)
}

/// A node became global leader at `now_ms` with the committed `rec`: assume the previous leader
/// may have granted a lease until `now_ms + lease_ms`.
pub fn on_became_leader(rec: &mut ControlRecord, now_ms: u64, policy: &Policy) {
    rec.lease_expiry_ms = rec.lease_expiry_ms.max(now_ms + policy.lease_ms);
    match &rec.phase {
        Phase::Active { region } | Phase::Suspect { region, .. } => {
            rec.lease_holder = Some(region.clone())
        }
        Phase::FailingOver { .. } => {}
    }
    rec.last_healthy_ms = now_ms;
}
