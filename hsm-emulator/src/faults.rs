//! Fault switches, shared by the command handler and the network shell. Atomics, because
//! every worker and the accept thread read them on every command or connection.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::config::FaultSettings;
use hsm_driver::proto::FaultConfig;

/// The emulator's current faults.
#[derive(Debug)]
pub struct Faults {
    epoch: Instant,
    latency_us: AtomicU32,
    drop_every_nth_connection: AtomicU32,
    refuse: AtomicBool,
    // Milliseconds since `epoch` until which nothing is answered; 0 = no stall.
    stall_until_ms: AtomicU64,
    // Connections accepted since the drop switch was last set, for "every Nth".
    accepted: AtomicU64,
}

impl Faults {
    /// Faults as configured at start-up (a stall counts from now).
    pub fn new(s: FaultSettings) -> Self {
        let f = Self {
            epoch: Instant::now(),
            latency_us: AtomicU32::new(s.latency_us),
            drop_every_nth_connection: AtomicU32::new(s.drop_every_nth_connection),
            refuse: AtomicBool::new(s.refuse),
            stall_until_ms: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        };
        f.stall_for(s.stall_ms);
        f
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stall_for(&self, stall_ms: u32) {
        let until = if stall_ms == 0 {
            0
        } else {
            // +1 so a stall of N ms lasts at least N ms despite millisecond truncation.
            self.now_ms() + u64::from(stall_ms) + 1
        };
        self.stall_until_ms.store(until, Ordering::Release);
    }

    /// Applies a SetFaults command. `reset_connections` is acted on by the shell.
    pub fn set(&self, f: &FaultConfig) {
        self.latency_us.store(f.latency_us, Ordering::Release);
        self.drop_every_nth_connection
            .store(f.drop_every_nth_connection, Ordering::Release);
        self.accepted.store(0, Ordering::Release);
        self.refuse.store(f.refuse != 0, Ordering::Release);
        self.stall_for(f.stall_ms);
    }

    /// Added latency per command.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(u64::from(self.latency_us.load(Ordering::Acquire)))
    }

    /// Whether connections and commands are refused.
    pub fn refusing(&self) -> bool {
        self.refuse.load(Ordering::Acquire)
    }

    /// Time left in the current stall, if any.
    pub fn stall_remaining(&self) -> Option<Duration> {
        let until = self.stall_until_ms.load(Ordering::Acquire);
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Counts an accepted connection and says whether it is one to drop.
    pub fn drop_this_connection(&self) -> bool {
        let n = u64::from(self.drop_every_nth_connection.load(Ordering::Acquire));
        let seq = self.accepted.fetch_add(1, Ordering::AcqRel) + 1;
        n != 0 && seq % n == 0
    }

    /// The switches as settings (for logs).
    pub fn snapshot(&self) -> FaultSettings {
        FaultSettings {
            latency_us: self.latency_us.load(Ordering::Acquire),
            drop_every_nth_connection: self.drop_every_nth_connection.load(Ordering::Acquire),
            refuse: self.refusing(),
            stall_ms: self
                .stall_remaining()
                .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        }
    }
}
