//! Applies the control record to this agent's databases: when a heartbeat reply names a newer
//! epoch (or another active region), every `[[redis_sources]]` and `[[postgres_sources]]` entry is
//! reconciled through its [`Database`](crate::sources::Database) role orders
//! (promotion in the active region, follow/fence elsewhere), all sources at once. Orders are
//! idempotent and only applied for an epoch at least as new as the newest seen (DESIGN.md
//! section 5, rule 3).
//!
//! The outcome of the newest order of each source ([`pb::DbRoleOutcome`]: epoch, role observed
//! afterwards, ok or error, duration) travels in every heartbeat; the coordinators wait for them
//! before moving traffic and record them in the audit log. When an order finishes,
//! [`DbRoles::changed`] fires so that the heartbeat loop reports it at once.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lifeboat_proto as pb;
use tokio::sync::Notify;

use crate::config::Config;

/// Highest (epoch, active region) applied, and the last outcome per source.
pub struct DbRoles {
    applied: StdMutex<(u64, String)>,
    running: StdMutex<bool>,
    outcomes: StdMutex<Vec<pb::DbRoleOutcome>>,
    changed: Notify,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl DbRoles {
    /// One "no order applied yet" outcome (epoch 0) per configured database source.
    pub fn new(cfg: &Config) -> Arc<Self> {
        let pending = |source: &str, kind: &str| pb::DbRoleOutcome {
            source: source.into(),
            kind: kind.into(),
            role: "unknown".into(),
            detail: "no role order applied yet".into(),
            ..Default::default()
        };
        let outcomes = crate::sources::databases(cfg)
            .iter()
            .map(|s| pending(s.name(), s.kind()))
            .collect();
        Arc::new(DbRoles {
            applied: StdMutex::new((0, String::new())),
            running: StdMutex::new(false),
            outcomes: StdMutex::new(outcomes),
            changed: Notify::new(),
        })
    }

    /// Whether the config has database sources at all.
    pub fn wanted(cfg: &Config) -> bool {
        crate::sources::all(cfg)
            .iter()
            .any(|s| s.database().is_some())
    }

    /// The newest outcome of every source (sent with each heartbeat).
    pub fn outcomes(&self) -> Vec<pb::DbRoleOutcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Fires when an order finished (its outcome should be reported now).
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Reconciles every database source with `(epoch, active_region)` unless already done for
    /// this pair or an older epoch is offered (refused: rule 3). When the pair is already
    /// applied and this region is active, arms the Redis fencing instead
    /// ([`crate::sources::redis::arm_min_replicas`]). Runs in a task; returns at once.
    pub fn offer(self: &Arc<Self>, cfg: &Arc<Config>, epoch: u64, active_region: &str) {
        if active_region.is_empty() || !Self::wanted(cfg) {
            return;
        }
        let maintain_only = {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if epoch < applied.0 {
                return;
            }
            let done = epoch == applied.0 && applied.1 == active_region;
            if done
                && (active_region != cfg.region
                    || crate::sources::databases(cfg)
                        .iter()
                        .all(|s| s.database().is_none_or(|d| !d.fences())))
            {
                return;
            }
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if *running {
                return; // the next heartbeat offers it again
            }
            *running = true;
            done
        };
        let me = self.clone();
        let cfg = cfg.clone();
        let active = active_region.to_string();
        tokio::spawn(async move {
            if maintain_only {
                for s in crate::sources::databases(&cfg) {
                    let Some(db) = s.database() else { continue };
                    match db.arm_fencing().await {
                        Ok(Some(d)) => {
                            tracing::warn!(epoch, source = %s.name(), outcome = %d, "redis fencing armed")
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(source = %s.name(), error = %e, "cannot arm redis fencing")
                        }
                    }
                }
            } else {
                me.apply(&cfg, epoch, &active).await;
            }
            *me.running.lock().unwrap_or_else(|e| e.into_inner()) = false;
        });
    }

    async fn apply(&self, cfg: &Arc<Config>, epoch: u64, active: &str) {
        let started = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for s in crate::sources::databases(cfg) {
            let (region, active) = (cfg.region.clone(), active.to_string());
            set.spawn(async move {
                let t = Instant::now();
                let db = s.database().expect("a database source");
                let r = db.apply_role(&region, &active, epoch).await;
                let observed = db.health().await;
                let (role, want) = db.settle(region == active, r.is_ok(), observed);
                outcome(s.name(), s.kind(), epoch, &active, r, role, want, t)
            });
        }
        let mut all_ok = true;
        while let Some(joined) = set.join_next().await {
            let Ok(o) = joined else {
                all_ok = false;
                continue;
            };
            all_ok &= o.ok;
            if o.ok {
                tracing::warn!(epoch, active = %active, source = %o.source, role = %o.role, ms = o.duration_ms, outcome = %o.detail, "database role applied");
            } else {
                tracing::error!(epoch, source = %o.source, role = %o.role, error = %o.detail, "database role change failed; retrying on the next heartbeat");
            }
            let mut outs = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = outs
                .iter_mut()
                .find(|x| x.source == o.source && x.kind == o.kind)
            {
                *slot = o;
            }
        }
        if all_ok {
            *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, active.to_string());
            tracing::warn!(epoch, active = %active, ms = started.elapsed().as_millis() as u64, "databases follow the control record");
        }
        self.changed.notify_one();
    }
}

/// One source's outcome: ok when the order succeeded and the role observed afterwards is one
/// of `want`.
#[allow(clippy::too_many_arguments)]
fn outcome(
    source: &str,
    kind: &str,
    epoch: u64,
    active: &str,
    r: anyhow::Result<String>,
    role: String,
    want: &[&str],
    started: Instant,
) -> pb::DbRoleOutcome {
    let (ok, detail) = match r {
        Ok(d) if want.contains(&role.as_str()) => (true, d),
        Ok(d) => (false, format!("{d}; but the server is now {role}")),
        Err(e) => (false, format!("{e:#}")),
    };
    pb::DbRoleOutcome {
        source: source.into(),
        kind: kind.into(),
        epoch,
        active_region: active.into(),
        role,
        ok,
        detail,
        duration_ms: started.elapsed().as_millis() as u64,
        finished_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_requires_the_wanted_role() {
        let t = Instant::now();
        let o = outcome(
            "c",
            "redis",
            2,
            "b",
            Ok("promoted".into()),
            "primary".into(),
            &["primary"],
            t,
        );
        assert!(o.ok && o.epoch == 2 && o.role == "primary" && o.detail == "promoted");
        let o = outcome(
            "c",
            "redis",
            2,
            "b",
            Ok("promoted".into()),
            "replica".into(),
            &["primary"],
            t,
        );
        assert!(!o.ok && o.detail.contains("now replica"), "{o:?}");
        let o = outcome(
            "c",
            "postgres",
            2,
            "b",
            Err(anyhow::anyhow!("down")),
            "unknown".into(),
            &["primary"],
            t,
        );
        assert!(!o.ok && o.detail == "down");
    }

    #[test]
    fn one_pending_outcome_per_source() {
        let cfg = Config::from_toml(
            "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[tls]\ninsecure = true\n\
             [[redis_sources]]\nname = \"cache\"\naddr = \"h:2\"\ninterval_s = 60\n",
        )
        .unwrap();
        let r = DbRoles::new(&cfg);
        let o = r.outcomes();
        assert_eq!(o.len(), 1);
        assert_eq!(
            (
                o[0].source.as_str(),
                o[0].kind.as_str(),
                o[0].epoch,
                o[0].ok
            ),
            ("cache", "redis", 0, false)
        );
    }
}
