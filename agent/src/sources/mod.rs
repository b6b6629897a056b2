//! Snapshot sources: one folder per kind (`exec`, `redis`, `postgres`), each implementing
//! [`SnapshotSource`] on its config struct (defined in `config/`), and [`all`], the one list of
//! the configured sources the agent loop, the database role orders (`roles::databases`) and the
//! health checks iterate.
//!
//! **Adding a source** (say MongoDB): its config struct in `config/mongo.rs` and a
//! `mongo_sources` field in [`Config`] (validated in `config/validate.rs`); a folder
//! `sources/mongo/` implementing [`SnapshotSource`] (and [`Database`] if it has role orders),
//! writing its dumps with the shared pipeline ([`crate::snapshot`]); and one `register` line in
//! [`all`].
//!
//! A source may import `config`, `files`, `push`, `status` and `snapshot`, never `roles`, the
//! agent loop or another source.

pub mod exec;
pub mod postgres;
pub mod redis;

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::snapshot::preupload::Uploader;
use crate::status::Progress;

/// What the agent loop hands every source's tasks.
#[derive(Clone)]
pub struct Pipeline {
    /// The agent's counters; sources read the current epoch from it for their sidecars.
    pub progress: Arc<Progress>,
    /// Where a task sends the relative path (below [`crate::snapshot::snapshots_dir`]) of every
    /// finished file, sidecar after its dump; the agent queues it as a change.
    pub tx: mpsc::UnboundedSender<String>,
    /// Becomes `Some(deadline)` when the agent shuts down; tasks then return (killing tools).
    pub stop: watch::Receiver<Option<Instant>>,
    /// Uploads a snapshot's parts while it is spooled (`None`: no pre-upload).
    pub uploader: Option<Uploader>,
}

/// One configured snapshot source (`[[exec_sources]]`, `[[redis_sources]]`,
/// `[[postgres_sources]]` entry): its name, its schedule and snapshot tasks, the files an earlier
/// run left, and its role orders if it is a database.
pub trait SnapshotSource: Send + Sync {
    /// The kind, as in sidecars, role outcomes and `[[checks]]`: `exec`, `redis`, `postgres`.
    fn kind(&self) -> &'static str;

    /// The source's name (one path component, unique across sources): its snapshots go to
    /// `_snapshots/<name>/`.
    fn name(&self) -> &str;

    /// Finished files left unacknowledged by an earlier run, relative to
    /// [`crate::snapshot::snapshots_dir`] of `data_dir`, in the order to send them (oldest
    /// first, each dump before its sidecar). May delete an unusable leftover.
    fn leftovers(&self, data_dir: &Path) -> Vec<String>;

    /// Starts the source's tasks: wait for the schedule, take a snapshot into the spool, move it
    /// under `_snapshots/<name>/` with its sidecar and send both on `pipe.tx`.
    fn spawn(&self, cfg: &Config, pipe: &Pipeline) -> Vec<JoinHandle<()>>;

    /// The source's role orders, if it is a database that follows the active region.
    fn database(&self) -> Option<&dyn Database> {
        None
    }
}

/// A database source's role orders: promotion in the active region, follow or fence elsewhere
/// (driven by `roles::databases`), and its health probe (for `[[checks]]`).
pub trait Database: Send + Sync {
    /// Makes the database primary when `my_region == active_region`, else a follower of the
    /// active region's primary or fenced; idempotent. Returns one line for the audit log.
    ///
    /// Errors: the order could not be applied (retried on the next heartbeat).
    fn apply_role<'a>(
        &'a self,
        my_region: &'a str,
        active_region: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, anyhow::Result<String>>;

    /// Probes the database: reachable, role, replication lag.
    fn health(&self) -> BoxFuture<'_, DbHealth>;

    /// The role to report after an order (`ordered`: it succeeded) given the probe afterwards,
    /// and the roles that count as success in this region (`active`: this region is active).
    fn settle(
        &self,
        active: bool,
        ordered: bool,
        observed: DbHealth,
    ) -> (String, &'static [&'static str]);

    /// Whether this source asks for write fencing while active ([`Database::arm_fencing`]).
    fn fences(&self) -> bool {
        false
    }

    /// Arms the write fencing of a primary that already was one (called on every heartbeat
    /// while this region is active and the order is applied). Returns what it changed, if
    /// anything.
    ///
    /// Errors: the database could not be reached or refused.
    fn arm_fencing(&self) -> BoxFuture<'_, anyhow::Result<Option<String>>> {
        Box::pin(async { Ok(None) })
    }
}

/// Every configured source, in this order: exec, Redis, PostgreSQL (each in config order).
pub fn all(cfg: &Config) -> Vec<Arc<dyn SnapshotSource>> {
    let mut out = Vec::new();
    register(&mut out, &cfg.exec_sources);
    register(&mut out, &cfg.redis_sources);
    register(&mut out, &cfg.postgres_sources);
    out
}

fn register<S: SnapshotSource + Clone + 'static>(
    out: &mut Vec<Arc<dyn SnapshotSource>>,
    list: &[S],
) {
    out.extend(
        list.iter()
            .map(|s| Arc::new(s.clone()) as Arc<dyn SnapshotSource>),
    );
}

/// The configured database sources (those with role orders), in [`all`]'s order.
pub fn databases(cfg: &Config) -> Vec<Arc<dyn SnapshotSource>> {
    all(cfg)
        .into_iter()
        .filter(|s| s.database().is_some())
        .collect()
}

use serde::{Deserialize, Serialize};

/// What a database health probe found ([`Database::health`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbHealth {
    /// `true` when the database answered the probe (connection and PING succeeded); `false` on a
    /// connection, authentication or protocol error.
    pub healthy: bool,
    /// `"primary"` (takes writes), `"replica"` (follows a primary), or `"unknown"` when the
    /// probe failed.
    pub role: String,
    /// One human-readable line: offsets, the primary followed, link state, or the error.
    pub detail: String,
    /// For a replica: bytes of the replication stream it has not applied yet (primary's offset
    /// minus the replica's), when known. `None` for a primary or when unknown.
    pub lag_bytes: Option<u64>,
}
