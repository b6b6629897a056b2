//! A local multi-region deployment for tests and the demo: one [`Cluster`] of coordinators per
//! region plus a witness, all voters of one global group (`[global]` in every config), sharing
//! one dev CA.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::conn::ConnArgs;
use crate::harness::{free_port, Cluster, ClusterOpts};

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
}

impl Regions {
    /// Writes every config and starts every coordinator.
    ///
    /// Errors: config or spawn failures.
    pub fn start(dir: &Path, opts: &RegionsOpts) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let n = opts.per_region;
        let mut plan: Vec<(String, u64, Vec<u16>)> = Vec::new();
        let mut next_id = 1u64;
        for r in &opts.regions {
            plan.push((r.clone(), next_id, (0..n).map(|_| free_port()).collect()));
            next_id += n as u64;
        }
        let witness_port = free_port();
        let witness_id = next_id;
        let mut members = String::new();
        for (r, first, ports) in &plan {
            for (i, p) in ports.iter().enumerate() {
                members.push_str(&format!(
                    "[[global.members]]\nid = {}\naddr = \"127.0.0.1:{p}\"\nregion = \"{r}\"\n",
                    first + i as u64
                ));
            }
        }
        if opts.witness {
            members.push_str(&format!(
                "[[global.members]]\nid = {witness_id}\naddr = \"127.0.0.1:{witness_port}\"\nregion = \"witness\"\nwitness = true\n"
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
                    ..Default::default()
                },
            )?;
            ca.get_or_insert_with(|| c.certs.clone());
            regions.insert(r.clone(), c);
        }
        let witness = if opts.witness {
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
        })
    }

    /// Starts a witness that joins the running global group (`[global] join = true`; its config
    /// lists the founding voters plus itself) and returns its node id and address for
    /// `lifeboat topology add --witness`. It votes only once added.
    ///
    /// Errors: a witness already exists, or spawn failures.
    pub fn start_joining_witness(&mut self) -> anyhow::Result<(u64, String)> {
        anyhow::ensure!(self.witness.is_none(), "a witness is already running");
        let (id, port) = (self.next_id, free_port());
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

    /// The global control status (`lifeboat status`'s global part), if a global leader answers.
    pub async fn control_status(&self) -> Option<Value> {
        tokio::time::timeout(
            Duration::from_secs(3),
            crate::control::call(&self.conn(), "status", serde_json::json!({})),
        )
        .await
        .ok()?
        .ok()
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
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Some(s) = self.control_status().await {
                let rec = &s["state"]["record"];
                let leased = s["regions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["region"] == region && r["leased"] == true);
                if rec["phase"]["phase"] == "active"
                    && rec["phase"]["region"] == region
                    && rec["epoch"].as_u64().unwrap_or(0) >= min_epoch
                    && leased
                {
                    return Ok(s);
                }
                last = s;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{region} not active at epoch >= {min_epoch} within {timeout:?}; last status: {last}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
