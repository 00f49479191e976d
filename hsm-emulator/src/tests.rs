//! Sans-IO tests of the device logic: frames in, frames out, no sockets.

use super::*;
use appliance_core::canonical::CanonicalHeader;
use hsm_driver::proto::{FrameHeader, Holder, InvoiceBatch, UploadBatch};
use zerocopy::little_endian::{I64, U16, U32, U64};

const SELLER: &str = "91350100M000100Y43";
const CODE: u64 = 144_031_900_111;

fn tp() -> Taxpayer {
    SELLER.as_bytes().try_into().unwrap()
}

fn invoice(number: u32, body_bytes: usize) -> Vec<u8> {
    let h = CanonicalHeader {
        magic: CANONICAL_MAGIC,
        version: U16::new(CANONICAL_VERSION),
        kind: KIND_BLUE,
        line_count: 1,
        invoice_code: U64::new(CODE),
        invoice_number: U32::new(number),
        tax_rate_bp: U16::new(600),
        reserved: [0; 6],
        issue_time_ms: U64::new(1),
        amount_fen: I64::new(100),
        tax_fen: I64::new(6),
        total_fen: I64::new(106),
        seller_taxpayer: tp(),
        buyer_taxpayer: [0; 18],
        original_code: U64::new(0),
        original_number: U32::new(0),
        body_len: U32::new(body_bytes as u32),
    };
    let mut v = h.as_bytes().to_vec();
    v.extend(std::iter::repeat_n(0xab, body_bytes));
    v
}

fn open(dir: &Path) -> Emulator {
    let grants = vec![Grant::new(SELLER, CODE, 1, 10_000).unwrap()];
    Emulator::open(&Config::new(dir, grants)).unwrap()
}

fn roundtrip(emu: &Emulator, id: u64, req: &Request) -> Result<Response, proto::DeviceError> {
    let mut body = Vec::new();
    req.encode_body(&mut body).unwrap();
    let mut out = Vec::new();
    emu.handle_frame(req.opcode().request_byte(), id, &body, &mut out);
    let (header, rest) = FrameHeader::read_from_prefix(&out).unwrap();
    assert_eq!(header.correlation_id(), id);
    assert_eq!(rest.len(), header.body_len());
    Response::decode_frame(req.opcode(), &header, rest).unwrap()
}

#[test]
fn frames_in_frames_out() {
    let dir = tempfile::tempdir().unwrap();
    let emu = open(dir.path());
    let seg = match roundtrip(
        &emu,
        1,
        &Request::Requisition {
            taxpayer: tp(),
            count: 10,
            holder: Holder::new(9, 3),
            request_id: 8,
        },
    ) {
        Ok(Response::Requisition(s)) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!((seg.first, seg.count), (1, 10));
    let mut batch = InvoiceBatch::new();
    batch.set_holder(Holder::new(9, 3));
    batch.push(&invoice(1, 100)).unwrap();
    batch.push(&invoice(11, 100)).unwrap();
    let Ok(Response::TaxCodes(items)) = roundtrip(&emu, 2, &Request::TaxCodes(batch.clone()))
    else {
        panic!()
    };
    assert_eq!(items[0].status(), Some(TaxCodeStatus::Ok));
    assert_eq!(items[1].status(), Some(TaxCodeStatus::NumberNotGranted));
    // Another appliance's shard 3, or this appliance's shard 0, is another holder: the
    // device codes none of the segment's numbers for it.
    for other in [Holder::new(8, 3), Holder::new(9, 0)] {
        let mut theirs = batch.clone();
        theirs.set_holder(other);
        let Ok(Response::TaxCodes(refused)) = roundtrip(&emu, 2, &Request::TaxCodes(theirs)) else {
            panic!()
        };
        assert_eq!(refused[0].status(), Some(TaxCodeStatus::NotHolder));
    }
    // The coded mark covers the coded number (and only the holder's segments are listed).
    let Ok(Response::Inventory(inv)) = roundtrip(
        &emu,
        2,
        &Request::Inventory(InventoryScope::Holder(Holder::new(9, 3))),
    ) else {
        panic!()
    };
    assert_eq!(inv[0].segments.len(), 1);
    assert_eq!(inv[0].segments[0].coded_end, 2);
    let Ok(Response::Inventory(inv)) = roundtrip(
        &emu,
        2,
        &Request::Inventory(InventoryScope::Holder(Holder::new(8, 3))),
    ) else {
        panic!()
    };
    assert!(inv[0].segments.is_empty());
    // The in-place hot path and the generic path agree.
    let mut effects = Effects::default();
    assert_eq!(
        emu.execute(Request::TaxCodes(batch), &mut effects),
        Ok(Response::TaxCodes(items.clone()))
    );
    let mut up = UploadBatch::new();
    up.push(&invoice(1, 100), &items[0].tax_code).unwrap();
    assert_eq!(
        roundtrip(&emu, 3, &Request::Upload(up)),
        Ok(Response::Upload(vec![UploadStatus::Accepted]))
    );
    // SetFaults without permission.
    let r = roundtrip(&emu, 4, &Request::SetFaults(FaultConfig::default()));
    assert_eq!(r.unwrap_err().status, Status::Forbidden);
    // Unknown opcode and short bodies are typed errors, never panics.
    let mut out = Vec::new();
    emu.handle_frame(0x42, 5, &[], &mut out);
    let (h, _) = FrameHeader::read_from_prefix(&out).unwrap();
    assert_eq!(h.status.get(), Status::UnknownCommand as u16);
    for op in 1..=10u8 {
        for len in [0usize, 1, 7, 33] {
            let mut out = Vec::new();
            emu.handle_frame(op, 6, &vec![0xff; len], &mut out);
            assert!(FrameHeader::read_from_prefix(&out).is_ok());
        }
    }
}

#[test]
fn reopen_keeps_grants_and_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let code = {
        let emu = open(dir.path());
        emu.requisition(&tp(), 5, Holder::default(), 1).unwrap();
        let code = crypto::tax_code(emu.tax_code_key(), &invoice(2, 10));
        let inv = invoice(2, 10);
        let st = emu.upload([(inv.as_slice(), code)].into_iter()).unwrap();
        assert_eq!(st, vec![UploadStatus::Accepted]);
        code
    };
    // Dropping the emulator released the data dir lock.
    let emu = open(dir.path());
    assert_eq!(
        emu.requisition(&tp(), 5, Holder::default(), 1).unwrap(),
        Segment {
            code: CODE,
            first: 1,
            count: 5
        }
    );
    assert_eq!(
        emu.requisition(&tp(), 5, Holder::default(), 2)
            .unwrap()
            .first,
        6
    );
    let inv = invoice(2, 10);
    assert_eq!(
        emu.upload([(inv.as_slice(), code)].into_iter()).unwrap(),
        vec![UploadStatus::Duplicate]
    );
    // A second emulator on the same dir is refused while this one lives.
    let grants = vec![Grant::new(SELLER, CODE, 1, 10_000).unwrap()];
    assert!(matches!(
        Emulator::open(&Config::new(dir.path(), grants)),
        Err(EmulatorError::Locked(_))
    ));
}

#[test]
fn in_process_server_serves_and_shuts_down() {
    use hsm_driver::tcp::blocking::Client;
    use hsm_driver::tcp::TcpClientConfig;
    let dir = tempfile::tempdir().unwrap();
    let grants = vec![Grant::new(SELLER, CODE, 1, 10).unwrap()];
    let server = serve(&Config::new(dir.path(), grants)).unwrap();
    let mut c = Client::connect(server.local_addr(), TcpClientConfig::default()).unwrap();
    assert_eq!(
        c.call(&Request::Nop(vec![1, 2])).unwrap(),
        Response::Nop(vec![1, 2])
    );
    assert_eq!(server.emulator().device_id().len(), 12);
    server.shutdown();
    // The data dir lock is released once the last reference to the device is gone.
    let grants = vec![Grant::new(SELLER, CODE, 1, 10).unwrap()];
    let again = Emulator::open(&Config::new(dir.path(), grants));
    assert!(again.is_ok(), "{again:?}");
}
