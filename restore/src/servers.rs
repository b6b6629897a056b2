//! Local server processes: free loopback ports, a `redis-server`, and PostgreSQL tools run as
//! the server's OS user. The restore engine starts scratch servers with these (a `redis-server`
//! loading an RDB, a PostgreSQL recovering a base backup); the test lab (`lifeboat-lab`) builds
//! its database servers on the same three pieces, so there is one of each in the workspace.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Ports handed out by this process, so that servers started in parallel (or back to back,
/// binding later) never get the same one.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Picks `n` free TCP ports on 127.0.0.1 in 20000..32000 (below the usual ephemeral range, so
/// they do not collide with ports the kernel hands out for `:0` binds), never returning a port
/// twice in one process.
///
/// Errors: fewer than `n` free ports in the range.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    let mut port = 20000 + (seed % 12000) as u16;
    let mut out = Vec::new();
    for _ in 0..12000 {
        port = if port >= 31999 { 20000 } else { port + 1 };
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            out.push(port);
            if out.len() == n {
                return Ok(out);
            }
        }
    }
    bail!("could not find {n} free TCP ports in 20000..32000")
}

/// One free TCP port on 127.0.0.1 (see [`free_ports`]).
///
/// Errors: no free port in the range.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}

/// A `redis-server` on a free 127.0.0.1 port in its own directory, without persistence
/// (`--save '' --appendonly no`), logging to `dir/redis.log`. SIGKILLed and reaped on drop.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `bin` (e.g. `redis-server`) in `dir` (created) with `extra` arguments appended
    /// (e.g. `--dbfilename dump.rdb` to load a snapshot, `--tls-port ...`). Returns at once:
    /// see [`RedisServer::wait_ready`].
    ///
    /// Errors: `dir` cannot be created, or the binary cannot be spawned.
    pub fn spawn(bin: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", "", "--appendonly", "no"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install it: apt-get install redis-server)",
                    bin.display()
                )
            })?;
        Ok(RedisServer {
            child: Some(child),
            port,
            dir: dir.to_path_buf(),
        })
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits until the server answers PING with PONG (so a dataset it loads at start-up is
    /// loaded), polling every 50 ms for up to `timeout`.
    ///
    /// Errors: the server exited (the tail of its log is in the error, e.g. a refused RDB) or
    /// did not answer within `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("redis-server exited ({st}): {}", self.log_tail(5));
                }
            }
            if ping(&self.addr()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer PING within {timeout:?}: {}",
                    self.log_tail(5)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A connection, waiting up to 10 s for PING to answer.
    ///
    /// Errors: not up in time.
    pub async fn con(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        redis_con(&self.addr(), Duration::from_secs(10)).await
    }

    /// The last `n` lines of its log, joined with ` | `.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join(" | ")
    }

    /// SIGKILLs the server and reaps it (a machine loss); a no-op the second time.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One connection attempt to the plaintext Redis at `addr`, checked with PING.
async fn ping(addr: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let pong: String = redis::cmd("PING").query_async(&mut c).await?;
    if pong != "PONG" {
        return Err(redis::RedisError::from((
            redis::ErrorKind::ResponseError,
            "PING did not answer PONG",
        )));
    }
    Ok(c)
}

/// A connection to the plaintext Redis at `addr` that answers PING, retried every 50 ms until
/// `wait` passes.
///
/// Errors: not reachable in time (the last connection error).
pub async fn redis_con(
    addr: &str,
    wait: Duration,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let deadline = Instant::now() + wait;
    loop {
        match ping(addr).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!("redis {addr} not up"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `bin_dir/prog` (a PostgreSQL tool: `initdb`, `pg_ctl`, ...), run as the OS user `owner`
/// through `runuser -u OWNER --` when given (PostgreSQL refuses to run as root), in `/`, with
/// stdin null. For tokio, wrap it: `tokio::process::Command::from(..)`.
pub fn pg_command(bin_dir: &Path, prog: &str, owner: Option<&str>) -> Command {
    let bin = bin_dir.join(prog);
    let mut c = match owner {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(u).arg("--").arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.current_dir("/").stdin(Stdio::null());
    c
}

/// Runs `c` to completion; its trimmed stdout.
///
/// Errors: the command cannot start, or exits unsuccessfully (its status, stdout and stderr
/// are in the error, prefixed with `what`).
pub fn run_checked(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let a = free_ports(20).unwrap();
        let b: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        let all: HashSet<u16> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 40);
        assert!(all.iter().all(|p| (20000..32000).contains(p)));
    }

    #[test]
    fn pg_command_runs_as_owner() {
        let c = pg_command(
            Path::new("/usr/lib/postgresql/15/bin"),
            "pg_ctl",
            Some("postgres"),
        );
        assert_eq!(c.get_program(), "runuser");
        let args: Vec<_> = c.get_args().collect();
        assert_eq!(
            args,
            ["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl"]
        );
        let c = pg_command(Path::new("/b"), "initdb", None);
        assert_eq!(c.get_program(), "/b/initdb");
    }
}
