//! What the `ControlService` calls do on this coordinator (see [`crate::control::grpc`] for
//! the gRPC edge and forwarding to the global leader): status, switchover and failback,
//! topology changes, drills, audit.

use super::*;

impl ControlRuntime {
    /// Whether this node leads the global group now.
    pub fn leads_global_group(&self) -> bool {
        self.is_global_leader()
    }

    /// The global leader's address, for forwarding.
    ///
    /// Errors: `UNAVAILABLE` while no leader is known.
    pub fn global_leader_addr(&self) -> Result<String, Status> {
        self.global_leader()
            .map(|(_, addr)| addr)
            .ok_or_else(|| Status::unavailable("no global leader elected"))
    }

    /// The open channels to other coordinators (for [`rpc`]).
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// `GlobalStatus` on the global leader. A deposed leader cut off from the majority still
    /// believes it leads; its view (record, reports, lease) may be stale, so it answers only
    /// once a quorum confirmed its leadership.
    ///
    /// Errors: `UNAVAILABLE` when leadership is not confirmed within 2 s or the leader's
    /// working state is not ready yet.
    pub async fn confirmed_status(&self) -> Result<lifeboat_proto::GlobalStatusReply, Status> {
        match tokio::time::timeout(Duration::from_secs(2), self.global.ensure_linearizable())
            .await
        {
            Ok(Ok(_)) => self.status(),
            _ => Err(Status::unavailable(
                "leadership of the global group not confirmed by a quorum (partitioned from the majority?); ask another coordinator",
            )),
        }
    }

    /// The last `limit` entries of the committed audit log (0: 100), oldest first.
    pub fn audit_tail(&self, limit: usize) -> Vec<lifeboat_proto::AuditEntry> {
        let s = self.store.state();
        let n = if limit == 0 { 100 } else { limit };
        let skip = s.audit.len().saturating_sub(n);
        s.audit[skip..].iter().map(Into::into).collect()
    }

    pub(super) fn status(&self) -> Result<lifeboat_proto::GlobalStatusReply, Status> {
        let mut state: ControlState = self.store.state();
        let automatic_refused = crate::config::topology_of(&state.members_or(&self.cfg.members))
            .check()
            .err()
            .map(|e| e.to_string());
        let skip = state.audit.len().saturating_sub(20);
        state.audit.drain(..skip);
        let l = self.leader.lock();
        let w = l
            .as_ref()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        Ok(lifeboat_proto::GlobalStatusReply {
            state: Some((&state).into()),
            global_leader: self.node_id,
            lease_expiry_ms: w.rec.lease_expiry_ms,
            now_ms: now_ms(),
            regions: w
                .reports
                .values()
                .map(|(t, r)| {
                    let mut r = r.clone();
                    let age = now_ms().saturating_sub(*t);
                    if age > 1000 {
                        r.healthy = false;
                        r.regional_leader = false;
                        r.leased = false;
                        r.detail = format!("unreachable: no report for {age} ms");
                    }
                    r
                })
                .collect(),
            blocked: w.blocked.clone(),
            automatic_refused,
            switchover_to: w.switchover.as_ref().map(|s| s.to.clone()),
        })
    }

    /// `Switchover` on the global leader: checks the request and starts the switchover (the
    /// global leader loop drives it).
    ///
    /// Errors: `FAILED_PRECONDITION` (another one running, not steady, target unhealthy or
    /// already active), `INVALID_ARGUMENT` (no or unknown target), `STALE_EPOCH` coded
    /// `FAILED_PRECONDITION` when `expect_epoch` is not the committed epoch.
    pub fn switchover(&self, req: SwitchoverRequest) -> Result<SwitchoverReply, Status> {
        let state = self.store.state();
        let mut l = self.leader.lock();
        let w = l
            .as_mut()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        if w.switchover.is_some() {
            return Err(Status::failed_precondition(
                "a switchover is already in progress",
            ));
        }
        // An order computed under an older epoch is refused (fencing token on operator orders).
        if let Some(e) = req.expect_epoch {
            if e != w.committed_epoch {
                return Err(WireError::new(ErrorCode::StaleEpoch)
                    .epoch(w.committed_epoch)
                    .status(format!(
                        "stale epoch: switchover ordered under epoch {e} but the current epoch is {}",
                        w.committed_epoch
                    )));
            }
        }
        let Phase::Active { region: from } = w.rec.phase.clone() else {
            return Err(Status::failed_precondition(format!(
                "the control record is not in a steady state ({:?}); retry when it is",
                w.rec.phase
            )));
        };
        let to = match (&req.to, req.failback) {
            (Some(t), _) => t.clone(),
            (None, true) => state.previous_region.clone().ok_or_else(|| {
                Status::failed_precondition("no previous active region to fail back to")
            })?,
            (None, false) => return Err(Status::invalid_argument("switchover needs --to REGION")),
        };
        if !state.regions.contains(&to) {
            return Err(Status::invalid_argument(format!(
                "unknown region {to:?}; regions are {:?}",
                state.regions
            )));
        }
        if to == from {
            return Err(Status::failed_precondition(format!(
                "{to} is already active"
            )));
        }
        let now = now_ms();
        let healthy = w
            .reports
            .get(&to)
            .is_some_and(|(t, r)| now.saturating_sub(*t) < 2000 && r.regional_leader && r.healthy);
        if !healthy {
            return Err(Status::failed_precondition(format!(
                "{to} is not healthy (no recent report from its regional leader); switchover refused"
            )));
        }
        w.switchover = Some(Switchover {
            from: from.clone(),
            to: to.clone(),
            actor: req.actor,
            started_ms: now,
            deadline_ms: now + req.timeout_ms.unwrap_or(60_000),
            failback: req.failback,
            expect_epoch: req.expect_epoch.unwrap_or(w.committed_epoch),
        });
        tracing::warn!(%from, %to, "switchover requested: fencing {from}");
        Ok(SwitchoverReply {
            from,
            to,
            epoch: w.rec.epoch,
        })
    }

    /// `topology`: shows the global group's voters, or adds / removes one. An added node must
    /// be running (with `[global] join = true`) and reachable; it joins as a learner, catches
    /// up, then becomes a voter. A removed voter is dropped from the committed topology first,
    /// then from the Raft membership. Either way `automatic` is re-evaluated against the
    /// topology check (e.g. adding a witness to two regions allows automatic failover).
    ///
    /// Errors: `INVALID_ARGUMENT` for a bad request, `FAILED_PRECONDITION` for a change that
    /// would leave the active region without coordinators or remove the global leader itself,
    /// `UNAVAILABLE` when the membership change fails.
    pub async fn topology(
        &self,
        change: Option<TopologyChange>,
        actor: String,
    ) -> Result<TopologyReply, Status> {
        use openraft::{BasicNode, ChangeMembers};
        let state = self.store.state();
        let mut members = state.members_or(&self.cfg.members);
        let detail = match &change {
            None => None,
            Some(TopologyChange::Add(m)) => {
                let m = m.clone();
                if m.addr.is_empty() {
                    return Err(bad("add needs addr"));
                }
                if m.region.is_empty() {
                    return Err(bad("add needs region"));
                }
                if m.id == 0 {
                    return Err(bad("node id 0 is reserved"));
                }
                if let Some(o) = members.iter().find(|o| o.id == m.id || o.addr == m.addr) {
                    return Err(bad(format!(
                        "node {} at {} is already a member",
                        o.id, o.addr
                    )));
                }
                self.global
                    .add_learner(m.id, BasicNode { addr: m.addr.clone() }, true)
                    .await
                    .map_err(|e| Status::unavailable(format!("adding node {} as a learner failed (is it running with [global] join = true, at {}?): {e}", m.id, m.addr)))?;
                self.global
                    .change_membership(ChangeMembers::AddVoterIds([m.id].into()), false)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("making node {} a voter failed: {e}", m.id))
                    })?;
                let d = format!(
                    "node {} at {} added to the global group ({})",
                    m.id,
                    m.addr,
                    if m.witness {
                        "witness".to_string()
                    } else {
                        format!("region {}", m.region)
                    }
                );
                members.push(m);
                Some(d)
            }
            Some(TopologyChange::Remove(id)) => {
                let id = *id;
                let Some(pos) = members.iter().position(|m| m.id == id) else {
                    return Err(bad(format!("node {id} is not a member")));
                };
                if id == self.node_id {
                    return Err(Status::failed_precondition(format!(
                        "node {id} is the global leader; stop it (another leader is elected) or transfer leadership, then remove it"
                    )));
                }
                let gone = members.remove(pos);
                let active = state.active().map(|(r, _)| r).unwrap_or_default();
                if !gone.witness
                    && gone.region == active
                    && !members.iter().any(|m| !m.witness && m.region == active)
                {
                    return Err(Status::failed_precondition(format!(
                        "node {id} is the last coordinator of the active region {active}; switch over first"
                    )));
                }
                Some(format!(
                    "node {id} at {} removed from the global group",
                    gone.addr
                ))
            }
        };
        if let Some(detail) = detail {
            let topo = crate::config::topology_of(&members);
            let mut policy = state.policy.clone();
            policy.automatic = self.cfg.policy.automatic && topo.check().is_ok();
            let epoch = state.active().map(|(_, e)| e).unwrap_or(0);
            let cmd = ControlCommand::SetTopology {
                members: members.clone(),
                regions: {
                    // Keep the preference order; new regions go last.
                    let mut r: Vec<String> = state
                        .regions
                        .iter()
                        .filter(|r| topo.regions.contains(r))
                        .cloned()
                        .collect();
                    r.extend(
                        topo.regions
                            .iter()
                            .filter(|x| !r.contains(x))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    r
                },
                witness: topo.witness,
                policy,
                audit: vec![audit(epoch, actor, "topology", detail, "ok")],
            };
            self.propose(cmd)
                .await
                .map_err(|e| Status::unavailable(format!("committing the topology failed: {e}")))?;
            if let Some(TopologyChange::Remove(id)) = change {
                self.global
                    .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                    .await
                    .map_err(|e| Status::unavailable(format!("removing voter {id} failed: {e}")))?;
                self.global
                    .change_membership(ChangeMembers::RemoveNodes([id].into()), false)
                    .await
                    .map_err(|e| Status::unavailable(format!("removing node {id} failed: {e}")))?;
            }
            *self.leader.lock() = None;
        }
        let state = self.store.state();
        let members = state.members_or(&self.cfg.members);
        let voters: Vec<u64> = self
            .global
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        Ok(TopologyReply {
            automatic_refused: crate::config::topology_of(&members)
                .check()
                .err()
                .map(|e| e.to_string()),
            members: members.iter().map(Into::into).collect(),
            regions: state.regions.clone(),
            voters,
        })
    }

    /// `Drill` on the global leader: the exact plan a failover would follow now.
    ///
    /// Errors: `UNAVAILABLE` before the leader's working state is ready, `INVALID_ARGUMENT`
    /// for a region without a report, `FAILED_PRECONDITION` when no other region reports.
    pub fn drill(&self, req: DrillRequest) -> Result<DrillPlan, Status> {
        let state = self.store.state();
        let l = self.leader.lock();
        let w = l
            .as_ref()
            .ok_or_else(|| Status::unavailable("global leader not ready"))?;
        let from = w.rec.active_region().to_string();
        let p = &state.policy;
        let mut candidates: Vec<&RegionReport> = w
            .reports
            .values()
            .map(|(_, r)| r)
            .filter(|r| r.region != from)
            .collect();
        candidates.sort_by_key(|r| (!(r.regional_leader && r.healthy), r.lag_ms));
        let target =
            match &req.to {
                Some(t) => w.reports.get(t).map(|(_, r)| r).ok_or_else(|| {
                    Status::invalid_argument(format!("no report from region {t:?}"))
                })?,
                None => candidates
                    .first()
                    .copied()
                    .ok_or_else(|| Status::failed_precondition("no other region reports"))?,
            };
        let mut refused = None;
        if !(target.regional_leader && target.healthy) {
            refused = Some(format!(
                "{} is not healthy: {}",
                target.region, target.detail
            ));
        } else if !self.cfg.synchronous
            && p.mode == failover::FailoverMode::ConsistencyFirst
            && target.lag_ms > p.rpo_budget_ms
        {
            refused = Some(format!(
                "{} lags {} ms, above the RPO budget of {} ms (consistency-first)",
                target.region, target.lag_ms, p.rpo_budget_ms
            ));
        } else if let Err(e) =
            crate::config::topology_of(&state.members_or(&self.cfg.members)).check()
        {
            refused = Some(format!("automatic failover refused: {e}"));
        }
        let e2 = w.rec.epoch + 1;
        let to = target.region.clone();
        let steps = vec![
            format!("detect: {from} unhealthy for {} ms (its lease renewals and reports stop)", p.detection_timeout_ms),
            format!("fence {from}: refuse its lease renewals; its coordinators stop acknowledging writes when their lease ({} ms) runs out", p.lease_ms),
            format!("wait until {from}'s lease surely expired: expiry + max clock drift {} ms", p.max_clock_drift_ms),
            format!("commit FailingOver({from} -> {to}) at epoch {e2} in the global group"),
            format!("promote {to}: stop copying {from}, agents apply the new role to their databases (REPLICAOF NO ONE / pg_promote) and refuse orders older than epoch {e2}"),
            format!("run {} traffic hook(s) in {to}: {:?}", target.hooks.len(), target.hooks),
            format!("commit Active({to}) at epoch {e2}; {to} renews its lease and takes writes; {from} rejoins as standby when it returns"),
        ];
        Ok(DrillPlan {
            from,
            to,
            new_epoch: e2,
            steps,
            hooks: target.hooks.clone(),
            expected_rpo_ms: if self.cfg.synchronous {
                0
            } else {
                target.lag_ms
            },
            expected_rpo_entries: if self.cfg.synchronous {
                0
            } else {
                target.lag_entries
            },
            synchronous: self.cfg.synchronous,
            refused,
            expected_rto_ms: p.detection_timeout_ms.max(p.lease_ms) + p.max_clock_drift_ms + 500,
        })
    }
}
