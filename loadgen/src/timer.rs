//! [`PreciseTimer`]: a microsecond-precise sleep inside the tokio runtime, on a Linux
//! `timerfd` registered with the runtime's reactor.
//!
//! Why: tokio's own timer ticks in milliseconds, so an open-loop scheduler running as a
//! task would send in bursts up to a millisecond late; a scheduler on its own thread is
//! precise but hands every request to the runtime's thread with a futex wake-up and a
//! context switch, which at 100,000 requests/s on one core costs more than the requests'
//! own QUIC work. A timerfd gives the task the thread's precision for one syscall pair
//! per sleep, and no sleep at all while sends are already due (the runtime is busy, so
//! due requests go out together).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A one-shot monotonic timer that tasks await with [`PreciseTimer::sleep_until`]. Needs
/// a tokio runtime with I/O enabled (created inside one).
pub struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseTimer {
    /// A disarmed timer registered with the current runtime's reactor.
    pub fn new() -> io::Result<PreciseTimer> {
        // SAFETY: timerfd_create takes no pointers; a non-negative result is a new file
        // descriptor that nothing else owns.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a valid descriptor that we own (checked above).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open (and the
        // same descriptor) until the AsyncFd is dropped; nothing else can close it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(PreciseTimer { fd })
    }

    /// Arms the timer to fire `after` from now (relative: `Instant` has no public
    /// conversion to the raw clock, and both are CLOCK_MONOTONIC on Linux).
    fn arm(&self, after: Duration) -> io::Result<()> {
        // A zero it_value would disarm the timer instead of firing it at once.
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                // < 10^9: fits every c_long.
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec; a null old_value is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sleeps until `deadline` (returns at once if it has passed). Other tasks of the
    /// runtime run meanwhile; the wake-up comes through the reactor's epoll, on this
    /// thread.
    pub async fn sleep_until(&self, deadline: Instant) -> io::Result<()> {
        let now = Instant::now();
        if deadline <= now {
            return Ok(());
        }
        self.arm(deadline - now)?;
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into the 8-byte buffer.
                let n = unsafe {
                    libc::read(
                        fd.as_raw_fd(),
                        expirations.as_mut_ptr().cast::<libc::c_void>(),
                        expirations.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                // Spurious readiness: wait again (try_io cleared it).
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_at_least_until_the_deadline_and_not_for_past_ones() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let timer = PreciseTimer::new().unwrap();
            for micros in [1u64, 50, 300, 2_000] {
                let deadline = Instant::now() + Duration::from_micros(micros);
                timer.sleep_until(deadline).await.unwrap();
                assert!(Instant::now() >= deadline, "{micros} µs");
            }
            // A deadline in the past returns at once and leaves the timer usable.
            timer
                .sleep_until(Instant::now() - Duration::from_millis(1))
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_micros(100);
            timer.sleep_until(deadline).await.unwrap();
            assert!(Instant::now() >= deadline);
        });
    }
}
