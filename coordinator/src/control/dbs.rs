//! Databases inside a region failover. Agents report, in every heartbeat, the outcome of the
//! newest role order of each database source they manage ([`DbRoleOutcome`]: epoch, role
//! observed afterwards, ok, duration). A promoting region's leader waits
//! ([`await_promotion`], bounded by `[global] db_promotion_timeout_ms`) until every such database
//! of its region is primary under the new epoch, records one `promote-db` audit entry per
//! database, and only then runs the traffic hooks. In every region, outcomes reported later (a
//! late promotion, an old primary fenced or turned into a replica when its region returns) are
//! audited once each ([`new_entries`]: `promote-db` in the active region, `demote-db`
//! elsewhere).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lifeboat_proto::DbRoleOutcome;

use super::record::AuditEntry;
use crate::intake::AgentTable;

/// Agents heard from within this long count as present (their databases are waited for).
pub const AGENT_FRESH: Duration = Duration::from_secs(10);

/// How often [`await_promotion`] looks at the heartbeats.
const POLL: Duration = Duration::from_millis(10);

/// Identity of one audited outcome: agent, kind, source, epoch, ok.
pub type AuditKey = (String, String, String, u64, bool);

/// `(agent id, outcome)` of every database source of every agent heard from within
/// [`AGENT_FRESH`].
pub fn outcomes(agents: &AgentTable) -> Vec<(String, DbRoleOutcome)> {
    agents
        .lock()
        .iter()
        .filter(|(_, (t, _))| t.elapsed() < AGENT_FRESH)
        .flat_map(|(id, (_, hb))| hb.db_roles.iter().map(move |o| (id.clone(), o.clone())))
        .collect()
}

/// Whether `o` shows its database primary under `epoch` (or a newer one).
pub fn is_promoted(o: &DbRoleOutcome, epoch: u64) -> bool {
    o.epoch >= epoch && o.ok && o.role == "primary"
}

fn key(agent: &str, o: &DbRoleOutcome) -> AuditKey {
    (
        agent.to_string(),
        o.kind.clone(),
        o.source.clone(),
        o.epoch,
        o.ok,
    )
}

/// First words of the detail of an entry about `o` (used to recognise entries already in the
/// committed log after a change of regional leader).
pub fn detail_prefix(o: &DbRoleOutcome) -> String {
    format!("{} {}: ", o.kind, o.source)
}

/// The audit entry of one outcome: actor = the agent, `at_ms` = when the agent finished the
/// order, detail = what was done, the role now, the order's duration and, when `decided_ms` is
/// known, the time from the failover decision to this database's new role.
pub fn entry(agent: &str, o: &DbRoleOutcome, action: &str, decided_ms: Option<u64>) -> AuditEntry {
    let since = decided_ms
        .filter(|d| o.finished_ms >= *d)
        .map(|d| {
            format!(
                "; {} ms after the failover decision",
                o.finished_ms.saturating_sub(d)
            )
        })
        .unwrap_or_default();
    AuditEntry {
        seq: 0,
        at_ms: if o.finished_ms > 0 {
            o.finished_ms
        } else {
            super::role::now_ms()
        },
        epoch: o.epoch,
        actor: format!("agent {agent}"),
        action: action.into(),
        detail: format!(
            "{}role {} (order took {} ms{since}): {}",
            detail_prefix(o),
            o.role,
            o.duration_ms,
            o.detail
        ),
        outcome: if o.ok { "ok" } else { "failed" }.into(),
    }
}

/// What [`await_promotion`] found.
#[derive(Debug, Default)]
pub struct PromotionWait {
    /// One `promote-db` entry per database (ok, or failed when not primary in time).
    pub entries: Vec<AuditEntry>,
    /// Outcomes audited (so that [`new_entries`] does not audit them again).
    pub audited: Vec<AuditKey>,
    /// Databases primary under the epoch / all databases waited for.
    pub promoted: usize,
    /// See `promoted`.
    pub total: usize,
    /// Time waited.
    pub waited: Duration,
    /// The timeout passed before every database was primary.
    pub timed_out: bool,
}

/// Waits until every database reported by a fresh agent of this region is primary under
/// `epoch`, or `timeout` passes. `decided_ms` is when the failover was decided (record
/// `FailingOver.started_ms`). Missing promotions at the timeout become `failed` entries naming
/// the last report.
pub async fn await_promotion(
    agents: &AgentTable,
    epoch: u64,
    timeout: Duration,
    decided_ms: Option<u64>,
) -> PromotionWait {
    let started = Instant::now();
    loop {
        let all = outcomes(agents);
        let done = all.iter().all(|(_, o)| is_promoted(o, epoch));
        let timed_out = started.elapsed() >= timeout;
        if done || timed_out {
            let mut w = PromotionWait {
                total: all.len(),
                waited: started.elapsed(),
                timed_out: !done,
                ..Default::default()
            };
            for (agent, o) in &all {
                if is_promoted(o, epoch) {
                    w.promoted += 1;
                    w.entries.push(entry(agent, o, "promote-db", decided_ms));
                    w.audited.push(key(agent, o));
                } else {
                    let mut e = entry(agent, o, "promote-db", decided_ms);
                    e.epoch = epoch;
                    e.at_ms = super::role::now_ms();
                    e.outcome = "failed".into();
                    e.detail = format!(
                        "{}not primary at epoch {epoch} within {} ms (last report: epoch {}, role {}: {}); traffic moves anyway",
                        detail_prefix(o),
                        timeout.as_millis(),
                        o.epoch,
                        o.role,
                        o.detail
                    );
                    w.entries.push(e);
                }
            }
            return w;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Entries for outcomes at `epoch` not audited yet (`audited` is updated, and entries already in
/// `committed` are skipped): `promote-db` when `active`, else `demote-db`.
pub fn new_entries(
    all: &[(String, DbRoleOutcome)],
    epoch: u64,
    active: bool,
    audited: &mut HashSet<AuditKey>,
    committed: &[AuditEntry],
) -> Vec<AuditEntry> {
    let action = if active { "promote-db" } else { "demote-db" };
    let mut out = Vec::new();
    for (agent, o) in all {
        if o.epoch != epoch || !audited.insert(key(agent, o)) {
            continue;
        }
        let e = entry(agent, o, action, None);
        let prefix = detail_prefix(o);
        let dup = committed.iter().any(|c| {
            c.epoch == e.epoch
                && c.actor == e.actor
                && c.action == e.action
                && c.outcome == e.outcome
                && c.detail.starts_with(&prefix)
        });
        if !dup {
            out.push(e);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifeboat_proto::HeartbeatRequest;
    use parking_lot::Mutex;
    use std::sync::Arc;

    fn o(source: &str, epoch: u64, role: &str, ok: bool) -> DbRoleOutcome {
        DbRoleOutcome {
            source: source.into(),
            kind: "redis".into(),
            epoch,
            active_region: "b".into(),
            role: role.into(),
            ok,
            detail: "did".into(),
            duration_ms: 3,
            finished_ms: 1_000,
        }
    }

    fn table(rows: &[(&str, Vec<DbRoleOutcome>)]) -> AgentTable {
        let t: AgentTable = Arc::new(Mutex::new(Default::default()));
        for (id, dbs) in rows {
            t.lock().insert(
                id.to_string(),
                (
                    Instant::now(),
                    HeartbeatRequest {
                        agent_id: id.to_string(),
                        db_roles: dbs.clone(),
                        ..Default::default()
                    },
                ),
            );
        }
        t
    }

    #[tokio::test]
    async fn waits_for_every_database_then_audits_each() {
        let t = table(&[("a1", vec![o("cache", 1, "replica", true)]), ("a2", vec![])]);
        let t2 = t.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            t2.lock().get_mut("a1").unwrap().1.db_roles = vec![o("cache", 2, "primary", true)];
        });
        let w = await_promotion(&t, 2, Duration::from_secs(10), Some(900)).await;
        assert!(!w.timed_out);
        assert_eq!((w.promoted, w.total, w.entries.len()), (1, 1, 1));
        let e = &w.entries[0];
        assert_eq!(
            (e.action.as_str(), e.outcome.as_str(), e.epoch, e.at_ms),
            ("promote-db", "ok", 2, 1_000)
        );
        assert_eq!(e.actor, "agent a1");
        assert!(
            e.detail.starts_with("redis cache: role primary")
                && e.detail.contains("100 ms after the failover decision"),
            "{}",
            e.detail
        );
    }

    #[tokio::test]
    async fn timeout_audits_the_missing_promotion_as_failed() {
        let t = table(&[("a1", vec![o("cache", 2, "replica", false)])]);
        let w = await_promotion(&t, 2, Duration::from_millis(30), None).await;
        assert!(w.timed_out && w.promoted == 0 && w.audited.is_empty());
        assert_eq!(w.entries[0].outcome, "failed");
        assert!(w.entries[0].detail.contains("not primary at epoch 2"));
    }

    #[test]
    fn new_entries_once_per_outcome_and_not_twice_after_a_leader_change() {
        let all = vec![("a1".to_string(), o("cache", 2, "replica", true))];
        let mut audited = HashSet::new();
        let e = new_entries(&all, 2, false, &mut audited, &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].action, "demote-db");
        assert!(new_entries(&all, 2, false, &mut audited, &[]).is_empty());
        assert!(new_entries(&all, 3, false, &mut HashSet::new(), &[]).is_empty());
        // A new leader (empty set) finds the entry in the committed log.
        assert!(new_entries(&all, 2, false, &mut HashSet::new(), &e).is_empty());
    }
}
