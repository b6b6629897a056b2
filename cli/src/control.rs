//! Operator commands of the global group: `status` (its part), `switchover`, `failback`,
//! `drill --simulate`, `topology` and `audit`. They call the typed `ControlService` on any
//! coordinator (it forwards to the global leader) through `lifeboat_client::control`.

use crate::outln;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use lifeboat_client::conn::ConnArgs;
use lifeboat_client::control as rpc;
use lifeboat_proto::{AuditEntry, DrillPlan, GlobalStatusReply, SwitchoverRequest, TopologyReply};

fn ms_ago(now: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    if t > now {
        return format!("in {} ms", t - now);
    }
    format!("{} ms ago", now - t)
}

/// Prints the global part of `lifeboat status`.
pub fn print_status(s: &GlobalStatusReply) {
    let state = s.state();
    let rec = s.record().cloned().unwrap_or_default();
    let now = s.now_ms;
    outln!(
        "global: active region {}  epoch {}  phase {}  (global leader node {})",
        rec.active_region(),
        rec.epoch,
        rec.phase_name(),
        s.global_leader
    );
    outln!(
        "  lease: holder {}  expires {}",
        rec.lease_holder.as_deref().unwrap_or("none"),
        ms_ago(now, s.lease_expiry_ms)
    );
    match &s.automatic_refused {
        Some(e) => outln!("  automatic failover: OFF: {e}"),
        None => outln!(
            "  automatic failover: {}",
            if state.policy.as_ref().is_some_and(|p| p.automatic) {
                "on"
            } else {
                "off (policy)"
            }
        ),
    }
    if let Some(b) = &s.blocked {
        outln!("  failover blocked: {b}");
    }
    if let Some(t) = &s.switchover_to {
        outln!("  switchover to {t} in progress");
    }
    outln!(
        "  last failover: {}  measured RTO {}",
        ms_ago(now, rec.last_change_ms.unwrap_or(0)),
        state
            .last_rto_ms
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".into())
    );
    outln!("  regions:");
    for r in &s.regions {
        outln!(
            "    {:<10} {:<8} {:<9} leader node {:<3} lag {} ms / {} entries / {} bytes  promoted epoch {}  agents {}{}",
            r.region,
            r.role,
            if r.healthy { "healthy" } else { "UNHEALTHY" },
            r.node_id,
            r.lag_ms,
            r.lag_entries,
            r.lag_bytes,
            r.promoted_epoch,
            r.agents,
            Some(&r.detail).filter(|d| !d.is_empty()).map(|d| format!("  ({d})")).unwrap_or_default()
        );
        if r.sync_degraded {
            outln!("               synchronous replication DEGRADED: no standby confirmed in time; acknowledging after the local majority commit");
        }
    }
}

/// Outcome of a completed switchover or failback.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverDone {
    /// Region active before.
    pub from: String,
    /// Region active now.
    pub to: String,
    /// Epoch now.
    pub epoch: u64,
    /// RTO measured by the global leader, ms.
    pub rto_ms: Option<u64>,
    /// Time this command waited, ms.
    pub elapsed_ms: u64,
}

/// `lifeboat switchover --to R` / `lifeboat failback`: asks, then waits until the target is
/// active (or `wait` runs out).
///
/// Errors: refused switchover (reason from the global leader) or timeout.
pub async fn switchover(
    conn: &ConnArgs,
    to: Option<String>,
    failback: bool,
    wait: Duration,
) -> anyhow::Result<SwitchoverDone> {
    switchover_at(conn, to, failback, wait, None).await
}

/// [`switchover`] ordered under `expect_epoch`: the global leader refuses it (`STALE_EPOCH`)
/// unless that is still the current epoch, and the decision carries it as its compare-and-set
/// epoch.
///
/// Errors: as [`switchover`]; a stale epoch is a refusal.
pub async fn switchover_at(
    conn: &ConnArgs,
    to: Option<String>,
    failback: bool,
    wait: Duration,
    expect_epoch: Option<u64>,
) -> anyhow::Result<SwitchoverDone> {
    let started = Instant::now();
    let r = rpc::switchover(
        conn,
        SwitchoverRequest {
            to,
            failback,
            actor: operator(),
            timeout_ms: Some(wait.as_millis() as u64),
            expect_epoch,
        },
    )
    .await?;
    let target = r.to.clone();
    eprintln!(
        "{}: {} -> {target}: fencing {}, waiting for {target} to catch up...",
        if failback { "failback" } else { "switchover" },
        r.from,
        r.from
    );
    loop {
        if let Ok(s) = rpc::global_status(conn).await {
            if s.epoch() > r.epoch && s.is_active_in(&target) {
                return Ok(SwitchoverDone {
                    from: r.from,
                    to: target,
                    epoch: s.epoch(),
                    rto_ms: s.state().last_rto_ms,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                });
            }
            if s.switchover_to.is_none()
                && s.epoch() == r.epoch
                && started.elapsed() > Duration::from_secs(1)
            {
                let last = s.state().audit.last().map(|e| e.detail.clone());
                bail!(
                    "switchover did not happen: {}",
                    last.as_deref().unwrap_or("see `lifeboat audit`")
                );
            }
        }
        if started.elapsed() > wait + Duration::from_secs(5) {
            bail!("switchover to {target} not complete after {} s; see `lifeboat status` and `lifeboat audit`", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints a drill plan.
pub fn print_plan(p: &DrillPlan) {
    outln!(
        "drill (simulated, nothing done): failover {} -> {} at epoch {}",
        p.from,
        p.to,
        p.new_epoch
    );
    for (i, s) in p.steps.iter().enumerate() {
        outln!("  {}. {s}", i + 1);
    }
    outln!(
        "expected RPO: {} ms, {} entries{}",
        p.expected_rpo_ms,
        p.expected_rpo_entries,
        if p.synchronous {
            " (synchronous replication: acknowledged changes are already in the standby)"
        } else {
            ""
        }
    );
    outln!("expected RTO: about {} ms", p.expected_rto_ms);
    match &p.refused {
        Some(r) => outln!("the policy would REFUSE this failover now: {r}"),
        None => outln!("the policy would allow this failover now"),
    }
}

/// Who runs this CLI, for the audit log: `operator USER via lifeboat CLI`.
pub fn operator() -> String {
    format!(
        "operator {} via lifeboat CLI",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

/// Prints a topology reply.
pub fn print_topology(v: &TopologyReply) {
    outln!("regions (failover preference): {}", v.regions.join(", "));
    match &v.automatic_refused {
        Some(e) => outln!("automatic failover: REFUSED ({e})"),
        None => outln!("automatic failover: allowed by this topology"),
    }
    for m in &v.members {
        outln!(
            "  {:>4} {:<22} {:<12} {}{}",
            m.id,
            m.addr,
            m.region,
            if m.witness { "witness " } else { "" },
            if v.voters.contains(&m.id) {
                "voter"
            } else {
                "NOT A VOTER YET"
            }
        );
    }
}

/// Prints audit entries.
pub fn print_audit(entries: &[AuditEntry]) {
    for e in entries {
        let at = jiff::Timestamp::from_millisecond(e.at_ms as i64)
            .map(|t| t.to_string())
            .unwrap_or_default();
        outln!(
            "{:>5} {} epoch {:<3} {:<13} {:<8} {} — {}",
            e.seq,
            at,
            e.epoch,
            e.action,
            e.outcome,
            e.actor,
            e.detail
        );
    }
}
