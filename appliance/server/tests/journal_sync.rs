//! The journal's sync modes: the segment being appended to carries O_DSYNC in the
//! `dsync` mode (created by a rotation or reopened by recovery) and not in the
//! `fdatasync` mode, and both modes write the same journal. The kernel's own record of
//! each open descriptor (`/proc/self/fdinfo`) is the witness, not the journal's word.

mod journal_support;

use std::path::Path;

use appliance_server::journal::{JournalConfig, JournalSync};
use journal_support::*;

/// The `flags:` of every descriptor this process has open on `path` (octal in fdinfo).
fn open_flags_of(path: &Path) -> Vec<i32> {
    let want = std::fs::canonicalize(path).expect("segment exists");
    let mut flags = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("procfs") {
        let fd = entry.expect("fd entry").file_name();
        let Ok(target) = std::fs::read_link(Path::new("/proc/self/fd").join(&fd)) else {
            continue; // closed between listing and reading
        };
        if target != want {
            continue;
        }
        let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(&fd))
            .expect("fdinfo of an open descriptor");
        let octal = info
            .lines()
            .find_map(|line| line.strip_prefix("flags:"))
            .expect("fdinfo has flags")
            .trim();
        flags.push(i32::from_str_radix(octal, 8).expect("octal flags"));
    }
    flags
}

fn with_sync(dir: &Path, sync: JournalSync) -> JournalConfig {
    JournalConfig {
        sync,
        ..config(dir)
    }
}

/// Asserts that exactly one descriptor is open on `path`, with O_DIRECT, and with O_DSYNC
/// exactly when `dsync`.
fn assert_segment_flags(path: &Path, dsync: bool) {
    let flags = open_flags_of(path);
    assert_eq!(flags.len(), 1, "one descriptor on {}", path.display());
    assert_ne!(
        flags[0] & libc::O_DIRECT,
        0,
        "O_DIRECT on {}",
        path.display()
    );
    assert_eq!(
        flags[0] & libc::O_DSYNC != 0,
        dsync,
        "O_DSYNC on {} (flags {:o})",
        path.display(),
        flags[0]
    );
}

#[test]
fn dsync_is_the_default() {
    assert_eq!(JournalConfig::new("/x").sync, JournalSync::Dsync);
    assert_eq!(JournalSync::Dsync.open_flags(), libc::O_DSYNC);
    assert_eq!(JournalSync::Fdatasync.open_flags(), 0);
}

#[test]
fn appended_segments_carry_o_dsync_after_rotation_and_after_recovery() {
    for (sync, dsync) in [(JournalSync::Dsync, true), (JournalSync::Fdatasync, false)] {
        let dir = temp_dir();
        run(async {
            let (mut journal, _) = open_collect(with_sync(dir.path(), sync)).await.unwrap();
            // The first commit creates segment 1 through `rotate`.
            let next = write_framed_commits(&mut journal, 1, &[3]).await;
            assert_segment_flags(&segment_path(dir.path(), 1), dsync);
            // Enough to rotate: older segments are closed, the new one carries the flag.
            let next = write_framed_commits(&mut journal, next, &[25; 40]).await;
            let segments = segment_files(dir.path());
            assert!(segments.len() >= 3, "rotated: {segments:?}");
            let last = segments.last().unwrap().clone();
            assert_segment_flags(&last, dsync);
            for older in &segments[..segments.len() - 1] {
                assert!(
                    open_flags_of(older).is_empty(),
                    "{} closed",
                    older.display()
                );
            }
            journal.close().await.unwrap();
            assert!(open_flags_of(&last).is_empty());

            // Recovery reopens the last segment for appending, with the same flags.
            let (mut journal, seen) = open_collect(with_sync(dir.path(), sync)).await.unwrap();
            assert_seqs(&seen, 1, next - 1);
            assert_segment_flags(&last, dsync);
            let next = write_framed_commits(&mut journal, next, &[5]).await;
            journal.close().await.unwrap();

            // Either mode reads what the other wrote.
            let other = match sync {
                JournalSync::Dsync => JournalSync::Fdatasync,
                JournalSync::Fdatasync => JournalSync::Dsync,
            };
            let (journal, seen) = open_collect(with_sync(dir.path(), other)).await.unwrap();
            assert_seqs(&seen, 1, next - 1);
            assert_segment_flags(&last, !dsync);
            journal.close().await.unwrap();
        });
    }
}
