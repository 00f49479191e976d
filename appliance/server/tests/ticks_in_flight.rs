//! A shard with two ticks in flight loses its tax server (the emulator process is
//! stopped with SIGSTOP, so every command times out) while batches keep coming:
//! - every request of every tick out at the time, and of the ticks begun after, is
//!   answered with `IssueFailure::TaxServer` (safe to retry), none is left unanswered;
//! - once the emulator runs again (SIGCONT), the same orders are issued, and the numbers
//!   used are exactly 1..=n: the numbers of the aborted ticks (the older one's included,
//!   which can only go back after the newer one's) all went back, none skipped, none
//!   twice.

use appliance_core::issuer::RETENTION_MS_DEFAULT;
use appliance_core::{IssuerConfig, TaxpayerConfig};
use appliance_server::child::ListeningChild;
use appliance_server::journal::JournalConfig;
use appliance_server::shard::{IssueFailure, IssueResult, ShardConfig, ShardHandle};
use appliance_server::workload::{invoice_code, seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BATCH: u64 = 20;
const BATCHES: u64 = 8;

fn fresh_dir(name: &str) -> PathBuf {
    // Under the target dir: a real disk (O_DIRECT does not work on tmpfs).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

fn submit_all(shard: &ShardHandle, from: u64) -> Vec<flume::Receiver<Vec<IssueResult>>> {
    (0..BATCHES)
        .map(|b| {
            let first = from + b * BATCH;
            let requests = (first..first + BATCH)
                .map(|n| ticket_request(seller(0), "pipe", n))
                .collect();
            shard.submit(requests).unwrap()
        })
        .collect()
}

fn answers(replies: Vec<flume::Receiver<Vec<IssueResult>>>) -> Vec<IssueResult> {
    replies
        .into_iter()
        .flat_map(|r| r.recv_timeout(Duration::from_secs(60)).expect("answered"))
        .collect()
}

#[test]
fn ticks_in_flight_fail_together_and_give_every_number_back() {
    let dir = fresh_dir("ticks-in-flight");
    let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
    command
        .arg("hsm-emu")
        .arg("--data-dir")
        .arg(dir.join("hsm"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--taxpayer")
        .arg(format!("{}:{}:1:99999999", seller(0), invoice_code(0)))
        .stderr(Stdio::null());
    let emulator = ListeningChild::spawn(command, Duration::from_secs(30)).unwrap();
    let config = ShardConfig {
        issuer: IssuerConfig {
            shard_id: 0,
            taxpayers: vec![TaxpayerConfig {
                id: seller(0),
                ceiling_fen: 10_000_000,
                low_watermark: 100,
                refill_count: 10_000,
            }],
            retention_ms: RETENTION_MS_DEFAULT,
            index_capacity_orders: 1 << 12,
            // Small ticks, so that the batches below make several.
            tick_requests_max: 2 * BATCH as u32,
        },
        journal: JournalConfig::new(dir.join("journal")),
        cpu: None,
        tax_servers: vec![hsm_driver::route::Route::tcp(emulator.addr())],
        taxpayer_routes: Default::default(),
        hsm: TcpClientConfig {
            call_timeout: Duration::from_millis(500),
            ..TcpClientConfig::default()
        }
        .into(),
        spin_before_park: Duration::ZERO,
        ticks_in_flight: 2,
    };
    let shard = ShardHandle::spawn(config).unwrap();

    // The tax server stops answering while 8 batches (4 ticks' worth) arrive.
    signal(emulator.pid(), "-STOP");
    let failed = answers(submit_all(&shard, 0));
    signal(emulator.pid(), "-CONT");
    assert_eq!(failed.len() as u64, BATCHES * BATCH);
    for result in &failed {
        assert!(
            matches!(result, Err(IssueFailure::TaxServer(_))),
            "{result:?}"
        );
    }

    // The same orders again, then new ones: all issued, numbers 1..=n.
    let mut numbers = BTreeSet::new();
    for from in [0, BATCHES * BATCH] {
        for result in answers(submit_all(&shard, from)) {
            let issued = result.expect("issued once the tax server is back");
            assert!(!issued.replayed);
            assert!(numbers.insert(issued.invoice.number.get()), "number twice");
        }
    }
    let n = 2 * BATCHES * BATCH;
    assert_eq!(numbers, (1..=n as u32).collect::<BTreeSet<_>>());
    shard.shutdown().unwrap();
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
}
