//! Journal record bodies (appliance-core `journal::record`), as recovery decodes them
//! from a file that may have been damaged or written by another build.
//!
//! Invariants: `Record::decode`, `decode_issued` and `issued_canonical_bytes` never panic
//! (the module promises it); decoding is strict, so a decoded record re-encodes to the
//! same body and reports the kind it was decoded as; the three Issued readers agree.
#![no_main]

use appliance_core::canonical;
use appliance_core::journal::record::{decode_issued, issued_canonical_bytes, Record};
use fuzz_support::{mutate, record, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        let kind = inp.u8();
        check(kind, inp.rest());
    } else {
        let rec = record(&mut inp);
        let kind = rec.kind() as u8;
        let mut body = Vec::new();
        rec.encode_body(&mut body);
        assert_eq!(Record::decode(kind, &body), Ok(rec), "own body decodes");
        mutate(&mut body, &mut inp, 4);
        // Sometimes read the body as another kind.
        let kind = if inp.u8() % 8 == 0 { inp.u8() } else { kind };
        check(kind, &body);
    }
});

fn check(kind: u8, body: &[u8]) {
    let decoded = Record::decode(kind, body);
    if let Ok(rec) = &decoded {
        assert_eq!(rec.kind() as u8, kind);
        let mut again = Vec::new();
        rec.encode_body(&mut again);
        assert_eq!(again, body, "record bodies are strict");
    }
    if kind == 3 {
        let issued = decode_issued(body);
        match (&decoded, &issued) {
            (Ok(Record::Issued(a)), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(a, b),
            other => panic!("Record::decode and decode_issued disagree: {other:?}"),
        }
        if let Ok(invoice) = issued {
            let bytes = issued_canonical_bytes(body).expect("a decodable Issued body");
            assert_eq!(bytes, canonical::encode(&invoice));
        }
    }
}
