//! The agent's TOML configuration: one serde struct with a doc comment on every field, defaults in
//! one place ([`defaults`]) and [`Config::validate`] returning a typed [`ConfigError`].
//!
//! ```toml
//! agent_id = "agent-1"
//! region = "local"
//! data_dir = "/var/lib/lifeboat/agent"
//! coordinators = ["127.0.0.1:7101", "127.0.0.1:7102"]
//! [[paths]]
//! name = "data"
//! path = "/srv/data"
//! [tls]
//! insecure = true
//! ```
//!
//! An agent in a standby region keeps warm replicas instead (or as well):
//!
//! ```toml
//! [[replicas]]
//! name = "data"              # catalog root name replicated by the active region's agents
//! path = "/srv/replica/data" # absolute; must not overlap a [[paths]] entry
//! ```
//!
//! Exec snapshot sources store a command's stdout at `_snapshots/<name>/<timestamp>.snap`:
//!
//! ```toml
//! [[exec_sources]]
//! name = "pg"
//! snapshot_command = ["sh", "-c", "pg_dumpall"]
//! restore_command = ["psql", "-f", "-"]
//! ```

pub mod checks;
pub mod postgres;
pub mod redis;
pub mod retention;
mod validate;

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use lifeboat_common::tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// Every default value of the configuration, in one place.
pub mod defaults {
    /// Region name when none is configured.
    pub const REGION: &str = "local";
    /// Debounce window of the file watcher, in ms.
    pub const DEBOUNCE_MS: u64 = 200;
    /// Part payload bytes per `PushChanges` call (64 MiB).
    pub const BATCH_MAX_BYTES: u64 = 64 * 1024 * 1024;
    /// Changes per `PushChanges` call.
    pub const BATCH_MAX_CHANGES: usize = 1000;
    /// Interval between heartbeats, in ms.
    pub const HEARTBEAT_MS: u64 = 500;
    /// Globs a root includes when none are configured.
    pub const INCLUDE: &[&str] = &["**"];

    pub(super) fn region() -> String {
        REGION.to_string()
    }
    pub(super) fn debounce_ms() -> u64 {
        DEBOUNCE_MS
    }
    pub(super) fn batch_max_bytes() -> u64 {
        BATCH_MAX_BYTES
    }
    pub(super) fn batch_max_changes() -> usize {
        BATCH_MAX_CHANGES
    }
    pub(super) fn heartbeat_ms() -> u64 {
        HEARTBEAT_MS
    }
    pub(super) fn max_delete_share() -> f64 {
        0.5
    }
    pub(super) fn max_delete_files() -> u64 {
        1000
    }
    /// Seconds between exec snapshots.
    pub const EXEC_INTERVAL_SECS: u64 = 3600;
    /// Seconds an exec snapshot command may run.
    pub const EXEC_TIMEOUT_SECS: u64 = 600;
    pub(super) fn exec_timeout_secs() -> u64 {
        EXEC_TIMEOUT_SECS
    }
    /// Whether `[[paths]]`/`[[replicas]]` entries follow the active region.
    pub const FOLLOW_ACTIVE: bool = true;
    pub(super) fn follow_active() -> bool {
        FOLLOW_ACTIVE
    }
    pub(super) fn include() -> Vec<String> {
        INCLUDE.iter().map(|s| s.to_string()).collect()
    }
}

/// The whole agent configuration (`lifeboat-agent --config FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique id of this agent, sent in heartbeats and used in logs (`node`). Required.
    pub agent_id: String,
    /// Region this agent belongs to (logged as `region`). Default `"local"`.
    #[serde(default = "defaults::region")]
    pub region: String,
    /// Directory of the agent's own state: the redb file `agent.redb` and `status.json`. Created
    /// if missing. Never replicated, even when it lies inside a protected path.
    pub data_dir: PathBuf,
    /// `host:port` of any of the region's coordinators; the agent follows the leader from there.
    pub coordinators: Vec<String>,
    /// Debounce window of the file watcher, in ms. Default 200.
    #[serde(default = "defaults::debounce_ms")]
    pub debounce_ms: u64,
    /// Upper bound of part payload bytes (full + delta bodies) per `PushChanges` call, in bytes.
    /// A single change bigger than this is sent alone. Default 64 MiB.
    #[serde(default = "defaults::batch_max_bytes")]
    pub batch_max_bytes: u64,
    /// Upper bound of changes per `PushChanges` call. Default 1000.
    #[serde(default = "defaults::batch_max_changes")]
    pub batch_max_changes: usize,
    /// Interval between heartbeats to the leader, in ms. Default 500.
    #[serde(default = "defaults::heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Mass-deletion guard (see `crate::files::guard`), default of every `[[paths]]` root: deletions
    /// planned for a root that remove more than this share (0 < share <= 1) of its acknowledged
    /// entries are held and reported instead of pushed, until `lifeboat-agent accept-deletions`.
    /// Applies only from [`crate::files::guard::SHARE_RULE_MIN`] deletions on. Default 0.5.
    #[serde(default = "defaults::max_delete_share")]
    pub max_delete_share: f64,
    /// Mass-deletion guard: more than this many deletions planned for one root are held
    /// (whatever the share). Default 1000.
    #[serde(default = "defaults::max_delete_files")]
    pub max_delete_files: u64,
    /// The directories to protect. May be empty (or omitted) when `replicas` is not.
    #[serde(default)]
    pub paths: Vec<PathConfig>,
    /// Warm-standby replicas (`[[replicas]]`): catalog roots of this region's catalog (in a standby
    /// region, the active region's catalog replicated by the coordinators) kept applied to local
    /// directories. Default none.
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// Exec snapshot sources (`[[exec_sources]]`): a command whose stdout is stored as a
    /// point-in-time snapshot at `_snapshots/<name>/<UTC timestamp>.snap`. Default none.
    #[serde(default)]
    pub exec_sources: Vec<ExecSourceConfig>,
    /// Redis sources (`[[redis_sources]]`): RDB snapshots over the replication protocol at
    /// `_snapshots/<name>/<UTC timestamp>.rdb` (+ `.rdb.meta.json`), and the role reconciler.
    /// See [`redis::RedisSourceConfig`]. Default none.
    #[serde(default)]
    pub redis_sources: Vec<redis::RedisSourceConfig>,
    /// PostgreSQL sources (`[[postgres_sources]]`): scheduled base backups and continuous WAL
    /// archiving under `_snapshots/<name>/base/` and `_snapshots/<name>/wal/`, and the
    /// promotion/fencing hooks (see `crate::sources::postgres`). Default none.
    #[serde(default)]
    pub postgres_sources: Vec<postgres::PostgresSourceConfig>,
    /// Health checks (`[[checks]]`, see `crate::checks`) run before every heartbeat; a failing
    /// check makes this agent's region unhealthy for the failover decision. Default none.
    #[serde(default)]
    pub checks: Vec<checks::CheckConfig>,
    /// Snapshot retention classes (`[retention.<class>]`, restic `forget` rules), referenced by
    /// `retention = "<class>"` of exec, Redis and PostgreSQL sources. See
    /// [`crate::snapshot::retention`]. Default none.
    #[serde(default)]
    pub retention: std::collections::BTreeMap<String, retention::RetentionPolicy>,
    /// Mutual TLS towards the coordinators (`ca`, `cert`, `key`, or `insecure = true`).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Address (`ip:port`) of the Prometheus `/metrics` listener (plain HTTP); unset (default):
    /// no listener. See `crate::metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

/// One protected directory (`[[paths]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Root name: catalog paths are `"<name>/<relative path>"`, the root itself is `"<name>"`.
    /// Must be a single valid path component.
    pub name: String,
    /// Absolute directory to protect. Symlinks below it are replicated as links, never followed.
    pub path: PathBuf,
    /// Globs (globset syntax, relative to `path`, `*` does not cross `/`, `**` does) of entries to
    /// replicate. Directories are always descended into unless excluded. Default `["**"]`.
    #[serde(default = "defaults::include")]
    pub include: Vec<String>,
    /// Globs of entries to skip; an excluded directory excludes everything below it. Default none.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// With a global group, the directory's role follows the active region (see
    /// `crate::roles`): a source while this agent's region is active, a replica of the active
    /// region's catalog otherwise (changes the active region lacks are kept as conflicts first).
    /// `false` pins it as a source. Default true.
    #[serde(default = "defaults::follow_active")]
    pub follow_active: bool,
    /// This root's [`Config::max_delete_share`] (default: the global one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete_share: Option<f64>,
    /// This root's [`Config::max_delete_files`] (default: the global one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delete_files: Option<u64>,
}

/// Catalog root name reserved for exec snapshots (`_snapshots/<source>/<timestamp>.snap`).
pub const SNAPSHOTS_ROOT: &str = "_snapshots";

pub use lifeboat_common::catalog::CONFLICTS_ROOT;

/// One exec snapshot source (`[[exec_sources]]`): `snapshot_command`'s stdout becomes a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSourceConfig {
    /// Source name: one path component, unique among sources.
    pub name: String,
    /// argv of the snapshot command (no shell unless the argv runs one). Must not be empty.
    pub snapshot_command: Vec<String>,
    /// argv of the matching restore command (documentation only; the snapshot is piped into its
    /// stdin by `lifeboat restore-snapshot --exec -- CMD...`). Default none.
    #[serde(default)]
    pub restore_command: Vec<String>,
    /// Seconds between snapshots (one is also taken at start). Exclusive with `schedule`.
    /// Default 3600 when neither is set.
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Cron expression (croner syntax, 5 or 6 fields, UTC) of snapshot times. Exclusive with
    /// `interval_secs`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Seconds a snapshot command may run before it is killed and the snapshot fails. Default 600.
    #[serde(default = "defaults::exec_timeout_secs")]
    pub timeout_secs: u64,
    /// Retention of the snapshots in the catalog: a `[retention.<class>]` name or an inline
    /// policy (see [`crate::snapshot::retention`]). Default: every snapshot is kept.
    #[serde(default)]
    pub retention: Option<retention::RetentionRef>,
}

impl ExecSourceConfig {
    /// Seconds between snapshots when no `schedule` is set.
    pub fn interval(&self) -> u64 {
        self.interval_secs.unwrap_or(defaults::EXEC_INTERVAL_SECS)
    }
}

/// One warm-standby replica (`[[replicas]]`): the agent follows its region's catalog
/// (`SubscribeCatalog`) and applies every version under `"<name>/"` to `path` (files written to a
/// temp file, verified, fsync'd and renamed into place; directories, symlinks and deletions
/// mirrored; never through a symlink, never outside `path`). See `crate::roles::replica`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// Catalog root name to replicate (the `name` of the protecting agent's `[[paths]]` entry).
    /// Must be a single valid path component, unique among replicas.
    pub name: String,
    /// Absolute directory where the replica is kept (created if missing before anything was
    /// applied; once the replica was populated, a missing or replaced directory is reported
    /// unhealthy and never recreated, see `crate::files::guard`). Must not overlap
    /// (contain, lie inside or equal) a watched `[[paths]]` entry, another replica or `data_dir`.
    /// Entries under it that are not in the catalog are left alone.
    pub path: PathBuf,
    /// With a global group, the directory's role follows the active region (see
    /// `crate::roles`): it becomes a watched source under the same catalog name when this
    /// agent's region becomes active (after a failover or switchover), and a replica again when
    /// another region is. `false` pins it as a replica. Default true.
    #[serde(default = "defaults::follow_active")]
    pub follow_active: bool,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `max_delete_share` / `max_delete_files` out of range.
    #[error("mass-deletion guard: {0}")]
    BadDeleteGuard(String),
    /// The file could not be read.
    #[error("config {path}: cannot read: {error}")]
    Read {
        /// Config file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// The TOML was malformed or had unknown/missing fields.
    #[error("config {path}: {error}")]
    Parse {
        /// Config file.
        path: PathBuf,
        /// Cause (names the line and field).
        error: Box<toml::de::Error>,
    },
    /// `agent_id` was empty or had characters other than `[A-Za-z0-9._-]`.
    #[error("config: agent_id {0:?} is invalid: use 1-128 characters of [A-Za-z0-9._-]")]
    BadAgentId(String),
    /// `coordinators` was empty.
    #[error("config: `coordinators` is empty: list at least one coordinator as \"host:port\"")]
    NoCoordinators,
    /// A coordinator address was not `host:port`.
    #[error("config: coordinator address {0:?} is not \"host:port\"")]
    BadCoordinator(String),
    /// `metrics_addr` is not `ip:port`.
    #[error("config: {0}")]
    BadMetricsAddr(String),
    /// A numeric option is 0 where it must be positive.
    #[error("config: `{0}` must be greater than 0")]
    Zero(&'static str),
    /// `paths` and `replicas` were both empty.
    #[error("config: no [[paths]] and no [[replicas]] configured: nothing to do")]
    NoPaths,
    /// A replica entry was invalid.
    #[error("config: replicas {name:?}: {reason}")]
    BadReplica {
        /// Replica name.
        name: String,
        /// Why.
        reason: String,
    },
    /// An `[[exec_sources]]` entry is invalid.
    #[error("config: exec_sources {name:?}: {reason}")]
    BadExecSource {
        /// The source name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A `[[redis_sources]]` entry is invalid.
    #[error("config: redis_sources {name:?}: {reason}")]
    BadRedisSource {
        /// The source name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A `[[checks]]` entry is invalid.
    #[error("config: {0}")]
    BadCheck(String),
    /// A `[retention.<class>]` table is invalid.
    #[error("config: retention.{name}: {reason}")]
    BadRetention {
        /// Class name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A `[[postgres_sources]]` entry is invalid.
    #[error("config: postgres_sources {name:?}: {reason}")]
    BadPostgresSource {
        /// The source name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A root name was not a single path component.
    #[error("config: paths.name {name:?} is invalid: {reason}")]
    BadRootName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Two roots had the same name.
    #[error("config: paths.name {0:?} is used twice")]
    DuplicateRootName(String),
    /// A root path was relative.
    #[error("config: paths {name:?}: path {path:?} must be absolute")]
    RelativePath {
        /// Root name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// One root lies inside another.
    #[error("config: paths {inner:?} lies inside paths {outer:?}: roots must not nest")]
    NestedRoots {
        /// Root name of the outer directory.
        outer: String,
        /// Root name of the inner directory.
        inner: String,
    },
    /// A glob did not compile.
    #[error("config: paths {name:?}: bad glob {glob:?}: {reason}")]
    BadGlob {
        /// Root name.
        name: String,
        /// The glob.
        glob: String,
        /// globset's message.
        reason: String,
    },
    /// `data_dir` was relative.
    #[error("config: data_dir {0:?} must be absolute")]
    RelativeDataDir(PathBuf),
    /// TLS is on but a file is missing.
    #[error("config: [tls] `{0}` is not set; run `lifeboat certs init --dir DIR` and point ca/cert/key at its files, or set insecure = true")]
    TlsMissing(&'static str),
}

/// Compiles the globs `globs` of root `name` (include or exclude list).
///
/// Errors: [`ConfigError::BadGlob`].
pub fn glob_set(name: &str, globs: &[String]) -> Result<GlobSet, ConfigError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| ConfigError::BadGlob {
                name: name.to_string(),
                glob: g.clone(),
                reason: e.kind().to_string(),
            })?;
        b.add(glob);
    }
    b.build().map_err(|e| ConfigError::BadGlob {
        name: name.to_string(),
        glob: globs.join(", "),
        reason: e.to_string(),
    })
}

/// Parses a cron expression (5 or 6 fields, UTC, `croner` syntax).
///
/// Errors: the parser's message.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

impl Config {
    /// Reads, parses and validates a TOML config file.
    ///
    /// Errors: [`ConfigError`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            error: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and validates TOML text (`path` is only used in messages).
    ///
    /// Errors: [`ConfigError`].
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            error: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A config with every default, no `paths`, and plaintext gRPC (`tls.insecure = true`);
    /// convenient for tests and tools. Production configs come from [`Config::load`].
    pub fn new(agent_id: &str, data_dir: PathBuf, coordinators: Vec<String>) -> Config {
        Config {
            agent_id: agent_id.to_string(),
            region: defaults::region(),
            data_dir,
            coordinators,
            debounce_ms: defaults::debounce_ms(),
            batch_max_bytes: defaults::batch_max_bytes(),
            batch_max_changes: defaults::batch_max_changes(),
            heartbeat_ms: defaults::heartbeat_ms(),
            max_delete_share: defaults::max_delete_share(),
            max_delete_files: defaults::max_delete_files(),
            paths: Vec::new(),
            replicas: Vec::new(),
            exec_sources: Vec::new(),
            redis_sources: Vec::new(),
            postgres_sources: Vec::new(),
            checks: Vec::new(),
            retention: Default::default(),
            tls: TlsConfig {
                insecure: true,
                ..TlsConfig::default()
            },
            metrics_addr: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
agent_id = "agent-1"
data_dir = "/var/lib/lifeboat/agent"
coordinators = ["127.0.0.1:7101", "127.0.0.1:7102"]
[[paths]]
name = "data"
path = "/srv/data"
exclude = ["*.tmp"]
[tls]
insecure = true
"#;

    fn with(extra_top: &str, path_extra: &str) -> String {
        format!(
            "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n{extra_top}\n[[paths]]\nname = \"data\"\npath = \"/srv/data\"\n{path_extra}\n[tls]\ninsecure = true\n"
        )
    }

    #[test]
    fn parses_with_defaults() {
        let c = Config::from_toml(GOOD).unwrap();
        assert_eq!(c.region, "local");
        assert_eq!(c.debounce_ms, 200);
        assert_eq!(c.batch_max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.batch_max_changes, 1000);
        assert_eq!(c.heartbeat_ms, 500);
        assert_eq!(c.paths[0].include, vec!["**".to_string()]);
        assert_eq!(c.paths[0].exclude, vec!["*.tmp".to_string()]);
    }

    #[test]
    fn metrics_addr_is_off_by_default_and_checked() {
        assert_eq!(Config::from_toml(GOOD).unwrap().metrics_addr, None);
        let c = Config::from_toml(&with("metrics_addr = \"127.0.0.1:9465\"", "")).unwrap();
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9465"));
        assert!(matches!(
            Config::from_toml(&with("metrics_addr = \"nowhere\"", "")),
            Err(ConfigError::BadMetricsAddr(_))
        ));
    }

    #[test]
    fn validation_errors() {
        let err = |s: &str| Config::from_toml(s).unwrap_err();
        assert!(matches!(
            err(&with("bogus = 1", "")),
            ConfigError::Parse { .. }
        ));
        assert!(matches!(
            err(&with("", "bogus = 1")),
            ConfigError::Parse { .. }
        ));
        assert!(matches!(
            err(&with("batch_max_changes = 0", "")),
            ConfigError::Zero("batch_max_changes")
        ));
        assert!(matches!(
            err(&with("", "exclude = [\"a[\"]")),
            ConfigError::BadGlob { .. }
        ));
        let e = err(&GOOD.replace("agent-1", "bad id"));
        assert!(matches!(e, ConfigError::BadAgentId(_)), "{e}");
        let e = err(&GOOD.replace("\"127.0.0.1:7101\", \"127.0.0.1:7102\"", ""));
        assert!(matches!(e, ConfigError::NoCoordinators), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7102", "localhost"));
        assert!(matches!(e, ConfigError::BadCoordinator(_)), "{e}");
        let e = err(&GOOD.replace("name = \"data\"", "name = \"a/b\""));
        assert!(matches!(e, ConfigError::BadRootName { .. }), "{e}");
        let e = err(&GOOD.replace("name = \"data\"", "name = \"..\""));
        assert!(matches!(e, ConfigError::BadRootName { .. }), "{e}");
        let e = err(&GOOD.replace("/srv/data", "srv/data"));
        assert!(matches!(e, ConfigError::RelativePath { .. }), "{e}");
        let e = err(&GOOD.replace("insecure = true", ""));
        assert!(matches!(e, ConfigError::TlsMissing("ca")), "{e}");
        assert!(e.to_string().contains("insecure"));
        let two = format!("{GOOD}\n[[paths]]\nname = \"data\"\npath = \"/srv/other\"\n");
        // [[paths]] after [tls] is still a top-level array of tables.
        assert!(matches!(err(&two), ConfigError::DuplicateRootName(_)));
        let nested = format!("{GOOD}\n[[paths]]\nname = \"inner\"\npath = \"/srv/data/x\"\n");
        assert!(matches!(err(&nested), ConfigError::NestedRoots { .. }));
        let no_paths = "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\npaths = []\n[tls]\ninsecure = true\n";
        assert!(matches!(err(no_paths), ConfigError::NoPaths));
        let replica = |name: &str, path: &str| {
            format!("{GOOD}\n[[replicas]]\nname = \"{name}\"\npath = \"{path}\"\n")
        };
        assert!(Config::from_toml(&replica("other", "/srv/replica")).is_ok());
        // The same name as a [[paths]] entry: both would become sources of one catalog root
        // once the directory roles follow the active region; allowed only when pinned.
        let e = err(&replica("data", "/srv/replica"));
        assert!(e.to_string().contains("follow_active"), "{e}");
        let pinned = format!(
            "{}follow_active = false\n",
            replica("data", "/srv/replica").replace(
                "path = \"/srv/data\"\n",
                "path = \"/srv/data\"\nfollow_active = false\n"
            )
        );
        assert!(Config::from_toml(&pinned).is_ok(), "{pinned}");
        assert!(err(&replica("_conflicts", "/srv/replica"))
            .to_string()
            .contains("reserved"));
        for (name, path) in [
            ("data", "/srv/data/replica"),
            ("data", "/srv"),
            ("data", "/srv/data"),
            ("data", "relative"),
            ("a/b", "/srv/replica"),
            ("..", "/srv/replica"),
            ("data", "/var/lib/lifeboat"),
        ] {
            let e = err(&replica(name, path));
            assert!(
                matches!(e, ConfigError::BadReplica { .. }),
                "{name} {path}: {e}"
            );
        }
        let twice = format!(
            "{}[[replicas]]\nname = \"data\"\npath = \"/srv/r2\"\n",
            replica("data", "/srv/r1")
        );
        assert!(matches!(err(&twice), ConfigError::BadReplica { .. }));
        // A standby agent may have replicas and no paths.
        let standby = "agent_id = \"b\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[[replicas]]\nname = \"data\"\npath = \"/r\"\n[tls]\ninsecure = true\n";
        let c = Config::from_toml(standby).unwrap();
        assert!(c.paths.is_empty());
        assert_eq!(c.replicas[0].path, PathBuf::from("/r"));
        let missing = "data_dir = \"/d\"\ncoordinators = [\"h:1\"]\npaths = []\n";
        let e = err(missing);
        assert!(e.to_string().contains("agent_id"), "{e}");
    }
    #[test]
    fn exec_sources_parse_and_validate() {
        let err = |s: &str| Config::from_toml(s).unwrap_err();
        let src = |body: &str| format!("{GOOD}\n[[exec_sources]]\n{body}\n");
        let c = Config::from_toml(&src(
            "name = \"pg\"\nsnapshot_command = [\"sh\", \"-c\", \"pg_dumpall\"]",
        ))
        .unwrap();
        let e = &c.exec_sources[0];
        assert_eq!(e.interval(), defaults::EXEC_INTERVAL_SECS);
        assert!(e.retention.is_none() && e.schedule.is_none());
        assert_eq!(e.timeout_secs, defaults::EXEC_TIMEOUT_SECS);
        assert!(e.restore_command.is_empty());
        for body in [
            "name = \"a/b\"\nsnapshot_command = [\"x\"]",
            "name = \"..\"\nsnapshot_command = [\"x\"]",
            "name = \"pg\"\nsnapshot_command = []",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\ninterval_secs = 0",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\ntimeout_secs = 0",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\nschedule = \"nope\"",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\nschedule = \"* * * * *\"\ninterval_secs = 5",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\nretention = \"missing\"",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\nretention = {}",
            "name = \"pg\"\nsnapshot_command = [\"x\"]\n[[exec_sources]]\nname = \"pg\"\nsnapshot_command = [\"y\"]",
        ] {
            let e = err(&src(body));
            assert!(matches!(e, ConfigError::BadExecSource { .. }), "{body}: {e}");
        }
        // The snapshot root name is reserved.
        let e = err(&GOOD.replace("name = \"data\"", "name = \"_snapshots\""));
        assert!(e.to_string().contains("reserved"), "{e}");
        // An agent may have only exec sources.
        let only = "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[[exec_sources]]\nname = \"pg\"\nsnapshot_command = [\"true\"]\n[tls]\ninsecure = true\n";
        assert!(Config::from_toml(only).is_ok());
    }
}
