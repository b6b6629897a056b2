//! The snapshot pipeline shared by every source: the spool ([`spool`]), the upload of its parts
//! while it is written ([`preupload`], [`block`]), retention of acknowledged snapshots
//! ([`retention`]), and the directories, schedule and sealing every source uses (below).
//! Snapshots are written under [`snapshots_dir`], the reserved root
//! [`SNAPSHOTS_ROOT`](crate::config::SNAPSHOTS_ROOT), and sent as regular changes.

pub mod block;
pub mod preupload;
pub mod retention;
pub mod spool;

use std::path::{Path, PathBuf};
use std::time::Duration;
/// Directory (under `data_dir`) holding finished snapshots until they are acknowledged.
pub fn snapshots_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Directory (under `data_dir`) where command output is spooled.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

/// Directory (under `data_dir`, on the same filesystem as [`snapshots_dir`]) where
/// acknowledged snapshot files wait to be unlinked by [`discard_acknowledged`].
pub fn trash_dir(data_dir: &Path) -> PathBuf {
    spool_dir(data_dir).join("trash")
}

/// Removes acknowledged snapshot files (`paths`, under [`snapshots_dir`]) without making the
/// caller wait for the unlink: unlinking a freshly written 1 GB file takes about 0.2 s on the
/// test machines, which held up the next batch (a WAL segment) for as long.
///
/// Each file is first renamed into [`trash_dir`] under a unique name (cheap, and a later file
/// of the same name can then never be hit by the delayed unlink), then a blocking task unlinks
/// the trash. Where the rename fails (the trash on another filesystem, say) the file is
/// removed here and now. Leftovers of a crash are removed by the next call. Failures are
/// logged, never returned: the files are in the catalog already.
pub fn discard_acknowledged(data_dir: &Path, paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let trash = trash_dir(data_dir);
    let _ = std::fs::create_dir_all(&trash);
    for p in paths {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let to = trash.join(format!(
            "{}-{}-{n}",
            std::process::id(),
            lifeboat_common::now_ms()
        ));
        if std::fs::rename(&p, &to).is_err() {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove an acknowledged snapshot file");
                }
            }
        }
    }
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _g = span.enter();
        let Ok(rd) = std::fs::read_dir(&trash) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %e.path().display(), error = %err, "cannot remove an acknowledged snapshot file");
                }
            }
        }
    });
}

/// Time until the next snapshot of a source with `interval` seconds or a cron `schedule`:
/// zero the first time with an interval, else the interval or the next cron match (UTC).
pub(crate) fn next_delay(interval: Option<u64>, schedule: Option<&str>, first: bool) -> Duration {
    if let Some(s) = interval {
        return if first {
            Duration::ZERO
        } else {
            Duration::from_secs(s)
        };
    }
    let Some(cron) = schedule.and_then(|c| crate::config::parse_cron(c).ok()) else {
        return Duration::from_secs(3600);
    };
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    match cron.find_next_occurrence(&now, false) {
        Ok(t) => Duration::from_millis(
            (t.timestamp().as_millisecond() - now.timestamp().as_millisecond()).max(1000) as u64,
        ),
        Err(e) => {
            tracing::error!(schedule = ?schedule, error = %e, "no next cron occurrence; retrying in an hour");
            Duration::from_secs(3600)
        }
    }
}

/// Completes a spool: writes its last block and fsyncs it, then finishes the pre-upload of its
/// parts (see [`crate::snapshot::spool::SpoolFile::finish`]). Returns the bytes written and their blake3.
///
/// Errors: write or fsync failures, naming `spool`.
pub async fn seal_spool(
    file: crate::snapshot::spool::SpoolFile,
    spool: &Path,
) -> Result<(u64, blake3::Hash), String> {
    file.finish()
        .await
        .map_err(|e| format!("cannot write {}: {e}", spool.display()))
}

/// Asks the kernel for a 1 MiB pipe buffer on a child's stdout (default 64 KiB), so a dump tool
/// can run ahead while the spool writes; failures are ignored (the default still works).
pub fn widen_pipe(out: &tokio::process::ChildStdout) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a file descriptor we own for the duration of the call; no memory passed.
    unsafe {
        libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 1024 * 1024);
    }
}
