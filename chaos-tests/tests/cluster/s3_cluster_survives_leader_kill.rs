//! A cluster whose coordinators keep their blobs in S3 (SeaweedFS `weed mini` through
//! [`lifeboat_lab::s3server::S3Server`]): a synced tree restores byte-for-byte, and the blobs are
//! in the bucket, not in the coordinators' local blob directories.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::blobstore::BlobStore;
use lifeboat_lab::s3server::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};

const BUCKET: &str = "lifeboat-cluster";
const PREFIX: &str = "lifeboat/";

/// Regular files under `dir` (recursively); 0 when it does not exist.
fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_on_s3_backend_restores_byte_equal() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut s = Scratch::new("t07");
    let server = S3Server::start().await?;
    // Creating the bucket first also waits until the server is fully ready, so no coordinator
    // meets a half-started S3 at open.
    server.create_bucket(BUCKET).await?;
    eprintln!(
        "S3 server ready at {} after {:?}",
        server.endpoint(),
        started.elapsed()
    );

    let src = s.dir.join("src");
    let st = tree::generate(&src, 100, 6_000_000, 7)?;
    let extra = format!(
        "\n[blobs]\nbackend = \"s3\"\n\n[blobs.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\nsecret_access_key = \"{SECRET_ACCESS_KEY}\"\ncreate_bucket = true\n",
        server.endpoint()
    );
    let opts = ClusterOpts {
        extra_coordinator_toml: extra,
        // Reads the stored LBB1 form from the bucket: a plaintext store (S3 with encryption:
        // security/blobs_encrypted_at_rest.rs).
        encryption: false,
        ..Default::default()
    };
    let cluster = Cluster::start(&s.dir.join("cluster"), &opts)?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;

    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    let t = Instant::now();
    let status = agent_once(&cluster, &cfg, &data).await?;
    eprintln!(
        "synced {} files / {} bytes in {:?}: {status}",
        st.files,
        st.bytes,
        t.elapsed()
    );

    let out = s.dir.join("restored");
    let report = restore_latest(&cluster, "data", &out).await?;
    let cmp = tree::compare(&src, &out.join("data"))?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "differences: {:?}", cmp.differences);
    assert_eq!(report.files, cmp.files, "every file restored");

    // Every part of every restored version is an object in the bucket, under the prefix.
    let (rows, _) = files::list(&cluster.conn(), "data", None, false, false).await?;
    let parts: BTreeSet<(BlobHash, u64)> = rows
        .iter()
        .flat_map(|r| r.v.parts.iter().map(|p| (p.hash, p.size)))
        .collect();
    assert!(
        parts.len() > 10,
        "expected many distinct parts, got {}",
        parts.len()
    );
    let store = server.open(server.config(BUCKET, PREFIX)).await?;
    for (hash, _) in &parts {
        assert!(
            store.contains(hash).await?,
            "part {hash} (key {}) missing from {}",
            store.key_of(hash),
            store.describe()
        );
    }
    // The largest part reads back from S3 and decodes to its catalog size.
    let (big, big_size) = parts
        .iter()
        .max_by_key(|(_, size)| *size)
        .copied()
        .expect("parts");
    let raw = blob::decode(&big, &store.get(&big).await?, lifeboat_common::PART_SIZE)?;
    assert_eq!(raw.len() as u64, big_size, "part {big}");
    // The prefix is honoured: the same bucket without it holds none of them.
    let bare = server.open(server.config(BUCKET, "")).await?;
    assert!(
        !bare.contains(&big).await?,
        "blob stored without the prefix"
    );

    // ...and not on the coordinators' disks.
    for c in &cluster.coords {
        let local = c.data_dir.join("blobs").join("blobs");
        let n = count_files(&local);
        assert_eq!(
            n,
            0,
            "coordinator {} has {n} local blob files in {}",
            c.id,
            local.display()
        );
    }
    eprintln!(
        "{} parts checked in S3; whole test took {:?}",
        parts.len(),
        started.elapsed()
    );
    Ok(())
}
