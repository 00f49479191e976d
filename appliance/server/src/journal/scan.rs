//! Streaming scan of one segment file with `frame`'s rules, in bounded memory.
//!
//! `frame::scan` classifies a whole in-memory buffer; a segment may be 1 GiB, and every
//! shard recovers at once, so reading whole files would cost a GiB of memory per shard.
//! This module applies the same rules (and the same helpers: `frame::decode_record_at`,
//! `frame::parse_commit_header`, `frame::check_commit`, `frame::is_later_data_at`) to a
//! file read in chunks, holding at most one chunk plus one maximal commit
//! (`frame::COMMIT_BYTES_MAX`, 16 MiB) or record. The rules, exactly as `frame::scan`:
//! - records and commits are decoded one after the other from offset 0; a whole commit
//!   (present, matching its payload CRC, consistent with its header) yields its records; a
//!   commit that checksums but contradicts its header is corruption;
//! - at the first commit that is incomplete or fails its payload CRC, or offset that is no
//!   valid record: if every byte from there to the end of the file is zero, the file ends
//!   cleanly there; else, if later data exists (`frame::is_later_data_at`: a valid commit
//!   header with a later first sequence number, or in a stream that has shown no commit
//!   header yet, any valid later record), searched from the bad commit's declared end or
//!   the next 8-aligned offset, it is mid-file corruption; else a tail to drop at the
//!   start of the bad commit or record, classified as `frame::scan` does (a torn write,
//!   or a commit written whole and corrupt: `frame::damaged_commit_cause`).
//!
//! The integration tests check that this scan and `frame::scan` agree on damaged files.

use appliance_core::journal::frame::{
    align_up, check_commit, commit_records, damaged_commit_cause, decode_record_at,
    is_later_data_at, parse_commit_header, record_bytes, CommitCheck, CommitHeader, FrameError,
    RawRecord, TailCause, COMMIT_HEADER_RECORD_BYTES, KIND_COMMIT, KIND_PADDING,
    RECORD_ALIGN_BYTES, RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES,
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
    /// Whole records up to `end`, then bytes that are no whole record or commit, with no
    /// later data after them: the tail recovery drops. As `frame::ScanEnd::TornTail`:
    /// `cause` from `frame::damaged_commit_cause` (torn unless a commit with a valid
    /// header is provably written whole), `header` the dropped commit's when its header
    /// record is valid, `bytes` from `end` to just past the last non-zero byte.
    TornTail {
        end: u64,
        error: FrameError,
        cause: TailCause,
        header: Option<CommitHeader>,
        bytes: u64,
    },
    /// The record or commit at `offset` is invalid but later data follows, or it is a
    /// commit that checksums but contradicts its header.
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
/// the record's offset in the file. Unlike `frame::scan`, the header record of each whole
/// commit is handed over too, before the commit's records (the journal indexes commits by
/// it); callers must not treat it as data. Errors of `on_record` stop the scan and pass
/// through.
///
/// `framed` says whether a commit header was seen earlier in the journal (previous
/// segments), and is updated: the scan of a journal's files in order classifies exactly
/// like `frame::scan` of the files concatenated.
pub(crate) async fn scan_segment<E>(
    file: &DmaFile,
    path: &std::path::Path,
    file_len: u64,
    chunk_bytes: usize,
    framed: &mut bool,
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
    // Each iteration decodes one record or commit, or reads one chunk; the file is finite
    // and both advance, so the loop ends. The bound is a guard against a logic error.
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
        let (resume, error, damaged) = match decode_record_at(&buf, off) {
            Ok((record, _)) if record.kind == KIND_COMMIT => {
                *framed = true;
                let header = match parse_commit_header(&record) {
                    Ok(header) => header,
                    Err(error) => {
                        return Ok(SegmentEnd::Corrupt {
                            offset: base + off as u64,
                            error,
                        })
                    }
                };
                // Buffer the whole commit (bounded by `frame::COMMIT_BYTES_MAX` through
                // the header check) before checking it.
                let len = header.commit_bytes.get() as usize;
                if buf.len() - off < len && !reader.at_eof() {
                    buf.drain(..off);
                    base += off as u64;
                    off = 0;
                    while buf.len() < len && !reader.at_eof() {
                        reader.fill(&mut buf).await?;
                    }
                }
                match check_commit(&buf, off, &header) {
                    CommitCheck::Corrupt { error } => {
                        return Ok(SegmentEnd::Corrupt {
                            offset: base + off as u64,
                            error,
                        })
                    }
                    // The whole commit is buffered if the file holds it, so the
                    // classification sees every sector of it.
                    CommitCheck::Torn { resume, error } => (
                        resume,
                        error,
                        Some((header, damaged_commit_cause(&buf, off, &header, error))),
                    ),
                    CommitCheck::Whole {
                        end,
                        last_seq: last,
                    } => {
                        // The header record is framing; it is handed over (see above)
                        // so that the journal's index can start an entry at the commit.
                        let header_record = RawRecord {
                            offset: off,
                            seq: 0,
                            kind: KIND_COMMIT,
                            body: &buf[off + RECORD_HEADER_BYTES..off + COMMIT_HEADER_RECORD_BYTES],
                        };
                        for record in
                            std::iter::once(header_record).chain(commit_records(&buf, off, end))
                        {
                            on_record(RawRecord {
                                offset: (base + record.offset as u64) as usize,
                                ..record
                            })?;
                        }
                        last_seq = last;
                        off = end;
                        continue;
                    }
                }
            }
            Ok((record, next)) => {
                if record.kind != KIND_PADDING {
                    last_seq = record.seq;
                }
                on_record(RawRecord {
                    offset: (base + off as u64) as usize,
                    ..record
                })?;
                off = next;
                continue;
            }
            Err(error) => (align_up(off + 1), error, None),
        };
        let at = base + off as u64;
        let resume = base + resume as u64;
        buf.drain(..off);
        let rest = classify_rest(&mut reader, buf, at, resume, last_seq, *framed).await?;
        return Ok(match rest {
            Rest::Zero => SegmentEnd::Clean { end: at },
            Rest::LaterData => SegmentEnd::Corrupt { offset: at, error },
            Rest::NoLaterData { nonzero_end } => SegmentEnd::TornTail {
                end: at,
                error,
                cause: damaged.map_or(TailCause::Torn, |(_, cause)| cause),
                header: damaged.map(|(header, _)| header),
                bytes: nonzero_end - at,
            },
        });
    }
    unreachable!(
        "segment scan of {} exceeded its iteration bound",
        path.display()
    );
}

/// What follows a bad spot, to the end of the file.
enum Rest {
    /// Only zeros: the file ends cleanly at the bad spot.
    Zero,
    /// Later data: the bad spot is corruption in the middle.
    LaterData,
    /// Non-zero bytes but no later data: a tail to drop; the last non-zero byte is just
    /// before file offset `nonzero_end`.
    NoLaterData { nonzero_end: u64 },
}

/// From file offset `at` (where `win` starts; `win` holds what was already read) to the
/// end of the file: are all bytes zero (and if not, where does the last non-zero one
/// end), and does later data (`frame::is_later_data_at`) start at an 8-aligned offset
/// from `resume` (> `at`) on?
async fn classify_rest(
    reader: &mut ChunkReader<'_>,
    mut win: Vec<u8>,
    at: u64,
    resume: u64,
    last_seq: u64,
    framed: bool,
) -> Result<Rest, JournalError> {
    debug_assert_eq!(at % RECORD_ALIGN_BYTES as u64, 0);
    debug_assert!(resume > at && resume % RECORD_ALIGN_BYTES as u64 == 0);
    let mut wbase = at;
    let mut zero_checked_to = at;
    let mut nonzero_end: Option<u64> = None;
    let mut probe = resume;
    let iterations_max = reader.file_len / reader.chunk_bytes as u64 + 2;
    for _ in 0..iterations_max {
        // Read until a maximal record after the probe is buffered, or the file ends.
        while wbase + (win.len() as u64) < probe + RECORD_SPAN_MAX as u64 && !reader.at_eof() {
            reader.fill(&mut win).await?;
        }
        let wend = wbase + win.len() as u64;
        if let Some(last) = win[(zero_checked_to - wbase) as usize..]
            .iter()
            .rposition(|&b| b != 0)
        {
            nonzero_end = Some(zero_checked_to + last as u64 + 1);
        }
        zero_checked_to = wend;
        while probe + RECORD_HEADER_BYTES as u64 <= wend
            && (probe + RECORD_SPAN_MAX as u64 <= wend || reader.at_eof())
        {
            if is_later_data_at(&win, (probe - wbase) as usize, last_seq, framed) {
                return Ok(Rest::LaterData);
            }
            probe += RECORD_ALIGN_BYTES as u64;
        }
        if reader.at_eof() {
            return Ok(match nonzero_end {
                None => Rest::Zero,
                Some(nonzero_end) => Rest::NoLaterData { nonzero_end },
            });
        }
        win.drain(..(probe - wbase) as usize);
        wbase = probe;
    }
    unreachable!("tail classification exceeded its iteration bound");
}
