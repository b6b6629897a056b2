//! Exec snapshot sources (`[[exec_sources]]`): runs a command every `interval_secs` or at the
//! times of a cron `schedule`, streams its stdout into `data_dir/spool/<name>.tmp` (never whole in
//! memory, hashed with blake3 on the way) and, when it exits 0 within its timeout, moves the spool
//! to `data_dir/snapshots/<name>/<UTC ts>.snap` (mode 0600, ts with milliseconds, unique per
//! source) and writes its sidecar [`ExecSnapshotMeta`] as `<UTC ts>.snap.meta.json`. The agent
//! then sends both as regular changes of the reserved root
//! [`SNAPSHOTS_ROOT`](crate::config::SNAPSHOTS_ROOT) and removes them once acknowledged.
//! Snapshot id: `<name>/<UTC ts>`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{Config, ExecSourceConfig};
use crate::snapshot::{next_delay, seal_spool, snapshots_dir, spool_dir, widen_pipe};
use crate::sources::{Pipeline, SnapshotSource};

/// The JSON sidecar `_snapshots/<id>.snap.meta.json` of an exec snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSnapshotMeta {
    /// Snapshot id `<source>/<UTC ts>`.
    pub id: String,
    /// Source name.
    pub source: String,
    /// `"exec"`.
    pub kind: String,
    /// When the command started / ended, ms since the Unix epoch.
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// Snapshot size in bytes.
    pub bytes: u64,
    /// blake3 of the snapshot, hex.
    pub blake3: String,
    /// Control epoch the agent had seen (0 if unknown).
    pub epoch: u64,
}

/// Finished snapshots and sidecars of `src` left from an earlier run (not yet acknowledged), as
/// paths relative to [`snapshots_dir`] (`<source>/<ts>.snap`, `<source>/<ts>.snap.meta.json`),
/// oldest first, each snapshot before its sidecar.
fn leftovers(src: &ExecSourceConfig, data_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(snapshots_dir(data_dir).join(&src.name)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".snap") || n.ends_with(".snap.meta.json"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| format!("{}/{n}", src.name))
        .collect()
}

/// An `[[exec_sources]]` entry as a [`SnapshotSource`]: one task that sends the relative paths
/// (`<source>/<ts>.snap`, then its sidecar) of every successful snapshot. The epoch in
/// `progress` is recorded in the sidecar. The task ends when `stop` asks for shutdown (a running
/// command is killed).
impl SnapshotSource for ExecSourceConfig {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn leftovers(&self, data_dir: &Path) -> Vec<String> {
        leftovers(self, data_dir)
    }

    fn spawn(&self, cfg: &Config, pipe: &Pipeline) -> Vec<JoinHandle<()>> {
        let span = tracing::info_span!("exec_source", source = %self.name);
        vec![tokio::spawn(
            source_loop(
                self.clone(),
                cfg.data_dir.clone(),
                pipe.progress.clone(),
                pipe.tx.clone(),
                pipe.stop.clone(),
                pipe.uploader.clone(),
            )
            .instrument(span),
        )]
    }
}

async fn source_loop(
    src: ExecSourceConfig,
    data_dir: PathBuf,
    progress: std::sync::Arc<crate::status::Progress>,
    tx: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<Option<Instant>>,
    uploader: Option<crate::snapshot::preupload::Uploader>,
) {
    let interval = src.schedule.is_none().then(|| src.interval());
    let mut first = true;
    loop {
        let delay = next_delay(interval, src.schedule.as_deref(), first);
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|d| d.is_some()) => return,
        }
        let epoch = progress.epoch.load(std::sync::atomic::Ordering::Relaxed);
        let r = tokio::select! {
            r = take_snapshot_with(&src, &data_dir, epoch, uploader.as_ref()) => r,
            // Dropping the future kills the child (kill_on_drop).
            _ = stop.wait_for(|d| d.is_some()) => return,
        };
        match r {
            Ok(meta) => {
                tracing::info!(snapshot = %meta.id, bytes = meta.bytes, "exec snapshot taken");
                let snap = format!("{}.snap", meta.id);
                let side = format!("{snap}.meta.json");
                if tx.send(snap).is_err() || tx.send(side).is_err() {
                    return;
                }
            }
            Err(e) => {
                crate::metrics::snapshot_failed(&src.name);
                tracing::error!(source = %src.name, command = ?src.snapshot_command, error = %e, "exec snapshot failed; no snapshot recorded");
            }
        }
    }
}

/// Runs the snapshot command once and places the snapshot and its sidecar in
/// `snapshots_dir/<name>/` (`epoch` recorded in the sidecar). Returns the sidecar.
///
/// Errors: the command cannot start, exits non-zero, or runs past `timeout_secs`; I/O errors on
/// the spool or snapshot files.
pub async fn take_snapshot(
    src: &ExecSourceConfig,
    data_dir: &Path,
    epoch: u64,
) -> Result<ExecSnapshotMeta, String> {
    take_snapshot_with(src, data_dir, epoch, None).await
}

/// [`take_snapshot`], uploading the output's parts to the region's leader while the command
/// writes them when `uploader` is given (see [`crate::snapshot::preupload`]).
///
/// Errors: as [`take_snapshot`].
pub async fn take_snapshot_with(
    src: &ExecSourceConfig,
    data_dir: &Path,
    epoch: u64,
    uploader: Option<&crate::snapshot::preupload::Uploader>,
) -> Result<ExecSnapshotMeta, String> {
    let start_ms = lifeboat_common::now_ms();
    let spool_dir = spool_dir(data_dir);
    tokio::fs::create_dir_all(&spool_dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", spool_dir.display()))?;
    let spool = spool_dir.join(format!("{}.tmp", src.name));
    let up = uploader.map_or_else(crate::snapshot::preupload::Preupload::disabled, |u| {
        u.start()
    });
    let result = spool_command(src, &spool, up).await;
    let (bytes, hash) = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(e);
        }
    };
    let parent = snapshots_dir(data_dir).join(&src.name);
    let (ts, _) = crate::snapshot::retention::unique_ts(&parent, start_ms);
    let meta = ExecSnapshotMeta {
        id: format!("{}/{ts}", src.name),
        source: src.name.clone(),
        kind: "exec".into(),
        start_ms,
        end_ms: lifeboat_common::now_ms(),
        bytes,
        blake3: hash.to_hex().to_string(),
        epoch,
    };
    let dest = parent.join(format!("{ts}.snap"));
    let side = parent.join(format!("{ts}.snap.meta.json"));
    let moved = async {
        tokio::fs::create_dir_all(&parent).await?;
        tokio::fs::rename(&spool, &dest).await?;
        let json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
        let tmp = spool_dir.join(format!("{}.meta.tmp", src.name));
        let mut f = tokio::fs::File::create(&tmp).await?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .await?;
        f.write_all(&json).await?;
        f.sync_all().await?;
        drop(f);
        tokio::fs::rename(&tmp, &side).await
    }
    .await;
    if let Err(e) = moved {
        let _ = tokio::fs::remove_file(&spool).await;
        let _ = tokio::fs::remove_file(&dest).await;
        return Err(format!(
            "cannot move the snapshot to {}: {e}",
            dest.display()
        ));
    }
    Ok(meta)
}

/// Streams the command's stdout into `spool` (mode 0600, fsync'd), hashing it. Returns the byte
/// count and the blake3.
async fn spool_command(
    src: &ExecSourceConfig,
    spool: &Path,
    up: crate::snapshot::preupload::Preupload,
) -> Result<(u64, blake3::Hash), String> {
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", spool.display());
    let mut file = crate::snapshot::spool::SpoolFile::create(spool, up)
        .await
        .map_err(|e| io("cannot create", e))?;
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
    widen_pipe(&out);
    let limit = Duration::from_secs(src.timeout_secs);
    let run = tokio::time::timeout(limit, async {
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let k = out
                .read(&mut buf)
                .await
                .map_err(|e| io("cannot read the output for", e))?;
            if k == 0 {
                break;
            }
            file.write(&buf[..k])
                .await
                .map_err(|e| io("cannot write", e))?;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| format!("cannot wait for the command: {e}"))?;
        Ok::<_, String>(status)
    })
    .await;
    let status = match run {
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
    seal_spool(file, spool).await
}
