//! This region's role as the write path sees it: active or standby, the epoch, whether the
//! promotion of the current epoch finished, and the lease ([`LeaseHolder`]). Intake asks
//! [`Role::write_gate`] before accepting and again before acknowledging a batch.

use std::time::{SystemTime, UNIX_EPOCH};

use lifeboat_common::wire_error::{ErrorCode, WireError};
use parking_lot::Mutex;
use tonic::Status;

use crate::control::lease::LeaseHolder;

/// Message of the `FAILED_PRECONDITION` a standby region answers to `PushChanges`.
pub const STANDBY_REFUSAL: &str = "standby region: writes go to the active region";

/// Wall clock in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the control path has told this region.
#[derive(Debug, Clone)]
pub struct RoleView {
    /// Active region (empty until known).
    pub active_region: String,
    /// Current epoch (fencing token).
    pub epoch: u64,
    /// Highest epoch whose promotion this region completed (it may take writes under it).
    pub promoted_epoch: u64,
    /// Lease of this region (meaningful only while active).
    pub lease: LeaseHolder,
}

/// Role shared by intake, admin, replication and the control runtime.
pub struct Role {
    region: String,
    /// `Some(standby)`: static mode without a global group (`[replication] upstream` decides
    /// and the epoch comes from the config); `None`: the global group decides.
    static_standby: Option<bool>,
    inner: Mutex<RoleView>,
}

impl Role {
    /// Static role (no `[global]` section): standby iff `[replication] upstream` is set.
    pub fn fixed(region: &str, epoch: u64, standby: bool) -> Self {
        Role {
            region: region.into(),
            static_standby: Some(standby),
            inner: Mutex::new(RoleView {
                active_region: if standby {
                    String::new()
                } else {
                    region.into()
                },
                epoch,
                promoted_epoch: epoch,
                lease: LeaseHolder::new(),
            }),
        }
    }

    /// Role decided by the global group; nothing is writable until the record is known and a
    /// lease is granted.
    pub fn global(region: &str) -> Self {
        Role {
            region: region.into(),
            static_standby: None,
            inner: Mutex::new(RoleView {
                active_region: String::new(),
                epoch: 0,
                promoted_epoch: 0,
                lease: LeaseHolder::new(),
            }),
        }
    }

    /// This region's name.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Whether the global group decides the role.
    pub fn is_global(&self) -> bool {
        self.static_standby.is_none()
    }

    /// A copy of the current view.
    pub fn view(&self) -> RoleView {
        self.inner.lock().clone()
    }

    /// Current epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// True when another region is active (agent pushes are refused here).
    pub fn is_standby(&self) -> bool {
        match self.static_standby {
            Some(s) => s,
            None => {
                let v = self.inner.lock();
                !v.active_region.is_empty() && v.active_region != self.region
            }
        }
    }

    /// Updates what the committed control record says.
    pub fn set_record(&self, active_region: &str, epoch: u64) {
        let mut v = self.inner.lock();
        if epoch < v.epoch {
            return;
        }
        v.active_region = active_region.into();
        v.epoch = epoch;
    }

    /// Marks the promotion of `epoch` done: writes are accepted under it (with a lease).
    pub fn set_promoted(&self, epoch: u64) {
        let mut v = self.inner.lock();
        v.promoted_epoch = v.promoted_epoch.max(epoch);
    }

    /// Applies a lease grant for a renewal sent at `sent_ms` (local clock).
    pub fn lease_granted(&self, sent_ms: u64, lease_ms: u64, epoch: u64) {
        self.inner.lock().lease.on_grant(sent_ms, lease_ms, epoch);
    }

    /// Drops the lease at once (refused renewal, or no longer active).
    pub fn lease_refused(&self) {
        self.inner.lock().lease.on_refused();
    }

    /// May this region take a write now? Returns the epoch to stamp it with.
    ///
    /// Errors: `FAILED_PRECONDITION` coded [`ErrorCode::StandbyRegion`] (the active region and
    /// epoch when known) when another region is active;
    /// `UNAVAILABLE` while the record is unknown, the promotion of the epoch is running, or the
    /// lease is not valid (the agent retries; a region that lost its lease never acknowledges).
    pub fn write_gate(&self) -> Result<u64, Status> {
        if let Some(standby) = self.static_standby {
            if standby {
                return Err(WireError::new(ErrorCode::StandbyRegion).status(STANDBY_REFUSAL));
            }
            return Ok(self.inner.lock().epoch);
        }
        let v = self.inner.lock();
        if v.active_region.is_empty() {
            return Err(Status::unavailable(
                "control record not known yet: waiting for the global group",
            ));
        }
        if v.active_region != self.region {
            return Err(WireError::new(ErrorCode::StandbyRegion)
                .region(v.active_region.clone())
                .epoch(v.epoch)
                .status(format!(
                    "{STANDBY_REFUSAL} ({} is active at epoch {})",
                    v.active_region, v.epoch
                )));
        }
        if v.promoted_epoch < v.epoch {
            return Err(Status::unavailable(format!(
                "promotion of epoch {} in progress",
                v.epoch
            )));
        }
        if !v.lease.valid(now_ms(), v.epoch) {
            return Err(Status::unavailable(format!(
                "no valid lease for epoch {}: this region may not take writes (fenced until the global group renews its lease)",
                v.epoch
            )));
        }
        Ok(v.epoch)
    }
}
