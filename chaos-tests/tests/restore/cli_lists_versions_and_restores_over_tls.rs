//! The `lifeboat` binary against a real cluster: `status`/`ls`/`versions` with `--output json`,
//! point-in-time `restore --at`, and mutual TLS refusing clients without a cluster certificate.

use std::time::Duration;

use lifeboat_chaos_tests::*;
use lifeboat_proto::admin_service_client::AdminServiceClient;
use lifeboat_proto::StatusRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_versions_and_point_in_time_restore() -> anyhow::Result<()> {
    let s = Scratch::new("t09");
    let src = s.dir.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("doc.txt"), b"version one\n")?;
    let cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    agent_once(&cluster, &cfg, &data).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = jiff::Timestamp::now().to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(src.join("doc.txt"), b"version two, longer\n")?;
    agent_once(&cluster, &cfg, &data).await?;

    let st = json(&lifeboat(&cluster, &["status", "--output", "json"]));
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
    assert!(st["leader_id"].as_u64().unwrap() > 0);
    assert_eq!(st["entries"].as_u64(), Some(2), "root dir + doc.txt: {st}");

    let vs = json(&lifeboat(
        &cluster,
        &["versions", "data/doc.txt", "--output", "json"],
    ));
    let vs = vs.as_array().unwrap();
    assert_eq!(vs.len(), 2, "two versions of doc.txt: {vs:?}");
    assert_eq!(vs[0]["size"].as_u64(), Some(12));

    let ls = json(&lifeboat(&cluster, &["ls", "data", "--output", "json"]));
    assert!(ls
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "data/doc.txt"));

    // Point in time: the first version; latest: the second.
    let old = s.dir.join("old");
    let out = lifeboat(
        &cluster,
        &[
            "restore",
            "--path",
            "data",
            "--at",
            &between,
            "--to",
            old.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    let r = json(&out);
    assert_eq!(r["files"].as_u64(), Some(1));
    assert_eq!(std::fs::read(old.join("data/doc.txt"))?, b"version one\n");
    let new = s.dir.join("new");
    json(&lifeboat(
        &cluster,
        &[
            "restore",
            "--path",
            "data",
            "--to",
            new.to_str().unwrap(),
            "--output",
            "json",
        ],
    ));
    assert_eq!(
        std::fs::read(new.join("data/doc.txt"))?,
        b"version two, longer\n"
    );

    // A bad --at is refused with a clear message.
    let bad = lifeboat(
        &cluster,
        &["restore", "--at", "yesterday", "--to", "/tmp/x"],
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_foreign_and_plaintext_clients() -> anyhow::Result<()> {
    let s = Scratch::new("t09b");
    let cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let addr = cluster.coords[0].addr.clone();

    // The cluster's own admin certificate works.
    let ok = cluster.conn().channel(&addr)?;
    AdminServiceClient::new(ok).status(StatusRequest {}).await?;

    // A certificate from another CA is refused.
    let other = s.dir.join("other-ca");
    lifeboat_common::tls::init_dev_ca(&other)?;
    lifeboat_lab::harness::issue(&other, Role::Admin, ANY_REGION, "admin")?;
    let mut foreign = lifeboat_common::tls::TlsConfig::from_dir(&other, "admin");
    foreign.ca = Some(cluster.certs.join("ca.pem")); // trusts the server, but its cert is foreign
    let ch = foreign.channel(&addr)?;
    assert!(
        AdminServiceClient::new(ch)
            .status(StatusRequest {})
            .await
            .is_err(),
        "foreign client cert accepted"
    );

    // Plaintext is refused.
    let plain = lifeboat_common::tls::TlsConfig {
        insecure: true,
        ..Default::default()
    };
    let ch = plain.channel(&addr)?;
    assert!(
        AdminServiceClient::new(ch)
            .status(StatusRequest {})
            .await
            .is_err(),
        "plaintext accepted"
    );
    Ok(())
}
