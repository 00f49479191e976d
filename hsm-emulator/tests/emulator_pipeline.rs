//! Pipelining against a real `hsm-emu`: many frames written before any answer is read,
//! answers matched by correlation id (the emulator may answer out of order).

mod emulator_support;

use std::collections::HashMap;
use std::thread;

use emulator_support::*;
use hsm_driver::proto::{InvoiceBatch, Opcode, Request, Response, TaxCodeStatus};

const CODE: u64 = 144_031_900_111;

#[test]
fn many_frames_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let grant = format!("{}:{CODE}:1:100000", seller_a());
    let emu = Emu::start(
        &tmp.path().join("d"),
        &["--taxpayer", &grant, "--threads", "4"],
    );
    let mut c = emu.client();
    requisition(&mut c, &seller_a(), 10_000, 0, 1);

    let mut raw = Raw::connect(emu.addr);
    let mut expect: HashMap<u64, Opcode> = HashMap::new();
    // All 300 requests go out before the first read (their answers fit the socket
    // buffers, so nothing blocks).
    let mut out = Vec::new();
    for id in 0..300u64 {
        let req = match id % 3 {
            0 => Request::Nop(id.to_le_bytes().to_vec()),
            1 => {
                let mut b = InvoiceBatch::new();
                for k in 0..4u32 {
                    let n = (id as u32) * 4 + k + 1;
                    b.push(&invoice(&seller_a(), CODE, n, false, 0)).unwrap();
                }
                Request::TaxCodes(b)
            }
            _ => Request::DeviceInfo,
        };
        hsm_driver::proto::encode_request(&mut out, id, &req).unwrap();
        expect.insert(id, req.opcode());
    }
    raw.send_bytes(&out).unwrap();
    let mut order = Vec::new();
    while !expect.is_empty() {
        let (opcode, _, id, _) = raw.recv().unwrap();
        let op = expect.remove(&id).expect("answer to a pending id, once");
        assert_eq!(opcode, op.response_byte());
        order.push(id);
    }
    assert_eq!(order.len(), 300);
}

#[test]
fn concurrent_pipelined_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let grant = format!("{}:{CODE}:1:1000000", seller_a());
    let emu = Emu::start(
        &tmp.path().join("d"),
        &["--taxpayer", &grant, "--threads", "3"],
    );
    let mut c = emu.client();
    let seg = requisition(&mut c, &seller_a(), 100_000, 0, 1);
    let addr = emu.addr;
    let handles: Vec<_> = (0..4u32)
        .map(|t| {
            thread::spawn(move || {
                let raw = Raw::connect(addr);
                let mut writer = raw.stream.try_clone().unwrap();
                let frames = 500u64;
                // A writer thread keeps sending while this thread reads: true pipelining
                // with more bytes in flight than the socket buffers hold.
                let w = thread::spawn(move || {
                    let mut out = Vec::new();
                    for id in 0..frames {
                        let mut b = InvoiceBatch::new();
                        for k in 0..32u32 {
                            let n = seg.first + t * 20_000 + (id as u32 % 600) * 32 + k;
                            b.push(&invoice(&seller_a(), CODE, n, false, 0)).unwrap();
                        }
                        out.clear();
                        hsm_driver::proto::encode_request(&mut out, id, &Request::TaxCodes(b))
                            .unwrap();
                        std::io::Write::write_all(&mut writer, &out).unwrap();
                    }
                });
                let mut raw = raw;
                let mut seen = vec![false; frames as usize];
                for _ in 0..frames {
                    let (id, r) = raw.recv_response(Opcode::TaxCodes).unwrap();
                    let Ok(Response::TaxCodes(items)) = r else {
                        panic!("{r:?}")
                    };
                    assert_eq!(items.len(), 32);
                    assert!(items.iter().all(|i| i.status() == Some(TaxCodeStatus::Ok)));
                    assert!(!seen[id as usize], "answered twice");
                    seen[id as usize] = true;
                }
                w.join().unwrap();
                assert!(seen.iter().all(|&s| s));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}
