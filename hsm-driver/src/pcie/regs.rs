//! The device interface: register offsets in the BAR, the geometry the device publishes,
//! and the fixed-size submission and completion descriptors. Layout only, no I/O: both
//! the driver ([`super::PcieClient`]) and the emulator's firmware use these, and every
//! check of a value that came from the other side lives here so it is unit-tested.
//!
//! Byte order: every multi-byte field is little-endian. Registers that are read or
//! written concurrently by both sides are accessed as native atomics, so the driver only
//! builds for little-endian hosts (checked below); descriptors are zerocopy types with
//! explicit little-endian fields. docs/hsm-pcie.md is the prose version of this file.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

#[cfg(not(target_endian = "little"))]
compile_error!("the PCIe interface accesses little-endian registers as native atomics");

/// `"TXPC"` read as a little-endian u32 at BAR offset 0.
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"TXPC");
/// Interface version in BAR offset 4.
pub const INTERFACE_VERSION: u32 = 1;
/// Bytes of the register block (BAR 0). The DMA region starts right after it in a file
/// mapping.
pub const BAR_BYTES: usize = 4096;
/// Bytes of one data chunk: data buffers are whole chunks at chunk-aligned offsets.
pub const CHUNK_BYTES: usize = 4096;
/// Most queue pairs a device may expose (the queue register blocks fill the BAR).
pub const QUEUES_MAX: usize = 30;
/// Fewest entries per ring.
pub const RING_ENTRIES_MIN: u32 = 2;
/// Most entries per ring (tags are u16 and the driver scans its slots linearly).
pub const RING_ENTRIES_MAX: u32 = 1024;
/// Largest data area of one queue. Bounds what a hostile geometry can make the driver
/// believe it may touch, and the allocator's bitmap (64 MiB / 4 KiB = 16,384 bits).
pub const QUEUE_DATA_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Bytes of one submission descriptor.
pub const SQ_ENTRY_BYTES: usize = 64;
/// Bytes of one completion descriptor.
pub const CQ_ENTRY_BYTES: usize = 32;

// Device register offsets (BAR 0). u64 registers are 8-aligned, u32 registers 4-aligned,
// so that each can be accessed as one native atomic.
/// u32 [`DEVICE_MAGIC`]; written last-but-status at start-up.
pub const REG_MAGIC: usize = 0x00;
/// u32 [`INTERFACE_VERSION`].
pub const REG_VERSION: usize = 0x04;
/// u32 device status, one of the `STATUS_*` values.
pub const REG_STATUS: usize = 0x08;
/// u32 generation: bumped by every device start and reset. A driver that sees another
/// value than the one it enabled its queue under knows the device was reset.
pub const REG_GENERATION: usize = 0x0C;
/// u64 heartbeat: milliseconds since the firmware started, refreshed by its poll loop.
/// A value that stops changing means the firmware is dead or hung.
pub const REG_HEARTBEAT: usize = 0x10;
/// u32 number of queue pairs.
pub const REG_QUEUE_COUNT: usize = 0x18;
/// u32 entries per submission ring and per completion ring (a power of two).
pub const REG_QUEUE_ENTRIES: usize = 0x1C;
/// u32 [`CHUNK_BYTES`].
pub const REG_CHUNK_BYTES: usize = 0x20;
/// u32 driver → device: write a non-zero value to reset the whole device.
pub const REG_RESET: usize = 0x24;
/// u64 bytes of the DMA region the device uses (file mapping: the file minus the BAR).
pub const REG_DMA_BYTES: usize = 0x28;
/// u32 emulator debug register (fault injection, honoured only with
/// `--allow-fault-injection`): `op << 16 | queue`, see `FAULT_*`.
pub const REG_FAULT_INJECT: usize = 0x30;
/// u32 device → driver: the notifications the device implements, `FEATURE_*` bits. A
/// device of before the notifications reads 0 here (the offset was unused), and the
/// driver then only polls: the bits are how both generations interoperate without a
/// version bump.
pub const REG_FEATURES: usize = 0x34;
/// u32 the device-sleeping word (and futex word) of the doorbell wake: the device
/// stores a `SLEEP_*` value before it blocks; a driver that finds
/// [`SLEEP_DOORBELL`] after ringing a doorbell swaps it to [`SLEEP_AWAKE`] and wakes
/// the device (docs/hsm-pcie.md, "Notifications").
pub const REG_DEVICE_SLEEPING: usize = 0x38;
/// Offset of queue 0's register block.
pub const REG_QUEUES: usize = 0x100;
/// Bytes of one queue register block.
pub const QUEUE_REGS_BYTES: usize = 128;

// Offsets inside a queue register block.
/// u32 driver → device doorbell: the submission ring's tail (free-running index).
pub const Q_SQ_TAIL: usize = 0x00;
/// u32 driver → device doorbell: the completion ring's head (free-running index).
pub const Q_CQ_HEAD: usize = 0x04;
/// u64 driver → device: `generation << 32 | token` to (re)enable the queue; 0 disables.
pub const Q_ENABLE: usize = 0x08;
/// u64 device → driver: the `Q_ENABLE` value the queue runs under (0: disabled).
pub const Q_ENABLE_ACK: usize = 0x10;
/// u32 device → driver: queue status, one of `QSTATUS_*`.
pub const Q_STATUS: usize = 0x18;
/// u32 device → driver: why the queue is in error, one of `QERR_*`.
pub const Q_ERROR: usize = 0x1C;
/// u64 host-side claim: `pid << 32 | nonce` of the driver that owns the queue, 0 = free.
/// The device ignores it; drivers use it so that two shards never share a ring.
pub const Q_OWNER: usize = 0x20;
/// u64 device → driver: DMA offset of the submission ring.
pub const Q_SQ_OFFSET: usize = 0x28;
/// u64 device → driver: DMA offset of the completion ring.
pub const Q_CQ_OFFSET: usize = 0x30;
/// u64 device → driver: DMA offset of the queue's data area.
pub const Q_DATA_OFFSET: usize = 0x38;
/// u64 device → driver: bytes of the queue's data area.
pub const Q_DATA_BYTES: usize = 0x40;
/// u32 driver → device: non-zero arms the completion interrupt of the queue; the
/// device swaps it back to 0 when it signals (one interrupt per arming).
pub const Q_IRQ_ARM: usize = 0x48;
/// u64 driver → device: the token naming the driver's interrupt socket
/// ([`super::notify::irq_socket_name`]); 0: no interrupt channel.
pub const Q_IRQ_TOKEN: usize = 0x50;

const _: () = assert!(REG_QUEUES + QUEUES_MAX * QUEUE_REGS_BYTES <= BAR_BYTES);
const _: () = assert!(REG_DEVICE_SLEEPING + 4 <= REG_QUEUES);
const _: () = assert!(Q_IRQ_TOKEN + 8 <= QUEUE_REGS_BYTES);

/// Device status: not serving (never started, or shut down cleanly).
pub const STATUS_OFFLINE: u32 = 0;
/// Device status: starting or resetting; registers other than status may change.
pub const STATUS_RESETTING: u32 = 1;
/// Device status: serving.
pub const STATUS_READY: u32 = 2;

/// Queue status: disabled (after start, reset or an enable of 0).
pub const QSTATUS_DISABLED: u32 = 0;
/// Queue status: enabled, the device polls its submission ring.
pub const QSTATUS_READY: u32 = 1;
/// Queue status: stopped on an error the device cannot attribute to one command; the
/// driver must re-enable the queue (commands in flight are lost).
pub const QSTATUS_ERROR: u32 = 2;

/// Queue error: the submission tail doorbell is more than a ring ahead of the head.
pub const QERR_DOORBELL: u32 = 1;
/// Queue error: a submission descriptor failed its check.
pub const QERR_DESCRIPTOR: u32 = 2;
/// Queue error: the completion head doorbell is ahead of the tail.
pub const QERR_CQ_HEAD: u32 = 3;
/// Queue error: injected by the emulator's fault register.
pub const QERR_INJECTED: u32 = 4;

/// Fault op: reset the whole device.
pub const FAULT_RESET_DEVICE: u32 = 1;
/// Fault op: put the queue in error.
pub const FAULT_QUEUE_ERROR: u32 = 2;
/// Fault op: corrupt the response data CRC of the queue's next completion.
pub const FAULT_CORRUPT_DATA: u32 = 3;
/// Fault op: corrupt the queue's next completion descriptor itself.
pub const FAULT_CORRUPT_DESCRIPTOR: u32 = 4;

/// Feature bit: the device blocks when idle and honours the doorbell wake
/// ([`REG_DEVICE_SLEEPING`]).
pub const FEATURE_DOORBELL_WAKE: u32 = 1;
/// Feature bit: the device signals completions on queues whose interrupt is armed
/// ([`Q_IRQ_ARM`], [`Q_IRQ_TOKEN`]).
pub const FEATURE_COMPLETION_IRQ: u32 = 2;

/// Device-sleeping word: the device is running (or about to poll).
pub const SLEEP_AWAKE: u32 = 0;
/// Device-sleeping word: the device blocks until a doorbell wake (or its heartbeat
/// period). A driver that rang a doorbell wakes it.
pub const SLEEP_DOORBELL: u32 = 1;
/// Device-sleeping word: the device blocks waiting for its own command threads (every
/// one is busy, nothing new could start); drivers leave it alone.
pub const SLEEP_BUSY: u32 = 2;

/// Completion flag: the response did not fit the buffer; `response_len` is the size it
/// needs and no data was written.
pub const CQ_FLAG_OVERFLOW: u8 = 1;

/// Offset of register `field` of queue `queue` in the BAR.
pub const fn queue_reg(queue: usize, field: usize) -> usize {
    REG_QUEUES + queue * QUEUE_REGS_BYTES + field
}

/// One submission descriptor (driver → device), 64 bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct SubmissionEntry {
    /// The driver's slot for this command, `< entries`; echoed in the completion.
    pub tag: U16,
    /// Request opcode (the frame protocol's).
    pub opcode: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// Request body bytes at the start of the buffer.
    pub request_len: U32,
    /// The driver's correlation id; echoed in the completion.
    pub correlation_id: U64,
    /// Buffer offset within the queue's data area (chunk aligned).
    pub data_offset: U64,
    /// Buffer bytes: the request is read from it, the response written into it.
    pub buffer_bytes: U32,
    /// CRC32C of the request body.
    pub request_crc32c: U32,
    /// The token of the `Q_ENABLE` value the driver submitted under; a descriptor from
    /// before a queue reset carries an old token and is refused.
    pub token: U32,
    /// Reserved, zero.
    pub reserved: [u8; 24],
    /// CRC32C of bytes 0..60: a descriptor torn or scribbled on is detected.
    pub check: U32,
}

/// One completion descriptor (device → driver), 32 bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct CompletionEntry {
    /// The submission's tag.
    pub tag: U16,
    /// Response opcode (request opcode | 0x80).
    pub opcode: u8,
    /// `CQ_FLAG_*`.
    pub flags: u8,
    /// Frame protocol status (0 = ok; else the body is an error message).
    pub status: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// The submission's correlation id.
    pub correlation_id: U64,
    /// Response body bytes at the start of the buffer (with the overflow flag: the bytes
    /// needed).
    pub response_len: U32,
    /// CRC32C of the response body.
    pub response_crc32c: U32,
    /// The device's submission head after fetching this command (free-running).
    pub sq_head: U32,
    /// Bit 31: phase. Bits 0..31: CRC32C of bytes 0..28, low 31 bits. Written last, with
    /// release ordering: it publishes the whole entry.
    pub phase_check: U32,
}

const _: () = assert!(core::mem::size_of::<SubmissionEntry>() == SQ_ENTRY_BYTES);
const _: () = assert!(core::mem::size_of::<CompletionEntry>() == CQ_ENTRY_BYTES);

/// Offset of [`CompletionEntry::phase_check`] inside the entry.
pub const CQ_PHASE_OFFSET: usize = 28;
const PHASE_BIT: u32 = 1 << 31;

impl SubmissionEntry {
    /// A descriptor with its check computed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: u16,
        opcode: u8,
        correlation_id: u64,
        data_offset: u64,
        buffer_bytes: u32,
        request_len: u32,
        request_crc32c: u32,
        token: u32,
    ) -> Self {
        let mut e = Self {
            tag: U16::new(tag),
            opcode,
            flags: 0,
            request_len: U32::new(request_len),
            correlation_id: U64::new(correlation_id),
            data_offset: U64::new(data_offset),
            buffer_bytes: U32::new(buffer_bytes),
            request_crc32c: U32::new(request_crc32c),
            token: U32::new(token),
            reserved: [0; 24],
            check: U32::new(0),
        };
        e.check = U32::new(e.compute_check());
        e
    }

    fn compute_check(&self) -> u32 {
        crc32c::crc32c(&self.as_bytes()[..SQ_ENTRY_BYTES - 4])
    }

    /// Whether the check matches the rest of the descriptor.
    pub fn check_ok(&self) -> bool {
        self.check.get() == self.compute_check()
    }
}

/// Why the device refuses one submission descriptor (it answers the command with an
/// error when it can trust the tag, else it stops the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmissionError {
    /// The check does not match: nothing in the descriptor can be trusted.
    #[error("descriptor check mismatch")]
    Check,
    /// Tag not below the ring's entries.
    #[error("tag {0} out of range")]
    Tag(u16),
    /// Submitted under another enable token (before a queue reset).
    #[error("stale token")]
    Token,
    /// The buffer is not inside the queue's data area, or the request is longer than
    /// the buffer.
    #[error("buffer outside the data area")]
    Buffer,
    /// Reserved bits set.
    #[error("reserved bits set")]
    Reserved,
}

/// A submission the device accepted: every field bounds-checked against the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidSubmission {
    /// Tag.
    pub tag: u16,
    /// Request opcode byte.
    pub opcode: u8,
    /// Correlation id.
    pub correlation_id: u64,
    /// Buffer offset in the data area.
    pub data_offset: usize,
    /// Buffer bytes.
    pub buffer_bytes: usize,
    /// Request bytes.
    pub request_len: usize,
    /// CRC32C of the request.
    pub request_crc32c: u32,
}

impl SubmissionEntry {
    /// Device side: checks a descriptor read from queue memory against the queue's
    /// entries, its current token and its data area. `Err(Check)` means the tag cannot
    /// be trusted either; other errors can be answered on the tag.
    pub fn validate(
        &self,
        entries: u32,
        token: u32,
        data_bytes: usize,
    ) -> Result<ValidSubmission, SubmissionError> {
        if !self.check_ok() {
            return Err(SubmissionError::Check);
        }
        let tag = self.tag.get();
        if u32::from(tag) >= entries {
            return Err(SubmissionError::Tag(tag));
        }
        if self.token.get() != token {
            return Err(SubmissionError::Token);
        }
        if self.flags != 0 || self.reserved != [0; 24] {
            return Err(SubmissionError::Reserved);
        }
        let offset =
            usize::try_from(self.data_offset.get()).map_err(|_| SubmissionError::Buffer)?;
        let bytes = self.buffer_bytes.get() as usize;
        let request_len = self.request_len.get() as usize;
        let end = offset.checked_add(bytes).ok_or(SubmissionError::Buffer)?;
        if end > data_bytes || request_len > bytes {
            return Err(SubmissionError::Buffer);
        }
        Ok(ValidSubmission {
            tag,
            opcode: self.opcode,
            correlation_id: self.correlation_id.get(),
            data_offset: offset,
            buffer_bytes: bytes,
            request_len,
            request_crc32c: self.request_crc32c.get(),
        })
    }
}

impl CompletionEntry {
    /// A completion (its `phase_check` is set by [`CompletionEntry::seal`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tag: u16,
        opcode: u8,
        flags: u8,
        status: u16,
        correlation_id: u64,
        response_len: u32,
        response_crc32c: u32,
        sq_head: u32,
    ) -> Self {
        Self {
            tag: U16::new(tag),
            opcode,
            flags,
            status: U16::new(status),
            reserved: U16::new(0),
            correlation_id: U64::new(correlation_id),
            response_len: U32::new(response_len),
            response_crc32c: U32::new(response_crc32c),
            sq_head: U32::new(sq_head),
            phase_check: U32::new(0),
        }
    }

    fn body_check(&self) -> u32 {
        crc32c::crc32c(&self.as_bytes()[..CQ_PHASE_OFFSET]) & !PHASE_BIT
    }

    /// The `phase_check` word for this entry under `phase`; the device stores it last.
    pub fn seal(&self, phase: bool) -> u32 {
        self.body_check() | if phase { PHASE_BIT } else { 0 }
    }

    /// The phase bit of a `phase_check` word.
    pub fn phase_of(word: u32) -> bool {
        word & PHASE_BIT != 0
    }

    /// Driver side: whether `word` (the `phase_check` loaded with acquire ordering)
    /// checks out against the rest of this entry.
    pub fn check_ok(&self, word: u32) -> bool {
        word & !PHASE_BIT == self.body_check()
    }
}

/// The layout of one queue pair, as read from the BAR and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueGeometry {
    /// Entries per ring (power of two).
    pub entries: u32,
    /// DMA offset of the submission ring.
    pub sq_offset: usize,
    /// DMA offset of the completion ring.
    pub cq_offset: usize,
    /// DMA offset of the data area.
    pub data_offset: usize,
    /// Bytes of the data area (whole chunks).
    pub data_bytes: usize,
}

/// The device-wide layout, as read from the BAR and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGeometry {
    /// Queue pairs.
    pub queue_count: usize,
    /// Entries per ring.
    pub entries: u32,
    /// DMA bytes the device uses.
    pub dma_bytes: usize,
}

/// A geometry that does not fit the mapped regions: the device (or the file) is not
/// trustworthy and nothing is accessed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device geometry rejected: {0}")]
pub struct GeometryError(pub String);

fn bad(msg: impl Into<String>) -> GeometryError {
    GeometryError(msg.into())
}

impl DeviceGeometry {
    /// Checks raw register values against the mapped DMA size.
    pub fn validate(
        queue_count: u32,
        entries: u32,
        chunk_bytes: u32,
        dma_bytes: u64,
        mapped_dma_bytes: usize,
    ) -> Result<Self, GeometryError> {
        if queue_count == 0 || queue_count as usize > QUEUES_MAX {
            return Err(bad(format!("queue count {queue_count}")));
        }
        if !entries.is_power_of_two() || !(RING_ENTRIES_MIN..=RING_ENTRIES_MAX).contains(&entries) {
            return Err(bad(format!("ring entries {entries}")));
        }
        if chunk_bytes as usize != CHUNK_BYTES {
            return Err(bad(format!("chunk bytes {chunk_bytes}")));
        }
        let dma = usize::try_from(dma_bytes).map_err(|_| bad("dma bytes"))?;
        if dma > mapped_dma_bytes {
            return Err(bad(format!(
                "dma bytes {dma} beyond the {mapped_dma_bytes} mapped"
            )));
        }
        Ok(Self {
            queue_count: queue_count as usize,
            entries,
            dma_bytes: dma,
        })
    }
}

impl QueueGeometry {
    /// Checks one queue's raw offsets: every ring and the data area inside the DMA
    /// region, aligned, and not overlapping each other.
    pub fn validate(
        device: &DeviceGeometry,
        sq_offset: u64,
        cq_offset: u64,
        data_offset: u64,
        data_bytes: u64,
    ) -> Result<Self, GeometryError> {
        let entries = device.entries as usize;
        let span = |what: &str, offset: u64, len: usize, align: usize| {
            let start = usize::try_from(offset).map_err(|_| bad(format!("{what} offset")))?;
            let end = start
                .checked_add(len)
                .ok_or_else(|| bad(format!("{what} end overflows")))?;
            if start % align != 0 {
                return Err(bad(format!("{what} offset {start} not {align}-aligned")));
            }
            if end > device.dma_bytes {
                return Err(bad(format!("{what} ends at {end}, beyond the DMA region")));
            }
            Ok((start, end))
        };
        if data_bytes == 0
            || data_bytes > QUEUE_DATA_BYTES_MAX
            || data_bytes % CHUNK_BYTES as u64 != 0
        {
            return Err(bad(format!("data bytes {data_bytes}")));
        }
        let sq = span("submission ring", sq_offset, entries * SQ_ENTRY_BYTES, 64)?;
        let cq = span("completion ring", cq_offset, entries * CQ_ENTRY_BYTES, 64)?;
        let data = span("data area", data_offset, data_bytes as usize, CHUNK_BYTES)?;
        let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
        if overlap(sq, cq) || overlap(sq, data) || overlap(cq, data) {
            return Err(bad("rings and data area overlap"));
        }
        Ok(Self {
            entries: device.entries,
            sq_offset: sq.0,
            cq_offset: cq.0,
            data_offset: data.0,
            data_bytes: data_bytes as usize,
        })
    }
}

/// The layout a device lays out for `queues` queue pairs of `entries` entries and
/// `data_bytes` of data each: per queue, the submission ring, the completion ring
/// (each padded to a chunk), then the data area. Returns the per-queue geometries and
/// the DMA bytes needed.
pub fn plan_layout(
    queues: usize,
    entries: u32,
    data_bytes: usize,
) -> Result<(Vec<QueueGeometry>, usize), GeometryError> {
    let round = |n: usize| n.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
    let device = DeviceGeometry::validate(
        u32::try_from(queues).map_err(|_| bad("queues"))?,
        entries,
        CHUNK_BYTES as u32,
        0,
        0,
    )?;
    let sq = round(entries as usize * SQ_ENTRY_BYTES);
    let cq = round(entries as usize * CQ_ENTRY_BYTES);
    let per_queue = sq + cq + data_bytes;
    let total = per_queue
        .checked_mul(queues)
        .ok_or_else(|| bad("layout size overflows"))?;
    let whole = DeviceGeometry {
        dma_bytes: total,
        ..device
    };
    let mut out = Vec::with_capacity(queues);
    for q in 0..queues {
        let base = q * per_queue;
        out.push(QueueGeometry::validate(
            &whole,
            base as u64,
            (base + sq) as u64,
            (base + sq + cq) as u64,
            data_bytes as u64,
        )?);
    }
    Ok((out, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_round_trip_and_validation() {
        let e = SubmissionEntry::new(3, 9, 77, 8192, 4096, 100, 0xABCD, 5);
        let v = e.validate(8, 5, 16384).expect("valid");
        assert_eq!(v.tag, 3);
        assert_eq!(v.data_offset, 8192);
        assert_eq!(v.request_len, 100);
        assert_eq!(e.validate(8, 6, 16384), Err(SubmissionError::Token));
        assert_eq!(e.validate(2, 5, 16384), Err(SubmissionError::Tag(3)));
        assert_eq!(e.validate(8, 5, 12287), Err(SubmissionError::Buffer));
        let mut torn = e;
        torn.data_offset = U64::new(0);
        assert_eq!(torn.validate(8, 5, 16384), Err(SubmissionError::Check));
        let long = SubmissionEntry::new(0, 9, 1, 0, 10, 11, 0, 5);
        assert_eq!(long.validate(8, 5, 16384), Err(SubmissionError::Buffer));
        let wrap = SubmissionEntry::new(0, 9, 1, u64::MAX - 10, 4096, 1, 0, 5);
        assert_eq!(
            wrap.validate(8, 5, usize::MAX),
            Err(SubmissionError::Buffer)
        );
    }

    #[test]
    fn completion_seal_and_check() {
        let c = CompletionEntry::new(1, 0x89, 0, 0, 42, 16, 7, 3);
        for phase in [false, true] {
            let w = c.seal(phase);
            assert_eq!(CompletionEntry::phase_of(w), phase);
            assert!(c.check_ok(w));
        }
        let mut other = c;
        other.response_len = U32::new(17);
        assert!(!other.check_ok(c.seal(true)));
    }

    #[test]
    fn geometry_rejects_out_of_region_and_overlap() {
        let d = DeviceGeometry::validate(2, 8, 4096, 1 << 20, 1 << 20).expect("device");
        assert!(QueueGeometry::validate(&d, 0, 4096, 8192, 4096).is_ok());
        // Data area running past the DMA region.
        assert!(QueueGeometry::validate(&d, 0, 4096, (1 << 20) - 4096, 8192).is_err());
        // Offsets that overflow.
        assert!(QueueGeometry::validate(&d, u64::MAX - 1, 4096, 8192, 4096).is_err());
        // Overlap of the two rings.
        assert!(QueueGeometry::validate(&d, 0, 64, 8192, 4096).is_err());
        // Misaligned data.
        assert!(QueueGeometry::validate(&d, 0, 4096, 8193, 4096).is_err());
        // Device claims more DMA than is mapped.
        assert!(DeviceGeometry::validate(2, 8, 4096, 2 << 20, 1 << 20).is_err());
        assert!(DeviceGeometry::validate(2, 6, 4096, 1 << 20, 1 << 20).is_err());
        assert!(DeviceGeometry::validate(0, 8, 4096, 1 << 20, 1 << 20).is_err());
    }

    #[test]
    fn planned_layout_validates() {
        let (queues, total) = plan_layout(4, 64, 1 << 20).expect("plan");
        assert_eq!(queues.len(), 4);
        let d = DeviceGeometry::validate(4, 64, 4096, total as u64, total).expect("device");
        for q in &queues {
            let again = QueueGeometry::validate(
                &d,
                q.sq_offset as u64,
                q.cq_offset as u64,
                q.data_offset as u64,
                q.data_bytes as u64,
            )
            .expect("valid");
            assert_eq!(&again, q);
        }
    }
}
