//! Blob poisoning (issue 17, item 3): a stored blob counts as held only once it decoded to the
//! content its name says, whoever sent it and whether or not a file of that name existed.
//!
//! - A peer with a coordinator certificate (authorized for `PutBlobs`) sends a valid blob of other
//!   content under the hash of a file an agent will write later: refused INVALID_ARGUMENT, and
//!   nothing is stored under that name.
//! - Garbage already sits under that hash on every coordinator (as an older version, or a
//!   tampered disk, would leave it): when the agent writes the file, each coordinator replaces
//!   its copy, so the acknowledged file restores byte for byte from every node.

use lifeboat_chaos_tests::*;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::StoredBlob;

/// What the agent writes later, and its blob's name.
fn target() -> (Vec<u8>, BlobHash) {
    let content = b"the file an agent writes after the attack\n".repeat(200);
    let h = BlobHash::of(&content);
    (content, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_blobs_refuses_a_copy_of_other_content_under_a_future_hash() -> anyhow::Result<()> {
    run("blob_poison_put", |dir| async move {
        let cluster = Cluster::start(&dir.join("cluster"), &ClusterOpts::default())?;
        let lead = settled_leader(&cluster).await?;
        let follower = (0..3).find(|&i| i != lead).unwrap();
        let (_, h) = target();
        // A well-formed blob, but of other content: only decoding tells.
        let forged = blob::encode(b"attacker's bytes, named after someone else's file\n");

        // Authorized: the certificate of another coordinator of the region.
        let mut conn = cluster.conn();
        let peer = &cluster.coords[lead];
        conn.cert = Some(cluster.certs.join(format!("coord{}.pem", peer.id)));
        conn.key = Some(cluster.certs.join(format!("coord{}.key", peer.id)));
        let mut client = BlobServiceClient::new(conn.channel(&cluster.coords[follower].addr)?);
        let err = client
            .put_blobs(futures::stream::iter(vec![StoredBlob {
                hash: h.to_hex(),
                // The digest an earlier receiver trusted instead of decoding: anyone can
                // compute it.
                stored_blake3: blake3::hash(&forged).as_bytes().to_vec(),
                stored: forged,
            }]))
            .await
            .expect_err("a copy of other content was stored");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let path = cluster.coords[follower]
            .data_dir
            .join("blobs")
            .join(h.key());
        assert!(!path.exists(), "nothing may be stored under {h}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_copy_is_replaced_when_the_real_blob_arrives() -> anyhow::Result<()> {
    run("blob_poison_planted", |dir| async move {
        // Plants and reads the stored LBB1 form on disk: a plaintext store.
        let opts = ClusterOpts {
            encryption: false,
            ..Default::default()
        };
        let mut cluster = Cluster::start(&dir.join("cluster"), &opts)?;
        settled_leader(&cluster).await?;
        let (content, h) = target();
        let garbage = blob::encode(b"planted garbage\n");
        for c in &cluster.coords {
            let path = c.data_dir.join("blobs").join(h.key());
            std::fs::create_dir_all(path.parent().unwrap())?;
            std::fs::write(&path, &garbage)?;
        }

        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("file.txt"), &content)?;
        let (cfg, data) = cluster.write_agent_config("a1", &[("data", &src)], "")?;
        cluster.start_agent(&cfg)?;
        let st = settle(&data).await?;
        assert_eq!(st["pending_changes"], 0, "{st}");

        // Every coordinator's copy now holds the file's content.
        for c in &cluster.coords {
            let path = c.data_dir.join("blobs").join(h.key());
            let stored = std::fs::read(&path)?;
            let raw = blob::decode(&h, &stored, lifeboat_common::PART_SIZE)
                .map_err(|e| anyhow::anyhow!("node {}: {e}", c.id))?;
            assert_eq!(raw, content, "node {}", c.id);
        }
        let restored = dir.join("restored");
        restore_latest(&cluster, "data", &restored).await?;
        assert_eq!(std::fs::read(restored.join("data/file.txt"))?, content);
        Ok(())
    })
    .await
}
