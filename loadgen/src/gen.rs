//! The request generator: synthetic railway invoices per the [`Mix`], red invoices
//! against invoices issued earlier in the run, and retries of earlier orders; grouped into
//! shard-homogeneous issue frames.
//!
//! Blue order `n` is a pure function of (prefix, mix, n), so a retry regenerates exactly
//! the request first sent. What the appliance answered for an order comes back from the
//! collector over a channel ([`Feedback`]) and feeds the retry and red pools: no shared
//! state between the generator and the verifier.

use std::collections::VecDeque;

use appliance_core::money::tax_fen;
use appliance_core::{InvoiceKind, IssueRequest, LineItem, RedReference, TaxRate, TaxpayerId};
use appliance_proto::{encode_request, FrameKind, Header, Issued, HEADER_BYTES};
use crossbeam_channel::Receiver;

use crate::scenario::Mix;

/// What the response to one invoice request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A new blue order: `Issued` with a number never seen before in the run.
    Fresh,
    /// A resend of an earlier order: `Replayed` with exactly this invoice.
    Retry(Issued),
    /// A red invoice: `Issued` with a new number.
    Red,
}

/// One invoice request of a frame, as the verifier needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Order index in the run (for a red invoice: its original's).
    pub order: u64,
    /// What the answer must be.
    pub expect: Expect,
}

/// An issued fresh blue order, sent back by the collector.
pub type Feedback = (u64, Issued);

/// A frame ready to send.
#[derive(Debug)]
pub struct Frame {
    /// Home shard of every request in it.
    pub shard: u16,
    /// The encoded issue frame.
    pub bytes: Vec<u8>,
    /// One slot per request, in frame order.
    pub slots: Vec<Slot>,
}

/// Most entries kept for retries and for red invoices; older ones are dropped. Bounded so
/// a long run does not grow without limit.
const POOL_MAX: usize = 1 << 16;

/// splitmix64: a cheap, well-mixed hash of the order index (deterministic content) and
/// the run's random stream (mix choices).
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
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

/// One shard's frame under construction: requests are encoded as they are generated.
#[derive(Default)]
struct Bucket {
    /// Header (filled in when the frame is taken) and the encoded requests.
    bytes: Vec<u8>,
    slots: Vec<Slot>,
    /// Size of this shard's previous frame: the next one's allocation, made once.
    last_bytes: usize,
}

/// Builds requests and frames.
pub struct Generator {
    sellers: Vec<TaxpayerId>,
    prefix: String,
    mix: Mix,
    rate: TaxRate,
    shard_count: u16,
    per_frame: usize,
    next_order: u64,
    rng: u64,
    retry_pool: Vec<Feedback>,
    retry_next: usize,
    red_pool: VecDeque<Feedback>,
    feedback: Option<Receiver<Feedback>>,
    buckets: Vec<Bucket>,
    /// The request being generated, rebuilt in place for every request so that its
    /// strings and lines keep their allocations (a fresh `IssueRequest` per invoice was
    /// five allocations and four `format!`s, the largest part of loadgen's CPU per
    /// invoice in bulk).
    scratch: IssueRequest,
    /// The order id being generated, as bytes (reused).
    order_id_buf: Vec<u8>,
    /// Requests put into frames, per kind: fresh, retry, red.
    pub generated: [u64; 3],
}

/// `value` in decimal, zero-padded to at least `width` ≤ 20 digits (as `{:0width$}`),
/// without the formatting machinery: the digits are `buf[start..]`.
fn decimal_digits(mut value: u64, width: usize) -> ([u8; 20], usize) {
    debug_assert!(width <= 20);
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        // `value % 10` < 10: the cast cannot truncate.
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    (digits, at.min(digits.len().saturating_sub(width)))
}

/// Appends `value` in decimal, zero-padded to at least `width` ≤ 20 digits.
fn push_decimal(out: &mut String, value: u64, width: usize) {
    let (digits, start) = decimal_digits(value, width);
    // ASCII digits are UTF-8: one push_str, not a char-by-char push (which encodes each
    // char and checks capacity, a measurable share of the bulk generator).
    out.push_str(std::str::from_utf8(&digits[start..]).unwrap_or_default());
}

/// [`push_decimal`] into bytes.
fn push_decimal_bytes(out: &mut Vec<u8>, value: u64, width: usize) {
    let (digits, start) = decimal_digits(value, width);
    out.extend_from_slice(&digits[start..]);
}

/// Longest order id prefix the direct blue encoder takes: with 20 digits the order id
/// stays below the encoding's 255-byte string limit (longer prefixes, which the appliance
/// refuses anyway, go through `encode_request`, which clamps exactly as it always has).
const FAST_PREFIX_BYTES_MAX: usize = 200;

impl Generator {
    /// A generator of frames of `per_frame` requests for `shard_count` shards; `feedback`
    /// delivers issued orders for retries and red invoices (None: neither is generated).
    pub fn new(
        sellers: Vec<TaxpayerId>,
        prefix: String,
        mix: Mix,
        shard_count: u16,
        per_frame: usize,
        seed: u64,
        feedback: Option<Receiver<Feedback>>,
    ) -> Generator {
        assert!(!sellers.is_empty() && shard_count > 0 && per_frame > 0);
        let rate = TaxRate::from_bp(mix.tax_rate_bp).expect("scenario validated the rate");
        let scratch = Self::empty_request(sellers[0], rate);
        Generator {
            sellers,
            prefix,
            mix,
            rate,
            shard_count,
            per_frame,
            next_order: 0,
            rng: seed,
            retry_pool: Vec::new(),
            retry_next: 0,
            red_pool: VecDeque::new(),
            feedback,
            buckets: (0..shard_count).map(|_| Bucket::default()).collect(),
            scratch,
            order_id_buf: Vec::new(),
            generated: [0; 3],
        }
    }

    /// A request with empty strings and no lines (allocates nothing), to be filled in.
    fn empty_request(seller: TaxpayerId, rate: TaxRate) -> IssueRequest {
        IssueRequest {
            seller,
            order_id: String::new(),
            buyer_name: String::new(),
            buyer_taxpayer: None,
            lines: Vec::new(),
            tax_rate: rate,
            issuer_ref: String::new(),
            amount_fen: 0,
            tax_fen: 0,
            total_fen: 0,
            kind: InvoiceKind::Blue,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(1);
        mix64(self.rng ^ 0x5EED)
    }

    fn chance(&mut self, share: f64) -> bool {
        // 53 random bits → [0, 1).
        share > 0.0 && ((self.random() >> 11) as f64 / (1u64 << 53) as f64) < share
    }

    /// The order id of blue order `n`.
    pub fn order_id(&self, n: u64) -> String {
        let mut id = String::with_capacity(self.prefix.len() + 12);
        self.push_order_id(&mut id, n);
        id
    }

    fn push_order_id(&self, out: &mut String, n: u64) {
        out.push_str(&self.prefix);
        push_decimal(out, n, 12);
    }

    /// Blue order `n`: deterministic in `n`.
    pub fn blue(&self, n: u64) -> IssueRequest {
        let mut request = Self::empty_request(self.sellers[0], self.rate);
        self.fill_blue(n, &mut request);
        request
    }

    /// Makes `r` blue order `n`, reusing its strings' and lines' allocations.
    fn fill_blue(&self, n: u64, r: &mut IssueRequest) {
        let h = mix64(n);
        let span = u64::from(self.mix.lines_max - self.mix.lines_min) + 1;
        let lines_count = (self.mix.lines_min as u64 + h % span) as usize;
        let price_span = (self.mix.price_max_fen - self.mix.price_min_fen) as u64 + 1;
        let train = 1 + (h >> 8) % 9_000;
        r.lines.truncate(lines_count);
        while r.lines.len() < lines_count {
            r.lines.push(LineItem {
                name: String::new(),
                quantity: 1,
                unit_price_fen: 0,
            });
        }
        let mut amount: i64 = 0;
        for (l, line) in r.lines.iter_mut().enumerate() {
            let hl = mix64(h ^ l as u64);
            let from = STATIONS[(hl % 8) as usize];
            let to = STATIONS[((hl >> 3) % 8) as usize];
            let unit_price_fen = self.mix.price_min_fen + ((hl >> 16) % price_span) as i64;
            amount += unit_price_fen;
            // "铁路客票 G{train} {from}-{to}"
            line.name.clear();
            line.name.push_str("铁路客票 G");
            push_decimal(&mut line.name, train, 0);
            line.name.push(' ');
            line.name.push_str(from);
            line.name.push('-');
            line.name.push_str(to);
            line.quantity = 1;
            line.unit_price_fen = unit_price_fen;
        }
        let tax = tax_fen(amount, self.rate);
        r.seller = self.sellers[(n % self.sellers.len() as u64) as usize];
        r.order_id.clear();
        self.push_order_id(&mut r.order_id, n);
        // "旅客{h % 100_000}"
        r.buyer_name.clear();
        r.buyer_name.push_str("旅客");
        push_decimal(&mut r.buyer_name, h % 100_000, 0);
        r.buyer_taxpayer = None;
        r.tax_rate = self.rate;
        // "G{train}"
        r.issuer_ref.clear();
        r.issuer_ref.push('G');
        push_decimal(&mut r.issuer_ref, train, 0);
        r.amount_fen = amount;
        r.tax_fen = tax;
        r.total_fen = amount + tax;
        r.kind = InvoiceKind::Blue;
    }

    /// The red invoice offsetting blue order `n` (issued as `original`) in full.
    pub fn red(&self, n: u64, original: &Issued) -> IssueRequest {
        let blue = self.blue(n);
        let lines: Vec<LineItem> = blue
            .lines
            .iter()
            .map(|l| LineItem {
                name: l.name.clone(),
                quantity: l.quantity,
                unit_price_fen: -l.unit_price_fen,
            })
            .collect();
        let amount = -blue.amount_fen;
        let tax = tax_fen(amount, self.rate);
        IssueRequest {
            seller: blue.seller,
            order_id: format!("{}R{n:012}", self.prefix),
            buyer_name: blue.buyer_name,
            buyer_taxpayer: None,
            lines,
            tax_rate: self.rate,
            issuer_ref: blue.issuer_ref,
            amount_fen: amount,
            tax_fen: tax,
            total_fen: amount + tax,
            kind: InvoiceKind::Red(RedReference {
                original_code: original.identity.code,
                original_number: original.identity.number,
                original_order_id: blue.order_id,
            }),
        }
    }

    fn drain_feedback(&mut self) {
        let Some(rx) = &self.feedback else { return };
        for (n, issued) in rx.try_iter() {
            if self.mix.retry_share > 0.0 {
                if self.retry_pool.len() < POOL_MAX {
                    self.retry_pool.push((n, issued));
                } else {
                    // Overwrite the oldest-ish entry: retries spread over recent orders.
                    let at = self.retry_next % POOL_MAX;
                    self.retry_pool[at] = (n, issued);
                    self.retry_next = self.retry_next.wrapping_add(1);
                }
            }
            if self.mix.red_share > 0.0 {
                if self.red_pool.len() >= POOL_MAX {
                    self.red_pool.pop_front();
                }
                self.red_pool.push_back((n, issued));
            }
        }
    }

    /// Appends blue order `n` to `out` exactly as `encode_request(out, &self.blue(n))`
    /// would (a test pins the two byte for byte), straight from `n`: no request, no
    /// strings. `order_id` is `self.order_id(n)`'s bytes. Bulk generation was a quarter of
    /// loadgen's CPU through `IssueRequest` and `encode_request`.
    fn encode_blue(&self, n: u64, order_id: &[u8], out: &mut Vec<u8>) {
        let h = mix64(n);
        let span = u64::from(self.mix.lines_max - self.mix.lines_min) + 1;
        let lines_count = self.mix.lines_min as u64 + h % span;
        let price_span = (self.mix.price_max_fen - self.mix.price_min_fen) as u64 + 1;
        let train = 1 + (h >> 8) % 9_000;
        let seller = self.sellers[(n % self.sellers.len() as u64) as usize];
        let at = out.len();
        // Item length, patched at the end.
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(seller.as_bytes());
        out.extend_from_slice(&self.rate.bp().to_le_bytes());
        out.push(0); // blue
        out.push(0); // no buyer taxpayer id
                     // amount, tax, total: patched once the lines are summed.
        let amounts_at = out.len();
        out.extend_from_slice(&[0; 24]);
        out.push(order_id.len() as u8);
        out.extend_from_slice(order_id);
        // buyer name "旅客{h % 100_000}"
        let len_at = out.len();
        out.push(0);
        out.extend_from_slice("旅客".as_bytes());
        push_decimal_bytes(out, h % 100_000, 0);
        out[len_at] = (out.len() - len_at - 1) as u8;
        // issuer ref "G{train}"
        let len_at = out.len();
        out.push(0);
        out.push(b'G');
        push_decimal_bytes(out, train, 0);
        out[len_at] = (out.len() - len_at - 1) as u8;
        // Scenario validation bounds lines_max to 16: the count fits a byte.
        out.push(lines_count as u8);
        let mut amount: i64 = 0;
        for l in 0..lines_count {
            let hl = mix64(h ^ l);
            let from = STATIONS[(hl % 8) as usize];
            let to = STATIONS[((hl >> 3) % 8) as usize];
            let unit_price_fen = self.mix.price_min_fen + ((hl >> 16) % price_span) as i64;
            amount += unit_price_fen;
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&unit_price_fen.to_le_bytes());
            // "铁路客票 G{train} {from}-{to}"
            let len_at = out.len();
            out.push(0);
            out.extend_from_slice("铁路客票 G".as_bytes());
            push_decimal_bytes(out, train, 0);
            out.push(b' ');
            out.extend_from_slice(from.as_bytes());
            out.push(b'-');
            out.extend_from_slice(to.as_bytes());
            out[len_at] = (out.len() - len_at - 1) as u8;
        }
        let tax = tax_fen(amount, self.rate);
        out[amounts_at..amounts_at + 8].copy_from_slice(&amount.to_le_bytes());
        out[amounts_at + 8..amounts_at + 16].copy_from_slice(&tax.to_le_bytes());
        out[amounts_at + 16..amounts_at + 24].copy_from_slice(&(amount + tax).to_le_bytes());
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The home shard of (seller of blue order `n`, `order_id`): `appliance_proto::home_shard`
    /// of that request, without building it (pinned to it by a test).
    fn blue_home(&self, n: u64, order_id: &[u8]) -> usize {
        if self.shard_count == 1 {
            return 0;
        }
        let seller = &self.sellers[(n % self.sellers.len() as u64) as usize];
        let order_id = std::str::from_utf8(order_id).unwrap_or_default();
        let high = (appliance_core::idempotency::key_fingerprint(seller, order_id) >> 64) as u64;
        ((u128::from(high) * u128::from(self.shard_count)) >> 64) as usize
    }

    /// The next request's slot; for a red invoice also the request, built in full.
    fn next_choice(&mut self) -> (Slot, Option<IssueRequest>) {
        self.drain_feedback();
        if !self.retry_pool.is_empty() && self.chance(self.mix.retry_share) {
            let pick = (self.random() % self.retry_pool.len() as u64) as usize;
            let (n, issued) = self.retry_pool[pick];
            let slot = Slot {
                order: n,
                expect: Expect::Retry(issued),
            };
            return (slot, None);
        }
        if !self.red_pool.is_empty() && self.chance(self.mix.red_share) {
            // Each original is offset once: taken out of the pool for good.
            let (n, issued) = self.red_pool.pop_front().expect("not empty");
            let slot = Slot {
                order: n,
                expect: Expect::Red,
            };
            // Red invoices are a small share: built afresh (allocations and all).
            return (slot, Some(self.red(n, &issued)));
        }
        let n = self.next_order;
        self.next_order += 1;
        let slot = Slot {
            order: n,
            expect: Expect::Fresh,
        };
        (slot, None)
    }

    /// Makes `r` the next request; returns its slot.
    fn next_request_into(&mut self, r: &mut IssueRequest) -> Slot {
        self.drain_feedback();
        if !self.retry_pool.is_empty() && self.chance(self.mix.retry_share) {
            let pick = (self.random() % self.retry_pool.len() as u64) as usize;
            let (n, issued) = self.retry_pool[pick];
            self.fill_blue(n, r);
            return Slot {
                order: n,
                expect: Expect::Retry(issued),
            };
        }
        if !self.red_pool.is_empty() && self.chance(self.mix.red_share) {
            // Each original is offset once: taken out of the pool for good.
            let (n, issued) = self.red_pool.pop_front().expect("not empty");
            // Red invoices are a small share: built afresh (allocations and all).
            *r = self.red(n, &issued);
            return Slot {
                order: n,
                expect: Expect::Red,
            };
        }
        let n = self.next_order;
        self.next_order += 1;
        self.fill_blue(n, r);
        Slot {
            order: n,
            expect: Expect::Fresh,
        }
    }

    /// The next request and its slot.
    pub fn next_request(&mut self) -> (IssueRequest, Slot) {
        let mut request = Self::empty_request(self.sellers[0], self.rate);
        let slot = self.next_request_into(&mut request);
        (request, slot)
    }

    /// The next frame: `per_frame` requests that share a home shard.
    pub fn next_frame(&mut self) -> Frame {
        let shard = loop {
            if let Some(full) = self
                .buckets
                .iter()
                .position(|b| b.slots.len() >= self.per_frame)
            {
                break full;
            }
            let (slot, red) = self.next_choice();
            let mut order_id = std::mem::take(&mut self.order_id_buf);
            let home = match &red {
                Some(request) => {
                    if self.shard_count == 1 {
                        0
                    } else {
                        appliance_proto::home_shard(request, u32::from(self.shard_count)) as usize
                    }
                }
                None => {
                    order_id.clear();
                    order_id.extend_from_slice(self.prefix.as_bytes());
                    push_decimal_bytes(&mut order_id, slot.order, 12);
                    self.blue_home(slot.order, &order_id)
                }
            };
            let per_frame = self.per_frame;
            let bucket = &mut self.buckets[home];
            if bucket.slots.is_empty() {
                let hint = bucket.last_bytes.max(HEADER_BYTES + 192 * per_frame);
                bucket.bytes = Vec::with_capacity(hint);
                bucket.slots = Vec::with_capacity(per_frame);
                // The header is written when the frame is taken, its count known.
                bucket.bytes.resize(HEADER_BYTES, 0);
            }
            let mut bytes = std::mem::take(&mut bucket.bytes);
            match &red {
                Some(request) => encode_request(&mut bytes, request),
                None if self.prefix.len() <= FAST_PREFIX_BYTES_MAX => {
                    self.encode_blue(slot.order, &order_id, &mut bytes)
                }
                None => {
                    let mut request = std::mem::replace(
                        &mut self.scratch,
                        Self::empty_request(self.sellers[0], self.rate),
                    );
                    self.fill_blue(slot.order, &mut request);
                    encode_request(&mut bytes, &request);
                    self.scratch = request;
                }
            }
            self.order_id_buf = order_id;
            let bucket = &mut self.buckets[home];
            bucket.bytes = bytes;
            bucket.slots.push(slot);
        };
        let bucket = &mut self.buckets[shard];
        let mut bytes = std::mem::take(&mut bucket.bytes);
        let slots = std::mem::take(&mut bucket.slots);
        bucket.last_bytes = bytes.len();
        // Counted as the frame leaves: requests still in other shards' buckets were not
        // put into a frame (the end-of-run counts compare with what the appliance issued).
        for slot in &slots {
            self.generated[match slot.expect {
                Expect::Fresh => 0,
                Expect::Retry(_) => 1,
                Expect::Red => 2,
            }] += 1;
        }
        let header = Header {
            kind: FrameKind::Issue,
            count: slots.len() as u32,
            body_bytes: (bytes.len() - HEADER_BYTES) as u32,
        };
        bytes[..HEADER_BYTES].copy_from_slice(&header.encode());
        Frame {
            shard: shard as u16,
            bytes,
            slots,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_core::validate::check_request;
    use appliance_core::{InvoiceCode, InvoiceIdentity, InvoiceNumber};
    use appliance_server::workload::seller;

    fn generator(mix: Mix, shards: u16, per_frame: usize) -> Generator {
        Generator::new(
            (0..3).map(seller).collect(),
            "T".into(),
            mix,
            shards,
            per_frame,
            7,
            None,
        )
    }

    #[test]
    fn requests_validate_and_are_deterministic() {
        let mix = Mix {
            lines_min: 1,
            lines_max: 16,
            ..Mix::default()
        };
        let g = generator(mix, 1, 1);
        for n in 0..2_000 {
            let r = g.blue(n);
            check_request(&r).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(r, g.blue(n));
            let issued = Issued {
                identity: InvoiceIdentity {
                    code: InvoiceCode::new(44_031_900_111).unwrap(),
                    number: InvoiceNumber::new(1).unwrap(),
                },
                issue_time_ms: 0,
                tax_control_code: [1; 32],
                check_code: [b'0'; 20],
            };
            let red = g.red(n, &issued);
            check_request(&red).unwrap_or_else(|e| panic!("red {n}: {e}"));
            assert_eq!(red.total_fen, -r.total_fen);
        }
    }

    /// Blue order `n` as the generator built it with `format!` before it filled one
    /// request in place and then encoded straight to bytes: the reference both must match.
    fn reference_blue(g: &Generator, n: u64) -> IssueRequest {
        let h = mix64(n);
        let seller = g.sellers[(n % g.sellers.len() as u64) as usize];
        let span = u64::from(g.mix.lines_max - g.mix.lines_min) + 1;
        let lines_count = g.mix.lines_min as u64 + h % span;
        let price_span = (g.mix.price_max_fen - g.mix.price_min_fen) as u64 + 1;
        let train = 1 + (h >> 8) % 9_000;
        let mut lines = Vec::new();
        let mut amount: i64 = 0;
        for l in 0..lines_count {
            let hl = mix64(h ^ l);
            let from = STATIONS[(hl % 8) as usize];
            let to = STATIONS[((hl >> 3) % 8) as usize];
            let unit_price_fen = g.mix.price_min_fen + ((hl >> 16) % price_span) as i64;
            amount += unit_price_fen;
            lines.push(LineItem {
                name: format!("铁路客票 G{train} {from}-{to}"),
                quantity: 1,
                unit_price_fen,
            });
        }
        let tax = tax_fen(amount, g.rate);
        IssueRequest {
            seller,
            order_id: format!("{}{n:012}", g.prefix),
            buyer_name: format!("旅客{}", h % 100_000),
            buyer_taxpayer: None,
            lines,
            tax_rate: g.rate,
            issuer_ref: format!("G{train}"),
            amount_fen: amount,
            tax_fen: tax,
            total_fen: amount + tax,
            kind: InvoiceKind::Blue,
        }
    }

    #[test]
    fn decimals_match_format() {
        for v in [
            0u64,
            7,
            10,
            99_999,
            123_456_789_012,
            1_234_567_890_123,
            u64::MAX,
        ] {
            for width in [0usize, 1, 5, 12, 19, 20] {
                let mut s = String::from("x");
                push_decimal(&mut s, v, width);
                assert_eq!(s, format!("x{v:0width$}"), "{v} {width}");
                let mut b = b"x".to_vec();
                push_decimal_bytes(&mut b, v, width);
                assert_eq!(b, s.as_bytes(), "{v} {width}");
            }
        }
    }

    #[test]
    fn direct_encoding_is_encode_request_of_the_reference_request() {
        let mixes = [
            Mix::default(),
            Mix {
                lines_min: 1,
                lines_max: 16,
                price_min_fen: 0,
                price_max_fen: 10_000_000,
                tax_rate_bp: 1300,
                ..Mix::default()
            },
        ];
        for (i, mix) in mixes.into_iter().enumerate() {
            for shards in [1u16, 2, 5] {
                let g = Generator::new(
                    (0..3).map(seller).collect(),
                    format!("LG{i}-"),
                    mix.clone(),
                    shards,
                    4,
                    7,
                    None,
                );
                // In place over one request: stale lines and strings must not leak.
                let mut reused = g.blue(5);
                for n in (0..3_000).chain([999_999_999_999, 1_000_000_000_000, u64::MAX / 3]) {
                    let reference = reference_blue(&g, n);
                    g.fill_blue(n, &mut reused);
                    assert_eq!(reused, reference, "fill_blue {n}");
                    assert_eq!(g.blue(n), reference, "blue {n}");
                    let mut expected = vec![1, 2, 3];
                    encode_request(&mut expected, &reference);
                    let order_id = g.order_id(n);
                    assert_eq!(order_id, reference.order_id);
                    let mut direct = vec![1, 2, 3];
                    g.encode_blue(n, order_id.as_bytes(), &mut direct);
                    assert_eq!(direct, expected, "encode_blue {n}");
                    assert_eq!(
                        g.blue_home(n, order_id.as_bytes()),
                        appliance_proto::home_shard(&reference, u32::from(shards)) as usize,
                        "home of {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn long_prefixes_take_the_request_path_and_frames_still_decode() {
        let prefix = "P".repeat(FAST_PREFIX_BYTES_MAX + 1);
        let mut g = Generator::new(vec![seller(0)], prefix, Mix::default(), 2, 3, 1, None);
        for _ in 0..10 {
            let frame = g.next_frame();
            let (header, body) = appliance_proto::split_frame(&frame.bytes).unwrap();
            let items = appliance_proto::split_items(body, header.count).unwrap();
            for (item, slot) in items.iter().zip(&frame.slots) {
                let mut expected = Vec::new();
                encode_request(&mut expected, &g.blue(slot.order));
                assert_eq!(&expected[4..], *item);
            }
        }
    }

    #[test]
    fn frames_are_shard_homogeneous_and_decode() {
        let mut g = generator(Mix::default(), 3, 10);
        let mut orders = std::collections::HashSet::new();
        for i in 0..30u64 {
            let frame = g.next_frame();
            // Only requests in frames handed out count, not those left in other buckets.
            assert_eq!(g.generated.iter().sum::<u64>(), 10 * (i + 1));
            let (header, body) = appliance_proto::split_frame(&frame.bytes).unwrap();
            assert_eq!(header.count, 10);
            let items = appliance_proto::split_items(body, header.count).unwrap();
            for (item, slot) in items.iter().zip(&frame.slots) {
                let r = appliance_proto::decode_request(item).unwrap();
                assert_eq!(appliance_proto::home_shard(&r, 3), u32::from(frame.shard));
                assert_eq!(r, g.blue(slot.order));
                assert!(orders.insert(slot.order), "order twice");
            }
        }
    }

    #[test]
    fn retries_and_reds_come_from_feedback() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mix = Mix {
            retry_share: 0.3,
            red_share: 0.2,
            ..Mix::default()
        };
        let mut g = Generator::new(vec![seller(0)], "T".into(), mix, 1, 1, 3, Some(rx));
        let mut reds = std::collections::HashSet::new();
        for i in 0..5_000u32 {
            let frame = g.next_frame();
            let slot = frame.slots[0];
            let (_, body) = appliance_proto::split_frame(&frame.bytes).unwrap();
            let item = appliance_proto::split_items(body, 1).unwrap()[0];
            let request = appliance_proto::decode_request(item).unwrap();
            match slot.expect {
                Expect::Fresh => {
                    let issued = Issued {
                        identity: InvoiceIdentity {
                            code: InvoiceCode::new(44_031_900_111).unwrap(),
                            number: InvoiceNumber::new(i + 1).unwrap(),
                        },
                        issue_time_ms: 0,
                        tax_control_code: [0; 32],
                        check_code: [b'1'; 20],
                    };
                    tx.send((slot.order, issued)).unwrap();
                }
                Expect::Retry(_) => assert_eq!(request, g.blue(slot.order)),
                Expect::Red => {
                    assert!(request.is_red());
                    assert!(reds.insert(slot.order), "original offset twice");
                }
            }
        }
        assert!(
            g.generated[1] > 1_000 && g.generated[2] > 500,
            "{:?}",
            g.generated
        );
    }
}
