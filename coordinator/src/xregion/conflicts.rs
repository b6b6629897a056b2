//! Conflicts after a failover (issue 3, item 7): a fenced region's agent hands every change the
//! active region lacks to the active region, which commits it at
//! `_conflicts/<from region>/e<epoch>/<original path>` (see
//! [`lifeboat_common::catalog::conflict_path`]; replicas never apply that root). `lifeboat
//! conflicts` lists them; `lifeboat resolve` settles one with `ControlService.ResolveConflict`
//! handled here, on the active region's regional leader:
//!
//! - `keep = "source"`: the fenced region's version becomes the current version of the path;
//! - `keep = "target"`: the active region's version stays;
//! - `keep = "both"`: the fenced version is committed next to it at
//!   `<path>.conflict-<region>-e<epoch>`;
//!
//! and in every case a tombstone of the conflict row, all in ONE `CommitVersions` entry of the
//! regional Raft. The new versions reuse the conflict row's parts (no data is copied) and carry
//! the agent id [`RESOLVE_AGENT_ID`]: the active region's source agents write them into their
//! directories, standby regions get them through replication. The resolution is recorded in
//! the global audit log.

use lifeboat_common::catalog::{
    conflict_path, parse_conflict_path, FileVersion, NewVersion, CONFLICTS_ROOT, RESOLVE_AGENT_ID,
};
use lifeboat_proto::{
    CommittedVersion, ConflictKeep, ResolveConflictReply, ResolveConflictRequest,
};
use tonic::Status;

use crate::admin::Admin;
use crate::raft::CatalogCommand;
use lifeboat_common::wire_error::{ErrorCode, WireError};

/// Path of the side file `keep = "both"` creates.
pub fn side_path(path: &str, from_region: &str, epoch: u64) -> String {
    format!("{path}.conflict-{from_region}-e{epoch}")
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Serves `ControlService.ResolveConflict` (see the module docs).
///
/// Errors: `UNAVAILABLE` on a follower (leader header set) or outside the active region (the
/// CLI tries the next coordinator), `INVALID_ARGUMENT` for a bad request or a path without
/// exactly one conflict, `UNAVAILABLE` when the commit fails.
pub async fn resolve(
    admin: &Admin,
    req: ResolveConflictRequest,
) -> Result<ResolveConflictReply, Status> {
    let keep = ConflictKeep::try_from(req.keep)
        .ok()
        .filter(|k| *k != ConflictKeep::Unspecified)
        .ok_or_else(|| {
            bad(format!(
                "keep must be source, target or both (got {})",
                req.keep
            ))
        })?;
    let epoch = admin.role.write_gate().map_err(|s| {
        if WireError::code_of(&s) == Some(ErrorCode::StandbyRegion) {
            Status::unavailable(format!("not the active region: {}", s.message()))
        } else {
            s
        }
    })?;
    admin.leader.ensure_leader()?;
    lifeboat_common::path::validate_rel_path(&req.path).map_err(|e| bad(e.to_string()))?;
    let catalog = admin.catalog.clone();
    let wanted = req.path.clone();
    let rows = tokio::task::spawn_blocking(move || {
        catalog
            .list(CONFLICTS_ROOT, None, false, false)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(Status::internal)?;
    let matching: Vec<FileVersion> = rows
        .into_iter()
        .filter(|r| {
            r.v.path == wanted
                || parse_conflict_path(&r.v.path).is_some_and(|(_, _, orig)| orig == wanted)
        })
        .collect();
    let conflict = match matching.as_slice() {
        [one] => one.clone(),
        [] => return Err(bad(format!("no unresolved conflict for {wanted:?}"))),
        many => {
            let names: Vec<&str> = many.iter().map(|r| r.v.path.as_str()).collect();
            return Err(bad(format!(
                "{wanted:?} has {} conflicts; name one: {}",
                many.len(),
                names.join(", ")
            )));
        }
    };
    let (from_region, conflict_epoch, original) = parse_conflict_path(&conflict.v.path)
        .ok_or_else(|| bad(format!("{} is not a conflict path", conflict.v.path)))?;
    debug_assert_eq!(
        conflict_path(&from_region, conflict_epoch, &original),
        conflict.v.path
    );
    let stamp = |mut v: NewVersion, path: String| {
        v.path = path;
        v.epoch = epoch;
        v.region = admin.region.clone();
        v.agent_id = RESOLVE_AGENT_ID.to_string();
        v.rename_from = None;
        v
    };
    let mut versions = Vec::new();
    match keep {
        ConflictKeep::Source => versions.push(stamp(conflict.v.clone(), original.clone())),
        ConflictKeep::Both => {
            let side = side_path(&original, &from_region, conflict_epoch);
            lifeboat_common::path::validate_rel_path(&side).map_err(|e| bad(e.to_string()))?;
            versions.push(stamp(conflict.v.clone(), side));
        }
        ConflictKeep::Target | ConflictKeep::Unspecified => {}
    }
    let mut tomb = stamp(conflict.v.clone(), conflict.v.path.clone());
    tomb.deleted = true;
    tomb.size = 0;
    tomb.blake3 = None;
    tomb.parts = Vec::new();
    tomb.symlink_target = None;
    versions.push(tomb);
    let paths: Vec<String> = versions.iter().map(|v| v.path.clone()).collect();
    let resp = admin
        .raft
        .client_write(CatalogCommand::CommitVersions {
            versions,
            commit_time_ms: lifeboat_common::now_ms(),
            // The parts are the conflict row's, which stays referenced (newest of its path).
            restored: Vec::new(),
        })
        .await
        .map_err(|e| admin.leader.commit_error(e))?;
    if !resp.data.rejected.is_empty() {
        return Err(Status::failed_precondition(format!(
            "the conflict's blobs were removed by garbage collection ({} of them)",
            resp.data.rejected.len()
        )));
    }
    let committed: Vec<CommittedVersion> = paths
        .into_iter()
        .zip(resp.data.seqs)
        .map(|(path, seq)| CommittedVersion { path, seq })
        .collect();
    tracing::warn!(region = %admin.region, epoch, conflict = %conflict.v.path, keep = keep_name(keep), "conflict resolved");
    if let Some(c) = &admin.control {
        c.note_audit(
            epoch,
            format!("region {} node {}", admin.region, admin.leader.node_id),
            "resolve",
            format!(
                "{original}: kept {} (conflict from region {from_region}, epoch {conflict_epoch})",
                keep_name(keep)
            ),
        );
    }
    Ok(ResolveConflictReply {
        conflict: conflict.v.path,
        path: original,
        from_region,
        keep: keep as i32,
        committed,
        epoch,
    })
}

/// `source`, `target` or `both`, as the CLI spells them.
pub fn keep_name(k: ConflictKeep) -> &'static str {
    match k {
        ConflictKeep::Source => "source",
        ConflictKeep::Target => "target",
        ConflictKeep::Both => "both",
        ConflictKeep::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_file_names_region_and_epoch() {
        assert_eq!(side_path("data/x.txt", "a", 2), "data/x.txt.conflict-a-e2");
        lifeboat_common::path::validate_rel_path(&side_path("data/x.txt", "a", 2)).unwrap();
    }
}
