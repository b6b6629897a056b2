//! Exec snapshot sources (`[[exec_sources]]`): runs a command on a schedule, streams its stdout
//! into `data_dir/spool/<name>.tmp` (never whole in memory) and, when it exits 0 within its
//! timeout, moves the spool to `data_dir/snapshots/<name>/<UTC timestamp>.snap` (mode 0600). The
//! agent then sends that file as a regular change of the reserved root
//! [`SNAPSHOTS_ROOT`](crate::config::SNAPSHOTS_ROOT) and removes it once acknowledged.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{Config, ExecSourceConfig};

/// Directory (under `data_dir`) holding finished snapshots until they are acknowledged.
pub fn snapshots_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Directory (under `data_dir`) where command output is spooled.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("spool")
}

/// Finished snapshots left from an earlier run (not yet acknowledged), as paths relative to
/// [`snapshots_dir`] (`<source>/<timestamp>.snap`).
pub fn leftovers(cfg: &Config) -> Vec<String> {
    let dir = snapshots_dir(&cfg.data_dir);
    let mut out = Vec::new();
    for s in &cfg.exec_sources {
        let Ok(rd) = std::fs::read_dir(dir.join(&s.name)) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".snap"))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| format!("{}/{n}", s.name)));
    }
    out
}

/// Starts one task per source; each sends the relative path (`<source>/<timestamp>.snap`) of every
/// successful snapshot on `tx`. Tasks end when `stop` asks for shutdown (a running command is
/// killed).
pub fn spawn_all(
    cfg: &Config,
    tx: mpsc::UnboundedSender<String>,
    stop: watch::Receiver<Option<Instant>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    cfg.exec_sources
        .iter()
        .map(|s| {
            let span = tracing::info_span!("exec_source", source = %s.name);
            tokio::spawn(
                source_loop(s.clone(), cfg.data_dir.clone(), tx.clone(), stop.clone())
                    .instrument(span),
            )
        })
        .collect()
}

async fn source_loop(
    src: ExecSourceConfig,
    data_dir: PathBuf,
    tx: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(src.interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|d| d.is_some()) => return,
        }
        let r = tokio::select! {
            r = take_snapshot(&src, &data_dir) => r,
            // Dropping the future kills the child (kill_on_drop).
            _ = stop.wait_for(|d| d.is_some()) => return,
        };
        match r {
            Ok((rel, bytes)) => {
                tracing::info!(snapshot = %rel, bytes, "exec snapshot taken");
                if tx.send(rel).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(source = %src.name, command = ?src.snapshot_command, error = %e, "exec snapshot failed; no snapshot recorded");
            }
        }
    }
}

/// Runs the snapshot command once. Returns the snapshot's path relative to [`snapshots_dir`] and
/// its size.
///
/// Errors: the command cannot start, exits non-zero, or runs past `timeout_secs`; I/O errors on
/// the spool or snapshot files.
pub async fn take_snapshot(
    src: &ExecSourceConfig,
    data_dir: &Path,
) -> Result<(String, u64), String> {
    let spool_dir = spool_dir(data_dir);
    tokio::fs::create_dir_all(&spool_dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", spool_dir.display()))?;
    let spool = spool_dir.join(format!("{}.tmp", src.name));
    let result = spool_command(src, &spool).await;
    let bytes = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(e);
        }
    };
    let ts = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let rel = format!("{}/{ts}.snap", src.name);
    let dest = snapshots_dir(data_dir).join(&rel);
    let parent = dest.parent().unwrap_or(data_dir).to_path_buf();
    let moved = async {
        tokio::fs::create_dir_all(&parent).await?;
        tokio::fs::rename(&spool, &dest).await
    }
    .await;
    if let Err(e) = moved {
        let _ = tokio::fs::remove_file(&spool).await;
        return Err(format!(
            "cannot move the snapshot to {}: {e}",
            dest.display()
        ));
    }
    Ok((rel, bytes))
}

/// Streams the command's stdout into `spool` (mode 0600, fsync'd). Returns the byte count.
async fn spool_command(src: &ExecSourceConfig, spool: &Path) -> Result<u64, String> {
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", spool.display());
    let mut file = tokio::fs::File::create(spool)
        .await
        .map_err(|e| io("cannot create", e))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(|e| io("cannot chmod", e))?;
    let mut child = tokio::process::Command::new(&src.snapshot_command[0])
        .args(&src.snapshot_command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", src.snapshot_command[0]))?;
    let Some(mut out) = child.stdout.take() else {
        return Err("no stdout pipe".into());
    };
    let limit = Duration::from_secs(src.timeout_secs);
    let run = tokio::time::timeout(limit, async {
        let n = tokio::io::copy(&mut out, &mut file)
            .await
            .map_err(|e| io("cannot write", e))?;
        let status = child
            .wait()
            .await
            .map_err(|e| format!("cannot wait for the command: {e}"))?;
        Ok::<_, String>((n, status))
    })
    .await;
    let (n, status) = match run {
        Ok(r) => r?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(format!(
                "timed out after {} s (timeout_secs); the command was killed",
                src.timeout_secs
            ));
        }
    };
    if !status.success() {
        return Err(format!("command exited with {status}"));
    }
    file.sync_all().await.map_err(|e| io("cannot fsync", e))?;
    Ok(n)
}
