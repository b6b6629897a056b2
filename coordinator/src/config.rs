//! Coordinator configuration: one TOML file per process (`lifeboat-coordinator --config FILE`).
//! Every option has a default here; `deploy/examples/coordinator.toml` documents them.

use std::path::{Path, PathBuf};

use lifeboat_common::blobstore::S3Config;
use lifeboat_common::tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// A Raft member: node id and gRPC address (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// Node id, unique in the deployment.
    pub id: u64,
    /// gRPC address other coordinators use to reach it.
    pub addr: String,
}

/// Which blob store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    /// A local directory per coordinator; the leader copies each blob to a majority.
    #[default]
    Local,
    /// An S3-compatible bucket shared by the region's coordinators.
    S3,
}

/// `[blobs]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobsConfig {
    /// `local` (default) or `s3`.
    #[serde(default)]
    pub backend: BlobBackend,
    /// Directory of the local backend (default `<data_dir>/blobs`).
    pub path: Option<PathBuf>,
    /// Settings of the S3 backend (required when backend = "s3").
    pub s3: Option<S3Config>,
    /// Local backend: ms between two repair scans of the committed blobs against this node's
    /// store (missing ones are fetched from peers; `crate::blobs::repair`). Default 5000.
    #[serde(default = "default_repair_interval_ms")]
    pub repair_interval_ms: u64,
    /// Local backend: upper bound of the repair fetch rate, MiB/s of stored (compressed) blob
    /// data; 0 = unbounded. Default 64.
    #[serde(default = "default_repair_max_mib_per_s")]
    pub repair_max_mib_per_s: u64,
}

fn default_repair_interval_ms() -> u64 {
    5000
}

fn default_repair_max_mib_per_s() -> u64 {
    64
}

impl Default for BlobsConfig {
    fn default() -> Self {
        BlobsConfig {
            backend: BlobBackend::default(),
            path: None,
            s3: None,
            repair_interval_ms: default_repair_interval_ms(),
            repair_max_mib_per_s: default_repair_max_mib_per_s(),
        }
    }
}

/// `[raft]` tuning. Times in ms.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Leader heartbeat interval, ms (default 100).
    pub heartbeat_ms: u64,
    /// Minimum election timeout, ms (default 400).
    pub election_timeout_min_ms: u64,
    /// Maximum election timeout, ms (default 800).
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one (default 1000).
    pub snapshot_logs_since_last: u64,
    /// Log entries kept after a snapshot, for slow followers (default 100).
    pub max_logs_kept_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_logs_since_last: 1000,
            max_logs_kept_after_snapshot: 100,
        }
    }
}

/// `[replication]`: cross-region replication. A region whose coordinators list an
/// `upstream` is a **standby**: its leader continuously copies the upstream (active) region's
/// catalog and blobs, and its intake refuses agent pushes. Times in ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Coordinators (`host:port`) of the active region to copy from; any of them works (the
    /// subscriber follows their leader). Empty (default): this region is the source.
    pub upstream: Vec<String>,
    /// Most catalog rows per replicated batch, i.e. per Raft entry (default 500, 1..=5000).
    pub batch_rows: u32,
    /// Replication lag (age of the oldest upstream change not yet applied) at or above which the
    /// state is `degraded`, ms (default 5000).
    pub lag_degraded_ms: u64,
    /// Lag at or above which the state is `failed`, ms (default 30000; must exceed
    /// `lag_degraded_ms`).
    pub lag_failed_ms: u64,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            upstream: Vec::new(),
            batch_rows: 500,
            lag_degraded_ms: 5000,
            lag_failed_ms: 30000,
        }
    }
}

impl ReplicationConfig {
    /// True when this region copies another one (`upstream` is not empty).
    pub fn is_standby(&self) -> bool {
        !self.upstream.is_empty()
    }
}

/// A voter of the global group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalMember {
    /// Node id (the coordinator's `node_id`).
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// Region of the coordinator, or the witness site's name for the witness.
    pub region: String,
    /// This voter is the witness (votes in the global group, hosts no region).
    #[serde(default)]
    pub witness: bool,
}

/// One traffic-move hook, run by the new active region's leader after promotion, with
/// `LIFEBOAT_EPOCH`, `LIFEBOAT_ACTIVE_REGION` and `LIFEBOAT_PREVIOUS_REGION` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TrafficHook {
    /// Runs a command (argv, no shell); its exit status and the first 4 KiB of its output go to
    /// the audit log.
    Exec {
        /// Hook name for the audit log.
        name: String,
        /// argv.
        command: Vec<String>,
        /// Timeout, ms (default 10000).
        #[serde(default = "default_hook_timeout")]
        timeout_ms: u64,
    },
    /// HTTP POST of a JSON body `{"epoch", "active_region", "previous_region", "at_ms"}` to an
    /// `http://` URL (for `https`, use an exec hook with curl).
    Webhook {
        /// Hook name for the audit log.
        name: String,
        /// URL.
        url: String,
        /// Timeout, ms (default 10000).
        #[serde(default = "default_hook_timeout")]
        timeout_ms: u64,
    },
}

impl TrafficHook {
    /// The hook's name.
    pub fn name(&self) -> &str {
        match self {
            TrafficHook::Exec { name, .. } | TrafficHook::Webhook { name, .. } => name,
        }
    }
}

fn default_hook_timeout() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}
fn default_sync_timeout() -> u64 {
    10_000
}

fn default_db_promotion_timeout() -> u64 {
    5_000
}

/// `[global]`: the global group of every coordinator of every region plus a witness, holding
/// the control record (docs/failover.md). Without this section the region runs alone (static
/// role from `[replication]`, epoch from `epoch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    /// Every voter: all coordinators of all regions and the witness. Same list on every node.
    pub members: Vec<GlobalMember>,
    /// Region active when the control record is first created.
    pub initial_active: String,
    /// Failover policy written into the control record at creation.
    #[serde(default)]
    pub policy: crate::control::failover::Policy,
    /// Acknowledge agent changes only once a standby region committed them (RPO 0; default
    /// true). See `intake::SyncAck`.
    #[serde(default = "default_true")]
    pub synchronous: bool,
    /// How long a batch waits for a standby's confirmation, ms (default 10000). Then, unless
    /// `synchronous_strict`, the region degrades to acknowledging after its own majority commit
    /// until a standby catches up again.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_ms: u64,
    /// Never acknowledge without a standby's confirmation: writes stall (agents retry) while
    /// every standby region is down (default false).
    #[serde(default)]
    pub synchronous_strict: bool,
    /// This coordinator joins an existing global group (added with `lifeboat topology add`)
    /// instead of founding it: it does not initialize the group (default false).
    #[serde(default)]
    pub join: bool,
    /// Traffic-move hooks this region runs when it becomes active.
    #[serde(default)]
    pub traffic_hooks: Vec<TrafficHook>,
    /// How long a promoting region's leader waits, ms, for every agent of the region that
    /// manages databases to report them primary under the new epoch before it runs the traffic
    /// hooks (default 5000). When the time runs out the missing promotions are audited as
    /// `failed` and traffic moves anyway: the old region is already fenced by its lease, and a
    /// database that was not promoted is a read-only replica, so moving traffic cannot let two
    /// primaries diverge; it only makes the failed database unavailable until it is promoted.
    #[serde(default = "default_db_promotion_timeout")]
    pub db_promotion_timeout_ms: u64,
}

impl GlobalConfig {
    /// Region names (witness excluded), in the order of `members`.
    pub fn regions(&self) -> Vec<String> {
        regions_of(&self.members)
    }

    /// Coordinator addresses of `region`.
    pub fn addrs_of(&self, region: &str) -> Vec<String> {
        addrs_of(&self.members, region)
    }

    /// The topology for [`crate::control::failover::Topology::check`].
    pub fn topology(&self) -> crate::control::failover::Topology {
        topology_of(&self.members)
    }
}

/// Region names of `members` (witness excluded), in order of first appearance.
pub fn regions_of(members: &[GlobalMember]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in members.iter().filter(|m| !m.witness) {
        if !out.contains(&m.region) {
            out.push(m.region.clone());
        }
    }
    out
}

/// Coordinator addresses of `region` among `members`.
pub fn addrs_of(members: &[GlobalMember], region: &str) -> Vec<String> {
    members
        .iter()
        .filter(|m| !m.witness && m.region == region)
        .map(|m| m.addr.clone())
        .collect()
}

/// The failover topology of `members`: their regions and whether a witness votes.
pub fn topology_of(members: &[GlobalMember]) -> crate::control::failover::Topology {
    crate::control::failover::Topology {
        regions: regions_of(members),
        witness: members.iter().any(|m| m.witness),
    }
}

fn default_region() -> String {
    "local".into()
}
fn default_epoch() -> u64 {
    1
}

/// A duration in a config file: a string such as `"7d"`, `"1h 30m"`, `"90s"`, `"0s"` or ISO 8601
/// `"PT1H"` (parsed by `jiff`; a day is 24 hours). Written back in the same friendly form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigDuration(pub std::time::Duration);

impl ConfigDuration {
    /// Parses `text` as above.
    ///
    /// Errors: a message naming the text (negative, calendar units such as months, bad syntax).
    pub fn parse(text: &str) -> Result<Self, String> {
        let span: jiff::Span = text
            .trim()
            .parse()
            .map_err(|e| format!("bad duration {text:?} (e.g. \"7d\", \"1h\", \"0s\"): {e}"))?;
        let sd = span
            .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
            .map_err(|e| format!("bad duration {text:?}: {e}"))?;
        let d: std::time::Duration = sd
            .try_into()
            .map_err(|_| format!("duration {text:?} must not be negative"))?;
        Ok(ConfigDuration(d))
    }

    /// Milliseconds (saturating).
    pub fn as_millis_i64(&self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sd = jiff::SignedDuration::try_from(self.0).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&format!("{sd:#}"))
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ConfigDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[gc]`: garbage collection of old catalog versions and unreferenced blobs (run by the
/// region's leader; `lifeboat gc` runs one pass at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Versions superseded (a newer version of the same path committed) longer ago than this are
    /// removed from the catalog; the newest version of every path is always kept. Restores
    /// `--at` a time before `now - keep_history` may miss such versions. Default `"7d"`.
    pub keep_history: ConfigDuration,
    /// Blobs written less than this long ago are never removed (parts uploaded ahead of their
    /// commit, batches in flight). Default `"1h"`.
    pub grace: ConfigDuration,
    /// How often the leader runs a pass; `"0s"` disables the timer (`lifeboat gc` still works).
    /// Default `"1h"`.
    pub interval: ConfigDuration,
}

impl Default for GcConfig {
    fn default() -> Self {
        let h = std::time::Duration::from_secs(3600);
        GcConfig {
            keep_history: ConfigDuration(7 * 24 * h),
            grace: ConfigDuration(h),
            interval: ConfigDuration(h),
        }
    }
}

/// `[encryption]`: encryption at rest of the blob store (see `docs/encryption.md`). Exactly one
/// source of the 256-bit master key that wraps the repository's data keys; the key itself never
/// appears in the config, logs or status.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// A file of 64 hex characters (or 32 raw bytes), mode 0600: `lifeboat keys init --out PATH`.
    pub master_key_file: Option<PathBuf>,
    /// An environment variable holding the key as 64 hex characters.
    pub master_key_env: Option<String>,
    /// A command (program, then arguments; no shell) printing the key on stdout, KMS-style.
    pub master_key_command: Option<Vec<String>>,
}

impl std::fmt::Debug for EncryptionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source() {
            Ok(s) => write!(f, "EncryptionConfig({s:?})"),
            Err(_) => f.write_str("EncryptionConfig(invalid)"),
        }
    }
}

impl EncryptionConfig {
    /// The one configured source of the master key.
    ///
    /// Errors: [`ConfigError::Invalid`] when none or more than one is set.
    pub fn source(&self) -> Result<lifeboat_common::keys::MasterKeySource, ConfigError> {
        use lifeboat_common::keys::MasterKeySource as S;
        let mut all = Vec::new();
        if let Some(p) = &self.master_key_file {
            all.push(S::File(p.clone()));
        }
        if let Some(v) = &self.master_key_env {
            all.push(S::Env(v.clone()));
        }
        if let Some(c) = &self.master_key_command {
            all.push(S::Command(c.clone()));
        }
        match all.len() {
            1 => Ok(all.remove(0)),
            n => Err(ConfigError::Invalid(format!(
                "[encryption] needs exactly one of master_key_file, master_key_env, master_key_command ({n} set)"
            ))),
        }
    }
}

/// The whole coordinator config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// This node's id (non-zero, unique in the deployment).
    pub node_id: u64,
    /// Region name (default `local`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Address to listen on for gRPC, `host:port`.
    pub listen: String,
    /// Address peers, agents and the CLI use (default: `listen`).
    pub advertise: Option<String>,
    /// Directory for `coordinator.redb` and the local blob store.
    pub data_dir: PathBuf,
    /// Initial voters of a new regional group. Every node of a new cluster lists the same set;
    /// once initialized, membership changes go through `AddMember`/`RemoveMember`.
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// Current epoch (fencing token) of the region until the global group owns it (default 1).
    #[serde(default = "default_epoch")]
    pub epoch: u64,
    /// Blob store.
    #[serde(default)]
    pub blobs: BlobsConfig,
    /// Raft tuning.
    #[serde(default)]
    pub raft: RaftTuning,
    /// Mutual TLS.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Cross-region replication (standby regions only).
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// The global group (regions, witness, failover policy). Optional.
    #[serde(default)]
    pub global: Option<GlobalConfig>,
    /// This process is the witness: it votes in the global group only (no regional group, no
    /// agents, no blobs). Requires `[global]`.
    #[serde(default)]
    pub witness: bool,
    /// Garbage collection.
    #[serde(default)]
    pub gc: GcConfig,
    /// Address (`ip:port`) of the Prometheus `/metrics` listener (plain HTTP); unset (default):
    /// no listener. See `crate::metrics`.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Optional plaintext listener, `host:port`, serving only the gRPC health service
    /// (`grpc.health.v1.Health`, see `crate::health`) for probes that cannot present a client
    /// certificate (Kubernetes `grpc` probes). Off by default; the main listener serves the
    /// same statuses over mutual TLS.
    #[serde(default)]
    pub health_addr: Option<String>,
    /// Encryption at rest. Without it a new repository stays in plaintext (a loud warning at
    /// every start), and a repository holding data keys refuses to open.
    #[serde(default)]
    pub encryption: Option<EncryptionConfig>,
}

/// Config errors, each naming the option and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax or unknown keys.
    #[error("config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A value is invalid.
    #[error("config: {0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    /// Reads and validates a TOML file.
    ///
    /// Errors: [`ConfigError`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let c: CoordinatorConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values.
    ///
    /// Errors: [`ConfigError::Invalid`] naming the option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be > 0".into()));
        }
        if !self.members.is_empty() && !self.members.iter().any(|m| m.id == self.node_id) {
            return Err(ConfigError::Invalid(format!(
                "members does not include this node (node_id = {}); list every initial voter including this one",
                self.node_id
            )));
        }
        if let Some(a) = &self.metrics_addr {
            lifeboat_common::metrics::parse_addr(a)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if let Some(e) = &self.encryption {
            e.source()?;
        }
        if self.blobs.backend == BlobBackend::S3 && self.blobs.s3.is_none() {
            return Err(ConfigError::Invalid(
                "blobs.backend = \"s3\" needs a [blobs.s3] section".into(),
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0
            || r.election_timeout_min_ms <= r.heartbeat_ms
            || r.election_timeout_max_ms <= r.election_timeout_min_ms
        {
            return Err(ConfigError::Invalid(
                "raft: need 0 < heartbeat_ms < election_timeout_min_ms < election_timeout_max_ms"
                    .into(),
            ));
        }
        if self.epoch == 0 {
            return Err(ConfigError::Invalid("epoch must be >= 1".into()));
        }
        if let Some(h) = &self.health_addr {
            if h.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "health_addr {h:?} is not ip:port (e.g. \"0.0.0.0:7102\")"
                )));
            }
            if *h == self.listen {
                return Err(ConfigError::Invalid(
                    "health_addr must differ from listen (the plaintext health listener needs its own port)".into(),
                ));
            }
        }
        let rp = &self.replication;
        if !(1..=5000).contains(&rp.batch_rows) {
            return Err(ConfigError::Invalid(
                "replication.batch_rows must be between 1 and 5000".into(),
            ));
        }
        if rp.lag_degraded_ms == 0 || rp.lag_failed_ms <= rp.lag_degraded_ms {
            return Err(ConfigError::Invalid(
                "replication: need 0 < lag_degraded_ms < lag_failed_ms".into(),
            ));
        }
        for u in &rp.upstream {
            let ok = u
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "replication.upstream: {u:?} is not host:port"
                )));
            }
            if *u == self.advertise_addr() || self.members.iter().any(|m| m.addr == *u) {
                return Err(ConfigError::Invalid(format!(
                    "replication.upstream: {u} is a member of this region; list the coordinators of the active region"
                )));
            }
        }
        if let Some(g) = &self.global {
            let me = g
                .members
                .iter()
                .find(|m| m.id == self.node_id)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "global.members does not include this node (node_id = {})",
                        self.node_id
                    ))
                })?;
            if me.witness != self.witness {
                return Err(ConfigError::Invalid(
                    "witness = true must match this node's global.members entry (witness = true)"
                        .into(),
                ));
            }
            if !self.witness && me.region != self.region {
                return Err(ConfigError::Invalid(format!(
                    "global.members lists node {} in region {:?} but region = {:?}",
                    self.node_id, me.region, self.region
                )));
            }
            if !g.regions().contains(&g.initial_active) {
                return Err(ConfigError::Invalid(format!(
                    "global.initial_active {:?} is not a region of global.members",
                    g.initial_active
                )));
            }
            if !self.replication.upstream.is_empty() {
                return Err(ConfigError::Invalid(
                    "[replication] upstream and [global] exclude each other: with a global group the standby regions follow the active region named by the control record".into(),
                ));
            }
            let mut ids: Vec<u64> = g.members.iter().map(|m| m.id).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.len() != g.members.len() {
                return Err(ConfigError::Invalid("global.members: duplicate id".into()));
            }
        } else if self.witness {
            return Err(ConfigError::Invalid(
                "witness = true needs a [global] section".into(),
            ));
        }
        Ok(())
    }

    /// The address others reach this node at.
    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_is_off_by_default_and_checked() {
        let text = include_str!("../../deploy/examples/coordinator.toml");
        let c: CoordinatorConfig = toml::from_str(text).expect("example parses");
        assert_eq!(c.metrics_addr, None);
        let on = text.replace(
            "# metrics_addr = \"127.0.0.1:9464\"",
            "metrics_addr = \"127.0.0.1:9464\"",
        );
        let c: CoordinatorConfig = toml::from_str(&on).expect("parses");
        c.validate().expect("validates");
        assert_eq!(c.metrics_addr.as_deref(), Some("127.0.0.1:9464"));
        let bad = on.replace("127.0.0.1:9464", "localhost");
        let c: CoordinatorConfig = toml::from_str(&bad).expect("parses");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("metrics_addr"), "{e}");
    }

    #[test]
    fn deploy_example_parses_and_validates() {
        let text = include_str!("../../deploy/examples/coordinator.toml");
        let c: CoordinatorConfig = toml::from_str(text).expect("example parses");
        c.validate().expect("example validates");
        assert_eq!(c.members.len(), 3);
        assert_eq!(c.advertise_addr(), "10.0.0.11:7101");
        assert_eq!(c.replication, ReplicationConfig::default());
        assert!(!c.replication.is_standby());
        assert_eq!(
            c.gc.keep_history.0,
            std::time::Duration::from_secs(14 * 86_400)
        );
        assert_eq!(c.gc.grace.0, std::time::Duration::from_secs(3600));
        assert_eq!(c.gc.interval.0, std::time::Duration::from_secs(6 * 3600));
        // The commented [replication] section of the example, uncommented, parses too.
        let uncommented: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [replication]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        assert!(uncommented.contains("upstream"), "{uncommented}");
        let with: CoordinatorConfig = toml::from_str(&format!("{text}\n{uncommented}")).unwrap();
        with.validate()
            .expect("example with [replication] validates");
        assert!(with.replication.is_standby());
    }

    /// The coordinator configs in the Kubernetes ConfigMap (deploy/kubernetes/coordinator.yaml,
    /// block scalars indented four spaces) parse and validate, one per StatefulSet pod.
    #[test]
    fn kubernetes_configmap_configs_parse_and_validate() {
        let yaml = include_str!("../../deploy/kubernetes/coordinator.yaml");
        let mut found = 0;
        let mut lines = yaml.lines().peekable();
        while let Some(l) = lines.next() {
            let Some(name) = l.trim().strip_suffix(".toml: |") else {
                continue;
            };
            let mut text = String::new();
            while let Some(next) = lines.peek() {
                if !next.is_empty() && !next.starts_with("    ") {
                    break;
                }
                text += next.strip_prefix("    ").unwrap_or("");
                text.push('\n');
                lines.next();
            }
            let c: CoordinatorConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                c.node_id,
                found + 1,
                "{name}: node ids follow the pod ordinals"
            );
            assert!(c
                .tls
                .cert
                .as_ref()
                .is_some_and(|p| p.ends_with(format!("{name}.pem"))));
            assert_eq!(c.health_addr.as_deref(), Some("0.0.0.0:7102"), "{name}");
            found += 1;
        }
        assert_eq!(found, 3, "three coordinator configs in the ConfigMap");
    }

    #[test]
    fn health_addr_must_be_an_ip_port_apart_from_listen() {
        let text = include_str!("../../deploy/examples/coordinator.toml");
        let mut c: CoordinatorConfig = toml::from_str(text).unwrap();
        c.health_addr = Some("0.0.0.0:7102".into());
        c.validate().expect("separate port");
        c.health_addr = Some(c.listen.clone());
        assert!(c.validate().is_err(), "same address as listen");
        c.health_addr = Some("localhost".into());
        assert!(c.validate().is_err(), "no port");
    }

    #[test]
    fn deploy_example_global_section_parses_and_validates() {
        let text = include_str!("../../deploy/examples/coordinator.toml");
        let uncommented: String = text
            .lines()
            .skip_while(|l| !l.starts_with("# [global]"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let with: CoordinatorConfig = toml::from_str(&format!("{text}\n{uncommented}")).unwrap();
        with.validate().expect("example with [global] validates");
        let g = with.global.expect("global");
        assert_eq!(
            g.regions(),
            vec!["local".to_string(), "us-east".to_string()]
        );
        assert!(g.topology().check().is_ok(), "two regions and a witness");
        assert_eq!(g.traffic_hooks.len(), 2);
        assert_eq!(g.policy.lease_ms, 1500);
        assert_eq!(g.db_promotion_timeout_ms, 5000);
        // Without the witness, automatic failover is refused, with the reason.
        let mut no_witness = g.clone();
        no_witness.members.retain(|m| !m.witness);
        let e = no_witness.topology().check().unwrap_err().to_string();
        assert!(e.contains("witness"), "{e}");
    }

    #[test]
    fn gc_durations_parse_and_default() {
        let base = "node_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n";
        let c: CoordinatorConfig = toml::from_str(base).unwrap();
        assert_eq!(c.gc, GcConfig::default());
        assert_eq!(c.gc.keep_history.0.as_secs(), 7 * 86_400);
        let c: CoordinatorConfig = toml::from_str(&format!(
            "{base}[gc]\nkeep_history = \"0s\"\ngrace = \"PT90S\"\ninterval = \"1h 30m\"\n"
        ))
        .unwrap();
        assert_eq!(c.gc.keep_history.0.as_secs(), 0);
        assert_eq!(c.gc.grace.0.as_secs(), 90);
        assert_eq!(c.gc.interval.0.as_secs(), 5400);
        // Written back and read again: the same values.
        let again: CoordinatorConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.gc, c.gc);
        for bad in ["\"-1h\"", "\"2 months\"", "\"soon\"", "3600"] {
            let r = toml::from_str::<CoordinatorConfig>(&format!("{base}[gc]\ngrace = {bad}\n"));
            assert!(r.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_the_option_named() {
        let base = "node_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n";
        let ok: CoordinatorConfig = toml::from_str(base).unwrap();
        ok.validate().unwrap();
        let unknown = toml::from_str::<CoordinatorConfig>(&format!("{base}bogus = 1\n"));
        assert!(unknown.unwrap_err().to_string().contains("bogus"));
        let zero: CoordinatorConfig =
            toml::from_str(&base.replace("node_id = 1", "node_id = 0")).unwrap();
        assert!(zero.validate().unwrap_err().to_string().contains("node_id"));
        let not_member: CoordinatorConfig =
            toml::from_str(&format!("{base}[[members]]\nid = 2\naddr = \"a:1\"\n")).unwrap();
        assert!(not_member
            .validate()
            .unwrap_err()
            .to_string()
            .contains("members"));
        let s3: CoordinatorConfig =
            toml::from_str(&format!("{base}[blobs]\nbackend = \"s3\"\n")).unwrap();
        assert!(s3.validate().unwrap_err().to_string().contains("blobs.s3"));
        let raft: CoordinatorConfig =
            toml::from_str(&format!("{base}[raft]\nheartbeat_ms = 500\n")).unwrap();
        assert!(raft
            .validate()
            .unwrap_err()
            .to_string()
            .contains("heartbeat_ms"));
        let lag: CoordinatorConfig = toml::from_str(&format!(
            "{base}[replication]\nlag_degraded_ms = 9000\nlag_failed_ms = 9000\n"
        ))
        .unwrap();
        assert!(lag
            .validate()
            .unwrap_err()
            .to_string()
            .contains("lag_failed_ms"));
        let up: CoordinatorConfig =
            toml::from_str(&format!("{base}[replication]\nupstream = [\"nohost\"]\n")).unwrap();
        assert!(up
            .validate()
            .unwrap_err()
            .to_string()
            .contains("replication.upstream"));
        let own: CoordinatorConfig = toml::from_str(&format!(
            "{base}[replication]\nupstream = [\"127.0.0.1:1\"]\n"
        ))
        .unwrap();
        assert!(own
            .validate()
            .unwrap_err()
            .to_string()
            .contains("member of this region"));
        let rows: CoordinatorConfig =
            toml::from_str(&format!("{base}[replication]\nbatch_rows = 0\n")).unwrap();
        assert!(rows
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch_rows"));
    }

    #[test]
    fn encryption_needs_exactly_one_master_key_source() {
        let base = "node_id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\n";
        let one: CoordinatorConfig =
            toml::from_str(&format!("{base}[encryption]\nmaster_key_env = \"K\"\n")).unwrap();
        one.validate().unwrap();
        let src = one.encryption.as_ref().unwrap().source().unwrap();
        assert_eq!(src, lifeboat_common::keys::MasterKeySource::Env("K".into()));
        for bad in [
            "[encryption]\n",
            "[encryption]\nmaster_key_env = \"K\"\nmaster_key_file = \"/k\"\n",
        ] {
            let c: CoordinatorConfig = toml::from_str(&format!("{base}{bad}")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("exactly one of master_key_file"), "{e}");
        }
        let unknown = toml::from_str::<CoordinatorConfig>(&format!(
            "{base}[encryption]\nmaster_key = \"00\"\n"
        ));
        assert!(unknown.is_err(), "a key inline in the config is refused");
    }
}
