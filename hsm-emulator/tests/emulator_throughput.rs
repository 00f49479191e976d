//! Measurement, not a test of speed: the TaxCodes hot path of the emulator on one core.
//! Run with
//! `cargo test --release -p hsm-driver --test emulator_throughput -- --ignored --nocapture`.
//! It asserts only correctness (every item ok), never a rate.

mod emulator_support;

use std::time::Instant;

use emulator_support::*;
use hsm_driver::proto::{InvoiceBatch, Opcode, Request, TAX_CODES_BATCH_MAX};
use hsm_emulator::{Config, Emulator, Grant};

const CODE: u64 = 144_031_900_111;

#[test]
#[ignore = "measurement; run explicitly with --ignored --nocapture in release mode"]
fn tax_codes_per_second_one_core() {
    let tmp = tempfile::tempdir().unwrap();
    let seller = seller_a();
    let grants = vec![Grant::new(&seller, CODE, 1, 1_000_000).unwrap()];
    let emu = Emulator::open(&Config::new(tmp.path(), grants)).unwrap();
    let seg = emu
        .requisition(
            &tp(&seller),
            1_000_000,
            hsm_driver::proto::Holder::default(),
            1,
        )
        .expect("segment");
    // ~250-byte canonical invoices, the size the foundation budget assumes.
    let mut batch = InvoiceBatch::new();
    for i in 0..TAX_CODES_BATCH_MAX as u32 {
        let mut inv = invoice(&seller, CODE, seg.first + i, false, i as u8);
        // Grow the body to ~140 bytes (header 112) and fix body_len accordingly.
        inv.extend(std::iter::repeat_n(0x5a, 100));
        let body_len = (inv.len() - 112) as u32;
        inv[108..112].copy_from_slice(&body_len.to_le_bytes());
        batch.push(&inv).unwrap();
    }
    let mut body = Vec::new();
    Request::TaxCodes(batch).encode_body(&mut body).unwrap();
    let op = Opcode::TaxCodes.request_byte();
    let mut out = Vec::with_capacity(TAX_CODES_BATCH_MAX * 56 + 64);
    // Warm up and check every item is ok.
    emu.handle_frame(op, 0, &body, &mut out);
    let items = &out[24 + 4..];
    assert!(items.chunks_exact(56).all(|c| c[0] == 0), "all items ok");
    let batches = 200u64;
    let start = Instant::now();
    for id in 0..batches {
        out.clear();
        emu.handle_frame(op, id, &body, &mut out);
    }
    let secs = start.elapsed().as_secs_f64();
    let codes = batches * TAX_CODES_BATCH_MAX as u64;
    println!(
        "tax codes: {codes} in {secs:.3} s = {:.0} codes/s on one thread (frame decode + checks + HMAC-SM3 + encode)",
        codes as f64 / secs
    );

    // Where the time goes: the MAC alone and the check-code derivation alone.
    let inv = invoice(&seller, CODE, 1, false, 0);
    let mut padded = inv.clone();
    padded.extend(std::iter::repeat_n(0x5a, 100));
    let n = 200_000u32;
    let start = Instant::now();
    let mut sink = 0u8;
    for i in 0..n {
        padded[200] = i as u8;
        sink ^= hsm_emulator::crypto::tax_code(emu.tax_code_key(), &padded)[0];
    }
    let mac_ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    let code = hsm_emulator::crypto::tax_code(emu.tax_code_key(), &padded);
    let start = Instant::now();
    for i in 0..n {
        let mut c = code;
        c[0] = i as u8;
        sink ^= hsm_emulator::crypto::check_code(std::hint::black_box(&c))[0];
    }
    let check_ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!(
        "per item: HMAC-SM3 over {} B {mac_ns:.0} ns, check code {check_ns:.0} ns (sink {sink})",
        padded.len()
    );
}
