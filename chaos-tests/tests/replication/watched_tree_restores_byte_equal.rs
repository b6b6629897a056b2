//! F1/F2: a watched tree with creates, edits, renames, deletes and mode changes restores
//! byte-for-byte; an agent restart re-sends no unchanged file.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use lifeboat_chaos_tests::*;

fn mtime_ns(p: &Path) -> i64 {
    let m = std::fs::metadata(p).unwrap();
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_tree_with_mutations_restores_byte_equal() -> anyhow::Result<()> {
    let mut s = Scratch::new("t01");
    let src = s.dir.join("src");
    tree::generate(&src, 300, 9_000_000, 1)?;
    let mut cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster
        .wait_leader(std::time::Duration::from_secs(30), None)
        .await?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    cluster.start_agent(&cfg)?;
    settle(&data).await?;
    // Mutations while the agent watches: creates, edits (incl. mid-file), renames, deletes, chmods.
    let m = tree::mutate(&src, 120, 2)?;
    assert!(
        m.created > 0 && m.edited > 0 && m.renamed > 0 && m.deleted > 0 && m.chmods > 0,
        "{m:?}"
    );
    // A whole directory renamed and one removed.
    std::fs::rename(src.join("d01"), src.join("d01-renamed"))?;
    std::fs::remove_dir_all(src.join("d02"))?;
    settle(&data).await?;

    let out = s.dir.join("restored");
    let report = restore_latest(&cluster, "data", &out).await?;
    let cmp = tree::compare(&src, &out.join("data"))?;
    if !cmp.equal() {
        s.keep();
    }
    assert!(cmp.equal(), "differences: {:?}", cmp.differences);
    assert_eq!(report.files, cmp.files, "every file restored");
    assert!(
        !out.join("data/d02").exists(),
        "deleted directory must not come back"
    );
    // mtimes come back too.
    let probe = std::fs::read_dir(src.join("d03/s00"))?
        .next()
        .unwrap()?
        .path();
    let rel = probe.strip_prefix(&src)?;
    assert_eq!(
        mtime_ns(&probe),
        mtime_ns(&out.join("data").join(rel)),
        "mtime of {}",
        rel.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_resends_no_unchanged_file() -> anyhow::Result<()> {
    let s = Scratch::new("t01b");
    let src = s.dir.join("src");
    let st = tree::generate(&src, 150, 5_000_000, 3)?;
    let cluster = Cluster::start(&s.dir.join("cluster"), &ClusterOpts::default())?;
    cluster
        .wait_leader(std::time::Duration::from_secs(30), None)
        .await?;
    let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
    let first = agent_once(&cluster, &cfg, &data).await?;
    let sent1 = first["bytes_sent"].as_u64().unwrap();
    assert!(
        sent1 >= st.bytes / 2,
        "initial sync sent {sent1} of {} bytes",
        st.bytes
    );
    // Restart with nothing changed: zero payload bytes.
    let second = agent_once(&cluster, &cfg, &data).await?;
    assert_eq!(
        second["bytes_sent"].as_u64(),
        Some(0),
        "restart re-sent data: {second}"
    );
    // Touch one file (mtime only): still zero payload bytes, content reused.
    let f = src.join("d00/s00").read_dir()?.next().unwrap()?.path();
    std::fs::File::options()
        .write(true)
        .open(&f)?
        .set_modified(std::time::SystemTime::now())?;
    let third = agent_once(&cluster, &cfg, &data).await?;
    assert_eq!(
        third["bytes_sent"].as_u64(),
        Some(0),
        "touch re-sent data: {third}"
    );
    // Append 10 bytes to the 5 MB file: only a small delta goes.
    {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("big/large.bin"))?
            .write_all(b"0123456789")?;
    }
    let fourth = agent_once(&cluster, &cfg, &data).await?;
    let sent4 = fourth["bytes_sent"].as_u64().unwrap();
    assert!(
        sent4 > 0 && sent4 < 64 * 1024,
        "10-byte append sent {sent4} bytes"
    );
    let out = s.dir.join("restored");
    restore_latest(&cluster, "data", &out).await?;
    invariants::restore_equals(&src, &out.join("data"))?;
    Ok(())
}
