//! `lifeboat keys`: encryption at rest (see `docs/encryption.md`). `init` writes a new master
//! key file; `rotate` and `status` call `AdminService.RotateDataKey` / `DataKeyStatus` (admin
//! role) on every coordinator, since each one holds its own repository (its local blob
//! directory) or shares the region's S3 bucket.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use lifeboat_client::conn::{admin_client, ConnArgs};
use lifeboat_proto::{
    DataKeyStatusReply, DataKeyStatusRequest, RotateDataKeyRequest, StatusRequest,
};

use crate::outln;

/// `lifeboat keys ...`.
#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Write a new random 256-bit master key to PATH (64 hex characters, mode 0600, never over
    /// an existing file); point `[encryption] master_key_file` of every coordinator of a region
    /// at a copy of it.
    Init {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Start a new data key for new writes on every coordinator (the ones given with
    /// --coordinator plus the members the first one lists). Blobs sealed with older keys stay
    /// readable. Needs the admin role. The master key is not changed (no rewrap).
    Rotate {
        /// Coordinators and TLS files.
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Offline, on a stopped coordinator's local blob directory: rewrap every data key file
    /// (`<store>/keys/<id>`) from the master key in --old-key to the one in --new-key (blobs are
    /// untouched), then point `[encryption]` at the new key. Every file is checked against the
    /// old key before any is rewritten. S3 stores: not supported yet.
    Rewrap {
        /// The blob directory (`[blobs] path`, default `<data_dir>/blobs`).
        #[arg(long)]
        store: PathBuf,
        /// File holding the current master key.
        #[arg(long)]
        old_key: PathBuf,
        /// File holding the new master key (`lifeboat keys init --out`).
        #[arg(long)]
        new_key: PathBuf,
    },
    /// Per coordinator: its store, its data key ids, which is current, and how many blobs each
    /// one seals (plus blobs still in plaintext). Needs the admin role.
    Status {
        /// Coordinators and TLS files.
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// Runs a `keys` command, printing text or JSON.
///
/// Errors: the key file cannot be written; no coordinator answers; any coordinator refused or
/// failed (after all were tried; their answers are printed first).
pub async fn run(cmd: KeysCmd, json: bool) -> anyhow::Result<()> {
    let (conn, rotate) = match cmd {
        KeysCmd::Init { out } => {
            lifeboat_common::keys::write_new_master_key(&out)
                .with_context(|| format!("write master key {}", out.display()))?;
            if json {
                outln!("{}", serde_json::json!({ "master_key_file": out }));
            } else {
                outln!(
                    "master key written to {} (mode 0600); set `[encryption] master_key_file` to it and keep a copy offline: without it the encrypted blobs cannot be read",
                    out.display()
                );
            }
            return Ok(());
        }
        KeysCmd::Rewrap {
            store,
            old_key,
            new_key,
        } => return rewrap(&store, &old_key, &new_key, json),
        KeysCmd::Rotate { conn } => (conn, true),
        KeysCmd::Status { conn } => (conn, false),
    };
    let addrs = all_coordinators(&conn).await;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for addr in &addrs {
        let r = async {
            let mut c = admin_client(conn.channel(addr)?);
            let reply = if rotate {
                c.rotate_data_key(RotateDataKeyRequest {}).await
            } else {
                c.data_key_status(DataKeyStatusRequest {}).await
            };
            reply
                .map(|r| r.into_inner())
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
        }
        .await;
        match r {
            Ok(reply) => rows.push((addr.clone(), reply)),
            Err(e) => failed.push(format!("{addr}: {e:#}")),
        }
    }
    print(&rows, &failed, json)?;
    if !failed.is_empty() {
        bail!(
            "{} of {} coordinators failed: {}",
            failed.len(),
            addrs.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// `keys rewrap`: every key file under `<store>/keys/` opened with the old master key first,
/// then each rewritten (temp + fsync + rename) under the new one.
fn rewrap(store: &Path, old_key: &Path, new_key: &Path, json: bool) -> anyhow::Result<()> {
    use lifeboat_common::keys::{KeyFile, MasterKeySource};
    let old = MasterKeySource::File(old_key.to_path_buf()).load()?;
    let new = MasterKeySource::File(new_key.to_path_buf()).load()?;
    let dir = store.join(lifeboat_common::keys::KEYS_DIR);
    let desc = format!("local directory {}", store.display());
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let kf = KeyFile::parse(&std::fs::read(&path)?, name, &desc)?;
        files.push((path.clone(), kf.rewrap(&old, &new, &desc)?));
    }
    if files.is_empty() {
        bail!("no data key files in {}", dir.display());
    }
    for (path, kf) in &files {
        lifeboat_common::blobstore::write_atomic(path, &kf.to_json())
            .with_context(|| format!("write {}", path.display()))?;
    }
    let ids: Vec<&str> = files.iter().map(|(_, kf)| kf.id.as_str()).collect();
    if json {
        outln!("{}", serde_json::json!({ "rewrapped": ids }));
    } else {
        outln!(
            "{} data keys rewrapped under {} ({}); set `[encryption] master_key_file` to it before starting the coordinator",
            ids.len(),
            new_key.display(),
            ids.join(", ")
        );
    }
    Ok(())
}

/// The given addresses plus the members listed by the first coordinator that answers.
async fn all_coordinators(conn: &ConnArgs) -> Vec<String> {
    let mut all: BTreeSet<String> = conn.coordinators.iter().cloned().collect();
    for addr in &conn.coordinators {
        let Ok(ch) = conn.channel(addr) else { continue };
        if let Ok(s) = admin_client(ch).status(StatusRequest {}).await {
            all.extend(s.into_inner().members.into_iter().map(|m| m.addr));
            break;
        }
    }
    all.into_iter().collect()
}

fn print(
    rows: &[(String, DataKeyStatusReply)],
    failed: &[String],
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(addr, r)| {
                serde_json::json!({
                    "addr": addr, "node_id": r.node_id, "region": r.region, "store": r.store,
                    "encrypted": r.encrypted, "plaintext_blobs": r.plaintext_blobs,
                    "unknown_blobs": r.unknown_blobs,
                    "rotated_to": (!r.rotated_to.is_empty()).then_some(&r.rotated_to),
                    "keys": r.keys.iter().map(|k| serde_json::json!({
                        "key_id": k.key_id, "current": k.current, "blobs": k.blobs,
                        "created_ms": k.created_ms,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"coordinators": v, "failed": failed})
            )?
        );
        return Ok(());
    }
    for (addr, r) in rows {
        outln!(
            "node {} ({addr}, region {}): {}",
            r.node_id,
            r.region,
            r.store
        );
        if !r.rotated_to.is_empty() {
            outln!("  rotated: new writes use key {}", r.rotated_to);
        }
        if !r.encrypted {
            outln!("  NOT encrypted at rest (no [encryption] in its config)");
            continue;
        }
        for k in &r.keys {
            let created = jiff::Timestamp::from_millisecond(k.created_ms)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| k.created_ms.to_string());
            outln!(
                "  key {}  {:<8} {:>8} blobs  created {created}",
                k.key_id,
                if k.current { "current" } else { "" },
                k.blobs
            );
        }
        if r.plaintext_blobs > 0 {
            outln!(
                "  {} blobs still in plaintext (written before encryption)",
                r.plaintext_blobs
            );
        }
        if r.unknown_blobs > 0 {
            outln!(
                "  {} blobs name a key this store does not hold",
                r.unknown_blobs
            );
        }
    }
    for f in failed {
        outln!("FAILED {f}");
    }
    Ok(())
}
