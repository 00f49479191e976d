//! Canonical invoice bytes: the one byte layout that the tax control code is computed over
//! and that an auditor rebuilds from a printed or exported invoice.
//!
//! Layout v1, little-endian (docs/journal.md and docs/design/foundation.md give the full
//! table): a fixed 112-byte [`CanonicalHeader`] followed by the variable part
//! (`body_len` bytes):
//!
//! ```text
//! order_id   : u8 length + bytes (UTF-8)
//! buyer_name : u8 length + bytes (UTF-8)
//! issuer_ref : u8 length + bytes (UTF-8; station, train or scenic-spot id)
//! line_count times:
//!   name       : u8 length + bytes (UTF-8)
//!   quantity   : u32
//!   unit_price : i64 fen
//!   amount     : i64 fen (= quantity * unit_price)
//! ```
//!
//! Exactly one byte string encodes a given invoice: decoders reject trailing bytes,
//! non-zero reserved fields and anything the validator would reject.

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic at the start of every canonical invoice.
pub const CANONICAL_MAGIC: [u8; 4] = *b"EINV";
/// Layout version written by this build.
pub const CANONICAL_VERSION: u16 = 1;
/// Bytes of [`CanonicalHeader`].
pub const CANONICAL_HEADER_BYTES: usize = 112;
/// Upper bound of a whole canonical invoice, header included; the validator's field
/// bounds keep every valid invoice below it, and the tax server refuses larger items.
pub const CANONICAL_BYTES_MAX: usize = 4096;

/// `kind` of an ordinary (blue) invoice.
pub const KIND_BLUE: u8 = 0;
/// `kind` of a red (negative, offsetting) invoice.
pub const KIND_RED: u8 = 1;

/// Fixed-layout prefix of a canonical invoice. The tax server reads it to check that the
/// number was granted to it and for whom, without parsing the variable part.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CanonicalHeader {
    /// [`CANONICAL_MAGIC`].
    pub magic: [u8; 4],
    /// [`CANONICAL_VERSION`].
    pub version: U16,
    /// [`KIND_BLUE`] or [`KIND_RED`].
    pub kind: u8,
    /// Number of line items (1..=lines limit).
    pub line_count: u8,
    /// Invoice code, 12 decimal digits.
    pub invoice_code: U64,
    /// Invoice number, 8 decimal digits.
    pub invoice_number: U32,
    /// Tax rate in basis points, one of 0, 100, 300, 500, 600, 900, 1300.
    pub tax_rate_bp: U16,
    /// Must be zero; room for later fields without moving the ones after it.
    pub reserved: [u8; 6],
    /// Issue time, milliseconds since the Unix epoch (UTC).
    pub issue_time_ms: U64,
    /// Sum of line amounts, in fen, tax excluded (negative for red invoices).
    pub amount_fen: I64,
    /// Tax in fen: round-half-up(amount x rate), sign following the amount.
    pub tax_fen: I64,
    /// amount + tax, in fen.
    pub total_fen: I64,
    /// Seller's 18-character unified social credit code (ASCII).
    pub seller_taxpayer: [u8; 18],
    /// Buyer's unified social credit code, or 18 zero bytes when absent.
    pub buyer_taxpayer: [u8; 18],
    /// Red invoices: code of the original invoice; zero otherwise.
    pub original_code: U64,
    /// Red invoices: number of the original invoice; zero otherwise.
    pub original_number: U32,
    /// Bytes of the variable part that follows the header.
    pub body_len: U32,
}

const _: () = assert!(core::mem::size_of::<CanonicalHeader>() == CANONICAL_HEADER_BYTES);
