//! Exclusive ownership of what an appliance serves from: its data dir and its UDP ports.
//!
//! The service port is shared by the shards with SO_REUSEPORT, and the shard ports use
//! it too (so that a restart right after a crash binds although the dead process's
//! sockets linger for a few milliseconds). The kernel would therefore let a second
//! instance of the same user bind the same ports and hand it part of the traffic. So,
//! before binding anything, an instance takes an exclusive, non-blocking `flock` on
//! - `<data_dir>/LOCK` (two instances must never write the same journals), and
//! - `<runtime_dir>/udp-<port>.lock` for each UDP port it binds (named by port alone:
//!   any two instances on one host binding the same UDP port conflict, whatever IP).
//!
//! The holder writes its pid and data dir into each lock file, so that a refused start
//! can say who holds it. The kernel releases a `flock` when its holder dies (also on
//! SIGKILL), so a restart gets its locks at once; stale file contents are overwritten.
//!
//! [`check_persistent`] refuses a data dir on a filesystem that forgets its contents at
//! reboot (tmpfs, ramfs): acknowledged invoices would vanish with it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The data dir's lock file.
pub const DATA_DIR_LOCK: &str = "LOCK";

/// The runtime dir used when `/run` lets this user create it.
pub const RUNTIME_DIR_SYSTEM: &str = "/run/einvoice";

/// Why ownership could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// Another instance holds the data dir.
    #[error("data dir {} is already used by another appliance ({holder}); lock {}", data_dir.display(), lock.display())]
    DataDirInUse {
        /// The data dir.
        data_dir: PathBuf,
        /// Who holds it, as its lock file says.
        holder: Holder,
        /// The lock file.
        lock: PathBuf,
    },
    /// Another instance holds a UDP port this one would bind.
    #[error("{what} {addr} is already served by another appliance ({holder}); lock {}", lock.display())]
    PortInUse {
        /// What the port is for: `service address`, `shard 0 port`, ...
        what: String,
        /// The address this instance would bind.
        addr: SocketAddr,
        /// Who holds it, as its lock file says.
        holder: Holder,
        /// The lock file.
        lock: PathBuf,
    },
    /// The data dir is on a filesystem that does not survive a reboot.
    #[error("data dir {} is on {filesystem}, which loses its contents at reboot: invoices acknowledged to clients would vanish with their journals. Use a directory on a disk filesystem, or (for tests only) set unsafe_allow_volatile_data_dir = true", data_dir.display())]
    Volatile {
        /// The data dir.
        data_dir: PathBuf,
        /// The filesystem's name.
        filesystem: &'static str,
    },
    /// A file system operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> OwnershipError {
    let path = path.to_path_buf();
    move |source| OwnershipError::Io {
        action,
        path,
        source,
    }
}

/// Who holds a lock, as the holder wrote it into the lock file (it may not have yet).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Holder {
    /// The holder's process id.
    pub pid: Option<u32>,
    /// The holder's data dir.
    pub data_dir: Option<PathBuf>,
}

impl Holder {
    fn parse(text: &str) -> Holder {
        let mut holder = Holder::default();
        for line in text.lines() {
            if let Some(pid) = line.strip_prefix("pid ") {
                holder.pid = pid.trim().parse().ok();
            } else if let Some(dir) = line.strip_prefix("data_dir ") {
                holder.data_dir = Some(PathBuf::from(dir));
            }
        }
        holder
    }

    fn text(pid: u32, data_dir: &Path) -> String {
        format!("pid {pid}\ndata_dir {}\n", data_dir.display())
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => write!(f, "pid unknown")?,
        }
        if let Some(dir) = &self.data_dir {
            write!(f, ", data dir {}", dir.display())?;
        }
        Ok(())
    }
}

/// A held lock: released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    /// Held, never read: closing it releases the lock.
    _file: File,
    path: PathBuf,
    /// Remove the file on drop (port locks: one file per port ever used would pile up).
    remove: bool,
}

impl Lock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.remove {
            // Removed while still locked; a contender that opened the old file checks
            // after locking that the path still names it (see `try_lock`).
            let _ = std::fs::remove_file(&self.path);
        }
        // Then `_file` closes, which releases the lock.
    }
}

/// Why `try_lock` did not get the lock.
enum LockFailure {
    Held(Holder),
    Io(OwnershipError),
}

/// Takes an exclusive, non-blocking flock on `path` (created if missing) and writes the
/// holder's pid and `data_dir` into it.
fn try_lock(path: &Path, data_dir: &Path, remove: bool) -> Result<Lock, LockFailure> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| LockFailure::Io(io_error("open lock file", path)(e)))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                return Err(LockFailure::Held(Holder::parse(&text)));
            }
            return Err(LockFailure::Io(io_error("lock", path)(error)));
        }
        // A holder removing its file on release may have done so between our open and
        // our flock: then we hold a lock on a file nobody else will ever open. Only a
        // lock on the file the path names now counts.
        let ours = file
            .metadata()
            .map_err(|e| LockFailure::Io(io_error("stat lock file", path)(e)))?;
        match std::fs::metadata(path) {
            Ok(named) if named.ino() == ours.ino() && named.dev() == ours.dev() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(LockFailure::Io(io_error("stat lock file", path)(e))),
        }
        let mut file = file;
        let text = Holder::text(std::process::id(), data_dir);
        file.set_len(0)
            .and_then(|()| std::io::Seek::rewind(&mut file))
            .and_then(|_| file.write_all(text.as_bytes()))
            .map_err(|e| LockFailure::Io(io_error("write lock file", path)(e)))?;
        return Ok(Lock {
            _file: file,
            path: path.to_path_buf(),
            remove,
        });
    }
}

/// Takes `<data_dir>/LOCK` (the data dir must exist). Refused while another instance
/// holds it.
pub fn lock_data_dir(data_dir: &Path) -> Result<Lock, OwnershipError> {
    let lock = data_dir.join(DATA_DIR_LOCK);
    try_lock(&lock, data_dir, false).map_err(|failure| match failure {
        LockFailure::Held(holder) => OwnershipError::DataDirInUse {
            data_dir: data_dir.to_path_buf(),
            holder,
            lock,
        },
        LockFailure::Io(e) => e,
    })
}

/// The lock file of UDP port `port` in `runtime_dir`.
pub fn port_lock_path(runtime_dir: &Path, port: u16) -> PathBuf {
    runtime_dir.join(format!("udp-{port}.lock"))
}

/// Takes the lock of UDP port `addr.port()` for the instance serving `data_dir`;
/// `what` names the port in the refusal (`service address`, `shard 0 port`).
pub fn lock_udp_port(
    runtime_dir: &Path,
    addr: SocketAddr,
    what: &str,
    data_dir: &Path,
) -> Result<Lock, OwnershipError> {
    let lock = port_lock_path(runtime_dir, addr.port());
    try_lock(&lock, data_dir, true).map_err(|failure| match failure {
        LockFailure::Held(holder) => OwnershipError::PortInUse {
            what: what.to_owned(),
            addr,
            holder,
            lock,
        },
        LockFailure::Io(e) => e,
    })
}

/// Removes the port lock files in `runtime_dir` that nobody holds: those of instances
/// that were killed (a clean stop removes its own). Each is removed while locked, so a
/// contender that opened it before cannot keep a lock on it (`try_lock` checks that the
/// path still names the file it locked). Best effort: errors only leave files behind.
pub fn remove_stale_port_locks(runtime_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_port_lock = name
            .to_str()
            .and_then(|n| n.strip_prefix("udp-"))
            .and_then(|n| n.strip_suffix(".lock"))
            .is_some_and(|port| port.parse::<u16>().is_ok());
        if !is_port_lock {
            continue;
        }
        let path = entry.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue; // held: a live instance's
        }
        let same = match (file.metadata(), std::fs::metadata(&path)) {
            (Ok(ours), Ok(named)) => ours.ino() == named.ino() && ours.dev() == named.dev(),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&path);
        }
        // `file` closes here, releasing the lock.
    }
}

/// The runtime dir (port locks) when none is configured: [`RUNTIME_DIR_SYSTEM`] when
/// this user can create and write it, else `/tmp/einvoice-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    let system = Path::new(RUNTIME_DIR_SYSTEM);
    if prepare_runtime_dir(system).is_ok() {
        return system.to_path_buf();
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/einvoice-{uid}"))
}

/// Creates `dir` if needed and checks that it is a directory this user owns and can
/// write (a directory in /tmp made by someone else could hold forged lock files).
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), OwnershipError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(io_error("create runtime dir", dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io_error("stat runtime dir", dir))?;
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid {
        return Err(io_error("use runtime dir", dir)(std::io::Error::other(
            format!("not a directory owned by uid {uid}"),
        )));
    }
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io_error("use runtime dir", dir)(std::io::Error::other(e)))?;
    // SAFETY: access reads a NUL-terminated path.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } != 0 {
        return Err(io_error("write runtime dir", dir)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Filesystems whose contents do not survive a reboot, by `statfs` magic number.
const VOLATILE_FILESYSTEMS: [(u32, &str); 2] = [(0x0102_1994, "tmpfs"), (0x8584_58f6, "ramfs")];

/// The volatile filesystem `path` is on, if it is on one.
pub fn volatile_filesystem(path: &Path) -> Result<Option<&'static str>, OwnershipError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io_error("statfs", path)(std::io::Error::other(e)))?;
    // SAFETY: a zeroed statfs is a valid out-parameter; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io_error("statfs", path)(std::io::Error::last_os_error()));
    }
    // f_type is a signed word on some targets: compare the magic's 32 bits.
    let magic = stat.f_type as u32;
    Ok(VOLATILE_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|&(_, name)| name))
}

/// Refuses a data dir on a volatile filesystem unless `allow_volatile` (tests only).
pub fn check_persistent(data_dir: &Path, allow_volatile: bool) -> Result<(), OwnershipError> {
    match volatile_filesystem(data_dir)? {
        Some(filesystem) if !allow_volatile => Err(OwnershipError::Volatile {
            data_dir: data_dir.to_path_buf(),
            filesystem,
        }),
        Some(filesystem) => {
            tracing::warn!(data_dir = %data_dir.display(), filesystem, "data dir on a volatile filesystem (unsafe_allow_volatile_data_dir): acknowledged invoices vanish at reboot");
            Ok(())
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_locked_once_and_the_refusal_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err();
        match &err {
            OwnershipError::DataDirInUse { holder, lock, .. } => {
                assert_eq!(holder.pid, Some(std::process::id()));
                assert_eq!(holder.data_dir.as_deref(), Some(dir.path()));
                assert_eq!(lock, &dir.path().join(DATA_DIR_LOCK));
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("pid {}, data dir ", std::process::id())),
            "{err}"
        );
        drop(held);
        // Released: taken again; the data dir's lock file stays.
        let again = lock_data_dir(dir.path()).unwrap();
        assert!(again.path().exists());
    }

    #[test]
    fn a_port_is_locked_once_whatever_the_ip_and_released_on_drop() {
        let runtime = tempfile::tempdir().unwrap();
        let a = Path::new("/data/a");
        let b = Path::new("/data/b");
        let held = lock_udp_port(
            runtime.path(),
            "0.0.0.0:4433".parse().unwrap(),
            "service address",
            a,
        )
        .unwrap();
        let err = lock_udp_port(
            runtime.path(),
            "127.0.0.1:4433".parse().unwrap(),
            "shard 1 port",
            b,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "shard 1 port 127.0.0.1:4433 is already served by another appliance (pid {}, data dir /data/a); lock {}",
                std::process::id(),
                runtime.path().join("udp-4433.lock").display()
            )
        );
        // Another port is free.
        let other = lock_udp_port(
            runtime.path(),
            "0.0.0.0:4434".parse().unwrap(),
            "shard 0 port",
            a,
        )
        .unwrap();
        drop(held);
        assert!(!port_lock_path(runtime.path(), 4433).exists());
        let taken = lock_udp_port(
            runtime.path(),
            "0.0.0.0:4433".parse().unwrap(),
            "service address",
            b,
        )
        .unwrap();
        let text = std::fs::read_to_string(taken.path()).unwrap();
        assert_eq!(Holder::parse(&text).data_dir.as_deref(), Some(b));
        drop(other);
    }

    #[test]
    fn a_stale_lock_file_of_a_dead_holder_is_taken_over() {
        let runtime = tempfile::tempdir().unwrap();
        let path = port_lock_path(runtime.path(), 5000);
        std::fs::write(&path, "pid 999999999\ndata_dir /old\n").unwrap();
        let lock = lock_udp_port(
            runtime.path(),
            "0.0.0.0:5000".parse().unwrap(),
            "service address",
            Path::new("/new"),
        )
        .unwrap();
        let holder = Holder::parse(&std::fs::read_to_string(lock.path()).unwrap());
        assert_eq!(holder.pid, Some(std::process::id()));
        assert_eq!(holder.data_dir.as_deref(), Some(Path::new("/new")));
    }

    #[test]
    fn only_the_port_locks_nobody_holds_are_removed() {
        let runtime = tempfile::tempdir().unwrap();
        let held = lock_udp_port(
            runtime.path(),
            "0.0.0.0:6000".parse().unwrap(),
            "service address",
            Path::new("/live"),
        )
        .unwrap();
        let stale = port_lock_path(runtime.path(), 6001);
        std::fs::write(&stale, "pid 999999999\ndata_dir /dead\n").unwrap();
        let other = runtime.path().join("notes.txt");
        std::fs::write(&other, "kept").unwrap();
        remove_stale_port_locks(runtime.path());
        assert!(held.path().exists());
        assert!(!stale.exists());
        assert!(other.exists());
        // The live lock still excludes others.
        assert!(lock_udp_port(
            runtime.path(),
            "0.0.0.0:6000".parse().unwrap(),
            "service address",
            Path::new("/other"),
        )
        .is_err());
    }

    #[test]
    fn a_holder_that_has_not_written_yet_is_reported_as_unknown() {
        assert_eq!(Holder::parse("").to_string(), "pid unknown");
        assert_eq!(
            Holder::parse("pid 12\ndata_dir /x y\n").to_string(),
            "pid 12, data dir /x y"
        );
    }

    #[test]
    fn the_runtime_dir_is_created_and_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("run/einvoice");
        prepare_runtime_dir(&runtime).unwrap();
        assert!(runtime.is_dir());
        prepare_runtime_dir(&runtime).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_runtime_dir(&file).is_err());
        assert!(default_runtime_dir().is_absolute());
    }

    #[test]
    fn a_tmpfs_data_dir_is_refused_unless_allowed() {
        let disk = tempfile::tempdir().unwrap();
        if volatile_filesystem(disk.path()).unwrap().is_some() {
            println!("skipped: the temporary dir is itself on a volatile filesystem");
            return;
        }
        check_persistent(disk.path(), false).unwrap();
        let shm = Path::new("/dev/shm");
        if !matches!(volatile_filesystem(shm), Ok(Some("tmpfs"))) {
            println!("skipped: /dev/shm is not a tmpfs here");
            return;
        }
        let err = check_persistent(shm, false).unwrap_err();
        assert!(matches!(
            err,
            OwnershipError::Volatile {
                filesystem: "tmpfs",
                ..
            }
        ));
        assert!(
            err.to_string().contains("unsafe_allow_volatile_data_dir"),
            "{err}"
        );
        check_persistent(shm, true).unwrap();
    }
}
