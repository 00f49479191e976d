//! Uploaded invoices: an append-only log `<data dir>/uploads.log` of fixed 112-byte
//! records, fsynced once per Upload batch before the batch is answered, and an in-memory
//! index rebuilt from it at start-up so duplicates and conflicts are detected across
//! restarts.
//!
//! Record layout (little-endian): magic "UPLD" (4) · crc32c of bytes 8.. (4) · seq u64 ·
//! invoice code u64 · number u32 · kind u8 · 3 zero · amount i64 · tax i64 · total i64 ·
//! seller (18) · 6 zero · tax code (32). The tax code identifies the bytes: an accepted
//! upload's code verified against the device key, so equal codes mean equal bytes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::config::TAXPAYER_BYTES;
use super::state::StateError;

/// File name of the upload log.
pub const UPLOAD_LOG_FILE: &str = "uploads.log";
/// Bytes of one record.
pub const UPLOAD_RECORD_BYTES: usize = 112;
/// Limit on remembered uploads (memory: ~100 B each in the index).
pub const UPLOADS_MAX: usize = 20_000_000;
const RECORD_MAGIC: [u8; 4] = *b"UPLD";

/// One accepted upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Invoice code.
    pub invoice_code: u64,
    /// Invoice number.
    pub invoice_number: u32,
    /// Blue (0) or red (1).
    pub kind: u8,
    /// Amount, fen.
    pub amount_fen: i64,
    /// Tax, fen.
    pub tax_fen: i64,
    /// Total, fen.
    pub total_fen: i64,
    /// Seller.
    pub seller: [u8; TAXPAYER_BYTES],
    /// Verified tax code of the uploaded bytes.
    pub tax_code: [u8; 32],
}

impl UploadRecord {
    /// Encodes into `out`.
    pub fn encode(&self, out: &mut [u8; UPLOAD_RECORD_BYTES]) {
        out[..4].copy_from_slice(&RECORD_MAGIC);
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.invoice_code.to_le_bytes());
        out[24..28].copy_from_slice(&self.invoice_number.to_le_bytes());
        out[28] = self.kind;
        out[29..32].fill(0);
        out[32..40].copy_from_slice(&self.amount_fen.to_le_bytes());
        out[40..48].copy_from_slice(&self.tax_fen.to_le_bytes());
        out[48..56].copy_from_slice(&self.total_fen.to_le_bytes());
        out[56..74].copy_from_slice(&self.seller);
        out[74..80].fill(0);
        out[80..112].copy_from_slice(&self.tax_code);
        let crc = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a record; `None` if the magic or checksum is wrong.
    pub fn decode(b: &[u8; UPLOAD_RECORD_BYTES]) -> Option<Self> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let i64_at = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        if b[..4] != RECORD_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[4..8].try_into().unwrap_or_default());
        if crc32c::crc32c(&b[8..]) != crc || b[29..32] != [0; 3] || b[74..80] != [0; 6] {
            return None;
        }
        let mut seller = [0u8; TAXPAYER_BYTES];
        seller.copy_from_slice(&b[56..74]);
        let mut tax_code = [0u8; 32];
        tax_code.copy_from_slice(&b[80..112]);
        Some(Self {
            seq: u64_at(8),
            invoice_code: u64_at(16),
            invoice_number: u32::from_le_bytes(b[24..28].try_into().unwrap_or_default()),
            kind: b[28],
            amount_fen: i64_at(32),
            tax_fen: i64_at(40),
            total_fen: i64_at(48),
            seller,
            tax_code,
        })
    }
}

/// The log and its index.
#[derive(Debug)]
pub struct UploadLog {
    path: PathBuf,
    file: File,
    /// (code, number) → (seq, tax code).
    index: BTreeMap<(u64, u32), (u64, [u8; 32])>,
    /// All records in order, for report-and-clear sums (by seller) after a restart.
    records: Vec<UploadRecord>,
    next_seq: u64,
}

impl UploadLog {
    /// Opens (or creates) the log of `dir`, replaying it. A torn tail (a partial or
    /// unreadable record after the last good one) is truncated: such records belong to
    /// a batch whose fsync never completed, so it was never answered.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(UPLOAD_LOG_FILE);
        let io_at = |source: io::Error| StateError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_at)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_at)?;
        let mut index = BTreeMap::new();
        let mut records = Vec::new();
        let mut good_bytes = 0usize;
        for chunk in bytes.chunks_exact(UPLOAD_RECORD_BYTES) {
            let arr: &[u8; UPLOAD_RECORD_BYTES] = match chunk.try_into() {
                Ok(a) => a,
                Err(_) => break,
            };
            let Some(rec) = UploadRecord::decode(arr) else {
                break;
            };
            if rec.seq != records.len() as u64 + 1 {
                break;
            }
            index.insert(
                (rec.invoice_code, rec.invoice_number),
                (rec.seq, rec.tax_code),
            );
            records.push(rec);
            good_bytes += UPLOAD_RECORD_BYTES;
            if records.len() > UPLOADS_MAX {
                return Err(StateError::Corrupt {
                    path: path.clone(),
                    reason: "more uploads than the device limit".into(),
                });
            }
        }
        if good_bytes < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - good_bytes,
                "upload log: truncating unacknowledged tail"
            );
            file.set_len(good_bytes as u64).map_err(io_at)?;
            file.sync_all().map_err(io_at)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io_at)?;
        if bytes.is_empty() {
            // A fresh log: make its directory entry durable before anything is acked.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| StateError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let next_seq = records.len() as u64 + 1;
        Ok(Self {
            path,
            file,
            index,
            records,
            next_seq,
        })
    }

    /// What the log knows about `(code, number)`: the tax code of the accepted upload.
    pub fn lookup(&self, code: u64, number: u32) -> Option<&[u8; 32]> {
        self.index.get(&(code, number)).map(|(_, c)| c)
    }

    /// Whether any upload lies in `first..first+count` of `code`.
    pub fn any_in_range(&self, code: u64, first: u32, count: u32) -> bool {
        let end = u64::from(first) + u64::from(count);
        let end = u32::try_from(end).unwrap_or(u32::MAX);
        self.index
            .range((code, first)..(code, end))
            .next()
            .is_some()
    }

    /// Sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Remembered uploads.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether nothing was uploaded.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// All records, in order.
    pub fn records(&self) -> &[UploadRecord] {
        &self.records
    }

    /// Appends `batch` (sequence numbers must follow on) and fsyncs, then indexes it.
    /// On error nothing is indexed and the file is cut back (best effort) to the last
    /// acknowledged record, because a retried batch would otherwise be appended twice;
    /// the caller answers with a device error.
    pub fn append(&mut self, batch: &[UploadRecord]) -> Result<(), StateError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.records.len() + batch.len() > UPLOADS_MAX {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: "upload limit reached".into(),
            });
        }
        let mut buf = vec![0u8; batch.len() * UPLOAD_RECORD_BYTES];
        for (i, (rec, out)) in batch
            .iter()
            .zip(buf.chunks_exact_mut(UPLOAD_RECORD_BYTES))
            .enumerate()
        {
            debug_assert_eq!(rec.seq, self.next_seq + i as u64);
            if let Ok(out) = <&mut [u8; UPLOAD_RECORD_BYTES]>::try_from(out) {
                rec.encode(out);
            }
        }
        let good_len = self.records.len() as u64 * UPLOAD_RECORD_BYTES as u64;
        let result = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            // Best effort: drop the partial batch so the log stays a prefix of acked
            // batches plus nothing. If even this fails the next start truncates it as
            // a torn tail only if it is unreadable, so report the original error.
            let _ = self.file.set_len(good_len);
            return Err(StateError::Io {
                path: self.path.clone(),
                source,
            });
        }
        for rec in batch {
            self.index.insert(
                (rec.invoice_code, rec.invoice_number),
                (rec.seq, rec.tax_code),
            );
            self.records.push(*rec);
        }
        self.next_seq += batch.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, number: u32) -> UploadRecord {
        UploadRecord {
            seq,
            invoice_code: 7,
            invoice_number: number,
            kind: 0,
            amount_fen: 100,
            tax_fen: 13,
            total_fen: 113,
            seller: *b"91350100M000100Y43",
            tax_code: [number as u8; 32],
        }
    }

    #[test]
    fn append_replay_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = UploadLog::open(dir.path()).unwrap();
            log.append(&[rec(1, 10), rec(2, 11)]).unwrap();
        }
        // A torn third record.
        let path = dir.path().join(UPLOAD_LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[1u8; 50]).unwrap();
        drop(f);
        let mut log = UploadLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log.lookup(7, 11), Some(&[11u8; 32]));
        assert!(log.any_in_range(7, 5, 6));
        assert!(!log.any_in_range(7, 12, 6));
        assert_eq!(log.next_seq(), 3);
        log.append(&[rec(3, 12)]).unwrap();
        drop(log);
        let log = UploadLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * 112);
    }
}
