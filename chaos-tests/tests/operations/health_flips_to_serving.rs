//! The coordinator's gRPC health service (`grpc.health.v1.Health`), as a Kubernetes `grpc`
//! probe sees it: on the plaintext `health_addr` listener, the server status `""` is SERVING as
//! soon as the node runs, and the admin service's status (the readiness probe) flips from
//! NOT_SERVING to SERVING once the regional group has a leader again. The same statuses are
//! served on the main mutual-TLS listener.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ADMIN: &str = "lifeboat.v1.AdminService";

/// One `Check` of `service` on `ch`.
async fn check(
    ch: tonic::transport::Channel,
    service: &str,
) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown))
}

/// A plaintext channel to a `health_addr` listener, retried until it connects (the process is
/// starting) or 20 s pass.
async fn plaintext(addr: &str) -> anyhow::Result<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1));
        match ep.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) if Instant::now() > deadline => {
                anyhow::bail!("health listener {addr} never answered: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Polls `service` on `ch` until it reports `want`.
async fn wait_status(
    ch: &tonic::transport::Channel,
    service: &str,
    want: ServingStatus,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = check(ch.clone(), service).await;
        if matches!(&got, Ok(s) if *s == want) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{service:?} still {got:?}, not {want:?}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_to_serving_once_the_region_has_a_leader() -> anyhow::Result<()> {
    let mut s = Scratch::new("health");
    let mut cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;

    // Restart every coordinator with a plaintext health listener (a top-level key, so it goes
    // before the config's first table).
    let ports = lifeboat_restore::servers::free_ports(3)?;
    for (i, port) in ports.iter().enumerate() {
        cluster.kill_coordinator(i);
        let path = cluster.coords[i].config.clone();
        let toml = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("health_addr = \"127.0.0.1:{port}\"\n{toml}"))?;
    }
    let health0 = format!("127.0.0.1:{}", ports[0]);

    // One coordinator of three: it runs (server SERVING) but has no quorum, so no leader: the
    // admin service (readiness) is NOT_SERVING.
    cluster.start_coordinator(0)?;
    let ch = plaintext(&health0).await?;
    wait_status(&ch, "", ServingStatus::Serving, Duration::from_secs(10)).await?;
    // (Right after the restart it may still name the leader of its stored vote, until its
    // election timeout makes it a candidate.)
    wait_status(
        &ch,
        ADMIN,
        ServingStatus::NotServing,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| anyhow::anyhow!("a lone coordinator of three knows no leader: {e}"))?;
    // It stays so: no quorum, no leader.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(check(ch.clone(), ADMIN).await?, ServingStatus::NotServing);
    assert_eq!(check(ch.clone(), "").await?, ServingStatus::Serving);
    let unknown = check(ch.clone(), "no.such.Service").await;
    assert_eq!(
        unknown.map_err(|e| e.code()),
        Err(tonic::Code::NotFound),
        "an unknown service name is NOT_FOUND (the gRPC health protocol)"
    );

    // Quorum back: a leader is elected and the readiness status flips to SERVING.
    cluster.start_coordinator(1)?;
    cluster.start_coordinator(2)?;
    let res = wait_status(&ch, ADMIN, ServingStatus::Serving, Duration::from_secs(30)).await;
    if res.is_err() {
        s.keep();
    }
    res?;
    for (i, port) in ports.iter().enumerate() {
        let chi = plaintext(&format!("127.0.0.1:{port}")).await?;
        wait_status(&chi, ADMIN, ServingStatus::Serving, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("coordinator {i}: {e}"))?;
    }

    // The main listener serves the same statuses over mutual TLS (an admin certificate here).
    let tls = cluster.conn().channel(&cluster.coords[0].addr)?;
    assert_eq!(check(tls.clone(), "").await?, ServingStatus::Serving);
    assert_eq!(check(tls, ADMIN).await?, ServingStatus::Serving);
    // ... and not in plaintext: the main listener still requires TLS.
    let plain_main =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.coords[0].addr))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
    if let Ok(ch) = plain_main {
        assert!(
            check(ch, "").await.is_err(),
            "the main listener answered a plaintext health check"
        );
    }
    Ok(())
}
