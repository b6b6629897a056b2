//! A local multi-region deployment for tests and the demo: one [`Cluster`] of coordinators per
//! region plus a witness, all voters of one global group (`[global]` in every config), sharing
//! one dev CA.
//!
//! By default every process runs on 127.0.0.1. With [`RegionsOpts::netns`], each region and the
//! witness is a site of a [`Netns`] (its own network namespace and address), so that tests can
//! partition sites from each other ([`Regions::net`]); the test process reaches every site.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lifeboat_client::control;
use lifeboat_proto::{AuditEntry, GlobalStatusReply, RegionReport};

use crate::harness::{Cluster, ClusterOpts};
use crate::netns::Netns;
use lifeboat_client::conn::ConnArgs;
use lifeboat_restore::servers::{free_port, free_ports};

/// Site name of the witness when the deployment runs in network namespaces.
pub const WITNESS_SITE: &str = "witness";

/// Options of [`Regions::start`].
#[derive(Debug, Clone)]
pub struct RegionsOpts {
    /// Region names; the first is initially active.
    pub regions: Vec<String>,
    /// Coordinators per region.
    pub per_region: usize,
    /// Start a witness (a 7th voter in a third site for 2 x 3).
    pub witness: bool,
    /// TOML lines of `[global.policy]` (e.g. `min_failover_interval_ms = 0`).
    pub policy_toml: String,
    /// Extra `[global]` keys (e.g. `synchronous = false`).
    pub global_toml: String,
    /// Traffic hooks per region, as TOML `[[global.traffic_hooks]]` tables.
    pub hooks_toml: BTreeMap<String, String>,
    /// Run each region (its coordinators and agents) and the witness in a site of its own: a
    /// network namespace with its own address (needs root; see [`crate::netns`]). Sites are
    /// named after the regions, the witness's is [`WITNESS_SITE`].
    pub netns: bool,
    /// Give every coordinator and the witness a `/metrics` listener (see
    /// [`ClusterOpts::metrics`]).
    pub metrics: bool,
}

impl Default for RegionsOpts {
    fn default() -> Self {
        RegionsOpts {
            regions: vec!["a".into(), "b".into()],
            per_region: 3,
            witness: true,
            policy_toml: String::new(),
            global_toml: String::new(),
            hooks_toml: BTreeMap::new(),
            netns: false,
            metrics: false,
        }
    }
}

/// Running regions and witness.
pub struct Regions {
    /// Working directory.
    pub dir: PathBuf,
    /// Cluster of each region.
    pub regions: BTreeMap<String, Cluster>,
    /// The witness (a one-node cluster whose coordinator votes in the global group only).
    pub witness: Option<Cluster>,
    /// `[[global.members]]` tables of the founding voters.
    members_toml: String,
    /// The options the deployment started with.
    opts: RegionsOpts,
    /// Next unused node id.
    next_id: u64,
    /// The sites' network namespaces (with [`RegionsOpts::netns`]). Declared last: dropped after
    /// every process is killed.
    pub net: Option<Netns>,
}

impl Regions {
    /// Writes every config and starts every coordinator.
    ///
    /// Errors: config or spawn failures.
    pub fn start(dir: &Path, opts: &RegionsOpts) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let net = if opts.netns {
            let mut sites: Vec<&str> = opts.regions.iter().map(String::as_str).collect();
            sites.push(WITNESS_SITE);
            Some(Netns::create(&sites)?)
        } else {
            None
        };
        // (listen host, network namespace) of each site.
        let place = |site: &str| -> anyhow::Result<(String, Option<String>)> {
            match &net {
                Some(n) => {
                    let s = n.site(site)?;
                    Ok((s.addr.clone(), Some(s.netns.clone())))
                }
                None => Ok(("127.0.0.1".to_string(), None)),
            }
        };
        let n = opts.per_region;
        let mut plan: Vec<(String, u64, Vec<u16>)> = Vec::new();
        let mut next_id = 1u64;
        for r in &opts.regions {
            plan.push((r.clone(), next_id, free_ports(n)?));
            next_id += n as u64;
        }
        let witness_port = free_port()?;
        let witness_id = next_id;
        let mut members = String::new();
        for (r, first, ports) in &plan {
            let (host, _) = place(r)?;
            for (i, p) in ports.iter().enumerate() {
                members.push_str(&format!(
                    "[[global.members]]\nid = {}\naddr = \"{host}:{p}\"\nregion = \"{r}\"\n",
                    first + i as u64
                ));
            }
        }
        if opts.witness {
            let (host, _) = place(WITNESS_SITE)?;
            members.push_str(&format!(
                "[[global.members]]\nid = {witness_id}\naddr = \"{host}:{witness_port}\"\nregion = \"witness\"\nwitness = true\n"
            ));
        }
        let global = |hooks: &str| {
            format!(
                "\n[global]\ninitial_active = \"{}\"\n{}\n{members}\n[global.policy]\n{}\n{hooks}\n",
                opts.regions[0], opts.global_toml, opts.policy_toml
            )
        };
        let mut regions = BTreeMap::new();
        let mut ca: Option<PathBuf> = None;
        for (r, first, ports) in &plan {
            let (host, netns) = place(r)?;
            let c = Cluster::start(
                &dir.join(format!("region-{r}")),
                &ClusterOpts {
                    coordinators: n,
                    region: r.clone(),
                    first_id: *first,
                    ports: Some(ports.clone()),
                    ca_from: ca.clone(),
                    extra_coordinator_toml: global(
                        opts.hooks_toml.get(r).map(String::as_str).unwrap_or(""),
                    ),
                    host,
                    netns,
                    metrics: opts.metrics,
                    ..Default::default()
                },
            )?;
            ca.get_or_insert_with(|| c.certs.clone());
            regions.insert(r.clone(), c);
        }
        let witness = if opts.witness {
            let (host, netns) = place(WITNESS_SITE)?;
            Some(Cluster::start(
                &dir.join("witness"),
                &ClusterOpts {
                    coordinators: 1,
                    region: "witness".into(),
                    first_id: witness_id,
                    ports: Some(vec![witness_port]),
                    ca_from: ca.clone(),
                    extra_coordinator_toml: global(""),
                    witness: true,
                    host,
                    netns,
                    metrics: opts.metrics,
                    ..Default::default()
                },
            )?)
        } else {
            None
        };
        Ok(Regions {
            dir: dir.to_path_buf(),
            regions,
            witness,
            members_toml: members,
            opts: opts.clone(),
            next_id: witness_id + 1,
            net,
        })
    }

    /// Starts a witness that joins the running global group (`[global] join = true`; its config
    /// lists the founding voters plus itself) and returns its node id and address for
    /// `lifeboat topology add --witness`. It votes only once added.
    ///
    /// Errors: a witness already exists, or spawn failures.
    pub fn start_joining_witness(&mut self) -> anyhow::Result<(u64, String)> {
        anyhow::ensure!(self.witness.is_none(), "a witness is already running");
        let (id, port) = (self.next_id, free_port()?);
        self.next_id += 1;
        let addr = format!("127.0.0.1:{port}");
        let toml = format!(
            "\n[global]\ninitial_active = \"{}\"\njoin = true\n{}\n{}[[global.members]]\nid = {id}\naddr = \"{addr}\"\nregion = \"witness\"\nwitness = true\n\n[global.policy]\n{}\n",
            self.opts.regions[0], self.opts.global_toml, self.members_toml, self.opts.policy_toml
        );
        let ca = self.regions.values().next().map(|c| c.certs.clone());
        self.witness = Some(Cluster::start(
            &self.dir.join("witness"),
            &ClusterOpts {
                coordinators: 1,
                region: "witness".into(),
                first_id: id,
                ports: Some(vec![port]),
                ca_from: ca,
                extra_coordinator_toml: toml,
                witness: true,
                ..Default::default()
            },
        )?);
        Ok((id, addr))
    }

    /// The cluster of `region`.
    ///
    /// Panics if there is no such region (a test bug).
    pub fn region(&self, region: &str) -> &Cluster {
        &self.regions[region]
    }

    /// Mutable cluster of `region`.
    pub fn region_mut(&mut self, region: &str) -> &mut Cluster {
        self.regions.get_mut(region).expect("region")
    }

    /// Admin connection to every coordinator of every region and the witness.
    pub fn conn(&self) -> ConnArgs {
        let mut c = self.regions.values().next().expect("a region").conn();
        c.coordinators = self
            .regions
            .values()
            .chain(self.witness.iter())
            .flat_map(|c| c.addrs())
            .collect();
        c
    }

    /// SIGKILLs every coordinator and agent of `region`.
    pub fn kill_region(&mut self, region: &str) {
        let c = self.region_mut(region);
        for i in 0..c.coords.len() {
            c.kill_coordinator(i);
        }
        for a in c.agents.iter_mut() {
            let _ = a.kill();
            let _ = a.wait();
        }
        c.agents.clear();
    }

    /// Restarts every coordinator of `region`.
    ///
    /// Errors: spawn failures.
    pub fn start_region(&mut self, region: &str) -> anyhow::Result<()> {
        let c = self.region_mut(region);
        for i in 0..c.coords.len() {
            c.start_coordinator(i)?;
        }
        Ok(())
    }

    /// The sites' network namespaces.
    ///
    /// Panics when the regions were started without [`RegionsOpts::netns`] (a test bug).
    pub fn net(&self) -> &Netns {
        self.net
            .as_ref()
            .expect("regions started without RegionsOpts::netns")
    }

    /// Addresses of every coordinator of every region and the witness.
    pub fn all_addrs(&self) -> Vec<String> {
        self.conn().coordinators
    }

    /// Runs one `ControlService` call (`f`) on every address of `addrs` at once, each limited
    /// to `timeout`, and returns the first answer (a partitioned coordinator that cannot
    /// forward to the global leader does not hold the others up). `what` names the call in
    /// errors.
    ///
    /// Errors: no coordinator answered (each one's error).
    pub async fn control_on<R, F, Fut>(
        &self,
        addrs: &[String],
        what: &str,
        timeout: Duration,
        f: F,
    ) -> anyhow::Result<R>
    where
        F: Fn(ConnArgs) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<R>>,
    {
        let base = self.conn();
        let calls: Vec<_> = addrs
            .iter()
            .map(|a| {
                let mut conn = base.clone();
                conn.coordinators = vec![a.clone()];
                let call = f(conn);
                let a = a.clone();
                Box::pin(async move {
                    match tokio::time::timeout(timeout, call).await {
                        Ok(r) => r,
                        Err(_) => Err(anyhow::anyhow!("{what} to {a}: timed out")),
                    }
                })
            })
            .collect();
        anyhow::ensure!(!calls.is_empty(), "{what}: no address");
        Ok(futures::future::select_ok(calls).await?.0)
    }

    /// The global control status (`lifeboat status`'s global part), if a global leader answers.
    pub async fn control_status(&self) -> Option<GlobalStatusReply> {
        self.control_on(
            &self.all_addrs(),
            "status",
            Duration::from_secs(3),
            |c| async move { control::global_status(&c).await },
        )
        .await
        .ok()
    }

    /// The committed audit log (its last 1,000 entries) as the first of `addrs` answers it.
    ///
    /// Errors: no coordinator of `addrs` answered within `timeout`.
    pub async fn audit_on(
        &self,
        addrs: &[String],
        timeout: Duration,
    ) -> anyhow::Result<Vec<AuditEntry>> {
        self.control_on(addrs, "audit", timeout, |c| async move {
            control::audit(&c, 1000).await
        })
        .await
    }

    /// [`Regions::audit_on`] every coordinator, within 5 s.
    ///
    /// Errors: no coordinator answered.
    pub async fn audit(&self) -> anyhow::Result<Vec<AuditEntry>> {
        self.audit_on(&self.all_addrs(), Duration::from_secs(5))
            .await
    }

    /// Moves the global leader into `region`: while another node leads, that node is paused
    /// (SIGSTOP) until another one leads, then resumed (SIGCONT). Returns the new leader's
    /// node id. Tests use it to lose the active region together with the global leader, which
    /// a later global leader must handle without any report from it.
    ///
    /// Errors: no global leader answers, or the leader is not in `region` within `timeout`.
    pub async fn move_global_leader_to(
        &self,
        region: &str,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self
                .control_status()
                .await
                .map(|s| s.global_leader)
                .unwrap_or(0);
            if leader != 0 && self.region(region).index_of(leader).is_some() {
                return Ok(leader);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the global leader (node {leader}) did not move into {region} within {timeout:?}"
            );
            let pid = self
                .regions
                .values()
                .chain(self.witness.iter())
                .flat_map(|c| c.coords.iter())
                .find(|c| c.id == leader)
                .and_then(|c| c.child.as_ref())
                .map(|ch| ch.id() as libc::pid_t);
            let Some(pid) = pid else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            // SAFETY: signals a child process this harness started and still holds.
            unsafe { libc::kill(pid, libc::SIGSTOP) };
            let paused = Instant::now();
            while paused.elapsed() < Duration::from_secs(10) {
                let now = self
                    .control_status()
                    .await
                    .map(|s| s.global_leader)
                    .unwrap_or(leader);
                if now != leader {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// What `region`'s own regional leader reports (see [`leader_report`]).
    pub async fn report(&self, region: &str) -> Option<RegionReport> {
        leader_report(&self.conn(), &self.region(region).addrs()).await
    }

    /// Waits until `region` is active (phase `active`) at an epoch >= `min_epoch` and a region
    /// report says it is leased; returns the status document.
    ///
    /// Errors: not within `timeout`.
    pub async fn wait_active(
        &self,
        region: &str,
        min_epoch: u64,
        timeout: Duration,
    ) -> anyhow::Result<GlobalStatusReply> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(s) = self.control_status().await {
                let leased = s.region(region).is_some_and(|r| r.leased);
                if s.is_active_in(region) && s.epoch() >= min_epoch && leased {
                    return Ok(s);
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{region} not active at epoch >= {min_epoch} within {timeout:?}; last status: {last:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What a region's own regional leader reports: `ControlService.PeekReport` (its pending audit
/// entries stay for the global leader) asked of each address of `addrs` (the region's
/// coordinators) directly and at once; the answer of the node that says it leads, if one
/// answers within 1 s. `base` gives the TLS files.
pub async fn leader_report(base: &ConnArgs, addrs: &[String]) -> Option<RegionReport> {
    let asks = addrs.iter().map(|a| {
        let mut conn = base.clone();
        conn.coordinators = vec![a.clone()];
        async move {
            tokio::time::timeout(Duration::from_secs(1), control::peek_report(&conn))
                .await
                .ok()
                .and_then(Result::ok)
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .find(|r| r.regional_leader)
}
