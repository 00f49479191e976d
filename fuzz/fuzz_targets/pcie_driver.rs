//! PCIe completion ring as the driver (`QueueEngine`, what a shard's `PcieClient`
//! polls) reads what a device wrote. The input plays a device that is sometimes honest
//! (fetching the real submissions and answering them with `DeviceCq`), sometimes lying
//! in one field (tag, id, opcode, flags, length, CRC, submission head, check word), and
//! sometimes writing raw bytes into the next completion slot.
//!
//! Invariants: nothing panics and nothing touches memory out of bounds; the engine's
//! accounting holds (calls in flight never exceed the ring, completions never exceed
//! submissions); a queue fault fails every call in flight, and after `fail_all` every
//! call the caller has not abandoned finishes (each call ends once).
#![no_main]

use fuzz_support::Input;
use hsm_emulator::pcie::device::{Corruption, DeviceCq, DeviceSq, Fetched};
use hsm_driver::pcie::mem::{DeviceMemory, HeapMemory, MemRegion};
use hsm_driver::pcie::queue::{Outcome, QueueEngine};
use hsm_driver::pcie::regs::{
    plan_layout, queue_reg, CompletionEntry, CHUNK_BYTES, CQ_ENTRY_BYTES, CQ_PHASE_OFFSET,
    Q_CQ_HEAD, Q_SQ_TAIL,
};
use hsm_driver::pcie::response_capacity;
use hsm_driver::proto::{Holder, InventoryScope, Request, Response, Segment, RESPONSE_FLAG};
use hsm_driver::tcp::HsmError;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

/// A call the caller still waits for: (tag, correlation id).
type Call = (u16, u64);

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let entries = 1u32 << inp.range(1, 5);
    let data_bytes = inp.range(1, 8) as usize * CHUNK_BYTES;
    let (geoms, dma_bytes) = plan_layout(1, entries, data_bytes).expect("small layout");
    let g = geoms[0];
    let mem = HeapMemory::new(dma_bytes);
    let (bar, dma) = (mem.bar(), mem.dma());
    let mut token = inp.u32();
    let max_in_flight = inp.range(1, 64) as usize;
    let mut engine = QueueEngine::new(g, 0, token, max_in_flight);
    let mut sq = DeviceSq::new(g, 0);
    let mut cq = DeviceCq::new(g, 0);
    let mut posted = 0u32;
    let mut fetched = Vec::new();
    let mut calls: Vec<Call> = Vec::new();
    let mut cid = 0u64;

    for _ in 0..64 {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 7 {
            0 | 1 => {
                cid += 1;
                let req = request(&mut inp);
                let (cap, retry) = response_capacity(&req);
                let cap = if inp.bool() {
                    cap
                } else {
                    usize::from(inp.u16())
                };
                if let Ok(tag) = engine.submit_request(&bar, &dma, &req, cid, cap, retry) {
                    calls.push((tag, cid));
                }
            }
            2 => {
                // Honest device fetch of everything the driver rang for.
                if let Ok(n) = sq.pending(&bar) {
                    for _ in 0..n {
                        match sq.fetch(&dma, token) {
                            Ok(Fetched::Valid { sub, sq_head }) => fetched.push((sub, sq_head)),
                            Ok(Fetched::Refused { .. }) | Err(_) => {}
                        }
                    }
                }
            }
            3 if !fetched.is_empty() => {
                // Answer one fetched command, maybe lying in one field.
                let (sub, sq_head) = fetched.remove(inp.u32() as usize % fetched.len());
                if !cq.has_room(&bar).unwrap_or(false) {
                    continue;
                }
                let body = answer(&mut inp, &dma, &sq, &sub);
                let Ok((flags, len)) = cq.write_response(&dma, &sub, &body) else {
                    continue;
                };
                let mut e = CompletionEntry::new(
                    sub.tag,
                    sub.opcode | RESPONSE_FLAG,
                    flags,
                    0,
                    sub.correlation_id,
                    len,
                    crc32c::crc32c(&body),
                    sq_head,
                );
                let mut corruption = None;
                match inp.u8() % 12 {
                    0 => e.tag = inp.u16().into(),
                    1 => e.correlation_id = inp.u64().into(),
                    2 => e.opcode = inp.u8(),
                    3 => e.flags = inp.u8(),
                    4 => e.response_len = inp.u32().into(),
                    5 => e.sq_head = inp.u32().into(),
                    6 => e.status = inp.u16().into(),
                    7 => e.reserved = inp.u16().into(),
                    8 => corruption = Some(Corruption::DataCrc),
                    9 => corruption = Some(Corruption::Descriptor),
                    _ => {}
                }
                if cq.post(&dma, e, corruption).is_ok() {
                    posted = posted.wrapping_add(1);
                }
            }
            4 => {
                // Raw bytes in the slot the driver reads next, with a phase bit that is
                // usually the one it expects.
                let slot = (posted % entries) as usize;
                let at = g.cq_offset + slot * CQ_ENTRY_BYTES;
                let mut raw: [u8; CQ_ENTRY_BYTES] = inp.array();
                let phase = (posted / entries) % 2 == 0;
                let phase = if inp.u8() % 4 == 0 { !phase } else { phase };
                raw[CQ_PHASE_OFFSET + 3] =
                    (raw[CQ_PHASE_OFFSET + 3] & 0x7f) | (u8::from(phase) << 7);
                dma.write(at, &raw).expect("inside the ring");
            }
            5 => {
                let before = engine.in_flight();
                if engine.poll(&bar, &dma).is_err() {
                    // As the client does: fail everything, re-enable the queue.
                    engine.fail_all(|| HsmError::ConnectionLost);
                    assert_eq!(engine.in_flight(), 0);
                    token = token.wrapping_add(1);
                    cq.clear_ring(&dma).expect("inside");
                    store(&bar, queue_reg(0, Q_SQ_TAIL), 0);
                    store(&bar, queue_reg(0, Q_CQ_HEAD), 0);
                    sq = DeviceSq::new(g, 0);
                    cq = DeviceCq::new(g, 0);
                    posted = 0;
                    fetched.clear();
                    engine.reattach(g, token, max_in_flight);
                    for call in std::mem::take(&mut calls) {
                        assert!(finished(&mut engine, call), "a fault fails every call");
                    }
                } else {
                    assert!(engine.in_flight() <= before);
                }
            }
            _ if !calls.is_empty() => {
                let i = inp.u32() as usize % calls.len();
                if inp.bool() {
                    let call = calls.swap_remove(i);
                    engine.abandon(call.0, call.1);
                } else if finished(&mut engine, calls[i]) {
                    calls.swap_remove(i);
                }
            }
            _ => {}
        }
        let stats = engine.stats();
        assert!(engine.in_flight() <= entries as usize);
        assert!(stats.completed <= stats.submitted);
        assert!(stats.rejected <= stats.completed);
    }
    engine.fail_all(|| HsmError::ConnectionLost);
    for call in calls {
        assert!(finished(&mut engine, call), "every call ends");
    }
});

fn finished(engine: &mut QueueEngine, (tag, cid): Call) -> bool {
    match engine.poll_outcome(tag, cid, Waker::noop()) {
        Poll::Ready(Outcome::Answer(_) | Outcome::Overflow { .. }) => true,
        Poll::Pending => false,
    }
}

fn store(bar: &MemRegion, offset: usize, value: u32) {
    bar.u32_at(offset)
        .expect("inside the BAR")
        .store(value, Ordering::Release);
}

fn request(inp: &mut Input<'_>) -> Request {
    match inp.u8() % 5 {
        0 => {
            let len = usize::from(inp.u16() % 9000);
            Request::Nop(inp.bytes(len).to_vec())
        }
        1 => Request::Requisition {
            taxpayer: inp.array(),
            count: inp.u32(),
            holder: Holder::new(7, inp.u32()),
            request_id: inp.u64(),
        },
        2 => Request::Inventory(InventoryScope::All),
        3 => Request::Sign {
            digest: inp.array(),
        },
        _ => Request::ReturnSegment {
            taxpayer: inp.array(),
            segment: Segment {
                code: inp.u64(),
                first: inp.u32(),
                count: inp.u32(),
            },
            holder: Holder::new(7, inp.u32()),
        },
    }
}

/// A device's answer body for `sub`: a well-formed one for its command, or raw bytes.
fn answer(
    inp: &mut Input<'_>,
    dma: &MemRegion,
    sq: &DeviceSq,
    sub: &hsm_driver::pcie::regs::ValidSubmission,
) -> Vec<u8> {
    if inp.u8() % 4 == 0 {
        let len = usize::from(inp.u16() % 9000);
        return inp.bytes(len).to_vec();
    }
    let resp = match sub.opcode & !RESPONSE_FLAG {
        2 => Response::Requisition(Segment {
            code: inp.u64(),
            first: inp.u32(),
            count: inp.u32(),
        }),
        3 => Response::ReturnSegment,
        5 => Response::Sign(inp.array()),
        8 => Response::Inventory(Vec::new()),
        _ => Response::Nop(sq.read_request(dma, sub).unwrap_or_default()),
    };
    let mut body = Vec::new();
    let _ = resp.encode_body(&mut body);
    body
}
