//! Instruction-count harness of TaxCodes over the PCIe data path, both sides in one
//! thread (no polling, no scheduling): the appliance side builds the batch, encodes and
//! submits it into a heap-backed queue pair; the device side fetches it and runs the
//! emulator's per-command work; the appliance side consumes and decodes the completion.
//! Each stage is an `#[inline(never)]` function so callgrind can count it alone. The
//! device stage repeats the few lines of the firmware's private `execute` around the
//! shared pieces it calls (`read_request_into`, `Emulator::handle_frame`,
//! `DeviceCq::write_response`); keep them in step.
//!
//!
//! ```sh
//! cargo build --release -p hsm-driver --example tax_codes_cost
//! valgrind --tool=callgrind --collect-atstart=no \
//!   --toggle-collect='tax_codes_cost::stage_*' \
//!   target/release/examples/tax_codes_cost 3000 20
//! callgrind_annotate --inclusive=yes callgrind.out.<pid> | grep stage_
//! ```
//!
//! Arguments: invoices per command (default 3,000, the appliance's tick in bulk) and
//! commands (default 20). The canonical invoices are 193 bytes, the size of the demo's
//! ticket invoice. It prints the checksum of every answer so a change that alters an
//! answer shows up as a different line.

use std::sync::atomic::Ordering;

use appliance_core::canonical::{
    CanonicalHeader, CANONICAL_HEADER_BYTES, CANONICAL_MAGIC, CANONICAL_VERSION, KIND_BLUE,
};
use hsm_driver::pcie::mem::{DeviceMemory, HeapMemory, MemRegion};
use hsm_driver::pcie::queue::{Outcome, QueueEngine};
use hsm_driver::pcie::regs::{plan_layout, queue_reg, CompletionEntry, QueueGeometry, Q_ENABLE};
use hsm_driver::pcie::response_capacity;
use hsm_driver::proto::{FrameHeader, InvoiceBatch, Request, Response};
use hsm_emulator::pcie::device::{read_request_into, DeviceCq, DeviceSq, Fetched};
use hsm_emulator::{Config, Emulator, Grant};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SELLER: &str = "91350100M000100Y43";
const CODE: u64 = 144_031_900_111;
/// The demo's ticket invoice is 193 canonical bytes.
const CANONICAL_BYTES: usize = 193;
const TOKEN: u32 = 0x5eed;

fn invoice(number: u32) -> Vec<u8> {
    let body = CANONICAL_BYTES - CANONICAL_HEADER_BYTES;
    let h = CanonicalHeader {
        magic: CANONICAL_MAGIC,
        version: U16::new(CANONICAL_VERSION),
        kind: KIND_BLUE,
        line_count: 1,
        invoice_code: U64::new(CODE),
        invoice_number: U32::new(number),
        tax_rate_bp: U16::new(600),
        reserved: [0; 6],
        issue_time_ms: U64::new(1_790_000_000_000 + u64::from(number)),
        amount_fen: I64::new(100),
        tax_fen: I64::new(6),
        total_fen: I64::new(106),
        seller_taxpayer: SELLER.as_bytes().try_into().expect("18 bytes"),
        buyer_taxpayer: [0; 18],
        original_code: U64::new(0),
        original_number: U32::new(0),
        body_len: U32::new(body as u32),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend((0..body).map(|i| (i as u32 ^ number) as u8));
    v
}

/// The shard's part: one InvoiceBatch from the tick's canonical bytes.
#[inline(never)]
fn stage_build_batch(invoices: &[Vec<u8>]) -> Request {
    let bytes = invoices.iter().map(Vec::len).sum();
    let mut batch = InvoiceBatch::with_capacity(invoices.len(), bytes);
    for inv in invoices {
        batch.push(inv).expect("batch within limits");
    }
    Request::TaxCodes(batch)
}

/// The client's submission: encode the body into the command's buffer, ring.
#[inline(never)]
fn stage_submit(
    engine: &mut QueueEngine,
    bar: &MemRegion,
    dma: &MemRegion,
    req: &Request,
    cid: u64,
) -> u16 {
    let (capacity, overflow) = response_capacity(req);
    engine
        .submit_request(bar, dma, req, cid, capacity, overflow)
        .expect("room in the queue")
}

/// The device's part: fetch the descriptor and run the command as the firmware does.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn stage_device(
    emu: &Emulator,
    geometry: &QueueGeometry,
    sq: &mut DeviceSq,
    cq: &mut DeviceCq,
    bar: &MemRegion,
    dma: &MemRegion,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    assert_eq!(sq.pending(bar), Ok(1));
    let Ok(Fetched::Valid { sub, sq_head }) = sq.fetch(dma, TOKEN) else {
        panic!("descriptor refused");
    };
    // As the firmware's `execute`: copy out with the CRC, run, write the answer.
    let crc = read_request_into(geometry, dma, &sub, scratch).expect("in bounds");
    assert_eq!(crc, sub.request_crc32c);
    out.clear();
    emu.handle_frame(
        sub.opcode,
        sub.correlation_id,
        &scratch[..sub.request_len],
        out,
    );
    let (header, rbody) = FrameHeader::read_from_prefix(out).expect("frame");
    let mut entry = CompletionEntry::new(
        sub.tag,
        header.opcode,
        0,
        header.status.get(),
        sub.correlation_id,
        0,
        header.body_crc32c.get(),
        sq_head,
    );
    let (flags, len) = cq.write_response(dma, &sub, rbody).expect("in bounds");
    entry.flags = flags;
    entry.response_len = len.into();
    assert!(cq.has_room(bar).expect("cq head"));
    cq.post(dma, entry, None).expect("completion in the ring");
}

/// The client's completion: validate, copy out and decode the answer.
#[inline(never)]
fn stage_complete(
    engine: &mut QueueEngine,
    bar: &MemRegion,
    dma: &MemRegion,
    tag: u16,
    cid: u64,
) -> Vec<hsm_driver::proto::TaxCodeItem> {
    assert_eq!(engine.poll(bar, dma), Ok(1));
    let waker = std::task::Waker::noop();
    match engine.poll_outcome(tag, cid, waker) {
        std::task::Poll::Ready(Outcome::Answer(Ok(Response::TaxCodes(items)))) => items,
        other => panic!("unexpected outcome {other:?}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let items: usize = args.next().map_or(3_000, |a| a.parse().expect("items"));
    let rounds: u32 = args.next().map_or(20, |a| a.parse().expect("rounds"));

    let dir = tempfile::tempdir().expect("temp dir");
    let grants = vec![Grant::new(SELLER, CODE, 1, 10_000_000).expect("grant")];
    let emu = Emulator::open(&Config::new(dir.path(), grants)).expect("emulator");
    let tp = SELLER.as_bytes().try_into().expect("18 bytes");
    let seg = emu
        .requisition(&tp, 10_000_000, hsm_driver::proto::Holder::default(), 1)
        .expect("segment");
    assert_eq!(seg.first, 1);

    let (geometries, dma_bytes) = plan_layout(1, 64, 16 << 20).expect("layout");
    let mem = HeapMemory::new(dma_bytes);
    let (bar, dma) = (mem.bar(), mem.dma());
    bar.u64_at(queue_reg(0, Q_ENABLE))
        .expect("reg")
        .store(u64::from(TOKEN), Ordering::Release);
    let mut engine = QueueEngine::new(geometries[0], 0, TOKEN, 64);
    let mut sq = DeviceSq::new(geometries[0], 0);
    let mut cq = DeviceCq::new(geometries[0], 0);
    let (mut scratch, mut out) = (Vec::new(), Vec::new());

    let mut number = 1u32;
    for round in 0..rounds {
        let invoices: Vec<Vec<u8>> = (0..items).map(|i| invoice(number + i as u32)).collect();
        number += items as u32;
        let cid = u64::from(round) + 1;
        let request = stage_build_batch(&invoices);
        let tag = stage_submit(&mut engine, &bar, &dma, &request, cid);
        drop(request);
        stage_device(
            &emu,
            &geometries[0],
            &mut sq,
            &mut cq,
            &bar,
            &dma,
            &mut scratch,
            &mut out,
        );
        let answers = stage_complete(&mut engine, &bar, &dma, tag, cid);
        assert_eq!(answers.len(), items);
        // Every answer against an independent recomputation (the keys are random per
        // run, so digests differ between runs; these checks do not).
        for (answer, inv) in answers.iter().zip(&invoices) {
            let code = hsm_emulator::crypto::tax_code(emu.tax_code_key(), inv);
            let head = u128::from_be_bytes(code[..16].try_into().expect("16 bytes"));
            let check = format!("{:020}", head % 100_000_000_000_000_000_000);
            assert_eq!(answer.tax_code, code);
            assert_eq!(&answer.check_code[..], check.as_bytes());
        }
        let digest = answers
            .iter()
            .fold(0u32, |crc, a| crc32c::crc32c_append(crc, a.as_bytes()));
        println!("round {round}: {items} answers, crc32c {digest:#010x}");
    }
}
