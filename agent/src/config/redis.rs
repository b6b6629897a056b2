//! `[[redis_sources]]`: the config of one Redis source (the source itself is
//! `sources::redis`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Defaults of [`RedisSourceConfig`].
pub mod defaults {
    /// Unacknowledged local snapshots kept when the retention policy has no `keep_last`.
    pub const KEEP_LAST: usize = 3;
    /// Seconds a snapshot may take before it is abandoned.
    pub const TIMEOUT_SECS: u64 = 600;
    /// `min-replicas-max-lag` applied with `min_replicas_to_write`, seconds.
    pub const MIN_REPLICAS_MAX_LAG_S: u64 = 10;
    pub(super) fn timeout_secs() -> u64 {
        TIMEOUT_SECS
    }
    pub(super) fn min_replicas_max_lag_s() -> u64 {
        MIN_REPLICAS_MAX_LAG_S
    }
}

/// One Redis source (`[[redis_sources]]`).
///
/// ```toml
/// [[redis_sources]]
/// name = "cache"                  # one path component, unique among all sources
/// addr = "127.0.0.1:6379"         # host:port of the Redis this agent snapshots and manages
/// password_env = "REDIS_PASSWORD" # or password_file = "/etc/lifeboat/redis.pass" (optional)
/// username = "lifeboat"           # ACL user (optional; default user when absent)
/// schedule = "*/5 * * * *"        # cron (croner syntax), or interval_s = 300; exactly one
/// retention = "standard"         # a [retention.standard] class, or inline { keep_last = 3 }
/// primary_by_region = { eu = "10.0.1.5:6379", us = "10.1.1.5:6379" }
/// ```
///
/// **Fencing** (`min_replicas_to_write = N`, N > 0): the primary of the active region is
/// *armed* with `CONFIG SET min-replicas-to-write N` and `min-replicas-max-lag` as soon as N
/// replicas are connected to it (`sources::redis::arm_min_replicas`, checked on every heartbeat). An old
/// primary cut off from its replicas (the other region promoted its replica, or the network
/// between the regions broke) then refuses writes with `NOREPLICAS` instead of diverging, even
/// when the agent beside it cannot reach any coordinator. A promotion (`sources::redis::apply_role` turning a
/// replica into the primary under a new epoch) *disarms* the new primary (`min-replicas-to-write
/// 0`): the control record designated it and the old region is fenced by its lease, so it takes
/// writes at once; it is armed again once N replicas follow it (the old region rejoining).
/// Default 0: the server's setting is left alone.
///
/// The `Debug` output holds no secret: only the name of the variable or file with the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSourceConfig {
    /// Source name: one path component, unique across `[[exec_sources]]` and `[[redis_sources]]`.
    pub name: String,
    /// `host:port` of the Redis server.
    pub addr: String,
    /// ACL user name for `AUTH`. Default none (the default user).
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable holding the password. At most one of `password_env`/`password_file`.
    #[serde(default)]
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS towards Redis (rustls; TLS 1.2 or 1.3) for snapshots, role changes and health probes.
    /// Needs `tls_ca_file`. Default false.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA(s) that sign the Redis servers' certificates (with `tls`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers with `tls-auth-clients yes` (with `tls_key_file`).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (never logged).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Name the server certificate must carry (DNS name or IP). Default: the host of the address
    /// connected to.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Cron expression (croner syntax, 5 or 6 fields, UTC) of snapshot times. Exactly one of
    /// `schedule` and `interval_s`.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Seconds between snapshots (one is also taken at start). Exactly one of `schedule` and
    /// `interval_s`.
    #[serde(default)]
    pub interval_s: Option<u64>,
    /// Retention of the snapshots in the catalog: a `[retention.<class>]` name or an inline policy
    /// (see [`crate::config::retention`]). Its `keep_last` (default [`defaults::KEEP_LAST`]) also bounds
    /// the snapshots waiting unacknowledged in `data_dir/snapshots/<name>/`. Default: every
    /// snapshot is kept in the catalog.
    #[serde(default)]
    pub retention: Option<super::retention::RetentionRef>,
    /// Seconds a snapshot may take (connection to last byte). Default 600.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: u64,
    /// Region → `host:port` of the Redis primary that runs in that region. `sources::redis::apply_role` points
    /// a standby at `primary_by_region[active_region]`.
    #[serde(default)]
    pub primary_by_region: BTreeMap<String, String>,
    /// `min-replicas-to-write` of the armed primary (see the fencing note above); 0 leaves the
    /// server's setting alone. Default 0.
    #[serde(default)]
    pub min_replicas_to_write: u32,
    /// `min-replicas-max-lag` (seconds) used with `min_replicas_to_write`: a replica whose last
    /// acknowledgement is older does not count. Default 10.
    #[serde(default = "defaults::min_replicas_max_lag_s")]
    pub min_replicas_max_lag_s: u64,
}
