//! `lifeboat demo --single-region` and `lifeboat bench`: the main job on an embedded default
//! (one region of three coordinators), and the figures we are measured on. Both run real
//! processes through [`lifeboat_lab::harness`].

use crate::outln;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use lifeboat_lab::harness::{agent_status, wait_agent_idle, Cluster, ClusterOpts};
use lifeboat_lab::tree;
use lifeboat_restore::files;

use super::setup::{dir_size, prepare_work, say, DemoArgs, RunDir};

/// Options of `lifeboat bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Where to work (default: a new directory in /tmp, removed afterwards). A directory that
    /// already exists is never removed nor emptied: the run works in a new `lifeboat-bench-*`
    /// directory inside it (kept, with --workdir).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Files in the generated tree.
    #[arg(long, default_value_t = 2000)]
    pub files: usize,
    /// Size of the large file, MB.
    #[arg(long, default_value_t = 200)]
    pub large_mb: u64,
    /// Seconds to sample the idle agent's CPU use.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

/// The demo's summary.
#[derive(Debug, Default, serde::Serialize)]
pub struct DemoSummary {
    /// Files in the final working copy.
    pub files: u64,
    /// Bytes in the final working copy.
    pub bytes: u64,
    /// Bytes per second from agent start to everything acknowledged, MB/s.
    pub mb_per_s: f64,
    /// Seconds until everything was acknowledged.
    pub sync_secs: f64,
    /// Node SIGKILLed while it led.
    pub killed_leader: u64,
    /// From the SIGKILL until another coordinator was leader, ms.
    pub leader_change_ms: u64,
    /// Changes acknowledged before the kill.
    pub acked_before_kill: u64,
    /// Mutations applied while replicating.
    pub mutations: tree::Mutations,
    /// The killed leader, restarted, caught up with the leader's last applied index.
    pub restarted_node_caught_up: bool,
    /// Restore throughput, MB/s.
    pub restore_mb_per_s: f64,
    /// Every file equal (bytes by blake3, mode, symlinks).
    pub restored_equal: bool,
    /// Differences, if any.
    pub differences: Vec<String>,
    /// The run directory (see [`RunDir`]).
    pub workdir: PathBuf,
}

/// Runs the single-region demo; Ctrl-C stops it and its children.
///
/// Errors: any step failing, or the restore differing from the source.
pub async fn run(args: DemoArgs, json: bool) -> anyhow::Result<()> {
    let run = RunDir::create(&args.workdir, "demo", args.source.as_deref())?;
    let wd = run.path.clone();
    let res = tokio::select! {
        r = demo_body(&args, &wd, json) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; children stopped, workdir kept at {}", wd.display())),
    };
    match res {
        Ok(s) => {
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                outln!(
                    "demo: files={} bytes={} sync={:.1}s mb_per_s={:.1} leader_change_ms={} restarted_node_caught_up={} restore_mb_per_s={:.1} restored_equal={}",
                    s.files, s.bytes, s.sync_secs, s.mb_per_s, s.leader_change_ms, s.restarted_node_caught_up, s.restore_mb_per_s, s.restored_equal
                );
            }
            if !s.restored_equal {
                for d in &s.differences {
                    eprintln!("  differs: {d}");
                }
                bail!(
                    "restore differs from the source; workdir kept at {}",
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

async fn demo_body(args: &DemoArgs, wd: &Path, json: bool) -> anyhow::Result<DemoSummary> {
    if !args.single_region {
        bail!("internal: the two-region demo runs in demo::regions");
    }
    let work = prepare_work(args, wd, json)?;
    let mut cluster = Cluster::start(&wd.join("cluster"), &ClusterOpts::default())?;
    let leader = cluster.wait_leader(Duration::from_secs(30), None).await?;
    say(
        json,
        &format!("3 coordinators up (mutual TLS, generated CA), leader is node {leader}"),
    );
    let (cfg, agent_data) = cluster.write_agent_config("agent1", &[("data", &work)], "")?;
    let started = Instant::now();
    cluster.start_agent(&cfg)?;
    say(json, "agent started: initial scan and replication");

    // Mutate while the initial sync streams.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let w = work.clone();
    let mut muts = tokio::task::spawn_blocking(move || tree::mutate(&w, 150, 7)).await??;

    // Kill the leader mid-stream: once some changes are acknowledged but the sync is not done.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut acked_before_kill;
    loop {
        if let Some(s) = agent_status(&agent_data) {
            acked_before_kill = s["changes_acked"].as_u64().unwrap_or(0);
            if acked_before_kill >= 200 || s["idle"].as_bool() == Some(true) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "agent acknowledged nothing within 120 s; see {}",
                cluster.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = cluster.wait_leader(Duration::from_secs(10), None).await?;
    let li = cluster.index_of(leader).expect("leader is a member");
    let kill_at = Instant::now();
    cluster.kill_coordinator(li);
    let new_leader = cluster
        .wait_first_leader(Duration::from_secs(30), Some(leader))
        .await?;
    let leader_change_ms = kill_at.elapsed().as_millis() as u64;
    say(json, &format!("SIGKILLed leader node {leader} after {acked_before_kill} acknowledged changes; node {new_leader} leads after {leader_change_ms} ms"));

    let w = work.clone();
    let m2 = tokio::task::spawn_blocking(move || tree::mutate(&w, 100, 8)).await??;
    muts.created += m2.created;
    muts.edited += m2.edited;
    muts.renamed += m2.renamed;
    muts.deleted += m2.deleted;
    muts.chmods += m2.chmods;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_coordinator(li)?;
    say(json, &format!("restarted node {leader} from its redb data"));

    wait_agent_idle(
        &agent_data,
        Duration::from_millis(1500),
        Duration::from_secs(600),
    )
    .await?;
    let sync_secs = started.elapsed().as_secs_f64();
    let (files, bytes) = dir_size(&work);
    say(
        json,
        &format!("everything acknowledged after {sync_secs:.1} s"),
    );

    // The restarted node catches up (log or snapshot).
    let mut caught_up = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let lead = cluster.wait_leader(Duration::from_secs(10), None).await?;
        let (Some(ls), Some(rs)) = (
            cluster.status_of(cluster.index_of(lead).unwrap()).await,
            cluster.status_of(li).await,
        ) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if rs.last_applied >= ls.last_applied && rs.versions == ls.versions {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let restored = wd.join("restored");
    if restored.exists() {
        std::fs::remove_dir_all(&restored)?;
    }
    let conn = cluster.conn();
    let (rows, addr) = files::list(&conn, "data", None, false, false).await?;
    let report = files::restore(&conn, &addr, rows, &restored, !json).await?;
    say(
        json,
        &format!(
            "restored {} files ({} bytes) in {} ms; comparing",
            report.files, report.bytes, report.elapsed_ms
        ),
    );
    let cmp = tree::compare(&work, &restored.join("data"))?;
    Ok(DemoSummary {
        files,
        bytes,
        mb_per_s: bytes as f64 / 1e6 / sync_secs,
        sync_secs,
        killed_leader: leader,
        leader_change_ms,
        acked_before_kill,
        mutations: muts,
        restarted_node_caught_up: caught_up,
        restore_mb_per_s: report.mb_per_s,
        restored_equal: cmp.equal() && report.files == cmp.files,
        differences: cmp.differences,
        workdir: wd.to_path_buf(),
    })
}

fn max_rss_children_kib() -> u64 {
    // SAFETY: getrusage writes into the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru.ru_maxrss as u64
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn run_agent_once(
    cluster: &Cluster,
    cfg: &Path,
    data: &Path,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let t = Instant::now();
    let mut ch = cluster.spawn_agent(cfg, true)?;
    let st = tokio::task::spawn_blocking(move || ch.wait()).await??;
    let secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!(
            "agent --once failed ({st}); see {}",
            cfg.with_extension("log").display()
        );
    }
    Ok((
        secs,
        agent_status(data).context("agent wrote no status.json")?,
    ))
}

fn rsync_delta_bytes(src: &Path, dst: &Path) -> Option<u64> {
    let out = std::process::Command::new("rsync")
        .args(["-a", "--delete", "--no-whole-file", "--stats"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("Total bytes sent:"))?;
    line.split(':').nth(1)?.trim().replace(',', "").parse().ok()
}

/// Applies the benchmark's ~1% change: appends, mid-file edits, new and deleted files, and 1 MiB
/// changed inside the large file.
fn one_percent_change(root: &Path) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let md = e.path().symlink_metadata()?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && md.len() < 8 << 20 {
                files.push(e.path());
            }
        }
    }
    files.sort();
    for (i, p) in files.iter().enumerate().step_by(50).take(20) {
        let mut f = std::fs::OpenOptions::new().append(true).open(p)?;
        f.write_all(format!("appended line {i}\n").repeat(64).as_bytes())?;
    }
    for p in files.iter().skip(7).step_by(50).take(20) {
        let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len / 2))?;
        f.write_all(b"MID-FILE EDIT")?;
    }
    std::fs::create_dir_all(root.join("bench-new"))?;
    for i in 0..10 {
        std::fs::write(
            root.join(format!("bench-new/new{i}.txt")),
            format!("new file {i}\n").repeat(500),
        )?;
    }
    for p in files.iter().skip(13).step_by(100).take(10) {
        std::fs::remove_file(p)?;
    }
    let big = root.join("big/large.bin");
    if big.exists() {
        let mut f = std::fs::OpenOptions::new().write(true).open(&big)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len / 3))?;
        f.write_all(&vec![0xA5u8; 1 << 20])?;
    }
    Ok(())
}

/// Runs the benchmark and prints its figures next to the targets.
///
/// Errors: any step failing.
pub async fn run_bench(args: BenchArgs, json: bool) -> anyhow::Result<()> {
    let run = RunDir::create(&args.workdir, "bench", None)?;
    let wd = run.path.clone();
    let src = wd.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src)?;
    }
    let st = tree::generate(&src, args.files, args.large_mb * 1_000_000, 42)?;
    let base = wd.join("rsync-base");
    let _ = std::fs::remove_dir_all(&base);
    std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&base)
        .status()?;
    let mut cluster = Cluster::start(&wd.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let (cfg, data) = cluster.write_agent_config("bench-agent", &[("data", &src)], "")?;

    let (sync_secs, s1) = run_agent_once(&cluster, &cfg, &data).await?;
    let initial_mb_s = st.bytes as f64 / 1e6 / sync_secs;

    one_percent_change(&src)?;
    let (delta_secs, s2) = run_agent_once(&cluster, &cfg, &data).await?;
    let delta_bytes = s2["bytes_sent"].as_u64().unwrap_or(0);
    let rsync_bytes = rsync_delta_bytes(&src, &base);
    let rss_kib = max_rss_children_kib();

    let restored = wd.join("restored");
    let conn = cluster.conn();
    let (rows, addr) = files::list(&conn, "data", None, false, false).await?;
    let report = files::restore(&conn, &addr, rows, &restored, false).await?;
    let cmp = tree::compare(&src, &restored.join("data"))?;

    // Idle CPU of a watching agent.
    cluster.start_agent(&cfg)?;
    let pid = cluster
        .agents
        .last()
        .map(|c| c.id())
        .expect("agent started");
    wait_agent_idle(&data, Duration::from_millis(500), Duration::from_secs(120)).await?;
    let t0 = cpu_ticks(pid).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let t1 = cpu_ticks(pid).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu_pct = (t1.saturating_sub(t0)) as f64 / hz / args.idle_secs as f64 * 100.0;

    let v = serde_json::json!({
        "tree_files": st.files, "tree_bytes": st.bytes,
        "initial_sync_secs": sync_secs, "initial_sync_mb_per_s": initial_mb_s, "initial_bytes_sent": s1["bytes_sent"],
        "change_secs": delta_secs, "change_bytes_sent": delta_bytes, "rsync_change_bytes_sent": rsync_bytes,
        "change_vs_rsync": rsync_bytes.map(|r| delta_bytes as f64 / r.max(1) as f64),
        "restore_mb_per_s": report.mb_per_s, "restored_equal": cmp.equal(),
        "agent_peak_rss_mib": rss_kib as f64 / 1024.0,
        "idle_agent_cpu_percent": idle_cpu_pct,
        "targets": {"initial_sync_mb_per_s": ">= 150", "change_vs_rsync": "<= 1.5", "restore_mb_per_s": ">= 150", "agent_peak_rss_mib": "<= 150", "idle_agent_cpu_percent": "< 1"},
    });
    if json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("tree: {} files, {:.1} MB", st.files, st.bytes as f64 / 1e6);
        outln!("initial sync: {sync_secs:.2} s, {initial_mb_s:.1} MB/s (target >= 150)");
        outln!(
            "~1% change: {delta_secs:.2} s, {delta_bytes} bytes sent; rsync --no-whole-file sent {} ({} ; target <= 1.5x)",
            rsync_bytes.map(|b| b.to_string()).unwrap_or_else(|| "n/a (rsync not installed)".into()),
            rsync_bytes.map(|r| format!("{:.2}x", delta_bytes as f64 / r.max(1) as f64)).unwrap_or_default()
        );
        outln!(
            "restore: {:.1} MB/s (target >= 150), equal={}",
            report.mb_per_s,
            cmp.equal()
        );
        outln!(
            "agent peak RSS: {:.1} MiB (target <= 150)",
            rss_kib as f64 / 1024.0
        );
        outln!(
            "idle agent CPU: {idle_cpu_pct:.2}% over {} s (target < 1%)",
            args.idle_secs
        );
    }
    drop(cluster);
    if args.workdir.is_none() {
        run.remove();
    }
    if !cmp.equal() {
        bail!("restore differs: {:?}", cmp.differences);
    }
    Ok(())
}
