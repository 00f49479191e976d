//! Helpers of the PCIe tests: a region path in a temp dir (under /dev/shm when there is
//! one, as in production), a glommio executor runner, and the fault register.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use hsm_driver::pcie::mem::{DeviceMemory, FileMapping};
use hsm_driver::pcie::regs::REG_FAULT_INJECT;
use hsm_driver::pcie::PcieClientConfig;

/// A temp dir for region files; removed on drop.
pub fn region_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = {
        let mut b = tempfile::Builder::new();
        b.prefix("hsm-pcie-test-");
        b
    };
    if shm.is_dir() {
        if let Ok(d) = builder.tempdir_in(shm) {
            return d;
        }
    }
    builder.tempdir().expect("temp dir")
}

/// `dir/region`.
pub fn region_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("region")
}

/// Runs `f` on a fresh glommio executor (small io memory: many test executors share the
/// memlock limit).
pub fn run<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 * 1024)
        .spawn(f)
        .expect("executor")
        .join()
        .expect("executor join")
}

/// Client settings for tests: generous deadlines, quick fault detection.
pub fn config() -> PcieClientConfig {
    PcieClientConfig {
        call_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(5),
        heartbeat_timeout: Duration::from_millis(300),
        reattach_backoff_min: Duration::from_millis(5),
        reattach_backoff_max: Duration::from_millis(100),
        ..PcieClientConfig::default()
    }
}

/// Writes the emulator's fault register (`op << 16 | queue`) through a mapping of our
/// own, as a test harness poking a card's debug register would.
pub fn inject(region: &Path, op: u32, queue: usize) {
    let m = FileMapping::open(region).expect("map region");
    m.bar()
        .u32_at(REG_FAULT_INJECT)
        .expect("register")
        .store((op << 16) | queue as u32, Ordering::Release);
}

/// Waits (bounded) until the fault register was consumed by the firmware.
pub fn wait_injected(region: &Path) {
    let m = FileMapping::open(region).expect("map region");
    let bar = m.bar();
    let reg = bar.u32_at(REG_FAULT_INJECT).expect("register");
    for _ in 0..2000 {
        if reg.load(Ordering::Acquire) == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("firmware did not take the fault");
}
