//! Operator commands of the global group: `status` (its part), `switchover`, `failback`,
//! `drill --simulate` and `audit`. They call `AdminService.Control` on any coordinator (it
//! forwards to the global leader); documents are JSON (see
//! `lifeboat_coordinator::control::api`).

use crate::outln;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use lifeboat_client::conn::ConnArgs;
use lifeboat_client::control::call;

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
pub fn print_status(s: &Value) {
    let rec = &s["state"]["record"];
    let now = s["now_ms"].as_u64().unwrap_or(0);
    let phase = rec["phase"]["phase"].as_str().unwrap_or("?");
    let active = rec["phase"]["region"]
        .as_str()
        .or(rec["phase"]["to"].as_str())
        .unwrap_or("?");
    outln!(
        "global: active region {active}  epoch {}  phase {phase}  (global leader node {})",
        rec["epoch"],
        s["global_leader"]
    );
    outln!(
        "  lease: holder {}  expires {}",
        rec["lease_holder"].as_str().unwrap_or("none"),
        ms_ago(now, s["lease_expiry_ms"].as_u64().unwrap_or(0))
    );
    match s["automatic"].get("Err") {
        Some(e) => outln!("  automatic failover: OFF: {}", e.as_str().unwrap_or("")),
        None => outln!(
            "  automatic failover: {}",
            if s["state"]["policy"]["automatic"].as_bool() == Some(true) {
                "on"
            } else {
                "off (policy)"
            }
        ),
    }
    if let Some(b) = s["blocked"].as_str() {
        outln!("  failover blocked: {b}");
    }
    if let Some(t) = s["switchover_to"].as_str() {
        outln!("  switchover to {t} in progress");
    }
    let last_change = rec["last_change_ms"].as_u64().unwrap_or(0);
    outln!(
        "  last failover: {}  measured RTO {}",
        ms_ago(now, last_change),
        s["state"]["last_rto_ms"]
            .as_u64()
            .map(|v| format!("{v} ms"))
            .unwrap_or_else(|| "n/a".into())
    );
    outln!("  regions:");
    for r in s["regions"].as_array().into_iter().flatten() {
        outln!(
            "    {:<10} {:<8} {:<9} leader node {:<3} lag {} ms / {} entries / {} bytes  promoted epoch {}  agents {}{}",
            r["region"].as_str().unwrap_or("?"),
            r["role"].as_str().unwrap_or("?"),
            if r["healthy"].as_bool() == Some(true) { "healthy" } else { "UNHEALTHY" },
            r["node_id"],
            r["lag_ms"],
            r["lag_entries"],
            r["lag_bytes"],
            r["promoted_epoch"],
            r["agents"],
            r["detail"].as_str().filter(|d| !d.is_empty()).map(|d| format!("  ({d})")).unwrap_or_default()
        );
        if r["sync_degraded"] == true {
            outln!("               synchronous replication DEGRADED: no standby confirmed in time; acknowledging after the local majority commit");
        }
    }
}

/// `lifeboat switchover --to R` / `lifeboat failback`: asks, then waits until the target is
/// active (or `wait` runs out). Returns the final status document.
///
/// Errors: refused switchover (reason from the global leader) or timeout.
pub async fn switchover(
    conn: &ConnArgs,
    to: Option<String>,
    failback: bool,
    wait: Duration,
) -> anyhow::Result<Value> {
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
) -> anyhow::Result<Value> {
    let actor = operator();
    let started = Instant::now();
    let r = call(
        conn,
        "switchover",
        json!({"to": to, "failback": failback, "actor": actor, "timeout_ms": wait.as_millis() as u64, "expect_epoch": expect_epoch}),
    )
    .await?;
    let target = r["to"].as_str().unwrap_or_default().to_string();
    let epoch = r["epoch"].as_u64().unwrap_or(0);
    eprintln!(
        "{}: {} -> {target}: fencing {}, waiting for {target} to catch up...",
        if failback { "failback" } else { "switchover" },
        r["from"].as_str().unwrap_or("?"),
        r["from"].as_str().unwrap_or("?")
    );
    loop {
        if let Ok(s) = call(conn, "status", json!({})).await {
            let rec = &s["state"]["record"];
            if rec["epoch"].as_u64() > Some(epoch)
                && rec["phase"]["phase"] == "active"
                && rec["phase"]["region"] == target.as_str()
            {
                return Ok(json!({
                    "from": r["from"], "to": target, "epoch": rec["epoch"],
                    "rto_ms": s["state"]["last_rto_ms"], "elapsed_ms": started.elapsed().as_millis() as u64,
                }));
            }
            if s["switchover_to"].is_null()
                && rec["epoch"].as_u64() == Some(epoch)
                && started.elapsed() > Duration::from_secs(1)
            {
                let last = s["state"]["audit"]
                    .as_array()
                    .and_then(|a| a.last())
                    .cloned()
                    .unwrap_or_default();
                bail!(
                    "switchover did not happen: {}",
                    last["detail"].as_str().unwrap_or("see `lifeboat audit`")
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
pub fn print_plan(p: &Value) {
    outln!(
        "drill (simulated, nothing done): failover {} -> {} at epoch {}",
        p["from"].as_str().unwrap_or("?"),
        p["to"].as_str().unwrap_or("?"),
        p["new_epoch"]
    );
    for (i, s) in p["steps"].as_array().into_iter().flatten().enumerate() {
        outln!("  {}. {}", i + 1, s.as_str().unwrap_or(""));
    }
    outln!(
        "expected RPO: {} ms, {} entries{}",
        p["expected_rpo_ms"],
        p["expected_rpo_entries"],
        if p["synchronous"].as_bool() == Some(true) {
            " (synchronous replication: acknowledged changes are already in the standby)"
        } else {
            ""
        }
    );
    outln!("expected RTO: about {} ms", p["expected_rto_ms"]);
    match p["refused"].as_str() {
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

/// Prints a `topology` reply.
pub fn print_topology(v: &Value) {
    outln!(
        "regions (failover preference): {}",
        v["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    match v["automatic"].get("Err").and_then(|e| e.as_str()) {
        Some(e) => outln!("automatic failover: REFUSED ({e})"),
        None => outln!("automatic failover: allowed by this topology"),
    }
    let voters: Vec<u64> = v["voters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_u64())
        .collect();
    for m in v["members"].as_array().into_iter().flatten() {
        let id = m["id"].as_u64().unwrap_or(0);
        outln!(
            "  {:>4} {:<22} {:<12} {}{}",
            id,
            m["addr"].as_str().unwrap_or(""),
            m["region"].as_str().unwrap_or(""),
            if m["witness"] == true { "witness " } else { "" },
            if voters.contains(&id) {
                "voter"
            } else {
                "NOT A VOTER YET"
            }
        );
    }
}

/// Prints audit entries.
pub fn print_audit(v: &Value) {
    for e in v.as_array().into_iter().flatten() {
        let at = jiff::Timestamp::from_millisecond(e["at_ms"].as_i64().unwrap_or(0))
            .map(|t| t.to_string())
            .unwrap_or_default();
        outln!(
            "{:>5} {} epoch {:<3} {:<13} {:<8} {} — {}",
            e["seq"],
            at,
            e["epoch"],
            e["action"].as_str().unwrap_or(""),
            e["outcome"].as_str().unwrap_or(""),
            e["actor"].as_str().unwrap_or(""),
            e["detail"].as_str().unwrap_or("")
        );
    }
}
