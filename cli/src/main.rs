//! `lifeboat`: the operator CLI (status, ls, versions, restore, certs) plus `demo` and `bench`.

/// jemalloc instead of glibc's allocator: it keeps freed memory for reuse (dirty pages decay
/// over seconds), so the 4 MiB part buffers allocated per part do not fault in fresh zeroed
/// pages each time, as glibc's `mmap`-backed large allocations do.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use lifeboat_cli::outln;
use lifeboat_cli::{conflicts, control, demo, keys, reports};
use lifeboat_client::conn;
use lifeboat_restore::{files, pg_restore, snapshots};

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_proto::StatusRequest;

use conn::ConnArgs;

/// Lifeboat admin CLI.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Lifeboat admin CLI: inspect the catalog, restore files and exec snapshots, manage members, generate dev certificates, run the demo and benchmark",
    long_about = "Lifeboat admin CLI. Talks gRPC with mutual TLS to any coordinator of a region (it finds the leader).\n\nStart here: `lifeboat demo` runs a whole local cluster and proves a restore is byte-equal."
)]
struct Cli {
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cluster status: members, leader, term, last applied, connected agents, entries, bytes.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List the newest version of each path under PREFIX (default: everything).
    Ls {
        /// Path prefix, e.g. `data/sub`.
        prefix: Option<String>,
        /// Show the catalog as of this time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
        #[arg(long)]
        at: Option<String>,
        /// Include deleted paths (tombstones).
        #[arg(long)]
        deleted: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Every version of one path.
    Versions {
        /// Catalog path, e.g. `data/report.pdf`.
        path: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Restore paths under a prefix, as of a time, into a directory (bytes, modes, mtimes;
    /// every blob and file verified by blake3; nothing written outside DIR or through a symlink).
    /// `restore redis ...` restores a database snapshot instead.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Restore {
        /// Restore a database snapshot instead of paths (`redis`, `postgres`).
        #[command(subcommand)]
        db: Option<Box<RestoreDb>>,
        /// Path prefix to restore (default: everything).
        #[arg(long, default_value = "")]
        path: String,
        /// `latest` or an RFC 3339 time: restore the newest version committed at or before it.
        #[arg(long, default_value = "latest")]
        at: String,
        /// Target directory (created if missing).
        #[arg(long, required = true)]
        to: Option<PathBuf>,
        /// Local files and symlinks already in DIR: `never` refuses the whole restore up front,
        /// listing them, and writes nothing; `older` replaces only those whose mtime is older
        /// than the restored version's; `always` replaces them. Entries already equal to the
        /// version (content, mode, mtime) are left alone under every policy.
        #[arg(long, value_enum, default_value_t = files::Overwrite::Never)]
        overwrite: files::Overwrite,
        /// Print what would be written, overwritten and kept; write nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Restore an exec snapshot (`[[exec_sources]]` of an agent): the newest
    /// `_snapshots/SOURCE/*.snap` at or before --at, verified by blake3, written to a file
    /// (temp + fsync + rename) or piped into a restore command's stdin.
    #[command(name = "restore-snapshot")]
    RestoreSnapshot {
        /// Exec source name (the `name` of the agent's `[[exec_sources]]` entry).
        #[arg(long)]
        source: String,
        /// `latest` or an RFC 3339 time: the newest snapshot committed at or before it.
        #[arg(long, default_value = "latest")]
        at: String,
        /// Write the snapshot to this file.
        #[arg(long, conflicts_with = "exec")]
        to_file: Option<PathBuf>,
        /// Pipe the snapshot into the command given after `--` (e.g. `--exec -- psql -f -`).
        #[arg(long)]
        exec: bool,
        /// The restore command and its arguments (after `--`, with --exec).
        #[arg(last = true)]
        command: Vec<String>,
        /// An existing --to-file: `never` refuses (unless it already equals the snapshot),
        /// `older` replaces it only if its mtime is older than the snapshot's, `always` replaces.
        #[arg(long, value_enum, default_value_t = files::Overwrite::Never)]
        overwrite: files::Overwrite,
        /// Print what would be done; write nothing and run no command.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Verify a stored snapshot by restoring it into a scratch server.
    Verify {
        #[command(subcommand)]
        cmd: VerifyCmd,
    },
    /// Garbage collection now, on the region's leader: remove catalog versions superseded longer
    /// ago than the coordinators' `[gc] keep_history` (the newest version of every path stays;
    /// `restore --at` before that cutoff may miss removed versions), then delete the blobs no
    /// version references that are older than `[gc] grace`, from every coordinator's store.
    /// Reports versions pruned, blobs condemned, bytes freed, blobs kept (referenced / too young).
    Gc {
        /// Report what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Change the regional Raft membership (run against any coordinator; the leader applies it).
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Encryption at rest: a new master key file (`init`), a new data key on every coordinator
    /// (`rotate`), which data keys each coordinator's store holds (`status`).
    Keys {
        #[command(subcommand)]
        cmd: keys::KeysCmd,
    },
    /// Development certificates (rcgen): a CA and node certificates for mutual TLS.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Run two local regions (3 coordinators each) and a witness on loopback: region a's agent
    /// replicates a directory, region b's agent keeps a warm replica; every process of region a
    /// is SIGKILLed; prints the measured RTO (kill -> b active, its traffic hook ran, replica
    /// complete) and RPO (acknowledged changes missing in b; must be 0), then restarts a as a
    /// standby. Exits non-zero if anything acknowledged is missing. `--single-region`: the
    /// in-region leader-kill demo.
    Demo(demo::DemoArgs),
    /// Failover benchmark: kill the active region N times (default 20) with default lease and
    /// detection settings; prints RTO median and worst.
    #[command(name = "bench-failover")]
    BenchFailover(demo::regions::FailoverBenchArgs),
    /// Cross-region lag benchmark: the source changes at --mb-per-s (default 20) for --secs;
    /// prints the standby region's replication lag p50 / p99 / max (ms) and worst lag in bytes.
    #[command(name = "bench-lag")]
    BenchLag(demo::regions::LagBenchArgs),
    /// Benchmark: initial sync, ~1% change, restore and agent RSS on a real tree with a 200 MB file.
    Bench(demo::BenchArgs),
    /// Planned switchover to another region: fences the active region (its lease is no longer
    /// renewed), waits until the target holds every committed change, then promotes it under
    /// epoch + 1 and runs its traffic hooks. Zero data loss; writes pause for about one lease.
    Switchover {
        /// Target region.
        #[arg(long)]
        to: String,
        /// Longest wait for the target to catch up, seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Only if the current epoch is still N (the epoch the decision was made under, e.g. read
        /// from `lifeboat status`); refused with STALE_EPOCH otherwise.
        #[arg(long, value_name = "N")]
        expect_epoch: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Switch back to the region that was active before the last failover or switchover (same
    /// procedure and guarantees as `switchover`).
    Failback {
        /// Longest wait for the target to catch up, seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Failover drill: with --simulate, print the exact plan a failover would follow now (orders,
    /// hooks, expected RPO from the current lag, whether the policy would refuse) without acting.
    Drill {
        /// Only print the plan (required: live drills are `switchover`).
        #[arg(long)]
        simulate: bool,
        /// Target region (default: the one the policy would pick).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The control audit log: failovers, switchovers, promotions, hooks and refusals, with
    /// epoch, actor and outcome.
    Audit {
        /// Most entries (newest last).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Unresolved conflicts after a failover: changes a fenced region made that the active
    /// region did not have, kept in the active region's catalog at
    /// `_conflicts/<from region>/e<epoch>/<path>` (path, from region, epoch, when, size, blake3,
    /// and the active region's current version of the path).
    #[command(
        long_about = "Unresolved conflicts after a failover.\n\nWhen a region that was fenced (another region became active at a newer epoch) learns it is no longer active, its agents push every local change the active region lacks (pending when it was fenced, or made afterwards) to the active region, which commits it at `_conflicts/<from region>/e<epoch>/<path>`; only then do their directories become replicas of the active region (its version wins on disk). Settle each with `lifeboat resolve`. Give the coordinators of every region (or at least of the active one)."
    )]
    Conflicts {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Settle the conflict of PATH in the active region: `--keep source` makes the fenced
    /// region's version the current version of PATH, `--keep target` keeps the active region's
    /// version (the conflict is discarded), `--keep both` adds the fenced version next to it as
    /// `PATH.conflict-<region>-e<epoch>`. Catalog-only (no data copied); the active region's
    /// agents write the result into their directories, standbys get it by replication.
    Resolve {
        /// The conflicting path (e.g. `data/report.txt`), or the conflict row itself
        /// (`_conflicts/a/e2/data/report.txt`) when PATH has several.
        path: String,
        /// Which version wins.
        #[arg(long, value_enum)]
        keep: Keep,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The global group's topology (every coordinator of every region and the witness): show
    /// it, or add / remove a voter. Automatic failover is re-evaluated after every change (two
    /// regions need a witness).
    Topology {
        #[command(subcommand)]
        action: TopologyCmd,
    },
}

#[derive(Subcommand, Debug)]
enum TopologyCmd {
    /// Voters, regions in failover preference order, and whether automatic failover is allowed.
    Show {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Add a running coordinator (started with `[global] join = true`, its config listing the
    /// current members plus itself): it joins as a learner, catches up, then votes.
    Add {
        /// Its node id (unique in the deployment).
        #[arg(long)]
        id: u64,
        /// Its gRPC address, as the other coordinators reach it.
        #[arg(long)]
        addr: String,
        /// Its region (a new name adds a region, last in failover preference), or the witness
        /// site's name with --witness.
        #[arg(long)]
        region: String,
        /// The node is a witness (votes, hosts no region).
        #[arg(long)]
        witness: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a voter (refused for the global leader itself and for the last coordinator of the
    /// active region). Stop its process afterwards.
    Remove {
        /// Its node id.
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// `lifeboat resolve --keep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Keep {
    /// The fenced region's version becomes the current version.
    Source,
    /// The active region's version stays; the conflict is discarded.
    Target,
    /// Both: the fenced version is added as `PATH.conflict-<region>-e<epoch>`.
    Both,
}

#[derive(Subcommand, Debug)]
enum RestoreDb {
    /// Restore a Redis snapshot (`[[redis_sources]]`): the RDB, verified by blake3 against the
    /// catalog and its sidecar, written to --file or loaded into the Redis at --to (over TLS with
    /// --tls --tls-ca-file).
    Redis(snapshots::RedisRestoreArgs),
    /// Point-in-time recovery of a `[[postgres_sources]]` source into a new data directory: the
    /// newest base backup ended before --at (blake3 verified against its sidecar), the archived
    /// WAL from its start on, `recovery_target_time` and `recovery.signal`. Start PostgreSQL on
    /// DATADIR to replay up to --at and promote.
    Postgres {
        /// Source name (the `name` of the agent's `[[postgres_sources]]` entry).
        #[arg(long)]
        source: String,
        /// RFC 3339 target time, or `latest` (replay all archived WAL).
        #[arg(long)]
        at: String,
        /// New data directory (must not exist or be empty).
        #[arg(long)]
        to: PathBuf,
        /// OS user to own the files (default: `postgres` when run as root and it exists).
        #[arg(long)]
        owner: Option<String>,
        /// Start the server once, wait until recovery completes, stop it.
        #[arg(long)]
        start_check: bool,
        /// PostgreSQL binaries (for --start-check).
        #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
        bin_dir: PathBuf,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum VerifyCmd {
    /// Download snapshot ID (`<source>/<UTC ts>`, or `<source>/base/<UTC ts>` for a PostgreSQL
    /// base backup), check its blake3, restore it into a scratch server (redis-server, or a
    /// PostgreSQL on a Unix socket recovered to consistency) and run checks (keys; row counts per
    /// table and --sql/--expect; an exec snapshot's --exec restore command); prints a report and
    /// exits non-zero when any check failed.
    Snapshot(snapshots::VerifyArgs),
}

#[derive(Subcommand, Debug)]
enum MemberCmd {
    /// Add a coordinator: it joins as a learner, catches up (log or snapshot), then becomes a
    /// voter unless --learner. Start the new coordinator first, with an empty `members` list.
    Add {
        /// Node id of the new coordinator (unique, > 0).
        #[arg(long)]
        id: u64,
        /// Its gRPC address, host:port.
        #[arg(long)]
        addr: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Remove a coordinator from the group (voter or learner).
    Remove {
        /// Node id to remove.
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCmd {
    /// Create a CA (`ca.pem`, `ca.key`) in DIR if none exists, and a certificate + key per name
    /// given for each role (`NAME.pem`, `NAME.key`). Every certificate carries its identity
    /// `lifeboat://<region>/<role>/<name>`, which decides what it may call: coordinator and
    /// witness (the cluster's own processes), agent (its own agent id only: NAME must equal
    /// the agent's `agent_id`), viewer (status, versions, audit), operator (also restore,
    /// verify, drill, resolve, switchover), admin (also membership, topology, GC). Leaf
    /// certificates are valid 90 days. Without any role option: `coordinator` (coordinator),
    /// `agent` (agent) and `admin` (admin). Also writes `master.key` (a random master key for
    /// `[encryption] master_key_file`, mode 0600) unless DIR has one.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Region the certificates are bound to (`any`: not bound).
        #[arg(long, default_value = lifeboat_common::authz::ANY_REGION)]
        region: String,
        /// Coordinator names, e.g. `coord1,coord2,coord3`.
        #[arg(long, value_delimiter = ',')]
        coordinator: Vec<String>,
        /// Witness names.
        #[arg(long, value_delimiter = ',')]
        witness: Vec<String>,
        /// Agent names: each must equal that agent's `agent_id`.
        #[arg(long, value_delimiter = ',')]
        agent: Vec<String>,
        /// Viewer names (read only).
        #[arg(long, value_delimiter = ',')]
        viewer: Vec<String>,
        /// Operator names.
        #[arg(long, value_delimiter = ',')]
        operator: Vec<String>,
        /// Admin names.
        #[arg(long, value_delimiter = ',')]
        admin: Vec<String>,
    },
}

/// `lifeboat restore <DB> ...`.
async fn restore_db(db: RestoreDb, output: Output) -> anyhow::Result<()> {
    match db {
        RestoreDb::Redis(args) => {
            let r = snapshots::restore_redis(&args).await?;
            reports::print_restore(&r, output == Output::Json)?;
        }
        RestoreDb::Postgres {
            source,
            at,
            to,
            owner,
            start_check,
            bin_dir,
            conn,
        } => {
            let opts = pg_restore::PgRestoreOpts {
                source,
                at,
                to,
                owner,
                start_check,
                bin_dir,
            };
            let r = pg_restore::restore_postgres(&conn, &opts).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "restored postgres {} from {} ({} bytes) and {} WAL files into {} in {} ms; start PostgreSQL on it to recover to {}",
                    r.source, r.base_backup, r.base_bytes, r.wal_files, r.data_dir, r.elapsed_ms,
                    r.recovery_target_time.as_deref().unwrap_or("the end of the archived WAL")
                );
            }
        }
    }
    Ok(())
}

/// Prints a `restore --dry-run` plan: one line per path with its action, then the totals.
fn print_plan(p: &files::RestorePlan, to: &std::path::Path, policy: files::Overwrite) {
    let over = if policy == files::Overwrite::Never {
        "would refuse (overwrite)"
    } else {
        "overwrite"
    };
    for (what, paths) in [
        ("write", &p.write),
        (over, &p.overwrite),
        ("keep (local newer)", &p.skip_newer),
        ("keep (equal)", &p.unchanged),
        ("blocked", &p.blocked),
    ] {
        for path in paths.iter() {
            outln!("{what:<24} {path}");
        }
    }
    outln!(
        "dry run into {}, nothing written: {} to write, {} to overwrite, {} kept newer, {} equal, {} blocked",
        to.display(),
        p.write.len(),
        p.overwrite.len(),
        p.skip_newer.len(),
        p.unchanged.len(),
        p.blocked.len()
    );
    if let Err(e) = files::check_plan(p, to, policy) {
        outln!("a real run would fail: {e:#}");
    }
}

/// Prints the member table of a status reply: role, reachability, last contact, match index and
/// lag, blob completeness; then the blob durability summary.
fn print_members(s: &lifeboat_proto::StatusReply) {
    outln!(
        "members (seen from node {}):\n  {:>4} {:<22} {:<7} {:<11} {:>9} {:>7} {:>6}  blobs",
        s.node_id,
        "id",
        "address",
        "role",
        "reachable",
        "contact",
        "match",
        "lag"
    );
    for m in &s.members {
        let contact = if m.last_contact_ms < 0 {
            "never".to_string()
        } else {
            format!("{} ms", m.last_contact_ms)
        };
        let blobs = if s.blob_store_shared {
            "shared store".to_string()
        } else if !m.blobs_known {
            "unknown".to_string()
        } else if m.blobs_missing == 0 {
            format!("complete ({})", m.blobs_referenced)
        } else {
            format!(
                "{} of {} missing{} (backfilling, {} repaired)",
                m.blobs_missing,
                m.blobs_referenced,
                if m.blobs_missing_truncated { "+" } else { "" },
                m.blobs_repaired
            )
        };
        outln!(
            "  {:>4} {:<22} {:<7} {:<11} {:>9} {:>7} {:>6}  {}",
            m.id,
            m.addr,
            if m.voter { "voter" } else { "learner" },
            if m.reachable { "yes" } else { "UNREACHABLE" },
            contact,
            m.match_index,
            m.lag_entries,
            blobs
        );
    }
    if s.blob_store_shared {
        outln!("blobs: shared store (S3): every coordinator sees every blob, nothing to backfill");
    } else {
        outln!(
            "blobs: {} under-replicated (not confirmed on every voter), {} below majority{}",
            s.blobs_under_replicated,
            s.blobs_below_majority,
            if s.blob_health_complete {
                ""
            } else {
                " (not exact: a voter is unreachable or still scanning, and confirms none)"
            }
        );
    }
}

fn parse_at(at: &str) -> anyhow::Result<Option<i64>> {
    if at == "latest" {
        return Ok(None);
    }
    let ts: jiff::Timestamp = at.parse().map_err(|e| {
        anyhow!(
            "--at {at:?}: expected `latest` or an RFC 3339 time like 2026-11-23T10:00:00Z ({e})"
        )
    })?;
    Ok(Some(ts.as_millisecond()))
}

fn fmt_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn print_versions(rows: &[FileVersion], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    for v in rows {
        let kind = match v.v.kind {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "link",
        };
        let what = if v.v.deleted {
            "deleted".to_string()
        } else {
            format!("{:o}", v.v.mode)
        };
        outln!(
            "{:>8}  {:<4} {:>7} {:>12}  {}  {}{}",
            v.seq,
            kind,
            what,
            v.v.size,
            fmt_ms(v.commit_time_ms),
            v.v.path,
            v.v.symlink_target
                .as_ref()
                .map(|t| format!(" -> {t}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let output = cli.output;
    match cli.cmd {
        Cmd::Switchover {
            to,
            timeout_s,
            expect_epoch,
            conn,
        } => {
            let r = control::switchover_at(
                &conn,
                Some(to),
                false,
                std::time::Duration::from_secs(timeout_s),
                expect_epoch,
            )
            .await?;
            print_done(output, &r)?;
        }
        Cmd::Failback { timeout_s, conn } => {
            let r =
                control::switchover(&conn, None, true, std::time::Duration::from_secs(timeout_s))
                    .await?;
            print_done(output, &r)?;
        }
        Cmd::Drill { simulate, to, conn } => {
            if !simulate {
                bail!("only `lifeboat drill --simulate` exists: a live drill is `lifeboat switchover --to REGION` followed by `lifeboat failback`");
            }
            let p = lifeboat_client::control::drill(&conn, to).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                control::print_plan(&p);
            }
        }
        Cmd::Conflicts { conn } => {
            let list = conflicts::list(&conn).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                conflicts::print(&list);
            }
        }
        Cmd::Resolve { path, keep, conn } => {
            let (keep, keep_name) = match keep {
                Keep::Source => (lifeboat_proto::ConflictKeep::Source, "source"),
                Keep::Target => (lifeboat_proto::ConflictKeep::Target, "target"),
                Keep::Both => (lifeboat_proto::ConflictKeep::Both, "both"),
            };
            let v = lifeboat_client::control::resolve_conflict(&conn, &path, keep).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let committed: Vec<String> = v
                    .committed
                    .iter()
                    .map(|c| format!("{} (seq {})", c.path, c.seq))
                    .collect();
                outln!(
                    "resolved {} (conflict {} from region {}): kept {keep_name}; committed at epoch {}: {}",
                    v.path,
                    v.conflict,
                    v.from_region,
                    v.epoch,
                    committed.join(", ")
                );
            }
        }
        Cmd::Topology { action } => {
            use lifeboat_client::control as rpc;
            let v = match action {
                TopologyCmd::Show { conn } => rpc::show_topology(&conn).await?,
                TopologyCmd::Add {
                    id,
                    addr,
                    region,
                    witness,
                    conn,
                } => {
                    let m = lifeboat_proto::GlobalMember {
                        id,
                        addr,
                        region,
                        witness,
                    };
                    rpc::add_voter(&conn, m, control::operator()).await?
                }
                TopologyCmd::Remove { id, conn } => {
                    rpc::remove_voter(&conn, id, control::operator()).await?
                }
            };
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                control::print_topology(&v);
            }
        }
        Cmd::Audit { limit, conn } => {
            let v = lifeboat_client::control::audit(&conn, limit).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                control::print_audit(&v);
            }
        }
        Cmd::Status { conn } => {
            let (mut admin, addr) = conn.admin().await?;
            let s = admin
                .status(StatusRequest {})
                .await
                .map_err(|e| anyhow!("status from {addr}: {}", e.message()))?
                .into_inner();
            let global = lifeboat_client::control::global_status(&conn).await.ok();
            if output == Output::Json {
                let v = serde_json::json!({
                    "global": global,
                    "node_id": s.node_id, "region": s.region, "state": s.state,
                    "leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
                    "last_applied": s.last_applied, "last_log_index": s.last_log_index,
                    "snapshot_index": s.snapshot_index, "epoch": s.epoch,
                    "has_leader": s.has_leader,
                    "members": s.members.iter().map(|m| serde_json::json!({
                        "id": m.id, "addr": m.addr, "voter": m.voter,
                        "reachable": m.reachable,
                        "last_contact_ms": (m.last_contact_ms >= 0).then_some(m.last_contact_ms),
                        "match_index": m.match_index, "match_from_leader": m.match_from_leader,
                        "lag_entries": m.lag_entries,
                        "blobs": if s.blob_store_shared { serde_json::json!("shared") } else if m.blobs_known { serde_json::json!({
                            "referenced": m.blobs_referenced, "missing": m.blobs_missing,
                            "missing_truncated": m.blobs_missing_truncated, "repaired": m.blobs_repaired,
                            "complete": m.blobs_missing == 0,
                        }) } else { serde_json::Value::Null },
                    })).collect::<Vec<_>>(),
                    "blob_store_shared": s.blob_store_shared,
                    "blobs_under_replicated": s.blobs_under_replicated,
                    "blobs_below_majority": s.blobs_below_majority,
                    "blob_health_complete": s.blob_health_complete,
                    "agents": s.agents.iter().map(|a| serde_json::json!({"agent_id": a.agent_id, "last_seen_ms_ago": a.last_seen_ms_ago, "files_tracked": a.files_tracked, "pending_changes": a.pending_changes, "bytes_sent": a.bytes_sent, "changes_acked": a.changes_acked, "failing_checks": a.failing_checks.iter().map(|c| serde_json::json!({"name": c.name, "detail": c.detail})).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                    "entries": s.entries, "bytes": s.bytes, "versions": s.versions,
                    "role": s.role, "upstream_seq": s.upstream_seq,
                    "upstream_last_seq": s.upstream_last_seq, "lag_entries": s.lag_entries,
                    "lag_bytes": s.lag_bytes, "lag_ms": s.lag_ms, "replication_state": s.replication_state,
                    "replication_error": s.replication_error,
                    "config_warnings": s.config_warnings,
                });
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for w in &s.config_warnings {
                    outln!("WARNING (node {}): {w}", s.node_id);
                }
                if let Some(g) = &global {
                    control::print_status(g);
                }
                outln!(
                    "region {}  epoch {}  (answered by node {} at {addr}, {})",
                    s.region,
                    s.epoch,
                    s.node_id,
                    s.state
                );
                let leader = if s.has_leader {
                    format!("leader {} at {}", s.leader_id, s.leader_addr)
                } else if s.state == "Leader" {
                    format!(
                        "no leader (node {} was leader but has lost its quorum)",
                        s.node_id
                    )
                } else {
                    "no leader".to_string()
                };
                outln!(
                    "{leader}  term {}  last applied {}  last log {}  snapshot {}",
                    s.term,
                    s.last_applied,
                    s.last_log_index,
                    s.snapshot_index
                );
                print_members(&s);
                outln!(
                    "catalog: {} entries, {} bytes, {} versions",
                    s.entries,
                    s.bytes,
                    s.versions
                );
                if s.role == "standby" {
                    outln!(
                        "replication: standby, {}  upstream seq {} of {}  lag {} entries, {} bytes, {} ms",
                        s.replication_state,
                        s.upstream_seq,
                        s.upstream_last_seq,
                        s.lag_entries,
                        s.lag_bytes,
                        s.lag_ms
                    );
                    if !s.replication_error.is_empty() {
                        outln!("  last error: {}", s.replication_error);
                    }
                } else if !s.role.is_empty() {
                    outln!("replication: {} (takes writes)", s.role);
                }
                outln!("agents ({}):", s.agents.len());
                for a in &s.agents {
                    outln!(
                        "  {:<16} seen {} ms ago, {} files, {} pending, {} bytes sent, {} acked",
                        a.agent_id,
                        a.last_seen_ms_ago,
                        a.files_tracked,
                        a.pending_changes,
                        a.bytes_sent,
                        a.changes_acked
                    );
                    for c in &a.failing_checks {
                        outln!("    FAILING {}: {}", c.name, c.detail);
                    }
                }
            }
        }
        Cmd::Ls {
            prefix,
            at,
            deleted,
            conn,
        } => {
            let (rows, _) = files::list(
                &conn,
                prefix.as_deref().unwrap_or(""),
                parse_at(at.as_deref().unwrap_or("latest"))?,
                false,
                deleted,
            )
            .await?;
            print_versions(&rows, output)?;
        }
        Cmd::Versions { path, conn } => {
            let (rows, _) = files::list(&conn, &path, None, true, true).await?;
            let rows: Vec<_> = rows.into_iter().filter(|r| r.v.path == path).collect();
            if rows.is_empty() {
                bail!("no versions of {path:?} in the catalog (try `lifeboat ls` to see paths)");
            }
            print_versions(&rows, output)?;
        }
        Cmd::Verify {
            cmd: VerifyCmd::Snapshot(args),
        } => {
            let r = snapshots::verify(&args).await;
            reports::print_verify(&r, output == Output::Json)?;
            if !r.ok {
                bail!(
                    "snapshot {} failed verification: {}",
                    r.snapshot,
                    r.error.as_deref().unwrap_or("a check failed")
                );
            }
        }
        Cmd::Restore { db: Some(db), .. } => restore_db(*db, output).await?,
        Cmd::Restore {
            db: None,
            path,
            at,
            to,
            overwrite,
            dry_run,
            conn,
        } => {
            let to = to.ok_or_else(|| anyhow!("--to DIR is required"))?;
            let at_ms = parse_at(&at)?;
            let (rows, addr) = files::list(&conn, &path, at_ms, false, false).await?;
            if rows.is_empty() {
                bail!("nothing to restore: no live paths under {path:?} as of {at} (see `lifeboat ls --deleted`)");
            }
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let opts = files::RestoreOpts { overwrite, dry_run };
            let report = files::restore_with(
                &conn,
                &addr,
                rows,
                &to,
                output == Output::Text && tty && !dry_run,
                opts,
            )
            .await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else if let Some(p) = &report.plan {
                print_plan(p, &to, overwrite);
            } else {
                outln!(
                    "restored {} files, {} dirs, {} symlinks, {} bytes into {} in {} ms ({:.1} MB/s); {} local entries overwritten, {} kept (newer), {} already equal",
                    report.files, report.dirs, report.symlinks, report.bytes, to.display(), report.elapsed_ms, report.mb_per_s,
                    report.overwritten, report.skipped_newer, report.unchanged
                );
            }
        }
        Cmd::RestoreSnapshot {
            source,
            at,
            to_file,
            exec,
            command,
            overwrite,
            dry_run,
            conn,
        } => {
            let target = match (to_file, exec) {
                (Some(f), false) if command.is_empty() => files::SnapshotTarget::File(f),
                (None, true) if !command.is_empty() => files::SnapshotTarget::Exec(command),
                _ => bail!("give exactly one of --to-file PATH or --exec -- CMD [ARGS...]"),
            };
            let at_ms = parse_at(&at)?;
            let opts = files::RestoreOpts { overwrite, dry_run };
            let r = files::restore_snapshot(&conn, &source, at_ms, &at, target, opts).await?;
            if output == Output::Json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                outln!(
                    "{}snapshot {} ({} bytes, blake3 {}, taken {}): {}",
                    if dry_run {
                        "dry run, nothing written: "
                    } else {
                        "restored "
                    },
                    r.snapshot,
                    r.bytes,
                    r.blake3,
                    r.taken_at,
                    r.action
                );
            }
        }
        Cmd::Gc { dry_run, conn } => {
            let (mut admin, addr) = conn.admin().await?;
            let r = admin
                .collect_garbage(lifeboat_proto::GcRequest { dry_run })
                .await
                .map_err(|e| anyhow!("garbage collection via {addr}: {}", e.message()))?
                .into_inner();
            if output == Output::Json {
                let v = serde_json::json!({
                    "region": r.region, "leader": addr, "dry_run": r.dry_run,
                    "cutoff_ms": r.cutoff_ms, "versions_pruned": r.versions_pruned,
                    "blobs_listed": r.blobs_listed, "blobs_condemned": r.blobs_condemned,
                    "bytes_freed": r.bytes_freed, "kept_referenced": r.kept_referenced,
                    "kept_young": r.kept_young, "delete_failed": r.delete_failed,
                });
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let verb = if r.dry_run { "would be" } else { "were" };
                outln!(
                    "garbage collection in region {} (leader {addr}){}:",
                    r.region,
                    if r.dry_run { ", dry run" } else { "" }
                );
                outln!(
                    "  versions pruned:  {} {verb} superseded before {}",
                    r.versions_pruned,
                    jiff::Timestamp::from_millisecond(r.cutoff_ms)
                        .map(|t| t.to_string())
                        .unwrap_or_else(|_| r.cutoff_ms.to_string())
                );
                outln!(
                    "  blobs condemned:  {} of {} listed ({} stored bytes freed per copy)",
                    r.blobs_condemned,
                    r.blobs_listed,
                    r.bytes_freed
                );
                outln!(
                    "  blobs kept:       {} referenced, {} unreferenced but younger than the grace period",
                    r.kept_referenced, r.kept_young
                );
                if r.delete_failed > 0 {
                    outln!(
                        "  delete failed:    {} (left in the shared store; the next pass retries)",
                        r.delete_failed
                    );
                }
            }
        }
        Cmd::Member { cmd } => {
            let (reply, addr) = match cmd {
                MemberCmd::Add {
                    id,
                    addr,
                    learner,
                    conn,
                } => {
                    let (mut admin, via) = conn.admin().await?;
                    let r = admin
                        .add_member(lifeboat_proto::AddMemberRequest {
                            id,
                            addr,
                            voter: !learner,
                        })
                        .await
                        .map_err(|e| anyhow!("add member {id} via {via}: {}", e.message()))?;
                    (r.into_inner(), via)
                }
                MemberCmd::Remove { id, conn } => {
                    let (mut admin, via) = conn.admin().await?;
                    let r = admin
                        .remove_member(lifeboat_proto::RemoveMemberRequest { id })
                        .await
                        .map_err(|e| anyhow!("remove member {id} via {via}: {}", e.message()))?;
                    (r.into_inner(), via)
                }
            };
            if output == Output::Json {
                let v: Vec<_> = reply
                    .members
                    .iter()
                    .map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter}))
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!("membership (via {addr}):");
                for m in &reply.members {
                    outln!(
                        "  {:>4} {:<22} {}",
                        m.id,
                        m.addr,
                        if m.voter { "voter" } else { "learner" }
                    );
                }
            }
        }
        Cmd::Certs {
            cmd:
                CertsCmd::Init {
                    dir,
                    region,
                    coordinator,
                    witness,
                    agent,
                    viewer,
                    operator,
                    admin,
                },
        } => {
            use lifeboat_common::authz::{PeerIdentity, Role};
            let mut wanted: Vec<(Role, String)> = [
                (Role::Coordinator, coordinator),
                (Role::Witness, witness),
                (Role::Agent, agent),
                (Role::Viewer, viewer),
                (Role::Operator, operator),
                (Role::Admin, admin),
            ]
            .into_iter()
            .flat_map(|(r, names)| names.into_iter().map(move |n| (r, n)))
            .collect();
            if wanted.is_empty() {
                wanted = vec![
                    (Role::Coordinator, "coordinator".into()),
                    (Role::Agent, "agent".into()),
                    (Role::Admin, "admin".into()),
                ];
            }
            let ids = wanted
                .iter()
                .map(|(r, n)| {
                    if n == "ca" {
                        bail!("bad certificate name {n:?}: ca.pem is the CA");
                    }
                    Ok(PeerIdentity::new(*r, &region, n)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut seen = std::collections::BTreeSet::new();
            if let Some(d) = ids.iter().find(|i| !seen.insert(i.name.clone())) {
                bail!("name {:?} given twice (one file per name)", d.name);
            }
            lifeboat_common::tls::init_dev_ca(&dir).context("create CA")?;
            for id in &ids {
                lifeboat_common::tls::issue_cert(&dir, id, &[])
                    .with_context(|| format!("issue {}", id.name))?;
            }
            // A master key for encryption at rest next to the certificates (kept if present),
            // which `[encryption] master_key_file` of the example config names.
            let master_key = dir.join("master.key");
            if !master_key.exists() {
                lifeboat_common::keys::write_new_master_key(&master_key)
                    .with_context(|| format!("write {}", master_key.display()))?;
            }
            let uris: Vec<String> = ids.iter().map(|i| i.uri()).collect();
            if output == Output::Json {
                outln!(
                    "{}",
                    serde_json::json!({"dir": dir, "ca": dir.join("ca.pem"), "identities": uris, "master_key": master_key})
                );
            } else {
                outln!(
                    "CA {} and certificates written to {}:",
                    dir.join("ca.pem").display(),
                    dir.display()
                );
                for (id, u) in ids.iter().zip(&uris) {
                    outln!("  {}.pem  {u}", id.name);
                }
                outln!(
                    "  master.key  encryption at rest master key (mode 0600; keep a copy offline)"
                );
            }
        }
        Cmd::Keys { cmd } => keys::run(cmd, output == Output::Json).await?,
        Cmd::Demo(args) => demo::run_demo(args, output == Output::Json).await?,
        Cmd::Bench(args) => demo::run_bench(args, output == Output::Json).await?,
        Cmd::BenchFailover(args) => demo::regions::bench(args, output == Output::Json).await?,
        Cmd::BenchLag(args) => demo::regions::bench_lag(args, output == Output::Json).await?,
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn print_done(output: Output, r: &control::SwitchoverDone) -> anyhow::Result<()> {
    if output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(r)?);
    } else {
        outln!(
            "{} is active at epoch {} (writes paused {} ms; no acknowledged change lost)",
            r.to,
            r.epoch,
            r.rto_ms
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into())
        );
    }
    Ok(())
}
