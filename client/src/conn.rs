//! Connection options shared by every admin command: which coordinators, which TLS files, and
//! leader discovery.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use lifeboat_common::tls::TlsConfig;
use lifeboat_proto::admin_service_client::AdminServiceClient;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::StatusRequest;
use tonic::transport::Channel;

/// How to reach the coordinators.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Coordinator address `host:port` (repeat or comma-separate for several; any member works,
    /// the CLI finds the leader).
    #[arg(
        long = "coordinator",
        short = 'c',
        env = "LIFEBOAT_COORDINATOR",
        value_delimiter = ',',
        default_value = "127.0.0.1:7101"
    )]
    pub coordinators: Vec<String>,
    /// Directory with `ca.pem`, `admin.pem`, `admin.key` (as written by `lifeboat certs init`).
    #[arg(long, env = "LIFEBOAT_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// CA certificate (PEM); overrides --tls-dir.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); overrides --tls-dir.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); overrides --tls-dir.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Plaintext gRPC (only for clusters configured with `insecure = true`).
    #[arg(long)]
    pub insecure: bool,
}

impl ConnArgs {
    /// TLS settings from the flags.
    ///
    /// Errors: when neither TLS files nor --insecure are given.
    pub fn tls(&self) -> anyhow::Result<TlsConfig> {
        if self.insecure {
            return Ok(TlsConfig {
                insecure: true,
                ..Default::default()
            });
        }
        let mut t = match &self.tls_dir {
            Some(d) => TlsConfig::from_dir(d, "admin"),
            None => TlsConfig::default(),
        };
        if self.ca.is_some() {
            t.ca = self.ca.clone();
        }
        if self.cert.is_some() {
            t.cert = self.cert.clone();
        }
        if self.key.is_some() {
            t.key = self.key.clone();
        }
        if t.ca.is_none() || t.cert.is_none() || t.key.is_none() {
            bail!("no TLS files: pass --tls-dir DIR (from `lifeboat certs init`), or --ca/--cert/--key, or --insecure for a plaintext cluster");
        }
        Ok(t)
    }

    /// A channel to `addr`.
    ///
    /// Errors: bad TLS files or address.
    pub fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        Ok(self.tls()?.channel(addr)?)
    }

    /// Admin client of the first coordinator that answers `Status`, switched to the leader when
    /// one is known. Returns the client and the address used.
    ///
    /// Errors: when no coordinator answers (names each and why).
    pub async fn admin(&self) -> anyhow::Result<(AdminServiceClient<Channel>, String)> {
        let mut errors = Vec::new();
        for addr in &self.coordinators {
            let mut c = admin_client(self.channel(addr)?);
            match c.status(StatusRequest {}).await {
                Ok(s) => {
                    let s = s.into_inner();
                    if !s.leader_addr.is_empty() && s.leader_addr != *addr {
                        let mut l = admin_client(self.channel(&s.leader_addr)?);
                        if l.status(StatusRequest {}).await.is_ok() {
                            return Ok((l, s.leader_addr));
                        }
                    }
                    return Ok((c, addr.clone()));
                }
                Err(e) => errors.push(format!("{addr}: {}", e.message())),
            }
        }
        bail!(
            "no coordinator answered ({}). Check that coordinators run, the addresses (--coordinator), and the TLS files (--tls-dir)",
            errors.join("; ")
        )
    }

    /// Blob client of `addr`.
    ///
    /// Errors: bad TLS files or address.
    pub fn blobs(&self, addr: &str) -> anyhow::Result<BlobServiceClient<Channel>> {
        Ok(
            BlobServiceClient::new(self.channel(addr).context("blob channel")?)
                .max_decoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES),
        )
    }
}

/// Admin client with Lifeboat's message size limits.
pub fn admin_client(ch: Channel) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(ch).max_decoding_message_size(lifeboat_common::MAX_MESSAGE_BYTES)
}
