//! Sites as Linux network namespaces, for partition tests with real processes.
//!
//! [`Netns::create`] builds, per test run:
//!
//! ```text
//!   root namespace (the test)           switch namespace `<p>-sw`         site namespaces
//!   veth `<p>h` 10.211.N.254/24 ─────── port `ph` ┐                ┌── `<p>-a`        eth0 10.211.N.1
//!                                                 ├── bridge br0 ──┼── `<p>-b`        eth0 10.211.N.2
//!                                                 ┘                └── `<p>-witness`  eth0 10.211.N.3
//! ```
//!
//! `<p>` is `lb<pid>x<counter>` (unique per process and run; the root-side interface name stays
//! within the 15 characters Linux allows). The /24 is claimed with a lock file
//! `/run/lifeboat-netns/subnet-N` holding the owner's pid, so concurrent test binaries never share
//! one; locks and namespaces of dead owners are removed by the next [`Netns::create`].
//!
//! Processes run in a site with `ip netns exec <ns> PROGRAM` ([`Netns::command`]); the test itself
//! stays in the root namespace and reaches every site through its veth. [`Netns::partition`] cuts
//! two sites from each other with nftables in both namespaces (`ip saddr <other> drop` on input,
//! so packets vanish silently, established connections included, as in a real partition);
//! [`Netns::isolate`] takes a site's switch port down (cut from everybody, the test included);
//! [`Netns::heal`] undoes both. Everything is deleted on drop (also when a test panics).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables): `scripts/install-test-deps.sh` installs them.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context};

/// Directory of the subnet lock files.
const LOCK_DIR: &str = "/run/lifeboat-netns";
/// nftables table holding the partition rules inside each site namespace.
const TABLE: &str = "lifeboat_chaos";

/// One site: a namespace with one address.
#[derive(Debug, Clone)]
pub struct Site {
    /// Site name (a region name, or `witness`).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// IPv4 address of the site (`10.211.N.i`).
    pub addr: String,
    /// Its port on the switch bridge (inside the switch namespace).
    port: String,
}

/// Running namespaces of one test (deleted on drop).
pub struct Netns {
    /// Name prefix of every namespace and of the root-side interface.
    pub prefix: String,
    /// Switch namespace (holds the bridge).
    pub switch: String,
    /// Root-side veth (the test's way in).
    pub host_if: String,
    /// Root-side address.
    pub host_addr: String,
    /// Sites, in creation order.
    pub sites: Vec<Site>,
    cuts: Mutex<BTreeSet<(usize, usize)>>,
    isolated: Mutex<BTreeSet<usize>>,
    lock: PathBuf,
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `lb<pid>x<counter>` → pid.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("lb")?;
    let (pid, tail) = rest.split_once('x')?;
    if tail.is_empty() || !tail.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    pid.parse().ok()
}

/// Checks that namespaces can be made here (root, `ip`, `nft`).
///
/// Errors: says what is missing, so a test fails with a clear message instead of passing.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("network-namespace tests need root (they create namespaces, veths and nftables rules); run them as root (CI runs as root)");
    }
    for (bin, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let ok = Command::new(bin)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("network-namespace tests need `{bin}` (Debian package {pkg}); run scripts/install-test-deps.sh");
        }
    }
    Ok(())
}

/// Deletes namespaces and subnet locks left by test processes that died without cleaning up.
fn remove_stale() {
    if let Ok(list) = run(&["ip", "netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if owner_pid(name).is_some_and(|p| !pid_alive(p)) {
                let _ = run(&["ip", "netns", "del", name]);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(LOCK_DIR) {
        for e in rd.flatten() {
            let pid = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if pid.is_some_and(|p| !pid_alive(p)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Claims a free /24 in 10.211.0.0/16, starting from an index derived from the pid and counter.
fn claim_subnet(pid: u32, counter: u32) -> anyhow::Result<(u8, PathBuf)> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("create {LOCK_DIR}"))?;
    let start = (pid.wrapping_mul(7).wrapping_add(counter.wrapping_mul(13))) % 256;
    for k in 0..256u32 {
        let n = ((start + k) % 256) as u8;
        let lock = PathBuf::from(LOCK_DIR).join(format!("subnet-{n}"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock);
        let Ok(mut f) = f else { continue };
        f.write_all(pid.to_string().as_bytes())?;
        // Someone outside this scheme may use the subnet: leave it alone.
        let routes = run(&["ip", "-4", "route", "show", &format!("10.211.{n}.0/24")])?;
        if routes.trim().is_empty() {
            return Ok((n, lock));
        }
        let _ = std::fs::remove_file(&lock);
    }
    bail!("no free 10.211.N.0/24 subnet for a network-namespace test (256 in use?); see {LOCK_DIR}")
}

impl Netns {
    /// Creates the switch, one namespace per site (addresses `10.211.N.1`, `.2`, ... in the
    /// order of `sites`) and the root-side veth (`10.211.N.254`).
    ///
    /// Errors: not root, `ip`/`nft` missing, or an `ip` command failing (what was created is
    /// deleted again).
    pub fn create(sites: &[&str]) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        preflight()?;
        anyhow::ensure!(
            !sites.is_empty() && sites.len() < 250,
            "1 to 249 sites, got {}",
            sites.len()
        );
        remove_stale();
        let pid = std::process::id();
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lb{pid}x{counter}");
        let (n, lock) = claim_subnet(pid, counter)?;
        let mut net = Netns {
            switch: format!("{prefix}-sw"),
            host_if: format!("{prefix}h"),
            host_addr: format!("10.211.{n}.254"),
            prefix: prefix.clone(),
            sites: sites
                .iter()
                .enumerate()
                .map(|(i, s)| Site {
                    name: s.to_string(),
                    netns: format!("{prefix}-{s}"),
                    addr: format!("10.211.{n}.{}", i + 1),
                    port: format!("p{i}"),
                })
                .collect(),
            cuts: Mutex::new(BTreeSet::new()),
            isolated: Mutex::new(BTreeSet::new()),
            lock,
        };
        // On error, `net` is dropped here and deletes whatever was made.
        net.build()?;
        Ok(net)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let sw = self.switch.clone();
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        for s in &self.sites {
            run(&["ip", "netns", "add", &s.netns])?;
            run(&[
                "ip", "link", "add", "eth0", "netns", &s.netns, "type", "veth", "peer", "name",
                &s.port, "netns", &sw,
            ])?;
            run(&[
                "ip", "-n", &sw, "link", "set", &s.port, "master", "br0", "up",
            ])?;
            run(&[
                "ip",
                "-n",
                &s.netns,
                "addr",
                "add",
                &format!("{}/24", s.addr),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &s.netns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &s.netns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "ip",
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "ph",
            "netns",
            &sw,
        ])?;
        run(&["ip", "-n", &sw, "link", "set", "ph", "master", "br0", "up"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.host_addr),
            "dev",
            &self.host_if,
        ])?;
        run(&["ip", "link", "set", &self.host_if, "up"])?;
        Ok(())
    }

    fn index(&self, site: &str) -> anyhow::Result<usize> {
        self.sites
            .iter()
            .position(|s| s.name == site)
            .with_context(|| format!("no site {site:?}"))
    }

    /// The site named `name`.
    ///
    /// Errors: no such site.
    pub fn site(&self, name: &str) -> anyhow::Result<&Site> {
        Ok(&self.sites[self.index(name)?])
    }

    /// A command running `program` inside the namespace of `site` (`ip netns exec`; the program
    /// keeps its pid, so killing the child kills the program).
    ///
    /// Errors: no such site.
    pub fn command(
        &self,
        site: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let s = self.site(site)?;
        Ok(netns_command(&s.netns, program))
    }

    /// Cuts `x` and `y` from each other, both directions (nftables in both namespaces drop every
    /// packet from the other's address). Other sites and the test still reach both.
    ///
    /// Errors: unknown site or `nft` failing.
    pub fn partition(&self, x: &str, y: &str) -> anyhow::Result<()> {
        let (i, j) = (self.index(x)?, self.index(y)?);
        anyhow::ensure!(i != j, "cannot partition {x} from itself");
        self.cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((i.min(j), i.max(j)));
        self.apply_rules(i)?;
        self.apply_rules(j)
    }

    /// Cuts `site` from every other site (and the test) by taking its switch port down.
    ///
    /// Errors: unknown site or `ip` failing.
    pub fn isolate(&self, site: &str) -> anyhow::Result<()> {
        let i = self.index(site)?;
        self.isolated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(i);
        run(&[
            "ip",
            "-n",
            &self.switch,
            "link",
            "set",
            &self.sites[i].port,
            "down",
        ])?;
        Ok(())
    }

    /// Removes every partition and isolation.
    ///
    /// Errors: `ip` or `nft` failing.
    pub fn heal(&self) -> anyhow::Result<()> {
        let cut: BTreeSet<usize> =
            std::mem::take(&mut *self.cuts.lock().unwrap_or_else(|e| e.into_inner()))
                .into_iter()
                .flat_map(|(a, b)| [a, b])
                .collect();
        for i in cut {
            self.apply_rules(i)?;
        }
        let isolated =
            std::mem::take(&mut *self.isolated.lock().unwrap_or_else(|e| e.into_inner()));
        for i in isolated {
            run(&[
                "ip",
                "-n",
                &self.switch,
                "link",
                "set",
                &self.sites[i].port,
                "up",
            ])?;
        }
        Ok(())
    }

    /// Writes the nftables table of site `i` from the current cuts (an empty table when none).
    fn apply_rules(&self, i: usize) -> anyhow::Result<()> {
        let peers: Vec<String> = self
            .cuts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|&(a, b)| match (a == i, b == i) {
                (true, _) => Some(self.sites[b].addr.clone()),
                (_, true) => Some(self.sites[a].addr.clone()),
                _ => None,
            })
            .collect();
        // `table` then `delete table` makes the delete succeed whether or not it existed; the
        // whole file is applied atomically.
        let mut rules = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
        if !peers.is_empty() {
            rules += &format!(
                "table inet {TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    ip saddr {{ {} }} drop\n  }}\n}}\n",
                peers.join(", ")
            );
        }
        let mut child = netns_command(&self.sites[i].netns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(rules.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {} failed: {}",
                self.sites[i].netns,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// `ip netns exec <netns> <program>`.
pub fn netns_command(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth ends and so their peers (the root-side veth
        // included); delete it explicitly too in case the switch namespace is still held.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        for s in &self.sites {
            let _ = run(&["ip", "netns", "del", &s.netns]);
        }
        let _ = run(&["ip", "netns", "del", &self.switch]);
        let _ = std::fs::remove_file(&self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("lb123x0-sw"), Some(123));
        assert_eq!(owner_pid("lb4194304x17h"), Some(4194304));
        assert_eq!(owner_pid("lbx0"), None);
        assert_eq!(owner_pid("lb12x"), None);
        assert_eq!(owner_pid("lbla-x1"), None);
        assert_eq!(owner_pid("drt-n1"), None);
    }
}
