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
//! original_order_id : u8 length + bytes (UTF-8) -- red invoices only
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

use crate::invoice::{Invoice, InvoiceKind, IssueRequest, LineItem, RedReference};
use crate::money::TaxRate;
use crate::taxpayer::{InvoiceCode, InvoiceNumber, TaxpayerId, TaxpayerIdError};
use crate::validate::{check_request, IssueError};

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

/// Why bytes are not a canonical invoice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// Fewer bytes than the header, or a length field pointing past the end.
    #[error("truncated canonical invoice")]
    Truncated,
    /// Bytes after the declared body.
    #[error("trailing bytes after the canonical invoice")]
    TrailingBytes,
    /// Larger than [`CANONICAL_BYTES_MAX`].
    #[error("canonical invoice too large")]
    TooLarge,
    /// Magic is not [`CANONICAL_MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// Unknown layout version.
    #[error("unsupported canonical version {0}")]
    BadVersion(u16),
    /// Kind byte neither blue nor red.
    #[error("bad kind {0}")]
    BadKind(u8),
    /// Reserved bytes not zero, or original fields set on a blue invoice.
    #[error("non-zero reserved or unused field")]
    NonZeroReserved,
    /// Invoice code, number or original reference out of range.
    #[error("invoice code or number out of range")]
    BadIdentity,
    /// Rate outside the legal set.
    #[error("illegal tax rate {0} bp")]
    BadRate(u16),
    /// Seller or buyer taxpayer id invalid.
    #[error("bad taxpayer id: {0}")]
    BadTaxpayer(TaxpayerIdError),
    /// A text field is not UTF-8.
    #[error("text field is not UTF-8")]
    BadUtf8,
    /// A line's stored amount differs from quantity × unit price.
    #[error("line amount inconsistent")]
    LineAmount,
    /// The invoice fails validation (bounds, signs, amounts).
    #[error("invalid invoice: {0}")]
    Invalid(IssueError),
}

/// The content of a canonical invoice: everything but the tax server's codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalInvoice {
    /// The request fields.
    pub request: IssueRequest,
    /// Invoice code.
    pub code: InvoiceCode,
    /// Invoice number.
    pub number: InvoiceNumber,
    /// Issue time, ms since the Unix epoch.
    pub issue_time_ms: u64,
}

impl CanonicalInvoice {
    /// Adds the tax server's codes.
    pub fn with_codes(self, tax_control_code: [u8; 32], check_code: [u8; 20]) -> Invoice {
        Invoice {
            request: self.request,
            code: self.code,
            number: self.number,
            issue_time_ms: self.issue_time_ms,
            tax_control_code,
            check_code,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Validated bounds keep every field ≤ 192 bytes.
    debug_assert!(s.len() <= usize::from(u8::MAX));
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Appends the canonical bytes of an invoice's content to `out` and returns their length.
///
/// The request must have passed [`check_request`] (asserted in debug builds): the layout
/// relies on its bounds (u8 lengths, ≤ 16 lines).
pub fn encode_fields(
    request: &IssueRequest,
    code: InvoiceCode,
    number: InvoiceNumber,
    issue_time_ms: u64,
    out: &mut Vec<u8>,
) -> usize {
    debug_assert_eq!(check_request(request), Ok(()));
    let start = out.len();
    let (kind, original_code, original_number) = match &request.kind {
        InvoiceKind::Blue => (KIND_BLUE, 0, 0),
        InvoiceKind::Red(r) => (KIND_RED, r.original_code.get(), r.original_number.get()),
    };
    let header = CanonicalHeader {
        magic: CANONICAL_MAGIC,
        version: U16::new(CANONICAL_VERSION),
        kind,
        line_count: request.lines.len() as u8,
        invoice_code: U64::new(code.get()),
        invoice_number: U32::new(number.get()),
        tax_rate_bp: U16::new(request.tax_rate.bp()),
        reserved: [0; 6],
        issue_time_ms: U64::new(issue_time_ms),
        amount_fen: I64::new(request.amount_fen),
        tax_fen: I64::new(request.tax_fen),
        total_fen: I64::new(request.total_fen),
        seller_taxpayer: *request.seller.as_bytes(),
        buyer_taxpayer: request.buyer_taxpayer.map_or([0; 18], |t| *t.as_bytes()),
        original_code: U64::new(original_code),
        original_number: U32::new(original_number),
        body_len: U32::ZERO,
    };
    out.extend_from_slice(header.as_bytes());
    put_str(out, &request.order_id);
    put_str(out, &request.buyer_name);
    put_str(out, &request.issuer_ref);
    if let InvoiceKind::Red(r) = &request.kind {
        put_str(out, &r.original_order_id);
    }
    for line in &request.lines {
        put_str(out, &line.name);
        out.extend_from_slice(&line.quantity.to_le_bytes());
        out.extend_from_slice(&line.unit_price_fen.to_le_bytes());
        // Validated: the product does not overflow.
        let amount = i64::from(line.quantity).wrapping_mul(line.unit_price_fen);
        out.extend_from_slice(&amount.to_le_bytes());
    }
    let body_len = (out.len() - start - CANONICAL_HEADER_BYTES) as u32;
    // body_len is the last header field.
    out[start + CANONICAL_HEADER_BYTES - 4..start + CANONICAL_HEADER_BYTES]
        .copy_from_slice(&body_len.to_le_bytes());
    let len = out.len() - start;
    assert!(
        len <= CANONICAL_BYTES_MAX,
        "canonical invoice over its bound"
    );
    len
}

/// Canonical bytes of an issued invoice (the codes are not part of them).
pub fn encode(invoice: &Invoice) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    encode_fields(
        &invoice.request,
        invoice.code,
        invoice.number,
        invoice.issue_time_ms,
        &mut out,
    );
    out
}

/// Reads only the fixed header, checking magic, version and the declared length against
/// the bytes given (what the tax server needs to route and authorise an item).
pub fn decode_header(bytes: &[u8]) -> Result<CanonicalHeader, CanonicalError> {
    if bytes.len() > CANONICAL_BYTES_MAX {
        return Err(CanonicalError::TooLarge);
    }
    let (header, rest) =
        CanonicalHeader::read_from_prefix(bytes).map_err(|_| CanonicalError::Truncated)?;
    if header.magic != CANONICAL_MAGIC {
        return Err(CanonicalError::BadMagic);
    }
    if header.version.get() != CANONICAL_VERSION {
        return Err(CanonicalError::BadVersion(header.version.get()));
    }
    let body_len = header.body_len.get() as usize;
    if rest.len() < body_len {
        return Err(CanonicalError::Truncated);
    }
    if rest.len() > body_len {
        return Err(CanonicalError::TrailingBytes);
    }
    Ok(header)
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CanonicalError> {
        if self.rest.len() < n {
            return Err(CanonicalError::Truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn string(&mut self) -> Result<String, CanonicalError> {
        let len = self.take(1)?[0] as usize;
        let bytes = self.take(len)?;
        core::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CanonicalError::BadUtf8)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CanonicalError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// Strict decode: exactly one byte string is accepted per invoice. Rejects trailing
/// bytes, non-zero reserved bytes, invalid identities, rates and taxpayer ids, and
/// anything [`check_request`] rejects. Never panics.
pub fn decode(bytes: &[u8]) -> Result<CanonicalInvoice, CanonicalError> {
    let header = decode_header(bytes)?;
    if header.reserved != [0; 6] {
        return Err(CanonicalError::NonZeroReserved);
    }
    let code =
        InvoiceCode::new(header.invoice_code.get()).map_err(|_| CanonicalError::BadIdentity)?;
    let number =
        InvoiceNumber::new(header.invoice_number.get()).map_err(|_| CanonicalError::BadIdentity)?;
    let tax_rate =
        TaxRate::from_bp(header.tax_rate_bp.get()).map_err(|e| CanonicalError::BadRate(e.0))?;
    let seller =
        TaxpayerId::from_bytes(&header.seller_taxpayer).map_err(CanonicalError::BadTaxpayer)?;
    let buyer_taxpayer = if header.buyer_taxpayer == [0; 18] {
        None
    } else {
        Some(TaxpayerId::from_bytes(&header.buyer_taxpayer).map_err(CanonicalError::BadTaxpayer)?)
    };
    let mut reader = Reader {
        rest: &bytes[CANONICAL_HEADER_BYTES..],
    };
    let order_id = reader.string()?;
    let buyer_name = reader.string()?;
    let issuer_ref = reader.string()?;
    let kind = match header.kind {
        KIND_BLUE => {
            if header.original_code.get() != 0 || header.original_number.get() != 0 {
                return Err(CanonicalError::NonZeroReserved);
            }
            InvoiceKind::Blue
        }
        KIND_RED => InvoiceKind::Red(RedReference {
            original_code: InvoiceCode::new(header.original_code.get())
                .map_err(|_| CanonicalError::BadIdentity)?,
            original_number: InvoiceNumber::new(header.original_number.get())
                .map_err(|_| CanonicalError::BadIdentity)?,
            original_order_id: reader.string()?,
        }),
        other => return Err(CanonicalError::BadKind(other)),
    };
    let line_count = usize::from(header.line_count);
    // The count is a u8, so at most 255 iterations even before validation bounds it.
    let mut lines = Vec::with_capacity(line_count.min(crate::validate::LINES_MAX));
    for _ in 0..line_count {
        let name = reader.string()?;
        let quantity = u32::from_le_bytes(reader.array()?);
        let unit_price_fen = i64::from_le_bytes(reader.array()?);
        let amount_fen = i64::from_le_bytes(reader.array()?);
        if i64::from(quantity).checked_mul(unit_price_fen) != Some(amount_fen) {
            return Err(CanonicalError::LineAmount);
        }
        lines.push(LineItem {
            name,
            quantity,
            unit_price_fen,
        });
    }
    if !reader.rest.is_empty() {
        return Err(CanonicalError::TrailingBytes);
    }
    let request = IssueRequest {
        seller,
        order_id,
        buyer_name,
        buyer_taxpayer,
        lines,
        tax_rate,
        issuer_ref,
        amount_fen: header.amount_fen.get(),
        tax_fen: header.tax_fen.get(),
        total_fen: header.total_fen.get(),
        kind,
    };
    check_request(&request).map_err(CanonicalError::Invalid)?;
    Ok(CanonicalInvoice {
        request,
        code,
        number,
        issue_time_ms: header.issue_time_ms.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::sample_request;

    fn sample_invoice() -> CanonicalInvoice {
        let mut request = sample_request("order-42", 12_345);
        request.buyer_taxpayer = Some(TaxpayerId::parse("91110000600037341L").unwrap());
        CanonicalInvoice {
            request,
            code: InvoiceCode::new(144_031_900_111).unwrap(),
            number: InvoiceNumber::new(1_234).unwrap(),
            issue_time_ms: 1_700_000_000_123,
        }
    }

    fn encode_canonical(c: &CanonicalInvoice) -> Vec<u8> {
        let mut out = Vec::new();
        encode_fields(&c.request, c.code, c.number, c.issue_time_ms, &mut out);
        out
    }

    #[test]
    fn round_trip_blue_and_red() {
        let blue = sample_invoice();
        let bytes = encode_canonical(&blue);
        assert_eq!(decode(&bytes).unwrap(), blue);
        let header = decode_header(&bytes).unwrap();
        assert_eq!(header.invoice_number.get(), 1_234);
        assert_eq!(&header.seller_taxpayer, blue.request.seller.as_bytes());

        let mut red = sample_invoice();
        red.request = sample_request("order-43", -12_345);
        red.request.kind = InvoiceKind::Red(RedReference {
            original_code: blue.code,
            original_number: blue.number,
            original_order_id: "order-42".to_owned(),
        });
        let bytes = encode_canonical(&red);
        assert_eq!(bytes[6], KIND_RED);
        assert_eq!(decode(&bytes).unwrap(), red);
    }

    #[test]
    fn rejects_trailing_truncated_and_reserved() {
        let bytes = encode_canonical(&sample_invoice());
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(CanonicalError::TrailingBytes));
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut reserved = bytes.clone();
        reserved[23] = 1;
        assert_eq!(decode(&reserved), Err(CanonicalError::NonZeroReserved));
        let mut tampered_amount = bytes.clone();
        tampered_amount[37] ^= 1;
        assert!(matches!(
            decode(&tampered_amount),
            Err(CanonicalError::Invalid(_))
        ));
    }

    #[test]
    fn every_single_bit_flip_is_rejected_or_changes_the_invoice() {
        let original = sample_invoice();
        let bytes = encode_canonical(&original);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            if let Ok(decoded) = decode(&b) {
                // Accepted only if it is a different invoice which re-encodes to exactly
                // these bytes (one encoding per invoice).
                assert_ne!(decoded, original, "bit {bit}");
                assert_eq!(encode_canonical(&decoded), b, "bit {bit}");
            }
        }
    }

    #[test]
    fn largest_valid_invoice_fits_the_bound() {
        let mut r = sample_request(&"o".repeat(64), 1);
        r.buyer_name = "b".repeat(192);
        r.issuer_ref = "i".repeat(32);
        r.lines = vec![
            LineItem {
                name: "n".repeat(96),
                quantity: 1,
                unit_price_fen: 1,
            };
            16
        ];
        r.amount_fen = 16;
        r.tax_fen = crate::money::tax_fen(16, r.tax_rate);
        r.total_fen = r.amount_fen + r.tax_fen;
        let c = CanonicalInvoice {
            request: r,
            code: InvoiceCode::new(1).unwrap(),
            number: InvoiceNumber::new(1).unwrap(),
            issue_time_ms: 0,
        };
        let bytes = encode_canonical(&c);
        assert!(bytes.len() < 2560, "{}", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), c);
    }
}
