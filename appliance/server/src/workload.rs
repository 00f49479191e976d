//! Synthetic railway invoice requests: what the demo, the crash test and the benchmarks
//! issue. Deterministic in their index, so that a restarted run can re-send exactly the
//! orders it sent before (idempotent replays).

use appliance_core::money::tax_fen;
use appliance_core::{InvoiceKind, IssueRequest, LineItem, TaxRate, TaxpayerId};

/// Railway VAT on passenger transport: 9%.
pub const RAILWAY_RATE_BP: u16 = 900;

/// The `i`-th synthetic seller (a railway bureau) with a valid GB 32100-2015 check
/// character.
pub fn seller(i: u32) -> TaxpayerId {
    let first17 = format!("91110000717{:06}", i % 1_000_000);
    let bytes: [u8; 17] = first17.as_bytes().try_into().expect("17 ASCII digits");
    TaxpayerId::with_check_char(&bytes).expect("digits are in the code charset")
}

/// The invoice code the demo's authority grants to seller `i` (12 digits).
pub fn invoice_code(i: u32) -> u64 {
    11_002_300_000 + u64::from(i) * 10 + 1
}

const STATIONS: [&str; 8] = [
    "北京南",
    "上海虹桥",
    "广州南",
    "深圳北",
    "杭州东",
    "南京南",
    "武汉",
    "成都东",
];

/// A ticket invoice for trip `n` of `prefix` sold by `seller`: one line, 9% VAT, the
/// declared amounts computed as the validator expects.
pub fn ticket_request(seller: TaxpayerId, prefix: &str, n: u64) -> IssueRequest {
    let from = STATIONS[(n % 8) as usize];
    let to = STATIONS[((n / 8 + 1 + n % 7) % 8) as usize];
    let train = 1 + n % 9_000;
    let unit_price_fen = 5_000 + (n * 7_919 % 150_000) as i64;
    let rate = TaxRate::from_bp(RAILWAY_RATE_BP).expect("9% is a legal rate");
    let tax = tax_fen(unit_price_fen, rate);
    IssueRequest {
        seller,
        order_id: format!("{prefix}{n:012}"),
        buyer_name: format!("旅客{}", n % 100_000),
        buyer_taxpayer: None,
        lines: vec![LineItem {
            name: format!("铁路客票 G{train} {from}-{to}"),
            quantity: 1,
            unit_price_fen,
        }],
        tax_rate: rate,
        issuer_ref: format!("G{train}"),
        amount_fen: unit_price_fen,
        tax_fen: tax,
        total_fen: unit_price_fen + tax,
        kind: InvoiceKind::Blue,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_core::validate::check_request;

    #[test]
    fn sellers_are_valid_and_distinct() {
        let a = seller(0);
        let b = seller(1);
        assert_ne!(a, b);
        assert_eq!(TaxpayerId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn requests_validate() {
        for n in 0..1_000 {
            let request = ticket_request(seller(n as u32 % 3), "T", n);
            check_request(&request).unwrap_or_else(|e| panic!("request {n}: {e}"));
        }
    }
}
