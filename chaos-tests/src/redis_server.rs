//! A real `redis-server` for tests: started on a free 127.0.0.1 port in its own directory,
//! killed and reaped on drop, with small command helpers.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_cli::harness::free_port;

/// A redis-server on a free 127.0.0.1 port in its own dir; killed and reaped on drop.
pub struct Redis {
    /// The process.
    pub child: Child,
    /// Its port.
    pub port: u16,
}

impl Redis {
    /// Starts one with the test defaults (no persistence, diskless sync without delay).
    ///
    /// Errors: spawn failure.
    pub fn start(dir: &Path) -> anyhow::Result<Redis> {
        Redis::start_with(dir, &[])
    }

    /// Starts one with extra arguments.
    ///
    /// Errors: spawn failure.
    pub fn start_with(dir: &Path, extra: &[&str]) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
            ])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start redis-server (install it: apt-get install redis-server)")?;
        Ok(Redis { child, port })
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A connection, waiting up to 10 s for the server to answer PING.
    ///
    /// Errors: not up in time.
    pub async fn con(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = async {
                let client = redis::Client::open(format!("redis://{}/", self.addr()))?;
                let mut c = client.get_multiplexed_async_connection().await?;
                let _: String = redis::cmd("PING").query_async(&mut c).await?;
                Ok::<_, redis::RedisError>(c)
            }
            .await;
            match c {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context(format!("redis {} not up", self.addr()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET (panics on a protocol error).
pub async fn get(c: &mut redis::aio::MultiplexedConnection, k: &str) -> Option<String> {
    redis::cmd("GET").arg(k).query_async(c).await.unwrap()
}

/// SET.
///
/// Errors: the server's refusal (e.g. READONLY).
pub async fn set(
    c: &mut redis::aio::MultiplexedConnection,
    k: &str,
    v: &str,
) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(k).arg(v).query_async(c).await
}

/// Polls until `k` has value `v` on `c` (replication is asynchronous).
pub async fn wait_value(
    c: &mut redis::aio::MultiplexedConnection,
    k: &str,
    v: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(c, k).await.as_deref() != Some(v) {
        anyhow::ensure!(Instant::now() < deadline, "{k} never became {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
