//! F13: expired data is removed safely. Three coordinators with local blob stores and
//! `[gc] keep_history = "0s"`, `grace = "0s"`, no timer. A watched directory gets several
//! versions (a 9 MiB file whose last part changes, so two parts are shared between the expired
//! and the kept version; a file overwritten three times; a deleted file), and an exec source with
//! `retention = { keep_last = 1 }` takes at least three snapshots whose first 4 MiB part is the
//! same. Then `lifeboat gc`:
//! - every blob only the expired versions and snapshots referenced is gone from every
//!   coordinator's store; every blob the catalog still references is on a majority, the shared
//!   parts included;
//! - the kept snapshot and the current directory restore byte-equal;
//! - a second pass deletes nothing;
//! - content equal to a deleted blob written again is stored again (the agent's reuse is
//!   refused as BASE_MISSING, it sends the data) and restores; once restored, reusing it needs
//!   no resend.
//!
//! The same scenario runs against a bucket of a real S3 server (SeaweedFS) shared by the three
//! coordinators (`gc_on_s3_removes_expired_blobs_only`): there the leader's pass deletes.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_common::blob::BlobHash;
use lifeboat_common::blobstore::{BlobStore, S3BlobStore};
use lifeboat_common::catalog::FileVersion;
use lifeboat_lab::s3server::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};

const PART: usize = lifeboat_common::PART_SIZE;

fn taken(cfg: &Path) -> usize {
    agent_log_lines(cfg, "exec snapshot taken")
}

fn resends(cfg: &Path) -> usize {
    agent_log_lines(cfg, "coordinator is missing a base blob")
}

fn live_snaps(cluster: &Cluster) -> Vec<String> {
    catalog_paths(cluster, "_snapshots/ticks")
        .into_iter()
        .filter(|p| p.ends_with(".snap"))
        .collect()
}

/// Every version of every path (tombstones included).
async fn all_versions(cluster: &Cluster) -> anyhow::Result<Vec<FileVersion>> {
    Ok(files::list(&cluster.conn(), "", None, true, true).await?.0)
}

fn parts(versions: &[FileVersion]) -> BTreeSet<BlobHash> {
    versions
        .iter()
        .flat_map(|v| v.v.parts.iter().map(|p| p.hash))
        .collect()
}

fn gc(cluster: &Cluster) -> serde_json::Value {
    json(&lifeboat(cluster, &["gc", "--output", "json"]))
}

fn blake3_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).expect("read"))
        .to_hex()
        .to_string()
}

/// Where the coordinators keep blobs.
enum Store {
    /// Each coordinator's `<data_dir>/blobs`: a blob must be on a majority (2 of 3).
    Local,
    /// One shared bucket: a blob must be in it.
    S3(S3BlobStore),
}

/// Copies of `h`: coordinators holding it (local) or 1 if the bucket has it.
async fn copies(store: &Store, cluster: &Cluster, h: &BlobHash) -> usize {
    match store {
        Store::Local => cluster.local_blob_copies(h),
        Store::S3(s) => usize::from(s.contains(h).await.expect("HeadObject")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_expired_blobs_only() -> anyhow::Result<()> {
    run("t34", |dir| async move {
        scenario(&dir, "", Store::Local).await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_on_s3_removes_expired_blobs_only() -> anyhow::Result<()> {
    run("t34s3", |dir| async move {
        let server = S3Server::start().await?;
        let bucket = "lifeboat-gc";
        let store = server.create_bucket(bucket).await?;
        let extra = format!(
            "\n[blobs]\nbackend = \"s3\"\n\n[blobs.s3]\nendpoint = \"{}\"\nbucket = \"{bucket}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\nsecret_access_key = \"{SECRET_ACCESS_KEY}\"\n",
            server.endpoint()
        );
        scenario(&dir, &extra, Store::S3(store)).await
    })
    .await
}

async fn scenario(dir: &Path, extra_toml: &str, store: Store) -> anyhow::Result<()> {
    let needed = match store {
        Store::Local => 2,
        Store::S3(_) => 1,
    };
    let opts = ClusterOpts {
        extra_coordinator_toml: format!(
            "[gc]\nkeep_history = \"0s\"\ngrace = \"0s\"\ninterval = \"0s\"\n{extra_toml}"
        ),
        ..Default::default()
    };
    let cluster = Cluster::start(&dir.join("cluster"), &opts)?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;

    // Directory versions, each acknowledged by an agent --once run.
    let src = dir.join("src");
    std::fs::create_dir_all(&src)?;
    let mut big: Vec<u8> = (0..(2 * PART + PART / 4))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    std::fs::write(src.join("big.bin"), &big)?;
    std::fs::write(src.join("keep.txt"), b"kept as it is\n")?;
    std::fs::write(src.join("gone.txt"), b"deleted later\n")?;
    std::fs::write(src.join("churn.txt"), b"churn version 1\n")?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    agent_once(&cluster, &cfg, &data).await?;
    let last = big.len() - 1;
    big[last] ^= 0xff; // only the third part changes
    std::fs::write(src.join("big.bin"), &big)?;
    std::fs::write(src.join("churn.txt"), b"churn version 2\n")?;
    std::fs::remove_file(src.join("gone.txt"))?;
    agent_once(&cluster, &cfg, &data).await?;
    std::fs::write(src.join("churn.txt"), b"churn version 3\n")?;
    agent_once(&cluster, &cfg, &data).await?;

    // Exec snapshots: the first 4 MiB (seq output) are the same in each, the rest differs.
    let extra = "[[exec_sources]]\nname = \"ticks\"\nsnapshot_command = [\"sh\", \"-c\", \"seq 1 700000; date +%s%N\"]\nschedule = \"* * * * * *\"\nretention = { keep_last = 1 }\n";
    let (cfg2, _data2) = cluster.write_agent_config("a2", &[], extra)?;
    let mut agent2 = cluster.spawn_agent(&cfg2, false)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !(taken(&cfg2) >= 3 && live_snaps(&cluster).len() == 1) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "three exec snapshots and retention not done in 180 s: taken {}, live {:?}",
            taken(&cfg2),
            live_snaps(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = agent2.kill();
    agent2.wait()?;
    // A snapshot acknowledged just before the kill may not be expired yet: the kept one is
    // the newest live one.
    let mut kept_snap = live_snaps(&cluster);
    kept_snap.sort();
    let kept_snap = kept_snap.pop().expect("a live snapshot");

    let before = all_versions(&cluster).await?;
    let snap_versions: Vec<&FileVersion> = before
        .iter()
        .filter(|v| v.v.path.starts_with("_snapshots/ticks/") && v.v.path.ends_with(".snap"))
        .collect();
    let shared_snap_part: HashSet<BlobHash> = snap_versions
        .iter()
        .filter(|v| !v.v.deleted)
        .map(|v| v.v.parts[0].hash)
        .collect();
    assert_eq!(
        shared_snap_part.len(),
        1,
        "every snapshot starts with the same part"
    );
    let shared_snap_part = *shared_snap_part.iter().next().unwrap();
    let big_versions: Vec<&FileVersion> = before
        .iter()
        .filter(|v| v.v.path == "data/big.bin")
        .collect();
    assert_eq!(big_versions.len(), 2);
    let (old_big, new_big) = (&big_versions[0].v.parts, &big_versions[1].v.parts);
    assert_eq!(
        old_big[..2],
        new_big[..2],
        "two parts shared by both versions of big.bin"
    );
    assert_ne!(old_big[2], new_big[2]);
    let churn1 = BlobHash::of(b"churn version 1\n");
    let gone = BlobHash::of(b"deleted later\n");

    // A dry run reports and changes nothing.
    let dry = json(&lifeboat(
        &cluster,
        &["gc", "--dry-run", "--output", "json"],
    ));
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        all_versions(&cluster).await?,
        before,
        "dry run pruned versions"
    );
    for h in &parts(&before) {
        assert!(
            copies(&store, &cluster, h).await >= needed,
            "dry run deleted {h}"
        );
    }

    let report = gc(&cluster);
    assert_eq!(
        report["versions_pruned"], dry["versions_pruned"],
        "{report} vs {dry}"
    );
    assert_eq!(
        report["blobs_condemned"], dry["blobs_condemned"],
        "{report} vs {dry}"
    );
    let after = all_versions(&cluster).await?;
    let referenced = parts(&after);
    let expired: BTreeSet<BlobHash> = parts(&before).difference(&referenced).copied().collect();
    // Old big.bin tail, churn 1 and 2, gone.txt, and the tails of at least two expired
    // snapshots.
    for h in [
        old_big[2].hash,
        churn1,
        BlobHash::of(b"churn version 2\n"),
        gone,
    ] {
        assert!(expired.contains(&h), "{h} should have expired");
    }
    assert!(expired.len() >= 6, "{} expired blobs", expired.len());
    assert!(report["versions_pruned"].as_u64().unwrap() >= 6, "{report}");
    assert!(
        report["blobs_condemned"].as_u64().unwrap() >= expired.len() as u64,
        "{report}"
    );
    assert!(report["bytes_freed"].as_u64().unwrap() > 0, "{report}");
    assert!(report["kept_referenced"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["dry_run"], false);
    // Only the newest version of each path is left (keep_history 0), tombstones included.
    let paths: HashSet<&str> = after.iter().map(|v| v.v.path.as_str()).collect();
    assert_eq!(paths.len(), after.len(), "one version per path");
    assert!(after
        .iter()
        .any(|v| v.v.path == "data/gone.txt" && v.v.deleted));

    // Followers delete when they apply the entry: wait for all of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for h in &expired {
            if copies(&store, &cluster, h).await > 0 {
                left.push(*h);
            }
        }
        if left.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "expired blobs still stored: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for h in &referenced {
        let n = copies(&store, &cluster, h).await;
        assert!(n >= needed, "referenced blob {h}: {n} copies");
    }
    for h in [old_big[0].hash, old_big[1].hash, shared_snap_part] {
        assert!(referenced.contains(&h), "shared {h} still referenced");
        assert!(
            copies(&store, &cluster, &h).await >= needed,
            "shared {h} kept"
        );
    }

    // The current directory and the kept snapshot restore byte-equal.
    assert_restores_equal(&cluster, "data", &src, &dir.join("restored")).await?;
    let snap_file = dir.join("snap.out");
    let r = json(&lifeboat(
        &cluster,
        &[
            "restore-snapshot",
            "--source",
            "ticks",
            "--to-file",
            snap_file.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    let kept_row = after
        .iter()
        .find(|v| v.v.path == kept_snap)
        .expect("kept row");
    assert_eq!(
        Some(blake3_file(&snap_file)),
        kept_row.v.blake3.map(|h| h.to_hex()),
        "{r}"
    );
    let text = std::fs::read_to_string(&snap_file)?;
    assert!(
        text.starts_with("1\n2\n3\n") && text.contains("\n700000\n"),
        "snapshot content"
    );

    // A second pass finds nothing to do.
    let again = gc(&cluster);
    assert_eq!(again["versions_pruned"], 0, "{again}");
    assert_eq!(again["blobs_condemned"], 0, "{again}");

    // Content equal to a deleted blob comes back: the agent's cached reuse is refused, it
    // sends the data, and the blob is stored (on a majority) again.
    let resent_before = resends(&cfg);
    std::fs::write(src.join("churn.txt"), b"churn version 1\n")?;
    agent_once(&cluster, &cfg, &data).await?;
    assert!(
        resends(&cfg) > resent_before,
        "the agent resent the condemned blob"
    );
    assert!(
        copies(&store, &cluster, &churn1).await >= needed,
        "restored blob stored durably"
    );
    assert_restores_equal(&cluster, "data", &src, &dir.join("restored2")).await?;
    // Restored means no longer condemned: reusing it in another file needs no resend, and a
    // pass (which prunes churn version 3) keeps it.
    let resent = resends(&cfg);
    std::fs::write(src.join("copy.txt"), b"churn version 1\n")?;
    agent_once(&cluster, &cfg, &data).await?;
    assert_eq!(
        resends(&cfg),
        resent,
        "reuse of a restored blob was refused"
    );
    let third = gc(&cluster);
    assert!(third["versions_pruned"].as_u64().unwrap() >= 1, "{third}");
    assert!(third["blobs_condemned"].as_u64().unwrap() >= 1, "{third}");
    assert!(copies(&store, &cluster, &churn1).await >= needed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while copies(&store, &cluster, &BlobHash::of(b"churn version 3\n")).await > 0 {
        anyhow::ensure!(Instant::now() < deadline, "churn version 3 not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_restores_equal(&cluster, "data", &src, &dir.join("restored3")).await?;
    Ok(())
}

/// `lifeboat gc`, retried while the region has no leader (up to 60 s).
async fn gc_retrying(cluster: &Cluster) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = lifeboat(cluster, &["gc", "--output", "json"]);
        if out.status.success() {
            return Ok(serde_json::from_slice(&out.stdout)?);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "lifeboat gc kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Garbage collection every second (the `[gc]` timer; grace and history 0) and after every
/// round of writes, while an agent keeps writing (a mutated tree, plus a small and a two-part
/// file flipping between two contents, so blobs condemned one round come back the next through
/// the agent's acknowledged-blob cache), and the leader is SIGKILLed and restarted in between:
/// the condemned contents are resent, the directory restores byte-equal, and every blob the
/// catalog references is on a majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_during_writes_and_leader_kill() -> anyhow::Result<()> {
    run("t34w", |dir| async move {
        let opts = ClusterOpts {
            extra_coordinator_toml:
                "[gc]\nkeep_history = \"0s\"\ngrace = \"0s\"\ninterval = \"1s\"\n".into(),
            ..Default::default()
        };
        let mut cluster = Cluster::start(&dir.join("cluster"), &opts)?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let src = dir.join("src");
        tree::generate(&src, 120, 6_000_000, 3)?;
        let head: Vec<u8> = (0..PART).map(|i| (i % 13) as u8).collect();
        let flips = |k: usize| {
            let small = format!("flip {k}\n").into_bytes();
            let mut big = head.clone();
            big.extend(std::iter::repeat_n(k as u8, PART / 3));
            (small, big)
        };
        let write_flip = |k: usize| -> anyhow::Result<()> {
            let (small, big) = flips(k);
            std::fs::write(src.join("flip.txt"), small)?;
            std::fs::write(src.join("flip.bin"), big)?;
            Ok(())
        };
        write_flip(0)?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        cluster.start_agent(&cfg)?;
        settle(&data).await?;
        let mut killed: Option<usize> = None;
        let mut killed_id: Option<u64> = None;
        for round in 0..8u64 {
            tree::mutate(&src, 25, 100 + round)?;
            write_flip((round as usize + 1) % 2)?;
            settle(&data).await?;
            gc_retrying(&cluster).await?;
            if round == 3 {
                let l = settled_leader(&cluster).await?;
                killed_id = Some(cluster.coords[l].id);
                cluster.kill_coordinator(l);
                killed = Some(l);
                cluster
                    .wait_leader(Duration::from_secs(30), Some(cluster.coords[l].id))
                    .await?;
            }
            if round == 5 {
                if let Some(k) = killed.take() {
                    cluster.start_coordinator(k)?;
                }
            }
        }
        settle(&data).await?;
        let last = gc_retrying(&cluster).await?;
        assert_eq!(last["dry_run"], false);
        assert!(
            resends(&cfg) >= 3,
            "condemned contents came back through the agent's reuse: {} resends",
            resends(&cfg)
        );
        assert_restores_equal(&cluster, "data", &src, &dir.join("restored")).await?;
        let referenced = parts(&all_versions(&cluster).await?);
        let (small0, big0) = flips(0);
        let (_, big1) = flips(1);
        assert!(
            referenced.contains(&BlobHash::of(&small0)),
            "flip 0 is current"
        );
        assert!(referenced.contains(&BlobHash::of(&big0[PART..])));
        assert!(
            !referenced.contains(&BlobHash::of(&big1[PART..])),
            "flip 1 was pruned"
        );
        let versions = all_versions(&cluster).await?;
        for h in &referenced {
            let n = cluster.local_blob_copies(h);
            if n < 2 {
                let holders: Vec<u64> = cluster
                    .coords
                    .iter()
                    .filter(|c| c.data_dir.join("blobs").join(h.key()).exists())
                    .map(|c| c.id)
                    .collect();
                let users: Vec<String> = versions
                    .iter()
                    .filter(|v| v.v.parts.iter().any(|p| p.hash == *h))
                    .map(|v| format!("{}@{} t{}", v.v.path, v.seq, v.commit_time_ms))
                    .collect();
                panic!("referenced blob {h} on {n} of 3 coordinators {holders:?}; used by {users:?}; killed {killed_id:?}");
            }
        }
        // Blobs of the last pass are deleted everywhere once the followers applied it.
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.local_blob_copies(&BlobHash::of(&big1[PART..])) > 0 {
            anyhow::ensure!(Instant::now() < deadline, "flip 1 tail still stored");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    })
    .await
}
