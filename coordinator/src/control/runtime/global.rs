//! The global leader loop: polls every region for a report, keeps the working control record
//! in memory, runs [`failover::step`] each tick and commits its decisions; drives switchovers
//! and automatic failback; observes regions through other coordinators.

use super::*;
use lifeboat_proto::control_service_client::ControlServiceClient;

impl ControlRuntime {
    /// One tick of the global leader loop (see the module docs); returns at once on other nodes.
    pub(super) async fn global_tick(&self) {
        if !self.is_global_leader() {
            *self.leader.lock() = None;
            return;
        }
        let state = self.store.state();
        let Some(committed) = state.record.clone() else {
            self.init_record().await;
            return;
        };
        self.ensure_leader_work(&committed, &state, now_ms());
        let reports = self
            .poll_reports(&state.members_or(&self.cfg.members))
            .await;
        let now = now_ms();
        let mut commits: Vec<ControlCommand> = Vec::new();
        {
            let mut guard = self.leader.lock();
            let Some(w) = guard.as_mut() else { return };
            for r in reports {
                if !r.pending_audit.is_empty() {
                    commits.push(ControlCommand::Audit {
                        entries: r.pending_audit.iter().cloned().map(Into::into).collect(),
                    });
                }
                w.reports.insert(r.region.clone(), (now, r));
            }
            let policy = state.policy.clone();
            let views = self.region_views(w, &state, now);
            w.views = views.clone();
            if w.switchover.is_none() {
                self.consider_failback(w, &views, now, &policy);
            }
            if let Some(sw) = w.switchover.clone() {
                self.drive_switchover(w, &sw, &views, now, &policy, &mut commits);
            } else {
                self.step_failover(w, &views, now, &policy, &mut commits);
            }
            // Set under the same lock that changed the in-memory record: no renewal is granted
            // under a decision before it is committed.
            if commits
                .iter()
                .any(|c| matches!(c, ControlCommand::Decide { .. }))
            {
                w.pending = true;
            }
        }
        self.commit_decisions(commits).await;
    }

    /// Proposes the first control record (from this node's `[global]` config; the first
    /// proposal committed wins). Automatic failover is off when the topology cannot decide
    /// safely (see [`crate::control::failover::Topology::check`]).
    async fn init_record(&self) {
        let topo = self.cfg.topology();
        let mut policy = self.cfg.policy.clone();
        if let Err(e) = topo.check() {
            if policy.automatic {
                tracing::error!(reason = %e, "automatic failover disabled");
            }
            policy.automatic = false;
        }
        let rec = ControlRecord::new(&self.cfg.initial_active, now_ms(), &policy);
        match self
            .propose(ControlCommand::Init {
                record: rec,
                policy,
                regions: topo.regions,
                witness: topo.witness,
                members: self.cfg.members.clone(),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(active = %self.cfg.initial_active, "control record created")
            }
            Err(e) => tracing::warn!(error = %e, "creating the control record failed"),
        }
    }

    /// Starts (or restarts) the in-memory work of a global leader: on a new term, or when the
    /// committed epoch moved on without this node's switchover. Keeps what it knew of the
    /// regions (reports, lag at last contact) from an earlier term of its own.
    fn ensure_leader_work(&self, committed: &ControlRecord, state: &ControlState, now: u64) {
        let term = self.global_term();
        let mut l = self.leader.lock();
        let stale = l.as_ref().is_some_and(|w| {
            w.term != term || (w.committed_epoch != committed.epoch && w.switchover.is_none())
        });
        if l.is_none() || stale {
            let mut rec = committed.clone();
            lease::on_became_leader(&mut rec, now, &state.policy);
            let mut last_renew = HashMap::new();
            last_renew.insert(rec.active_region().to_string(), now);
            let prev = l.take();
            tracing::info!(epoch = rec.epoch, active = %rec.active_region(), "global leader: control loop starts");
            *l = Some(LeaderWork {
                term,
                pending: false,
                failover_start_ms: prev.as_ref().and_then(|p| p.failover_start_ms),
                rec,
                committed_epoch: committed.epoch,
                last_renew,
                lag_at_contact: prev
                    .as_ref()
                    .map(|p| p.lag_at_contact.clone())
                    .unwrap_or_default(),
                reports: prev.map(|p| p.reports).unwrap_or_default(),
                blocked: None,
                switchover: None,
                home_ready_since: None,
                views: Vec::new(),
            });
        }
    }

    /// What this leader knows of each region for [`failover::step`]: health (fresh report of
    /// its regional leader, plus the active region's renewals) and expected RPO
    /// ([`failover::standby_rpo_ms`]: acknowledged changes, not silence). Also records each
    /// standby's lag while the active region is heard from.
    fn region_views(&self, w: &mut LeaderWork, state: &ControlState, now: u64) -> Vec<RegionView> {
        let policy = state.policy.clone();
        let active = w.rec.active_region().to_string();
        // Expected RPO of each standby (acknowledged changes, not silence): see
        // `failover::standby_rpo_ms`.
        let epoch_now = w.rec.epoch;
        // Whether it may have acknowledged alone is committed (`intake::SyncAck`): known
        // to every global leader, also one that never heard from the active region.
        let recorded_degraded = state.sync_degraded_at(&active, epoch_now);
        let active_progress = Some(match w.reports.get(&active) {
            Some((t, r)) => {
                let age = now.saturating_sub(*t);
                failover::ActiveProgress {
                    report_age_ms: age,
                    fresh: age <= policy.detection_timeout_ms && r.regional_leader,
                    sync_degraded: r.sync_degraded || recorded_degraded,
                }
            }
            None => failover::ActiveProgress {
                report_age_ms: u64::MAX,
                fresh: false,
                sync_degraded: recorded_degraded,
            },
        });
        let best_upstream_seq = w
            .reports
            .iter()
            .filter(|(region, (_, r))| **region != active && r.epoch == epoch_now)
            .map(|(_, (_, r))| r.upstream_seq)
            .max()
            .unwrap_or(0);
        if active_progress.is_some_and(|a| a.fresh) {
            let measured: Vec<(String, u64)> = w
                .reports
                .iter()
                .filter(|(region, _)| **region != active)
                .map(|(region, (_, r))| (region.clone(), r.lag_ms))
                .collect();
            w.lag_at_contact = measured.into_iter().collect();
        }
        state
            .regions
            .iter()
            .map(|region| {
                let fresh = w
                    .reports
                    .get(region)
                    .filter(|(t, _)| now.saturating_sub(*t) <= policy.detection_timeout_ms);
                let mut healthy = fresh.is_some_and(|(_, r)| r.regional_leader && r.healthy);
                if *region == active
                    && matches!(w.rec.phase, Phase::Active { .. } | Phase::Suspect { .. })
                {
                    // The active region's renewals are its heartbeat to the global group.
                    let renewed = w.last_renew.get(region).copied().unwrap_or(0);
                    healthy &= now.saturating_sub(renewed) <= policy.detection_timeout_ms;
                }
                let (lag_ms, promoted) = fresh
                    .map(|(_, r)| {
                        let rpo = failover::standby_rpo_ms(
                            self.cfg.synchronous,
                            active_progress,
                            r.upstream_seq,
                            best_upstream_seq,
                            r.lag_ms,
                            w.lag_at_contact.get(region).copied(),
                            &policy,
                        );
                        (rpo, r.promoted_epoch)
                    })
                    .unwrap_or((u64::MAX / 4, 0));
                RegionView {
                    region: region.clone(),
                    healthy,
                    lag_ms: if *region == active { 0 } else { lag_ms },
                    promoted_epoch: promoted,
                }
            })
            .collect()
    }

    /// Runs [`failover::step`] on the working record and turns its actions into audit entries
    /// and, when the record changed, one `Decide` command in `commits`.
    fn step_failover(
        &self,
        w: &mut LeaderWork,
        views: &[RegionView],
        now: u64,
        policy: &failover::Policy,
        commits: &mut Vec<ControlCommand>,
    ) {
        let before = w.rec.clone();
        let actions = failover::step(&mut w.rec, views, now, policy);
        let mut audit_entries = Vec::new();
        let mut decide = false;
        let mut previous = None;
        let mut rto = None;
        let actor = format!("global leader node {}", self.node_id);
        for a in actions {
            match a {
                Action::RenewLease { .. } => {}
                Action::Suspect { region } => {
                    decide = true;
                    w.blocked = None;
                    w.failover_start_ms = Some(before.last_healthy_ms);
                    let why = w
                        .reports
                        .get(&region)
                        .map(|(t, r)| {
                            let age = now.saturating_sub(*t);
                            if age > policy.detection_timeout_ms {
                                format!("no report for {age} ms")
                            } else if r.detail.is_empty() {
                                "no lease renewal".to_string()
                            } else {
                                r.detail.clone()
                            }
                        })
                        .unwrap_or_else(|| "never reported".into());
                    audit_entries.push(audit(
                        w.rec.epoch,
                        actor.clone(),
                        "suspect",
                        format!(
                            "{region} unhealthy for {} ms ({why}): lease renewals refused",
                            policy.detection_timeout_ms
                        ),
                        "started",
                    ));
                }
                Action::Recovered { region } => {
                    decide = true;
                    w.blocked = None;
                    w.failover_start_ms = None;
                    audit_entries.push(audit(
                        w.rec.epoch,
                        actor.clone(),
                        "recovered",
                        format!("{region} healthy again before its lease could be taken over"),
                        "ok",
                    ));
                }
                Action::StartFailover {
                    from,
                    to,
                    epoch,
                    expected_rpo_ms,
                } => {
                    decide = true;
                    previous = Some(from.clone());
                    w.blocked = None;
                    audit_entries.push(audit(epoch, actor.clone(), "failover", format!("{from} lost (lease expired + {} ms drift); promoting {to} at epoch {epoch}; expected RPO {expected_rpo_ms} ms; {from} fenced", policy.max_clock_drift_ms), "started"));
                    tracing::warn!(%from, %to, epoch, "failover started");
                }
                Action::CompleteFailover { region, epoch } => {
                    decide = true;
                    rto = w.failover_start_ms.take().map(|s| now.saturating_sub(s));
                    w.last_renew.insert(region.clone(), now);
                    audit_entries.push(audit(
                        epoch,
                        actor.clone(),
                        "completed",
                        format!(
                            "{region} active at epoch {epoch}; measured RTO {} ms",
                            rto.unwrap_or(0)
                        ),
                        "ok",
                    ));
                    tracing::warn!(%region, epoch, rto_ms = rto.unwrap_or(0), "failover completed");
                }
                Action::Blocked { reason } => {
                    // One audit entry per kind of refusal, not one per tick: the
                    // reasons carry changing figures (ms since the last change, lag).
                    let key =
                        |r: &str| -> String { r.chars().filter(|c| !c.is_ascii_digit()).collect() };
                    if w.blocked.as_deref().map(key) != Some(key(&reason)) {
                        commits.push(ControlCommand::Audit {
                            entries: vec![audit(
                                w.rec.epoch,
                                actor.clone(),
                                "blocked",
                                reason.clone(),
                                "refused",
                            )],
                        });
                        tracing::warn!(%reason, "failover refused");
                    }
                    w.blocked = Some(reason);
                }
            }
        }
        if decide {
            commits.push(ControlCommand::Decide {
                expect_epoch: w.committed_epoch,
                record: w.rec.clone(),
                previous_region: previous,
                rto_ms: rto,
                audit: audit_entries,
            });
        }
    }

    /// Commits `commits` in order. A refused decision (stale epoch) or a failed commit drops
    /// the working record: the next tick reloads it from the committed state.
    async fn commit_decisions(&self, commits: Vec<ControlCommand>) {
        for c in commits {
            let decide_epoch = match &c {
                ControlCommand::Decide { record, .. } => Some(record.epoch),
                _ => None,
            };
            match self.propose(c).await {
                Ok(true) => {
                    if let Some(e) = decide_epoch {
                        if let Some(w) = self.leader.lock().as_mut() {
                            w.committed_epoch = e;
                            w.pending = false;
                        }
                    }
                }
                Ok(false) => {
                    tracing::warn!(
                        "decision refused by the state machine (stale epoch): reloading the record"
                    );
                    *self.leader.lock() = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "committing a control decision failed");
                    *self.leader.lock() = None;
                }
            }
        }
    }

    /// Automatic failback ([`failover::Policy::automatic_failback`]): starts a planned
    /// switchover back to the preferred region once it has been healthy and caught up for
    /// `failback_stable_ms` and the minimum interval since the last change passed.
    pub(super) fn consider_failback(
        &self,
        w: &mut LeaderWork,
        views: &[RegionView],
        now: u64,
        policy: &failover::Policy,
    ) {
        let home = &self.cfg.initial_active;
        let away = match &w.rec.phase {
            Phase::Active { region } if region != home => region.clone(),
            _ => {
                w.home_ready_since = None;
                return;
            }
        };
        if !(policy.automatic && policy.automatic_failback) {
            return;
        }
        let ready = views
            .iter()
            .any(|v| v.region == *home && v.healthy && v.lag_ms == 0);
        if !ready {
            w.home_ready_since = None;
            return;
        }
        let since = *w.home_ready_since.get_or_insert(now);
        let last_change = w.rec.last_change_ms.unwrap_or(0);
        if now.saturating_sub(since) < policy.failback_stable_ms
            || now.saturating_sub(last_change) < policy.min_failover_interval_ms
        {
            return;
        }
        tracing::warn!(from = %away, to = %home, "automatic failback: fencing {away}");
        w.home_ready_since = None;
        w.switchover = Some(Switchover {
            from: away,
            to: home.clone(),
            actor: format!(
                "automatic failback (global leader node {}; {home} healthy and caught up for {} ms)",
                self.node_id,
                now.saturating_sub(since)
            ),
            started_ms: now,
            deadline_ms: now + 60_000,
            failback: true,
            expect_epoch: w.committed_epoch,
        });
    }

    pub(super) fn drive_switchover(
        &self,
        w: &mut LeaderWork,
        sw: &Switchover,
        views: &[RegionView],
        now: u64,
        policy: &failover::Policy,
        commits: &mut Vec<ControlCommand>,
    ) {
        let actor = sw.actor.clone();
        let what = if sw.failback {
            "failback"
        } else {
            "switchover"
        };
        if now > sw.deadline_ms {
            commits.push(ControlCommand::Audit {
                entries: vec![audit(
                    w.rec.epoch,
                    actor,
                    what,
                    format!(
                        "{} -> {}: {} did not catch up in time; {} stays active",
                        sw.from, sw.to, sw.to, sw.from
                    ),
                    "failed",
                )],
            });
            w.switchover = None;
            w.last_renew.insert(sw.from.clone(), now);
            return;
        }
        match w.rec.phase.clone() {
            Phase::Active { region } | Phase::Suspect { region, .. } if region == sw.from => {
                // Fenced: renewals of `from` are refused while a switchover is pending. Move on
                // once its lease surely expired or it reported that it holds none.
                let from_report = w.reports.get(&sw.from).map(|(_, r)| r.clone());
                let unleased = from_report
                    .as_ref()
                    .is_some_and(|r| r.regional_leader && !r.leased);
                let expired = now >= w.rec.lease_expiry_ms + policy.max_clock_drift_ms;
                if !(unleased || expired) {
                    return;
                }
                // Zero data loss: the target holds everything the old region committed.
                let from_last = from_report.map(|r| r.last_seq);
                let to_seq = w
                    .reports
                    .get(&sw.to)
                    .map(|(_, r)| r.upstream_seq)
                    .unwrap_or(0);
                let caught_up = match from_last {
                    Some(l) => to_seq >= l,
                    None => expired && views.iter().any(|v| v.region == sw.to && v.lag_ms == 0),
                };
                let to_healthy = views.iter().any(|v| v.region == sw.to && v.healthy);
                if !caught_up || !to_healthy {
                    return;
                }
                w.rec.epoch += 1;
                w.rec.lease_holder = None;
                w.rec.last_change_ms = Some(now);
                w.rec.phase = Phase::FailingOver {
                    from: sw.from.clone(),
                    to: sw.to.clone(),
                    started_ms: now,
                };
                w.failover_start_ms = Some(sw.started_ms);
                commits.push(ControlCommand::Decide {
                    // The order's epoch: refused by the state machine if it moved on.
                    expect_epoch: sw.expect_epoch,
                    record: w.rec.clone(),
                    previous_region: Some(sw.from.clone()),
                    rto_ms: None,
                    audit: vec![audit(
                        w.rec.epoch,
                        actor,
                        what,
                        format!(
                            "{} fenced and {} caught up (seq {to_seq}); promoting {} at epoch {}",
                            sw.from, sw.to, sw.to, w.rec.epoch
                        ),
                        "started",
                    )],
                });
            }
            Phase::FailingOver { to, .. } if to == sw.to => {
                if views
                    .iter()
                    .any(|v| v.region == sw.to && v.promoted_epoch >= w.rec.epoch)
                {
                    w.rec.phase = Phase::Active {
                        region: sw.to.clone(),
                    };
                    w.rec.last_healthy_ms = now;
                    w.rec.lease_holder = Some(sw.to.clone());
                    w.rec.lease_expiry_ms = now + policy.lease_ms;
                    w.last_renew.insert(sw.to.clone(), now);
                    let rto = now.saturating_sub(sw.started_ms);
                    commits.push(ControlCommand::Decide {
                        expect_epoch: w.committed_epoch,
                        record: w.rec.clone(),
                        previous_region: None,
                        rto_ms: Some(rto),
                        audit: vec![audit(w.rec.epoch, actor, "completed", format!("{what} to {} done at epoch {}: writes paused {rto} ms, no acknowledged change lost", sw.to, w.rec.epoch), "ok")],
                    });
                    w.switchover = None;
                    w.failover_start_ms = None;
                }
            }
            _ => {
                w.switchover = None;
            }
        }
    }

    pub(super) async fn poll_reports(&self, members: &[GlobalMember]) -> Vec<RegionReport> {
        let mut set = tokio::task::JoinSet::new();
        for m in members.iter().filter(|m| !m.witness) {
            let channels = self.channels.clone();
            let addr = m.addr.clone();
            let local = m.id == self.node_id;
            let me_report = local.then(|| self.report());
            set.spawn(async move {
                if let Some(r) = me_report {
                    return Some(r);
                }
                call_report(&channels, &addr, RPC_TIMEOUT).await.ok()
            });
        }
        let mut best: BTreeMap<String, RegionReport> = BTreeMap::new();
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                let replace = match best.get(&r.region) {
                    None => true,
                    Some(b) => !b.regional_leader && r.regional_leader,
                };
                if replace {
                    best.insert(r.region.clone(), r);
                }
            }
        }
        // Regions whose leader did not answer the global leader: ask other observers (other
        // regions' coordinators, the witness) to reach them.
        let unheard: Vec<String> = members
            .iter()
            .filter(|m| !m.witness)
            .map(|m| m.region.clone())
            .filter(|r| !best.get(r).is_some_and(|b| b.regional_leader))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for region in unheard {
            if let Some(r) = self.observe_via_others(members, &region).await {
                best.insert(region, r);
            }
        }
        best.into_values().collect()
    }

    /// Asks every coordinator outside `region` (other regions' and the witness) to poll
    /// `region`'s coordinators, concurrently; the first regional leader's report wins.
    pub(super) async fn observe_via_others(
        &self,
        members: &[GlobalMember],
        region: &str,
    ) -> Option<RegionReport> {
        let others = members
            .iter()
            .filter(|m| m.region != region && m.id != self.node_id);
        let mut set = tokio::task::JoinSet::new();
        for m in others {
            let channels = self.channels.clone();
            let (addr, id) = (m.addr.clone(), m.id);
            let req = ObserveRequest {
                region: region.to_string(),
            };
            set.spawn(async move {
                rpc(
                    &channels,
                    &addr,
                    "observe",
                    RPC_TIMEOUT * 2,
                    |c| async move { GlobalServiceClient::new(c).observe(req).await },
                )
                .await
                .ok()
                .map(|mut r| {
                    r.observed_via = id;
                    r
                })
            });
        }
        // Bounded: a region that is really gone must not slow the control loop (a reachable
        // one answers through an observer within milliseconds).
        tokio::time::timeout(OBSERVE_WAIT, async {
            while let Some(r) = set.join_next().await {
                if let Ok(Some(r)) = r {
                    if r.regional_leader {
                        tracing::debug!(%region, via = r.observed_via, "region heard through another observer");
                        return Some(r);
                    }
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// `GlobalService.Observe`: polls `region`'s coordinators (peek: audit entries stay for the
    /// leader's own poll) and returns its regional leader's report.
    ///
    /// Errors: `UNAVAILABLE` when no coordinator of `region` answered as its leader.
    pub async fn observe(&self, req: ObserveRequest) -> Result<RegionReport, Status> {
        let members = self.store.state().members_or(&self.cfg.members);
        let mut set = tokio::task::JoinSet::new();
        for m in members
            .iter()
            .filter(|m| m.region == req.region && !m.witness && m.id != self.node_id)
        {
            let channels = self.channels.clone();
            let addr = m.addr.clone();
            set.spawn(async move {
                rpc(
                    &channels,
                    &addr,
                    "peek report",
                    RPC_TIMEOUT,
                    |c| async move {
                        ControlServiceClient::new(c)
                            .peek_report(lifeboat_proto::PeekReportRequest {})
                            .await
                    },
                )
                .await
                .ok()
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Some(r)) = r {
                if r.regional_leader {
                    return Ok(r);
                }
            }
        }
        Err(Status::unavailable(format!(
            "no coordinator of region {} answered as its leader",
            req.region
        )))
    }
}
