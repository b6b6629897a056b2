//! The product's safety rules (docs/failover.md, ARCHITECTURE.md "cross-cutting concerns") as
//! checkers that real-process tests call on what they observed, so every test proves the same
//! rule the same way:
//!
//! | rule | checker |
//! |---|---|
//! | a restore is byte-equal to what was protected | [`restore_equals`] |
//! | no acknowledged change is lost (after a kill, failover or switchover) | [`acknowledged_changes_survive`] |
//! | at most one region holds a write lease at any instant | [`one_lease_holder`] |
//! | at most one active region, and the epoch never goes back | [`one_active_region`], [`epochs_never_go_back`] |
//! | no change of an older epoch is applied after a newer one was seen | [`no_stale_epoch_applied`] |
//! | a restore writes nothing outside its target | [`DirSnapshot`], [`nothing_written_outside`] |
//!
//! Each returns an error naming what broke the rule (and the evidence), so a test fails with
//! the reason rather than a bare `assert!`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lifeboat_common::catalog::FileVersion;
use lifeboat_lab::harness::Cluster;
use lifeboat_lab::tree;
use lifeboat_proto::{AuditEntry, GlobalStatusReply};

use crate::leases::LeaseSample;

/// Rule: a restore is byte-equal to its source: same paths and kinds, same contents (blake3),
/// modes and symlink targets (`lifeboat_lab::tree::compare`).
///
/// Errors: the comparison failed, or the trees differ (the differences are listed).
pub fn restore_equals(source: &Path, restored: &Path) -> anyhow::Result<()> {
    let c = tree::compare(source, restored)?;
    anyhow::ensure!(
        c.equal(),
        "restore of {} into {} is not byte-equal: {:?}",
        source.display(),
        restored.display(),
        c.differences
    );
    Ok(())
}

/// Rule: no acknowledged change is lost. Once the agent of `source` reported nothing pending
/// (every change acknowledged), a restore of `root` from `cluster` (for example the region that
/// took over) into `scratch` equals `source`.
///
/// Errors: the restore failed or differs from `source`.
pub async fn acknowledged_changes_survive(
    cluster: &Cluster,
    root: &str,
    source: &Path,
    scratch: &Path,
) -> anyhow::Result<()> {
    crate::restore_latest(cluster, root, scratch).await?;
    restore_equals(source, &scratch.join(root))
        .map_err(|e| anyhow::anyhow!("an acknowledged change was lost: {e}"))
}

/// Rule: at most one region holds a valid write lease at any instant. Every sample that says
/// `leased` covers `[at_ms, lease_until_ms)` of its region (all processes share the host's
/// clock); windows of different regions must be disjoint.
///
/// Errors: a sample whose lease ends before it was taken, or the first overlapping pair.
pub fn one_lease_holder(samples: &[LeaseSample]) -> anyhow::Result<()> {
    let leased: Vec<&LeaseSample> = samples.iter().filter(|s| s.leased).collect();
    for (i, x) in leased.iter().enumerate() {
        anyhow::ensure!(
            x.lease_until_ms > x.at_ms,
            "region {} says it is leased at {} but its lease ends at {}",
            x.region,
            x.at_ms,
            x.lease_until_ms
        );
        for y in &leased[i + 1..] {
            if x.region != y.region && x.at_ms.max(y.at_ms) < x.lease_until_ms.min(y.lease_until_ms)
            {
                anyhow::bail!("two regions leased at once: {x:?} and {y:?}");
            }
        }
    }
    Ok(())
}

/// Rule: one active region. In a global status, at most one region's leader reports itself
/// `active` and leased, and if one does it is the region the committed record names.
///
/// Errors: two leased active regions, or a leased region other than the record's.
pub fn one_active_region(status: &GlobalStatusReply) -> anyhow::Result<()> {
    let leased: Vec<&str> = status
        .regions
        .iter()
        .filter(|r| r.role == "active" && r.leased)
        .map(|r| r.region.as_str())
        .collect();
    anyhow::ensure!(
        leased.len() <= 1,
        "more than one active region holds a lease: {leased:?}"
    );
    if let (Some(r), Some(rec)) = (leased.first(), status.record()) {
        anyhow::ensure!(
            *r == rec.active_region(),
            "region {r} holds a lease but the record names {} active at epoch {}",
            rec.active_region(),
            rec.epoch
        );
    }
    Ok(())
}

/// Rule: the epoch (fencing token) never goes back. In the committed audit log, ordered by
/// sequence number, the epochs of entries written by the global leader's decisions never
/// decrease (entries reported by regions may arrive late and are left out).
///
/// Errors: the first decision whose epoch is below an earlier one.
pub fn epochs_never_go_back(audit: &[AuditEntry]) -> anyhow::Result<()> {
    let mut decisions: Vec<&AuditEntry> = audit
        .iter()
        .filter(|e| {
            matches!(
                e.action.as_str(),
                "failover" | "switchover" | "failback" | "completed" | "init"
            )
        })
        .collect();
    decisions.sort_by_key(|e| e.seq);
    let mut highest = 0u64;
    for e in decisions {
        anyhow::ensure!(
            e.epoch >= highest,
            "epoch went back to {} at audit entry {} ({} {}) after epoch {highest}",
            e.epoch,
            e.seq,
            e.action,
            e.detail
        );
        highest = e.epoch;
    }
    Ok(())
}

/// Rule: no change of an older epoch is applied once a newer one was seen. `rows` are catalog
/// versions in commit order (catalog sequence): each carries an epoch at least as high as
/// every version committed before it.
///
/// Errors: the first version stamped with an epoch below an earlier one.
pub fn no_stale_epoch_applied(rows: &[FileVersion]) -> anyhow::Result<()> {
    let mut sorted: Vec<&FileVersion> = rows.iter().collect();
    sorted.sort_by_key(|r| r.seq);
    let mut highest = 0u64;
    for r in sorted {
        anyhow::ensure!(
            r.v.epoch >= highest,
            "{} (seq {}) was applied under epoch {} after epoch {highest}",
            r.v.path,
            r.seq,
            r.v.epoch
        );
        highest = r.v.epoch;
    }
    Ok(())
}

/// What a directory held: every entry below it with its size and modification time (ns).
/// Taken before and after an operation to prove it wrote nothing outside its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSnapshot {
    root: PathBuf,
    entries: BTreeMap<PathBuf, (u64, i128)>,
}

impl DirSnapshot {
    /// Walks `root` (symlinks are recorded, not followed).
    ///
    /// Errors: an unreadable directory.
    pub fn take(root: &Path) -> anyhow::Result<Self> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, i128)>) -> std::io::Result<()> {
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                let md = std::fs::symlink_metadata(e.path())?;
                let mtime = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos() as i128)
                    .unwrap_or(0);
                out.insert(e.path(), (md.len(), mtime));
                if md.is_dir() {
                    walk(&e.path(), out)?;
                }
            }
            Ok(())
        }
        let mut entries = BTreeMap::new();
        walk(root, &mut entries)?;
        Ok(DirSnapshot {
            root: root.to_path_buf(),
            entries,
        })
    }
}

/// Rule: an operation wrote nothing outside `target`. Compares `before` with the directory as
/// it is now: every entry created, changed or removed must be `target` or below it.
///
/// Errors: the entries that changed outside `target`.
pub fn nothing_written_outside(before: &DirSnapshot, target: &Path) -> anyhow::Result<()> {
    let after = DirSnapshot::take(&before.root)?;
    let mut outside = Vec::new();
    for (p, v) in &after.entries {
        if before.entries.get(p) != Some(v) && !p.starts_with(target) {
            outside.push(format!("written: {}", p.display()));
        }
    }
    for p in before.entries.keys() {
        if !after.entries.contains_key(p) && !p.starts_with(target) {
            outside.push(format!("removed: {}", p.display()));
        }
    }
    anyhow::ensure!(
        outside.is_empty(),
        "wrote outside {}: {outside:?}",
        target.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(region: &str, at: u64, until: u64) -> LeaseSample {
        LeaseSample {
            region: region.into(),
            node_id: 1,
            epoch: 1,
            leased: true,
            at_ms: at,
            lease_until_ms: until,
        }
    }

    #[test]
    fn overlapping_leases_of_two_regions_are_caught() {
        assert!(one_lease_holder(&[sample("a", 0, 100), sample("b", 100, 200)]).is_ok());
        assert!(one_lease_holder(&[sample("a", 0, 100), sample("a", 50, 150)]).is_ok());
        let e = one_lease_holder(&[sample("a", 0, 100), sample("b", 99, 200)]).unwrap_err();
        assert!(e.to_string().contains("two regions leased at once"), "{e}");
    }

    #[test]
    fn an_epoch_going_back_is_caught() {
        let e = |seq, epoch, action: &str| AuditEntry {
            seq,
            epoch,
            action: action.into(),
            ..Default::default()
        };
        assert!(epochs_never_go_back(&[e(1, 1, "init"), e(2, 2, "failover")]).is_ok());
        // A region's late report of an older epoch is not a decision.
        assert!(epochs_never_go_back(&[e(1, 2, "failover"), e(2, 1, "promote-db")]).is_ok());
        assert!(epochs_never_go_back(&[e(1, 2, "failover"), e(2, 1, "switchover")]).is_err());
    }

    #[test]
    fn writes_outside_the_target_are_caught() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(d.path().join("keep.txt"), b"x").unwrap();
        let before = DirSnapshot::take(d.path()).unwrap();
        std::fs::write(target.join("inside.txt"), b"y").unwrap();
        nothing_written_outside(&before, &target).unwrap();
        std::fs::write(d.path().join("escaped.txt"), b"z").unwrap();
        let e = nothing_written_outside(&before, &target).unwrap_err();
        assert!(e.to_string().contains("escaped.txt"), "{e}");
    }
}
