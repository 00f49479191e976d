//! Recovery: rebuilds an [`Issuer`] from its journal records, checking every invariant on
//! the way in (TigerStyle: assert on both sides of the disk).
//!
//! Records are fed in journal order. Recovery rebuilds pool cursors (every issued or
//! spoiled number must be exactly the next number of a reserved segment: a number
//! behind its cursor is used twice, one ahead skips numbers), the idempotency index with
//! each order's journal sequence, red totals, the next sequence number, the upload
//! watermark and the last batch root.
//!
//! The index is rebuilt with the same expiry as the live issuer: before an order is
//! inserted, orders older than the retention window before its issue time are dropped
//! (the live issuer expired them at the `begin_tick` that issued it). This assumes the
//! shard's clock does not run backwards across ticks.

use std::collections::HashSet;

use crate::canonical::CanonicalInvoice;
use crate::idempotency::{issue_time_s, key_fingerprint, request_digest, IndexEntry};
use crate::invoice::InvoiceKind;
use crate::issuer::{ConfigError, Issuer, IssuerConfig};
use crate::journal::frame::{scan, FrameError, RawRecord, ScanEnd, KIND_PADDING};
use crate::journal::record::{Record, RecordError};
use crate::pool::PoolError;
use crate::taxpayer::TaxpayerId;

pub use crate::journal::record::decode_issued;

/// Why the journal cannot be recovered. Every variant names the record's sequence number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    /// A record's sequence number is not the next one.
    #[error("sequence gap: expected {expected}, found {found}")]
    SequenceGap {
        /// Expected sequence number.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// Unknown record kind.
    #[error("record {seq}: unknown kind {kind}")]
    UnknownKind {
        /// Sequence number.
        seq: u64,
        /// Kind byte.
        kind: u8,
    },
    /// Invalid record body.
    #[error("record {seq}: {error}")]
    InvalidBody {
        /// Sequence number.
        seq: u64,
        /// What is wrong.
        error: RecordError,
    },
    /// A seller this configuration does not serve.
    #[error("record {seq}: seller {seller} not configured")]
    UnknownSeller {
        /// Sequence number.
        seq: u64,
        /// The seller.
        seller: TaxpayerId,
    },
    /// A number outside every reserved segment of its seller.
    #[error("record {seq}: number {number} of code {code} outside reserved segments")]
    NumberOutsideReserved {
        /// Sequence number.
        seq: u64,
        /// Invoice code.
        code: u64,
        /// Invoice number.
        number: u32,
    },
    /// A number issued (or spoiled) twice.
    #[error("record {seq}: number {number} of code {code} used twice")]
    NumberUsedTwice {
        /// Sequence number.
        seq: u64,
        /// Invoice code.
        code: u64,
        /// Invoice number.
        number: u32,
    },
    /// A number used before the numbers in front of it in its segment.
    #[error("record {seq}: number {number} of code {code} skips numbers")]
    NumberSkipped {
        /// Sequence number.
        seq: u64,
        /// Invoice code.
        code: u64,
        /// Invoice number.
        number: u32,
    },
    /// A segment overlapping a held one, or a return that is not an unused rest.
    #[error("record {seq}: segment inconsistent with the pool ({error})")]
    Segment {
        /// Sequence number.
        seq: u64,
        /// What is wrong.
        error: PoolError,
    },
    /// An order issued twice within the retention window.
    #[error("record {seq}: order issued twice")]
    DuplicateOrder {
        /// Sequence number.
        seq: u64,
    },
    /// More remembered orders than the configured index capacity.
    #[error("record {seq}: idempotency index capacity exceeded")]
    IndexFull {
        /// Sequence number.
        seq: u64,
    },
    /// A record referring to a sequence number it cannot refer to (completion of an
    /// unknown pending record, double void, watermark or batch root going back or
    /// forward past itself).
    #[error("record {seq}: bad reference to another record")]
    BadReference {
        /// Sequence number.
        seq: u64,
    },
    /// Corruption in the middle of the journal (not a torn tail).
    #[error("corrupt record at byte {offset}: {error}")]
    Corrupt {
        /// Offset in the scanned buffer.
        offset: usize,
        /// Framing error.
        error: FrameError,
    },
}

/// Recovery in progress: feed records with [`Recovery::apply`], then [`Recovery::finish`].
#[derive(Debug)]
pub struct Recovery {
    issuer: Issuer,
    pending_seqs: HashSet<u64>,
    voided_seqs: HashSet<u64>,
}

fn number_error(seq: u64, error: PoolError) -> RecoveryError {
    match error {
        PoolError::OutsideReserved(code, number) => {
            RecoveryError::NumberOutsideReserved { seq, code, number }
        }
        PoolError::UsedTwice(code, number) => RecoveryError::NumberUsedTwice { seq, code, number },
        PoolError::Skipped(code, number) => RecoveryError::NumberSkipped { seq, code, number },
        other => RecoveryError::Segment { seq, error: other },
    }
}

impl Recovery {
    /// Starts from an empty issuer with this configuration.
    pub fn new(config: IssuerConfig) -> Result<Self, RecoveryError> {
        Ok(Self {
            issuer: Issuer::new(config)?,
            pending_seqs: HashSet::new(),
            voided_seqs: HashSet::new(),
        })
    }

    /// Sequence number the next record must have.
    pub fn next_seq(&self) -> u64 {
        self.issuer.next_seq
    }

    /// Applies one record (padding records are skipped).
    pub fn apply(&mut self, raw: &RawRecord<'_>) -> Result<(), RecoveryError> {
        if raw.kind == KIND_PADDING {
            return Ok(());
        }
        let seq = raw.seq;
        if seq != self.issuer.next_seq {
            return Err(RecoveryError::SequenceGap {
                expected: self.issuer.next_seq,
                found: seq,
            });
        }
        let record = Record::decode(raw.kind, raw.body).map_err(|error| match error {
            RecordError::UnknownKind(kind) => RecoveryError::UnknownKind { seq, kind },
            error => RecoveryError::InvalidBody { seq, error },
        })?;
        self.apply_record(seq, record)?;
        self.issuer.next_seq += 1;
        Ok(())
    }

    fn pool_index(&self, seq: u64, seller: &TaxpayerId) -> Result<usize, RecoveryError> {
        self.issuer
            .sellers
            .get(seller)
            .map(|&i| i as usize)
            .ok_or(RecoveryError::UnknownSeller {
                seq,
                seller: *seller,
            })
    }

    fn apply_record(&mut self, seq: u64, record: Record) -> Result<(), RecoveryError> {
        match record {
            Record::SegmentReserved { seller, segment } => {
                let p = self.pool_index(seq, &seller)?;
                self.issuer.pools[p]
                    .add_segment(segment)
                    .map_err(|error| RecoveryError::Segment { seq, error })?;
            }
            Record::SegmentReturned { seller, segment } => {
                let p = self.pool_index(seq, &seller)?;
                self.issuer.pools[p]
                    .replay_return(segment)
                    .map_err(|error| RecoveryError::Segment { seq, error })?;
            }
            Record::Issued(invoice) => {
                let content = CanonicalInvoice {
                    request: invoice.request,
                    code: invoice.code,
                    number: invoice.number,
                    issue_time_ms: invoice.issue_time_ms,
                };
                self.apply_issue(seq, &content)?;
            }
            Record::Pending(content) => {
                self.apply_issue(seq, &content)?;
                self.pending_seqs.insert(seq);
            }
            Record::Completed { pending_seq, .. } => {
                if !self.pending_seqs.remove(&pending_seq) {
                    return Err(RecoveryError::BadReference { seq });
                }
            }
            Record::Voided { issued_seq, .. } => {
                if issued_seq >= seq || !self.voided_seqs.insert(issued_seq) {
                    return Err(RecoveryError::BadReference { seq });
                }
            }
            Record::UploadedTo { watermark_seq } => {
                if watermark_seq < self.issuer.upload_watermark_seq || watermark_seq >= seq {
                    return Err(RecoveryError::BadReference { seq });
                }
                self.issuer.upload_watermark_seq = watermark_seq;
            }
            Record::BatchRoot {
                first_seq,
                last_seq,
                ..
            } => {
                if first_seq <= self.issuer.batch_root_last_seq || last_seq >= seq {
                    return Err(RecoveryError::BadReference { seq });
                }
                self.issuer.batch_root_last_seq = last_seq;
            }
            Record::NumberSpoiled {
                seller, identity, ..
            } => {
                let p = self.pool_index(seq, &seller)?;
                self.issuer.pools[p]
                    .replay_use(identity.code, identity.number, true)
                    .map_err(|e| number_error(seq, e))?;
            }
        }
        Ok(())
    }

    /// An Issued or Pending record: uses its number and remembers its order.
    fn apply_issue(&mut self, seq: u64, content: &CanonicalInvoice) -> Result<(), RecoveryError> {
        let request = &content.request;
        let p = self.pool_index(seq, &request.seller)?;
        self.issuer.pools[p]
            .replay_use(content.code, content.number, false)
            .map_err(|e| number_error(seq, e))?;
        let index = &mut self.issuer.index;
        index.expire(content.issue_time_ms);
        let fingerprint = key_fingerprint(&request.seller, &request.order_id);
        if index.get(fingerprint).is_some() {
            return Err(RecoveryError::DuplicateOrder { seq });
        }
        if index.len() >= index.capacity() {
            return Err(RecoveryError::IndexFull { seq });
        }
        let mut scratch = Vec::new();
        index.insert(IndexEntry {
            fingerprint: IndexEntry::split_fingerprint(fingerprint),
            request_digest: request_digest(request, &mut scratch),
            seq,
            code: content.code.get(),
            number: content.number.get(),
            issue_time_s: issue_time_s(content.issue_time_ms),
            total_fen: request.total_fen,
        });
        if let InvoiceKind::Red(reference) = &request.kind {
            let original = key_fingerprint(&request.seller, &reference.original_order_id);
            // The live issuer only accepted the red while its original was remembered.
            if index.get(original).is_some() {
                index.add_red_fen(original, request.total_fen.saturating_abs());
            }
        }
        Ok(())
    }

    /// Ends recovery: expires orders older than the retention window before `now_ms`,
    /// drops exhausted segments and returns the issuer, ready for `begin_tick`.
    pub fn finish(mut self, now_ms: u64) -> Issuer {
        self.issuer.index.expire(now_ms);
        for pool in &mut self.issuer.pools {
            pool.compact();
        }
        self.issuer
    }
}

/// Recovers an issuer from one buffer of journal bytes (a whole shard journal, or its
/// files concatenated in order). Returns the issuer and how the scan ended; on
/// [`ScanEnd::TornTail`] the caller truncates the journal at `end` before appending.
/// Mid-journal corruption is an error, never skipped.
pub fn recover(
    config: IssuerConfig,
    journal: &[u8],
    now_ms: u64,
) -> Result<(Issuer, ScanEnd), RecoveryError> {
    let mut recovery = Recovery::new(config)?;
    let end = scan(journal, |raw| recovery.apply(&raw))?;
    if let ScanEnd::Corrupt { offset, error } = end {
        return Err(RecoveryError::Corrupt { offset, error });
    }
    Ok((recovery.finish(now_ms), end))
}
