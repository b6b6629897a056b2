//! PostgreSQL snapshots against a real PostgreSQL 15 (run as user `postgres`):
//! (a) retention: a `[retention.two]` class with `keep_last = 2` leaves exactly the two newest of
//! at least four base backups in the catalog (the older ones are tombstoned), and WAL older than
//! the oldest kept backup's start segment is expired while PITR from the oldest kept backup still
//! recovers; (b) `lifeboat verify snapshot <source>/base/<ts>` restores a base backup into a
//! scratch server and reports the right row counts and the `--sql` result, fails (non-zero, clear
//! report) on a wrong `--expect`, replays the archived WAL with `--full`, and detects a corrupted
//! base backup.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lifeboat_chaos_tests::pg_server::*;
use lifeboat_chaos_tests::*;
use lifeboat_common::catalog::EntryKind;

fn count_in_log(cfg: &Path, what: &str) -> usize {
    std::fs::read_to_string(cfg.with_extension("log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .count()
}

fn agent_config(port: u16, interval_s: u64) -> String {
    format!(
        "[retention.two]\nkeep_last = 2\n\n[[postgres_sources]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\nbase_backup_interval_s = {interval_s}\nretention = \"two\"\n"
    )
}

/// Live base backup tars, oldest first.
fn live_tars(cluster: &Cluster) -> Vec<String> {
    let mut t: Vec<String> = catalog_paths(cluster, "_snapshots/db/base")
        .into_iter()
        .filter(|p| p.ends_with(".tar"))
        .collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_retention_pitr_and_verify() -> anyhow::Result<()> {
    run("t21-pg", |dir| async move {
        let pgd = Pg::workdir(&dir)?;
        let primary = Pg::init(&pgd.join("primary"))?;
        primary.psql("CREATE TABLE t (id int PRIMARY KEY, note text)")?;
        primary.psql("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g")?;
        primary.psql("CREATE SCHEMA app")?;
        primary.psql("CREATE TABLE app.\"Mixed Case\" (x int)")?;
        primary.psql("INSERT INTO app.\"Mixed Case\" SELECT generate_series(1, 7)")?;
        primary.psql("CREATE TABLE ticks (at timestamptz)")?;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;

        // Phase 1: a base backup every 2 s until three were taken (WAL keeps moving).
        let (cfg, data) = cluster.write_agent_config("a1", &[], &agent_config(primary.port, 2))?;
        cluster.start_agent(&cfg)?;
        wait_for("three base backups taken", 300, || {
            primary.psql("INSERT INTO ticks VALUES (now())")?;
            primary.psql("SELECT pg_switch_wal()")?;
            Ok(count_in_log(&cfg, "postgres base backup taken") >= 3)
        })
        .await?;
        // A graceful stop (SIGTERM): the agent ends pg_receivewal, which holds the slot.
        let mut first = cluster.agents.remove(0);
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
        first.wait()?;
        // Phase 2: one more at start, then none for an hour: the catalog settles.
        std::fs::write(
            &cfg,
            std::fs::read_to_string(&cfg)?.replace(
                "base_backup_interval_s = 2\n",
                "base_backup_interval_s = 3600\n",
            ),
        )?;
        // The PITR target below lies 300 ms after the third backup ended and must come before the
        // fourth ends: leave a clear gap (a fast restart took the fourth within 300 ms).
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        cluster.start_agent(&cfg)?;
        wait_for("four backups taken, two live", 300, || {
            Ok(count_in_log(&cfg, "postgres base backup taken") >= 4
                && live_tars(&cluster).len() == 2)
        })
        .await?;
        // A commit after the last backup, in a completed and archived segment: every recovery
        // target below lies before it.
        primary.psql("INSERT INTO ticks VALUES (now())")?;
        switch_wal_and_wait(&primary, &cluster, "db", &data, 120).await?;

        // (a) Exactly the two newest backups (tar + sidecar) are live; the older ones are tombstones.
        let taken = count_in_log(&cfg, "postgres base backup taken");
        let kept = live_tars(&cluster);
        assert_eq!(kept.len(), 2, "{kept:?}");
        let base = catalog_with_deleted(&cluster, "_snapshots/db/base");
        let live_meta: Vec<&String> = base
            .iter()
            .filter(|(p, d)| !d && p.ends_with(".tar.meta.json"))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(live_meta.len(), 2, "{base:?}");
        let expired: Vec<&String> = base
            .iter()
            .filter(|(p, d)| *d && p.ends_with(".tar"))
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            expired.len() + 2,
            taken,
            "every older backup expired: {base:?}"
        );
        assert!(
            expired
                .iter()
                .all(|e| kept.iter().all(|k| e.as_str() < k.as_str())),
            "only older backups expire: {base:?}"
        );
        let log = std::fs::read_to_string(cfg.with_extension("log"))?;
        assert!(
            log.contains("retention: expiring snapshots from the catalog"),
            "{log}"
        );

        // WAL before the oldest kept backup's start segment is expired; the rest is live.
        let side = dir.join("sidecars");
        restore_latest(&cluster, "_snapshots/db/base", &side).await?;
        let meta = |tar: &str| -> anyhow::Result<serde_json::Value> {
            Ok(serde_json::from_slice(&std::fs::read(
                side.join(format!("{tar}.meta.json")),
            )?)?)
        };
        let (old, new) = (meta(&kept[0])?, meta(&kept[1])?);
        let start = old["start_wal_file"]
            .as_str()
            .context("start_wal_file")?
            .to_string();
        let wal = catalog_with_deleted(&cluster, "_snapshots/db/wal");
        let seg_no = |p: &str| p.rsplit('/').next().unwrap_or_default()[8..].to_string();
        let segs: Vec<&(String, bool)> = wal
            .iter()
            .filter(|(p, _)| !p.ends_with(".history"))
            .collect();
        let gone: Vec<&&(String, bool)> = segs.iter().filter(|(_, d)| *d).collect();
        assert!(!gone.is_empty(), "some WAL expired: {wal:?}");
        for (p, deleted) in &segs {
            assert_eq!(
                *deleted,
                *seg_no(p) < start[8..],
                "{p}: expired exactly when before {start}"
            );
        }

        // PITR still works from the oldest kept backup (its WAL is all there) and from the newest.
        let at = jiff::Timestamp::from_millisecond(old["end_ms"].as_i64().unwrap() + 300)?;
        assert!(at.as_millisecond() < new["end_ms"].as_i64().unwrap());
        let restored = pgd.join("pitr-oldest");
        let r = json(&lifeboat(
            &cluster,
            &[
                "restore",
                "postgres",
                "--source",
                "db",
                "--at",
                &at.to_string(),
                "--to",
                restored.to_str().unwrap(),
                "--start-check",
                "--output",
                "json",
            ],
        ));
        assert_eq!(r["base_backup"].as_str(), Some(kept[0].as_str()), "{r}");
        let rs = Pg::start(&restored)?;
        assert_eq!(rs.psql("SELECT count(*) FROM t")?, "100");
        drop(rs);
        let latest = pgd.join("pitr-latest");
        let r = json(&lifeboat(
            &cluster,
            &[
                "restore",
                "postgres",
                "--source",
                "db",
                "--at",
                "latest",
                "--to",
                latest.to_str().unwrap(),
                "--start-check",
                "--output",
                "json",
            ],
        ));
        assert_eq!(r["base_backup"].as_str(), Some(kept[1].as_str()), "{r}");

        // (b) verify: row counts and the query's result in a scratch server.
        let id = |tar: &str| {
            tar.trim_start_matches("_snapshots/")
                .trim_end_matches(".tar")
                .to_string()
        };
        let (old_id, new_id) = (id(&kept[0]), id(&kept[1]));
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let sdir = scratch.to_str().unwrap();
        let v = json(&lifeboat(
            &cluster,
            &[
                "verify",
                "snapshot",
                &new_id,
                "--sql",
                "SELECT count(*) FROM t WHERE note LIKE 'row %'",
                "--expect",
                "100",
                "--scratch-dir",
                sdir,
                "--output",
                "json",
            ],
        ));
        assert_eq!(v["verdict"], "ok", "{v}");
        assert_eq!(
            (v["ok"].as_bool(), v["blake3_ok"].as_bool()),
            (Some(true), Some(true)),
            "{v}"
        );
        assert_eq!(v["kind"], "postgres");
        assert_eq!(v["snapshot"].as_str(), Some(new_id.as_str()));
        assert_eq!(v["bytes"].as_u64(), new["bytes"].as_u64());
        assert_eq!(v["tables"]["public.t"].as_i64(), Some(100), "{v}");
        assert_eq!(v["tables"]["app.Mixed Case"].as_i64(), Some(7), "{v}");
        assert!(v["tables"]["public.ticks"].as_i64().is_some(), "{v}");
        assert_eq!(v["sql_result"].as_str(), Some("100"));
        eprintln!(
            "verify of {new_id}: {} bytes, restore {} ms, start {} ms, total {} ms",
            v["bytes"], v["restore_ms"], v["start_ms"], v["duration_ms"]
        );
        assert!(
            v["restore_ms"].as_u64().is_some() && v["start_ms"].as_u64().is_some(),
            "{v}"
        );
        let names: Vec<&str> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["blake3", "unpack", "start", "row_counts", "sql"],
            "{v}"
        );
        assert_eq!(
            std::fs::read_dir(&scratch)?.count(),
            0,
            "scratch instance removed"
        );

        // A wrong --expect: non-zero exit and a report naming the mismatch.
        let out = lifeboat(
            &cluster,
            &[
                "verify",
                "snapshot",
                &new_id,
                "--sql",
                "SELECT count(*) FROM t",
                "--expect",
                "99",
                "--scratch-dir",
                sdir,
                "--output",
                "json",
            ],
        );
        let v = failed_json(&out, "a wrong --expect fails the verification");
        assert_eq!(
            (v["verdict"].as_str(), v["ok"].as_bool()),
            (Some("failed"), Some(false)),
            "{v}"
        );
        let sql = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "sql")
            .context("sql check")?;
        assert_eq!(sql["ok"], false);
        assert!(
            sql["detail"].as_str().unwrap().contains("expected \"99\""),
            "{sql}"
        );
        assert_eq!(
            v["tables"]["public.t"].as_i64(),
            Some(100),
            "row counts still reported: {v}"
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("failed verification"));
        // The human report.
        let out = lifeboat(
            &cluster,
            &[
                "verify",
                "snapshot",
                &new_id,
                "--sql",
                "SELECT 1",
                "--expect",
                "2",
                "--scratch-dir",
                sdir,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success());
        assert!(
            text.contains("[FAIL] sql")
                && text.contains("public.t: 100 rows")
                && text.contains("verdict: failed"),
            "{text}"
        );

        // --full: the oldest kept backup through every archived WAL segment.
        let v = json(&lifeboat(
            &cluster,
            &[
                "verify",
                "snapshot",
                &old_id,
                "--full",
                "--scratch-dir",
                sdir,
                "--output",
                "json",
            ],
        ));
        assert_eq!(v["verdict"], "ok", "{v}");
        assert!(v["wal_files"].as_u64().unwrap() >= 1, "{v}");
        eprintln!(
            "verify --full of {old_id}: {} bytes, {} WAL files, restore {} ms, start {} ms, total {} ms",
            v["bytes"], v["wal_files"], v["restore_ms"], v["start_ms"], v["duration_ms"]
        );
        assert_eq!(v["tables"]["public.t"].as_i64(), Some(100), "{v}");

        // An expired backup is gone for verify too.
        let gone_id = id(expired[0]);
        let out = lifeboat(
            &cluster,
            &["verify", "snapshot", &gone_id, "--output", "json"],
        );
        let v = failed_json(
            &out,
            &format!("expired snapshot {gone_id} still verifiable"),
        );
        assert!(
            v["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no snapshot"),
            "{v}"
        );

        // A corrupted base backup (first blob flipped on every coordinator) is detected.
        let (rows, _) =
            files::list(&cluster.conn(), "_snapshots/db/base/", None, false, false).await?;
        let row = rows
            .iter()
            .find(|r| r.v.path == kept[1] && r.v.kind == EntryKind::File)
            .context("tar row")?;
        let h = row.v.parts[0].hash;
        corrupt_blob_everywhere(&cluster, &h).await?;
        let out = lifeboat(
            &cluster,
            &[
                "verify",
                "snapshot",
                &new_id,
                "--scratch-dir",
                sdir,
                "--output",
                "json",
            ],
        );
        let v = failed_json(&out, "verify of a corrupted base backup succeeded");
        assert_eq!(
            (v["verdict"].as_str(), v["blake3_ok"].as_bool()),
            (Some("failed"), Some(false)),
            "{v}"
        );
        assert!(
            v["error"].as_str().unwrap_or_default().contains("corrupt"),
            "{v}"
        );
        assert!(
            v["start_ms"].is_null(),
            "no server started from a corrupted backup: {v}"
        );
        drop(primary);
        Ok(())
    })
    .await
}
