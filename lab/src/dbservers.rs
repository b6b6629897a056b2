//! Real Redis and PostgreSQL servers on loopback for `lifeboat demo --with-databases`,
//! `bench-failover --with-databases` and the tests: a `redis-server` per region, a PostgreSQL
//! primary and a streaming standby made from its base backup (`pg_basebackup -R`). PostgreSQL
//! refuses to run as root: when the demo runs as root every server command goes through
//! `runuser -u postgres --` and the data directories belong to `postgres`.
//!
//! The processes themselves (free ports, `redis-server`, PostgreSQL tools as their user) are the
//! restore engine's [`lifeboat_restore::servers`]: one launcher of each in the workspace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use lifeboat_restore::servers::{free_port, pg_command, run_checked};

pub use lifeboat_restore::servers::{redis_con, RedisServer};

/// Whether `prog` is an executable on `PATH`.
fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .any(|d| std::fs::metadata(d.join(prog)).is_ok_and(|m| m.is_file()))
    })
}

/// Which database binaries are installed: `redis-server` on `PATH`, and the newest
/// `/usr/lib/postgresql/*/bin` holding `initdb`, `pg_ctl` and `pg_basebackup` (run as user
/// `postgres` when this process is root; that user must then exist).
#[derive(Debug, Clone, Default)]
pub struct DbBinaries {
    /// `redis-server` found.
    pub redis: bool,
    /// PostgreSQL binary directory found.
    pub pg_bin: Option<PathBuf>,
    /// What is missing, in words (empty when both are present).
    pub missing: Vec<String>,
}

impl DbBinaries {
    /// Looks for both.
    pub fn find() -> DbBinaries {
        let redis = on_path("redis-server");
        let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| {
                ["initdb", "pg_ctl", "pg_basebackup"]
                    .iter()
                    .all(|p| b.join(p).is_file())
            })
            .collect();
        bins.sort_by_key(|b| {
            b.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let mut pg_bin = bins.pop();
        let mut missing = Vec::new();
        if !redis {
            missing.push("redis-server not on PATH (apt-get install redis-server)".into());
        }
        if pg_bin.is_some() && is_root() && !user_exists("postgres") {
            missing.push("running as root but there is no user postgres to run PostgreSQL".into());
            pg_bin = None;
        } else if pg_bin.is_none() {
            missing.push(
                "no PostgreSQL binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)"
                    .into(),
            );
        }
        DbBinaries {
            redis,
            pg_bin,
            missing,
        }
    }

    /// Both are present.
    pub fn complete(&self) -> bool {
        self.redis && self.pg_bin.is_some()
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn user_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
}

/// The OS user PostgreSQL server commands run as (`postgres` when this process is root).
pub fn pg_run_as() -> Option<String> {
    is_root().then(|| "postgres".to_string())
}

/// Starts a `redis-server` (from `PATH`) on a free 127.0.0.1 port in `dir` (created): no
/// persistence, diskless replication without delay, `extra` arguments appended (e.g.
/// `--requirepass`, `--tls-port`). Returns at once; [`RedisServer::con`] waits for it.
///
/// Errors: spawn failure (e.g. redis-server not installed).
pub fn start_redis(dir: &Path, extra: &[&str]) -> anyhow::Result<RedisServer> {
    let args = [&["--repl-diskless-sync-delay", "0"][..], extra].concat();
    RedisServer::spawn(Path::new("redis-server"), dir, &args)
}

/// `ROLE` of a Redis: `"master"`, `"slave"` (with the link state appended, e.g.
/// `"slave connected"`), or the error.
pub async fn redis_role(c: &mut redis::aio::MultiplexedConnection) -> String {
    let v: redis::RedisResult<redis::Value> = redis::cmd("ROLE").query_async(c).await;
    match v {
        Ok(redis::Value::Array(items)) => {
            let s = |i: usize| match items.get(i) {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                _ => String::new(),
            };
            if s(0) == "slave" {
                format!("slave {}", s(3))
            } else {
                s(0)
            }
        }
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("error: {e}"),
    }
}

/// A PostgreSQL server on 127.0.0.1 (trust authentication for local connections, user
/// `postgres`), run as [`pg_run_as`]. Stopped with `pg_ctl stop -m immediate` on drop.
pub struct PgServer {
    /// Binary directory.
    pub bin: PathBuf,
    /// Data directory.
    pub data: PathBuf,
    /// Port.
    pub port: u16,
    /// Name standbys use as `application_name` (what `synchronous_standby_names` refers to).
    pub name: String,
}

impl PgServer {
    fn tool(bin: &Path, prog: &str) -> Command {
        pg_command(bin, prog, pg_run_as().as_deref())
    }

    /// A directory under `parent` the server user owns (and can reach: `parent` becomes 0711).
    ///
    /// Errors: I/O or chown failures.
    pub fn workdir(parent: &Path) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(parent)?;
        if pg_run_as().is_some() {
            let m = std::fs::metadata(parent)?.permissions().mode();
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(m | 0o011))?;
            for up in parent.ancestors().skip(1) {
                let m = std::fs::metadata(up)?.permissions().mode();
                if m & 0o001 == 0 {
                    bail!(
                        "PostgreSQL runs as user postgres and cannot reach {} ({} is mode {:o}): use a work directory under /tmp",
                        parent.display(),
                        up.display(),
                        m & 0o7777
                    );
                }
            }
        }
        let d = parent.join("pg");
        std::fs::create_dir_all(&d)?;
        chown_to_server_user(&d)?;
        Ok(d)
    }

    /// `initdb` a new primary in `data` (inside a [`PgServer::workdir`]) and start it on a free
    /// port with `wal_level = replica` and replication connections allowed from 127.0.0.1.
    ///
    /// Errors: initdb or start failures (with the server log).
    pub fn init_primary(bin: &Path, data: &Path, name: &str) -> anyhow::Result<PgServer> {
        let mut c = Self::tool(bin, "initdb");
        c.arg("-D")
            .arg(data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"]);
        run_checked(c, "initdb")?;
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str("\nhost replication all 127.0.0.1/32 trust\n");
        std::fs::write(&hba, text)?;
        Self::start_existing(bin, data, name)
    }

    /// A streaming standby of `primary` in `data`: `pg_basebackup -R -X stream -c fast`, its
    /// `application_name` set to `name`, started on a free port.
    ///
    /// Errors: base backup or start failures.
    pub fn standby_of(primary: &PgServer, data: &Path, name: &str) -> anyhow::Result<PgServer> {
        let mut c = Self::tool(&primary.bin, "pg_basebackup");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(data)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run_checked(c, "pg_basebackup")?;
        // `-R` wrote primary_conninfo; name this standby for synchronous_standby_names.
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto)?;
        text = text
            .lines()
            .map(|l| {
                if l.starts_with("primary_conninfo = '") {
                    l.replacen(
                        "primary_conninfo = '",
                        &format!("primary_conninfo = 'application_name={name} "),
                        1,
                    )
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        std::fs::write(&auto, text)?;
        Self::start_existing(&primary.bin, data, name)
    }

    /// Starts the existing data directory `data` (e.g. a restored one; inside a
    /// [`PgServer::workdir`]) on a free port.
    ///
    /// Errors: pg_ctl start failing (the server log is in the error).
    pub fn start_existing(bin: &Path, data: &Path, name: &str) -> anyhow::Result<PgServer> {
        let s = PgServer {
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
            port: free_port()?,
            name: name.into(),
        };
        s.launch()?;
        Ok(s)
    }

    /// `pg_ctl start` with the lab's settings: loopback only, socket in the data directory's
    /// parent, `wal_level = replica`, `fsync = off`, no archiving.
    fn launch(&self) -> anyhow::Result<()> {
        let sock = self.data.parent().unwrap_or(Path::new("/tmp"));
        let mut c = Self::tool(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.with_extension("log"))
            .arg("-o")
            .arg(format!(
                "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=replica -c max_wal_senders=10 -c fsync=off -c archive_mode=off",
                self.port,
                sock.display()
            ))
            .args(["-w", "-t", "120", "start"]);
        if let Err(e) = run_checked(c, "pg_ctl start") {
            let log = std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default();
            bail!("{e}\nserver log:\n{log}");
        }
        Ok(())
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `sql` with `psql` (unaligned, tuples only, stop on error) as `postgres`; its
    /// trimmed output.
    ///
    /// Errors: the query failing (psql's output is in the error).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut c = Command::new(self.bin.join("psql"));
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-p"])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql);
        run_checked(c, &format!("psql {sql:?}"))
    }

    /// `pg_is_in_recovery()`: true on a standby (or a server still recovering).
    ///
    /// Errors: the query failing.
    pub fn in_recovery(&self) -> anyhow::Result<bool> {
        Ok(self.psql("SELECT pg_is_in_recovery()")? == "t")
    }

    /// A tokio-postgres connection as `postgres` (the connection task is spawned).
    ///
    /// Errors: connection failure.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        pg_client(self.port).await
    }

    /// SIGKILLs the postmaster (a machine loss; its backends exit when they notice).
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.data.join("postmaster.pid")) {
            if let Some(pid) = pid
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: plain kill(2) on a pid we started (through pg_ctl).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let mut c = Self::tool(&self.bin, "pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = c.status();
    }
}

/// `chown -R` of `p` to the user PostgreSQL runs as ([`pg_run_as`]); nothing when that is this
/// process's user.
///
/// Errors: chown failing.
pub fn chown_to_server_user(p: &Path) -> anyhow::Result<()> {
    if let Some(u) = pg_run_as() {
        let mut c = Command::new("chown");
        c.arg("-R").arg(format!("{u}:{u}")).arg(p);
        run_checked(c, "chown")?;
    }
    Ok(())
}

/// A tokio-postgres connection to 127.0.0.1:`port` as `postgres`, database `postgres`.
///
/// Errors: connection failure.
pub async fn pg_client(port: u16) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"),
        tokio_postgres::NoTls,
    )
    .await
    .with_context(|| format!("connect to postgres on port {port}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// What an agent manages in one region: its Redis and PostgreSQL, and where each region's
/// primaries run.
#[derive(Debug, Clone)]
pub struct AgentDbs {
    /// This region's Redis, `host:port`.
    pub redis_addr: String,
    /// Region → Redis `host:port` (`primary_by_region`).
    pub redis_by_region: Vec<(String, String)>,
    /// `min_replicas_to_write` of the Redis source (0: not managed).
    pub min_replicas_to_write: u32,
    /// This region's PostgreSQL, when there is one.
    pub pg: Option<(u16, PathBuf, PathBuf)>,
    /// Region → PostgreSQL `host:port`.
    pub pg_by_region: Vec<(String, String)>,
    /// Add `[[checks]]` of kind redis and postgres for both sources.
    pub checks: bool,
}

impl AgentDbs {
    /// The `[[redis_sources]]`, `[[postgres_sources]]` (and `[[checks]]`) TOML of an agent:
    /// sources `cache` and `db`, snapshots once a year (the failover is what is shown), no WAL
    /// archiving, fencing with `pg_ctl stop` as [`pg_run_as`].
    pub fn toml(&self) -> String {
        let map = |m: &[(String, String)]| {
            m.iter()
                .map(|(r, a)| format!("{r} = \"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut t = format!(
            "[[redis_sources]]\nname = \"cache\"\naddr = \"{}\"\nschedule = \"0 0 1 1 *\"\nprimary_by_region = {{ {} }}\nmin_replicas_to_write = {}\nmin_replicas_max_lag_s = 5\n",
            self.redis_addr,
            map(&self.redis_by_region),
            self.min_replicas_to_write
        );
        if let Some((port, data, bin)) = &self.pg {
            t += &format!(
                "[[postgres_sources]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\nbin_dir = \"{}\"\ndata_dir = \"{}\"\nbase_backup_schedule = \"0 0 1 1 *\"\nwal_archive = false\nprimary_by_region = {{ {} }}\n",
                bin.display(),
                data.display(),
                map(&self.pg_by_region)
            );
            if let Some(u) = pg_run_as() {
                t += &format!("run_as = \"{u}\"\n");
            }
        }
        if self.checks {
            t += "[[checks]]\nname = \"cache\"\nkind = \"redis\"\ntarget = \"cache\"\n";
            if self.pg.is_some() {
                t += "[[checks]]\nname = \"db\"\nkind = \"postgres\"\ntarget = \"db\"\n";
            }
        }
        t
    }
}
