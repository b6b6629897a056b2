//! Redis sources against real `redis-server` processes: `apply_role` makes a standby follow the
//! active region's primary and promotes it on a region switch (the old primary then follows it
//! and refuses writes; with `min_replicas_to_write` an isolated old primary refuses writes with
//! NOREPLICAS while the promoted one takes them at once); the agent's RDB snapshot (replication protocol) comes back with
//! `lifeboat restore redis --to` (every key, values and TTLs) and `--file` (header, blake3 of the
//! sidecar); `lifeboat verify snapshot` reports ok with the key count; a snapshot whose blob is
//! corrupted on every coordinator is refused by restore and verify with a clear error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_agent::sources::redis::{
    apply_role, arm_min_replicas, health, take_snapshot, RedisSourceConfig,
};
use lifeboat_chaos_tests::redis_server::{get, set, start_redis, wait_value};
use lifeboat_chaos_tests::*;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_lab::free_port;

fn source(name: &str, addr: &str, primaries: &[(&str, &str)]) -> RedisSourceConfig {
    let map: serde_json::Map<String, serde_json::Value> = primaries
        .iter()
        .map(|(r, a)| (r.to_string(), serde_json::Value::from(*a)))
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": name, "addr": addr, "interval_s": 3600, "primary_by_region": map,
    }))
    .expect("source config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_role_follows_and_promotes() -> anyhow::Result<()> {
    run("t13-role", |dir| async move {
        let a = start_redis(&dir.join("a"), &[])?;
        let b = start_redis(&dir.join("b"), &[])?;
        let (mut ca, mut cb) = (a.con().await?, b.con().await?);
        let map = [("eu", a.addr()), ("us", b.addr())];
        let map: Vec<(&str, &str)> = map.iter().map(|(r, x)| (*r, x.as_str())).collect();
        let sa = source("cache", &a.addr(), &map);
        let sb = source("cache", &b.addr(), &map);

        // eu active: A primary, B follows A.
        let did = apply_role(&sa, "eu", "eu", 1).await?;
        assert!(did.contains("already primary"), "{did}");
        let did = apply_role(&sb, "us", "eu", 1).await?;
        assert!(did.contains("now replica of"), "{did}");
        let did = apply_role(&sb, "us", "eu", 1).await?;
        assert!(did.contains("already replica"), "idempotent: {did}");
        for i in 0..100 {
            set(&mut ca, &format!("k{i}"), &format!("v{i}")).await?;
        }
        wait_value(&mut cb, "k99", "v99").await?;
        let err = set(&mut cb, "x", "1").await.unwrap_err();
        assert!(err.to_string().to_uppercase().contains("READONLY"), "{err}");
        let h = health(&sb).await;
        assert!(h.healthy, "{h:?}");
        assert_eq!(h.role, "replica", "{h:?}");
        assert_eq!(h.lag_bytes, Some(0), "{h:?}");
        let h = health(&sa).await;
        assert!(
            h.healthy && h.role == "primary" && h.lag_bytes.is_none(),
            "{h:?}"
        );
        // A standby needs the active region's primary.
        assert!(apply_role(&sb, "us", "asia", 1).await.is_err());

        // us active: B promoted with A's data, A follows B and refuses writes.
        let did = apply_role(&sb, "us", "us", 2).await?;
        assert!(did.contains("promoted"), "{did}");
        set(&mut cb, "after", "failover").await?;
        for i in [0, 42, 99] {
            assert_eq!(get(&mut cb, &format!("k{i}")).await, Some(format!("v{i}")));
        }
        let did = apply_role(&sa, "eu", "us", 2).await?;
        assert!(
            did.contains(&format!("now replica of {}", b.addr())),
            "{did}"
        );
        wait_value(&mut ca, "after", "failover").await?;
        let err = set(&mut ca, "y", "1").await.unwrap_err();
        assert!(err.to_string().to_uppercase().contains("READONLY"), "{err}");
        assert_eq!(health(&sa).await.role, "replica");
        assert!(apply_role(&sb, "us", "us", 2)
            .await?
            .contains("already primary"));

        // Fencing (`min_replicas_to_write`): B, primary with A following, is armed once A is
        // connected, and still takes writes.
        let mut fb = sb.clone();
        fb.min_replicas_to_write = 1;
        fb.min_replicas_max_lag_s = 2;
        let deadline = Instant::now() + Duration::from_secs(20);
        let did = loop {
            if let Some(d) = arm_min_replicas(&fb).await? {
                break d;
            }
            anyhow::ensure!(Instant::now() < deadline, "B never saw A connected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(did.contains("min-replicas-to-write 1"), "{did}");
        assert_eq!(arm_min_replicas(&fb).await?, None, "armed once");
        let cfg: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("min-replicas-to-write")
            .query_async(&mut cb)
            .await?;
        assert_eq!(cfg[1], "1");
        set(&mut cb, "armed", "yes").await?;
        wait_value(&mut ca, "armed", "yes").await?;
        // eu active again at epoch 3: A is promoted and disarmed (takes writes at once, with no
        // replica); B, the old primary now without a replica, refuses writes: NOREPLICAS.
        let mut fa = sa.clone();
        fa.min_replicas_to_write = 1;
        fa.min_replicas_max_lag_s = 2;
        let did = apply_role(&fa, "eu", "eu", 3).await?;
        assert!(
            did.contains("promoted") && did.contains("min-replicas-to-write 0"),
            "{did}"
        );
        set(&mut ca, "new-primary", "yes").await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match set(&mut cb, "isolated", "write").await {
                Err(e) if e.to_string().to_uppercase().contains("NOREPLICAS") => break,
                r => anyhow::ensure!(
                    Instant::now() < deadline,
                    "the isolated old primary still answers {r:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            get(&mut cb, "isolated").await,
            None,
            "the refused write is not there"
        );
        // B rejoins as A's replica; A is armed again once B follows.
        apply_role(&fb, "us", "eu", 3).await?;
        wait_value(&mut cb, "new-primary", "yes").await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while arm_min_replicas(&fa).await?.is_none() {
            anyhow::ensure!(Instant::now() < deadline, "A never re-armed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        set(&mut ca, "rearmed", "yes").await?;

        drop(b);
        let h = health(&sb).await;
        assert!(!h.healthy, "a dead Redis is unhealthy: {h:?}");
        Ok(())
    })
    .await
}

/// Both transfer forms (`$<len>` from a disk-based sync, `$EOF:<mark>` from a diskless one) give
/// the same keys and a sidecar matching the file; AUTH with a password file works, a wrong
/// password or a server that is down records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_snapshot_disk_and_diskless_forms() -> anyhow::Result<()> {
    run("t13-forms", |dir| async move {
        for (name, diskless) in [("disk", "no"), ("diskless", "yes")] {
            let r = start_redis(&dir.join(name), &["--repl-diskless-sync", diskless])?;
            let mut c = r.con().await?;
            for i in 0..500 {
                set(&mut c, &format!("k{i}"), &"v".repeat(i)).await?;
            }
            let data = dir.join(format!("agent-{name}"));
            let src = source(name, &r.addr(), &[]);
            let meta = take_snapshot(&src, &data, 7).await?;
            let file = data.join("snapshots").join(format!("{}.rdb", meta.id));
            let bytes = std::fs::read(&file)?;
            assert_eq!(&bytes[..5], b"REDIS", "{name}");
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                meta.blake3,
                "{name}"
            );
            assert_eq!(bytes.len() as u64, meta.bytes, "{name}");
            assert_eq!(
                (meta.keys, meta.epoch, meta.kind.as_str()),
                (500, 7, "redis"),
                "{name}"
            );
            let side: serde_json::Value =
                serde_json::from_slice(&std::fs::read(file.with_extension("rdb.meta.json"))?)?;
            assert_eq!(
                side["blake3"].as_str(),
                Some(meta.blake3.as_str()),
                "{name}"
            );
            // The dump loads: a redis-server started on it has the same keys.
            let check = dir.join(format!("check-{name}"));
            std::fs::create_dir_all(&check)?;
            std::fs::copy(&file, check.join("dump.rdb"))?;
            let loaded = start_redis(&check, &[])?;
            let n: u64 = redis::cmd("DBSIZE")
                .query_async(&mut loaded.con().await?)
                .await?;
            assert_eq!(n, 500, "{name}");
        }
        // AUTH: a password from password_file; a wrong one is refused and records nothing.
        let r = start_redis(&dir.join("auth"), &["--requirepass", "s3cret"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(r.addr()).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "redis with a password not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::write(dir.join("pw"), "s3cret\n")?;
        std::fs::write(dir.join("bad-pw"), "wrong\n")?;
        let mut src = source("auth", &r.addr(), &[]);
        src.password_file = Some(dir.join("bad-pw"));
        let e = take_snapshot(&src, &dir.join("agent-auth"), 0)
            .await
            .unwrap_err();
        assert!(!e.to_string().contains("wrong"), "no secret in errors: {e}");
        assert!(!format!("{src:?}").contains("s3cret"));
        src.password_file = Some(dir.join("pw"));
        let meta = take_snapshot(&src, &dir.join("agent-auth"), 0).await?;
        assert_eq!(meta.keys, 0);
        assert!(health(&src).await.healthy);
        let dead = source("dead", &format!("127.0.0.1:{}", free_port()?), &[]);
        assert!(take_snapshot(&dead, &dir.join("agent-dead"), 0)
            .await
            .is_err());
        assert!(!dir.join("agent-dead/snapshots/dead").exists());
        Ok(())
    })
    .await
}

fn snapshot_ids(cluster: &Cluster) -> Vec<String> {
    let out = lifeboat(cluster, &["ls", "_snapshots", "--output", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.iter()
        .filter_map(|r| r["path"].as_str())
        .filter_map(|p| {
            p.strip_prefix("_snapshots/")?
                .strip_suffix(".rdb.meta.json")
        })
        .map(str::to_string)
        .collect()
}

/// Flips one byte in the middle of stored blob `path` and checks it no longer decodes.
fn corrupt(path: &Path, h: &BlobHash) -> anyhow::Result<()> {
    let mut b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    blob::decode(h, &b, lifeboat_common::PART_SIZE).context("blob corrupted before the test")?;
    let at = (b.len() / 2).max(5);
    b[at] ^= 0x5a;
    std::fs::write(path, &b)?;
    assert!(blob::decode(h, &b, lifeboat_common::PART_SIZE).is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_verify_and_corruption() -> anyhow::Result<()> {
    run("t13-snapshot", |dir| async move {
        const N: usize = 10_000;
        let r = start_redis(&dir.join("redis-src"), &[])?;
        let mut c = r.con().await?;
        let mut p = redis::pipe();
        for i in 0..N {
            p.cmd("SET").arg(format!("key:{i}")).arg(format!("value:{i}:{}", "x".repeat(i % 50))).ignore();
        }
        p.query_async::<()>(&mut c).await?;
        let _: () = redis::cmd("SET").arg("ttl-key").arg("t").arg("EX").arg(3600).query_async(&mut c).await?;
        let _: () = redis::cmd("HSET").arg("hash").arg("f").arg("v").query_async(&mut c).await?;
        let total = N as u64 + 2;

        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("a.txt"), b"hello\n")?;
        // Corrupts the stored LBB1 form on disk: a plaintext store.
        let opts = ClusterOpts {
            encryption: false,
            ..Default::default()
        };
        let cluster = Cluster::start(&dir.join("cluster"), &opts)?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = format!(
            "[[redis_sources]]\nname = \"cache\"\naddr = \"{}\"\ninterval_s = 3600\nretention = {{ keep_last = 2 }}\n",
            r.addr()
        );
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], &extra)?;
        let mut cluster = cluster;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let id = loop {
            if let Some(id) = snapshot_ids(&cluster).into_iter().next() {
                break id;
            }
            let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap_or_default();
            anyhow::ensure!(Instant::now() < deadline, "no redis snapshot after 60 s; agent log:\n{log}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        settle(&data).await?;
        assert!(id.starts_with("cache/"), "{id}");
        // Both local files are removed once acknowledged.
        let local: Vec<_> = std::fs::read_dir(data.join("snapshots/cache"))?.collect();
        assert!(local.is_empty(), "local snapshot files left: {local:?}");

        // The sidecar, as stored in the catalog.
        let side_dir = dir.join("sidecar");
        restore_latest(&cluster, &format!("_snapshots/{id}.rdb.meta.json"), &side_dir).await?;
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(
            side_dir.join(format!("_snapshots/{id}.rdb.meta.json")),
        )?)?;
        assert_eq!(meta["kind"], "redis");
        assert_eq!(meta["id"], id.as_str());
        assert_eq!(meta["source"], "cache");
        assert_eq!(meta["keys"].as_u64(), Some(total));
        assert!(meta["redis_version"].as_str().unwrap().starts_with('7'), "{meta}");
        assert!(meta["end_ms"].as_i64() >= meta["start_ms"].as_i64());

        // --file: header and the sidecar's blake3.
        let file = dir.join("out.rdb");
        let out = json(&lifeboat(
            &cluster,
            &["restore", "redis", "--snapshot", &id, "--file", file.to_str().unwrap(), "--output", "json"],
        ));
        let bytes = std::fs::read(&file)?;
        assert_eq!(&bytes[..5], b"REDIS");
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), meta["blake3"].as_str().unwrap());
        assert_eq!(Some(bytes.len() as u64), meta["bytes"].as_u64());
        assert_eq!(out["blake3"], meta["blake3"]);

        // --to: a fresh redis-server gets every key.
        let t = start_redis(&dir.join("redis-target"), &[])?;
        let mut ct = t.con().await?;
        let out = json(&lifeboat(
            &cluster,
            &["restore", "redis", "--snapshot", &id, "--to", &t.addr(), "--output", "json"],
        ));
        assert_eq!(out["keys_copied"].as_u64(), Some(total), "{out}");
        let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut ct).await?;
        assert_eq!(dbsize, total);
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..100 {
            let i = rng.random_range(0..N);
            let k = format!("key:{i}");
            assert_eq!(get(&mut ct, &k).await, get(&mut c, &k).await, "{k}");
        }
        let ttl: i64 = redis::cmd("TTL").arg("ttl-key").query_async(&mut ct).await?;
        assert!(ttl > 3000 && ttl <= 3600, "TTL kept: {ttl}");
        let hv: Option<String> = redis::cmd("HGET").arg("hash").arg("f").query_async(&mut ct).await?;
        assert_eq!(hv.as_deref(), Some("v"));

        // verify snapshot: ok, with the key count.
        let v = json(&lifeboat(&cluster, &["verify", "snapshot", &id, "--output", "json"]));
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["kind"], "redis");
        assert_eq!(v["keys"].as_u64(), Some(total), "{v}");
        assert_eq!(v["expected_keys"].as_u64(), Some(total), "{v}");
        assert_eq!(v["bytes"].as_u64(), meta["bytes"].as_u64());
        let text = lifeboat(&cluster, &["verify", "snapshot", &id]);
        let text = String::from_utf8_lossy(&text.stdout).to_string();
        assert!(text.contains(": ok") && text.contains(&format!("keys {total}")), "{text}");
        // An unknown snapshot is an error.
        let out = lifeboat(&cluster, &["verify", "snapshot", "cache/19700101T000000Z"]);
        assert!(!out.status.success());

        // Corrupt the RDB's first blob on every coordinator: restore and verify refuse it.
        let (rows, _) = files::list(&cluster.conn(), &format!("_snapshots/{id}.rdb"), None, false, false).await?;
        let v = rows
            .iter()
            .find(|v| v.v.path == format!("_snapshots/{id}.rdb"))
            .context("rdb in catalog")?;
        let h = v.v.parts[0].hash;
        let blob_file = |i: usize| -> PathBuf { cluster.coords[i].data_dir.join("blobs").join(h.key()) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(0..cluster.coords.len()).all(|i| blob_file(i).exists()) {
            anyhow::ensure!(Instant::now() < deadline, "blob {h} not on every coordinator");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for i in 0..cluster.coords.len() {
            corrupt(&blob_file(i), &h)?;
        }
        let bad = dir.join("bad.rdb");
        let out = lifeboat(
            &cluster,
            &["restore", "redis", "--snapshot", &id, "--file", bad.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "restore of a corrupted snapshot succeeded");
        assert!(err.contains("corrupted"), "clear error: {err}");
        assert!(!bad.exists(), "nothing written for a corrupted snapshot");
        let t2 = start_redis(&dir.join("redis-target2"), &[])?;
        // Up first: `restore --to` PINGs its target before the download.
        let mut c2 = t2.con().await?;
        let out = lifeboat(&cluster, &["restore", "redis", "--snapshot", &id, "--to", &t2.addr()]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("corrupted"));
        let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut c2).await?;
        assert_eq!(dbsize, 0, "nothing loaded from a corrupted snapshot");
        let out = lifeboat(&cluster, &["verify", "snapshot", &id, "--output", "json"]);
        assert!(!out.status.success(), "verify of a corrupted snapshot succeeded");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap_or_default().contains("corrupted"), "{v}");
        Ok(())
    })
    .await
}

/// Measurement, run on demand: `cargo test --release -p lifeboat-chaos-tests --test databases_redis_follows_and_promotes
/// bench -- --ignored --nocapture`. Fills a Redis with `DEBUG POPULATE 5000000 key 100` (about
/// 500 MB of RDB; `LIFEBOAT_BENCH_KEYS` overrides the count), times `redis-cli --rdb` on it, then
/// times the agent's snapshot path from the start of the snapshot (sidecar `start_ms`) to both
/// catalog entries being acknowledged. `LIFEBOAT_BENCH_RDB_COMPRESSION=no` turns off RDB compression.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_snapshot_vs_redis_cli() -> anyhow::Result<()> {
    run("t13-bench", |dir| async move {
        let keys: u64 = std::env::var("LIFEBOAT_BENCH_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5_000_000);
        let r = start_redis(
            &dir.join("redis"),
            &[
                "--enable-debug-command",
                "yes",
                "--rdbcompression",
                if std::env::var("LIFEBOAT_BENCH_RDB_COMPRESSION").is_ok_and(|v| v == "no") {
                    "no"
                } else {
                    "yes"
                },
            ],
        )?;
        let mut c = r.con().await?;
        let _: () = redis::cmd("DEBUG").arg("POPULATE").arg(keys).arg("key").arg(100).query_async(&mut c).await?;
        let mem: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        let used = mem.lines().find(|l| l.starts_with("used_memory_human:")).unwrap_or("").trim();
        eprintln!("dataset: {keys} keys, {used}");
        let t = Instant::now();
        let out = Command::new("redis-cli")
            .args(["-p", &r.port.to_string(), "--rdb"])
            .arg(dir.join("cli.rdb"))
            .output()?;
        let cli_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(out.status.success(), "redis-cli: {}", String::from_utf8_lossy(&out.stderr));
        let cli_bytes = std::fs::metadata(dir.join("cli.rdb"))?.len();
        std::fs::remove_file(dir.join("cli.rdb"))?;
        eprintln!("redis-cli --rdb: {cli_bytes} bytes in {cli_s:.2} s");

        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = format!(
            "[[redis_sources]]\nname = \"big\"\naddr = \"{}\"\ninterval_s = 86400\n",
            r.addr()
        );
        let (cfg, _data) = cluster.write_agent_config("a1", &[("data", &src)], &extra)?;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        let (id, acked_ms) = loop {
            let out = lifeboat(&cluster, &["ls", "_snapshots", "--output", "json"]);
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            let paths: Vec<&str> = rows.iter().filter_map(|r| r["path"].as_str()).collect();
            let meta = paths.iter().find_map(|p| {
                p.strip_prefix("_snapshots/")?.strip_suffix(".rdb.meta.json")
            });
            if let Some(id) = meta {
                if paths.contains(&format!("_snapshots/{id}.rdb").as_str()) {
                    let ms = rows
                        .iter()
                        .filter_map(|r| r["commit_time_ms"].as_i64())
                        .max()
                        .unwrap_or(0);
                    break (id.to_string(), ms);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no snapshot within 30 min");
            // The acknowledgement time comes from the catalog (`commit_time_ms`), not from this
            // poll: poll slowly, each `lifeboat ls` is a process competing for the 2 cores.
            tokio::time::sleep(Duration::from_millis(1000)).await;
        };
        let side = dir.join("side");
        restore_latest(&cluster, &format!("_snapshots/{id}.rdb.meta.json"), &side).await?;
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(
            side.join(format!("_snapshots/{id}.rdb.meta.json")),
        )?)?;
        let start = meta["start_ms"].as_i64().unwrap();
        let end = meta["end_ms"].as_i64().unwrap();
        eprintln!(
            "lifeboat: {} bytes; RDB fetched to the spool in {:.2} s; acknowledged by the coordinators {:.2} s after the snapshot started",
            meta["bytes"],
            (end - start) as f64 / 1000.0,
            (acked_ms - start) as f64 / 1000.0
        );
        Ok(())
    })
    .await
}

/// A multi-part RDB travels while it is fetched: its parts are stored with `PutParts` during the
/// SYNC (`bytes_preuploaded` covers the whole RDB), the push of the finished file sends none of
/// them again (`payload_bytes_full` stays below the RDB's size), the leader accepts the file's
/// blake3 merged from the parts' chaining values, and the restored RDB is byte-equal (its blake3
/// matches the sidecar, taken on the SYNC stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_parts_travel_while_fetched() -> anyhow::Result<()> {
    run("t13-preupload", |dir| async move {
        let r = start_redis(
            &dir.join("redis"),
            &["--enable-debug-command", "yes", "--rdbcompression", "no"],
        )?;
        let mut c = r.con().await?;
        // About 15 MB of RDB: four parts of 4 MiB, the last one short.
        let _: () = redis::cmd("DEBUG")
            .arg("POPULATE")
            .arg(150_000)
            .arg("key")
            .arg(80)
            .query_async(&mut c)
            .await?;
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = format!(
            "[[redis_sources]]\nname = \"big\"\naddr = \"{}\"\ninterval_s = 3600\n",
            r.addr()
        );
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], &extra)?;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let id = loop {
            if let Some(id) = snapshot_ids(&cluster).into_iter().next() {
                break id;
            }
            let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap_or_default();
            anyhow::ensure!(
                Instant::now() < deadline,
                "no redis snapshot after 120 s; agent log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let status = settle(&data).await?;
        let file = dir.join("out.rdb");
        let out = json(&lifeboat(
            &cluster,
            &[
                "restore",
                "redis",
                "--snapshot",
                &id,
                "--file",
                file.to_str().unwrap(),
                "--output",
                "json",
            ],
        ));
        let bytes = std::fs::read(&file)?;
        let rdb = bytes.len() as u64;
        assert!(
            rdb > 2 * lifeboat_common::PART_SIZE as u64,
            "RDB of {rdb} bytes: not multi-part"
        );
        assert_eq!(&bytes[..5], b"REDIS");
        assert_eq!(
            out["blake3"].as_str(),
            Some(blake3::hash(&bytes).to_hex().as_str()),
            "{out}"
        );
        let pre = status["bytes_preuploaded"].as_u64().unwrap_or(0);
        let full = status["payload_bytes_full"].as_u64().unwrap_or(u64::MAX);
        assert!(
            pre >= rdb,
            "only {pre} of {rdb} RDB bytes stored while fetching: {status}"
        );
        assert!(
            full < rdb,
            "the push sent {full} bytes in full for an RDB of {rdb}: {status}"
        );
        Ok(())
    })
    .await
}
