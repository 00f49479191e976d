//! The issuance core's CPU cost per invoice: `Issuer::begin_tick` (validation, idempotency
//! lookup, number take, canonical encode) + `finish_tick` with precomputed fake tax codes
//! (journal record encode, index insert, answers) + padding the commit to 4 KiB, at batch
//! sizes 1, 64 and 1,000. Target (docs/design/foundation.md): ≤ 1 µs per invoice at 1,000.
//!
//! `new_invoices_8m` repeats the batch-1,000 case with a production-sized index (8 Mi
//! orders per shard, half full: 64 MiB of table and 448 MiB of ring), where every lookup,
//! insert and expiry misses the caches.
//!
//! The tax server and the disk are not in this figure on purpose: they are measured by
//! `tax_code`, `hsm_tcp` and `journal_commit`, and the budget keeps them separate.

mod common;

use std::time::{Duration, Instant};

use appliance_core::journal::frame::pad_to_block;
use appliance_core::{
    InvoiceNumber, IssueRequest, Issuer, IssuerConfig, NumberSegment, Outcome, TaxCodeResult,
    TaxpayerConfig,
};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

/// Orders the index remembers in steady state: the idempotency lookup of a real shard
/// probes a table far larger than the caches, so an almost empty index would flatter it.
/// The fake clock advances 1 ms per invoice and retention is 1,000 s, so ~1M orders stay.
const INDEX_ORDERS_STEADY: u64 = 1_000_000;
/// Power of two above the steady population plus one second of expiry granularity
/// (issue times are stored in whole seconds).
const INDEX_CAPACITY_ORDERS: u32 = 1 << 21;
/// The production capacity per shard (docs/operations.md), and the half of it that
/// stays remembered in `new_invoices_8m` (retention in ms = orders, as above).
const INDEX_CAPACITY_ORDERS_PRODUCTION: u32 = 1 << 23;
const INDEX_ORDERS_STEADY_PRODUCTION: u64 = 1 << 22;
/// Numbers per segment fed to the pool (a fresh invoice code per segment keeps every
/// segment valid however long criterion runs).
const SEGMENT_NUMBERS: u32 = 50_000_000;
/// Requests generated ahead of a timed run: building `IssueRequest`s (string formatting)
/// is the caller's cost, not the core's, so it happens outside the clock in chunks.
const CHUNK_REQUESTS: u64 = 64_000;
const JOURNAL_BLOCK_BYTES: usize = 4096;
/// Largest tick: the batch-1,000 case and the prefill.
const TICK_REQUESTS_MAX: usize = 1_000;

/// An issuer kept fed with segments and distinct orders, so that every request of every
/// tick is a new invoice.
struct Fed {
    issuer: Issuer,
    /// Orders the index holds in steady state (see [`INDEX_ORDERS_STEADY`]).
    orders_steady: u64,
    numbers_left: u64,
    segments_added: u64,
    next_order: u64,
    now_ms: u64,
    journal: Vec<u8>,
    codes: Vec<TaxCodeResult>,
}

impl Fed {
    fn new() -> Self {
        Self::sized(INDEX_CAPACITY_ORDERS, INDEX_ORDERS_STEADY)
    }

    /// An issuer whose index holds `capacity_orders` and keeps `orders_steady` of them.
    fn sized(capacity_orders: u32, orders_steady: u64) -> Self {
        let config = IssuerConfig {
            shard_id: 0,
            taxpayers: vec![TaxpayerConfig {
                id: common::bench_seller(),
                ceiling_fen: 1_000_000_000,
                // The bench adds segments itself; no refill requests needed.
                low_watermark: 0,
                refill_count: SEGMENT_NUMBERS,
            }],
            // The clock advances 1 ms per invoice.
            retention_ms: orders_steady,
            index_capacity_orders: capacity_orders,
            tick_requests_max: TICK_REQUESTS_MAX as u32,
        };
        // Fake codes: the core does not verify them (the tax server is trusted), so one
        // precomputed set serves every tick (sized for the prefill's ticks of 1,000).
        let codes = (0..TICK_REQUESTS_MAX)
            .map(|i| {
                let mut check = *b"00000000000000000000";
                check[12..].copy_from_slice(format!("{i:08}").as_bytes());
                Ok(([i as u8; 32], check))
            })
            .collect();
        Fed {
            issuer: Issuer::new(config).expect("valid config"),
            orders_steady,
            numbers_left: 0,
            segments_added: 0,
            next_order: 0,
            now_ms: 1_790_000_000_000,
            journal: Vec::with_capacity(TICK_REQUESTS_MAX * 512 + JOURNAL_BLOCK_BYTES),
            codes,
        }
    }

    fn requests(&mut self, count: usize) -> Vec<IssueRequest> {
        let out = (0..count as u64)
            .map(|i| common::request(self.next_order + i))
            .collect();
        self.next_order += count as u64;
        out
    }

    /// One tick as the shard runs it, minus I/O. Returns the journal bytes of the commit.
    fn tick(&mut self, requests: Vec<IssueRequest>) -> usize {
        if self.numbers_left < requests.len() as u64 {
            let code =
                appliance_core::InvoiceCode::new(common::bench_code().get() + self.segments_added)
                    .expect("valid code");
            let segment =
                NumberSegment::new(code, InvoiceNumber::new(1).expect("valid"), SEGMENT_NUMBERS)
                    .expect("valid segment");
            self.issuer
                .add_segment(&common::bench_seller(), segment)
                .expect("segment accepted");
            self.segments_added += 1;
            self.numbers_left += u64::from(SEGMENT_NUMBERS);
        }
        self.now_ms += requests.len() as u64;
        let count = requests.len();
        let tick = self
            .issuer
            .begin_tick(self.now_ms, requests)
            .expect("tick starts");
        debug_assert!(tick
            .outcomes()
            .iter()
            .all(|o| matches!(o, Outcome::NeedsTaxCode { .. })));
        let n = tick.item_count();
        self.journal.clear();
        let commit = self
            .issuer
            .finish_tick(tick, &self.codes[..n], &mut self.journal)
            .expect("tick finishes");
        pad_to_block(&mut self.journal, JOURNAL_BLOCK_BYTES);
        self.numbers_left -= n as u64;
        assert_eq!(commit.answers.len(), count);
        self.journal.len()
    }

    /// Brings the index to its steady population before anything is timed.
    fn prefill(&mut self) {
        while self.next_order < self.orders_steady {
            let requests = self.requests(TICK_REQUESTS_MAX);
            self.tick(requests);
        }
    }

    /// Runs `ticks` ticks of `batch` requests and returns the time spent inside them.
    fn timed_ticks(&mut self, ticks: u64, batch: usize) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = ticks;
        let chunk_ticks = (CHUNK_REQUESTS / batch as u64).max(1);
        while left > 0 {
            let now = left.min(chunk_ticks);
            let chunk: Vec<Vec<IssueRequest>> = (0..now).map(|_| self.requests(batch)).collect();
            let start = Instant::now();
            // The requests move into the tick and from there into the answers, which
            // `tick` drops inside the clock (as it dropped their clones before).
            for requests in chunk {
                criterion::black_box(self.tick(requests));
            }
            total += start.elapsed();
            left -= now;
        }
        total
    }
}

fn new_invoices(c: &mut Criterion) {
    let mut group = c.benchmark_group("core_tick/new_invoices");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for batch in [1usize, 64, 1_000] {
        let mut fed = Fed::new();
        fed.prefill();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_custom(|iters| fed.timed_ticks(iters, batch))
        });
    }
    group.finish();
}

/// `new_invoices/1000` against a production-sized index.
fn new_invoices_8m(c: &mut Criterion) {
    const BATCH: usize = 1_000;
    let mut group = c.benchmark_group("core_tick/new_invoices_8m");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    // Prefilled here, not lazily in the routine: criterion's warm-up counts the wall
    // time of the routine's calls, so a prefill inside the first call makes it estimate
    // seconds per tick and take one tick per sample. The cost is that every run of this
    // binary, whatever its filter, allocates the 512 MiB and prefills them (seconds).
    let mut fed = Fed::sized(
        INDEX_CAPACITY_ORDERS_PRODUCTION,
        INDEX_ORDERS_STEADY_PRODUCTION,
    );
    fed.prefill();
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(BenchmarkId::from_parameter(BATCH), |b| {
        b.iter_custom(|iters| fed.timed_ticks(iters, BATCH))
    });
    group.finish();
}

/// Every request already issued: begin_tick answers them all from the idempotency index
/// (a client retrying a whole batch), finish_tick journals nothing.
fn replays(c: &mut Criterion) {
    const BATCH: usize = 1_000;
    let mut group = c.benchmark_group("core_tick/replays");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut fed = Fed::new();
    fed.prefill();
    // The last 1,000 orders of the prefill: issued and remembered.
    let requests: Vec<IssueRequest> = (fed.next_order - BATCH as u64..fed.next_order)
        .map(common::request)
        .collect();
    let now_ms = fed.now_ms;
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(BenchmarkId::from_parameter(BATCH), |b| {
        // The tick takes its requests by value: each iteration gets a copy made outside
        // the clock (per iteration, so that it is as cache-warm as the borrowed slice
        // was); dropping the replayed requests is now inside finish_tick.
        b.iter_batched(
            || requests.clone(),
            |requests| {
                let tick = fed
                    .issuer
                    .begin_tick(now_ms, requests)
                    .expect("tick starts");
                debug_assert!(tick
                    .outcomes()
                    .iter()
                    .all(|o| matches!(o, Outcome::Replay { .. })));
                fed.journal.clear();
                let commit = fed
                    .issuer
                    .finish_tick(tick, &[], &mut fed.journal)
                    .expect("tick finishes");
                assert_eq!(commit.answers.len(), BATCH);
                commit
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, new_invoices, replays, new_invoices_8m);
criterion_main!(benches);
