//! Stateless validation of an [`IssueRequest`]: field bounds, signs and exact amounts.
//! Rules that need state (seller known, ceiling, red original, idempotency, numbers) are
//! checked by the issuer, but every reason to refuse a request is one [`IssueError`].

use crate::invoice::{InvoiceKind, IssueRequest};
use crate::money::tax_fen;

/// Order id bytes, inclusive bounds.
pub const ORDER_ID_BYTES_MIN: usize = 1;
/// Order id bytes, upper bound.
pub const ORDER_ID_BYTES_MAX: usize = 64;
/// Buyer name bytes, lower bound.
pub const BUYER_NAME_BYTES_MIN: usize = 1;
/// Buyer name bytes, upper bound.
pub const BUYER_NAME_BYTES_MAX: usize = 192;
/// Issuer reference bytes, upper bound (may be empty).
pub const ISSUER_REF_BYTES_MAX: usize = 32;
/// Line name bytes, lower bound.
pub const LINE_NAME_BYTES_MIN: usize = 1;
/// Line name bytes, upper bound.
pub const LINE_NAME_BYTES_MAX: usize = 96;
/// Lines per invoice, lower bound.
pub const LINES_MIN: usize = 1;
/// Lines per invoice, upper bound.
pub const LINES_MAX: usize = 16;

/// Which text field is out of bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `order_id`.
    OrderId,
    /// `buyer_name`.
    BuyerName,
    /// `issuer_ref`.
    IssuerRef,
    /// A line's `name` (line index).
    LineName(u8),
    /// The red reference's `original_order_id`.
    OriginalOrderId,
}

/// Why one invoice did not get a tax code: the per-item status of the TaxCodes command
/// (the shell maps the driver's statuses onto it), or [`ItemError::CommandFailed`] when
/// the command failed as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    /// The device could not parse the canonical invoice.
    #[error("tax server: malformed invoice")]
    MalformedInvoice,
    /// The number is not in a segment the device granted to this holder.
    #[error("tax server: number not held")]
    NumberNotHeld,
    /// The device does not serve the seller.
    #[error("tax server: unknown taxpayer")]
    UnknownTaxpayer,
    /// Any other device status.
    #[error("tax server: status {0}")]
    Device(u8),
    /// The device answered a check code that is not 20 ASCII digits.
    #[error("tax server: invalid check code")]
    InvalidCheckCode,
    /// The TaxCodes command failed as a whole (timeout, connection lost, wrong answer)
    /// and its tick was aborted. The device may still have coded the invoice, so its
    /// number is spoiled like a refused one.
    #[error("tax server: command failed, tick aborted (its numbers are spoiled)")]
    CommandFailed,
    /// Found at start-up: the device reports the number as coded (below its segment's
    /// coded mark) but the journal holds no invoice for it (a crash between the tax codes
    /// and the commit, or a damaged last commit dropped at recovery). Spoiled so that the
    /// number is never coded again for another invoice.
    #[error("tax server coded the number, the journal holds no invoice for it")]
    CodedNotJournaled,
}

/// Every reason an issue request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// A text field is too short or too long (bytes of UTF-8).
    #[error("{field:?} has {len} bytes, outside its bounds")]
    FieldLength {
        /// The field.
        field: Field,
        /// Its length in bytes.
        len: usize,
    },
    /// No lines or more than [`LINES_MAX`].
    #[error("invoice has {0} lines; 1..=16 allowed")]
    LineCount(usize),
    /// A line with quantity zero.
    #[error("line {0} has quantity zero")]
    QuantityZero(u8),
    /// A line price of the wrong sign for the kind (blue: ≥ 0, red: < 0).
    #[error("line {0} price has the wrong sign for the invoice kind")]
    LineSign(u8),
    /// quantity × unit price or the sum of lines overflows i64.
    #[error("amount overflows")]
    AmountOverflow,
    /// A blue invoice whose amount is zero: nothing to invoice.
    #[error("blue invoice with zero amount")]
    EmptyInvoice,
    /// Declared amount differs from Σ line amounts.
    #[error("declared amount {declared_fen} fen, lines sum to {computed_fen}")]
    AmountMismatch {
        /// Declared.
        declared_fen: i64,
        /// Computed.
        computed_fen: i64,
    },
    /// Declared tax differs from the computed tax.
    #[error("declared tax {declared_fen} fen, computed {computed_fen}")]
    TaxMismatch {
        /// Declared.
        declared_fen: i64,
        /// Computed.
        computed_fen: i64,
    },
    /// Declared total differs from amount + tax.
    #[error("declared total {declared_fen} fen, computed {computed_fen}")]
    TotalMismatch {
        /// Declared.
        declared_fen: i64,
        /// Computed.
        computed_fen: i64,
    },
    /// The seller is not a taxpayer served by this shard.
    #[error("unknown seller")]
    UnknownSeller,
    /// |total| above the seller's single-invoice ceiling.
    #[error("total {total_fen} fen above the ceiling {ceiling_fen}")]
    CeilingExceeded {
        /// |total| of the request.
        total_fen: i64,
        /// The seller's ceiling.
        ceiling_fen: i64,
    },
    /// The red invoice's original order is not in this shard's idempotency index.
    #[error("original invoice of the red invoice is unknown")]
    RedOriginalUnknown,
    /// The original order's invoice has another code or number.
    #[error("original order was issued under another code or number")]
    RedOriginalMismatch,
    /// The original is itself red.
    #[error("a red invoice cannot offset a red invoice")]
    RedOfRed,
    /// Σ |red totals| would exceed the original's total.
    #[error("red total {red_fen} fen exceeds what remains of the original ({remaining_fen})")]
    RedExceedsOriginal {
        /// |total| of this red invoice.
        red_fen: i64,
        /// Original total minus the reds already issued against it.
        remaining_fen: i64,
    },
    /// The order was already issued from a different request.
    #[error("order already issued with different content")]
    IdempotencyConflict,
    /// The idempotency index is at capacity with nothing old enough to expire. Retrying
    /// does not help until orders expire; the operator must raise
    /// `limits.index_capacity_orders` (docs/operations.md gives the sizing rule).
    #[error("idempotency index full: raise limits.index_capacity_orders (docs/operations.md)")]
    IndexFull,
    /// The seller's pool has no number left (a refill was requested).
    #[error("no invoice numbers available")]
    NoNumbersAvailable,
    /// The tax server refused this invoice; its number was spoiled (journaled, never
    /// reused).
    #[error("tax code refused: {0}")]
    TaxCodeRefused(ItemError),
    /// A red invoice whose original lives on another shard: that shard could not confirm
    /// the claim on the original (it stopped, or too many reds wait for claims). Nothing
    /// was issued; retrying is safe.
    #[error("the shard holding the original could not confirm the red claim")]
    RedClaimUnavailable,
}

fn check_len(field: Field, len: usize, min: usize, max: usize) -> Result<(), IssueError> {
    if len < min || len > max {
        return Err(IssueError::FieldLength { field, len });
    }
    Ok(())
}

/// Σ quantity × unit price with checked arithmetic.
pub fn lines_amount_fen(request: &IssueRequest) -> Result<i64, IssueError> {
    let mut sum = 0i64;
    for line in &request.lines {
        let amount = i64::from(line.quantity)
            .checked_mul(line.unit_price_fen)
            .ok_or(IssueError::AmountOverflow)?;
        sum = sum.checked_add(amount).ok_or(IssueError::AmountOverflow)?;
    }
    Ok(sum)
}

/// Checks everything that needs no state: bounds, signs, exact amount, tax and total.
pub fn check_request(request: &IssueRequest) -> Result<(), IssueError> {
    check_len(
        Field::OrderId,
        request.order_id.len(),
        ORDER_ID_BYTES_MIN,
        ORDER_ID_BYTES_MAX,
    )?;
    check_len(
        Field::BuyerName,
        request.buyer_name.len(),
        BUYER_NAME_BYTES_MIN,
        BUYER_NAME_BYTES_MAX,
    )?;
    check_len(
        Field::IssuerRef,
        request.issuer_ref.len(),
        0,
        ISSUER_REF_BYTES_MAX,
    )?;
    if request.lines.len() < LINES_MIN || request.lines.len() > LINES_MAX {
        return Err(IssueError::LineCount(request.lines.len()));
    }
    let red = match &request.kind {
        InvoiceKind::Blue => false,
        InvoiceKind::Red(reference) => {
            check_len(
                Field::OriginalOrderId,
                reference.original_order_id.len(),
                ORDER_ID_BYTES_MIN,
                ORDER_ID_BYTES_MAX,
            )?;
            true
        }
    };
    for (i, line) in request.lines.iter().enumerate() {
        // i < LINES_MAX = 16, fits in u8.
        let index = i as u8;
        check_len(
            Field::LineName(index),
            line.name.len(),
            LINE_NAME_BYTES_MIN,
            LINE_NAME_BYTES_MAX,
        )?;
        if line.quantity == 0 {
            return Err(IssueError::QuantityZero(index));
        }
        let sign_ok = if red {
            line.unit_price_fen < 0
        } else {
            line.unit_price_fen >= 0
        };
        if !sign_ok {
            return Err(IssueError::LineSign(index));
        }
    }
    let amount_fen = lines_amount_fen(request)?;
    if !red && amount_fen == 0 {
        return Err(IssueError::EmptyInvoice);
    }
    if amount_fen != request.amount_fen {
        return Err(IssueError::AmountMismatch {
            declared_fen: request.amount_fen,
            computed_fen: amount_fen,
        });
    }
    let tax = tax_fen(amount_fen, request.tax_rate);
    if tax != request.tax_fen {
        return Err(IssueError::TaxMismatch {
            declared_fen: request.tax_fen,
            computed_fen: tax,
        });
    }
    let total = amount_fen
        .checked_add(tax)
        .ok_or(IssueError::AmountOverflow)?;
    if total != request.total_fen {
        return Err(IssueError::TotalMismatch {
            declared_fen: request.total_fen,
            computed_fen: total,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::invoice::{LineItem, RedReference};
    use crate::money::TaxRate;
    use crate::taxpayer::{InvoiceCode, InvoiceNumber, TaxpayerId};

    /// A valid blue request used by tests across the crate.
    pub(crate) fn sample_request(order_id: &str, unit_price_fen: i64) -> IssueRequest {
        let rate = TaxRate::from_bp(900).unwrap();
        // Wrapping so that tests can build overflowing requests on purpose.
        let amount = unit_price_fen.wrapping_mul(3);
        let tax = crate::money::tax_fen(amount, rate);
        IssueRequest {
            seller: TaxpayerId::parse("91350100M000100Y43").unwrap(),
            order_id: order_id.to_owned(),
            buyer_name: "张三".to_owned(),
            buyer_taxpayer: None,
            lines: vec![LineItem {
                name: "G1234 北京南-上海虹桥 二等座".to_owned(),
                quantity: 3,
                unit_price_fen,
            }],
            tax_rate: rate,
            issuer_ref: "G1234".to_owned(),
            amount_fen: amount,
            tax_fen: tax,
            total_fen: amount.wrapping_add(tax),
            kind: InvoiceKind::Blue,
        }
    }

    #[test]
    fn sample_is_valid() {
        check_request(&sample_request("o-1", 55_350)).unwrap();
    }

    #[test]
    fn mismatches_are_typed() {
        let mut r = sample_request("o-1", 100);
        r.amount_fen += 1;
        assert!(matches!(
            check_request(&r),
            Err(IssueError::AmountMismatch { .. })
        ));
        let mut r = sample_request("o-1", 100);
        r.tax_fen += 1;
        assert!(matches!(
            check_request(&r),
            Err(IssueError::TaxMismatch { .. })
        ));
        let mut r = sample_request("o-1", 100);
        r.total_fen += 1;
        assert!(matches!(
            check_request(&r),
            Err(IssueError::TotalMismatch { .. })
        ));
    }

    #[test]
    fn bounds() {
        let r = sample_request("", 100);
        assert!(matches!(
            check_request(&r),
            Err(IssueError::FieldLength {
                field: Field::OrderId,
                len: 0
            })
        ));
        let r = sample_request(&"x".repeat(65), 100);
        assert!(matches!(
            check_request(&r),
            Err(IssueError::FieldLength { .. })
        ));
        let mut r = sample_request("o", 100);
        r.lines.clear();
        assert_eq!(check_request(&r), Err(IssueError::LineCount(0)));
        let mut r = sample_request("o", 100);
        r.lines = vec![r.lines[0].clone(); 17];
        assert_eq!(check_request(&r), Err(IssueError::LineCount(17)));
        let mut r = sample_request("o", 100);
        r.lines[0].quantity = 0;
        assert_eq!(check_request(&r), Err(IssueError::QuantityZero(0)));
        let mut r = sample_request("o", 100);
        r.issuer_ref = "x".repeat(33);
        assert!(check_request(&r).is_err());
        let r = sample_request("o", 0);
        assert_eq!(check_request(&r), Err(IssueError::EmptyInvoice));
    }

    #[test]
    fn overflow_is_an_error() {
        let r = sample_request("o", i64::MAX / 2);
        assert_eq!(check_request(&r), Err(IssueError::AmountOverflow));
        let mut r = sample_request("o", 1);
        r.lines[0].unit_price_fen = i64::MAX / 4;
        r.lines.push(r.lines[0].clone());
        r.lines[0].quantity = 1;
        r.lines[1].quantity = 4;
        assert_eq!(check_request(&r), Err(IssueError::AmountOverflow));
    }

    #[test]
    fn red_signs() {
        let mut r = sample_request("o-red", -100);
        assert_eq!(check_request(&r), Err(IssueError::LineSign(0)));
        r.kind = InvoiceKind::Red(RedReference {
            original_code: InvoiceCode::new(1).unwrap(),
            original_number: InvoiceNumber::new(1).unwrap(),
            original_order_id: "o-1".to_owned(),
        });
        check_request(&r).unwrap();
        let mut blue_priced = sample_request("o-red", 100);
        blue_priced.kind = r.kind.clone();
        assert_eq!(check_request(&blue_priced), Err(IssueError::LineSign(0)));
    }
}
