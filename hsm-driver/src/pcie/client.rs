//! The glommio shell of the PCIe driver: attaches one queue pair (claim, enable
//! handshake), submits from the calling task (descriptor + one doorbell store), and runs
//! one poller task that consumes completions. All ring state is in
//! [`super::queue::QueueEngine`].
//!
//! Polling policy: with nothing in flight the poller sleeps on a waker (an idle shard
//! costs nothing); with commands in flight it spins (yielding to the executor's other
//! tasks) for `spin` after the last completion. Then, when the device offers completion
//! interrupts and this client bound its interrupt socket, it arms the queue's
//! interrupt, polls the ring once more (a completion posted before the device could see
//! the arm is found there; one posted after it makes the device signal), and awaits one
//! datagram on the socket, at most `interrupt_wait_max`: one executor wake-up per
//! completion burst instead of a timer per back-off step. Without interrupts (none
//! offered, socket not bound, disabled, or three waits in a row that timed out although
//! completions had arrived) it sleeps with a doubling back-off up to `backoff_max`, as
//! before. Device health (reset, queue error, heartbeat) is read on the back-off path,
//! after every interrupt wait that timed out, and every 64 spins, because on a real card
//! those are MMIO reads.
//!
//! Submissions ring the doorbell and then, if the device advertises the doorbell wake
//! and has published that it sleeps, wake it (one futex system call, only then).

use std::cell::RefCell;
use std::future::poll_fn;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::future::{or, yield_now};
use glommio::sync::Semaphore;

use super::mem::{DeviceMemory, FileMapping, MemRegion};
use super::notify::{futex_wake, irq_socket_name};
use super::queue::{EngineStats, Outcome, QueueEngine, SubmitError};
use super::regs::{
    queue_reg, DeviceGeometry, QueueGeometry, DEVICE_MAGIC, FEATURE_COMPLETION_IRQ,
    FEATURE_DOORBELL_WAKE, INTERFACE_VERSION, QSTATUS_READY, Q_CQ_HEAD, Q_CQ_OFFSET, Q_DATA_BYTES,
    Q_DATA_OFFSET, Q_ENABLE, Q_ENABLE_ACK, Q_ERROR, Q_IRQ_ARM, Q_IRQ_TOKEN, Q_OWNER, Q_SQ_OFFSET,
    Q_SQ_TAIL, Q_STATUS, REG_CHUNK_BYTES, REG_DEVICE_SLEEPING, REG_DMA_BYTES, REG_FEATURES,
    REG_GENERATION, REG_HEARTBEAT, REG_MAGIC, REG_QUEUE_COUNT, REG_QUEUE_ENTRIES, REG_STATUS,
    REG_VERSION, SLEEP_AWAKE, SLEEP_DOORBELL, STATUS_READY,
};
use super::{response_capacity, PcieClientConfig, QueueSelect};
use crate::proto::{EncodeError, Request, Response, FRAME_BODY_BYTES_MAX};
use crate::tcp::client::{permit_until, sleep_until, LastFailure};
use crate::tcp::pipeline::Backoff;
use crate::tcp::HsmError;

/// Spins between two health checks while commands are in flight.
const SPINS_PER_HEALTH_CHECK: u32 = 64;
/// Longest sleep while waiting for the device to acknowledge an enable.
const ENABLE_POLL_MAX: Duration = Duration::from_millis(1);
/// Interrupt waits in a row that timed out although completions had arrived, after
/// which the driver stops trusting the interrupt channel of this attachment (the device
/// cannot reach the socket: another network namespace, a device that does not signal)
/// and falls back to the timed back-off. One such wait can be a race at the timeout;
/// three in a row are not.
const INTERRUPT_MISSES_MAX: u32 = 3;

/// Counters of one client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PcieStats {
    /// Calls answered (successfully or with a device error).
    pub answered: u64,
    /// Queue attaches (the first included).
    pub attaches: u64,
    /// Queue tear-downs: device reset, queue error, corrupt completion, dead device.
    pub teardowns: u64,
    /// Calls that hit their deadline.
    pub timeouts: u64,
    /// Times a call waited for ring or buffer space (back-pressure).
    pub full_waits: u64,
    /// Doorbell wakes sent: submissions that found the device asleep and woke it.
    pub device_wakes: u64,
    /// Completion interrupts received (stale ones included: each costs one re-poll).
    pub interrupts: u64,
    /// Interrupt waits that ended at `interrupt_wait_max` instead.
    pub interrupt_timeouts: u64,
    /// Attachments on which the interrupt channel was given up (completions arrived
    /// without their interrupt, or the socket failed): timed back-off from then on.
    pub interrupt_fallbacks: u64,
    /// Timed back-off sleeps (polling without interrupts).
    pub timed_sleeps: u64,
    /// Ring counters (of the current engine).
    pub engine: EngineStats,
}

/// One attached queue: the mapping and what was agreed with the device.
struct Attached {
    // Keeps the mapping alive while `bar` and `dma` point into it.
    _memory: Arc<dyn DeviceMemory>,
    bar: MemRegion,
    dma: MemRegion,
    queue: usize,
    generation: u32,
    enable: u64,
    heartbeat: u64,
    heartbeat_at: Instant,
    /// The device blocks when idle and must be woken after a doorbell.
    doorbell_wake: bool,
    /// Completion interrupts are set up for this attachment (device offers them, our
    /// socket is bound and its token written) and still trusted.
    irq: bool,
    /// Interrupt waits in a row that timed out with completions waiting.
    irq_misses: u32,
}

/// After a driver store the device must act on (SQ doorbell, enable, reset): wakes the
/// device if it published that it sleeps waiting for one. Returns whether a wake was
/// sent. The SeqCst fence orders our store before the load of the sleeping word (a
/// store-load pair, which release/acquire does not order); the device stores the word,
/// fences, then re-checks every doorbell before it blocks. So either it sees our store,
/// or we see its word and wake it: a doorbell never waits for the device's timeout.
/// Swapping the word back to awake before the futex wake makes a wake that lands before
/// the device blocks still count (its wait finds the word changed and returns), and
/// lets one driver, not every submitter, pay the system call.
fn wake_device(bar: &MemRegion) -> bool {
    fence(Ordering::SeqCst);
    let Ok(word) = bar.u32_at(REG_DEVICE_SLEEPING) else {
        return false;
    };
    if word.load(Ordering::Relaxed) != SLEEP_DOORBELL
        || word
            .compare_exchange(
                SLEEP_DOORBELL,
                SLEEP_AWAKE,
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_err()
    {
        return false;
    }
    futex_wake(word, 1);
    true
}

impl Attached {
    fn u32_reg(&self, off: usize) -> u32 {
        self.bar
            .u32_at(off)
            .map_or(0, |r| r.load(Ordering::Acquire))
    }

    fn u64_reg(&self, off: usize) -> u64 {
        self.bar
            .u64_at(off)
            .map_or(0, |r| r.load(Ordering::Acquire))
    }

    /// Whether the device still runs this queue as we enabled it.
    fn health(&mut self, now: Instant, heartbeat_timeout: Duration) -> Result<(), String> {
        let generation = self.u32_reg(REG_GENERATION);
        let status = self.u32_reg(REG_STATUS);
        if status != STATUS_READY || generation != self.generation {
            return Err(format!(
                "device reset (status {status}, generation {} -> {generation})",
                self.generation
            ));
        }
        let q_status = self.u32_reg(queue_reg(self.queue, Q_STATUS));
        if q_status != QSTATUS_READY {
            let code = self.u32_reg(queue_reg(self.queue, Q_ERROR));
            return Err(format!(
                "queue {} stopped (status {q_status}, error {code})",
                self.queue
            ));
        }
        if self.u64_reg(queue_reg(self.queue, Q_ENABLE_ACK)) != self.enable {
            return Err(format!("queue {} no longer enabled for us", self.queue));
        }
        let beat = self.u64_reg(REG_HEARTBEAT);
        if beat != self.heartbeat {
            self.heartbeat = beat;
            self.heartbeat_at = now;
        } else if now.duration_since(self.heartbeat_at) > heartbeat_timeout {
            return Err("device not responding (heartbeat stopped)".into());
        }
        Ok(())
    }

    /// Arms the queue's completion interrupt. SeqCst store and fence: the re-poll of
    /// the ring that follows cannot be ordered before the arm (store-load), which with
    /// the device's "post, fence, load the arm" means a completion is either seen by
    /// that re-poll or signalled.
    fn arm_irq(&self) {
        if let Ok(r) = self.bar.u32_at(queue_reg(self.queue, Q_IRQ_ARM)) {
            r.store(1, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
    }

    /// Withdraws an arming that the re-poll made pointless (it found completions). The
    /// device may have signalled already: that datagram is drained by a later wait.
    fn disarm_irq(&self) {
        if let Ok(r) = self.bar.u32_at(queue_reg(self.queue, Q_IRQ_ARM)) {
            r.store(0, Ordering::Relaxed);
        }
    }

    /// Gives the queue back: disable and drop the claim.
    fn release(&self, owner: u64) {
        if let Ok(r) = self.bar.u64_at(queue_reg(self.queue, Q_ENABLE)) {
            r.store(0, Ordering::Release);
        }
        if let Ok(r) = self.bar.u64_at(queue_reg(self.queue, Q_IRQ_TOKEN)) {
            r.store(0, Ordering::Relaxed);
        }
        if let Ok(r) = self.bar.u32_at(queue_reg(self.queue, Q_IRQ_ARM)) {
            r.store(0, Ordering::Relaxed);
        }
        if let Ok(r) = self.bar.u64_at(queue_reg(self.queue, Q_OWNER)) {
            let _ = r.compare_exchange(owner, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

struct State {
    attached: Option<Attached>,
    engine: Option<QueueEngine>,
    closed: bool,
    backoff: Backoff,
    last_failure: LastFailure,
    poller_waker: Option<Waker>,
    /// Calls waiting for ring or buffer space, or for a torn-down queue to come back.
    waiters: Vec<Waker>,
    next_cid: u64,
    stats: PcieStats,
}

struct Shared {
    path: PathBuf,
    select: QueueSelect,
    config: PcieClientConfig,
    /// `pid << 32 | nonce`: this client's claim value in the queue's owner register.
    owner: u64,
    /// The completion-interrupt socket (bound in the abstract namespace under
    /// `irq_socket_name(irq_token)`), if it could be bound and interrupts are enabled.
    irq: Option<Rc<glommio::net::UnixDatagram>>,
    /// Token of `irq` written into the queue's `Q_IRQ_TOKEN`; 0 without a socket.
    irq_token: u64,
    attach_lock: Semaphore,
    state: RefCell<State>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        if let Some(a) = st.attached.take() {
            a.release(self.owner);
        }
        if let Some(w) = st.poller_waker.take() {
            w.wake();
        }
    }
}

impl State {
    fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    fn wake_poller(&mut self) {
        if let Some(w) = self.poller_waker.take() {
            w.wake();
        }
    }

    /// The queue is unusable: fail every call in flight, forget the attachment.
    fn tear_down(&mut self, reason: &str, error: fn() -> HsmError) {
        let Some(a) = self.attached.take() else {
            return;
        };
        let failed = self.engine.as_mut().map_or(0, |e| e.fail_all(error));
        self.stats.teardowns += 1;
        self.wake_waiters();
        tracing::warn!(queue = a.queue, failed, reason, "PCIe queue torn down");
    }
}

/// PCIe tax-server client for one glommio executor (a shard): owns one queue pair.
///
/// `!Send` by design; clone it (reference counted) into the shard's tasks. Commands of
/// all clones are in flight together on the one queue pair. Dropping the last clone
/// gives the queue back.
#[derive(Clone)]
pub struct PcieClient {
    shared: Rc<Shared>,
}

impl std::fmt::Debug for PcieClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcieClient")
            .field("path", &self.shared.path)
            .field("queue", &self.queue())
            .field("stats", &self.stats())
            .finish()
    }
}

fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Claims queue `q` for `me` if it is free, ours, or owned by a dead process.
fn claim(bar: &MemRegion, q: usize, me: u64) -> bool {
    let Ok(reg) = bar.u64_at(queue_reg(q, Q_OWNER)) else {
        return false;
    };
    let current = reg.load(Ordering::Acquire);
    if current == me {
        return true;
    }
    if current != 0 && pid_alive((current >> 32) as u32) {
        return false;
    }
    reg.compare_exchange(current, me, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Binds this client's completion-interrupt socket under a random abstract name. A
/// failure (no Unix sockets, a name clash) is logged and leaves the client polling with
/// the timed back-off: interrupts are an optimisation, never a requirement.
fn bind_irq_socket() -> (Option<Rc<glommio::net::UnixDatagram>>, u64) {
    let token = rand::random::<u64>() | 1;
    match glommio::net::UnixDatagram::bind(irq_socket_name(token)) {
        Ok(socket) => (Some(Rc::new(socket)), token),
        Err(e) => {
            tracing::warn!(error = %e, "PCIe interrupt socket not bound; polling with back-off");
            (None, 0)
        }
    }
}

fn owner_value() -> u64 {
    static NONCE: AtomicU32 = AtomicU32::new(1);
    let nonce = NONCE.fetch_add(1, Ordering::Relaxed);
    (u64::from(std::process::id()) << 32) | u64::from(nonce)
}

/// Maps the region, checks identity and geometry, claims a queue and enables it.
async fn attach(
    path: &Path,
    select: QueueSelect,
    owner: u64,
    irq_token: u64,
    deadline: Instant,
) -> Result<(Attached, QueueGeometry), HsmError> {
    let mapping = FileMapping::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HsmError::Refused,
        _ => HsmError::Io(e),
    })?;
    let memory: Arc<dyn DeviceMemory> = Arc::new(mapping);
    let bar = memory.bar();
    let dma = memory.dma();
    let reg32 = |off: usize| bar.u32_at(off).map(|r| r.load(Ordering::Acquire));
    let reg64 = |off: usize| bar.u64_at(off).map(|r| r.load(Ordering::Acquire));
    let oob = |e: super::mem::OutOfBounds| HsmError::Malformed(e.to_string());
    if reg32(REG_MAGIC).map_err(oob)? != DEVICE_MAGIC
        || reg32(REG_VERSION).map_err(oob)? != INTERFACE_VERSION
    {
        return Err(HsmError::Malformed(format!(
            "{} is not a tax-server PCIe region of version {INTERFACE_VERSION}",
            path.display()
        )));
    }
    if reg32(REG_STATUS).map_err(oob)? != STATUS_READY {
        return Err(HsmError::Refused);
    }
    let generation = reg32(REG_GENERATION).map_err(oob)?;
    let features = reg32(REG_FEATURES).map_err(oob)?;
    let device = DeviceGeometry::validate(
        reg32(REG_QUEUE_COUNT).map_err(oob)?,
        reg32(REG_QUEUE_ENTRIES).map_err(oob)?,
        reg32(REG_CHUNK_BYTES).map_err(oob)?,
        reg64(REG_DMA_BYTES).map_err(oob)?,
        dma.len(),
    )
    .map_err(|e| HsmError::Malformed(e.to_string()))?;
    let queue = match select {
        QueueSelect::Index(q) if q < device.queue_count => {
            if !claim(&bar, q, owner) {
                return Err(HsmError::Io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("PCIe queue {q} is owned by another live driver"),
                )));
            }
            q
        }
        QueueSelect::Index(q) => {
            return Err(HsmError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "PCIe queue {q} does not exist ({} queues)",
                    device.queue_count
                ),
            )))
        }
        QueueSelect::Any => (0..device.queue_count)
            .find(|&q| claim(&bar, q, owner))
            .ok_or_else(|| {
                HsmError::Io(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "all {} PCIe queues are owned by live drivers",
                        device.queue_count
                    ),
                ))
            })?,
    };
    let geometry = QueueGeometry::validate(
        &device,
        reg64(queue_reg(queue, Q_SQ_OFFSET)).map_err(oob)?,
        reg64(queue_reg(queue, Q_CQ_OFFSET)).map_err(oob)?,
        reg64(queue_reg(queue, Q_DATA_OFFSET)).map_err(oob)?,
        reg64(queue_reg(queue, Q_DATA_BYTES)).map_err(oob)?,
    )
    .map_err(|e| HsmError::Malformed(e.to_string()))?;
    // Doorbells back to 0 before the enable, which the device reads with Acquire after
    // our Release: it starts from these, never from a stale tail.
    bar.u32_at(queue_reg(queue, Q_SQ_TAIL))
        .map_err(oob)?
        .store(0, Ordering::Relaxed);
    bar.u32_at(queue_reg(queue, Q_CQ_HEAD))
        .map_err(oob)?
        .store(0, Ordering::Relaxed);
    // The interrupt registers are ours too: disarmed, and our socket's token (or 0, so
    // that a dead driver's token is not signalled for us). Published by the enable's
    // Release like the doorbells.
    let irq = irq_token != 0 && features & FEATURE_COMPLETION_IRQ != 0;
    bar.u32_at(queue_reg(queue, Q_IRQ_ARM))
        .map_err(oob)?
        .store(0, Ordering::Relaxed);
    bar.u64_at(queue_reg(queue, Q_IRQ_TOKEN))
        .map_err(oob)?
        .store(if irq { irq_token } else { 0 }, Ordering::Relaxed);
    let doorbell_wake = features & FEATURE_DOORBELL_WAKE != 0;
    // A random token: a descriptor of any earlier enable (ours or a dead driver's)
    // carries another one and is refused.
    let token = rand::random::<u32>() | 1;
    let enable = (u64::from(generation) << 32) | u64::from(token);
    bar.u64_at(queue_reg(queue, Q_ENABLE))
        .map_err(oob)?
        .store(enable, Ordering::Release);
    if doorbell_wake {
        wake_device(&bar);
    }
    let mut wait = Duration::from_micros(20);
    loop {
        if reg64(queue_reg(queue, Q_ENABLE_ACK)).map_err(oob)? == enable {
            break;
        }
        if reg32(REG_GENERATION).map_err(oob)? != generation
            || reg32(REG_STATUS).map_err(oob)? != STATUS_READY
        {
            return Err(HsmError::ConnectionLost);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HsmError::Timeout);
        }
        glommio::timer::sleep(wait.min(deadline - now)).await;
        wait = (wait * 2).min(ENABLE_POLL_MAX);
    }
    let heartbeat = reg64(REG_HEARTBEAT).map_err(oob)?;
    Ok((
        Attached {
            _memory: memory,
            bar,
            dma,
            queue,
            generation,
            enable,
            heartbeat,
            heartbeat_at: Instant::now(),
            doorbell_wake,
            irq,
            irq_misses: 0,
        },
        geometry,
    ))
}

/// Drops a call's claim on its tag if its future goes away before the answer.
struct AbandonGuard<'a> {
    shared: &'a Shared,
    tag: u16,
    cid: u64,
    armed: bool,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut st) = self.shared.state.try_borrow_mut() {
                if let Some(e) = st.engine.as_mut() {
                    e.abandon(self.tag, self.cid);
                }
            }
        }
    }
}

impl PcieClient {
    /// Maps the region file at `path`, claims a queue pair (`select`) and enables it,
    /// and starts the poller task. Must be called inside a glommio executor. Fails if
    /// this first attach fails, so a wrong path is reported at start-up.
    pub async fn connect(
        path: impl AsRef<Path>,
        select: QueueSelect,
        config: PcieClientConfig,
    ) -> Result<PcieClient, HsmError> {
        let config = PcieClientConfig {
            max_in_flight: config.max_in_flight.max(1),
            ..config
        };
        let (irq, irq_token) = if config.completion_interrupts {
            bind_irq_socket()
        } else {
            (None, 0)
        };
        let client = PcieClient {
            shared: Rc::new(Shared {
                path: path.as_ref().to_path_buf(),
                select,
                config,
                owner: owner_value(),
                irq,
                irq_token,
                attach_lock: Semaphore::new(1),
                state: RefCell::new(State {
                    attached: None,
                    engine: None,
                    closed: false,
                    backoff: Backoff::new(config.reattach_backoff_min, config.reattach_backoff_max),
                    last_failure: LastFailure::Lost,
                    poller_waker: None,
                    waiters: Vec::new(),
                    next_cid: 1,
                    stats: PcieStats::default(),
                }),
            }),
        };
        let deadline = Instant::now() + config.connect_timeout;
        client.ensure_attached(deadline).await?;
        glommio::spawn_local(poll_loop(Rc::downgrade(&client.shared))).detach();
        Ok(client)
    }

    /// The region file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The configuration in use.
    pub fn config(&self) -> PcieClientConfig {
        self.shared.config
    }

    /// The queue pair attached now, if any.
    pub fn queue(&self) -> Option<usize> {
        self.shared
            .state
            .borrow()
            .attached
            .as_ref()
            .map(|a| a.queue)
    }

    /// Whether a queue is attached now.
    pub fn is_attached(&self) -> bool {
        self.shared.state.borrow().attached.is_some()
    }

    /// Counters so far.
    pub fn stats(&self) -> PcieStats {
        let st = self.shared.state.borrow();
        PcieStats {
            engine: st.engine.as_ref().map(|e| e.stats()).unwrap_or_default(),
            ..st.stats
        }
    }

    /// Commands in flight on the queue.
    pub fn in_flight(&self) -> usize {
        self.shared
            .state
            .borrow()
            .engine
            .as_ref()
            .map_or(0, |e| e.in_flight())
    }

    /// Largest buffer one command may use (request or response): the queue's data
    /// area. A command needing more fails with [`HsmError::InvalidRequest`].
    pub fn max_command_bytes(&self) -> Option<usize> {
        self.shared
            .state
            .borrow()
            .engine
            .as_ref()
            .map(|e| e.max_buffer_bytes())
    }

    /// Asks the device to reset itself (as an operator would after a wedge). Calls in
    /// flight fail with [`HsmError::ConnectionLost`]; later calls re-attach.
    pub fn reset_device(&self) {
        let st = self.shared.state.borrow();
        if let Some(a) = &st.attached {
            if let Ok(r) = a.bar.u32_at(super::regs::REG_RESET) {
                r.store(1, Ordering::Release);
            }
            if a.doorbell_wake {
                wake_device(&a.bar);
            }
        }
    }

    /// Sends one command and waits for its answer, at most `call_timeout`.
    ///
    /// Safe to call from many tasks at once: commands are pipelined on the queue pair.
    /// With the ring or the data area full, the call waits for room (back-pressure).
    /// After a device reset or queue error the call re-attaches within its deadline.
    pub async fn call(&self, request: &Request) -> Result<Response, HsmError> {
        let deadline = Instant::now() + self.shared.config.call_timeout;
        let outcome = self.call_until(request, deadline).await;
        let mut st = self.shared.state.borrow_mut();
        match &outcome {
            Ok(_) | Err(HsmError::Device { .. }) => st.stats.answered += 1,
            Err(HsmError::Timeout) => st.stats.timeouts += 1,
            Err(_) => {}
        }
        outcome
    }

    async fn call_until(&self, request: &Request, deadline: Instant) -> Result<Response, HsmError> {
        // The bulk commands' bodies (a TaxCodes batch is ~1 MB) are copied from the
        // request straight into the data area; only the small ones are encoded here.
        let mut encoded = Vec::new();
        let bulk = request.body_parts()?;
        let parts: [&[u8]; 2] = match &bulk {
            Some(parts) => [parts.head(), parts.bulk()],
            None => {
                request.encode_body(&mut encoded)?;
                [&encoded, &[]]
            }
        };
        let body_len = parts[0].len() + parts[1].len();
        if body_len > FRAME_BODY_BYTES_MAX {
            return Err(HsmError::InvalidRequest(EncodeError::LimitExceeded {
                what: "frame body bytes",
                value: body_len as u64,
                max: FRAME_BODY_BYTES_MAX as u64,
            }));
        }
        let (mut capacity, mut allow_overflow) = response_capacity(request);
        loop {
            let (tag, cid) = self
                .submit_until(request, &parts, capacity, allow_overflow, deadline)
                .await?;
            let shared = &*self.shared;
            let mut guard = AbandonGuard {
                shared,
                tag,
                cid,
                armed: true,
            };
            let outcome = or(
                poll_fn(|cx| {
                    let mut st = shared.state.borrow_mut();
                    match st.engine.as_mut() {
                        Some(e) => e.poll_outcome(tag, cid, cx.waker()),
                        None => Poll::Ready(Outcome::Answer(Err(HsmError::ConnectionLost))),
                    }
                }),
                async {
                    sleep_until(deadline).await;
                    Outcome::Answer(Err(HsmError::Timeout))
                },
            )
            .await;
            match outcome {
                Outcome::Answer(Err(HsmError::Timeout)) => {
                    // guard abandons the tag (the device may still write its buffer).
                    return Err(HsmError::Timeout);
                }
                Outcome::Answer(r) => {
                    guard.armed = false;
                    return r;
                }
                Outcome::Overflow { needed } => {
                    guard.armed = false;
                    // Only read-only commands are allowed to overflow; send once more
                    // with the size the device asked for.
                    if !allow_overflow {
                        return Err(HsmError::Malformed("response overflow".into()));
                    }
                    capacity = needed;
                    allow_overflow = false;
                }
            }
        }
    }

    /// Submits one command, waiting for room and re-attaching as needed.
    async fn submit_until(
        &self,
        request: &Request,
        parts: &[&[u8]],
        capacity: usize,
        allow_overflow: bool,
        deadline: Instant,
    ) -> Result<(u16, u64), HsmError> {
        let shared = &*self.shared;
        loop {
            self.ensure_attached(deadline).await?;
            {
                let mut st = shared.state.borrow_mut();
                if st.closed {
                    return Err(HsmError::Closed);
                }
                let st = &mut *st;
                if let (Some(a), Some(engine)) = (st.attached.as_mut(), st.engine.as_mut()) {
                    // The poller does not watch an idle queue: the first command after
                    // a quiet spell checks that the device did not reset meanwhile, so
                    // it re-attaches instead of failing.
                    if engine.in_flight() == 0 {
                        if let Err(reason) =
                            a.health(Instant::now(), shared.config.heartbeat_timeout)
                        {
                            st.tear_down(&reason, || HsmError::ConnectionLost);
                            continue;
                        }
                    }
                    let cid = st.next_cid;
                    match engine.submit_parts(
                        &a.bar,
                        &a.dma,
                        request.opcode(),
                        cid,
                        parts,
                        capacity,
                        allow_overflow,
                    ) {
                        Ok(tag) => {
                            st.next_cid += 1;
                            if a.doorbell_wake && wake_device(&a.bar) {
                                st.stats.device_wakes += 1;
                            }
                            st.wake_poller();
                            return Ok((tag, cid));
                        }
                        Err(SubmitError::Full) => st.stats.full_waits += 1,
                        Err(SubmitError::TooLarge { needed, max }) => {
                            return Err(HsmError::InvalidRequest(EncodeError::LimitExceeded {
                                what: "PCIe command buffer bytes",
                                value: needed as u64,
                                max: max as u64,
                            }))
                        }
                        Err(SubmitError::Memory(e)) => {
                            st.tear_down(&e.to_string(), || HsmError::ConnectionLost);
                            continue;
                        }
                    }
                } else {
                    continue;
                }
            }
            // Wait for a completion (or a tear-down) to free room, within the deadline.
            let mut registered = false;
            or(
                poll_fn(|cx| {
                    if registered {
                        return Poll::Ready(Ok(()));
                    }
                    registered = true;
                    shared.state.borrow_mut().waiters.push(cx.waker().clone());
                    Poll::Pending
                }),
                async {
                    sleep_until(deadline).await;
                    Err(HsmError::Timeout)
                },
            )
            .await?;
        }
    }

    /// Returns once a queue is attached, attaching (after the backoff) if needed.
    async fn ensure_attached(&self, deadline: Instant) -> Result<(), HsmError> {
        let shared = &*self.shared;
        {
            let st = shared.state.borrow();
            if st.closed {
                return Err(HsmError::Closed);
            }
            if st.attached.is_some() {
                return Ok(());
            }
        }
        let _attaching = permit_until(&shared.attach_lock, deadline).await?;
        let ready_at = {
            let st = shared.state.borrow();
            if st.closed {
                return Err(HsmError::Closed);
            }
            if st.attached.is_some() {
                return Ok(());
            }
            st.backoff.ready_at()
        };
        if let Some(at) = ready_at {
            if at >= deadline {
                return Err(shared.state.borrow().last_failure.to_error());
            }
            sleep_until(at).await;
        }
        let attach_deadline = deadline.min(Instant::now() + shared.config.connect_timeout);
        match attach(
            &shared.path,
            shared.select,
            shared.owner,
            shared.irq_token,
            attach_deadline,
        )
        .await
        {
            Ok((attached, geometry)) => {
                let mut st = shared.state.borrow_mut();
                if st.closed {
                    attached.release(shared.owner);
                    return Err(HsmError::Closed);
                }
                let token = attached.enable as u32;
                match st.engine.as_mut() {
                    Some(e) => e.reattach(geometry, token, shared.config.max_in_flight),
                    None => {
                        st.engine = Some(QueueEngine::new(
                            geometry,
                            attached.queue,
                            token,
                            shared.config.max_in_flight,
                        ))
                    }
                }
                tracing::debug!(
                    path = %shared.path.display(),
                    queue = attached.queue,
                    generation = attached.generation,
                    "PCIe queue attached"
                );
                st.attached = Some(attached);
                st.backoff.on_success();
                st.stats.attaches += 1;
                st.wake_waiters();
                Ok(())
            }
            Err(e) => {
                let mut st = shared.state.borrow_mut();
                st.backoff.on_failure(Instant::now());
                st.last_failure = match e {
                    HsmError::Refused => LastFailure::Refused,
                    HsmError::Timeout => LastFailure::Timeout,
                    _ => LastFailure::Lost,
                };
                Err(e)
            }
        }
    }

    /// Closes the client: calls in flight and later calls fail with
    /// [`HsmError::Closed`]; the queue is disabled and released.
    pub fn close(&self) {
        let mut st = self.shared.state.borrow_mut();
        if st.closed {
            return;
        }
        st.closed = true;
        if let Some(e) = st.engine.as_mut() {
            e.fail_all(|| HsmError::Closed);
        }
        if let Some(a) = st.attached.take() {
            a.release(self.shared.owner);
        }
        st.wake_waiters();
        st.wake_poller();
        drop(st);
        self.shared.attach_lock.close();
    }
}

/// What one pass of the poller found.
enum Pass {
    /// Completions consumed.
    Progress,
    /// Commands in flight, none completed.
    Waiting,
    /// Nothing in flight (or no queue): sleep until a call wakes us.
    Idle,
    /// The client is gone.
    Exit,
}

fn poll_once(shared: &Shared, check_health: bool) -> Pass {
    let mut st = shared.state.borrow_mut();
    if st.closed {
        return Pass::Exit;
    }
    let st = &mut *st;
    let (Some(a), Some(engine)) = (st.attached.as_mut(), st.engine.as_mut()) else {
        return Pass::Idle;
    };
    match engine.poll(&a.bar, &a.dma) {
        Ok(0) => {}
        Ok(_) => {
            // The device is plainly alive: that is a heartbeat too.
            a.heartbeat_at = Instant::now();
            st.wake_waiters();
            return Pass::Progress;
        }
        Err(fault) => {
            st.tear_down(&fault.to_string(), || HsmError::ConnectionLost);
            return Pass::Idle;
        }
    }
    if engine.in_flight() == 0 {
        return Pass::Idle;
    }
    if check_health {
        if let Err(reason) = a.health(Instant::now(), shared.config.heartbeat_timeout) {
            st.tear_down(&reason, || HsmError::ConnectionLost);
            return Pass::Idle;
        }
    }
    Pass::Waiting
}

/// How one interrupt wait ended.
enum IrqWait {
    /// A datagram arrived (possibly a stale one: the re-poll sorts that out).
    Signalled,
    /// `interrupt_wait_max` passed.
    TimedOut,
    /// The socket failed: give the channel up.
    Failed,
}

/// The interrupt socket, if the attached queue may use it now.
fn irq_channel(shared: &Shared) -> Option<Rc<glommio::net::UnixDatagram>> {
    let st = shared.state.borrow();
    match (&shared.irq, &st.attached) {
        (Some(socket), Some(a)) if a.irq => Some(Rc::clone(socket)),
        _ => None,
    }
}

/// Gives up the interrupt channel of the current attachment (timed back-off from now).
fn irq_fallback(shared: &Shared, reason: &str) {
    let mut st = shared.state.borrow_mut();
    let st = &mut *st;
    if let Some(a) = st.attached.as_mut() {
        if a.irq {
            a.irq = false;
            a.disarm_irq();
            st.stats.interrupt_fallbacks += 1;
            tracing::warn!(
                queue = a.queue,
                reason,
                "PCIe completion interrupts given up; polling with back-off"
            );
        }
    }
}

async fn poll_loop(weak: Weak<Shared>) {
    let mut last_progress = Instant::now();
    let mut backoff = Duration::ZERO;
    let mut spins: u32 = 0;
    // The last interrupt wait timed out: check health on this pass, and count a miss if
    // the pass finds completions (they came without their interrupt).
    let mut after_timeout = false;
    let mut irq_buf = [0u8; 8];
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let config = shared.config;
        let spinning = last_progress.elapsed() < config.spin;
        spins = spins.wrapping_add(1);
        let check = after_timeout || !spinning || spins % SPINS_PER_HEALTH_CHECK == 0;
        let pass = poll_once(&shared, check);
        if after_timeout {
            after_timeout = false;
            if matches!(pass, Pass::Progress) {
                let missed = {
                    let mut st = shared.state.borrow_mut();
                    st.attached.as_mut().is_some_and(|a| {
                        a.irq_misses += 1;
                        a.irq_misses >= INTERRUPT_MISSES_MAX
                    })
                };
                if missed {
                    irq_fallback(&shared, "completions arrive without their interrupt");
                }
            }
        }
        match pass {
            Pass::Exit => return,
            Pass::Progress => {
                last_progress = Instant::now();
                backoff = config.backoff_min;
                drop(shared);
                yield_now().await;
            }
            Pass::Waiting if spinning => {
                drop(shared);
                yield_now().await;
            }
            Pass::Waiting => {
                if let Some(socket) = irq_channel(&shared) {
                    // Arm, look once more, then wait: an interrupt is never lost.
                    if let Some(a) = shared.state.borrow().attached.as_ref() {
                        a.arm_irq();
                    }
                    match poll_once(&shared, false) {
                        Pass::Waiting => {}
                        Pass::Exit => return,
                        other => {
                            if let Some(a) = shared.state.borrow().attached.as_ref() {
                                a.disarm_irq();
                            }
                            if matches!(other, Pass::Progress) {
                                last_progress = Instant::now();
                            }
                            drop(shared);
                            yield_now().await;
                            continue;
                        }
                    }
                    let wait_max = config.interrupt_wait_max;
                    drop(shared);
                    let end = or(
                        async {
                            match socket.recv(&mut irq_buf).await {
                                Ok(_) => IrqWait::Signalled,
                                Err(_) => IrqWait::Failed,
                            }
                        },
                        async {
                            glommio::timer::sleep(wait_max).await;
                            IrqWait::TimedOut
                        },
                    )
                    .await;
                    drop(socket);
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    match end {
                        IrqWait::Signalled => {
                            let mut st = shared.state.borrow_mut();
                            st.stats.interrupts += 1;
                            if let Some(a) = st.attached.as_mut() {
                                a.irq_misses = 0;
                            }
                        }
                        IrqWait::TimedOut => {
                            shared.state.borrow_mut().stats.interrupt_timeouts += 1;
                            after_timeout = true;
                        }
                        IrqWait::Failed => irq_fallback(&shared, "interrupt socket failed"),
                    }
                    continue;
                }
                backoff = backoff.clamp(config.backoff_min, config.backoff_max);
                shared.state.borrow_mut().stats.timed_sleeps += 1;
                drop(shared);
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(config.backoff_max);
            }
            Pass::Idle => {
                // Park until a submission (or close) wakes us. Holding only the weak
                // reference while parked lets the client drop and release its queue.
                let mut parked = false;
                let weak2 = weak.clone();
                drop(shared);
                poll_fn(|cx| {
                    if parked {
                        return Poll::Ready(());
                    }
                    let Some(shared) = weak2.upgrade() else {
                        return Poll::Ready(());
                    };
                    let mut st = shared.state.borrow_mut();
                    let idle = st.engine.as_ref().is_none_or(|e| e.in_flight() == 0);
                    if st.closed || !idle {
                        return Poll::Ready(());
                    }
                    parked = true;
                    st.poller_waker = Some(cx.waker().clone());
                    Poll::Pending
                })
                .await;
                last_progress = Instant::now();
                backoff = config.backoff_min;
            }
        }
    }
}
