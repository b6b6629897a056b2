//! `lifeboat conflicts` and `lifeboat resolve`: the changes a fenced region made that the
//! active region lacked, kept after a failover at `_conflicts/<from region>/e<epoch>/<path>` in
//! the active region's catalog (see `lifeboat_coordinator::xregion::conflicts`).

use crate::outln;
use anyhow::bail;
use lifeboat_common::catalog::{parse_conflict_path, FileVersion, CONFLICTS_ROOT};
use lifeboat_proto::StatusRequest;
use serde::Serialize;

use lifeboat_client::conn::{admin_client, ConnArgs};
use lifeboat_restore::files;

/// One unresolved conflict.
#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    /// Row of the conflict (`_conflicts/<region>/e<epoch>/<path>`).
    pub conflict: String,
    /// The original path.
    pub path: String,
    /// Region whose version it is.
    pub from_region: String,
    /// Epoch under which that region handed it over.
    pub epoch: u64,
    /// When the active region committed it, ms since the Unix epoch.
    pub committed_ms: i64,
    /// `file` or `symlink`.
    pub kind: String,
    /// Content bytes.
    pub size: u64,
    /// blake3 of the content (files), hex.
    pub blake3: Option<String>,
    /// The active region's current version of `path` (`None`: it has none).
    pub current: Option<Current>,
}

/// The active region's current version of a conflicting path.
#[derive(Debug, Clone, Serialize)]
pub struct Current {
    /// Catalog sequence number.
    pub seq: u64,
    /// Content bytes.
    pub size: u64,
    /// blake3 of the content (files), hex.
    pub blake3: Option<String>,
    /// Region that took the write.
    pub region: String,
    /// Commit time, ms since the Unix epoch.
    pub committed_ms: i64,
}

/// `conn` narrowed to the coordinators of the active region (found with `Status` on every
/// coordinator of `conn`: the one whose role is `active`, or `source` without a global group);
/// returns it with the region's name.
///
/// Errors: no coordinator reachable, or none in an active region.
pub async fn active_conn(conn: &ConnArgs) -> anyhow::Result<(ConnArgs, String)> {
    let mut errors = Vec::new();
    let mut found: Option<String> = None;
    let mut addrs = Vec::new();
    for addr in &conn.coordinators {
        let mut c = admin_client(conn.channel(addr)?);
        match tokio::time::timeout(
            std::time::Duration::from_secs(3),
            c.status(StatusRequest {}),
        )
        .await
        {
            Ok(Ok(s)) => {
                let s = s.into_inner();
                if (s.role == "active" || s.role == "source")
                    && found.as_ref().is_none_or(|r| *r == s.region)
                {
                    found = Some(s.region.clone());
                    addrs.push(addr.clone());
                }
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {}", e.message())),
            Err(_) => errors.push(format!("{addr}: timeout")),
        }
    }
    let Some(region) = found else {
        bail!(
            "no coordinator of an active region answered ({})",
            errors.join("; ")
        );
    };
    let mut narrowed = conn.clone();
    narrowed.coordinators = addrs;
    Ok((narrowed, region))
}

fn kind_name(v: &FileVersion) -> String {
    format!("{:?}", v.v.kind).to_lowercase()
}

/// Unresolved conflicts in the active region's catalog, oldest first.
///
/// Errors: connection failures.
pub async fn list(conn: &ConnArgs) -> anyhow::Result<Vec<Conflict>> {
    let (active, _) = active_conn(conn).await?;
    let (rows, _) = files::list(&active, CONFLICTS_ROOT, None, false, false).await?;
    let mut out = Vec::new();
    for r in rows {
        let Some((from_region, epoch, path)) = parse_conflict_path(&r.v.path) else {
            continue;
        };
        let (cur, _) = files::list(&active, &path, None, false, false).await?;
        let current = cur.into_iter().find(|c| c.v.path == path).map(|c| Current {
            seq: c.seq,
            size: c.v.size,
            blake3: c.v.blake3.map(|h| h.to_hex()),
            region: c.v.region.clone(),
            committed_ms: c.commit_time_ms,
        });
        out.push(Conflict {
            conflict: r.v.path.clone(),
            path,
            from_region,
            epoch,
            committed_ms: r.commit_time_ms,
            kind: kind_name(&r),
            size: r.v.size,
            blake3: r.v.blake3.map(|h| h.to_hex()),
            current,
        });
    }
    out.sort_by_key(|c| c.committed_ms);
    Ok(out)
}

/// Prints conflicts as a table.
pub fn print(list: &[Conflict]) {
    if list.is_empty() {
        outln!("no unresolved conflicts");
        return;
    }
    outln!(
        "{:<40} {:<8} {:>5} {:>10}  {:<16} current in the active region",
        "path",
        "from",
        "epoch",
        "size",
        "blake3"
    );
    for c in list {
        let cur = match &c.current {
            Some(v) => format!(
                "seq {} ({} bytes, {})",
                v.seq,
                v.size,
                v.blake3.as_deref().map(|h| &h[..16]).unwrap_or("-")
            ),
            None => "none".into(),
        };
        outln!(
            "{:<40} {:<8} {:>5} {:>10}  {:<16} {cur}",
            c.path,
            c.from_region,
            c.epoch,
            c.size,
            c.blake3.as_deref().map(|h| &h[..16]).unwrap_or("-"),
        );
    }
}
