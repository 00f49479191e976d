//! Round trips to a real `hsm-emu` process over loopback TCP: Nop (the transport's own
//! cost) and TaxCodes batches of 1, 64 and 1,000 ticket invoices, with the glommio
//! `TcpClient` a shard uses and with the blocking client for comparison.
//!
//! The emulator is the release binary next to this bench executable
//! (`target/release/hsm-emu`); build it first with
//! `cargo build --release -p hsm-emulator --bin hsm-emu`. Client and emulator share this
//! machine's cores, so the figures are an upper bound on a shard's HSM latency.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use appliance_core::{canonical, Invoice, InvoiceCode, InvoiceNumber};
use appliance_server::child::ListeningChild;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use hsm_driver::proto::{InvoiceBatch, Request, Response, TaxCodeStatus};
use hsm_driver::tcp::{blocking, TcpClient, TcpClientConfig};

const BATCHES: [usize; 3] = [1, 64, 1_000];
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

/// The emulator process (killed on drop) and its data directory.
struct Emulator {
    child: ListeningChild,
    _data: tempfile::TempDir,
}

fn start_emulator(path: &PathBuf) -> Emulator {
    let data = tempfile::Builder::new()
        .prefix("bench-hsm-emu-")
        .tempdir()
        .expect("temp dir");
    let seller = common::bench_seller();
    let mut command = Command::new(path);
    // Its info logs on stderr would interleave with criterion's report.
    command.env("RUST_LOG", "warn");
    command
        .arg("--data-dir")
        .arg(data.path())
        .args(["--listen", "127.0.0.1:0", "--taxpayer"])
        .arg(format!(
            "{}:{}:1:{GRANT_NUMBERS}",
            seller.as_str(),
            common::bench_code().get()
        ));
    let child = ListeningChild::spawn(command, Duration::from_secs(10)).expect("hsm-emu starts");
    Emulator { child, _data: data }
}

/// One TaxCodes request per batch size, over numbers the emulator granted to holder 0
/// (so every item is answered ok, the path a shard exercises).
fn tax_code_requests(client: &mut blocking::Client) -> Vec<Request> {
    let seller = common::bench_seller();
    let segment = match client
        .call(&Request::Requisition {
            taxpayer: *seller.as_bytes(),
            count: 1_000,
            holder: hsm_driver::proto::Holder::default(),
            request_id: 1,
        })
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

fn executor() -> LocalExecutor {
    // 1 MiB of io_uring registered memory: RLIMIT_MEMLOCK is 8 MiB on this machine and
    // shared with every other glommio process of the user (tests of other crates).
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor")
}

fn bench(c: &mut Criterion) {
    let Some(path) = emulator_path() else {
        eprintln!(
            "hsm_tcp: SKIPPED: no hsm-emu next to this bench executable; run \
             `cargo build --release -p hsm-emulator --bin hsm-emu` first"
        );
        return;
    };
    let emulator = start_emulator(&path);
    let addr = emulator.child.addr();
    let config = TcpClientConfig::default();
    let mut blocking = blocking::Client::connect(addr, config).expect("connect");
    let requests = tax_code_requests(&mut blocking);
    let nop = Request::Nop(vec![0xAB; NOP_BYTES]);

    // One executor for the whole group: `run` drives a whole criterion measurement
    // (`iters` calls), so the per-`run` set-up is amortised; the client's reader task
    // stays spawned on the executor between runs.
    let ex = executor();
    let client = Rc::new(ex.run(TcpClient::connect(addr, config)).expect("connect"));

    let mut group = c.benchmark_group("hsm_tcp/nop");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    group.bench_function("glommio", |b| {
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
    // What the pipelined client is for: many calls of one shard in flight on one
    // connection. Per-call time here is the inverse of the connection's call rate.
    group.bench_function(
        BenchmarkId::new("glommio_pipelined", PIPELINED_CALLS),
        |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let start = Instant::now();
                    let per_task = iters.div_ceil(PIPELINED_CALLS);
                    let tasks: Vec<_> = (0..PIPELINED_CALLS)
                        .map(|_| {
                            let client = Rc::clone(&client);
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
                    // Rounded up to whole tasks: scale back to `iters` calls.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_task * PIPELINED_CALLS) as f64)
                })
            })
        },
    );
    group.bench_function("blocking", |b| b.iter(|| blocking.call(&nop).expect("nop")));
    group.finish();

    let mut group = c.benchmark_group("hsm_tcp/tax_codes");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (request, n) in requests.iter().zip(BATCHES) {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("glommio", n), |b| {
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
        group.bench_function(BenchmarkId::new("blocking", n), |b| {
            b.iter(|| check_tax_codes(blocking.call(request).expect("tax codes"), n))
        });
    }
    group.finish();
    // The client's tasks live on the executor: close and drop it there.
    ex.run(async move {
        client.close();
        drop(client);
    });
    drop(emulator);
}

criterion_group!(benches, bench);
criterion_main!(benches);
