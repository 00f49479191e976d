//! The invoice request as the ticketing system sends it, and the issued invoice.

use crate::money::TaxRate;
use crate::taxpayer::{InvoiceCode, InvoiceNumber, TaxpayerId};

/// One line item of an invoice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineItem {
    /// Goods or service name (1..=96 bytes UTF-8).
    pub name: String,
    /// Quantity, ≥ 1.
    pub quantity: u32,
    /// Unit price in fen, tax excluded: ≥ 0 on blue invoices, < 0 on red ones.
    pub unit_price_fen: i64,
}

/// What a red invoice offsets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedReference {
    /// Code of the original (blue) invoice.
    pub original_code: InvoiceCode,
    /// Number of the original invoice.
    pub original_number: InvoiceNumber,
    /// Order id of the original: its idempotency key, and how the red one is routed to
    /// the shard that knows the original.
    pub original_order_id: String,
}

/// Blue (ordinary) or red (offsetting) invoice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InvoiceKind {
    /// An ordinary invoice with positive amounts.
    Blue,
    /// A negative invoice offsetting (part of) an earlier blue one.
    Red(RedReference),
}

/// A request to issue one invoice for one order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IssueRequest {
    /// Seller taxpayer; must be served by this shard.
    pub seller: TaxpayerId,
    /// Order id from the ticketing system (1..=64 bytes); with the seller, the
    /// idempotency key.
    pub order_id: String,
    /// Buyer name (1..=192 bytes).
    pub buyer_name: String,
    /// Buyer taxpayer id, when the buyer is a registered taxpayer.
    pub buyer_taxpayer: Option<TaxpayerId>,
    /// Line items (1..=16).
    pub lines: Vec<LineItem>,
    /// Tax rate of every line.
    pub tax_rate: TaxRate,
    /// Issuer-side reference such as a station, train or scenic-spot id (0..=32 bytes).
    pub issuer_ref: String,
    /// Declared Σ line amounts, fen.
    pub amount_fen: i64,
    /// Declared tax, fen.
    pub tax_fen: i64,
    /// Declared amount + tax, fen.
    pub total_fen: i64,
    /// Blue or red.
    pub kind: InvoiceKind,
}

impl IssueRequest {
    /// Whether this is a red invoice.
    pub fn is_red(&self) -> bool {
        matches!(self.kind, InvoiceKind::Red(_))
    }
}

/// Code and number: what identifies an invoice forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InvoiceIdentity {
    /// Invoice code.
    pub code: InvoiceCode,
    /// Invoice number.
    pub number: InvoiceNumber,
}

/// An issued invoice: the request, its identity, issue time and the tax server's codes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Invoice {
    /// The validated request (declared amounts equal the computed ones).
    pub request: IssueRequest,
    /// Invoice code.
    pub code: InvoiceCode,
    /// Invoice number.
    pub number: InvoiceNumber,
    /// Issue time, ms since the Unix epoch (the tick's `now_ms`).
    pub issue_time_ms: u64,
    /// Tax control code from the tax server, over the canonical bytes.
    pub tax_control_code: [u8; 32],
    /// 20 ASCII digits derived from the tax control code.
    pub check_code: [u8; 20],
}

impl Invoice {
    /// Code and number.
    pub fn identity(&self) -> InvoiceIdentity {
        InvoiceIdentity {
            code: self.code,
            number: self.number,
        }
    }
}
