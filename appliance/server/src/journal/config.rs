//! Configuration of a shard's journal, with documented defaults and the bounds they must
//! respect.

use std::path::PathBuf;

use appliance_core::journal::frame::{record_bytes, COMMIT_BYTES_MAX, RECORD_BODY_BYTES_MAX};

use super::error::JournalError;
use super::BLOCK_BYTES;

/// Default upper bound of one segment file: 1 GiB. Large enough that rotation (a file
/// create, an fallocate and a directory fsync) is rare; small enough that one file can be
/// archived or copied as a unit.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 1 << 30;
/// Default upper bound of one commit: 16 MiB. A tick of 1,000 invoices is about 400 KiB;
/// the bound leaves room for large ticks while keeping one write's DMA buffer bounded.
pub const COMMIT_BYTES_MAX_DEFAULT: usize = 16 << 20;
/// Default size of one read while recovery scans a segment: 1 MiB. Recovery holds at most
/// this plus one maximal commit (or record) in memory per segment, whatever the segment
/// size.
pub const RECOVERY_CHUNK_BYTES_DEFAULT: usize = 1 << 20;

/// Smallest recovery read accepted: a block-aligned size that holds one maximal record, so
/// that a record is never mistaken for truncated because it straddles two reads.
pub const RECOVERY_CHUNK_BYTES_MIN: usize =
    record_bytes(RECORD_BODY_BYTES_MAX).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;

/// How a commit's write is made durable before `Journal::commit` returns.
///
/// Both give the same guarantee: the write returns only once its data, and the metadata
/// needed to read it back (an unwritten extent converted to written, a grown size), are on
/// stable storage, as after fdatasync(2). They differ in how many operations a commit
/// costs the shard: on this kind of machine (ext4 on a virtio disk) `Dsync` was faster
/// under load (docs/PERFORMANCE.md §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalSync {
    /// Segment files are opened with `O_DSYNC`: each O_DIRECT write is synchronized by the
    /// kernel as part of the write (one io_uring operation per commit, completed when the
    /// data is durable). The default.
    #[default]
    Dsync,
    /// Each write is followed by an fdatasync (two io_uring operations per commit, the
    /// second run by an io_uring worker thread). For devices or file systems where
    /// synchronized writes are slower than a flush.
    Fdatasync,
}

impl JournalSync {
    /// The flags segment files are opened with, beside `O_DIRECT` (which glommio adds).
    pub fn open_flags(self) -> i32 {
        match self {
            JournalSync::Dsync => libc::O_DSYNC,
            JournalSync::Fdatasync => 0,
        }
    }
}

/// Where a shard's journal lives and how large its pieces may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalConfig {
    /// Directory of this shard's segment files; created if missing. One directory per
    /// shard: the journal takes an exclusive lock on it.
    pub dir: PathBuf,
    /// Each segment file is preallocated to this size and rotated when the next commit
    /// does not fit. Default [`SEGMENT_BYTES_MAX_DEFAULT`] (1 GiB). Must be a multiple of
    /// [`BLOCK_BYTES`] and at least `commit_bytes_max`.
    pub segment_bytes_max: u64,
    /// Largest commit accepted by `Journal::commit`, and largest write of a group by
    /// `Journal::commit_many` (which bounds its DMA buffer as for one commit). Default
    /// [`COMMIT_BYTES_MAX_DEFAULT`] (16 MiB). Must be a multiple of [`BLOCK_BYTES`] and at
    /// most `frame::COMMIT_BYTES_MAX` (16 MiB), the largest commit recovery reads back (it
    /// holds one whole commit in memory to check it).
    pub commit_bytes_max: usize,
    /// Size of one read during recovery. Default [`RECOVERY_CHUNK_BYTES_DEFAULT`] (1 MiB).
    /// Must be a multiple of [`BLOCK_BYTES`] and at least [`RECOVERY_CHUNK_BYTES_MIN`].
    pub recovery_chunk_bytes: usize,
    /// How commits are made durable. Default [`JournalSync::Dsync`].
    pub sync: JournalSync,
}

impl JournalConfig {
    /// The configuration for `dir` with every other field at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            commit_bytes_max: COMMIT_BYTES_MAX_DEFAULT,
            recovery_chunk_bytes: RECOVERY_CHUNK_BYTES_DEFAULT,
            sync: JournalSync::default(),
        }
    }

    /// Checks the bounds documented on each field.
    pub fn validate(&self) -> Result<(), JournalError> {
        let block = BLOCK_BYTES as u64;
        let invalid = |reason: &'static str| Err(JournalError::InvalidConfig { reason });
        if self.commit_bytes_max < BLOCK_BYTES || self.commit_bytes_max % BLOCK_BYTES != 0 {
            return invalid("commit_bytes_max must be a non-zero multiple of 4096");
        }
        if self.commit_bytes_max > COMMIT_BYTES_MAX {
            return invalid("commit_bytes_max must be at most 16 MiB (frame::COMMIT_BYTES_MAX)");
        }
        if self.segment_bytes_max % block != 0 {
            return invalid("segment_bytes_max must be a multiple of 4096");
        }
        if self.segment_bytes_max < self.commit_bytes_max as u64 {
            return invalid("segment_bytes_max must be at least commit_bytes_max");
        }
        if self.recovery_chunk_bytes < RECOVERY_CHUNK_BYTES_MIN
            || self.recovery_chunk_bytes % BLOCK_BYTES != 0
        {
            return invalid(
                "recovery_chunk_bytes must be a multiple of 4096 holding one maximal record",
            );
        }
        Ok(())
    }
}
