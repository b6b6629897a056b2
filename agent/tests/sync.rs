//! End-to-end tests of the agent against an in-process fake coordinator (see `support`).

mod support;

use std::time::Duration;

use lifeboat_agent::{Agent, Options};
use lifeboat_proto::EntryKind;
use support::{dead_addr, pseudo_random, serve, wait_status, Fake, Layout};

/// Small parts so multi-part files stay small.
const PART: usize = 64 * 1024;

fn opts() -> Options {
    Options {
        part_size: PART,
        ..Options::default()
    }
}

async fn once(layout: &Layout, coordinators: Vec<String>) -> lifeboat_agent::Status {
    let agent = Agent::with_options(layout.config(coordinators), opts()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent.run_once())
        .await
        .expect("run_once took too long")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_restart_and_small_edit() {
    let fake = Fake::new();
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    let big = pseudo_random(3 * PART - 1000, 1); // 3 parts
    l.write("big.bin", &big);
    l.write("dir/small.txt", b"hello");
    l.write("dir/empty", b"");
    l.write("dir/deeper/x.txt", &pseudo_random(5000, 2));
    l.write("ignored.tmp", b"excluded");
    // A symlink to a directory outside the root: replicated as a link, never followed.
    let outside = l.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"must never be sent").unwrap();
    std::os::unix::fs::symlink(&outside, l.root.join("link")).unwrap();
    std::os::unix::fs::symlink("dir/small.txt", l.root.join("rel-link")).unwrap();

    // 1. Initial sync: every byte once.
    let s = once(&l, vec![addr.clone()]).await;
    let expected_bytes = (big.len() + 5 + 5000) as u64;
    assert_eq!(fake.payload(), (expected_bytes, 0));
    assert_eq!(s.bytes_sent, expected_bytes);
    assert_eq!(s.payload_bytes_full, expected_bytes);
    assert!(s.idle && s.scan_complete, "{s:?}");
    assert_eq!(s.leader, addr);
    let mut live = fake.live_paths();
    live.sort();
    assert_eq!(
        live,
        vec![
            "data",
            "data/big.bin",
            "data/dir",
            "data/dir/deeper",
            "data/dir/deeper/x.txt",
            "data/dir/empty",
            "data/dir/small.txt",
            "data/link",
            "data/rel-link",
        ]
    );
    assert_eq!(s.files_tracked, 9);
    assert_eq!(s.changes_acked, 9);
    assert_eq!(fake.content("data/big.bin").unwrap(), big);
    assert_eq!(fake.content("data/dir/small.txt").unwrap(), b"hello");
    assert_eq!(fake.content("data/dir/empty").unwrap(), b"");
    {
        let st = fake.st();
        let link = &st.catalog["data/link"];
        assert_eq!(link.kind, EntryKind::Symlink as i32);
        assert_eq!(link.symlink_target, outside.to_str().unwrap());
        assert!(link.parts.is_empty());
        assert!(st.catalog.keys().all(|p| !p.contains("secret")));
        assert_eq!(st.catalog["data"].kind, EntryKind::Dir as i32);
        assert_eq!(st.catalog["data/big.bin"].parts.len(), 3);
        assert_eq!(st.catalog["data/big.bin"].root, "data");
    }
    let status_file = lifeboat_agent::status::read(&l.data_dir).unwrap();
    assert_eq!(status_file.changes_acked, 9);
    assert!(status_file.idle);

    // 2. Restart (new agent, same data dir): nothing to send at all.
    let calls_before = fake.st().calls;
    let s = once(&l, vec![addr.clone()]).await;
    assert_eq!(s.bytes_sent, 0);
    assert_eq!(s.changes_acked, 0);
    assert_eq!(fake.payload(), (expected_bytes, 0));
    assert_eq!(fake.st().calls, calls_before, "no batch should be sent");
    assert_eq!(s.files_tracked, 9);

    // 3. A one-byte edit in the middle part of the 3-part file: only a small delta.
    let mut edited = big.clone();
    edited[PART + PART / 2] ^= 0xff;
    // Keep the mtime from matching by accident.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(l.root.join("big.bin"), &edited).unwrap();
    let s = once(&l, vec![addr.clone()]).await;
    assert_eq!(s.payload_bytes_full, 0, "{s:?}");
    assert!(
        s.payload_bytes_delta > 0 && s.payload_bytes_delta < 8 * 1024,
        "delta of {} bytes",
        s.payload_bytes_delta
    );
    assert_eq!(fake.content("data/big.bin").unwrap(), edited);
    assert_eq!(fake.st().reuse_parts, 2);

    // 4. mtime-only change: a header with every part reused, zero payload bytes.
    let f = std::fs::File::options()
        .write(true)
        .open(l.root.join("big.bin"))
        .unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
    drop(f);
    let seq_before = fake.st().catalog["data/big.bin"].seq;
    let s = once(&l, vec![addr.clone()]).await;
    assert_eq!(s.bytes_sent, 0);
    assert_eq!(s.changes_acked, 1);
    assert!(fake.st().catalog["data/big.bin"].seq > seq_before);
    assert_eq!(fake.content("data/big.bin").unwrap(), edited);

    // 5. Deletes while the agent was down: tombstones for the dir and everything below it.
    std::fs::remove_dir_all(l.root.join("dir")).unwrap();
    let s = once(&l, vec![addr.clone()]).await;
    assert_eq!(s.bytes_sent, 0);
    let mut live = fake.live_paths();
    live.sort();
    assert_eq!(
        live,
        vec!["data", "data/big.bin", "data/link", "data/rel-link"]
    );
    assert!(fake.st().catalog["data/dir/deeper/x.txt"].deleted);
    assert_eq!(s.files_tracked, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_leader_redirect() {
    let leader = Fake::new();
    let leader_addr = serve(leader.clone()).await;
    let follower = Fake::new();
    follower.st().redirect_to = Some(leader_addr.clone());
    let follower_addr = serve(follower.clone()).await;
    let l = Layout::new();
    l.write("a.txt", b"aaaa");
    l.write("b/c.txt", &pseudo_random(3 * PART, 3));
    let s = once(&l, vec![follower_addr.clone()]).await;
    // The agent asks who leads before streaming, so the follower sees a probe, not the parts.
    assert!(follower.st().heartbeats >= 1);
    assert_eq!(
        follower.st().calls,
        0,
        "no part was streamed to the follower"
    );
    assert_eq!(follower.st().batches_acked, 0);
    assert!(leader.st().batches_acked >= 1);
    assert_eq!(s.leader, leader_addr);
    assert_eq!(leader.live_paths().len(), 4);
    assert_eq!(
        leader.content("data/b/c.txt").unwrap(),
        pseudo_random(3 * PART, 3)
    );
    // Parts are only sent to the leader: the follower refused before reading the stream.
    assert_eq!(follower.payload(), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_next_coordinator() {
    let live = Fake::new();
    let live_addr = serve(live.clone()).await;
    let l = Layout::new();
    l.write("a.txt", b"content");
    let s = once(&l, vec![dead_addr(), live_addr.clone()]).await;
    assert_eq!(s.leader, live_addr);
    assert_eq!(live.content("data/a.txt").unwrap(), b"content");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_missing_resends_full() {
    let fake = Fake::new();
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    let data = pseudo_random(2 * PART + 7, 4);
    l.write("a.bin", &data);
    once(&l, vec![addr.clone()]).await;
    // The coordinator loses its blobs; a copy of the file would be sent as `reuse`.
    fake.st().blobs.clear();
    l.write("copy.bin", &data);
    let s = once(&l, vec![addr.clone()]).await;
    assert!(fake.st().base_missing_errors >= 1);
    assert_eq!(s.payload_bytes_full, data.len() as u64);
    assert_eq!(fake.content("data/copy.bin").unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_change_is_dropped() {
    let fake = Fake::new();
    fake.st().reject_paths.insert("data/bad.txt".into());
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    l.write("bad.txt", b"refused");
    l.write("good.txt", b"accepted");
    let s = once(&l, vec![addr]).await;
    let live = fake.live_paths();
    assert!(live.contains(&"data/good.txt".to_string()), "{live:?}");
    assert!(!live.contains(&"data/bad.txt".to_string()));
    assert!(s.idle);
    assert_eq!(s.files_tracked, 2); // "data" and "data/good.txt"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_sends_changes_and_renames() {
    let fake = Fake::new();
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    l.write("first.txt", b"first");
    let agent = Agent::with_options(l.config(vec![addr]), opts()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    wait_status(&l.data_dir, 20, "initial sync", |s| {
        s.idle && s.changes_acked >= 2
    })
    .await;
    assert_eq!(fake.content("data/first.txt").unwrap(), b"first");

    // A new file in a new directory.
    let big = pseudo_random(2 * PART + 5, 5);
    l.write("new/dir/file.bin", &big);
    let t0 = lifeboat_common::now_ms();
    wait_status(&l.data_dir, 20, "new file", |s| {
        s.idle && s.updated_ms > t0 + 100 && s.last_ack_ms >= t0
    })
    .await;
    assert_eq!(fake.content("data/new/dir/file.bin").unwrap(), big);
    let (full_before, delta_before) = fake.payload();

    // A rename: delete of the old path, upsert of the new one with rename_from, no payload.
    std::fs::rename(l.root.join("new/dir/file.bin"), l.root.join("moved.bin")).unwrap();
    let t1 = lifeboat_common::now_ms();
    wait_status(&l.data_dir, 20, "rename", |s| {
        s.idle && s.updated_ms > t1 + 100 && s.last_ack_ms >= t1
    })
    .await;
    assert_eq!(fake.content("data/moved.bin").unwrap(), big);
    {
        let st = fake.st();
        assert!(st.catalog["data/new/dir/file.bin"].deleted);
        assert_eq!(
            st.catalog["data/moved.bin"].rename_from,
            "data/new/dir/file.bin"
        );
    }
    assert_eq!(fake.payload(), (full_before, delta_before));

    // Delete a directory tree.
    std::fs::remove_dir_all(l.root.join("new")).unwrap();
    let t2 = lifeboat_common::now_ms();
    wait_status(&l.data_dir, 20, "delete", |s| {
        s.idle && s.updated_ms > t2 + 100 && s.last_ack_ms >= t2
    })
    .await;
    assert!(fake.st().catalog["data/new"].deleted);
    assert!(fake.st().catalog["data/new/dir"].deleted);
    assert!(fake.st().heartbeats > 0);

    stop_tx.send(()).unwrap();
    let s = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(s.idle, "{s:?}");
    let mut live = fake.live_paths();
    live.sort();
    assert_eq!(live, vec!["data", "data/first.txt", "data/moved.bin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changed_while_sent_is_replanned() {
    let fake = Fake::new();
    // The coordinator reads slowly the first time, so the file changes mid-stream.
    fake.st().slow_ms = 700;
    fake.st().slow_calls = 1;
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    let size = 12 * 1024 * 1024; // more than the HTTP/2 windows: the stream must wait
    let mut data = pseudo_random(size, 6);
    l.write("f.bin", &data);
    let agent = Agent::with_options(
        l.config(vec![addr]),
        Options {
            part_size: PART,
            retain_bytes: 0, // read every part again while streaming
        },
    )
    .unwrap();
    let task = tokio::spawn(agent.run_once());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Rewrite the tail in place (same size).
    let n = data.len();
    for b in &mut data[n - 1000..] {
        *b ^= 0x5a;
    }
    std::fs::write(l.root.join("f.bin"), &data).unwrap();
    let s = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(s.idle);
    assert_eq!(fake.content("data/f.bin").unwrap(), data);
    // The first call was cancelled by the agent (the server never acknowledged it), the second
    // carried the new content.
    assert_eq!(
        fake.st().calls,
        2,
        "the first stream is cancelled and the batch replanned"
    );
    assert_eq!(fake.st().batches_acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_burst_of_files() {
    let fake = Fake::new();
    let addr = serve(fake.clone()).await;
    let l = Layout::new();
    let agent = Agent::with_options(l.config(vec![addr]), opts()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = stop_rx.await;
    }));
    wait_status(&l.data_dir, 20, "initial sync", |s| s.idle).await;
    let started = std::time::Instant::now();
    for d in 0..10 {
        for f in 0..50 {
            l.write(&format!("d{d}/f{f}.txt"), format!("{d}/{f}").as_bytes());
        }
    }
    // Rewrite some of them right away (events merge in the debouncer).
    for f in 0..50 {
        l.write(&format!("d3/f{f}.txt"), b"rewritten");
    }
    let t0 = lifeboat_common::now_ms();
    let s = wait_status(&l.data_dir, 30, "burst", |s| {
        s.idle && s.updated_ms > t0 + 100 && s.files_tracked == 1 + 10 + 500
    })
    .await;
    eprintln!(
        "burst of 550 writes synced in {:?} ({} batches)",
        started.elapsed(),
        s.batches_acked
    );
    assert_eq!(fake.content("data/d3/f7.txt").unwrap(), b"rewritten");
    assert_eq!(fake.content("data/d9/f49.txt").unwrap(), b"9/49");
    assert_eq!(fake.live_paths().len(), 511);
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}
