//! The agent: initial scan, watching, planning batches, pushing them until acknowledged, recording
//! acknowledged state, heartbeats and `status.json`.
//!
//! One batch is in flight at a time: the next batch is planned against the state the previous
//! acknowledgement produced (delta bases, acknowledged blobs). A batch that is not acknowledged is
//! resent whole; the state only advances on an acknowledgement.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lifeboat_common::blob::BlobHash;
use lifeboat_common::PART_SIZE;
use lifeboat_proto as pb;
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio::time::Instant;
use tracing::{Instrument, Span};

use crate::config::{Config, ConfigError};
use crate::files::batch::{build_batch, Limits, PlannedChange, Work, WorkQueue};
use crate::files::delta::Body;
use crate::files::scan::{Roots, Unmapped};
use crate::files::state::{StateDb, StateError};
use crate::files::watch::{self, Activity, WatchEvent};
use crate::push::{blamed_change, PushClient, PushError, SendOptions};
use crate::status::{self, Progress, Status};

/// How long an in-flight batch may still take after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// First retry delay after a failure; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Largest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Minimum interval between two writes of `status.json` (ms).
pub const STATUS_INTERVAL_MS: u64 = 200;
/// `status.json` is rewritten at least this often even without changes (ms), so `updated_ms`
/// shows the agent is alive.
pub const STATUS_REFRESH_MS: i64 = 1000;
/// Interval between two looks at the protected roots' health and at acceptances of held
/// deletions (see [`crate::files::guard`]).
pub const ROOT_CHECK: Duration = Duration::from_secs(1);
/// Full rescan interval when some directory could not be watched.
pub const DEGRADED_RESCAN: Duration = Duration::from_secs(60);
pub use crate::files::batch::DEFAULT_RETAIN_BYTES;
/// Times a change the coordinator accepted without acknowledging it is resent before giving up.
const MAX_UNACKED_RETRIES: u32 = 3;
/// Delay before a failed role switch is tried again; doubles up to [`SWITCH_BACKOFF_MAX`].
pub const SWITCH_BACKOFF_START: Duration = Duration::from_secs(2);
/// Longest delay between two attempts of a failed role switch.
pub const SWITCH_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Invalid [`Options`].
    #[error("agent options: {0}")]
    Options(String),
    /// A background task panicked.
    #[error("internal task failed: {0}")]
    Task(String),
    /// `[tls]` names a file that is missing or unreadable (or no file at all): retrying cannot
    /// help, so the agent exits with it at start.
    #[error(transparent)]
    Tls(#[from] lifeboat_common::tls::TlsError),
}

/// Runtime knobs that are not part of the config file.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Content bytes per part (default and maximum [`PART_SIZE`]; tests use smaller parts).
    pub part_size: usize,
    /// Payload bytes per batch kept in memory from planning (default 16 MiB).
    pub retain_bytes: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            part_size: PART_SIZE,
            retain_bytes: DEFAULT_RETAIN_BYTES,
        }
    }
}

/// Stop request: `Some(deadline)` once shutdown was asked for.
type StopRx = tokio_watch::Receiver<Option<Instant>>;

/// What a role switch needs from the agent that stopped for it.
struct Carry {
    full_cfg: Config,
    state: Arc<StateDb>,
    opts: Options,
    progress: Arc<Progress>,
    switch_backoff: Duration,
    span: Span,
}

/// Lets the heartbeat loop order a role switch: the roles this run uses and where to send the
/// order.
pub(crate) struct SwitchCtx {
    full: Config,
    roles: std::collections::BTreeMap<String, crate::files::state::DirRole>,
    not_before: Instant,
    tx: tokio_watch::Sender<Option<crate::roles::Order>>,
    /// The newest order seen (read by the replica watchdogs).
    order_tx: tokio_watch::Sender<Option<crate::roles::Order>>,
}

/// The agent. Build with [`Agent::new`], then call [`Agent::run_once`] or [`Agent::run`].
pub struct Agent {
    /// The effective config (directories placed by their roles, see [`crate::roles`]).
    cfg: Config,
    /// The config as written (roles are computed from it).
    full_cfg: Config,
    /// Persisted directory roles this instance runs with.
    roles: std::collections::BTreeMap<String, crate::files::state::DirRole>,
    /// No role switch is ordered before this instant (backoff after a failed switch).
    switch_not_before: Instant,
    /// Current backoff of failed switches.
    switch_backoff: Duration,
    opts: Options,
    roots: Arc<Roots>,
    /// Number of configured `[[paths]]` roots (the snapshot root, if any, follows them).
    watched_roots: usize,
    /// Index of the reserved `_snapshots` root when `[[exec_sources]]` are configured.
    snap_root: Option<usize>,
    state: Arc<StateDb>,
    client: Arc<PushClient>,
    progress: Arc<Progress>,
    queue: WorkQueue,
    next_change_id: u64,
    unacked: HashMap<String, u32>,
    /// WAL files (relative to the snapshot root) expired by retention in this run: a copy shipped
    /// again later (pg_receivewal's spool after a restart) is dropped, not resurrected.
    expired_wal: std::collections::HashSet<String>,
    degraded: bool,
    /// Deletions planned for `[[paths]]` roots, by root and wire path, pushed only once the
    /// queue drained and the mass-deletion guard let them through (see [`crate::files::guard`]).
    pending_deletions:
        std::collections::BTreeMap<usize, std::collections::BTreeMap<String, PlannedChange>>,
    /// Per `[[paths]]` root: its problem (`None`: healthy).
    root_problems: Vec<Option<crate::files::guard::RootProblem>>,
    /// Per root: the set the guard holds.
    held: std::collections::BTreeMap<usize, crate::files::guard::HeldDeletions>,
    /// A root became healthy again: the watcher is restarted to cover it.
    rewatch: bool,
    span: Span,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.cfg.agent_id)
            .field("state", &self.state)
            .finish()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AgentError> {
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| AgentError::Task(e.to_string()))
}

/// Waits until `stop` asks for shutdown; returns the deadline.
async fn stopped(stop: &mut StopRx) -> Instant {
    let deadline = stop.wait_for(|d| d.is_some()).await.ok().map(|d| *d);
    match deadline {
        Some(d) => d.unwrap_or_else(Instant::now),
        // Sender gone: nobody can ask any more.
        None => std::future::pending().await,
    }
}

impl Agent {
    /// An agent for a validated `cfg` with default [`Options`]; opens (creates) the state in
    /// `data_dir`.
    ///
    /// Errors: [`AgentError`] for an invalid config or an unusable state database.
    pub fn new(cfg: Config) -> Result<Agent, AgentError> {
        Agent::with_options(cfg, Options::default())
    }

    /// Like [`Agent::new`] with explicit [`Options`].
    ///
    /// Errors: [`AgentError`].
    pub fn with_options(cfg: Config, opts: Options) -> Result<Agent, AgentError> {
        cfg.validate()?;
        if opts.part_size == 0 || opts.part_size > PART_SIZE {
            return Err(AgentError::Options(format!(
                "part_size {} must be between 1 and {PART_SIZE} bytes",
                opts.part_size
            )));
        }
        // Every TLS file is read once here, before anything is opened: a missing or unreadable
        // one is a configuration error that no retry fixes, so the agent exits naming it (as the
        // coordinator does).
        cfg.tls.client()?;
        let state = Arc::new(StateDb::open(&cfg.data_dir)?);
        Agent::build(cfg, opts, state)
    }

    /// An agent for the validated `full_cfg` on an open `state`, running every directory in its
    /// persisted role.
    fn build(full_cfg: Config, opts: Options, state: Arc<StateDb>) -> Result<Agent, AgentError> {
        let roles = state.roles()?;
        let cfg = crate::roles::effective(&full_cfg, &roles);
        cfg.validate()?;
        let mut roots = Roots::new(&cfg.paths, &cfg.data_dir)?;
        let watched_roots = roots.roots.len();
        let has_sources = !cfg.exec_sources.is_empty()
            || !cfg.redis_sources.is_empty()
            || !cfg.postgres_sources.is_empty();
        let snap_root = has_sources.then(|| {
            let dir = crate::snapshot::snapshots_dir(&cfg.data_dir);
            roots.roots.push(crate::files::scan::Root {
                name: crate::config::SNAPSHOTS_ROOT.to_string(),
                path: std::fs::canonicalize(&dir).unwrap_or(dir),
                filter: crate::files::scan::Filter::default_all(),
            });
            watched_roots
        });
        let roots = Arc::new(roots);
        let epoch = state.epoch()?;
        let progress = Arc::new(Progress::default());
        progress.epoch.store(epoch, Ordering::Relaxed);
        *progress.roles.lock().unwrap_or_else(|e| e.into_inner()) =
            crate::roles::describe(&full_cfg, &roles);
        progress
            .files_tracked
            .store(state.count()?, Ordering::Relaxed);
        // Ids stay unique and increasing across restarts: never below the persisted high-water
        // mark, nor below the current time in µs.
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let next_change_id = state.next_change_id()?.max(now_us).max(1);
        let mut client = PushClient::new(cfg.tls.clone(), cfg.coordinators.clone(), opts.part_size);
        client.agent_id = cfg.agent_id.clone();
        let client = Arc::new(client);
        let span = tracing::info_span!(
            "agent",
            node = %cfg.agent_id,
            region = %cfg.region,
            epoch = tracing::field::Empty
        );
        span.record("epoch", epoch);
        Ok(Agent {
            cfg,
            full_cfg,
            roles,
            switch_not_before: Instant::now(),
            switch_backoff: SWITCH_BACKOFF_START,
            opts,
            roots,
            watched_roots,
            snap_root,
            state,
            client,
            progress,
            queue: WorkQueue::default(),
            next_change_id,
            unacked: HashMap::new(),
            expired_wal: Default::default(),
            degraded: false,
            pending_deletions: Default::default(),
            root_problems: vec![None; watched_roots],
            held: Default::default(),
            rewatch: false,
            span,
        })
    }

    /// Live progress counters (what `status.json` shows).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The status as it would be written now (without watcher activity).
    pub fn status(&self) -> Status {
        self.progress.snapshot(
            &self.cfg.agent_id,
            self.client.coordinators.current(),
            None,
            0,
        )
    }

    /// `--once`: scans every root, pushes everything until acknowledged, writes `status.json`
    /// and returns the final status. Retries (with backoff) until the coordinators answer.
    ///
    /// Errors: [`AgentError`] on state database failures.
    pub async fn run_once(self) -> Result<Status, AgentError> {
        let (_stop_tx, stop_rx) = tokio_watch::channel(None::<Instant>);
        self.run_inner(false, stop_rx, None).await
    }

    /// Runs until `shutdown` completes: initial scan, then watching; on shutdown the in-flight
    /// batch may finish within [`SHUTDOWN_GRACE`]. Writes `status.json` on the way out and
    /// returns the final status. When the control record moves the active region, directories
    /// that follow it switch roles ([`crate::roles`]): the loop stops, the transitions run, and
    /// the loop starts again with the new roles.
    ///
    /// Errors: [`AgentError`] on state database failures. Without a working file watcher the
    /// agent logs a warning and rescans every [`DEGRADED_RESCAN`].
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Status, AgentError> {
        let (stop_tx, stop_rx) = tokio_watch::channel(None::<Instant>);
        let span = self.span.clone();
        let signal_task = tokio::spawn(
            async move {
                shutdown.await;
                tracing::info!("shutdown requested; finishing the batch in flight");
                let _ = stop_tx.send(Some(Instant::now() + SHUTDOWN_GRACE));
            }
            .instrument(span),
        );
        let mut me = self;
        let result = loop {
            let (inner_tx, inner_rx) = tokio_watch::channel(None::<Instant>);
            let (switch_tx, mut switch_rx) = tokio_watch::channel(None::<crate::roles::Order>);
            let mut outer = stop_rx.clone();
            let forward = tokio::spawn(async move {
                tokio::select! {
                    d = stopped(&mut outer) => { let _ = inner_tx.send(Some(d)); }
                    ok = async { switch_rx.wait_for(|o| o.is_some()).await.is_ok() } => {
                        if ok {
                            let _ = inner_tx.send(Some(Instant::now() + SHUTDOWN_GRACE));
                        }
                        // Still honour a shutdown that comes while the loop winds down.
                        let d = stopped(&mut outer).await;
                        let _ = inner_tx.send(Some(d));
                    }
                }
            });
            let ctx = Arc::new(SwitchCtx {
                full: me.full_cfg.clone(),
                roles: me.roles.clone(),
                not_before: me.switch_not_before,
                tx: switch_tx,
                order_tx: tokio_watch::channel(None).0,
            });
            let carry = Carry {
                full_cfg: me.full_cfg.clone(),
                state: me.state.clone(),
                opts: me.opts,
                progress: me.progress.clone(),
                switch_backoff: me.switch_backoff,
                span: me.span.clone(),
            };
            let status = me.run_inner(true, inner_rx, Some(ctx.clone())).await;
            forward.abort();
            let status = match status {
                Ok(s) => s,
                Err(e) => break Err(e),
            };
            let order = ctx.tx.borrow().clone();
            match order {
                Some(order) if stop_rx.borrow().is_none() => {
                    me = match Agent::switch(carry, order).await {
                        Ok(a) => a,
                        Err(e) => break Err(e),
                    };
                }
                _ => break Ok(status),
            }
        };
        signal_task.abort();
        result
    }

    /// Runs the role transitions `order` asks for, then rebuilds the agent with the new roles
    /// (counters carried over). A failed transition leaves that directory in its old role and
    /// delays the next attempt (backoff [`SWITCH_BACKOFF_START`] doubling to
    /// [`SWITCH_BACKOFF_MAX`]).
    async fn switch(c: Carry, order: crate::roles::Order) -> Result<Agent, AgentError> {
        let span = c.span.clone();
        let this = c;
        async move {
            let c = this;
            let roles = c.state.roles()?;
            let wanted = crate::roles::switches(&c.full_cfg, &roles, &order);
            tracing::warn!(epoch = order.epoch, active = %order.active_region, switches = wanted.len(), "the control record moved the active region: switching directory roles");
            let mut failed = false;
            for (name, source) in &wanted {
                let r = crate::roles::transition(
                    &c.full_cfg,
                    &c.state,
                    &roles,
                    name,
                    *source,
                    &order,
                    c.opts.part_size,
                )
                .await;
                match r {
                    Ok(kept) => {
                        c.progress.role_switches.fetch_add(1, Ordering::Relaxed);
                        c.progress.conflicts_kept.fetch_add(kept, Ordering::Relaxed);
                        tracing::warn!(dir = %name, role = if *source { "source" } else { "replica" }, epoch = order.epoch, "directory role switched");
                    }
                    Err(e) => {
                        failed = true;
                        tracing::error!(dir = %name, error = %e, retry_in_s = c.switch_backoff.as_secs(), "role switch failed; the directory keeps its role (local changes are kept) and the switch is retried");
                    }
                }
            }
            c.state.raise_epoch(order.epoch)?;
            let mut next = Agent::build(c.full_cfg.clone(), c.opts, c.state.clone())?;
            if failed {
                next.switch_not_before = Instant::now() + c.switch_backoff;
                next.switch_backoff = (c.switch_backoff * 2).min(SWITCH_BACKOFF_MAX);
            }
            let (old, new) = (&c.progress, &next.progress);
            for (a, b) in [
                (&old.changes_acked, &new.changes_acked),
                (&old.batches_acked, &new.batches_acked),
                (&old.role_switches, &new.role_switches),
                (&old.conflicts_kept, &new.conflicts_kept),
                (&old.sent.full, &new.sent.full),
                (&old.sent.delta, &new.sent.delta),
            ] {
                b.store(a.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            new.last_ack_ms
                .store(old.last_ack_ms.load(Ordering::Relaxed), Ordering::Relaxed);
            Ok(next)
        }
        .instrument(span)
        .await
    }

    /// One run of the loop with the current roles, until `stop_rx` carries a deadline (a
    /// shutdown, or a role switch ordered through `switch`).
    async fn run_inner(
        mut self,
        watching: bool,
        mut stop_rx: StopRx,
        switch: Option<Arc<SwitchCtx>>,
    ) -> Result<Status, AgentError> {
        let span = self.span.clone();
        async move {
            let (helpers_tx, helpers_rx) = tokio_watch::channel(None::<Instant>);
            let activity = Arc::new(Activity::new(self.roots.data_dir.clone()));
            let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
            let mut _watcher = None;
            let rewatch_tx = ev_tx.clone();
            self.check_roots()?;
            if watching {
                let dirs = self.existing_root_dirs();
                if dirs.len() < self.watched_roots || self.root_problems.iter().any(Option::is_some) {
                    tracing::error!("some protected roots are missing; they are looked at again every {} s", DEGRADED_RESCAN.as_secs());
                    self.degraded = true;
                }
                match watch::start(
                    &dirs,
                    Duration::from_millis(self.cfg.debounce_ms),
                    activity.clone(),
                    ev_tx,
                ) {
                    Ok(w) => {
                        self.degraded |= w.incomplete;
                        _watcher = Some(w);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch files (check fs.inotify.max_user_instances and fs.inotify.max_user_watches); falling back to a full rescan every {} s", DEGRADED_RESCAN.as_secs());
                        self.degraded = true;
                    }
                }
            }
            let watchdog = switch.as_ref().map(|sw| crate::roles::replica::Watchdog {
                cfg: Arc::new(self.full_cfg.clone()),
                order: sw.order_tx.subscribe(),
                part_size: self.opts.part_size,
                progress: self.progress.clone(),
            });
            let hb = tokio::spawn(
                heartbeat_loop(
                    self.client.clone(),
                    self.progress.clone(),
                    self.state.clone(),
                    Arc::new(self.cfg.clone()),
                    helpers_rx.clone(),
                    Span::current(),
                    switch,
                )
                .in_current_span(),
            );
            // Warm-standby replicas follow the catalog while the agent watches (not with --once).
            let replicas = if watching {
                crate::roles::replica::spawn_all(
                    &self.cfg,
                    self.state.clone(),
                    &self.progress,
                    helpers_rx.clone(),
                    watchdog,
                )
            } else {
                Vec::new()
            };
            let quiet_ms = (self.cfg.debounce_ms * 3 / 2 + 50) as i64;
            let writer = tokio::spawn(
                status_loop(
                    self.progress.clone(),
                    self.client.clone(),
                    self.cfg.agent_id.clone(),
                    self.cfg.data_dir.clone(),
                    watching.then(|| activity.clone()),
                    quiet_ms,
                    helpers_rx.clone(),
                )
                .in_current_span(),
            );

            tracing::info!(roots = self.watched_roots, "initial scan");
            for i in 0..self.watched_roots {
                self.queue.push_back(Work::scan_root(i));
            }
            // Snapshot sources run while the agent watches (not with --once); snapshots
            // left unacknowledged by an earlier run are sent first.
            let (snap_tx, mut snap_rx) = mpsc::unbounded_channel::<String>();
            let mut execs = Vec::new();
            if let Some(root) = self.snap_root {
                let sources = crate::sources::all(&self.cfg);
                for src in &sources {
                    for rel in src.leftovers(&self.cfg.data_dir) {
                        self.queue_snapshot(root, rel);
                    }
                }
                if watching {
                    let pipe = crate::sources::Pipeline {
                        progress: self.progress.clone(),
                        tx: snap_tx,
                        stop: helpers_rx.clone(),
                        uploader: Some(crate::snapshot::preupload::Uploader::new(
                            self.client.clone(),
                            self.state.clone(),
                            self.opts.part_size,
                            self.progress.sent.clone(),
                        )),
                    };
                    for src in &sources {
                        execs.extend(src.spawn(&self.cfg, &pipe));
                    }
                }
            }
            self.progress.busy.store(true, Ordering::Relaxed);
            let mut last_rescan = Instant::now();
            let mut events_open = true;
            let mut root_tick = tokio::time::interval(ROOT_CHECK);
            root_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let result = async {
                loop {
                    if std::mem::take(&mut self.rewatch) && watching {
                        let dirs = self.existing_root_dirs();
                        drop(_watcher.take());
                        match watch::start(
                            &dirs,
                            Duration::from_millis(self.cfg.debounce_ms),
                            activity.clone(),
                            rewatch_tx.clone(),
                        ) {
                            Ok(w) => {
                                self.degraded = w.incomplete;
                                _watcher = Some(w);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot watch files again; falling back to a full rescan every {} s", DEGRADED_RESCAN.as_secs());
                                self.degraded = true;
                            }
                        }
                        // Events of the interval without a watcher are covered by the rescan of
                        // the root that came back, queued by `check_roots`.
                    }
                    while let Ok(ev) = ev_rx.try_recv() {
                        self.on_event(ev, &activity);
                    }
                    while let Ok(rel) = snap_rx.try_recv() {
                        self.on_snapshot(rel);
                    }
                    if stop_rx.borrow().is_some() {
                        break;
                    }
                    if !self.queue.is_empty() {
                        self.progress.busy.store(true, Ordering::Relaxed);
                        self.step(&mut stop_rx).await?;
                        continue;
                    }
                    if !self.progress.scan_complete.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            files_tracked = self.progress.files_tracked.load(Ordering::Relaxed),
                            "initial scan complete; everything acknowledged"
                        );
                    }
                    if self.pending_deletions.values().any(|d| !d.is_empty()) {
                        self.flush_deletions(&mut stop_rx).await?;
                        if !self.queue.is_empty() {
                            continue;
                        }
                    }
                    self.progress.pending_changes.store(0, Ordering::Relaxed);
                    self.progress.busy.store(false, Ordering::Relaxed);
                    if !watching {
                        break;
                    }
                    let rescan_at = last_rescan + DEGRADED_RESCAN;
                    tokio::select! {
                        ev = ev_rx.recv(), if events_open => match ev {
                            Some(ev) => self.on_event(ev, &activity),
                            // No watcher (it could not be created): only rescans.
                            None => events_open = false,
                        },
                        Some(rel) = snap_rx.recv() => self.on_snapshot(rel),
                        _ = stopped(&mut stop_rx) => break,
                        _ = root_tick.tick() => {
                            // Roots that vanish or come back, and acceptances of held sets.
                            self.check_roots()?;
                            if !self.held.is_empty() {
                                self.flush_deletions(&mut stop_rx).await?;
                            }
                        }
                        _ = tokio::time::sleep_until(rescan_at), if self.degraded => {
                            tracing::info!("periodic rescan (some directories are not watched)");
                            last_rescan = Instant::now();
                            self.rescan_all();
                        }
                    }
                }
                Ok::<(), AgentError>(())
            }
            .await;

            drop(_watcher);
            let _ = helpers_tx.send(Some(Instant::now()));
            let _ = hb.await;
            for r in replicas {
                let _ = r.await;
            }
            for e in execs {
                let _ = e.await;
            }
            let _ = writer.await;
            self.progress
                .pending_changes
                .store(self.queue.len() as u64, Ordering::Relaxed);
            self.progress
                .busy
                .store(!self.queue.is_empty(), Ordering::Relaxed);
            let final_status = self.progress.snapshot(
                &self.cfg.agent_id,
                self.client.coordinators.current(),
                None,
                0,
            );
            if let Err(e) = status::write_atomic(&self.cfg.data_dir, &final_status) {
                tracing::warn!(path = %status::path(&self.cfg.data_dir).display(), error = %e, "cannot write status file");
            }
            result?;
            tracing::info!(
                changes_acked = final_status.changes_acked,
                bytes_sent = final_status.bytes_sent,
                "agent stopped"
            );
            Ok(final_status)
        }
        .instrument(span)
        .await
    }

    fn rescan_all(&mut self) {
        for i in 0..self.watched_roots {
            self.queue.push_back(Work::scan_root(i));
        }
    }

    /// Queues a finished snapshot file (e.g. `<source>/<ts>.snap` below the snapshot root). If it
    /// is gone by the time it is planned (acknowledged and removed meanwhile), nothing is sent.
    fn queue_snapshot(&mut self, root: usize, rel: String) {
        self.queue.push_back(Work::Path {
            root,
            rel,
            rename_from: None,
            walk: false,
            sweep: false,
        });
    }

    fn on_snapshot(&mut self, rel: String) {
        if self.expired_wal.contains(&rel) {
            tracing::debug!(file = %rel, "not shipping a WAL file retention expired");
            let _ =
                std::fs::remove_file(crate::snapshot::snapshots_dir(&self.cfg.data_dir).join(&rel));
            return;
        }
        if let Some(root) = self.snap_root {
            self.progress.busy.store(true, Ordering::Relaxed);
            self.queue_snapshot(root, rel);
        }
    }

    fn on_event(&mut self, ev: WatchEvent, activity: &Activity) {
        self.progress.busy.store(true, Ordering::Relaxed);
        self.progress
            .last_event_ms
            .store(lifeboat_common::now_ms(), Ordering::Relaxed);
        match ev {
            WatchEvent::Dirty(p) => self.dirty(&p, None),
            WatchEvent::Renamed { from, to } => {
                self.dirty(&from, None);
                let from_wire = self
                    .roots
                    .locate(&from)
                    .ok()
                    .map(|(r, rel)| self.roots.wire_path(r, &rel));
                self.dirty(&to, from_wire);
            }
            WatchEvent::Rescan(p) => {
                let root = p.and_then(|p| self.roots.locate(&p).ok()).map(|(r, _)| r);
                match root {
                    Some(r) => {
                        tracing::info!(root = %self.roots.roots[r].path.display(), "events lost; rescanning root");
                        self.queue.push_back(Work::scan_root(r));
                    }
                    None => {
                        tracing::info!("events lost; rescanning every root");
                        self.rescan_all();
                    }
                }
            }
            WatchEvent::LimitReached => {
                if !self.degraded {
                    tracing::warn!("{}", watch::LIMIT_HINT);
                }
                self.degraded = true;
            }
        }
        activity.queued.fetch_sub(1, Ordering::Relaxed);
    }

    fn dirty(&mut self, p: &std::path::Path, rename_from: Option<String>) {
        match self.roots.locate(p) {
            Ok((root, rel)) => {
                let parent = rel.rsplit_once('/').map(|(d, _)| d.to_string());
                let is_root = rel.is_empty();
                self.queue.push_back(Work::Path {
                    root,
                    rel,
                    rename_from,
                    walk: true,
                    sweep: true,
                });
                if !is_root {
                    // The parent's mtime changed too.
                    self.queue.push_back(Work::Path {
                        root,
                        rel: parent.unwrap_or_default(),
                        rename_from: None,
                        walk: false,
                        sweep: false,
                    });
                }
            }
            Err(Unmapped::Outside) => {}
            Err(Unmapped::BadName(n)) => {
                tracing::warn!(path = %n, "skipping path that cannot be replicated (not UTF-8 or not a valid relative path)");
            }
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.cfg.batch_max_bytes,
            max_changes: self.cfg.batch_max_changes,
            part_size: self.opts.part_size,
            retain_bytes: self.opts.retain_bytes.min(self.cfg.batch_max_bytes),
        }
    }

    /// Plans one batch and pushes it until it is acknowledged (or shutdown's grace runs out).
    async fn step(&mut self, stop: &mut StopRx) -> Result<(), AgentError> {
        self.check_roots()?;
        let mut queue = std::mem::take(&mut self.queue);
        let (roots, state, limits, mut next) = (
            self.roots.clone(),
            self.state.clone(),
            self.limits(),
            self.next_change_id,
        );
        let (queue, next, planned) = blocking(move || {
            let r = build_batch(&mut queue, &roots, &state, limits, &mut next);
            (queue, next, r)
        })
        .await?;
        self.queue = queue;
        self.next_change_id = next;
        let mut batch = planned?;
        // Deletions under `[[paths]]` roots wait for the guard (`flush_deletions`).
        let watched = self.watched_roots;
        let mut i = 0;
        while i < batch.len() {
            if batch[i].deleted && batch[i].root < watched {
                let c = batch.remove(i);
                self.pending_deletions
                    .entry(c.root)
                    .or_default()
                    .insert(c.path.clone(), c);
            } else {
                i += 1;
            }
        }
        self.progress
            .pending_changes
            .store((self.queue.len() + batch.len()) as u64, Ordering::Relaxed);
        if batch.is_empty() {
            return Ok(());
        }
        self.send(batch, stop).await
    }

    /// The roots' directories that exist now (the ones a watcher can cover).
    fn existing_root_dirs(&self) -> Vec<std::path::PathBuf> {
        self.roots
            .roots
            .iter()
            .map(|r| r.path.clone())
            .filter(|p| p.is_dir())
            .collect()
    }

    /// Looks at every `[[paths]]` root (see [`crate::files::guard`]): records the identity of a root
    /// seen for the first time; blocks the planning of a missing or replaced root (dropping its
    /// pending deletions) and reports it; adopts a replaced root on an operator's acceptance;
    /// unblocks and rescans a root that is healthy again.
    ///
    /// Errors: state database failures.
    fn check_roots(&mut self) -> Result<(), AgentError> {
        use crate::files::guard::{self, RootProblem};
        for i in 0..self.watched_roots {
            let (name, path) = (
                self.roots.roots[i].name.clone(),
                self.roots.roots[i].path.clone(),
            );
            let recorded = self.state.root_id(&name)?;
            let mut res = guard::check_dir(&path, recorded);
            if let Err(RootProblem::Replaced { found, .. }) = &res {
                let found = *found;
                if self.state.count_under(&format!("{name}/"))? == 0 {
                    // Nothing acknowledged under it: nothing to protect, adopt it.
                    res = Ok(found);
                } else {
                    match guard::read_acceptance(&self.cfg.data_dir, &name) {
                        Ok(Some(a)) if a.adopt == Some(found) => {
                            tracing::warn!(audit = "accept-deletions", root = %name, by = %a.by, dev = found.0, ino = found.1, "operator adopted the replaced root as the protected directory; deletions it implies are held and need their own acceptance");
                            guard::remove_acceptance(&self.cfg.data_dir, &name);
                            self.progress
                                .accepted_deletions
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(guard::AcceptedDeletions {
                                    root: name.clone(),
                                    hold: String::new(),
                                    deletions: 0,
                                    adopted: format!("{}/{}", found.0, found.1),
                                    by: a.by,
                                    at_ms: lifeboat_common::now_ms(),
                                });
                            self.state.set_root_id(&name, found)?;
                            res = Ok(found);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(root = %name, error = %e, "ignoring an unreadable acceptance file");
                            guard::remove_acceptance(&self.cfg.data_dir, &name);
                        }
                    }
                }
            }
            match res {
                Ok(id) => {
                    if recorded != Some(id) {
                        self.state.set_root_id(&name, id)?;
                    }
                    if self.root_problems[i].take().is_some() {
                        tracing::info!(root = %path.display(), "protected root is healthy again; rescanning it");
                        self.queue.blocked.remove(&i);
                        self.queue.push_back(Work::scan_root(i));
                        self.rewatch = true;
                    }
                }
                Err(p) => {
                    if self.root_problems[i].as_ref() != Some(&p) {
                        tracing::error!(root = %name, problem = p.kind(), "protected root is unhealthy: {p}");
                    }
                    self.root_problems[i] = Some(p);
                    self.queue.blocked.insert(i);
                    self.pending_deletions.remove(&i);
                    self.held.remove(&i);
                }
            }
        }
        self.publish_roots();
        Ok(())
    }

    /// Writes the roots' health and held sets into the progress (status.json, heartbeats).
    fn publish_roots(&self) {
        let roots = (0..self.watched_roots)
            .map(|i| {
                let r = &self.roots.roots[i];
                let p = self.root_problems[i].as_ref();
                crate::files::guard::RootStatus {
                    name: r.name.clone(),
                    path: r.path.display().to_string(),
                    kind: "source".into(),
                    healthy: p.is_none(),
                    problem_kind: p.map(|p| p.kind().to_string()).unwrap_or_default(),
                    problem: p.map(|p| p.to_string()).unwrap_or_default(),
                    held: self.held.get(&i).cloned(),
                }
            })
            .collect();
        *self
            .progress
            .roots
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = roots;
    }

    /// Pushes the pending deletions of every root the mass-deletion guard lets through (see
    /// [`crate::files::guard`]); holds the others, unless an operator accepted exactly the held set.
    /// Deletions whose path exists again (and is included) are dropped first.
    ///
    /// Errors: state database failures.
    async fn flush_deletions(&mut self, stop: &mut StopRx) -> Result<(), AgentError> {
        use crate::files::guard;
        let roots: Vec<usize> = self.pending_deletions.keys().copied().collect();
        for r in roots {
            let Some(mut dels) = self.pending_deletions.remove(&r) else {
                continue;
            };
            if self.root_problems[r].is_some() {
                continue;
            }
            let root = &self.roots.roots[r];
            dels.retain(|_, c| match crate::files::scan::lstat(&c.fs_path) {
                Ok(crate::files::scan::Found::Entry(_)) => !root.filter.includes(&c.rel),
                Ok(_) => true,
                Err(_) => false,
            });
            let name = root.name.clone();
            if dels.is_empty() {
                if self.held.remove(&r).is_some() {
                    tracing::info!(root = %name, "held deletions are gone (the paths exist again)");
                }
                continue;
            }
            let tracked = self.state.count_under(&format!("{name}/"))?;
            let limits =
                guard::Limits::for_root(&self.cfg, self.cfg.paths.iter().find(|p| p.name == name));
            let n = dels.len() as u64;
            if limits.exceeded(n, tracked) {
                let hold = guard::hold_id(&name, dels.keys());
                let accepted = match guard::read_acceptance(&self.cfg.data_dir, &name) {
                    Ok(Some(a)) if a.hold.as_deref() == Some(hold.as_str()) => Some(a),
                    Ok(Some(a)) if a.hold.is_some() => {
                        tracing::warn!(root = %name, accepted = a.hold.as_deref().unwrap_or(""), held = %hold, "the acceptance names another set of deletions than the one held now (it changed); ignored: run accept-deletions again");
                        guard::remove_acceptance(&self.cfg.data_dir, &name);
                        None
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(root = %name, error = %e, "ignoring an unreadable acceptance file");
                        guard::remove_acceptance(&self.cfg.data_dir, &name);
                        None
                    }
                };
                match accepted {
                    Some(a) => {
                        tracing::warn!(audit = "accept-deletions", root = %name, hold = %hold, deletions = n, tracked, by = %a.by, "operator accepted the held mass deletion; pushing it");
                        guard::remove_acceptance(&self.cfg.data_dir, &name);
                        self.progress
                            .accepted_deletions
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(guard::AcceptedDeletions {
                                root: name.clone(),
                                hold,
                                deletions: n,
                                adopted: String::new(),
                                by: a.by,
                                at_ms: lifeboat_common::now_ms(),
                            });
                    }
                    None => {
                        if self.held.get(&r).map(|h| &h.hold) != Some(&hold) {
                            tracing::error!(root = %name, hold = %hold, deletions = n, tracked, max_delete_share = limits.share, max_delete_files = limits.files, "mass deletion held, not pushed: if it is intended, run `lifeboat-agent accept-deletions --config <file> --root {name}`");
                            self.held.insert(
                                r,
                                guard::HeldDeletions {
                                    hold,
                                    deletions: n,
                                    tracked,
                                    sample: dels.keys().take(guard::HELD_SAMPLE).cloned().collect(),
                                },
                            );
                            self.publish_roots();
                        }
                        self.pending_deletions.insert(r, dels);
                        continue;
                    }
                }
            }
            if self.held.remove(&r).is_some() {
                self.publish_roots();
            }
            let list: Vec<PlannedChange> = dels.into_values().collect();
            for chunk in list.chunks(self.cfg.batch_max_changes.max(1)) {
                self.send(chunk.to_vec(), stop).await?;
            }
        }
        self.publish_roots();
        Ok(())
    }

    fn requeue(&mut self, changes: &[PlannedChange]) {
        for c in changes.iter().rev() {
            self.queue.push_front(c.requeue());
        }
    }

    /// Pushes `batch` until acknowledged, following the leader, backing off on failures, resending
    /// full on `base_missing`, and dropping changes the coordinator refuses as invalid.
    async fn send(
        &mut self,
        batch: Vec<PlannedChange>,
        stop: &mut StopRx,
    ) -> Result<(), AgentError> {
        let mut work: VecDeque<(Vec<PlannedChange>, bool)> = VecDeque::from([(batch, false)]);
        let mut backoff = BACKOFF_START;
        let mut redirects = 0u32;
        while let Some((changes, mut force_full)) = work.pop_front() {
            let changes = Arc::new(changes);
            loop {
                let opts = SendOptions {
                    force_full,
                    epoch: self.progress.epoch.load(Ordering::Relaxed),
                };
                tracing::debug!(changes = changes.len(), force_full, leader = %self.client.coordinators.current(), "pushing batch");
                let call = self
                    .client
                    .push(changes.clone(), opts, self.progress.sent.clone());
                let Some(result) = until_deadline(stop, call).await else {
                    tracing::warn!(changes = changes.len(), "shutdown grace over; batch not acknowledged (it will be sent again on restart)");
                    self.requeue(&changes);
                    for (rest, _) in work.iter().rev() {
                        self.requeue(rest);
                    }
                    return Ok(());
                };
                match result {
                    Ok(reply) => {
                        self.acked(&changes, reply).await?;
                        backoff = BACKOFF_START;
                        redirects = 0;
                        break;
                    }
                    Err(PushError::NotLeader { leader }) => {
                        self.client.coordinators.redirect(&leader);
                        redirects += 1;
                        if redirects > 3 {
                            // Coordinators disagree on who leads (election in progress): slow down.
                            sleep_or_stop(stop, &mut backoff).await;
                        }
                    }
                    Err(PushError::BaseMissing(msg)) if !force_full => {
                        tracing::warn!(message = %msg, "coordinator is missing a base blob; resending the batch with every part full");
                        let reused: Vec<BlobHash> = changes
                            .iter()
                            .flat_map(|c| c.parts.iter())
                            .filter(|p| p.body == Body::Reuse)
                            .map(|p| p.hash)
                            .collect();
                        let state = self.state.clone();
                        blocking(move || state.forget_acked_blobs(&reused)).await??;
                        force_full = true;
                    }
                    Err(PushError::Invalid {
                        change_id,
                        message: msg,
                    }) => {
                        let mut rest = (*changes).clone();
                        if let Some(i) = blamed_change(change_id, &rest) {
                            let c = rest.remove(i);
                            tracing::error!(path = %c.path, message = %msg, "coordinator refused the change; dropping it");
                            if !rest.is_empty() {
                                work.push_front((rest, force_full));
                            }
                        } else if rest.len() == 1 {
                            tracing::error!(path = %rest[0].path, message = %msg, "coordinator refused the change; dropping it");
                        } else {
                            // Cannot tell which change: bisect.
                            let second = rest.split_off(rest.len() / 2);
                            work.push_front((second, force_full));
                            work.push_front((rest, force_full));
                        }
                        break;
                    }
                    Err(PushError::Changed { path }) => {
                        tracing::debug!(path = %path.display(), "replanning batch");
                        self.requeue(&changes);
                        break;
                    }
                    Err(e @ (PushError::Transport { .. } | PushError::Tls(_))) => {
                        let failed = self.client.coordinators.current();
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "push failed; trying the next coordinator");
                        self.client.coordinators.rotate(&failed);
                        sleep_or_stop(stop, &mut backoff).await;
                    }
                    Err(PushError::StaleEpoch { current, .. })
                        if current > self.progress.epoch.load(Ordering::Relaxed) =>
                    {
                        // Fenced with an older epoch: adopt the current one and resend at once.
                        self.observe_epoch(current);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "push refused; retrying");
                        sleep_or_stop(stop, &mut backoff).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Records an acknowledged batch in one state transaction and updates the counters.
    async fn acked(
        &mut self,
        changes: &[PlannedChange],
        reply: pb::PushReply,
    ) -> Result<(), AgentError> {
        let seqs: HashMap<u64, u64> = reply.acks.iter().map(|a| (a.change_id, a.seq)).collect();
        let mut records = Vec::with_capacity(changes.len());
        let mut missing = Vec::new();
        let mut spooled = Vec::new();
        let mut completed = std::collections::BTreeSet::new();
        for c in changes {
            match seqs.get(&c.change_id) {
                Some(seq) => {
                    self.unacked.remove(&c.path);
                    records.push(c.acked(*seq));
                    if Some(c.root) == self.snap_root && !c.deleted {
                        spooled.push(c.fs_path.clone());
                        // A sidecar completes a snapshot: apply the source's retention.
                        if c.path.ends_with(".meta.json") {
                            tracing::info!(sidecar = %c.path, seq, "snapshot acknowledged (in the catalog on a majority)");
                            if let Some(src) = c.path.split('/').nth(1) {
                                crate::metrics::snapshot_acked(src);
                                completed.insert(src.to_string());
                            }
                        }
                    }
                }
                None => missing.push(c.clone()),
            }
        }
        let epoch = self.observe_epoch(reply.epoch);
        let n = records.len() as u64;
        let (state, next) = (self.state.clone(), self.next_change_id);
        let tracked = blocking(move || {
            state.commit(&records, epoch, next)?;
            state.count()
        })
        .await??;
        self.progress
            .files_tracked
            .store(tracked, Ordering::Relaxed);
        // Snapshots live in the catalog now; the local copy is no longer needed.
        crate::snapshot::discard_acknowledged(&self.cfg.data_dir, spooled);
        for src in completed {
            self.expire_snapshots(&src).await?;
        }
        self.progress.changes_acked.fetch_add(n, Ordering::Relaxed);
        self.progress.batches_acked.fetch_add(1, Ordering::Relaxed);
        self.progress
            .last_ack_ms
            .store(lifeboat_common::now_ms(), Ordering::Relaxed);
        tracing::debug!(
            changes = n,
            log_index = reply.log_index,
            "batch acknowledged"
        );
        for c in missing {
            let tries = self.unacked.entry(c.path.clone()).or_insert(0);
            *tries += 1;
            if *tries > MAX_UNACKED_RETRIES {
                tracing::error!(path = %c.path, "coordinator keeps replying without acknowledging this change; giving up on it until it changes again");
                self.unacked.remove(&c.path);
            } else {
                tracing::warn!(path = %c.path, change_id = c.change_id, "reply did not acknowledge this change; sending it again");
                self.queue.push_back(c.requeue());
            }
        }
        Ok(())
    }

    /// Applies the retention of database or exec source `source` (see [`crate::snapshot::retention`]):
    /// queues a deletion (tombstone) of every file of each expired snapshot, and of expired WAL.
    ///
    /// Errors: state database failures.
    async fn expire_snapshots(&mut self, source: &str) -> Result<(), AgentError> {
        let Some(root) = self.snap_root else {
            return Ok(());
        };
        let cfg = &self.cfg;
        let found = cfg
            .exec_sources
            .iter()
            .find(|s| s.name == source)
            .map(|s| (&s.retention, false))
            .or_else(|| {
                cfg.redis_sources
                    .iter()
                    .find(|s| s.name == source)
                    .map(|s| (&s.retention, false))
            })
            .or_else(|| {
                cfg.postgres_sources
                    .iter()
                    .find(|s| s.name == source)
                    .map(|s| (&s.retention, true))
            });
        let Some((r, postgres)) = found else {
            return Ok(());
        };
        let Some(policy) = crate::config::retention::resolve(&cfg.retention, r) else {
            return Ok(());
        };
        let (state, src) = (self.state.clone(), source.to_string());
        let meta_dir = crate::sources::postgres::meta_dir(&cfg.data_dir, source);
        let md = meta_dir.clone();
        let plan = blocking(move || {
            crate::snapshot::retention::plan_expiry(&state, &src, &policy, postgres, &md)
        })
        .await??;
        if plan.files.is_empty() {
            return Ok(());
        }
        tracing::info!(
            source,
            expired = ?plan.snapshots,
            kept = plan.kept.len(),
            wal_segments = plan.wal.len(),
            "retention: expiring snapshots from the catalog"
        );
        for id in &plan.snapshots {
            if let Some(ts) = id.rsplit('/').next() {
                let _ = std::fs::remove_file(meta_dir.join(format!("{ts}.tar.meta.json")));
            }
        }
        self.progress.busy.store(true, Ordering::Relaxed);
        let snaps = crate::snapshot::snapshots_dir(&self.cfg.data_dir);
        for rel in plan.files {
            // A local copy (not yet removed after its ack) would make this a no-op, not a
            // tombstone.
            let _ = std::fs::remove_file(snaps.join(&rel));
            if rel.contains("/wal/") {
                self.expired_wal.insert(rel.clone());
            }
            // `sweep`: a deletion request; a missing snapshot file alone is never one.
            self.queue.push_back(Work::Path {
                root,
                rel,
                rename_from: None,
                walk: false,
                sweep: true,
            });
        }
        Ok(())
    }

    /// Raises the highest epoch seen; returns it.
    fn observe_epoch(&self, epoch: u64) -> u64 {
        let prev = self.progress.epoch.fetch_max(epoch, Ordering::Relaxed);
        if epoch > prev {
            self.span.record("epoch", epoch);
            tracing::info!(epoch, "new epoch");
        }
        prev.max(epoch)
    }
}

/// Runs `fut` unless the shutdown grace runs out first (`None` then).
async fn until_deadline<T>(stop: &mut StopRx, fut: impl Future<Output = T>) -> Option<T> {
    tokio::pin!(fut);
    loop {
        let deadline = *stop.borrow();
        match deadline {
            Some(d) => return tokio::time::timeout_at(d, &mut fut).await.ok(),
            None => {
                tokio::select! {
                    r = &mut fut => return Some(r),
                    _ = stopped(stop) => {}
                }
            }
        }
    }
}

/// Sleeps `backoff` (cut short by the shutdown deadline), then doubles it up to [`BACKOFF_MAX`].
async fn sleep_or_stop(stop: &mut StopRx, backoff: &mut Duration) {
    let mut until = Instant::now() + *backoff;
    if let Some(d) = *stop.borrow() {
        until = until.min(d);
    }
    let _ = until_deadline(stop, tokio::time::sleep_until(until)).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

async fn heartbeat_loop(
    client: Arc<PushClient>,
    progress: Arc<Progress>,
    state: Arc<StateDb>,
    cfg: Arc<Config>,
    mut stop: StopRx,
    agent_span: Span,
    switch: Option<Arc<SwitchCtx>>,
) {
    let every = Duration::from_millis(cfg.heartbeat_ms);
    let agent_id = cfg.agent_id.clone();
    let mut roles = switch.as_ref().map(|s| s.roles.clone()).unwrap_or_default();
    let mut resolvers: Option<Vec<tokio::task::JoinHandle<()>>> = None;
    let db_roles = crate::roles::databases::DbRoles::new(&cfg);
    // Highest epoch known durable. The in-memory epoch may be ahead of it (learned from a push
    // reply or a `stale_epoch` refusal): a database order is applied only once its epoch is
    // persisted, so that after a restart no older order is obeyed (rule 3).
    let mut persisted = state.epoch().unwrap_or(0);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // A database role order finished: report its outcome now, not at the next tick.
            _ = db_roles.changed().notified() => tick.reset(),
            _ = stopped(&mut stop) => break,
        }
        let sent = &progress.sent;
        let mut checks = crate::checks::run_all(&cfg).await;
        checks.extend(progress.root_checks());
        *progress.checks.lock().unwrap_or_else(|e| e.into_inner()) = checks
            .iter()
            .map(|c| crate::status::CheckStatus {
                name: c.name.clone(),
                ok: c.ok,
                detail: c.detail.clone(),
            })
            .collect();
        let req = pb::HeartbeatRequest {
            agent_id: agent_id.clone(),
            epoch: progress.epoch.load(Ordering::Relaxed),
            files_tracked: progress.files_tracked.load(Ordering::Relaxed),
            pending_changes: progress.pending_changes.load(Ordering::Relaxed),
            bytes_sent: sent.full.load(Ordering::Relaxed) + sent.delta.load(Ordering::Relaxed),
            changes_acked: progress.changes_acked.load(Ordering::Relaxed),
            checks,
            db_roles: db_roles.outcomes(),
            probe: false,
        };
        let result = tokio::select! {
            r = client.heartbeat(req) => r,
            _ = stopped(&mut stop) => break,
        };
        match result {
            Ok(reply) => {
                let prev = progress.epoch.fetch_max(reply.epoch, Ordering::Relaxed);
                if reply.epoch > prev {
                    agent_span.record("epoch", reply.epoch);
                    tracing::info!(epoch = reply.epoch, "new epoch (heartbeat)");
                }
                if reply.epoch > persisted {
                    let (state, e) = (state.clone(), reply.epoch);
                    match tokio::task::spawn_blocking(move || state.raise_epoch(e)).await {
                        Ok(Ok(())) => persisted = reply.epoch,
                        Ok(Err(err)) => tracing::warn!(error = %err, "cannot persist epoch"),
                        Err(err) => tracing::warn!(error = %err, "cannot persist epoch"),
                    }
                }
                if reply.epoch >= progress.epoch.load(Ordering::Relaxed) && reply.epoch <= persisted
                {
                    db_roles.offer(&cfg, reply.epoch, &reply.active_region);
                    if let Some(sw) = &switch {
                        let order = crate::roles::Order {
                            epoch: reply.epoch,
                            active_region: reply.active_region.clone(),
                            active_coordinators: reply.active_coordinators.clone(),
                        };
                        follow_order(sw, &mut roles, &order, &state).await;
                        if !order.active_region.is_empty() {
                            sw.order_tx.send_replace(Some(order.clone()));
                        }
                        if !order.active_region.is_empty() && resolvers.is_none() {
                            resolvers = Some(spawn_resolvers(&cfg, &state, &stop));
                        }
                    }
                }
                if !reply.leader_addr.is_empty() {
                    client.coordinators.redirect(&reply.leader_addr);
                }
            }
            Err(PushError::NotLeader { leader }) => {
                client.coordinators.redirect(&leader);
            }
            Err(e @ (PushError::Transport { .. } | PushError::Tls(_))) => {
                let failed = client.coordinators.current();
                tracing::debug!(error = %e, "heartbeat failed");
                client.coordinators.rotate(&failed);
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat refused"),
        }
    }
    for h in resolvers.into_iter().flatten() {
        let _ = h.await;
    }
}

/// Applies one order of the control record to the directory roles: records the roles it
/// confirms, and asks for a switch (stopping the loop) when a role must change.
async fn follow_order(
    sw: &SwitchCtx,
    roles: &mut std::collections::BTreeMap<String, crate::files::state::DirRole>,
    order: &crate::roles::Order,
    state: &Arc<StateDb>,
) {
    let rec = crate::roles::unrecorded(&sw.full, roles, order);
    if !rec.is_empty() {
        let (st, r) = (state.clone(), rec.clone());
        match tokio::task::spawn_blocking(move || st.set_roles(&r)).await {
            Ok(Ok(())) => roles.extend(rec),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist directory roles"),
            Err(e) => tracing::warn!(error = %e, "cannot persist directory roles"),
        }
    }
    if !crate::roles::switches(&sw.full, roles, order).is_empty() && Instant::now() >= sw.not_before
    {
        sw.tx.send_if_modified(|o| {
            if o.is_none() {
                *o = Some(order.clone());
                true
            } else {
                false
            }
        });
    }
}

/// Starts, for every source directory that follows the active region, the task writing the
/// versions `lifeboat resolve` commits ([`crate::roles::replica::Mode::Resolved`]).
fn spawn_resolvers(
    cfg: &Config,
    state: &Arc<StateDb>,
    stop: &StopRx,
) -> Vec<tokio::task::JoinHandle<()>> {
    cfg.paths
        .iter()
        .filter(|p| p.follow_active)
        .map(|p| {
            let r = crate::roles::replica::Replica::resolved(
                &p.name,
                p.path.clone(),
                cfg.tls.clone(),
                cfg.coordinators.clone(),
                state.clone(),
            );
            tokio::spawn(r.run(stop.clone()).in_current_span())
        })
        .collect()
}

async fn status_loop(
    progress: Arc<Progress>,
    client: Arc<PushClient>,
    agent_id: String,
    dir: std::path::PathBuf,
    activity: Option<Arc<Activity>>,
    quiet_ms: i64,
    mut stop: StopRx,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(STATUS_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Status> = None;
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut stop) => return,
        }
        let s = progress.snapshot(
            &agent_id,
            client.coordinators.current(),
            activity.as_deref(),
            quiet_ms,
        );
        let same = last.as_ref().is_some_and(|l| {
            Status {
                updated_ms: s.updated_ms,
                ..l.clone()
            } == s
                && s.updated_ms - l.updated_ms < STATUS_REFRESH_MS
        });
        if same {
            continue;
        }
        let (d, snap) = (dir.clone(), s.clone());
        match tokio::task::spawn_blocking(move || status::write_atomic(&d, &snap)).await {
            Ok(Ok(())) => last = Some(s),
            Ok(Err(e)) if !warned => {
                warned = true;
                tracing::warn!(path = %status::path(&dir).display(), error = %e, "cannot write status file");
            }
            _ => {}
        }
    }
}
