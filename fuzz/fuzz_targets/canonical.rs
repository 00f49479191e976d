//! Canonical invoice bytes (appliance-core `canonical`): what the journal stores, the tax
//! server reads the header of, and an auditor rebuilds.
//!
//! Invariants: `decode` and `decode_header` never panic; the format promises "exactly one
//! byte string encodes a given invoice", so whatever decodes re-encodes to the same
//! bytes; a decoded invoice's header agrees with `decode_header`.
#![no_main]

use appliance_core::canonical::{
    decode, decode_header, encode_fields, CANONICAL_HEADER_BYTES, KIND_BLUE, KIND_RED,
};
use appliance_core::InvoiceKind;
use fuzz_support::{invoice_code, invoice_number, mutate, request, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        check(inp.rest());
    } else {
        let req = request(&mut inp);
        let code = invoice_code(&mut inp);
        let number = invoice_number(&mut inp);
        let time = inp.u64();
        let mut bytes = Vec::new();
        encode_fields(&req, code, number, time, &mut bytes);
        let back = decode(&bytes).expect("own encoding decodes");
        assert_eq!(back.request, req);
        assert_eq!(
            (back.code, back.number, back.issue_time_ms),
            (code, number, time)
        );
        mutate(&mut bytes, &mut inp, 4);
        check(&bytes);
    }
});

fn check(bytes: &[u8]) {
    let header = decode_header(bytes);
    if let Ok(h) = &header {
        assert_eq!(
            CANONICAL_HEADER_BYTES + h.body_len.get() as usize,
            bytes.len()
        );
    }
    let Ok(invoice) = decode(bytes) else {
        return;
    };
    let h = header.expect("a decodable invoice has a valid header");
    let mut again = Vec::new();
    let len = encode_fields(
        &invoice.request,
        invoice.code,
        invoice.number,
        invoice.issue_time_ms,
        &mut again,
    );
    assert_eq!(len, bytes.len());
    assert_eq!(again, bytes, "canonical bytes are unique");
    assert_eq!(h.invoice_code.get(), invoice.code.get());
    assert_eq!(h.invoice_number.get(), invoice.number.get());
    assert_eq!(&h.seller_taxpayer, invoice.request.seller.as_bytes());
    let kind = match invoice.request.kind {
        InvoiceKind::Blue => KIND_BLUE,
        InvoiceKind::Red(_) => KIND_RED,
    };
    assert_eq!(h.kind, kind);
}
