//! Applies the control record to this agent's databases: when a heartbeat reply names a newer
//! epoch (or another active region), every `[[redis_sources]]` and `[[postgres_sources]]` entry is
//! reconciled with [`crate::redis_source::apply_role`] / [`crate::pg_role::apply_role`]
//! (promotion in the active region, follow/fence elsewhere). Orders are idempotent and only
//! applied for an epoch at least as new as the newest seen (DESIGN.md section 5, rule 3).

use std::sync::Arc;

use std::sync::Mutex as StdMutex;

use crate::config::Config;

/// Highest (epoch, active region) applied, and the last outcome per source.
#[derive(Default)]
pub struct DbRoles {
    applied: StdMutex<(u64, String)>,
    running: StdMutex<bool>,
}

impl DbRoles {
    /// Whether the config has database sources at all.
    pub fn wanted(cfg: &Config) -> bool {
        !cfg.redis_sources.is_empty() || !cfg.postgres_sources.is_empty()
    }

    /// Reconciles every database source with `(epoch, active_region)` unless already done for
    /// this pair or an older epoch is offered (refused: rule 3). Runs in a task; returns at once.
    pub fn offer(self: &Arc<Self>, cfg: &Arc<Config>, epoch: u64, active_region: &str) {
        if active_region.is_empty() || !Self::wanted(cfg) {
            return;
        }
        {
            let applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            if epoch < applied.0 || (epoch == applied.0 && applied.1 == active_region) {
                return;
            }
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if *running {
                return; // the next heartbeat offers it again
            }
            *running = true;
        }
        let me = self.clone();
        let cfg = cfg.clone();
        let active = active_region.to_string();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut ok = true;
            for s in &cfg.redis_sources {
                match crate::redis_source::apply_role(s, &cfg.region, &active, epoch).await {
                    Ok(d) => {
                        tracing::warn!(epoch, active = %active, outcome = %d, "database role applied")
                    }
                    Err(e) => {
                        ok = false;
                        tracing::error!(epoch, source = %s.name, error = %e, "redis role change failed; retrying on the next heartbeat")
                    }
                }
            }
            for s in &cfg.postgres_sources {
                match crate::pg_role::apply_role(s, &cfg.region, &active, epoch).await {
                    Ok(d) => {
                        tracing::warn!(epoch, active = %active, outcome = %d, "database role applied")
                    }
                    Err(e) => {
                        ok = false;
                        tracing::error!(epoch, source = %s.name, error = %e, "postgres role change failed; retrying on the next heartbeat")
                    }
                }
            }
            if ok {
                *me.applied.lock().unwrap_or_else(|e| e.into_inner()) = (epoch, active.clone());
                tracing::warn!(epoch, active = %active, ms = started.elapsed().as_millis() as u64, "databases follow the control record");
            }
            *me.running.lock().unwrap_or_else(|e| e.into_inner()) = false;
        });
    }
}
