//! Sans-IO driver side of one queue pair: ring indices and phase, the tag table of
//! commands in flight, the data-buffer allocator, and the validation of every
//! completion. It touches device memory only through the bounds-checked [`MemRegion`]s
//! it is given, so tests drive it over [`super::mem::HeapMemory`] with a scripted (and
//! hostile) device (the emulator crate's sans-IO device side: `hsm-emulator/tests/pcie_queue.rs`).
//!
//! Memory ordering (docs/hsm-pcie.md, "Memory ordering"):
//! - submit: the data buffer and the descriptor are written with plain copies, then the
//!   tail doorbell is stored with `Release`; the device loads it with `Acquire`, so it
//!   sees the descriptor and the data.
//! - complete: the device writes the data and bytes 0..28 of the completion, then
//!   stores the `phase_check` word with `Release`; the driver loads that word with
//!   `Acquire` before copying the rest, so a matching phase means the entry and its
//!   data are visible.
//! - consume: after copying completions out the driver stores the head doorbell with
//!   `Release`; the device loads it with `Acquire` before reusing those slots.
//!
//! Nothing from the device is trusted: the completion is copied out once and then
//! validated (check word, tag in range and in flight, correlation id, opcode, length
//! within the buffer the driver itself allocated, data CRC). A completion that is wrong
//! in its identity is fatal to the queue (it cannot be attributed to a call); one that
//! is wrong in its content fails only its call.

use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::mem::{MemRegion, OutOfBounds};
use super::regs::{
    queue_reg, CompletionEntry, QueueGeometry, SubmissionEntry, CHUNK_BYTES, CQ_ENTRY_BYTES,
    CQ_FLAG_OVERFLOW, CQ_PHASE_OFFSET, Q_CQ_HEAD, Q_SQ_TAIL, SQ_ENTRY_BYTES,
};
use crate::proto::{
    EncodeError, FrameHeader, Opcode, Request, Response, FRAME_BODY_BYTES_MAX, FRAME_MAGIC,
    PROTOCOL_VERSION,
};

/// Bytes copied (and checksummed) at a time when a request is written into its buffer:
/// the CRC then reads each piece from cache right after the copy.
const COPY_PIECE_BYTES: usize = 16 * 1024;
use crate::tcp::HsmError;

/// A run of data chunks: `chunks` chunks from chunk `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First chunk.
    pub first: usize,
    /// Chunks.
    pub chunks: usize,
}

impl Extent {
    /// Byte offset in the data area.
    pub fn offset(&self) -> usize {
        self.first * CHUNK_BYTES
    }
    /// Bytes.
    pub fn bytes(&self) -> usize {
        self.chunks * CHUNK_BYTES
    }
}

/// First-fit allocator of contiguous chunk runs over a bitmap (one bit per chunk).
/// Commands complete out of order, so a ring allocator would fragment into stalls; a
/// bitmap of at most 16,384 bits is scanned a word at a time.
#[derive(Debug, Clone)]
pub struct ChunkAllocator {
    used: Vec<u64>,
    chunks: usize,
    free: usize,
}

impl ChunkAllocator {
    /// `chunks` free chunks.
    pub fn new(chunks: usize) -> Self {
        Self {
            used: vec![0; chunks.div_ceil(64)],
            chunks,
            free: chunks,
        }
    }

    /// Total chunks.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Free chunks.
    pub fn free_chunks(&self) -> usize {
        self.free
    }

    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, start: usize, n: usize, used: bool) {
        for i in start..start + n {
            if used {
                self.used[i / 64] |= 1 << (i % 64);
            } else {
                self.used[i / 64] &= !(1 << (i % 64));
            }
        }
    }

    /// A free run of `n` chunks (first fit), or `None`.
    pub fn alloc(&mut self, n: usize) -> Option<Extent> {
        if n == 0 || n > self.free {
            return None;
        }
        let mut run_start = 0;
        let mut run = 0;
        let mut i = 0;
        while i < self.chunks {
            // Skip whole used words quickly.
            if i % 64 == 0 && self.used[i / 64] == u64::MAX {
                i += 64;
                run = 0;
                continue;
            }
            if self.is_used(i) {
                run = 0;
            } else {
                if run == 0 {
                    run_start = i;
                }
                run += 1;
                if run == n {
                    self.set(run_start, n, true);
                    self.free -= n;
                    return Some(Extent {
                        first: run_start,
                        chunks: n,
                    });
                }
            }
            i += 1;
        }
        None
    }

    /// Frees an extent returned by [`ChunkAllocator::alloc`].
    pub fn free(&mut self, e: Extent) {
        debug_assert!((e.first..e.first + e.chunks).all(|i| self.is_used(i)));
        self.set(e.first, e.chunks, false);
        self.free += e.chunks;
    }
}

/// What a finished call yields.
#[derive(Debug)]
pub enum Outcome {
    /// The answer (or why the call failed).
    Answer(Result<Response, HsmError>),
    /// The response needs `needed` bytes, more than the buffer given (only for commands
    /// submitted with overflow allowed, which are read-only and so safe to re-send).
    Overflow {
        /// Response bytes needed.
        needed: usize,
    },
}

#[derive(Debug)]
struct InFlight {
    cid: u64,
    /// Free-running submission-ring position of the descriptor.
    sq_pos: u32,
    opcode: Opcode,
    extent: Extent,
    waker: Option<Waker>,
    abandoned: bool,
    allow_overflow: bool,
}

#[derive(Debug)]
enum Slot {
    Free,
    InFlight(InFlight),
    Done { cid: u64, outcome: Outcome },
}

/// Why a submission cannot be made now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// No free tag, ring slot or data buffer: wait for completions (back-pressure).
    Full,
    /// The command needs a buffer of `needed` bytes; the data area has `max`.
    TooLarge {
        /// Bytes needed.
        needed: usize,
        /// Bytes of the whole data area.
        max: usize,
    },
    /// Device memory out of bounds (the geometry was validated, so this is a bug).
    Memory(OutOfBounds),
}

/// Why [`QueueEngine::submit_request`] did not submit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitRequestError {
    /// The request does not encode (a limit).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The submission itself failed.
    #[error("{0:?}")]
    Submit(SubmitError),
}

/// The queue cannot go on: the device broke the protocol (or memory was out of range);
/// the client fails every call in flight and re-enables the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue fault: {0}")]
pub struct QueueFault(pub String);

/// Counters of one queue engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Commands submitted.
    pub submitted: u64,
    /// Completions accepted.
    pub completed: u64,
    /// Completions whose content was rejected (bad length, CRC, opcode, body).
    pub rejected: u64,
}

/// Driver state of one queue pair.
#[derive(Debug)]
pub struct QueueEngine {
    geometry: QueueGeometry,
    queue: usize,
    token: u32,
    sq_tail: u32,
    sq_head: u32,
    cq_head: u32,
    phase: bool,
    slots: Vec<Slot>,
    in_flight: usize,
    limit: usize,
    alloc: ChunkAllocator,
    stats: EngineStats,
    /// Private copy of the response being decoded, reused from call to call.
    response: Vec<u8>,
}

impl QueueEngine {
    /// A fresh engine for queue `queue` with `geometry`, enabled under `token`, with at
    /// most `max_in_flight` commands outstanding (further bounded by the ring size).
    pub fn new(geometry: QueueGeometry, queue: usize, token: u32, max_in_flight: usize) -> Self {
        let entries = geometry.entries as usize;
        let mut slots = Vec::with_capacity(entries);
        slots.resize_with(entries, || Slot::Free);
        Self {
            geometry,
            queue,
            token,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            slots,
            in_flight: 0,
            limit: max_in_flight.clamp(1, entries),
            alloc: ChunkAllocator::new(geometry.data_bytes / CHUNK_BYTES),
            stats: EngineStats::default(),
            response: Vec::new(),
        }
    }

    /// Starts over on a re-enabled queue (after [`QueueEngine::fail_all`]): indices,
    /// phase and allocator reset; outcomes not yet taken are kept.
    pub fn reattach(&mut self, geometry: QueueGeometry, token: u32, max_in_flight: usize) {
        let entries = geometry.entries as usize;
        if self.slots.len() < entries {
            self.slots.resize_with(entries, || Slot::Free);
        }
        self.geometry = geometry;
        self.token = token;
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        self.limit = max_in_flight.clamp(1, entries);
        self.alloc = ChunkAllocator::new(geometry.data_bytes / CHUNK_BYTES);
    }

    /// The geometry in use.
    pub fn geometry(&self) -> &QueueGeometry {
        &self.geometry
    }

    /// Commands submitted and not yet completed (abandoned ones included: their buffers
    /// stay the device's until it completes them).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The data-buffer allocator, read-only (the queue tests, which live with the
    /// emulator's scripted device, check through it that no buffer leaks).
    pub fn allocator(&self) -> &ChunkAllocator {
        &self.alloc
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Largest buffer one command can have.
    pub fn max_buffer_bytes(&self) -> usize {
        self.geometry.data_bytes
    }

    /// Writes one command (`body` into a buffer of at least `response_capacity` bytes
    /// too), then rings the tail doorbell once. Returns its tag.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        bar: &MemRegion,
        dma: &MemRegion,
        opcode: Opcode,
        cid: u64,
        body: &[u8],
        response_capacity: usize,
        allow_overflow: bool,
    ) -> Result<u16, SubmitError> {
        self.submit_parts(
            bar,
            dma,
            opcode,
            cid,
            &[body],
            response_capacity,
            allow_overflow,
        )
    }

    /// [`QueueEngine::submit`] of `request`: the bulk commands' bodies
    /// ([`Request::body_parts`]) are copied from the request straight into the data
    /// area, the others encoded first. Saves the bulk's encode copy and its buffer (a
    /// ~1 MB allocation per TaxCodes of 4,096 invoices).
    pub fn submit_request(
        &mut self,
        bar: &MemRegion,
        dma: &MemRegion,
        request: &Request,
        cid: u64,
        response_capacity: usize,
        allow_overflow: bool,
    ) -> Result<u16, SubmitRequestError> {
        let opcode = request.opcode();
        let submitted = match request.body_parts()? {
            Some(parts) => self.submit_parts(
                bar,
                dma,
                opcode,
                cid,
                &[parts.head(), parts.bulk()],
                response_capacity,
                allow_overflow,
            ),
            None => {
                let mut body = Vec::new();
                request.encode_body(&mut body)?;
                self.submit(
                    bar,
                    dma,
                    opcode,
                    cid,
                    &body,
                    response_capacity,
                    allow_overflow,
                )
            }
        };
        submitted.map_err(SubmitRequestError::Submit)
    }

    /// [`QueueEngine::submit`] of the body made of `parts` in order (a gather list).
    /// Each part is copied into the buffer in pieces, and each piece checksummed right
    /// after it is copied, while it is still in cache: one pass through memory.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_parts(
        &mut self,
        bar: &MemRegion,
        dma: &MemRegion,
        opcode: Opcode,
        cid: u64,
        parts: &[&[u8]],
        response_capacity: usize,
        allow_overflow: bool,
    ) -> Result<u16, SubmitError> {
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        let bytes = body_len.max(response_capacity).max(1);
        let chunks = bytes.div_ceil(CHUNK_BYTES);
        if chunks > self.alloc.chunks() {
            return Err(SubmitError::TooLarge {
                needed: bytes,
                max: self.geometry.data_bytes,
            });
        }
        let entries = self.geometry.entries;
        if self.in_flight >= self.limit || self.sq_tail.wrapping_sub(self.sq_head) >= entries {
            return Err(SubmitError::Full);
        }
        let Some(tag) = self.slots[..entries as usize]
            .iter()
            .position(|s| matches!(s, Slot::Free))
        else {
            return Err(SubmitError::Full);
        };
        let extent = self.alloc.alloc(chunks).ok_or(SubmitError::Full)?;
        let write = || -> Result<(), OutOfBounds> {
            let mut at = self.geometry.data_offset + extent.offset();
            let mut crc = 0u32;
            for part in parts {
                for piece in part.chunks(COPY_PIECE_BYTES) {
                    dma.write(at, piece)?;
                    crc = crc32c::crc32c_append(crc, piece);
                    at += piece.len();
                }
            }
            let entry = SubmissionEntry::new(
                tag as u16,
                opcode.request_byte(),
                cid,
                extent.offset() as u64,
                extent.bytes() as u32,
                body_len as u32,
                crc,
                self.token,
            );
            let slot = (self.sq_tail & (entries - 1)) as usize;
            dma.write(
                self.geometry.sq_offset + slot * SQ_ENTRY_BYTES,
                entry.as_bytes(),
            )?;
            Ok(())
        };
        if let Err(e) = write() {
            self.alloc.free(extent);
            return Err(SubmitError::Memory(e));
        }
        let sq_pos = self.sq_tail;
        self.sq_tail = self.sq_tail.wrapping_add(1);
        let doorbell = bar
            .u32_at(queue_reg(self.queue, Q_SQ_TAIL))
            .map_err(SubmitError::Memory)?;
        // Release: the descriptor and the data above are visible to a device that
        // loads this tail with Acquire.
        doorbell.store(self.sq_tail, Ordering::Release);
        self.slots[tag] = Slot::InFlight(InFlight {
            cid,
            sq_pos,
            opcode,
            extent,
            waker: None,
            abandoned: false,
            allow_overflow,
        });
        self.in_flight += 1;
        self.stats.submitted += 1;
        Ok(tag as u16)
    }

    /// Consumes every published completion (at most one ring's worth), completes their
    /// calls, and rings the head doorbell once if any was consumed. Returns how many
    /// were consumed, or a fault that makes the queue unusable.
    pub fn poll(&mut self, bar: &MemRegion, dma: &MemRegion) -> Result<usize, QueueFault> {
        let entries = self.geometry.entries;
        let mut consumed = 0;
        let mut fault = None;
        while consumed < entries as usize {
            let slot = (self.cq_head & (entries - 1)) as usize;
            let at = self.geometry.cq_offset + slot * CQ_ENTRY_BYTES;
            let word = match dma.u32_at(at + CQ_PHASE_OFFSET) {
                // Acquire: pairs with the device's Release store of this word.
                Ok(w) => w.load(Ordering::Acquire),
                Err(e) => {
                    fault = Some(QueueFault(e.to_string()));
                    break;
                }
            };
            if CompletionEntry::phase_of(word) != self.phase {
                break;
            }
            let mut raw = [0u8; CQ_ENTRY_BYTES];
            if let Err(e) = dma.read(at, &mut raw) {
                fault = Some(QueueFault(e.to_string()));
                break;
            }
            // Validate the copy, never the shared bytes (which could change under us).
            let Ok(entry) = CompletionEntry::read_from_bytes(&raw) else {
                fault = Some(QueueFault("completion size".into()));
                break;
            };
            if let Err(f) = self.accept(&entry, word, dma) {
                fault = Some(f);
                break;
            }
            self.cq_head = self.cq_head.wrapping_add(1);
            if self.cq_head & (entries - 1) == 0 {
                self.phase = !self.phase;
            }
            consumed += 1;
        }
        if consumed > 0 {
            match bar.u32_at(queue_reg(self.queue, Q_CQ_HEAD)) {
                // Release: our reads of the consumed entries happen before the device
                // may overwrite them.
                Ok(d) => d.store(self.cq_head, Ordering::Release),
                Err(e) => fault = Some(QueueFault(e.to_string())),
            }
        }
        match fault {
            Some(f) => Err(f),
            None => Ok(consumed),
        }
    }

    fn accept(
        &mut self,
        e: &CompletionEntry,
        word: u32,
        dma: &MemRegion,
    ) -> Result<(), QueueFault> {
        if !e.check_ok(word) {
            return Err(QueueFault(
                "corrupt completion descriptor (check mismatch)".into(),
            ));
        }
        let tag = e.tag.get() as usize;
        let cid = e.correlation_id.get();
        let call = match self.slots.get(tag) {
            Some(Slot::InFlight(c)) if tag < self.geometry.entries as usize && c.cid == cid => c,
            _ => {
                return Err(QueueFault(format!(
                    "completion for tag {tag} / id {cid}, which is not in flight"
                )))
            }
        };
        // The device fetched this command before completing it, and nothing we did not
        // submit: its head lies in (position of this command, our tail]. Completions
        // come back out of order, so an older head may follow a newer one; the known
        // head only moves forward.
        let head = e.sq_head.get();
        let first = call.sq_pos.wrapping_add(1);
        if head.wrapping_sub(first) > self.sq_tail.wrapping_sub(first) {
            return Err(QueueFault(format!(
                "completion reports submission head {head}, outside {first}..={}",
                self.sq_tail
            )));
        }
        if head.wrapping_sub(self.sq_head) <= self.sq_tail.wrapping_sub(self.sq_head) {
            self.sq_head = head;
        }
        let extent = call.extent;
        let outcome = Self::outcome(&self.geometry, &mut self.response, e, call, dma);
        if matches!(outcome, Outcome::Answer(Err(HsmError::Malformed(_)))) {
            self.stats.rejected += 1;
        }
        self.stats.completed += 1;
        self.alloc.free(extent);
        self.in_flight -= 1;
        let Slot::InFlight(call) = std::mem::replace(&mut self.slots[tag], Slot::Free) else {
            return Ok(());
        };
        if !call.abandoned {
            self.slots[tag] = Slot::Done { cid, outcome };
            if let Some(w) = call.waker {
                w.wake();
            }
        }
        Ok(())
    }

    /// The call's outcome from a completion whose identity checked out. The response
    /// is copied into `response` (the engine's reused buffer) and decoded from there.
    fn outcome(
        geometry: &QueueGeometry,
        response: &mut Vec<u8>,
        e: &CompletionEntry,
        call: &InFlight,
        dma: &MemRegion,
    ) -> Outcome {
        let malformed = |m: String| Outcome::Answer(Err(HsmError::Malformed(m)));
        if e.opcode != call.opcode.response_byte() {
            return malformed(format!("completion opcode {:#x}", e.opcode));
        }
        let len = e.response_len.get() as usize;
        if e.flags & CQ_FLAG_OVERFLOW != 0 {
            if call.allow_overflow && len > call.extent.bytes() {
                return Outcome::Overflow { needed: len };
            }
            return malformed(format!("response of {len} bytes does not fit its buffer"));
        }
        if e.flags != 0 || e.reserved.get() != 0 {
            return malformed("reserved completion bits set".into());
        }
        // The length is the device's; the buffer bounds are ours.
        if len > call.extent.bytes() {
            return malformed(format!(
                "response length {len} beyond its {}-byte buffer",
                call.extent.bytes()
            ));
        }
        // Reused, and only grown (zeroed) past its largest length so far: no allocation
        // and no zeroing per answer in steady state. Bounded like the data area it
        // copies from; an unusually large answer's buffer is dropped after use below.
        if response.len() < len {
            response.resize(len, 0);
        }
        let body = &mut response[..len];
        if let Err(err) = dma.read(geometry.data_offset + call.extent.offset(), body) {
            return malformed(err.to_string());
        }
        let body = &*body;
        let crc = crc32c::crc32c(body);
        if crc != e.response_crc32c.get() {
            return malformed(format!(
                "response CRC32C {:#010x}, expected {crc:#010x}",
                e.response_crc32c.get()
            ));
        }
        let header = FrameHeader {
            magic: FRAME_MAGIC,
            version: PROTOCOL_VERSION,
            opcode: e.opcode,
            status: U16::new(e.status.get()),
            correlation_id: U64::new(e.correlation_id.get()),
            body_len: U32::new(len as u32),
            body_crc32c: U32::new(crc),
        };
        let answer = match Response::decode_frame(call.opcode, &header, body) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(device)) => Err(HsmError::from(device)),
            Err(err) => Err(HsmError::Malformed(err.to_string())),
        };
        if response.capacity() > FRAME_BODY_BYTES_MAX / 4 {
            *response = Vec::new();
        }
        Outcome::Answer(answer)
    }

    /// The outcome of call (`tag`, `cid`) if it finished (freeing its tag), else stores
    /// `waker`. A call no longer known (its queue was torn down and the outcome already
    /// taken) is `ConnectionLost`.
    pub fn poll_outcome(&mut self, tag: u16, cid: u64, waker: &Waker) -> Poll<Outcome> {
        let Some(slot) = self.slots.get_mut(tag as usize) else {
            return Poll::Ready(Outcome::Answer(Err(HsmError::ConnectionLost)));
        };
        match slot {
            Slot::InFlight(c) if c.cid == cid => {
                match &c.waker {
                    Some(w) if w.will_wake(waker) => {}
                    _ => c.waker = Some(waker.clone()),
                }
                Poll::Pending
            }
            Slot::Done { cid: done, .. } if *done == cid => {
                match std::mem::replace(slot, Slot::Free) {
                    Slot::Done { outcome, .. } => Poll::Ready(outcome),
                    _ => Poll::Ready(Outcome::Answer(Err(HsmError::ConnectionLost))),
                }
            }
            _ => Poll::Ready(Outcome::Answer(Err(HsmError::ConnectionLost))),
        }
    }

    /// The caller gave up on (`tag`, `cid`) (deadline or dropped future). A command
    /// still in flight keeps its tag and buffer until the device completes it or the
    /// queue is reset: the device may still be writing into that buffer.
    pub fn abandon(&mut self, tag: u16, cid: u64) {
        if let Some(slot) = self.slots.get_mut(tag as usize) {
            match slot {
                Slot::InFlight(c) if c.cid == cid => {
                    c.abandoned = true;
                    c.waker = None;
                }
                Slot::Done { cid: done, .. } if *done == cid => *slot = Slot::Free,
                _ => {}
            }
        }
    }

    /// The queue is gone (device reset, queue error, fault): every call in flight
    /// finishes with `make_error()`, abandoned ones are forgotten, all buffers are free
    /// (the device no longer owns any). Returns the calls failed.
    pub fn fail_all(&mut self, make_error: impl Fn() -> HsmError) -> usize {
        let mut failed = 0;
        for slot in &mut self.slots {
            if let Slot::InFlight(c) = slot {
                let waker = c.waker.take();
                if c.abandoned {
                    *slot = Slot::Free;
                } else {
                    let cid = c.cid;
                    *slot = Slot::Done {
                        cid,
                        outcome: Outcome::Answer(Err(make_error())),
                    };
                    failed += 1;
                }
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
        self.in_flight = 0;
        self.alloc = ChunkAllocator::new(self.geometry.data_bytes / CHUNK_BYTES);
        failed
    }
}
