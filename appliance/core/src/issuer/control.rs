//! Control records: segments added, adopted and returned, the upload watermark, batch
//! roots, and start-up reconciliation with the tax server's coded marks
//! ([`Issuer::spoil_coded`]). They queue up and are written first in the next commit
//! (see the module docs of [`crate::issuer`]).

use super::{ControlError, Issuer, CONTROL_RECORDS_MAX};
use crate::invoice::InvoiceIdentity;
use crate::journal::record::Record;
use crate::pool::Pool;
use crate::taxpayer::{InvoiceCode, NumberSegment, TaxpayerId};
use crate::validate::ItemError;

impl Issuer {
    /// Control records queued, aborted ticks' spoiled numbers not counted (those are
    /// bounded by the ticks in flight, see `control_spoils`).
    fn control_queued(&self) -> usize {
        self.control.len() - self.control_spoils
    }

    fn pool_mut(&mut self, seller: &TaxpayerId) -> Result<&mut Pool, ControlError> {
        let i = *self
            .sellers
            .get(seller)
            .ok_or(ControlError::UnknownSeller)?;
        Ok(&mut self.pools[i as usize])
    }

    fn queue(&mut self, record: Record) -> Result<(), ControlError> {
        if self.control_queued() >= CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        self.control.push(record);
        Ok(())
    }

    /// Adds a segment granted by the tax server. Its numbers can be taken at once; its
    /// `SegmentReserved` record is written first in the next commit, so no number of it
    /// is answered before the reservation is durable.
    pub fn add_segment(
        &mut self,
        seller: &TaxpayerId,
        segment: NumberSegment,
    ) -> Result<(), ControlError> {
        if self.control_queued() >= CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        self.pool_mut(seller)?.add_segment(segment)?;
        self.queue(Record::SegmentReserved {
            seller: *seller,
            segment,
        })
    }

    /// Adopts a segment the tax server reports as granted to this shard, unless it
    /// overlaps a segment this shard ever reserved: then the journal already knows it (a
    /// partially returned segment shows up smaller in the device than it was reserved).
    /// A segment the journal does not know was granted just before a crash; adopting it
    /// (journaled in the next commit, like `add_segment`) keeps its numbers accounted
    /// for. Returns whether it was adopted.
    pub fn adopt_granted(
        &mut self,
        seller: &TaxpayerId,
        segment: NumberSegment,
    ) -> Result<bool, ControlError> {
        let known = self
            .pool_mut(seller)?
            .reserved_segments()
            .iter()
            .any(|r| r.overlaps(&segment));
        if known {
            return Ok(false);
        }
        self.add_segment(seller, segment)?;
        Ok(true)
    }

    /// Takes every available number of a seller out of the pool and queues
    /// `SegmentReturned` records; give them back to the tax server only after the next
    /// commit is durable.
    pub fn return_unused(
        &mut self,
        seller: &TaxpayerId,
    ) -> Result<Vec<NumberSegment>, ControlError> {
        if !self.in_flight.is_empty() {
            return Err(ControlError::TickInFlight);
        }
        let queued = self.control_queued();
        let pool = self.pool_mut(seller)?;
        if queued + pool.available_segments().len() > CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        let returned = pool.return_unused();
        for segment in &returned {
            self.queue(Record::SegmentReturned {
                seller: *seller,
                segment: *segment,
            })?;
        }
        Ok(returned)
    }

    /// Start-up reconciliation with the tax server's coded mark of one segment: the device
    /// reports every number of the segment below `coded_end` as possibly coded. Those the
    /// journal holds no invoice for (from the pool's cursor up to `coded_end`) were coded
    /// for invoices that were never journaled; they are spoiled (queued `NumberSpoiled`
    /// records, reason [`ItemError::CodedNotJournaled`]) so that none is ever coded again
    /// for another invoice. Spoils at most as many as the control queue has room for and
    /// returns `(spoiled, left)`: commit, then call again while `left > 0`.
    pub fn spoil_coded(
        &mut self,
        seller: &TaxpayerId,
        code: InvoiceCode,
        coded_end: u32,
    ) -> Result<(u32, u32), ControlError> {
        if !self.in_flight.is_empty() {
            return Err(ControlError::TickInFlight);
        }
        let room = (CONTROL_RECORDS_MAX - self.control.len()) as u32;
        let pool = self.pool_mut(seller)?;
        let (numbers, left) = pool.spoil_until(code, coded_end, room);
        for &number in &numbers {
            self.queue(Record::NumberSpoiled {
                seller: *seller,
                identity: InvoiceIdentity { code, number },
                reason: ItemError::CodedNotJournaled,
            })?;
        }
        Ok((numbers.len() as u32, left))
    }

    /// The requisition for this seller failed: the next tick may ask again.
    pub fn refill_failed(&mut self, seller: &TaxpayerId) -> Result<(), ControlError> {
        self.pool_mut(seller)?.refill_failed();
        Ok(())
    }

    /// Queues an upload watermark: every record up to `watermark_seq` was accepted by the
    /// authority.
    pub fn queue_uploaded_to(&mut self, watermark_seq: u64) -> Result<(), ControlError> {
        if watermark_seq < self.queued_upload_watermark_seq || watermark_seq >= self.next_seq {
            return Err(ControlError::BadSeq);
        }
        self.queue(Record::UploadedTo { watermark_seq })?;
        self.queued_upload_watermark_seq = watermark_seq;
        Ok(())
    }

    /// Queues a signed Merkle root over records `first_seq..=last_seq` (already
    /// journaled, after the previous root).
    pub fn queue_batch_root(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        root: [u8; 32],
        signature: [u8; 64],
    ) -> Result<(), ControlError> {
        if first_seq <= self.queued_batch_root_last_seq
            || first_seq > last_seq
            || last_seq >= self.next_seq
        {
            return Err(ControlError::BadSeq);
        }
        self.queue(Record::BatchRoot {
            first_seq,
            last_seq,
            root,
            signature,
        })?;
        self.queued_batch_root_last_seq = last_seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issuer::tests::{config, ready, run, segment, seller};
    use crate::validate::tests::sample_request;

    #[test]
    fn adopts_only_segments_the_journal_does_not_know() {
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(100, 50)).unwrap();
        // The device reports what is left of a partially returned segment: known.
        assert!(!issuer.adopt_granted(&seller(), segment(120, 30)).unwrap());
        assert!(issuer.adopt_granted(&seller(), segment(150, 10)).unwrap());
        assert!(!issuer.adopt_granted(&seller(), segment(150, 10)).unwrap());
        assert_eq!(issuer.accounting(&seller()).unwrap().reserved, 60);
        assert_eq!(issuer.pending_control_records(), 2);
        let unknown = TaxpayerId::with_check_char(b"91310000775785552").unwrap();
        assert_eq!(
            issuer.adopt_granted(&unknown, segment(1, 1)),
            Err(ControlError::UnknownSeller)
        );
    }

    #[test]
    fn control_records_and_returns() {
        let (mut issuer, mut journal) = ready();
        run(&mut issuer, 1, &[sample_request("o", 1)], &mut journal);
        issuer.queue_uploaded_to(2).unwrap();
        assert_eq!(issuer.queue_uploaded_to(9), Err(ControlError::BadSeq));
        assert_eq!(
            issuer.queue_uploaded_to(1),
            Err(ControlError::BadSeq),
            "a queued watermark is not overtaken backwards"
        );
        issuer.queue_batch_root(1, 2, [1; 32], [2; 64]).unwrap();
        assert_eq!(
            issuer.queue_batch_root(2, 2, [1; 32], [2; 64]),
            Err(ControlError::BadSeq)
        );
        assert_eq!(
            issuer.return_unused(&seller()).unwrap(),
            vec![segment(2, 9)]
        );
        assert_eq!(issuer.pending_control_records(), 3);
        let commit = run(&mut issuer, 2, &[], &mut journal);
        assert_eq!(commit.seqs, 3..6);
        assert_eq!(issuer.upload_watermark_seq(), 2);
        assert_eq!(issuer.batch_root_last_seq(), 2);
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.issued, a.returned, a.available), (1, 9, 0));
        let (mut recovered, _) = crate::journal::replay::recover(config(), &journal, 2).unwrap();
        assert_eq!(recovered.upload_watermark_seq(), 2);
        assert_eq!(recovered.batch_root_last_seq(), 2);
        assert_eq!(
            recovered.accounting(&seller()),
            issuer.accounting(&seller())
        );
        assert_eq!(recovered.queue_uploaded_to(1), Err(ControlError::BadSeq));
        assert_eq!(
            recovered.queue_batch_root(1, 3, [0; 32], [0; 64]),
            Err(ControlError::BadSeq)
        );
        recovered.queue_batch_root(3, 5, [0; 32], [0; 64]).unwrap();
    }
}
