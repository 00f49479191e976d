//! The issuer of one shard: the tick state machine that turns a batch of requests into
//! one TaxCodes command for the tax server and one journal write.
//!
//! ```text
//! begin_tick(now_ms, requests) -> Tick     validate, idempotency lookup, take numbers,
//!                                          canonical bytes for ONE TaxCodes command,
//!                                          refill requests; the tick owns the requests
//! finish_tick(tick, tax codes, journal)    journal records (control records first, then
//!     -> Commit                            one Issued or NumberSpoiled per taken number,
//!                                          consecutive seqs), answers to release once the
//!                                          journal bytes are durable; each issued request
//!                                          moves into its `Invoice`
//! abort_tick(tick) -> requests             the TaxCodes command failed as a whole: every
//!                                          number is spoiled (journaled NumberSpoiled in
//!                                          the next commit, never reused), no invoice is
//!                                          journaled, the requests come back
//! cancel_tick(tick) -> requests            the newest tick, its command never sent: the
//!                                          numbers go back, as if it never began
//! ```
//!
//! Design decisions (docs/design/foundation.md is the contract):
//! * Idempotency entries are inserted at `finish_tick`, when the records get their
//!   sequence numbers, not at `begin_tick`. Until then a tick's new orders are in its
//!   in-flight map (kept by the issuer): a duplicate in the same tick gets the first
//!   one's answer, and a duplicate in a later tick begun meanwhile waits for it
//!   ([`Outcome::AwaitsEarlierTick`]) instead of taking a second number. Abort therefore
//!   has no index entry to roll back, which makes it exact by construction. Capacity for
//!   the new entries of every tick in flight is checked at `begin_tick`.
//! * Up to [`TICKS_IN_FLIGHT_MAX`] ticks may be in flight, so that the shell can send a
//!   tick's TaxCodes command while the previous one's is still out. They finish in the
//!   order they began (sequence numbers and journal order follow take order).
//! * A number the tax server refuses for one item (per-item status) is journaled as
//!   `NumberSpoiled` and never reused: the device has seen canonical bytes under that
//!   number, so handing the number to another invoice could make two different invoices
//!   claim it. The request is answered `TaxCodeRefused`; a retry takes a fresh number.
//! * An aborted tick spoils every number it took, for the same reason: a TaxCodes command
//!   that failed as a whole (timeout, connection lost, an answer that does not fit) may
//!   still have been executed by the device, so each number may already be coded for
//!   this tick's invoice. Aborted numbers never go back to a pool; they are journaled
//!   `NumberSpoiled` (reason `CommandFailed`). Their records must follow every earlier
//!   number in the journal (recovery requires each segment's numbers in take order), so
//!   they are queued with the control records once no earlier tick is in flight: at
//!   once for the oldest tick, else when the ticks before it have ended. Later ticks are
//!   unaffected and finish normally; a later request that waited for one of the aborted
//!   tick's orders is answered `TaxCodeRefused(CommandFailed)` (retryable: its retry
//!   takes a fresh number). Only [`Issuer::cancel_tick`], for the newest tick whose
//!   command was never sent, gives numbers back (in reverse take order, so exactly).
//! * A check code that is not 20 ASCII digits is treated like a refused item, because an
//!   invoice carrying it could not be verified.
//! * Time never goes backwards inside a shard: a tick's time is the larger of its
//!   `now_ms` and every earlier tick's time (a wall clock stepped back by NTP gives the
//!   next invoices the last time seen). Issue times are therefore non-decreasing in
//!   journal order, which is what lets recovery expire the idempotency index exactly as
//!   the live issuer did (an empty tick that expired orders is followed only by records
//!   at least as late).
//! * Control records (segment reserved/returned, upload watermark, batch root, and the
//!   aborted ticks' `NumberSpoiled`) queue up in the order they happen and are written
//!   first in the next commit, so a segment's `SegmentReserved` always precedes the first
//!   record of its numbers and a `SegmentReturned` follows the spoiled numbers before it.
//!   They survive an aborted tick.
//! * The index's fill is reported in steps ([`IndexFill`]: 80 %, 95 %, full) through
//!   [`Issuer::index_fill_change`], which the shell calls once per tick and logs: the
//!   core stays sans-IO and adds nothing per request (a refusal only sets a flag).
//! * The tick takes the requests by value and moves each issued one into its `Invoice`:
//!   cloning it instead (5 heap allocations per invoice) was the largest single cost of
//!   the core (docs/PERFORMANCE.md, section 1).
//!
//! # Files
//! * `mod.rs` (here): the [`Issuer`] struct and its construction, configuration
//!   ([`IssuerConfig`], [`TaxpayerConfig`], bounds), errors ([`ConfigError`],
//!   [`TickError`], [`ControlError`]), accessors and index fill reporting
//!   ([`Issuer::index_fill_change`]), what the issuer keeps of each tick in flight
//!   (`InFlight`, `Resolved`: fields of the issuer, so every file below reaches them
//!   without wider visibility), and the test helpers the other files share.
//! * `tick.rs`: the tick state machine: [`Tick`], [`Outcome`], [`Answer`], [`Commit`],
//!   [`Issuer::begin_tick`], [`Issuer::finish_tick`], [`Issuer::abort_tick`],
//!   [`Issuer::cancel_tick`], and how ticks in flight wait for, abort and end after one
//!   another.
//! * `control.rs`: control records (segments added, adopted and returned, upload
//!   watermark, batch roots) and start-up reconciliation ([`Issuer::spoil_coded`]).
//! * [`red`]: the cross-shard claim on a red invoice's original.

mod control;
pub mod red;
mod tick;

pub use tick::{Answer, Commit, Outcome, TaxCodeResult, Tick};

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasherDefault;

use crate::idempotency::{FingerprintMap, IdempotencyIndex, IndexFill, TaxpayerIdHasher};
use crate::invoice::InvoiceIdentity;
use crate::journal::record::Record;
use crate::pool::{NumberAccounting, Pool, PoolError};
use crate::taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};
use crate::validate::ItemError;

/// Default retention of the idempotency index: 35 days.
pub const RETENTION_MS_DEFAULT: u64 = 35 * 24 * 3600 * 1000;
/// Taxpayers one shard may serve.
pub const TAXPAYERS_MAX: usize = 4096;
/// Upper bound of `tick_requests_max`: the tax server's batch and the journal write stay
/// bounded (8,192 × < 2.6 KiB ≈ 21 MiB worst case, ~3 MiB typical).
pub const TICK_REQUESTS_MAX: u32 = 8192;
/// Control records queued between commits.
pub const CONTROL_RECORDS_MAX: usize = 1024;
/// Ticks in flight at once (begun, neither finished nor aborted). Two already overlap a
/// tick's tax codes with the next tick's; the bound keeps the in-flight state (maps of
/// new orders, numbers taken) small.
pub const TICKS_IN_FLIGHT_MAX: usize = 4;

/// One seller served by the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaxpayerConfig {
    /// Seller taxpayer id.
    pub id: TaxpayerId,
    /// Single-invoice ceiling on |total| (开票限额), fen, > 0.
    pub ceiling_fen: i64,
    /// Emit a refill request when fewer numbers than this remain.
    pub low_watermark: u32,
    /// Numbers to ask for in a refill, > 0.
    pub refill_count: u32,
}

/// Configuration of one shard's issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Shard id (the requisition holder).
    pub shard_id: u32,
    /// Sellers served (1..=[`TAXPAYERS_MAX`], distinct).
    pub taxpayers: Vec<TaxpayerConfig>,
    /// How long an order is remembered for idempotency (default
    /// [`RETENTION_MS_DEFAULT`]).
    pub retention_ms: u64,
    /// Orders the idempotency index holds (64 B each, allocated up front).
    pub index_capacity_orders: u32,
    /// Requests accepted per tick (1..=[`TICK_REQUESTS_MAX`]).
    pub tick_requests_max: u32,
}

/// Invalid configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No taxpayer, or more than [`TAXPAYERS_MAX`].
    #[error("a shard serves 1..={TAXPAYERS_MAX} taxpayers, got {0}")]
    TaxpayerCount(usize),
    /// The same taxpayer twice.
    #[error("taxpayer {0} configured twice")]
    DuplicateTaxpayer(TaxpayerId),
    /// Ceiling ≤ 0 or refill count 0.
    #[error("taxpayer {0}: ceiling must be > 0 and refill count > 0")]
    BadTaxpayer(TaxpayerId),
    /// `tick_requests_max` out of bounds.
    #[error("tick_requests_max must be 1..={TICK_REQUESTS_MAX}")]
    TickRequestsMax,
}

impl IssuerConfig {
    /// Checks every bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.taxpayers.is_empty() || self.taxpayers.len() > TAXPAYERS_MAX {
            return Err(ConfigError::TaxpayerCount(self.taxpayers.len()));
        }
        let mut seen = HashSet::new();
        for t in &self.taxpayers {
            if !seen.insert(t.id) {
                return Err(ConfigError::DuplicateTaxpayer(t.id));
            }
            if t.ceiling_fen <= 0 || t.refill_count == 0 {
                return Err(ConfigError::BadTaxpayer(t.id));
            }
        }
        if self.tick_requests_max == 0 || self.tick_requests_max > TICK_REQUESTS_MAX {
            return Err(ConfigError::TickRequestsMax);
        }
        Ok(())
    }
}

/// Misuse of the tick protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TickError {
    /// `begin_tick` while [`TICKS_IN_FLIGHT_MAX`] ticks are in flight (aborted ones
    /// waiting for the ticks before them included).
    #[error("{TICKS_IN_FLIGHT_MAX} ticks are already in flight")]
    TickInFlight,
    /// The tick given is not one in flight (already ended, or another issuer's).
    #[error("this tick is not in flight")]
    NotInFlight,
    /// `finish_tick` of a tick while an earlier one is still in flight; the tick was
    /// aborted (ticks finish in the order they began).
    #[error("an earlier tick is still in flight; tick aborted")]
    NotOldest,
    /// `cancel_tick` of a tick that is not the newest in flight: later ticks took the
    /// numbers after its own, so they cannot go back; the tick was aborted instead.
    #[error("a later tick is in flight; tick aborted instead of cancelled")]
    NotNewest,
    /// More requests than `tick_requests_max`.
    #[error("{count} requests in one tick, at most {max}")]
    TooManyRequests {
        /// Requests given.
        count: usize,
        /// Configured bound.
        max: u32,
    },
    /// Not one tax code result per item; the tick was aborted.
    #[error("expected {expected} tax codes, got {got}; tick aborted")]
    TaxCodeCountMismatch {
        /// Items of the tick.
        expected: usize,
        /// Results given.
        got: usize,
    },
}

/// Why a segment or control operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The seller is not served by this shard.
    #[error("unknown seller")]
    UnknownSeller,
    /// The pool refused the segment.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// [`CONTROL_RECORDS_MAX`] control records already wait for a commit.
    #[error("too many control records waiting for a commit")]
    QueueFull,
    /// Not allowed while a tick is in flight.
    #[error("a tick is in flight")]
    TickInFlight,
    /// Sequence numbers out of order (watermark going back, range not yet journaled).
    #[error("bad sequence number or range")]
    BadSeq,
}

/// Seller → pool index. Looked up once per request: a cheap word-wise hasher instead of
/// SipHash (the keys are configured sellers, not attacker-chosen).
pub(crate) type SellerMap = HashMap<TaxpayerId, u32, BuildHasherDefault<TaxpayerIdHasher>>;

/// The issuance state of one shard.
#[derive(Debug)]
pub struct Issuer {
    pub(crate) config: IssuerConfig,
    pub(crate) sellers: SellerMap,
    pub(crate) pools: Vec<Pool>,
    pub(crate) index: IdempotencyIndex,
    /// Sequence number of the next record.
    pub(crate) next_seq: u64,
    pub(crate) upload_watermark_seq: u64,
    pub(crate) batch_root_last_seq: u64,
    /// Latest watermark / batch-root end, queued ones included: new control records are
    /// checked against these, so that two queued records can never go backwards.
    pub(crate) queued_upload_watermark_seq: u64,
    pub(crate) queued_batch_root_last_seq: u64,
    control: Vec<Record>,
    /// `NumberSpoiled` records of aborted ticks among `control`: they do not count
    /// against [`CONTROL_RECORDS_MAX`] (a tick may spoil up to [`TICK_REQUESTS_MAX`]
    /// numbers, and refusing a granted segment because of them would lose it).
    control_spoils: usize,
    /// Ticks begun and not yet ended, oldest first; an aborted tick stays until the
    /// ticks before it have ended (then its numbers are queued as spoiled). The oldest
    /// is never an aborted one.
    in_flight: VecDeque<InFlight>,
    /// New items of every tick in flight (index room reserved for them).
    in_flight_items: usize,
    /// Red amounts claimed against each original by items of ticks in flight.
    in_flight_red_fen: FingerprintMap<i64>,
    /// Answers of finished ticks' orders that later ticks in flight wait for, by (tick
    /// id, key fingerprint), with how many requests still wait.
    resolved: HashMap<(u64, u128), (Resolved, u32)>,
    ticks_started: u64,
    /// Largest tick time so far (ms since the epoch); see the module docs.
    pub(crate) clock_ms: u64,
    /// Cross-shard red claims: granted here, and answers waiting here ([`red`]).
    red: red::RedClaims,
    /// Index fill step last reported by [`Issuer::index_fill_change`].
    index_fill: IndexFill,
    /// A new order was refused `IndexFull` since the last report.
    index_refused: bool,
    /// New orders refused `IndexFull` since start.
    index_full_refusals: u64,
}

impl Issuer {
    /// An issuer with empty pools and index; the first record gets sequence number 1.
    pub fn new(config: IssuerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let sellers = config
            .taxpayers
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id, i as u32))
            .collect();
        let pools = config
            .taxpayers
            .iter()
            .map(|t| Pool::new(t.id, t.low_watermark, t.refill_count, config.shard_id))
            .collect();
        let index = IdempotencyIndex::new(config.index_capacity_orders, config.retention_ms);
        Ok(Self {
            config,
            sellers,
            pools,
            index,
            next_seq: 1,
            upload_watermark_seq: 0,
            batch_root_last_seq: 0,
            queued_upload_watermark_seq: 0,
            queued_batch_root_last_seq: 0,
            control: Vec::new(),
            control_spoils: 0,
            in_flight: VecDeque::new(),
            in_flight_items: 0,
            in_flight_red_fen: FingerprintMap::default(),
            resolved: HashMap::new(),
            ticks_started: 0,
            clock_ms: 0,
            red: red::RedClaims::default(),
            index_fill: IndexFill::Normal,
            index_refused: false,
            index_full_refusals: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IssuerConfig {
        &self.config
    }
    /// Largest tick time so far, ms since the epoch (0 before the first tick).
    pub fn clock_ms(&self) -> u64 {
        self.clock_ms
    }
    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// Every record up to this sequence number has been uploaded.
    pub fn upload_watermark_seq(&self) -> u64 {
        self.upload_watermark_seq
    }
    /// Last sequence number covered by a batch root (0 if none).
    pub fn batch_root_last_seq(&self) -> u64 {
        self.batch_root_last_seq
    }
    /// The idempotency index.
    pub fn index(&self) -> &IdempotencyIndex {
        &self.index
    }
    /// Whether a tick is in flight.
    pub fn tick_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }
    /// Ticks in flight (begun, not ended), aborted ones waiting for earlier ones to end
    /// included.
    pub fn ticks_in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Control records waiting for the next commit, aborted ticks' spoiled numbers
    /// included (run a tick, even an empty one, to write them).
    pub fn pending_control_records(&self) -> usize {
        self.control.len()
    }
    /// The index fill step last returned by [`Issuer::index_fill_change`].
    pub fn index_fill(&self) -> IndexFill {
        self.index_fill
    }
    /// New orders refused `IndexFull` since this issuer was created.
    pub fn index_full_refusals(&self) -> u64 {
        self.index_full_refusals
    }

    /// The index's fill step if it changed since the last call (see [`IndexFill::next`]
    /// for when steps rise and fall), else `None`. The shell calls it once per tick and
    /// logs what it returns: a warning when 80 % or 95 % is crossed upwards, an error
    /// naming `limits.index_capacity_orders` once per episode of `IndexFull` refusals,
    /// and a note when expiry brings the fill back down. Recovery starts from
    /// [`IndexFill::Normal`], so a restart with a full index reports it again.
    pub fn index_fill_change(&mut self) -> Option<IndexFill> {
        let next = IndexFill::next(
            self.index_fill,
            self.index.len(),
            self.index.capacity(),
            std::mem::take(&mut self.index_refused),
        );
        (next != self.index_fill).then(|| {
            self.index_fill = next;
            next
        })
    }

    /// Number accounting of a seller's pool.
    pub fn accounting(&self, seller: &TaxpayerId) -> Option<NumberAccounting> {
        let i = *self.sellers.get(seller)?;
        Some(self.pools[i as usize].accounting())
    }
    /// Available numbers of a seller, as segments in take order.
    pub fn available_segments(&self, seller: &TaxpayerId) -> Option<Vec<NumberSegment>> {
        let i = *self.sellers.get(seller)?;
        Some(self.pools[i as usize].available_segments())
    }

    /// Every segment this shard ever reserved for `seller` (journaled or queued for the
    /// next commit), exhausted and returned ones included; empty for an unknown seller.
    pub fn reserved_segments(&self, seller: &TaxpayerId) -> Vec<NumberSegment> {
        self.sellers
            .get(seller)
            .map(|&i| self.pools[i as usize].reserved_segments().to_vec())
            .unwrap_or_default()
    }
}

/// A tick in flight, as the issuer keeps it.
#[derive(Debug)]
struct InFlight {
    id: u64,
    /// Its new orders: key fingerprint → (request index, request digest).
    firsts: FingerprintMap<(u32, u64)>,
    /// Its new orders that requests of later ticks wait for, with how many wait.
    awaited: FingerprintMap<u32>,
    /// Aborted: the numbers it took (pool, code, number), in take order, to queue as
    /// spoiled once every earlier tick has ended.
    aborted: Option<Vec<(u32, InvoiceCode, InvoiceNumber)>>,
}

impl InFlight {
    fn is_aborted(&self) -> bool {
        self.aborted.is_some()
    }
}

/// A finished tick's answer to an order that a later tick's request waits for.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Issued { seq: u64, identity: InvoiceIdentity },
    Refused(ItemError),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::invoice::IssueRequest;
    use crate::validate::tests::sample_request;
    use crate::validate::IssueError;
    use xxhash_rust::xxh3::xxh3_128;

    pub(crate) fn seller() -> TaxpayerId {
        TaxpayerId::parse("91350100M000100Y43").unwrap()
    }

    pub(crate) fn config() -> IssuerConfig {
        IssuerConfig {
            shard_id: 3,
            taxpayers: vec![TaxpayerConfig {
                id: seller(),
                ceiling_fen: 10_000_000,
                low_watermark: 2,
                refill_count: 50,
            }],
            retention_ms: 10_000,
            index_capacity_orders: 64,
            tick_requests_max: 64,
        }
    }

    pub(crate) fn segment(first: u32, count: u32) -> NumberSegment {
        NumberSegment::new(
            InvoiceCode::new(144_031_900_111).unwrap(),
            InvoiceNumber::new(first).unwrap(),
            count,
        )
        .unwrap()
    }

    /// Fake tax server: tax code = xxh3-128 of the canonical bytes, twice; check code =
    /// its digits.
    pub(crate) fn fake_codes(tick: &Tick) -> Vec<TaxCodeResult> {
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

    pub(crate) fn run(
        issuer: &mut Issuer,
        now_ms: u64,
        requests: &[IssueRequest],
        journal: &mut Vec<u8>,
    ) -> Commit {
        let tick = issuer.begin_tick(now_ms, requests.to_vec()).unwrap();
        let codes = fake_codes(&tick);
        issuer.finish_tick(tick, &codes, journal).unwrap()
    }

    pub(crate) fn ready() -> (Issuer, Vec<u8>) {
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(1, 10)).unwrap();
        (issuer, Vec::new())
    }

    #[test]
    fn index_capacity_is_a_typed_rejection() {
        let mut cfg = config();
        cfg.index_capacity_orders = 16;
        cfg.retention_ms = u64::MAX;
        let mut issuer = Issuer::new(cfg).unwrap();
        issuer.add_segment(&seller(), segment(1, 100)).unwrap();
        let mut journal = Vec::new();
        let requests: Vec<_> = (0..17)
            .map(|i| sample_request(&format!("o-{i}"), 100))
            .collect();
        assert_eq!(issuer.index_fill_change(), None);
        // 13 of 16 (81 %): the 80 % step, reported once.
        let commit = run(&mut issuer, 1, &requests[..13], &mut journal);
        assert_eq!(commit.answers.len(), 13);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Above80));
        assert_eq!(issuer.index_fill_change(), None);
        // 16 of 16, then one refused: the 95 % step is passed straight to full.
        let commit = run(&mut issuer, 1, &requests[13..], &mut journal);
        assert!(matches!(commit.answers[2], Answer::Issued { .. }));
        assert_eq!(commit.answers[3], Answer::Rejected(IssueError::IndexFull));
        assert!(IssueError::IndexFull
            .to_string()
            .contains("limits.index_capacity_orders"));
        assert_eq!(issuer.index_full_refusals(), 1);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Full));
        // More refusals in the same episode are not reported again.
        let commit = run(&mut issuer, 1, &[sample_request("o-x", 100)], &mut journal);
        assert_eq!(commit.answers[0], Answer::Rejected(IssueError::IndexFull));
        assert_eq!(issuer.index_fill_change(), None);
        assert_eq!(issuer.index_full_refusals(), 2);
    }

    #[test]
    fn index_fill_steps_are_rearmed_by_expiry() {
        let mut cfg = config();
        cfg.index_capacity_orders = 20;
        cfg.retention_ms = 10_000;
        let mut issuer = Issuer::new(cfg).unwrap();
        issuer.add_segment(&seller(), segment(1, 100)).unwrap();
        let mut journal = Vec::new();
        let batch = |from: usize, n: usize| -> Vec<IssueRequest> {
            (from..from + n)
                .map(|i| sample_request(&format!("o-{i}"), 100))
                .collect()
        };
        run(&mut issuer, 1_000, &batch(0, 16), &mut journal);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Above80));
        run(&mut issuer, 5_000, &batch(16, 3), &mut journal);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Above95));
        // The first 16 expire: 3 of 20 left, back to normal.
        run(&mut issuer, 12_000, &[], &mut journal);
        assert_eq!(issuer.index().len(), 3);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Normal));
        // Crossing 80 % again is reported again.
        run(&mut issuer, 12_000, &batch(19, 13), &mut journal);
        assert_eq!(issuer.index_fill_change(), Some(IndexFill::Above80));
    }

    #[test]
    fn config_is_validated() {
        let mut c = config();
        c.taxpayers.push(c.taxpayers[0].clone());
        assert!(matches!(
            Issuer::new(c),
            Err(ConfigError::DuplicateTaxpayer(_))
        ));
        let mut c = config();
        c.taxpayers[0].ceiling_fen = 0;
        assert!(matches!(Issuer::new(c), Err(ConfigError::BadTaxpayer(_))));
        let mut c = config();
        c.tick_requests_max = 0;
        assert!(matches!(Issuer::new(c), Err(ConfigError::TickRequestsMax)));
        let mut c = config();
        c.taxpayers.clear();
        assert!(matches!(Issuer::new(c), Err(ConfigError::TaxpayerCount(0))));
    }
}
