//! Wire primitives the request and response codecs share: the bounds-checked body
//! [`Reader`] and the encoders and decoders of the small recurring fields (holder,
//! segment, short string, boolean byte).

use super::*;

/// Bounds-checked little-endian reader over a body.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// `u8 length + UTF-8 bytes`, at most `max`.
    pub(super) fn short_string(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        let len = self.u8(what)? as usize;
        if len > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: len as u64,
                max: max as u64,
            });
        }
        let bytes = self.take(len, what)?;
        let s = core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(what))?;
        Ok(s.to_owned())
    }

    /// A count of items of `item_bytes` each, checked against `max` and against the bytes
    /// left, so that a hostile count cannot make us allocate.
    pub(super) fn count(
        &mut self,
        count: usize,
        max: usize,
        min_item_bytes: usize,
        what: &'static str,
    ) -> Result<usize, DecodeError> {
        if count > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: count as u64,
                max: max as u64,
            });
        }
        if count.saturating_mul(min_item_bytes) > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(count)
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    pub(super) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Bytes of one held segment in an `Inventory` answer: segment, holder, request id,
/// coded mark.
pub(super) const HELD_SEGMENT_BYTES: usize = 16 + HOLDER_BYTES + 8 + 4;

/// Splits a TaxCodes body into its holder and the batch after it.
pub(super) fn split_holder(body: &[u8]) -> Result<(Holder, &[u8]), DecodeError> {
    let head = body
        .get(..HOLDER_BYTES)
        .ok_or(DecodeError::Truncated("holder"))?;
    let mut h = [0u8; HOLDER_BYTES];
    h.copy_from_slice(head);
    Ok((Holder::from_bytes(&h), &body[HOLDER_BYTES..]))
}

pub(super) fn put_segment(out: &mut Vec<u8>, s: &Segment) {
    out.extend_from_slice(&s.code.to_le_bytes());
    out.extend_from_slice(&s.first.to_le_bytes());
    out.extend_from_slice(&s.count.to_le_bytes());
}

pub(super) fn get_segment(r: &mut Reader<'_>) -> Result<Segment, DecodeError> {
    Ok(Segment {
        code: r.u64("segment code")?,
        first: r.u32("segment first")?,
        count: r.u32("segment count")?,
    })
}

pub(super) fn put_short_string(
    out: &mut Vec<u8>,
    s: &str,
    what: &'static str,
    max: usize,
) -> Result<(), EncodeError> {
    limit(what, s.len(), max)?;
    // max <= 255 for every short string, checked by the limit above.
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

pub(super) fn bool_byte(r: &mut Reader<'_>, what: &'static str) -> Result<u8, DecodeError> {
    let b = r.u8(what)?;
    if b > 1 {
        return Err(DecodeError::InvalidValue {
            what,
            value: u64::from(b),
        });
    }
    Ok(b)
}
