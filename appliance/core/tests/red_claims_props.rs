//! Property test of red invoices across shards, sans I/O: N issuers (1..=8 shards) and
//! the claim protocol between them driven in process, as the shard shell drives it.
//!
//! Each step sends a batch of blue and red requests; every request goes to the home of
//! its own (seller, order id), order ids collide on purpose (a blue and a red may share
//! one), and reds name earlier invoices, red ones included. On a request's home shard a
//! red whose original lives elsewhere gets its claim from the original's shard (whose
//! next commit journals it) before the tick; some claims find that shard unreachable,
//! and shards restart from their journals. The oracle checks, over every answer of every
//! shard: at most one invoice per order id, whatever the kinds and the order of arrival;
//! replays give that invoice; a red of a red is never issued and is refused `RedOfRed`;
//! Σ |reds| of an original never exceeds it.

use std::collections::HashMap;

use appliance_core::invoice::{InvoiceKind, LineItem, RedReference};
use appliance_core::issuer::TaxCodeResult;
use appliance_core::money::tax_fen;
use appliance_core::routing::key_home_shard;
use appliance_core::{
    recover, Answer, Invoice, InvoiceCode, InvoiceNumber, IssueError, IssueRequest, Issuer,
    IssuerConfig, NumberSegment, TaxRate, TaxpayerConfig, TaxpayerId, Tick,
};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

fn seller() -> TaxpayerId {
    TaxpayerId::parse("91350100M000100Y43").unwrap()
}

fn config(shard_id: u32) -> IssuerConfig {
    IssuerConfig {
        shard_id,
        taxpayers: vec![TaxpayerConfig {
            id: seller(),
            ceiling_fen: 10_000_000,
            low_watermark: 1,
            refill_count: 100,
        }],
        retention_ms: u64::MAX / 2,
        index_capacity_orders: 1024,
        tick_requests_max: 64,
    }
}

fn fake_codes(tick: &Tick) -> Vec<TaxCodeResult> {
    tick.canonical_items()
        .map(|c| {
            let h = xxh3_128(c);
            let mut tax = [0u8; 32];
            tax[..16].copy_from_slice(&h.to_le_bytes());
            let digits = format!("{:020}", h % 10u128.pow(20));
            Ok((tax, digits.as_bytes().try_into().unwrap()))
        })
        .collect()
}

fn request(order: u8, price_fen: i64, red: Option<&Invoice>) -> IssueRequest {
    let rate = TaxRate::from_bp(600).unwrap();
    let price = if red.is_some() { -price_fen } else { price_fen };
    let tax = tax_fen(price, rate);
    IssueRequest {
        seller: seller(),
        order_id: format!("order-{order}"),
        buyer_name: "张三".into(),
        buyer_taxpayer: None,
        lines: vec![LineItem {
            name: "服务".into(),
            quantity: 1,
            unit_price_fen: price,
        }],
        tax_rate: rate,
        issuer_ref: "p".into(),
        amount_fen: price,
        tax_fen: tax,
        total_fen: price + tax,
        kind: match red {
            None => InvoiceKind::Blue,
            Some(original) => InvoiceKind::Red(RedReference {
                original_code: original.code,
                original_number: original.number,
                original_order_id: original.request.order_id.clone(),
            }),
        },
    }
}

struct Shard {
    issuer: Issuer,
    journal: Vec<u8>,
}

impl Shard {
    fn tick(&mut self, now_ms: u64, requests: Vec<IssueRequest>) -> Vec<Answer> {
        let tick = self.issuer.begin_tick(now_ms, requests).unwrap();
        let codes = fake_codes(&tick);
        self.issuer
            .finish_tick(tick, &codes, &mut self.journal)
            .unwrap()
            .answers
    }
}

#[derive(Debug, Clone)]
struct Spec {
    order: u8,
    price_fen: i64,
    /// A red of the issued invoice at this index (modulo their count), if any is issued.
    red_of: Option<usize>,
}

#[derive(Debug, Clone)]
enum Step {
    Batch {
        requests: Vec<Spec>,
        /// Claims of this step find the original's shard unreachable.
        unreachable: bool,
    },
    Restart(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let spec = (
        0u8..10,
        1i64..3_000,
        prop::option::weighted(0.6, 0usize..64),
    )
        .prop_map(|(order, price_fen, red_of)| Spec {
            order,
            price_fen,
            red_of,
        });
    prop_oneof![
        8 => (prop::collection::vec(spec, 1..6), prop::bool::weighted(0.1))
            .prop_map(|(requests, unreachable)| Step::Batch { requests, unreachable }),
        1 => (0usize..8).prop_map(Step::Restart),
    ]
}

fn run(shard_count: u32, steps: Vec<Step>) {
    let mut shards: Vec<Shard> = (0..shard_count)
        .map(|i| {
            let mut issuer = Issuer::new(config(i)).unwrap();
            let segment = NumberSegment::new(
                InvoiceCode::new(144_031_900_111).unwrap(),
                InvoiceNumber::new(1 + 1_000 * i).unwrap(),
                1_000,
            )
            .unwrap();
            issuer.add_segment(&seller(), segment).unwrap();
            let mut shard = Shard {
                issuer,
                journal: Vec::new(),
            };
            // The reservation is journaled before anything else.
            shard.tick(0, Vec::new());
            shard
        })
        .collect();
    let home = |r: &IssueRequest| {
        let key = appliance_core::idempotency::key_fingerprint(&r.seller, &r.order_id);
        key_home_shard(key, shard_count) as usize
    };
    // The oracle: every invoice issued, by order id; by original order id, Σ |reds
    // issued| and what is reserved (claims granted, by red order id, and reds issued on
    // the original's own shard).
    let mut o = Oracle::default();
    let mut now_ms = 1_000;
    for step in steps {
        now_ms += 1_000;
        let (specs, unreachable) = match step {
            Step::Restart(i) => {
                let shard = &mut shards[i % shard_count as usize];
                let config = shard.issuer.config().clone();
                shard.issuer = recover(config, &shard.journal, now_ms).unwrap().0;
                continue;
            }
            Step::Batch {
                requests,
                unreachable,
            } => (requests, unreachable),
        };
        let requests: Vec<IssueRequest> = specs
            .iter()
            .map(|s| match s.red_of {
                Some(i) if !o.invoices.is_empty() => request(
                    s.order,
                    s.price_fen,
                    Some(&o.invoices[i % o.invoices.len()]),
                ),
                _ => request(s.order, s.price_fen, None),
            })
            .collect();
        let mut per_shard: Vec<Vec<IssueRequest>> = vec![Vec::new(); shard_count as usize];
        for r in requests {
            per_shard[home(&r)].push(r);
        }
        for h in 0..shard_count as usize {
            let batch = std::mem::take(&mut per_shard[h]);
            if batch.is_empty() {
                continue;
            }
            // The claims of the batch's reds, each from its original's shard.
            for r in &batch {
                let Some(claim) = shards[h].issuer.red_claim_needed(r) else {
                    continue;
                };
                let s = key_home_shard(claim.original_fingerprint, shard_count) as usize;
                if s == h {
                    continue;
                }
                let result = if unreachable {
                    Err(IssueError::RedClaimUnavailable)
                } else {
                    let result = shards[s].issuer.claim_red(now_ms, &claim);
                    // The answer goes back once the claim's commit is written.
                    shards[s].tick(now_ms, Vec::new());
                    if result.is_ok() {
                        let InvoiceKind::Red(reference) = &r.kind else {
                            unreachable!("a claim is a red's")
                        };
                        let claims = o.claims.entry(reference.original_order_id.clone());
                        let fen = claims.or_default().entry(r.order_id.clone()).or_insert(0);
                        assert!(*fen == 0 || *fen == claim.red_fen, "claim changed");
                        *fen = claim.red_fen;
                    }
                    result
                };
                shards[h].issuer.red_claim_answered(claim, result);
            }
            let answers = shards[h].tick(now_ms, batch.clone());
            for (r, answer) in batch.iter().zip(answers) {
                o.check(r, answer, unreachable);
            }
        }
    }
}

#[derive(Default)]
struct Oracle {
    invoices: Vec<Invoice>,
    by_order: HashMap<String, Invoice>,
    /// Σ |reds issued| by original order id.
    reds_fen: HashMap<String, i64>,
    /// Claims granted: original order id → red order id → fen.
    claims: HashMap<String, HashMap<String, i64>>,
    /// Reds issued on their original's own shard (no claim), by original order id.
    local_fen: HashMap<String, i64>,
}

impl Oracle {
    fn reserved(&self, original: &str) -> i64 {
        let claimed: i64 = self.claims.get(original).map_or(0, |c| c.values().sum());
        claimed + self.local_fen.get(original).copied().unwrap_or(0)
    }

    fn check(&mut self, r: &IssueRequest, answer: Answer, unreachable: bool) {
        let original = match &r.kind {
            InvoiceKind::Red(reference) => Some((
                reference,
                self.by_order.get(&reference.original_order_id).cloned(),
            )),
            InvoiceKind::Blue => None,
        };
        match answer {
            Answer::Issued { invoice, .. } => {
                assert!(
                    !self.by_order.contains_key(&r.order_id),
                    "{} issued twice",
                    r.order_id
                );
                if let Some((reference, o)) = original {
                    let o = o.expect("a red's original was issued");
                    assert!(o.request.total_fen > 0, "red of a red issued");
                    let identity = (reference.original_code, reference.original_number);
                    assert_eq!((o.code, o.number), identity);
                    let key = o.request.order_id.clone();
                    let claimed = self
                        .claims
                        .get(&key)
                        .is_some_and(|c| c.contains_key(&r.order_id));
                    if !claimed {
                        *self.local_fen.entry(key.clone()).or_insert(0) += r.total_fen.abs();
                    }
                    let sum = self.reds_fen.entry(key.clone()).or_insert(0);
                    *sum += r.total_fen.abs();
                    assert!(*sum <= o.request.total_fen, "reds exceed {key}");
                    assert!(
                        self.reserved(&key) <= o.request.total_fen,
                        "claims exceed {key}"
                    );
                }
                self.by_order.insert(r.order_id.clone(), invoice.clone());
                self.invoices.push(invoice);
            }
            Answer::Replay { identity, .. } => {
                let first = self
                    .by_order
                    .get(&r.order_id)
                    .expect("replay of an issued order");
                assert_eq!(identity, first.identity());
            }
            Answer::Rejected(error) => match error {
                IssueError::IdempotencyConflict => {
                    assert!(self.by_order.contains_key(&r.order_id))
                }
                IssueError::RedOfRed => {
                    let (_, o) = original.expect("a red");
                    assert!(o.expect("original issued").request.total_fen < 0);
                }
                IssueError::RedExceedsOriginal { .. } => {
                    let (_, o) = original.expect("a red");
                    let o = o.expect("original issued");
                    let reserved = self.reserved(&o.request.order_id);
                    assert!(reserved + r.total_fen.abs() > o.request.total_fen);
                }
                IssueError::RedOriginalMismatch => {
                    let (reference, o) = original.expect("a red");
                    let o = o.expect("original issued");
                    let identity = (reference.original_code, reference.original_number);
                    assert!((o.code, o.number) != identity);
                }
                IssueError::RedClaimUnavailable => assert!(unreachable),
                other => panic!("unexpected refusal {other:?} of {r:?}"),
            },
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn one_invoice_per_key_and_reds_within_their_original(
        shards in 1u32..=8,
        steps in prop::collection::vec(step(), 1..40),
    ) {
        run(shards, steps);
    }
}
