//! The grantor side of lease renewals (global leader only): quorum-confirmed leadership, no
//! grant while a decision is pending, and the active region's synchronous replication state
//! recorded before it may acknowledge alone (docs/failover.md).

use super::*;

impl ControlRuntime {
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
    pub(super) async fn record_sync_state(&self, req: &RenewRequest) -> bool {
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
}
