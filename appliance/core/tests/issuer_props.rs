//! Property tests of the issuer against an independent oracle.
//!
//! Random runs of ticks (valid, invalid, duplicate, conflicting and red requests; whole
//! tick aborts, in any order among two ticks in flight; per-item tax-server refusals),
//! segment refills and restarts. A restart
//! either flushes and recovers the whole journal (the recovered state must equal the
//! live one) or crashes: the last commit's bytes are cut at a random byte (the write was
//! not durable, its answers never released) and the rest is replayed into a fresh issuer.
//!
//! The oracle knows only the journal bytes and the requests. It checks:
//! * no number is ever used twice, and every used number lies in a journaled segment;
//! * every number an aborted tick took (its TaxCodes command may have been executed) is
//!   journaled as spoiled (`CommandFailed`) by a later commit and never issued, unless a
//!   crash loses that commit first;
//! * every number of every reserved segment is exactly one of available (per the
//!   recovered issuer), issued, spoiled (journaled, or an aborted tick's waiting for the
//!   next commit) or returned;
//! * answers: new invoices carry exactly the amounts of an i128 computation from the
//!   lines; replays point at a journal record whose invoice is byte-identical to the
//!   first answer; a different request under a known order is a conflict; red rules hold
//!   for every red issued and are really violated for every red refused.

use std::collections::{HashMap, HashSet};

use appliance_core::canonical;
use appliance_core::invoice::{InvoiceKind, LineItem, RedReference};
use appliance_core::issuer::TaxCodeResult;
use appliance_core::journal::frame::{pad_to_block, scan, ScanEnd, KIND_PADDING};
use appliance_core::journal::record::{decode_issued, Record, RecordKind};
use appliance_core::journal::replay::recover;
use appliance_core::{
    Answer, Invoice, InvoiceCode, InvoiceNumber, IssueError, IssueRequest, Issuer, IssuerConfig,
    ItemError, NumberSegment, Outcome, TaxRate, TaxpayerConfig, TaxpayerId, Tick, TickError,
};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

const CEILING_FEN: i64 = 1_000_000;
const RATES_BP: [u16; 7] = [0, 100, 300, 500, 600, 900, 1300];

fn sellers() -> [TaxpayerId; 3] {
    [
        TaxpayerId::parse("91350100M000100Y43").unwrap(),
        TaxpayerId::parse("91110000600037341L").unwrap(),
        // Not configured: requests for it are refused as unknown sellers.
        TaxpayerId::with_check_char(b"91310000775785552").unwrap(),
    ]
}

/// Long enough that nothing expires during a run.
const RETENTION_MS_FOREVER: u64 = u64::MAX / 2;
/// Short enough that orders expire between ticks (ticks are 0..5 s apart).
const RETENTION_MS_SHORT: u64 = 4_000;

fn config(retention_ms: u64) -> IssuerConfig {
    IssuerConfig {
        shard_id: 1,
        taxpayers: sellers()[..2]
            .iter()
            .map(|&id| TaxpayerConfig {
                id,
                ceiling_fen: CEILING_FEN,
                low_watermark: 4,
                refill_count: 8,
            })
            .collect(),
        retention_ms,
        index_capacity_orders: 1024,
        tick_requests_max: 16,
    }
}

#[derive(Debug, Clone)]
struct RedSpec {
    original_order: u8,
    original_is_red: bool,
    wrong_number: bool,
}

#[derive(Debug, Clone)]
struct ReqSpec {
    seller: usize,
    order: u8,
    variant: u8,
    red: Option<RedSpec>,
    /// 0 = declared amounts right; 1 = tax off by one; 2 = total off by one; 3 = no lines.
    corrupt: u8,
}

#[derive(Debug, Clone)]
enum TickFault {
    None,
    Abort,
    Refuse(u16),
    WrongCount,
}

#[derive(Debug, Clone)]
enum Op {
    Tick {
        requests: Vec<ReqSpec>,
        fault: TickFault,
        /// Wall-clock step before the tick; negative steps model NTP stepping back.
        dt_ms: i64,
    },
    Refill {
        seller: usize,
        count: u32,
    },
    Restart {
        crash_cut: Option<u16>,
    },
    /// Two ticks in flight at once (begun at the same wall time), ended in `end`'s way.
    Pipelined {
        first: Vec<ReqSpec>,
        second: Vec<ReqSpec>,
        /// Per-item refusal masks of the two TaxCodes answers.
        refuse: (u16, u16),
        end: PipeEnd,
        dt_ms: i64,
    },
}

/// How the two ticks of [`Op::Pipelined`] end.
#[derive(Debug, Clone, Copy)]
enum PipeEnd {
    /// Finished in begin order.
    InOrder,
    /// The newer tick aborted first, then the older finished.
    AbortSecond,
    /// The newer tick finished first: refused as `NotOldest` (and aborted); the older
    /// then finishes.
    SecondFirst,
    /// The older tick aborted while the newer is in flight; the newer then finishes
    /// normally (its requests for the older's orders get the older's failure).
    AbortFirst,
    /// Both aborted, older first.
    AbortBoth,
    /// The older tick's answer has the wrong count (aborted); the newer finishes.
    WrongCountFirst,
}

fn req_spec() -> impl Strategy<Value = ReqSpec> {
    (
        prop_oneof![8 => 0usize..2, 1 => Just(2usize)],
        0u8..10,
        0u8..2,
        prop::option::weighted(
            0.3,
            (
                0u8..10,
                prop::bool::weighted(0.1),
                prop::bool::weighted(0.1),
            )
                .prop_map(|(original_order, original_is_red, wrong_number)| RedSpec {
                    original_order,
                    original_is_red,
                    wrong_number,
                }),
        ),
        prop_oneof![12 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
    )
        .prop_map(|(seller, order, variant, red, corrupt)| ReqSpec {
            seller,
            order,
            variant,
            red,
            corrupt,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            prop::collection::vec(req_spec(), 0..12),
            prop_oneof![
                8 => Just(TickFault::None),
                1 => Just(TickFault::Abort),
                2 => any::<u16>().prop_map(TickFault::Refuse),
                1 => Just(TickFault::WrongCount),
            ],
            prop_oneof![6 => 0i64..5_000, 1 => -3_000i64..0],
        )
            .prop_map(|(requests, fault, dt_ms)| Op::Tick {
                requests,
                fault,
                dt_ms
            }),
        2 => (0usize..2, 1u32..12).prop_map(|(seller, count)| Op::Refill { seller, count }),
        1 => prop::option::of(any::<u16>()).prop_map(|crash_cut| Op::Restart { crash_cut }),
        3 => (
            prop::collection::vec(req_spec(), 0..10),
            prop::collection::vec(req_spec(), 0..10),
            prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
            prop_oneof![4 => Just(0u16), 1 => any::<u16>()],
            prop_oneof![
                6 => Just(PipeEnd::InOrder),
                1 => Just(PipeEnd::AbortSecond),
                1 => Just(PipeEnd::SecondFirst),
                1 => Just(PipeEnd::AbortFirst),
                1 => Just(PipeEnd::AbortBoth),
                1 => Just(PipeEnd::WrongCountFirst),
            ],
            prop_oneof![6 => 0i64..5_000, 1 => -3_000i64..0],
        )
            .prop_map(|(first, second, r1, r2, end, dt_ms)| Op::Pipelined {
                first,
                second,
                refuse: (r1, r2),
                end,
                dt_ms
            }),
    ]
}

fn refuse_items(codes: &mut [TaxCodeResult], mask: u16) {
    for (i, c) in codes.iter_mut().enumerate() {
        if mask & (1 << (i % 16)) != 0 {
            *c = Err(ItemError::NumberNotHeld);
        }
    }
}

/// Deterministic request content from its spec (the same spec always gives the same
/// request, so retries are identical and other variants conflict).
fn build_request(spec: &ReqSpec, oracle: &Oracle) -> IssueRequest {
    let seller = sellers()[spec.seller];
    let h = xxh3_128(&[
        spec.seller as u8,
        spec.order,
        spec.variant,
        spec.red.is_some() as u8,
    ]);
    let rate = TaxRate::from_bp(RATES_BP[(h % 7) as usize]).unwrap();
    let line_count = 1 + (h >> 8) as usize % 3;
    let red = spec.red.is_some();
    let mut lines: Vec<LineItem> = (0..line_count)
        .map(|i| {
            let price = ((h >> (16 + 12 * i)) % 150_000) as i64 + 1;
            LineItem {
                name: format!("车票 {}-{i}", spec.order),
                quantity: 1 + ((h >> (60 + i)) % 4) as u32,
                // Reds offset a fraction so that several reds fit under one original.
                unit_price_fen: if red { -(price / 8 + 1) } else { price },
            }
        })
        .collect();
    if spec.corrupt == 3 {
        lines.clear();
    }
    let (amount, tax, total) = oracle_amounts(&lines, rate);
    let (order_id, kind) = match &spec.red {
        None => (format!("o{}", spec.order), InvoiceKind::Blue),
        Some(r) => {
            let original_order_id = if r.original_is_red {
                format!("r{}", r.original_order)
            } else {
                format!("o{}", r.original_order)
            };
            let (code, number) = match oracle.orders.get(&(seller, original_order_id.clone())) {
                Some(o) => (o.invoice.code.get(), o.invoice.number.get()),
                None => (999, 1),
            };
            let number = if r.wrong_number {
                number % 99 + 1 + 1
            } else {
                number
            };
            (
                format!("r{}", spec.order),
                InvoiceKind::Red(RedReference {
                    original_code: InvoiceCode::new(code).unwrap(),
                    original_number: InvoiceNumber::new(number).unwrap(),
                    original_order_id,
                }),
            )
        }
    };
    IssueRequest {
        seller,
        order_id,
        buyer_name: format!("旅客{}", spec.variant),
        buyer_taxpayer: None,
        lines,
        tax_rate: rate,
        issuer_ref: "G1234".into(),
        amount_fen: amount as i64,
        tax_fen: tax as i64 + i64::from(spec.corrupt == 1),
        total_fen: total as i64 + i64::from(spec.corrupt == 2),
        kind,
    }
}

/// Independent amount computation in i128, with round-half-up by comparison.
fn oracle_amounts(lines: &[LineItem], rate: TaxRate) -> (i128, i128, i128) {
    let amount: i128 = lines
        .iter()
        .map(|l| i128::from(l.quantity) * i128::from(l.unit_price_fen))
        .sum();
    let scaled = amount.abs() * i128::from(rate.bp());
    let (q, r) = (scaled / 10_000, scaled % 10_000);
    let magnitude = if 2 * r >= 10_000 { q + 1 } else { q };
    let tax = if amount < 0 { -magnitude } else { magnitude };
    (amount, tax, amount + tax)
}

fn fake_codes(tick: &Tick) -> Vec<TaxCodeResult> {
    tick.canonical_items()
        .map(|c| {
            let h = xxh3_128(c);
            let mut tax = [0u8; 32];
            tax[..16].copy_from_slice(&h.to_le_bytes());
            tax[16..].copy_from_slice(&h.to_be_bytes());
            let digits = format!("{:020}", h % 10u128.pow(20));
            Ok((tax, digits.as_bytes().try_into().unwrap()))
        })
        .collect()
}

struct IssuedOrder {
    seq: u64,
    invoice: Invoice,
}

/// What the journal says, rebuilt from its bytes alone.
#[derive(Default)]
struct Oracle {
    /// Latest issue of each order (an order may be issued again once forgotten).
    orders: HashMap<(TaxpayerId, String), IssuedOrder>,
    /// Σ |red totals| per original invoice (code, number).
    red_sums: HashMap<(u64, u32), i128>,
    retention_s: u64,
    /// Journal offsets of Issued records by sequence number.
    issued_at: HashMap<u64, usize>,
    reserved: HashMap<TaxpayerId, Vec<NumberSegment>>,
    used: HashMap<TaxpayerId, HashSet<(u64, u32)>>,
    returned: HashMap<TaxpayerId, u64>,
    issued_count: HashMap<TaxpayerId, u64>,
    spoiled_count: HashMap<TaxpayerId, u64>,
    /// Every journaled spoiled number, with its reason.
    spoiled: HashMap<Spoil, ItemError>,
}

/// A number of a seller: (seller, code, number).
type Spoil = (TaxpayerId, u64, u32);

/// The numbers a tick took (read back from its canonical items, as the device would).
fn tick_numbers(tick: &Tick) -> Vec<Spoil> {
    tick.canonical_items()
        .map(|bytes| {
            let c = canonical::decode(bytes).expect("the tick's own canonical bytes");
            (c.request.seller, c.code.get(), c.number.get())
        })
        .collect()
}

impl Oracle {
    fn from_journal(journal: &[u8], retention_ms: u64) -> Self {
        let mut o = Oracle {
            retention_s: retention_ms / 1000,
            ..Oracle::default()
        };
        let end = scan::<()>(journal, |raw| {
            if raw.kind == KIND_PADDING {
                return Ok(());
            }
            match Record::decode(raw.kind, raw.body).expect("journal record decodes") {
                Record::SegmentReserved { seller, segment } => {
                    o.reserved.entry(seller).or_default().push(segment)
                }
                Record::SegmentReturned { seller, segment } => {
                    *o.returned.entry(seller).or_default() += u64::from(segment.count)
                }
                Record::Issued(invoice) => {
                    let seller = invoice.request.seller;
                    o.use_number(seller, invoice.code, invoice.number);
                    *o.issued_count.entry(seller).or_default() += 1;
                    o.issued_at.insert(raw.seq, raw.offset);
                    if let InvoiceKind::Red(r) = &invoice.request.kind {
                        *o.red_sums
                            .entry((r.original_code.get(), r.original_number.get()))
                            .or_default() += i128::from(invoice.request.total_fen).abs();
                    }
                    let key = (seller, invoice.request.order_id.clone());
                    let previous = o.orders.insert(
                        key,
                        IssuedOrder {
                            seq: raw.seq,
                            invoice,
                        },
                    );
                    // Issued again only after the first issue left the retention window.
                    if let Some(previous) = previous {
                        let now_s = o.orders[&(seller, previous.invoice.request.order_id.clone())]
                            .invoice
                            .issue_time_ms
                            / 1000;
                        let then_s = previous.invoice.issue_time_ms / 1000;
                        assert!(now_s - then_s > o.retention_s, "order issued twice");
                    }
                }
                Record::NumberSpoiled {
                    seller,
                    identity,
                    reason,
                } => {
                    o.use_number(seller, identity.code, identity.number);
                    *o.spoiled_count.entry(seller).or_default() += 1;
                    o.spoiled
                        .insert((seller, identity.code.get(), identity.number.get()), reason);
                }
                other => panic!("unexpected record {other:?}"),
            }
            Ok(())
        })
        .unwrap();
        assert!(matches!(end, ScanEnd::Clean { .. }), "{end:?}");
        o
    }

    /// The order's invoice if the issuer must still remember it at `now_ms`.
    fn known(&self, key: &(TaxpayerId, String), now_ms: u64) -> Option<&IssuedOrder> {
        self.orders.get(key).filter(|o| {
            (now_ms / 1000).saturating_sub(o.invoice.issue_time_ms / 1000) <= self.retention_s
        })
    }

    fn remembered(&self, now_ms: u64) -> usize {
        self.orders
            .keys()
            .filter(|k| self.known(k, now_ms).is_some())
            .count()
    }

    fn use_number(&mut self, seller: TaxpayerId, code: InvoiceCode, number: InvoiceNumber) {
        let inside = self
            .reserved
            .get(&seller)
            .is_some_and(|segs| segs.iter().any(|s| s.contains(code, number)));
        assert!(inside, "number {number:?} outside journaled segments");
        let fresh = self
            .used
            .entry(seller)
            .or_default()
            .insert((code.get(), number.get()));
        assert!(fresh, "number {number:?} used twice");
    }

    /// Every number of every journaled segment is exactly one of available (per the
    /// issuer), used (issued or spoiled) or returned.
    /// `unjournaled` are segments added to the issuer whose records wait for a commit;
    /// `spoiling` the numbers of aborted ticks whose spoiled records wait for one.
    fn check_accounting(
        &self,
        issuer: &Issuer,
        unjournaled: &[(TaxpayerId, NumberSegment)],
        spoiling: &[Spoil],
    ) {
        for seller in &sellers()[..2] {
            let mut available = HashSet::new();
            for s in issuer.available_segments(seller).unwrap() {
                for n in s.first.get()..s.end() {
                    assert!(available.insert((s.code.get(), n)));
                }
            }
            let mut used = self.used.get(seller).cloned().unwrap_or_default();
            let mut waiting_spoils = 0;
            for &(s, code, number) in spoiling {
                if s == *seller {
                    assert!(
                        used.insert((code, number)),
                        "an aborted tick's number {number} used again"
                    );
                    waiting_spoils += 1;
                }
            }
            assert!(
                available.is_disjoint(&used),
                "available number already used"
            );
            let waiting: Vec<NumberSegment> = unjournaled
                .iter()
                .filter(|(s, _)| s == seller)
                .map(|(_, segment)| *segment)
                .collect();
            let reserved: u64 = self
                .reserved
                .get(seller)
                .map_or(0, |v| v.iter().map(|s| u64::from(s.count)).sum::<u64>())
                + waiting.iter().map(|s| u64::from(s.count)).sum::<u64>();
            let returned = self.returned.get(seller).copied().unwrap_or(0);
            assert_eq!(
                reserved,
                available.len() as u64 + used.len() as u64 + returned,
                "numbers unaccounted for"
            );
            for number in &available {
                let code = InvoiceCode::new(number.0).unwrap();
                let n = InvoiceNumber::new(number.1).unwrap();
                let journaled = self
                    .reserved
                    .get(seller)
                    .is_some_and(|v| v.iter().any(|s| s.contains(code, n)));
                assert!(journaled || waiting.iter().any(|s| s.contains(code, n)));
            }
            let a = issuer.accounting(seller).unwrap();
            assert_eq!(a.reserved, reserved);
            assert_eq!(
                a.issued,
                self.issued_count.get(seller).copied().unwrap_or(0)
            );
            assert_eq!(
                a.spoiled,
                self.spoiled_count.get(seller).copied().unwrap_or(0) + waiting_spoils
            );
            assert_eq!(a.in_flight, 0);
        }
    }
}

fn invoice_bytes(invoice: &Invoice) -> Vec<u8> {
    let mut b = canonical::encode(invoice);
    b.extend_from_slice(&invoice.tax_control_code);
    b.extend_from_slice(&invoice.check_code);
    b
}

fn journal_invoice(journal: &[u8], oracle: &Oracle, seq: u64) -> Invoice {
    let offset = oracle.issued_at[&seq];
    let (raw, _) = appliance_core::journal::frame::decode_record_at(journal, offset).unwrap();
    assert_eq!(raw.seq, seq);
    assert_eq!(raw.kind, RecordKind::Issued as u8);
    decode_issued(raw.body).unwrap()
}

/// Checks the answers of one commit against the oracle as it was before the commit.
fn check_answers(
    requests: &[IssueRequest],
    answers: &[Answer],
    before: &Oracle,
    journal: &[u8],
    after: &Oracle,
    now_ms: u64,
) {
    let configured: HashSet<TaxpayerId> = sellers()[..2].iter().copied().collect();
    // First admitted request per key in this tick (Issued or refused by the tax server).
    let mut firsts: HashMap<(TaxpayerId, String), usize> = HashMap::new();
    let mut tick_red_claims: HashMap<(u64, u32), i128> = HashMap::new();
    for (i, (request, answer)) in requests.iter().zip(answers).enumerate() {
        let key = (request.seller, request.order_id.clone());
        let (amount, tax, total) = oracle_amounts(&request.lines, request.tax_rate);
        let amounts_ok = !request.lines.is_empty()
            && i128::from(request.amount_fen) == amount
            && i128::from(request.tax_fen) == tax
            && i128::from(request.total_fen) == total;
        if let Some(known) = before.known(&key, now_ms) {
            if known.invoice.request == *request {
                let Answer::Replay { seq, identity } = answer else {
                    panic!("retry of a known order answered {answer:?}")
                };
                assert_eq!(*seq, known.seq);
                assert_eq!(*identity, known.invoice.identity());
                let replayed = journal_invoice(journal, after, *seq);
                assert_eq!(invoice_bytes(&replayed), invoice_bytes(&known.invoice));
            } else {
                assert_eq!(*answer, Answer::Rejected(IssueError::IdempotencyConflict));
            }
            continue;
        }
        if let Some(&first) = firsts.get(&key) {
            if requests[first] == *request {
                match (&answers[first], answer) {
                    (Answer::Issued { seq, invoice }, Answer::Replay { seq: s, identity }) => {
                        assert_eq!((seq, invoice.identity()), (s, *identity));
                    }
                    (Answer::Rejected(a), Answer::Rejected(b)) => assert_eq!(a, b),
                    other => panic!("duplicate in tick answered {other:?}"),
                }
            } else {
                assert_eq!(*answer, Answer::Rejected(IssueError::IdempotencyConflict));
            }
            continue;
        }
        let original = match &request.kind {
            InvoiceKind::Red(r) => Some((request.seller, r.original_order_id.clone(), r)),
            InvoiceKind::Blue => None,
        };
        // The original as the issuer must see it, and the reds claimed against it.
        let original_known = original
            .as_ref()
            .and_then(|(s, o, _)| before.known(&(*s, o.clone()), now_ms));
        let claimed_fen = |o: &IssuedOrder, claims: &HashMap<(u64, u32), i128>| {
            let k = (o.invoice.code.get(), o.invoice.number.get());
            before.red_sums.get(&k).copied().unwrap_or(0)
                + claims.get(&k).copied().unwrap_or(0)
                + total.abs()
        };
        match answer {
            Answer::Issued { seq, invoice } => {
                assert!(amounts_ok, "invalid amounts issued");
                assert!(configured.contains(&request.seller));
                assert_eq!(invoice.request, *request);
                assert!(total.abs() <= i128::from(CEILING_FEN));
                assert_eq!(i128::from(invoice.request.total_fen), total);
                let journaled = journal_invoice(journal, after, *seq);
                assert_eq!(invoice_bytes(&journaled), invoice_bytes(invoice));
                if let Some((_, _, r)) = &original {
                    let o = original_known.expect("red issued against an unknown original");
                    assert_eq!(o.invoice.code, r.original_code);
                    assert_eq!(o.invoice.number, r.original_number);
                    assert!(o.invoice.request.total_fen > 0);
                    let claimed = claimed_fen(o, &tick_red_claims);
                    assert!(claimed <= i128::from(o.invoice.request.total_fen));
                }
            }
            Answer::Rejected(error) => match error {
                IssueError::AmountMismatch { .. }
                | IssueError::TaxMismatch { .. }
                | IssueError::TotalMismatch { .. }
                | IssueError::LineCount(_) => assert!(!amounts_ok, "{error:?}"),
                IssueError::UnknownSeller => assert!(!configured.contains(&request.seller)),
                IssueError::CeilingExceeded { .. } => {
                    assert!(total.abs() > i128::from(CEILING_FEN))
                }
                IssueError::RedOriginalUnknown => {
                    assert!(original.is_some() && original_known.is_none());
                }
                IssueError::RedOriginalMismatch => {
                    let (_, _, r) = original.as_ref().unwrap();
                    let inv = &original_known.unwrap().invoice;
                    assert!(inv.code != r.original_code || inv.number != r.original_number);
                }
                IssueError::RedOfRed => {
                    assert!(original_known.unwrap().invoice.request.total_fen < 0);
                }
                IssueError::RedExceedsOriginal { .. } => {
                    let o = original_known.unwrap();
                    let claimed = claimed_fen(o, &tick_red_claims);
                    assert!(claimed > i128::from(o.invoice.request.total_fen));
                }
                IssueError::NoNumbersAvailable | IssueError::TaxCodeRefused(_) => {
                    assert!(amounts_ok && configured.contains(&request.seller))
                }
                other => panic!("unexpected rejection {other:?}"),
            },
            Answer::Replay { .. } => panic!("replay of an unknown order"),
        }
        let admitted = matches!(
            answer,
            Answer::Issued { .. } | Answer::Rejected(IssueError::TaxCodeRefused(_))
        );
        if admitted {
            firsts.insert(key, i);
            if let Some(o) = original_known {
                let k = (o.invoice.code.get(), o.invoice.number.get());
                *tick_red_claims.entry(k).or_default() += total.abs();
            }
        }
    }
}

struct Harness {
    issuer: Issuer,
    journal: Vec<u8>,
    oracle: Oracle,
    /// The wall clock handed to the issuer (may step back).
    wall_ms: u64,
    /// The issuer's tick time: the largest wall time so far.
    now_ms: u64,
    next_code: u64,
    /// Journal bytes of the last commit, which a crash may tear.
    last_commit: Option<std::ops::Range<usize>>,
    /// Segments added since the last commit (their records are not journaled yet).
    unjournaled: Vec<(TaxpayerId, NumberSegment)>,
    /// Numbers of aborted ticks not journaled as spoiled yet.
    spoiling: Vec<Spoil>,
    retention_ms: u64,
}

impl Harness {
    fn new(retention_ms: u64) -> Self {
        Harness {
            issuer: Issuer::new(config(retention_ms)).unwrap(),
            journal: Vec::new(),
            oracle: Oracle::from_journal(&[], retention_ms),
            wall_ms: 1_700_000_000_000,
            // Like a new issuer's clock: no tick yet.
            now_ms: 0,
            next_code: 100_000_000_000,
            last_commit: None,
            unjournaled: Vec::new(),
            spoiling: Vec::new(),
            retention_ms,
        }
    }

    /// After the oracle was rebuilt from a new commit: the aborted ticks' numbers it
    /// journaled are spoiled for `CommandFailed`; the others still wait, unused.
    fn settle_spoiling(&mut self) {
        let oracle = &self.oracle;
        self.spoiling.retain(|n| match oracle.spoiled.get(n) {
            Some(reason) => {
                assert_eq!(*reason, ItemError::CommandFailed);
                false
            }
            None => {
                let used = oracle
                    .used
                    .get(&n.0)
                    .is_some_and(|u| u.contains(&(n.1, n.2)));
                assert!(!used, "an aborted tick's number {n:?} was issued");
                true
            }
        });
    }

    fn commit(&mut self, requests: &[IssueRequest], fault: &TickFault) {
        let before_accounting: Vec<_> = sellers()[..2]
            .iter()
            .map(|s| self.issuer.accounting(s).unwrap())
            .collect();
        let before_seq = self.issuer.next_seq();
        self.now_ms = self.now_ms.max(self.wall_ms);
        let tick = self
            .issuer
            .begin_tick(self.wall_ms, requests.to_vec())
            .unwrap();
        assert_eq!(
            tick.now_ms(),
            self.now_ms,
            "tick time is the largest wall time"
        );
        let mut codes = fake_codes(&tick);
        let taken = tick_numbers(&tick);
        let aborted = match fault {
            TickFault::Abort => {
                let back = self.issuer.abort_tick(tick).unwrap();
                assert_eq!(back, requests, "abort hands the requests back unchanged");
                true
            }
            TickFault::WrongCount => {
                codes.push(Err(ItemError::Device(1)));
                let r = self.issuer.finish_tick(tick, &codes, &mut self.journal);
                assert!(r.is_err());
                true
            }
            TickFault::None | TickFault::Refuse(_) => {
                if let TickFault::Refuse(mask) = fault {
                    refuse_items(&mut codes, *mask);
                }
                let before = std::mem::take(&mut self.oracle);
                let commit = self
                    .issuer
                    .finish_tick(tick, &codes, &mut self.journal)
                    .unwrap();
                assert_eq!(commit.journal_range.end, self.journal.len());
                // Like the shell: pad the tick's write to whole blocks.
                pad_to_block(&mut self.journal, 4096);
                self.oracle = Oracle::from_journal(&self.journal, self.retention_ms);
                check_answers(
                    requests,
                    &commit.answers,
                    &before,
                    &self.journal,
                    &self.oracle,
                    self.now_ms,
                );
                self.last_commit = Some(commit.journal_range.start..self.journal.len());
                self.unjournaled.clear();
                self.settle_spoiling();
                false
            }
        };
        if aborted {
            // Every number taken is spoiled, none goes back; no index entry, no record,
            // no sequence used.
            for (s, before) in sellers()[..2].iter().zip(&before_accounting) {
                let n = taken.iter().filter(|t| t.0 == *s).count() as u64;
                let after = self.issuer.accounting(s).unwrap();
                assert_eq!(after.in_flight, 0);
                assert_eq!(after.spoiled, before.spoiled + n);
                assert_eq!(after.available, before.available - n);
                assert_eq!(after.issued, before.issued);
            }
            self.spoiling.extend(taken);
            assert_eq!(self.issuer.next_seq(), before_seq);
            assert_eq!(
                self.issuer.index().len() as usize,
                self.oracle.remembered(self.now_ms)
            );
        }
        self.oracle
            .check_accounting(&self.issuer, &self.unjournaled, &self.spoiling);
    }

    /// Two ticks in flight at once. Whatever finishes must be answered exactly as one
    /// tick holding the ticks' requests in order would be (a request of the second tick
    /// for an order the first is issuing gets the first one's answer), where an aborted
    /// first tick counts as one whose every new item was refused `CommandFailed`. Every
    /// number an aborted tick took is spoiled, never reused.
    fn pipelined(
        &mut self,
        first: &[IssueRequest],
        second: &[IssueRequest],
        refuse: (u16, u16),
        end: PipeEnd,
    ) {
        self.now_ms = self.now_ms.max(self.wall_ms);
        let t1 = self
            .issuer
            .begin_tick(self.wall_ms, first.to_vec())
            .unwrap();
        let t2 = self
            .issuer
            .begin_tick(self.wall_ms, second.to_vec())
            .unwrap();
        assert_eq!(self.issuer.ticks_in_flight(), 2);
        let mut c1 = fake_codes(&t1);
        refuse_items(&mut c1, refuse.0);
        let mut c2 = fake_codes(&t2);
        refuse_items(&mut c2, refuse.1);
        let (n1, n2) = (tick_numbers(&t1), tick_numbers(&t2));
        // What an aborted first tick's requests amount to, from its outcomes.
        let failed = Answer::Rejected(IssueError::TaxCodeRefused(ItemError::CommandFailed));
        let aborted_answers: Vec<Answer> = t1
            .outcomes()
            .iter()
            .map(|o| match o {
                Outcome::NeedsTaxCode { .. } | Outcome::DuplicateOf { .. } => failed.clone(),
                Outcome::Replay { seq, identity } => Answer::Replay {
                    seq: *seq,
                    identity: *identity,
                },
                Outcome::Rejected(e) => Answer::Rejected(e.clone()),
                Outcome::AwaitsEarlierTick { .. } => unreachable!("no earlier tick in flight"),
            })
            .collect();
        let start = self.journal.len();
        let before = std::mem::take(&mut self.oracle);
        // The requests and answers of the ticks, in begin order, up to the last one that
        // finished.
        let mut requests: Vec<IssueRequest> = Vec::new();
        let mut answers: Vec<Answer> = Vec::new();
        let finish = |h: &mut Self,
                      tick: Tick,
                      codes: &[TaxCodeResult],
                      r: &[IssueRequest],
                      requests: &mut Vec<IssueRequest>,
                      answers: &mut Vec<Answer>| {
            let commit = h.issuer.finish_tick(tick, codes, &mut h.journal).unwrap();
            assert_eq!(commit.journal_range.end, h.journal.len());
            pad_to_block(&mut h.journal, 4096);
            requests.extend_from_slice(r);
            answers.extend(commit.answers);
        };
        match end {
            PipeEnd::InOrder => {
                finish(self, t1, &c1, first, &mut requests, &mut answers);
                finish(self, t2, &c2, second, &mut requests, &mut answers);
            }
            PipeEnd::AbortSecond => {
                assert_eq!(self.issuer.abort_tick(t2).unwrap(), second);
                self.spoiling.extend(n2);
                finish(self, t1, &c1, first, &mut requests, &mut answers);
            }
            PipeEnd::SecondFirst => {
                let e = self.issuer.finish_tick(t2, &c2, &mut self.journal);
                assert_eq!(e.unwrap_err(), TickError::NotOldest);
                assert_eq!(self.journal.len(), start, "nothing journaled");
                self.spoiling.extend(n2);
                finish(self, t1, &c1, first, &mut requests, &mut answers);
            }
            PipeEnd::AbortFirst | PipeEnd::AbortBoth | PipeEnd::WrongCountFirst => {
                if let PipeEnd::WrongCountFirst = end {
                    c1.push(Err(ItemError::Device(1)));
                    assert!(self.issuer.finish_tick(t1, &c1, &mut self.journal).is_err());
                } else {
                    assert_eq!(self.issuer.abort_tick(t1).unwrap(), first);
                }
                self.spoiling.extend(n1);
                requests.extend_from_slice(first);
                answers.extend(aborted_answers);
                if let PipeEnd::AbortBoth = end {
                    assert_eq!(self.issuer.abort_tick(t2).unwrap(), second);
                    self.spoiling.extend(n2);
                } else {
                    finish(self, t2, &c2, second, &mut requests, &mut answers);
                }
            }
        }
        assert!(!self.issuer.tick_in_flight());
        self.oracle = Oracle::from_journal(&self.journal, self.retention_ms);
        check_answers(
            &requests,
            &answers,
            &before,
            &self.journal,
            &self.oracle,
            self.now_ms,
        );
        if self.journal.len() > start {
            // A crash may tear the ticks' writes anywhere (a group commit writes both at
            // once).
            self.last_commit = Some(start..self.journal.len());
            self.unjournaled.clear();
            self.settle_spoiling();
        }
        assert_eq!(
            self.issuer.index().len() as usize,
            self.oracle.remembered(self.now_ms)
        );
        self.oracle
            .check_accounting(&self.issuer, &self.unjournaled, &self.spoiling);
    }

    fn restart(&mut self, crash_cut: Option<u16>) {
        match (crash_cut, self.last_commit.clone()) {
            (Some(cut), Some(range)) => {
                // The last write was torn: keep a random prefix of it.
                let keep = range.start + usize::from(cut) % (range.len() + 1);
                self.journal.truncate(keep);
                let (issuer, end) =
                    recover(config(self.retention_ms), &self.journal, self.wall_ms).unwrap();
                let end = match end {
                    ScanEnd::Clean { end } | ScanEnd::TornTail { end, .. } => end,
                    ScanEnd::Corrupt { .. } => unreachable!(),
                };
                self.journal.truncate(end);
                // The recovered clock is the latest journaled issue time or the wall clock;
                // ticks that journaled nothing before the crash are forgotten, which only
                // delays expiry.
                assert!(issuer.clock_ms() <= self.now_ms);
                self.now_ms = issuer.clock_ms();
                self.issuer = issuer;
                // Segments not journaled before the crash are lost to this shard (the
                // server adopts them back through the tax server's Inventory).
                self.unjournaled.clear();
                // So are spoiled numbers not journaled yet: the recovered pools hold them
                // as available (the crash window between a TaxCodes command and the
                // commit that records its numbers, docs/journal.md).
                self.spoiling.clear();
            }
            _ => {
                // Clean shutdown: flush queued control records, then the recovered
                // issuer must equal the live one.
                self.commit(&[], &TickFault::None);
                assert!(
                    self.spoiling.is_empty(),
                    "aborted ticks' numbers not journaled by the next commit: {:?}",
                    self.spoiling
                );
                // Restart "now" is the live clock, so that both expire the same orders.
                let (issuer, end) =
                    recover(config(self.retention_ms), &self.journal, self.now_ms).unwrap();
                assert_eq!(issuer.clock_ms(), self.issuer.clock_ms());
                assert_eq!(
                    end,
                    ScanEnd::Clean {
                        end: self.journal.len()
                    }
                );
                assert_eq!(issuer.next_seq(), self.issuer.next_seq());
                for s in &sellers()[..2] {
                    assert_eq!(issuer.accounting(s), self.issuer.accounting(s));
                    assert_eq!(
                        issuer.available_segments(s),
                        self.issuer.available_segments(s)
                    );
                }
                let live: Vec<_> = self.issuer.index().entries().copied().collect();
                let recovered: Vec<_> = issuer.index().entries().copied().collect();
                assert_eq!(live, recovered);
                self.issuer = issuer;
            }
        }
        self.last_commit = None;
        self.oracle = Oracle::from_journal(&self.journal, self.retention_ms);
        self.oracle
            .check_accounting(&self.issuer, &self.unjournaled, &self.spoiling);
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Tick {
                requests,
                fault,
                dt_ms,
            } => {
                self.wall_ms = self.wall_ms.saturating_add_signed(*dt_ms);
                let built: Vec<_> = requests
                    .iter()
                    .map(|s| build_request(s, &self.oracle))
                    .collect();
                self.commit(&built, fault);
            }
            Op::Refill { seller, count } => {
                let segment = NumberSegment::new(
                    InvoiceCode::new(self.next_code).unwrap(),
                    InvoiceNumber::new(1).unwrap(),
                    *count,
                )
                .unwrap();
                self.next_code += 1;
                self.issuer
                    .add_segment(&sellers()[*seller], segment)
                    .unwrap();
                // The segment's record is only journaled by the next commit.
                self.unjournaled.push((sellers()[*seller], segment));
            }
            Op::Restart { crash_cut } => self.restart(*crash_cut),
            Op::Pipelined {
                first,
                second,
                refuse,
                end,
                dt_ms,
            } => {
                self.wall_ms = self.wall_ms.saturating_add_signed(*dt_ms);
                let build = |specs: &[ReqSpec]| -> Vec<IssueRequest> {
                    specs
                        .iter()
                        .map(|s| build_request(s, &self.oracle))
                        .collect()
                };
                let (first, second) = (build(first), build(second));
                self.pipelined(&first, &second, *refuse, *end);
            }
        }
    }
}

fn run_ops(retention_ms: u64, ops: &[Op]) {
    let mut h = Harness::new(retention_ms);
    for op in ops {
        h.run(op);
    }
    h.restart(None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn issuer_invariants_hold_across_faults_and_restarts(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(RETENTION_MS_FOREVER, &ops);
    }

    /// Orders expire between ticks: forgotten orders are issued anew, reds against a
    /// forgotten original are refused, and recovery forgets exactly what the live issuer
    /// forgot (the clean-restart comparison of index entries checks it).
    #[test]
    fn expiry_is_consistent_live_and_after_recovery(ops in prop::collection::vec(op(), 1..40)) {
        run_ops(RETENTION_MS_SHORT, &ops);
    }
}

#[test]
fn a_long_deterministic_run_issues_and_recovers() {
    // A fixed scenario big enough to wrap segments and exercise reds after restarts.
    let mut h = Harness::new(RETENTION_MS_FOREVER);
    for s in 0..2 {
        h.run(&Op::Refill {
            seller: s,
            count: 40,
        });
    }
    for round in 0..30u8 {
        let requests: Vec<ReqSpec> = (0..10u8)
            .map(|i| ReqSpec {
                seller: usize::from(i % 2),
                order: (round * 3 + i) % 10,
                variant: 0,
                red: (i % 3 == 0).then_some(RedSpec {
                    original_order: (round + i) % 10,
                    original_is_red: false,
                    wrong_number: false,
                }),
                corrupt: 0,
            })
            .collect();
        h.run(&Op::Tick {
            requests,
            fault: if round % 7 == 3 {
                TickFault::Refuse(0b101)
            } else {
                TickFault::None
            },
            dt_ms: 100,
        });
        if round % 10 == 9 {
            h.run(&Op::Restart {
                crash_cut: Some(u16::from(round) * 97),
            });
        }
        if round % 5 == 0 {
            h.run(&Op::Refill {
                seller: usize::from(round % 2),
                count: 10,
            });
        }
    }
    h.restart(None);
    assert!(h.oracle.orders.len() > 20, "{}", h.oracle.orders.len());
    assert!(h.oracle.red_sums.values().any(|&v| v > 0));
}
