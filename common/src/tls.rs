//! Mutual TLS for every gRPC connection (rustls with the aws-lc-rs provider, through tonic), and
//! the development CA behind `lifeboat certs init`.
//!
//! Every certificate issued here carries the DNS names `lifeboat`, `localhost` and the IP
//! `127.0.0.1` plus the names asked for; clients verify servers as `lifeboat` by default, so a
//! certificate is accepted exactly when the cluster's CA signed it. Plaintext is only used when a
//! config says `insecure = true` (or a CLI gets `--insecure`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

/// DNS name clients expect in server certificates unless configured otherwise.
pub const DEFAULT_SERVER_NAME: &str = "lifeboat";

/// TLS settings of one process, as found in its TOML config (`[tls]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signs every cluster certificate.
    pub ca: Option<PathBuf>,
    /// PEM certificate of this process.
    pub cert: Option<PathBuf>,
    /// PEM private key of this process (never logged).
    pub key: Option<PathBuf>,
    /// Plaintext gRPC. Only for debugging; every production link must be mTLS.
    #[serde(default)]
    pub insecure: bool,
}

/// Errors of TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing from the config.
    #[error("TLS: `{0}` is not set; run `lifeboat certs init --dir DIR` and point [tls] ca/cert/key at its files, or set insecure = true")]
    Missing(&'static str),
    /// A file could not be read.
    #[error("TLS: cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("TLS: certificate generation failed: {0}")]
    Generate(String),
    /// tonic refused the endpoint or TLS config.
    #[error("TLS/endpoint: {0}")]
    Transport(String),
}

fn read(p: &Option<PathBuf>, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let p = p.as_ref().ok_or(TlsError::Missing(what))?;
    std::fs::read(p).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })
}

impl TlsConfig {
    /// Config pointing at `<dir>/ca.pem`, `<dir>/<name>.pem`, `<dir>/<name>.key` as written by
    /// [`init_dev_ca`] / [`issue_cert`].
    pub fn from_dir(dir: &Path, name: &str) -> Self {
        TlsConfig {
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join(format!("{name}.pem"))),
            key: Some(dir.join(format!("{name}.key"))),
            insecure: false,
        }
    }

    /// Server side: our identity, and client certificates required and checked against the CA.
    ///
    /// Errors: [`TlsError`] if a file is missing or unreadable.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        if self.insecure {
            return Ok(None);
        }
        let id = Identity::from_pem(read(&self.cert, "cert")?, read(&self.key, "key")?);
        Ok(Some(ServerTlsConfig::new().identity(id).client_ca_root(
            Certificate::from_pem(read(&self.ca, "ca")?),
        )))
    }

    /// Client side: trust only the cluster CA and present our certificate.
    ///
    /// Errors: [`TlsError`] if a file is missing or unreadable.
    pub fn client(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        if self.insecure {
            return Ok(None);
        }
        let id = Identity::from_pem(read(&self.cert, "cert")?, read(&self.key, "key")?);
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&self.ca, "ca")?))
                .identity(id)
                .domain_name(DEFAULT_SERVER_NAME),
        ))
    }

    /// A lazily connecting channel to `addr` (`host:port`), TLS unless insecure. Timeouts: connect
    /// 2 s, TCP keepalive and HTTP/2 keepalive so dead peers are noticed.
    ///
    /// Errors: [`TlsError`] for bad files or a malformed address.
    pub fn channel(&self, addr: &str) -> Result<Channel, TlsError> {
        let client = self.client()?;
        let scheme = if client.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| TlsError::Transport(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_stream_window_size(Some(8 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        if let Some(c) = client {
            ep = ep
                .tls_config(c)
                .map_err(|e| TlsError::Transport(e.to_string()))?;
        }
        Ok(ep.connect_lazy())
    }
}

fn gen_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Lifeboat development CA");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write_secret(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?;
    std::io::Write::write_all(&mut f, data.as_bytes()).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn write_public(path: &Path, data: &str) -> Result<(), TlsError> {
    std::fs::write(path, data).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

/// Creates a development CA in `dir` (`ca.pem`, `ca.key` mode 0600) unless one exists.
///
/// Errors: [`TlsError`] on I/O or generation failure.
pub fn init_dev_ca(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.into(),
        source,
    })?;
    if dir.join("ca.pem").exists() && dir.join("ca.key").exists() {
        return Ok(());
    }
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = ca_params()?.self_signed(&key).map_err(gen_err)?;
    write_secret(&dir.join("ca.key"), &key.serialize_pem())?;
    write_public(&dir.join("ca.pem"), &cert.pem())?;
    Ok(())
}

/// Lifetime of certificates issued by [`issue_cert`] (days).
pub const LEAF_DAYS: i64 = 90;

/// Issues `<dir>/<name>.pem` and `<dir>/<name>.key` (mode 0600) for identity `id`, signed by the
/// CA in `dir`, valid for server and client auth from one day ago (day granularity) for [`LEAF_DAYS`] days, with
/// SANs `lifeboat`, `localhost`, `127.0.0.1`, the name, `extra`, and the identity URI
/// `lifeboat://<region>/<role>/<name>` (see [`crate::authz`]).
///
/// Errors: [`TlsError`] if the CA is missing or generation fails.
pub fn issue_cert(
    dir: &Path,
    id: &crate::authz::PeerIdentity,
    extra: &[String],
) -> Result<(), TlsError> {
    let name = id.name.as_str();
    let ca_key_pem =
        std::fs::read_to_string(dir.join("ca.key")).map_err(|source| TlsError::Read {
            path: dir.join("ca.key"),
            source,
        })?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(gen_err)?;
    let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
    let mut sans = vec![
        DEFAULT_SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    if !sans.contains(&name.to_string()) && !name.contains('_') {
        sans.push(name.to_string());
    }
    sans.extend(extra.iter().cloned());
    let mut p = rcgen::CertificateParams::new(sans).map_err(gen_err)?;
    p.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id.uri()).map_err(gen_err)?,
    ));
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let ymd = |t: jiff::Timestamp| {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8)
    };
    let now = jiff::Timestamp::now();
    p.not_before = ymd(now - jiff::SignedDuration::from_hours(24));
    p.not_after = ymd(now + jiff::SignedDuration::from_hours(24 * LEAF_DAYS));
    let key = rcgen::KeyPair::generate().map_err(gen_err)?;
    let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
    write_secret(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    write_public(&dir.join(format!("{name}.pem")), &cert.pem())?;
    Ok(())
}
