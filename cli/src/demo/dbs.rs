//! The databases of `lifeboat demo --with-databases` and `bench-failover --with-databases`: a
//! Redis and a PostgreSQL per region (b's Redis a replica of a's through agent-b's
//! `primary_by_region`, b's PostgreSQL a synchronous streaming standby from a base backup of
//! a's), writers that count acknowledged writes (Redis: `SET` then `WAIT 1 1000` confirming a
//! replica has it; PostgreSQL: a commit under `synchronous_standby_names`, so on the standby),
//! and the checks after the region kill: b's Redis and PostgreSQL are primaries, take writes,
//! and hold every acknowledged write (the database RPO).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use lifeboat_lab::dbservers::{
    pg_client, redis_con, redis_role, start_redis, AgentDbs, DbBinaries, PgServer, RedisServer,
};
use lifeboat_lab::regions::Regions;

/// Results of the databases part of the demo.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DbDemoSummary {
    /// Redis writes acknowledged by a's Redis and confirmed on a replica (`WAIT 1`) before the
    /// kill.
    pub redis_acked: u64,
    /// PostgreSQL commits acknowledged by a's server (synchronous standby) before the kill.
    pub postgres_acked: u64,
    /// Acknowledged Redis writes missing in b's Redis after the failover.
    pub db_rpo_redis: u64,
    /// Acknowledged PostgreSQL rows missing in b's server after the failover.
    pub db_rpo_postgres: u64,
    /// b's Redis answers `ROLE` with `master`.
    pub redis_primary: bool,
    /// b's PostgreSQL answers `pg_is_in_recovery()` with false.
    pub postgres_primary: bool,
    /// b's Redis and PostgreSQL accepted a write after the failover.
    pub writes_after_failover: bool,
    /// Kill of region a → b's Redis primary (polled), ms.
    pub kill_to_redis_primary_ms: u64,
    /// Kill of region a → b's PostgreSQL primary (polled), ms.
    pub kill_to_postgres_primary_ms: u64,
    /// Failover decision (audit `failover`) → last database primary (audit `promote-db`), ms.
    pub decision_to_dbs_primary_ms: Option<u64>,
    /// `promote-db` audit entries at the new epoch with outcome ok.
    pub promote_db_audited: u64,
}

/// A Redis and a PostgreSQL per region, and the agents' source TOML.
pub struct DemoDbs {
    /// Redis of a, b.
    pub redis: [RedisServer; 2],
    /// PostgreSQL of a (primary), b (standby).
    pub pg: [PgServer; 2],
    bin: PathBuf,
}

/// Ids acknowledged by the writers.
#[derive(Default)]
pub struct Acked {
    redis: Mutex<Vec<i64>>,
    pg: Mutex<Vec<i32>>,
}

/// Running writers (stopped by [`Writers::stop`]).
pub struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Acked>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Stops the writers and returns the acknowledged Redis and PostgreSQL ids.
    pub async fn stop(self) -> (Vec<i64>, Vec<i32>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let r = self
            .acked
            .redis
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let p = self.acked.pg.lock().map(|v| v.clone()).unwrap_or_default();
        (r, p)
    }
}

impl DemoDbs {
    /// Starts both regions' servers under `wd` when the binaries are present; `Err(reason)`
    /// names what is missing otherwise.
    ///
    /// Errors: a server failing to start (outer), or missing binaries (inner).
    pub fn start(wd: &Path) -> anyhow::Result<Result<DemoDbs, String>> {
        let bins = DbBinaries::find();
        let Some(bin) = bins.pg_bin.clone().filter(|_| bins.complete()) else {
            return Ok(Err(bins.missing.join("; ")));
        };
        let redis = [
            start_redis(&wd.join("redis-a"), &[])?,
            start_redis(&wd.join("redis-b"), &[])?,
        ];
        let pgd = PgServer::workdir(wd)?;
        let a = PgServer::init_primary(&bin, &pgd.join("a"), "pg_a")?;
        let b = PgServer::standby_of(&a, &pgd.join("b"), "pg_b")?;
        Ok(Ok(DemoDbs {
            redis,
            pg: [a, b],
            bin,
        }))
    }

    /// `[[redis_sources]]`, `[[postgres_sources]]` and `[[checks]]` of region `i`'s agent (0: a,
    /// 1: b).
    pub fn agent_toml(&self, i: usize) -> String {
        let regions = ["a", "b"];
        AgentDbs {
            redis_addr: self.redis[i].addr(),
            redis_by_region: (0..2)
                .map(|j| (regions[j].to_string(), self.redis[j].addr()))
                .collect(),
            min_replicas_to_write: 1,
            pg: Some((self.pg[i].port, self.pg[i].data.clone(), self.bin.clone())),
            pg_by_region: (0..2)
                .map(|j| (regions[j].to_string(), self.pg[j].addr()))
                .collect(),
            checks: true,
        }
        .toml()
    }

    /// Makes a's PostgreSQL wait for b's standby on every commit, creates the table, and waits
    /// until b's Redis follows a's (agent-b) and b's standby streams synchronously.
    ///
    /// Errors: not so within 60 s.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let a = pg_client(self.pg[0].port).await?;
        // One statement per call: ALTER SYSTEM cannot run inside a (multi-statement) transaction.
        for sql in [
            "CREATE TABLE IF NOT EXISTS demo_writes (id int PRIMARY KEY)".to_string(),
            format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{}'",
                self.pg[1].name
            ),
            "SELECT pg_reload_conf()".to_string(),
        ] {
            a.batch_execute(&sql)
                .await
                .with_context(|| format!("configure synchronous replication: {sql}"))?;
        }
        let mut rb = self.redis[1].con().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sync: Option<String> = a
                .query_opt(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
                    &[&self.pg[1].name],
                )
                .await?
                .map(|r| r.get(0));
            let role = redis_role(&mut rb).await;
            if sync.as_deref() == Some("sync") && role == "slave connected" {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "databases not replicating within 60 s (postgres sync_state {sync:?}, b's redis {role})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts one writer per database against region a's servers.
    ///
    /// Errors: connection failures.
    pub async fn start_writers(&self) -> anyhow::Result<Writers> {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Acked::default());
        let mut rc = self.redis[0].con().await?;
        let pc = pg_client(self.pg[0].port).await?;
        let (s1, a1) = (stop.clone(), acked.clone());
        let redis = tokio::spawn(async move {
            let mut i: i64 = 0;
            while !s1.load(Ordering::SeqCst) {
                i += 1;
                let r = async {
                    let _: () = redis::cmd("SET")
                        .arg(format!("demo:{i}"))
                        .arg(i)
                        .query_async(&mut rc)
                        .await?;
                    let n: i64 = redis::cmd("WAIT")
                        .arg(1)
                        .arg(1000)
                        .query_async(&mut rc)
                        .await?;
                    Ok::<_, redis::RedisError>(n)
                };
                match tokio::time::timeout(Duration::from_secs(3), r).await {
                    Ok(Ok(n)) if n >= 1 => {
                        if let Ok(mut v) = a1.redis.lock() {
                            v.push(i);
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        let (s2, a2) = (stop.clone(), acked.clone());
        let pg = tokio::spawn(async move {
            let mut i: i32 = 0;
            while !s2.load(Ordering::SeqCst) {
                i += 1;
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    pc.execute("INSERT INTO demo_writes VALUES ($1)", &[&i]),
                )
                .await;
                match r {
                    Ok(Ok(1)) => {
                        if let Ok(mut v) = a2.pg.lock() {
                            v.push(i);
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(Writers {
            stop,
            acked,
            tasks: vec![redis, pg],
        })
    }

    /// SIGKILLs region a's Redis and PostgreSQL.
    pub fn kill_a(&mut self) {
        self.redis[0].kill();
        self.pg[0].kill();
    }

    /// Watches, from the region kill on, until b's Redis and PostgreSQL are both primaries (or
    /// 60 s pass): the ms from `killed` to each (None: not primary in time).
    pub fn watch_b(&self, killed: Instant) -> tokio::task::JoinHandle<(Option<u64>, Option<u64>)> {
        let (raddr, pport) = (self.redis[1].addr(), self.pg[1].port);
        tokio::spawn(async move {
            let (mut r, mut p) = (None, None);
            let mut rb = redis_con(&raddr, Duration::from_secs(10)).await.ok();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && (r.is_none() || p.is_none()) {
                if let (None, Some(c)) = (r, rb.as_mut()) {
                    if redis_role(c).await == "master" {
                        r = Some(killed.elapsed().as_millis() as u64);
                    }
                }
                if p.is_none() {
                    if let Ok(c) = pg_client(pport).await {
                        if let Ok(row) = c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                            if !row.get::<_, bool>(0) {
                                p = Some(killed.elapsed().as_millis() as u64);
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (r, p)
        })
    }

    /// After the region kill: `watched` is [`DemoDbs::watch_b`]'s task; writes to b's
    /// servers, counts acknowledged writes missing there, and reads the promotion figures from
    /// the audit log of `epoch`.
    ///
    /// Errors: connection failures to b's servers.
    pub async fn check_b(
        &self,
        regions: &Regions,
        watched: tokio::task::JoinHandle<(Option<u64>, Option<u64>)>,
        epoch: u64,
        acked: (Vec<i64>, Vec<i32>),
    ) -> anyhow::Result<DbDemoSummary> {
        let mut s = DbDemoSummary {
            redis_acked: acked.0.len() as u64,
            postgres_acked: acked.1.len() as u64,
            ..Default::default()
        };
        let (r, p) = watched.await.unwrap_or((None, None));
        s.redis_primary = r.is_some();
        s.postgres_primary = p.is_some();
        s.kill_to_redis_primary_ms = r.unwrap_or(0);
        s.kill_to_postgres_primary_ms = p.unwrap_or(0);
        let mut rb = self.redis[1].con().await?;
        let pb = pg_client(self.pg[1].port).await?;
        let w1: redis::RedisResult<()> = redis::cmd("SET")
            .arg("demo:after-failover")
            .arg("b")
            .query_async(&mut rb)
            .await;
        let w2 = pb.execute("INSERT INTO demo_writes VALUES (-1)", &[]).await;
        s.writes_after_failover = w1.is_ok() && w2.is_ok();
        for id in &acked.0 {
            let v: Option<i64> = redis::cmd("GET")
                .arg(format!("demo:{id}"))
                .query_async(&mut rb)
                .await?;
            if v != Some(*id) {
                s.db_rpo_redis += 1;
            }
        }
        let have: std::collections::HashSet<i32> = pb
            .query("SELECT id FROM demo_writes", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        s.db_rpo_postgres = acked.1.iter().filter(|id| !have.contains(id)).count() as u64;
        let (decision, audited) = promotion_from_audit(regions, epoch).await;
        s.decision_to_dbs_primary_ms = decision;
        s.promote_db_audited = audited;
        Ok(s)
    }
}

/// From the audit log: failover decision of `epoch` → latest ok `promote-db` of `epoch` (ms,
/// when both are there), and the number of ok `promote-db` entries of `epoch`. Polls up to
/// 10 s for the entries (the global leader commits them with the region's next report).
pub async fn promotion_from_audit(regions: &Regions, epoch: u64) -> (Option<u64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = lifeboat_client::control::audit(&regions.conn(), 1000)
            .await
            .unwrap_or_default();
        let of_epoch = |e: &&lifeboat_proto::AuditEntry| e.epoch == epoch;
        let decided = log
            .iter()
            .filter(of_epoch)
            .find(|e| matches!(e.action.as_str(), "failover" | "switchover"))
            .map(|e| e.at_ms);
        let dbs: Vec<u64> = log
            .iter()
            .filter(of_epoch)
            .filter(|e| e.action == "promote-db" && e.outcome == "ok")
            .map(|e| e.at_ms)
            .collect();
        if (decided.is_some() && !dbs.is_empty()) || Instant::now() > deadline {
            let last = dbs.iter().max().copied();
            let ms = decided.zip(last).map(|(d, l)| l.saturating_sub(d));
            return (ms, dbs.len() as u64);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
