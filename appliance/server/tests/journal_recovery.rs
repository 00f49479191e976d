//! Journal recovery: torn tails at every offset, mid-file corruption, sequence gaps, and
//! agreement with `frame::scan` on randomly damaged files.

mod journal_support;

use std::path::Path;

use std::sync::{Arc, Mutex};

use appliance_core::journal::frame::{self, FrameError, ScanEnd};
use appliance_server::journal::{DroppedTail, JournalError, OpenError, TailCause};
use journal_support::*;
use rand::{Rng, SeedableRng};

/// The journal error of a failed open.
fn journal_error(result: Result<(), OpenError<std::convert::Infallible>>) -> JournalError {
    match result {
        Err(OpenError::Journal(error)) => error,
        other => panic!("expected a journal error, got {other:?}"),
    }
}

/// Body bytes of the last record of the pristine journal: the torn-tail test cuts at each
/// of its offsets. 44 bytes + 24 header = 68, padded to 72: a tear inside every header
/// field, the body and the alignment padding.
const LAST_BODY_BYTES: usize = 44;

/// Builds a pristine journal of two segments in `dir`; returns (next seq, the last
/// segment's first seq, offset and length of the last record of the last commit).
fn build_pristine(dir: &Path) -> (u64, u64, usize, usize) {
    run(async {
        let (mut journal, _) = open_collect(config(dir)).await.unwrap();
        // 13 commits of 25 records fill more than one 64 KiB segment.
        let next = write_commits(&mut journal, 1, &[25; 13]).await;
        assert!(journal.segment_first_seqs().len() >= 2);
        // The last commit: three records, the last one with a LAST_BODY_BYTES body.
        let last_first = journal.next_seq();
        let mut bytes = Vec::new();
        frame::encode_record(&mut bytes, KIND, last_first, &body(last_first));
        frame::encode_record(&mut bytes, KIND, last_first + 1, &body(last_first + 1));
        let last_offset_in_commit = bytes.len();
        frame::encode_record(&mut bytes, KIND, last_first + 2, &[0x3c; LAST_BODY_BYTES]);
        let last_len = bytes.len() - last_offset_in_commit;
        frame::pad_to_block(&mut bytes, 4096);
        let position = journal.commit(&bytes).await.unwrap();
        assert_eq!(next, last_first);
        let segment = *journal.segment_first_seqs().last().unwrap();
        journal.close().await.unwrap();
        (
            last_first + 3,
            segment,
            position.offset as usize + last_offset_in_commit,
            last_len,
        )
    })
}

/// Copies the files of `from` into a fresh directory, with the segment named for
/// `segment` replaced by `last`.
fn copy_with(from: &Path, segment: u64, last: &[u8]) -> tempfile::TempDir {
    let to = temp_dir();
    for file in segment_files(from) {
        let target = to.path().join(file.file_name().unwrap());
        if file == segment_path(from, segment) {
            std::fs::write(&target, last).unwrap();
        } else {
            std::fs::copy(&file, &target).unwrap();
        }
    }
    to
}

#[test]
fn torn_tail_at_every_offset_of_the_last_record_recovers_and_appends() {
    let pristine = temp_dir();
    let (next, segment, last_offset, last_len) = build_pristine(pristine.path());
    let last_seq = next - 1;
    let original = std::fs::read(segment_path(pristine.path(), segment)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for cut in last_offset..last_offset + last_len {
        // Three shapes of the same tear: the file cut short; the file at full size with
        // zeros after the cut (the write never reached the rest); garbage after the cut.
        let truncated = original[..cut].to_vec();
        let mut zeroed = original.clone();
        zeroed[cut..last_offset + last_len].fill(0);
        let mut garbage = original.clone();
        let garbage_end = (cut + rng.random_range(1..9000)).min(garbage.len());
        rng.fill(&mut garbage[cut..garbage_end]);
        garbage[cut] |= 1; // not accidentally zero at the cut
                           // Zeroing only the record's alignment padding (already zero) damages nothing.
        let zeroed_is_whole = cut >= last_offset + frame::RECORD_HEADER_BYTES + LAST_BODY_BYTES;
        for (shape, bytes, survivor) in [
            ("truncated", truncated, last_seq - 1),
            (
                "zeroed",
                zeroed,
                if zeroed_is_whole {
                    last_seq
                } else {
                    last_seq - 1
                },
            ),
            ("garbage", garbage, last_seq - 1),
        ] {
            let dir = copy_with(pristine.path(), segment, &bytes);
            run(async {
                let context = format!("cut at {cut}, {shape}");
                let (mut journal, seen) = open_collect(config(dir.path()))
                    .await
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
                let last_seen = seen.last().map(|s| s.seq);
                assert_eq!(last_seen, Some(survivor), "{context}");
                assert_records(
                    &seen[..seen.len().min(last_seq as usize - 1)],
                    1,
                    last_seq - 1,
                );
                assert_eq!(journal.next_seq(), survivor + 1, "{context}");
                // Appending continues right after the last whole record...
                let next = survivor + 1;
                let position = journal.commit(&commit_bytes(next, 3)).await.unwrap();
                assert_eq!(position.first_seq, next, "{context}");
                assert_eq!(position.offset % 4096, 0, "{context}");
                let (kind, got) = journal.read_record(next + 1).await.unwrap();
                assert_eq!((kind, got), (KIND, body(next + 1)), "{context}");
                journal.close().await.unwrap();
                // ...and the result is a clean journal.
                let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
                let seqs: Vec<u64> = seen.iter().map(|s| s.seq).collect();
                assert_eq!(seqs, (1..=next + 2).collect::<Vec<_>>(), "{context}");
                assert_eq!(journal.next_seq(), next + 3, "{context}");
                assert_eq!(
                    journal.read_record(next + 2).await.unwrap().1,
                    body(next + 2)
                );
                journal.close().await.unwrap();
            });
        }
    }
}

#[test]
fn torn_first_commit_of_a_fresh_segment_leaves_it_empty_and_writable() {
    let pristine = temp_dir();
    let (next, _, _, _) = build_pristine(pristine.path());
    // A rotation whose first write was torn: a new, full-size segment whose first block
    // holds a fragment of a record.
    let dir = copy_with(pristine.path(), u64::MAX, &[]);
    let mut fragment = commit_bytes(next, 5);
    fragment.truncate(100);
    fragment.resize(SEGMENT_BYTES as usize, 0);
    std::fs::write(segment_path(dir.path(), next), &fragment).unwrap();
    run(async {
        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_seqs(&seen, 1, next - 1);
        assert_eq!(journal.next_seq(), next);
        let position = journal.commit(&commit_bytes(next, 2)).await.unwrap();
        assert_eq!((position.segment_first_seq, position.offset), (next, 0));
        journal.close().await.unwrap();
        let (_, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_seqs(&seen, 1, next + 1);
    });
}

#[test]
fn torn_tail_in_a_segment_that_is_not_the_last_is_an_error() {
    let pristine = temp_dir();
    build_pristine(pristine.path());
    let first = segment_path(pristine.path(), 1);
    let mut bytes = std::fs::read(&first).unwrap();
    // Cut the first segment inside its last record: find the data end by scanning.
    let ScanEnd::Clean { end } = frame::scan::<()>(&bytes, |_| Ok(())).unwrap() else {
        panic!("pristine segment is clean");
    };
    let cut = end - 4096 + 200;
    bytes[cut..].fill(0);
    bytes[cut] = 0x55;
    let dir = copy_with(pristine.path(), 1, &bytes);
    run(async {
        let error = journal_error(open_collect(config(dir.path())).await.map(|_| ()));
        match &error {
            JournalError::TornTailNotLast { path, offset, .. } => {
                assert_eq!(*path, segment_path(dir.path(), 1));
                assert!(*offset as usize <= cut, "{error}");
            }
            other => panic!("expected TornTailNotLast, got {other}"),
        }
    });
}

#[test]
fn flipped_bit_mid_file_fails_naming_file_and_offset() {
    let pristine = temp_dir();
    build_pristine(pristine.path());
    let path = segment_path(pristine.path(), 1);
    let original = std::fs::read(&path).unwrap();
    // Offsets of the records of the first segment.
    let mut offsets = Vec::new();
    frame::scan::<()>(&original, |r| {
        if r.kind != frame::KIND_PADDING {
            offsets.push(r.offset);
        }
        Ok(())
    })
    .unwrap();
    let victim = offsets[offsets.len() / 2];
    let victim_end = offsets[offsets.len() / 2 + 1];
    // One flipped bit in every byte of the victim record, in turn.
    for byte in victim..victim_end {
        let mut bytes = original.clone();
        bytes[byte] ^= 1 << (byte % 8);
        let dir = copy_with(pristine.path(), 1, &bytes);
        run(async {
            let error = journal_error(open_collect(config(dir.path())).await.map(|_| ()));
            match &error {
                JournalError::Corrupt { path, offset, .. } => {
                    assert_eq!(*path, segment_path(dir.path(), 1), "byte {byte}");
                    assert_eq!(*offset as usize, victim, "byte {byte}");
                }
                other => panic!("byte {byte}: expected Corrupt, got {other}"),
            }
            let text = error.to_string();
            assert!(text.contains(&segment_path(dir.path(), 1).display().to_string()));
            assert!(text.contains(&format!("offset {victim}")), "{text}");
        });
    }
}

/// Writes segment files by hand: (file name seq, record seqs).
fn handmade(files: &[(u64, std::ops::RangeInclusive<u64>)]) -> tempfile::TempDir {
    let dir = temp_dir();
    for (name, seqs) in files {
        let mut bytes = Vec::new();
        for seq in seqs.clone() {
            frame::encode_record(&mut bytes, KIND, seq, &body(seq));
        }
        frame::pad_to_block(&mut bytes, 4096);
        bytes.resize(SEGMENT_BYTES as usize, 0);
        std::fs::write(segment_path(dir.path(), *name), bytes).unwrap();
    }
    dir
}

#[test]
fn sequence_gap_across_files_is_an_error() {
    let dir = handmade(&[(1, 1..=5), (7, 7..=9)]);
    run(async {
        match journal_error(open_collect(config(dir.path())).await.map(|_| ())) {
            JournalError::SequenceGap {
                path,
                offset,
                expected,
                found,
            } => {
                assert_eq!(path, segment_path(dir.path(), 7));
                assert_eq!((offset, expected, found), (0, 6, 7));
            }
            other => panic!("expected SequenceGap, got {other}"),
        }
    });
    // The first file may start anywhere, and a well-formed handmade journal opens.
    let dir = handmade(&[(40, 40..=45), (46, 46..=50)]);
    run(async {
        let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 40, 50);
        assert_eq!(journal.next_seq(), 51);
        assert_eq!(journal.read_record(42).await.unwrap().1, body(42));
    });
}

#[test]
fn sequence_gap_inside_a_file_and_misnamed_files_are_errors() {
    let dir = temp_dir();
    let mut bytes = Vec::new();
    for seq in [1, 2, 4] {
        frame::encode_record(&mut bytes, KIND, seq, &body(seq));
    }
    frame::pad_to_block(&mut bytes, 4096);
    std::fs::write(segment_path(dir.path(), 1), &bytes).unwrap();
    run(async {
        assert!(matches!(
            journal_error(open_collect(config(dir.path())).await.map(|_| ())),
            JournalError::SequenceGap {
                expected: 3,
                found: 4,
                ..
            }
        ));
    });
    let dir = handmade(&[(1, 3..=5)]);
    run(async {
        assert!(matches!(
            journal_error(open_collect(config(dir.path())).await.map(|_| ())),
            JournalError::SegmentNameMismatch {
                name_seq: 1,
                first_seq: 3,
                ..
            }
        ));
    });
    let dir = handmade(&[(1, 1..=5)]);
    std::fs::write(dir.path().join("12.journal"), b"").unwrap();
    run(async {
        assert!(matches!(
            journal_error(open_collect(config(dir.path())).await.map(|_| ())),
            JournalError::BadSegmentName { .. }
        ));
    });
    // An empty segment before the last one means lost records.
    let dir = handmade(&[(1, 1..=5), (6, 6..=8)]);
    std::fs::write(segment_path(dir.path(), 6), vec![0u8; 8192]).unwrap();
    let mut last = Vec::new();
    frame::encode_record(&mut last, KIND, 9, &body(9));
    frame::pad_to_block(&mut last, 4096);
    std::fs::write(segment_path(dir.path(), 9), &last).unwrap();
    run(async {
        assert!(matches!(
            journal_error(open_collect(config(dir.path())).await.map(|_| ())),
            JournalError::EmptySegment { .. }
        ));
    });
}

/// What `frame::scan` says a single-segment journal should recover to.
enum Expect {
    Records(u64),
    Corrupt(usize),
}

#[test]
fn recovery_agrees_with_frame_scan_on_random_damage() {
    agree_on_random_damage(false, 0xdead_beef);
}

#[test]
fn recovery_agrees_with_frame_scan_on_random_damage_of_framed_commits() {
    agree_on_random_damage(true, 0xfeed_f00d);
}

/// Damages one segment of bare or commit-framed commits at random and checks that
/// `Journal::open` classifies it exactly as `frame::scan` does.
fn agree_on_random_damage(framed: bool, seed: u64) {
    // One segment of ~300 KiB: several recovery chunks (68 KiB each), so that records and
    // the tail classification cross chunk boundaries.
    let pristine = temp_dir();
    let mut cfg = config(pristine.path());
    cfg.segment_bytes_max = 512 * 1024;
    let last_seq = run(async {
        let (mut journal, _) = open_collect(cfg.clone()).await.unwrap();
        let next = if framed {
            write_framed_commits(&mut journal, 1, &[40; 50]).await
        } else {
            write_commits(&mut journal, 1, &[40; 50]).await
        };
        assert_eq!(journal.segment_first_seqs(), vec![1]);
        journal.close().await.unwrap();
        next - 1
    });
    let original = std::fs::read(segment_path(pristine.path(), 1)).unwrap();
    let ScanEnd::Clean { end: data_end } = frame::scan::<()>(&original, |_| Ok(())).unwrap() else {
        panic!("pristine segment is clean");
    };
    assert!(data_end > 4 * appliance_server::journal::RECOVERY_CHUNK_BYTES_MIN);

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..75 {
        let mut bytes = original.clone();
        let at = rng.random_range(0..data_end);
        match round % 5 {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes.truncate(at),
            2 => bytes[at..data_end].fill(0),
            3 => {
                let end = (at + rng.random_range(1..5000)).min(bytes.len());
                rng.fill(&mut bytes[at..end]);
            }
            _ => {
                // A power loss during a write starting at the block of `at`: a random
                // subset of its (up to) 4 blocks persisted, nothing after it.
                let block = at / 4096 * 4096;
                let write_end = (block + 4 * 4096).min(data_end);
                bytes[write_end..data_end].fill(0);
                for lost in (block..write_end).step_by(4096) {
                    if rng.random_bool(0.5) {
                        bytes[lost..lost + 4096].fill(0);
                    }
                }
            }
        }
        let mut seqs = Vec::new();
        let scan_end = frame::scan::<()>(&bytes, |r| {
            if r.kind != frame::KIND_PADDING {
                seqs.push(r.seq);
            }
            Ok(())
        })
        .unwrap();
        let expect = match scan_end {
            ScanEnd::Clean { .. } | ScanEnd::TornTail { .. } => {
                Expect::Records(seqs.last().copied().unwrap_or(0))
            }
            ScanEnd::Corrupt { offset, .. } => Expect::Corrupt(offset),
        };
        // What the journal must report dropped, as `frame::scan` classifies it.
        let expect_dropped = match scan_end {
            ScanEnd::TornTail {
                end,
                error,
                cause,
                header,
                bytes,
            } => Some(DroppedTail {
                path: segment_path(&cfg.dir, 1),
                offset: end as u64,
                bytes: bytes as u64,
                first_seq: header.map_or(seqs.last().map_or(1, |s| s + 1), |h| h.first_seq.get()),
                last_seq: header.map(|h| h.last_seq.get()),
                records: header.map(|h| u64::from(h.record_count.get())),
                cause,
                error,
            }),
            _ => None,
        };
        let dir = copy_with(pristine.path(), 1, &bytes);
        let mut cfg = cfg.clone();
        cfg.dir = dir.path().to_path_buf();
        run(async {
            let context = format!("round {round}, damage at {at}");
            match (expect, open_collect(cfg.clone()).await) {
                (Expect::Records(last), Ok((mut journal, seen))) => {
                    assert_records(&seen, 1, last);
                    assert_eq!(journal.next_seq(), last + 1, "{context}");
                    let expect_dropped = expect_dropped.map(|d| DroppedTail {
                        path: segment_path(&cfg.dir, 1),
                        ..d
                    });
                    assert_eq!(journal.dropped_tail(), expect_dropped.as_ref(), "{context}");
                    if framed {
                        // Framed commits are all-or-nothing: whole commits only.
                        assert_eq!(last % 40, 0, "{context}");
                        write_framed_commits(&mut journal, last + 1, &[2]).await;
                    } else {
                        write_commits(&mut journal, last + 1, &[2]).await;
                    }
                    journal.close().await.unwrap();
                    let (_, seen) = open_collect(cfg.clone()).await.unwrap();
                    assert_records(&seen, 1, last + 2);
                }
                (
                    Expect::Corrupt(offset),
                    Err(OpenError::Journal(JournalError::Corrupt { offset: got, .. })),
                ) => assert_eq!(got as usize, offset, "{context}"),
                (_, other) => panic!(
                    "{context}: disagrees with frame::scan: {:?}",
                    other.map(|_| ())
                ),
            }
        });
        assert!(last_seq >= 1);
    }
}

/// Builds a journal of framed commits over two segments whose last commit (in the last
/// segment) spans exactly 4 blocks; returns (its first seq, its last seq, the last
/// segment's name seq, the commit's offset in the file).
fn build_framed(dir: &Path) -> (u64, u64, u64, usize) {
    run(async {
        let (mut journal, _) = open_collect(config(dir)).await.unwrap();
        let next = write_framed_commits(&mut journal, 1, &[25; 13]).await;
        assert!(journal.segment_first_seqs().len() >= 2);
        // As many records as make the commit 4 blocks long.
        let mut count = 0;
        while framed_commit_bytes(next, count + 1).len() <= 4 * 4096 {
            count += 1;
        }
        let bytes = framed_commit_bytes(next, count);
        assert_eq!(bytes.len(), 4 * 4096);
        let position = journal.commit(&bytes).await.unwrap();
        let segment = *journal.segment_first_seqs().last().unwrap();
        assert_eq!(position.segment_first_seq, segment);
        journal.close().await.unwrap();
        (next, next + count - 1, segment, position.offset as usize)
    })
}

#[test]
fn out_of_order_blocks_of_the_last_commit_drop_it_and_appending_continues() {
    let pristine = temp_dir();
    let (first, last, segment, offset) = build_framed(pristine.path());
    let original = std::fs::read(segment_path(pristine.path(), segment)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Every strict subset of the 4 blocks persisted; the others zeros (never written) or
    // garbage (whatever the device left), and the header block among the lost or not.
    for mask in 0u32..15 {
        for garbage in [false, true] {
            let mut bytes = original.clone();
            for b in 0..4 {
                if mask & (1 << b) == 0 {
                    let block = &mut bytes[offset + b * 4096..offset + (b + 1) * 4096];
                    if garbage {
                        rng.fill(block);
                    } else {
                        block.fill(0);
                    }
                }
            }
            let dir = copy_with(pristine.path(), segment, &bytes);
            run(async {
                let context = format!("blocks {mask:04b}, garbage {garbage}");
                let (mut journal, seen) = open_collect(config(dir.path()))
                    .await
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
                // Nothing of the torn commit survives.
                assert_records(&seen, 1, first - 1);
                assert_eq!(journal.next_seq(), first, "{context}");
                // Reported: its range when its header block persisted; torn, unless the
                // lost blocks hold garbage and so look written (the documented limit).
                // No block persisted: the journal ends cleanly, nothing was dropped.
                match journal.dropped_tail() {
                    None => assert!(mask == 0 && !garbage, "{context}: nothing reported"),
                    Some(dropped) => {
                        assert_eq!(dropped.offset as usize, offset, "{context}");
                        assert_eq!(dropped.first_seq, first, "{context}");
                        let header_kept = mask & 1 != 0;
                        assert_eq!(dropped.last_seq, header_kept.then_some(last), "{context}");
                        let cause = if garbage && header_kept {
                            TailCause::Corrupt
                        } else {
                            TailCause::Torn
                        };
                        assert_eq!(dropped.cause, cause, "{context}");
                    }
                }
                // The next commit takes its place.
                let position = journal
                    .commit(&framed_commit_bytes(first, 3))
                    .await
                    .unwrap_or_else(|e| panic!("{context}: {e}"));
                assert_eq!(
                    (position.segment_first_seq, position.offset as usize),
                    (segment, offset),
                    "{context}"
                );
                assert_eq!(
                    journal.read_record(first + 1).await.unwrap().1,
                    body(first + 1)
                );
                journal.close().await.unwrap();
                let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
                assert_records(&seen, 1, first + 2);
                assert_eq!(
                    journal.read_record(first + 2).await.unwrap().1,
                    body(first + 2)
                );
                journal.close().await.unwrap();
            });
        }
    }
    // All 4 persisted: the commit is whole and kept.
    run(async {
        let (journal, seen) = open_collect(config(pristine.path())).await.unwrap();
        assert_records(&seen, 1, last);
        journal.close().await.unwrap();
    });
}

#[test]
fn out_of_order_blocks_of_the_first_commit_of_a_fresh_segment_leave_it_empty() {
    // A rotation whose first (2-block) commit persisted only its second block: the header
    // is lost, the records of the second block are valid. Earlier segments showed commit
    // headers, so the stream is framed and this is a torn tail, not corruption.
    let pristine = temp_dir();
    let (_, last, _, _) = build_framed(pristine.path());
    let next = last + 1;
    let dir = copy_with(pristine.path(), u64::MAX, &[]);
    // As many records as fit in 2 blocks, so that the second holds records, not only
    // padding.
    let mut count = 1;
    while framed_commit_bytes(next, count + 1).len() <= 2 * 4096 {
        count += 1;
    }
    let mut bytes = framed_commit_bytes(next, count);
    assert_eq!(bytes.len(), 2 * 4096);
    bytes[..4096].fill(0);
    // Read as a bare stream, the valid records left in the second block would make this
    // corruption: only the framing seen in earlier segments makes it a torn tail.
    assert!(matches!(
        frame::scan::<()>(&bytes, |_| Ok(())).unwrap(),
        ScanEnd::Corrupt { offset: 0, .. }
    ));
    bytes.resize(SEGMENT_BYTES as usize, 0);
    std::fs::write(segment_path(dir.path(), next), &bytes).unwrap();
    run(async {
        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, last);
        assert_eq!(journal.next_seq(), next);
        let position = journal.commit(&framed_commit_bytes(next, 2)).await.unwrap();
        assert_eq!((position.segment_first_seq, position.offset), (next, 0));
        journal.close().await.unwrap();
        let (_, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next + 1);
    });
}

#[test]
fn damaged_commit_that_is_not_the_last_still_refuses() {
    let pristine = temp_dir();
    let (_, _, segment, last_offset) = build_framed(pristine.path());
    let original = std::fs::read(segment_path(pristine.path(), segment)).unwrap();
    // The commits of the last segment before its last one, from their headers.
    let mut starts = Vec::new();
    let mut at = 0;
    while at < last_offset {
        starts.push(at);
        let (record, _) = frame::decode_record_at(&original, at).unwrap();
        assert_eq!(record.kind, frame::KIND_COMMIT);
        at += frame::parse_commit_header(&record)
            .unwrap()
            .commit_bytes
            .get() as usize;
    }
    assert!(!starts.is_empty());
    let victim = starts[starts.len() / 2];
    // A lost block (zeros), a flipped bit in the header, a flipped bit in the payload.
    let mut lost = original.clone();
    lost[victim + 4096..victim + 8192].fill(0);
    let mut header_bit = original.clone();
    header_bit[victim + 9] ^= 0x10;
    let mut payload_bit = original.clone();
    payload_bit[victim + 4096 + 333] ^= 0x01;
    for (shape, bytes) in [
        ("lost block", lost),
        ("header bit", header_bit),
        ("payload bit", payload_bit),
    ] {
        let dir = copy_with(pristine.path(), segment, &bytes);
        run(async {
            let error = journal_error(open_collect(config(dir.path())).await.map(|_| ()));
            match &error {
                JournalError::Corrupt { path, offset, .. } => {
                    assert_eq!(*path, segment_path(dir.path(), segment), "{shape}");
                    assert_eq!(*offset as usize, victim, "{shape}");
                }
                other => panic!("{shape}: expected Corrupt, got {other}"),
            }
        });
    }
}

/// A `tracing` writer into a shared buffer, to check what recovery logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Runs `f` with every event at error level written here; returns what `f` returned.
    fn errors_of<T>(&self, f: impl FnOnce() -> T) -> T {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::ERROR)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f)
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Opens the damaged journal in `dir` with its log captured; checks that it recovered
/// records `1..first` and returns what it reports dropped and the log.
fn open_damaged(dir: &Path, first: u64) -> (DroppedTail, String) {
    let log = Captured::default();
    let dropped = log.errors_of(|| {
        run(async {
            let (journal, seen) = open_collect(config(dir)).await.unwrap();
            assert_records(&seen, 1, first - 1);
            assert_eq!(journal.next_seq(), first);
            let dropped = journal.dropped_tail().cloned().expect("a dropped tail");
            journal.close().await.unwrap();
            // The repair leaves a clean journal: nothing is dropped (or logged) again.
            let (journal, seen) = open_collect(config(dir)).await.unwrap();
            assert_records(&seen, 1, first - 1);
            assert_eq!(journal.dropped_tail(), None);
            journal.close().await.unwrap();
            dropped
        })
    });
    (dropped, log.text())
}

#[test]
fn flipped_byte_in_the_last_commit_is_reported_as_a_dropped_corrupt_acknowledged_commit() {
    let pristine = temp_dir();
    let (first, last, segment, offset) = build_framed(pristine.path());
    let original = std::fs::read(segment_path(pristine.path(), segment)).unwrap();
    // A byte in a record of the first block, one in the middle, one in the last block's
    // padding: every block was written, so none of them can be a tear.
    for at in [
        offset + frame::COMMIT_HEADER_RECORD_BYTES + 40,
        offset + 2 * 4096 + 333,
        offset + 4 * 4096 - 1,
    ] {
        let mut bytes = original.clone();
        bytes[at] ^= 0x10;
        let dir = copy_with(pristine.path(), segment, &bytes);
        let (dropped, log) = open_damaged(dir.path(), first);
        let path = segment_path(dir.path(), segment);
        assert_eq!(
            dropped,
            DroppedTail {
                path: path.clone(),
                offset: offset as u64,
                bytes: 4 * 4096,
                first_seq: first,
                last_seq: Some(last),
                records: Some(last - first + 1),
                cause: TailCause::Corrupt,
                error: FrameError::BadCommitChecksum,
            },
            "byte {at}"
        );
        let line = log.lines().find(|l| l.contains("journal recovery dropped"));
        let line = line.unwrap_or_else(|| panic!("byte {at}: no log line in {log:?}"));
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("corrupt acknowledged commit"), "{line}");
        assert!(line.contains(&format!("{first}..={last}")), "{line}");
        assert!(line.contains(&format!("offset={offset}")), "{line}");
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert_eq!(log.matches("journal recovery dropped").count(), 1, "{log}");
    }
}

#[test]
fn torn_last_commit_with_only_its_first_block_persisted_is_reported_torn_with_its_range() {
    let pristine = temp_dir();
    let (first, last, segment, offset) = build_framed(pristine.path());
    let mut bytes = std::fs::read(segment_path(pristine.path(), segment)).unwrap();
    bytes[offset + 4096..offset + 4 * 4096].fill(0);
    let dir = copy_with(pristine.path(), segment, &bytes);
    let (dropped, log) = open_damaged(dir.path(), first);
    assert_eq!(dropped.path, segment_path(dir.path(), segment));
    assert_eq!(dropped.offset, offset as u64);
    assert!(dropped.bytes > 0 && dropped.bytes <= 4096, "{dropped:?}");
    assert_eq!(
        (dropped.first_seq, dropped.last_seq, dropped.records),
        (first, Some(last), Some(last - first + 1))
    );
    assert_eq!(dropped.cause, TailCause::Torn);
    assert_eq!(dropped.error, FrameError::BadCommitChecksum);
    let line = log.lines().find(|l| l.contains("journal recovery dropped"));
    let line = line.unwrap_or_else(|| panic!("no log line in {log:?}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("torn write of an unacknowledged commit"),
        "{line}"
    );
    assert!(line.contains(&format!("{first}..={last}")), "{line}");
}
