//! Round trips and strictness of the wire codecs on arbitrary values and bytes.

use appliance_core::money::LEGAL_RATES_BP;
use appliance_core::{
    InvoiceCode, InvoiceIdentity, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, RedReference,
    TaxRate, TaxpayerId,
};
use appliance_proto::*;
use proptest::prelude::*;

fn taxpayer(seed: u32) -> TaxpayerId {
    let first17 = format!("91110000{:09}", seed % 1_000_000_000);
    TaxpayerId::with_check_char(first17.as_bytes().try_into().unwrap()).unwrap()
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max)
        .prop_map(|chars| chars.into_iter().collect::<String>())
        .prop_filter("fits a u8 length", |s| s.len() <= 255)
}

prop_compose! {
    fn request()(
        seller in any::<u32>(),
        buyer in proptest::option::of(any::<u32>()),
        order_id in text(40),
        buyer_name in text(40),
        issuer_ref in text(20),
        lines in proptest::collection::vec((text(30), any::<u32>(), any::<i64>()), 0..5),
        rate in 0..LEGAL_RATES_BP.len(),
        amounts in any::<(i64, i64, i64)>(),
        red in proptest::option::of((1u64..=999_999_999_999, 1u32..=99_999_999, text(30))),
    ) -> IssueRequest {
        IssueRequest {
            seller: taxpayer(seller),
            order_id,
            buyer_name,
            buyer_taxpayer: buyer.map(taxpayer),
            lines: lines.into_iter().map(|(name, quantity, unit_price_fen)| LineItem { name, quantity, unit_price_fen }).collect(),
            tax_rate: TaxRate::from_bp(LEGAL_RATES_BP[rate]).unwrap(),
            issuer_ref,
            amount_fen: amounts.0,
            tax_fen: amounts.1,
            total_fen: amounts.2,
            kind: match red {
                None => InvoiceKind::Blue,
                Some((code, number, original_order_id)) => InvoiceKind::Red(RedReference {
                    original_code: InvoiceCode::new(code).unwrap(),
                    original_number: InvoiceNumber::new(number).unwrap(),
                    original_order_id,
                }),
            },
        }
    }
}

fn result() -> impl Strategy<Value = ItemResult> {
    let issued = (
        1u64..=999_999_999_999,
        1u32..=99_999_999,
        any::<u64>(),
        any::<[u8; 32]>(),
        any::<u64>(),
    )
        .prop_map(|(code, number, t, tcc, check)| Issued {
            identity: InvoiceIdentity {
                code: InvoiceCode::new(code).unwrap(),
                number: InvoiceNumber::new(number).unwrap(),
            },
            issue_time_ms: t,
            tax_control_code: tcc,
            check_code: format!("{:020}", check).into_bytes().try_into().unwrap(),
        });
    prop_oneof![
        issued.clone().prop_map(ItemResult::Issued),
        issued.prop_map(ItemResult::Replayed),
        (0..ErrorCode::ALL.len(), text(50)).prop_map(|(i, message)| ItemResult::Failed {
            code: ErrorCode::ALL[i],
            message
        }),
    ]
}

proptest! {
    #[test]
    fn issue_frames_round_trip(requests in proptest::collection::vec(request(), 1..20)) {
        let mut frame = Vec::new();
        encode_issue_frame(&mut frame, &requests);
        let (header, body) = split_frame(&frame).unwrap();
        prop_assert_eq!(header.kind, FrameKind::Issue);
        let items = split_items(body, header.count).unwrap();
        let decoded: Vec<_> = items.iter().map(|i| decode_request(i).unwrap()).collect();
        prop_assert_eq!(decoded, requests);
    }

    #[test]
    fn results_round_trip(results in proptest::collection::vec(result(), 0..20)) {
        let mut body = Vec::new();
        for r in &results {
            encode_result(&mut body, r);
        }
        prop_assert_eq!(decode_results(&body, results.len() as u32).unwrap(), results.clone());
        if !body.is_empty() {
            prop_assert!(decode_results(&body[..body.len() - 1], results.len() as u32).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), count in 0u32..8) {
        let _ = split_frame(&bytes);
        if let Ok(items) = split_items(&bytes, count) {
            for item in items { let _ = decode_request(item); }
        }
        let _ = decode_request(&bytes);
        let _ = decode_results(&bytes, count);
        let _ = decode_error(&bytes);
        let _ = HelloReply::decode(&bytes);
    }

    #[test]
    fn a_cut_item_is_refused_alone(requests in proptest::collection::vec(request(), 2..6), cut in any::<prop::sample::Index>()) {
        // Shorten the first item's content while keeping the frame's boundaries right:
        // the first item fails to decode, the others still decode.
        let mut first = Vec::new();
        encode_request(&mut first, &requests[0]);
        let len = first.len() - 4;
        let keep = cut.index(len);
        let mut body = Vec::new();
        body.extend_from_slice(&(keep as u32).to_le_bytes());
        body.extend_from_slice(&first[4..4 + keep]);
        for r in &requests[1..] { encode_request(&mut body, r); }
        let items = split_items(&body, requests.len() as u32).unwrap();
        prop_assert!(decode_request(items[0]).is_err());
        for (item, r) in items[1..].iter().zip(&requests[1..]) {
            prop_assert_eq!(&decode_request(item).unwrap(), r);
        }
    }
}

#[test]
fn error_codes_are_distinct_and_round_trip() {
    let mut seen = std::collections::HashSet::new();
    for code in ErrorCode::ALL {
        assert!(seen.insert(code as u16), "{code} twice");
        assert!(
            code as u16 >= 2,
            "{code} collides with the issued/replayed statuses"
        );
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
        let mut frame = Vec::new();
        encode_error_frame(&mut frame, code, "détail");
        let (header, body) = split_frame(&frame).unwrap();
        assert_eq!(header.kind, FrameKind::Error);
        assert_eq!(decode_error(body).unwrap(), (code, "détail".to_owned()));
    }
    assert_eq!(ErrorCode::from_u16(0), None);
    assert!(ErrorCode::TaxServerUnavailable.is_retryable());
    assert!(!ErrorCode::IdempotencyConflict.is_retryable());
    assert!(
        !ErrorCode::IndexFull.is_retryable(),
        "a full index refuses a retry again"
    );
    assert!(ErrorCode::TaxCodeRefused.is_retryable());
}

#[test]
fn hello_round_trip_and_refusals() {
    let hello = HelloReply {
        shard_id: 1,
        shard_count: 2,
        batch_requests_max: BATCH_REQUESTS_MAX,
        frame_bytes_max: FRAME_BYTES_MAX as u32,
        streams_max: 256,
        shard_ports: vec![4501, 4502],
    };
    let mut frame = Vec::new();
    hello.encode_frame(&mut frame);
    let (header, body) = split_frame(&frame).unwrap();
    assert_eq!(header.kind, FrameKind::HelloReply);
    assert_eq!(HelloReply::decode(body).unwrap(), hello);
    assert!(HelloReply::decode(&body[..body.len() - 2]).is_err());
    let mut bad = body.to_vec();
    bad[0] = 2; // shard id ≥ count
    assert!(HelloReply::decode(&bad).is_err());
}

#[test]
fn batch_limits() {
    assert_eq!(split_items(&[], 0), Err(BodyError::Count(0)));
    assert_eq!(
        split_items(&[], BATCH_REQUESTS_MAX + 1),
        Err(BodyError::Count(BATCH_REQUESTS_MAX + 1))
    );
    assert_eq!(split_items(&[1, 0, 0, 0], 1), Err(BodyError::Boundaries));
    assert_eq!(split_items(&[0, 0, 0, 0, 7], 1), Err(BodyError::Boundaries));
}
