//! Warm standby: region A (eu-west, active: 3 coordinators and an agent watching `src`) and
//! region B (us-east, standby: 3 coordinators with `[replication] upstream` = A, and an agent with
//! `[[replicas]] name = "data"` and no `[[paths]]`). B's coordinators copy A's catalog; B's agent
//! applies it to its replica directory, which ends up equal to `src` after creates, edits,
//! renames, deletes, chmods and a directory removal. A symlink planted in the replica pointing
//! outside is never written through.

use std::time::{Duration, Instant};

use lifeboat_chaos_tests::*;

/// Waits until B's leader applied everything A's leader committed and B's agent (data dir
/// `replica_data`) applied B's whole catalog with no lag. Returns the agent's status.
async fn wait_replica(
    a: &Cluster,
    b: &Cluster,
    replica_data: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let (Ok(sa), Ok(sb)) = (leader_status(a).await, leader_status(b).await) {
            let st = agent_status(replica_data);
            if sb.upstream_seq == sa.versions && sb.lag_entries == 0 {
                if let Some(st) = &st {
                    if st["replica_lag_entries"].as_u64() == Some(0)
                        && st["replica_applied_seq"].as_u64() >= Some(sb.versions)
                        && sb.versions > 0
                    {
                        return Ok(st.clone());
                    }
                }
            }
            last = Some((sa.versions, sb.upstream_seq, sb.versions, st));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "replica did not catch up within {timeout:?}; last (A versions, B upstream_seq, B versions, agent status): {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_agent_keeps_an_equal_replica() -> anyhow::Result<()> {
    let mut s = Scratch::new("t11a");
    let src = s.dir.join("src");
    let replica = s.dir.join("replica");
    let outside = s.dir.join("outside");
    std::fs::create_dir_all(&outside)?;
    tree::generate(&src, 200, 6_000_000, 21)?;
    let (mut a, mut b) = two_regions(&s.dir).await?;
    let (cfg_a, data_a) = a.write_agent_config("a1", &[("data", &src)], "")?;
    a.start_agent(&cfg_a)?;
    let (cfg_b, data_b) = b.write_agent_config(
        "b1",
        &[],
        &format!(
            "[[replicas]]\nname = \"data\"\npath = \"{}\"\n",
            replica.display()
        ),
    )?;
    b.start_agent(&cfg_b)?;
    settle(&data_a).await?;
    let t = Instant::now();
    let st = wait_replica(&a, &b, &data_b, Duration::from_secs(120)).await?;
    eprintln!("initial tree applied in {:?}: {st}", t.elapsed());
    let cmp = tree::compare(&src, &replica)?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "after the first sync: {:?}", cmp.differences);
    assert!(cmp.files > 100, "{cmp:?}");

    // Creates, edits, renames, deletes, chmods, and a whole directory removed.
    let m = tree::mutate(&src, 120, 22)?;
    eprintln!("mutations: {m:?}");
    std::fs::remove_dir_all(src.join("d02"))?;
    settle(&data_a).await?;
    let st = wait_replica(&a, &b, &data_b, Duration::from_secs(120)).await?;
    let cmp = tree::compare(&src, &replica)?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "after the mutations: {:?}", cmp.differences);
    assert!(
        !replica.join("d02").exists(),
        "deleted directory is still in the replica"
    );
    assert_eq!(st["replica_refused"].as_u64(), Some(0), "{st}");
    assert!(st["idle"].as_bool() == Some(true), "{st}");
    // No temp files left behind.
    let leftovers: Vec<_> = walk(&replica)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".lifeboat-replica-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A symlink planted in the replica, pointing outside, is never written through.
    std::os::unix::fs::symlink(&outside, replica.join("evil"))?;
    std::fs::create_dir_all(src.join("evil/deeper"))?;
    std::fs::write(src.join("evil/x.txt"), b"must not escape")?;
    std::fs::write(src.join("evil/deeper/y.txt"), b"nor this")?;
    std::fs::write(src.join("control.txt"), b"applied")?;
    settle(&data_a).await?;
    let st = wait_replica(&a, &b, &data_b, Duration::from_secs(120)).await?;
    assert_eq!(
        std::fs::read_dir(&outside)?.count(),
        0,
        "something was written through the planted symlink"
    );
    assert!(std::fs::symlink_metadata(replica.join("evil"))?
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(replica.join("control.txt"))?, b"applied");
    assert!(
        st["replica_refused"].as_u64() >= Some(1),
        "refusals counted: {st}"
    );
    let log = std::fs::read_to_string(cfg_b.with_extension("log"))?;
    assert!(
        log.contains("replica refused an unsafe path") && log.contains("symlink"),
        "the refusal was not logged: {}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
