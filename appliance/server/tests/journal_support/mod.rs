//! Helpers shared by the journal integration tests.
#![allow(dead_code)] // each test crate uses a different subset

use std::future::Future;
use std::path::{Path, PathBuf};

use appliance_core::journal::frame::{begin_commit, encode_record, pad_to_block, seal_commit};
use appliance_server::journal::{
    segment_file_name, Journal, JournalConfig, OpenError, RECOVERY_CHUNK_BYTES_MIN,
};
use glommio::LocalExecutorBuilder;

/// Kind byte the tests use for their records (the journal does not interpret kinds).
pub const KIND: u8 = 7;
/// Small segments so that tests rotate often and stay fast.
pub const SEGMENT_BYTES: u64 = 64 * 1024;

/// Runs `f` on a fresh glommio executor on this thread.
///
/// io_memory is 512 KiB instead of glommio's 10 MiB default: io_uring registered buffers
/// count against RLIMIT_MEMLOCK (8 MiB on the test machines, and shared by every test
/// thread and every other glommio process of the same user), and the journal's DMA
/// buffers fall back to the normal allocator when the registered pool is exhausted.
pub fn run<T>(f: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(512 << 10)
        .make()
        .expect("glommio executor")
        .run(f)
}

/// A temporary directory on a real disk: O_DIRECT fails on tmpfs, so not under /tmp but
/// under the target directory cargo gives integration tests.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("journal-test-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir")
}

/// Test configuration: small segments and the smallest recovery chunk, so that
/// multi-chunk scanning is exercised by files of a few hundred KiB.
pub fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        segment_bytes_max: SEGMENT_BYTES,
        commit_bytes_max: 16 * 1024,
        recovery_chunk_bytes: RECOVERY_CHUNK_BYTES_MIN,
        ..JournalConfig::new(dir)
    }
}

/// The deterministic body of record `seq`: 0..=299 bytes, content derived from `seq`.
pub fn body(seq: u64) -> Vec<u8> {
    let len = (seq.wrapping_mul(37) % 300) as usize;
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// A commit of records `first..first + count`, padded to the block.
pub fn commit_bytes(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for seq in first..first + count {
        encode_record(&mut out, KIND, seq, &body(seq));
    }
    pad_to_block(&mut out, 4096);
    out
}

/// A commit-framed commit of records `first..first + count` (commit header, records,
/// padding to the block), as the shard writes them.
pub fn framed_commit_bytes(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let start = begin_commit(&mut out);
    for seq in first..first + count {
        encode_record(&mut out, KIND, seq, &body(seq));
    }
    seal_commit(&mut out, start, 4096, first, first + count - 1).expect("seal");
    out
}

/// Writes framed commits of the given record counts starting at `first`; returns the
/// next seq.
pub async fn write_framed_commits(journal: &mut Journal, first: u64, counts: &[u64]) -> u64 {
    let mut next = first;
    for &count in counts {
        let position = journal
            .commit(&framed_commit_bytes(next, count))
            .await
            .expect("commit");
        assert_eq!(
            (position.first_seq, position.last_seq),
            (next, next + count - 1)
        );
        next += count;
        assert_eq!(journal.next_seq(), next);
    }
    next
}

/// A record as the recovery callback saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub seq: u64,
    pub kind: u8,
    pub body: Vec<u8>,
    pub offset: usize,
}

/// Opens the journal in `dir`, collecting every recovered record.
pub async fn open_collect(
    config: JournalConfig,
) -> Result<(Journal, Vec<Seen>), OpenError<std::convert::Infallible>> {
    let mut seen = Vec::new();
    let journal = Journal::open(config, |r| {
        seen.push(Seen {
            seq: r.seq,
            kind: r.kind,
            body: r.body.to_vec(),
            offset: r.offset,
        });
        Ok(())
    })
    .await?;
    Ok((journal, seen))
}

/// Asserts that `seen` is exactly records `first..=last` with their bodies.
pub fn assert_records(seen: &[Seen], first: u64, last: u64) {
    let seqs: Vec<u64> = seen.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (first..=last).collect::<Vec<_>>());
    for s in seen {
        assert_eq!(s.kind, KIND);
        assert_eq!(s.body, body(s.seq), "body of seq {}", s.seq);
    }
}

/// Writes commits of the given record counts starting at `first`; returns the next seq.
pub async fn write_commits(journal: &mut Journal, first: u64, counts: &[u64]) -> u64 {
    let mut next = first;
    for &count in counts {
        let position = journal
            .commit(&commit_bytes(next, count))
            .await
            .expect("commit");
        assert_eq!(position.first_seq, next);
        assert_eq!(position.last_seq, next + count - 1);
        next += count;
        assert_eq!(journal.next_seq(), next);
    }
    next
}

/// Path of the segment named for `first_seq` in `dir`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(segment_file_name(first_seq))
}

/// The segment files in `dir`, sorted by name.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .collect();
    files.sort();
    files
}

/// Asserts that `seen` holds exactly sequence numbers `first..=last` (bodies unchecked).
pub fn assert_seqs(seen: &[Seen], first: u64, last: u64) {
    let seqs: Vec<u64> = seen.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (first..=last).collect::<Vec<_>>());
}

/// Sets this process's RLIMIT_FSIZE soft limit (writes at or beyond it fail with EFBIG
/// once SIGXFSZ is ignored) and returns the previous one. Per process: a test using it
/// lives alone in its test binary.
pub fn set_fsize_limit(soft: libc::rlim_t) -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        let previous = limit.rlim_cur;
        limit.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        previous
    }
}
