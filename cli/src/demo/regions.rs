//! The two-region `lifeboat demo` (the default) and `lifeboat bench-failover`: regions `a` and
//! `b` of 3 coordinators each plus a witness form the global group; region A's agent protects
//! the working copy, region B's agent keeps a warm replica. The demo SIGKILLs every process of A
//! and measures **RTO** (kill → B active, B's traffic hook ran, B's replica complete) and **RPO**
//! (acknowledged changes missing in B), then restarts A and shows it rejoin as a standby that
//! catches up.

use crate::outln;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;

use super::dbs::DemoDbs;
use super::setup::{dir_size, prepare_work, say, DemoArgs, RunDir};
use lifeboat_lab::harness::wait_agent_idle;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_lab::tree;
use lifeboat_restore::files;

/// Summary of the two-region demo.
#[derive(Debug, Default, serde::Serialize)]
pub struct RegionDemoSummary {
    /// Files in the working copy.
    pub files: u64,
    /// Bytes in the working copy.
    pub bytes: u64,
    /// From agent start until everything was acknowledged (in A and, synchronously, in B), s.
    pub sync_secs: f64,
    /// Changes acknowledged before the region kill.
    pub acked_changes: u64,
    /// Kill of region A → B active + traffic hook ran + B's replica complete, ms.
    pub rto_ms: u64,
    /// RTO as measured by the global group (A last healthy → B confirmed promotion), ms.
    pub rto_global_ms: u64,
    /// Acknowledged changes missing in B after the failover (paths that differ).
    pub rpo_changes: u64,
    /// Epoch after the failover.
    pub epoch: u64,
    /// B's traffic hook ran with the new epoch.
    pub hook_ran: bool,
    /// B's replica directory equals the working copy.
    pub replica_complete: bool,
    /// A restarted, rejoined as standby and caught up with B.
    pub old_region_rejoined: bool,
    /// A restore from B equals the working copy.
    pub restored_equal: bool,
    /// Differences, if any.
    pub differences: Vec<String>,
    /// `--with-databases`: what happened to the databases.
    pub databases: Option<super::dbs::DbDemoSummary>,
    /// `--with-databases` without the binaries: why the databases part was skipped.
    pub databases_skipped: Option<String>,
}

/// Hooks of regions a and b that both write "EPOCH ACTIVE PREVIOUS" into `marker`.
fn marker_hooks(marker: &Path) -> BTreeMap<String, String> {
    ["a", "b"]
        .iter()
        .map(|r| (r.to_string(), hook_toml(r, marker)))
        .collect()
}

fn hook_toml(region: &str, marker: &Path) -> String {
    format!(
        "[[global.traffic_hooks]]\nkind = \"exec\"\nname = \"point-traffic-at-{region}\"\ncommand = [\"sh\", \"-c\", \"echo $LIFEBOAT_EPOCH $LIFEBOAT_ACTIVE_REGION $LIFEBOAT_PREVIOUS_REGION > {m}.tmp && mv {m}.tmp {m}\"]\n",
        m = marker.display()
    )
}

/// Runs the two-region demo.
///
/// Errors: any step failing, RPO above 0, or B's data differing from the source.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let run = RunDir::create(&args.workdir, "demo", args.source.as_deref())?;
    let wd = run.path.clone();
    let res = tokio::select! {
        r = body(&args, &wd, json) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; children stopped")),
    };
    match res {
        Ok(s) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                outln!(
                    "demo: regions=2 witness=1 files={} bytes={} sync={:.1}s acked={} rto_ms={} rto_global_ms={} rpo_changes={} epoch={} hook_ran={} replica_complete={} old_region_rejoined={} restored_equal={}",
                    s.files, s.bytes, s.sync_secs, s.acked_changes, s.rto_ms, s.rto_global_ms, s.rpo_changes, s.epoch, s.hook_ran, s.replica_complete, s.old_region_rejoined, s.restored_equal
                );
                if let Some(d) = &s.databases {
                    outln!(
                        "databases: rpo_changes={} db_rpo_redis={} db_rpo_postgres={} redis_acked={} postgres_acked={} b_redis_primary={} b_postgres_primary={} writes_after_failover={} promote_db_audited={} decision_to_dbs_primary_ms={} kill_to_redis_primary_ms={} kill_to_postgres_primary_ms={}",
                        s.rpo_changes, d.db_rpo_redis, d.db_rpo_postgres, d.redis_acked, d.postgres_acked, d.redis_primary, d.postgres_primary, d.writes_after_failover, d.promote_db_audited,
                        d.decision_to_dbs_primary_ms.map(|m| m.to_string()).unwrap_or_else(|| "?".into()),
                        d.kill_to_redis_primary_ms, d.kill_to_postgres_primary_ms
                    );
                }
                if let Some(why) = &s.databases_skipped {
                    outln!("databases: skipped ({why})");
                }
            }
            if let Some(d) = &s.databases {
                if d.db_rpo_redis > 0 || d.db_rpo_postgres > 0 {
                    bail!("region b's databases lack acknowledged writes (redis {}, postgres {}); workdir kept at {}", d.db_rpo_redis, d.db_rpo_postgres, wd.display());
                }
                if !(d.redis_primary && d.postgres_primary && d.writes_after_failover) {
                    bail!("region b's databases were not promoted (redis primary {}, postgres primary {}, writes {}); workdir kept at {}", d.redis_primary, d.postgres_primary, d.writes_after_failover, wd.display());
                }
            }
            if !s.restored_equal || s.rpo_changes > 0 {
                for d in &s.differences {
                    eprintln!("  differs: {d}");
                }
                bail!(
                    "region B lacks acknowledged data; workdir kept at {}",
                    wd.display()
                );
            }
            if !args.keep {
                run.remove();
            }
            Ok(())
        }
        Err(e) => Err(e.context(format!(
            "demo failed; logs and data kept in {}",
            wd.display()
        ))),
    }
}

async fn wait_equal(a: &Path, b: &Path, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let a2 = a.to_path_buf();
        let b2 = b.to_path_buf();
        // The replica is being written meanwhile (temp files renamed into place): an entry that
        // vanished during the walk means "not equal yet", not a failure.
        match tokio::task::spawn_blocking(move || tree::compare(&a2, &b2)).await? {
            Ok(c) if c.equal() => return Ok(true),
            Ok(_) => {}
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn body(args: &DemoArgs, wd: &Path, json: bool) -> anyhow::Result<RegionDemoSummary> {
    let work = prepare_work(args, wd, json)?;
    let mut databases_skipped = None;
    let mut dbs = None;
    if args.with_databases {
        match DemoDbs::start(wd)? {
            Ok(d) => {
                say(json, &format!("databases: Redis {} (a) and {} (b), PostgreSQL {} (a, primary) and {} (b, standby from a base backup)", d.redis[0].addr(), d.redis[1].addr(), d.pg[0].addr(), d.pg[1].addr()));
                dbs = Some(d);
            }
            Err(why) => {
                eprintln!("demo: --with-databases: skipping the databases part: {why}");
                databases_skipped = Some(why);
            }
        }
    }
    let marker = wd.join("traffic-points-at");
    let mut regions = Regions::start(
        &wd.join("regions"),
        &RegionsOpts {
            hooks_toml: marker_hooks(&marker),
            ..Default::default()
        },
    )?;
    regions.wait_active("a", 1, Duration::from_secs(60)).await?;
    say(json, "regions a (active) and b (standby), 3 coordinators each, and a witness are up: 7 voters in the global group, epoch 1");

    let replica = wd.join("replica-b/data");
    let db_toml = |i: usize| dbs.as_ref().map(|d| d.agent_toml(i)).unwrap_or_default();
    let (cfg_a, data_a) =
        regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &work)], &db_toml(0))?;
    let (cfg_b, _) = regions.region("b").write_agent_config(
        "agent-b",
        &[],
        &format!(
            "[[replicas]]\nname = \"data\"\npath = \"{}\"\n{}",
            replica.display(),
            db_toml(1)
        ),
    )?;
    let started = Instant::now();
    regions.region_mut("a").start_agent(&cfg_a)?;
    regions.region_mut("b").start_agent(&cfg_b)?;
    say(
        json,
        "agent-a protects the working copy; agent-b keeps a warm replica in region b",
    );
    let mut writers = None;
    if let Some(d) = &dbs {
        d.ready().await?;
        writers = Some(d.start_writers().await?);
        say(json, "b's Redis follows a's (agent-b, from the control record); b's PostgreSQL streams synchronously; writers run against a's Redis (SET + WAIT 1) and PostgreSQL (INSERT, synchronous commit)");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = tree::mutate(&work, 100, 7)?;
    say(
        json,
        &format!(
            "mutations while replicating: {} created, {} edited, {} renamed, {} deleted, {} chmods",
            m.created, m.edited, m.renamed, m.deleted, m.chmods
        ),
    );
    let st = wait_agent_idle(
        &data_a,
        Duration::from_millis(1000),
        Duration::from_secs(600),
    )
    .await?;
    let sync_secs = started.elapsed().as_secs_f64() - 1.0;
    let acked = st["changes_acked"].as_u64().unwrap_or(0);
    let (files, bytes) = dir_size(&work);
    say(json, &format!("{acked} changes acknowledged ({files} files, {bytes} bytes): each is committed in region a and in region b (synchronous replication)"));
    if !wait_equal(&work, &replica, Duration::from_secs(300)).await? {
        bail!("region b's replica did not converge");
    }
    say(json, "region b's replica equals the working copy");

    say(
        json,
        "SIGKILL every process of region a (3 coordinators and its agent)",
    );
    let killed = Instant::now();
    regions.kill_region("a");
    let mut watched = None;
    if let Some(d) = dbs.as_mut() {
        d.kill_a();
        watched = Some(d.watch_b(killed));
        say(json, "SIGKILL region a's Redis and PostgreSQL too");
    }
    let status = regions.wait_active("b", 2, Duration::from_secs(60)).await?;
    let mut hook_ran = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == "2 b a") {
            hook_ran = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replica_complete = wait_equal(&work, &replica, Duration::from_secs(60)).await?;
    let rto_ms = killed.elapsed().as_millis() as u64;
    let epoch = status.epoch();
    let rto_global_ms = status.state().last_rto_ms.unwrap_or(0);
    say(
        json,
        &format!(
            "region b active at epoch {epoch}; traffic hook ran; replica complete: RTO {rto_ms} ms"
        ),
    );

    let mut databases = None;
    if let (Some(d), Some(w), Some(watched)) = (&dbs, writers, watched) {
        let acked = w.stop().await;
        let r = d.check_b(&regions, watched, epoch, acked).await?;
        say(json, &format!("databases: b's Redis primary={} PostgreSQL primary={}, writes accepted={}; acknowledged writes missing: redis {} of {}, postgres {} of {}; failover decision -> databases primary {} ms", r.redis_primary, r.postgres_primary, r.writes_after_failover, r.db_rpo_redis, r.redis_acked, r.db_rpo_postgres, r.postgres_acked, r.decision_to_dbs_primary_ms.map(|m| m.to_string()).unwrap_or_else(|| "?".into())));
        databases = Some(r);
    }

    let restored = wd.join("restored-from-b");
    let conn = regions.region("b").conn();
    let (rows, addr) = files::list(&conn, "data", None, false, false).await?;
    files::restore(&conn, &addr, rows, &restored, false).await?;
    let cmp = tree::compare(&work, &restored.join("data"))?;
    say(
        json,
        &format!(
            "restore from region b: {} files, {} differ (RPO)",
            cmp.files, cmp.different
        ),
    );

    say(json, "restarting region a: it rejoins as a standby of b");
    regions.start_region("a")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rejoined = false;
    while Instant::now() < deadline {
        if let Some(s) = regions.control_status().await {
            let b_last = s.region("b").map(|r| r.last_seq);
            rejoined = s.region("a").is_some_and(|r| {
                r.is_healthy_standby() && b_last.is_some_and(|l| r.upstream_seq >= l)
            });
            if rejoined {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    say(
        json,
        &format!("region a rejoined as standby and caught up: {rejoined}"),
    );
    Ok(RegionDemoSummary {
        files,
        bytes,
        sync_secs,
        acked_changes: acked,
        rto_ms,
        rto_global_ms,
        rpo_changes: cmp.different,
        epoch,
        hook_ran,
        replica_complete,
        old_region_rejoined: rejoined,
        restored_equal: cmp.equal(),
        differences: cmp.differences,
        databases,
        databases_skipped,
    })
}

/// Options of `lifeboat bench-failover`.
#[derive(Args, Debug, Clone)]
pub struct FailoverBenchArgs {
    /// Region kills to measure.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Where to work (default: a new directory in /tmp). Only what the run created is removed
    /// afterwards: an existing directory gets a new `lifeboat-*` directory inside it.
    #[arg(long)]
    pub workdir: Option<std::path::PathBuf>,
    /// Then also measure failovers with a Redis and a PostgreSQL per region (b's replicas of
    /// a's, managed by the agents): each of `--db-kills` rounds starts a fresh deployment,
    /// SIGKILLs region a with its databases and measures the RTO (kill → b active and its hook
    /// ran, which waits for b's databases to be primaries) and the time from the failover
    /// decision to the databases being primaries (audit log). Needs redis-server and
    /// PostgreSQL binaries.
    #[arg(long)]
    pub with_databases: bool,
    /// Rounds with databases (`--with-databases`).
    #[arg(long, default_value_t = 5)]
    pub db_kills: usize,
}

/// Figures of one failover with databases.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct DbRound {
    rto_ms: u64,
    decision_to_dbs_primary_ms: u64,
    kill_to_redis_primary_ms: u64,
    kill_to_postgres_primary_ms: u64,
}

/// One `--with-databases` round in a fresh deployment under `wd`.
async fn db_round(wd: &Path) -> anyhow::Result<DbRound> {
    let mut dbs = match DemoDbs::start(wd)? {
        Ok(d) => d,
        Err(why) => bail!("--with-databases: {why}"),
    };
    let marker = wd.join("traffic");
    let mut regions = Regions::start(
        &wd.join("regions"),
        &RegionsOpts {
            hooks_toml: marker_hooks(&marker),
            ..Default::default()
        },
    )?;
    regions.wait_active("a", 1, Duration::from_secs(60)).await?;
    for (i, r) in ["a", "b"].iter().enumerate() {
        let (cfg, _) =
            regions
                .region(r)
                .write_agent_config(&format!("agent-{r}"), &[], &dbs.agent_toml(i))?;
        regions.region_mut(r).start_agent(&cfg)?;
    }
    dbs.ready().await?;
    // b must be a healthy standby (its agent's checks pass) before the kill.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !regions
        .control_status()
        .await
        .is_some_and(|s| s.region("b").is_some_and(|r| r.is_healthy_standby()))
    {
        if Instant::now() > deadline {
            bail!("b never became a healthy standby");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed = Instant::now();
    regions.kill_region("a");
    dbs.kill_a();
    let watched = dbs.watch_b(killed);
    regions.wait_active("b", 2, Duration::from_secs(60)).await?;
    while !std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == "2 b a") {
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("hook of b did not run");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rto_ms = killed.elapsed().as_millis() as u64;
    let (r, p) = watched.await.unwrap_or((None, None));
    let (decision, _) = super::dbs::promotion_from_audit(&regions, 2).await;
    Ok(DbRound {
        rto_ms,
        decision_to_dbs_primary_ms: decision.unwrap_or(0),
        kill_to_redis_primary_ms: r.unwrap_or(0),
        kill_to_postgres_primary_ms: p.unwrap_or(0),
    })
}

fn median_worst(v: &[u64]) -> (u64, u64) {
    let mut s = v.to_vec();
    s.sort_unstable();
    (
        s.get(s.len() / 2).copied().unwrap_or(0),
        s.last().copied().unwrap_or(0),
    )
}

/// `lifeboat bench-failover`: kills the active region `kills` times (alternating a and b; the
/// killed region is restarted and rejoins before the next kill) with the default lease and
/// detection settings, and prints RTO (kill → other region active, leased, and its traffic hook
/// ran) median and worst. `min_failover_interval_ms` is set to 0 so that consecutive kills are
/// not held back by the anti-flapping interval.
///
/// Errors: a failover not happening within 60 s.
pub async fn bench(args: FailoverBenchArgs, json: bool) -> anyhow::Result<()> {
    let run = RunDir::create(&args.workdir, "bench-failover", None)?;
    let wd = run.path.clone();
    let marker = wd.join("traffic");
    let mut regions = Regions::start(
        &wd.join("regions"),
        &RegionsOpts {
            hooks_toml: marker_hooks(&marker),
            policy_toml: "min_failover_interval_ms = 0\n".into(),
            ..Default::default()
        },
    )?;
    regions.wait_active("a", 1, Duration::from_secs(60)).await?;
    let mut active = "a".to_string();
    let mut rtos = Vec::new();
    for (k, epoch) in (0..args.kills).zip(1u64..) {
        let other = if active == "a" { "b" } else { "a" }.to_string();
        // The other region must be a healthy standby before the kill.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = regions
                .control_status()
                .await
                .is_some_and(|s| s.region(&other).is_some_and(|r| r.is_healthy_standby()));
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("kill {k}: {other} never became a healthy standby");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let killed = Instant::now();
        regions.kill_region(&active);
        regions
            .wait_active(&other, epoch + 1, Duration::from_secs(60))
            .await?;
        let want = format!("{} {other} {active}", epoch + 1);
        while !std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == want) {
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("kill {k}: hook of {other} did not run");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rto = killed.elapsed().as_millis() as u64;
        if !json {
            eprintln!(
                "kill {:>2}: {active} -> {other} at epoch {}: RTO {rto} ms",
                k + 1,
                epoch + 1
            );
        }
        rtos.push(rto);
        regions.start_region(&active)?;
        active = other;
    }
    let (median, worst) = median_worst(&rtos);
    drop(regions);
    let mut rounds = Vec::new();
    if args.with_databases {
        for k in 0..args.db_kills {
            let r = db_round(&wd.join(format!("db-round-{k}"))).await?;
            if !json {
                eprintln!(
                    "db kill {:>2}: a -> b with Redis + PostgreSQL: RTO {} ms; failover decision -> databases primary {} ms; kill -> redis primary {} ms, postgres primary {} ms",
                    k + 1, r.rto_ms, r.decision_to_dbs_primary_ms, r.kill_to_redis_primary_ms, r.kill_to_postgres_primary_ms
                );
            }
            rounds.push(r);
        }
    }
    let db_rto: Vec<u64> = rounds.iter().map(|r| r.rto_ms).collect();
    let db_promo: Vec<u64> = rounds
        .iter()
        .map(|r| r.decision_to_dbs_primary_ms)
        .collect();
    let (db_median, db_worst) = median_worst(&db_rto);
    let (promo_median, promo_worst) = median_worst(&db_promo);
    if json {
        let mut v = serde_json::json!({"kills": rtos.len(), "rto_ms": rtos, "median_ms": median, "worst_ms": worst});
        if args.with_databases {
            v["with_databases"] = serde_json::json!({
                "rounds": rounds, "rto_median_ms": db_median, "rto_worst_ms": db_worst,
                "extra_rto_median_ms": db_median as i64 - median as i64,
                "decision_to_dbs_primary_median_ms": promo_median,
                "decision_to_dbs_primary_worst_ms": promo_worst,
            });
        }
        outln!("{v}");
    } else {
        outln!("bench-failover: kills={} rto_median_ms={median} rto_worst_ms={worst} (targets: median <= 3000, worst <= 5000)", rtos.len());
        if args.with_databases {
            outln!(
                "bench-failover --with-databases: kills={} rto_median_ms={db_median} rto_worst_ms={db_worst} extra_rto_median_ms={} decision_to_dbs_primary_median_ms={promo_median} decision_to_dbs_primary_worst_ms={promo_worst} (target: databases add < 1000 ms)",
                rounds.len(),
                db_median as i64 - median as i64
            );
        }
    }
    run.remove();
    Ok(())
}

/// Options of `lifeboat bench-lag`.
#[derive(Args, Debug, Clone)]
pub struct LagBenchArgs {
    /// Rate at which the source changes, MB/s (new 1 MiB-scale files, incompressible half).
    #[arg(long, default_value_t = 20.0)]
    pub mb_per_s: f64,
    /// How long the source changes, seconds.
    #[arg(long, default_value_t = 20)]
    pub secs: u64,
    /// Where to work (default: a new directory in /tmp). Only what the run created is removed
    /// afterwards: an existing directory gets a new `lifeboat-*` directory inside it.
    #[arg(long)]
    pub workdir: Option<std::path::PathBuf>,
}

/// Figures of `lifeboat bench-lag`.
#[derive(Debug, Default, serde::Serialize)]
pub struct LagBenchSummary {
    /// Rate asked, MB/s.
    pub target_mb_per_s: f64,
    /// Rate the writer achieved, MB/s.
    pub written_mb_per_s: f64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Lag samples taken on B's leader (every 100 ms while the source changed).
    pub samples: usize,
    /// Replication lag of B behind A (age of the oldest change committed in A and not yet in B),
    /// median, ms.
    pub lag_p50_ms: i64,
    /// 99th percentile, ms.
    pub lag_p99_ms: i64,
    /// Worst sample, ms.
    pub lag_max_ms: i64,
    /// Worst lag in bytes.
    pub lag_max_bytes: u64,
    /// From the end of writing until the agent had everything acknowledged (and B, synchronously,
    /// committed it), ms.
    pub drain_ms: u64,
}

/// `lifeboat bench-lag`: two regions (3 + 3 coordinators and a witness, default settings, so
/// synchronous replication), an agent in A protecting a directory that changes at `mb_per_s`
/// for `secs` seconds; samples B's replication lag (ms and bytes) on B's leader every 100 ms and
/// prints p50 / p99 / max (target: p99 <= 1000 ms at 20 MB/s).
///
/// Errors: set-up failures, or the agent not draining within 5 minutes.
pub async fn bench_lag(args: LagBenchArgs, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let run = RunDir::create(&args.workdir, "bench-lag", None)?;
    let wd = run.path.clone();
    let mut regions = Regions::start(&wd.join("regions"), &RegionsOpts::default())?;
    regions.wait_active("a", 1, Duration::from_secs(60)).await?;
    let src = wd.join("src");
    std::fs::create_dir_all(&src)?;
    let (cfg, data) = regions
        .region("a")
        .write_agent_config("agent-a", &[("data", &src)], "")?;
    regions.region_mut("a").start_agent(&cfg)?;
    wait_agent_idle(&data, Duration::from_millis(500), Duration::from_secs(120)).await?;

    // The writer: every 50 ms one new file of rate/20 bytes (a rotating set of 200 names).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chunk = ((args.mb_per_s * 1e6) / 20.0) as usize;
    let writer = {
        let (src, stop, secs) = (src.clone(), stop.clone(), args.secs);
        std::thread::spawn(move || -> anyhow::Result<(u64, f64)> {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(20);
            let mut buf = vec![0u8; chunk];
            let start = Instant::now();
            let mut written = 0u64;
            let mut i = 0u64;
            while start.elapsed() < Duration::from_secs(secs)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                let due = start + Duration::from_millis(50 * i);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                rng.fill(&mut buf[..chunk / 2]);
                buf[chunk / 2..].fill((i % 251) as u8);
                let tmp = src.join(format!(".f{}.tmp", i % 200));
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&buf)?;
                drop(f);
                std::fs::rename(&tmp, src.join(format!("f{}.bin", i % 200)))?;
                written += chunk as u64;
                i += 1;
            }
            Ok((written, start.elapsed().as_secs_f64()))
        })
    };
    let b = regions.region("b");
    let mut samples: Vec<(i64, u64)> = Vec::new();
    while !writer.is_finished() {
        let mut best: Option<lifeboat_proto::StatusReply> = None;
        for i in 0..b.coords.len() {
            if let Some(s) = b.status_of(i).await {
                if s.state == "Leader" {
                    best = Some(s);
                    break;
                }
            }
        }
        if let Some(s) = best {
            samples.push((s.lag_ms, s.lag_bytes));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (written, secs) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    let end = Instant::now();
    wait_agent_idle(&data, Duration::from_millis(500), Duration::from_secs(300)).await?;
    let drain_ms = end.elapsed().as_millis() as u64;
    anyhow::ensure!(!samples.is_empty(), "no lag sample from B's leader");
    let mut ms: Vec<i64> = samples.iter().map(|s| s.0).collect();
    ms.sort_unstable();
    let pct = |p: f64| ms[(((ms.len() - 1) as f64) * p).round() as usize];
    let sum = LagBenchSummary {
        target_mb_per_s: args.mb_per_s,
        written_mb_per_s: written as f64 / 1e6 / secs,
        written_bytes: written,
        samples: ms.len(),
        lag_p50_ms: pct(0.5),
        lag_p99_ms: pct(0.99),
        lag_max_ms: *ms.last().unwrap_or(&0),
        lag_max_bytes: samples.iter().map(|s| s.1).max().unwrap_or(0),
        drain_ms,
    };
    if json {
        outln!("{}", serde_json::to_string(&sum)?);
    } else {
        outln!(
            "bench-lag: target_mb_per_s={:.1} written_mb_per_s={:.1} samples={} lag_p50_ms={} lag_p99_ms={} lag_max_ms={} lag_max_bytes={} drain_ms={} (target: p99 <= 1000 ms)",
            sum.target_mb_per_s,
            sum.written_mb_per_s,
            sum.samples,
            sum.lag_p50_ms,
            sum.lag_p99_ms,
            sum.lag_max_ms,
            sum.lag_max_bytes,
            sum.drain_ms
        );
    }
    drop(regions);
    run.remove();
    Ok(())
}
