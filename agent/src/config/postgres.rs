//! `[[postgres_sources]]`: the config of one PostgreSQL source (the source itself is
//! `sources::postgres`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default directory of the PostgreSQL 15 binaries.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Base backup schedule when neither `base_backup_schedule` nor `base_backup_interval_s` is set:
/// daily at 02:00 UTC.
pub const DEFAULT_SCHEDULE: &str = "0 2 * * *";

fn default_bin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BIN_DIR)
}
fn default_true() -> bool {
    true
}
fn default_dbname() -> String {
    "postgres".to_string()
}

/// One PostgreSQL source (`[[postgres_sources]]`).
///
/// ```toml
/// [[postgres_sources]]
/// name = "main-db"
/// host = "127.0.0.1"
/// port = 5432
/// user = "postgres"
/// # password_env = "PGPASSWORD_MAIN"   # name of an env var holding the password
/// data_dir = "/var/lib/postgresql/15/main"   # needed to fence (stop) a former primary
/// run_as = "postgres"
/// base_backup_schedule = "0 2 * * *"  # cron, UTC
/// retention = "standard"            # a [retention.standard] class, or inline { keep_last = 3 }
/// primary_by_region = { eu = "10.0.0.5:5432", us = "10.1.0.5:5432" }
/// replication_user = "replicator"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSourceConfig {
    /// Source name: one path component, unique among all sources (`[[exec_sources]]` included).
    /// Catalog paths are `_snapshots/<name>/...`.
    pub name: String,
    /// Server host (name, IP address or a Unix socket directory).
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Role used for SQL and replication connections (needs the REPLICATION attribute).
    pub user: String,
    /// Name of an environment variable holding the password (never the password itself).
    /// Default none (trust, peer or `~/.pgpass`).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Database for SQL connections. Default `"postgres"`.
    #[serde(default = "default_dbname")]
    pub dbname: String,
    /// Directory of the PostgreSQL binaries. Default `/usr/lib/postgresql/15/bin`.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// The server's data directory (absolute). Needed to fence a former primary with
    /// `pg_ctl stop`; without it a standby-region primary cannot be fenced. Default none.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// OS user that server-side commands (`pg_ctl`) run as, via `runuser -u USER --` (the agent
    /// must then run as root). Default none: the agent's own user.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Cron expression (5 or 6 fields, UTC, `croner` syntax) of base backups. Exclusive with
    /// `base_backup_interval_s`. Default [`DEFAULT_SCHEDULE`] when neither is set.
    #[serde(default)]
    pub base_backup_schedule: Option<String>,
    /// Seconds between base backups, the first one at start (meant for tests). Exclusive with
    /// `base_backup_schedule`.
    #[serde(default)]
    pub base_backup_interval_s: Option<u64>,
    /// Retention of base backups in the catalog: a `[retention.<class>]` name or an inline policy
    /// (see [`crate::config::retention`]); WAL older than the oldest kept base backup's start segment is
    /// expired with them. Its `keep_last` also bounds the base backups waiting unacknowledged in
    /// `data_dir/snapshots/<name>/base/`. Default: every base backup and WAL file is kept.
    #[serde(default)]
    pub retention: Option<super::retention::RetentionRef>,
    /// Run `pg_receivewal` and archive every completed WAL segment. Default true.
    #[serde(default = "default_true")]
    pub wal_archive: bool,
    /// `region -> "host:port"` of the primary in each region; a standby in a non-active region is
    /// pointed (`primary_conninfo`) at the active region's entry by `sources::postgres::role::apply_role`.
    /// Default empty.
    #[serde(default)]
    pub primary_by_region: BTreeMap<String, String>,
    /// Role for `primary_conninfo` of standbys. Default: `user`.
    #[serde(default)]
    pub replication_user: Option<String>,
    /// How base backups are received: `"protocol"` (the default: the agent speaks `BASE_BACKUP`
    /// itself, see `sources::postgres::wire`, and runs `pg_basebackup` only where that client cannot,
    /// e.g. a server older than 15) or `"pg_basebackup"` (always the tool).
    #[serde(default)]
    pub base_backup_client: BaseBackupClient,
}

/// The client that receives base backups (`base_backup_client`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseBackupClient {
    /// The agent's own replication-protocol client (`sources::postgres::wire`).
    #[default]
    Protocol,
    /// `pg_basebackup -Ft -D - -X fetch -c fast` from `bin_dir`.
    PgBasebackup,
}
