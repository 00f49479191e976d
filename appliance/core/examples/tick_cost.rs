//! Rough cost of the core per invoice: `begin_tick` + `finish_tick` for ticks of 1,000
//! new requests (validation, idempotency, number take, canonical encode, journal encode).
//! Not a benchmark harness (see bench/ for criterion); run with
//! `cargo run --release -p appliance-core --example tick_cost`.

use std::time::Instant;

use appliance_core::money::tax_fen;
use appliance_core::{
    InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, Issuer, IssuerConfig, LineItem,
    NumberSegment, TaxRate, TaxpayerConfig, TaxpayerId,
};

const TICK_REQUESTS: usize = 1_000;
const TICKS: usize = 200;

fn main() {
    let seller = TaxpayerId::parse("91350100M000100Y43").expect("valid id");
    let mut issuer = Issuer::new(IssuerConfig {
        shard_id: 0,
        taxpayers: vec![TaxpayerConfig {
            id: seller,
            ceiling_fen: 100_000_000,
            low_watermark: 0,
            refill_count: 1,
        }],
        retention_ms: u64::MAX,
        index_capacity_orders: (TICK_REQUESTS * TICKS * 2) as u32,
        tick_requests_max: TICK_REQUESTS as u32,
    })
    .expect("valid config");
    let segment = NumberSegment::new(
        InvoiceCode::new(144_031_900_111).expect("code"),
        InvoiceNumber::new(1).expect("number"),
        (TICK_REQUESTS * TICKS) as u32,
    )
    .expect("segment");
    issuer.add_segment(&seller, segment).expect("segment fits");
    let rate = TaxRate::from_bp(900).expect("legal");
    let mut journal = Vec::with_capacity(64 << 20);
    let mut elapsed_ns = 0u128;
    for t in 0..TICKS {
        let requests: Vec<IssueRequest> = (0..TICK_REQUESTS)
            .map(|i| {
                let amount = 55_350;
                let tax = tax_fen(amount, rate);
                IssueRequest {
                    seller,
                    order_id: format!("E{t:06}{i:06}-2026112212345678"),
                    buyer_name: "张三".into(),
                    buyer_taxpayer: None,
                    lines: vec![LineItem {
                        name: "G1234 北京南-上海虹桥 二等座".into(),
                        quantity: 1,
                        unit_price_fen: amount,
                    }],
                    tax_rate: rate,
                    issuer_ref: "G1234".into(),
                    amount_fen: amount,
                    tax_fen: tax,
                    total_fen: amount + tax,
                    kind: InvoiceKind::Blue,
                }
            })
            .collect();
        journal.clear();
        let start = Instant::now();
        let tick = issuer
            .begin_tick(1_700_000_000_000, requests)
            .expect("tick");
        let codes: Vec<_> = (0..tick.item_count())
            .map(|_| Ok(([7u8; 32], [b'1'; 20])))
            .collect();
        let commit = issuer
            .finish_tick(tick, &codes, &mut journal)
            .expect("finish");
        elapsed_ns += start.elapsed().as_nanos();
        assert_eq!(commit.answers.len(), TICK_REQUESTS);
    }
    let invoices = (TICK_REQUESTS * TICKS) as u128;
    println!(
        "{} invoices, {:.2} us per invoice (core only, journal bytes per invoice {})",
        invoices,
        elapsed_ns as f64 / invoices as f64 / 1000.0,
        journal.len() / TICK_REQUESTS
    );
}
