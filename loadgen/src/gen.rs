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
    /// Requests put into frames, per kind: fresh, retry, red.
    pub generated: [u64; 3],
}

/// Appends `value` in decimal, zero-padded to at least `width` digits (as `{:0width$}`),
/// without the formatting machinery.
fn push_decimal(out: &mut String, mut value: u64, width: usize) {
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
    let start = at.min(digits.len().saturating_sub(width));
    // ASCII digits are UTF-8: one push_str, not a char-by-char push (which encodes each
    // char and checks capacity, a measurable share of the bulk generator).
    out.push_str(std::str::from_utf8(&digits[start..]).unwrap_or_default());
}

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
            // The scratch request is taken out while `self` fills it, and put back.
            let mut request = std::mem::replace(
                &mut self.scratch,
                Self::empty_request(self.sellers[0], self.rate),
            );
            let slot = self.next_request_into(&mut request);
            let home = if self.shard_count == 1 {
                0
            } else {
                appliance_proto::home_shard(&request, u32::from(self.shard_count)) as usize
            };
            let bucket = &mut self.buckets[home];
            if bucket.slots.is_empty() {
                let hint = bucket.last_bytes.max(HEADER_BYTES + 192 * self.per_frame);
                bucket.bytes = Vec::with_capacity(hint);
                bucket.slots = Vec::with_capacity(self.per_frame);
                // The header is written when the frame is taken, its count known.
                bucket.bytes.resize(HEADER_BYTES, 0);
            }
            encode_request(&mut bucket.bytes, &request);
            bucket.slots.push(slot);
            self.generated[match slot.expect {
                Expect::Fresh => 0,
                Expect::Retry(_) => 1,
                Expect::Red => 2,
            }] += 1;
            self.scratch = request;
        };
        let bucket = &mut self.buckets[shard];
        let mut bytes = std::mem::take(&mut bucket.bytes);
        let slots = std::mem::take(&mut bucket.slots);
        bucket.last_bytes = bytes.len();
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

    #[test]
    fn frames_are_shard_homogeneous_and_decode() {
        let mut g = generator(Mix::default(), 3, 10);
        let mut orders = std::collections::HashSet::new();
        for _ in 0..30 {
            let frame = g.next_frame();
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
