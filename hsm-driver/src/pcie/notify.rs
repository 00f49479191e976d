//! Notifications between driver and device, for the moments when neither side polls
//! (docs/hsm-pcie.md, "Notifications"): the doorbell wake (driver → device, a futex on
//! the BAR's device-sleeping word) and the completion interrupt (device → driver, one
//! datagram to a Unix socket the driver bound, standing in for an MSI-X vector that
//! VFIO delivers through an eventfd).
//!
//! Only the system-call wrappers and the naming live here; when each side arms, checks
//! and waits is the business of the driver's poller (`client.rs`) and the emulator's
//! firmware. The futex pair stays together here (the firmware waits, the driver wakes);
//! the sender of completion interrupts is the device's alone and lives in the emulator
//! crate (`hsm_emulator::pcie::notify`).

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// How a [`futex_wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitEnd {
    /// Woken by a [`futex_wake`] (or spuriously: callers re-check the word anyway).
    Woken,
    /// The word no longer held the expected value when the kernel looked: a waker got
    /// there first.
    Changed,
    /// The timeout passed.
    TimedOut,
    /// Interrupted by a signal, or the futex call failed: treated as a short sleep.
    Other,
}

/// Blocks while `word` holds `expected`, at most `timeout`. Uses the shared (not
/// `_PRIVATE`) futex operations, so a word in a `MAP_SHARED` file mapping works across
/// processes: the kernel keys it by the file page, not by the address.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> WaitEnd {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the kernel
    // only reads it (and sleeps on its key). The timeout is a relative timespec on our
    // stack; the remaining arguments are unused by FUTEX_WAIT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == 0 {
        return WaitEnd::Woken;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitEnd::Changed,
        Some(libc::ETIMEDOUT) => WaitEnd::TimedOut,
        _ => WaitEnd::Other,
    }
}

/// Wakes at most `waiters` threads (of any process) blocked in [`futex_wait`] on `word`.
/// Returns how many were woken.
pub fn futex_wake(word: &AtomicU32, waiters: u32) -> usize {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE does not touch the word at all.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            waiters,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    usize::try_from(rc).unwrap_or(0)
}

/// The abstract-namespace name (leading NUL included) of the interrupt socket with
/// `token`. Abstract names leave no file behind when a driver dies, and the token
/// (random, in the queue's `Q_IRQ_TOKEN` register) is all the device needs to find it.
pub fn irq_socket_name(token: u64) -> String {
    format!("\0hsm-pcie-irq-{token:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    #[test]
    fn futex_wait_returns_on_changed_word_and_timeout() {
        let word = AtomicU32::new(1);
        assert_eq!(
            futex_wait(&word, 0, Duration::from_secs(5)),
            WaitEnd::Changed
        );
        assert_eq!(
            futex_wait(&word, 1, Duration::from_micros(100)),
            WaitEnd::TimedOut
        );
        assert_eq!(futex_wake(&word, 1), 0);
    }

    #[test]
    fn futex_wake_ends_a_wait() {
        let word = Arc::new(AtomicU32::new(1));
        let w = Arc::clone(&word);
        let waiter = std::thread::spawn(move || loop {
            // A long timeout: only the wake (or the word changing) ends it.
            match futex_wait(&w, 1, Duration::from_secs(30)) {
                WaitEnd::Woken | WaitEnd::Changed => return,
                WaitEnd::TimedOut | WaitEnd::Other => {}
            }
        });
        word.store(0, Ordering::SeqCst);
        futex_wake(&word, 1);
        waiter.join().expect("waiter");
    }
}
