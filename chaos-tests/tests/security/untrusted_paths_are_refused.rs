//! Paths are untrusted on both ends: the coordinator refuses bad paths (and content that does not
//! hash to what was declared) straight from the wire, restore never writes through a symlink it
//! finds in the target, and symlinks in a protected tree are replicated as links, never followed.

use lifeboat_chaos_tests::invariants;
use lifeboat_common::wire_error::{ErrorCode, WireError};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use lifeboat_chaos_tests::{
    agent_conn, agent_once, files, restore_latest, run, settled_leader, tree, Cluster, ClusterOpts,
};
use lifeboat_common::blob::BlobHash;
use lifeboat_proto::agent_service_client::AgentServiceClient;
use lifeboat_proto::part_data::Body;
use lifeboat_proto::push_message::Msg;
use lifeboat_proto::{
    EntryKind, FileChange, HeartbeatRequest, ListVersionsRequest, PartData, PushMessage, PushReply,
    VersionRow,
};
use tonic::transport::Channel;
use tonic::Code;

/// Every catalog row (all versions, tombstones too) as sent by the leader, unparsed, so that even
/// a path `FileVersion::from_pb` would refuse shows up.
async fn raw_rows(cluster: &Cluster) -> anyhow::Result<Vec<VersionRow>> {
    let (mut admin, _) = cluster.conn().admin().await?;
    let mut s = admin
        .list_versions(ListVersionsRequest {
            prefix: String::new(),
            at_ms: 0,
            all_versions: true,
            include_deleted: true,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.message().await? {
        out.push(r);
    }
    Ok(out)
}

fn change(id: u64, path: &str, kind: EntryKind) -> FileChange {
    FileChange {
        change_id: id,
        path: path.to_string(),
        kind: kind as i32,
        mode: 0o755,
        mtime_ns: 1_700_000_000_000_000_000,
        root: "data".into(),
        ..Default::default()
    }
}

fn msg_change(c: FileChange) -> PushMessage {
    PushMessage {
        msg: Some(Msg::Change(c)),
    }
}

async fn push(
    client: &mut AgentServiceClient<Channel>,
    msgs: Vec<PushMessage>,
) -> Result<PushReply, tonic::Status> {
    client
        .push_changes(futures::stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Pushes a one-part file: the change header `fc` (given `hash` and `size` as its blake3 and
/// size) and its only part with `body`.
async fn push_one_part(
    client: &mut AgentServiceClient<Channel>,
    mut fc: FileChange,
    hash: BlobHash,
    size: u64,
    body: Body,
) -> Result<PushReply, tonic::Status> {
    fc.mode = 0o644;
    fc.size = size;
    fc.blake3 = hash.to_hex();
    fc.part_count = 1;
    let part = PartData {
        index: 0,
        hash: hash.to_hex(),
        size,
        body: Some(body),
        base_hash: String::new(),
    };
    push(
        client,
        vec![
            msg_change(fc),
            PushMessage {
                msg: Some(Msg::Part(part)),
            },
        ],
    )
    .await
}

/// A raw agent client on the leader, once the leader accepts pushes: pushes the well-formed
/// directory change `control` (retrying while no leader is settled) and returns the client and
/// the reply.
async fn ready_client(
    cluster: &Cluster,
    control: &str,
) -> anyhow::Result<(AgentServiceClient<Channel>, PushReply)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let li = settled_leader(cluster).await?;
        let mut client = AgentServiceClient::new(
            agent_conn(cluster, "forger")?.channel(&cluster.coords[li].addr)?,
        );
        match push(
            &mut client,
            vec![msg_change(change(1, control, EntryKind::Dir))],
        )
        .await
        {
            Ok(r) => return Ok((client, r)),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => anyhow::bail!("control push of {control:?} refused: {s:?}"),
        }
    }
}

/// Paths of coordinator `i`'s local copy of blob `h`.
fn blob_file(cluster: &Cluster, i: usize, h: &BlobHash) -> std::path::PathBuf {
    cluster.coords[i].data_dir.join("blobs").join(h.key())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_refuses_bad_paths_from_the_wire() -> anyhow::Result<()> {
    run("t04-wire-paths", |scratch| async move {
        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        // Control: a well-formed change through the same raw client is accepted and listed.
        let (mut client, ok) = ready_client(&cluster, "data/wire-ok").await?;
        assert_eq!(ok.acks.len(), 1, "control push: {ok:?}");

        let bad_paths: &[(&str, &str)] = &[
            ("../escape", "'..'"),
            ("/etc/passwd", "absolute"),
            ("data/../../x", "'..'"),
            ("data//x", "empty or '.' component"),
            ("data\\x", "backslash"),
            ("data/./x", "empty or '.' component"),
            ("", "empty path"),
        ];
        for (i, (p, why)) in bad_paths.iter().enumerate() {
            let err = push(
                &mut client,
                vec![msg_change(change(10 + i as u64, p, EntryKind::Dir))],
            )
            .await
            .expect_err(&format!("path {p:?} was accepted"));
            assert_eq!(err.code(), Code::InvalidArgument, "path {p:?}: {err:?}");
            assert!(
                err.message().contains(why),
                "path {p:?}: message {:?} does not name the problem ({why})",
                err.message()
            );
        }

        // rename_from is a path from the wire too.
        let mut c = change(30, "data/renamed-target", EntryKind::Dir);
        c.rename_from = "data/../../etc".into();
        let err = push(&mut client, vec![msg_change(c)])
            .await
            .expect_err("rename_from with '..' was accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("'..'"), "{:?}", err.message());

        // One call is one batch: a bad change refuses the good one sent with it.
        let err = push(
            &mut client,
            vec![
                msg_change(change(40, "data/good-in-bad-batch", EntryKind::Dir)),
                msg_change(change(41, "../escape2", EntryKind::Dir)),
            ],
        )
        .await
        .expect_err("batch with a bad path was accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        // ... and names the bad change in the coded details, so that the agent drops it alone.
        let coded = WireError::of(&err).expect("a coded refusal");
        assert_eq!(coded.code, ErrorCode::InvalidChange, "{err:?}");
        assert_eq!(coded.change_id, Some(41), "{err:?}");
        assert_eq!(coded.path.as_deref(), Some("../escape2"), "{err:?}");

        // A part whose content does not hash to the declared part hash.
        let content = b"what the agent really sent\n".repeat(100);
        let declared = BlobHash::of(b"something else entirely");
        let err = push_one_part(
            &mut client,
            change(50, "data/badhash.txt", EntryKind::File),
            declared,
            content.len() as u64,
            Body::Full(content.clone()),
        )
        .await
        .expect_err("part with a wrong hash was accepted");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            WireError::of(&err).and_then(|w| w.change_id),
            Some(50),
            "a bad part names its change: {err:?}"
        );
        assert!(
            err.message().contains("does not hash to"),
            "{:?}",
            err.message()
        );
        for i in 0..cluster.coords.len() {
            for h in [declared, BlobHash::of(&content)] {
                let f = blob_file(&cluster, i, &h);
                assert!(
                    !f.exists(),
                    "refused part was stored anyway at {}",
                    f.display()
                );
            }
        }

        // Parts compressed by the agent (`encoded`) are decoded and checked the same way: a
        // wrong content hash, bytes that are not a blob, and a zstd frame that expands past
        // the part size limit are all refused, and none is stored.
        let bomb = vec![0u8; lifeboat_common::PART_SIZE + 1];
        let cases: Vec<(&str, Vec<u8>, BlobHash, u64, &str)> = vec![
            (
                "data/enc-badhash.txt",
                lifeboat_common::blob::encode(&content),
                declared,
                content.len() as u64,
                "hashes to",
            ),
            (
                "data/enc-garbage.txt",
                b"not a blob at all".to_vec(),
                BlobHash::of(&content),
                content.len() as u64,
                "bad magic",
            ),
            (
                "data/enc-bomb.txt",
                lifeboat_common::blob::encode(&bomb),
                BlobHash::of(&bomb[..lifeboat_common::PART_SIZE]),
                lifeboat_common::PART_SIZE as u64,
                "zstd",
            ),
        ];
        for (i, (path, encoded, hash, size, why)) in cases.into_iter().enumerate() {
            let err = push_one_part(
                &mut client,
                change(60 + i as u64, path, EntryKind::File),
                hash,
                size,
                Body::Encoded(encoded),
            )
            .await
            .expect_err("bad encoded part was accepted");
            assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
            assert!(
                err.message().contains("encoded part") && err.message().contains(why),
                "{path}: {:?}",
                err.message()
            );
            for c in 0..cluster.coords.len() {
                assert!(
                    !blob_file(&cluster, c, &hash).exists(),
                    "{path}: refused encoded part was stored"
                );
            }
        }

        // Nothing refused reached the catalog; the control did.
        let rows = raw_rows(&cluster).await?;
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert!(
            paths.contains(&"data/wire-ok"),
            "control missing from {paths:?}"
        );
        for p in bad_paths.iter().map(|(p, _)| *p).chain([
            "data/renamed-target",
            "data/good-in-bad-batch",
            "../escape2",
            "data/badhash.txt",
            "data/enc-badhash.txt",
            "data/enc-garbage.txt",
            "data/enc-bomb.txt",
        ]) {
            assert!(
                !paths.contains(&p),
                "refused path {p:?} is in the catalog: {paths:?}"
            );
        }
        assert_eq!(rows.len(), 1, "unexpected catalog rows: {paths:?}");
        // The CLI's listing agrees (and would fail on a bad row).
        let (listed, _) = files::list(&cluster.conn(), "", None, false, true).await?;
        let listed: Vec<&str> = listed.iter().map(|v| v.v.path.as_str()).collect();
        assert_eq!(listed, vec!["data/wire-ok"]);
        anyhow::Ok(())
    })
    .await
}

/// Whole-file blake3 declared by the agent that does not match the content of its (correctly
/// hashed) parts. Accepting it commits a version no restore can ever verify.
/// A leader probe (`probe = true`, which agents send before `PushChanges` / `PutParts`) is
/// answered but does not replace the agent's last heartbeat, which region health and the
/// promotion wait read; a real heartbeat does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_probe_keeps_the_last_heartbeat() -> anyhow::Result<()> {
    run("t04-probe", |scratch| async move {
        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        ready_client(&cluster, "data/control").await?;
        let mut client = AgentServiceClient::new(
            agent_conn(&cluster, "probed")?.channel(&cluster.coords[0].addr)?,
        );
        let hb = |files_tracked: u64, probe: bool| HeartbeatRequest {
            agent_id: "probed".into(),
            files_tracked,
            probe,
            ..Default::default()
        };
        let tracked = |st: Option<lifeboat_proto::StatusReply>| {
            st.and_then(|s| {
                s.agents
                    .iter()
                    .find(|a| a.agent_id == "probed")
                    .map(|a| a.files_tracked)
            })
        };
        client.heartbeat(hb(42, false)).await?;
        let reply = client.heartbeat(hb(0, true)).await?.into_inner();
        assert!(
            !reply.leader_addr.is_empty(),
            "a probe learns the leader: {reply:?}"
        );
        assert_eq!(
            tracked(cluster.status_of(0).await),
            Some(42),
            "the probe replaced the report"
        );
        client.heartbeat(hb(7, false)).await?;
        assert_eq!(tracked(cluster.status_of(0).await), Some(7));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_refuses_file_hash_not_matching_its_parts() -> anyhow::Result<()> {
    run("t04-file-hash", |scratch| async move {
        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        let (mut client, _) = ready_client(&cluster, "data/control").await?;
        let content = b"honest part, dishonest file hash\n".repeat(50);
        let part_hash = BlobHash::of(&content);
        let mut fc = change(1, "data/lying.txt", EntryKind::File);
        fc.mode = 0o644;
        fc.size = content.len() as u64;
        fc.blake3 = BlobHash::of(b"not the content").to_hex();
        fc.part_count = 1;
        let part = PartData {
            index: 0,
            hash: part_hash.to_hex(),
            size: content.len() as u64,
            body: Some(Body::Full(content.clone())),
            base_hash: String::new(),
        };
        let r = push(
            &mut client,
            vec![
                msg_change(fc),
                PushMessage {
                    msg: Some(Msg::Part(part)),
                },
            ],
        )
        .await;
        let err =
            r.expect_err("a file whose declared blake3 does not match its parts was committed");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        let rows = raw_rows(&cluster).await?;
        assert!(
            rows.iter().all(|r| r.path != "data/lying.txt"),
            "committed anyway"
        );
        anyhow::Ok(())
    })
    .await
}

/// `PutParts` with parts sent without a hash (as the agent's snapshot pre-upload sends them):
/// the leader computes each part's blake3 from the content, names it in the reply and stores the
/// blob on a majority; garbage and non-whole parts are refused unstored. A file pushed later
/// that reuses the named parts commits only if its declared whole-file blake3 matches them, so a
/// wrongly named part cannot slip into the catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_parts_names_unhashed_parts_and_the_file_hash_binds_them() -> anyhow::Result<()> {
    run("t04-unhashed-parts", |scratch| async move {
        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        let (mut client, _) = ready_client(&cluster, "data/control").await?;
        let part_size = lifeboat_common::PART_SIZE;
        let mut first = vec![0u8; part_size];
        for (i, chunk) in first.chunks_mut(64).enumerate() {
            chunk[..8].copy_from_slice(&(i as u64 / 7).to_le_bytes());
        }
        let second = b"the short last part\n".repeat(40);
        let unhashed = |index: u32, content: &[u8], body: Body| PartData {
            index,
            hash: String::new(),
            size: content.len() as u64,
            body: Some(body),
            base_hash: String::new(),
        };
        let parts = vec![
            unhashed(
                0,
                &first,
                Body::Encoded(lifeboat_common::blob::encode(&first)),
            ),
            unhashed(1, &second, Body::Full(second.clone())),
        ];
        let reply = client
            .put_parts(futures::stream::iter(parts))
            .await?
            .into_inner();
        let (h0, h1) = (BlobHash::of(&first), BlobHash::of(&second));
        assert_eq!(reply.stored, vec![h0.to_hex(), h1.to_hex()]);
        for h in [h0, h1] {
            let copies = (0..cluster.coords.len())
                .filter(|&i| blob_file(&cluster, i, &h).exists())
                .count();
            assert!(copies >= 2, "blob {h} on {copies} of 3 coordinators");
        }

        // The named parts make up a file only with the file's true blake3.
        let whole: Vec<u8> = [first.as_slice(), second.as_slice()].concat();
        let reuse = |index: u32, h: BlobHash, size: usize| PushMessage {
            msg: Some(Msg::Part(PartData {
                index,
                hash: h.to_hex(),
                size: size as u64,
                body: Some(Body::Reuse(true)),
                base_hash: String::new(),
            })),
        };
        let file = |id: u64, path: &str, blake3: BlobHash| {
            let mut fc = change(id, path, EntryKind::File);
            fc.mode = 0o644;
            fc.size = whole.len() as u64;
            fc.blake3 = blake3.to_hex();
            fc.part_count = 2;
            msg_change(fc)
        };
        let mut other = whole.clone();
        other[part_size + 3] ^= 1;
        let err = push(
            &mut client,
            vec![
                file(2, "data/misnamed.bin", BlobHash::of(&other)),
                reuse(0, h0, part_size),
                reuse(1, h1, second.len()),
            ],
        )
        .await
        .expect_err("a file whose parts do not hash to its blake3 was committed");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("content hashes to"), "{err:?}");
        push(
            &mut client,
            vec![
                file(3, "data/two-parts.bin", BlobHash::of(&whole)),
                reuse(0, h0, part_size),
                reuse(1, h1, second.len()),
            ],
        )
        .await
        .context("the file of the named parts")?;
        let rows = raw_rows(&cluster).await?;
        let paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert!(paths.contains(&"data/two-parts.bin"), "{paths:?}");
        assert!(!paths.contains(&"data/misnamed.bin"), "{paths:?}");

        // Unhashed garbage is refused, and a delta needs a hash and a base: refused too.
        let junk = b"not a blob at all".to_vec();
        let err = client
            .put_parts(futures::stream::iter(vec![unhashed(
                0,
                &second,
                Body::Encoded(junk.clone()),
            )]))
            .await
            .expect_err("an unhashed garbage part was stored");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains("encoded part") && err.message().contains("bad magic"),
            "{err:?}"
        );
        let err = client
            .put_parts(futures::stream::iter(vec![unhashed(
                0,
                &second,
                Body::Delta(b"delta".to_vec()),
            )]))
            .await
            .expect_err("an unhashed delta part was stored");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        anyhow::Ok(())
    })
    .await
}

fn write(p: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(p.parent().unwrap())?;
    std::fs::write(p, data)?;
    Ok(())
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_never_writes_through_a_symlink() -> anyhow::Result<()> {
    run("t04-restore-symlink", |scratch| async move {
        let src = scratch.join("src");
        tree::generate(&src, 60, 0, 401)?;
        write(&src.join("sub/a.txt"), b"alpha\n")?;
        write(&src.join("sub/deeper/b.txt"), &b"bravo ".repeat(1000))?;
        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let (cfg, agent_data) = cluster.write_agent_config("agent1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &agent_data).await?;

        // Control: a clean target restores fine.
        let clean = scratch.join("clean");
        restore_latest(&cluster, "data", &clean).await?;
        invariants::restore_equals(&src, &clean.join("data"))?;

        // A target where data/sub is a symlink to a directory outside the target.
        let target = scratch.join("target");
        let outside = scratch.join("outside");
        std::fs::create_dir_all(target.join("data"))?;
        std::fs::create_dir_all(&outside)?;
        std::os::unix::fs::symlink(&outside, target.join("data/sub"))?;
        let before = invariants::DirSnapshot::take(&scratch)?;
        let err = restore_latest(&cluster, "data", &target)
            .await
            .err()
            .context("restore through a symlinked data/sub succeeded")?;
        let msg = format!("{err:#}");
        eprintln!("restore refused: {msg}");
        assert!(
            msg.contains("symlink"),
            "error does not mention the symlink: {msg}"
        );
        assert!(
            entries(&outside).is_empty(),
            "restore wrote outside the target through the symlink: {:?}",
            entries(&outside)
        );
        assert!(
            std::fs::symlink_metadata(target.join("data/sub"))?
                .file_type()
                .is_symlink(),
            "the symlink in the target was replaced"
        );
        invariants::nothing_written_outside(&before, &target.join("data"))?;
        anyhow::Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_are_replicated_as_links_not_followed() -> anyhow::Result<()> {
    run("t04-symlink-replication", |scratch| async move {
        let src = scratch.join("src");
        tree::generate(&src, 60, 0, 411)?;
        let outside = scratch.join("outside");
        let secret =
            b"TOP SECRET: outside the protected root, must never be replicated\n".repeat(20);
        write(&outside.join("secret.txt"), &secret)?;
        write(&outside.join("nested/more.txt"), b"also outside\n")?;
        std::os::unix::fs::symlink(&outside, src.join("escape"))?;
        std::os::unix::fs::symlink("../outside", src.join("rel-escape"))?;
        // A link to a file outside, too.
        std::os::unix::fs::symlink(outside.join("secret.txt"), src.join("secret-link"))?;

        let cluster = Cluster::start(&scratch.join("cluster"), &ClusterOpts::default())?;
        cluster.wait_leader(Duration::from_secs(30), None).await?;
        let (cfg, agent_data) = cluster.write_agent_config("agent1", &[("data", &src)], "")?;
        agent_once(&cluster, &cfg, &agent_data).await?;

        let rows = raw_rows(&cluster).await?;
        let links = [
            ("data/escape", outside.display().to_string()),
            ("data/rel-escape", "../outside".to_string()),
            (
                "data/secret-link",
                outside.join("secret.txt").display().to_string(),
            ),
        ];
        for (p, target) in &links {
            let row = rows
                .iter()
                .find(|r| r.path == *p)
                .with_context(|| format!("{p} not in the catalog"))?;
            assert_eq!(
                row.kind,
                EntryKind::Symlink as i32,
                "{p} not stored as a symlink: {row:?}"
            );
            assert_eq!(&row.symlink_target, target, "{p}");
            assert!(
                row.parts.is_empty() && row.blake3.is_empty(),
                "{p} has content: {row:?}"
            );
            let under = format!("{p}/");
            let inside: Vec<&str> = rows
                .iter()
                .filter(|r| r.path.starts_with(&under))
                .map(|r| r.path.as_str())
                .collect();
            assert!(inside.is_empty(), "the link {p} was followed: {inside:?}");
        }
        let secret_hash = BlobHash::of(&secret);
        for r in &rows {
            assert!(
                !r.parts.iter().any(|x| x.hash == secret_hash.to_hex()),
                "the outside file's content is in the catalog as {}",
                r.path
            );
        }
        for i in 0..cluster.coords.len() {
            let f = blob_file(&cluster, i, &secret_hash);
            assert!(
                !f.exists(),
                "the outside file's content was stored: {}",
                f.display()
            );
        }

        let to = scratch.join("restore");
        restore_latest(&cluster, "data", &to).await?;
        for (p, target) in &links {
            let dest = to.join(p);
            let md = std::fs::symlink_metadata(&dest)
                .with_context(|| format!("{} not restored", dest.display()))?;
            assert!(
                md.file_type().is_symlink(),
                "{} restored as {:?}, not a symlink",
                dest.display(),
                md.file_type()
            );
            assert_eq!(std::fs::read_link(&dest)?.display().to_string(), *target);
        }
        invariants::restore_equals(&src, &to.join("data"))?;
        assert_eq!(
            std::fs::read(outside.join("secret.txt"))?,
            secret,
            "the outside file was touched"
        );
        anyhow::Ok(())
    })
    .await
}
