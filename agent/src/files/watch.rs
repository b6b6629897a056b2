//! Recursive file watching (notify 8 + notify-debouncer-full 0.7), forwarded into a tokio channel
//! as [`WatchEvent`]s. Symlinks are never followed. Every event only means "this path (and, for a
//! directory, its subtree) is dirty": the planner compares it with the state.
//!
//! The watcher is wrapped ([`ActivityWatcher`]) so that raw, not yet debounced events are noticed
//! at once: the agent is not `idle` while the debouncer still holds events.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify_debouncer_full::notify::{
    self, Event, EventHandler, EventKind, RecommendedWatcher, RecursiveMode, Watcher, WatcherKind,
};
use notify_debouncer_full::{new_debouncer_opt, DebounceEventResult, Debouncer, NoCache};
use tokio::sync::mpsc::UnboundedSender;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// This path (and its subtree if it is a directory) may have changed.
    Dirty(PathBuf),
    /// `from` was renamed to `to` (both known to the watcher).
    Renamed {
        /// Old path.
        from: PathBuf,
        /// New path.
        to: PathBuf,
    },
    /// Events were lost (queue overflow or a watcher error): rescan the root holding the path, or
    /// every root.
    Rescan(Option<PathBuf>),
    /// The OS watch limit was reached; some directories are not watched.
    LimitReached,
}

/// Errors of watcher setup.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The OS watcher could not be created.
    #[error("cannot create the file watcher: {0}")]
    Create(#[from] notify::Error),
}

/// Watcher activity shared with the status writer.
#[derive(Debug, Default)]
pub struct Activity {
    /// Time of the last raw event that may matter (not an access, not in the agent's data dir),
    /// ms since the Unix epoch.
    pub last_raw_ms: AtomicI64,
    /// Events sent on the channel and not yet taken by the agent.
    pub queued: AtomicI64,
    ignore: PathBuf,
}

impl Activity {
    /// Activity tracking that ignores events under `ignore` (the agent's data dir).
    pub fn new(ignore: PathBuf) -> Activity {
        Activity {
            ignore,
            ..Activity::default()
        }
    }

    fn observe(&self, res: &notify::Result<Event>) {
        let relevant = match res {
            Ok(e) => interesting(&e.kind) && e.paths.iter().any(|p| !p.starts_with(&self.ignore)),
            Err(_) => true,
        };
        if relevant {
            self.last_raw_ms
                .store(lifeboat_common::now_ms(), Ordering::Relaxed);
        }
    }
}

/// Whether an event kind can mean a change (opens, reads and read-only closes cannot).
fn interesting(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

thread_local! {
    static NEXT_ACTIVITY: RefCell<Option<Arc<Activity>>> = const { RefCell::new(None) };
}

/// The platform watcher, noting raw event times in an [`Activity`] before the debouncer sees them.
pub struct ActivityWatcher(RecommendedWatcher);

impl Watcher for ActivityWatcher {
    fn new<F: EventHandler>(mut handler: F, config: notify::Config) -> notify::Result<Self> {
        // `new_debouncer_opt` constructs the watcher synchronously on the calling thread.
        let activity = NEXT_ACTIVITY.with(|a| a.borrow_mut().take());
        let inner = RecommendedWatcher::new(
            move |res: notify::Result<Event>| {
                if let Some(a) = &activity {
                    a.observe(&res);
                }
                handler.handle_event(res);
            },
            config,
        )?;
        Ok(ActivityWatcher(inner))
    }
    fn watch(&mut self, path: &Path, recursive_mode: RecursiveMode) -> notify::Result<()> {
        self.0.watch(path, recursive_mode)
    }
    fn unwatch(&mut self, path: &Path) -> notify::Result<()> {
        self.0.unwatch(path)
    }
    fn configure(&mut self, option: notify::Config) -> notify::Result<bool> {
        self.0.configure(option)
    }
    fn kind() -> WatcherKind {
        RecommendedWatcher::kind()
    }
}

/// A running watcher; dropping it stops watching.
pub struct FsWatcher {
    _debouncer: Debouncer<ActivityWatcher, NoCache>,
    /// Some directory could not be watched (limit reached or error): changes there are only found
    /// by rescans.
    pub incomplete: bool,
}

/// Log line for the inotify limit.
pub const LIMIT_HINT: &str = "file watch limit reached: some directories are not watched and are only checked by periodic rescans; raise it with `sysctl fs.inotify.max_user_watches=524288` (and fs.inotify.max_user_instances)";

fn convert(ev: &notify_debouncer_full::DebouncedEvent, ignore: &Path) -> Vec<WatchEvent> {
    if ev.need_rescan() {
        return vec![WatchEvent::Rescan(None)];
    }
    if !interesting(&ev.kind) {
        return vec![];
    }
    let keep = |p: &PathBuf| !p.starts_with(ignore);
    match (&ev.kind, ev.paths.as_slice()) {
        (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), [from, to]) => {
            match (keep(from), keep(to)) {
                (true, true) => vec![WatchEvent::Renamed {
                    from: from.clone(),
                    to: to.clone(),
                }],
                (true, false) => vec![WatchEvent::Dirty(from.clone())],
                (false, true) => vec![WatchEvent::Dirty(to.clone())],
                (false, false) => vec![],
            }
        }
        _ => ev
            .paths
            .iter()
            .filter(|p| keep(p))
            .map(|p| WatchEvent::Dirty(p.clone()))
            .collect(),
    }
}

/// Starts watching `dirs` recursively (symlinks not followed) with a debounce window of
/// `debounce`; events go to `tx`, raw activity to `activity`.
///
/// Errors: [`WatchError`] if the OS watcher cannot be created at all. Directories that cannot be
/// watched are logged and reported through [`FsWatcher::incomplete`].
pub fn start(
    dirs: &[PathBuf],
    debounce: Duration,
    activity: Arc<Activity>,
    tx: UnboundedSender<WatchEvent>,
) -> Result<FsWatcher, WatchError> {
    let ignore = activity.ignore.clone();
    let act = activity.clone();
    let send = move |e: WatchEvent| {
        act.queued.fetch_add(1, Ordering::Relaxed);
        if tx.send(e).is_err() {
            act.queued.fetch_sub(1, Ordering::Relaxed);
        }
    };
    let handler = move |res: DebounceEventResult| match res {
        Ok(events) => {
            for ev in &events {
                for e in convert(ev, &ignore) {
                    send(e);
                }
            }
        }
        Err(errors) => {
            for err in errors {
                if matches!(err.kind, notify::ErrorKind::MaxFilesWatch) {
                    send(WatchEvent::LimitReached);
                    send(WatchEvent::Rescan(err.paths.first().cloned()));
                } else {
                    tracing::warn!(error = %err, "file watcher error; rescanning");
                    send(WatchEvent::Rescan(err.paths.first().cloned()));
                }
            }
        }
    };
    NEXT_ACTIVITY.with(|a| *a.borrow_mut() = Some(activity));
    let config = notify::Config::default().with_follow_symlinks(false);
    let created =
        new_debouncer_opt::<_, ActivityWatcher, NoCache>(debounce, None, handler, NoCache, config);
    NEXT_ACTIVITY.with(|a| *a.borrow_mut() = None);
    let mut debouncer = created?;
    let mut incomplete = false;
    for d in dirs {
        let mut result = debouncer.watch(d, RecursiveMode::Recursive);
        // A directory vanishing while the watches are added fails the whole call: try again.
        for _ in 0..3 {
            match &result {
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) && d.is_dir() => {
                    result = debouncer.watch(d, RecursiveMode::Recursive);
                }
                _ => break,
            }
        }
        match result {
            Ok(()) => tracing::debug!(path = %d.display(), "watching"),
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                tracing::warn!(path = %d.display(), "{LIMIT_HINT}");
                incomplete = true;
            }
            Err(e) => {
                tracing::error!(path = %d.display(), error = %e, "cannot watch directory; changes are only found by periodic rescans");
                incomplete = true;
            }
        }
    }
    Ok(FsWatcher {
        _debouncer: debouncer,
        incomplete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_changes_and_renames() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let ignore = root.join("state");
        std::fs::create_dir(&ignore).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let act = Arc::new(Activity::new(ignore.clone()));
        let _w = start(
            std::slice::from_ref(&root),
            Duration::from_millis(50),
            act.clone(),
            tx,
        )
        .unwrap();
        std::fs::write(ignore.join("status.json"), b"{}").unwrap();
        std::fs::write(root.join("a"), b"1").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::rename(root.join("a"), root.join("sub/b")).unwrap();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !got.contains(&WatchEvent::Renamed {
            from: root.join("a"),
            to: root.join("sub/b"),
        }) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(e)) => got.push(e),
                _ => panic!("no rename event; got {got:?}"),
            }
        }
        assert!(got.contains(&WatchEvent::Dirty(root.join("a"))), "{got:?}");
        assert!(got.iter().all(|e| match e {
            WatchEvent::Dirty(p) => !p.starts_with(&ignore),
            _ => true,
        }));
        assert!(act.last_raw_ms.load(Ordering::Relaxed) > 0);
    }
}
