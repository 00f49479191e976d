//! PCIe versus TCP to one real `hsm-emu` process serving both (same device, same
//! state, same run): Nop round trip (the transport's own cost per command), Nop with 64
//! calls in flight (the transport's cost per command when pipelined), and TaxCodes
//! batches of 64 and 1,000 ticket invoices, each with the glommio client a shard uses.
//!
//! The emulator is the release binary next to this bench executable
//! (`target/release/hsm-emu`); build it first with
//! `cargo build --release -p hsm-emulator --bin hsm-emu`. Its PCIe region is a file under
//! /dev/shm. Client, emulator firmware and workers share this machine's cores.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use appliance_core::{canonical, Invoice, InvoiceCode, InvoiceNumber};
use appliance_server::child::ListeningChild;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use hsm_driver::pcie::{PcieClient, PcieClientConfig, QueueSelect};
use hsm_driver::proto::{InvoiceBatch, Request, Response, TaxCodeStatus};
use hsm_driver::route::HsmClient;
use hsm_driver::tcp::{TcpClient, TcpClientConfig};

const BATCHES: [usize; 2] = [64, 1_000];
const NOP_BYTES: usize = 16;
/// Concurrent Nop calls in the pipelined variant.
const PIPELINED_CALLS: u64 = 64;
/// Numbers the authority grants the bench seller in the emulator.
const GRANT_NUMBERS: u32 = 1_000_000;

/// `target/<profile>/hsm-emu`: bench executables live in `target/<profile>/deps/`.
fn emulator_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("hsm-emu");
    path.is_file().then_some(path)
}

/// The emulator process (killed on drop), its data directory and its region.
struct Emulator {
    child: ListeningChild,
    region: PathBuf,
    _data: tempfile::TempDir,
    _regions: tempfile::TempDir,
}

fn start_emulator(path: &Path) -> Emulator {
    let data = tempfile::Builder::new()
        .prefix("bench-hsm-emu-")
        .tempdir()
        .expect("temp dir");
    let regions = tempfile::Builder::new()
        .prefix("bench-hsm-pcie-")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("region dir");
    let region = regions.path().join("region");
    let seller = common::bench_seller();
    let mut command = Command::new(path);
    // Its info logs on stderr would interleave with criterion's report.
    command.env("RUST_LOG", "warn");
    command
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--pcie-queues",
            "2",
            "--taxpayer",
        ])
        .arg(format!(
            "{}:{}:1:{GRANT_NUMBERS}",
            seller.as_str(),
            common::bench_code().get()
        ))
        .arg("--pcie")
        .arg(&region);
    let child = ListeningChild::spawn(command, Duration::from_secs(10)).expect("hsm-emu starts");
    Emulator {
        child,
        region,
        _data: data,
        _regions: regions,
    }
}

/// One TaxCodes request per batch size, over numbers the emulator granted to holder 0
/// (so every item is answered ok, the path a shard exercises).
async fn tax_code_requests(client: &HsmClient) -> Vec<Request> {
    let seller = common::bench_seller();
    let segment = match client
        .call(&Request::Requisition {
            taxpayer: *seller.as_bytes(),
            count: 1_000,
            holder: hsm_driver::proto::Holder::default(),
            request_id: 1,
        })
        .await
        .expect("requisition")
    {
        Response::Requisition(segment) => segment,
        other => panic!("unexpected answer {other:?}"),
    };
    let invoices: Vec<Vec<u8>> = (0..1_000u32)
        .map(|i| {
            let mut invoice: Invoice = common::issued_invoice(u64::from(i));
            invoice.code = InvoiceCode::new(segment.code).expect("valid code");
            invoice.number = InvoiceNumber::new(segment.first + i).expect("valid number");
            canonical::encode(&invoice)
        })
        .collect();
    BATCHES
        .iter()
        .map(|&n| {
            let bytes = invoices[..n].iter().map(Vec::len).sum();
            let mut batch = InvoiceBatch::with_capacity(n, bytes);
            for invoice in &invoices[..n] {
                batch.push(invoice).expect("fits");
            }
            Request::TaxCodes(batch)
        })
        .collect()
}

fn check_tax_codes(response: Response, n: usize) {
    match response {
        Response::TaxCodes(items) => {
            assert_eq!(items.len(), n);
            assert!(items.iter().all(|i| i.status == TaxCodeStatus::Ok as u8));
        }
        other => panic!("unexpected answer {other:?}"),
    }
}

/// The default PCIe client settings; `HSM_PCIE_SPIN_US` and `HSM_PCIE_BACKOFF_MAX_US`
/// override the polling policy for experiments.
fn pcie_config() -> PcieClientConfig {
    let env_us = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_micros)
    };
    let d = PcieClientConfig::default();
    PcieClientConfig {
        spin: env_us("HSM_PCIE_SPIN_US").unwrap_or(d.spin),
        backoff_max: env_us("HSM_PCIE_BACKOFF_MAX_US").unwrap_or(d.backoff_max),
        ..d
    }
}

fn executor() -> LocalExecutor {
    // 1 MiB of io_uring registered memory: RLIMIT_MEMLOCK is 8 MiB on this machine and
    // shared with every other glommio process of the user.
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor")
}

fn bench(c: &mut Criterion) {
    let Some(path) = emulator_path() else {
        eprintln!(
            "hsm_pcie: SKIPPED: no hsm-emu next to this bench executable; run \
             `cargo build --release -p hsm-emulator --bin hsm-emu` first"
        );
        return;
    };
    let emulator = start_emulator(&path);
    let addr = emulator.child.addr();
    let ex = executor();
    let region = emulator.region.clone();
    let clients: Vec<(&'static str, Rc<HsmClient>)> = ex.run(async move {
        let tcp = HsmClient::Tcp(
            TcpClient::connect(addr, TcpClientConfig::default())
                .await
                .expect("tcp connect"),
        );
        let pcie = HsmClient::Pcie(
            PcieClient::connect(&region, QueueSelect::Any, pcie_config())
                .await
                .expect("pcie attach"),
        );
        vec![("tcp", Rc::new(tcp)), ("pcie", Rc::new(pcie))]
    });
    let requests = ex.run({
        let c = Rc::clone(&clients[0].1);
        async move { tax_code_requests(&c).await }
    });
    let nop = Request::Nop(vec![0xAB; NOP_BYTES]);

    let mut group = c.benchmark_group("hsm_pcie/nop");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    for (name, client) in &clients {
        group.bench_function(BenchmarkId::new("round_trip", name), |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.call(&nop).await.expect("nop");
                    }
                    start.elapsed()
                })
            })
        });
        // Per-call time here is the inverse of the transport's call rate with 64 calls
        // in flight: its own cost per command.
        group.bench_function(BenchmarkId::new("pipelined_64", name), |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let start = Instant::now();
                    let per_task = iters.div_ceil(PIPELINED_CALLS);
                    let tasks: Vec<_> = (0..PIPELINED_CALLS)
                        .map(|_| {
                            let client = Rc::clone(client);
                            let nop = nop.clone();
                            glommio::spawn_local(async move {
                                for _ in 0..per_task {
                                    client.call(&nop).await.expect("nop");
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await;
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_task * PIPELINED_CALLS) as f64)
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("hsm_pcie/tax_codes");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (request, n) in requests.iter().zip(BATCHES) {
        group.throughput(Throughput::Elements(n as u64));
        for (name, client) in &clients {
            group.bench_function(BenchmarkId::new(format!("{name}_batch"), n), |b| {
                b.iter_custom(|iters| {
                    ex.run(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            check_tax_codes(client.call(request).await.expect("tax codes"), n);
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
    // The clients' tasks live on the executor: close and drop them there.
    ex.run(async move {
        for (_, c) in &clients {
            c.close();
        }
        drop(clients);
    });
    drop(emulator);
}

criterion_group!(benches, bench);
criterion_main!(benches);
