//! Snapshot spool files, written off the reading task.
//!
//! A snapshot source (Redis RDB stream, `pg_basebackup` tar, exec command) is read by one task
//! that also hands each part to the pre-upload. Writing the spool in that same task made reading
//! wait for every write; and a buffered write of a fresh file spends most of its time copying
//! into newly allocated page-cache pages (on the test machines, 2.4 s of CPU per GB against
//! 0.7 s for the same bytes with `O_DIRECT`). A [`SpoolFile`] therefore:
//!
//! - collects the bytes in 4 MiB blocks aligned to 4096 bytes and hands each full block to a
//!   writer thread (at most [`QUEUE_BLOCKS`] waiting: the reader waits only when the disk is
//!   slower than the source);
//! - opens the file with `O_DIRECT` where the filesystem allows it (falls back to buffered
//!   writes on `EINVAL`, for example on tmpfs; the last, partial block is always written
//!   buffered);
//! - computes the whole-file blake3 in a hash thread and, with a pre-upload
//!   ([`crate::snapshot::preupload`]), offers each block (a block is one part) to the upload, whose
//!   leader computes the part's blake3 (a part the upload does not take is hashed here), then
//!   hands the block to a disk thread (device writes overlap hashing);
//! - on [`SpoolFile::finish`], writes the tail and fsyncs (data and size durable), then finishes
//!   the pre-upload (recording the parts' hashes for planning) before returning the byte count
//!   and hash.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use lifeboat_common::blob::BlobHash;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::snapshot::block::{Block, SharedBlock, ALIGN};

/// Bytes per block handed to the writer without a pre-upload (with one: its part size).
pub const BLOCK_BYTES: usize = lifeboat_common::PART_SIZE;
/// Full blocks waiting for the writer at most (with the one being filled and the one being
/// written: about 24 MiB of memory).
pub const QUEUE_BLOCKS: usize = 4;

/// A spool file being written (see the module documentation). Dropping it without
/// [`SpoolFile::finish`] stops the writer; the caller removes the file.
pub struct SpoolFile {
    path: PathBuf,
    block: Block,
    tx: Option<mpsc::Sender<Block>>,
    spare: std::sync::mpsc::Receiver<Block>,
    writer: Option<JoinHandle<std::io::Result<Written>>>,
    up: crate::snapshot::preupload::Preupload,
    bytes: u64,
}

/// What the writer thread wrote: the whole-file blake3 and, with a pre-upload, every part's
/// size in order with its blake3 when computed here (`None` for a part the pre-upload took: the
/// leader hashes it).
struct Written {
    whole: blake3::Hash,
    parts: Vec<(Option<BlobHash>, u64)>,
    times: StageTimes,
}

impl std::fmt::Debug for SpoolFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolFile")
            .field("path", &self.path)
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Turns `O_DIRECT` on or off for `file`.
fn set_direct(file: &std::fs::File, on: bool) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor owned by `file` for the duration of the calls; no memory
    // is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` for writing (created or truncated, mode 0600), with `O_DIRECT` when the
/// filesystem accepts it. Returns the file and whether `O_DIRECT` is on.
fn open(path: &Path) -> std::io::Result<(std::fs::File, bool)> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true).mode(0o600);
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((o.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// Time the spool's stages spent, in ms, for the log line of [`SpoolFile::finish`] (where a
/// slow snapshot waited).
#[derive(Debug, Default, Clone, Copy)]
struct StageTimes {
    /// The hash stage waiting for the next block (the source was slower).
    starved_ms: u64,
    /// Hashing (the whole file, and parts not offered to the pre-upload).
    hash_ms: u64,
    /// Offering parts to the pre-upload (waiting when its queue was full).
    offer_ms: u64,
    /// Waiting for the disk stage to take a block (the disk was slower).
    disk_wait_ms: u64,
    /// The disk stage writing blocks (including device time with `O_DIRECT`).
    write_ms: u64,
}

fn ms_since(t: std::time::Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Full blocks waiting for the disk stage at most.
const DISK_QUEUE: usize = 2;

/// The hash stage (a blocking thread): hashes each block in order (and, with `parts`, hashes
/// it as a part and offers it to the pre-upload), then hands it to the disk stage
/// ([`write_disk`], its own thread), so hashing and device writes overlap. Returns when every
/// block is written and the file fsync'd.
fn write_blocks(
    file: std::fs::File,
    direct: bool,
    mut rx: mpsc::Receiver<Block>,
    spare: std::sync::mpsc::SyncSender<Block>,
    mut parts: Option<crate::snapshot::preupload::PartSender>,
) -> std::io::Result<Written> {
    let (disk_tx, disk_rx) =
        std::sync::mpsc::sync_channel::<std::sync::Arc<SharedBlock>>(DISK_QUEUE);
    let disk = std::thread::Builder::new()
        .name("lifeboat-spool-disk".into())
        .spawn(move || write_disk(file, direct, disk_rx))?;
    let mut hasher = blake3::Hasher::new();
    let mut hashes = Vec::new();
    let mut times = StageTimes::default();
    loop {
        let t = std::time::Instant::now();
        let Some(b) = rx.blocking_recv() else { break };
        times.starved_ms += ms_since(t);
        let b = std::sync::Arc::new(SharedBlock {
            block: Some(b),
            spare: spare.clone(),
        });
        let data = b.bytes();
        let t = std::time::Instant::now();
        hasher.update(data);
        times.hash_ms += ms_since(t);
        if let (Some(p), false) = (parts.as_mut(), data.is_empty()) {
            // An offered part is hashed by the leader (its reply names it); one the upload
            // did not take is hashed here, for planning the push.
            let t = std::time::Instant::now();
            let offered = p.offer(hashes.len() as u32, &b);
            times.offer_ms += ms_since(t);
            let t = std::time::Instant::now();
            let hash = (!offered).then(|| BlobHash::of(data));
            times.hash_ms += ms_since(t);
            hashes.push((hash, data.len() as u64));
        }
        let t = std::time::Instant::now();
        if disk_tx.send(b).is_err() {
            // The disk stage failed: its error is returned below.
            break;
        }
        times.disk_wait_ms += ms_since(t);
    }
    drop(disk_tx);
    times.write_ms = disk
        .join()
        .map_err(|_| std::io::Error::other("the spool's disk thread panicked"))??;
    Ok(Written {
        whole: hasher.finalize(),
        parts: hashes,
        times,
    })
}

/// The disk stage: writes each block (dropping its share, which returns the block to the spare
/// pool once the pre-upload is done with it too), and at the end fsyncs. `O_DIRECT` is turned
/// off for a partial block (only the last) or when a write is refused with `EINVAL`. Returns
/// the ms spent writing.
fn write_disk(
    mut file: std::fs::File,
    mut direct: bool,
    rx: std::sync::mpsc::Receiver<std::sync::Arc<SharedBlock>>,
) -> std::io::Result<u64> {
    let mut write_ms = 0;
    for b in rx {
        let t = std::time::Instant::now();
        let data = b.bytes();
        if direct && data.len() % ALIGN != 0 {
            set_direct(&file, false)?;
            direct = false;
        }
        let mut done = 0;
        while done < data.len() {
            match file.write(&data[done..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    set_direct(&file, false)?;
                    direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        write_ms += ms_since(t);
    }
    let t = std::time::Instant::now();
    file.flush()?;
    file.sync_all()?;
    Ok(write_ms + ms_since(t))
}

impl SpoolFile {
    /// Creates (or truncates) `path`, mode 0600, and starts its writer thread, which offers
    /// every part to `up` (blocks are then `up`'s part size).
    ///
    /// Errors: the file cannot be created.
    pub async fn create(
        path: &Path,
        mut up: crate::snapshot::preupload::Preupload,
    ) -> std::io::Result<SpoolFile> {
        let p = path.to_path_buf();
        let (file, direct) = tokio::task::spawn_blocking(move || open(&p))
            .await
            .map_err(std::io::Error::other)??;
        let (tx, rx) = mpsc::channel(QUEUE_BLOCKS);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel(QUEUE_BLOCKS + 2);
        let sender = up.take_sender();
        let writer =
            tokio::task::spawn_blocking(move || write_blocks(file, direct, rx, spare_tx, sender));
        Ok(SpoolFile {
            path: path.to_path_buf(),
            block: Block::new(up.part_size().unwrap_or(BLOCK_BYTES)),
            tx: Some(tx),
            spare,
            writer: Some(writer),
            up,
            bytes: 0,
        })
    }

    /// Appends `data`; waits only while [`QUEUE_BLOCKS`] full blocks are waiting.
    ///
    /// Errors: the writer failed (its error is returned by [`SpoolFile::finish`]; here a
    /// `BrokenPipe` naming the file).
    pub async fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = self.block.fill(data);
            data = &data[n..];
            self.bytes += n as u64;
            if self.block.is_full() {
                self.send().await?;
            }
        }
        Ok(())
    }

    async fn send(&mut self) -> std::io::Result<()> {
        let cap = self.block.cap;
        let next = self.spare.try_recv().unwrap_or_else(|_| Block::new(cap));
        let full = std::mem::replace(&mut self.block, next);
        let Some(tx) = &self.tx else {
            return Err(self.broken());
        };
        if tx.send(full).await.is_err() {
            return Err(self.broken());
        }
        Ok(())
    }

    fn broken(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            format!("the writer of {} stopped", self.path.display()),
        )
    }

    /// Writes the last block, fsyncs, finishes the pre-upload, and returns the bytes written
    /// and their blake3.
    ///
    /// Errors: any write or fsync error of the writer.
    pub async fn finish(mut self) -> std::io::Result<(u64, blake3::Hash)> {
        if self.block.len > 0 {
            let _ = self.send().await;
        }
        self.tx = None;
        let Some(writer) = self.writer.take() else {
            return Err(self.broken());
        };
        let w = writer.await.map_err(std::io::Error::other)??;
        let t = w.times;
        tracing::info!(
            path = %self.path.display(),
            bytes = self.bytes,
            starved_ms = t.starved_ms,
            hash_ms = t.hash_ms,
            offer_ms = t.offer_ms,
            disk_wait_ms = t.disk_wait_ms,
            write_ms = t.write_ms,
            "spool written"
        );
        self.up.finish(w.whole, w.parts, &self.path).await;
        Ok((self.bytes, w.whole))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pseudo-random bytes (blake3's extendable output).
    fn data(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        blake3::Hasher::new().finalize_xof().fill(&mut v);
        v
    }

    #[tokio::test]
    async fn writes_every_byte_in_order_with_its_hash() {
        let d = tempfile::tempdir().unwrap();
        // Empty, smaller than a block, exactly blocks, blocks plus an unaligned tail.
        for n in [
            0,
            1,
            4095,
            BLOCK_BYTES,
            2 * BLOCK_BYTES,
            2 * BLOCK_BYTES + 4096 * 3 + 17,
        ] {
            let want = data(n);
            let p = d.path().join(format!("s{n}"));
            let mut s = SpoolFile::create(&p, crate::snapshot::preupload::Preupload::disabled())
                .await
                .unwrap();
            // Odd write sizes, crossing block boundaries.
            for chunk in want.chunks(1_000_003) {
                s.write(chunk).await.unwrap();
            }
            let (bytes, hash) = s.finish().await.unwrap();
            assert_eq!(bytes, n as u64);
            assert_eq!(hash, blake3::hash(&want));
            assert_eq!(std::fs::read(&p).unwrap(), want, "{n} bytes");
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[tokio::test]
    async fn truncates_an_existing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let mut s = SpoolFile::create(&p, crate::snapshot::preupload::Preupload::disabled())
            .await
            .unwrap();
        s.write(b"short").await.unwrap();
        s.finish().await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
    }

    #[test]
    fn blocks_are_aligned() {
        for cap in [BLOCK_BYTES, 4096, 1000] {
            let b = Block::new(cap);
            assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
            assert!(b.start + cap <= b.raw.len());
        }
    }
}
