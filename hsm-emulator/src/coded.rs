//! Coded marks: per granted segment, one past the highest number the device has given a
//! tax code. A holder that restarts asks for them (`Inventory`) and never uses a number
//! below its segment's mark again, so that a number coded for an invoice the holder's
//! journal lost is never coded a second time for another invoice.
//!
//! The marks live in `<data dir>/coded.bin`, a fixed array of [`SEGMENTS_MAX`] u32 slots
//! (slot i = segment i of the state, segments are only ever appended) mapped shared into
//! the process. A TaxCodes item raises its segment's slot with an atomic `fetch_max` on
//! the mapping before its answer is sent: no system call and no lock on the hot path, and
//! the page cache keeps the marks when the process is killed. Like `counters.bin`, a power
//! cut can lose the latest marks (a real device keeps them in its secure storage); the
//! emulator trades that for not putting an fsync on every TaxCodes.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::state::{StateError, SEGMENTS_MAX};

/// File name of the marks.
pub const CODED_FILE: &str = "coded.bin";
const FILE_BYTES: usize = SEGMENTS_MAX * 4;

/// The shared mapping of `coded.bin`.
#[derive(Debug)]
pub(super) struct CodedMarks {
    base: NonNull<AtomicU32>,
}

// SAFETY: the mapping is only accessed through atomics and lives as long as the value.
unsafe impl Send for CodedMarks {}
// SAFETY: as above; every access is an atomic operation on a u32 slot.
unsafe impl Sync for CodedMarks {}

impl CodedMarks {
    /// Opens (creating if needed) the marks of `dir`.
    pub(super) fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(CODED_FILE);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len != 0 && len != FILE_BYTES as u64 {
            return Err(StateError::Corrupt {
                path,
                reason: format!("{len} bytes, expected {FILE_BYTES}"),
            });
        }
        if len == 0 {
            file.set_len(FILE_BYTES as u64).map_err(io)?;
            // The new, zero-filled file must exist after a crash before any mark is set
            // in it; the directory entry is made durable once.
            file.sync_all().map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StateError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        // SAFETY: a shared read-write mapping of a file we opened read-write and sized to
        // FILE_BYTES; the mapping outlives the descriptor by design (mmap keeps its own
        // reference) and is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<AtomicU32>())
            .ok_or_else(|| io(std::io::Error::other("mmap returned null")))?;
        Ok(Self { base })
    }

    fn slot(&self, segment: usize) -> Option<&AtomicU32> {
        (segment < SEGMENTS_MAX).then(|| {
            // SAFETY: segment < SEGMENTS_MAX slots of 4 bytes each, page-aligned base;
            // AtomicU32 has the layout of u32.
            unsafe { &*self.base.as_ptr().add(segment) }
        })
    }

    /// Records that `number` of segment `segment` was coded.
    pub(super) fn note(&self, segment: usize, number: u32) {
        if let Some(slot) = self.slot(segment) {
            slot.fetch_max(number.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// One past the highest coded number of segment `segment` (0: none).
    pub(super) fn get(&self, segment: usize) -> u32 {
        self.slot(segment).map_or(0, |s| s.load(Ordering::Relaxed))
    }
}

impl Drop for CodedMarks {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, of FILE_BYTES, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), FILE_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_rise_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let marks = CodedMarks::open(dir.path()).unwrap();
        assert_eq!(marks.get(3), 0);
        marks.note(3, 41);
        marks.note(3, 17);
        marks.note(SEGMENTS_MAX, 5); // out of range: ignored
        assert_eq!(marks.get(3), 42);
        drop(marks);
        let again = CodedMarks::open(dir.path()).unwrap();
        assert_eq!(again.get(3), 42);
        assert_eq!(again.get(4), 0);
    }

    #[test]
    fn a_file_of_another_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CODED_FILE), [0u8; 12]).unwrap();
        assert!(matches!(
            CodedMarks::open(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }
}
