//! Health checks (`[[checks]]`): run before every heartbeat and sent with it; the regional
//! leader marks its region unhealthy while any agent reports a failing check, and the global
//! leader fails the region over when that lasts `detection_timeout_ms` (DESIGN.md section 4).
//!
//! ```toml
//! [[checks]]
//! name = "web"
//! kind = "http"                       # tcp | http | exec | redis | postgres
//! target = "http://127.0.0.1:8080/healthz"
//! timeout_ms = 1000                   # default 1000
//! ```
//! `tcp`: `target` is `host:port`, ok when a connection opens. `http`: an `http://` URL, ok on a
//! 2xx answer to GET. `exec`: `command` (argv, no shell), ok on exit 0. `redis` / `postgres`:
//! `target` names a `[[redis_sources]]` / `[[postgres_sources]]` entry, ok when its health probe
//! answers (role and replication lag go into the detail); the probe connects like the source does
//! (credentials, and TLS for a `tls = true` Redis source). The last outcomes are also written to
//! `status.json` (`checks`).

use std::time::Duration;

use lifeboat_proto as pb;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::config::checks::CheckConfig;
use crate::config::Config;

async fn one(cfg: &Config, c: &CheckConfig) -> (bool, String) {
    match c.kind.as_str() {
        "tcp" => match tokio::net::TcpStream::connect(&c.target).await {
            Ok(_) => (true, "connected".into()),
            Err(e) => (false, format!("connect {}: {e}", c.target)),
        },
        "http" => http_get(&c.target).await,
        "exec" => {
            let (prog, args) = c.command.split_first().expect("validated");
            match tokio::process::Command::new(prog)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
            {
                Ok(s) if s.success() => (true, "exit 0".into()),
                Ok(s) => (false, format!("{prog}: {s}")),
                Err(e) => (false, format!("cannot run {prog}: {e}")),
            }
        }
        "redis" | "postgres" => {
            let src = crate::sources::databases(cfg)
                .into_iter()
                .find(|s| s.kind() == c.kind && s.name() == c.target);
            let h = match src.as_ref().and_then(|s| s.database()) {
                Some(db) => db.health().await,
                None => return (false, "no such source".into()),
            };
            let lag = h
                .lag_bytes
                .map(|l| format!(", lag {l} bytes"))
                .unwrap_or_default();
            (h.healthy, format!("{}{lag}: {}", h.role, h.detail))
        }
        other => (false, format!("unknown kind {other}")),
    }
}

/// Minimal HTTP/1.1 GET over plain TCP (health endpoints only): ok on a 2xx status line.
async fn http_get(url: &str) -> (bool, String) {
    let rest = url.trim_start_matches("http://");
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let mut s = match tokio::net::TcpStream::connect(&addr).await {
        Ok(s) => s,
        Err(e) => return (false, format!("connect {addr}: {e}")),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: lifeboat-agent\r\n\r\n");
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return (false, format!("send: {e}"));
    }
    let mut buf = vec![0u8; 256];
    let n = match s.read(&mut buf).await {
        Ok(n) => n,
        Err(e) => return (false, format!("read: {e}")),
    };
    let line = String::from_utf8_lossy(&buf[..n]);
    let status = line.lines().next().unwrap_or("").to_string();
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    ((200..300).contains(&code), status)
}

/// Runs every check concurrently, each bounded by its timeout.
pub async fn run_all(cfg: &Config) -> Vec<pb::CheckResult> {
    let futs = cfg.checks.iter().map(|c| async move {
        let (ok, detail) =
            match tokio::time::timeout(Duration::from_millis(c.timeout_ms), one(cfg, c)).await {
                Ok(r) => r,
                Err(_) => (false, format!("timed out after {} ms", c.timeout_ms)),
            };
        pb::CheckResult {
            name: c.name.clone(),
            ok,
            detail,
        }
    });
    futures::future::join_all(futs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(checks: Vec<CheckConfig>) -> Config {
        let mut c = Config::new("a1", std::path::PathBuf::from("/tmp/x"), vec![]);
        c.checks = checks;
        c
    }

    fn check(kind: &str, target: &str, command: &[&str]) -> CheckConfig {
        CheckConfig {
            name: format!("{kind}-check"),
            kind: kind.into(),
            target: target.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            timeout_ms: 1000,
        }
    }

    #[tokio::test]
    async fn checks_pass_and_fail_for_real() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap().to_string();
        let closed = {
            let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            t.local_addr().unwrap().to_string()
        };
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                    .await;
            }
        });
        let c = cfg(vec![
            check("tcp", &open, &[]),
            CheckConfig {
                name: "tcp-closed".into(),
                ..check("tcp", &closed, &[])
            },
            check("exec", "", &["true"]),
            CheckConfig {
                name: "exec-false".into(),
                ..check("exec", "", &["false"])
            },
            check("http", &format!("http://{open}/healthz"), &[]),
        ]);
        Config::validate_checks(&c).unwrap();
        let r = run_all(&c).await;
        let ok: Vec<(String, bool)> = r.iter().map(|r| (r.name.clone(), r.ok)).collect();
        assert_eq!(
            ok,
            vec![
                ("tcp-check".to_string(), true),
                ("tcp-closed".to_string(), false),
                ("exec-check".to_string(), true),
                ("exec-false".to_string(), false),
                ("http-check".to_string(), false),
            ]
        );
        assert!(r[4].detail.contains("503"), "{:?}", r[4]);
    }

    #[test]
    fn bad_checks_are_refused_with_the_reason() {
        assert!(
            Config::validate_checks(&cfg(vec![check("tcp", "nohost", &[])]))
                .unwrap_err()
                .contains("host:port")
        );
        assert!(Config::validate_checks(&cfg(vec![check("dns", "", &[])]))
            .unwrap_err()
            .contains("unknown kind"));
        assert!(
            Config::validate_checks(&cfg(vec![check("redis", "nope", &[])]))
                .unwrap_err()
                .contains("redis_sources")
        );
    }
}
