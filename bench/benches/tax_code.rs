//! The emulator's per-invoice crypto: `crypto::tax_code` (HMAC-SM3 from the pre-keyed
//! state) over a real canonical ticket invoice, plus the check code, SM4-CMAC and one SM2
//! signature for comparison. Target: ≥ 300,000 tax codes/s per core (≤ 3.3 µs each);
//! ARCHITECTURE.md measured RustCrypto HMAC-SM3 over 160 B at ~1.8 µs on this VM.

mod common;

use std::time::Duration;

use appliance_core::canonical;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use hsm_driver::crypto::{
    check_code, sm3_digest, tax_code, Sm2Signer, TaxCodeKey, SM2_SECRET_KEY_BYTES,
};

fn bench(c: &mut Criterion) {
    let canonical = canonical::encode(&common::issued_invoice(42));
    println!("canonical ticket invoice: {} bytes", canonical.len());
    let hmac_key = TaxCodeKey::hmac_sm3(&[0x5A; 32]);
    let cmac_key = TaxCodeKey::sm4_cmac(&[0x3C; 16]);

    let mut group = c.benchmark_group("tax_code");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    group.bench_function("hmac_sm3", |b| {
        b.iter(|| tax_code(&hmac_key, black_box(&canonical)))
    });
    // What the emulator does per item: tax code and the printed check code.
    group.bench_function("hmac_sm3+check_code", |b| {
        b.iter(|| check_code(&tax_code(&hmac_key, black_box(&canonical))))
    });
    group.bench_function("sm4_cmac", |b| {
        b.iter(|| tax_code(&cmac_key, black_box(&canonical)))
    });
    group.bench_function("sm3_digest", |b| {
        b.iter(|| sm3_digest(black_box(&canonical)))
    });
    group.finish();

    // SM2 is ~100x slower: its own group with fewer samples keeps the run short.
    let mut group = c.benchmark_group("tax_code/sm2");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let signer = Sm2Signer::from_secret_bytes(&[0x11; SM2_SECRET_KEY_BYTES]).expect("valid scalar");
    let digest = sm3_digest(&canonical);
    group.bench_function("sign", |b| b.iter(|| signer.sign(black_box(&digest))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
