//! Sans-IO device side of one queue pair, used by the emulator's firmware and by the
//! tests as a scriptable device: fetching and validating submissions, and posting
//! completions with the phase protocol. The device trusts the driver no more than the
//! driver trusts it: doorbells are range-checked, descriptors checked, buffers kept
//! inside the queue's data area.

use std::sync::atomic::Ordering;

use zerocopy::{FromBytes, IntoBytes};

use hsm_driver::pcie::mem::{MemRegion, OutOfBounds};
use hsm_driver::pcie::regs::{
    queue_reg, CompletionEntry, QueueGeometry, SubmissionEntry, SubmissionError, ValidSubmission,
    CQ_ENTRY_BYTES, CQ_FLAG_OVERFLOW, CQ_PHASE_OFFSET, QERR_CQ_HEAD, QERR_DESCRIPTOR,
    QERR_DOORBELL, Q_CQ_HEAD, Q_SQ_TAIL, SQ_ENTRY_BYTES,
};

/// One fetched submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// A valid command; `sq_head` is the device's head after fetching it.
    Valid {
        /// The checked descriptor.
        sub: ValidSubmission,
        /// Head after this fetch.
        sq_head: u32,
    },
    /// A descriptor whose check passed but whose fields are refused; it is answered
    /// with an error on its tag (which is in range).
    Refused {
        /// Tag (in range).
        tag: u16,
        /// Correlation id.
        correlation_id: u64,
        /// Request opcode byte.
        opcode: u8,
        /// Why.
        error: SubmissionError,
        /// Head after this fetch.
        sq_head: u32,
    },
}

/// The device's submission-ring consumer.
#[derive(Debug, Clone)]
pub struct DeviceSq {
    geometry: QueueGeometry,
    queue: usize,
    head: u32,
}

impl DeviceSq {
    /// A consumer at head 0.
    pub fn new(geometry: QueueGeometry, queue: usize) -> Self {
        Self {
            geometry,
            queue,
            head: 0,
        }
    }

    /// The head (free-running).
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Submissions waiting behind the doorbell, or a queue error code if the doorbell
    /// is more than a ring ahead.
    pub fn pending(&self, bar: &MemRegion) -> Result<u32, u32> {
        let tail = bar
            .u32_at(queue_reg(self.queue, Q_SQ_TAIL))
            .map_err(|_| QERR_DOORBELL)?
            // Acquire: pairs with the driver's Release store; its descriptors are visible.
            .load(Ordering::Acquire);
        let pending = tail.wrapping_sub(self.head);
        if pending > self.geometry.entries {
            return Err(QERR_DOORBELL);
        }
        Ok(pending)
    }

    /// Fetches the next descriptor (call only while [`DeviceSq::pending`] > 0). A
    /// descriptor failing its check is a queue error (its tag cannot be trusted).
    pub fn fetch(&mut self, dma: &MemRegion, token: u32) -> Result<Fetched, u32> {
        let slot = (self.head & (self.geometry.entries - 1)) as usize;
        let mut raw = [0u8; SQ_ENTRY_BYTES];
        dma.read(self.geometry.sq_offset + slot * SQ_ENTRY_BYTES, &mut raw)
            .map_err(|_| QERR_DESCRIPTOR)?;
        self.head = self.head.wrapping_add(1);
        let entry = SubmissionEntry::read_from_bytes(&raw).map_err(|_| QERR_DESCRIPTOR)?;
        match entry.validate(self.geometry.entries, token, self.geometry.data_bytes) {
            Ok(sub) => Ok(Fetched::Valid {
                sub,
                sq_head: self.head,
            }),
            Err(SubmissionError::Check) => Err(QERR_DESCRIPTOR),
            Err(error) => Ok(Fetched::Refused {
                tag: entry.tag.get(),
                correlation_id: entry.correlation_id.get(),
                opcode: entry.opcode,
                error,
                sq_head: self.head,
            }),
        }
    }

    /// Copies the request body of `sub` out of the data area (the driver could change
    /// the shared bytes while the command runs; the copy cannot change).
    pub fn read_request(
        &self,
        dma: &MemRegion,
        sub: &ValidSubmission,
    ) -> Result<Vec<u8>, OutOfBounds> {
        let mut body = vec![0u8; sub.request_len];
        dma.read(self.geometry.data_offset + sub.data_offset, &mut body)?;
        Ok(body)
    }
}

/// Bytes copied (and then checksummed) at a time by [`read_request_into`]: small enough
/// that the CRC reads the piece from L1/L2 right after the copy wrote it, instead of a
/// second trip through memory for a ~1 MB batch.
const COPY_PIECE_BYTES: usize = 16 * 1024;

/// Copies the request body of `sub` out of the data area of the queue with `geometry`
/// into `buf` (the private copy a command runs on: the driver could change the shared
/// bytes meanwhile) and returns the CRC32C of that copy, computed piece by piece as it
/// is written. `buf` is reused from command to command: it keeps its largest length,
/// so a buffer that has been as large before is neither reallocated nor zeroed again.
/// The body is `buf[..sub.request_len]`.
pub fn read_request_into(
    geometry: &QueueGeometry,
    dma: &MemRegion,
    sub: &ValidSubmission,
    buf: &mut Vec<u8>,
) -> Result<u32, OutOfBounds> {
    let len = sub.request_len;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let base = geometry.data_offset + sub.data_offset;
    let mut crc = 0u32;
    let mut at = 0usize;
    for piece in buf[..len].chunks_mut(COPY_PIECE_BYTES) {
        dma.read(base + at, piece)?;
        crc = crc32c::crc32c_append(crc, piece);
        at += piece.len();
    }
    Ok(crc)
}

/// Deliberate damage to one completion (emulator fault injection and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// The data CRC is wrong: the driver must fail that call.
    DataCrc,
    /// The descriptor's check is wrong: the driver must not trust the entry at all.
    Descriptor,
}

/// The device's completion-ring producer.
#[derive(Debug, Clone)]
pub struct DeviceCq {
    geometry: QueueGeometry,
    queue: usize,
    tail: u32,
    phase: bool,
}

impl DeviceCq {
    /// A producer at tail 0, phase 1 (the ring is zeroed, so every entry reads phase 0).
    pub fn new(geometry: QueueGeometry, queue: usize) -> Self {
        Self {
            geometry,
            queue,
            tail: 0,
            phase: true,
        }
    }

    /// Zeroes the completion ring (queue enable), so no old entry carries phase 1.
    pub fn clear_ring(&self, dma: &MemRegion) -> Result<(), OutOfBounds> {
        dma.zero(
            self.geometry.cq_offset,
            self.geometry.entries as usize * CQ_ENTRY_BYTES,
        )
    }

    /// Whether a completion can be posted now; a queue error code if the driver's head
    /// doorbell is ahead of the tail.
    pub fn has_room(&self, bar: &MemRegion) -> Result<bool, u32> {
        let head = bar
            .u32_at(queue_reg(self.queue, Q_CQ_HEAD))
            .map_err(|_| QERR_CQ_HEAD)?
            // Acquire: the driver finished reading the entries it released.
            .load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.geometry.entries {
            return Err(QERR_CQ_HEAD);
        }
        Ok(used < self.geometry.entries)
    }

    /// Writes `body` into the command's buffer if it fits. Returns the completion's
    /// (flags, response_len).
    pub fn write_response(
        &self,
        dma: &MemRegion,
        sub: &ValidSubmission,
        body: &[u8],
    ) -> Result<(u8, u32), OutOfBounds> {
        let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
        if body.len() > sub.buffer_bytes {
            return Ok((CQ_FLAG_OVERFLOW, len));
        }
        dma.write(self.geometry.data_offset + sub.data_offset, body)?;
        Ok((0, len))
    }

    /// Posts `entry` (call only when [`DeviceCq::has_room`]): bytes 0..28 first, then
    /// the phase word with Release, which publishes the entry and the data written
    /// before it.
    pub fn post(
        &mut self,
        dma: &MemRegion,
        mut entry: CompletionEntry,
        corruption: Option<Corruption>,
    ) -> Result<(), OutOfBounds> {
        if corruption == Some(Corruption::DataCrc) {
            entry.response_crc32c = (entry.response_crc32c.get() ^ 0xDEAD_BEEF).into();
        }
        let mut word = entry.seal(self.phase);
        if corruption == Some(Corruption::Descriptor) {
            word ^= 0x0000_0101;
        }
        let slot = (self.tail & (self.geometry.entries - 1)) as usize;
        let at = self.geometry.cq_offset + slot * CQ_ENTRY_BYTES;
        dma.write(at, &entry.as_bytes()[..CQ_PHASE_OFFSET])?;
        dma.u32_at(at + CQ_PHASE_OFFSET)?
            .store(word, Ordering::Release);
        self.tail = self.tail.wrapping_add(1);
        if self.tail & (self.geometry.entries - 1) == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}
