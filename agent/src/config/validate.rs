//! The rules a config must satisfy: [`Config::validate`], called by [`Config::load`] and
//! [`Config::from_toml`].

use std::path::Path;

use lifeboat_common::redis_conn::{self, split_addr};

use super::retention::validate_ref;
use super::{
    glob_set, parse_cron, Config, ConfigError, ReplicaConfig, CONFLICTS_ROOT, SNAPSHOTS_ROOT,
};

impl Config {
    /// Checks every field.
    ///
    /// Errors: the first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = !self.agent_id.is_empty()
            && self.agent_id.len() <= 128
            && self
                .agent_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !id_ok {
            return Err(ConfigError::BadAgentId(self.agent_id.clone()));
        }
        if let Some(a) = &self.metrics_addr {
            lifeboat_common::metrics::parse_addr(a)
                .map_err(|e| ConfigError::BadMetricsAddr(e.to_string()))?;
        }
        if !self.data_dir.is_absolute() {
            return Err(ConfigError::RelativeDataDir(self.data_dir.clone()));
        }
        if self.coordinators.is_empty() {
            return Err(ConfigError::NoCoordinators);
        }
        for c in &self.coordinators {
            let ok = c
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                && !c.contains('/');
            if !ok {
                return Err(ConfigError::BadCoordinator(c.clone()));
            }
        }
        for (v, name) in [
            (self.debounce_ms, "debounce_ms"),
            (self.batch_max_bytes, "batch_max_bytes"),
            (self.batch_max_changes as u64, "batch_max_changes"),
            (self.heartbeat_ms, "heartbeat_ms"),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.paths.is_empty()
            && self.replicas.is_empty()
            && self.exec_sources.is_empty()
            && self.redis_sources.is_empty()
            && self.postgres_sources.is_empty()
        {
            return Err(ConfigError::NoPaths);
        }
        let shares = std::iter::once(("(global)", self.max_delete_share, self.max_delete_files))
            .chain(self.paths.iter().map(|p| {
                (
                    p.name.as_str(),
                    p.max_delete_share.unwrap_or(0.5),
                    p.max_delete_files.unwrap_or(1),
                )
            }));
        for (name, share, files) in shares {
            if !(share > 0.0 && share <= 1.0) || files == 0 {
                return Err(ConfigError::BadDeleteGuard(format!(
                    "root {name}: max_delete_share must be in (0, 1] (got {share}) and max_delete_files at least 1 (got {files})"
                )));
            }
        }
        self.validate_replicas()?;
        self.validate_exec_sources()?;
        self.validate_redis_sources()?;
        self.validate_postgres_sources()?;
        self.validate_checks().map_err(ConfigError::BadCheck)?;
        for (name, p) in &self.retention {
            if name.is_empty() || !p.keeps_something() {
                return Err(ConfigError::BadRetention {
                    name: name.clone(),
                    reason: "a class must keep something: set keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly or keep_yearly to 1 or more".into(),
                });
            }
        }
        for (i, p) in self.paths.iter().enumerate() {
            let bad = |reason: &str| ConfigError::BadRootName {
                name: p.name.clone(),
                reason: reason.to_string(),
            };
            if p.name.contains('/') {
                return Err(bad("must be one path component (no '/')"));
            }
            lifeboat_common::path::validate_rel_path(&p.name).map_err(|e| bad(&e.to_string()))?;
            if p.name == SNAPSHOTS_ROOT {
                return Err(bad("is reserved for [[exec_sources]] snapshots"));
            }
            if p.name == CONFLICTS_ROOT {
                return Err(bad("is reserved for conflicts after a failover"));
            }
            let follows = |r: &ReplicaConfig| r.follow_active || p.follow_active;
            if self.replicas.iter().any(|r| r.name == p.name && follows(r)) {
                return Err(bad(
                    "is also a [[replicas]] name: with follow_active both would become sources of the same catalog root",
                ));
            }
            if !p.path.is_absolute() {
                return Err(ConfigError::RelativePath {
                    name: p.name.clone(),
                    path: p.path.clone(),
                });
            }
            for q in &self.paths[..i] {
                if q.name == p.name {
                    return Err(ConfigError::DuplicateRootName(p.name.clone()));
                }
                if p.path.starts_with(&q.path) {
                    return Err(ConfigError::NestedRoots {
                        outer: q.name.clone(),
                        inner: p.name.clone(),
                    });
                }
                if q.path.starts_with(&p.path) {
                    return Err(ConfigError::NestedRoots {
                        outer: p.name.clone(),
                        inner: q.name.clone(),
                    });
                }
            }
            glob_set(&p.name, &p.include)?;
            glob_set(&p.name, &p.exclude)?;
        }
        if !self.tls.insecure {
            if self.tls.ca.is_none() {
                return Err(ConfigError::TlsMissing("ca"));
            }
            if self.tls.cert.is_none() {
                return Err(ConfigError::TlsMissing("cert"));
            }
            if self.tls.key.is_none() {
                return Err(ConfigError::TlsMissing("key"));
            }
        }
        Ok(())
    }

    fn validate_exec_sources(&self) -> Result<(), ConfigError> {
        for (i, e) in self.exec_sources.iter().enumerate() {
            let bad = |reason: String| ConfigError::BadExecSource {
                name: e.name.clone(),
                reason,
            };
            if e.name.contains('/') {
                return Err(bad("name must be one path component (no '/')".into()));
            }
            lifeboat_common::path::validate_rel_path(&e.name)
                .map_err(|err| bad(format!("name: {err}")))?;
            if self.exec_sources[..i].iter().any(|q| q.name == e.name) {
                return Err(bad("name is used twice".into()));
            }
            if e.snapshot_command.is_empty() || e.snapshot_command[0].is_empty() {
                return Err(bad(
                    "snapshot_command must be a non-empty argv list, e.g. [\"sh\", \"-c\", \"pg_dumpall\"]"
                        .into(),
                ));
            }
            match (&e.schedule, e.interval_secs) {
                (Some(_), Some(_)) => {
                    return Err(bad("give schedule or interval_secs, not both".into()))
                }
                (Some(c), None) => {
                    parse_cron(c).map_err(|err| bad(format!("schedule {c:?}: {err}")))?;
                }
                (None, Some(0)) => return Err(bad("interval_secs must be at least 1".into())),
                _ => {}
            }
            validate_ref(&self.retention, &e.retention).map_err(bad)?;
            if e.timeout_secs == 0 {
                return Err(bad("timeout_secs must be at least 1".into()));
            }
        }
        Ok(())
    }

    fn validate_replicas(&self) -> Result<(), ConfigError> {
        let overlap = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        for (i, r) in self.replicas.iter().enumerate() {
            let bad = |reason: String| ConfigError::BadReplica {
                name: r.name.clone(),
                reason,
            };
            if r.name.contains('/') {
                return Err(bad("name must be one path component (no '/')".into()));
            }
            lifeboat_common::path::validate_rel_path(&r.name)
                .map_err(|e| bad(format!("bad name: {e}")))?;
            if r.name == CONFLICTS_ROOT || r.name == SNAPSHOTS_ROOT {
                return Err(bad("name is reserved".into()));
            }
            if !r.path.is_absolute() {
                return Err(bad(format!("path {:?} must be absolute", r.path)));
            }
            if let Some(p) = self.paths.iter().find(|p| overlap(&p.path, &r.path)) {
                return Err(bad(format!(
                    "path {:?} overlaps watched paths {:?} ({:?}); a replica must not be watched",
                    r.path, p.name, p.path
                )));
            }
            if overlap(&self.data_dir, &r.path) {
                return Err(bad(format!(
                    "path {:?} overlaps data_dir {:?}",
                    r.path, self.data_dir
                )));
            }
            for q in &self.replicas[..i] {
                if q.name == r.name {
                    return Err(bad("name is used twice".into()));
                }
                if overlap(&q.path, &r.path) {
                    return Err(bad(format!("path overlaps replicas {:?}", q.name)));
                }
            }
        }
        Ok(())
    }

    /// Validates every `[[redis_sources]]` entry of `cfg` (called by `Config::validate`).
    ///
    /// Errors: [`ConfigError::BadRedisSource`] naming the source and the rule.
    fn validate_redis_sources(&self) -> Result<(), ConfigError> {
        for (i, s) in self.redis_sources.iter().enumerate() {
            let bad = |reason: String| ConfigError::BadRedisSource {
                name: s.name.clone(),
                reason,
            };
            if s.name.contains('/') {
                return Err(bad("name must be one path component (no '/')".into()));
            }
            lifeboat_common::path::validate_rel_path(&s.name)
                .map_err(|err| bad(format!("name: {err}")))?;
            if self.redis_sources[..i].iter().any(|q| q.name == s.name)
                || self.exec_sources.iter().any(|q| q.name == s.name)
            {
                return Err(bad(
                    "name is used twice (names are unique across all sources)".into(),
                ));
            }
            split_addr(&s.addr).map_err(|e| bad(format!("addr: {e}")))?;
            for (region, a) in &s.primary_by_region {
                split_addr(a).map_err(|e| bad(format!("primary_by_region.{region}: {e}")))?;
            }
            if s.tls {
                if s.tls_ca_file.is_none() {
                    return Err(bad(
                        "tls = true needs tls_ca_file (PEM of the CA that signs the server certificate)"
                            .into(),
                    ));
                }
                if s.tls_cert_file.is_some() != s.tls_key_file.is_some() {
                    return Err(bad(
                        "give both tls_cert_file and tls_key_file, or neither".into()
                    ));
                }
                if let Some(n) = &s.tls_server_name {
                    redis_conn::check_server_name(n)
                        .map_err(|e| bad(format!("tls_server_name {n:?}: {e}")))?;
                }
            } else if s.tls_ca_file.is_some()
                || s.tls_cert_file.is_some()
                || s.tls_key_file.is_some()
                || s.tls_server_name.is_some()
            {
                return Err(bad("tls_* options need tls = true".into()));
            }
            if s.password_env.is_some() && s.password_file.is_some() {
                return Err(bad(
                    "give at most one of password_env and password_file".into()
                ));
            }
            match (&s.schedule, s.interval_s) {
                (Some(c), None) => {
                    parse_cron(c).map_err(|e| bad(format!("schedule {c:?}: {e}")))?;
                }
                (None, Some(0)) => return Err(bad("interval_s must be at least 1".into())),
                (None, Some(_)) => {}
                _ => return Err(bad("give exactly one of schedule and interval_s".into())),
            }
            validate_ref(&self.retention, &s.retention).map_err(bad)?;
            if s.timeout_secs == 0 {
                return Err(bad("timeout_secs must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// Validates every `[[postgres_sources]]` entry of `cfg`.
    ///
    /// Errors: [`ConfigError::BadPostgresSource`] naming the source and the reason.
    fn validate_postgres_sources(&self) -> Result<(), ConfigError> {
        for (i, s) in self.postgres_sources.iter().enumerate() {
            let bad = |reason: String| ConfigError::BadPostgresSource {
                name: s.name.clone(),
                reason,
            };
            if s.name.contains('/') {
                return Err(bad("name must be one path component (no '/')".into()));
            }
            lifeboat_common::path::validate_rel_path(&s.name)
                .map_err(|e| bad(format!("name: {e}")))?;
            if self.postgres_sources[..i].iter().any(|q| q.name == s.name)
                || self.exec_sources.iter().any(|q| q.name == s.name)
            {
                return Err(bad(
                    "name is used twice (names are unique across exec_sources and postgres_sources)"
                        .into(),
                ));
            }
            if s.host.is_empty() || s.user.is_empty() || s.port == 0 {
                return Err(bad("host, port and user must be set".into()));
            }
            if !s.bin_dir.is_absolute() {
                return Err(bad(format!("bin_dir {:?} must be absolute", s.bin_dir)));
            }
            if let Some(d) = &s.data_dir {
                if !d.is_absolute() {
                    return Err(bad(format!("data_dir {d:?} must be absolute")));
                }
            }
            if s.run_as.as_deref() == Some("") {
                return Err(bad("run_as must not be empty".into()));
            }
            match (&s.base_backup_schedule, s.base_backup_interval_s) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "give base_backup_schedule or base_backup_interval_s, not both".into(),
                    ))
                }
                (_, Some(0)) => {
                    return Err(bad("base_backup_interval_s must be at least 1".into()))
                }
                (Some(c), None) => {
                    parse_cron(c).map_err(|e| bad(format!("base_backup_schedule {c:?}: {e}")))?;
                }
                _ => {}
            }
            validate_ref(&self.retention, &s.retention).map_err(bad)?;
            for (region, addr) in &s.primary_by_region {
                let ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok || region.is_empty() {
                    return Err(bad(format!(
                        "primary_by_region.{region} = {addr:?} must be \"host:port\""
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks the `[[checks]]` entries.
    ///
    /// Errors: a message naming the check and the problem.
    pub(crate) fn validate_checks(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for c in &self.checks {
            if c.name.is_empty() || !names.insert(c.name.clone()) {
                return Err(format!("checks: name {:?} empty or repeated", c.name));
            }
            if c.timeout_ms == 0 {
                return Err(format!("checks {:?}: timeout_ms must be > 0", c.name));
            }
            let ok = match c.kind.as_str() {
                "tcp" => c
                    .target
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "http" => c.target.starts_with("http://"),
                "exec" => !c.command.is_empty(),
                "redis" => self.redis_sources.iter().any(|s| s.name == c.target),
                "postgres" => self.postgres_sources.iter().any(|s| s.name == c.target),
                _ => {
                    return Err(format!(
                        "checks {:?}: unknown kind {:?} (tcp, http, exec, redis, postgres)",
                        c.name, c.kind
                    ))
                }
            };
            if !ok {
                return Err(format!(
                    "checks {:?}: kind {} needs {}",
                    c.name,
                    c.kind,
                    match c.kind.as_str() {
                        "tcp" => "target = \"host:port\"",
                        "http" => "target = \"http://...\"",
                        "exec" => "command = [argv...]",
                        "redis" => "target = the name of a [[redis_sources]] entry",
                        _ => "target = the name of a [[postgres_sources]] entry",
                    }
                ));
            }
        }
        Ok(())
    }
}
