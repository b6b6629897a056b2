//! Issue 19 (items 1 and 2): `/metrics` of coordinators and agents, scraped by a **real
//! Prometheus server** (Debian package `prometheus`, installed by `scripts/install-test-deps.sh`),
//! and the alert rules and dashboard in `deploy/`.
//!
//! - `prometheus_scrapes_a_cluster_through_a_failover`: two regions of 3 coordinators and a
//!   witness, each with `metrics_addr`, and an agent of region a with `metrics_addr` and two
//!   exec snapshot sources (one that fails). Prometheus (scrape and rule evaluation every 1 s,
//!   loading `deploy/prometheus/lifeboat-rules.yml`) shows, through its HTTP API: after a write,
//!   acknowledged batches and bytes > 0, region a active at epoch 1, health, lag, expected RPO,
//!   Raft and agent series; after region a is killed, region b active at epoch 2 and a positive
//!   last RTO, with the `LifeboatFailoverHappened` and `LifeboatSnapshotFailed` alerts firing. Every
//!   query of every panel of `deploy/grafana/lifeboat-dashboard.json` then parses and returns
//!   at least one series over the test's time range.
//! - `promtool_checks_and_tests_the_rules`: `promtool check rules` and `promtool test rules`.
//!
//! A missing `prometheus` or `promtool` binary fails the test with what to install.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use http_body_util::{BodyExt, Empty};
use lifeboat_chaos_tests::*;
use lifeboat_lab::regions::{Regions, RegionsOpts};
use lifeboat_lab::{free_port, tree};
use serde_json::Value;

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Path of a Prometheus tool, or an error saying how to install it.
fn tool(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    if let Ok(out) = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
    {
        let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !s.is_empty() {
            return Ok(PathBuf::from(s));
        }
    }
    bail!("`{name}` not found: this test needs the Debian package `prometheus` (server and promtool); run scripts/install-test-deps.sh")
}

/// Percent-encodes a URL query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `url`: (status, body).
async fn http_get(url: &str) -> anyhow::Result<(u16, String)> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(url.parse()?))
        .await
        .with_context(|| format!("GET {url} timed out"))??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A Prometheus server of this test (killed on drop).
struct Prometheus {
    addr: String,
    child: Child,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One series of a query answer: labels and the (last) value.
type Series = (BTreeMap<String, String>, f64);

impl Prometheus {
    /// Starts Prometheus scraping `coordinators` (job `lifeboat-coordinator`) and `agents` (job
    /// `lifeboat-agent`) every second, with the repository's alert rules, and waits until ready.
    async fn start(dir: &Path, coordinators: &[String], agents: &[String]) -> anyhow::Result<Self> {
        let bin = tool("prometheus")?;
        std::fs::create_dir_all(dir)?;
        let list = |v: &[String]| {
            v.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rules = deploy_dir()
            .join("prometheus/lifeboat-rules.yml")
            .canonicalize()?;
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: lifeboat-coordinator\n    static_configs:\n      - targets: [{}]\n  - job_name: lifeboat-agent\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            list(coordinators),
            list(agents)
        );
        let cfg_path = dir.join("prometheus.yml");
        std::fs::write(&cfg_path, cfg)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let child = lifeboat_lab::harness::spawn_logged(cmd, &dir.join("prometheus.log"))?;
        let p = Prometheus { addr, child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&format!("http://{}/-/ready", p.addr)).await {
                return Ok(p);
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s; see {}",
                dir.join("prometheus.log").display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs an API call (`path` with query string) and returns `data.result`.
    async fn api(&self, path_and_query: &str) -> anyhow::Result<Vec<Value>> {
        let (status, body) = http_get(&format!("http://{}{path_and_query}", self.addr)).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path_and_query}: HTTP {status}: {body}"))?;
        ensure!(
            status == 200 && v["status"] == "success",
            "{path_and_query}: HTTP {status}: {body}"
        );
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// An instant query: every series with its value.
    async fn query(&self, q: &str) -> anyhow::Result<Vec<Series>> {
        let result = self.api(&format!("/api/v1/query?query={}", enc(q))).await?;
        Ok(result
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let v = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(f64::NAN);
                (labels, v)
            })
            .collect())
    }

    /// Waits (up to 60 s each, polled every 500 ms) until each query answers exactly one series
    /// whose value its predicate accepts.
    async fn check_all(&self, checks: &[Check]) -> anyhow::Result<()> {
        for (q, what, ok) in checks {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = self.query(q).await?;
                if r.len() == 1 && ok(r[0].1) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{what}: `{q}` answered {r:?} for 60 s"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }
}

/// A query, what it shows, and the predicate its single value must satisfy.
type Check = (&'static str, &'static str, fn(f64) -> bool);

/// Every PromQL expression of the dashboard's panels: (panel title, expr).
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = deploy_dir().join("grafana/lifeboat-dashboard.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("no panels")? {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array().context("panel without targets")?;
        ensure!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let e = t["expr"].as_str().context("target without expr")?;
            out.push((title.clone(), e.to_string()));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_cluster_through_a_failover() -> anyhow::Result<()> {
    // Fail before starting anything when the server is missing.
    tool("prometheus")?;
    run("metrics_prometheus", |dir| async move {
        let started_s = lifeboat_common::now_ms() / 1000 - 5;
        let mut regions = Regions::start(
            &dir.join("regions"),
            &RegionsOpts {
                metrics: true,
                ..Default::default()
            },
        )?;
        regions.wait_active("a", 1, Duration::from_secs(60)).await?;
        let mut coordinators: Vec<String> = regions
            .regions
            .values()
            .chain(regions.witness.iter())
            .flat_map(|c| c.coords.iter())
            .map(|c| c.metrics_addr.clone().expect("metrics on"))
            .collect();
        coordinators.sort();
        assert_eq!(coordinators.len(), 7);

        // Region a's agent: a tree, an exec source that works and one that fails every 2 s (so
        // that Prometheus sees its failure counter increase, not only its first value).
        let src = dir.join("src");
        tree::generate(&src, 40, 4096, 3)?;
        let agent_metrics = format!("127.0.0.1:{}", free_port()?);
        let extra = format!(
            "metrics_addr = \"{agent_metrics}\"\n[[exec_sources]]\nname = \"numbers\"\nsnapshot_command = [\"sh\", \"-c\", \"seq 1 1000\"]\n\n[[exec_sources]]\nname = \"broken\"\nsnapshot_command = [\"sh\", \"-c\", \"echo partial; exit 3\"]\ninterval_secs = 2\n"
        );
        let (cfg, data) = regions
            .region("a")
            .write_agent_config("agent-a", &[("data", &src)], &extra)?;
        regions.region_mut("a").start_agent(&cfg)?;

        let prom = Prometheus::start(
            &dir.join("prometheus"),
            &coordinators,
            std::slice::from_ref(&agent_metrics),
        )
        .await?;
        let st = settle(&data).await?;
        assert!(st["changes_acked"].as_u64().unwrap() > 0, "{st}");

        // After a write: every target up, acknowledged batches and bytes, a active at epoch 1,
        // health, expected RPO, lag, lease, certificates, and the agent's series.
        let after_write: &[Check] = &[
            ("count(up{job=~\"lifeboat-.*\"} == 1)", "every coordinator and the agent scraped", |v| v == 8.0),
            ("sum(lifeboat_batches_acked_total)", "batches acknowledged", |v| v > 0.0),
            ("sum(lifeboat_acked_bytes_total)", "bytes acknowledged", |v| v > 0.0),
            ("min(lifeboat_active_region{region=\"a\"})", "a active on every member", |v| v == 1.0),
            ("max(lifeboat_active_region{region=\"b\"})", "b not active", |v| v == 0.0),
            ("count(lifeboat_epoch == 1)", "epoch 1 on all 7 members", |v| v == 7.0),
            ("count(lifeboat_epoch != 1) or vector(0)", "no other epoch", |v| v == 0.0),
            ("max(lifeboat_region_healthy{region=\"a\"})", "a healthy (global leader's view)", |v| v == 1.0),
            ("max(lifeboat_region_healthy{region=\"b\"})", "b healthy (global leader's view)", |v| v == 1.0),
            // Synchronous replication: 0 while a is reachable and b caught up.
            ("max(lifeboat_expected_rpo_seconds{region=\"b\"})", "expected RPO of standby b", |v| (0.0..5.0).contains(&v)),
            ("max(lifeboat_replication_lag_entries{region=\"b\"})", "b's leader reports its lag", |v| v >= 0.0),
            ("max(lifeboat_lease_remaining_seconds{side=\"holder\"})", "a's leader holds a lease", |v| v > 0.0),
            ("count(lifeboat_raft_leader_id{group=\"region\"} > 0)", "the 6 regional members know their leader", |v| v == 6.0),
            ("count(lifeboat_raft_leader_id{group=\"global\"} > 0)", "the 7 global members know their leader", |v| v == 7.0),
            ("min(lifeboat_certificate_expiry_timestamp_seconds) - time()", "certificates expire in about 90 days", |v| v > 80.0 * 86_400.0),
            ("lifeboat_agent_batches_acked_total", "agent acks", |v| v > 0.0),
            ("lifeboat_agent_queue_depth", "agent queue drained", |v| v == 0.0),
            ("lifeboat_agent_spool_bytes", "agent spool", |v| v >= 0.0),
            ("lifeboat_snapshot_failures_total{source=\"broken\"}", "the failing source's failures counted", |v| v >= 1.0),
            ("time() - lifeboat_snapshot_last_success_timestamp_seconds{source=\"numbers\"}", "the working source's snapshot acknowledged just now", |v| v.abs() < 600.0),
            ("count(ALERTS{alertname=\"LifeboatSnapshotFailed\", alertstate=\"firing\", source=\"broken\"})", "Prometheus fires LifeboatSnapshotFailed from the repository's rules", |v| v == 1.0),
        ];
        prom.check_all(after_write).await?;
        let none = prom
            .query("ALERTS{alertname=\"LifeboatFailoverHappened\"}")
            .await?;
        assert!(none.is_empty(), "no failover yet: {none:?}");

        // Lose region a: b takes over at epoch 2 and the RTO shows.
        let killed = Instant::now();
        regions.kill_region("a");
        regions.wait_active("b", 2, Duration::from_secs(60)).await?;
        eprintln!("b active at epoch 2 after {:?}", killed.elapsed());
        let after_failover: &[Check] = &[
            ("count(lifeboat_epoch == 2)", "epoch 2 on every live member (b's three and the witness)", |v| v == 4.0),
            ("count(lifeboat_epoch != 2) or vector(0)", "no other epoch", |v| v == 0.0),
            ("min(lifeboat_active_region{region=\"b\"})", "b active on every live member", |v| v == 1.0),
            ("max(lifeboat_active_region{region=\"a\"})", "a no longer active", |v| v == 0.0),
            ("max(lifeboat_last_failover_rto_seconds)", "last failover RTO", |v| v > 0.0),
            ("time() - max(lifeboat_last_failover_timestamp_seconds)", "the failover completed just now", |v| (0.0..600.0).contains(&v)),
            ("max(lifeboat_region_healthy{region=\"a\"})", "a unhealthy (global leader's view)", |v| v == 0.0),
            ("count(ALERTS{alertname=\"LifeboatFailoverHappened\", alertstate=\"firing\"})", "Prometheus fires LifeboatFailoverHappened", |v| v == 1.0),
        ];
        prom.check_all(after_failover).await?;
        let rto = prom.query("max(lifeboat_last_failover_rto_seconds)").await?;
        eprintln!("last failover RTO per /metrics: {rto:?}");

        // Every dashboard query parses and has data during the test.
        let end_s = lifeboat_common::now_ms() / 1000 + 1;
        let mut empty = Vec::new();
        let queries = dashboard_queries()?;
        for (title, expr) in &queries {
            let r = prom
                .api(&format!(
                    "/api/v1/query_range?query={}&start={started_s}&end={end_s}&step=1",
                    enc(expr)
                ))
                .await
                .with_context(|| format!("panel {title:?}: query {expr:?}"))?;
            if r.is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        ensure!(
            empty.is_empty(),
            "dashboard queries without any series:\n{}",
            empty.join("\n")
        );
        eprintln!("{} dashboard queries checked", queries.len());
        Ok(())
    })
    .await
}

#[test]
fn promtool_checks_and_tests_the_rules() -> anyhow::Result<()> {
    let promtool = tool("promtool")?;
    let dir = deploy_dir().join("prometheus");
    for args in [
        ["check", "rules", "lifeboat-rules.yml"],
        ["test", "rules", "lifeboat-rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .with_context(|| format!("run {}", promtool.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("promtool {}:\n{text}", args.join(" "));
        ensure!(
            out.status.success(),
            "promtool {} failed:\n{text}",
            args.join(" ")
        );
        ensure!(
            text.contains("SUCCESS"),
            "promtool {}: no SUCCESS:\n{text}",
            args.join(" ")
        );
    }
    // One unit test at least per alert of the rules file.
    let rules = std::fs::read_to_string(dir.join("lifeboat-rules.yml"))?;
    let tests = std::fs::read_to_string(dir.join("lifeboat-rules.test.yml"))?;
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    ensure!(alerts.len() >= 10, "alerts: {alerts:?}");
    for a in alerts {
        ensure!(
            tests.contains(&format!("alertname: {a}\n")),
            "alert {a} has no promtool unit test"
        );
    }
    Ok(())
}
