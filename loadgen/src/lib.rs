//! loadgen: the capacity planner's load generator for the appliance (loadgen/README.md).
//!
//! * [`scenario`]: what to run (TOML file and flags).
//! * [`gen`]: synthetic railway invoices, red invoices and retries, in shard-homogeneous
//!   frames.
//! * [`run`]: the engine. Open loop: a scheduler thread fixes every request's intended
//!   send time in advance and hands it to a tokio task; latency counts from that time
//!   (coordinated omission corrected). Closed loop: workers send back to back, latency
//!   from the actual send (labelled as such).
//! * [`collector`]: one thread verifies every answer ([`verify`]) and records HDR
//!   histograms, the .hlog interval log and the timeline.
//! * [`report`]: text, JSON summary; [`plot`]: SVG plots; [`sweep`]: capacity search.
//! * [`testserver`]: a small QUIC server speaking the protocol, with a stall switch and a
//!   capacity limit, for tests and for measuring loadgen's own overhead.

pub mod collector;
pub mod gen;
pub mod plot;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sweep;
pub mod testserver;
pub mod timer;
pub mod verify;

use std::time::Instant;

/// The run's monotonic clock: ns since a base instant. Copy, so every task has one.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Clock {
        Clock {
            base: Instant::now(),
        }
    }

    /// ns since the base.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// The instant `ns` after the base.
    pub fn instant(&self, ns: u64) -> Instant {
        self.base + std::time::Duration::from_nanos(ns)
    }
}

/// CPU time (user + system) this process has used so far, seconds: what loadgen itself
/// costs, for its overhead per request.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Pins the calling thread to `cpu` (Linux `sched_setaffinity`); false if refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (bounds
    // checked above); sched_setaffinity reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Lowers the calling thread's timer slack to 1 µs so that the scheduler's sleeps end
/// close to the intended send times (the default slack is 50 µs).
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long value and no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong);
    }
}

/// Picks CPUs round robin from a list: threads call [`CpuPicker::pin_next`].
#[derive(Debug, Clone)]
pub struct CpuPicker {
    cpus: std::sync::Arc<Vec<usize>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CpuPicker {
    /// A picker over `cpus` (empty: pinning disabled).
    pub fn new(cpus: &[usize]) -> CpuPicker {
        CpuPicker {
            cpus: std::sync::Arc::new(cpus.to_vec()),
            next: Default::default(),
        }
    }

    /// CPU time (user + system) this process has used so far, seconds: what loadgen itself
    /// costs, for its overhead per request.
    pub fn process_cpu_s() -> f64 {
        // SAFETY: getrusage writes into the zeroed struct we pass and reads nothing else.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            usage
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }

    /// Pins the calling thread to the next CPU of the list, if any.
    pub fn pin_next(&self) {
        if self.cpus.is_empty() {
            return;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cpu = self.cpus[i % self.cpus.len()];
        if !pin_current_thread(cpu) {
            tracing::warn!(cpu, "could not pin thread");
        }
    }
}

/// The runtime loadgen sends from. One thread: a current-thread runtime, driven by the
/// thread that calls `block_on` (pinned here to the picker's next CPU), so that quinn's
/// endpoint and connection drivers, the scheduler and every request task share that one
/// thread and hand work to each other without a futex wake-up or a context switch (with
/// a multi-thread runtime of one worker, half of loadgen's CPU per request went to
/// those). More threads: a multi-thread runtime with `threads` workers, each pinned by
/// `cpus`.
///
/// A current-thread runtime runs tasks only inside `block_on`: everything in [`run`]
/// drives it that way while a run is on.
pub fn runtime(threads: usize, cpus: &CpuPicker) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        cpus.pin_next();
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let picker = cpus.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .on_thread_start(move || picker.pin_next())
        .build()
}
