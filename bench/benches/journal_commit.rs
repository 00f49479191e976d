//! Durable commits of the shard's journal (`appliance_server::journal::Journal::commit`):
//! one O_DIRECT write + one fdatasync into a preallocated segment file on the real disk
//! (under cargo's target tmp dir; O_DIRECT fails on tmpfs). Commits of 1 invoice (one
//! 4 KiB block), 64 and 1,000 invoices' Issued records (~330 KB): the fsync-bound cost
//! per tick, which batching amortises. ARCHITECTURE.md measured 4 KiB + fdatasync at
//! ~116 µs on this VM.

mod common;

use std::time::{Duration, Instant};

use appliance_core::canonical;
use appliance_core::journal::frame::{encode_record, pad_to_block};
use appliance_core::journal::record::{encode_issued, RecordKind};
use appliance_server::journal::{Journal, JournalConfig, BLOCK_BYTES};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutorBuilder;

/// The commit a tick of `invoices` new ticket invoices writes, records from `first_seq`.
fn commit_bytes(bodies: &[Vec<u8>], first_seq: u64, out: &mut Vec<u8>) {
    out.clear();
    for (i, body) in bodies.iter().enumerate() {
        encode_record(out, RecordKind::Issued as u8, first_seq + i as u64, body);
    }
    pad_to_block(out, BLOCK_BYTES);
}

fn bench(c: &mut Criterion) {
    // 1 MiB of io_uring registered memory: RLIMIT_MEMLOCK (8 MiB) is shared with every
    // other glommio process of the user; larger commits use unregistered DMA buffers,
    // as they do in the shard.
    let ex = LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor");
    let mut group = c.benchmark_group("journal_commit");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for invoices in [1usize, 64, 1_000] {
        let bodies: Vec<Vec<u8>> = (0..invoices as u64)
            .map(|n| {
                let invoice = common::issued_invoice(n);
                let mut body = Vec::new();
                encode_issued(
                    &canonical::encode(&invoice),
                    &invoice.tax_control_code,
                    &invoice.check_code,
                    &mut body,
                );
                body
            })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("bench-journal-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("temp dir");
        // The production configuration: 1 GiB preallocated segments.
        let mut journal = ex
            .run(Journal::open(JournalConfig::new(dir.path()), |_| {
                Ok::<(), ()>(())
            }))
            .expect("journal opens");
        let mut bytes = Vec::with_capacity(invoices * 512 + BLOCK_BYTES);
        commit_bytes(&bodies, journal.next_seq(), &mut bytes);
        println!(
            "journal_commit/{invoices}: {} bytes per commit",
            bytes.len()
        );
        group.throughput(Throughput::Elements(invoices as u64));
        group.bench_function(BenchmarkId::from_parameter(invoices), |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // Encoding is the core's cost (core_tick); only the commit is timed.
                        commit_bytes(&bodies, journal.next_seq(), &mut bytes);
                        let start = Instant::now();
                        journal.commit(&bytes).await.expect("commit");
                        total += start.elapsed();
                    }
                    total
                })
            })
        });
        ex.run(journal.close()).expect("journal closes");
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
