//! Issue 15, defect 7: a warm replica converges quickly and keeps every mtime a restore keeps.
//!
//! Two regions (B a standby of A): agent `a1` in A protects `src` (about 2,000 small files in
//! nested directories, symlinks, empty directories, a few modes; every file, directory and
//! symlink given a distinct past mtime with nanoseconds). Once it is idle and B's coordinators
//! copied A's catalog, agent `b1` in B starts with `[[replicas]] name = "data"` and applies the
//! whole catalog. The replica must be byte-equal to `src` and every entry's mtime (lstat, ns)
//! must equal the source's, the replica directory's own included; status.json must show the
//! progress counters; a restore of the same tree must keep the same mtimes (symlinks included).
//! The apply rate (catalog rows per second, agent start included) is printed, never asserted.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use filetime::FileTime;
use lifeboat_chaos_tests::*;

const FILES: usize = 2_000;

/// Builds the source tree; returns the number of entries (files, dirs, symlinks).
fn build_tree(src: &Path) -> anyhow::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let mut n = 0;
    std::fs::create_dir_all(src)?;
    for i in 0..FILES {
        let dir = src.join(format!(
            "a{:02}/b{:01}/c{:01}",
            i % 25,
            (i / 25) % 4,
            (i / 100) % 2
        ));
        std::fs::create_dir_all(&dir)?;
        let p = dir.join(format!("f{i:05}.txt"));
        let len = 64 + (i * 7919) % 8192;
        let body: Vec<u8> = (0..len).map(|k| b'a' + ((i + k * 31) % 26) as u8).collect();
        std::fs::write(&p, &body)?;
        if i % 53 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
        n += 1;
    }
    for i in 0..100 {
        let l = src.join(format!("a{:02}/b{:01}/link{i:03}", i % 25, (i / 25) % 4));
        let target = if i % 3 == 0 {
            format!("c0/f{:05}.txt", i)
        } else {
            format!("../../a{:02}/nowhere-{i}", (i + 1) % 25)
        };
        std::os::unix::fs::symlink(target, l)?;
        n += 1;
    }
    for i in 0..10 {
        std::fs::create_dir_all(src.join(format!("a{i:02}/empty{i}/deeper")))?;
    }
    // Distinct past mtimes with nanoseconds: files, symlinks, then directories deepest first
    // (setting a child's mtime never changes its parent's).
    let mut entries = Vec::new();
    walk(src, &mut entries)?;
    entries.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (k, (p, md)) in entries.iter().enumerate() {
        let t = FileTime::from_unix_time(
            1_600_000_000 + k as i64 * 37,
            (k as u32 * 7_919_113) % 1_000_000_000,
        );
        if md.file_type().is_symlink() {
            filetime::set_symlink_file_times(p, t, t)?;
        } else {
            filetime::set_file_times(p, t, t)?;
        }
        if md.is_dir() {
            n += 1;
        }
    }
    let t = FileTime::from_unix_time(1_599_000_000, 123_456_789);
    filetime::set_file_times(src, t, t)?;
    Ok(n)
}

/// Every entry under `root` (not following symlinks) with its lstat metadata.
fn walk(root: &Path, out: &mut Vec<(std::path::PathBuf, std::fs::Metadata)>) -> anyhow::Result<()> {
    for e in std::fs::read_dir(root)? {
        let e = e?;
        let md = std::fs::symlink_metadata(e.path())?;
        let is_dir = md.is_dir();
        out.push((e.path(), md));
        if is_dir {
            walk(&e.path(), out)?;
        }
    }
    Ok(())
}

/// Relative path (`""` for the root) → (kind, mtime ns) of every entry under `root`, root
/// included.
fn mtimes(root: &Path) -> anyhow::Result<BTreeMap<String, (char, i64)>> {
    let mut v = Vec::new();
    walk(root, &mut v)?;
    v.push((root.to_path_buf(), std::fs::symlink_metadata(root)?));
    Ok(v.into_iter()
        .map(|(p, md)| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if md.is_dir() {
                'd'
            } else if md.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            (rel, (kind, md.mtime() * 1_000_000_000 + md.mtime_nsec()))
        })
        .collect())
}

/// Entries whose kind or mtime differ between `a` and `b` (at most 20 listed) and their count.
fn mtime_differences(a: &Path, b: &Path) -> anyhow::Result<(usize, Vec<String>)> {
    let (ma, mb) = (mtimes(a)?, mtimes(b)?);
    let mut diffs = Vec::new();
    for (k, va) in &ma {
        if mb.get(k) != Some(va) {
            diffs.push(format!("{k:?}: {va:?} vs {:?}", mb.get(k)));
        }
    }
    for k in mb.keys() {
        if !ma.contains_key(k) {
            diffs.push(format!("{k:?}: only in {}", b.display()));
        }
    }
    let n = diffs.len();
    diffs.truncate(20);
    Ok((n, diffs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_is_equal_with_every_mtime_and_reports_progress() -> anyhow::Result<()> {
    run("t37", |dir| async move {
        let src = dir.join("src");
        let replica = dir.join("replica");
        let entries = build_tree(&src)?;
        let (mut a, mut b) = two_regions(&dir).await?;
        let (cfg_a, data_a) = a.write_agent_config("a1", &[("data", &src)], "")?;
        a.start_agent(&cfg_a)?;
        settle(&data_a).await?;
        // B's coordinators copy A's catalog first: only the agent's apply is timed.
        let a_versions = leader_status(&a).await?.versions;
        let deadline = Instant::now() + Duration::from_secs(300);
        let versions = loop {
            let sb = leader_status(&b).await?;
            if sb.upstream_seq == a_versions && sb.lag_entries == 0 && sb.versions > 0 {
                break sb.versions;
            }
            anyhow::ensure!(Instant::now() < deadline, "region B did not catch up: {sb:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("source tree: {entries} entries, {versions} catalog rows");

        let (cfg_b, data_b) = b.write_agent_config(
            "b1",
            &[],
            &format!(
                "[[replicas]]\nname = \"data\"\npath = \"{}\"\n",
                replica.display()
            ),
        )?;
        let t = Instant::now();
        b.start_agent(&cfg_b)?;
        let deadline = t + Duration::from_secs(600);
        let mut first_applied = None;
        let st = loop {
            if let Some(st) = agent_status(&data_b) {
                let applied = st["replica_applied_seq"].as_u64().unwrap_or(0);
                if applied > 0 && first_applied.is_none() {
                    first_applied = Some(t.elapsed());
                }
                if applied >= versions && st["replica_lag_entries"].as_u64() == Some(0) {
                    break st;
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "replica did not catch up; status {:?}; log {}",
                agent_status(&data_b),
                cfg_b.with_extension("log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let took = t.elapsed();
        eprintln!(
            "replica applied {versions} rows in {took:?} (first batch after {first_applied:?}): {:.0} entries/s; status: replica_rows_applied={} replica_bytes_written={} replica_entries_per_s={}",
            versions as f64 / took.as_secs_f64(),
            st["replica_rows_applied"],
            st["replica_bytes_written"],
            st["replica_entries_per_s"],
        );
        assert!(
            st["replica_rows_applied"].as_u64() >= Some(entries as u64),
            "progress in status.json: {st}"
        );
        assert!(
            st["replica_bytes_written"].as_u64() > Some(0),
            "progress in status.json: {st}"
        );
        assert_eq!(st["replica_refused"].as_u64(), Some(0), "{st}");

        invariants::restore_equals(&src, &replica)?;
        assert_eq!(tree::compare(&src, &replica)?.files, FILES as u64);
        let (n, diffs) = mtime_differences(&src, &replica)?;
        assert_eq!(n, 0, "{n} mtimes differ in the replica: {diffs:#?}");

        // A restore of the same tree keeps the same mtimes (symlinks and directories too).
        let out = dir.join("restored");
        let t = Instant::now();
        restore_latest(&a, "data", &out).await?;
        eprintln!(
            "restore of the same tree: {:?}, {:.0} entries/s",
            t.elapsed(),
            versions as f64 / t.elapsed().as_secs_f64()
        );
        invariants::restore_equals(&src, &out.join("data"))?;
        let (n, diffs) = mtime_differences(&src, &out.join("data"))?;
        assert_eq!(n, 0, "{n} mtimes differ in the restore: {diffs:#?}");
        Ok(())
    })
    .await
}
