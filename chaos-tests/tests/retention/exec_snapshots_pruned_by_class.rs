//! Exec snapshots: ids are unique even for two snapshots in the same second (millisecond
//! timestamps, moved forward if taken); a cron `schedule` takes them; `retention = { keep_last =
//! 2 }` leaves exactly the two newest of at least four in the catalog; `lifeboat verify snapshot`
//! checks the blake3 and pipes the snapshot into `--exec` (its exit status decides), and detects a
//! corrupted snapshot.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_agent::config::ExecSourceConfig;
use lifeboat_agent::sources::exec::take_snapshot;
use lifeboat_chaos_tests::*;

fn live(cluster: &Cluster, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = catalog_paths(cluster, "_snapshots/ticks")
        .into_iter()
        .filter(|p| p.ends_with(suffix))
        .collect();
    v.sort();
    v
}

fn taken(cfg: &Path) -> usize {
    agent_log_lines(cfg, "exec snapshot taken")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ids_unique_retention_and_verify() -> anyhow::Result<()> {
    run("t22", |dir| async move {
        // Two snapshots back to back (same second, very likely the same millisecond): two ids.
        let src: ExecSourceConfig = serde_json::from_value(serde_json::json!({
            "name": "quick", "snapshot_command": ["echo", "same"],
        }))?;
        let local = dir.join("local-agent");
        let a = take_snapshot(&src, &local, 3).await.map_err(anyhow::Error::msg)?;
        let b = take_snapshot(&src, &local, 3).await.map_err(anyhow::Error::msg)?;
        assert_ne!(a.id, b.id, "two snapshots, two ids");
        for m in [&a, &b] {
            let f = local.join("snapshots").join(format!("{}.snap", m.id));
            assert_eq!(std::fs::read(&f)?, b"same\n");
            assert_eq!(m.blake3, blake3::hash(b"same\n").to_hex().as_str());
            let side: serde_json::Value =
                serde_json::from_slice(&std::fs::read(f.with_extension("snap.meta.json"))?)?;
            assert_eq!((side["kind"].as_str(), side["epoch"].as_u64()), (Some("exec"), Some(3)));
            assert_eq!(side["id"].as_str(), Some(m.id.as_str()));
        }

        let mut cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        // Phase 1: every second (cron with seconds) until three were taken.
        let extra = "[[exec_sources]]\nname = \"ticks\"\nsnapshot_command = [\"sh\", \"-c\", \"date +%s%N; seq 1 20000\"]\nschedule = \"* * * * * *\"\nretention = { keep_last = 2 }\n";
        let (cfg, data) = cluster.write_agent_config("a1", &[], extra)?;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while taken(&cfg) < 3 {
            anyhow::ensure!(Instant::now() < deadline, "three exec snapshots not taken in 120 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut first = cluster.agents.remove(0);
        let _ = first.kill();
        first.wait()?;
        // Phase 2: one at start, then one an hour: the catalog settles.
        std::fs::write(
            &cfg,
            std::fs::read_to_string(&cfg)?
                .replace("schedule = \"* * * * * *\"", "interval_secs = 3600"),
        )?;
        cluster.start_agent(&cfg)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(taken(&cfg) >= 4 && live(&cluster, ".snap").len() == 2) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "retention did not settle: {:?}",
                live(&cluster, ".snap")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        settle(&data).await?;
        let snaps = live(&cluster, ".snap");
        let sides = live(&cluster, ".snap.meta.json");
        assert_eq!(snaps.len(), 2, "{snaps:?}");
        assert_eq!(
            sides,
            snaps.iter().map(|s| format!("{s}.meta.json")).collect::<Vec<_>>(),
            "each kept snapshot keeps its sidecar"
        );
        let rows = catalog_with_deleted(&cluster, "_snapshots/ticks");
        let expired: Vec<&str> = rows
            .iter()
            .filter(|(p, d)| *d && p.ends_with(".snap"))
            .map(|(p, _)| p.as_str())
            .collect();
        assert_eq!(expired.len() + 2, taken(&cfg), "every older snapshot expired: {rows:?}");
        assert!(expired.iter().all(|e| snaps.iter().all(|k| *e < k.as_str())), "{rows:?}");

        // verify: blake3, then the snapshot piped into the restore command.
        let newest = snaps[1].trim_start_matches("_snapshots/").trim_end_matches(".snap").to_string();
        let piped = dir.join("piped.out");
        let cmd = format!("cat > '{}'", piped.display());
        let out = lifeboat_then(
            &cluster,
            &["verify", "snapshot", &newest, "--output", "json"],
            &["--exec", "--", "sh", "-c", &cmd],
        );
        let v = json(&out);
        assert_eq!((v["verdict"].as_str(), v["kind"].as_str()), (Some("ok"), Some("exec")), "{v}");
        assert_eq!(v["blake3_ok"], true);
        let restored = dir.join("restored.out");
        json(&lifeboat(
            &cluster,
            &["restore-snapshot", "--source", "ticks", "--to-file", restored.to_str().unwrap(), "--output", "json"],
        ));
        let bytes = std::fs::read(&piped)?;
        assert_eq!(bytes, std::fs::read(&restored)?, "the restore command got the snapshot");
        assert_eq!(v["bytes"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(v["blake3"].as_str(), Some(blake3::hash(&bytes).to_hex().as_str()));
        // A failing restore command fails the verification.
        let out = lifeboat_then(
            &cluster,
            &["verify", "snapshot", &newest, "--output", "json"],
            &["--exec", "--", "sh", "-c", "exit 3"],
        );
        let v = failed_json(&out, "verify with a failing restore command");
        let c = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "restore_command").context("check")?;
        assert_eq!(c["ok"], false, "{v}");
        // An expired snapshot is gone.
        let gone = expired[0].trim_start_matches("_snapshots/").trim_end_matches(".snap");
        assert!(!lifeboat(&cluster, &["verify", "snapshot", gone]).status.success());

        // A corrupted snapshot is detected.
        let (rows, _) = files::list(&cluster.conn(), &snaps[1], None, false, false).await?;
        let row = rows.iter().find(|r| r.v.path == snaps[1]).context("row")?;
        let h = row.v.parts[0].hash;
        corrupt_blob_everywhere(&cluster, &h).await?;
        let out = lifeboat(&cluster, &["verify", "snapshot", &newest, "--output", "json"]);
        let v = failed_json(&out, "verify of a corrupted snapshot succeeded");
        assert_eq!(v["blake3_ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap_or_default().contains("corrupt"), "{v}");
        Ok(())
    })
    .await
}
