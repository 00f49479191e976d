//! Journal files: write, reopen, rotate, read back single records, refuse bad commits.

mod journal_support;

use appliance_core::journal::frame::FrameError;
use appliance_server::journal::{CommitRejection, Journal, JournalError};
use journal_support::*;
use rand::{Rng, SeedableRng};

#[test]
fn commits_survive_reopen_in_order_and_appending_continues() {
    let dir = temp_dir();
    run(async {
        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert!(seen.is_empty());
        assert_eq!(journal.next_seq(), 1);
        assert_eq!(journal.last_seq(), None);
        let next = write_commits(&mut journal, 1, &[1, 3, 10, 2, 25, 1]).await;
        journal.close().await.unwrap();

        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next - 1);
        assert_eq!(journal.next_seq(), next);
        assert_eq!(journal.last_seq(), Some(next - 1));
        let next2 = write_commits(&mut journal, next, &[4, 4]).await;
        journal.close().await.unwrap();

        let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next2 - 1);
        assert_eq!(journal.next_seq(), next2);
        journal.close().await.unwrap();
    });
}

#[test]
fn commit_positions_are_block_aligned_and_contiguous() {
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        let a = journal.commit(&commit_bytes(1, 2)).await.unwrap();
        let b = journal.commit(&commit_bytes(3, 20)).await.unwrap();
        assert_eq!((a.segment_first_seq, a.offset, a.len), (1, 0, 4096));
        assert_eq!(b.segment_first_seq, 1);
        assert_eq!(b.offset, a.offset + a.len);
        assert_eq!(b.len % 4096, 0);
        journal.close().await.unwrap();
        // The first segment was created by the first commit, named for its first record,
        // and preallocated to the segment size.
        let path = segment_path(dir.path(), 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEGMENT_BYTES);
    });
}

#[test]
fn rotation_across_several_segments() {
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        // ~25 records of up to 300 B per commit: 2-3 blocks, ~5-8 commits per 64 KiB file.
        let counts = vec![25u64; 60];
        let next = write_commits(&mut journal, 1, &counts).await;
        let firsts = journal.segment_first_seqs();
        assert!(firsts.len() >= 4, "segments: {firsts:?}");
        assert_eq!(firsts[0], 1);
        journal.close().await.unwrap();

        // Every file is named for its first record, full-size, and commits never straddle.
        let files = segment_files(dir.path());
        assert_eq!(files.len(), firsts.len());
        for (file, first) in files.iter().zip(&firsts) {
            assert_eq!(*file, segment_path(dir.path(), *first));
            assert_eq!(std::fs::metadata(file).unwrap().len(), SEGMENT_BYTES);
            // Each rotation happened at a commit boundary: 25 records per commit.
            assert_eq!((first - 1) % 25, 0);
        }

        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next - 1);
        assert_eq!(journal.segment_first_seqs(), firsts);
        // Offsets reported to the callback are offsets within each file.
        assert!(seen.iter().any(|s| s.offset == 0 && s.seq > 1));
        let next2 = write_commits(&mut journal, next, &[25; 10]).await;
        assert!(journal.segment_first_seqs().len() > firsts.len());
        journal.close().await.unwrap();

        let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next2 - 1);
        journal.close().await.unwrap();
    });
}

#[test]
fn read_record_returns_random_seqs_before_and_after_reopen() {
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let counts: Vec<u64> = (0..40).map(|_| rng.random_range(1..=40)).collect();
        let next = write_commits(&mut journal, 1, &counts).await;
        assert!(journal.segment_first_seqs().len() >= 3);

        for seq in [1, next - 1] {
            check(&journal, seq).await;
        }
        for _ in 0..200 {
            check(&journal, rng.random_range(1..next)).await;
        }
        for bad in [0, next, next + 1000] {
            assert!(matches!(
                journal.read_record(bad).await,
                Err(JournalError::SeqNotFound { seq, .. }) if seq == bad
            ));
        }
        journal.close().await.unwrap();

        // The index is rebuilt by recovery.
        let (journal, _) = open_collect(config(dir.path())).await.unwrap();
        for seq in 1..next {
            check(&journal, seq).await;
        }
        journal.close().await.unwrap();
    });
}

async fn check(journal: &Journal, seq: u64) {
    let (kind, got) = journal.read_record(seq).await.unwrap();
    assert_eq!(kind, KIND, "seq {seq}");
    assert_eq!(got, body(seq), "seq {seq}");
}

#[test]
fn bad_commits_are_refused_without_poisoning() {
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        let refused = |r: Result<_, JournalError>| match r {
            Err(JournalError::InvalidCommit(rejection)) => rejection,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refused(journal.commit(&[]).await), CommitRejection::Empty);
        let mut short = commit_bytes(1, 1);
        short.truncate(100);
        assert!(matches!(
            refused(journal.commit(&short).await),
            CommitRejection::Unaligned { len: 100 }
        ));
        // An empty journal starts at seq 1.
        assert!(matches!(
            refused(journal.commit(&commit_bytes(5, 1)).await),
            CommitRejection::Sequence {
                offset: 0,
                expected: 1,
                found: 5
            }
        ));
        let huge = commit_bytes(1, 200);
        assert!(huge.len() > 16 * 1024);
        assert!(matches!(
            refused(journal.commit(&huge).await),
            CommitRejection::TooLarge { .. }
        ));
        let mut flipped = commit_bytes(1, 3);
        flipped[30] ^= 1;
        assert!(matches!(
            refused(journal.commit(&flipped).await),
            CommitRejection::BadRecord { offset: 0, .. }
        ));
        let mut padding = Vec::new();
        appliance_core::journal::frame::encode_record(
            &mut padding,
            appliance_core::journal::frame::KIND_PADDING,
            0,
            &vec![0; 4096 - 24],
        );
        assert_eq!(
            refused(journal.commit(&padding).await),
            CommitRejection::NoRecords
        );
        assert!(!journal.is_poisoned());

        write_commits(&mut journal, 1, &[2]).await;
        assert!(matches!(
            refused(journal.commit(&commit_bytes(2, 1)).await),
            CommitRejection::Sequence {
                expected: 3,
                found: 2,
                ..
            }
        ));
        write_commits(&mut journal, 3, &[1]).await;

        // Commit-framed buffers: the header must describe exactly this whole buffer.
        let mut bad_payload = framed_commit_bytes(4, 2);
        bad_payload[100] ^= 1;
        assert!(matches!(
            refused(journal.commit(&bad_payload).await),
            CommitRejection::BadCommit {
                error: FrameError::BadCommitChecksum
            }
        ));
        let mut two = framed_commit_bytes(4, 1);
        two.extend_from_slice(&framed_commit_bytes(5, 1));
        assert!(matches!(
            refused(journal.commit(&two).await),
            CommitRejection::CommitLength { .. }
        ));
        let mut nested = commit_bytes(4, 1);
        nested.extend_from_slice(&framed_commit_bytes(5, 1));
        assert!(matches!(
            refused(journal.commit(&nested).await),
            CommitRejection::MisplacedCommitHeader { .. }
        ));
        assert!(matches!(
            refused(journal.commit(&framed_commit_bytes(5, 1)).await),
            CommitRejection::Sequence {
                expected: 4,
                found: 5,
                ..
            }
        ));
        let position = journal.commit(&framed_commit_bytes(4, 2)).await.unwrap();
        assert_eq!((position.first_seq, position.last_seq), (4, 5));
        assert_eq!(journal.read_record(5).await.unwrap().1, body(5));
        // Bare commits are still accepted after framed ones.
        write_commits(&mut journal, 6, &[1]).await;
        journal.close().await.unwrap();
        let (journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, 6);
        assert_eq!(journal.read_record(4).await.unwrap().1, body(4));
        journal.close().await.unwrap();
    });
}

#[test]
fn second_instance_is_locked_out() {
    let dir = temp_dir();
    run(async {
        let (journal, _) = open_collect(config(dir.path())).await.unwrap();
        match open_collect(config(dir.path())).await {
            Err(appliance_server::journal::OpenError::Journal(JournalError::Locked { path })) => {
                assert_eq!(path, dir.path())
            }
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
        journal.close().await.unwrap();
        let (journal, _) = open_collect(config(dir.path())).await.unwrap();
        journal.close().await.unwrap();
    });
}

#[test]
fn invalid_config_is_refused() {
    let dir = temp_dir();
    run(async {
        let mut bad = config(dir.path());
        bad.segment_bytes_max = 8192; // smaller than commit_bytes_max
        assert!(matches!(
            open_collect(bad).await.map(|_| ()),
            Err(appliance_server::journal::OpenError::Journal(
                JournalError::InvalidConfig { .. }
            ))
        ));
    });
}

#[test]
fn callback_error_stops_recovery_and_names_the_record() {
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        write_commits(&mut journal, 1, &[5, 5]).await;
        journal.close().await.unwrap();
        #[derive(Debug, thiserror::Error)]
        #[error("refused")]
        struct Refused;
        let result = Journal::open(config(dir.path()), |r| {
            if r.seq == 7 {
                Err(Refused)
            } else {
                Ok(())
            }
        })
        .await;
        match result {
            Err(appliance_server::journal::OpenError::Replay { path, seq, .. }) => {
                assert_eq!(seq, 7);
                assert_eq!(path, segment_path(dir.path(), 1));
            }
            other => panic!("expected Replay, got {:?}", other.map(|_| ())),
        }
    });
}
