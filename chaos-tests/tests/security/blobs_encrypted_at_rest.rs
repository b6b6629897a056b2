//! Encryption at rest on a real cluster (the lab turns it on by default): files sync and restore
//! byte-equal; no blob file holds the plaintext of a distinctive source file; a flipped byte in
//! a stored blob is detected (typed error naming the blob and key) and repaired from a peer;
//! after `lifeboat keys rotate` new blobs use the new key id and old data still restores; a
//! coordinator restarted with a wrong master key, or with none, refuses to start with a clear
//! error. A second test runs a sync and restore on SeaweedFS S3 with encryption on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_chaos_tests::*;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::blob_envelope::{self, EnvelopeError};
use lifeboat_common::blobstore::{BlobStore, BlobStoreError, EncryptedStore, LocalBlobStore};
use lifeboat_common::keys::{KeyId, MasterKeySource};

/// A line no generated file contains; the marker file repeats it between random bytes.
const MARKER: &[u8] = b"LIFEBOAT-PLAINTEXT-MARKER-3f9c1e";

/// Writes `marker.bin`: 256 KiB of pseudo-random bytes with [`MARKER`] every 4 KiB (zstd keeps
/// the first copy literal, so a plaintext store would show it).
fn write_marker_file(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut data = Vec::with_capacity(256 << 10);
    while data.len() < 256 << 10 {
        if data.len() % 4096 == 0 {
            data.extend_from_slice(MARKER);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.push(x as u8);
    }
    std::fs::write(dir.join("marker.bin"), &data)?;
    Ok(data)
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path()),
            Ok(t) if t.is_file() => vec![e.path()],
            _ => Vec::new(),
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Coordinator `i`'s repository opened in-process with the cluster's master key.
async fn open_repo(cluster: &Cluster, i: usize) -> anyhow::Result<EncryptedStore> {
    let master =
        MasterKeySource::File(cluster.master_key.clone().context("no master key")?).load()?;
    let local: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::open(
        cluster.coords[i].data_dir.join("blobs"),
    )?);
    Ok(EncryptedStore::open(local, master, "test").await?)
}

/// The part hashes of `data/<path>` in the catalog.
async fn parts_of(cluster: &Cluster, path: &str) -> anyhow::Result<Vec<BlobHash>> {
    let (rows, _) = files::list(&cluster.conn(), "data", None, false, false).await?;
    let v = rows
        .into_iter()
        .find(|r| r.v.path == format!("data/{path}"))
        .with_context(|| format!("{path} not in the catalog"))?;
    Ok(v.v.parts.iter().map(|p| p.hash).collect())
}

/// Waits until every coordinator holds blob `h` on disk.
async fn on_every_node(cluster: &Cluster, h: &BlobHash) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.local_blob_copies(h) < cluster.coords.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "blob {h} not on every coordinator"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Restarts coordinator `i` with `config_text` and waits for it to exit; returns its log.
async fn start_expecting_refusal(
    cluster: &mut Cluster,
    i: usize,
    config_text: &str,
) -> anyhow::Result<String> {
    std::fs::write(&cluster.coords[i].config, config_text)?;
    let log_before = std::fs::read_to_string(&cluster.coords[i].log).unwrap_or_default();
    cluster.start_coordinator(i)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let child = cluster.coords[i].child.as_mut().context("not started")?;
        if let Some(st) = child.try_wait()? {
            anyhow::ensure!(!st.success(), "coordinator exited 0");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "coordinator {i} started although its master key is wrong or missing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.coords[i].child = None;
    let log = std::fs::read_to_string(&cluster.coords[i].log)?;
    Ok(log[log_before.len().min(log.len())..].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_local_store_end_to_end() -> anyhow::Result<()> {
    run("encryption_at_rest", |scratch| async move {
        let src = scratch.join("src");
        tree::generate(&src, 40, 2_000_000, 4242)?;
        let marker = write_marker_file(&src)?;
        // Control: the plain stored form of the marker file does show the marker.
        assert!(
            contains(&blob::encode(&marker), MARKER),
            "marker compressed away"
        );

        let mut cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        assert!(cluster.master_key.is_some(), "the lab turns encryption on");
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let (cfg, data) = cluster.write_agent_config("agent1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;

        // 1. Byte-equal restore.
        let to = scratch.join("restore1");
        restore_latest(&cluster, "data", &to).await?;
        let cmp = tree::compare(&src, &to.join("data"))?;
        assert!(cmp.equal(), "restore differs: {:?}", cmp.differences);

        // 2. No plaintext at rest: every blob file is an LBE1 envelope and none holds the marker.
        let mh = parts_of(&cluster, "marker.bin").await?[0];
        on_every_node(&cluster, &mh).await?;
        let mut n = 0;
        for c in &cluster.coords {
            for f in files_under(&c.data_dir.join("blobs").join("blobs")) {
                let b = std::fs::read(&f)?;
                assert!(
                    blob_envelope::is_sealed(&b),
                    "{} is not sealed",
                    f.display()
                );
                assert!(!contains(&b, MARKER), "plaintext marker in {}", f.display());
                n += 1;
            }
            let keys = files_under(&c.data_dir.join("blobs").join("keys"));
            assert_eq!(keys.len(), 1, "one data key per repository: {keys:?}");
            assert!(!contains(&std::fs::read(&keys[0])?, MARKER));
        }
        eprintln!("{n} blob files checked: all sealed, no plaintext marker");

        // 3. A flipped byte on the leader's copy: the store names the blob and key, the restore
        //    fetches a verified copy from a peer and the leader's copy is repaired.
        let li = settled_leader(&cluster).await?;
        let path = cluster.coords[li].data_dir.join("blobs").join(mh.key());
        let mut b = std::fs::read(&path)?;
        let at = b.len() / 2;
        b[at] ^= 0x5a;
        std::fs::write(&path, &b)?;
        let repo = open_repo(&cluster, li).await?;
        match repo.get(&mh).await {
            Err(BlobStoreError::Envelope(EnvelopeError::Tampered { hash, key_id })) => {
                assert_eq!(hash, mh);
                assert_eq!(Some(key_id), blob_envelope::key_id_of(&b));
            }
            other => anyhow::bail!("tampered blob not refused: {other:?}"),
        }
        let to = scratch.join("restore2");
        restore_latest(&cluster, "data", &to).await?;
        assert_eq!(std::fs::read(to.join("data/marker.bin"))?, marker);
        let repaired = repo.get(&mh).await.context("leader's copy not repaired")?;
        assert_eq!(
            blob::decode(&mh, &repaired, lifeboat_common::PART_SIZE)?,
            marker
        );
        let log = std::fs::read_to_string(&cluster.coords[li].log)?;
        assert!(
            log.contains("repaired from a peer") && log.contains(&mh.to_hex()),
            "no repair logged on the leader"
        );

        // 4. Rotation: every coordinator starts a new key; new blobs use it; old data restores.
        let before = json(&lifeboat(&cluster, &["keys", "status", "-o", "json"]));
        let out = lifeboat(&cluster, &["keys", "rotate", "-o", "json"]);
        assert!(
            out.status.success(),
            "rotate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rotated = json(&out);
        let coords = rotated["coordinators"].as_array().context("coordinators")?;
        assert_eq!(coords.len(), cluster.coords.len(), "{rotated}");
        let mut new_key = std::collections::BTreeMap::new();
        for c in coords {
            let keys = c["keys"].as_array().context("keys")?;
            assert_eq!(keys.len(), 2, "{c}");
            let cur: Vec<_> = keys.iter().filter(|k| k["current"] == true).collect();
            assert_eq!(cur.len(), 1, "{c}");
            assert_eq!(cur[0]["key_id"], c["rotated_to"], "{c}");
            assert_eq!(cur[0]["blobs"], 0, "{c}");
            new_key.insert(
                c["node_id"].as_u64().context("node_id")?,
                KeyId::from_hex(cur[0]["key_id"].as_str().context("key_id")?).context("hex")?,
            );
        }
        eprintln!("keys before rotation: {before}");
        std::fs::write(
            src.join("after-rotation.txt"),
            b"written after the rotation\n".repeat(500),
        )?;
        agent_once(&cluster, &cfg, &data).await?;
        let nh = parts_of(&cluster, "after-rotation.txt").await?[0];
        on_every_node(&cluster, &nh).await?;
        for c in &cluster.coords {
            let b = std::fs::read(c.data_dir.join("blobs").join(nh.key()))?;
            assert_eq!(
                blob_envelope::key_id_of(&b),
                new_key.get(&c.id).copied(),
                "node {}",
                c.id
            );
            let old = std::fs::read(c.data_dir.join("blobs").join(mh.key()))?;
            assert_ne!(blob_envelope::key_id_of(&old), new_key.get(&c.id).copied());
        }
        let status = json(&lifeboat(&cluster, &["keys", "status", "-o", "json"]));
        for c in status["coordinators"].as_array().context("coordinators")? {
            let cur = c["keys"]
                .as_array()
                .context("keys")?
                .iter()
                .find(|k| k["current"] == true)
                .context("current")?
                .clone();
            assert!(cur["blobs"].as_u64().unwrap_or(0) >= 1, "{c}");
        }
        let to = scratch.join("restore3");
        restore_latest(&cluster, "data", &to).await?;
        let cmp = tree::compare(&src, &to.join("data"))?;
        assert!(
            cmp.equal(),
            "restore after rotation differs: {:?}",
            cmp.differences
        );

        // 5. Wrong master key, then no [encryption] at all: refused at start, clearly; then the
        //    keys are rewrapped under the new master key and it starts with it.
        let victim = (li + 1) % cluster.coords.len();
        cluster.kill_coordinator(victim);
        let config = std::fs::read_to_string(&cluster.coords[victim].config)?;
        let right = cluster.master_key.clone().context("key")?;
        let wrong = scratch.join("wrong.key");
        lifeboat_common::keys::write_new_master_key(&wrong)?;
        let log = start_expecting_refusal(
            &mut cluster,
            victim,
            &config.replace(&right.display().to_string(), &wrong.display().to_string()),
        )
        .await?;
        assert!(
            log.contains("master key does not open data key") && log.contains("wrong key?"),
            "log: {log}"
        );
        let key_hex = std::fs::read_to_string(&wrong)?;
        assert!(!log.contains(key_hex.trim()), "the key is in the log");
        let plain_config = config
            .lines()
            .filter(|l| !l.starts_with("[encryption]") && !l.starts_with("master_key_file"))
            .collect::<Vec<_>>()
            .join("\n");
        let log = start_expecting_refusal(&mut cluster, victim, &plain_config).await?;
        assert!(log.contains("holds data keys"), "log: {log}");
        // Rewrap its data keys (offline) under the other master key: it starts with that one
        // and serves again.
        let bin = lifeboat_lab::harness::bin_dir()?.join("lifeboat");
        let out = std::process::Command::new(bin)
            .args(["keys", "rewrap", "--store"])
            .arg(cluster.coords[victim].data_dir.join("blobs"))
            .arg("--old-key")
            .arg(&right)
            .arg("--new-key")
            .arg(&wrong)
            .output()?;
        assert!(
            out.status.success(),
            "rewrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(
            &cluster.coords[victim].config,
            config.replace(&right.display().to_string(), &wrong.display().to_string()),
        )?;
        cluster.start_coordinator(victim)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.status_of(victim).await.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "coordinator did not come back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let vid = cluster.coords[victim].id;
        let status = json(&lifeboat(&cluster, &["keys", "status", "-o", "json"]));
        let row = status["coordinators"]
            .as_array()
            .context("coordinators")?
            .iter()
            .find(|c| c["node_id"] == vid)
            .with_context(|| format!("node {vid} missing: {status}"))?
            .clone();
        assert_eq!(row["keys"].as_array().map(Vec::len), Some(2), "{row}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_s3_store_round_trip() -> anyhow::Result<()> {
    use lifeboat_lab::s3server::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
    const BUCKET: &str = "lifeboat-enc";
    const PREFIX: &str = "enc/";
    run("encryption_at_rest_s3", |scratch| async move {
        let server = S3Server::start().await?;
        server.create_bucket(BUCKET).await?;
        let src = scratch.join("src");
        tree::generate(&src, 30, 1_000_000, 99)?;
        write_marker_file(&src)?;
        let extra = format!(
            "\n[blobs]\nbackend = \"s3\"\n\n[blobs.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\nsecret_access_key = \"{SECRET_ACCESS_KEY}\"\n",
            server.endpoint()
        );
        let opts = ClusterOpts {
            extra_coordinator_toml: extra,
            ..Default::default()
        };
        let cluster = Cluster::start(&scratch.join("cluster"), &opts)?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &data).await?;
        let to = scratch.join("restored");
        restore_latest(&cluster, "data", &to).await?;
        let cmp = tree::compare(&src, &to.join("data"))?;
        assert!(cmp.equal(), "differences: {:?}", cmp.differences);

        // In the bucket: sealed blobs only, no marker; the data keys (the coordinators opened
        // the shared bucket at once, so one to three) under keys/, not listed as blobs.
        let raw = server.open(server.config(BUCKET, PREFIX)).await?;
        let listed = raw.list().await?;
        assert!(listed.len() > 10, "{} blobs", listed.len());
        for b in &listed {
            let stored = raw.get(&b.hash).await?;
            assert!(blob_envelope::is_sealed(&stored), "blob {} not sealed", b.hash);
            assert!(!contains(&stored, MARKER), "plaintext marker in blob {}", b.hash);
        }
        let keys = raw.list_aux("keys").await?;
        assert!((1..=3).contains(&keys.len()), "{keys:?}");
        let status = json(&lifeboat(&cluster, &["keys", "status", "-o", "json"]));
        for c in status["coordinators"].as_array().context("coordinators")? {
            let total: u64 = c["keys"]
                .as_array()
                .context("keys")?
                .iter()
                .map(|k| k["blobs"].as_u64().unwrap_or(0))
                .sum();
            assert_eq!(total, listed.len() as u64, "{c}");
            assert_eq!(c["plaintext_blobs"], 0, "{c}");
        }
        Ok(())
    })
    .await
}

/// The cost of encryption on an initial sync (3 coordinators acknowledging, local stores):
/// the same tree (200 files and a 150 MB file) synced into fresh clusters with encryption off
/// and on, interleaved, 2 rounds each; prints MB/s and the ratio. A measurement, not a timed
/// test: `cargo test --release -p lifeboat-chaos-tests --test security_blobs_encrypted_at_rest
/// encryption_cost -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn encryption_cost_on_initial_sync() -> anyhow::Result<()> {
    run("encryption_cost", |scratch| async move {
        let src = scratch.join("src");
        let st = tree::generate(&src, 200, 150_000_000, 77)?;
        let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..2 {
            for (k, encryption) in [false, true].into_iter().enumerate() {
                let dir = scratch.join(format!("r{round}-{encryption}"));
                let opts = ClusterOpts {
                    encryption,
                    ..Default::default()
                };
                let cluster = Cluster::start(&dir, &opts)?;
                cluster.wait_leader(Duration::from_secs(30), None).await?;
                let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
                let t = Instant::now();
                agent_once(&cluster, &cfg, &data).await?;
                let mbs = st.bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
                eprintln!("round {round} encryption={encryption}: {mbs:.1} MB/s");
                rates[k].push(mbs);
                drop(cluster);
                std::fs::remove_dir_all(&dir)?;
            }
        }
        let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let (off, on) = (mean(&rates[0]), mean(&rates[1]));
        eprintln!(
            "initial sync of {} MB: plaintext {off:.1} MB/s, encrypted {on:.1} MB/s, encrypted/plaintext = {:.2}",
            st.bytes / 1_000_000,
            on / off
        );
        Ok(())
    })
    .await
}
