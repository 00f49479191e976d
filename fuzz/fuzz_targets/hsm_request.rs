//! Tax-server command bodies as the device (the emulator, TCP or PCIe) decodes them:
//! `Request::decode`, and `Invoices::decode`, the emulator's in-place TaxCodes reader.
//!
//! Invariants: nothing panics; a decoded request has the opcode it was decoded for and
//! re-encodes to the same body (also through `body_parts`, the PCIe gather list);
//! `Invoices::decode` accepts exactly the TaxCodes bodies `Request::decode` accepts,
//! with the same error, holder and items.
#![no_main]

use fuzz_support::{mutate, Input};
use hsm_driver::proto::{
    FaultConfig, Holder, InventoryScope, InvoiceBatch, Invoices, Opcode, Request, Segment,
    UploadBatch,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        let opcode = inp.u8();
        check(opcode, inp.rest());
    } else {
        let req = build(&mut inp);
        let mut body = Vec::new();
        req.encode_body(&mut body).expect("small requests encode");
        let opcode = req.opcode().request_byte();
        assert_eq!(Request::decode(opcode, &body), Ok(req), "own body decodes");
        mutate(&mut body, &mut inp, 4);
        let opcode = if inp.u8() % 8 == 0 { inp.u8() } else { opcode };
        check(opcode, &body);
    }
});

fn holder(inp: &mut Input<'_>) -> Holder {
    Holder::new(u128::from_le_bytes(inp.array()), inp.u32())
}

fn build(inp: &mut Input<'_>) -> Request {
    match inp.u8() % 10 {
        0 => Request::DeviceInfo,
        1 => Request::Requisition {
            taxpayer: inp.array(),
            count: inp.u32(),
            holder: holder(inp),
            request_id: inp.u64(),
        },
        2 => Request::ReturnSegment {
            taxpayer: inp.array(),
            segment: Segment {
                code: inp.u64(),
                first: inp.u32(),
                count: inp.u32(),
            },
            holder: holder(inp),
        },
        3 => {
            let mut batch = InvoiceBatch::new();
            batch.set_holder(holder(inp));
            for _ in 0..inp.range(0, 4) {
                let len = usize::from(inp.u8());
                batch.push(inp.bytes(len)).expect("small items");
            }
            Request::TaxCodes(batch)
        }
        4 => Request::Sign {
            digest: inp.array(),
        },
        5 => {
            let mut batch = UploadBatch::new();
            for _ in 0..inp.range(0, 4) {
                let len = usize::from(inp.u8());
                let invoice = inp.bytes(len).to_vec();
                batch.push(&invoice, &inp.array()).expect("small items");
            }
            Request::Upload(batch)
        }
        6 => Request::ReportAndClear {
            taxpayer: inp.array(),
            period_end_ms: inp.u64(),
        },
        7 => Request::Inventory(match inp.u8() % 3 {
            0 => InventoryScope::All,
            1 => InventoryScope::Taxpayer(inp.array()),
            _ => InventoryScope::Holder(holder(inp)),
        }),
        8 => {
            let len = usize::from(inp.u8());
            Request::Nop(inp.bytes(len).to_vec())
        }
        _ => Request::SetFaults(FaultConfig {
            latency_us: inp.u32(),
            drop_every_nth_connection: inp.u32(),
            refuse: inp.u8() & 1,
            stall_ms: inp.u32(),
            reset_connections: inp.u8() & 1,
        }),
    }
}

fn check(opcode: u8, body: &[u8]) {
    let decoded = Request::decode(opcode, body);
    if let Ok(req) = &decoded {
        assert_eq!(req.opcode().request_byte(), opcode);
        let mut again = Vec::new();
        req.encode_body(&mut again)
            .expect("a decoded request encodes");
        assert_eq!(again, body, "request bodies are exact");
        if let Some(parts) = req.body_parts().expect("a decoded request encodes") {
            assert_eq!([parts.head(), parts.bulk()].concat(), body);
        }
    }
    if opcode == Opcode::TaxCodes.request_byte() {
        match (&decoded, Invoices::decode(body)) {
            (Ok(Request::TaxCodes(batch)), Ok((holder, invoices))) => {
                assert_eq!(batch.holder(), holder);
                assert_eq!(invoices.len(), batch.len());
                assert!(invoices.eq(batch.iter()));
            }
            (Err(a), Err(b)) => assert_eq!(*a, b),
            (a, b) => panic!("Request::decode and Invoices::decode disagree: {a:?} / {b:?}"),
        }
    }
}
