//! Recovery: rebuilds an [`Issuer`] from its journal records, checking every invariant on
//! the way in (TigerStyle: assert on both sides of the disk).
//!
//! Records are fed in journal order. Recovery rebuilds pool cursors (every issued or
//! spoiled number must be exactly the next number of a reserved segment: a number
//! behind its cursor is used twice, one ahead skips numbers), the idempotency index with
//! each order's journal sequence, red totals (red claims of other shards included), the
//! claims granted to other shards, the next sequence number, the upload watermark and the
//! last batch root.
//!
//! The index is rebuilt with the same expiry as the live issuer: before an order is
//! inserted, orders older than the retention window before its issue time are dropped
//! (the live issuer expired them at the `begin_tick` that issued it, and tick times never
//! go backwards, see `issuer`).

use std::collections::HashSet;

use crate::canonical::CanonicalInvoice;
use crate::idempotency::{issue_time_s, key_fingerprint, request_digest, IndexEntry};
use crate::invoice::InvoiceKind;
use crate::issuer::{ConfigError, Issuer, IssuerConfig};
use crate::journal::frame::{scan, FrameError, RawRecord, ScanEnd, KIND_COMMIT, KIND_PADDING};
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

    /// Applies one record (padding and commit header records are framing and skipped;
    /// scans do not hand commit headers over, but a caller walking records itself might).
    pub fn apply(&mut self, raw: &RawRecord<'_>) -> Result<(), RecoveryError> {
        if raw.kind == KIND_PADDING || raw.kind == KIND_COMMIT {
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
            Record::RedClaimed {
                claim,
                claim_time_ms,
            } => self.issuer.replay_red_claim(seq, &claim, claim_time_ms)?,
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
        // Issue times are non-decreasing in a journal written by this issuer; the max keeps
        // expiry monotonic even for one that is not.
        self.issuer.clock_ms = self.issuer.clock_ms.max(content.issue_time_ms);
        let index = &mut self.issuer.index;
        index.expire(self.issuer.clock_ms);
        let fingerprint = key_fingerprint(&request.seller, &request.order_id);
        if index.get(fingerprint).is_some() {
            return Err(RecoveryError::DuplicateOrder { seq });
        }
        if index.len() >= index.capacity() {
            return Err(RecoveryError::IndexFull { seq });
        }
        index.insert(IndexEntry {
            fingerprint: IndexEntry::split_fingerprint(fingerprint),
            // The same function the live issuer used at begin_tick, over the request
            // decoded from the canonical bytes: equal digests by construction.
            request_digest: request_digest(request),
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
        self.issuer.queued_upload_watermark_seq = self.issuer.upload_watermark_seq;
        self.issuer.queued_batch_root_last_seq = self.issuer.batch_root_last_seq;
        self.issuer.clock_ms = self.issuer.clock_ms.max(now_ms);
        self.issuer.index.expire(self.issuer.clock_ms);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::Invoice;
    use crate::issuer::tests::{config, fake_codes, segment, seller};
    use crate::journal::frame::encode_record;
    use crate::journal::record::RecordKind;
    use crate::taxpayer::InvoiceNumber;
    use crate::validate::tests::sample_request;

    fn live_journal() -> (Issuer, Vec<u8>) {
        live_journal_ticks(4)
    }

    fn live_journal_ticks(ticks: u64) -> (Issuer, Vec<u8>) {
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(1, 20)).unwrap();
        let mut journal = Vec::new();
        for t in 0..ticks {
            let requests: Vec<_> = (0..3)
                .map(|i| sample_request(&format!("o-{t}-{i}"), 100 + i))
                .collect();
            let tick = issuer.begin_tick(1_000 * t, requests).unwrap();
            let mut codes = fake_codes(&tick);
            if t == 2 {
                codes[0] = Err(crate::validate::ItemError::MalformedInvoice);
            }
            issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        }
        (issuer, journal)
    }

    #[test]
    fn recovery_rebuilds_the_same_state() {
        let (live, journal) = live_journal();
        let (recovered, end) = recover(config(), &journal, 3_000).unwrap();
        assert_eq!(end, ScanEnd::Clean { end: journal.len() });
        assert_eq!(recovered.next_seq(), live.next_seq());
        assert_eq!(recovered.accounting(&seller()), live.accounting(&seller()));
        assert_eq!(
            recovered.available_segments(&seller()),
            live.available_segments(&seller())
        );
        let a: Vec<_> = live.index().entries().copied().collect();
        let b: Vec<_> = recovered.index().entries().copied().collect();
        assert_eq!(a, b);
    }

    #[test]
    fn digest_at_issue_equals_digest_at_recovery() {
        // Recovery recomputes each order's request digest from the request decoded out of
        // the journaled canonical invoice; a retry after a restart is only answered as a
        // replay if that equals the digest the live issuer stored at begin_tick.
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(1, 20)).unwrap();
        let mut journal = Vec::new();
        let mut blue = sample_request("blue", 1_000);
        blue.buyer_taxpayer = Some(TaxpayerId::parse("91110000600037341L").unwrap());
        let tick = issuer.begin_tick(1_000, vec![blue.clone()]).unwrap();
        let codes = fake_codes(&tick);
        let commit = issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        let crate::issuer::Answer::Issued { invoice, .. } = &commit.answers[0] else {
            panic!("{:?}", commit.answers[0])
        };
        let mut red = sample_request("red", -100);
        red.kind = InvoiceKind::Red(crate::invoice::RedReference {
            original_code: invoice.code,
            original_number: invoice.number,
            original_order_id: "blue".into(),
        });
        let tick = issuer.begin_tick(2_000, vec![red.clone()]).unwrap();
        let codes = fake_codes(&tick);
        issuer.finish_tick(tick, &codes, &mut journal).unwrap();

        let (mut recovered, _) = recover(config(), &journal, 2_000).unwrap();
        let live: Vec<_> = issuer.index().entries().copied().collect();
        let back: Vec<_> = recovered.index().entries().copied().collect();
        assert_eq!(live.len(), 2);
        assert_eq!(live, back);
        for (entry, request) in back.iter().zip([&blue, &red]) {
            assert_eq!(entry.request_digest, request_digest(request));
        }
        // And the recovered issuer answers the same requests as replays.
        let tick = recovered.begin_tick(3_000, vec![blue, red]).unwrap();
        assert!(tick
            .outcomes()
            .iter()
            .all(|o| matches!(o, crate::issuer::Outcome::Replay { .. })));
        recovered.abort_tick(tick).unwrap();
    }

    #[test]
    fn torn_tail_recovers_the_prefix() {
        let (_, journal) = live_journal();
        let cut = journal.len() - 5;
        let (recovered, end) = recover(config(), &journal[..cut], 0).unwrap();
        assert!(matches!(end, ScanEnd::TornTail { .. }));
        assert_eq!(recovered.accounting(&seller()).unwrap().issued, 10);
    }

    #[test]
    fn a_cut_at_every_byte_of_the_last_tick_recovers_a_prefix() {
        let (live, journal) = live_journal();
        let (_, before) = live_journal_ticks(3);
        let last_start = before.len();
        assert!(journal.starts_with(&before));
        for cut in last_start..=journal.len() {
            let (recovered, end) = recover(config(), &journal[..cut], 0).unwrap();
            let end = match end {
                ScanEnd::Clean { end } | ScanEnd::TornTail { end, .. } => end,
                ScanEnd::Corrupt { .. } => panic!("cut {cut} reported as corruption"),
            };
            // Whole records before the cut survive, nothing else.
            let whole = scan::<()>(&journal[..end], |_| Ok(())).unwrap();
            assert_eq!(whole, ScanEnd::Clean { end });
            let a = recovered.accounting(&seller()).unwrap();
            assert_eq!(a.in_flight, 0);
            assert!(a.issued + a.spoiled <= 12);
            assert_eq!(recovered.index().len() as u64, a.issued);
            if cut == journal.len() {
                assert_eq!(recovered.next_seq(), live.next_seq());
            }
        }
    }

    #[test]
    fn corruption_in_the_middle_is_an_error() {
        let (_, mut journal) = live_journal();
        journal[100] ^= 0x40;
        assert!(matches!(
            recover(config(), &journal, 0),
            Err(RecoveryError::Corrupt { .. })
        ));
    }

    fn invoice(order: &str, number: u32) -> Invoice {
        CanonicalInvoice {
            request: sample_request(order, 100),
            code: segment(1, 1).code,
            number: InvoiceNumber::new(number).unwrap(),
            issue_time_ms: 1_000,
        }
        .with_codes([1; 32], *b"12345678901234567890")
    }

    fn journal_of(records: &[(u64, Record)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, r) in records {
            let mut body = Vec::new();
            r.encode_body(&mut body);
            encode_record(&mut out, r.kind() as u8, *seq, &body);
        }
        out
    }

    fn reserved() -> Record {
        Record::SegmentReserved {
            seller: seller(),
            segment: segment(1, 5),
        }
    }

    #[test]
    fn typed_errors() {
        let gap = journal_of(&[(1, reserved()), (3, Record::Issued(invoice("a", 1)))]);
        assert_eq!(
            recover(config(), &gap, 0).unwrap_err(),
            RecoveryError::SequenceGap {
                expected: 2,
                found: 3
            }
        );
        let outside = journal_of(&[(1, Record::Issued(invoice("a", 1)))]);
        assert!(matches!(
            recover(config(), &outside, 0).unwrap_err(),
            RecoveryError::NumberOutsideReserved { seq: 1, .. }
        ));
        let twice = journal_of(&[
            (1, reserved()),
            (2, Record::Issued(invoice("a", 1))),
            (3, Record::Issued(invoice("b", 1))),
        ]);
        assert!(matches!(
            recover(config(), &twice, 0).unwrap_err(),
            RecoveryError::NumberUsedTwice { seq: 3, .. }
        ));
        let skipped = journal_of(&[(1, reserved()), (2, Record::Issued(invoice("a", 2)))]);
        assert!(matches!(
            recover(config(), &skipped, 0).unwrap_err(),
            RecoveryError::NumberSkipped { seq: 2, .. }
        ));
        let duplicate = journal_of(&[
            (1, reserved()),
            (2, Record::Issued(invoice("a", 1))),
            (3, Record::Issued(invoice("a", 2))),
        ]);
        assert_eq!(
            recover(config(), &duplicate, 0).unwrap_err(),
            RecoveryError::DuplicateOrder { seq: 3 }
        );
        let overlap = journal_of(&[(1, reserved()), (2, reserved())]);
        assert!(matches!(
            recover(config(), &overlap, 0).unwrap_err(),
            RecoveryError::Segment { seq: 2, .. }
        ));
        let mut unknown = Vec::new();
        encode_record(&mut unknown, 42, 1, &[]);
        assert_eq!(
            recover(config(), &unknown, 0).unwrap_err(),
            RecoveryError::UnknownKind { seq: 1, kind: 42 }
        );
        let mut short = Vec::new();
        encode_record(&mut short, RecordKind::SegmentReserved as u8, 1, &[0; 39]);
        assert!(matches!(
            recover(config(), &short, 0).unwrap_err(),
            RecoveryError::InvalidBody { seq: 1, .. }
        ));
        let completed = journal_of(&[(
            1,
            Record::Completed {
                pending_seq: 1,
                tax_control_code: [0; 32],
                check_code: [b'0'; 20],
            },
        )]);
        assert_eq!(
            recover(config(), &completed, 0).unwrap_err(),
            RecoveryError::BadReference { seq: 1 }
        );
        let mut stranger = invoice("a", 1);
        stranger.request.seller = crate::taxpayer::TaxpayerId::parse("91110000600037341L").unwrap();
        let unknown_seller = journal_of(&[(1, reserved()), (2, Record::Issued(stranger))]);
        assert!(matches!(
            recover(config(), &unknown_seller, 0).unwrap_err(),
            RecoveryError::UnknownSeller { seq: 2, .. }
        ));
    }

    #[test]
    fn offline_life_cycle_records_replay() {
        let pending = CanonicalInvoice {
            request: sample_request("p", 100),
            code: segment(1, 1).code,
            number: InvoiceNumber::new(1).unwrap(),
            issue_time_ms: 1_000,
        };
        let journal = journal_of(&[
            (1, reserved()),
            (2, Record::Pending(pending)),
            (
                3,
                Record::Completed {
                    pending_seq: 2,
                    tax_control_code: [0; 32],
                    check_code: [b'0'; 20],
                },
            ),
            (4, Record::Issued(invoice("a", 2))),
            (
                5,
                Record::Voided {
                    issued_seq: 4,
                    identity: crate::invoice::InvoiceIdentity {
                        code: segment(1, 1).code,
                        number: InvoiceNumber::new(2).unwrap(),
                    },
                    void_time_ms: 2_000,
                },
            ),
            (6, Record::UploadedTo { watermark_seq: 5 }),
            (
                7,
                Record::BatchRoot {
                    first_seq: 1,
                    last_seq: 6,
                    root: [0; 32],
                    signature: [0; 64],
                },
            ),
            (
                8,
                Record::SegmentReturned {
                    seller: seller(),
                    segment: segment(3, 3),
                },
            ),
        ]);
        let (issuer, _) = recover(config(), &journal, 1_000).unwrap();
        assert_eq!(issuer.next_seq(), 9);
        assert_eq!(issuer.upload_watermark_seq(), 5);
        assert_eq!(issuer.batch_root_last_seq(), 6);
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.issued, a.returned, a.available), (2, 3, 0));
        assert_eq!(issuer.index().len(), 2);
    }
}
