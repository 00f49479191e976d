//! The emulator's per-invoice crypto: `crypto::tax_code` (HMAC-SM3 from the pre-keyed
//! state) over a real canonical ticket invoice, plus the check code, SM4-CMAC and one SM2
//! signature for comparison; and the emulator's whole TaxCodes command per invoice
//! (`tax_code/emulator`), whose excess over the bare crypto is the command's overhead. Target: ≥ 300,000 tax codes/s per core (≤ 3.3 µs each);
//! ARCHITECTURE.md measured RustCrypto HMAC-SM3 over 160 B at ~1.8 µs on this VM.

mod common;

use std::time::Duration;

use appliance_core::{canonical, InvoiceNumber};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hsm_driver::proto::{
    decode_frame, InvoiceBatch, Opcode, Request, Response, TaxCodeStatus, Taxpayer,
};
use hsm_emulator::crypto::{
    check_code, sm3_digest, tax_code, Sm2Signer, TaxCodeKey, SM2_SECRET_KEY_BYTES,
};
use hsm_emulator::{Config, Emulator, Grant};

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
    // The check code alone (limb arithmetic since the u128 division was removed).
    let code = tax_code(&hmac_key, &canonical);
    group.bench_function("check_code", |b| b.iter(|| check_code(black_box(&code))));
    group.bench_function("sm4_cmac", |b| {
        b.iter(|| tax_code(&cmac_key, black_box(&canonical)))
    });
    group.bench_function("sm3_digest", |b| {
        b.iter(|| sm3_digest(black_box(&canonical)))
    });
    group.finish();

    emulator_batch(c);

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

/// Invoices per command in [`emulator_batch`]: the appliance's tick in bulk (~3,000).
const EMULATOR_BATCH: usize = 3_000;

/// The emulator's whole TaxCodes command as both transports run it once the request body
/// is in hand: `Emulator::handle_frame` (batch decode, per item the header and grant
/// checks, HMAC-SM3 and check code, the response frame and its CRC32C). Per invoice it
/// is comparable with `hmac_sm3+check_code` above; the difference is the emulator's
/// command overhead per invoice.
fn emulator_batch(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let seller = common::bench_seller();
    let code = common::bench_code().get();
    let grant = Grant::new(seller.as_str(), code, 1, 90_000_000).expect("grant");
    let emulator = Emulator::open(&Config::new(dir.path(), vec![grant])).expect("emulator");
    let taxpayer: Taxpayer = seller.as_str().as_bytes().try_into().expect("18 bytes");
    let segment = emulator
        .requisition(
            &taxpayer,
            EMULATOR_BATCH as u32,
            hsm_driver::proto::Holder::default(),
            1,
        )
        .expect("numbers");
    let mut batch = InvoiceBatch::new();
    for n in 0..EMULATOR_BATCH as u64 {
        let mut invoice = common::issued_invoice(n);
        invoice.number = InvoiceNumber::new(segment.first + n as u32).expect("in range");
        batch
            .push(&canonical::encode(&invoice))
            .expect("within limits");
    }
    let request = Request::TaxCodes(batch);
    let mut body = Vec::new();
    request.encode_body(&mut body).expect("encodes");
    let opcode = request.opcode().request_byte();
    let mut out = Vec::new();
    // Every item must be answered ok, or the bench would time refusals.
    emulator.handle_frame(opcode, 1, &body, &mut out);
    let frame = decode_frame(&out).expect("frame");
    match Response::decode_frame(Opcode::TaxCodes, &frame.header, frame.body) {
        Ok(Ok(Response::TaxCodes(items))) => {
            assert!(items.iter().all(|i| i.status() == Some(TaxCodeStatus::Ok)))
        }
        other => panic!("unexpected answer {other:?}"),
    }

    let mut group = c.benchmark_group("tax_code/emulator");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(EMULATOR_BATCH as u64));
    group.bench_function(BenchmarkId::new("handle_frame", EMULATOR_BATCH), |b| {
        b.iter(|| {
            out.clear();
            emulator.handle_frame(opcode, 1, black_box(&body), &mut out);
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
