//! The journal files of one shard: append-only segment files written with O_DIRECT, one
//! aligned synchronized write per commit, or per group of commits (group commit),
//! recovery on open, and reads of single records for idempotent replays. A write is
//! synchronized by `O_DSYNC` on the segment files (the default) or by an fdatasync after
//! it ([`JournalSync`]).
//!
//! This module knows the framing (`appliance_core::journal::frame`) but not what record
//! bodies mean: the shard frames a tick's records as one commit (`frame::begin_commit`,
//! the core's records, `frame::seal_commit(.., 4096, ..)`: commit header, records,
//! padding to the block), [`Journal::commit`] makes it durable ([`Journal::commit_many`]
//! several ticks' commits with one write), and on start-up
//! [`Journal::open`] hands every record back to the core's recovery; a commit whose
//! write a crash tore is dropped whole. docs/journal.md
//! describes the on-disk format and the rules.
//!
//! Layout: a directory per shard; segment files named by the sequence number of their
//! first record (`00000000000000000001.journal`, 20 digits so that names sort like
//! numbers), each preallocated to `segment_bytes_max` and written front to back at
//! block-aligned offsets. A commit never straddles two files: when it does not fit in the
//! rest of the current file, the journal rotates to a new one first.

mod config;
mod error;
mod scan;

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use appliance_core::journal::frame::{
    check_sealed_commit, decode_record_at, pad_to_block, parse_commit_header, record_bytes,
    CommitCheck, FrameError, RawRecord, KIND_COMMIT, KIND_PADDING,
};
use glommio::io::{Directory, DmaFile, OpenOptions};

pub use appliance_core::journal::frame::TailCause;
pub use config::{
    JournalConfig, JournalSync, COMMIT_BYTES_MAX_DEFAULT, RECOVERY_CHUNK_BYTES_DEFAULT,
    RECOVERY_CHUNK_BYTES_MIN, SEGMENT_BYTES_MAX_DEFAULT,
};
pub use error::{CommitRejection, JournalError, OpenError};

use error::io_err;
use scan::{scan_segment, SegmentEnd};

/// The journal's block: every commit starts at a multiple of it in its file and is a
/// multiple of it long, which is what O_DIRECT needs (devices with a larger logical block
/// are refused at open) and what `frame::seal_commit(.., 4096, ..)` and
/// `frame::pad_to_block(.., 4096)` produce.
pub const BLOCK_BYTES: usize = 4096;

/// File name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".journal";

/// Digits of the sequence number in a segment file name: enough for any `u64`, and fixed
/// so that the lexical order of names is the numeric order.
const SEGMENT_NAME_DIGITS: usize = 20;

/// The file name of the segment whose first record has sequence number `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:0SEGMENT_NAME_DIGITS$}{SEGMENT_SUFFIX}")
}

/// Where a durable commit landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPosition {
    /// Sequence number of the commit's first record.
    pub first_seq: u64,
    /// Sequence number of its last record.
    pub last_seq: u64,
    /// The segment holding it, by the sequence number in the segment's name.
    pub segment_first_seq: u64,
    /// Byte offset of the commit in the segment (a multiple of [`BLOCK_BYTES`]).
    pub offset: u64,
    /// Bytes of the commit (a multiple of [`BLOCK_BYTES`]).
    pub len: u64,
}

/// What recovery dropped at the end of the last segment (see [`Journal::dropped_tail`]):
/// the bytes after the last whole record or commit, which were no whole commit and had no
/// later data after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedTail {
    /// The segment file.
    pub path: PathBuf,
    /// Byte offset in the file where the dropped bytes start (the damaged commit's start,
    /// or just past the last whole bare record); the file was cut there.
    pub offset: u64,
    /// Bytes dropped: from `offset` to just past the last non-zero byte.
    pub bytes: u64,
    /// Sequence number of the first dropped record: the dropped commit's `first_seq` when
    /// its header record was valid, else the number the next record would have carried.
    pub first_seq: u64,
    /// Sequence number of the last dropped record, from the dropped commit's header; `None`
    /// when no valid commit header tells it (a bare record, or the header itself lost).
    pub last_seq: Option<u64>,
    /// Records dropped, from the same header; `None` when it is not known.
    pub records: Option<u64>,
    /// A torn write (never acknowledged), or a commit written whole and corrupt
    /// (acknowledged: answered records were lost). See `frame::damaged_commit_cause`.
    pub cause: TailCause,
    /// What was wrong at `offset`.
    pub error: FrameError,
}

/// A segment file of this journal.
#[derive(Debug)]
struct Segment {
    /// Sequence number in the name (that of its first record).
    first_seq: u64,
    path: PathBuf,
}

/// One entry per commit: where the records from `first_seq` up to the next entry's
/// `first_seq` lie. Recovery starts an entry at every commit header, and (for bare commits,
/// whose boundaries the framing does not mark) at every record that starts on a block
/// boundary: every bare commit start is one, and the few extra entries (records that
/// happen to start a block inside a commit) only make entries finer. 32 bytes, at most one
/// per 4 KiB of journal.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    first_seq: u64,
    /// Offset in the segment, a multiple of [`BLOCK_BYTES`].
    offset: u64,
    /// Bytes from `offset` to the end of the last record of the entry.
    len: u64,
    /// Index into `Journal::segments`.
    segment: u32,
}

/// The journal of one shard. Not `Send`: it lives on its shard's glommio executor.
#[derive(Debug)]
pub struct Journal {
    config: JournalConfig,
    /// Open for the directory fsync at rotation; also holds the exclusive `flock` that
    /// keeps a second instance out of this directory for as long as the journal lives.
    dir: Directory,
    segments: Vec<Segment>,
    /// The last segment, open for writing; `None` only while the journal has no segment.
    current: Option<DmaFile>,
    /// Next write offset in the current segment; a multiple of [`BLOCK_BYTES`].
    tail: u64,
    /// Sequence number the next record must carry.
    next_seq: u64,
    index: Vec<IndexEntry>,
    /// Set by the first failed write, fdatasync or rotation: see [`JournalError::Poisoned`].
    poisoned: Option<String>,
    /// Synchronized writes made since open: see [`Journal::writes_total`].
    writes_total: u64,
    /// What recovery dropped at the tail, if anything: see [`Journal::dropped_tail`].
    dropped_tail: Option<DroppedTail>,
    /// The last older (non-current) segment read by `read_record`, kept open because
    /// replays tend to cluster.
    old_segment: RefCell<Option<(u32, Rc<DmaFile>)>>,
}

impl Journal {
    /// Opens (creating if needed) the journal in `config.dir` and recovers it.
    ///
    /// Every segment is scanned in sequence order and every non-padding record is handed
    /// to `on_record` in order, with `offset` set to its offset in its segment file. The
    /// checks, each failing with an error that names file and offset:
    /// - sequence numbers are consecutive across records and files, and each file's first
    ///   record carries the number in the file's name (the first file may start anywhere);
    /// - an invalid record or commit followed by later data (a later commit, or for a bare
    ///   stream a later record) is corruption ([`JournalError::Corrupt`]), never skipped;
    ///   so is a commit that checksums but contradicts its header;
    /// - a torn tail is accepted only in the last file ([`JournalError::TornTailNotLast`]).
    ///
    /// A torn tail of the last file is cut off. A torn commit (incomplete, or its payload
    /// does not match its CRC, whichever of its blocks persisted) is cut whole at its
    /// start, a block boundary; so is a last commit that was written whole but is
    /// corrupt. Every dropped tail is logged at error level (file, offset, sequence range
    /// and record count as far as known, torn or corrupt) and kept for
    /// [`Journal::dropped_tail`]. A torn bare record is cut after the last whole record: the
    /// block holding that end is rewritten with a padding record up to the block boundary.
    /// The file is truncated at the new tail and preallocated again (so everything after
    /// reads as zeros), and synced. The journal is then positioned after the last record.
    pub async fn open<E>(
        config: JournalConfig,
        mut on_record: impl FnMut(RawRecord<'_>) -> Result<(), E>,
    ) -> Result<Journal, OpenError<E>> {
        config.validate()?;
        let dir = open_dir(&config.dir).await?;
        let segments = list_segments(&config.dir)?;

        let mut index: Vec<IndexEntry> = Vec::new();
        let mut expected: Option<u64> = None;
        let mut current = None;
        let mut tail = 0u64;
        // Whether a commit header was seen so far: the scan rules of a framed stream
        // carry over from one file to the next, as in `frame::scan` of the files
        // concatenated.
        let mut framed = false;
        let mut dropped_tail = None;
        for (i, segment) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            let path = &segment.path;
            let file = if is_last {
                // Appended to from now on: with the flags of a segment made by `rotate`.
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(config.sync.open_flags())
                    .dma_open(path)
                    .await
            } else {
                DmaFile::open(path).await
            }
            .map_err(|e| io_err("open", path, 0)(e.into()))?;
            check_alignment(&file, path)?;
            let file_len = file
                .file_size()
                .await
                .map_err(|e| io_err("stat", path, 0)(e.into()))?;

            let mut first_in_file: Option<u64> = None;
            // Start of the block-aligned run of records being indexed, and whether an
            // index entry has been opened for it.
            let mut run_start = 0u64;
            let mut run_indexed = false;
            let end = scan_segment(
                &file,
                path,
                file_len,
                config.recovery_chunk_bytes,
                &mut framed,
                |record: RawRecord<'_>| -> Result<(), OpenError<E>> {
                    let offset = record.offset as u64;
                    let record_end = offset + record_bytes(record.body.len()) as u64;
                    if offset % BLOCK_BYTES as u64 == 0 || record.kind == KIND_COMMIT {
                        run_start = offset;
                        run_indexed = false;
                    }
                    if record.kind == KIND_COMMIT {
                        // Framing only: it starts the next index entry, and is not data.
                        return Ok(());
                    }
                    if record.kind == KIND_PADDING {
                        if run_indexed {
                            index.last_mut().expect("run is indexed").len = record_end - run_start;
                        }
                        return Ok(());
                    }
                    if let Some(expected) = expected {
                        if record.seq != expected {
                            return Err(JournalError::SequenceGap {
                                path: path.clone(),
                                offset,
                                expected,
                                found: record.seq,
                            }
                            .into());
                        }
                    }
                    if first_in_file.is_none() {
                        if record.seq != segment.first_seq {
                            return Err(JournalError::SegmentNameMismatch {
                                path: path.clone(),
                                name_seq: segment.first_seq,
                                first_seq: record.seq,
                            }
                            .into());
                        }
                        first_in_file = Some(record.seq);
                    }
                    // The name check of the first file and continuity make every sequence
                    // number >= 1 and strictly increasing; `+ 1` cannot overflow before
                    // 2^64 records.
                    expected = Some(record.seq + 1);
                    if !run_indexed {
                        index.push(IndexEntry {
                            first_seq: record.seq,
                            offset: run_start,
                            len: 0,
                            segment: i as u32,
                        });
                        run_indexed = true;
                    }
                    index.last_mut().expect("run is indexed").len = record_end - run_start;
                    on_record(record).map_err(|source| OpenError::Replay {
                        path: path.clone(),
                        offset,
                        seq: record.seq,
                        source,
                    })
                },
            )
            .await?;

            if first_in_file.is_none() {
                if !is_last {
                    return Err(JournalError::EmptySegment { path: path.clone() }.into());
                }
                // An empty last file: created by a rotation that crashed before its first
                // write. Its name must still continue the sequence.
                if let Some(expected) = expected {
                    if segment.first_seq != expected {
                        return Err(JournalError::SequenceGap {
                            path: path.clone(),
                            offset: 0,
                            expected,
                            found: segment.first_seq,
                        }
                        .into());
                    }
                }
                expected = Some(segment.first_seq);
            }

            match end {
                SegmentEnd::Corrupt { offset, error } => {
                    return Err(JournalError::Corrupt {
                        path: path.clone(),
                        offset,
                        error,
                    }
                    .into());
                }
                SegmentEnd::TornTail { end, error, .. } if !is_last => {
                    return Err(JournalError::TornTailNotLast {
                        path: path.clone(),
                        offset: end,
                        error,
                    }
                    .into());
                }
                SegmentEnd::Clean { .. } if !is_last => {
                    // Closing explicitly releases the descriptor now rather than at the
                    // next reactor turn.
                    file.close()
                        .await
                        .map_err(|e| io_err("close", path, 0)(e.into()))?;
                }
                SegmentEnd::Clean { end } => {
                    tail = repair_last(&file, path, file_len, end, false, &config).await?;
                    current = Some(file);
                }
                SegmentEnd::TornTail {
                    end,
                    error,
                    cause,
                    header,
                    bytes,
                } => {
                    let dropped = DroppedTail {
                        path: path.clone(),
                        offset: end,
                        bytes,
                        first_seq: header
                            .map_or(expected.unwrap_or(segment.first_seq), |h| h.first_seq.get()),
                        last_seq: header.map(|h| h.last_seq.get()),
                        records: header.map(|h| u64::from(h.record_count.get())),
                        cause,
                        error,
                    };
                    // Logged before the repair changes the file, so that the record of
                    // what was dropped exists even if the repair fails.
                    log_dropped_tail(&dropped);
                    dropped_tail = Some(dropped);
                    tail = repair_last(&file, path, file_len, end, true, &config).await?;
                    current = Some(file);
                }
            }
        }
        let next_seq = expected.unwrap_or(1);
        assert!(next_seq >= 1);
        assert!(tail % BLOCK_BYTES as u64 == 0);
        Ok(Journal {
            config,
            dir,
            segments,
            current,
            tail,
            next_seq,
            index,
            poisoned: None,
            writes_total: 0,
            dropped_tail,
            old_segment: RefCell::new(None),
        })
    }

    /// What recovery dropped at the end of the last segment when this journal was opened,
    /// if anything: a torn write (never acknowledged: nothing answered was lost) or a
    /// corrupt commit that was written whole (acknowledged: its records were answered
    /// and are lost; the tax server may have coded their numbers). For the server's
    /// metrics and status; it was also logged at error level. `None` after a clean open.
    pub fn dropped_tail(&self) -> Option<&DroppedTail> {
        self.dropped_tail.as_ref()
    }

    /// Makes one commit durable: one aligned, synchronized O_DIRECT write at the current
    /// segment's tail (after rotating to a new segment if it does not fit). Returns
    /// only when the commit is on disk, so the caller may release the answers of every
    /// record in it ("nothing acknowledged is lost").
    ///
    /// `bytes` is one commit as the shard frames it (`frame::begin_commit`, records,
    /// `frame::seal_commit(.., 4096, ..)`), or a bare one (records padded with
    /// `frame::pad_to_block(.., 4096)`, as tools and tests still write). It is checked
    /// before writing (a multiple of the block; a framed commit exactly one whole,
    /// consistent commit, by the same check recovery applies; whole records, consecutive
    /// sequence numbers starting at [`Journal::next_seq`]) and refused with
    /// [`JournalError::InvalidCommit`] otherwise; nothing is written then and the journal
    /// stays usable.
    ///
    /// Any I/O failure poisons the journal: this and every later call fail (see
    /// [`JournalError::Poisoned`]); the shard must stop and recover after a restart.
    ///
    /// This is [`Journal::commit_many`] of one commit.
    pub async fn commit(&mut self, bytes: &[u8]) -> Result<CommitPosition, JournalError> {
        match self.commit_many(&[bytes]).await {
            Ok(mut positions) => Ok(positions.pop().expect("one position per commit")),
            Err(JournalError::InvalidGroupCommit { rejection, .. }) => {
                Err(JournalError::InvalidCommit(rejection))
            }
            Err(error) => Err(error),
        }
    }

    /// Makes several consecutive commits durable at once (group commit across ticks):
    /// the commits are laid back to back at the segment's tail and written with one
    /// aligned, synchronized O_DIRECT write, instead of one per commit.
    /// Returns their positions, in order, only when every one of them is on disk.
    ///
    /// Each commit stays a separately framed commit on disk, exactly as [`Journal::commit`]
    /// would have written it one after the other: the format and recovery do not change,
    /// and each commit gets its own index entry for [`Journal::read_records`]. Each is
    /// checked as `commit` checks it, the sequence numbers running on from one commit to
    /// the next starting at [`Journal::next_seq`]. If any commit is refused, the whole
    /// group is refused with [`JournalError::InvalidGroupCommit`] (naming the commit)
    /// before anything is written, and the journal stays usable.
    ///
    /// A commit is never split. The group is cut into several writes, each synchronized,
    /// only where it must be: at a rotation (the commits that fit go to the old
    /// segment and are synced there before the new segment is created, so a segment is
    /// never left with a torn tail behind a later one), and where a write would exceed
    /// `commit_bytes_max` bytes (see [`Journal::writes_total`]). An empty group writes
    /// nothing.
    ///
    /// Any I/O failure poisons the journal exactly as in `commit`. The commits of the
    /// group made durable by an earlier write of the same call (before a rotation) stay
    /// recorded as durable (`next_seq`, `read_records`), the rest are not.
    pub async fn commit_many(
        &mut self,
        commits: &[&[u8]],
    ) -> Result<Vec<CommitPosition>, JournalError> {
        self.check_poisoned()?;
        // The whole group crosses the disk boundary checked: a bad commit in the middle
        // must not leave the ones before it written and the journal half advanced.
        let mut seqs = Vec::with_capacity(commits.len());
        let mut next_seq = self.next_seq;
        for (index, bytes) in commits.iter().enumerate() {
            let (first_seq, last_seq) = self
                .verify_commit(bytes, next_seq)
                .map_err(|rejection| JournalError::InvalidGroupCommit { index, rejection })?;
            seqs.push((first_seq, last_seq));
            next_seq = last_seq + 1;
        }
        let mut positions = Vec::with_capacity(commits.len());
        // Each round writes at least one commit or fails, so at most `commits.len()`
        // rounds.
        while positions.len() < commits.len() {
            let done = positions.len();
            let (segment, offset, count) =
                match self.write_run(&commits[done..], seqs[done].0).await {
                    Ok(run) => run,
                    Err(error) => {
                        self.poisoned = Some(error.to_string());
                        return Err(error);
                    }
                };
            assert!(count >= 1 && done + count <= commits.len());
            assert_eq!(offset, self.tail, "a run starts at the tail");
            self.writes_total += 1;
            for (bytes, &(first_seq, last_seq)) in commits[done..done + count]
                .iter()
                .zip(&seqs[done..done + count])
            {
                let len = bytes.len() as u64;
                self.index.push(IndexEntry {
                    first_seq,
                    offset: self.tail,
                    len,
                    segment,
                });
                positions.push(CommitPosition {
                    first_seq,
                    last_seq,
                    segment_first_seq: self.segments[segment as usize].first_seq,
                    offset: self.tail,
                    len,
                });
                self.tail += len;
                self.next_seq = last_seq + 1;
            }
            debug_assert!(self.tail <= self.config.segment_bytes_max);
        }
        Ok(positions)
    }

    /// How many synchronized writes (one O_DIRECT write each, with `O_DSYNC` or followed
    /// by an fdatasync: [`JournalSync`]) `commit` and
    /// `commit_many` made since the journal was opened. With group commit it grows by one
    /// per group (more only at a rotation or beyond `commit_bytes_max` bytes), so its
    /// ratio to the commits written is the number of commits each device flush carried.
    pub fn writes_total(&self) -> u64 {
        self.writes_total
    }

    /// Reads back the record with sequence number `seq` from a durable commit, for
    /// answering a replayed request: its kind and body. The commit's bytes are read from
    /// disk and the record's CRC32C is verified again.
    pub async fn read_record(&self, seq: u64) -> Result<(u8, Vec<u8>), JournalError> {
        let mut records = self.read_records(&[seq]).await?;
        Ok(records.pop().expect("one record per seq"))
    }

    /// Like [`Journal::read_record`] for many records at once, returned in the order of
    /// `seqs`. Each index entry (a commit, or a part of one) holding any of them is read
    /// once: a burst of replays after a restart reads each commit once, not once per
    /// record.
    pub async fn read_records(&self, seqs: &[u64]) -> Result<Vec<(u8, Vec<u8>)>, JournalError> {
        let first_seq = self.index.first().map_or(self.next_seq, |e| e.first_seq);
        if let Some(&seq) = seqs.iter().find(|&&s| s < first_seq || s >= self.next_seq) {
            return Err(JournalError::SeqNotFound {
                seq,
                first_seq,
                next_seq: self.next_seq,
            });
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_unstable_by_key(|&i| seqs[i]);
        let mut out: Vec<Option<(u8, Vec<u8>)>> = vec![None; seqs.len()];
        let mut next = 0usize;
        while next < order.len() {
            let at = self
                .index
                .partition_point(|e| e.first_seq <= seqs[order[next]]);
            assert!(at >= 1, "seq >= first indexed seq {first_seq}");
            let entry = self.index[at - 1];
            let entry_end_seq = self.index.get(at).map_or(self.next_seq, |e| e.first_seq);
            let group_end = next
                + order[next..]
                    .iter()
                    .take_while(|&&i| seqs[i] < entry_end_seq)
                    .count();
            self.read_entry(entry, &order[next..group_end], seqs, &mut out)
                .await?;
            next = group_end;
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every seq was found or an error returned"))
            .collect())
    }

    /// Reads one index entry and picks the records `wanted` (positions into `seqs`,
    /// ascending by seq) out of it.
    async fn read_entry(
        &self,
        entry: IndexEntry,
        wanted: &[usize],
        seqs: &[u64],
        out: &mut [Option<(u8, Vec<u8>)>],
    ) -> Result<(), JournalError> {
        let path = &self.segments[entry.segment as usize].path;
        let read_len = entry.len.div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64;
        let is_current = entry.segment as usize + 1 == self.segments.len();
        let read = if is_current {
            let file = self.current.as_ref().expect("the last segment is open");
            file.read_at_aligned(entry.offset, read_len as usize).await
        } else {
            let file = self.old_segment_file(entry.segment).await?;
            file.read_at_aligned(entry.offset, read_len as usize).await
        }
        .map_err(|e| io_err("read", path, entry.offset)(e.into()))?;
        let mismatch = |seq: u64, detail: String| JournalError::ReadMismatch {
            path: path.clone(),
            offset: entry.offset,
            seq,
            detail,
        };
        let first_wanted = seqs[wanted[0]];
        if (read.len() as u64) < entry.len {
            return Err(mismatch(
                first_wanted,
                format!("short read: {} of {} bytes", read.len(), entry.len),
            ));
        }
        let bytes = &read[..entry.len as usize];
        let mut offset = 0usize;
        let mut pending = wanted.iter().peekable();
        // Each step consumes at least one record header, so the walk ends.
        while offset < bytes.len() {
            let Some(&&position) = pending.peek() else {
                return Ok(());
            };
            let seq = seqs[position];
            let (record, next) = decode_record_at(bytes, offset)
                .map_err(|e| mismatch(seq, format!("{e} at entry offset {offset}")))?;
            if record.kind != KIND_PADDING && record.kind != KIND_COMMIT {
                if record.seq > seq {
                    break;
                }
                // Equal seqs asked twice are served from the same record.
                while let Some(&&position) = pending.peek() {
                    if seqs[position] != record.seq {
                        break;
                    }
                    out[position] = Some((record.kind, record.body.to_vec()));
                    pending.next();
                }
            }
            offset = next;
        }
        match pending.peek() {
            None => Ok(()),
            Some(&&position) => Err(mismatch(
                seqs[position],
                "record not found where the index points".into(),
            )),
        }
    }

    /// The sequence number the next commit's first record must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sequence number of the last durable record, if any.
    pub fn last_seq(&self) -> Option<u64> {
        (!self.index.is_empty()).then(|| self.next_seq - 1)
    }

    /// Sequence numbers in the segments' names, oldest first.
    pub fn segment_first_seqs(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first_seq).collect()
    }

    /// Whether an I/O failure has stopped the journal.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The configuration the journal was opened with.
    pub fn config(&self) -> &JournalConfig {
        &self.config
    }

    /// Closes the files and releases the directory lock.
    pub async fn close(self) -> Result<(), JournalError> {
        // Every descriptor is closed even if an earlier close failed: the directory's
        // lock must not outlive the journal (a restart would find it locked). The first
        // error is returned.
        let mut first_error = None;
        let mut note = |result: Result<(), glommio::GlommioError<()>>| {
            if let Err(e) = result {
                first_error.get_or_insert(io_err("close", &self.config.dir, 0)(e.into()));
            }
        };
        if let Some((_, file)) = self.old_segment.into_inner() {
            // Still shared only if a read is in flight, which `self` by value excludes.
            if let Ok(file) = Rc::try_unwrap(file) {
                note(file.close().await);
            }
        }
        if let Some(file) = self.current {
            note(file.close().await);
        }
        note(self.dir.close().await);
        first_error.map_or(Ok(()), Err)
    }

    fn check_poisoned(&self) -> Result<(), JournalError> {
        match &self.poisoned {
            Some(first_error) => Err(JournalError::Poisoned {
                first_error: first_error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The checks before the disk boundary for a commit whose first record must carry
    /// `next_seq`: returns the first and last sequence numbers.
    fn verify_commit(&self, bytes: &[u8], next_seq: u64) -> Result<(u64, u64), CommitRejection> {
        let len = bytes.len();
        if len == 0 {
            return Err(CommitRejection::Empty);
        }
        if len % BLOCK_BYTES != 0 {
            return Err(CommitRejection::Unaligned { len });
        }
        if len > self.config.commit_bytes_max {
            return Err(CommitRejection::TooLarge {
                len,
                max: self.config.commit_bytes_max,
            });
        }
        let mut offset = 0usize;
        // A commit-framed buffer (it starts with a commit header record) must be exactly
        // one whole, consistent commit, checked by the same code as recovery; the walk
        // below then checks its records against the journal's sequence.
        if let Ok((record, next)) = decode_record_at(bytes, 0) {
            if record.kind == KIND_COMMIT {
                let header = parse_commit_header(&record)
                    .map_err(|error| CommitRejection::BadCommit { error })?;
                if header.commit_bytes.get() as usize != len {
                    return Err(CommitRejection::CommitLength {
                        declared: header.commit_bytes.get() as usize,
                        len,
                    });
                }
                match check_sealed_commit(bytes, 0, &header) {
                    // `check_sealed_commit` walked every record (payload CRC, framing,
                    // no nested header, seqs first..=last in order): only where the seqs
                    // start is left to check, not a second walk.
                    CommitCheck::Whole { last_seq, .. } => {
                        let first = header.first_seq.get();
                        if first != next_seq {
                            return Err(CommitRejection::Sequence {
                                offset: next,
                                expected: next_seq,
                                found: first,
                            });
                        }
                        return Ok((first, last_seq));
                    }
                    CommitCheck::Torn { error, .. } | CommitCheck::Corrupt { error } => {
                        return Err(CommitRejection::BadCommit { error });
                    }
                }
            }
        }
        let mut expected = next_seq;
        // Each step consumes at least one record header, so the walk ends.
        while offset < len {
            let (record, next) = decode_record_at(bytes, offset)
                .map_err(|error| CommitRejection::BadRecord { offset, error })?;
            if record.kind == KIND_COMMIT {
                // Anywhere but at the start it would open a commit inside this one.
                return Err(CommitRejection::MisplacedCommitHeader { offset });
            }
            if record.kind != KIND_PADDING {
                if record.seq != expected {
                    return Err(CommitRejection::Sequence {
                        offset,
                        expected,
                        found: record.seq,
                    });
                }
                expected += 1;
            }
            offset = next;
        }
        assert_eq!(offset, len, "records end exactly at the buffer's end");
        if expected == next_seq {
            return Err(CommitRejection::NoRecords);
        }
        Ok((next_seq, expected - 1))
    }

    /// Writes and syncs the longest prefix of `commits` that fits in the current
    /// segment and in one write of at most `commit_bytes_max` bytes, rotating first (to a
    /// segment named `first_seq`, the first commit's first sequence number) if not even
    /// the first commit fits. Returns the segment index, the offset and how many commits
    /// were written (at least one).
    ///
    /// Why the bound: the write's DMA buffer is allocated whole (outside glommio's small
    /// registered pool once it is large), so a group costs at most the memory of the
    /// largest single commit, whatever the number of ticks queued behind the disk.
    /// Recovery does not care where writes were cut: only commits are framed.
    async fn write_run(
        &mut self,
        commits: &[&[u8]],
        first_seq: u64,
    ) -> Result<(u32, u64, usize), JournalError> {
        let first_len = commits[0].len() as u64;
        if self.current.is_none() || self.tail + first_len > self.config.segment_bytes_max {
            self.rotate(first_seq).await?;
        }
        let room = self.config.segment_bytes_max - self.tail;
        let write_max = room.min(self.config.commit_bytes_max as u64);
        let mut len = 0u64;
        let count = commits
            .iter()
            .take_while(|bytes| {
                len += bytes.len() as u64;
                len <= write_max
            })
            .count();
        // Every commit is at most `commit_bytes_max`, and a fresh segment holds one.
        assert!(count >= 1, "the first commit fits after rotation");
        let run = &commits[..count];
        assert!(self.tail % BLOCK_BYTES as u64 == 0);
        let segment = (self.segments.len() - 1) as u32;
        let path = &self.segments[segment as usize].path;
        let file = self.current.as_ref().expect("rotate opened a segment");
        // With `O_DSYNC` the write returns once it is durable; otherwise the fdatasync
        // makes it so.
        write_all(file, path, self.tail, run).await?;
        if self.config.sync == JournalSync::Fdatasync {
            file.fdatasync()
                .await
                .map_err(|e| io_err("fdatasync", path, self.tail)(e.into()))?;
        }
        Ok((segment, self.tail, count))
    }

    /// Closes the current segment and starts a new one named `first_seq`: create,
    /// preallocate, and fsync the directory so that the new name survives a crash before
    /// the first commit in it is acknowledged.
    async fn rotate(&mut self, first_seq: u64) -> Result<(), JournalError> {
        let path = self.config.dir.join(segment_file_name(first_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(self.config.sync.open_flags())
            .dma_open(&path)
            .await
            .map_err(|e| io_err("create", &path, 0)(e.into()))?;
        check_alignment(&file, &path)?;
        // Preallocating keeps block allocation out of the commit path (an allocating
        // O_DIRECT write is slower and may block) and reserves the space up front.
        file.pre_allocate(self.config.segment_bytes_max, false)
            .await
            .map_err(|e| io_err("fallocate", &path, 0)(e.into()))?;
        self.dir
            .sync()
            .await
            .map_err(|e| io_err("fsync directory", &self.config.dir, 0)(e.into()))?;
        if let Some(old) = self.current.take() {
            let old_path = &self.segments.last().expect("current has a segment").path;
            old.close()
                .await
                .map_err(|e| io_err("close", old_path, 0)(e.into()))?;
        }
        self.segments.push(Segment { first_seq, path });
        self.current = Some(file);
        self.tail = 0;
        Ok(())
    }

    /// An older segment opened read-only, from the one-entry cache.
    async fn old_segment_file(&self, segment: u32) -> Result<Rc<DmaFile>, JournalError> {
        if let Some((cached, file)) = &*self.old_segment.borrow() {
            if *cached == segment {
                return Ok(file.clone());
            }
        }
        let path = &self.segments[segment as usize].path;
        let file = Rc::new(
            DmaFile::open(path)
                .await
                .map_err(|e| io_err("open", path, 0)(e.into()))?,
        );
        // Dropping the previous entry closes its descriptor at the next reactor turn.
        *self.old_segment.borrow_mut() = Some((segment, file.clone()));
        Ok(file)
    }
}

/// Logs a dropped tail at error level: an operator must learn of every record recovery
/// drops, and a corrupt commit means answered records are lost.
fn log_dropped_tail(dropped: &DroppedTail) {
    let DroppedTail {
        path,
        offset,
        bytes,
        first_seq,
        last_seq,
        records,
        cause,
        error,
    } = dropped;
    let path = path.display();
    match cause {
        TailCause::Corrupt => tracing::error!(
            %path, offset, bytes, first_seq, ?last_seq, ?records, %error,
            "journal recovery dropped a corrupt acknowledged commit at the end of the journal \
             (written whole, then damaged): its records {first_seq}..={} ({} records) were \
             answered and are lost",
            last_seq.map_or("?".into(), |s| s.to_string()),
            records.map_or("?".into(), |r| r.to_string()),
        ),
        TailCause::Torn => tracing::error!(
            %path, offset, bytes, first_seq, ?last_seq, ?records, %error,
            "journal recovery dropped the torn write of an unacknowledged commit at the end \
             of the journal: records {first_seq}..={} ({} records) were never answered",
            last_seq.map_or("?".into(), |s| s.to_string()),
            records.map_or("?".into(), |r| r.to_string()),
        ),
    }
}

/// Creates the directory if needed (and makes its name durable), opens it and takes the
/// exclusive lock.
async fn open_dir(dir: &Path) -> Result<Directory, JournalError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir, 0))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)
                .and_then(|f| f.sync_all())
                .map_err(io_err("fsync directory", parent, 0))?;
        }
    }
    let directory = Directory::open(dir)
        .await
        .map_err(|e| io_err("open directory", dir, 0)(e.into()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::Locked {
                path: dir.to_path_buf(),
            });
        }
        return Err(io_err("lock directory", dir, 0)(error));
    }
    prime_iopoll_probe(dir).await?;
    Ok(directory)
}

/// Name of the one non-segment file of the journal directory; see [`prime_iopoll_probe`].
pub const IOPOLL_PROBE_FILE: &str = "iopoll-probe";

/// Makes glommio decide correctly whether this device supports polled I/O.
///
/// glommio 0.9 decides it once per device and thread, at the first `DmaFile` open on the
/// device, by reading the file's first bytes through the poll ring. If that file is empty
/// (a freshly created segment), the read ends at end-of-file without reaching the device,
/// "succeeds", and every later read on the device fails with EOPNOTSUPP when the device
/// cannot poll (virtio disks, for one). Opening a file that holds a block of data first
/// makes the probe a real read. This must run before any other `DmaFile` is opened on the
/// device by this thread; the journal opens its files only after it.
async fn prime_iopoll_probe(dir: &Path) -> Result<(), JournalError> {
    let path = dir.join(IOPOLL_PROBE_FILE);
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    if len < BLOCK_BYTES as u64 {
        std::fs::write(&path, [0xA5u8; BLOCK_BYTES]).map_err(io_err("write", &path, 0))?;
    }
    let file = DmaFile::open(&path)
        .await
        .map_err(|e| io_err("open", &path, 0)(e.into()))?;
    file.close()
        .await
        .map_err(|e| io_err("close", &path, 0)(e.into()))
}

/// The segment files of `dir`, by first sequence number. Files not ending in
/// [`SEGMENT_SUFFIX`] are not the journal's and are left alone.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, JournalError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err("list directory", dir, 0))? {
        let entry = entry.map_err(io_err("list directory", dir, 0))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) else {
            continue;
        };
        let first_seq = (stem.len() == SEGMENT_NAME_DIGITS
            && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse::<u64>().ok())
        .flatten()
        .filter(|&seq| seq >= 1)
        .ok_or_else(|| JournalError::BadSegmentName { path: path.clone() })?;
        segments.push(Segment { first_seq, path });
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn check_alignment(file: &DmaFile, path: &Path) -> Result<(), JournalError> {
    if file.alignment() > BLOCK_BYTES as u64 {
        return Err(JournalError::Alignment {
            path: path.to_path_buf(),
            alignment: file.alignment(),
        });
    }
    Ok(())
}

/// Writes `parts`, back to back, at `pos` with O_DIRECT from one DMA buffer: each part is
/// copied once, straight into the buffer (O_DIRECT needs aligned memory, and one buffer
/// makes one write however many commits a group holds). A short write is continued from
/// where it stopped if it stopped on a block boundary; anything else is an error.
async fn write_all(
    file: &DmaFile,
    path: &Path,
    pos: u64,
    parts: &[&[u8]],
) -> Result<(), JournalError> {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    assert!(pos % BLOCK_BYTES as u64 == 0 && len % BLOCK_BYTES == 0);
    let mut done = 0usize;
    // Each round writes at least one block or fails, so at most len / 4096 rounds.
    while done < len {
        let mut buf = file.alloc_dma_buffer(len - done);
        copy_from(parts, done, buf.as_bytes_mut());
        let at = pos + done as u64;
        let written = file
            .write_at(buf, at)
            .await
            .map_err(|e| io_err("write", path, at)(e.into()))?;
        if written == 0 || written % BLOCK_BYTES != 0 {
            return Err(io_err("write", path, at)(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("short write of {written} bytes"),
            )));
        }
        done += written;
    }
    Ok(())
}

/// Fills `out` with the bytes of `parts` concatenated, starting `skip` bytes in.
fn copy_from(parts: &[&[u8]], mut skip: usize, out: &mut [u8]) {
    let mut filled = 0usize;
    for part in parts {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        let from = &part[skip..];
        skip = 0;
        out[filled..filled + from.len()].copy_from_slice(from);
        filled += from.len();
    }
    assert_eq!(
        filled,
        out.len(),
        "the buffer holds exactly the rest of the parts"
    );
}

/// Makes the last segment ready for appending after its scan ended at `end` (just past
/// the last whole record or commit; for a torn commit, the commit's start, which is
/// block-aligned). Returns the new tail, a multiple of the block.
///
/// If `end` is inside a block, the block's bytes before `end` are written again followed
/// by a padding record up to the block boundary (as `frame::pad_to_block` does for a
/// commit): leaving zeros there instead would make the next scan stop at `end` and, with
/// records after it, report corruption. If the tail was torn, the file is truncated to the
/// new tail and preallocated again, so the torn bytes read as zeros from then on. The file
/// is preallocated to the segment size if it is shorter (a rotation that crashed before
/// its fallocate) and synced.
async fn repair_last(
    file: &DmaFile,
    path: &Path,
    file_len: u64,
    end: u64,
    torn: bool,
    config: &JournalConfig,
) -> Result<u64, JournalError> {
    let block = BLOCK_BYTES as u64;
    let block_start = end / block * block;
    let mut tail = end;
    if end % block != 0 {
        let read = file
            .read_at_aligned(block_start, BLOCK_BYTES)
            .await
            .map_err(|e| io_err("read", path, block_start)(e.into()))?;
        let keep = (end - block_start) as usize;
        if read.len() < keep {
            return Err(io_err("read", path, block_start)(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "short read of the tail block",
            )));
        }
        let mut bytes = read[..keep].to_vec();
        pad_to_block(&mut bytes, BLOCK_BYTES);
        // The rewritten block must still scan as the same records plus padding.
        debug_assert!(decode_record_at(&bytes, keep).is_ok());
        write_all(file, path, block_start, &[&bytes]).await?;
        tail = block_start + bytes.len() as u64;
    }
    let allocate_to = file_len.max(config.segment_bytes_max);
    if torn {
        file.truncate(tail)
            .await
            .map_err(|e| io_err("truncate", path, tail)(e.into()))?;
    }
    if torn || file_len < allocate_to {
        file.pre_allocate(allocate_to, false)
            .await
            .map_err(|e| io_err("fallocate", path, 0)(e.into()))?;
    }
    if torn || end != tail || file_len < allocate_to {
        // fsync rather than fdatasync: the size and the block map changed, and recovery
        // must not run on a repair that a crash could half undo. Start-up only, so the
        // blocking call is acceptable.
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", path, 0))?;
    }
    Ok(tail)
}

#[cfg(test)]
mod tests {
    use super::copy_from;

    #[test]
    fn copy_from_resumes_anywhere_across_parts() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defgh"];
        let all = b"abcdefgh";
        for skip in 0..=all.len() {
            let mut out = vec![0u8; all.len() - skip];
            copy_from(&parts, skip, &mut out);
            assert_eq!(out, &all[skip..], "skip {skip}");
        }
    }
}
