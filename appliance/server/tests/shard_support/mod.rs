//! Helpers shared by the tests that run one shard in this process against a real
//! tax-server emulator process and real journal files.
#![allow(dead_code)] // each test crate uses a different subset

use appliance_core::issuer::RETENTION_MS_DEFAULT;
use appliance_core::{IssuerConfig, TaxpayerConfig};
use appliance_server::child::ListeningChild;
use appliance_server::journal::JournalConfig;
use appliance_server::shard::ShardConfig;
use appliance_server::workload::{invoice_code, seller};
use hsm_driver::tcp::TcpClientConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// An empty directory under the target dir, named after the test and this process: a
/// real disk (O_DIRECT does not work on tmpfs).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The emulator (`appliance hsm-emu`) on a free TCP port, serving seller 0.
pub fn start_emulator(dir: &Path) -> ListeningChild {
    let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
    command
        .arg("hsm-emu")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--taxpayer")
        .arg(format!("{}:{}:1:99999999", seller(0), invoice_code(0)))
        .stderr(Stdio::null());
    ListeningChild::spawn(command, Duration::from_secs(30)).expect("emulator starts")
}

/// Shard 0 serving seller 0 through the emulator at `hsm`, journaling to `journal`, with
/// ticks of at most `tick_requests_max` requests and two ticks in flight.
pub fn shard_config(
    journal: &Path,
    hsm: std::net::SocketAddr,
    tick_requests_max: u32,
    tax_server: TcpClientConfig,
) -> ShardConfig {
    ShardConfig {
        appliance_id: 0x5eed,
        issuer: IssuerConfig {
            shard_id: 0,
            taxpayers: vec![TaxpayerConfig {
                id: seller(0),
                ceiling_fen: 10_000_000,
                low_watermark: 100,
                refill_count: 1_000,
            }],
            retention_ms: RETENTION_MS_DEFAULT,
            index_capacity_orders: 1 << 12,
            tick_requests_max,
        },
        journal: JournalConfig::new(journal),
        cpu: None,
        tax_servers: vec![hsm_driver::route::Route::tcp(hsm)],
        taxpayer_routes: Default::default(),
        hsm: tax_server.into(),
        spin_before_park: Duration::ZERO,
        ticks_in_flight: 2,
    }
}
