//! The agent's own `BASE_BACKUP` client (`agent::pg_wire`) against a real PostgreSQL 15 server:
//! - over a SCRAM-SHA-256 replication login, the tar it writes extracts into a directory that
//!   `pg_verifybackup` accepts (every file against the server's manifest, and the WAL), and the
//!   server logged our command (not a fallback to `pg_basebackup`);
//! - it holds the same members as `pg_basebackup -Ft -D - -X fetch`'s tar (WAL segment names
//!   aside);
//! - a wrong password is an error, not a silent fallback;
//! - a server that asks for a password the agent does not have falls back to `pg_basebackup`.
//!
//! One test in this file: it sets environment variables (the password).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use lifeboat_agent::sources::postgres::{take_base_backup, BaseBackupClient};
use lifeboat_chaos_tests::pg_server::*;
use lifeboat_chaos_tests::*;

/// Member names of the tar at `p`, without WAL segments and their archive status.
fn members(p: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut a = tar::Archive::new(std::fs::File::open(p)?);
    let mut out = BTreeSet::new();
    for e in a.entries()? {
        let name = e?.path()?.display().to_string();
        if !(name.starts_with("pg_wal/") && name.len() > "pg_wal/".len()) {
            out.insert(name.trim_end_matches('/').to_string());
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_backup_over_the_replication_protocol() -> anyhow::Result<()> {
    std::env::set_var("LB_T34_PASSWORD", "s3cret-for-t34");
    std::env::set_var("LB_T34_WRONG", "not-the-password");
    run("t34-pg-wire", |dir| async move {
        let pgd = Pg::workdir(&dir)?;
        let pg = Pg::init(&pgd.join("primary"))?;
        pg.psql("CREATE ROLE rep WITH REPLICATION LOGIN PASSWORD 's3cret-for-t34'")?;
        pg.psql("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 50000) g")?;
        // SCRAM for `rep` (first match wins, so before initdb's trust lines); log replication
        // commands to see which client ran.
        let hba = pg.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!("host replication rep 127.0.0.1/32 scram-sha-256\n{old}"),
        )?;
        pg.psql("ALTER SYSTEM SET log_replication_commands = on")?;
        pg.psql("SELECT pg_reload_conf()")?;
        let log = pg.data.with_extension("log");
        let ours = |log: &str| log.matches("replication command: BASE_BACKUP ( LABEL 'lifeboat base backup'").count();

        let agent_dir = dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let mut src = pg.source("db");
        src.user = "rep".into();
        src.password_env = Some("LB_T34_PASSWORD".into());

        // 1. Over the protocol with SCRAM: pg_verifybackup accepts the extracted tar.
        let (paths, meta) = take_base_backup(&src, &agent_dir, 7, None, None)
            .await
            .map_err(anyhow::Error::msg)?;
        let tar_path = agent_dir.join("snapshots").join(&paths[0]);
        let bytes = std::fs::read(&tar_path)?;
        assert_eq!(meta.bytes, bytes.len() as u64);
        assert_eq!(meta.blake3, blake3::hash(&bytes).to_hex().to_string());
        assert!(meta.start_wal_file.is_some(), "{meta:?}");
        assert_eq!(ours(&std::fs::read_to_string(&log)?), 1, "the server saw our BASE_BACKUP");
        let ex = pgd.join("extracted");
        std::fs::create_dir_all(&ex)?;
        tar::Archive::new(&bytes[..]).unpack(&ex)?;
        assert!(ex.join("backup_manifest").is_file());
        let out = Command::new(Path::new(BIN).join("pg_verifybackup"))
            .arg(&ex)
            .output()?;
        assert!(
            out.status.success(),
            "pg_verifybackup: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        // 2. The same members as pg_basebackup's tar.
        let mut tool = src.clone();
        tool.base_backup_client = BaseBackupClient::PgBasebackup;
        let (tool_paths, _) = take_base_backup(&tool, &agent_dir, 7, None, None)
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!(ours(&std::fs::read_to_string(&log)?), 1, "pg_basebackup ran");
        let theirs = members(&agent_dir.join("snapshots").join(&tool_paths[0]))?;
        let mine = members(&tar_path)?;
        assert_eq!(mine, theirs);
        assert!(mine.contains("backup_label") && mine.contains("backup_manifest") && mine.contains("global/pg_control"));

        // 3. A wrong password fails; nothing falls back.
        let mut wrong = src.clone();
        wrong.password_env = Some("LB_T34_WRONG".into());
        let e = take_base_backup(&wrong, &agent_dir, 7, None, None)
            .await
            .expect_err("wrong password");
        assert!(e.contains("password authentication failed"), "{e}");
        assert!(!e.contains("pg_basebackup"), "{e}");

        // 4. No password configured: pg_basebackup is tried (and fails the same way, `-w`).
        let mut none = src.clone();
        none.password_env = None;
        let e = take_base_backup(&none, &agent_dir, 7, None, None)
            .await
            .expect_err("no password");
        assert!(e.contains("pg_basebackup exited"), "{e}");
        assert_eq!(ours(&std::fs::read_to_string(&log)?), 1);
        Ok(())
    })
    .await
}
