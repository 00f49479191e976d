//! Typed errors of the journal files. Every error about bytes on disk names the file and
//! the byte offset, so that an operator can look at the exact spot.

use std::io;
use std::path::PathBuf;

use appliance_core::journal::frame::FrameError;

/// Why a buffer handed to `Journal::commit` (or one of a group handed to
/// `Journal::commit_many`) was refused. Nothing was written: the journal stays usable,
/// the caller has a bug to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitRejection {
    /// The buffer is empty.
    #[error("commit is empty")]
    Empty,
    /// The length is not a multiple of the 4096-byte block (`frame::seal_commit` or
    /// `frame::pad_to_block` missing).
    #[error("commit length {len} is not a multiple of 4096")]
    Unaligned {
        /// Length of the buffer.
        len: usize,
    },
    /// Larger than `JournalConfig::commit_bytes_max`.
    #[error("commit length {len} exceeds the maximum {max}")]
    TooLarge {
        /// Length of the buffer.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The bytes at `offset` are not a valid record.
    #[error("invalid record at commit offset {offset}: {error}")]
    BadRecord {
        /// Offset within the commit.
        offset: usize,
        /// What was wrong.
        error: FrameError,
    },
    /// A record's sequence number is not the next one of the journal.
    #[error("record at commit offset {offset} has seq {found}, expected {expected}")]
    Sequence {
        /// Offset within the commit.
        offset: usize,
        /// The next sequence number of the journal.
        expected: u64,
        /// The record's sequence number.
        found: u64,
    },
    /// Only padding records: a commit must carry at least one record.
    #[error("commit holds no record besides padding")]
    NoRecords,
    /// The buffer starts with a commit header, but the commit is not whole and
    /// consistent (bad header fields, payload checksum, records that contradict it).
    #[error("invalid commit framing: {error}")]
    BadCommit {
        /// What was wrong.
        error: FrameError,
    },
    /// The commit header's length is not the buffer's: a buffer holds exactly one commit.
    #[error("commit header declares {declared} bytes, the buffer holds {len}")]
    CommitLength {
        /// Length in the commit header.
        declared: usize,
        /// Length of the buffer.
        len: usize,
    },
    /// A commit header record anywhere but at the start of the buffer.
    #[error("commit header record at commit offset {offset}, not at the start")]
    MisplacedCommitHeader {
        /// Offset within the buffer.
        offset: usize,
    },
}

/// Errors of the journal files.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A configuration bound is violated.
    #[error("invalid journal configuration: {reason}")]
    InvalidConfig {
        /// Which bound.
        reason: &'static str,
    },
    /// An I/O operation failed. During `commit` this poisons the journal.
    #[error("journal I/O error: {op} {path} (offset {offset}): {source}")]
    Io {
        /// What was being done (`"write"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Byte offset of the operation, 0 where none applies.
        offset: u64,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// An earlier write, fdatasync or rotation failed; the journal refuses all further
    /// work. After a failed fdatasync the kernel may have dropped the dirty pages and
    /// cleared the error, so a retry could "succeed" without the data being on disk: the
    /// only safe path is to stop the shard, restart and recover from what is on disk.
    #[error("journal is poisoned by an earlier I/O failure ({first_error}); restart and recover")]
    Poisoned {
        /// The error that poisoned the journal, as text.
        first_error: String,
    },
    /// Another journal instance (this or another process) holds the directory's lock.
    #[error("journal directory {path} is locked by another instance")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// The device needs a larger direct-I/O alignment than the 4096-byte block.
    #[error("{path}: direct I/O alignment {alignment} exceeds the 4096-byte journal block")]
    Alignment {
        /// The file.
        path: PathBuf,
        /// The device's alignment.
        alignment: u64,
    },
    /// A `*.journal` file whose name is not 20 decimal digits.
    #[error("{path}: not a segment file name (want 20 decimal digits + .journal)")]
    BadSegmentName {
        /// The file.
        path: PathBuf,
    },
    /// A record is invalid although valid later records follow it: mid-file corruption.
    /// Recovery never skips it.
    #[error("{path}: corrupt record at offset {offset}: {error} (valid records follow it)")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the bad record in the file.
        offset: u64,
        /// What was wrong.
        error: FrameError,
    },
    /// A torn tail in a segment that is not the last one: later segments exist, so this
    /// tail was written before them and must have been whole.
    #[error("{path}: torn record at offset {offset} in a segment that is not the last: {error}")]
    TornTailNotLast {
        /// The segment file.
        path: PathBuf,
        /// Byte offset just past the last whole record.
        offset: u64,
        /// What was wrong there.
        error: FrameError,
    },
    /// Sequence numbers are not consecutive (within a file or across files).
    #[error("{path}: record at offset {offset} has seq {found}, expected {expected}")]
    SequenceGap {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record (0 for an empty file whose name is off).
        offset: u64,
        /// The sequence number continuity demands.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A segment's first record does not carry the sequence number in the file's name.
    #[error("{path}: named for seq {name_seq} but its first record has seq {first_seq}")]
    SegmentNameMismatch {
        /// The segment file.
        path: PathBuf,
        /// Sequence number in the name.
        name_seq: u64,
        /// Sequence number of the first record.
        first_seq: u64,
    },
    /// A segment that is not the last one holds no record (rotation only creates a file to
    /// write a commit into it, so records between it and the next file are missing).
    #[error("{path}: segment holds no record but later segments exist")]
    EmptySegment {
        /// The segment file.
        path: PathBuf,
    },
    /// A commit was refused before anything was written.
    #[error("commit refused: {0}")]
    InvalidCommit(#[from] CommitRejection),
    /// A commit of a group handed to `Journal::commit_many` was refused; nothing of the
    /// group was written (a group is checked whole before its first byte goes to disk).
    #[error("commit {index} of the group refused: {rejection}")]
    InvalidGroupCommit {
        /// Position of the refused commit in the group.
        index: usize,
        /// Why it was refused.
        rejection: CommitRejection,
    },
    /// `read_record` for a sequence number that is not in the journal.
    #[error("seq {seq} is not in the journal (holds {first_seq}..{next_seq})")]
    SeqNotFound {
        /// The sequence number asked for.
        seq: u64,
        /// First sequence number held.
        first_seq: u64,
        /// Next sequence number to be written.
        next_seq: u64,
    },
    /// The bytes read back for `read_record` do not hold the record the index promised.
    #[error("{path}: reading seq {seq} from commit at offset {offset}: {detail}")]
    ReadMismatch {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the commit (index entry) that should hold the record.
        offset: u64,
        /// The sequence number asked for.
        seq: u64,
        /// What did not match.
        detail: String,
    },
}

/// Errors of `Journal::open`: the journal's own, or the caller's callback refusing a
/// record during recovery.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<E> {
    /// The journal files are unreadable, inconsistent or corrupt.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The recovery callback refused a record.
    #[error("{path}: recovery refused record seq {seq} at offset {offset}: {source}")]
    Replay {
        /// The segment file.
        path: PathBuf,
        /// Byte offset of the record in the file.
        offset: u64,
        /// Its sequence number.
        seq: u64,
        /// The callback's error.
        #[source]
        source: E,
    },
}

/// Wraps an I/O error with the operation, path and offset.
pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
    offset: u64,
) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.into();
    move |source| JournalError::Io {
        op,
        path,
        offset,
        source,
    }
}
