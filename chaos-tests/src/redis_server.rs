//! A real `redis-server` for tests ([`start_redis`] from the lab: a free 127.0.0.1 port, its own
//! directory, killed and reaped on drop), with small command helpers.

use std::time::{Duration, Instant};

pub use lifeboat_lab::dbservers::{start_redis, RedisServer};

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
