//! Canonical bytes of a typical railway ticket invoice: `canonical::encode` (what the
//! core builds per new invoice and the tax server MACs) and `canonical::decode` (what a
//! replay or an auditor pays to read one back, validation included).

mod common;

use std::time::Duration;

use appliance_core::canonical;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let invoice = common::issued_invoice(42);
    let bytes = canonical::encode(&invoice);
    println!("canonical ticket invoice: {} bytes", bytes.len());
    let mut group = c.benchmark_group("canonical");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    group.bench_function("encode", |b| {
        b.iter(|| canonical::encode(black_box(&invoice)))
    });
    // The issuer's path: appending into a reused tick buffer, no allocation per invoice.
    let mut out = Vec::with_capacity(4096);
    group.bench_function("encode_fields_reused_buf", |b| {
        b.iter(|| {
            out.clear();
            canonical::encode_fields(
                black_box(&invoice.request),
                invoice.code,
                invoice.number,
                invoice.issue_time_ms,
                &mut out,
            )
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| canonical::decode(black_box(&bytes)).expect("valid"))
    });
    group.bench_function("decode_header", |b| {
        b.iter(|| canonical::decode_header(black_box(&bytes)).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
