//! Child processes that announce readiness on stdout: the tax-server emulator started by
//! the demo and by tests prints `listening <addr>` once it serves.
//!
//! The child is killed and reaped when the handle drops, so a failing test or an
//! interrupted demo leaves no emulator behind. When the parent dies without dropping it
//! (SIGKILL, abort), the kernel sends the child SIGTERM (`PR_SET_PDEATHSIG`), so it
//! does not outlive the parent holding its ports and shared-memory region either.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Errors starting a child process.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// Program path.
        program: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The child exited or closed stdout before announcing readiness.
    #[error("{program} exited before it was ready (status {status:?})")]
    ExitedEarly {
        /// Program path.
        program: String,
        /// Exit status, if it was reaped.
        status: Option<std::process::ExitStatus>,
    },
    /// The child did not announce readiness in time.
    #[error("{program} was not ready within {timeout:?}")]
    NotReady {
        /// Program path.
        program: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The readiness line did not carry a socket address.
    #[error("{program} announced an unparsable address: {line:?}")]
    BadAddress {
        /// Program path.
        program: String,
        /// The line it printed.
        line: String,
    },
}

/// A child process that announced `listening <addr>`; killed on drop.
#[derive(Debug)]
pub struct ListeningChild {
    child: Child,
    addr: SocketAddr,
}

impl ListeningChild {
    /// Starts `command` (stdout is taken over) and waits up to `timeout` for its line
    /// `listening <addr>`. Later stdout lines are drained in the background so that the
    /// child never blocks on a full pipe.
    ///
    /// The child is sent SIGTERM when the **thread** that called `spawn` ends (that is
    /// how the kernel's parent-death signal works): spawn from a thread that lives as
    /// long as the handle, such as the main thread or the test's own.
    pub fn spawn(mut command: Command, timeout: Duration) -> Result<Self, ChildError> {
        let program = command.get_program().to_string_lossy().into_owned();
        let parent = std::process::id();
        // SAFETY: between fork and exec the closure only makes async-signal-safe system
        // calls (prctl, getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nothing would signal.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        let mut child =
            command
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|source| ChildError::Spawn {
                    program: program.clone(),
                    source,
                })?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || read_announcement(stdout, tx));
        let line = match rx.recv_timeout(timeout) {
            Ok(Some(line)) => line,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(ChildError::ExitedEarly { program, status });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ChildError::NotReady { program, timeout });
            }
        };
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| ChildError::BadAddress {
                program: program.clone(),
                line: line.clone(),
            });
        match addr {
            Ok(addr) => Ok(ListeningChild { child, addr }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The address the child listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ListeningChild {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_announcement(stdout: ChildStdout, tx: mpsc::Sender<Option<String>>) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("listening ") => {
                let _ = tx.send(Some(line));
                break;
            }
            Some(Ok(_)) => continue,
            _ => {
                let _ = tx.send(None);
                return;
            }
        }
    }
    // Keep draining so that the child never blocks writing to a full pipe.
    for _ in lines {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_announcement_and_kills_on_drop() {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo noise; echo 'listening 127.0.0.1:4242'; exec sleep 30",
        ]);
        let child = ListeningChild::spawn(cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(child.addr(), "127.0.0.1:4242".parse().unwrap());
        let pid = child.pid();
        drop(child);
        // Reaped on drop, so the pid is gone (not even a zombie).
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn the_child_is_terminated_when_its_spawning_thread_ends_without_dropping_it() {
        // Stands in for a parent killed with SIGKILL: the handle is never dropped.
        let pid = std::thread::spawn(|| {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "echo 'listening 127.0.0.1:4243'; exec sleep 60"]);
            let child = ListeningChild::spawn(cmd, Duration::from_secs(10)).unwrap();
            let pid = child.pid();
            std::mem::forget(child);
            pid
        })
        .join()
        .unwrap();
        let pid = libc::pid_t::try_from(pid).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut status = 0;
        loop {
            // SAFETY: reaps our own child; `status` is a valid out-pointer.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the orphaned child {pid} is still running"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGTERM);
    }

    #[test]
    fn early_exit_is_an_error() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo bye; exit 3"]);
        assert!(matches!(
            ListeningChild::spawn(cmd, Duration::from_secs(10)),
            Err(ChildError::ExitedEarly { .. })
        ));
    }

    #[test]
    fn bad_address_is_an_error() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'listening nowhere'; exec sleep 30"]);
        assert!(matches!(
            ListeningChild::spawn(cmd, Duration::from_secs(10)),
            Err(ChildError::BadAddress { .. })
        ));
    }
}
