//! The region loop (regional leader only): follows the committed record into [`Role`], renews
//! the lease while its region is active (carrying the synchronous replication state), promotes
//! its region when the record names it, and copies the active region's catalog while standby;
//! and this node's [`RegionReport`].

use super::*;

impl ControlRuntime {
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
            pending_audit: pending.iter().map(Into::into).collect(),
        }
    }

    pub(super) async fn region_tick(self: &Arc<Self>) {
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
    pub(super) async fn renew(&self, epoch: u64, sync_degraded: bool) -> Option<bool> {
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
                    call_renew(&self.channels, &addr, req.clone(), RPC_TIMEOUT).await,
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
    pub(super) async fn renew_via_others(
        &self,
        leader: u64,
        req: &RenewRequest,
    ) -> Option<RenewReply> {
        let members = self.store.state().members_or(&self.cfg.members);
        let mut set = tokio::task::JoinSet::new();
        for m in members
            .iter()
            .filter(|m| m.id != self.node_id && m.id != leader && m.region != self.region)
        {
            let (channels, addr, req) = (self.channels.clone(), m.addr.clone(), req.clone());
            set.spawn(async move { call_renew(&channels, &addr, req, RPC_TIMEOUT).await.ok() });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                return Some(r);
            }
        }
        None
    }

    /// Queues audit entries for database role outcomes at `epoch` reported by this region's
    /// agents and not audited yet (late promotions, old primaries fenced or following).
    pub(super) fn audit_db_outcomes(
        &self,
        reg: &Regional,
        epoch: u64,
        active: bool,
        committed: &[AuditEntry],
    ) {
        let all = crate::control::dbs::outcomes(&reg.agents);
        if all.is_empty() {
            return;
        }
        let mut l = self.local.lock();
        let entries =
            crate::control::dbs::new_entries(&all, epoch, active, &mut l.db_audited, committed);
        for e in &entries {
            tracing::warn!(epoch, actor = %e.actor, action = %e.action, outcome = %e.outcome, detail = %e.detail, "database role audited");
        }
        l.pending_audit.extend(entries);
    }

    pub(super) fn start_promotion(self: &Arc<Self>, epoch: u64, previous: String, decided_ms: u64) {
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
                let w = crate::control::dbs::await_promotion(
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

    pub(super) fn ensure_replicating(&self, reg: &Regional, active: &str) {
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

    pub(super) fn stop_replicating(&self) {
        if let Some((from, h)) = self.local.lock().replicating_from.take() {
            tracing::info!(%from, "replication stopped");
            h.abort();
            if let Some(reg) = &self.regional {
                reg.replication.stop();
            }
        }
    }
}
