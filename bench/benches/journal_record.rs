//! Journal record encoding of one issued ticket invoice: the framing (`frame::
//! encode_record` / `decode_record_at`, header + CRC32C) and the Issued body
//! (`record::encode_issued` / `decode_issued`, which decodes the canonical bytes too).

mod common;

use std::time::Duration;

use appliance_core::canonical;
use appliance_core::journal::frame::{decode_record_at, encode_record};
use appliance_core::journal::record::{decode_issued, encode_issued, RecordKind};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let invoice = common::issued_invoice(42);
    let canonical = canonical::encode(&invoice);
    let mut body = Vec::new();
    encode_issued(
        &canonical,
        &invoice.tax_control_code,
        &invoice.check_code,
        &mut body,
    );
    let mut framed = Vec::new();
    encode_record(&mut framed, RecordKind::Issued as u8, 7, &body);
    println!(
        "issued record: canonical {} B, body {} B, framed {} B",
        canonical.len(),
        body.len(),
        framed.len()
    );

    let mut group = c.benchmark_group("journal_record");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    // Reused output buffers, as the issuer reuses its tick journal buffer.
    let mut out = Vec::with_capacity(4096);
    group.bench_function("frame/encode_record", |b| {
        b.iter(|| {
            out.clear();
            encode_record(&mut out, RecordKind::Issued as u8, 7, black_box(&body));
        })
    });
    group.bench_function("frame/decode_record_at", |b| {
        b.iter(|| decode_record_at(black_box(&framed), 0).expect("valid"))
    });
    group.bench_function("record/encode_issued", |b| {
        b.iter(|| {
            out.clear();
            encode_issued(
                black_box(&canonical),
                &invoice.tax_control_code,
                &invoice.check_code,
                &mut out,
            );
        })
    });
    group.bench_function("record/decode_issued", |b| {
        b.iter(|| decode_issued(black_box(&body)).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
