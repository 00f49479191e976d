//! Fail-stop: after a failed write the journal refuses every later commit.
//!
//! The write failure is real, not simulated: RLIMIT_FSIZE makes the kernel refuse writes
//! at or beyond the limit with EFBIG. The limit is per process, so this test lives alone
//! in its own test binary.

mod journal_support;

use appliance_server::journal::JournalError;
use journal_support::*;

#[test]
fn failed_write_poisons_and_recovery_keeps_what_was_durable() {
    // Without this the kernel's SIGXFSZ would kill the test process instead of letting the
    // write fail with EFBIG.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = temp_dir();
    run(async {
        let (mut journal, _) = open_collect(config(dir.path())).await.unwrap();
        // Two one-block commits: offsets 0 and 4096 of a preallocated segment.
        let next = write_commits(&mut journal, 1, &[3, 3]).await;

        let previous = set_fsize_limit(8192);
        let failed = journal.commit(&commit_bytes(next, 3)).await;
        set_fsize_limit(previous);
        match failed {
            Err(JournalError::Io { op, offset, .. }) => assert_eq!((op, offset), ("write", 8192)),
            other => panic!("expected a write error, got {other:?}"),
        }
        assert!(journal.is_poisoned());
        // The limit is gone, yet the journal refuses: after a failed write (or fdatasync)
        // what is on disk is unknown until recovery has looked.
        for _ in 0..2 {
            match journal.commit(&commit_bytes(next, 3)).await {
                Err(JournalError::Poisoned { first_error }) => {
                    assert!(first_error.contains("write"), "{first_error}")
                }
                other => panic!("expected Poisoned, got {other:?}"),
            }
        }
        assert_eq!(journal.next_seq(), next);
        journal.close().await.unwrap();

        let (mut journal, seen) = open_collect(config(dir.path())).await.unwrap();
        assert_records(&seen, 1, next - 1);
        write_commits(&mut journal, next, &[3]).await;
        journal.close().await.unwrap();
    });
}
