//! PostgreSQL role reconciliation for failover: [`apply_role`] makes a source a writable primary
//! in the active region and fences or re-points it elsewhere; [`health`] probes it.
//!
//! Fencing a former primary means stopping it (`pg_ctl stop -m fast`, needs `data_dir`).
//! Turning it into a standby of the new primary (`pg_rewind` against the new primary, then
//! `standby.signal` and a start) is a manual step for now (future work).

use anyhow::{anyhow, bail, Context};

use crate::sources::postgres::{connect, PostgresSourceConfig};
use crate::sources::DbHealth;

/// Makes `src` match the control record, idempotently, and returns one line describing what was
/// done (for the audit log):
///
/// - `my_region == active_region`: if the server is in recovery, `SELECT pg_promote(true, 60)`
///   (waits up to 60 s); a primary is left alone.
/// - otherwise, a primary (not in recovery) is fenced with `pg_ctl stop -D data_dir -m fast`
///   (run as `run_as`); a stopped server stays stopped; a standby is pointed at
///   `primary_by_region[active_region]` (`ALTER SYSTEM SET primary_conninfo`, reload) when that
///   entry exists and differs, else left alone.
///
/// Errors: the server is unreachable (and not a fenced, stopped server), the promotion fails
/// or times out, a primary must be fenced but `data_dir` is not configured, `pg_ctl` fails.
pub async fn apply_role(
    src: &PostgresSourceConfig,
    my_region: &str,
    active_region: &str,
    epoch: u64,
) -> anyhow::Result<String> {
    let name = &src.name;
    let active = my_region == active_region;
    let client = match connect(src).await {
        Ok(c) => c,
        Err(e) => {
            if !active && src.data_dir.is_some() && !server_running(src).await? {
                return Ok(format!(
                    "postgres {name}: epoch {epoch}: region {my_region} is standby (active {active_region}); server not running (fenced)"
                ));
            }
            bail!("postgres {name}: {e}");
        }
    };
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .context("pg_is_in_recovery()")?
        .get(0);
    if active {
        if !in_recovery {
            return Ok(format!(
                "postgres {name}: epoch {epoch}: already primary in active region {my_region}"
            ));
        }
        let ok: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .context("pg_promote()")?
            .get(0);
        if !ok {
            bail!("postgres {name}: pg_promote() did not finish within 60 s");
        }
        return Ok(format!(
            "postgres {name}: epoch {epoch}: promoted to primary in active region {my_region}"
        ));
    }
    if !in_recovery {
        let Some(dir) = &src.data_dir else {
            bail!(
                "postgres {name}: writable primary in standby region {my_region} (active {active_region}) cannot be fenced: no data_dir configured"
            );
        };
        drop(client);
        let mut cmd = src
            .tool("pg_ctl", true, false)
            .map_err(|e| anyhow!("postgres {name}: {e}"))?;
        let out = cmd
            .arg("stop")
            .arg("-D")
            .arg(dir)
            .args(["-m", "fast", "-w", "-t", "60"])
            .output()
            .await
            .context("run pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "postgres {name}: pg_ctl stop failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        return Ok(format!(
            "postgres {name}: epoch {epoch}: fenced former primary in standby region {my_region} (pg_ctl stop -m fast; pg_rewind and rejoin as standby are manual)"
        ));
    }
    let Some(addr) = src.primary_by_region.get(active_region) else {
        return Ok(format!(
            "postgres {name}: epoch {epoch}: standby in region {my_region}; left as is"
        ));
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("primary_by_region.{active_region} {addr:?} is not host:port"))?;
    let user = src.replication_user.as_deref().unwrap_or(&src.user);
    let current: String = client
        .query_one("SHOW primary_conninfo", &[])
        .await
        .context("SHOW primary_conninfo")?
        .get(0);
    let has = |k: &str, v: &str| {
        current
            .split_whitespace()
            .any(|kv| kv == format!("{k}={v}"))
    };
    if has("host", host) && has("port", port) && has("user", user) {
        return Ok(format!(
            "postgres {name}: epoch {epoch}: standby already following {addr}"
        ));
    }
    let conninfo = format!("host={host} port={port} user={user} application_name={name}");
    let quoted = conninfo.replace('\'', "''");
    client
        .batch_execute(&format!("ALTER SYSTEM SET primary_conninfo = '{quoted}'"))
        .await
        .context("ALTER SYSTEM SET primary_conninfo")?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .context("pg_reload_conf()")?;
    Ok(format!(
        "postgres {name}: epoch {epoch}: standby re-pointed to {addr} (active region {active_region})"
    ))
}

/// `pg_ctl status -D data_dir`: true when a server runs there.
async fn server_running(src: &PostgresSourceConfig) -> anyhow::Result<bool> {
    let Some(dir) = &src.data_dir else {
        return Ok(false);
    };
    let mut cmd = src
        .tool("pg_ctl", true, false)
        .map_err(|e| anyhow!("postgres {}: {e}", src.name))?;
    let st = cmd
        .arg("status")
        .arg("-D")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .context("run pg_ctl status")?;
    // 3: not running; 4: no accessible data directory.
    Ok(st.success())
}

/// Probes `src`: connects, asks `pg_is_in_recovery()` and, for a replica, the receive/replay lag
/// (`pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())`, bytes). Never fails:
/// a connection or query error gives `healthy: false`, role `"unknown"` and the error as detail.
pub async fn health(src: &PostgresSourceConfig) -> DbHealth {
    match probe(src).await {
        Ok(h) => h,
        Err(e) => DbHealth {
            healthy: false,
            role: "unknown".into(),
            detail: e,
            lag_bytes: None,
        },
    }
}

async fn probe(src: &PostgresSourceConfig) -> Result<DbHealth, String> {
    let client = connect(src).await?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version'), \
             pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::float8, \
             pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .map_err(|e| format!("health query: {e}"))?;
    let in_recovery: bool = row.get(0);
    let version: String = row.get(1);
    let lag: Option<f64> = row.get(2);
    let replay: Option<String> = row.get(3);
    Ok(if in_recovery {
        DbHealth {
            healthy: true,
            role: "replica".into(),
            detail: format!(
                "postgres {version}, in recovery, replayed up to {}",
                replay.as_deref().unwrap_or("?")
            ),
            lag_bytes: lag.map(|l| l.max(0.0) as u64),
        }
    } else {
        DbHealth {
            healthy: true,
            role: "primary".into(),
            detail: format!("postgres {version}, accepting writes"),
            lag_bytes: None,
        }
    })
}
