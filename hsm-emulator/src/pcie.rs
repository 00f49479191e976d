//! The emulator's PCIe "firmware": serves the device interface of docs/hsm-pcie.md in a
//! shared file, with the same [`Emulator`] (state, keys, faults) as the TCP listener.
//!
//! - One firmware thread polls every enabled queue's submission doorbell, handles
//!   enables, resets and the fault register, refreshes the heartbeat, and fetches and
//!   validates descriptors. Cheap commands (Nop, DeviceInfo, SetFaults) run right there,
//!   so the transport's own round trip is not a thread hand-off; the rest go to a pool
//!   of worker threads, as over TCP, and complete out of order.
//! - Completions are posted under a per-queue lock (several workers share one ring),
//!   after checking that the queue was not reset since the command was fetched: a
//!   reset drops every command in flight, which the driver sees as `ConnectionLost`.
//! - Idle: after a command it ran itself the firmware polls (yielding the CPU between
//!   passes) for `--pcie-spin-us` (default 0: not at all), then sleeps until a doorbell
//!   wakes it (docs/hsm-pcie.md, "Notifications"): it publishes `SLEEP_DOORBELL` in the
//!   BAR's device-sleeping word, re-checks every doorbell, enable, reset and fault
//!   register (a driver that rang before it could see the word is caught here), and
//!   blocks in a futex wait on that word, at most `IDLE_WAIT_MAX` (10 ms: the heartbeat period and
//!   the latency bound for drivers that do not wake it). A driver that rings a doorbell
//!   and finds the word set swaps it back and wakes the firmware. So a command after a
//!   quiet spell is seen at once, and an idle emulator costs ~100 wake-ups a second.
//!   Handing a command to a worker ends the hard polling (the worker needs the core);
//!   while every worker is busy and a fetched command waits for one, the firmware
//!   sleeps with `SLEEP_BUSY` (drivers leave that alone) and a worker wakes it.
//! - Completion interrupts: after posting to a queue whose driver armed its interrupt,
//!   the posting thread disarms it and sends one datagram to the driver's socket.

pub mod device;
pub mod notify;

use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use zerocopy::FromBytes;

use super::server::{ServeError, JOBS_PER_THREAD};
use super::{lock, Emulator, PcieSettings};
use crate::pcie::notify::IrqSender;
use device::{Corruption, DeviceCq, DeviceSq, Fetched};
use hsm_driver::pcie::mem::{DeviceMemory, FileMapping, MemRegion};
use hsm_driver::pcie::notify::{futex_wait, futex_wake, WaitEnd};
use hsm_driver::pcie::regs::{
    plan_layout, queue_reg, CompletionEntry, QueueGeometry, SubmissionError, ValidSubmission,
    BAR_BYTES, CHUNK_BYTES, DEVICE_MAGIC, FAULT_CORRUPT_DATA, FAULT_CORRUPT_DESCRIPTOR,
    FAULT_QUEUE_ERROR, FAULT_RESET_DEVICE, FEATURE_COMPLETION_IRQ, FEATURE_DOORBELL_WAKE,
    INTERFACE_VERSION, QERR_DESCRIPTOR, QERR_INJECTED, QSTATUS_DISABLED, QSTATUS_ERROR,
    QSTATUS_READY, Q_CQ_OFFSET, Q_DATA_BYTES, Q_DATA_OFFSET, Q_ENABLE, Q_ENABLE_ACK, Q_ERROR,
    Q_IRQ_ARM, Q_IRQ_TOKEN, Q_OWNER, Q_SQ_OFFSET, Q_STATUS, REG_CHUNK_BYTES, REG_DEVICE_SLEEPING,
    REG_DMA_BYTES, REG_FAULT_INJECT, REG_FEATURES, REG_GENERATION, REG_HEARTBEAT, REG_MAGIC,
    REG_QUEUE_COUNT, REG_QUEUE_ENTRIES, REG_RESET, REG_STATUS, REG_VERSION, SLEEP_AWAKE,
    SLEEP_BUSY, SLEEP_DOORBELL, STATUS_OFFLINE, STATUS_READY, STATUS_RESETTING,
};
use hsm_driver::proto::{self, FrameHeader, Opcode, Status, FRAME_HEADER_BYTES};

/// Poll without sleeping this long after a worker's completion: not at all. Worker
/// commands are the long ones (TaxCodes of more than `INLINE_TAX_CODES_MAX` invoices:
/// ≥ ~100 µs of crypto, milliseconds in bulk), whose drivers (shards) commit their
/// journal before they send again, and their next doorbell wakes the firmware anyway.
/// (Before the doorbell wake this was 30 µs of polling, and 300 µs measured ~300 µs of
/// firmware CPU per command for nothing, on cores the appliance needs.)
const SPIN_AFTER_WORKER: Duration = Duration::ZERO;
/// Longest firmware sleep: the heartbeat period while idle, and how late the firmware
/// notices what does not wake it (the fault register, a driver without the doorbell
/// wake). Far below the driver's 500 ms heartbeat timeout.
const IDLE_WAIT_MAX: Duration = Duration::from_millis(10);
/// First back-off sleep of a thread waiting for room in a completion ring.
const SLEEP_MIN: Duration = Duration::from_micros(10);
/// Longest back-off sleep of a thread waiting for room in a completion ring.
const SLEEP_MAX: Duration = Duration::from_millis(1);
/// How often idle workers look at the shutdown flag.
const WORKER_POLL: Duration = Duration::from_millis(100);
/// Slice of a stall or latency sleep.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

const CORRUPT_NONE: u8 = 0;
const CORRUPT_DATA: u8 = 1;
const CORRUPT_DESCRIPTOR: u8 = 2;

struct QueueCq {
    cq: DeviceCq,
    /// The epoch the ring was last (re)initialised under.
    epoch: u64,
}

/// Device-side state of one queue shared by the firmware and the workers.
struct DevQueue {
    geometry: QueueGeometry,
    /// Bumped (before the lock is taken) whenever the queue is reset, disabled or put
    /// in error: a command fetched under another epoch is not answered.
    epoch: AtomicU64,
    cq: Mutex<QueueCq>,
    /// A worker found the driver's head doorbell broken: the firmware stops the queue.
    error: AtomicU32,
    corrupt_next: AtomicU8,
}

struct Dev {
    emulator: Arc<Emulator>,
    // Keeps `bar` and `dma` valid.
    _memory: Arc<FileMapping>,
    bar: MemRegion,
    dma: MemRegion,
    queues: Vec<DevQueue>,
    shutdown: AtomicBool,
    /// Completions posted by workers; the firmware restarts its polling window when it
    /// moves (the driver answered is about to submit again).
    posted: AtomicU64,
    /// Completion interrupts out (None: no socket, the feature is not offered).
    irq: Option<IrqSender>,
    /// Firmware polling after a command it ran itself.
    spin: Duration,
    /// Notification counters ([`FirmwareStats`]).
    stats: StatsCells,
}

/// The cells behind [`FirmwareStats`] (relaxed counters: statistics only).
#[derive(Default)]
struct StatsCells {
    sleeps: AtomicU64,
    wakes: AtomicU64,
    interrupts: AtomicU64,
    interrupt_errors: AtomicU64,
    inline: AtomicU64,
    handed: AtomicU64,
}

/// Counters of the firmware's notifications, for tests and operators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FirmwareStats {
    /// Times the firmware blocked (published the device-sleeping word and waited).
    pub sleeps: u64,
    /// Sleeps ended by a peer (a driver's doorbell wake, or a worker) rather than by
    /// the heartbeat period.
    pub wakes: u64,
    /// Completion interrupts sent.
    pub interrupts: u64,
    /// Completion interrupts that could not be sent (no such socket, its queue full).
    pub interrupt_errors: u64,
    /// Commands run on the firmware thread itself (small and cheap ones).
    pub inline: u64,
    /// Commands handed to a worker thread.
    pub handed: u64,
}

/// One command on its way to a worker: only its descriptor. The request body stays in
/// the data area until the thread that runs the command copies it out (so the firmware
/// thread never spends its time copying a large batch).
struct Job {
    queue: usize,
    epoch: u64,
    sub: ValidSubmission,
    sq_head: u32,
}

/// A running PCIe device.
pub struct PcieServer {
    dev: Arc<Dev>,
    path: PathBuf,
    queues: usize,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for PcieServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcieServer")
            .field("path", &self.path)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl PcieServer {
    /// The region file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue pairs served.
    pub fn queues(&self) -> usize {
        self.queues
    }

    /// Notification counters so far.
    pub fn stats(&self) -> FirmwareStats {
        let c = &self.dev.stats;
        FirmwareStats {
            sleeps: c.sleeps.load(Ordering::Relaxed),
            wakes: c.wakes.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
            interrupt_errors: c.interrupt_errors.load(Ordering::Relaxed),
            inline: c.inline.load(Ordering::Relaxed),
            handed: c.handed.load(Ordering::Relaxed),
        }
    }

    /// Stops the firmware and the workers and marks the device offline.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.dev.shutdown.store(true, Ordering::SeqCst);
        // The firmware may block for up to IDLE_WAIT_MAX: wake it.
        let word = reg32(&self.dev.bar, REG_DEVICE_SLEEPING);
        if word.swap(SLEEP_AWAKE, Ordering::SeqCst) != SLEEP_AWAKE {
            futex_wake(word, 1);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        reg32(&self.dev.bar, REG_STATUS).store(STATUS_OFFLINE, Ordering::Release);
    }
}

impl Drop for PcieServer {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

/// A register the layout guarantees is in range; a fallback atomic otherwise (never
/// reached: the BAR is at least `BAR_BYTES` and every offset is a constant below it).
fn reg32(bar: &MemRegion, off: usize) -> &AtomicU32 {
    static SINK: AtomicU32 = AtomicU32::new(0);
    bar.u32_at(off).unwrap_or(&SINK)
}

fn reg64(bar: &MemRegion, off: usize) -> &AtomicU64 {
    static SINK: AtomicU64 = AtomicU64::new(0);
    bar.u64_at(off).unwrap_or(&SINK)
}

fn pcie_error(path: &Path, e: impl std::fmt::Display) -> ServeError {
    ServeError::Pcie {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Creates (or re-initialises in place) the region of `settings` and serves it with
/// `emulator` on `threads` worker threads plus one firmware thread. The region is ready
/// (status READY, new generation) when this returns.
pub fn serve_pcie(
    emulator: Arc<Emulator>,
    settings: &PcieSettings,
    threads: usize,
) -> Result<PcieServer, ServeError> {
    let path = &settings.path;
    let data_bytes = settings.data_bytes.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
    let (geometries, dma_bytes) = plan_layout(settings.queues, settings.queue_entries, data_bytes)
        .map_err(|e| pcie_error(path, e))?;
    let memory =
        FileMapping::create(path, BAR_BYTES + dma_bytes).map_err(|e| pcie_error(path, e))?;
    // One device per region, as one emulator per data dir.
    // SAFETY: flock on the open descriptor; no memory passed.
    let rc = unsafe {
        libc::flock(
            std::os::unix::io::AsRawFd::as_raw_fd(memory.file()),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        return Err(pcie_error(path, "region is served by another emulator"));
    }
    let memory = Arc::new(memory);
    let bar = memory.bar();
    let dma = memory.dma();
    // Re-initialise in place: drivers that still map the file see the generation move
    // (or the status go through RESETTING) and re-attach.
    let previous = (reg32(&bar, REG_MAGIC).load(Ordering::Acquire) == DEVICE_MAGIC)
        .then(|| reg32(&bar, REG_GENERATION).load(Ordering::Acquire));
    let same_shape = previous.is_some()
        && reg32(&bar, REG_QUEUE_COUNT).load(Ordering::Acquire) as usize == settings.queues
        && reg32(&bar, REG_QUEUE_ENTRIES).load(Ordering::Acquire) == settings.queue_entries
        && reg64(&bar, REG_DMA_BYTES).load(Ordering::Acquire) == dma_bytes as u64;
    reg32(&bar, REG_STATUS).store(STATUS_RESETTING, Ordering::Release);
    reg32(&bar, REG_VERSION).store(INTERFACE_VERSION, Ordering::Relaxed);
    reg32(&bar, REG_QUEUE_COUNT).store(settings.queues as u32, Ordering::Relaxed);
    reg32(&bar, REG_QUEUE_ENTRIES).store(settings.queue_entries, Ordering::Relaxed);
    reg32(&bar, REG_CHUNK_BYTES).store(CHUNK_BYTES as u32, Ordering::Relaxed);
    reg64(&bar, REG_DMA_BYTES).store(dma_bytes as u64, Ordering::Relaxed);
    reg32(&bar, REG_RESET).store(0, Ordering::Relaxed);
    reg32(&bar, REG_FAULT_INJECT).store(0, Ordering::Relaxed);
    reg64(&bar, REG_HEARTBEAT).store(0, Ordering::Relaxed);
    reg32(&bar, REG_DEVICE_SLEEPING).store(SLEEP_AWAKE, Ordering::Relaxed);
    let irq = match IrqSender::new() {
        Ok(sender) => Some(sender),
        Err(e) => {
            tracing::warn!(error = %e, "no interrupt socket: PCIe completion interrupts off");
            None
        }
    };
    let features = FEATURE_DOORBELL_WAKE
        | if irq.is_some() {
            FEATURE_COMPLETION_IRQ
        } else {
            0
        };
    reg32(&bar, REG_FEATURES).store(features, Ordering::Relaxed);
    for (q, g) in geometries.iter().enumerate() {
        reg64(&bar, queue_reg(q, Q_SQ_OFFSET)).store(g.sq_offset as u64, Ordering::Relaxed);
        reg64(&bar, queue_reg(q, Q_CQ_OFFSET)).store(g.cq_offset as u64, Ordering::Relaxed);
        reg64(&bar, queue_reg(q, Q_DATA_OFFSET)).store(g.data_offset as u64, Ordering::Relaxed);
        reg64(&bar, queue_reg(q, Q_DATA_BYTES)).store(g.data_bytes as u64, Ordering::Relaxed);
        reg64(&bar, queue_reg(q, Q_ENABLE_ACK)).store(0, Ordering::Relaxed);
        reg32(&bar, queue_reg(q, Q_STATUS)).store(QSTATUS_DISABLED, Ordering::Relaxed);
        reg32(&bar, queue_reg(q, Q_ERROR)).store(0, Ordering::Relaxed);
        // Drivers write these again when they enable; a dead one's token is not kept.
        reg32(&bar, queue_reg(q, Q_IRQ_ARM)).store(0, Ordering::Relaxed);
        reg64(&bar, queue_reg(q, Q_IRQ_TOKEN)).store(0, Ordering::Relaxed);
        if !same_shape {
            // Claims on another layout mean nothing any more.
            reg64(&bar, queue_reg(q, Q_OWNER)).store(0, Ordering::Relaxed);
        }
    }
    let generation = match previous.map_or(1, |g| g.wrapping_add(1)) {
        0 => 1,
        g => g,
    };
    reg32(&bar, REG_GENERATION).store(generation, Ordering::Relaxed);
    reg32(&bar, REG_MAGIC).store(DEVICE_MAGIC, Ordering::Relaxed);
    // Release: every register above is visible to a driver that sees READY.
    reg32(&bar, REG_STATUS).store(STATUS_READY, Ordering::Release);
    let queues = geometries
        .iter()
        .enumerate()
        .map(|(q, g)| DevQueue {
            geometry: *g,
            epoch: AtomicU64::new(0),
            cq: Mutex::new(QueueCq {
                cq: DeviceCq::new(*g, q),
                epoch: 0,
            }),
            error: AtomicU32::new(0),
            corrupt_next: AtomicU8::new(CORRUPT_NONE),
        })
        .collect();
    let dev = Arc::new(Dev {
        emulator,
        _memory: memory,
        bar,
        dma,
        queues,
        shutdown: AtomicBool::new(false),
        posted: AtomicU64::new(0),
        irq,
        spin: Duration::from_micros(u64::from(settings.spin_us)),
        stats: StatsCells::default(),
    });
    let (tx, rx) = bounded::<Job>(threads * JOBS_PER_THREAD);
    let mut handles = Vec::with_capacity(threads + 1);
    for i in 0..threads {
        let dev = Arc::clone(&dev);
        let rx = rx.clone();
        handles.push(
            thread::Builder::new()
                .name(format!("hsm-emu-pcie-worker-{i}"))
                .spawn(move || worker(&dev, &rx))
                .map_err(ServeError::Spawn)?,
        );
    }
    {
        let dev = Arc::clone(&dev);
        handles.push(
            thread::Builder::new()
                .name("hsm-emu-pcie-firmware".into())
                .spawn(move || firmware(&dev, &tx, generation))
                .map_err(ServeError::Spawn)?,
        );
    }
    tracing::info!(
        path = %path.display(),
        queues = settings.queues,
        entries = settings.queue_entries,
        data_bytes,
        generation,
        "serving PCIe region"
    );
    Ok(PcieServer {
        dev,
        path: path.clone(),
        queues: settings.queues,
        threads: handles,
    })
}

/// The firmware's private view of one queue.
struct FwQueue {
    sq: DeviceSq,
    acked: u64,
    token: u32,
    enabled: bool,
}

struct Firmware<'a> {
    dev: &'a Dev,
    generation: u32,
    queues: Vec<FwQueue>,
}

impl Firmware<'_> {
    /// Stops queue `q`: commands in flight on it are not answered.
    fn stop_queue(&mut self, q: usize, status: u32, error: u32) {
        let dq = &self.dev.queues[q];
        dq.epoch.fetch_add(1, Ordering::AcqRel);
        reg32(&self.dev.bar, queue_reg(q, Q_ERROR)).store(error, Ordering::Relaxed);
        reg32(&self.dev.bar, queue_reg(q, Q_STATUS)).store(status, Ordering::Release);
        self.queues[q].enabled = false;
        if status == QSTATUS_ERROR {
            tracing::warn!(queue = q, error, "PCIe queue stopped on error");
        }
    }

    fn reset_device(&mut self) {
        let bar = &self.dev.bar;
        reg32(bar, REG_STATUS).store(STATUS_RESETTING, Ordering::Release);
        self.generation = match self.generation.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        for q in 0..self.queues.len() {
            self.stop_queue(q, QSTATUS_DISABLED, 0);
            self.queues[q].acked = 0;
            reg64(bar, queue_reg(q, Q_ENABLE_ACK)).store(0, Ordering::Release);
        }
        reg32(bar, REG_GENERATION).store(self.generation, Ordering::Release);
        reg32(bar, REG_STATUS).store(STATUS_READY, Ordering::Release);
        tracing::warn!(generation = self.generation, "PCIe device reset");
    }

    /// Follows the driver's enable register of queue `q`.
    fn follow_enable(&mut self, q: usize) {
        let bar = &self.dev.bar;
        let request = reg64(bar, queue_reg(q, Q_ENABLE)).load(Ordering::Acquire);
        if request == self.queues[q].acked {
            return;
        }
        if request == 0 {
            self.stop_queue(q, QSTATUS_DISABLED, 0);
            self.queues[q].acked = 0;
            reg64(bar, queue_reg(q, Q_ENABLE_ACK)).store(0, Ordering::Release);
            return;
        }
        if (request >> 32) as u32 != self.generation {
            // Written before a reset this driver has not noticed yet: wait for a fresh one.
            return;
        }
        let dq = &self.dev.queues[q];
        // Epoch first: a worker waiting for ring room gives up and frees the lock.
        let epoch = dq.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        {
            let mut cq = lock(&dq.cq);
            cq.cq = DeviceCq::new(dq.geometry, q);
            if let Err(e) = cq.cq.clear_ring(&self.dev.dma) {
                tracing::error!(queue = q, error = %e, "cannot clear completion ring");
                return;
            }
            cq.epoch = epoch;
        }
        dq.error.store(0, Ordering::Release);
        let fw = &mut self.queues[q];
        fw.sq = DeviceSq::new(dq.geometry, q);
        fw.token = request as u32;
        fw.enabled = true;
        fw.acked = request;
        reg32(bar, queue_reg(q, Q_ERROR)).store(0, Ordering::Relaxed);
        reg32(bar, queue_reg(q, Q_STATUS)).store(QSTATUS_READY, Ordering::Release);
        // Release: the cleared ring is visible before the driver sees the ack.
        reg64(bar, queue_reg(q, Q_ENABLE_ACK)).store(request, Ordering::Release);
        tracing::debug!(
            queue = q,
            generation = self.generation,
            "PCIe queue enabled"
        );
    }

    fn fault_register(&mut self) {
        let value = reg32(&self.dev.bar, REG_FAULT_INJECT).swap(0, Ordering::AcqRel);
        if value == 0 {
            return;
        }
        if !self.dev.emulator.allows_fault_injection() {
            tracing::warn!(
                value,
                "PCIe fault register written without --allow-fault-injection"
            );
            return;
        }
        let (op, q) = (value >> 16, (value & 0xFFFF) as usize);
        tracing::info!(op, queue = q, "PCIe fault injected");
        match op {
            FAULT_RESET_DEVICE => self.reset_device(),
            FAULT_QUEUE_ERROR if q < self.queues.len() => {
                self.stop_queue(q, QSTATUS_ERROR, QERR_INJECTED)
            }
            FAULT_CORRUPT_DATA if q < self.queues.len() => self.dev.queues[q]
                .corrupt_next
                .store(CORRUPT_DATA, Ordering::Release),
            FAULT_CORRUPT_DESCRIPTOR if q < self.queues.len() => self.dev.queues[q]
                .corrupt_next
                .store(CORRUPT_DESCRIPTOR, Ordering::Release),
            _ => tracing::warn!(op, queue = q, "unknown PCIe fault"),
        }
    }
}

impl Firmware<'_> {
    /// Whether anything a driver (or a worker) wrote asks for a pass: checked after the
    /// device-sleeping word is published and before blocking, so that a doorbell rung
    /// before the driver could see the word is not left waiting (see `sleep`).
    fn work_visible(&self, stalled: bool, tx: &Sender<Job>) -> bool {
        let dev = self.dev;
        let bar = &dev.bar;
        if dev.shutdown.load(Ordering::SeqCst) {
            return true;
        }
        if stalled {
            // Only room for the job in hand matters; the rings wait (back-pressure).
            return !tx.is_full();
        }
        if reg32(bar, REG_RESET).load(Ordering::SeqCst) != 0
            || reg32(bar, REG_FAULT_INJECT).load(Ordering::SeqCst) != 0
        {
            return true;
        }
        self.queues.iter().enumerate().any(|(q, fq)| {
            reg64(bar, queue_reg(q, Q_ENABLE)).load(Ordering::SeqCst) != fq.acked
                || dev.queues[q].error.load(Ordering::SeqCst) != 0
                || (fq.enabled && fq.sq.pending(bar) != Ok(0))
        })
    }

    /// Blocks until a driver's doorbell wake (or, `stalled`, a worker's), at most
    /// `IDLE_WAIT_MAX`. The word is stored, then a SeqCst fence, then every doorbell
    /// re-checked: a driver stores its doorbell, fences, then loads the word, so one of
    /// the two sees the other's store (docs/hsm-pcie.md, ordering table).
    fn sleep(&self, stalled: bool, tx: &Sender<Job>) {
        let dev = self.dev;
        let word = reg32(&dev.bar, REG_DEVICE_SLEEPING);
        let value = if stalled { SLEEP_BUSY } else { SLEEP_DOORBELL };
        word.store(value, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.work_visible(stalled, tx) {
            dev.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            match futex_wait(word, value, IDLE_WAIT_MAX) {
                WaitEnd::Woken | WaitEnd::Changed | WaitEnd::TimedOut => {}
                // A signal or an unexpected error: do not spin on it.
                WaitEnd::Other => thread::sleep(SLEEP_MIN),
            }
        }
        // A waker swapped the word to SLEEP_AWAKE before waking us: that is a wake.
        if word.swap(SLEEP_AWAKE, Ordering::SeqCst) != value {
            dev.stats.wakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn firmware(dev: &Dev, tx: &Sender<Job>, generation: u32) {
    // A futex timeout is a timer like any other: with Linux's default 50 µs timer slack
    // short waits (completion-ring back-off) would all be ~60 µs. 1 µs keeps them short.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
    let mut fw = Firmware {
        dev,
        generation,
        queues: dev
            .queues
            .iter()
            .enumerate()
            .map(|(q, dq)| FwQueue {
                sq: DeviceSq::new(dq.geometry, q),
                acked: 0,
                token: 0,
                enabled: false,
            })
            .collect(),
    };
    let start = Instant::now();
    let mut stalled: Option<Job> = None;
    let mut last_beat = u64::MAX;
    let mut last_posted = 0u64;
    let mut spin_until = Instant::now();
    // The inline commands' request copy and response frame, reused.
    let mut scratch = Scratch::default();
    while !dev.shutdown.load(Ordering::Acquire) {
        let beat = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        if beat != last_beat {
            reg64(&dev.bar, REG_HEARTBEAT).store(beat, Ordering::Release);
            last_beat = beat;
        }
        if reg32(&dev.bar, REG_RESET).swap(0, Ordering::AcqRel) != 0 {
            fw.reset_device();
        }
        fw.fault_register();
        // `answered`: a completion went out here: poll for `spin`, the driver answered
        // may submit again at once. `handed`: work went to a worker: stop polling so as
        // not to take the core from it. `worker_answered`: only a worker's completion
        // went out (see SPIN_AFTER_WORKER).
        let mut answered = false;
        let mut worker_answered = false;
        let mut handed = false;
        let posted = dev.posted.load(Ordering::Acquire);
        if posted != last_posted {
            last_posted = posted;
            worker_answered = true;
        }
        if let Some(job) = stalled.take() {
            match hand_off(dev, tx, job) {
                Ok(()) => handed = true,
                Err(job) => stalled = Some(job),
            }
        }
        for q in 0..fw.queues.len() {
            fw.follow_enable(q);
            let code = dev.queues[q].error.swap(0, Ordering::AcqRel);
            if code != 0 && fw.queues[q].enabled {
                fw.stop_queue(q, QSTATUS_ERROR, code);
            }
            // With a job waiting for a worker, fetch nothing more: the commands stay in
            // the rings (back-pressure), nothing is lost.
            if !fw.queues[q].enabled || stalled.is_some() {
                continue;
            }
            let pending = match fw.queues[q].sq.pending(&dev.bar) {
                Ok(n) => n,
                Err(code) => {
                    fw.stop_queue(q, QSTATUS_ERROR, code);
                    continue;
                }
            };
            for _ in 0..pending {
                let token = fw.queues[q].token;
                let fetched = fw.queues[q].sq.fetch(&dev.dma, token);
                match fetched {
                    Err(code) => {
                        fw.stop_queue(q, QSTATUS_ERROR, code);
                        break;
                    }
                    Ok(Fetched::Refused {
                        error: SubmissionError::Token | SubmissionError::Tag(_),
                        ..
                    }) => {
                        // The tag cannot be answered safely: stop the queue.
                        fw.stop_queue(q, QSTATUS_ERROR, QERR_DESCRIPTOR);
                        break;
                    }
                    Ok(Fetched::Refused {
                        tag,
                        correlation_id,
                        opcode,
                        error,
                        sq_head,
                    }) => {
                        let epoch = dev.queues[q].epoch.load(Ordering::Acquire);
                        refuse(dev, q, epoch, tag, correlation_id, opcode, sq_head, &error);
                        answered = true;
                    }
                    Ok(Fetched::Valid { sub, sq_head }) => {
                        let job = Job {
                            queue: q,
                            epoch: dev.queues[q].epoch.load(Ordering::Acquire),
                            sub,
                            sq_head,
                        };
                        if runs_inline(dev, q, &sub) {
                            dev.stats.inline.fetch_add(1, Ordering::Relaxed);
                            execute(dev, job, &mut scratch);
                            scratch.trim();
                            answered = true;
                        } else {
                            handed = true;
                            dev.stats.handed.fetch_add(1, Ordering::Relaxed);
                            if let Err(job) = hand_off(dev, tx, job) {
                                stalled = Some(job);
                                break;
                            }
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        if answered {
            spin_until = now + dev.spin;
        } else if worker_answered && !handed {
            spin_until = spin_until.max(now + SPIN_AFTER_WORKER);
        } else if handed {
            // Stop polling: the worker needs the core; the next doorbell wakes us.
            spin_until = now;
        } else if now < spin_until {
            thread::yield_now();
        } else {
            fw.sleep(stalled.is_some(), tx);
        }
    }
}

fn hand_off(dev: &Dev, tx: &Sender<Job>, job: Job) -> Result<(), Job> {
    match tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(job)) => Err(job),
        Err(TrySendError::Disconnected(_)) => {
            dev.shutdown.store(true, Ordering::Release);
            Ok(())
        }
    }
}

/// Largest TaxCodes batch the firmware computes itself (~3 µs per item: at most ~200 µs
/// that the other queues wait). Handing a small batch to a worker costs a thread
/// wake-up of tens of microseconds on a loaded machine, comparable to the crypto itself.
const INLINE_TAX_CODES_MAX: u32 = 64;

/// Commands that cost little and hold no lock worth mentioning run on the firmware
/// thread (Nop, DeviceInfo, TaxCodes of at most `INLINE_TAX_CODES_MAX` items), unless a
/// fault switch asks for delays, which must not stop the polling. SetFaults is never
/// delayed anyway. Everything else (durable writes, signatures, large batches) goes to
/// the workers, so one queue's long command does not hold up the others.
fn runs_inline(dev: &Dev, q: usize, sub: &ValidSubmission) -> bool {
    let opcode = sub.opcode;
    if opcode == Opcode::SetFaults.request_byte() {
        return true;
    }
    let faults = dev.emulator.faults();
    let quiet =
        faults.latency().is_zero() && faults.stall_remaining().is_none() && !faults.refusing();
    // The item count follows the holder at the start of the body: read just those 4
    // bytes (a private copy, as everything read from the shared area). The count only
    // picks the thread; the command itself is decoded from the copy the executing thread
    // makes.
    let small_batch = || {
        let mut count = [0u8; 4];
        opcode == Opcode::TaxCodes.request_byte()
            && sub.request_len >= proto::HOLDER_BYTES + count.len()
            && dev
                .dma
                .read(
                    dev.queues[q].geometry.data_offset + sub.data_offset + proto::HOLDER_BYTES,
                    &mut count,
                )
                .is_ok()
            && u32::from_le_bytes(count) <= INLINE_TAX_CODES_MAX
    };
    quiet
        && (opcode == Opcode::Nop.request_byte()
            || opcode == Opcode::DeviceInfo.request_byte()
            || small_batch())
}

#[allow(clippy::too_many_arguments)]
fn refuse(
    dev: &Dev,
    q: usize,
    epoch: u64,
    tag: u16,
    correlation_id: u64,
    opcode: u8,
    sq_head: u32,
    error: &SubmissionError,
) {
    tracing::debug!(queue = q, tag, %error, "PCIe descriptor refused");
    let entry = CompletionEntry::new(
        tag,
        opcode | proto::RESPONSE_FLAG,
        0,
        Status::Malformed as u16,
        correlation_id,
        0,
        crc32c::crc32c(&[]),
        sq_head,
    );
    post(dev, q, epoch, None, entry);
}

fn sleep_while(dev: &Dev, mut remaining: Duration) {
    while !remaining.is_zero() && !dev.shutdown.load(Ordering::Acquire) {
        let slice = remaining.min(SLEEP_SLICE);
        thread::sleep(slice);
        remaining = remaining.saturating_sub(slice);
    }
}

/// A command thread's reusable buffers: the private copy of the request and the
/// response frame. Kept across commands so that a bulk run allocates (and the kernel
/// zeroes pages) once, not per command.
#[derive(Default)]
struct Scratch {
    request: Vec<u8>,
    out: Vec<u8>,
}

impl Scratch {
    /// Drops buffers grown by an unusually large command (a 16 MiB Nop), so that one
    /// such command does not pin that much memory per thread; a TaxCodes of 4,096
    /// invoices (~1 MB) stays below the bound and keeps its buffer.
    fn trim(&mut self) {
        if self.request.capacity() > proto::FRAME_BODY_BYTES_MAX / 4 {
            self.request = Vec::new();
        }
        if self.out.capacity() > proto::FRAME_BODY_BYTES_MAX / 4 {
            self.out = Vec::new();
        }
    }
}

/// Runs one command as the TCP worker does (checksum, faults, `handle_frame`) and posts
/// its completion. The request is copied out of the data area here, on the thread that
/// runs it, with its CRC32C computed on the copy as it is made.
fn execute(dev: &Dev, job: Job, scratch: &mut Scratch) {
    let sub = job.sub;
    let q = job.queue;
    let dq = &dev.queues[q];
    let crc = match device::read_request_into(&dq.geometry, &dev.dma, &sub, &mut scratch.request) {
        Ok(crc) => crc,
        Err(_) => {
            // The descriptor was checked against the data area; a copy outside it means
            // the queue cannot be trusted: the firmware stops it.
            dq.error.store(QERR_DESCRIPTOR, Ordering::Release);
            return;
        }
    };
    let body = &scratch.request[..sub.request_len];
    let out = &mut scratch.out;
    out.clear();
    let control = sub.opcode == Opcode::SetFaults.request_byte();
    if crc != sub.request_crc32c {
        let _ = proto::encode_error(
            out,
            sub.opcode,
            sub.correlation_id,
            Status::ChecksumMismatch,
            "request body CRC32C mismatch",
        );
    } else {
        let faults = dev.emulator.faults();
        if !control {
            while let Some(left) = faults.stall_remaining() {
                if dev.shutdown.load(Ordering::Acquire) {
                    return;
                }
                thread::sleep(left.min(SLEEP_SLICE));
            }
            sleep_while(dev, faults.latency());
        }
        if !control && faults.refusing() {
            let _ = proto::encode_error(
                out,
                sub.opcode,
                sub.correlation_id,
                Status::Busy,
                "device refusing commands (fault)",
            );
        } else {
            // Effects (reset of TCP connections) concern the TCP shell only.
            let _ = dev
                .emulator
                .handle_frame(sub.opcode, sub.correlation_id, body, out);
        }
    }
    let Ok((header, body)) = FrameHeader::read_from_prefix(out) else {
        return;
    };
    let corruption = match dq.corrupt_next.swap(CORRUPT_NONE, Ordering::AcqRel) {
        CORRUPT_DATA => Some(Corruption::DataCrc),
        CORRUPT_DESCRIPTOR => Some(Corruption::Descriptor),
        _ => None,
    };
    debug_assert_eq!(body.len(), out.len() - FRAME_HEADER_BYTES);
    let entry = CompletionEntry::new(
        sub.tag,
        header.opcode,
        0,
        header.status.get(),
        sub.correlation_id,
        0,
        header.body_crc32c.get(),
        job.sq_head,
    );
    post_with_body(dev, q, job.epoch, &sub, body, corruption, entry);
}

fn post_with_body(
    dev: &Dev,
    q: usize,
    epoch: u64,
    sub: &ValidSubmission,
    body: &[u8],
    corruption: Option<Corruption>,
    mut entry: CompletionEntry,
) {
    let dq = &dev.queues[q];
    let mut cq = lock(&dq.cq);
    if !wait_for_room(dev, q, epoch, &mut cq) {
        return;
    }
    match cq.cq.write_response(&dev.dma, sub, body) {
        Ok((flags, len)) => {
            entry.flags = flags;
            entry.response_len = len.into();
        }
        Err(e) => {
            tracing::error!(queue = q, error = %e, "response outside the data area");
            return;
        }
    }
    if let Err(e) = cq.cq.post(&dev.dma, entry, corruption) {
        tracing::error!(queue = q, error = %e, "completion outside the ring");
        return;
    }
    drop(cq);
    interrupt(dev, q);
}

fn post(dev: &Dev, q: usize, epoch: u64, corruption: Option<Corruption>, entry: CompletionEntry) {
    let dq = &dev.queues[q];
    let mut cq = lock(&dq.cq);
    if !wait_for_room(dev, q, epoch, &mut cq) {
        return;
    }
    if let Err(e) = cq.cq.post(&dev.dma, entry, corruption) {
        tracing::error!(queue = q, error = %e, "completion outside the ring");
        return;
    }
    drop(cq);
    interrupt(dev, q);
}

/// Waits (holding the ring lock) until the completion ring has room. False if the
/// command's queue was reset meanwhile (drop the completion) or the device stops.
fn wait_for_room(dev: &Dev, q: usize, epoch: u64, cq: &mut QueueCq) -> bool {
    let dq = &dev.queues[q];
    let mut sleep = SLEEP_MIN;
    loop {
        if cq.epoch != epoch
            || dq.epoch.load(Ordering::Acquire) != epoch
            || dev.shutdown.load(Ordering::Acquire)
        {
            return false;
        }
        match cq.cq.has_room(&dev.bar) {
            Ok(true) => return true,
            Ok(false) => {
                thread::sleep(sleep);
                sleep = (sleep * 2).min(SLEEP_MAX);
            }
            Err(code) => {
                dq.error.store(code, Ordering::Release);
                return false;
            }
        }
    }
}

/// A worker is free again: if the firmware sleeps holding a job for want of one
/// (`SLEEP_BUSY`), wake it. The SeqCst fence pairs with the firmware's (store word,
/// fence, look at the channel): either it sees the room this worker's `recv` made, or
/// this load sees its word. Costs no system call otherwise.
fn wake_stalled_firmware(dev: &Dev) {
    fence(Ordering::SeqCst);
    let word = reg32(&dev.bar, REG_DEVICE_SLEEPING);
    if word.load(Ordering::Relaxed) == SLEEP_BUSY
        && word
            .compare_exchange(SLEEP_BUSY, SLEEP_AWAKE, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    {
        futex_wake(word, 1);
    }
}

/// After a completion was posted to queue `q`: if its driver armed the interrupt,
/// disarm it and signal. The SeqCst fence orders the completion's phase store before
/// the load of the arm (store-load); the driver stores the arm, fences, then re-polls
/// the ring. So either its re-poll sees the completion or this load sees the arm.
fn interrupt(dev: &Dev, q: usize) {
    let Some(irq) = &dev.irq else {
        return;
    };
    fence(Ordering::SeqCst);
    let arm = reg32(&dev.bar, queue_reg(q, Q_IRQ_ARM));
    if arm.load(Ordering::Relaxed) == 0 || arm.swap(0, Ordering::SeqCst) == 0 {
        return;
    }
    let token = reg64(&dev.bar, queue_reg(q, Q_IRQ_TOKEN)).load(Ordering::Acquire);
    if token == 0 {
        return;
    }
    match irq.signal(token) {
        Ok(()) => dev.stats.interrupts.fetch_add(1, Ordering::Relaxed),
        Err(_) => dev.stats.interrupt_errors.fetch_add(1, Ordering::Relaxed),
    };
}

fn worker(dev: &Dev, rx: &Receiver<Job>) {
    let mut scratch = Scratch::default();
    loop {
        match rx.recv_timeout(WORKER_POLL) {
            Ok(job) => {
                if dev.queues[job.queue].epoch.load(Ordering::Acquire) == job.epoch {
                    execute(dev, job, &mut scratch);
                    dev.posted.fetch_add(1, Ordering::Release);
                }
                scratch.trim();
                wake_stalled_firmware(dev);
            }
            Err(RecvTimeoutError::Timeout) => {
                if dev.shutdown.load(Ordering::Acquire) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The notifications against an in-process firmware (its counters are readable
    //! here) and a real `PcieClient` on a glommio executor. Every assertion is on
    //! answers and counters; every wait is bounded and none is a timing assertion.

    use super::*;
    use crate::{Config, Grant};
    use hsm_driver::pcie::{PcieClient, PcieClientConfig, PcieStats, QueueSelect};
    use hsm_driver::proto::{FaultConfig, Request, Response};

    const SELLER: &str = "91350100M000100Y43";

    struct Fixture {
        server: PcieServer,
        region: PathBuf,
        _dir: tempfile::TempDir,
    }

    fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("tmp");
        let grants = vec![Grant::new(SELLER, 144_031_900_111, 1, 1000).expect("grant")];
        let config = Config {
            allow_fault_injection: true,
            ..Config::new(&dir.path().join("emu"), grants)
        };
        let emulator = Emulator::open(&config).expect("emulator");
        let region = dir.path().join("region");
        let settings = PcieSettings {
            queues: 2,
            data_bytes: 1 << 20,
            ..PcieSettings::new(&region)
        };
        let server = serve_pcie(Arc::new(emulator), &settings, 2).expect("serve");
        Fixture {
            server,
            region,
            _dir: dir,
        }
    }

    fn config() -> PcieClientConfig {
        PcieClientConfig {
            call_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            ..PcieClientConfig::default()
        }
    }

    fn run<T: Send + 'static, Fut: std::future::Future<Output = T> + 'static>(
        f: impl FnOnce() -> Fut + Send + 'static,
    ) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(512 * 1024)
            .spawn(f)
            .expect("executor")
            .join()
            .expect("executor join")
    }

    async fn echo(client: &PcieClient, seed: u8) {
        let body: Vec<u8> = (0..300u16).map(|i| (i as u8).wrapping_add(seed)).collect();
        match client.call(&Request::Nop(body.clone())).await {
            Ok(Response::Nop(b)) => assert_eq!(b, body),
            other => panic!("wrong echo {other:?}"),
        }
    }

    /// The device-sleeping word of the region, through a mapping of our own.
    fn sleeping_word(region: &Path) -> u32 {
        let m = FileMapping::open(region).expect("map");
        reg32(&m.bar(), REG_DEVICE_SLEEPING).load(Ordering::SeqCst)
    }

    async fn set_latency(client: &PcieClient, latency_us: u32) {
        client
            .call(&Request::SetFaults(FaultConfig {
                latency_us,
                ..FaultConfig::default()
            }))
            .await
            .expect("set faults");
    }

    /// A small TaxCodes batch runs on the firmware thread (a worker's wake-up costs as
    /// much as the crypto), a large one on a worker: the count is read after the holder.
    #[test]
    fn small_tax_code_batches_run_inline_and_large_ones_on_workers() {
        let fx = start();
        let region = fx.region.clone();
        let server = Arc::new(Mutex::new(fx.server));
        run(move || async move {
            let client = PcieClient::connect(&region, QueueSelect::Any, config())
                .await
                .expect("attach");
            // A holder whose first bytes, read as a count, would be huge.
            let holder = proto::Holder::new(u128::MAX - 1, 0);
            let segment = match client
                .call(&Request::Requisition {
                    taxpayer: SELLER.as_bytes().try_into().expect("18 bytes"),
                    count: 200,
                    holder,
                    request_id: 1,
                })
                .await
            {
                Ok(Response::Requisition(s)) => s,
                other => panic!("requisition: {other:?}"),
            };
            for items in [2u32, INLINE_TAX_CODES_MAX + 1] {
                let mut batch = proto::InvoiceBatch::new();
                batch.set_holder(holder);
                for i in 0..items {
                    let mut invoice = vec![0u8; appliance_core::canonical::CANONICAL_HEADER_BYTES];
                    invoice[..4].copy_from_slice(&appliance_core::canonical::CANONICAL_MAGIC);
                    invoice[4..6].copy_from_slice(
                        &appliance_core::canonical::CANONICAL_VERSION.to_le_bytes(),
                    );
                    invoice[8..16].copy_from_slice(&segment.code.to_le_bytes());
                    invoice[16..20].copy_from_slice(&(segment.first + i).to_le_bytes());
                    invoice[60..78].copy_from_slice(SELLER.as_bytes());
                    batch.push(&invoice).expect("push");
                }
                let before = lock(&server).stats();
                match client.call(&Request::TaxCodes(batch)).await {
                    Ok(Response::TaxCodes(codes)) => {
                        assert_eq!(codes.len(), items as usize);
                        assert!(codes
                            .iter()
                            .all(|c| c.status() == Some(proto::TaxCodeStatus::Ok)));
                    }
                    other => panic!("tax codes: {other:?}"),
                }
                let after = lock(&server).stats();
                let ran_inline = after.inline > before.inline;
                assert_eq!(
                    ran_inline,
                    items <= INLINE_TAX_CODES_MAX,
                    "{items} items: {before:?} -> {after:?}"
                );
            }
        });
    }

    #[test]
    fn a_command_after_the_firmware_slept_is_answered_through_the_doorbell_wake() {
        let fx = start();
        let region = fx.region.clone();
        let server = Arc::new(Mutex::new(fx.server));
        let srv = Arc::clone(&server);
        let woken = run(move || async move {
            let client = PcieClient::connect(&region, QueueSelect::Any, config())
                .await
                .expect("attach");
            echo(&client, 1).await;
            // Up to 20 tries: the firmware may be between two heartbeat waits just as
            // we submit (then no wake is needed); the first try nearly always counts.
            for attempt in 0..20u8 {
                let sleeps = lock(&srv).stats().sleeps;
                for _ in 0..2000 {
                    if sleeping_word(&region) == SLEEP_DOORBELL
                        && lock(&srv).stats().sleeps > sleeps
                    {
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                let before = client.stats().device_wakes;
                echo(&client, attempt).await;
                if client.stats().device_wakes > before {
                    return true;
                }
            }
            false
        });
        assert!(woken, "no submission found the firmware asleep");
        let stats = lock(&server).stats();
        assert!(stats.sleeps >= 1, "{stats:?}");
        assert!(stats.wakes >= 1, "{stats:?}");
    }

    #[test]
    fn a_completion_in_flight_arrives_through_the_interrupt() {
        let fx = start();
        let region = fx.region.clone();
        let stats: PcieStats = run(move || async move {
            let client = PcieClient::connect(&region, QueueSelect::Any, config())
                .await
                .expect("attach");
            // 3 ms of fault latency: each Nop runs on a worker and stays in flight well
            // past the driver's 30 µs spin, so the poller arms and waits.
            set_latency(&client, 3_000).await;
            for i in 0..5 {
                echo(&client, i).await;
            }
            set_latency(&client, 0).await;
            client.stats()
        });
        assert!(stats.interrupts >= 1, "{stats:?}");
        assert_eq!(stats.interrupt_fallbacks, 0, "{stats:?}");
        assert_eq!(stats.timed_sleeps, 0, "{stats:?}");
        let fw = fx.server.stats();
        assert!(fw.interrupts >= 1, "{fw:?}");
    }

    #[test]
    fn without_interrupts_the_driver_polls_with_back_off() {
        let fx = start();
        let region = fx.region.clone();
        let stats = run(move || async move {
            let client = PcieClient::connect(
                &region,
                QueueSelect::Any,
                PcieClientConfig {
                    completion_interrupts: false,
                    ..config()
                },
            )
            .await
            .expect("attach");
            set_latency(&client, 1_000).await;
            for i in 0..5 {
                echo(&client, i).await;
            }
            set_latency(&client, 0).await;
            client.stats()
        });
        assert_eq!(stats.interrupts, 0, "{stats:?}");
        assert!(stats.timed_sleeps >= 1, "{stats:?}");
        assert_eq!(stats.answered, 7, "{stats:?}");
    }

    #[test]
    fn interrupts_that_never_arrive_fall_back_to_back_off() {
        let fx = start();
        let region = fx.region.clone();
        let stats = run(move || async move {
            let client = PcieClient::connect(&region, QueueSelect::Any, config())
                .await
                .expect("attach");
            // A token nobody bound: the device's signals go nowhere, as from a device
            // in another network namespace.
            let q = client.queue().expect("attached");
            let m = FileMapping::open(&region).expect("map");
            reg64(&m.bar(), queue_reg(q, Q_IRQ_TOKEN)).store(0x5eed, Ordering::SeqCst);
            set_latency(&client, 1_000).await;
            for i in 0..10 {
                echo(&client, i).await;
            }
            set_latency(&client, 0).await;
            client.stats()
        });
        assert_eq!(stats.interrupt_fallbacks, 1, "{stats:?}");
        assert!(
            stats.interrupt_timeouts >= u64::from(INTERRUPT_MISSES_MAX_FOR_TESTS),
            "{stats:?}"
        );
        assert!(stats.timed_sleeps >= 1, "{stats:?}");
        assert_eq!(stats.answered, 12, "{stats:?}");
        let fw = fx.server.stats();
        assert!(fw.interrupt_errors >= 1, "{fw:?}");
    }

    /// The driver's miss threshold (client.rs), restated: a test of the behaviour, not
    /// of the constant.
    const INTERRUPT_MISSES_MAX_FOR_TESTS: u32 = 3;
}
