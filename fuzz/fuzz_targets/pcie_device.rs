//! PCIe descriptors and rings as the device (the emulator's firmware) reads what the
//! driver wrote: `SubmissionEntry::validate`, the geometry checks, and the sans-IO
//! device side (`DeviceSq` fetching from a ring and a doorbell the input fills,
//! `DeviceCq` posting into a ring whose head doorbell the input sets) over heap memory.
//! The memory accessors are the crate's `unsafe` code, so this target is where the
//! sanitizer earns its keep.
//!
//! Invariants: nothing panics, nothing touches memory out of bounds; an accepted
//! descriptor's buffer lies inside the data area and holds its request, so reading it
//! cannot fail; an accepted descriptor is exactly what `SubmissionEntry::new` builds from
//! its fields; an accepted geometry lies inside the DMA region, aligned, without
//! overlaps; a doorbell more than a ring ahead is refused; every completion the device
//! posts passes the driver's check with the phase the driver expects.
#![no_main]

use fuzz_support::{mutate, Input};
use hsm_emulator::pcie::device::{read_request_into, DeviceCq, DeviceSq, Fetched};
use hsm_driver::pcie::mem::{DeviceMemory, HeapMemory};
use hsm_driver::pcie::regs::{
    plan_layout, queue_reg, CompletionEntry, DeviceGeometry, QueueGeometry, SubmissionEntry,
    CHUNK_BYTES, CQ_ENTRY_BYTES, CQ_FLAG_OVERFLOW, CQ_PHASE_OFFSET, QERR_CQ_HEAD, QERR_DESCRIPTOR,
    QERR_DOORBELL, Q_CQ_HEAD, Q_SQ_TAIL, SQ_ENTRY_BYTES,
};
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::Ordering;
use zerocopy::{FromBytes, IntoBytes};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    match inp.u8() % 3 {
        0 => descriptor(&mut inp),
        1 => geometry(&mut inp),
        _ => rings(&mut inp),
    }
});

/// A descriptor's 64 bytes: raw, or a well-formed one (its check right), then damaged.
fn descriptor_bytes(inp: &mut Input<'_>, entries: u32, token: u32, data_bytes: usize) -> Vec<u8> {
    if inp.bool() {
        return inp.array::<SQ_ENTRY_BYTES>().to_vec();
    }
    let chunks = (data_bytes / CHUNK_BYTES).max(1) as u32;
    let first = inp.u32() % chunks;
    let n = 1 + inp.u32() % (chunks - first);
    let bytes = n * CHUNK_BYTES as u32;
    let e = SubmissionEntry::new(
        (inp.u32() % entries.max(1)) as u16,
        inp.u8(),
        inp.u64(),
        u64::from(first) * CHUNK_BYTES as u64,
        bytes,
        inp.u32() % (bytes + 1),
        inp.u32(),
        if inp.u8() % 8 == 0 { inp.u32() } else { token },
    );
    let mut b = e.as_bytes().to_vec();
    if inp.u8() % 4 == 0 {
        mutate(&mut b, inp, 2);
        b.resize(SQ_ENTRY_BYTES, 0);
    }
    b
}

fn descriptor(inp: &mut Input<'_>) {
    let entries = inp.u32();
    let token = inp.u32();
    let data_bytes = inp.u64() as usize;
    let raw = descriptor_bytes(inp, entries.min(1024), token, data_bytes.min(1 << 26));
    let entry = SubmissionEntry::read_from_bytes(&raw).expect("64 bytes");
    let Ok(v) = entry.validate(entries, token, data_bytes) else {
        return;
    };
    assert!(entry.check_ok());
    assert!(u32::from(v.tag) < entries);
    assert!(v
        .data_offset
        .checked_add(v.buffer_bytes)
        .is_some_and(|end| end <= data_bytes));
    assert!(v.request_len <= v.buffer_bytes);
    let again = SubmissionEntry::new(
        v.tag,
        v.opcode,
        v.correlation_id,
        v.data_offset as u64,
        v.buffer_bytes as u32,
        v.request_len as u32,
        v.request_crc32c,
        token,
    );
    assert_eq!(again, entry, "an accepted descriptor is exactly its fields");
}

fn geometry(inp: &mut Input<'_>) {
    // Plausible values most of the time, so that the queue checks are reached.
    let plausible = inp.u8() % 4 != 0;
    let queues = if plausible {
        inp.range(1, 4)
    } else {
        inp.u32()
    };
    let entries = if plausible {
        1 << inp.range(1, 10)
    } else {
        inp.u32()
    };
    let chunk = if plausible {
        CHUNK_BYTES as u32
    } else {
        inp.u32()
    };
    let mapped = if plausible {
        inp.range(1, 1 << 16) as usize * 64
    } else {
        inp.u64() as usize
    };
    let dma = if plausible { mapped as u64 } else { inp.u64() };
    let Ok(d) = DeviceGeometry::validate(queues, entries, chunk, dma, mapped) else {
        return;
    };
    assert!(d.dma_bytes <= mapped);
    assert!(d.entries.is_power_of_two());
    for _ in 0..inp.range(1, 4) {
        let field = |inp: &mut Input<'_>| -> u64 {
            if plausible {
                u64::from(inp.u32() % (d.dma_bytes as u32).max(1)) & !63
            } else {
                inp.u64()
            }
        };
        let (sq, cq, data) = (field(inp), field(inp), field(inp));
        let data_bytes = if plausible {
            u64::from(inp.range(1, 16)) * CHUNK_BYTES as u64
        } else {
            inp.u64()
        };
        let Ok(q) = QueueGeometry::validate(&d, sq, cq, data, data_bytes) else {
            continue;
        };
        let e = q.entries as usize;
        let spans = [
            (q.sq_offset, q.sq_offset + e * SQ_ENTRY_BYTES),
            (q.cq_offset, q.cq_offset + e * CQ_ENTRY_BYTES),
            (q.data_offset, q.data_offset + q.data_bytes),
        ];
        for (i, a) in spans.iter().enumerate() {
            assert!(a.1 <= d.dma_bytes, "inside the DMA region");
            for b in &spans[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "no overlap");
            }
        }
        assert_eq!(q.sq_offset % 64, 0);
        assert_eq!(q.cq_offset % 64, 0);
        assert_eq!(q.data_offset % CHUNK_BYTES, 0);
        assert_eq!(q.data_bytes % CHUNK_BYTES, 0);
    }
    if plausible {
        if let Ok((qs, total)) = plan_layout(
            queues as usize,
            entries,
            inp.range(1, 16) as usize * CHUNK_BYTES,
        ) {
            let whole =
                DeviceGeometry::validate(queues, entries, CHUNK_BYTES as u32, total as u64, total)
                    .expect("a planned layout validates");
            for q in qs {
                let again = QueueGeometry::validate(
                    &whole,
                    q.sq_offset as u64,
                    q.cq_offset as u64,
                    q.data_offset as u64,
                    q.data_bytes as u64,
                );
                assert_eq!(again, Ok(q));
            }
        }
    }
}

fn rings(inp: &mut Input<'_>) {
    let entries = 1u32 << inp.range(1, 6);
    let data_bytes = inp.range(1, 8) as usize * CHUNK_BYTES;
    let (geoms, dma_bytes) = plan_layout(1, entries, data_bytes).expect("small layout");
    let g = geoms[0];
    let mem = HeapMemory::new(dma_bytes);
    let (bar, dma) = (mem.bar(), mem.dma());
    let token = inp.u32();
    let mut sq = DeviceSq::new(g, 0);
    let mut cq = DeviceCq::new(g, 0);
    let mut posted = 0u32;
    let mut scratch = Vec::new();
    'rounds: for _ in 0..inp.range(1, 4) {
        // The driver's side: descriptors in some slots, bytes in the data area, the
        // doorbells.
        for _ in 0..inp.range(0, entries) {
            let slot = (inp.u32() % entries) as usize;
            let raw = descriptor_bytes(inp, entries, token, g.data_bytes);
            dma.write(g.sq_offset + slot * SQ_ENTRY_BYTES, &raw)
                .expect("inside the ring");
        }
        let at = inp.u32() as usize % g.data_bytes;
        let fill_len = usize::from(inp.u8());
        let fill = inp.bytes(fill_len);
        let fill = &fill[..fill.len().min(g.data_bytes - at)];
        dma.write(g.data_offset + at, fill)
            .expect("inside the data area");
        let tail = match inp.u8() % 4 {
            0 => inp.u32(),
            _ => sq.head().wrapping_add(inp.range(0, entries)),
        };
        store(&bar, queue_reg(0, Q_SQ_TAIL), tail);
        let head = match inp.u8() % 4 {
            0 => inp.u32(),
            _ => posted.wrapping_sub(inp.range(0, entries.min(posted))),
        };
        store(&bar, queue_reg(0, Q_CQ_HEAD), head);

        // The device's side.
        let pending = match sq.pending(&bar) {
            Ok(n) => n,
            Err(code) => {
                assert_eq!(code, QERR_DOORBELL);
                assert!(tail.wrapping_sub(sq.head()) > entries);
                break;
            }
        };
        assert!(pending <= entries);
        for _ in 0..pending {
            let (tag, cid, opcode, sq_head, sub) = match sq.fetch(&dma, token) {
                Err(code) => {
                    assert_eq!(code, QERR_DESCRIPTOR);
                    break 'rounds;
                }
                Ok(Fetched::Refused {
                    tag,
                    correlation_id,
                    opcode,
                    sq_head,
                    ..
                }) => (tag, correlation_id, opcode, sq_head, None),
                Ok(Fetched::Valid { sub, sq_head }) => {
                    let body = sq
                        .read_request(&dma, &sub)
                        .expect("an accepted buffer reads");
                    let crc = read_request_into(&g, &dma, &sub, &mut scratch)
                        .expect("an accepted buffer reads");
                    assert_eq!(&scratch[..sub.request_len], &body[..]);
                    assert_eq!(crc, crc32c::crc32c(&body));
                    (sub.tag, sub.correlation_id, sub.opcode, sq_head, Some(sub))
                }
            };
            assert!(u32::from(tag) < entries, "answerable tags are in range");
            match cq.has_room(&bar) {
                Err(code) => {
                    assert_eq!(code, QERR_CQ_HEAD);
                    assert!(posted.wrapping_sub(head) > entries);
                    break 'rounds;
                }
                Ok(false) => break,
                Ok(true) => {}
            }
            let answer_len = usize::from(inp.u16() % 9000);
            let answer = inp.bytes(answer_len);
            let (flags, len) = match &sub {
                Some(sub) => {
                    let (flags, len) = cq.write_response(&dma, sub, answer).expect("inside");
                    assert_eq!(flags == CQ_FLAG_OVERFLOW, answer.len() > sub.buffer_bytes);
                    (flags, len)
                }
                None => (0, 0),
            };
            let entry = CompletionEntry::new(
                tag,
                opcode | 0x80,
                flags,
                inp.u16(),
                cid,
                len,
                crc32c::crc32c(answer),
                sq_head,
            );
            cq.post(&dma, entry, None).expect("inside the ring");
            // What the driver reads back checks out, with the phase it expects.
            let slot = (posted % entries) as usize;
            let mut raw = [0u8; CQ_ENTRY_BYTES];
            dma.read(g.cq_offset + slot * CQ_ENTRY_BYTES, &mut raw)
                .expect("inside");
            let read = CompletionEntry::read_from_bytes(&raw).expect("32 bytes");
            let word = read.phase_check.get();
            assert!(read.check_ok(word));
            assert_eq!(CompletionEntry::phase_of(word), (posted / entries) % 2 == 0);
            assert_eq!(
                &raw[..CQ_PHASE_OFFSET],
                &entry.as_bytes()[..CQ_PHASE_OFFSET]
            );
            posted = posted.wrapping_add(1);
        }
    }
}

fn store(bar: &hsm_driver::pcie::mem::MemRegion, offset: usize, value: u32) {
    bar.u32_at(offset)
        .expect("inside the BAR")
        .store(value, Ordering::Release);
}
