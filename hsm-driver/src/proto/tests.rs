//! Codec tests: round trips of every command and answer, limits, malformed input, and
//! the frame decoder over arbitrary chunking.

use super::*;
use proptest::prelude::*;

const TP: Taxpayer = *b"91110000600037341L";

fn sample_batch(n: usize) -> InvoiceBatch {
    let mut b = InvoiceBatch::new();
    b.set_holder(Holder::new(0xabc, 2));
    for i in 0..n {
        b.push(&vec![i as u8; 100 + i % 7]).expect("within limits");
    }
    b
}

fn sample_requests() -> Vec<Request> {
    let mut upload = UploadBatch::new();
    upload.push(b"invoice-a", &[1; 32]).expect("ok");
    upload.push(b"", &[2; 32]).expect("ok");
    vec![
        Request::DeviceInfo,
        Request::Requisition {
            taxpayer: TP,
            count: 1000,
            holder: Holder::new(u128::MAX - 7, 3),
            request_id: u64::MAX,
        },
        Request::ReturnSegment {
            taxpayer: TP,
            segment: Segment {
                code: 144_031_900_111,
                first: 500,
                count: 20,
            },
            holder: Holder::new(1, 2),
        },
        Request::Inventory(InventoryScope::Holder(Holder::new(5, 6))),
        Request::TaxCodes(sample_batch(17)),
        Request::TaxCodes(InvoiceBatch::new()),
        Request::Sign { digest: [9; 32] },
        Request::Upload(upload),
        Request::ReportAndClear {
            taxpayer: TP,
            period_end_ms: 1_700_000_000_000,
        },
        Request::Inventory(InventoryScope::All),
        Request::Inventory(InventoryScope::Taxpayer(TP)),
        Request::Nop(b"ping".to_vec()),
        Request::Nop(Vec::new()),
        Request::SetFaults(FaultConfig {
            latency_us: 5,
            drop_every_nth_connection: 3,
            refuse: 1,
            stall_ms: 100,
            reset_connections: 0,
        }),
    ]
}

fn sample_responses() -> Vec<Response> {
    let code = [0xab; 32];
    vec![
        Response::DeviceInfo(DeviceInfo {
            device_id: "EMU-0001".into(),
            firmware: "emu 0.1.0".into(),
            sm2_public_key: [4; 65],
            tax_code_algorithm: TaxCodeAlgorithm::HmacSm3,
            batch_max: TAX_CODES_BATCH_MAX as u32,
            taxpayers: vec![TP, *b"91310000MA1FL8XQ30"],
        }),
        Response::Requisition(Segment {
            code: 144_031_900_111,
            first: 1,
            count: 10_000,
        }),
        Response::ReturnSegment,
        Response::TaxCodes(vec![
            TaxCodeItem::ok(code, crate::crypto::check_code(&code)),
            TaxCodeItem::failed(TaxCodeStatus::NumberNotGranted),
        ]),
        Response::TaxCodes(Vec::new()),
        Response::Sign([7; 64]),
        Response::Upload(vec![
            UploadStatus::Accepted,
            UploadStatus::Duplicate,
            UploadStatus::Forged,
            UploadStatus::NotGranted,
            UploadStatus::Conflict,
            UploadStatus::Malformed,
        ]),
        Response::ReportAndClear(PeriodReport {
            taxpayer: TP,
            period_start_ms: 1,
            period_end_ms: 2,
            blue_count: 3,
            red_count: 4,
            uploaded_count: 5,
            amount_fen: -6,
            tax_fen: 7,
            total_fen: 1,
        }),
        Response::Inventory(vec![TaxpayerInventory {
            taxpayer: TP,
            remaining: 1_000_000,
            issued: 20,
            uploaded: 10,
            segments: vec![HeldSegment {
                segment: Segment {
                    code: 1,
                    first: 2,
                    count: 3,
                },
                holder: Holder::new(0x1234, 1),
                request_id: 99,
                coded_end: 4,
            }],
        }]),
        Response::Nop(vec![1, 2, 3]),
        Response::SetFaults,
    ]
}

#[test]
fn header_layout() {
    let h = FrameHeader::new(4, 0x0102, 0x1122_3344_5566_7788, b"abc");
    let bytes = h.as_bytes();
    assert_eq!(&bytes[0..4], b"TXSV");
    assert_eq!(bytes[4], PROTOCOL_VERSION);
    assert_eq!(bytes[5], 4);
    assert_eq!(&bytes[6..8], &[0x02, 0x01]);
    assert_eq!(&bytes[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(&bytes[16..20], &3u32.to_le_bytes());
    assert_eq!(&bytes[20..24], &crc32c::crc32c(b"abc").to_le_bytes());
}

#[test]
fn every_request_round_trips() {
    for (i, req) in sample_requests().into_iter().enumerate() {
        let mut out = Vec::new();
        encode_request(&mut out, i as u64, &req).expect("encode");
        let frame = decode_frame(&out).expect("frame");
        assert_eq!(frame.header.correlation_id(), i as u64);
        assert!(!frame.header.is_response());
        assert_eq!(frame.header.opcode, req.opcode() as u8);
        let back = Request::decode(frame.header.opcode, frame.body).expect("decode");
        assert_eq!(back, req);
    }
}

/// The borrowed parts a transport copies are byte for byte the encoded body.
#[test]
fn body_parts_concatenate_to_the_encoded_body() {
    let mut bulk = 0;
    for req in sample_requests() {
        let mut encoded = Vec::new();
        req.encode_body(&mut encoded).expect("encode");
        match req.body_parts().expect("parts") {
            Some(parts) => {
                bulk += 1;
                assert_eq!([parts.head(), parts.bulk()].concat(), encoded, "{req:?}");
                assert_eq!(parts.len(), encoded.len());
                assert_eq!(parts.is_empty(), encoded.is_empty());
            }
            None => assert!(!matches!(
                req,
                Request::TaxCodes(_) | Request::Upload(_) | Request::Nop(_)
            )),
        }
    }
    assert_eq!(bulk, 5);
}

/// The in-place TaxCodes decoder accepts and refuses exactly what `Request::decode`
/// does, with the same errors, and yields the same invoices.
#[test]
fn in_place_tax_codes_decode_matches_request_decode() {
    let op = Opcode::TaxCodes.request_byte();
    let mut bodies = Vec::new();
    for n in [0, 1, 17] {
        let mut b = Vec::new();
        Request::TaxCodes(sample_batch(n))
            .encode_body(&mut b)
            .expect("encode");
        bodies.push(b);
    }
    let good = bodies[2].clone();
    // Every truncation, trailing bytes, a lying count, an oversized count and item.
    for cut in 0..good.len() {
        bodies.push(good[..cut].to_vec());
    }
    bodies.push([good.as_slice(), &[0]].concat());
    let mut lying = good.clone();
    lying[HOLDER_BYTES..HOLDER_BYTES + 4].copy_from_slice(&18u32.to_le_bytes());
    bodies.push(lying);
    let mut lying = good.clone();
    lying[HOLDER_BYTES..HOLDER_BYTES + 4].copy_from_slice(&16u32.to_le_bytes());
    bodies.push(lying);
    let mut huge = good.clone();
    huge[HOLDER_BYTES..HOLDER_BYTES + 4]
        .copy_from_slice(&(TAX_CODES_BATCH_MAX as u32 + 1).to_le_bytes());
    bodies.push(huge);
    let mut long_item = good.clone();
    long_item[HOLDER_BYTES + 4..HOLDER_BYTES + 6].copy_from_slice(&u16::MAX.to_le_bytes());
    bodies.push(long_item);
    for body in bodies {
        match (Request::decode(op, &body), Invoices::decode(&body)) {
            (Ok(Request::TaxCodes(batch)), Ok((holder, items))) => {
                assert_eq!(holder, batch.holder());
                assert_eq!(items.len(), batch.len());
                assert!(items.eq(batch.iter()));
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("decoders disagree: {a:?} / {:?}", b.map(|(_, i)| i.len())),
        }
    }
}

#[test]
fn every_response_round_trips() {
    for (i, resp) in sample_responses().into_iter().enumerate() {
        let mut out = Vec::new();
        encode_response(&mut out, i as u64, &resp).expect("encode");
        let frame = decode_frame(&out).expect("frame");
        assert!(frame.header.is_response());
        let back = Response::decode_frame(resp.opcode(), &frame.header, frame.body)
            .expect("decode")
            .expect("ok status");
        assert_eq!(back, resp);
    }
}

#[test]
fn error_response_round_trips_and_truncates_at_char_boundary() {
    let mut out = Vec::new();
    let long = "税".repeat(ERROR_MESSAGE_BYTES_MAX); // 3 bytes each
    encode_error(&mut out, 2, 42, Status::InventoryExhausted, &long).expect("encode");
    let frame = decode_frame(&out).expect("frame");
    let err = Response::decode_frame(Opcode::Requisition, &frame.header, frame.body)
        .expect("decodes")
        .expect_err("device error");
    assert_eq!(err.status, Status::InventoryExhausted);
    assert!(err.message.len() <= ERROR_MESSAGE_BYTES_MAX);
    assert!(err.message.len() > ERROR_MESSAGE_BYTES_MAX - 3);
    assert_eq!(
        encode_error(&mut out, 2, 1, Status::Ok, "x"),
        Err(EncodeError::OkIsNotAnError)
    );
    // Unknown commands can be answered too.
    let mut out = Vec::new();
    encode_error(&mut out, 0x55, 7, Status::UnknownCommand, "no such command").expect("ok");
    assert_eq!(decode_frame(&out).expect("frame").header.opcode, 0xd5);
}

#[test]
fn response_to_the_wrong_command_is_rejected() {
    let mut out = Vec::new();
    encode_response(&mut out, 1, &Response::SetFaults).expect("encode");
    let frame = decode_frame(&out).expect("frame");
    assert_eq!(
        Response::decode_frame(Opcode::Nop, &frame.header, frame.body),
        Err(DecodeError::UnexpectedOpcode(
            Opcode::SetFaults.response_byte()
        ))
    );
}

#[test]
fn batch_limits() {
    let mut b = InvoiceBatch::new();
    assert!(matches!(
        b.push(&vec![0; INVOICE_BYTES_MAX + 1]),
        Err(EncodeError::LimitExceeded { .. })
    ));
    for _ in 0..TAX_CODES_BATCH_MAX {
        b.push(b"x").expect("room");
    }
    assert!(b.push(b"x").is_err());
    assert_eq!(b.len(), TAX_CODES_BATCH_MAX);
    b.clear();
    assert!(b.is_empty());
    b.push_with(|v| v.extend_from_slice(b"in place"))
        .expect("fits");
    let before = b.clone();
    assert!(b
        .push_with(|v| v.extend_from_slice(&[1; INVOICE_BYTES_MAX + 1]))
        .is_err());
    assert_eq!(b, before);
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![b"in place".as_slice()]);
    assert_eq!(b.get(0), Some(b"in place".as_slice()));
    assert_eq!(b.get(1), None);
}

#[test]
fn hostile_counts_are_rejected_before_allocating() {
    let mut body = [0u8; HOLDER_BYTES].to_vec();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    assert!(matches!(
        Request::decode(Opcode::TaxCodes as u8, &body),
        Err(DecodeError::LimitExceeded { .. })
    ));
    let body = 4000u32.to_le_bytes();
    assert!(matches!(
        Response::decode(Opcode::TaxCodes, &body),
        Err(DecodeError::Truncated(_))
    ));
    let mut inv = 1u16.to_le_bytes().to_vec();
    inv.extend_from_slice(&[0u8; 42]);
    inv.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(Response::decode(Opcode::Inventory, &inv).is_err());
}

#[test]
fn decode_is_strict() {
    // Trailing bytes.
    assert_eq!(
        Request::decode(Opcode::DeviceInfo as u8, &[0]),
        Err(DecodeError::TrailingBytes(1))
    );
    // Unknown opcode and response flag on a request.
    assert_eq!(
        Request::decode(0x33, &[]),
        Err(DecodeError::UnknownOpcode(0x33))
    );
    assert!(Request::decode(0x81, &[]).is_err());
    // Non-boolean switch.
    let mut faults = Vec::new();
    Request::SetFaults(FaultConfig::default())
        .encode_body(&mut faults)
        .expect("ok");
    faults[8] = 2;
    assert!(Request::decode(Opcode::SetFaults as u8, &faults).is_err());
    // Unknown per-item status and non-zero reserved bytes.
    let mut body = 1u32.to_le_bytes().to_vec();
    let mut item = TaxCodeItem::failed(TaxCodeStatus::MalformedInvoice);
    item.status = 9;
    body.extend_from_slice(item.as_bytes());
    assert!(Response::decode(Opcode::TaxCodes, &body).is_err());
    item.status = 0;
    item.reserved[1] = 1;
    body.truncate(4);
    body.extend_from_slice(item.as_bytes());
    assert!(Response::decode(Opcode::TaxCodes, &body).is_err());
}

#[test]
fn decoder_reassembles_byte_by_byte() {
    let mut stream = Vec::new();
    let reqs = sample_requests();
    for (i, r) in reqs.iter().enumerate() {
        encode_request(&mut stream, i as u64, r).expect("encode");
    }
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    for byte in &stream {
        dec.extend(std::slice::from_ref(byte));
        while let Some(f) = dec.next_frame().expect("valid stream") {
            got.push(Request::decode(f.header.opcode, f.body).expect("decode"));
        }
    }
    assert_eq!(got, reqs);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn decoder_read_buf_commit() {
    let mut stream = Vec::new();
    encode_request(&mut stream, 5, &Request::Nop(vec![1; 1000])).expect("encode");
    let mut dec = FrameDecoder::new();
    let buf = dec.read_buf(4096);
    buf[..stream.len()].copy_from_slice(&stream);
    dec.commit(stream.len());
    let f = dec.next_frame().expect("ok").expect("frame");
    assert_eq!(f.header.correlation_id(), 5);
    assert_eq!(f.body.len(), 1000);
    assert!(dec.next_frame().expect("ok").is_none());
}

#[test]
fn decoder_skips_corrupt_frames_and_poisons_on_bad_framing() {
    let mut stream = Vec::new();
    encode_request(&mut stream, 1, &Request::Nop(b"aaaa".to_vec())).expect("encode");
    let first_len = stream.len();
    encode_request(&mut stream, 2, &Request::Nop(b"bbbb".to_vec())).expect("encode");
    stream[FRAME_HEADER_BYTES] ^= 0xff; // corrupt the first body
    let mut dec = FrameDecoder::new();
    dec.extend(&stream);
    let e = dec.next_frame().expect_err("checksum");
    assert!(!e.fatal);
    assert_eq!(e.header.correlation_id(), 1);
    assert!(matches!(e.error, DecodeError::BodyChecksum { .. }));
    let f = dec.next_frame().expect("ok").expect("second frame");
    assert_eq!(f.header.correlation_id(), 2);

    // Wrong version: skipped, not fatal.
    let mut v2 = stream[first_len..].to_vec();
    v2[4] = PROTOCOL_VERSION + 1;
    let mut dec = FrameDecoder::new();
    dec.extend(&v2);
    dec.extend(&stream[first_len..]);
    let e = dec.next_frame().expect_err("version");
    assert_eq!(
        e.error,
        DecodeError::UnsupportedVersion(PROTOCOL_VERSION + 1)
    );
    assert!(!e.fatal);
    assert!(dec.next_frame().expect("ok").is_some());

    // Bad magic: fatal and sticky.
    let mut bad = stream.clone();
    bad[0] = b'X';
    let mut dec = FrameDecoder::new();
    dec.extend(&bad);
    assert!(dec.next_frame().expect_err("magic").fatal);
    assert!(dec.next_frame().expect_err("still poisoned").fatal);

    // Oversized body length: fatal before any allocation of that size.
    let mut huge = FrameHeader::new(9, 0, 1, b"");
    huge.body_len = U32::new(u32::MAX);
    let mut dec = FrameDecoder::new();
    dec.extend(huge.as_bytes());
    let e = dec.next_frame().expect_err("too large");
    assert!(e.fatal);
    assert_eq!(e.error, DecodeError::BodyTooLarge(u32::MAX));
}

fn arb_request() -> impl Strategy<Value = Request> {
    let tp = proptest::array::uniform18(any::<u8>());
    prop_oneof![
        Just(Request::DeviceInfo),
        (tp, any::<u32>(), any::<(u128, u32)>(), any::<u64>()).prop_map(
            |(taxpayer, count, (appliance, shard), request_id)| Request::Requisition {
                taxpayer,
                count,
                holder: Holder::new(appliance, shard),
                request_id
            }
        ),
        (tp, any::<u64>(), any::<u32>(), any::<u32>(), any::<u128>()).prop_map(
            |(taxpayer, code, first, count, appliance)| Request::ReturnSegment {
                taxpayer,
                segment: Segment { code, first, count },
                holder: Holder::new(appliance, first),
            }
        ),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40).prop_map(
            |items| {
                let mut b = InvoiceBatch::new();
                for i in &items {
                    b.push(i).expect("small");
                }
                Request::TaxCodes(b)
            }
        ),
        any::<[u8; 32]>().prop_map(|digest| Request::Sign { digest }),
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<[u8; 32]>()
            ),
            0..20
        )
        .prop_map(|items| {
            let mut b = UploadBatch::new();
            for (i, c) in &items {
                b.push(i, c).expect("small");
            }
            Request::Upload(b)
        }),
        (tp, any::<u64>()).prop_map(|(taxpayer, period_end_ms)| {
            Request::ReportAndClear {
                taxpayer,
                period_end_ms,
            }
        }),
        Just(Request::Inventory(InventoryScope::All)),
        tp.prop_map(|t| Request::Inventory(InventoryScope::Taxpayer(t))),
        proptest::collection::vec(any::<u8>(), 0..500).prop_map(Request::Nop),
        (any::<u32>(), any::<u32>(), 0u8..2, any::<u32>(), 0u8..2).prop_map(
            |(latency_us, drop_every_nth_connection, refuse, stall_ms, reset_connections)| {
                Request::SetFaults(FaultConfig {
                    latency_us,
                    drop_every_nth_connection,
                    refuse,
                    stall_ms,
                    reset_connections,
                })
            }
        ),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for op in 0..=255u8 {
            let _ = Request::decode(op, &bytes);
        }
        for op in Opcode::ALL {
            let _ = Response::decode(op, &bytes);
        }
        let _ = decode_frame(&bytes);
        let mut dec = FrameDecoder::new();
        dec.extend(&bytes);
        for _ in 0..64 {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    let _ = Request::decode(f.header.opcode, f.body);
                    if let Some(op) = Opcode::from_u8(f.header.command()) {
                        let _ = Response::decode_frame(op, &f.header, f.body);
                    }
                }
                Ok(None) => break,
                Err(e) if e.fatal => break,
                Err(_) => {}
            }
        }
    }

    #[test]
    fn framed_garbage_bodies_never_panic(
        op in any::<u8>(),
        status in any::<u16>(),
        body in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let header = FrameHeader::new(op, status, 1, &body);
        let mut dec = FrameDecoder::new();
        dec.extend(header.as_bytes());
        dec.extend(&body);
        let f = dec.next_frame().expect("well framed").expect("whole");
        let _ = Request::decode(f.header.opcode, f.body);
        for req_op in Opcode::ALL {
            let _ = Response::decode_frame(req_op, &f.header, f.body);
        }
    }

    #[test]
    fn requests_round_trip_through_chunked_stream(
        reqs in proptest::collection::vec(arb_request(), 1..8),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            encode_request(&mut stream, i as u64, r).expect("encode");
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            dec.extend(piece);
            while let Some(f) = dec.next_frame().expect("valid") {
                got.push((f.header.correlation_id(), Request::decode(f.header.opcode, f.body).expect("decode")));
            }
        }
        prop_assert_eq!(got.len(), reqs.len());
        for (i, (id, r)) in got.into_iter().enumerate() {
            prop_assert_eq!(id, i as u64);
            prop_assert_eq!(&r, &reqs[i]);
        }
    }

    #[test]
    fn tax_code_results_round_trip(
        items in proptest::collection::vec((0u8..4, any::<[u8; 32]>()), 0..100)
    ) {
        let items: Vec<TaxCodeItem> = items
            .into_iter()
            .map(|(s, code)| {
                let mut it = TaxCodeItem::ok(code, crate::crypto::check_code(&code));
                it.status = s;
                it
            })
            .collect();
        let resp = Response::TaxCodes(items);
        let mut out = Vec::new();
        encode_response(&mut out, 9, &resp).expect("encode");
        let f = decode_frame(&out).expect("frame");
        let back = Response::decode_frame(Opcode::TaxCodes, &f.header, f.body)
            .expect("decode")
            .expect("ok");
        prop_assert_eq!(back, resp);
    }
}
