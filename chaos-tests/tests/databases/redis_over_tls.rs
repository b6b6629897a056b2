//! Redis sources over TLS against a real `redis-server --tls-port` (Debian's build has TLS) with
//! certificates from the dev CA: the RDB snapshot taken over TLS (`SYNC` on a rustls stream) loads
//! into a fresh Redis with every key and value equal; health and role reconciliation work over
//! TLS; a client certificate is required when the server asks for one; a server certificate from
//! another CA, or one that does not carry `tls_server_name`, is refused with a clear error and
//! records nothing. An agent with a `tls = true` source stores the snapshot in the catalog, and
//! `lifeboat verify snapshot --expect-keys` checks the key count. Its `redis` health checks run
//! over TLS against a TLS-only redis-server (`--port 0`): ok with the right CA, failing with
//! another CA and once the server is stopped (read from `status.json`). `lifeboat restore redis
//! --to` that TLS-only server with `--tls` and a client certificate copies every key with equal
//! values; without `--tls`, with `--tls` but no CA, or with another CA it fails quickly with a
//! message that says why.

use std::path::Path;

use anyhow::Context;
use lifeboat_agent::sources::redis::{apply_role, health, take_snapshot, RedisSourceConfig};
use lifeboat_chaos_tests::redis_server::start_redis;
use lifeboat_chaos_tests::*;
use lifeboat_common::redis_conn::{self, RedisTls};
use lifeboat_lab::free_port;

fn source(
    addr: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    name: Option<&str>,
) -> RedisSourceConfig {
    let mut v = serde_json::json!({
        "name": "secure", "addr": addr, "interval_s": 3600, "tls": true, "tls_ca_file": ca,
    });
    if let Some((c, k)) = client {
        v["tls_cert_file"] = serde_json::json!(c);
        v["tls_key_file"] = serde_json::json!(k);
    }
    if let Some(n) = name {
        v["tls_server_name"] = serde_json::json!(n);
    }
    serde_json::from_value(v).expect("source config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_snapshot_over_tls_round_trips_and_wrong_ca_is_refused() -> anyhow::Result<()> {
    run("t23", |dir| async move {
        let certs = dir.join("certs");
        lifeboat_common::tls::init_dev_ca(&certs)?;
        lifeboat_lab::harness::issue(&certs, Role::Agent, ANY_REGION, "redis")?;
        lifeboat_lab::harness::issue(&certs, Role::Agent, ANY_REGION, "agent")?;
        let other = dir.join("other-ca");
        lifeboat_common::tls::init_dev_ca(&other)?;
        let ca = certs.join("ca.pem");
        let client = (certs.join("agent.pem"), certs.join("agent.key"));
        let client = Some((client.0.as_path(), client.1.as_path()));

        // The plain port fills the data; the agent only talks to the TLS port.
        let tls_port = free_port()?;
        let p = |x: &Path| x.to_str().unwrap().to_string();
        let args = [
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            p(&certs.join("redis.pem")),
            "--tls-key-file".into(),
            p(&certs.join("redis.key")),
            "--tls-ca-cert-file".into(),
            p(&ca),
            "--tls-auth-clients".into(),
            "yes".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = start_redis(&dir.join("redis"), &args)?;
        let mut c = r.con().await?;
        let mut pipe = redis::pipe();
        for i in 0..3000 {
            pipe.cmd("SET")
                .arg(format!("k:{i}"))
                .arg(format!("v:{i}:{}", "x".repeat(i % 40)))
                .ignore();
        }
        pipe.cmd("HSET").arg("h").arg("f").arg("hv").ignore();
        pipe.query_async::<()>(&mut c).await?;
        let addr = format!("127.0.0.1:{tls_port}");

        // Snapshot over TLS with a client certificate.
        let src = source(&addr, &ca, client, None);
        let data = dir.join("agent");
        let meta = take_snapshot(&src, &data, 5).await?;
        assert_eq!(
            (meta.keys, meta.kind.as_str(), meta.epoch),
            (3001, "redis", 5)
        );
        let rdb = data.join("snapshots").join(format!("{}.rdb", meta.id));
        let bytes = std::fs::read(&rdb)?;
        assert_eq!(&bytes[..5], b"REDIS");
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), meta.blake3);

        // Restore equals: a fresh Redis loading the RDB holds every key with the same value.
        let check = dir.join("check");
        std::fs::create_dir_all(&check)?;
        std::fs::copy(&rdb, check.join("dump.rdb"))?;
        let loaded = start_redis(&check, &[])?;
        let mut l = loaded.con().await?;
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut l).await?;
        assert_eq!(n, 3001);
        let keys: Vec<String> = (0..3000).map(|i| format!("k:{i}")).collect();
        let want: Vec<String> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        let got: Vec<String> = redis::cmd("MGET").arg(&keys).query_async(&mut l).await?;
        assert_eq!(got, want);
        let hv: String = redis::cmd("HGET")
            .arg("h")
            .arg("f")
            .query_async(&mut l)
            .await?;
        assert_eq!(hv, "hv");

        // Health and role reconciliation over TLS.
        let h = health(&src).await;
        assert!(h.healthy && h.role == "primary", "{h:?}");
        let did = apply_role(&src, "eu", "eu", 5).await?;
        assert!(did.contains("already primary"), "{did}");
        // The name in the certificate (`lifeboat`) instead of the address.
        let named = source(&addr, &ca, client, Some("lifeboat"));
        assert_eq!(
            take_snapshot(&named, &dir.join("agent-named"), 0)
                .await?
                .keys,
            3001
        );

        // Refusals: another CA, a name the certificate lacks, no client certificate.
        for (what, bad, needle) in [
            // Both dev CAs have the same subject: rustls reports a signature that does not verify.
            (
                "wrong CA",
                source(&addr, &other.join("ca.pem"), client, None),
                "invalid peer certificate",
            ),
            (
                "wrong name",
                source(&addr, &ca, client, Some("redis.example.org")),
                "not valid for name \"redis.example.org\"",
            ),
        ] {
            let out = dir.join(format!("agent-{}", what.replace(' ', "-")));
            let e = take_snapshot(&bad, &out, 0).await.unwrap_err().to_string();
            assert!(
                e.contains("TLS") && e.contains("handshake failed") && e.contains(needle),
                "{what}: {e}"
            );
            assert!(!out.join("snapshots").exists(), "{what}: nothing recorded");
            let h = health(&bad).await;
            assert!(!h.healthy && h.detail.contains("TLS"), "{what}: {h:?}");
            assert!(apply_role(&bad, "eu", "eu", 5).await.is_err(), "{what}");
        }
        let anonymous = source(&addr, &ca, None, None);
        let out = dir.join("agent-anonymous");
        assert!(
            take_snapshot(&anonymous, &out, 0).await.is_err(),
            "the server requires a client certificate"
        );
        assert!(!out.join("snapshots").exists());

        // A second Redis that speaks only TLS (`--port 0`), client certificate required: the
        // target of `restore redis --to` and of the agent's `redis` health checks.
        let only_port = free_port()?;
        let only_args = [
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            only_port.to_string(),
            "--tls-cert-file".into(),
            p(&certs.join("redis.pem")),
            "--tls-key-file".into(),
            p(&certs.join("redis.key")),
            "--tls-ca-cert-file".into(),
            p(&ca),
            "--tls-auth-clients".into(),
            "yes".into(),
        ];
        let only_args: Vec<&str> = only_args.iter().map(String::as_str).collect();
        let mut only = start_redis(&dir.join("redis-tls-only"), &only_args)?;
        let only_addr = format!("127.0.0.1:{only_port}");
        let only_tls = RedisTls {
            ca_file: ca.clone(),
            cert_file: Some(certs.join("agent.pem")),
            key_file: Some(certs.join("agent.key")),
            server_name: None,
        };
        let mut t = tls_con(&only_addr, &only_tls).await?;
        // A key the snapshot holds too, with another value: RESTORE … REPLACE overwrites it.
        redis::cmd("SET")
            .arg("k:0")
            .arg("stale")
            .query_async::<()>(&mut t)
            .await?;

        // End to end: an agent with `tls = true` sources stores the snapshot in the catalog and
        // runs `redis` health checks over TLS (one source with the right CA, one with another
        // CA); `verify snapshot --expect-keys` loads the snapshot into a scratch redis-server.
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(std::time::Duration::from_secs(30), None).await?;
        let tls_source = |name: &str, addr: &str, ca: &Path| {
            format!(
                "[[redis_sources]]\nname = \"{name}\"\naddr = \"{addr}\"\ninterval_s = 3600\ntls = true\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_server_name = \"localhost\"\n",
                ca.display(),
                certs.join("agent.pem").display(),
                certs.join("agent.key").display()
            )
        };
        let extra = [
            tls_source("secure", &addr, &ca),
            tls_source("tlsonly", &only_addr, &ca),
            tls_source("wrongca", &only_addr, &other.join("ca.pem")),
            "[[checks]]\nname = \"redis-tls\"\nkind = \"redis\"\ntarget = \"tlsonly\"\ntimeout_ms = 10000\n".into(),
            "[[checks]]\nname = \"redis-wrong-ca\"\nkind = \"redis\"\ntarget = \"wrongca\"\ntimeout_ms = 10000\n".into(),
        ]
        .concat();
        let (cfg, data) = cluster.write_agent_config("a1", &[], &extra)?;
        cluster.start_agent(&cfg)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let id = loop {
            let side = catalog_paths(&cluster, "_snapshots/secure")
                .into_iter()
                .find(|p| p.ends_with(".rdb.meta.json"));
            if let Some(p) = side {
                break p["_snapshots/".len()..p.len() - ".rdb.meta.json".len()].to_string();
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no TLS snapshot in the catalog; agent log:\n{}",
                std::fs::read_to_string(cfg.with_extension("log")).unwrap_or_default()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        settle(&data).await?;
        let v = json(&lifeboat(
            &cluster,
            &["verify", "snapshot", &id, "--expect-keys", "3001", "--output", "json"],
        ));
        assert_eq!((v["verdict"].as_str(), v["keys"].as_u64()), (Some("ok"), Some(3001)), "{v}");
        let out = lifeboat(
            &cluster,
            &["verify", "snapshot", &id, "--expect-keys", "5", "--output", "json"],
        );
        let v = failed_json(&out, "a wrong --expect-keys");
        let keys_check = v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "keys"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(keys_check["ok"], false, "{v}");
        assert!(keys_check["detail"].as_str().unwrap_or_default().contains("--expect-keys 5"), "{v}");

        // The `redis` checks go over TLS: ok against the TLS-only server with the right CA,
        // failing (TLS handshake) with another CA. Read from the agent's status.json, which holds
        // what the last heartbeat sent.
        let check = |name: &str| {
            agent_status(&data).and_then(|s| {
                s["checks"]
                    .as_array()?
                    .iter()
                    .find(|c| c["name"] == name)
                    .cloned()
            })
        };
        let detail = |c: &serde_json::Value| c["detail"].as_str().unwrap_or_default().to_string();
        wait_until(std::time::Duration::from_secs(60), "both redis checks reported", || {
            check("redis-tls").is_some() && check("redis-wrong-ca").is_some()
        })
        .await?;
        let ok = check("redis-tls").unwrap_or_default();
        assert_eq!(ok["ok"], true, "{ok}");
        assert!(
            detail(&ok).starts_with("primary") && detail(&ok).contains(&only_addr),
            "{ok}"
        );
        let bad = check("redis-wrong-ca").unwrap_or_default();
        assert_eq!(bad["ok"], false, "{bad}");
        assert!(
            detail(&bad).contains("TLS") && detail(&bad).contains("handshake failed"),
            "{bad}"
        );

        // `restore redis --to` a TLS-only Redis: every key copied over TLS with a client
        // certificate, values equal to the source's.
        let (ca_pem, agent_pem, agent_key) = (
            p(&ca),
            p(&certs.join("agent.pem")),
            p(&certs.join("agent.key")),
        );
        let tls_flags = [
            "--tls",
            "--tls-ca-file",
            &ca_pem,
            "--tls-cert-file",
            &agent_pem,
            "--tls-key-file",
            &agent_key,
            "--tls-server-name",
            "localhost",
        ];
        let restore = ["restore", "redis", "--snapshot", &id, "--to", &only_addr];
        let r = json(&lifeboat(
            &cluster,
            &[&restore[..], &tls_flags[..], &["--output", "json"]].concat(),
        ));
        assert_eq!(
            (r["target"].as_str(), r["keys_copied"].as_u64()),
            (Some("redis"), Some(3001)),
            "{r}"
        );
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut t).await?;
        assert_eq!(n, 3001);
        let got: Vec<String> = redis::cmd("MGET").arg(&keys).query_async(&mut t).await?;
        assert_eq!(got, want, "every value equals the source's");
        let hv: String = redis::cmd("HGET")
            .arg("h")
            .arg("f")
            .query_async(&mut t)
            .await?;
        assert_eq!(hv, "hv");

        // Refusals, each within a bounded time and before anything is downloaded: plaintext to a
        // TLS-only server, --tls without --tls-ca-file, a CA that did not sign the server.
        let limit = std::time::Duration::from_secs(120);
        let other_ca = p(&other.join("ca.pem"));
        for (what, flags, needle) in [
            (
                "plaintext",
                &[][..],
                "if it only accepts TLS, give --tls --tls-ca-file",
            ),
            ("--tls without a CA", &["--tls"][..], "--tls needs --tls-ca-file"),
            (
                "wrong CA",
                &["--tls", "--tls-ca-file", &other_ca][..],
                "handshake failed",
            ),
        ] {
            let out = lifeboat_within(&cluster, &[&restore[..], flags].concat(), limit).await?;
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{what}: restore succeeded");
            assert!(err.contains(needle), "{what}: {err}");
        }
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut t).await?;
        assert_eq!(n, 3001, "the refused restores changed nothing");

        // The TLS-only server stops: its check fails.
        only.kill();
        wait_until(std::time::Duration::from_secs(60), "the redis check fails", || {
            check("redis-tls").is_some_and(|c| c["ok"] == false)
        })
        .await?;
        let down = check("redis-tls").unwrap_or_default();
        assert!(detail(&down).contains(&only_addr), "{down}");
        Ok(())
    })
    .await
}

/// A connection to `addr` over TLS through the shared connection code, waiting up to 20 s for
/// the server to answer.
async fn tls_con(addr: &str, tls: &RedisTls) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let info = redis::RedisConnectionInfo::default();
    loop {
        match redis_conn::connect(addr, Some(tls), &info, std::time::Duration::from_secs(30)).await
        {
            Ok(mut c) => {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Ok(c);
                }
            }
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e).context(format!("TLS redis {addr} not up"))
            }
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
