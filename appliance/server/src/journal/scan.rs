//! Streaming scan of one segment file with `frame`'s rules, in bounded memory.
//!
//! `frame::scan` classifies a whole in-memory buffer; a segment may be 1 GiB, and every
//! shard recovers at once, so reading whole files would cost a GiB of memory per shard.
//! This module applies the same rules (and the same record decoder,
//! `frame::decode_record_at`) to a file read in chunks, holding at most one chunk plus one
//! maximal record. The rules, exactly as `frame::scan`:
//! - records are decoded one after the other from offset 0;
//! - at the first offset that is not a valid record: if every byte from there to the end of
//!   the file is zero, the file ends cleanly there; else, if a valid non-padding record
//!   with a sequence number above the last one seen starts at any later 8-aligned offset,
//!   the bad record is mid-file corruption; else it is a torn tail.
//!
//! The integration tests check that this scan and `frame::scan` agree on damaged files.

use appliance_core::journal::frame::{
    decode_record_at, record_bytes, FrameError, RawRecord, KIND_PADDING, RECORD_ALIGN_BYTES,
    RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES, RECORD_MAGIC,
};
use glommio::io::DmaFile;

use super::error::JournalError;

/// Bytes of the largest possible record, padding included: with this many bytes buffered
/// after an offset, a record starting there is never cut by the end of the buffer.
const RECORD_SPAN_MAX: usize = record_bytes(RECORD_BODY_BYTES_MAX);

/// How the scan of a segment file ended (file offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentEnd {
    /// Whole records up to `end`, zeros (or nothing) after it.
    Clean { end: u64 },
    /// Whole records up to `end`, then bytes that are no record and no valid later record.
    TornTail { end: u64, error: FrameError },
    /// The record at `offset` is invalid but a valid later record follows.
    Corrupt { offset: u64, error: FrameError },
}

/// Reads a file front to back in block-aligned chunks of a fixed size.
struct ChunkReader<'f> {
    file: &'f DmaFile,
    path: &'f std::path::Path,
    file_len: u64,
    /// Next offset to read; always a multiple of the chunk size, so reads stay aligned.
    pos: u64,
    chunk_bytes: usize,
}

impl ChunkReader<'_> {
    fn at_eof(&self) -> bool {
        self.pos >= self.file_len
    }

    /// Appends the next chunk (or what is left of the file) to `buf`.
    async fn fill(&mut self, buf: &mut Vec<u8>) -> Result<(), JournalError> {
        debug_assert!(!self.at_eof());
        let want = (self.file_len - self.pos).min(self.chunk_bytes as u64) as usize;
        let read = self
            .file
            .read_at_aligned(self.pos, self.chunk_bytes)
            .await
            .map_err(|e| JournalError::Io {
                op: "read",
                path: self.path.to_path_buf(),
                offset: self.pos,
                source: e.into(),
            })?;
        if read.len() < want {
            // The file shrank under us, or the device returned less than it holds: either
            // way the bytes we classify would not be the file's.
            return Err(JournalError::Io {
                op: "read",
                path: self.path.to_path_buf(),
                offset: self.pos,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {want} bytes", read.len()),
                ),
            });
        }
        buf.extend_from_slice(&read[..want]);
        self.pos += want as u64;
        Ok(())
    }
}

/// Scans the segment at `path` (open as `file`, `file_len` bytes long), calling
/// `on_record` with every whole record in order, padding included, with `offset` set to
/// the record's offset in the file. Errors of `on_record` stop the scan and pass through.
pub(crate) async fn scan_segment<E>(
    file: &DmaFile,
    path: &std::path::Path,
    file_len: u64,
    chunk_bytes: usize,
    mut on_record: impl FnMut(RawRecord<'_>) -> Result<(), E>,
) -> Result<SegmentEnd, E>
where
    E: From<JournalError>,
{
    assert!(chunk_bytes >= RECORD_SPAN_MAX && chunk_bytes % 4096 == 0);
    let mut reader = ChunkReader {
        file,
        path,
        file_len,
        pos: 0,
        chunk_bytes,
    };
    // `buf` holds file bytes [base, base + buf.len()); `off` is the next record in it.
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes + RECORD_SPAN_MAX);
    let mut base = 0u64;
    let mut off = 0usize;
    let mut last_seq = 0u64;
    // Each iteration decodes one record or reads one chunk; the file is finite and both
    // advance, so the loop ends. The bound is a guard against a logic error.
    let iterations_max = file_len / RECORD_ALIGN_BYTES as u64 + file_len / chunk_bytes as u64 + 2;
    for _ in 0..iterations_max {
        if buf.len() - off < RECORD_SPAN_MAX && !reader.at_eof() {
            buf.drain(..off);
            base += off as u64;
            off = 0;
            reader.fill(&mut buf).await?;
            continue;
        }
        if off == buf.len() {
            debug_assert!(reader.at_eof());
            return Ok(SegmentEnd::Clean {
                end: base + off as u64,
            });
        }
        match decode_record_at(&buf, off) {
            Ok((record, next)) => {
                if record.kind != KIND_PADDING {
                    last_seq = record.seq;
                }
                on_record(RawRecord {
                    offset: (base + off as u64) as usize,
                    ..record
                })?;
                off = next;
            }
            Err(error) => {
                let at = base + off as u64;
                buf.drain(..off);
                let (all_zero, valid_later) = classify_rest(&mut reader, buf, at, last_seq).await?;
                return Ok(if all_zero {
                    SegmentEnd::Clean { end: at }
                } else if valid_later {
                    SegmentEnd::Corrupt { offset: at, error }
                } else {
                    SegmentEnd::TornTail { end: at, error }
                });
            }
        }
    }
    unreachable!(
        "segment scan of {} exceeded its iteration bound",
        path.display()
    );
}

/// From file offset `at` (where `win` starts; `win` holds what was already read) to the
/// end of the file: are all bytes zero, and does a valid non-padding record with a
/// sequence number above `last_seq` start at an 8-aligned offset after `at`?
async fn classify_rest(
    reader: &mut ChunkReader<'_>,
    mut win: Vec<u8>,
    at: u64,
    last_seq: u64,
) -> Result<(bool, bool), JournalError> {
    debug_assert_eq!(at % RECORD_ALIGN_BYTES as u64, 0);
    let mut wbase = at;
    let mut zero_checked_to = at;
    let mut all_zero = true;
    let mut probe = at + RECORD_ALIGN_BYTES as u64;
    let iterations_max = reader.file_len / reader.chunk_bytes as u64 + 2;
    for _ in 0..iterations_max {
        // Read until a maximal record after the probe is buffered, or the file ends.
        while wbase + (win.len() as u64) < probe + RECORD_SPAN_MAX as u64 && !reader.at_eof() {
            reader.fill(&mut win).await?;
        }
        let wend = wbase + win.len() as u64;
        all_zero &= win[(zero_checked_to - wbase) as usize..]
            .iter()
            .all(|&b| b == 0);
        zero_checked_to = wend;
        while probe + RECORD_HEADER_BYTES as u64 <= wend
            && (probe + RECORD_SPAN_MAX as u64 <= wend || reader.at_eof())
        {
            let rel = (probe - wbase) as usize;
            if win[rel..rel + 4] == RECORD_MAGIC {
                if let Ok((record, _)) = decode_record_at(&win, rel) {
                    if record.kind != KIND_PADDING && record.seq > last_seq {
                        return Ok((false, true));
                    }
                }
            }
            probe += RECORD_ALIGN_BYTES as u64;
        }
        if reader.at_eof() {
            return Ok((all_zero, false));
        }
        win.drain(..(probe - wbase) as usize);
        wbase = probe;
    }
    unreachable!("tail classification exceeded its iteration bound");
}
