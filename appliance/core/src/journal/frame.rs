//! Record framing of the journal: a fixed 24-byte header, a kind-specific body, zero
//! padding to the next 8-byte boundary, and a CRC32C over header and body.
//!
//! This module knows nothing about what a body means (see `record`); it only makes a byte
//! stream of records self-checking, and tells a torn tail (the crash cut the last write
//! short) from corruption in the middle (a record that is bad although valid records follow
//! it). The server reads files and hands their bytes here; nothing in this module does I/O.
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
/// number 0 and a zero body, and is skipped by readers.
pub const KIND_PADDING: u8 = 0xFF;

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
    assert!(
        body.len() <= RECORD_BODY_BYTES_MAX,
        "journal record body too large"
    );
    let len = RECORD_HEADER_BYTES + body.len();
    let mut header = RecordHeader {
        magic: RECORD_MAGIC,
        len: U32::new(len as u32),
        seq: U64::new(seq),
        kind,
        version: RECORD_VERSION,
        reserved: U16::ZERO,
        crc32c: U32::ZERO,
    };
    header.crc32c = U32::new(checksum(&header.as_bytes()[..20], body));
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + (align_up(len) - len), 0);
}

/// Appends a padding record so that `out.len()` becomes a multiple of `block_bytes`
/// (relative to the start of `out`, which the caller keeps block-aligned in the file).
/// Does nothing if it already is. A gap smaller than a header is widened by one block.
pub fn pad_to_block(out: &mut Vec<u8>, block_bytes: usize) {
    debug_assert!(block_bytes.is_power_of_two() && block_bytes >= RECORD_HEADER_BYTES);
    let rem = out.len() % block_bytes;
    if rem == 0 {
        return;
    }
    let mut gap = block_bytes - rem;
    if gap < RECORD_HEADER_BYTES {
        gap += block_bytes;
    }
    let body = vec![0u8; gap - RECORD_HEADER_BYTES];
    encode_record(out, KIND_PADDING, 0, &body);
    debug_assert_eq!(out.len() % block_bytes, 0);
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
}

/// Decodes the record starting at `offset`, checking every framing rule.
/// Returns the record and the offset of the next one.
pub fn decode_record_at(buf: &[u8], offset: usize) -> Result<(RawRecord<'_>, usize), FrameError> {
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
    if checksum(&rest[..20], body) != header.crc32c.get() {
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
    /// The bytes from `end` on are not a valid record and no valid record follows them: the
    /// tail of an interrupted write. Recovery truncates the file at `end`.
    TornTail {
        /// Offset just past the last whole record.
        end: usize,
        /// What was wrong at `end`.
        error: FrameError,
    },
    /// The record at `offset` is invalid although a valid record with a later sequence
    /// number follows it: corruption in the middle, which recovery must not skip.
    Corrupt {
        /// Offset of the invalid record.
        offset: usize,
        /// What was wrong there.
        error: FrameError,
    },
}

/// Scans `buf` from offset 0, calling `on_record` for each whole record (padding included,
/// so that callers can see it) in order, and reports how the scan ended.
///
/// `on_record` returning `Err` stops the scan and passes the error through: the caller
/// checks sequence continuity and body validity there.
pub fn scan<'a, E>(
    buf: &'a [u8],
    mut on_record: impl FnMut(RawRecord<'a>) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut offset = 0usize;
    let mut last_seq = 0u64;
    while offset < buf.len() {
        match decode_record_at(buf, offset) {
            Ok((record, next)) => {
                if record.kind != KIND_PADDING {
                    last_seq = record.seq;
                }
                on_record(record)?;
                offset = next;
            }
            Err(error) => {
                if buf[offset..].iter().all(|&b| b == 0) {
                    return Ok(ScanEnd::Clean { end: offset });
                }
                return Ok(if valid_record_after(buf, offset, last_seq) {
                    ScanEnd::Corrupt { offset, error }
                } else {
                    ScanEnd::TornTail { end: offset, error }
                });
            }
        }
    }
    Ok(ScanEnd::Clean { end: offset })
}

/// Looks for any valid non-padding record after `offset` whose sequence number is later
/// than `last_seq`. One write of a tick is contiguous, so a torn write leaves no valid
/// later record behind it; finding one means the bad bytes are mid-journal corruption.
fn valid_record_after(buf: &[u8], offset: usize, last_seq: u64) -> bool {
    let mut probe = align_up(offset + 1);
    while probe + RECORD_HEADER_BYTES <= buf.len() {
        if buf[probe..probe + 4] == RECORD_MAGIC {
            if let Ok((record, _)) = decode_record_at(buf, probe) {
                if record.kind != KIND_PADDING && record.seq > last_seq {
                    return true;
                }
            }
        }
        probe += RECORD_ALIGN_BYTES;
    }
    false
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
}
