//! The mutual TLS of the coordinator's gRPC listener, with its certificate files read again on
//! SIGHUP (`systemctl reload`, `ExecReload=/bin/kill -HUP $MAINPID`).
//!
//! The listener accepts TCP connections and runs the rustls handshake itself, each with the
//! server config current at accept time, then hands the streams to tonic (which reads the
//! client's certificate chain from them for `crate::authz`, as with its own TLS). A SIGHUP
//! rebuilds the config from `[tls] ca`, `cert` and `key`: connections accepted afterwards
//! present the new certificate and trust the new CA; established connections keep theirs. A
//! reload that fails (unreadable or mismatched files) is logged and the previous config stays.
//! Outgoing connections (Raft, blob copies, replication) read the files when they are opened.
//! Nothing else is reloaded: config changes need a restart.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lifeboat_common::tls::TlsConfig;
use parking_lot::RwLock;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's TLS config, replaced as a whole on reload.
#[derive(Clone)]
pub struct ReloadableTls {
    files: TlsConfig,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ReloadableTls {
    /// Reads `files` (CA, certificate chain, key) into a server config that requires a client
    /// certificate signed by the CA.
    ///
    /// Errors: a file missing from the config, unreadable or not PEM; a key that does not
    /// match the certificate.
    pub fn load(files: &TlsConfig) -> anyhow::Result<Self> {
        Ok(ReloadableTls {
            files: files.clone(),
            current: Arc::new(RwLock::new(server_config(files)?)),
        })
    }

    /// Reads the files again; on success new connections use them.
    ///
    /// Errors: as [`ReloadableTls::load`]; the previous config stays in use.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = server_config(&self.files)?;
        *self.current.write() = fresh;
        Ok(())
    }

    /// Accepts connections on `listener` and completes their TLS handshakes (each with the
    /// config current when it was accepted), yielding the established streams. The accept loop
    /// ends when the returned stream is dropped and the next connection arrives; abort the
    /// returned task to end it at once.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> (
        tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let current = Arc::clone(&self.current);
        let task = tokio::spawn(async move {
            while !tx.is_closed() {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&current.read()));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        (tokio_stream::wrappers::ReceiverStream::new(rx), task)
    }
}

/// Reloads `tls` (when TLS is on) on every SIGHUP, telling systemd RELOADING=1 then READY=1.
/// Without TLS a SIGHUP is logged and ignored (it no longer terminates the process).
///
/// Errors: the signal handler cannot be installed.
pub fn spawn_sighup(tls: Option<ReloadableTls>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: TLS is off (insecure = true), nothing to reload");
                continue;
            };
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
            match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = ?tls.files.cert,
                    "SIGHUP: TLS certificates reloaded; new connections use them"
                ),
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "SIGHUP: TLS reload failed; keeping the previous certificates"
                ),
            }
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }))
}

/// A rustls server config from the files: HTTP/2 only, client certificates required and
/// verified against the CA.
fn server_config(files: &TlsConfig) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let path = |p: &Option<std::path::PathBuf>, key: &str| {
        p.clone().with_context(|| {
            format!("[tls] {key} is not set; run `lifeboat certs init --dir DIR` and point [tls] ca/cert/key at its files, or set insecure = true")
        })
    };
    let (ca, cert, key) = (
        path(&files.ca, "ca")?,
        path(&files.cert, "cert")?,
        path(&files.key, "key")?,
    );
    let certs = |p: &std::path::Path| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let v = CertificateDer::pem_file_iter(p)
            .with_context(|| format!("read {}", p.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("PEM certificates in {}", p.display()))?;
        anyhow::ensure!(!v.is_empty(), "no certificate in {}", p.display());
        Ok(v)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&ca)? {
        roots
            .add(c)
            .with_context(|| format!("CA certificate in {}", ca.display()))?;
    }
    let chain = certs(&cert)?;
    let key_der = PrivateKeyDer::from_pem_file(&key)
        .with_context(|| format!("private key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "certificate {} and key {} do not form a usable pair",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
