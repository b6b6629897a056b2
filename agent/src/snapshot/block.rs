//! Aligned memory blocks of the spool: a [`SharedBlock`] is one full part, shared by the disk
//! stage ([`crate::snapshot::spool`]) and the pre-upload ([`crate::snapshot::preupload`]) without
//! copying.

/// Alignment of blocks in memory and in the file (`O_DIRECT` needs the logical block size;
/// 4096 covers 512-byte and 4 KiB devices).
pub(crate) const ALIGN: usize = 4096;

/// A buffer of up to `cap` bytes whose start is aligned to [`ALIGN`] bytes (a plain `Vec`
/// with room to slide the start; no unsafe allocation).
pub(crate) struct Block {
    pub(crate) raw: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) cap: usize,
}

impl Block {
    pub(crate) fn new(cap: usize) -> Block {
        let raw = vec![0u8; cap + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        Block {
            raw,
            start,
            len: 0,
            cap,
        }
    }

    /// Copies as much of `data` as fits; returns how many bytes were taken.
    pub(crate) fn fill(&mut self, data: &[u8]) -> usize {
        let take = (self.cap - self.len).min(data.len());
        let at = self.start + self.len;
        self.raw[at..at + take].copy_from_slice(&data[..take]);
        self.len += take;
        take
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == self.cap
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// A full block shared by the disk stage and the pre-upload without copying; it goes back to
/// the spare pool when its last holder drops it.
pub struct SharedBlock {
    pub(crate) block: Option<Block>,
    pub(crate) spare: std::sync::mpsc::SyncSender<Block>,
}

impl SharedBlock {
    /// The block's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.block.as_ref().map_or(&[], Block::bytes)
    }
}

impl Drop for SharedBlock {
    fn drop(&mut self) {
        if let Some(mut b) = self.block.take() {
            b.len = 0;
            let _ = self.spare.try_send(b);
        }
    }
}
