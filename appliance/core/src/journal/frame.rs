//! Record framing of the journal: a fixed 24-byte header, a kind-specific body, zero
//! padding to the next 8-byte boundary, and a CRC32C over header and body.
//!
//! This module knows nothing about what a body means (see `record`); it only makes a byte
//! stream of records self-checking, and tells a torn tail (the crash cut the last write
//! short, or persisted only some of its blocks) from corruption in the middle (a record
//! that is bad although valid later data follows it). The server reads files and hands
//! their bytes here; nothing in this module does I/O.
//!
//! **Commits.** Each write of a tick is framed as a commit: a commit header record
//! ([`KIND_COMMIT`], see [`CommitHeader`]) that states the commit's length, its sequence
//! numbers and a CRC32C over everything after the header, then the tick's records, then
//! padding to the block ([`begin_commit`], [`seal_commit`]). A power loss during a
//! multi-block write may persist any subset of its blocks; the header makes the last
//! commit all-or-nothing: it is replayed only if every byte of it is present and checks.
//! A damaged last commit is dropped, and classified: torn (never acknowledged) or written
//! whole and corrupt (acknowledged, so its loss must be reported): see
//! [`damaged_commit_cause`].
//! Streams without commit headers ("bare" streams, as older tools and tests write them)
//! scan exactly as before.
//!
//! Layout (little-endian, see docs/journal.md):
//!
//! | offset | size | field                                                  |
//! |-------:|-----:|--------------------------------------------------------|
//! | 0      | 4    | magic `b"EIJ1"`                                        |
//! | 4      | 4    | `len`: header + body bytes, without the 8-byte padding |
//! | 8      | 8    | `seq`: record sequence number (0 for padding records)  |
//! | 16     | 1    | `kind`                                                 |
//! | 17     | 1    | `version` (1)                                          |
//! | 18     | 2    | reserved, zero                                         |
//! | 20     | 4    | CRC32C of bytes 0..20 then the body                    |

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic at the start of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"EIJ1";
/// Version of the framing written by this build.
pub const RECORD_VERSION: u8 = 1;
/// Bytes of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// Largest record body accepted, on write and on read. An issued invoice is at most a few
/// KiB; the bound keeps a corrupted length field from making the reader allocate or skip
/// wildly.
pub const RECORD_BODY_BYTES_MAX: usize = 64 * 1024;
/// Kind byte of a padding record: fills a tick's write up to the block size, has sequence
/// number 0, and is skipped by readers. Its body is zeros in a bare commit
/// ([`pad_to_block`]) and [`PADDING_FILL`] bytes in a sealed commit ([`seal_commit`]);
/// readers do not check it.
pub const KIND_PADDING: u8 = 0xFF;
/// Byte the padding record of a sealed commit is filled with. Not zero, so that no
/// [`SECTOR_BYTES`] sector of a commit as written is all zeros (records start with their
/// magic; only a record body could hold 512 zero bytes): an all-zero sector in a damaged
/// commit is then the mark of a sector the write never reached, and a commit without one
/// was written whole (see [`damaged_commit_cause`]). Not a byte of [`RECORD_MAGIC`], so the
/// search for later data never finds a record header in it.
pub const PADDING_FILL: u8 = 0xA5;
/// The smallest unit a device persists atomically (the smallest logical sector Linux
/// supports): a power loss during a write leaves each sector of it either wholly written
/// or with its previous content. The journal's unwritten space reads as zeros.
pub const SECTOR_BYTES: usize = 512;
/// Kind byte of a commit header record: the first record of every commit, sequence number
/// 0, body a [`CommitHeader`]. It is framing, not data: scans never hand it to callers.
pub const KIND_COMMIT: u8 = 0xFE;
/// Bytes of a commit header's body ([`CommitHeader`]).
pub const COMMIT_HEADER_BODY_BYTES: usize = 32;
/// Bytes of a whole commit header record (header, body; already 8-aligned).
pub const COMMIT_HEADER_RECORD_BYTES: usize = record_bytes(COMMIT_HEADER_BODY_BYTES);
/// Largest commit accepted, on write and on read: 16 MiB, the journal's default
/// `commit_bytes_max`. Readers hold one whole commit in memory to check it, so a corrupted
/// length must not make them buffer more than this.
pub const COMMIT_BYTES_MAX: usize = 16 << 20;

/// Body of a commit header record (little-endian).
///
/// | offset | size | field                                                          |
/// |-------:|-----:|----------------------------------------------------------------|
/// | 0      | 4    | `commit_bytes`: the whole commit, this header and padding included |
/// | 4      | 4    | `record_count`: non-padding records in the commit (≥ 1)        |
/// | 8      | 8    | `first_seq`: sequence number of the first record               |
/// | 16     | 8    | `last_seq`: of the last record (`first_seq + record_count - 1`) |
/// | 24     | 4    | `payload_crc32c`: CRC32C of the commit's bytes after this record |
/// | 28     | 4    | reserved, zero                                                 |
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CommitHeader {
    /// Bytes of the whole commit: this header record, the records, the trailing padding.
    pub commit_bytes: U32,
    /// Number of non-padding records after the header.
    pub record_count: U32,
    /// Sequence number of the first record.
    pub first_seq: U64,
    /// Sequence number of the last record.
    pub last_seq: U64,
    /// CRC32C of every byte after the header record up to `commit_bytes`.
    pub payload_crc32c: U32,
    /// Must be zero.
    pub reserved: U32,
}

const _: () = assert!(core::mem::size_of::<CommitHeader>() == COMMIT_HEADER_BODY_BYTES);
const _: () = assert!(COMMIT_HEADER_RECORD_BYTES == RECORD_HEADER_BYTES + COMMIT_HEADER_BODY_BYTES);

/// The fixed header in front of every record body.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RecordHeader {
    /// Always [`RECORD_MAGIC`].
    pub magic: [u8; 4],
    /// Header plus body bytes, excluding alignment padding.
    pub len: U32,
    /// Sequence number; consecutive (+1) across all non-padding records of a shard.
    pub seq: U64,
    /// Record kind (see `record::RecordKind`), or [`KIND_PADDING`].
    pub kind: u8,
    /// Framing version, [`RECORD_VERSION`].
    pub version: u8,
    /// Must be zero.
    pub reserved: U16,
    /// CRC32C of header bytes 0..20 followed by the body.
    pub crc32c: U32,
}

const _: () = assert!(core::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);

/// Rounds `n` up to the record alignment.
pub const fn align_up(n: usize) -> usize {
    (n + RECORD_ALIGN_BYTES - 1) & !(RECORD_ALIGN_BYTES - 1)
}

/// Bytes a record with a body of `body_len` bytes occupies in the journal, padding
/// included.
pub const fn record_bytes(body_len: usize) -> usize {
    align_up(RECORD_HEADER_BYTES + body_len)
}

fn checksum(header_prefix: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header_prefix), body)
}

/// Appends one record to `out`: header, body and zero padding to 8 bytes.
///
/// # Panics
/// If the body is larger than [`RECORD_BODY_BYTES_MAX`]: bodies are built by this crate
/// from validated, bounded inputs, so an oversized one is a programming error.
pub fn encode_record(out: &mut Vec<u8>, kind: u8, seq: u64, body: &[u8]) {
    encode_record_with(out, kind, seq, |out| out.extend_from_slice(body));
}

/// [`encode_record`] with a body that `write_body` appends to `out` in place, so that a
/// large body (an Issued record carries the canonical invoice) is not built in a scratch
/// buffer and copied.
///
/// # Panics
/// As [`encode_record`], if the body written is larger than [`RECORD_BODY_BYTES_MAX`].
pub fn encode_record_with(
    out: &mut Vec<u8>,
    kind: u8,
    seq: u64,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let at = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    write_body(out);
    let body_len = out.len() - at - RECORD_HEADER_BYTES;
    assert!(
        body_len <= RECORD_BODY_BYTES_MAX,
        "journal record body too large"
    );
    let len = RECORD_HEADER_BYTES + body_len;
    let mut header = RecordHeader {
        magic: RECORD_MAGIC,
        len: U32::new(len as u32),
        seq: U64::new(seq),
        kind,
        version: RECORD_VERSION,
        reserved: U16::ZERO,
        crc32c: U32::ZERO,
    };
    header.crc32c = U32::new(checksum(
        &header.as_bytes()[..20],
        &out[at + RECORD_HEADER_BYTES..],
    ));
    out[at..at + RECORD_HEADER_BYTES].copy_from_slice(header.as_bytes());
    out.resize(out.len() + (align_up(len) - len), 0);
}

/// Appends a padding record so that `out.len()` becomes a multiple of `block_bytes`
/// (relative to the start of `out`, which the caller keeps block-aligned in the file).
/// Does nothing if it already is. A gap smaller than a header is widened by one block.
pub fn pad_to_block(out: &mut Vec<u8>, block_bytes: usize) {
    pad_from(out, 0, block_bytes, 0);
}

/// Pads `out` so that `out.len() - start` is a multiple of `block_bytes`, with a padding
/// record whose body is `fill` bytes.
fn pad_from(out: &mut Vec<u8>, start: usize, block_bytes: usize, fill: u8) {
    debug_assert!(block_bytes.is_power_of_two() && block_bytes >= RECORD_HEADER_BYTES);
    debug_assert!(start <= out.len() && (out.len() - start) % RECORD_ALIGN_BYTES == 0);
    let rem = (out.len() - start) % block_bytes;
    if rem == 0 {
        return;
    }
    let mut gap = block_bytes - rem;
    if gap < RECORD_HEADER_BYTES {
        gap += block_bytes;
    }
    encode_record_with(out, KIND_PADDING, 0, |out| {
        out.resize(out.len() + gap - RECORD_HEADER_BYTES, fill);
    });
    debug_assert_eq!((out.len() - start) % block_bytes, 0);
}

/// Starts a commit: appends a placeholder commit header record to `out` and returns its
/// offset, to be passed to [`seal_commit`] once the commit's records are appended. If no
/// record is appended, the caller truncates `out` back to the offset instead: an empty
/// commit is never written.
pub fn begin_commit(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    debug_assert_eq!(start % RECORD_ALIGN_BYTES, 0);
    encode_record(out, KIND_COMMIT, 0, &[0u8; COMMIT_HEADER_BODY_BYTES]);
    start
}

/// Why [`seal_commit`] could not seal a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// No placeholder from [`begin_commit`] at `start`, or a sequence range that is empty
    /// or starts at 0.
    #[error("no commit begun at this offset, or an empty sequence range")]
    NotBegun,
    /// The padded commit would exceed [`COMMIT_BYTES_MAX`].
    #[error("commit of {len} bytes exceeds the maximum {COMMIT_BYTES_MAX}")]
    TooLarge {
        /// Bytes of the padded commit.
        len: usize,
    },
}

/// Seals the commit begun at `start` by [`begin_commit`]: pads it to a multiple of
/// `block_bytes` (relative to `start`, which the caller keeps block-aligned in the file;
/// the padding record is filled with [`PADDING_FILL`], not zeros),
/// then fills in the header (length, `first_seq..=last_seq`, CRC32C of the payload) and
/// re-checksums the header record. Returns the commit's length in bytes.
///
/// The records appended between `begin_commit` and this call must be exactly
/// `first_seq..=last_seq` in order; this is not re-checked here (the server's
/// `Journal::commit` checks every commit before writing it, and readers refuse an
/// inconsistent one as corruption).
pub fn seal_commit(
    out: &mut Vec<u8>,
    start: usize,
    block_bytes: usize,
    first_seq: u64,
    last_seq: u64,
) -> Result<usize, SealError> {
    let placeholder = out
        .get(start..)
        .and_then(|rest| RecordHeader::read_from_prefix(rest).ok())
        .map(|(header, _)| header);
    let begun = placeholder.is_some_and(|h| {
        h.magic == RECORD_MAGIC
            && h.kind == KIND_COMMIT
            && h.len.get() as usize == COMMIT_HEADER_RECORD_BYTES
    });
    if !begun || first_seq == 0 || last_seq < first_seq {
        return Err(SealError::NotBegun);
    }
    let record_count = last_seq - first_seq + 1;
    pad_from(out, start, block_bytes, PADDING_FILL);
    let len = out.len() - start;
    if len > COMMIT_BYTES_MAX || u32::try_from(record_count).is_err() {
        return Err(SealError::TooLarge { len });
    }
    let body = CommitHeader {
        commit_bytes: U32::new(len as u32),
        record_count: U32::new(record_count as u32),
        first_seq: U64::new(first_seq),
        last_seq: U64::new(last_seq),
        payload_crc32c: U32::new(crc32c::crc32c(&out[start + COMMIT_HEADER_RECORD_BYTES..])),
        reserved: U32::ZERO,
    };
    let mut header = Vec::with_capacity(COMMIT_HEADER_RECORD_BYTES);
    encode_record(&mut header, KIND_COMMIT, 0, body.as_bytes());
    out[start..start + COMMIT_HEADER_RECORD_BYTES].copy_from_slice(&header);
    Ok(len)
}

/// A record read back from journal bytes, borrowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Byte offset of the record within the scanned buffer.
    pub offset: usize,
    /// Sequence number.
    pub seq: u64,
    /// Kind byte.
    pub kind: u8,
    /// Body bytes (without header and padding).
    pub body: &'a [u8],
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes remain than a header needs.
    #[error("truncated header")]
    TruncatedHeader,
    /// The magic is not [`RECORD_MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// Unknown framing version.
    #[error("unsupported record version {0}")]
    BadVersion(u8),
    /// Length field smaller than a header or larger than the body limit.
    #[error("bad record length {0}")]
    BadLength(u32),
    /// The record claims more bytes than remain.
    #[error("truncated body")]
    TruncatedBody,
    /// CRC32C mismatch.
    #[error("checksum mismatch")]
    BadChecksum,
    /// Reserved header field or alignment padding not zero.
    #[error("non-zero reserved bytes")]
    NonZeroReserved,
    /// A commit header record checksums but its fields are impossible (sequence number not
    /// 0, wrong body length, length not 8-aligned or out of bounds, counts that disagree,
    /// non-zero reserved field): written that way, a writer bug.
    #[error("invalid commit header")]
    BadCommitHeader,
    /// Fewer bytes remain than the commit header declares.
    #[error("truncated commit")]
    TruncatedCommit,
    /// The commit's payload does not match the CRC32C in its header.
    #[error("commit payload checksum mismatch")]
    BadCommitChecksum,
    /// The commit's payload checksums, but its records do not match the header (an
    /// undecodable record, a count or a sequence number off, a nested header): a writer
    /// bug.
    #[error("commit records do not match the commit header")]
    CommitMismatch,
}

/// Decodes the record starting at `offset`, checking every framing rule.
/// Returns the record and the offset of the next one.
pub fn decode_record_at(buf: &[u8], offset: usize) -> Result<(RawRecord<'_>, usize), FrameError> {
    decode_record(buf, offset, true)
}

fn decode_record(
    buf: &[u8],
    offset: usize,
    verify_crc: bool,
) -> Result<(RawRecord<'_>, usize), FrameError> {
    let rest = buf.get(offset..).unwrap_or(&[]);
    let (header, _) =
        RecordHeader::read_from_prefix(rest).map_err(|_| FrameError::TruncatedHeader)?;
    if header.magic != RECORD_MAGIC {
        return Err(FrameError::BadMagic);
    }
    if header.version != RECORD_VERSION {
        return Err(FrameError::BadVersion(header.version));
    }
    let len = header.len.get();
    let len_usize = len as usize;
    if !(RECORD_HEADER_BYTES..=RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX).contains(&len_usize) {
        return Err(FrameError::BadLength(len));
    }
    let padded = align_up(len_usize);
    if rest.len() < padded {
        return Err(FrameError::TruncatedBody);
    }
    let body = &rest[RECORD_HEADER_BYTES..len_usize];
    if verify_crc && checksum(&rest[..20], body) != header.crc32c.get() {
        return Err(FrameError::BadChecksum);
    }
    if header.reserved.get() != 0 || rest[len_usize..padded].iter().any(|&b| b != 0) {
        return Err(FrameError::NonZeroReserved);
    }
    Ok((
        RawRecord {
            offset,
            seq: header.seq.get(),
            kind: header.kind,
            body,
        },
        offset + padded,
    ))
}

/// How a scan of journal bytes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte up to the end of the buffer (or up to an all-zero, never-written region)
    /// is whole records.
    Clean {
        /// Offset just past the last record.
        end: usize,
    },
    /// The bytes from `end` on are not a valid record or whole commit, and no later data
    /// follows them: the tail of the journal is dropped. Recovery truncates the file at
    /// `end`; for a damaged commit that is the commit's start, so none of it survives.
    /// Usually the tail of an interrupted write; `cause` says whether the bytes prove
    /// otherwise (see [`damaged_commit_cause`]).
    TornTail {
        /// Offset just past the last whole record or commit.
        end: usize,
        /// What was wrong at `end`.
        error: FrameError,
        /// Torn write, or a commit that was written whole and is corrupt.
        cause: TailCause,
        /// The dropped commit's header, when its header record is valid (its sequence
        /// range and record count); `None` for a bare record or an unreadable header.
        header: Option<CommitHeader>,
        /// Bytes dropped: from `end` to just past the last non-zero byte.
        bytes: usize,
    },
    /// The record or commit at `offset` is invalid although later data follows it (see
    /// [`is_later_data_at`]), or it is a commit that checksums but contradicts its header:
    /// corruption in the middle, which recovery must not skip.
    Corrupt {
        /// Offset of the invalid record or commit.
        offset: usize,
        /// What was wrong there.
        error: FrameError,
    },
}

/// Why a scan dropped the tail of a journal ([`ScanEnd::TornTail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailCause {
    /// A write that did not complete: bytes or sectors of it missing, or no valid commit
    /// header to tell. Never acknowledged (an acknowledged commit was written whole), so
    /// dropping it loses nothing that was answered. Also the verdict wherever the bytes
    /// cannot prove the commit was written whole (see [`damaged_commit_cause`]).
    Torn,
    /// A commit whose header record is valid and every sector of which was written (none
    /// is all zeros), but whose payload fails its CRC32C: written whole, then damaged (or
    /// written wrong by the device). A commit written whole was, in all likelihood,
    /// acknowledged: its records were answered, and dropping it loses them.
    Corrupt,
}

/// Tells a torn write from corruption, for a commit at `offset` of `buf` whose header
/// record is valid (`header`) but that [`check_commit`] found not whole with `error`.
///
/// What the format proves: the journal writes each commit with one write into space that
/// reads as zeros (preallocated, or zeroed again by recovery's repair), and a power loss
/// leaves every [`SECTOR_BYTES`] sector of that write either written or as it was, i.e.
/// zeros. A commit as sealed has no all-zero sector (its padding is [`PADDING_FILL`],
/// every record starts with its magic; only a record body of 512 zero bytes could make
/// one). So a damaged commit with every byte present and no all-zero sector cannot be a
/// tear: it is [`TailCause::Corrupt`]. Bytes missing (`error` is not
/// [`FrameError::BadCommitChecksum`]) or an all-zero sector (a sector the write may never
/// have reached) give [`TailCause::Torn`]. The sectors are counted from the commit's
/// start, which the journal keeps block-aligned in its file.
///
/// Limits: a commit sealed before padding was filled (zero padding), or with a record body
/// holding an aligned all-zero sector, is judged `Torn` even when corrupt; a device that
/// leaves garbage rather than the old content in sectors it did not write makes a tear
/// look `Corrupt`. Either way the commit is dropped whole; only the report differs.
pub fn damaged_commit_cause(
    buf: &[u8],
    offset: usize,
    header: &CommitHeader,
    error: FrameError,
) -> TailCause {
    let end = offset.saturating_add(header.commit_bytes.get() as usize);
    let Some(commit) = buf.get(offset..end) else {
        return TailCause::Torn;
    };
    let zero_sector = commit
        .chunks(SECTOR_BYTES)
        .any(|sector| sector.iter().all(|&b| b == 0));
    if error == FrameError::BadCommitChecksum && !zero_sector {
        TailCause::Corrupt
    } else {
        TailCause::Torn
    }
}

/// Checks the fields of a commit header record that decoded (CRC and framing valid).
/// A header that checksums but is impossible was written that way: the error is
/// [`FrameError::BadCommitHeader`], which scans report as corruption.
pub fn parse_commit_header(record: &RawRecord<'_>) -> Result<CommitHeader, FrameError> {
    if record.kind != KIND_COMMIT || record.seq != 0 {
        return Err(FrameError::BadCommitHeader);
    }
    let header =
        CommitHeader::read_from_bytes(record.body).map_err(|_| FrameError::BadCommitHeader)?;
    let len = header.commit_bytes.get() as usize;
    let first = header.first_seq.get();
    let last = header.last_seq.get();
    let count = u64::from(header.record_count.get());
    // A commit holds at least its header and one record header after it.
    let fields_ok = (COMMIT_HEADER_RECORD_BYTES + RECORD_HEADER_BYTES..=COMMIT_BYTES_MAX)
        .contains(&len)
        && len % RECORD_ALIGN_BYTES == 0
        && first >= 1
        && last >= first
        && count >= 1
        && last - first == count - 1
        && header.reserved.get() == 0;
    if !fields_ok {
        return Err(FrameError::BadCommitHeader);
    }
    Ok(header)
}

/// What [`check_commit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitCheck {
    /// Whole and consistent: its records end at `end`, the commit's end.
    Whole {
        /// Offset just past the commit.
        end: usize,
        /// Sequence number of its last record.
        last_seq: u64,
    },
    /// Not wholly written: bytes missing, or the payload does not match its CRC. A search
    /// for later data starts at `resume`, the commit's declared end.
    Torn {
        /// The commit's declared end (may lie beyond the buffer).
        resume: usize,
        /// What was wrong.
        error: FrameError,
    },
    /// Checksums but its records do not match its header: corruption by a writer bug.
    Corrupt {
        /// What was wrong.
        error: FrameError,
    },
}

/// Checks the commit whose header record (parsed into `header`) starts at `offset` of
/// `buf`. `buf` must hold the commit's whole declared length after `offset` whenever the
/// stream has those bytes; fewer bytes mean the commit is truncated.
///
/// Whole means: every byte present, the payload matches its CRC32C, and the payload is
/// exactly whole records, no nested commit header, `record_count` non-padding ones with
/// sequence numbers `first_seq..=last_seq` in order.
pub fn check_commit(buf: &[u8], offset: usize, header: &CommitHeader) -> CommitCheck {
    check_commit_records(buf, offset, header, true)
}

/// [`check_commit`] for a commit this process has just sealed, before it is written:
/// the same checks except the records' own CRC32Cs. The payload CRC32C still covers
/// every byte (so a sealing bug that would make recovery drop an acknowledged commit
/// is caught before the disk), and every record's framing and sequence number is
/// checked; the per-record CRCs come from the same encoder and are verified by recovery.
/// Verifying them here as well cost a shard ~2% of its CPU in bulk issuance.
pub fn check_sealed_commit(buf: &[u8], offset: usize, header: &CommitHeader) -> CommitCheck {
    check_commit_records(buf, offset, header, false)
}

fn check_commit_records(
    buf: &[u8],
    offset: usize,
    header: &CommitHeader,
    record_crcs: bool,
) -> CommitCheck {
    let len = header.commit_bytes.get() as usize;
    let end = offset.saturating_add(len);
    if buf.len() < end {
        return CommitCheck::Torn {
            resume: end,
            error: FrameError::TruncatedCommit,
        };
    }
    let payload = &buf[offset + COMMIT_HEADER_RECORD_BYTES..end];
    if crc32c::crc32c(payload) != header.payload_crc32c.get() {
        return CommitCheck::Torn {
            resume: end,
            error: FrameError::BadCommitChecksum,
        };
    }
    let mismatch = CommitCheck::Corrupt {
        error: FrameError::CommitMismatch,
    };
    let commit = &buf[..end];
    let mut pos = offset + COMMIT_HEADER_RECORD_BYTES;
    let mut expected = header.first_seq.get();
    let last = header.last_seq.get();
    // Each step consumes at least one record header, so the walk ends.
    while pos < end {
        let Ok((record, next)) = decode_record(commit, pos, record_crcs) else {
            return mismatch;
        };
        if record.kind == KIND_COMMIT {
            return mismatch;
        }
        if record.kind != KIND_PADDING {
            if record.seq != expected || record.seq > last {
                return mismatch;
            }
            expected += 1;
        }
        pos = next;
    }
    // `last < u64::MAX` is implied by `expected` having passed it only by one.
    if expected.wrapping_sub(1) != last {
        return mismatch;
    }
    CommitCheck::Whole {
        end,
        last_seq: last,
    }
}

/// The records of a commit that [`check_commit`] found whole (`offset..end` of `buf`),
/// padding included, the commit header not; offsets are `buf`'s.
pub fn commit_records(buf: &[u8], offset: usize, end: usize) -> CommitRecords<'_> {
    CommitRecords {
        commit: buf.get(..end).unwrap_or(&[]),
        pos: offset + COMMIT_HEADER_RECORD_BYTES,
    }
}

/// Iterator of [`commit_records`].
#[derive(Debug, Clone)]
pub struct CommitRecords<'a> {
    commit: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for CommitRecords<'a> {
    type Item = RawRecord<'a>;

    fn next(&mut self) -> Option<RawRecord<'a>> {
        if self.pos >= self.commit.len() {
            return None;
        }
        // The commit was checked whole, so this decodes; an error just ends the walk.
        let (record, next) = decode_record_at(self.commit, self.pos).ok()?;
        self.pos = next;
        Some(record)
    }
}

/// Whether a valid record at `pos` proves that data written after the bad spot exists,
/// i.e. that the bad spot is corruption and not a torn tail. `last_seq` is the last
/// sequence number before the bad spot; `framed` whether a commit header was seen in the
/// stream up to and including the bad spot.
///
/// - A valid commit header with `first_seq > last_seq` always counts: it starts a later
///   commit.
/// - In a framed stream nothing else counts: the valid records of the torn commit itself
///   may lie anywhere after the bad spot (a power loss persists blocks out of order).
/// - In a bare stream (no commit header seen) a valid non-padding record with a later
///   sequence number counts: a bare write is trusted to persist as a prefix.
pub fn is_later_data_at(buf: &[u8], pos: usize, last_seq: u64, framed: bool) -> bool {
    if buf.get(pos..pos + 4) != Some(&RECORD_MAGIC[..]) {
        return false;
    }
    let Ok((record, _)) = decode_record_at(buf, pos) else {
        return false;
    };
    match record.kind {
        KIND_COMMIT => parse_commit_header(&record).is_ok_and(|h| h.first_seq.get() > last_seq),
        KIND_PADDING => false,
        _ => !framed && record.seq > last_seq,
    }
}

/// Scans `buf` from offset 0, calling `on_record` for each whole record in order (padding
/// included, so that callers can see it; commit header records not: they are framing)
/// and reports how the scan ended.
///
/// The rules (docs/journal.md, "Recovery"):
/// - a valid commit header whose whole commit is present and matches its payload CRC:
///   its records are handed over (they must be consistent with the header, else
///   [`ScanEnd::Corrupt`]); a bare record (no commit header around it) is handed over as
///   is;
/// - a commit that is incomplete or fails its payload CRC, or bytes that are no valid
///   record: if every byte from there on is zero, the stream ends cleanly there; else if
///   later data exists (see [`is_later_data_at`], searched from the bad commit's declared
///   end, or from the next 8-aligned offset when there is no valid header) it is
///   [`ScanEnd::Corrupt`]; else it is a [`ScanEnd::TornTail`] at the start of the bad
///   commit or record: a torn commit is dropped whole. A bad commit with a valid header
///   is classified by [`damaged_commit_cause`] (a tear, or a commit written whole and
///   corrupt); anything else is a tear.
///
/// `on_record` returning `Err` stops the scan and passes the error through: the caller
/// checks sequence continuity and body validity there.
pub fn scan<'a, E>(
    buf: &'a [u8],
    mut on_record: impl FnMut(RawRecord<'a>) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut offset = 0usize;
    let mut last_seq = 0u64;
    let mut framed = false;
    while offset < buf.len() {
        let (resume, error, damaged) = match decode_record_at(buf, offset) {
            Ok((record, _)) if record.kind == KIND_COMMIT => {
                framed = true;
                let check =
                    parse_commit_header(&record).map(|h| (h, check_commit(buf, offset, &h)));
                match check {
                    Err(error) | Ok((_, CommitCheck::Corrupt { error })) => {
                        return Ok(ScanEnd::Corrupt { offset, error });
                    }
                    Ok((header, CommitCheck::Torn { resume, error })) => (
                        resume,
                        error,
                        Some((header, damaged_commit_cause(buf, offset, &header, error))),
                    ),
                    Ok((
                        _,
                        CommitCheck::Whole {
                            end,
                            last_seq: last,
                        },
                    )) => {
                        for record in commit_records(buf, offset, end) {
                            on_record(record)?;
                        }
                        last_seq = last;
                        offset = end;
                        continue;
                    }
                }
            }
            Ok((record, next)) => {
                if record.kind != KIND_PADDING {
                    last_seq = record.seq;
                }
                on_record(record)?;
                offset = next;
                continue;
            }
            Err(error) => (align_up(offset + 1), error, None),
        };
        let Some(last_nonzero) = buf[offset..].iter().rposition(|&b| b != 0) else {
            return Ok(ScanEnd::Clean { end: offset });
        };
        let later = (resume..buf.len())
            .step_by(RECORD_ALIGN_BYTES)
            .any(|pos| is_later_data_at(buf, pos, last_seq, framed));
        return Ok(if later {
            ScanEnd::Corrupt { offset, error }
        } else {
            ScanEnd::TornTail {
                end: offset,
                error,
                cause: damaged.map_or(TailCause::Torn, |(_, cause)| cause),
                header: damaged.map(|(header, _)| header),
                bytes: last_nonzero + 1,
            }
        });
    }
    Ok(ScanEnd::Clean { end: offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=n {
            starts.push(out.len());
            let body: Vec<u8> = (0..(seq as usize * 7 % 50))
                .map(|i| i as u8 ^ seq as u8)
                .collect();
            encode_record(&mut out, 1, seq, &body);
        }
        (out, starts)
    }

    fn seqs(buf: &[u8]) -> (Vec<u64>, ScanEnd) {
        let mut seen = Vec::new();
        let end = scan::<()>(buf, |r| {
            seen.push(r.seq);
            Ok(())
        })
        .unwrap();
        (seen, end)
    }

    #[test]
    fn round_trip_and_clean_end() {
        let (buf, _) = journal(20);
        let (seen, end) = seqs(&buf);
        assert_eq!(seen, (1..=20).collect::<Vec<_>>());
        assert_eq!(end, ScanEnd::Clean { end: buf.len() });
    }

    #[test]
    fn zero_tail_is_clean() {
        let (mut buf, _) = journal(3);
        let end = buf.len();
        buf.resize(end + 4096, 0);
        assert_eq!(seqs(&buf).1, ScanEnd::Clean { end });
    }

    #[test]
    fn torn_tail_at_every_offset_of_last_record() {
        let (buf, starts) = journal(10);
        let last = *starts.last().unwrap();
        for cut in last + 1..buf.len() {
            let (seen, end) = seqs(&buf[..cut]);
            assert_eq!(seen, (1..=9).collect::<Vec<_>>(), "cut at {cut}");
            assert!(
                matches!(end, ScanEnd::TornTail { end, .. } if end == last),
                "cut at {cut}: {end:?}"
            );
        }
    }

    #[test]
    fn flipped_bit_mid_file_is_corruption() {
        let (buf, starts) = journal(10);
        for bit in 0..((starts[5] - starts[4]) * 8) {
            let mut bad = buf.clone();
            bad[starts[4] + bit / 8] ^= 1 << (bit % 8);
            let (_, end) = seqs(&bad);
            assert!(
                matches!(end, ScanEnd::Corrupt { offset, .. } if offset == starts[4]),
                "bit {bit}: {end:?}"
            );
        }
    }

    #[test]
    fn padding_fills_block() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, 1, &[1, 2, 3]);
        pad_to_block(&mut buf, 4096);
        assert_eq!(buf.len(), 4096);
        encode_record(&mut buf, 1, 2, &vec![9; 4096 - 24 - 8]);
        pad_to_block(&mut buf, 4096);
        assert_eq!(buf.len() % 4096, 0);
        let (seen, end) = seqs(&buf);
        assert_eq!(seen.iter().filter(|&&s| s != 0).count(), 2);
        assert_eq!(end, ScanEnd::Clean { end: buf.len() });
    }

    /// A framed journal: commit `i` holds `sizes[i]` records of `body_len` bytes each,
    /// sequence numbers continuing from 1. Returns the bytes and each commit's range.
    fn framed(commits: &[(u64, usize)]) -> (Vec<u8>, Vec<std::ops::Range<usize>>) {
        let mut out = Vec::new();
        let mut ranges = Vec::new();
        let mut seq = 1u64;
        for &(count, body_len) in commits {
            let start = begin_commit(&mut out);
            let first = seq;
            for _ in 0..count {
                let body: Vec<u8> = (0..body_len).map(|i| (i as u8) ^ (seq as u8)).collect();
                encode_record(&mut out, 3, seq, &body);
                seq += 1;
            }
            let len = seal_commit(&mut out, start, 4096, first, seq - 1).unwrap();
            assert_eq!(len, out.len() - start);
            ranges.push(start..out.len());
        }
        (out, ranges)
    }

    /// Sequence numbers handed to the callback; fails the test if a commit header is.
    fn framed_seqs(buf: &[u8]) -> (Vec<u64>, ScanEnd) {
        let mut seen = Vec::new();
        let end = scan::<()>(buf, |r| {
            assert_ne!(r.kind, KIND_COMMIT, "commit headers are not handed over");
            if r.kind != KIND_PADDING {
                seen.push(r.seq);
            }
            Ok(())
        })
        .unwrap();
        (seen, end)
    }

    /// Sizes giving commits of 1, 2, 4 and (last) 4 blocks.
    const COMMITS: [(u64, usize); 4] = [(3, 100), (5, 1000), (12, 1100), (11, 1200)];

    fn seqs_before(commits: &[(u64, usize)], k: usize) -> Vec<u64> {
        (1..=commits[..k].iter().map(|c| c.0).sum::<u64>()).collect()
    }

    #[test]
    fn framed_round_trip() {
        let (buf, ranges) = framed(&COMMITS);
        for r in &ranges {
            assert_eq!(r.start % 4096, 0);
            assert_eq!(r.len() % 4096, 0);
        }
        assert_eq!(ranges[3].len(), 4 * 4096, "the last commit spans 4 blocks");
        let (seen, end) = framed_seqs(&buf);
        assert_eq!(seen, seqs_before(&COMMITS, 4));
        assert_eq!(end, ScanEnd::Clean { end: buf.len() });
        // Zeros after the last commit (preallocated space) end cleanly too.
        let mut padded = buf.clone();
        padded.resize(buf.len() + 8192, 0);
        assert_eq!(framed_seqs(&padded).1, ScanEnd::Clean { end: buf.len() });
    }

    #[test]
    fn commit_torn_at_every_byte_is_dropped_whole() {
        let (buf, ranges) = framed(&COMMITS);
        let last = ranges[3].clone();
        for cut in last.start + 1..last.end {
            let (seen, end) = framed_seqs(&buf[..cut]);
            assert_eq!(seen, seqs_before(&COMMITS, 3), "cut at {cut}");
            assert!(
                matches!(end, ScanEnd::TornTail { end, .. } if end == last.start),
                "cut at {cut}: {end:?}"
            );
            // The same with the rest zeroed instead of missing (preallocated file).
            let mut zeroed = buf.clone();
            zeroed[cut..].fill(0);
            if zeroed == buf {
                continue; // only zero padding after the cut: nothing was lost
            }
            let (seen, end) = framed_seqs(&zeroed);
            assert_eq!(seen, seqs_before(&COMMITS, 3), "zeroed from {cut}");
            assert!(
                matches!(end, ScanEnd::TornTail { end, .. } if end == last.start),
                "zeroed from {cut}: {end:?}"
            );
        }
    }

    /// Keeps the blocks of `range` whose bit is set in `mask`, filling the others with
    /// zeros or garbage.
    fn persist_blocks(
        buf: &[u8],
        range: &std::ops::Range<usize>,
        mask: u32,
        garbage: bool,
    ) -> Vec<u8> {
        let mut out = buf.to_vec();
        for (b, block) in out[range.clone()].chunks_mut(4096).enumerate() {
            if mask & (1 << b) == 0 {
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = if garbage {
                        (i as u8).wrapping_mul(151) ^ 0x5a ^ b as u8
                    } else {
                        0
                    };
                }
            }
        }
        out
    }

    #[test]
    fn out_of_order_blocks_of_the_last_commit_are_a_torn_tail() {
        // A 4-block and a 3-block last commit.
        for commits in [COMMITS.to_vec(), vec![(3, 100), (5, 1000), (9, 1000)]] {
            let (buf, ranges) = framed(&commits);
            let k = ranges.len() - 1;
            let last = ranges[k].clone();
            let blocks = last.len() / 4096;
            assert!((3..=4).contains(&blocks));
            let before = seqs_before(&commits, k);
            for mask in 0..(1u32 << blocks) - 1 {
                for garbage in [false, true] {
                    let bad = persist_blocks(&buf, &last, mask, garbage);
                    let (seen, end) = framed_seqs(&bad);
                    assert_eq!(seen, before, "mask {mask:b} garbage {garbage}");
                    if mask == 0 && !garbage {
                        assert_eq!(end, ScanEnd::Clean { end: last.start });
                    } else {
                        assert!(
                            matches!(end, ScanEnd::TornTail { end, .. } if end == last.start),
                            "mask {mask:b} garbage {garbage}: {end:?}"
                        );
                    }
                }
            }
            // All blocks persisted: the commit is whole.
            assert_eq!(framed_seqs(&buf).0, seqs_before(&commits, k + 1));
        }
    }

    /// The commit header at `at` of `buf`.
    fn header_at(buf: &[u8], at: usize) -> CommitHeader {
        let (record, _) = decode_record_at(buf, at).unwrap();
        parse_commit_header(&record).unwrap()
    }

    #[test]
    fn flipped_byte_in_the_last_commit_is_a_dropped_corrupt_commit() {
        let (buf, ranges) = framed(&COMMITS);
        let last = ranges[3].clone();
        let header = header_at(&buf, last.start);
        assert_eq!((header.first_seq.get(), header.last_seq.get()), (21, 31));
        assert_eq!(header.record_count.get(), 11);
        for at in last.start + COMMIT_HEADER_RECORD_BYTES..last.end {
            let mut bad = buf.clone();
            bad[at] ^= 1 << (at % 8);
            let (seen, end) = framed_seqs(&bad);
            assert_eq!(seen, seqs_before(&COMMITS, 3), "byte {at}");
            assert_eq!(
                end,
                ScanEnd::TornTail {
                    end: last.start,
                    error: FrameError::BadCommitChecksum,
                    cause: TailCause::Corrupt,
                    header: Some(header),
                    bytes: last.len(),
                },
                "byte {at}"
            );
        }
        // Fewer than a sector's bytes zeroed: no tear leaves that, so corruption.
        let mut bad = buf.clone();
        bad[last.start + 5000..last.start + 5000 + 300].fill(0);
        assert!(matches!(
            framed_seqs(&bad).1,
            ScanEnd::TornTail { cause: TailCause::Corrupt, header: Some(h), .. } if h == header
        ));
        // One whole sector zeroed: a sector the write may not have reached, so torn.
        let mut bad = buf.clone();
        bad[last.start + 5120..last.start + 5632].fill(0);
        assert!(matches!(
            framed_seqs(&bad).1,
            ScanEnd::TornTail { cause: TailCause::Torn, header: Some(h), .. } if h == header
        ));
        // A commit padded with zeros (as before the padding fill) cannot prove it was
        // written whole: a flipped byte in it is judged torn (the documented limit).
        let mut old = buf.clone();
        let padding_at = last.start + COMMIT_HEADER_RECORD_BYTES + 11 * record_bytes(1200);
        old[padding_at + RECORD_HEADER_BYTES..last.end].fill(0);
        old[last.start + 5000] ^= 1;
        assert!(matches!(
            framed_seqs(&old).1,
            ScanEnd::TornTail { cause: TailCause::Torn, header: Some(h), .. } if h == header
        ));
    }

    #[test]
    fn lost_blocks_of_the_last_commit_are_a_torn_commit_with_its_range_if_its_header_persisted() {
        let (buf, ranges) = framed(&COMMITS);
        let last = ranges[3].clone();
        let header = header_at(&buf, last.start);
        for mask in 1..(1u32 << 4) - 1 {
            let bad = persist_blocks(&buf, &last, mask, false);
            let (seen, end) = framed_seqs(&bad);
            assert_eq!(seen, seqs_before(&COMMITS, 3), "mask {mask:b}");
            let persisted_to = (0..4).rev().find(|b| mask & (1 << b) != 0).unwrap() + 1;
            let ScanEnd::TornTail {
                end,
                cause,
                header: got,
                bytes,
                ..
            } = end
            else {
                panic!("mask {mask:b}: {end:?}");
            };
            assert_eq!((end, cause), (last.start, TailCause::Torn), "mask {mask:b}");
            // The range is known when the header's block persisted.
            assert_eq!(got, (mask & 1 != 0).then_some(header), "mask {mask:b}");
            // Up to the last non-zero byte, in the last block that persisted.
            assert!(
                bytes > (persisted_to - 1) * 4096 && bytes <= persisted_to * 4096,
                "mask {mask:b}: {bytes}"
            );
        }
        // Lost blocks holding garbage instead of zeros look written: the documented limit.
        let bad = persist_blocks(&buf, &last, 0b0001, true);
        assert!(matches!(
            framed_seqs(&bad).1,
            ScanEnd::TornTail { cause: TailCause::Corrupt, header: Some(h), .. } if h == header
        ));
        // A bare torn record: torn, no header.
        let (bare, starts) = journal(5);
        assert!(matches!(
            seqs(&bare[..starts[4] + 17]).1,
            ScanEnd::TornTail { end, cause: TailCause::Torn, header: None, bytes: 17, .. }
                if end == starts[4]
        ));
    }

    #[test]
    fn sealed_commits_have_no_zero_sector() {
        // Every padding size a 4096 block can need, including the widened one.
        for count in 1..40u64 {
            for body_len in [0usize, 7, 100, 1000] {
                let (buf, _) = framed(&[(count, body_len)]);
                for (i, sector) in buf.chunks(SECTOR_BYTES).enumerate() {
                    assert!(
                        sector.iter().any(|&b| b != 0),
                        "{count} records of {body_len}: sector {i} is zero"
                    );
                }
            }
        }
    }

    #[test]
    fn flipped_bit_in_a_commit_that_is_not_the_last_is_corruption() {
        let (buf, ranges) = framed(&COMMITS);
        for k in [0, 2] {
            let range = ranges[k].clone();
            for byte in range.clone() {
                // Every bit of the header record, one bit (varying) of every other byte.
                let bits: Vec<usize> = if byte < range.start + COMMIT_HEADER_RECORD_BYTES {
                    (0..8).collect()
                } else {
                    vec![byte % 8]
                };
                for bit in bits {
                    let mut bad = buf.clone();
                    bad[byte] ^= 1 << bit;
                    let (seen, end) = framed_seqs(&bad);
                    assert!(
                        matches!(end, ScanEnd::Corrupt { offset, .. } if offset == range.start),
                        "commit {k} byte {byte} bit {bit}: {end:?}"
                    );
                    assert_eq!(seen, seqs_before(&COMMITS, k));
                }
            }
        }
    }

    /// Commit 1 rebuilt from `records` (kind 3, given seqs) and sealed with the given
    /// header range, between two good commits (or last, if `last`).
    fn with_bad_commit(records: &[u64], first: u64, last_seq: u64, last: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let start = begin_commit(&mut out);
        encode_record(&mut out, 3, 1, b"first");
        seal_commit(&mut out, start, 4096, 1, 1).unwrap();
        let bad_start = begin_commit(&mut out);
        for &seq in records {
            encode_record(&mut out, 3, seq, b"body");
        }
        seal_commit(&mut out, bad_start, 4096, first, last_seq).unwrap();
        if !last {
            let start = begin_commit(&mut out);
            let next = records.iter().max().copied().unwrap_or(1).max(last_seq) + 1;
            encode_record(&mut out, 3, next, b"next");
            seal_commit(&mut out, start, 4096, next, next).unwrap();
        }
        (out, bad_start)
    }

    #[test]
    fn checksummed_but_inconsistent_commit_is_corruption() {
        let cases: [(&[u64], u64, u64); 5] = [
            (&[2, 3, 4], 2, 5), // one record fewer than the header says
            (&[2, 3, 4], 2, 3), // one more
            (&[2, 4, 5], 2, 4), // a gap inside
            (&[3, 4, 5], 2, 4), // first sequence number off
            (&[2, 3, 3], 2, 4), // a repeat
        ];
        for (records, first, last_seq) in cases {
            for last in [false, true] {
                let (buf, bad_start) = with_bad_commit(records, first, last_seq, last);
                let (seen, end) = framed_seqs(&buf);
                assert_eq!(
                    end,
                    ScanEnd::Corrupt {
                        offset: bad_start,
                        error: FrameError::CommitMismatch
                    },
                    "{records:?} as {first}..={last_seq}, last {last}"
                );
                assert_eq!(seen, vec![1]);
            }
        }
        // An undecodable record inside a commit whose payload checksum was computed over it.
        let (mut buf, bad_start) = with_bad_commit(&[2, 3], 2, 3, true);
        buf[bad_start + COMMIT_HEADER_RECORD_BYTES + 30] ^= 1;
        let header_at = bad_start + RECORD_HEADER_BYTES;
        let mut header =
            CommitHeader::read_from_bytes(&buf[header_at..bad_start + COMMIT_HEADER_RECORD_BYTES])
                .unwrap();
        header.payload_crc32c = U32::new(crc32c::crc32c(
            &buf[bad_start + COMMIT_HEADER_RECORD_BYTES..],
        ));
        let mut record = Vec::new();
        encode_record(&mut record, KIND_COMMIT, 0, header.as_bytes());
        buf[bad_start..bad_start + COMMIT_HEADER_RECORD_BYTES].copy_from_slice(&record);
        assert_eq!(
            framed_seqs(&buf).1,
            ScanEnd::Corrupt {
                offset: bad_start,
                error: FrameError::CommitMismatch
            }
        );
        // A checksummed header with impossible fields.
        let mut buf = Vec::new();
        let mut body = header;
        body.record_count = U32::new(7);
        encode_record(&mut buf, KIND_COMMIT, 0, body.as_bytes());
        buf.resize(4096, 0);
        assert_eq!(
            framed_seqs(&buf).1,
            ScanEnd::Corrupt {
                offset: 0,
                error: FrameError::BadCommitHeader
            }
        );
    }

    #[test]
    fn sealed_commit_check_catches_what_the_recovery_check_catches_but_record_crcs() {
        let header_of = |buf: &[u8], at: usize| {
            let (record, _) = decode_record_at(buf, at).unwrap();
            parse_commit_header(&record).unwrap()
        };
        // Whole commits agree.
        let (buf, ranges) = framed(&COMMITS);
        for r in &ranges {
            let header = header_of(&buf, r.start);
            assert_eq!(
                check_sealed_commit(&buf, r.start, &header),
                check_commit(&buf, r.start, &header)
            );
            assert!(matches!(
                check_sealed_commit(&buf, r.start, &header),
                CommitCheck::Whole { .. }
            ));
            // Any flipped payload bit (a sealing bug, or memory corrupted after the
            // seal) fails the payload CRC in both.
            for at in (r.start + COMMIT_HEADER_RECORD_BYTES..r.end).step_by(97) {
                let mut bad = buf.clone();
                bad[at] ^= 0x10;
                assert!(matches!(
                    check_sealed_commit(&bad, r.start, &header),
                    CommitCheck::Torn {
                        error: FrameError::BadCommitChecksum,
                        ..
                    }
                ));
            }
        }
        // Checksummed commits whose records contradict the header.
        let cases: [(&[u64], u64, u64); 5] = [
            (&[2, 3, 4], 2, 5),
            (&[2, 3, 4], 2, 3),
            (&[2, 4, 5], 2, 4),
            (&[3, 4, 5], 2, 4),
            (&[2, 3, 3], 2, 4),
        ];
        for (records, first, last_seq) in cases {
            let (buf, bad_start) = with_bad_commit(records, first, last_seq, true);
            let header = header_of(&buf, bad_start);
            assert_eq!(
                check_sealed_commit(&buf, bad_start, &header),
                CommitCheck::Corrupt {
                    error: FrameError::CommitMismatch
                },
                "{records:?} as {first}..={last_seq}"
            );
        }
        // A record whose own CRC is wrong under a payload CRC computed over it: recovery
        // reports it; the pre-write check leaves it to recovery, as documented.
        let (mut buf, ranges) = framed(&[(2, 100)]);
        let start = ranges[0].start;
        buf[start + COMMIT_HEADER_RECORD_BYTES + RECORD_HEADER_BYTES] ^= 1;
        let mut header = header_of(&buf, start);
        header.payload_crc32c = U32::new(crc32c::crc32c(
            &buf[start + COMMIT_HEADER_RECORD_BYTES..ranges[0].end],
        ));
        assert_eq!(
            check_commit(&buf, start, &header),
            CommitCheck::Corrupt {
                error: FrameError::CommitMismatch
            }
        );
        assert!(matches!(
            check_sealed_commit(&buf, start, &header),
            CommitCheck::Whole { .. }
        ));
    }

    #[test]
    fn seal_refuses_what_was_not_begun() {
        let mut out = Vec::new();
        encode_record(&mut out, 3, 1, b"x");
        assert_eq!(
            seal_commit(&mut out, 0, 4096, 1, 1),
            Err(SealError::NotBegun)
        );
        let start = begin_commit(&mut out);
        assert_eq!(
            seal_commit(&mut out, start, 4096, 2, 1),
            Err(SealError::NotBegun)
        );
        assert_eq!(
            seal_commit(&mut out, start, 4096, 0, 0),
            Err(SealError::NotBegun)
        );
    }

    #[test]
    fn bare_records_then_commits() {
        // A journal written bare before commit framing, continued with framed commits.
        let (mut buf, _) = journal(5);
        pad_to_block(&mut buf, 4096);
        let start = begin_commit(&mut buf);
        encode_record(&mut buf, 3, 6, b"six");
        seal_commit(&mut buf, start, 4096, 6, 6).unwrap();
        let (seen, end) = framed_seqs(&buf);
        assert_eq!(seen, (1..=6).collect::<Vec<_>>());
        assert_eq!(end, ScanEnd::Clean { end: buf.len() });
        // Its first commit cut inside: dropped whole.
        let (seen, end) = framed_seqs(&buf[..start + 100]);
        assert_eq!(seen, (1..=5).collect::<Vec<_>>());
        assert!(
            matches!(end, ScanEnd::TornTail { end, .. } if end == start),
            "{end:?}"
        );
        // Its header lost but its record persisted: no commit header was seen yet, so the
        // bare rule applies and the later record makes it corruption (the documented
        // limit: only a stream that has shown a commit header is scanned as framed).
        let mut torn = buf.clone();
        torn[start..start + COMMIT_HEADER_RECORD_BYTES].fill(0);
        assert!(matches!(framed_seqs(&torn).1, ScanEnd::Corrupt { offset, .. } if offset == start));
    }
}
