//! F9: `[[exec_sources]]`: a command's stdout becomes a verified snapshot in the catalog
//! (`_snapshots/<name>/<timestamp>.snap`) and comes back with `lifeboat restore-snapshot`, to a
//! file or piped into a command; a failing command records nothing and is logged.

use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;

fn snapshot_paths(cluster: &Cluster) -> Vec<String> {
    catalog_paths(cluster, "_snapshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_snapshot_round_trips_and_failures_record_nothing() -> anyhow::Result<()> {
    run("t12", |dir| async move {
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("a.txt"), b"hello\n")?;
        let expected = Command::new("seq").args(["1", "200000"]).output()?.stdout;
        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let extra = "[[exec_sources]]\nname = \"numbers\"\nsnapshot_command = [\"sh\", \"-c\", \"seq 1 200000\"]\nrestore_command = [\"sh\", \"-c\", \"cat > /dev/null\"]\n\n[[exec_sources]]\nname = \"broken\"\nsnapshot_command = [\"sh\", \"-c\", \"echo partial; exit 3\"]\n\n[[exec_sources]]\nname = \"same\"\nsnapshot_command = [\"seq\", \"1\", \"200000\"]\n";
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], extra)?;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let paths = snapshot_paths(&cluster);
            if paths.iter().any(|p| p.starts_with("_snapshots/numbers/"))
                && paths.iter().any(|p| p.starts_with("_snapshots/same/"))
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "no snapshot after 60 s: {paths:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        settle(&data).await?;
        let paths = snapshot_paths(&cluster);
        // Two identical snapshots: parts are content-addressed, the second sends no payload.
        let st = agent_status(&data).expect("status.json");
        let sent = st["bytes_sent"].as_u64().unwrap();
        assert!(
            sent < expected.len() as u64 * 3 / 2,
            "identical snapshots sent {sent} bytes for {} bytes of content",
            expected.len()
        );
        assert!(
            !paths.iter().any(|p| p.contains("broken")),
            "a failed command records nothing: {paths:?}"
        );
        let snap = paths
            .iter()
            .find(|p| p.starts_with("_snapshots/numbers/") && p.ends_with(".snap"))
            .expect("numbers snapshot");
        // The local copy is removed once acknowledged.
        assert!(
            !data
                .join("snapshots")
                .join(snap.trim_start_matches("_snapshots/"))
                .exists(),
            "acknowledged snapshot file removed"
        );
        // ... and unlinked, not only moved aside: its trash empties (off the push loop).
        let trash = lifeboat_agent::snapshot::trash_dir(&data);
        lifeboat_chaos_tests::pg_server::wait_for("the trash of acknowledged snapshots empties", 30, || {
            Ok(std::fs::read_dir(&trash).map_or(true, |mut d| d.next().is_none()))
        })
        .await?;
        let log = std::fs::read_to_string(cfg.with_extension("log"))?;
        assert!(
            log.lines()
                .any(|l| l.contains("exec snapshot failed") && l.contains("broken")),
            "the agent log names the failure:\n{log}"
        );

        let file = dir.join("restored.out");
        let r = json(&lifeboat(
            &cluster,
            &[
                "restore-snapshot",
                "--source",
                "numbers",
                "--to-file",
                file.to_str().unwrap(),
                "--output",
                "json",
            ],
        ));
        assert_eq!(std::fs::read(&file)?, expected, "restored bytes");
        assert_eq!(r["source"], "numbers");
        assert_eq!(r["snapshot"].as_str(), Some(snap.as_str()));
        assert_eq!(r["bytes"].as_u64(), Some(expected.len() as u64));
        assert_eq!(
            r["blake3"].as_str(),
            Some(blake3::hash(&expected).to_hex().as_str())
        );
        assert!(r["taken_at"].as_str().unwrap().parse::<jiff::Timestamp>().is_ok(), "{r}");

        let piped = dir.join("piped.out");
        let cmd = format!("cat > '{}'", piped.display());
        let out = lifeboat_then(
            &cluster,
            &["restore-snapshot", "--source", "numbers"],
            &["--exec", "--", "sh", "-c", &cmd],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&piped)?, expected, "piped bytes");

        // A failing restore command is an error naming it; an unknown source is an error.
        let out = lifeboat_then(
            &cluster,
            &["restore-snapshot", "--source", "numbers"],
            &["--exec", "--", "sh", "-c", "exit 4"],
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("exit 4"));
        let out = lifeboat(
            &cluster,
            &["restore-snapshot", "--source", "broken", "--to-file", file.to_str().unwrap()],
        );
        assert!(!out.status.success(), "no snapshot of the failing source");
        Ok(())
    })
    .await
}
