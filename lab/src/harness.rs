//! A local cluster of real processes on 127.0.0.1 (or on a site address inside a network
//! namespace, see [`crate::netns`]): N coordinators and agents started from the binaries next
//! to the current executable (or in `LIFEBOAT_BIN_DIR`), each with a written TOML config, a log
//! file and a certificate from a throwaway CA. Children are killed when the
//! [`Cluster`] is dropped and (through `PR_SET_PDEATHSIG`) when this process dies.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use lifeboat_proto::StatusRequest;

use lifeboat_client::conn::{admin_client, ConnArgs};
use lifeboat_restore::servers::{free_port, free_ports};

/// Options of a test or demo cluster.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Number of coordinators (3 or 5).
    pub coordinators: usize,
    /// `raft.snapshot_logs_since_last`.
    pub snapshot_logs: u64,
    /// `raft.max_logs_kept_after_snapshot`.
    pub logs_kept: u64,
    /// Extra TOML appended to every coordinator config (e.g. a `[blobs]` or `[replication]`
    /// section).
    pub extra_coordinator_toml: String,
    /// Region name written into coordinator and agent configs (default `local`).
    pub region: String,
    /// Certificates directory of another cluster whose CA (`ca.pem`, `ca.key`) this one reuses,
    /// so that the two clusters (e.g. an active and a standby region) trust each other. `None`:
    /// a fresh CA.
    pub ca_from: Option<PathBuf>,
    /// Node id of the first coordinator (the others follow); ids must be unique across the
    /// regions of a global group (default 1).
    pub first_id: u64,
    /// Ports to listen on (one per coordinator), e.g. allocated up front so that a `[global]`
    /// section can name every node. `None`: free ports.
    pub ports: Option<Vec<u16>>,
    /// Write `witness = true` (a global group's witness).
    pub witness: bool,
    /// Address the coordinators listen on (default `127.0.0.1`; a site address of a
    /// [`crate::netns::Netns`]).
    pub host: String,
    /// Network namespace every coordinator and agent of this cluster runs in
    /// (`ip netns exec`); `None`: the caller's namespace.
    pub netns: Option<String>,
    /// Give every coordinator a `/metrics` listener (`metrics_addr` on `host` and a free port).
    pub metrics: bool,
    /// Encryption at rest (default on): a master key file `<dir>/master.key` is generated
    /// (`lifeboat keys init`) and every coordinator config gets `[encryption] master_key_file`.
    /// Off: plaintext stores (for tests that read the stored LBB1 form directly).
    pub encryption: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            coordinators: 3,
            snapshot_logs: 1000,
            logs_kept: 100,
            extra_coordinator_toml: String::new(),
            region: "local".into(),
            ca_from: None,
            first_id: 1,
            ports: None,
            witness: false,
            host: "127.0.0.1".into(),
            netns: None,
            metrics: false,
            encryption: true,
        }
    }
}

/// One coordinator process.
pub struct CoordProc {
    /// Node id (1-based).
    pub id: u64,
    /// `host:port`.
    pub addr: String,
    /// Its config file.
    pub config: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// `host:port` of its `/metrics` listener, if any (see [`ClusterOpts::metrics`]).
    pub metrics_addr: Option<String>,
    /// The running process, if started.
    pub child: Option<Child>,
}

/// A running local cluster.
pub struct Cluster {
    /// Working directory of the cluster.
    pub dir: PathBuf,
    /// Certificates directory (`ca.pem`, `coordN`, `agent*`, `admin`).
    pub certs: PathBuf,
    /// Coordinators.
    pub coords: Vec<CoordProc>,
    /// Agents started with [`Cluster::start_agent`].
    pub agents: Vec<Child>,
    /// Region name of its coordinators and agents.
    pub region: String,
    /// Address its coordinators listen on.
    pub host: String,
    /// Network namespace of its processes, if any.
    pub netns: Option<String>,
    /// The master key file of its coordinators' encrypted stores (`None`: plaintext).
    pub master_key: Option<PathBuf>,
    bin_dir: PathBuf,
}

/// The `[encryption]` section naming `key` (empty without a key).
fn encryption_toml(key: Option<&Path>) -> String {
    key.map(|k| format!("\n[encryption]\nmaster_key_file = \"{}\"\n", k.display()))
        .unwrap_or_default()
}

pub use lifeboat_common::authz::{Role, ANY_REGION};

/// Issues `<certs>/<name>.pem|key` for `role` in `region` (see [`lifeboat_common::authz`]),
/// signed by the CA in `certs`.
///
/// Errors: a bad name or region, certificate generation or I/O failures.
pub fn issue(certs: &Path, role: Role, region: &str, name: &str) -> anyhow::Result<()> {
    let id = lifeboat_common::authz::PeerIdentity::new(role, region, name)?;
    lifeboat_common::tls::issue_cert(certs, &id, &[])?;
    Ok(())
}

/// Directory holding `lifeboat-coordinator` and `lifeboat-agent`.
///
/// Errors: when the binaries cannot be found (build them with `cargo build --release`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(d) = std::env::var("LIFEBOAT_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d.join("lifeboat-coordinator").exists() && d.join("lifeboat-agent").exists() {
            return Ok(d);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!("lifeboat-coordinator and lifeboat-agent not found next to {}; run `cargo build --release --workspace --bins` or set LIFEBOAT_BIN_DIR", exe.display())
}

/// Spawns `cmd` with stdout/stderr appended to `log`, killed if this process dies.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdout(Stdio::from(f.try_clone()?))
        .stderr(Stdio::from(f))
        .stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; this runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("spawn {:?}", cmd.get_program()))
}

impl Cluster {
    /// Writes certificates and configs under `dir` and starts every coordinator.
    ///
    /// Errors: certificate, config or spawn failures.
    pub fn start(dir: &Path, opts: &ClusterOpts) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let certs = dir.join("certs");
        if let Some(from) = &opts.ca_from {
            std::fs::create_dir_all(&certs)?;
            for f in ["ca.pem", "ca.key"] {
                std::fs::copy(from.join(f), certs.join(f))
                    .with_context(|| format!("copy {} from {}", f, from.display()))?;
            }
        }
        lifeboat_common::tls::init_dev_ca(&certs)?;
        issue(&certs, Role::Admin, ANY_REGION, "admin")?;
        let n = opts.coordinators;
        let ports: Vec<u16> = match &opts.ports {
            Some(p) if p.len() == n => p.clone(),
            Some(p) => anyhow::bail!("{} ports for {n} coordinators", p.len()),
            None => free_ports(n)?,
        };
        let master_key = if opts.encryption {
            let k = dir.join("master.key");
            if !k.exists() {
                lifeboat_common::keys::write_new_master_key(&k)
                    .with_context(|| format!("write {}", k.display()))?;
            }
            Some(k)
        } else {
            None
        };
        let first = opts.first_id.max(1);
        let members: String = (0..n)
            .map(|i| {
                format!(
                    "[[members]]\nid = {}\naddr = \"{}:{}\"\n",
                    first + i as u64,
                    opts.host,
                    ports[i]
                )
            })
            .collect();
        let mut coords = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let id = first + i as u64;
            let name = format!("coord{id}");
            let role = if opts.witness {
                Role::Witness
            } else {
                Role::Coordinator
            };
            issue(&certs, role, &opts.region, &name)?;
            let data_dir = dir.join(&name);
            let config = dir.join(format!("{name}.toml"));
            let metrics_addr = match opts.metrics {
                true => Some(format!("{}:{}", opts.host, free_port()?)),
                false => None,
            };
            let toml = format!(
                "node_id = {id}\nregion = \"{region}\"\n{metrics}{witness}listen = \"{host}:{port}\"\ndata_dir = \"{data}\"\n{members}\n[raft]\nsnapshot_logs_since_last = {snap}\nmax_logs_kept_after_snapshot = {kept}\n\n[tls]\nca = \"{certs}/ca.pem\"\ncert = \"{certs}/{name}.pem\"\nkey = \"{certs}/{name}.key\"\n{encryption}{extra}\n",
                encryption = encryption_toml(master_key.as_deref()),
                port = port,
                host = opts.host,
                region = opts.region,
                data = data_dir.display(),
                snap = opts.snapshot_logs,
                kept = opts.logs_kept,
                certs = certs.display(),
                extra = opts.extra_coordinator_toml,
                witness = if opts.witness { "witness = true\n" } else { "" },
                metrics = metrics_addr
                    .as_ref()
                    .map(|a| format!("metrics_addr = \"{a}\"\n"))
                    .unwrap_or_default(),
            );
            std::fs::write(&config, toml)?;
            coords.push(CoordProc {
                id,
                addr: format!("{}:{port}", opts.host),
                config,
                log: dir.join(format!("{name}.log")),
                data_dir,
                metrics_addr,
                child: None,
            });
        }
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            certs,
            coords,
            agents: Vec::new(),
            region: opts.region.clone(),
            host: opts.host.clone(),
            netns: opts.netns.clone(),
            master_key,
            bin_dir: bin_dir()?,
        };
        for i in 0..n {
            c.start_coordinator(i)?;
        }
        Ok(c)
    }

    /// Writes the config of one more coordinator (next node id, empty `members`: it waits to be
    /// added with `AddMember`) and starts it. Returns its index.
    ///
    /// Errors: certificate, config or spawn failures.
    pub fn add_coordinator(&mut self) -> anyhow::Result<usize> {
        let id = self.coords.iter().map(|c| c.id).max().unwrap_or(0) + 1;
        let name = format!("coord{id}");
        issue(&self.certs, Role::Coordinator, &self.region, &name)?;
        let port = free_port()?;
        let data_dir = self.dir.join(&name);
        let config = self.dir.join(format!("{name}.toml"));
        let toml = format!(
            "node_id = {id}\nregion = \"{region}\"\nlisten = \"{host}:{port}\"\ndata_dir = \"{data}\"\n\n[tls]\nca = \"{certs}/ca.pem\"\ncert = \"{certs}/{name}.pem\"\nkey = \"{certs}/{name}.key\"\n{encryption}",
            encryption = encryption_toml(self.master_key.as_deref()),
            region = self.region,
            host = self.host,
            data = data_dir.display(),
            certs = self.certs.display(),
        );
        std::fs::write(&config, toml)?;
        self.coords.push(CoordProc {
            id,
            addr: format!("{}:{port}", self.host),
            config,
            log: self.dir.join(format!("{name}.log")),
            data_dir,
            metrics_addr: None,
            child: None,
        });
        let i = self.coords.len() - 1;
        self.start_coordinator(i)?;
        Ok(i)
    }

    /// Starts (or restarts) coordinator at index `i` (node id `i + 1`).
    ///
    /// Errors: spawn failure.
    pub fn start_coordinator(&mut self, i: usize) -> anyhow::Result<()> {
        let mut cmd = self.command(self.bin_dir.join("lifeboat-coordinator"));
        let c = &mut self.coords[i];
        cmd.arg("--config").arg(&c.config);
        c.child = Some(spawn_logged(cmd, &c.log)?);
        Ok(())
    }

    /// A command running `program` where this cluster's processes run (its network namespace,
    /// if any).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match &self.netns {
            Some(ns) => crate::netns::netns_command(ns, program),
            None => Command::new(program),
        }
    }

    /// SIGKILLs coordinator at index `i` and reaps it.
    pub fn kill_coordinator(&mut self, i: usize) {
        if let Some(mut ch) = self.coords[i].child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }

    /// How many coordinators of this cluster hold blob `hash` in their local blob store
    /// (`<data_dir>/blobs/blobs/<2 hex>/<hex>`); 0 with the S3 backend.
    pub fn local_blob_copies(&self, hash: &lifeboat_common::blob::BlobHash) -> usize {
        self.coords
            .iter()
            .filter(|c| c.data_dir.join("blobs").join(hash.key()).exists())
            .count()
    }

    /// Connection arguments for the admin API (admin certificate, every coordinator).
    pub fn conn(&self) -> ConnArgs {
        ConnArgs {
            coordinators: self.coords.iter().map(|c| c.addr.clone()).collect(),
            tls_dir: Some(self.certs.clone()),
            ca: None,
            cert: None,
            key: None,
            insecure: false,
        }
    }

    /// Addresses of every coordinator (running or not), e.g. for another region's
    /// `[replication] upstream`.
    pub fn addrs(&self) -> Vec<String> {
        self.coords.iter().map(|c| c.addr.clone()).collect()
    }

    /// Index of the coordinator with node id `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.coords.iter().position(|c| c.id == id)
    }

    /// Status reply of coordinator `i`, if it answers within 1 s.
    pub async fn status_of(&self, i: usize) -> Option<lifeboat_proto::StatusReply> {
        let conn = self.conn();
        let ch = conn.channel(&self.coords[i].addr).ok()?;
        let mut c = admin_client(ch);
        tokio::time::timeout(Duration::from_secs(1), c.status(StatusRequest {}))
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits until a running coordinator (other than `not`) first reports itself leader; returns
    /// its id. Fast (for measuring leader-change time), but openraft may still hand leadership to
    /// a higher node id in the same term: use [`Cluster::wait_leader`] before acting on it.
    ///
    /// Errors: no leader within `timeout`.
    pub async fn wait_first_leader(
        &self,
        timeout: Duration,
        not: Option<u64>,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for i in 0..self.coords.len() {
                if self.coords[i].child.is_none() {
                    continue;
                }
                if let Some(s) = self.status_of(i).await {
                    if s.leader_id == s.node_id && Some(s.node_id) != not && s.state == "Leader" {
                        return Ok(s.node_id);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader elected within {timeout:?}; see the logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until every running coordinator answers and names the same leader (other than
    /// `not`), which reports itself `Leader`, twice 300 ms apart; returns its id.
    ///
    /// Errors: no settled leader within `timeout`.
    pub async fn wait_leader(&self, timeout: Duration, not: Option<u64>) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        let mut prev: Option<u64> = None;
        loop {
            let mut views = Vec::new();
            for i in 0..self.coords.len() {
                if self.coords[i].child.is_some() {
                    views.push(self.status_of(i).await);
                }
            }
            let agreed = match views.first() {
                Some(Some(first)) if first.leader_id != 0 && Some(first.leader_id) != not => {
                    let l = first.leader_id;
                    let all = views
                        .iter()
                        .all(|v| matches!(v, Some(s) if s.leader_id == l));
                    let leads = views
                        .iter()
                        .any(|v| matches!(v, Some(s) if s.node_id == l && s.state == "Leader"));
                    (all && leads).then_some(l)
                }
                _ => None,
            };
            match (agreed, prev) {
                (Some(l), Some(p)) if l == p => return Ok(l),
                _ => prev = agreed,
            }
            if Instant::now() > deadline {
                bail!(
                    "coordinators did not agree on a leader within {timeout:?}; see the logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(if agreed.is_some() {
                300
            } else {
                50
            }))
            .await;
        }
    }

    /// Writes an agent config protecting `roots` (name, path) and returns (config path, data dir).
    ///
    /// Errors: certificate or I/O failures.
    pub fn write_agent_config(
        &self,
        agent_id: &str,
        roots: &[(&str, &Path)],
        extra: &str,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        issue(&self.certs, Role::Agent, &self.region, agent_id)?;
        let data = self.dir.join(agent_id);
        let coordinators: Vec<String> = self
            .coords
            .iter()
            .map(|c| format!("\"{}\"", c.addr))
            .collect();
        let mut toml = format!(
            "agent_id = \"{agent_id}\"\nregion = \"{}\"\ndata_dir = \"{}\"\ncoordinators = [{}]\n{extra}\n",
            self.region,
            data.display(),
            coordinators.join(", ")
        );
        for (name, path) in roots {
            toml += &format!(
                "[[paths]]\nname = \"{name}\"\npath = \"{}\"\n",
                path.display()
            );
        }
        toml += &format!(
            "[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{agent_id}.pem\"\nkey = \"{c}/{agent_id}.key\"\n",
            c = self.certs.display()
        );
        let cfg = self.dir.join(format!("{agent_id}.toml"));
        std::fs::write(&cfg, toml)?;
        Ok((cfg, data))
    }

    /// Starts an agent with `config`; `once` makes it exit after everything is acknowledged.
    ///
    /// Errors: spawn failure.
    pub fn spawn_agent(&self, config: &Path, once: bool) -> anyhow::Result<Child> {
        let mut cmd = self.command(self.bin_dir.join("lifeboat-agent"));
        cmd.arg("--config").arg(config);
        if once {
            cmd.arg("--once");
        }
        let log = config.with_extension("log");
        spawn_logged(cmd, &log)
    }

    /// Starts a long-running agent owned by the cluster (killed on drop).
    ///
    /// Errors: spawn failure.
    pub fn start_agent(&mut self, config: &Path) -> anyhow::Result<()> {
        let ch = self.spawn_agent(config, false)?;
        self.agents.push(ch);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        for i in 0..self.coords.len() {
            self.kill_coordinator(i);
        }
    }
}

/// The agent's `status.json` in `data_dir`, if present and readable.
pub fn agent_status(data_dir: &Path) -> Option<serde_json::Value> {
    let s = std::fs::read(data_dir.join("status.json")).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Waits until the agent in `data_dir` reports idle (scan complete, nothing pending, nothing in
/// flight) and has seen no file event for `quiet`, counted from the later of its last event and
/// the start of this wait. `quiet` must exceed the agent's debounce time (so changes made just
/// before the call are noticed first). Returns the status.
///
/// Errors: not idle within `timeout`.
pub async fn wait_agent_idle(
    data_dir: &Path,
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let started_ms = lifeboat_common::now_ms();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = agent_status(data_dir) {
            let idle = s["idle"].as_bool() == Some(true)
                && s["pending_changes"].as_u64() == Some(0)
                && s["scan_complete"].as_bool() == Some(true);
            let last_event = s["last_event_ms"].as_i64().unwrap_or(0).max(started_ms);
            let quiet_enough = lifeboat_common::now_ms() - last_event >= quiet.as_millis() as i64;
            if idle && quiet_enough {
                return Ok(s);
            }
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "agent in {} not idle within {timeout:?}; last status: {:?}",
                data_dir.display(),
                agent_status(data_dir)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
