//! The body of an [`FrameKind::Issue`](crate::FrameKind::Issue) frame: `count` items, each
//! a little-endian `u32` length followed by one encoded invoice request.
//!
//! The length prefix is what makes partial batches possible: an item whose content is
//! invalid (a bad check character, an illegal tax rate, a string that is not UTF-8) is
//! skipped and answered with its own error, while the others are issued. Only a body whose
//! item boundaries do not add up is refused as a whole.
//!
//! Item layout (integers little-endian):
//! ```text
//! seller            18 B ASCII (unified social credit code)
//! tax_rate_bp       u16
//! kind              u8      0 blue, 1 red
//! has_buyer_tp      u8      0 or 1
//! amount_fen        i64
//! tax_fen           i64
//! total_fen         i64
//! buyer_taxpayer    18 B    only when has_buyer_tp = 1
//! order_id          u8 length + UTF-8
//! buyer_name        u8 length + UTF-8
//! issuer_ref        u8 length + UTF-8
//! lines             u8 count, then per line: quantity u32, unit_price_fen i64,
//!                   name u8 length + UTF-8
//! red only:         original_code u64, original_number u32,
//!                   original_order_id u8 length + UTF-8
//! ```
//! Field bounds (lengths, line count, amounts) are the core's rules and are checked by the
//! issuer, which answers them with the same typed errors as for any other refusal.

use appliance_core::taxpayer::TAXPAYER_ID_BYTES;
use appliance_core::{
    InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, RedReference, TaxRate,
    TaxpayerId,
};

/// Why one item of an issue frame could not be decoded into a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemDecodeError {
    /// The item ends before its fields do, or has bytes left after them.
    #[error("item length does not match its fields")]
    Length,
    /// A taxpayer id that is not a valid unified social credit code.
    #[error("invalid taxpayer id: {0}")]
    Taxpayer(String),
    /// A tax rate outside the legal set.
    #[error("illegal tax rate {0} bp")]
    TaxRate(u16),
    /// A kind byte other than 0 (blue) or 1 (red), or a flag byte other than 0 or 1.
    #[error("invalid {0} byte")]
    Flag(&'static str),
    /// A text field that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// An invoice code or number out of range in a red reference.
    #[error("invalid original invoice identity")]
    Identity,
}

/// Why an issue body was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// An item's length prefix runs past the body, or bytes remain after the last item.
    #[error("item boundaries do not match the body")]
    Boundaries,
    /// `count` is zero or above the limit.
    #[error("batch of {0} requests outside 1..=BATCH_REQUESTS_MAX")]
    Count(u32),
}

/// Appends one length-prefixed request item.
pub fn encode_request(out: &mut Vec<u8>, request: &IssueRequest) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(request.seller.as_bytes());
    out.extend_from_slice(&request.tax_rate.bp().to_le_bytes());
    out.push(u8::from(request.is_red()));
    out.push(u8::from(request.buyer_taxpayer.is_some()));
    out.extend_from_slice(&request.amount_fen.to_le_bytes());
    out.extend_from_slice(&request.tax_fen.to_le_bytes());
    out.extend_from_slice(&request.total_fen.to_le_bytes());
    if let Some(buyer) = &request.buyer_taxpayer {
        out.extend_from_slice(buyer.as_bytes());
    }
    put_str(out, &request.order_id);
    put_str(out, &request.buyer_name);
    put_str(out, &request.issuer_ref);
    // Counts and lengths above a byte cannot be valid requests; they are clamped so that
    // the encoding stays well-formed and the server refuses the request by its rules.
    out.push(request.lines.len().min(255) as u8);
    for line in request.lines.iter().take(255) {
        out.extend_from_slice(&line.quantity.to_le_bytes());
        out.extend_from_slice(&line.unit_price_fen.to_le_bytes());
        put_str(out, &line.name);
    }
    if let InvoiceKind::Red(reference) = &request.kind {
        out.extend_from_slice(&reference.original_code.get().to_le_bytes());
        out.extend_from_slice(&reference.original_number.get().to_le_bytes());
        put_str(out, &reference.original_order_id);
    }
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Every field bound is below 255 bytes (the largest, buyer_name, is 192), so a longer
    // string is cut at 255: the server then refuses it (too long, or not UTF-8 when the
    // cut splits a character) and never accepts a different value than was meant.
    let bytes = s.as_bytes();
    let len = bytes.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

/// Splits an issue body into its `count` items without decoding them.
pub fn split_items(body: &[u8], count: u32) -> Result<Vec<&[u8]>, BodyError> {
    if count == 0 || count > crate::BATCH_REQUESTS_MAX {
        return Err(BodyError::Count(count));
    }
    let mut items = Vec::with_capacity(count as usize);
    let mut rest = body;
    for _ in 0..count {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(BodyError::Boundaries);
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(BodyError::Boundaries);
        }
        let (item, tail) = tail.split_at(len);
        items.push(item);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(BodyError::Boundaries);
    }
    Ok(items)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ItemDecodeError> {
        if self.0.len() < n {
            return Err(ItemDecodeError::Length);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ItemDecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, ItemDecodeError> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, ItemDecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ItemDecodeError::Flag(what)),
        }
    }
    fn string(&mut self, what: &'static str) -> Result<String, ItemDecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| ItemDecodeError::Utf8(what))
    }
    fn taxpayer(&mut self) -> Result<TaxpayerId, ItemDecodeError> {
        let bytes = self.array::<TAXPAYER_ID_BYTES>()?;
        TaxpayerId::from_bytes(&bytes).map_err(|e| ItemDecodeError::Taxpayer(e.to_string()))
    }
}

/// Decodes one item (without its length prefix).
pub fn decode_request(item: &[u8]) -> Result<IssueRequest, ItemDecodeError> {
    let mut r = Reader(item);
    let seller = r.taxpayer()?;
    let rate_bp = u16::from_le_bytes(r.array()?);
    let tax_rate = TaxRate::from_bp(rate_bp).map_err(|_| ItemDecodeError::TaxRate(rate_bp))?;
    let red = r.flag("kind")?;
    let has_buyer = r.flag("buyer flag")?;
    let amount_fen = i64::from_le_bytes(r.array()?);
    let tax_fen = i64::from_le_bytes(r.array()?);
    let total_fen = i64::from_le_bytes(r.array()?);
    let buyer_taxpayer = if has_buyer { Some(r.taxpayer()?) } else { None };
    let order_id = r.string("order_id")?;
    let buyer_name = r.string("buyer_name")?;
    let issuer_ref = r.string("issuer_ref")?;
    let line_count = r.u8()?;
    let mut lines = Vec::with_capacity(usize::from(line_count));
    for _ in 0..line_count {
        let quantity = u32::from_le_bytes(r.array()?);
        let unit_price_fen = i64::from_le_bytes(r.array()?);
        let name = r.string("line name")?;
        lines.push(LineItem {
            name,
            quantity,
            unit_price_fen,
        });
    }
    let kind = if red {
        let code = InvoiceCode::new(u64::from_le_bytes(r.array()?))
            .map_err(|_| ItemDecodeError::Identity)?;
        let number = InvoiceNumber::new(u32::from_le_bytes(r.array()?))
            .map_err(|_| ItemDecodeError::Identity)?;
        InvoiceKind::Red(RedReference {
            original_code: code,
            original_number: number,
            original_order_id: r.string("original_order_id")?,
        })
    } else {
        InvoiceKind::Blue
    };
    if !r.0.is_empty() {
        return Err(ItemDecodeError::Length);
    }
    Ok(IssueRequest {
        seller,
        order_id,
        buyer_name,
        buyer_taxpayer,
        lines,
        tax_rate,
        issuer_ref,
        amount_fen,
        tax_fen,
        total_fen,
        kind,
    })
}

/// Encodes a whole issue frame for `requests` (header included).
pub fn encode_issue_frame(out: &mut Vec<u8>, requests: &[IssueRequest]) {
    let at = crate::frame::begin_frame(out, crate::FrameKind::Issue, requests.len() as u32);
    for request in requests {
        encode_request(out, request);
    }
    crate::frame::finish_frame(out, at);
}
