//! Issue 4 inside the region failover, with real servers: regions a and b (3 coordinators each)
//! and a witness; a real redis-server and PostgreSQL 15 per region (b's PostgreSQL a streaming
//! standby from a base backup of a's, b's Redis made a replica of a's by agent-b from the
//! control record). Region a's coordinators are SIGKILLed while a's agent and databases keep
//! running (the old primaries stay reachable). The test checks:
//!
//! - the global group fails over to b; b's leader waits for agent-b to report its Redis and
//!   PostgreSQL primary at epoch 2 and audits one `promote-db` entry per database (actor
//!   `agent agent-b`, outcome ok);
//! - b's traffic hook runs only after that: at hook time `redis-cli ROLE` says `master` and
//!   `pg_is_in_recovery()` is false, the hook's entry follows the `promote-db` entries in the
//!   audit log and its clock reading is not earlier than their completion times;
//! - a's Redis, armed with `min_replicas_to_write = 1`, refuses writes (NOREPLICAS) once b's
//!   Redis stops following it;
//! - when a's coordinators return, agent-a learns epoch 2: a's Redis becomes a replica of b's,
//!   a's PostgreSQL is stopped (fenced), and both are audited as `demote-db` by agent-a.
//!
//! Skipped (with a message) only when redis-server or the PostgreSQL binaries are absent;
//! `scripts/install-test-deps.sh` installs them.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::redis_server::{set, start_redis, wait_value};
use lifeboat_chaos_tests::*;
use lifeboat_lab::dbservers::{pg_client, redis_role, AgentDbs, DbBinaries, PgServer};
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_proto::AuditEntry;

async fn audit(regions: &Regions) -> Vec<AuditEntry> {
    lifeboat_client::control::audit(&regions.conn(), 1000)
        .await
        .unwrap_or_default()
}

/// Polls the audit log until `pred` holds for some entry; returns that entry.
async fn wait_entry(
    regions: &Regions,
    what: &str,
    pred: impl Fn(&AuditEntry) -> bool,
) -> anyhow::Result<AuditEntry> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = audit(regions).await;
        if let Some(e) = log.iter().find(|e| pred(e)) {
            return Ok(e.clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no audit entry {what}; log: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is(e: &AuditEntry, action: &str, epoch: u64, actor: &str, kind: &str) -> bool {
    e.action == action
        && e.epoch == epoch
        && e.actor == actor
        && e.detail.starts_with(&format!("{kind} "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_promotion_is_audited_before_traffic_moves() -> anyhow::Result<()> {
    let bins = DbBinaries::find();
    let Some(pg_bin) = bins.pg_bin.clone().filter(|_| bins.complete()) else {
        panic!(
            "t29 needs redis-server and PostgreSQL: {} (run scripts/install-test-deps.sh)",
            bins.missing.join("; ")
        );
    };
    run("t29", |dir| async move {
        let redis_a = start_redis(&dir.join("redis-a"), &[])?;
        let redis_b = start_redis(&dir.join("redis-b"), &[])?;
        let (mut ca, mut cb) = (redis_a.con().await?, redis_b.con().await?);
        let pgd = PgServer::workdir(&dir)?;
        let pg_a = PgServer::init_primary(&pg_bin, &pgd.join("a"), "pg_a")?;
        let pg_b = PgServer::standby_of(&pg_a, &pgd.join("b"), "pg_b")?;
        let pa = pg_client(pg_a.port).await?;
        pa.batch_execute("CREATE TABLE t (id int PRIMARY KEY)").await?;

        let marker = dir.join("hook-b");
        let hook_b = format!(
            "[[global.traffic_hooks]]\nkind = \"exec\"\nname = \"point-traffic-at-b\"\ncommand = [\"sh\", \"-c\", \"{{ date +%s%3N; redis-cli -p {} ROLE | head -1; {}/psql -h 127.0.0.1 -p {} -U postgres -d postgres -Atc 'select pg_is_in_recovery()'; }} > {m}.tmp && mv {m}.tmp {m}\"]\n",
            redis_b.port,
            pg_bin.display(),
            pg_b.port,
            m = marker.display()
        );
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                hooks_toml: [("b".to_string(), hook_b)].into_iter().collect(),
                // Generous on a loaded machine: the hook must wait for the databases.
                global_toml: "db_promotion_timeout_ms = 30000\n".into(),
                // Region a must not be failed over at start-up while its coordinators still
                // elect a regional leader on a loaded machine (seen once in CI: a had no leader
                // for lease + detection + drift, 2.75 s with the defaults).
                policy_toml: "detection_timeout_ms = 3000\n".into(),
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let redis_map = vec![
            ("a".to_string(), redis_a.addr()),
            ("b".to_string(), redis_b.addr()),
        ];
        let pg_map = vec![
            ("a".to_string(), pg_a.addr()),
            ("b".to_string(), pg_b.addr()),
        ];
        for (region, r, pg) in [("a", &redis_a, &pg_a), ("b", &redis_b, &pg_b)] {
            let dbs = AgentDbs {
                redis_addr: r.addr(),
                redis_by_region: redis_map.clone(),
                min_replicas_to_write: 1,
                pg: Some((pg.port, pg.data.clone(), pg_bin.clone())),
                pg_by_region: pg_map.clone(),
                checks: false,
            };
            let (cfg, _) = regions.region(region).write_agent_config(
                &format!("agent-{region}"),
                &[],
                &dbs.toml(),
            )?;
            regions.region_mut(region).start_agent(&cfg)?;
        }
        // From the control record alone: b's Redis follows a's, and a's is armed.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let armed: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg("min-replicas-to-write")
                .query_async(&mut ca)
                .await?;
            // Armed a refuses writes (NOREPLICAS) until b's first REPLCONF ACK counts it as a
            // good replica.
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut ca)
                .await?;
            let good = info.contains("min_slaves_good_slaves:1");
            if redis_role(&mut cb).await == "slave connected" && armed[1] == "1" && good {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "b's redis never followed an armed a");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in 0..100 {
            set(&mut ca, &format!("k{i}"), &format!("v{i}")).await?;
            pa.execute("INSERT INTO t VALUES ($1)", &[&i]).await?;
        }
        wait_value(&mut cb, "k99", "v99").await?;
        let pb = pg_client(pg_b.port).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = pb.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
            if n == 100 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "standby has {n} rows of 100");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(pb);

        // Region a's coordinators are lost; its agent and databases keep running.
        for i in 0..3 {
            regions.region_mut("a").kill_coordinator(i);
        }
        let killed = Instant::now();
        regions.wait_active("b", 2, Duration::from_secs(90)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let hook = loop {
            if let Ok(s) = std::fs::read_to_string(&marker) {
                break s;
            }
            anyhow::ensure!(Instant::now() < deadline, "b's traffic hook did not run");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!(
            "kill -> b active, hook ran: {} ms",
            killed.elapsed().as_millis()
        );
        let lines: Vec<&str> = hook.lines().collect();
        assert_eq!(lines.len(), 3, "hook output: {hook:?}");
        assert_eq!(lines[1], "master", "b's Redis at hook time: {hook:?}");
        assert_eq!(lines[2], "f", "b's PostgreSQL in recovery at hook time: {hook:?}");
        let hook_ms: u64 = lines[0].parse()?;

        let r = wait_entry(&regions, "promote-db redis by agent-b", |e| {
            is(e, "promote-db", 2, "agent agent-b", "redis")
        })
        .await?;
        let p = wait_entry(&regions, "promote-db postgres by agent-b", |e| {
            is(e, "promote-db", 2, "agent agent-b", "postgres")
        })
        .await?;
        let h = wait_entry(&regions, "traffic-hook of b", |e| {
            e.action == "traffic-hook" && e.epoch == 2
        })
        .await?;
        for db in [&r, &p] {
            assert_eq!(db.outcome, "ok", "{db:?}");
            assert!(db.detail.contains("role primary"), "{db:?}");
            assert!(db.seq < h.seq, "audited before the hook: {db:?} {h:?}");
            assert!(
                db.at_ms <= hook_ms,
                "promoted (at_ms) before the hook ran ({hook_ms}): {db:?}"
            );
            eprintln!("{}", db.detail);
        }
        assert_eq!(h.outcome, "ok", "{h:?}");

        // b's databases are primaries with every row and key, and take writes.
        let pb = pg_client(pg_b.port).await?;
        let n: i64 = pb.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
        assert_eq!(n, 100);
        pb.execute("INSERT INTO t VALUES (1000)", &[]).await?;
        set(&mut cb, "after-failover", "b").await?;

        // a's Redis is armed and b's stopped following it: the isolated old primary refuses.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match set(&mut ca, "split-brain", "a").await {
                Err(e) if e.to_string().to_uppercase().contains("NOREPLICAS") => break,
                res => anyhow::ensure!(
                    Instant::now() < deadline,
                    "a's isolated Redis still answers {res:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // a's coordinators return: agent-a fences its PostgreSQL and makes its Redis follow b.
        regions.start_region("a")?;
        let d = wait_entry(&regions, "demote-db redis by agent-a", |e| {
            is(e, "demote-db", 2, "agent agent-a", "redis") && e.outcome == "ok"
        })
        .await?;
        eprintln!("{}", d.detail);
        let d = wait_entry(&regions, "demote-db postgres by agent-a", |e| {
            is(e, "demote-db", 2, "agent agent-a", "postgres") && e.outcome == "ok"
        })
        .await?;
        eprintln!("{}", d.detail);
        assert!(d.detail.contains("role stopped"), "{d:?}");
        assert!(pg_client(pg_a.port).await.is_err(), "a's PostgreSQL is stopped");
        wait_value(&mut ca, "after-failover", "b").await?;
        assert!(
            redis_role(&mut ca).await.starts_with("slave"),
            "a's Redis follows b's"
        );
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut ca)
            .await?;
        assert!(
            info.contains(&format!("master_port:{}", redis_b.port)),
            "{info}"
        );
        drop(pa);
        Ok(())
    })
    .await
}
