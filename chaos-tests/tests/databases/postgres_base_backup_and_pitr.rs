//! PostgreSQL sources against real PostgreSQL 15 servers (run as user `postgres`):
//! (a) point-in-time recovery: the agent's base backup and archived WAL come back with
//! `lifeboat restore postgres --at T`, and the restored server holds what was committed before T
//! and nothing after; (c) a corrupted base backup blob is refused at restore;
//! (b) `apply_role` promotes a streaming replica in the active region and fences a primary in a
//! standby region; `health` reports the roles.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_agent::sources::postgres::role::{apply_role, health};
use lifeboat_chaos_tests::pg_server::*;
use lifeboat_chaos_tests::*;
use lifeboat_common::catalog::EntryKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_restore_and_corrupted_base_backup() -> anyhow::Result<()> {
    run("t14-pitr", |dir| async move {
        let pgd = Pg::workdir(&dir)?;
        let primary = Pg::init(&pgd.join("primary"))?;
        primary.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = format!(
            "[[postgres_sources]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\nbase_backup_interval_s = 3600\nretention = {{ keep_last = 2 }}\n",
            primary.port
        );
        let (cfg, data) = cluster.write_agent_config("a1", &[], &extra)?;
        cluster.start_agent(&cfg)?;

        // The base backup (tar + sidecar) is acknowledged.
        wait_for("base backup and sidecar in the catalog", 120, || {
            let p = catalog_paths(&cluster, "_snapshots/db/base");
            Ok(p.iter().any(|p| p.ends_with(".tar")) && p.iter().any(|p| p.ends_with(".tar.meta.json")))
        })
        .await?;
        let base = catalog_paths(&cluster, "_snapshots/db/base");
        let tar_path = base.iter().find(|p| p.ends_with(".tar")).unwrap().clone();
        assert!(
            tar_path.starts_with("_snapshots/db/base/") && tar_path.len() == "_snapshots/db/base/20261124T000000.000Z.tar".len(),
            "{tar_path}"
        );

        // Row 1, then T, then row 2; switch WAL so the segment with row 2 is complete.
        primary.psql("INSERT INTO t VALUES (1, 'before')")?;
        // Cut the WAL stream: pg_receivewal exits and the agent restarts it (from its .partial).
        wait_for("pg_receivewal connected", 30, || {
            Ok(primary.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_receivewal'")? == "1")
        })
        .await?;
        let killed = primary.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = 'pg_receivewal'",
        )?;
        assert_eq!(killed, "t");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let t = jiff::Timestamp::now();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        primary.psql("INSERT INTO t VALUES (2, 'after')")?;
        let seg = switch_wal_and_wait(&primary, &cluster, "db", &data, 120).await?;
        // Acknowledged copies are removed locally; the WAL spool keeps at most the newest segment.
        let left: Vec<_> = std::fs::read_dir(data.join("snapshots/db/base"))?.collect();
        assert!(left.is_empty(), "acknowledged base backup files left: {left:?}");
        let spooled = std::fs::read_dir(data.join("spool/pg-wal-db"))?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
            .count();
        assert!(spooled <= 1, "{spooled} completed segments still spooled");

        // Restore to T and recover.
        let restored = pgd.join("restored");
        let at = t.to_string();
        let r = json(&lifeboat(
            &cluster,
            &[
                "restore", "postgres", "--source", "db", "--at", &at, "--to",
                restored.to_str().unwrap(), "--output", "json",
            ],
        ));
        assert_eq!(r["base_backup"].as_str(), Some(tar_path.as_str()), "{r}");
        assert!(r["wal_files"].as_u64().unwrap() >= 1, "{r}");
        assert_eq!(r["owner"], "postgres");
        assert!(restored.join("recovery.signal").exists());
        assert!(restored.join("lifeboat_wal").join(&seg).exists(), "segment {seg} restored");
        let conf = std::fs::read_to_string(restored.join("postgresql.auto.conf"))?;
        assert!(conf.contains("recovery_target_time"), "{conf}");
        let rs = Pg::start(&restored)?;
        wait_for("restored server leaves recovery", 120, || Ok(!rs.in_recovery()?)).await?;
        let rows = rs.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")?;
        assert_eq!(rows, "1", "row 1 (before T) present, row 2 (after T) absent");
        drop(rs);

        let log = std::fs::read_to_string(cfg.with_extension("log"))?;
        assert!(
            log.lines().any(|l| l.contains("pg_receivewal exited; restarting")),
            "the agent restarted pg_receivewal:\n{log}"
        );

        // `latest` replays every archived segment; --start-check recovers once and stops.
        let latest = pgd.join("latest");
        let r = json(&lifeboat(
            &cluster,
            &[
                "restore", "postgres", "--source", "db", "--at", "latest", "--to",
                latest.to_str().unwrap(), "--start-check", "--output", "json",
            ],
        ));
        assert!(r["start_check_ms"].as_u64().is_some(), "{r}");
        assert!(r["recovery_target_time"].is_null(), "{r}");
        let rl = Pg::start(&latest)?;
        assert!(!rl.in_recovery()?, "already recovered by --start-check");
        assert_eq!(rl.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t")?, "1,2");
        drop(rl);

        // Restoring to a time before any base backup is an error.
        let out = lifeboat(
            &cluster,
            &[
                "restore", "postgres", "--source", "db", "--at", "2020-01-01T00:00:00Z", "--to",
                pgd.join("too-early").to_str().unwrap(),
            ],
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no base backup"));

        // (c) Corrupt the base backup's first blob on every coordinator: the restore fails,
        // naming the corruption, and unpacks nothing.
        let (rows, _) = files::list(&cluster.conn(), "_snapshots/db/base/", None, false, false).await?;
        let v = rows
            .iter()
            .find(|v| v.v.path == tar_path && v.v.kind == EntryKind::File)
            .context("tar row")?;
        let h = v.v.parts[0].hash;
        corrupt_blob_everywhere(&cluster, &h).await?;
        let bad = pgd.join("corrupt");
        let out = lifeboat(
            &cluster,
            &[
                "restore", "postgres", "--source", "db", "--at", &at, "--to",
                bad.to_str().unwrap(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "restore of a corrupted base backup succeeded");
        assert!(err.contains("corrupt"), "error does not say corrupted: {err}");
        assert!(!bad.join("PG_VERSION").exists(), "nothing unpacked from a corrupted backup");
        drop(primary);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_role_promotes_replica_and_fences_primary() -> anyhow::Result<()> {
    run("t14-role", |dir| async move {
        let pgd = Pg::workdir(&dir)?;
        let primary = Pg::init(&pgd.join("primary"))?;
        primary.psql("CREATE TABLE t (id int PRIMARY KEY)")?;
        primary.psql("INSERT INTO t VALUES (1)")?;
        let rdata = pgd.join("replica");
        let mut c = as_postgres("pg_basebackup");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&rdata)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run_checked(c, "pg_basebackup -R")?;
        let replica = Pg::start(&rdata)?;
        // A second standby, in the standby region "west".
        let r2data = pgd.join("replica2");
        let mut c = as_postgres("pg_basebackup");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&r2data)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run_checked(c, "pg_basebackup -R (replica2)")?;
        let replica2 = Pg::start(&r2data)?;
        assert!(
            replica.in_recovery()?,
            "streaming replica starts in recovery"
        );
        assert!(
            replica.psql("INSERT INTO t VALUES (2)").is_err(),
            "a replica refuses writes"
        );
        primary.psql("INSERT INTO t VALUES (3)")?;
        wait_for("row 3 replicated", 30, || {
            Ok(replica.psql("SELECT count(*) FROM t")? == "2")
        })
        .await?;

        let rsrc = replica.source("db");
        let psrc = primary.source("db");
        let h = health(&rsrc).await;
        assert!(h.healthy && h.role == "replica", "{h:?}");
        assert!(h.lag_bytes.is_some(), "{h:?}");
        let h = health(&psrc).await;
        assert!(
            h.healthy && h.role == "primary" && h.lag_bytes.is_none(),
            "{h:?}"
        );

        // Active region: the replica is promoted and takes writes; a second call is a no-op.
        let msg = apply_role(&rsrc, "east", "east", 7).await?;
        assert!(msg.contains("promoted") && msg.contains("epoch 7"), "{msg}");
        assert!(!replica.in_recovery()?);
        replica.psql("INSERT INTO t VALUES (4)")?;
        let h = health(&rsrc).await;
        assert!(h.healthy && h.role == "primary", "{h:?}");
        let msg = apply_role(&rsrc, "east", "east", 7).await?;
        assert!(msg.contains("already primary"), "{msg}");

        // A standby in the standby region is pointed at the active region's primary, once.
        let mut r2src = replica2.source("db");
        r2src
            .primary_by_region
            .insert("east".into(), format!("127.0.0.1:{}", replica.port));
        let msg = apply_role(&r2src, "west", "east", 7).await?;
        assert!(msg.contains("re-pointed"), "{msg}");
        let conninfo = replica2.psql("SHOW primary_conninfo")?;
        assert!(
            conninfo.contains(&format!("port={}", replica.port)),
            "{conninfo}"
        );
        assert!(replica2.in_recovery()?, "a standby stays a standby");
        let msg = apply_role(&r2src, "west", "east", 7).await?;
        assert!(msg.contains("already following"), "{msg}");
        drop(replica2);

        // Standby region: the old primary is fenced (stopped); again: stays fenced.
        let msg = apply_role(&psrc, "west", "east", 7).await?;
        assert!(msg.contains("fenced"), "{msg}");
        let h = health(&psrc).await;
        assert!(
            !h.healthy && h.role == "unknown",
            "a stopped server is unhealthy: {h:?}"
        );
        assert!(
            primary.psql("SELECT 1").is_err(),
            "fenced primary refuses connections"
        );
        let msg = apply_role(&psrc, "west", "east", 8).await?;
        assert!(msg.contains("not running"), "{msg}");
        // Without data_dir a writable primary in a standby region cannot be fenced: an error.
        let mut nodir = rsrc.clone();
        nodir.data_dir = None;
        let e = apply_role(&nodir, "west", "east", 9).await.unwrap_err();
        assert!(e.to_string().contains("cannot be fenced"), "{e}");
        drop(replica);
        Ok(())
    })
    .await
}

/// One measured Lifeboat base backup of the server on `port`: a fresh 3-coordinator cluster in
/// `dir/cluster-ROUND`, an agent with source `db`; returns the seconds from the backup's start
/// (the sidecar's `start_ms`) to the catalog commit of its last row, the cluster and the agent's
/// data directory. Prints the bytes, the spool time and the spool's stage times.
async fn lifeboat_base_backup(
    dir: &Path,
    round: usize,
    port: u16,
) -> anyhow::Result<(f64, Cluster, std::path::PathBuf)> {
    let cdir = dir.join(format!("cluster-{round}"));
    let mut cluster = Cluster::start(&cdir, &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let extra = format!(
        "[[postgres_sources]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\nbase_backup_interval_s = 36000\n"
    );
    let (cfg, data) = cluster.write_agent_config("a1", &[], &extra)?;
    cluster.start_agent(&cfg)?;
    // Polled every 2 s (each poll is a `lifeboat ls` process, whose CPU would otherwise
    // compete with the backup on 2 cores); the figure comes from the catalog's commit time.
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !catalog_paths(&cluster, "_snapshots/db/base")
        .iter()
        .any(|p| p.ends_with(".tar.meta.json"))
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "base backup not acknowledged in 1800 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &lifeboat(&cluster, &["ls", "_snapshots/db/base", "--output", "json"]).stdout,
    )?;
    let committed = rows
        .iter()
        .filter_map(|r| r["commit_time_ms"].as_i64())
        .max()
        .unwrap_or(0);
    let meta_dir = lifeboat_agent::sources::postgres::meta_dir(&data, "db");
    let side = std::fs::read_dir(&meta_dir)?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .ok_or_else(|| anyhow::anyhow!("no sidecar in {}", meta_dir.display()))?;
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(side.path())?)?;
    let (start, end) = (
        meta["start_ms"].as_i64().unwrap_or(0),
        meta["end_ms"].as_i64().unwrap_or(0),
    );
    // The store keeps blob `h` at `<data>/blobs/` + `h.key()` (`blobs/<2 hex>/<64 hex>`).
    let (mut blobs, mut stored) = (0u64, 0u64);
    for d in std::fs::read_dir(cluster.coords[0].data_dir.join("blobs").join("blobs"))?
        .filter_map(|e| e.ok())
    {
        for f in std::fs::read_dir(d.path())?.filter_map(|e| e.ok()) {
            blobs += 1;
            stored += f.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    eprintln!(
        "lifeboat base backup: {} bytes ({blobs} blobs of {stored} bytes on coordinator 0); tar spooled in {:.2} s",
        meta["bytes"],
        (end - start) as f64 / 1000.0,
    );
    // Where the spool's stages waited (the agent's "spool written" log line), and when the
    // agent received the acknowledgement (its "snapshot acknowledged" line, logged when the
    // reply arrives: after the commit, so the later and stricter end point).
    let mut acked_ms = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked_ms.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        acked_ms = agent_acked_ms(&cdir)?;
    }
    for e in std::fs::read_dir(&cdir)?.filter_map(|e| e.ok()) {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in text.lines().filter(|l| l.contains("spool written")) {
                eprintln!(
                    "agent: {}",
                    l.split("spool written").nth(1).unwrap_or(l).trim()
                );
            }
        }
    }
    let acked = acked_ms
        .ok_or_else(|| anyhow::anyhow!("no \"snapshot acknowledged\" line in the agent's log"))?;
    eprintln!(
        "lifeboat base backup: catalog commit proposed {:.2} s, acknowledged to the agent {:.2} s after it started",
        (committed - start) as f64 / 1000.0,
        (acked - start) as f64 / 1000.0,
    );
    Ok(((acked - start) as f64 / 1000.0, cluster, data))
}

/// When (ms since the epoch) the agent logged a base backup's acknowledgement ("snapshot
/// acknowledged" for a `/base/` sidecar) in a log under `cdir`, if it did.
fn agent_acked_ms(cdir: &Path) -> anyhow::Result<Option<i64>> {
    for e in std::fs::read_dir(cdir)?.filter_map(|e| e.ok()) {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for l in text
                .lines()
                .filter(|l| l.contains("snapshot acknowledged") && l.contains("/base/"))
            {
                // The line starts with its RFC 3339 time, maybe inside ANSI colour codes
                // (`ESC [ ... m`).
                let first = l.split_whitespace().next().unwrap_or_default();
                let mut ts = String::new();
                let mut in_code = false;
                for c in first.chars() {
                    match c {
                        '\u{1b}' => in_code = true,
                        'm' if in_code => in_code = false,
                        _ if !in_code => ts.push(c),
                        _ => {}
                    }
                }
                if let Ok(t) = ts.parse::<jiff::Timestamp>() {
                    return Ok(Some(t.as_millisecond()));
                }
            }
        }
    }
    Ok(None)
}

/// Measurement (run by hand: `cargo test --release -p lifeboat-chaos-tests --test databases_postgres_base_backup_and_pitr
/// -- --ignored --nocapture measure`): a pgbench database (`LIFEBOAT_PGBENCH_SCALE`, default 70,
/// about 1 GB); `LIFEBOAT_BENCH_ROUNDS` (default 3) rounds of plain `pg_basebackup -D dir -c
/// fast` then Lifeboat's base backup until acknowledged (a fresh cluster each); then a PITR
/// restore until queries work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, minutes and several GB of disk"]
async fn measure_pgbench_base_backup_and_pitr() -> anyhow::Result<()> {
    run("t14-measure", |dir| async move {
        let scale = std::env::var("LIFEBOAT_PGBENCH_SCALE").unwrap_or_else(|_| "70".into());
        let pgd = Pg::workdir(&dir)?;
        let primary = Pg::init(&pgd.join("primary"))?;
        let t0 = Instant::now();
        let mut c = Command::new(Path::new(BIN).join("pgbench"));
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-i", "-q", "-s", &scale, "-p"])
            .arg(primary.port.to_string())
            .arg("postgres");
        run_checked(c, "pgbench -i")?;
        let size: u64 = primary.psql("SELECT pg_database_size('postgres')")?.parse()?;
        eprintln!("pgbench -i -s {scale}: {size} bytes in {:.1} s", t0.elapsed().as_secs_f64());
        primary.psql("CHECKPOINT")?;
        // Both tools start with the freshly loaded data written back (no writeback competing).
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };

        // The native tool's time varies a lot on these VMs (page-cache writes of a fresh 1 GB
        // cost 1.5 to 4.5 s), and a run of one tool can slow the next: rounds of one native run
        // then one Lifeboat run (a fresh cluster each, so no part is stored already), compared
        // round by round and by their medians.
        let rounds: usize = std::env::var("LIFEBOAT_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
            .max(1);
        let local = pgd.join("plain-backup");
        let (mut plain_runs, mut lb_runs) = (Vec::new(), Vec::new());
        let mut last = None;
        for round in 0..rounds {
            let t0 = Instant::now();
            let mut c = as_postgres("pg_basebackup");
            c.args(["-h", "127.0.0.1", "-U", "postgres", "-c", "fast", "-p"])
                .arg(primary.port.to_string())
                .arg("-D")
                .arg(&local);
            run_checked(c, "pg_basebackup -D")?;
            let plain = t0.elapsed().as_secs_f64();
            std::fs::remove_dir_all(&local)?;
            // Both tools start with nothing left to write back.
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            // The previous round's cluster and agent stop first (the agent's pg_receivewal
            // dies with it).
            drop(last.take());
            if round > 0 {
                // Every round starts as the first: no slot, so no WAL backlog for the new
                // agent to ship during its base backup.
                let slot = lifeboat_agent::sources::postgres::slot_name("db");
                let sql = format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                );
                let deadline = Instant::now() + Duration::from_secs(30);
                while primary.psql(&sql).is_err() {
                    anyhow::ensure!(Instant::now() < deadline, "slot {slot} still active after 30 s");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            let (secs, cluster, data) = lifeboat_base_backup(&dir, round, primary.port).await?;
            last = Some((cluster, data));
            eprintln!(
                "round {}: pg_basebackup -D localdir -c fast {plain:.2} s; lifeboat {secs:.2} s ({:.2}x)",
                round + 1,
                secs / plain
            );
            plain_runs.push(plain);
            lb_runs.push(secs);
            // SAFETY: as above.
            unsafe { libc::sync() };
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (plain, lb) = (median(&plain_runs), median(&lb_runs));
        let mut ratios: Vec<f64> = lb_runs.iter().zip(&plain_runs).map(|(l, p)| l / p).collect();
        ratios.sort_by(|a, b| a.total_cmp(b));
        eprintln!(
            "base backup over {rounds} rounds: lifeboat median {lb:.2} s, pg_basebackup median {plain:.2} s: {:.2}x (round ratios {})",
            lb / plain,
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" / ")
        );
        let (cluster, data) = last.ok_or_else(|| anyhow::anyhow!("no round ran"))?;

        primary.psql("CREATE TABLE marker (id int)")?;
        primary.psql("INSERT INTO marker VALUES (1)")?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let t = jiff::Timestamp::now();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        primary.psql("INSERT INTO marker VALUES (2)")?;
        switch_wal_and_wait(&primary, &cluster, "db", &data, 300).await?;
        let restored = pgd.join("restored");
        let at = t.to_string();
        let t0 = Instant::now();
        let r = json(&lifeboat(
            &cluster,
            &["restore", "postgres", "--source", "db", "--at", &at, "--to",
              restored.to_str().unwrap(), "--output", "json"],
        ));
        let restore = t0.elapsed();
        let rs = Pg::start(&restored)?;
        wait_for("restored server leaves recovery", 1800, || Ok(!rs.in_recovery()?)).await?;
        let rows = rs.psql("SELECT string_agg(id::text, ',') FROM marker")?;
        let total = t0.elapsed();
        assert_eq!(rows, "1");
        let accounts = rs.psql("SELECT count(*) FROM pgbench_accounts")?;
        eprintln!(
            "PITR: lifeboat restore postgres {:.2} s ({} bytes, {} WAL files); until queries work {:.2} s; pgbench_accounts rows {accounts}",
            restore.as_secs_f64(),
            r["base_bytes"],
            r["wal_files"],
            total.as_secs_f64()
        );
        drop(rs);
        drop(primary);
        Ok(())
    })
    .await
}

/// (d) An agent killed with SIGKILL leaves no `pg_receivewal` behind (it dies with the agent),
/// and a replication slot held by a stray `pg_receivewal` (as one left by an older agent) is
/// freed by the next agent, whose WAL archiving then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_leaves_no_wal_receiver_and_a_held_slot_is_freed() -> anyhow::Result<()> {
    run("t14-orphan", |dir| async move {
        let pgd = Pg::workdir(&dir)?;
        let primary = Pg::init(&pgd.join("primary"))?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = format!(
            "[[postgres_sources]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\nbase_backup_interval_s = 3600\n",
            primary.port
        );
        let (cfg, data) = cluster.write_agent_config("a1", &[], &extra)?;
        let receivers = || -> anyhow::Result<String> {
            primary.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_receivewal'")
        };
        let mut agent = cluster.spawn_agent(&cfg, false)?;
        wait_for("the agent's pg_receivewal streams", 60, || Ok(receivers()? == "1")).await?;
        switch_wal_and_wait(&primary, &cluster, "db", &data, 60).await?;

        // SIGKILL: no orderly shutdown, yet its pg_receivewal goes too.
        agent.kill()?;
        agent.wait()?;
        wait_for("pg_receivewal ends with the killed agent", 20, || Ok(receivers()? == "0")).await?;

        // A stray receiver holds the agent's slot.
        let slot = lifeboat_agent::sources::postgres::slot_name("db");
        let stray_dir = pgd.join("stray-wal");
        std::fs::create_dir_all(&stray_dir)?;
        chown_to_server_user(&stray_dir)?;
        let mut stray = as_postgres("pg_receivewal");
        stray
            .args(["-h", "127.0.0.1", "-U", "postgres", "--no-loop", "-p"])
            .arg(primary.port.to_string())
            .arg(format!("--slot={slot}"))
            .arg("-D")
            .arg(&stray_dir);
        let mut stray = stray.spawn()?;
        wait_for("the stray receiver holds the slot", 30, || {
            Ok(primary.psql(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
            ))? == "1")
        })
        .await?;

        // The next agent frees the slot and archives WAL again.
        cluster.start_agent(&cfg)?;
        let seg = switch_wal_and_wait(&primary, &cluster, "db", &data, 90).await?;
        assert!(is_segment_name(&seg), "{seg}");
        wait_for("the stray receiver exits", 20, || Ok(stray.try_wait()?.is_some())).await?;
        let log = std::fs::read_to_string(cfg.with_extension("log"))?;
        assert!(
            log.contains("the replication slot was held by another connection"),
            "the agent says it freed the slot"
        );
        Ok(())
    })
    .await
}

fn is_segment_name(s: &str) -> bool {
    lifeboat_agent::sources::postgres::is_segment(s)
}
