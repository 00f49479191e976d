//! Invoice number pool of one seller taxpayer in one shard.
//!
//! A queue of segments, each with a cursor; numbers are taken in order from the first
//! segment that has any left. Every number of every segment ever added is, at all times,
//! exactly one of: available (at or after its segment's cursor), in flight (taken by a
//! tick in flight, not yet journaled), issued, spoiled (journaled, or queued to be, as
//! never issued: refused by the tax server or taken by an aborted tick, see `issuer`) or
//! returned to the tax authority. [`Pool::accounting`] exposes the counts and
//! the pool asserts that they add up after every change.

use std::collections::VecDeque;

use crate::taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};

/// Segments a pool holds at once. Requisitions are of thousands of numbers, so a
/// handful of segments per seller is normal; the bound stops a misbehaving refill loop.
pub const POOL_SEGMENTS_MAX: usize = 1024;
/// Segments a pool remembers having reserved, exhausted ones included (16 B each): with
/// the smallest sensible segment (1,000 numbers) that covers 65 million numbers of a
/// seller per shard journal.
pub const RESERVED_SEGMENTS_MAX: usize = 65_536;

/// Ask the tax server for more numbers: emitted once when a pool falls below its low
/// watermark, and not again until a segment arrives (or [`Pool::refill_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillRequest {
    /// Seller whose pool is low.
    pub seller: TaxpayerId,
    /// Numbers to requisition.
    pub count: u32,
    /// Shard asking (the requisition's holder).
    pub shard_id: u32,
}

/// Where every number of a pool is. `reserved = available + in_flight + issued + spoiled
/// + returned` always holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NumberAccounting {
    /// Numbers in all segments ever added.
    pub reserved: u64,
    /// Numbers not taken yet.
    pub available: u64,
    /// Taken by a tick in flight, not yet journaled.
    pub in_flight: u64,
    /// Journaled as issued (or pending offline).
    pub issued: u64,
    /// Spoiled, never reused: refused by the tax server, or taken by an aborted tick
    /// (whose device may have coded them); journaled as `NumberSpoiled`, or queued for
    /// the next commit.
    pub spoiled: u64,
    /// Given back to the tax authority.
    pub returned: u64,
}

/// Why a segment or a replayed number does not fit the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The segment overlaps one the pool reserved before (held, exhausted or returned).
    #[error("segment overlaps a segment reserved before")]
    Overlap,
    /// [`POOL_SEGMENTS_MAX`] reached.
    #[error("too many segments")]
    TooManySegments,
    /// A number that is in no held segment.
    #[error("number {1} of code {0} is outside every reserved segment")]
    OutsideReserved(u64, u32),
    /// A number behind its segment's cursor: already used.
    #[error("number {1} of code {0} is used twice")]
    UsedTwice(u64, u32),
    /// A number ahead of its segment's cursor: the numbers between would be unaccounted.
    #[error("number {1} of code {0} skips numbers of its segment")]
    Skipped(u64, u32),
    /// A returned range that is not exactly the unused rest of a held segment.
    #[error("returned range does not match an unused segment rest")]
    BadReturn,
}

#[derive(Debug, Clone, Copy)]
struct Cursor {
    segment: NumberSegment,
    /// Next number to take; `segment.end()` when exhausted.
    next: u32,
}

impl Cursor {
    fn remaining(&self) -> u32 {
        self.segment.end() - self.next
    }
}

/// The numbers of one seller in one shard.
#[derive(Debug, Clone)]
pub struct Pool {
    seller: TaxpayerId,
    low_watermark: u32,
    refill_count: u32,
    shard_id: u32,
    cursors: VecDeque<Cursor>,
    /// Every segment ever added, exhausted and returned ones included: a new segment
    /// overlapping any of them would hand out a number a second time, and the shell
    /// needs the list to tell segments the tax server granted but the journal never
    /// recorded.
    reserved: Vec<NumberSegment>,
    refill_outstanding: bool,
    counts: NumberAccounting,
}

impl Pool {
    /// An empty pool.
    pub fn new(seller: TaxpayerId, low_watermark: u32, refill_count: u32, shard_id: u32) -> Self {
        Self {
            seller,
            low_watermark,
            refill_count,
            shard_id,
            cursors: VecDeque::new(),
            reserved: Vec::new(),
            refill_outstanding: false,
            counts: NumberAccounting::default(),
        }
    }

    /// The seller.
    pub fn seller(&self) -> TaxpayerId {
        self.seller
    }

    /// Counts of every state; asserts that they add up.
    pub fn accounting(&self) -> NumberAccounting {
        let c = self.counts;
        assert_eq!(
            c.reserved,
            c.available + c.in_flight + c.issued + c.spoiled + c.returned,
            "number accounting broken"
        );
        debug_assert_eq!(
            c.available,
            self.cursors
                .iter()
                .map(|k| u64::from(k.remaining()))
                .sum::<u64>()
        );
        c
    }

    /// The available numbers as segments, in take order.
    pub fn available_segments(&self) -> Vec<NumberSegment> {
        self.cursors
            .iter()
            .filter(|k| k.remaining() > 0)
            .map(|k| NumberSegment {
                code: k.segment.code,
                // next < end ≤ 100,000,000 and next ≥ first ≥ 1: a valid number.
                first: InvoiceNumber::new(k.next).unwrap_or(k.segment.first),
                count: k.remaining(),
            })
            .collect()
    }

    /// Adds a granted segment; clears the outstanding refill flag.
    pub fn add_segment(&mut self, segment: NumberSegment) -> Result<(), PoolError> {
        if self.cursors.len() >= POOL_SEGMENTS_MAX || self.reserved.len() >= RESERVED_SEGMENTS_MAX {
            return Err(PoolError::TooManySegments);
        }
        let overlaps = self.reserved.iter().any(|r| r.overlaps(&segment));
        if overlaps {
            return Err(PoolError::Overlap);
        }
        self.cursors.push_back(Cursor {
            segment,
            next: segment.first.get(),
        });
        self.reserved.push(segment);
        self.counts.reserved += u64::from(segment.count);
        self.counts.available += u64::from(segment.count);
        self.refill_outstanding = false;
        self.accounting();
        Ok(())
    }

    /// Every segment ever reserved by this pool (journaled), exhausted and returned ones
    /// included, in the order they were added.
    pub fn reserved_segments(&self) -> &[NumberSegment] {
        &self.reserved
    }

    /// Takes the next number (now in flight), or `None` when the pool is empty.
    pub fn take(&mut self) -> Option<(InvoiceCode, InvoiceNumber)> {
        let cursor = self.cursors.iter_mut().find(|k| k.remaining() > 0)?;
        let number = InvoiceNumber::new(cursor.next).ok()?;
        cursor.next += 1;
        self.counts.available -= 1;
        self.counts.in_flight += 1;
        Some((cursor.segment.code, number))
    }

    /// Puts back the last number taken from its segment (a tick cancelled before its
    /// numbers reached the tax server, in reverse take order).
    ///
    /// # Panics
    /// If the number is not the last one taken from a held segment: the issuer calls this
    /// only with numbers it took, in reverse order.
    pub fn untake(&mut self, code: InvoiceCode, number: InvoiceNumber) {
        let cursor = self
            .cursors
            .iter_mut()
            .find(|k| {
                k.segment.code == code
                    && k.next == number.get() + 1
                    && k.segment.contains(code, number)
            })
            .expect("untake of a number that is not the last taken");
        cursor.next -= 1;
        self.counts.available += 1;
        self.counts.in_flight -= 1;
    }

    /// An in-flight number was journaled as issued.
    pub fn settle_issued(&mut self) {
        assert!(self.counts.in_flight > 0);
        self.counts.in_flight -= 1;
        self.counts.issued += 1;
    }

    /// An in-flight number was spoiled (journaled, or queued to be).
    pub fn settle_spoiled(&mut self) {
        assert!(self.counts.in_flight > 0);
        self.counts.in_flight -= 1;
        self.counts.spoiled += 1;
    }

    /// Start-up reconciliation: takes the available numbers of the segment holding
    /// `end - 1` (under `code`) from its cursor up to `end` exclusive, at most `max` of
    /// them, and counts them spoiled. Returns the numbers, in order, and how many are
    /// still to spoil (more than `max` were due); nothing when the cursor is already at or
    /// past `end` or no held segment holds `end - 1`.
    ///
    /// # Panics
    /// With numbers in flight: reconciliation runs before any tick.
    pub fn spoil_until(
        &mut self,
        code: InvoiceCode,
        end: u32,
        max: u32,
    ) -> (Vec<InvoiceNumber>, u32) {
        assert_eq!(self.counts.in_flight, 0);
        let Some(last) = end.checked_sub(1).and_then(|n| InvoiceNumber::new(n).ok()) else {
            return (Vec::new(), 0);
        };
        let Some(cursor) = self
            .cursors
            .iter_mut()
            .find(|k| k.segment.contains(code, last))
        else {
            return (Vec::new(), 0);
        };
        let mut out = Vec::new();
        while cursor.next < end && (out.len() as u32) < max {
            // next < end ≤ segment end ≤ 100,000,000 and next ≥ first ≥ 1: valid.
            let Ok(number) = InvoiceNumber::new(cursor.next) else {
                break;
            };
            out.push(number);
            cursor.next += 1;
        }
        let left = end.saturating_sub(cursor.next);
        let n = out.len() as u64;
        self.counts.available -= n;
        self.counts.spoiled += n;
        self.accounting();
        (out, left)
    }

    /// Drops exhausted segments from the queue; only with nothing in flight, because
    /// [`Pool::untake`] needs the cursor of every in-flight number.
    pub fn compact(&mut self) {
        assert_eq!(self.counts.in_flight, 0);
        self.cursors.retain(|k| k.remaining() > 0);
        self.accounting();
    }

    /// A refill request if the pool is below its watermark and none is outstanding.
    pub fn refill_request(&mut self) -> Option<RefillRequest> {
        if self.refill_outstanding || self.counts.available >= u64::from(self.low_watermark) {
            return None;
        }
        self.refill_outstanding = true;
        Some(RefillRequest {
            seller: self.seller,
            count: self.refill_count,
            shard_id: self.shard_id,
        })
    }

    /// The requisition failed: allow the next tick to ask again.
    pub fn refill_failed(&mut self) {
        self.refill_outstanding = false;
    }

    /// Removes every available number and returns them as segments (to be journaled as
    /// returned, then given back to the tax server).
    pub fn return_unused(&mut self) -> Vec<NumberSegment> {
        assert_eq!(self.counts.in_flight, 0);
        let rest = self.available_segments();
        for s in &rest {
            self.counts.available -= u64::from(s.count);
            self.counts.returned += u64::from(s.count);
        }
        self.cursors.clear();
        self.accounting();
        rest
    }

    /// Recovery: a journaled issued or spoiled number must be exactly the next number of
    /// its segment, so that no number is used twice and none is skipped.
    pub fn replay_use(
        &mut self,
        code: InvoiceCode,
        number: InvoiceNumber,
        spoiled: bool,
    ) -> Result<(), PoolError> {
        let cursor = self
            .cursors
            .iter_mut()
            .find(|k| k.segment.contains(code, number))
            .ok_or(PoolError::OutsideReserved(code.get(), number.get()))?;
        if number.get() < cursor.next {
            return Err(PoolError::UsedTwice(code.get(), number.get()));
        }
        if number.get() > cursor.next {
            return Err(PoolError::Skipped(code.get(), number.get()));
        }
        cursor.next += 1;
        self.counts.available -= 1;
        if spoiled {
            self.counts.spoiled += 1;
        } else {
            self.counts.issued += 1;
        }
        Ok(())
    }

    /// Recovery: a journaled return must be exactly the unused rest of a held segment.
    pub fn replay_return(&mut self, returned: NumberSegment) -> Result<(), PoolError> {
        let cursor = self
            .cursors
            .iter_mut()
            .find(|k| {
                k.segment.code == returned.code
                    && k.next == returned.first.get()
                    && k.segment.end() == returned.end()
            })
            .ok_or(PoolError::BadReturn)?;
        cursor.next = cursor.segment.end();
        self.counts.available -= u64::from(returned.count);
        self.counts.returned += u64::from(returned.count);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(code: u64, first: u32, count: u32) -> NumberSegment {
        NumberSegment::new(
            InvoiceCode::new(code).unwrap(),
            InvoiceNumber::new(first).unwrap(),
            count,
        )
        .unwrap()
    }

    fn pool() -> Pool {
        Pool::new(TaxpayerId::parse("91350100M000100Y43").unwrap(), 3, 100, 7)
    }

    #[test]
    fn takes_in_order_across_segments_and_accounts() {
        let mut p = pool();
        assert!(p.take().is_none());
        p.add_segment(seg(1, 10, 2)).unwrap();
        p.add_segment(seg(2, 1, 2)).unwrap();
        let taken: Vec<_> = std::iter::from_fn(|| p.take())
            .map(|(c, n)| (c.get(), n.get()))
            .collect();
        assert_eq!(taken, vec![(1, 10), (1, 11), (2, 1), (2, 2)]);
        assert_eq!(p.accounting().in_flight, 4);
        p.untake(InvoiceCode::new(2).unwrap(), InvoiceNumber::new(2).unwrap());
        p.untake(InvoiceCode::new(2).unwrap(), InvoiceNumber::new(1).unwrap());
        p.settle_issued();
        p.settle_spoiled();
        p.compact();
        let a = p.accounting();
        assert_eq!((a.reserved, a.available, a.issued, a.spoiled), (4, 2, 1, 1));
        assert_eq!(p.available_segments(), vec![seg(2, 1, 2)]);
        assert_eq!(p.return_unused(), vec![seg(2, 1, 2)]);
        assert_eq!(p.accounting().returned, 2);
    }

    #[test]
    fn refill_once_until_segment_arrives() {
        let mut p = pool();
        let r = p.refill_request().unwrap();
        assert_eq!((r.count, r.shard_id), (100, 7));
        assert!(p.refill_request().is_none());
        p.add_segment(seg(1, 1, 3)).unwrap();
        assert!(p.refill_request().is_none(), "3 available, watermark 3");
        p.take();
        assert!(p.refill_request().is_some());
        assert!(p.refill_request().is_none());
        p.refill_failed();
        assert!(p.refill_request().is_some());
    }

    #[test]
    fn overlap_and_replay_rules() {
        let mut p = pool();
        p.add_segment(seg(1, 10, 5)).unwrap();
        assert_eq!(p.add_segment(seg(1, 14, 5)), Err(PoolError::Overlap));
        p.add_segment(seg(2, 14, 5)).unwrap();
        let c = InvoiceCode::new(1).unwrap();
        let n = |x| InvoiceNumber::new(x).unwrap();
        assert_eq!(
            p.replay_use(c, n(11), false),
            Err(PoolError::Skipped(1, 11))
        );
        p.replay_use(c, n(10), false).unwrap();
        assert_eq!(
            p.replay_use(c, n(10), false),
            Err(PoolError::UsedTwice(1, 10))
        );
        assert_eq!(
            p.replay_use(c, n(20), false),
            Err(PoolError::OutsideReserved(1, 20))
        );
        assert_eq!(p.replay_return(seg(1, 12, 3)), Err(PoolError::BadReturn));
        p.replay_return(seg(1, 11, 4)).unwrap();
        let a = p.accounting();
        assert_eq!((a.available, a.issued, a.returned), (5, 1, 4));
    }
}
