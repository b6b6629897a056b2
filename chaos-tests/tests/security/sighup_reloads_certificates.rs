//! SIGHUP reloads a running coordinator's TLS files (`ExecReload` of the systemd unit): after
//! its certificate is re-issued, new connections see the old one until the SIGHUP and the new one
//! after it; the process keeps serving; a SIGHUP with a broken key file keeps the previous
//! certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_chaos_tests::*;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The leaf certificate `addr` presents to a new TLS connection made with the admin
/// certificate of `certs`.
async fn served_cert(certs: &Path, addr: &str) -> anyhow::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem"))? {
        roots.add(c?)?;
    }
    let chain =
        CertificateDer::pem_file_iter(certs.join("admin.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(certs.join("admin.key"))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("lifeboat")?, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?;
    Ok(leaf.to_vec())
}

/// The DER of the first certificate in a PEM file.
fn file_cert(path: &Path) -> anyhow::Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_file(path)?.to_vec())
}

fn sighup(cluster: &Cluster, i: usize) -> anyhow::Result<()> {
    let pid = cluster.coords[i]
        .child
        .as_ref()
        .context("not running")?
        .id();
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    anyhow::ensure!(
        rc == 0,
        "kill -HUP {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn log_lines(cluster: &Cluster, i: usize, needle: &str) -> usize {
    std::fs::read_to_string(&cluster.coords[i].log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_for_new_connections() -> anyhow::Result<()> {
    let mut s = Scratch::new("tls-reload");
    let mut cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    let certs = cluster.certs.clone();
    let addr = cluster.coords[0].addr.clone();
    let name = format!("coord{}", cluster.coords[0].id);
    let old = served_cert(&certs, &addr).await?;
    assert_eq!(old, file_cert(&certs.join(format!("{name}.pem")))?);

    // A new certificate on disk changes nothing until the SIGHUP.
    issue(&certs, Role::Coordinator, &cluster.region, &name)?;
    let new = file_cert(&certs.join(format!("{name}.pem")))?;
    assert_ne!(new, old, "a fresh certificate was issued");
    assert_eq!(served_cert(&certs, &addr).await?, old);

    sighup(&cluster, 0)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_cert(&certs, &addr).await? == new {
            break;
        }
        if Instant::now() > deadline {
            s.keep();
            anyhow::bail!("still the old certificate 10 s after SIGHUP");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(log_lines(&cluster, 0, "TLS certificates reloaded"), 1);
    // Still running and serving (SIGHUP no longer terminates), and its peers accept the new
    // certificate: the group still answers with a leader.
    assert!(cluster.coords[0]
        .child
        .as_mut()
        .unwrap()
        .try_wait()?
        .is_none());
    cluster.wait_leader(Duration::from_secs(30), None).await?;
    assert!(
        cluster.status_of(0).await.is_some(),
        "status over the new certificate"
    );

    // A broken key: the reload fails, the previous (new) certificate stays.
    std::fs::write(certs.join(format!("{name}.key")), "not a key\n")?;
    sighup(&cluster, 0)?;
    wait_until(Duration::from_secs(10), "a failed reload is logged", || {
        log_lines(&cluster, 0, "TLS reload failed") == 1
    })
    .await?;
    assert_eq!(served_cert(&certs, &addr).await?, new);
    assert!(cluster.status_of(0).await.is_some());
    Ok(())
}
