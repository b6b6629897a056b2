//! Connections to Redis, over plain TCP or TLS: the one implementation behind the agent's Redis
//! sources (snapshots, role changes, health probes and checks) and `lifeboat restore redis --to`.
//!
//! TLS runs on tokio-rustls with the aws-lc-rs provider (TLS 1.2 or 1.3). The roots come only
//! from a PEM CA file (never the system store); a client certificate is sent when configured (for
//! servers with `tls-auth-clients yes`); the server certificate must carry the configured name,
//! by default the host of the address. Error messages name files, never their content: the
//! private key is never logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

/// Time allowed to open the TCP connection, and again for the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for the connection setup commands (`AUTH`, `SELECT`, `CLIENT SETINFO`).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS settings towards one Redis server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    /// PEM file of the CA(s) that sign the server's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (with `key_file`), for servers with `tls-auth-clients yes`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (its content is never logged).
    pub key_file: Option<PathBuf>,
    /// Name the server certificate must carry (DNS name or IP); `None`: the host of the address.
    pub server_name: Option<String>,
}

/// Why a connection to Redis could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    /// A bad address, a refused or timed-out connection, or failed setup commands.
    #[error("redis {addr}: {msg}")]
    Connect {
        /// Server `host:port`.
        addr: String,
        /// What failed.
        msg: String,
    },
    /// TLS setup or handshake failed (a server certificate not signed by the CA file, a name
    /// mismatch, unreadable PEM files).
    #[error("redis {addr}: TLS: {msg}")]
    Tls {
        /// Server `host:port`.
        addr: String,
        /// What failed.
        msg: String,
    },
}

/// A byte stream to Redis: plain TCP or TLS.
pub trait RedisIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RedisIo for T {}

/// `"host:port"` → (host, port); the brackets of `[v6]:port` are removed.
///
/// Errors: missing host or a port that is not 1..=65535.
pub fn split_addr(addr: &str) -> Result<(String, u16), String> {
    let (h, p) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let port = p
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{addr:?}: bad port"))?;
    if h.is_empty() || h.contains('/') {
        return Err(format!("{addr:?}: bad host"));
    }
    Ok((h.trim_matches(['[', ']']).to_string(), port))
}

/// Checks that `name` can be a TLS server name (a DNS name or an IP address).
///
/// Errors: the reason, e.g. an invalid DNS name.
pub fn check_server_name(name: &str) -> Result<(), String> {
    rustls::pki_types::ServerName::try_from(name)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The rustls client configuration of `tls` (aws-lc-rs provider): roots from `ca_file`, the
/// client certificate if configured. `addr` only labels the errors.
///
/// Errors: [`RedisConnError::Tls`] for unreadable or invalid PEM files, a CA file without a
/// certificate, or only one of `cert_file` / `key_file`.
pub fn client_config(tls: &RedisTls, addr: &str) -> Result<rustls::ClientConfig, RedisConnError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |msg: String| RedisConnError::Tls {
        addr: addr.to_string(),
        msg,
    };
    let ca = &tls.ca_file;
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .and_then(|i| i.collect())
        .map_err(|e| err(format!("CA file {}: {e}", ca.display())))?;
    if certs.is_empty() {
        return Err(err(format!("CA file {}: no certificate", ca.display())));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| err(format!("CA file {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect())
                .map_err(|e| err(format!("client certificate {}: {e}", cert.display())))?;
            // The key's error never includes its content.
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err(format!("client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| err(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(err(
            "a client certificate needs both its certificate and its key file".into(),
        )),
    }
}

/// Opens a byte stream to `addr` (`host:port`): TCP, then TLS when `tls` is given
/// ([`CONNECT_TIMEOUT`] for each step).
///
/// Errors: [`RedisConnError::Connect`] for a bad address or a refused / timed-out connection;
/// [`RedisConnError::Tls`] for bad TLS files or a failed handshake (the message says why, e.g.
/// an unknown issuer when the CA file did not sign the server's certificate).
pub async fn open_stream(
    addr: &str,
    tls: Option<&RedisTls>,
) -> Result<Box<dyn RedisIo>, RedisConnError> {
    let connect_err = |msg: String| RedisConnError::Connect {
        addr: addr.to_string(),
        msg,
    };
    let (host, port) = split_addr(addr).map_err(connect_err)?;
    let sock = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| connect_err("connect timed out".into()))?
    .map_err(|e| connect_err(e.to_string()))?;
    let _ = sock.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(Box::new(sock));
    };
    let err = |msg: String| RedisConnError::Tls {
        addr: addr.to_string(),
        msg,
    };
    let cfg = client_config(tls, addr)?;
    let name = tls.server_name.clone().unwrap_or(host);
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| err(format!("server name {name:?}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, sock))
        .await
        .map_err(|_| err("handshake timed out (is this a TLS port?)".into()))?
        .map_err(|e| {
            err(format!(
                "handshake failed: {e} (is the server certificate signed by the CA file, and does it name {name:?}?)"
            ))
        })?;
    Ok(Box::new(stream))
}

/// A multiplexed connection to `addr` over [`open_stream`], set up with `info` (`AUTH` when it
/// has a password, `SELECT` of its database) within [`SETUP_TIMEOUT`]; each later command may
/// take up to `response_timeout`. The connection's driver runs on a spawned task.
///
/// Errors: see [`open_stream`]; [`RedisConnError::Connect`] when the setup commands fail (e.g. a
/// wrong password, or a TLS-only server that closes a plaintext connection) or time out.
pub async fn connect(
    addr: &str,
    tls: Option<&RedisTls>,
    info: &redis::RedisConnectionInfo,
    response_timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, RedisConnError> {
    let stream = open_stream(addr, tls).await?;
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(response_timeout);
    let err = |msg: String| RedisConnError::Connect {
        addr: addr.to_string(),
        msg,
    };
    let (con, driver) = tokio::time::timeout(
        SETUP_TIMEOUT,
        redis::aio::MultiplexedConnection::new_with_config(info, stream, cfg),
    )
    .await
    .map_err(|_| err("connection setup timed out".into()))?
    .map_err(|e| err(e.to_string()))?;
    tokio::spawn(driver);
    Ok(con)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(split_addr("h:1").unwrap(), ("h".to_string(), 1));
        assert_eq!(split_addr("[::1]:6379").unwrap(), ("::1".to_string(), 6379));
        for bad in ["h", ":1", "h:0", "h:x", "a/b:1"] {
            assert!(split_addr(bad).is_err(), "{bad}");
        }
        assert!(check_server_name("redis.example.org").is_ok());
        assert!(check_server_name("127.0.0.1").is_ok());
        assert!(check_server_name("not a name").is_err());
    }

    #[test]
    fn client_config_reports_files_not_contents() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::init_dev_ca(dir.path()).unwrap();
        crate::tls::issue_cert(
            dir.path(),
            &crate::authz::PeerIdentity::new(crate::authz::Role::Agent, "any", "c").unwrap(),
            &[],
        )
        .unwrap();
        let mut t = RedisTls {
            ca_file: dir.path().join("ca.pem"),
            cert_file: Some(dir.path().join("c.pem")),
            key_file: Some(dir.path().join("c.key")),
            server_name: None,
        };
        client_config(&t, "h:1").unwrap();
        t.key_file = None;
        let e = client_config(&t, "h:1").unwrap_err().to_string();
        assert!(e.contains("both its certificate and its key"), "{e}");
        // A key file that is not PEM: the error names the file, not what it holds.
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "hunter2-secret-material").unwrap();
        t.key_file = Some(bad.clone());
        let e = client_config(&t, "h:1").unwrap_err().to_string();
        assert!(e.contains("client key") && e.contains("bad.key"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        t.ca_file = dir.path().join("missing.pem");
        let e = client_config(&t, "h:1").unwrap_err().to_string();
        assert!(e.starts_with("redis h:1: TLS: CA file"), "{e}");
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let info = redis::RedisConnectionInfo::default();
        let e = connect(
            &format!("127.0.0.1:{port}"),
            None,
            &info,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RedisConnError::Connect { .. }), "{e}");
    }
}
