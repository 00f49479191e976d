//! Tax-code counters per taxpayer: issued since the device was initialised, and blue /
//! red since the last report-and-clear.
//!
//! No TaxCodes answer depends on them, so they are not fsynced per batch (that would put
//! an fsync on the hot path): after each batch the small file `counters.bin` is rewritten
//! in place through the page cache, which survives a killed process but not a power cut.
//! Counts include retried items (a retried TaxCodes is counted again); the exact, durable
//! figures of a period are the upload sums.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::config::TAXPAYER_BYTES;
use super::state::StateError;

/// File name of the counters.
pub const COUNTERS_FILE: &str = "counters.bin";
const MAGIC: [u8; 4] = *b"CNTR";
const ENTRY_BYTES: usize = TAXPAYER_BYTES + 24;
const FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;

#[derive(Debug)]
pub(super) struct Counters {
    file: File,
    path: PathBuf,
    taxpayers: Vec<[u8; TAXPAYER_BYTES]>,
    issued: Vec<u64>,
    blue: Vec<u64>,
    red: Vec<u64>,
    buf: Vec<u8>,
}

impl Counters {
    pub(super) fn open(dir: &Path, taxpayers: &[[u8; TAXPAYER_BYTES]]) -> Result<Self, StateError> {
        let path = dir.join(COUNTERS_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        let mut bytes = Vec::new();
        (&mut file)
            .take(FILE_BYTES_MAX)
            .read_to_end(&mut bytes)
            .map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
        let n = taxpayers.len();
        let mut c = Self {
            file,
            path,
            taxpayers: taxpayers.to_vec(),
            issued: vec![0; n],
            blue: vec![0; n],
            red: vec![0; n],
            buf: Vec::new(),
        };
        if !bytes.is_empty() && !c.load(&bytes) {
            tracing::warn!(path = %c.path.display(), "counters file unreadable; counting from zero");
        }
        Ok(c)
    }

    fn load(&mut self, b: &[u8]) -> bool {
        if b.len() < 12 || b[..4] != MAGIC {
            return false;
        }
        let Ok(count) = <[u8; 4]>::try_from(&b[4..8]).map(u32::from_le_bytes) else {
            return false;
        };
        let body_end = 8 + count as usize * ENTRY_BYTES;
        if b.len() != body_end + 4 {
            return false;
        }
        let Ok(crc) = <[u8; 4]>::try_from(&b[body_end..]).map(u32::from_le_bytes) else {
            return false;
        };
        if crc32c::crc32c(&b[..body_end]) != crc {
            return false;
        }
        for e in b[8..body_end].chunks_exact(ENTRY_BYTES) {
            let u = |i: usize| {
                <[u8; 8]>::try_from(&e[i..i + 8])
                    .map(u64::from_le_bytes)
                    .unwrap_or(0)
            };
            if let Some(slot) = self
                .taxpayers
                .iter()
                .position(|t| t[..] == e[..TAXPAYER_BYTES])
            {
                self.issued[slot] = u(TAXPAYER_BYTES);
                self.blue[slot] = u(TAXPAYER_BYTES + 8);
                self.red[slot] = u(TAXPAYER_BYTES + 16);
            }
        }
        true
    }

    fn write(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(&MAGIC);
        self.buf
            .extend_from_slice(&(self.taxpayers.len() as u32).to_le_bytes());
        for (i, t) in self.taxpayers.iter().enumerate() {
            self.buf.extend_from_slice(t);
            for v in [self.issued[i], self.blue[i], self.red[i]] {
                self.buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&self.buf);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        // Same length every time, so an in-place write never leaves stale bytes behind.
        if let Err(e) = self.file.write_all_at(&self.buf, 0) {
            tracing::warn!(path = %self.path.display(), error = %e, "counters not written");
        }
    }

    /// Adds a batch's (blue, red) counts per slot.
    pub(super) fn add(&mut self, tally: &[(u64, u64)]) {
        for (slot, &(b, r)) in tally.iter().enumerate() {
            if slot < self.issued.len() {
                self.issued[slot] += b + r;
                self.blue[slot] += b;
                self.red[slot] += r;
            }
        }
        self.write();
    }

    /// (blue, red) since the last clear.
    pub(super) fn since_clear(&self, slot: usize) -> (u64, u64) {
        (
            self.blue.get(slot).copied().unwrap_or(0),
            self.red.get(slot).copied().unwrap_or(0),
        )
    }

    /// Tax codes issued since the device was initialised.
    pub(super) fn issued_total(&self, slot: usize) -> u64 {
        self.issued.get(slot).copied().unwrap_or(0)
    }

    /// Zeroes the since-clear counts of `slot`.
    pub(super) fn clear(&mut self, slot: usize) {
        if slot < self.blue.len() {
            self.blue[slot] = 0;
            self.red[slot] = 0;
            self.write();
        }
    }
}
