//! Record bodies of every journal record kind, on top of [`super::frame`].
//!
//! Each body is a fixed little-endian layout (zerocopy structs, all alignment 1), and the
//! kinds that carry an invoice add its canonical bytes as a tail. Decoding is strict:
//! exact lengths, zero reserved bytes, valid identities, valid canonical bytes; it never
//! panics on any input. Layouts (bytes):
//!
//! | kind | name             | body                                                                  |
//! |-----:|------------------|-----------------------------------------------------------------------|
//! | 1    | SegmentReserved  | seller 18 · reserved 6 · code u64 · first u32 · count u32 (40)        |
//! | 2    | SegmentReturned  | same as SegmentReserved (40)                                          |
//! | 3    | Issued           | tax code 32 · check code 20 · reserved 8 · canonical_len u32 (64) + canonical |
//! | 4    | Pending          | reserved 4 · canonical_len u32 (8) + canonical (offline, no tax code)  |
//! | 5    | Completed        | pending seq u64 · tax code 32 · check code 20 · reserved 4 (64)       |
//! | 6    | Voided           | issued seq u64 · code u64 · number u32 · reserved 4 · void time ms u64 (32) |
//! | 7    | UploadedTo       | watermark seq u64 (8): every record up to it is uploaded              |
//! | 8    | BatchRoot        | first seq u64 · last seq u64 · Merkle root 32 · SM2 signature 64 (112) |
//! | 9    | NumberSpoiled    | seller 18 · reason u8 · device status u8 · reserved 4 · code u64 · number u32 · reserved 4 (40) |
//! | 10   | RedClaimed       | original key fp 16 · red key fp 16 · original code u64 · original number u32 · reserved 4 · red fen i64 · claim time ms u64 (64) |
//!
//! Who writes what, and what recovery (`replay`) does with it:
//! * SegmentReserved: written first in the commit after `Issuer::add_segment`. Recovery
//!   adds the segment to the seller's pool (overlap with any earlier segment is an error).
//! * SegmentReturned: written after `Issuer::return_unused`; the range is exactly the
//!   unused rest of a segment. Recovery moves those numbers to "returned".
//! * Issued: one per invoice that got its tax code, in take order, with the very bytes the
//!   tax server coded. Recovery requires its number to be the next of its segment (else
//!   used twice / skipped / outside), remembers the order with this record's sequence
//!   number (answers to retries are read back from it with [`decode_issued`]), and adds a
//!   red invoice's |total| to its original.
//! * NumberSpoiled: one per item the tax server refused, and one per number of a tick
//!   aborted after its TaxCodes command was sent (the device may have coded it); the
//!   number is used, never reissued. Recovery applies the same next-number rule.
//! * Pending / Completed (offline issuing, not written by this build's issuer): Pending is
//!   replayed like Issued; Completed must name an uncompleted Pending.
//! * Voided (not written yet): must name an earlier record, at most once.
//! * UploadedTo (`Issuer::queue_uploaded_to`): the watermark never goes back and never
//!   reaches its own record.
//! * BatchRoot (`Issuer::queue_batch_root`): ranges follow each other and end before the
//!   root's own record.
//! * RedClaimed (`Issuer::claim_red`, on the original's shard, written first in the next
//!   commit like the other control records): another shard's red invoice claimed |red
//!   fen| of an original remembered here. Recovery adds the amount to the original's red
//!   total (if the original is still remembered) and remembers the claim by the red's
//!   key, so that a retried claim is not counted twice (docs/design/red-claims.md).
//!
//! Reason bytes of NumberSpoiled: 1 malformed invoice, 2 number not held, 3 unknown
//! taxpayer, 4 other device status (in `device_status`), 5 check code not 20 digits,
//! 6 the TaxCodes command failed as a whole (tick aborted),
//! 7 coded by the device but not in the journal (start-up reconciliation with the device's
//! coded marks, `Issuer::spoil_coded`).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::canonical::{self, CanonicalError, CanonicalInvoice};
use crate::invoice::{Invoice, InvoiceIdentity};
use crate::issuer::red::RedClaim;
use crate::taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};
use crate::validate::ItemError;

/// Record kinds (the frame's `kind` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A number segment granted to this shard; journaled before any of its numbers is
    /// answered.
    SegmentReserved = 1,
    /// Unused numbers given back to the tax authority.
    SegmentReturned = 2,
    /// An issued invoice: canonical bytes and the tax server's codes.
    Issued = 3,
    /// An invoice issued offline: number and content fixed, tax code still to come.
    Pending = 4,
    /// The tax code of a pending invoice.
    Completed = 5,
    /// An invoice voided before it was reported.
    Voided = 6,
    /// Upload watermark: every record up to a sequence number reached the authority.
    UploadedTo = 7,
    /// Signed Merkle root over a range of records (tamper evidence).
    BatchRoot = 8,
    /// A number taken but refused by the tax server: never issued, never reused.
    NumberSpoiled = 9,
    /// A red invoice of another shard claimed part of an original remembered here.
    RedClaimed = 10,
}

impl RecordKind {
    /// The kind of a frame's kind byte, if known.
    pub fn from_u8(kind: u8) -> Option<Self> {
        Some(match kind {
            1 => Self::SegmentReserved,
            2 => Self::SegmentReturned,
            3 => Self::Issued,
            4 => Self::Pending,
            5 => Self::Completed,
            6 => Self::Voided,
            7 => Self::UploadedTo,
            8 => Self::BatchRoot,
            9 => Self::NumberSpoiled,
            10 => Self::RedClaimed,
            _ => return None,
        })
    }
}

/// Body of SegmentReserved and SegmentReturned.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentBody {
    /// Seller taxpayer.
    pub seller: [u8; 18],
    /// Zero.
    pub reserved: [u8; 6],
    /// Invoice code.
    pub code: U64,
    /// First number.
    pub first: U32,
    /// Count of numbers.
    pub count: U32,
}

/// Fixed head of Issued, followed by `canonical_len` canonical bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IssuedHead {
    /// Tax control code.
    pub tax_control_code: [u8; 32],
    /// Check code, 20 ASCII digits.
    pub check_code: [u8; 20],
    /// Zero.
    pub reserved: [u8; 8],
    /// Bytes of the canonical invoice that follows.
    pub canonical_len: U32,
}

/// Fixed head of Pending, followed by `canonical_len` canonical bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PendingHead {
    /// Zero.
    pub reserved: [u8; 4],
    /// Bytes of the canonical invoice that follows.
    pub canonical_len: U32,
}

/// Body of Completed.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CompletedBody {
    /// Sequence number of the Pending record completed.
    pub pending_seq: U64,
    /// Tax control code.
    pub tax_control_code: [u8; 32],
    /// Check code, 20 ASCII digits.
    pub check_code: [u8; 20],
    /// Zero.
    pub reserved: [u8; 4],
}

/// Body of Voided.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VoidedBody {
    /// Sequence number of the Issued (or Pending) record voided.
    pub issued_seq: U64,
    /// Invoice code.
    pub code: U64,
    /// Invoice number.
    pub number: U32,
    /// Zero.
    pub reserved: [u8; 4],
    /// When it was voided, ms since the epoch.
    pub void_time_ms: U64,
}

/// Body of UploadedTo.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct UploadedToBody {
    /// Every record with a sequence number ≤ this one has been uploaded.
    pub watermark_seq: U64,
}

/// Body of BatchRoot.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BatchRootBody {
    /// First sequence number covered.
    pub first_seq: U64,
    /// Last sequence number covered.
    pub last_seq: U64,
    /// Merkle root over the records first..=last.
    pub root: [u8; 32],
    /// SM2 signature r ‖ s of the tax server over the root.
    pub signature: [u8; 64],
}

/// Body of NumberSpoiled.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SpoiledBody {
    /// Seller taxpayer.
    pub seller: [u8; 18],
    /// Why: 1 malformed, 2 number not held, 3 unknown taxpayer, 4 device status, 5 bad
    /// check code.
    pub reason: u8,
    /// Device status for reason 4, else zero.
    pub device_status: u8,
    /// Zero.
    pub reserved: [u8; 4],
    /// Invoice code.
    pub code: U64,
    /// Invoice number.
    pub number: U32,
    /// Zero.
    pub reserved2: [u8; 4],
}

/// Body of RedClaimed.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RedClaimedBody {
    /// Key fingerprint of the original order, low half first.
    pub original_fingerprint: [U64; 2],
    /// Key fingerprint of the red order, low half first.
    pub red_fingerprint: [U64; 2],
    /// Invoice code of the original.
    pub original_code: U64,
    /// Invoice number of the original.
    pub original_number: U32,
    /// Zero.
    pub reserved: [u8; 4],
    /// |total| of the red invoice, fen, > 0.
    pub red_fen: zerocopy::little_endian::I64,
    /// When the claim was granted, ms since the epoch.
    pub claim_time_ms: U64,
}

const _: () = {
    assert!(core::mem::size_of::<RedClaimedBody>() == 64);
    assert!(core::mem::size_of::<SegmentBody>() == 40);
    assert!(core::mem::size_of::<IssuedHead>() == 64);
    assert!(core::mem::size_of::<PendingHead>() == 8);
    assert!(core::mem::size_of::<CompletedBody>() == 64);
    assert!(core::mem::size_of::<VoidedBody>() == 32);
    assert!(core::mem::size_of::<UploadedToBody>() == 8);
    assert!(core::mem::size_of::<BatchRootBody>() == 112);
    assert!(core::mem::size_of::<SpoiledBody>() == 40);
};

/// A decoded record body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// See [`RecordKind::SegmentReserved`].
    SegmentReserved {
        /// Seller.
        seller: TaxpayerId,
        /// The segment.
        segment: NumberSegment,
    },
    /// See [`RecordKind::SegmentReturned`].
    SegmentReturned {
        /// Seller.
        seller: TaxpayerId,
        /// The returned numbers.
        segment: NumberSegment,
    },
    /// See [`RecordKind::Issued`].
    Issued(Invoice),
    /// See [`RecordKind::Pending`].
    Pending(CanonicalInvoice),
    /// See [`RecordKind::Completed`].
    Completed {
        /// Sequence number of the Pending record.
        pending_seq: u64,
        /// Tax control code.
        tax_control_code: [u8; 32],
        /// Check code.
        check_code: [u8; 20],
    },
    /// See [`RecordKind::Voided`].
    Voided {
        /// Sequence number of the invoice's record.
        issued_seq: u64,
        /// The invoice.
        identity: InvoiceIdentity,
        /// When.
        void_time_ms: u64,
    },
    /// See [`RecordKind::UploadedTo`].
    UploadedTo {
        /// Upload watermark.
        watermark_seq: u64,
    },
    /// See [`RecordKind::BatchRoot`].
    BatchRoot {
        /// First sequence number covered.
        first_seq: u64,
        /// Last sequence number covered.
        last_seq: u64,
        /// Merkle root.
        root: [u8; 32],
        /// SM2 signature.
        signature: [u8; 64],
    },
    /// See [`RecordKind::NumberSpoiled`].
    NumberSpoiled {
        /// Seller.
        seller: TaxpayerId,
        /// The number.
        identity: InvoiceIdentity,
        /// Why the tax server refused it.
        reason: ItemError,
    },
    /// See [`RecordKind::RedClaimed`].
    RedClaimed {
        /// The claim.
        claim: RedClaim,
        /// When it was granted, ms since the epoch.
        claim_time_ms: u64,
    },
}

/// Why a record body is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Unknown kind byte.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// Body length wrong for its kind.
    #[error("record body of kind {kind} has bad length {len}")]
    BadLength {
        /// Kind byte.
        kind: u8,
        /// Body length.
        len: usize,
    },
    /// Reserved bytes not zero.
    #[error("non-zero reserved bytes")]
    NonZeroReserved,
    /// Seller taxpayer id invalid.
    #[error("bad taxpayer id")]
    BadTaxpayer,
    /// Invoice code, number or segment out of range.
    #[error("bad invoice code, number or segment")]
    BadIdentity,
    /// Check code not 20 ASCII digits.
    #[error("bad check code")]
    BadCheckCode,
    /// Spoil reason unknown.
    #[error("bad spoil reason")]
    BadReason,
    /// Sequence range empty or inverted.
    #[error("bad sequence range")]
    BadSeqRange,
    /// A red claim of no amount, or a negative one.
    #[error("bad red claim amount")]
    BadRedAmount,
    /// Canonical bytes invalid.
    #[error("canonical invoice: {0}")]
    Canonical(CanonicalError),
    /// The record is a valid record of another kind than the caller needs.
    #[error("record is of kind {0}, not the one expected")]
    WrongKind(u8),
}

/// Whether a check code is 20 ASCII digits.
pub fn is_check_code(check_code: &[u8; 20]) -> bool {
    check_code.iter().all(u8::is_ascii_digit)
}

fn reason_to_bytes(reason: ItemError) -> (u8, u8) {
    match reason {
        ItemError::MalformedInvoice => (1, 0),
        ItemError::NumberNotHeld => (2, 0),
        ItemError::UnknownTaxpayer => (3, 0),
        ItemError::Device(status) => (4, status),
        ItemError::InvalidCheckCode => (5, 0),
        ItemError::CommandFailed => (6, 0),
        ItemError::CodedNotJournaled => (7, 0),
    }
}

fn reason_from_bytes(reason: u8, status: u8) -> Result<ItemError, RecordError> {
    Ok(match (reason, status) {
        (1, 0) => ItemError::MalformedInvoice,
        (2, 0) => ItemError::NumberNotHeld,
        (3, 0) => ItemError::UnknownTaxpayer,
        (4, s) => ItemError::Device(s),
        (5, 0) => ItemError::InvalidCheckCode,
        (6, 0) => ItemError::CommandFailed,
        (7, 0) => ItemError::CodedNotJournaled,
        _ => return Err(RecordError::BadReason),
    })
}

/// Appends an Issued body given already-encoded canonical bytes (the issuer's fast path:
/// the bytes the tax server saw are the bytes journaled).
pub fn encode_issued(
    canonical: &[u8],
    tax_control_code: &[u8; 32],
    check_code: &[u8; 20],
    out: &mut Vec<u8>,
) {
    assert!(canonical.len() <= canonical::CANONICAL_BYTES_MAX);
    let head = IssuedHead {
        tax_control_code: *tax_control_code,
        check_code: *check_code,
        reserved: [0; 8],
        canonical_len: U32::new(canonical.len() as u32),
    };
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(canonical);
}

fn segment_body(seller: &TaxpayerId, segment: &NumberSegment) -> SegmentBody {
    SegmentBody {
        seller: *seller.as_bytes(),
        reserved: [0; 6],
        code: U64::new(segment.code.get()),
        first: U32::new(segment.first.get()),
        count: U32::new(segment.count),
    }
}

impl Record {
    /// The kind of this record.
    pub fn kind(&self) -> RecordKind {
        match self {
            Self::SegmentReserved { .. } => RecordKind::SegmentReserved,
            Self::SegmentReturned { .. } => RecordKind::SegmentReturned,
            Self::Issued(_) => RecordKind::Issued,
            Self::Pending(_) => RecordKind::Pending,
            Self::Completed { .. } => RecordKind::Completed,
            Self::Voided { .. } => RecordKind::Voided,
            Self::UploadedTo { .. } => RecordKind::UploadedTo,
            Self::BatchRoot { .. } => RecordKind::BatchRoot,
            Self::NumberSpoiled { .. } => RecordKind::NumberSpoiled,
            Self::RedClaimed { .. } => RecordKind::RedClaimed,
        }
    }

    /// Appends the body bytes to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Self::SegmentReserved { seller, segment }
            | Self::SegmentReturned { seller, segment } => {
                out.extend_from_slice(segment_body(seller, segment).as_bytes())
            }
            Self::Issued(invoice) => encode_issued(
                &canonical::encode(invoice),
                &invoice.tax_control_code,
                &invoice.check_code,
                out,
            ),
            Self::Pending(c) => {
                let start = out.len();
                out.extend_from_slice(
                    PendingHead {
                        reserved: [0; 4],
                        canonical_len: U32::ZERO,
                    }
                    .as_bytes(),
                );
                let len =
                    canonical::encode_fields(&c.request, c.code, c.number, c.issue_time_ms, out);
                out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
            }
            Self::Completed {
                pending_seq,
                tax_control_code,
                check_code,
            } => out.extend_from_slice(
                CompletedBody {
                    pending_seq: U64::new(*pending_seq),
                    tax_control_code: *tax_control_code,
                    check_code: *check_code,
                    reserved: [0; 4],
                }
                .as_bytes(),
            ),
            Self::Voided {
                issued_seq,
                identity,
                void_time_ms,
            } => out.extend_from_slice(
                VoidedBody {
                    issued_seq: U64::new(*issued_seq),
                    code: U64::new(identity.code.get()),
                    number: U32::new(identity.number.get()),
                    reserved: [0; 4],
                    void_time_ms: U64::new(*void_time_ms),
                }
                .as_bytes(),
            ),
            Self::UploadedTo { watermark_seq } => out.extend_from_slice(
                UploadedToBody {
                    watermark_seq: U64::new(*watermark_seq),
                }
                .as_bytes(),
            ),
            Self::BatchRoot {
                first_seq,
                last_seq,
                root,
                signature,
            } => out.extend_from_slice(
                BatchRootBody {
                    first_seq: U64::new(*first_seq),
                    last_seq: U64::new(*last_seq),
                    root: *root,
                    signature: *signature,
                }
                .as_bytes(),
            ),
            Self::NumberSpoiled {
                seller,
                identity,
                reason,
            } => {
                let (reason, device_status) = reason_to_bytes(*reason);
                out.extend_from_slice(
                    SpoiledBody {
                        seller: *seller.as_bytes(),
                        reason,
                        device_status,
                        reserved: [0; 4],
                        code: U64::new(identity.code.get()),
                        number: U32::new(identity.number.get()),
                        reserved2: [0; 4],
                    }
                    .as_bytes(),
                )
            }
            Self::RedClaimed {
                claim,
                claim_time_ms,
            } => {
                let split = |f: u128| [U64::new(f as u64), U64::new((f >> 64) as u64)];
                out.extend_from_slice(
                    RedClaimedBody {
                        original_fingerprint: split(claim.original_fingerprint),
                        red_fingerprint: split(claim.red_fingerprint),
                        original_code: U64::new(claim.original.code.get()),
                        original_number: U32::new(claim.original.number.get()),
                        reserved: [0; 4],
                        red_fen: zerocopy::little_endian::I64::new(claim.red_fen),
                        claim_time_ms: U64::new(*claim_time_ms),
                    }
                    .as_bytes(),
                )
            }
        }
    }

    /// Strictly decodes a body of the given kind byte.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, RecordError> {
        let known = RecordKind::from_u8(kind).ok_or(RecordError::UnknownKind(kind))?;
        let bad_len = || RecordError::BadLength {
            kind,
            len: body.len(),
        };
        Ok(match known {
            RecordKind::SegmentReserved | RecordKind::SegmentReturned => {
                let b = SegmentBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.reserved != [0; 6] {
                    return Err(RecordError::NonZeroReserved);
                }
                let seller =
                    TaxpayerId::from_bytes(&b.seller).map_err(|_| RecordError::BadTaxpayer)?;
                let segment = NumberSegment::new(
                    InvoiceCode::new(b.code.get()).map_err(|_| RecordError::BadIdentity)?,
                    InvoiceNumber::new(b.first.get()).map_err(|_| RecordError::BadIdentity)?,
                    b.count.get(),
                )
                .map_err(|_| RecordError::BadIdentity)?;
                if known == RecordKind::SegmentReserved {
                    Self::SegmentReserved { seller, segment }
                } else {
                    Self::SegmentReturned { seller, segment }
                }
            }
            RecordKind::Issued => Self::Issued(decode_issued(body)?),
            RecordKind::Pending => {
                let (head, rest) = PendingHead::read_from_prefix(body).map_err(|_| bad_len())?;
                if head.reserved != [0; 4] {
                    return Err(RecordError::NonZeroReserved);
                }
                if head.canonical_len.get() as usize != rest.len() {
                    return Err(bad_len());
                }
                Self::Pending(canonical::decode(rest).map_err(RecordError::Canonical)?)
            }
            RecordKind::Completed => {
                let b = CompletedBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.reserved != [0; 4] {
                    return Err(RecordError::NonZeroReserved);
                }
                if !is_check_code(&b.check_code) {
                    return Err(RecordError::BadCheckCode);
                }
                Self::Completed {
                    pending_seq: b.pending_seq.get(),
                    tax_control_code: b.tax_control_code,
                    check_code: b.check_code,
                }
            }
            RecordKind::Voided => {
                let b = VoidedBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.reserved != [0; 4] {
                    return Err(RecordError::NonZeroReserved);
                }
                Self::Voided {
                    issued_seq: b.issued_seq.get(),
                    identity: identity(b.code.get(), b.number.get())?,
                    void_time_ms: b.void_time_ms.get(),
                }
            }
            RecordKind::UploadedTo => {
                let b = UploadedToBody::read_from_bytes(body).map_err(|_| bad_len())?;
                Self::UploadedTo {
                    watermark_seq: b.watermark_seq.get(),
                }
            }
            RecordKind::BatchRoot => {
                let b = BatchRootBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.first_seq.get() == 0 || b.first_seq.get() > b.last_seq.get() {
                    return Err(RecordError::BadSeqRange);
                }
                Self::BatchRoot {
                    first_seq: b.first_seq.get(),
                    last_seq: b.last_seq.get(),
                    root: b.root,
                    signature: b.signature,
                }
            }
            RecordKind::NumberSpoiled => {
                let b = SpoiledBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.reserved != [0; 4] || b.reserved2 != [0; 4] {
                    return Err(RecordError::NonZeroReserved);
                }
                Self::NumberSpoiled {
                    seller: TaxpayerId::from_bytes(&b.seller)
                        .map_err(|_| RecordError::BadTaxpayer)?,
                    identity: identity(b.code.get(), b.number.get())?,
                    reason: reason_from_bytes(b.reason, b.device_status)?,
                }
            }
            RecordKind::RedClaimed => {
                let b = RedClaimedBody::read_from_bytes(body).map_err(|_| bad_len())?;
                if b.reserved != [0; 4] {
                    return Err(RecordError::NonZeroReserved);
                }
                let join = |f: [U64; 2]| u128::from(f[0].get()) | (u128::from(f[1].get()) << 64);
                if b.red_fen.get() <= 0 {
                    return Err(RecordError::BadRedAmount);
                }
                Self::RedClaimed {
                    claim: RedClaim {
                        original_fingerprint: join(b.original_fingerprint),
                        original: identity(b.original_code.get(), b.original_number.get())?,
                        red_fingerprint: join(b.red_fingerprint),
                        red_fen: b.red_fen.get(),
                    },
                    claim_time_ms: b.claim_time_ms.get(),
                }
            }
        })
    }
}

fn identity(code: u64, number: u32) -> Result<InvoiceIdentity, RecordError> {
    Ok(InvoiceIdentity {
        code: InvoiceCode::new(code).map_err(|_| RecordError::BadIdentity)?,
        number: InvoiceNumber::new(number).map_err(|_| RecordError::BadIdentity)?,
    })
}

/// Decodes the body of an Issued record into the invoice, to answer a replay from the
/// journal record at the sequence number the idempotency index holds.
pub fn decode_issued(body: &[u8]) -> Result<Invoice, RecordError> {
    let (head, rest) = IssuedHead::read_from_prefix(body).map_err(|_| RecordError::BadLength {
        kind: RecordKind::Issued as u8,
        len: body.len(),
    })?;
    if head.reserved != [0; 8] {
        return Err(RecordError::NonZeroReserved);
    }
    if head.canonical_len.get() as usize != rest.len() {
        return Err(RecordError::BadLength {
            kind: RecordKind::Issued as u8,
            len: body.len(),
        });
    }
    if !is_check_code(&head.check_code) {
        return Err(RecordError::BadCheckCode);
    }
    let content = canonical::decode(rest).map_err(RecordError::Canonical)?;
    Ok(content.with_codes(head.tax_control_code, head.check_code))
}

/// The canonical bytes inside an Issued body, without decoding them (for upload).
pub fn issued_canonical_bytes(body: &[u8]) -> Result<&[u8], RecordError> {
    let (head, rest) = IssuedHead::ref_from_prefix(body).map_err(|_| RecordError::BadLength {
        kind: RecordKind::Issued as u8,
        len: body.len(),
    })?;
    if head.canonical_len.get() as usize != rest.len() {
        return Err(RecordError::BadLength {
            kind: RecordKind::Issued as u8,
            len: body.len(),
        });
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::sample_request;

    fn id(code: u64, number: u32) -> InvoiceIdentity {
        identity(code, number).unwrap()
    }

    pub(crate) fn samples() -> Vec<Record> {
        let seller = TaxpayerId::parse("91350100M000100Y43").unwrap();
        let segment = NumberSegment::new(
            InvoiceCode::new(144_031_900_111).unwrap(),
            InvoiceNumber::new(1).unwrap(),
            1000,
        )
        .unwrap();
        let content = CanonicalInvoice {
            request: sample_request("o-1", 1234),
            code: segment.code,
            number: segment.first,
            issue_time_ms: 1_700_000_000_000,
        };
        vec![
            Record::SegmentReserved { seller, segment },
            Record::SegmentReturned { seller, segment },
            Record::Issued(
                content
                    .clone()
                    .with_codes([7; 32], *b"01234567890123456789"),
            ),
            Record::Pending(content),
            Record::Completed {
                pending_seq: 9,
                tax_control_code: [3; 32],
                check_code: *b"99999999999999999999",
            },
            Record::Voided {
                issued_seq: 5,
                identity: id(1, 2),
                void_time_ms: 77,
            },
            Record::UploadedTo { watermark_seq: 42 },
            Record::BatchRoot {
                first_seq: 1,
                last_seq: 100,
                root: [1; 32],
                signature: [2; 64],
            },
            Record::NumberSpoiled {
                seller,
                identity: id(1, 3),
                reason: ItemError::Device(17),
            },
            Record::RedClaimed {
                claim: RedClaim {
                    original_fingerprint: u128::MAX - 5,
                    original: id(7, 8),
                    red_fingerprint: 1 << 100 | 3,
                    red_fen: 1_234,
                },
                claim_time_ms: 99,
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_and_truncation_is_rejected() {
        for record in samples() {
            let mut body = Vec::new();
            record.encode_body(&mut body);
            let kind = record.kind() as u8;
            assert_eq!(Record::decode(kind, &body).as_ref(), Ok(&record));
            for cut in 0..body.len() {
                assert!(
                    Record::decode(kind, &body[..cut]).is_err(),
                    "{kind} cut {cut}"
                );
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(Record::decode(kind, &longer).is_err(), "{kind} longer");
        }
        assert_eq!(Record::decode(0, &[]), Err(RecordError::UnknownKind(0)));
        assert_eq!(Record::decode(11, &[]), Err(RecordError::UnknownKind(11)));
    }

    #[test]
    fn issued_helpers() {
        let record = &samples()[2];
        let mut body = Vec::new();
        record.encode_body(&mut body);
        let Record::Issued(invoice) = record else {
            unreachable!()
        };
        assert_eq!(&decode_issued(&body).unwrap(), invoice);
        assert_eq!(
            issued_canonical_bytes(&body).unwrap(),
            canonical::encode(invoice)
        );
        let mut bad = body.clone();
        bad[40] = b'x';
        assert_eq!(decode_issued(&bad), Err(RecordError::BadCheckCode));
        let mut bad = body;
        bad[55] = 1;
        assert_eq!(decode_issued(&bad), Err(RecordError::NonZeroReserved));
    }

    #[test]
    fn reserved_bytes_and_reasons_are_strict() {
        let mut body = Vec::new();
        samples()[8].encode_body(&mut body);
        let mut bad = body.clone();
        bad[18] = 9;
        assert_eq!(Record::decode(9, &bad), Err(RecordError::BadReason));
        let mut bad = body.clone();
        bad[18] = 1; // malformed with a device status
        assert_eq!(Record::decode(9, &bad), Err(RecordError::BadReason));
        let mut bad = body;
        bad[20] = 1;
        assert_eq!(Record::decode(9, &bad), Err(RecordError::NonZeroReserved));
    }
}
