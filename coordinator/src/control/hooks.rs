//! Traffic-move hooks (`[[global.traffic_hooks]]`), run by a region's leader once it has been
//! promoted: `exec` runs a command with `LIFEBOAT_EPOCH`, `LIFEBOAT_ACTIVE_REGION` and
//! `LIFEBOAT_PREVIOUS_REGION` in its environment; `webhook` POSTs the same facts as JSON. Each
//! returns an [`AuditEntry`] with the outcome and (truncated) output.

use std::process::Stdio;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::AsyncReadExt;

use super::record::AuditEntry;
use super::role::now_ms;
use crate::config::TrafficHook;

/// Most bytes of hook output kept in the audit log.
pub const OUTPUT_KEEP: usize = 4096;

/// Facts passed to every hook.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookContext {
    /// New epoch.
    pub epoch: u64,
    /// New active region.
    pub active_region: String,
    /// Region active before.
    pub previous_region: String,
    /// Node running the hook.
    pub node_id: u64,
}

fn truncate(s: &str) -> String {
    if s.len() <= OUTPUT_KEEP {
        return s.to_string();
    }
    let mut end = OUTPUT_KEEP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Runs one hook to completion (or its timeout) and describes the outcome.
pub async fn run(hook: &TrafficHook, ctx: &HookContext) -> AuditEntry {
    let started = Instant::now();
    let (ok, detail) = match hook {
        TrafficHook::Exec {
            command,
            timeout_ms,
            ..
        } => run_exec(command, *timeout_ms, ctx).await,
        TrafficHook::Webhook {
            url, timeout_ms, ..
        } => run_webhook(url, *timeout_ms, ctx).await,
    };
    let ms = started.elapsed().as_millis() as u64;
    if ok {
        tracing::info!(
            hook = hook.name(),
            epoch = ctx.epoch,
            ms,
            "traffic hook ran"
        );
    } else {
        tracing::warn!(hook = hook.name(), epoch = ctx.epoch, ms, detail = %detail, "traffic hook failed");
    }
    AuditEntry {
        seq: 0,
        at_ms: now_ms(),
        epoch: ctx.epoch,
        actor: format!("region {} leader node {}", ctx.active_region, ctx.node_id),
        action: "traffic-hook".into(),
        detail: format!("{} ({ms} ms): {detail}", hook.name()),
        outcome: if ok { "ok" } else { "failed" }.into(),
    }
}

async fn run_exec(command: &[String], timeout_ms: u64, ctx: &HookContext) -> (bool, String) {
    let Some((prog, args)) = command.split_first() else {
        return (false, "empty command".into());
    };
    let mut child = match tokio::process::Command::new(prog)
        .args(args)
        .env("LIFEBOAT_EPOCH", ctx.epoch.to_string())
        .env("LIFEBOAT_ACTIVE_REGION", &ctx.active_region)
        .env("LIFEBOAT_PREVIOUS_REGION", &ctx.previous_region)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot start {prog}: {e}")),
    };
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let fut = async {
        let mut o = Vec::new();
        let mut e = Vec::new();
        let (r1, r2, st) = tokio::join!(
            out.read_to_end(&mut o),
            err.read_to_end(&mut e),
            child.wait()
        );
        let _ = (r1, r2);
        (st, o, e)
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Err(_) => (false, format!("timed out after {timeout_ms} ms (killed)")),
        Ok((Err(e), _, _)) => (false, format!("wait failed: {e}")),
        Ok((Ok(st), o, e)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o),
                String::from_utf8_lossy(&e)
            );
            (
                st.success(),
                format!("exit {}; output: {}", st, truncate(text.trim())),
            )
        }
    }
}

async fn run_webhook(url: &str, timeout_ms: u64, ctx: &HookContext) -> (bool, String) {
    let uri: hyper::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return (false, format!("bad url {url:?}: {e}")),
    };
    if uri.scheme_str() != Some("http") {
        return (
            false,
            "only http:// webhooks are supported; use an exec hook (curl) for https".into(),
        );
    }
    let body = serde_json::json!({
        "epoch": ctx.epoch,
        "active_region": ctx.active_region,
        "previous_region": ctx.previous_region,
        "at_ms": now_ms(),
    })
    .to_string();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = match hyper::Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
    {
        Ok(r) => r,
        Err(e) => return (false, format!("bad request: {e}")),
    };
    let fut = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), fut).await {
        Err(_) => (false, format!("timed out after {timeout_ms} ms")),
        Ok(Err(e)) => (false, format!("POST {url}: {e}")),
        Ok(Ok((status, body))) => (
            status.is_success(),
            format!(
                "HTTP {status}; body: {}",
                truncate(String::from_utf8_lossy(&body).trim())
            ),
        ),
    }
}
