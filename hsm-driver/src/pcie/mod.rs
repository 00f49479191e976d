//! PCIe transport to the tax server: shared-memory queue pairs, polled from the shard's
//! own executor, no system call per command in steady state (the way SPDK and DPDK
//! drive devices from user space).
//!
//! The device interface (docs/hsm-pcie.md) is a register block (BAR 0: identity,
//! status, generation, heartbeat, reset, geometry, per-queue doorbells and ring
//! addresses) and a DMA region holding, per queue pair, a submission ring of 64-byte
//! descriptors, a completion ring of 32-byte descriptors with a phase bit, and a data
//! area of 4 KiB chunks that the descriptors point to. Commands and answers are the
//! same bodies, opcodes and statuses as over TCP ([`crate::proto`]), so the two
//! transports have one semantics.
//!
//! - [`regs`]: layout constants and zerocopy descriptor types, and the validation of
//!   anything read from the other side (sans-IO).
//! - [`mem`]: the mappings (file, heap, VFIO) behind [`mem::DeviceMemory`]; every access
//!   is bounds-checked there.
//! - [`queue`]: the driver's sans-IO queue engine (indices, phase, tags, buffers).
//! - [`notify`]: the doorbell wake (futex) and the naming of completion interrupt
//!   (datagram) sockets, for when a side stops polling.
//!
//! The device's side of the rings (fetching submissions, posting completions) and the
//! sender of completion interrupts belong to the emulator crate
//! (`hsm_emulator::pcie::device`, `hsm_emulator::pcie::notify`); its tests drive this
//! crate's [`queue`] engine against that scripted device.
//! - [`PcieClient`]: the glommio shell a shard uses.

mod client;
pub mod mem;
pub mod notify;
pub mod queue;
pub mod regs;

use std::time::Duration;

pub use client::{PcieClient, PcieStats};

use crate::proto::{
    Request, DEVICE_STRING_BYTES_MAX, ERROR_MESSAGE_BYTES_MAX, TAXPAYERS_MAX, TAXPAYER_BYTES,
    TAX_CODE_ITEM_BYTES,
};
use crate::tcp::TcpClientConfig;

/// First response buffer of an Inventory (whose answer has no useful static bound: up
/// to 65,536 segments per taxpayer). A larger answer comes back as an overflow with the
/// size needed and the command is sent again with that buffer (it is read-only).
pub const INVENTORY_RESPONSE_BYTES_INITIAL: usize = 64 * 1024;

/// Which queue pair a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueSelect {
    /// The first queue no live driver owns.
    Any,
    /// This queue (fails if a live driver owns it).
    Index(usize),
}

/// Settings of a PCIe client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieClientConfig {
    /// Longest wait for the device to acknowledge the queue enable (attach).
    pub connect_timeout: Duration,
    /// Deadline of one call, including waits for ring space and re-attach.
    pub call_timeout: Duration,
    /// Most calls in flight (further bounded by the ring's entries); more wait.
    pub max_in_flight: usize,
    /// After the last completion, poll without sleeping for this long: a shard that
    /// has just been answered is likely to send again soon.
    pub spin: Duration,
    /// First sleep between polls once the spin is over (commands in flight only; with
    /// nothing in flight the poller sleeps until a call wakes it).
    pub backoff_min: Duration,
    /// Longest sleep between polls (the sleep doubles up to this). Bounds the extra
    /// latency of a slow command's completion. Used only without completion
    /// interrupts (disabled, not offered by the device, or found not to arrive).
    pub backoff_max: Duration,
    /// Wait for the device's completion interrupt instead of sleeping in steps once the
    /// spin is over (when the device offers it and the interrupt socket could be
    /// bound). False: timed back-off only.
    pub completion_interrupts: bool,
    /// Longest wait for a completion interrupt: at this bound the poller looks at the
    /// ring and the device's health anyway (a lost interrupt costs at most this).
    pub interrupt_wait_max: Duration,
    /// A heartbeat register that does not change for this long means the device (the
    /// emulator's firmware) is dead: calls in flight fail, the queue is re-attached.
    pub heartbeat_timeout: Duration,
    /// First wait before re-attaching after a failed attach.
    pub reattach_backoff_min: Duration,
    /// Longest wait between attach attempts.
    pub reattach_backoff_max: Duration,
}

impl Default for PcieClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            // As TcpClientConfig: a 4,096-invoice batch takes the emulator ~10 ms.
            call_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
            // 30 µs covers a Nop round trip, so a ping-pong caller never pays a
            // timer; longer work falls back to sleeping, which leaves the core to the
            // shard's other tasks (and, on a machine shared with the emulator, to the
            // emulator's crypto).
            spin: Duration::from_micros(30),
            backoff_min: Duration::from_micros(10),
            // A 64-invoice batch takes ~150-200 µs of crypto. Capping the sleep at
            // 100 µs bounds the added latency; shorter sleeps measured no better on
            // this 2-core machine, where every wake-up takes CPU from the emulator.
            backoff_max: Duration::from_micros(100),
            completion_interrupts: true,
            // Long enough that a bulk command (~10 ms for 4,096 invoices) costs one or
            // two timer wake-ups, short enough that a device whose interrupts never
            // arrive is noticed (three misses) within tens of milliseconds.
            interrupt_wait_max: Duration::from_millis(5),
            // The firmware refreshes it every millisecond or so even when idle.
            heartbeat_timeout: Duration::from_millis(500),
            reattach_backoff_min: Duration::from_millis(10),
            reattach_backoff_max: Duration::from_secs(1),
        }
    }
}

impl From<TcpClientConfig> for PcieClientConfig {
    /// The same deadlines and bounds as a TCP client, PCIe polling defaults.
    fn from(t: TcpClientConfig) -> Self {
        Self {
            connect_timeout: t.connect_timeout,
            call_timeout: t.call_timeout,
            max_in_flight: t.max_in_flight,
            reattach_backoff_min: t.reconnect_backoff_min,
            reattach_backoff_max: t.reconnect_backoff_max,
            ..Self::default()
        }
    }
}

/// Bytes of response buffer a request needs (at least room for an error message), and
/// whether an overflow may be answered by sending again (read-only commands only).
pub fn response_capacity(request: &Request) -> (usize, bool) {
    let (bytes, retry) = match request {
        Request::DeviceInfo => (
            2 * (1 + DEVICE_STRING_BYTES_MAX) + 65 + 1 + 4 + 2 + TAXPAYERS_MAX * TAXPAYER_BYTES,
            false,
        ),
        Request::Requisition { .. } => (16, false),
        Request::ReturnSegment { .. } => (0, false),
        Request::TaxCodes(batch) => (4 + batch.len() * TAX_CODE_ITEM_BYTES, false),
        Request::Sign { .. } => (64, false),
        Request::Upload(batch) => (4 + batch.len(), false),
        Request::ReportAndClear { .. } => (82, false),
        Request::Inventory(_) => (INVENTORY_RESPONSE_BYTES_INITIAL, true),
        Request::Nop(bytes) => (bytes.len(), false),
        Request::SetFaults(_) => (0, false),
    };
    (bytes.max(ERROR_MESSAGE_BYTES_MAX), retry)
}
