//! Property tests of every parser in the crate: canonical invoices, journal record bodies
//! and recovery never panic on arbitrary bytes, accept only one encoding per value, and
//! round-trip every valid value.

use appliance_core::canonical::{self, CanonicalInvoice};
use appliance_core::invoice::{InvoiceIdentity, InvoiceKind, LineItem, RedReference};
use appliance_core::journal::frame::encode_record;
use appliance_core::journal::record::Record;
use appliance_core::journal::replay::recover;
use appliance_core::money::{tax_fen, LEGAL_RATES_BP};
use appliance_core::{
    InvoiceCode, InvoiceNumber, IssueRequest, IssuerConfig, ItemError, NumberSegment, TaxRate,
    TaxpayerConfig, TaxpayerId,
};
use proptest::prelude::*;

fn taxpayer() -> impl Strategy<Value = TaxpayerId> {
    prop::collection::vec(
        prop::sample::select(b"0123456789ABCDEFGHJKLMNPQRTUWXY".to_vec()),
        17,
    )
    .prop_map(|v| TaxpayerId::with_check_char(&v.try_into().unwrap()).unwrap())
}

/// UTF-8 text of `min..=max` bytes (built from chars, then trimmed to the byte bound).
fn text(min: usize, max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), min..=max).prop_map(move |chars| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        while s.len() < min {
            s.push('x');
        }
        s
    })
}

fn code() -> impl Strategy<Value = InvoiceCode> {
    (1u64..=999_999_999_999).prop_map(|c| InvoiceCode::new(c).unwrap())
}

fn number() -> impl Strategy<Value = InvoiceNumber> {
    (1u32..=99_999_999).prop_map(|n| InvoiceNumber::new(n).unwrap())
}

fn request() -> impl Strategy<Value = IssueRequest> {
    (
        taxpayer(),
        text(1, 64),
        text(1, 192),
        prop::option::of(taxpayer()),
        prop::collection::vec((text(1, 96), 1u32..1000, 0i64..10_000_000), 1..=16),
        prop::sample::select(LEGAL_RATES_BP.to_vec()),
        text(0, 32),
        prop::option::of((code(), number(), text(1, 64))),
    )
        .prop_map(
            |(seller, order_id, buyer_name, buyer_taxpayer, lines, rate, issuer_ref, red)| {
                let tax_rate = TaxRate::from_bp(rate).unwrap();
                let sign = if red.is_some() { -1 } else { 1 };
                let lines: Vec<LineItem> = lines
                    .into_iter()
                    .map(|(name, quantity, price)| LineItem {
                        name,
                        quantity,
                        // Blue: ≥ 0 with a positive sum ensured below; red: < 0.
                        unit_price_fen: sign * (price + 1),
                    })
                    .collect();
                let amount: i64 = lines
                    .iter()
                    .map(|l| i64::from(l.quantity) * l.unit_price_fen)
                    .sum();
                let tax = tax_fen(amount, tax_rate);
                IssueRequest {
                    seller,
                    order_id,
                    buyer_name,
                    buyer_taxpayer,
                    lines,
                    tax_rate,
                    issuer_ref,
                    amount_fen: amount,
                    tax_fen: tax,
                    total_fen: amount + tax,
                    kind: match red {
                        None => InvoiceKind::Blue,
                        Some((original_code, original_number, original_order_id)) => {
                            InvoiceKind::Red(RedReference {
                                original_code,
                                original_number,
                                original_order_id,
                            })
                        }
                    },
                }
            },
        )
}

fn canonical_invoice() -> impl Strategy<Value = CanonicalInvoice> {
    (request(), code(), number(), any::<u64>()).prop_map(|(request, code, number, t)| {
        CanonicalInvoice {
            request,
            code,
            number,
            issue_time_ms: t,
        }
    })
}

fn encode(c: &CanonicalInvoice) -> Vec<u8> {
    let mut out = Vec::new();
    canonical::encode_fields(&c.request, c.code, c.number, c.issue_time_ms, &mut out);
    out
}

fn check_code() -> impl Strategy<Value = [u8; 20]> {
    prop::array::uniform20(b'0'..=b'9')
}

fn record() -> impl Strategy<Value = Record> {
    fn segment() -> impl Strategy<Value = NumberSegment> {
        (code(), 1u32..=99_000_000, 1u32..1_000_000)
            .prop_map(|(c, f, n)| NumberSegment::new(c, InvoiceNumber::new(f).unwrap(), n).unwrap())
    }
    fn identity() -> impl Strategy<Value = InvoiceIdentity> {
        (code(), number()).prop_map(|(code, number)| InvoiceIdentity { code, number })
    }
    prop_oneof![
        (taxpayer(), segment())
            .prop_map(|(seller, segment)| Record::SegmentReserved { seller, segment }),
        (taxpayer(), segment())
            .prop_map(|(seller, segment)| Record::SegmentReturned { seller, segment }),
        (
            canonical_invoice(),
            prop::array::uniform32(any::<u8>()),
            check_code()
        )
            .prop_map(|(c, t, k)| Record::Issued(c.with_codes(t, k))),
        canonical_invoice().prop_map(Record::Pending),
        (
            any::<u64>(),
            prop::array::uniform32(any::<u8>()),
            check_code()
        )
            .prop_map(
                |(pending_seq, tax_control_code, check_code)| Record::Completed {
                    pending_seq,
                    tax_control_code,
                    check_code
                }
            ),
        (any::<u64>(), identity(), any::<u64>()).prop_map(
            |(issued_seq, identity, void_time_ms)| Record::Voided {
                issued_seq,
                identity,
                void_time_ms
            }
        ),
        any::<u64>().prop_map(|watermark_seq| Record::UploadedTo { watermark_seq }),
        (
            1u64..1000,
            0u64..1000,
            prop::array::uniform32(any::<u8>()),
            any::<[u8; 32]>()
        )
            .prop_map(|(first_seq, extra, root, half)| {
                let mut signature = [0u8; 64];
                signature[..32].copy_from_slice(&half);
                signature[32..].copy_from_slice(&root);
                Record::BatchRoot {
                    first_seq,
                    last_seq: first_seq + extra,
                    root,
                    signature,
                }
            }),
        (
            taxpayer(),
            identity(),
            prop_oneof![
                Just(ItemError::MalformedInvoice),
                Just(ItemError::NumberNotHeld),
                Just(ItemError::UnknownTaxpayer),
                Just(ItemError::InvalidCheckCode),
                Just(ItemError::CommandFailed),
                any::<u8>().prop_map(ItemError::Device),
            ]
        )
            .prop_map(|(seller, identity, reason)| Record::NumberSpoiled {
                seller,
                identity,
                reason
            }),
    ]
}

fn config() -> IssuerConfig {
    IssuerConfig {
        shard_id: 0,
        taxpayers: vec![TaxpayerConfig {
            id: TaxpayerId::parse("91350100M000100Y43").unwrap(),
            ceiling_fen: i64::MAX,
            low_watermark: 0,
            refill_count: 1,
        }],
        retention_ms: u64::MAX,
        index_capacity_orders: 64,
        tick_requests_max: 16,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn canonical_round_trips(c in canonical_invoice()) {
        let bytes = encode(&c);
        prop_assert!(bytes.len() < 2560);
        prop_assert_eq!(canonical::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn canonical_decode_of_mutations_is_unique(
        c in canonical_invoice(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode(&c);
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] = b;
        }
        if let Ok(decoded) = canonical::decode(&bytes) {
            // One encoding per invoice: anything accepted re-encodes to the same bytes.
            prop_assert_eq!(encode(&decoded), bytes);
        }
    }

    #[test]
    fn canonical_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = canonical::decode_header(&bytes);
        if let Ok(decoded) = canonical::decode(&bytes) {
            prop_assert_eq!(encode(&decoded), bytes);
        }
    }

    #[test]
    fn records_round_trip(r in record()) {
        let mut body = Vec::new();
        r.encode_body(&mut body);
        prop_assert_eq!(Record::decode(r.kind() as u8, &body).unwrap(), r);
    }

    #[test]
    fn record_decode_never_panics_and_is_unique(
        kind in prop_oneof![0u8..=10, Just(0xFFu8)],
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        if let Ok(r) = Record::decode(kind, &bytes) {
            let mut body = Vec::new();
            r.encode_body(&mut body);
            prop_assert_eq!(body, bytes);
        }
    }

    #[test]
    fn mutated_records_decode_strictly(
        r in record(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut body = Vec::new();
        r.encode_body(&mut body);
        for (i, b) in flips {
            let at = i.index(body.len());
            body[at] = b;
        }
        if let Ok(decoded) = Record::decode(r.kind() as u8, &body) {
            let mut again = Vec::new();
            decoded.encode_body(&mut again);
            prop_assert_eq!(again, body);
        }
    }

    #[test]
    fn recovery_never_panics_on_garbage(
        records in prop::collection::vec((record(), 0u64..4), 0..6),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // Plausible frames with arbitrary bodies and sequence numbers, then garbage.
        let mut journal = Vec::new();
        for (seq, (r, jitter)) in records.iter().enumerate() {
            let mut body = Vec::new();
            r.encode_body(&mut body);
            encode_record(&mut journal, r.kind() as u8, seq as u64 + jitter, &body);
        }
        journal.extend_from_slice(&garbage);
        let _ = recover(config(), &journal, 0);
    }
}

/// Requests with every field unconstrained (lengths past the bounds, any prices, any
/// declared amounts), to show that the issuer refuses bad input with typed errors and
/// never panics.
fn wild_request() -> impl Strategy<Value = IssueRequest> {
    (
        request(),
        prop::collection::vec((text(0, 120), any::<u32>(), any::<i64>()), 0..20),
        text(0, 80),
        text(0, 40),
        any::<(i64, i64, i64)>(),
        any::<bool>(),
    )
        .prop_map(
            |(mut r, lines, order_id, issuer_ref, declared, keep_declared)| {
                r.seller = TaxpayerId::parse("91350100M000100Y43").unwrap();
                r.lines = lines
                    .into_iter()
                    .map(|(name, quantity, unit_price_fen)| LineItem {
                        name,
                        quantity,
                        unit_price_fen,
                    })
                    .collect();
                r.order_id = order_id;
                r.issuer_ref = issuer_ref;
                if keep_declared {
                    // Consistent declarations where they do not overflow, to get past the
                    // amount checks sometimes.
                    let amount = r.lines.iter().try_fold(0i64, |acc, l| {
                        i64::from(l.quantity)
                            .checked_mul(l.unit_price_fen)
                            .and_then(|a| acc.checked_add(a))
                    });
                    if let Some(amount) = amount {
                        let tax = tax_fen(amount, r.tax_rate);
                        r.amount_fen = amount;
                        r.tax_fen = tax;
                        r.total_fen = amount.wrapping_add(tax);
                    }
                } else {
                    (r.amount_fen, r.tax_fen, r.total_fen) = declared;
                }
                r
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn issuer_never_panics_on_wild_requests(requests in prop::collection::vec(wild_request(), 0..8)) {
        let mut issuer = appliance_core::Issuer::new(config()).unwrap();
        let seller = config().taxpayers[0].id;
        issuer
            .add_segment(
                &seller,
                NumberSegment::new(
                    InvoiceCode::new(1).unwrap(),
                    InvoiceNumber::new(1).unwrap(),
                    100,
                )
                .unwrap(),
            )
            .unwrap();
        let tick = issuer.begin_tick(1_000, requests.clone()).unwrap();
        // Whatever was admitted is a valid canonical invoice.
        for item in tick.canonical_items() {
            prop_assert!(canonical::decode(item).is_ok());
        }
        let codes: Vec<_> = (0..tick.item_count())
            .map(|_| Ok(([0u8; 32], [b'0'; 20])))
            .collect();
        let mut journal = Vec::new();
        let commit = issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        prop_assert_eq!(commit.answers.len(), requests.len());
        let (recovered, _) = recover(config(), &journal, 1_000).unwrap();
        prop_assert_eq!(recovered.next_seq(), issuer.next_seq());
    }
}
