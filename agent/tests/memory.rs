//! The agent binary (`--once`) syncs a 200 MB file with 4 MiB parts while its peak RSS stays well
//! under 150 MiB: parts are read one at a time, never the whole file.

mod support;

use std::io::Write;

use support::{serve, Fake, Layout};

fn write_config(l: &Layout, addr: &str) -> std::path::PathBuf {
    let path = l.tmp.path().join("agent.toml");
    let text = format!(
        "agent_id = \"mem-test\"\ndata_dir = {:?}\ncoordinators = [{addr:?}]\n\n[[paths]]\nname = \"data\"\npath = {:?}\n\n[tls]\ninsecure = true\n",
        l.data_dir, l.root
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_peak_rss_is_bounded() {
    const SIZE: usize = 200 * 1000 * 1000;
    let fake = Fake::default(); // keeps hashes only, not content
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    {
        let mut f = std::fs::File::create(l.root.join("big.bin")).unwrap();
        let block = support::pseudo_random(1 << 20, 7);
        let mut left = SIZE;
        let mut i = 0u8;
        while left > 0 {
            let mut b = block.clone();
            b[0] = i; // every MiB distinct
            b[1] = (left >> 20) as u8;
            let n = left.min(b.len());
            f.write_all(&b[..n]).unwrap();
            left -= n;
            i = i.wrapping_add(1);
        }
    }
    let config = write_config(&l, &addr);
    let bin = env!("CARGO_BIN_EXE_lifeboat-agent");
    let status = tokio::process::Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("--once")
        .env("RUST_LOG", "warn")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "agent exited with {status}");
    // Peak RSS of waited-for children, in KiB on Linux.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the zeroed struct we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0);
    let peak_mib = usage.ru_maxrss as f64 / 1024.0;
    eprintln!("agent peak RSS: {peak_mib:.1} MiB");
    assert!(peak_mib < 150.0, "peak RSS {peak_mib:.1} MiB");
    assert_eq!(fake.payload().0, SIZE as u64);
    let s = lifeboat_agent::status::read(&l.data_dir).unwrap();
    assert!(s.idle, "{s:?}");
    assert_eq!(s.bytes_sent, SIZE as u64);
    let st = fake.st();
    assert_eq!(
        st.catalog["data/big.bin"].parts.len(),
        SIZE.div_ceil(lifeboat_common::PART_SIZE)
    );
}
