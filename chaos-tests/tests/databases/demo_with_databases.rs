//! `lifeboat demo --with-databases` end to end (the real binary, JSON output): a Redis and a
//! PostgreSQL per region, writes acknowledged by a's servers (Redis `WAIT 1`, PostgreSQL
//! synchronous commit) while region a is SIGKILLed with its databases. Asserts that b's Redis
//! and PostgreSQL are primaries that take writes, hold every acknowledged write
//! (`db_rpo_redis = 0`, `db_rpo_postgres = 0`, with writes actually acknowledged), that both
//! promotions are in the audit log, and the file RPO is 0 next to them.
//!
//! Skipped (with a message) only when redis-server or the PostgreSQL binaries are absent;
//! `scripts/install-test-deps.sh` installs them.

use lifeboat_chaos_tests::*;
use lifeboat_lab::dbservers::DbBinaries;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_databases_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let bins = DbBinaries::find();
    if !bins.complete() {
        panic!(
            "t32 needs redis-server and PostgreSQL: {} (run scripts/install-test-deps.sh)",
            bins.missing.join("; ")
        );
    }
    run("t32", |dir| async move {
        let bin = lifeboat_lab::harness::bin_dir()?.join("lifeboat");
        let work = dir.join("demo");
        let out = std::process::Command::new(bin)
            .args([
                "demo",
                "--with-databases",
                "--files",
                "60",
                "--large-mb",
                "1",
            ])
            .args(["--output", "json", "--keep", "--workdir"])
            .arg(&work)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s: serde_json::Value = serde_json::from_str(&stdout)?;
        assert_eq!(s["rpo_changes"], 0, "{s}");
        assert_eq!(s["epoch"], 2, "{s}");
        let d = &s["databases"];
        assert!(d.is_object(), "databases part ran: {s}");
        assert!(d["redis_acked"].as_u64() > Some(0), "{d}");
        assert!(d["postgres_acked"].as_u64() > Some(0), "{d}");
        assert_eq!(d["db_rpo_redis"], 0, "{d}");
        assert_eq!(d["db_rpo_postgres"], 0, "{d}");
        assert_eq!(d["redis_primary"], true, "{d}");
        assert_eq!(d["postgres_primary"], true, "{d}");
        assert_eq!(d["writes_after_failover"], true, "{d}");
        assert_eq!(d["promote_db_audited"], 2, "{d}");
        eprintln!("demo databases: {d}");
        Ok(())
    })
    .await
}
