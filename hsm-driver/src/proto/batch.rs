//! Batches in their wire layout: [`InvoiceBatch`] (the `TaxCodes` hot path) and
//! [`UploadBatch`] over one shared raw representation, and their borrowing iterators.

use super::*;

/// What a TaxCodes batch's limit errors name.
pub(super) const TAX_CODES_ITEMS: &str = "tax codes batch items";

/// One canonical-invoice batch in its wire layout (`len u16 + bytes` per item, optionally
/// followed by a fixed-size suffix), with an offset table. Shared by [`InvoiceBatch`]
/// and [`UploadBatch`].
#[derive(Clone, Default, PartialEq, Eq)]
pub(super) struct RawBatch {
    /// Items exactly as on the wire, without the leading count.
    pub(super) wire: Vec<u8>,
    /// Offset in `wire` of each item's length prefix.
    pub(super) starts: Vec<u32>,
}

impl RawBatch {
    fn with_capacity(items: usize, bytes: usize) -> Self {
        Self {
            wire: Vec::with_capacity(bytes),
            starts: Vec::with_capacity(items),
        }
    }

    fn clear(&mut self) {
        self.wire.clear();
        self.starts.clear();
    }

    fn push(
        &mut self,
        item_max: usize,
        invoice: &[u8],
        suffix: &[u8],
        what: &'static str,
    ) -> Result<(), EncodeError> {
        limit(what, self.starts.len() + 1, item_max)?;
        limit("invoice bytes", invoice.len(), INVOICE_BYTES_MAX)?;
        let added = 2 + invoice.len() + suffix.len();
        // Keep the whole body (count prefix + items) within a frame.
        limit(
            "batch body bytes",
            4 + self.wire.len() + added,
            FRAME_BODY_BYTES_MAX,
        )?;
        let start = self.wire.len();
        // `invoice.len() <= INVOICE_BYTES_MAX < u16::MAX` was checked above.
        self.wire
            .extend_from_slice(&(invoice.len() as u16).to_le_bytes());
        self.wire.extend_from_slice(invoice);
        self.wire.extend_from_slice(suffix);
        self.starts.push(start as u32);
        Ok(())
    }

    fn push_with(
        &mut self,
        item_max: usize,
        what: &'static str,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), EncodeError> {
        limit(what, self.starts.len() + 1, item_max)?;
        let start = self.wire.len();
        self.wire.extend_from_slice(&[0, 0]);
        write(&mut self.wire);
        let len = self.wire.len() - start - 2;
        let checked = limit("invoice bytes", len, INVOICE_BYTES_MAX).and_then(|()| {
            limit(
                "batch body bytes",
                4 + self.wire.len(),
                FRAME_BODY_BYTES_MAX,
            )
        });
        if let Err(e) = checked {
            // Leave the batch exactly as it was before the failed push.
            self.wire.truncate(start);
            return Err(e);
        }
        self.wire[start..start + 2].copy_from_slice(&(len as u16).to_le_bytes());
        self.starts.push(start as u32);
        Ok(())
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Item `i`: the invoice bytes and the suffix.
    fn get(&self, i: usize, suffix_len: usize) -> Option<(&[u8], &[u8])> {
        let start = *self.starts.get(i)? as usize;
        let len = u16::from_le_bytes([*self.wire.get(start)?, *self.wire.get(start + 1)?]);
        let body = start + 2;
        let end = body + len as usize;
        Some((
            self.wire.get(body..end)?,
            self.wire.get(end..end + suffix_len)?,
        ))
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.starts.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.wire);
    }

    /// Parses `count u32, then count x (len u16 + bytes + suffix)` and must consume all of
    /// `body`.
    pub(super) fn decode(
        body: &[u8],
        item_max: usize,
        suffix_len: usize,
        what: &'static str,
    ) -> Result<Self, DecodeError> {
        let mut starts = Vec::new();
        let (_, wire) = Self::walk(body, item_max, suffix_len, what, Some(&mut starts))?;
        Ok(Self {
            wire: wire.to_vec(),
            starts,
        })
    }

    /// Checks the layout [`RawBatch::decode`] accepts, with the same errors, without
    /// copying anything; with `starts`, each item's offset in the wire bytes is pushed
    /// there. Returns the count and the wire bytes (the body after the count).
    fn walk<'a>(
        body: &'a [u8],
        item_max: usize,
        suffix_len: usize,
        what: &'static str,
        mut starts: Option<&mut Vec<u32>>,
    ) -> Result<(usize, &'a [u8]), DecodeError> {
        let mut r = Reader::new(body);
        let count = r.u32("batch count")? as usize;
        if count > item_max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: count as u64,
                max: item_max as u64,
            });
        }
        if let Some(starts) = starts.as_deref_mut() {
            starts.reserve_exact(count);
        }
        let wire = r.rest();
        let mut pos = 0usize;
        for _ in 0..count {
            let len_bytes = wire
                .get(pos..pos + 2)
                .ok_or(DecodeError::Truncated("item length"))?;
            let len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
            if len > INVOICE_BYTES_MAX {
                return Err(DecodeError::LimitExceeded {
                    what: "invoice bytes",
                    value: len as u64,
                    max: INVOICE_BYTES_MAX as u64,
                });
            }
            let end = pos + 2 + len + suffix_len;
            if end > wire.len() {
                return Err(DecodeError::Truncated("item"));
            }
            // `wire.len() <= FRAME_BODY_BYTES_MAX` fits u32 for frames from the decoder; a
            // caller handing a larger slice gets a limit error instead of a wrapped offset.
            let start = u32::try_from(pos).map_err(|_| DecodeError::LimitExceeded {
                what: "batch body bytes",
                value: pos as u64,
                max: u32::MAX as u64,
            })?;
            if let Some(starts) = starts.as_deref_mut() {
                starts.push(start);
            }
            pos = end;
        }
        if pos != wire.len() {
            return Err(DecodeError::TrailingBytes(wire.len() - pos));
        }
        Ok((count, wire))
    }
}

/// Walks a validated batch's wire bytes item by item (no offset-table lookups).
#[derive(Debug, Clone)]
struct RawIter<'a> {
    wire: &'a [u8],
    remaining: usize,
    suffix_len: usize,
}

impl<'a> RawIter<'a> {
    fn new(raw: &'a RawBatch, suffix_len: usize) -> Self {
        Self {
            wire: &raw.wire,
            remaining: raw.starts.len(),
            suffix_len,
        }
    }
}

impl<'a> Invoices<'a> {
    /// Checks a `TaxCodes` request body exactly as [`Request::decode`] does (same
    /// errors) and iterates its invoices in place: no copy of the body and no offset
    /// table. The emulator's hot path uses it instead of building an [`InvoiceBatch`].
    pub fn decode(body: &'a [u8]) -> Result<(Holder, Self), DecodeError> {
        let (holder, rest) = split_holder(body)?;
        let (count, wire) = RawBatch::walk(rest, TAX_CODES_BATCH_MAX, 0, TAX_CODES_ITEMS, None)?;
        Ok((
            holder,
            Self {
                raw: RawIter {
                    wire,
                    remaining: count,
                    suffix_len: 0,
                },
            },
        ))
    }
}

impl<'a> Iterator for RawIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // Batches are validated on push and on decode, so the `?`s never stop early; they
        // keep a corrupted batch from panicking.
        let len = u16::from_le_bytes([*self.wire.first()?, *self.wire.get(1)?]) as usize;
        let end = 2 + len + self.suffix_len;
        let item = self.wire.get(2..2 + len)?;
        let suffix = self.wire.get(2 + len..end)?;
        self.wire = self.wire.get(end..)?;
        self.remaining -= 1;
        Some((item, suffix))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// Iterator over the canonical invoices of an [`InvoiceBatch`].
#[derive(Debug, Clone)]
pub struct Invoices<'a> {
    raw: RawIter<'a>,
}

impl<'a> Iterator for Invoices<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        self.raw.next().map(|(invoice, _)| invoice)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.raw.size_hint()
    }
}

impl ExactSizeIterator for Invoices<'_> {}

/// Iterator over the `(canonical invoice, tax code)` items of an [`UploadBatch`].
#[derive(Debug, Clone)]
pub struct UploadItems<'a> {
    raw: RawIter<'a>,
}

impl<'a> Iterator for UploadItems<'a> {
    type Item = (&'a [u8], TaxCode);

    fn next(&mut self) -> Option<Self::Item> {
        let (invoice, suffix) = self.raw.next()?;
        Some((invoice, suffix.try_into().ok()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.raw.size_hint()
    }
}

impl ExactSizeIterator for UploadItems<'_> {}

/// The invoices of a `TaxCodes` command: canonical invoices in one contiguous buffer in
/// their wire layout, so that encoding is one copy and a shard can reuse the allocation
/// tick after tick ([`InvoiceBatch::clear`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InvoiceBatch {
    pub(super) holder: Holder,
    pub(super) raw: RawBatch,
}

impl InvoiceBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `items` invoices of `bytes` total.
    pub fn with_capacity(items: usize, bytes: usize) -> Self {
        Self {
            holder: Holder::default(),
            raw: RawBatch::with_capacity(items, bytes + 2 * items),
        }
    }

    /// The holder the batch is coded for: the device codes only numbers of segments
    /// granted to it (others get [`TaxCodeStatus::NotHolder`]).
    pub fn holder(&self) -> Holder {
        self.holder
    }

    /// Sets the holder (kept by [`InvoiceBatch::clear`]).
    pub fn set_holder(&mut self, holder: Holder) {
        self.holder = holder;
    }

    /// Removes every item, keeping the allocation and the holder.
    pub fn clear(&mut self) {
        self.raw.clear();
    }

    /// Appends one canonical invoice. Fails when the batch is full
    /// ([`TAX_CODES_BATCH_MAX`]), the invoice exceeds [`INVOICE_BYTES_MAX`], or the body
    /// would exceed [`FRAME_BODY_BYTES_MAX`].
    pub fn push(&mut self, canonical: &[u8]) -> Result<(), EncodeError> {
        self.raw
            .push(TAX_CODES_BATCH_MAX, canonical, &[], TAX_CODES_ITEMS)
    }

    /// Appends one invoice written in place by `write` (which appends its canonical bytes
    /// to the vector it is given), saving the copy from a scratch buffer. On error the
    /// batch is unchanged.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), EncodeError> {
        self.raw
            .push_with(TAX_CODES_BATCH_MAX, TAX_CODES_ITEMS, write)
    }

    /// Number of invoices.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether there are no invoices.
    pub fn is_empty(&self) -> bool {
        self.raw.len() == 0
    }

    /// Invoice `i`'s canonical bytes.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.raw.get(i, 0).map(|(invoice, _)| invoice)
    }

    /// The invoices in order.
    pub fn iter(&self) -> Invoices<'_> {
        Invoices {
            raw: RawIter::new(&self.raw, 0),
        }
    }

    /// Body bytes this batch encodes to.
    pub fn encoded_len(&self) -> usize {
        4 + self.raw.wire.len()
    }
}

impl fmt::Debug for InvoiceBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvoiceBatch")
            .field("holder", &self.holder)
            .field("items", &self.len())
            .field("bytes", &self.raw.wire.len())
            .finish()
    }
}

/// The items of an `Upload` command: canonical invoice and its tax code, in wire layout.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UploadBatch {
    pub(super) raw: RawBatch,
}

impl UploadBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes every item, keeping the allocation.
    pub fn clear(&mut self) {
        self.raw.clear();
    }

    /// Appends one issued invoice with its tax code. Fails when the batch is full
    /// ([`UPLOAD_BATCH_MAX`]), the invoice exceeds [`INVOICE_BYTES_MAX`], or the body
    /// would exceed [`FRAME_BODY_BYTES_MAX`].
    pub fn push(&mut self, canonical: &[u8], tax_code: &TaxCode) -> Result<(), EncodeError> {
        self.raw
            .push(UPLOAD_BATCH_MAX, canonical, tax_code, "upload batch items")
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.raw.len() == 0
    }

    /// Item `i`: canonical bytes and tax code.
    pub fn get(&self, i: usize) -> Option<(&[u8], TaxCode)> {
        let (invoice, suffix) = self.raw.get(i, TAX_CODE_BYTES)?;
        let code: TaxCode = suffix.try_into().ok()?;
        Some((invoice, code))
    }

    /// The items in order.
    pub fn iter(&self) -> UploadItems<'_> {
        UploadItems {
            raw: RawIter::new(&self.raw, TAX_CODE_BYTES),
        }
    }
}

impl fmt::Debug for UploadBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadBatch")
            .field("items", &self.len())
            .field("bytes", &self.raw.wire.len())
            .finish()
    }
}
