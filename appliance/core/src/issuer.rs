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

pub mod red;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use std::ops::Range;

use crate::canonical;
use crate::idempotency::{
    issue_time_s, key_fingerprint, request_digest, FingerprintMap, IdempotencyIndex, IndexEntry,
    IndexFill, TaxpayerIdHasher,
};
use crate::invoice::{Invoice, InvoiceIdentity, InvoiceKind, IssueRequest};
use crate::journal::frame::{encode_record, encode_record_with};
use crate::journal::record::{encode_issued, is_check_code, Record, RecordKind};
use crate::pool::{NumberAccounting, Pool, PoolError, RefillRequest};
use crate::taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};
use crate::validate::{check_request, IssueError, ItemError};

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

/// What `begin_tick` decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new invoice: item `item` of the TaxCodes command.
    NeedsTaxCode {
        /// Index among the tick's canonical items.
        item: u32,
    },
    /// Already issued earlier: answer from the journal record at `seq`.
    Replay {
        /// Journal sequence of the Issued record.
        seq: u64,
        /// Code and number.
        identity: InvoiceIdentity,
    },
    /// Same request as an earlier one of this tick: gets that one's answer.
    DuplicateOf {
        /// Index of the first request.
        request: u32,
    },
    /// Same request as a new one of an earlier tick still in flight: gets that one's
    /// answer (a replay of its invoice, or its refusal; `TaxCodeRefused(CommandFailed)`
    /// if that tick is aborted) when this tick finishes.
    AwaitsEarlierTick {
        /// Id of the earlier tick.
        tick: u64,
    },
    /// Refused.
    Rejected(IssueError),
}

/// One new invoice of a tick. Its request stays in `Tick::requests` (at
/// `request_index`) rather than being cloned here: `finish_tick` moves it from there
/// into the `Invoice`.
#[derive(Debug)]
struct TickItem {
    request_index: u32,
    pool: u32,
    code: InvoiceCode,
    number: InvoiceNumber,
    fingerprint: u128,
    request_digest: u64,
    canonical: Range<usize>,
    red_original: Option<u128>,
}

/// A tick in flight: created by `begin_tick`, consumed by `finish_tick` or `abort_tick`.
#[derive(Debug)]
pub struct Tick {
    shard_id: u32,
    id: u64,
    now_ms: u64,
    /// The requests given to `begin_tick`, in request order.
    requests: Vec<IssueRequest>,
    /// Key fingerprint of each request (same indexes as `requests`), computed once in
    /// `begin_tick` and reused by `finish_tick` and `abort_tick`.
    fingerprints: Vec<u128>,
    outcomes: Vec<Outcome>,
    /// In increasing `request_index` order (admitted in request order), which is what
    /// lets `finish_tick` pair items with requests in one forward pass.
    items: Vec<TickItem>,
    canonical: Vec<u8>,
    refills: Vec<RefillRequest>,
}

impl Tick {
    /// The tick's time (issue time of its invoices): the `now_ms` given to `begin_tick`,
    /// or the last tick's time if the clock went backwards.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
    /// The tick's requests, in request order (the same indexes as [`Tick::outcomes`]).
    pub fn requests(&self) -> &[IssueRequest] {
        &self.requests
    }
    /// Per-request outcome, in request order.
    pub fn outcomes(&self) -> &[Outcome] {
        &self.outcomes
    }
    /// New invoices needing a tax code.
    pub fn item_count(&self) -> usize {
        self.items.len()
    }
    /// Canonical bytes of item `i` (0..item_count).
    pub fn canonical_item(&self, i: usize) -> &[u8] {
        &self.canonical[self.items[i].canonical.clone()]
    }
    /// Canonical bytes of every item, in item order: the TaxCodes command's items.
    pub fn canonical_items(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.items
            .iter()
            .map(|it| &self.canonical[it.canonical.clone()])
    }
    /// Total canonical bytes of the tick.
    pub fn canonical_bytes(&self) -> usize {
        self.canonical.len()
    }
    /// Refill requests to send to the tax server. Send them even if the tick is aborted:
    /// the pool will not ask again until a segment arrives or `refill_failed` is called.
    pub fn refill_requests(&self) -> &[RefillRequest] {
        &self.refills
    }
}

/// The tax server's answer for one item: codes, or why it refused.
pub type TaxCodeResult = Result<([u8; 32], [u8; 20]), ItemError>;

/// Final answer for one request, to release once the commit is durable.
// Most answers are `Issued`; boxing the invoice would add an allocation per invoice and
// save no memory in the common case.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Newly issued.
    Issued {
        /// Journal sequence of its Issued record.
        seq: u64,
        /// The invoice.
        invoice: Invoice,
    },
    /// Issued before (earlier tick, or earlier in this tick): read the Issued record at
    /// `seq` (`journal::record::decode_issued`) to answer with the full invoice.
    Replay {
        /// Journal sequence of the Issued record.
        seq: u64,
        /// Code and number.
        identity: InvoiceIdentity,
    },
    /// Refused.
    Rejected(IssueError),
}

/// Result of `finish_tick`.
#[derive(Debug)]
pub struct Commit {
    /// One answer per request of the tick, in request order.
    pub answers: Vec<Answer>,
    /// Sequence numbers of the records appended (may be empty).
    pub seqs: Range<u64>,
    /// Where the records were appended in the caller's journal buffer.
    pub journal_range: Range<usize>,
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

    /// Control records queued, aborted ticks' spoiled numbers not counted (those are
    /// bounded by the ticks in flight, see `control_spoils`).
    fn control_queued(&self) -> usize {
        self.control.len() - self.control_spoils
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

    fn pool_mut(&mut self, seller: &TaxpayerId) -> Result<&mut Pool, ControlError> {
        let i = *self
            .sellers
            .get(seller)
            .ok_or(ControlError::UnknownSeller)?;
        Ok(&mut self.pools[i as usize])
    }

    fn queue(&mut self, record: Record) -> Result<(), ControlError> {
        if self.control_queued() >= CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        self.control.push(record);
        Ok(())
    }

    /// Adds a segment granted by the tax server. Its numbers can be taken at once; its
    /// `SegmentReserved` record is written first in the next commit, so no number of it
    /// is answered before the reservation is durable.
    pub fn add_segment(
        &mut self,
        seller: &TaxpayerId,
        segment: NumberSegment,
    ) -> Result<(), ControlError> {
        if self.control_queued() >= CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        self.pool_mut(seller)?.add_segment(segment)?;
        self.queue(Record::SegmentReserved {
            seller: *seller,
            segment,
        })
    }

    /// Adopts a segment the tax server reports as granted to this shard, unless it
    /// overlaps a segment this shard ever reserved: then the journal already knows it (a
    /// partially returned segment shows up smaller in the device than it was reserved).
    /// A segment the journal does not know was granted just before a crash; adopting it
    /// (journaled in the next commit, like `add_segment`) keeps its numbers accounted
    /// for. Returns whether it was adopted.
    pub fn adopt_granted(
        &mut self,
        seller: &TaxpayerId,
        segment: NumberSegment,
    ) -> Result<bool, ControlError> {
        let known = self
            .pool_mut(seller)?
            .reserved_segments()
            .iter()
            .any(|r| r.overlaps(&segment));
        if known {
            return Ok(false);
        }
        self.add_segment(seller, segment)?;
        Ok(true)
    }

    /// Takes every available number of a seller out of the pool and queues
    /// `SegmentReturned` records; give them back to the tax server only after the next
    /// commit is durable.
    pub fn return_unused(
        &mut self,
        seller: &TaxpayerId,
    ) -> Result<Vec<NumberSegment>, ControlError> {
        if !self.in_flight.is_empty() {
            return Err(ControlError::TickInFlight);
        }
        let queued = self.control_queued();
        let pool = self.pool_mut(seller)?;
        if queued + pool.available_segments().len() > CONTROL_RECORDS_MAX {
            return Err(ControlError::QueueFull);
        }
        let returned = pool.return_unused();
        for segment in &returned {
            self.queue(Record::SegmentReturned {
                seller: *seller,
                segment: *segment,
            })?;
        }
        Ok(returned)
    }

    /// Start-up reconciliation with the tax server's coded mark of one segment: the device
    /// reports every number of the segment below `coded_end` as possibly coded. Those the
    /// journal holds no invoice for (from the pool's cursor up to `coded_end`) were coded
    /// for invoices that were never journaled; they are spoiled (queued `NumberSpoiled`
    /// records, reason [`ItemError::CodedNotJournaled`]) so that none is ever coded again
    /// for another invoice. Spoils at most as many as the control queue has room for and
    /// returns `(spoiled, left)`: commit, then call again while `left > 0`.
    pub fn spoil_coded(
        &mut self,
        seller: &TaxpayerId,
        code: InvoiceCode,
        coded_end: u32,
    ) -> Result<(u32, u32), ControlError> {
        if !self.in_flight.is_empty() {
            return Err(ControlError::TickInFlight);
        }
        let room = (CONTROL_RECORDS_MAX - self.control.len()) as u32;
        let pool = self.pool_mut(seller)?;
        let numbers = pool.spoil_until(code, coded_end, room);
        for &number in &numbers {
            self.queue(Record::NumberSpoiled {
                seller: *seller,
                identity: InvoiceIdentity { code, number },
                reason: ItemError::CodedNotJournaled,
            })?;
        }
        let pending = self
            .pool_mut(seller)?
            .available_segments()
            .iter()
            .find(|s| s.code == code && s.first.get() < coded_end && coded_end <= s.end())
            .map_or(0, |s| coded_end - s.first.get());
        Ok((numbers.len() as u32, pending))
    }

    /// The requisition for this seller failed: the next tick may ask again.
    pub fn refill_failed(&mut self, seller: &TaxpayerId) -> Result<(), ControlError> {
        self.pool_mut(seller)?.refill_failed();
        Ok(())
    }

    /// Queues an upload watermark: every record up to `watermark_seq` was accepted by the
    /// authority.
    pub fn queue_uploaded_to(&mut self, watermark_seq: u64) -> Result<(), ControlError> {
        if watermark_seq < self.queued_upload_watermark_seq || watermark_seq >= self.next_seq {
            return Err(ControlError::BadSeq);
        }
        self.queue(Record::UploadedTo { watermark_seq })?;
        self.queued_upload_watermark_seq = watermark_seq;
        Ok(())
    }

    /// Queues a signed Merkle root over records `first_seq..=last_seq` (already
    /// journaled, after the previous root).
    pub fn queue_batch_root(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        root: [u8; 32],
        signature: [u8; 64],
    ) -> Result<(), ControlError> {
        if first_seq <= self.queued_batch_root_last_seq
            || first_seq > last_seq
            || last_seq >= self.next_seq
        {
            return Err(ControlError::BadSeq);
        }
        self.queue(Record::BatchRoot {
            first_seq,
            last_seq,
            root,
            signature,
        })?;
        self.queued_batch_root_last_seq = last_seq;
        Ok(())
    }

    /// Starts a tick: validates every request, answers replays and duplicates, takes a
    /// number per new invoice and encodes its canonical bytes for one TaxCodes command.
    /// Up to [`TICKS_IN_FLIGHT_MAX`] ticks may be in flight; a request for an order that
    /// a tick in flight is issuing waits for that tick ([`Outcome::AwaitsEarlierTick`]).
    ///
    /// The tick owns `requests` from here on: `finish_tick` moves each issued one into
    /// its `Invoice`, `abort_tick` hands them all back. On an error the requests are
    /// dropped (every error is misuse of the tick protocol, not a state to retry from).
    pub fn begin_tick(
        &mut self,
        now_ms: u64,
        requests: Vec<IssueRequest>,
    ) -> Result<Tick, TickError> {
        if self.in_flight.len() >= TICKS_IN_FLIGHT_MAX {
            return Err(TickError::TickInFlight);
        }
        if requests.len() > self.config.tick_requests_max as usize {
            return Err(TickError::TooManyRequests {
                count: requests.len(),
                max: self.config.tick_requests_max,
            });
        }
        let now_ms = now_ms.max(self.clock_ms);
        self.clock_ms = now_ms;
        self.index.expire(now_ms);
        self.ticks_started += 1;
        let mut tick = Tick {
            shard_id: self.config.shard_id,
            id: self.ticks_started,
            now_ms,
            requests: Vec::new(),
            fingerprints: Vec::new(),
            outcomes: Vec::with_capacity(requests.len()),
            items: Vec::with_capacity(requests.len()),
            // ~300 B is a typical canonical invoice; one allocation for most ticks.
            canonical: Vec::with_capacity(requests.len() * 320),
            refills: Vec::new(),
        };
        // First new request per key of this tick; kept while the tick is in flight so
        // that later ticks find its orders.
        let mut firsts: FingerprintMap<(u32, u64)> = FingerprintMap::default();
        firsts.reserve(requests.len());
        // Every request's index lookup misses the cache on a production-sized index. Warm
        // all of them first, in a tight loop of its own so that many misses are in flight
        // at once, instead of one per request in the middle of its other work. The
        // fingerprints are computed before that loop (not in it) for the same reason:
        // hashing in between would leave room for fewer touches in flight.
        let fingerprints: Vec<u128> = requests
            .iter()
            .map(|r| key_fingerprint(&r.seller, &r.order_id))
            .collect();
        for &fingerprint in &fingerprints {
            self.index.prefetch(fingerprint);
        }
        for (i, (request, &fingerprint)) in requests.iter().zip(&fingerprints).enumerate() {
            let outcome = self.classify(&mut tick, i as u32, request, fingerprint, &mut firsts);
            tick.outcomes.push(outcome);
        }
        for pool in &mut self.pools {
            if let Some(refill) = pool.refill_request() {
                tick.refills.push(refill);
            }
        }
        debug_assert_eq!(tick.outcomes.len(), requests.len());
        debug_assert!(tick
            .items
            .windows(2)
            .all(|w| w[0].request_index < w[1].request_index));
        tick.requests = requests;
        tick.fingerprints = fingerprints;
        self.in_flight_items += tick.items.len();
        self.in_flight.push_back(InFlight {
            id: tick.id,
            firsts,
            awaited: FingerprintMap::default(),
            aborted: None,
        });
        Ok(tick)
    }

    fn classify(
        &mut self,
        tick: &mut Tick,
        request_index: u32,
        request: &IssueRequest,
        fingerprint: u128,
        firsts: &mut FingerprintMap<(u32, u64)>,
    ) -> Outcome {
        let digest = request_digest(request);
        if let Some(&(first, first_digest)) = firsts.get(&fingerprint) {
            return if first_digest == digest {
                Outcome::DuplicateOf { request: first }
            } else {
                Outcome::Rejected(IssueError::IdempotencyConflict)
            };
        }
        if let Some(entry) = self.index.get(fingerprint) {
            return if entry.request_digest == digest {
                Outcome::Replay {
                    seq: entry.seq,
                    identity: entry_identity(entry),
                }
            } else {
                Outcome::Rejected(IssueError::IdempotencyConflict)
            };
        }
        // Not in the index yet: a tick in flight may be issuing it (a client's retry).
        for earlier in &mut self.in_flight {
            if let Some(&(_, first_digest)) = earlier.firsts.get(&fingerprint) {
                if first_digest != digest {
                    return Outcome::Rejected(IssueError::IdempotencyConflict);
                }
                *earlier.awaited.entry(fingerprint).or_insert(0) += 1;
                return Outcome::AwaitsEarlierTick { tick: earlier.id };
            }
        }
        match self.admit(tick, request_index, request, fingerprint, digest) {
            Ok(item) => {
                firsts.insert(fingerprint, (request_index, digest));
                Outcome::NeedsTaxCode { item }
            }
            Err(error) => Outcome::Rejected(error),
        }
    }

    /// Checks a new request against the rules and state, then takes its number.
    fn admit(
        &mut self,
        tick: &mut Tick,
        request_index: u32,
        request: &IssueRequest,
        fingerprint: u128,
        request_digest: u64,
    ) -> Result<u32, IssueError> {
        check_request(request)?;
        let pool = *self
            .sellers
            .get(&request.seller)
            .ok_or(IssueError::UnknownSeller)?;
        let ceiling_fen = self.config.taxpayers[pool as usize].ceiling_fen;
        // ceiling_fen > 0 (validated config), so the cast is exact.
        if request.total_fen.unsigned_abs() > ceiling_fen as u64 {
            return Err(IssueError::CeilingExceeded {
                total_fen: request.total_fen.saturating_abs(),
                ceiling_fen,
            });
        }
        let red_original = match &request.kind {
            InvoiceKind::Blue => None,
            InvoiceKind::Red(reference) => {
                let original = key_fingerprint(&request.seller, &reference.original_order_id);
                let red_fen = request.total_fen.saturating_abs();
                if self.index.get(original).is_some() {
                    let identity = InvoiceIdentity {
                        code: reference.original_code,
                        number: reference.original_number,
                    };
                    self.check_red_against(original, identity, red_fen)?;
                    Some((original, red_fen))
                } else {
                    // The original lives on another shard, which checked the red and
                    // holds its amount as a claim (`red`): nothing to account here.
                    self.admit_remote_red(request)?;
                    None
                }
            }
        };
        // Every new item becomes an index entry when its tick finishes: reserve the room
        // now, for the items of every tick in flight.
        if self.index.len() as usize + self.in_flight_items + tick.items.len()
            >= self.index.capacity() as usize
        {
            // Two stores, no logging: the shell reports the episode once per tick
            // (`index_fill_change`).
            self.index_refused = true;
            self.index_full_refusals += 1;
            return Err(IssueError::IndexFull);
        }
        let (code, number) = self.pools[pool as usize]
            .take()
            .ok_or(IssueError::NoNumbersAvailable)?;
        if let Some((original, red_fen)) = red_original {
            *self.in_flight_red_fen.entry(original).or_insert(0) += red_fen;
        }
        let start = tick.canonical.len();
        canonical::encode_fields(request, code, number, tick.now_ms, &mut tick.canonical);
        let item = tick.items.len() as u32;
        tick.items.push(TickItem {
            request_index,
            pool,
            code,
            number,
            fingerprint,
            request_digest,
            canonical: start..tick.canonical.len(),
            red_original: red_original.map(|(original, _)| original),
        });
        Ok(item)
    }

    /// Position of a live tick among the ticks in flight.
    fn position(&self, tick: &Tick) -> Result<usize, TickError> {
        if tick.shard_id != self.config.shard_id {
            return Err(TickError::NotInFlight);
        }
        self.in_flight
            .iter()
            .position(|t| t.id == tick.id && !t.is_aborted())
            .ok_or(TickError::NotInFlight)
    }

    fn release_red_claim(&mut self, original: u128, red_fen: i64) {
        let claimed = self
            .in_flight_red_fen
            .get_mut(&original)
            .expect("a red item in flight has its claim");
        *claimed -= red_fen;
        if *claimed == 0 {
            self.in_flight_red_fen.remove(&original);
        }
    }

    /// Ends a tick with the tax server's answers (one per item, in item order): appends
    /// the tick's records to `journal` with consecutive sequence numbers and returns the
    /// answers. The caller makes `journal` durable before releasing them. Each issued
    /// request moves into its `Answer::Issued` invoice; the others are dropped.
    ///
    /// Only the oldest tick in flight may finish. A later one, or one with the wrong
    /// number of tax codes, is aborted instead (see [`Issuer::abort_tick`]) and its
    /// requests dropped.
    pub fn finish_tick(
        &mut self,
        tick: Tick,
        tax_codes: &[TaxCodeResult],
        journal: &mut Vec<u8>,
    ) -> Result<Commit, TickError> {
        // The oldest tick in flight is never an aborted one (their numbers are queued as
        // spoiled as soon as no earlier tick is in flight), so position 0 is the oldest
        // live tick.
        let position = self.position(&tick)?;
        if position > 0 {
            self.abort_tick(tick)?;
            return Err(TickError::NotOldest);
        }
        if tax_codes.len() != tick.items.len() {
            let expected = tick.items.len();
            self.abort_tick(tick)?;
            return Err(TickError::TaxCodeCountMismatch {
                expected,
                got: tax_codes.len(),
            });
        }
        let InFlight {
            firsts, awaited, ..
        } = self.in_flight.pop_front().expect("position 0 is in flight");
        self.in_flight_items -= tick.items.len();
        let journal_start = journal.len();
        let first_seq = self.next_seq;
        let mut body = Vec::with_capacity(4096);
        for record in std::mem::take(&mut self.control) {
            body.clear();
            record.encode_body(&mut body);
            encode_record(journal, record.kind() as u8, self.next_seq, &body);
            match record {
                Record::UploadedTo { watermark_seq } => self.upload_watermark_seq = watermark_seq,
                Record::BatchRoot { last_seq, .. } => self.batch_root_last_seq = last_seq,
                _ => {}
            }
            self.next_seq += 1;
        }
        self.control_spoils = 0;
        let mut answers: Vec<Option<Answer>> = tick
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Replay { seq, identity } => Some(Answer::Replay {
                    seq: *seq,
                    identity: *identity,
                }),
                Outcome::Rejected(e) => Some(Answer::Rejected(e.clone())),
                Outcome::NeedsTaxCode { .. }
                | Outcome::DuplicateOf { .. }
                | Outcome::AwaitsEarlierTick { .. } => None,
            })
            .collect();
        // Keys of requests waiting for an earlier tick, before the requests move out.
        let awaiting: Vec<(usize, u64, u128)> = tick
            .outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| match o {
                Outcome::AwaitsEarlierTick { tick: earlier } => {
                    Some((i, *earlier, tick.fingerprints[i]))
                }
                _ => None,
            })
            .collect();
        // `begin_tick` warmed each new order's index line, but a tax-code round trip
        // (milliseconds of other work) ago; on a production-sized index most are gone
        // again. Warming them in a tight loop first lets their misses overlap instead of
        // stalling each insert below in turn.
        for item in &tick.items {
            self.index.prefetch(item.fingerprint);
        }
        // Items are in increasing request order, so one forward pass over the requests
        // finds each item's request and moves it out without cloning.
        let mut requests = tick.requests.into_iter().enumerate();
        for (item, result) in tick.items.into_iter().zip(tax_codes) {
            let request = loop {
                match requests.next() {
                    Some((i, request)) if i == item.request_index as usize => break request,
                    Some(_) => continue,
                    None => unreachable!("tick item without its request"),
                }
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            let red_fen = request.total_fen.saturating_abs();
            if let Some(original) = item.red_original {
                self.release_red_claim(original, red_fen);
            }
            let pool = &mut self.pools[item.pool as usize];
            let answer = match result {
                Ok((tax_control_code, check_code)) if is_check_code(check_code) => {
                    encode_record_with(journal, RecordKind::Issued as u8, seq, |out| {
                        encode_issued(
                            &tick.canonical[item.canonical.clone()],
                            tax_control_code,
                            check_code,
                            out,
                        )
                    });
                    pool.settle_issued();
                    self.index.insert(IndexEntry {
                        fingerprint: IndexEntry::split_fingerprint(item.fingerprint),
                        request_digest: item.request_digest,
                        seq,
                        code: item.code.get(),
                        number: item.number.get(),
                        issue_time_s: issue_time_s(tick.now_ms),
                        total_fen: request.total_fen,
                    });
                    if let Some(original) = item.red_original {
                        self.index.add_red_fen(original, red_fen);
                    }
                    // A red of another shard's original: its key is remembered now, so
                    // its claim's answer is no longer needed (one map check per item).
                    self.red.issued(&request);
                    Answer::Issued {
                        seq,
                        invoice: Invoice {
                            request,
                            code: item.code,
                            number: item.number,
                            issue_time_ms: tick.now_ms,
                            tax_control_code: *tax_control_code,
                            check_code: *check_code,
                        },
                    }
                }
                refused => {
                    let reason = match refused {
                        Err(e) => *e,
                        Ok(_) => ItemError::InvalidCheckCode,
                    };
                    let record = Record::NumberSpoiled {
                        seller: request.seller,
                        identity: InvoiceIdentity {
                            code: item.code,
                            number: item.number,
                        },
                        reason,
                    };
                    body.clear();
                    record.encode_body(&mut body);
                    encode_record(journal, RecordKind::NumberSpoiled as u8, seq, &body);
                    pool.settle_spoiled();
                    Answer::Rejected(IssueError::TaxCodeRefused(reason))
                }
            };
            answers[item.request_index as usize] = Some(answer);
        }
        for (i, outcome) in tick.outcomes.iter().enumerate() {
            if let Outcome::DuplicateOf { request } = outcome {
                answers[i] = Some(repeat_answer(
                    answers[*request as usize]
                        .as_ref()
                        .expect("first request of a duplicate has an answer"),
                ));
            }
        }
        for (i, earlier, fingerprint) in awaiting {
            let key = (earlier, fingerprint);
            let (resolved, waiting) = self
                .resolved
                .get_mut(&key)
                .expect("an earlier tick ended before this one, with its answer kept");
            answers[i] = Some(match resolved {
                Resolved::Issued { seq, identity } => Answer::Replay {
                    seq: *seq,
                    identity: *identity,
                },
                Resolved::Refused(reason) => Answer::Rejected(IssueError::TaxCodeRefused(*reason)),
            });
            *waiting -= 1;
            if *waiting == 0 {
                self.resolved.remove(&key);
            }
        }
        // Keep the answers later ticks in flight wait for.
        for (fingerprint, waiting) in awaited {
            let (first, _) = firsts[&fingerprint];
            let resolved = match &answers[first as usize] {
                Some(Answer::Issued { seq, invoice }) => Resolved::Issued {
                    seq: *seq,
                    identity: invoice.identity(),
                },
                Some(Answer::Rejected(IssueError::TaxCodeRefused(reason))) => {
                    Resolved::Refused(*reason)
                }
                other => unreachable!("a new order of the tick answered {other:?}"),
            };
            self.resolved
                .insert((tick.id, fingerprint), (resolved, waiting));
        }
        // Aborted ticks that waited for this one: their spoiled numbers follow its own.
        self.queue_aborted_front();
        self.compact_idle_pools();
        Ok(Commit {
            answers: answers
                .into_iter()
                .map(|a| a.expect("every request answered"))
                .collect(),
            seqs: first_seq..self.next_seq,
            journal_range: journal_start..journal.len(),
        })
    }

    /// Abandons a tick whose TaxCodes command failed as a whole (or whose answer could
    /// not be used): no invoice of it is journaled and no index entry is added, but the
    /// device may have coded its items, so every number it took is spoiled: counted as
    /// spoiled at once and never reused, and journaled as `NumberSpoiled` (reason
    /// [`ItemError::CommandFailed`]) with the control records of the next commit, once no
    /// earlier tick is in flight (journal order follows take order). Later ticks in
    /// flight are unaffected; their requests that waited for one of this tick's orders
    /// get `TaxCodeRefused(CommandFailed)`. Queued control records stay queued.
    ///
    /// Returns the tick's requests, unchanged and in order: a retry begins them again
    /// and takes fresh numbers. A tick that is not in flight is refused (and its
    /// requests dropped).
    pub fn abort_tick(&mut self, tick: Tick) -> Result<Vec<IssueRequest>, TickError> {
        let position = self.position(&tick)?;
        self.release_tick(&tick);
        let entry = &mut self.in_flight[position];
        entry.firsts = FingerprintMap::default();
        // Requests of later ticks waiting for this tick's orders get the failure.
        for (fingerprint, waiting) in std::mem::take(&mut entry.awaited) {
            self.resolved.insert(
                (tick.id, fingerprint),
                (Resolved::Refused(ItemError::CommandFailed), waiting),
            );
        }
        let mut numbers = Vec::with_capacity(tick.items.len());
        for item in &tick.items {
            self.pools[item.pool as usize].settle_spoiled();
            numbers.push((item.pool, item.code, item.number));
        }
        self.in_flight[position].aborted = Some(numbers);
        self.queue_aborted_front();
        self.compact_idle_pools();
        Ok(tick.requests)
    }

    /// Withdraws the newest tick in flight before its TaxCodes command was sent (e.g. to
    /// wait for a refill and begin the same requests again): no number of it reached
    /// the tax server, so its numbers go back to their pools (in reverse take order,
    /// which is exact because no later tick took any) and the issuer is as before its
    /// `begin_tick`, apart from expiry and refill requests already emitted. Calling this
    /// for a tick whose command was sent would let the device see two invoices under
    /// one number: use [`Issuer::abort_tick`] then.
    ///
    /// Returns the tick's requests, unchanged and in order. A tick that is not the
    /// newest in flight cannot give its numbers back: it is aborted instead (its numbers
    /// spoiled, the safe side) and [`TickError::NotNewest`] returned, like
    /// [`Issuer::finish_tick`] does with a tick that is not the oldest.
    pub fn cancel_tick(&mut self, tick: Tick) -> Result<Vec<IssueRequest>, TickError> {
        let position = self.position(&tick)?;
        if position + 1 != self.in_flight.len() {
            self.abort_tick(tick)?;
            return Err(TickError::NotNewest);
        }
        self.release_tick(&tick);
        self.in_flight.pop_back();
        for item in tick.items.iter().rev() {
            self.pools[item.pool as usize].untake(item.code, item.number);
        }
        self.compact_idle_pools();
        Ok(tick.requests)
    }

    /// Releases what an ending tick holds besides its numbers: index room, red claims,
    /// and its requests' waits for earlier ticks.
    fn release_tick(&mut self, tick: &Tick) {
        self.in_flight_items -= tick.items.len();
        for item in &tick.items {
            if let Some(original) = item.red_original {
                let red_fen = tick.requests[item.request_index as usize]
                    .total_fen
                    .saturating_abs();
                self.release_red_claim(original, red_fen);
            }
        }
        for (i, outcome) in tick.outcomes.iter().enumerate() {
            if let Outcome::AwaitsEarlierTick { tick: earlier } = outcome {
                self.stop_waiting(*earlier, tick.fingerprints[i]);
            }
        }
    }

    /// Queues the spoiled numbers of every aborted tick at the front of the ticks in
    /// flight: no earlier tick is left to journal numbers before theirs.
    fn queue_aborted_front(&mut self) {
        while self.in_flight.front().is_some_and(InFlight::is_aborted) {
            let ended = self.in_flight.pop_front().expect("checked above");
            for (pool, code, number) in ended.aborted.into_iter().flatten() {
                self.control.push(Record::NumberSpoiled {
                    seller: self.pools[pool as usize].seller(),
                    identity: InvoiceIdentity { code, number },
                    reason: ItemError::CommandFailed,
                });
                self.control_spoils += 1;
            }
        }
    }

    /// A request of an ended tick no longer waits for `earlier`'s answer to `fingerprint`.
    fn stop_waiting(&mut self, earlier: u64, fingerprint: u128) {
        // An aborted tick's waits moved to `resolved` (answered with its failure).
        if let Some(entry) = self
            .in_flight
            .iter_mut()
            .find(|t| t.id == earlier && !t.is_aborted())
        {
            if let Some(waiting) = entry.awaited.get_mut(&fingerprint) {
                *waiting -= 1;
                if *waiting == 0 {
                    entry.awaited.remove(&fingerprint);
                }
            }
        } else if let Some((_, waiting)) = self.resolved.get_mut(&(earlier, fingerprint)) {
            *waiting -= 1;
            if *waiting == 0 {
                self.resolved.remove(&(earlier, fingerprint));
            }
        }
    }

    /// Drops exhausted segments of pools with no number in flight (`untake`, for
    /// `cancel_tick`, needs the cursor of every number in flight).
    fn compact_idle_pools(&mut self) {
        for pool in &mut self.pools {
            if pool.accounting().in_flight == 0 {
                pool.compact();
            }
        }
        debug_assert!(
            !self.in_flight.is_empty()
                || (self.in_flight_items == 0
                    && self.in_flight_red_fen.is_empty()
                    && self.resolved.is_empty())
        );
    }
}

/// The answer of a request that repeats an earlier one of the same tick.
fn repeat_answer(first: &Answer) -> Answer {
    match first {
        Answer::Issued { seq, invoice } => Answer::Replay {
            seq: *seq,
            identity: invoice.identity(),
        },
        other => other.clone(),
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

pub(crate) fn entry_identity(entry: &IndexEntry) -> InvoiceIdentity {
    // Entries are only built from valid codes and numbers.
    InvoiceIdentity {
        code: InvoiceCode::new(entry.code).expect("index holds a valid code"),
        number: InvoiceNumber::new(entry.number).expect("index holds a valid number"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::invoice::RedReference;
    use crate::journal::frame::{scan, RawRecord};
    use crate::journal::record::decode_issued;
    use crate::validate::tests::sample_request;
    use crate::validate::ItemError;
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

    #[test]
    fn adopts_only_segments_the_journal_does_not_know() {
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(100, 50)).unwrap();
        // The device reports what is left of a partially returned segment: known.
        assert!(!issuer.adopt_granted(&seller(), segment(120, 30)).unwrap());
        assert!(issuer.adopt_granted(&seller(), segment(150, 10)).unwrap());
        assert!(!issuer.adopt_granted(&seller(), segment(150, 10)).unwrap());
        assert_eq!(issuer.accounting(&seller()).unwrap().reserved, 60);
        assert_eq!(issuer.pending_control_records(), 2);
        let unknown = TaxpayerId::with_check_char(b"91310000775785552").unwrap();
        assert_eq!(
            issuer.adopt_granted(&unknown, segment(1, 1)),
            Err(ControlError::UnknownSeller)
        );
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

    fn run(
        issuer: &mut Issuer,
        now_ms: u64,
        requests: &[IssueRequest],
        journal: &mut Vec<u8>,
    ) -> Commit {
        let tick = issuer.begin_tick(now_ms, requests.to_vec()).unwrap();
        let codes = fake_codes(&tick);
        issuer.finish_tick(tick, &codes, journal).unwrap()
    }

    fn records(journal: &[u8]) -> Vec<RawRecord<'_>> {
        let mut out = Vec::new();
        scan::<()>(journal, |r| {
            out.push(r);
            Ok(())
        })
        .unwrap();
        out
    }

    fn ready() -> (Issuer, Vec<u8>) {
        let mut issuer = Issuer::new(config()).unwrap();
        issuer.add_segment(&seller(), segment(1, 10)).unwrap();
        (issuer, Vec::new())
    }

    fn red_of(original: &Invoice, order_id: &str, unit_price_fen: i64) -> IssueRequest {
        let mut r = sample_request(order_id, unit_price_fen);
        r.kind = InvoiceKind::Red(RedReference {
            original_code: original.code,
            original_number: original.number,
            original_order_id: original.request.order_id.clone(),
        });
        r
    }

    fn issued(answer: &Answer) -> &Invoice {
        match answer {
            Answer::Issued { invoice, .. } => invoice,
            other => panic!("not issued: {other:?}"),
        }
    }

    #[test]
    fn issues_in_order_and_journals_everything() {
        let (mut issuer, mut journal) = ready();
        let requests: Vec<_> = (0..3)
            .map(|i| sample_request(&format!("o-{i}"), 100 + i))
            .collect();
        let commit = run(&mut issuer, 5_000, &requests, &mut journal);
        assert_eq!(commit.seqs, 1..5);
        let recs = records(&journal);
        assert_eq!(recs[0].kind, RecordKind::SegmentReserved as u8);
        for (i, answer) in commit.answers.iter().enumerate() {
            let Answer::Issued { seq, invoice } = answer else {
                panic!("{answer:?}")
            };
            assert_eq!(invoice.number.get(), i as u32 + 1);
            assert_eq!(invoice.request, requests[i]);
            let rec = &recs[*seq as usize - 1];
            assert_eq!(rec.seq, *seq);
            assert_eq!(&decode_issued(rec.body).unwrap(), invoice);
        }
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.reserved, a.available, a.issued), (10, 7, 3));
        assert_eq!(issuer.next_seq(), 5);
    }

    #[test]
    fn replays_duplicates_and_conflicts() {
        let (mut issuer, mut journal) = ready();
        let r = sample_request("o-1", 100);
        let mut conflicting = r.clone();
        conflicting.buyer_name = "李四".into();
        let commit = run(
            &mut issuer,
            1_000,
            &[r.clone(), r.clone(), conflicting.clone()],
            &mut journal,
        );
        let first = issued(&commit.answers[0]).clone();
        let Answer::Issued { seq, .. } = commit.answers[0] else {
            unreachable!()
        };
        assert_eq!(
            commit.answers[1],
            Answer::Replay {
                seq,
                identity: first.identity()
            }
        );
        assert_eq!(
            commit.answers[2],
            Answer::Rejected(IssueError::IdempotencyConflict)
        );
        let commit = run(&mut issuer, 2_000, &[r.clone(), conflicting], &mut journal);
        assert_eq!(
            commit.answers[0],
            Answer::Replay {
                seq,
                identity: first.identity()
            }
        );
        assert_eq!(
            commit.answers[1],
            Answer::Rejected(IssueError::IdempotencyConflict)
        );
        assert_eq!(issuer.accounting(&seller()).unwrap().issued, 1);
        // After the retention window the order is forgotten and issued anew.
        let commit = run(&mut issuer, 20_000, &[r], &mut journal);
        assert_eq!(issued(&commit.answers[0]).number.get(), 2);
    }

    #[test]
    fn clock_going_backwards_keeps_issue_times_monotonic() {
        let (mut issuer, mut journal) = ready();
        let r = sample_request("o-1", 100);
        let first = run(&mut issuer, 1_000, std::slice::from_ref(&r), &mut journal);
        assert_eq!(issued(&first.answers[0]).issue_time_ms, 1_000);
        // An empty tick at 20 s expires the order (retention 10 s)...
        run(&mut issuer, 20_000, &[], &mut journal);
        assert!(issuer.index().is_empty());
        // ...and the clock steps back to 15 s: the new invoice is timed 20 s.
        let again = run(&mut issuer, 15_000, &[r], &mut journal);
        assert_eq!(issued(&again.answers[0]).issue_time_ms, 20_000);
        assert_eq!(issuer.clock_ms(), 20_000);
        let (recovered, _) = crate::journal::replay::recover(config(), &journal, 15_000).unwrap();
        let live: Vec<_> = issuer.index().entries().copied().collect();
        let back: Vec<_> = recovered.index().entries().copied().collect();
        assert_eq!(live, back);
        assert_eq!(recovered.clock_ms(), 20_000);
    }

    #[test]
    fn a_retry_in_a_later_tick_gets_the_answer_of_the_tick_in_flight() {
        let (mut issuer, mut journal) = ready();
        let a = sample_request("o-a", 100);
        let b = sample_request("o-b", 100);
        let mut b_changed = b.clone();
        b_changed.buyer_name = "someone else".into();
        let first = issuer
            .begin_tick(1_000, vec![a.clone(), b.clone()])
            .unwrap();
        // Retries of both orders, a conflicting request, and a new order.
        let c = sample_request("o-c", 100);
        let second = issuer
            .begin_tick(1_000, vec![a.clone(), b_changed, b.clone(), c])
            .unwrap();
        assert_eq!(
            second.outcomes()[..3],
            [
                Outcome::AwaitsEarlierTick { tick: first.id },
                Outcome::Rejected(IssueError::IdempotencyConflict),
                Outcome::AwaitsEarlierTick { tick: first.id },
            ]
        );
        assert_eq!(second.item_count(), 1, "only the new order takes a number");
        // The first tick's device refuses o-b's item.
        let mut codes = fake_codes(&first);
        codes[1] = Err(ItemError::NumberNotHeld);
        let one = issuer.finish_tick(first, &codes, &mut journal).unwrap();
        let codes = fake_codes(&second);
        let two = issuer.finish_tick(second, &codes, &mut journal).unwrap();
        let Answer::Issued { seq, invoice } = &one.answers[0] else {
            panic!("{:?}", one.answers[0])
        };
        assert_eq!(
            two.answers[0],
            Answer::Replay {
                seq: *seq,
                identity: invoice.identity()
            }
        );
        assert_eq!(
            two.answers[2],
            Answer::Rejected(IssueError::TaxCodeRefused(ItemError::NumberNotHeld))
        );
        assert_eq!(issued(&two.answers[3]).number.get(), 3);
        assert_eq!(
            two.seqs.start, one.seqs.end,
            "sequence numbers in tick order"
        );
        assert!(issuer.resolved.is_empty() && issuer.in_flight.is_empty());
    }

    #[test]
    fn reds_in_flight_in_an_earlier_tick_count_against_the_original() {
        let (mut issuer, mut journal) = ready();
        let original = run(
            &mut issuer,
            1_000,
            &[sample_request("o-1", 100)],
            &mut journal,
        );
        let original = issued(&original.answers[0]).clone();
        // Each red offsets 60 % of the original: one fits, two do not.
        let unit_price_fen = -(original.request.lines[0].unit_price_fen * 6 / 10);
        let first = issuer
            .begin_tick(2_000, vec![red_of(&original, "r-1", unit_price_fen)])
            .unwrap();
        let second = issuer
            .begin_tick(2_000, vec![red_of(&original, "r-2", unit_price_fen)])
            .unwrap();
        assert!(matches!(
            second.outcomes()[0],
            Outcome::Rejected(IssueError::RedExceedsOriginal { .. })
        ));
        // Once the first red is aborted, its claim is released.
        issuer.abort_tick(second).unwrap();
        issuer.abort_tick(first).unwrap();
        run(
            &mut issuer,
            3_000,
            &[red_of(&original, "r-2", unit_price_fen)],
            &mut journal,
        );
        assert!(issuer.in_flight_red_fen.is_empty());
    }

    /// Spoiled-number records of a journal: (number, reason).
    fn spoiled_numbers(journal: &[u8]) -> Vec<(u32, ItemError)> {
        records(journal)
            .iter()
            .filter(|r| r.kind == RecordKind::NumberSpoiled as u8)
            .map(|r| match Record::decode(r.kind, r.body).unwrap() {
                Record::NumberSpoiled {
                    identity, reason, ..
                } => (identity.number.get(), reason),
                other => unreachable!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_aborted_tick_spoils_its_numbers_and_journals_them() {
        let (mut issuer, mut journal) = ready();
        let requests: Vec<_> = (0..3)
            .map(|i| sample_request(&format!("o-{i}"), 100))
            .collect();
        let tick = issuer.begin_tick(1_000, requests.clone()).unwrap();
        // The device coded the items, then the answer was lost (timeout).
        let back = issuer.abort_tick(tick).unwrap();
        assert_eq!(back, requests, "abort hands the requests back unchanged");
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.in_flight, a.spoiled, a.available), (0, 3, 7));
        assert!(issuer.index().is_empty());
        assert_eq!(
            issuer.pending_control_records(),
            4,
            "reservation + 3 spoils"
        );
        // The retry takes fresh numbers; the spoils are journaled first, in take order.
        let commit = run(&mut issuer, 2_000, &back, &mut journal);
        let numbers: Vec<u32> = commit
            .answers
            .iter()
            .map(|a| issued(a).number.get())
            .collect();
        assert_eq!(numbers, vec![4, 5, 6]);
        assert_eq!(
            spoiled_numbers(&journal),
            vec![
                (1, ItemError::CommandFailed),
                (2, ItemError::CommandFailed),
                (3, ItemError::CommandFailed)
            ]
        );
        let (recovered, _) = crate::journal::replay::recover(config(), &journal, 2_000).unwrap();
        assert_eq!(
            recovered.accounting(&seller()),
            issuer.accounting(&seller())
        );
        assert_eq!(
            recovered.available_segments(&seller()),
            issuer.available_segments(&seller())
        );
    }

    #[test]
    fn a_wrong_count_of_tax_codes_spoils_the_numbers_too() {
        // The command was executed (an answer came back), so its numbers may be coded.
        let (mut issuer, mut journal) = ready();
        let tick = issuer
            .begin_tick(1_000, vec![sample_request("o-1", 100)])
            .unwrap();
        assert_eq!(
            issuer.finish_tick(tick, &[], &mut journal).unwrap_err(),
            TickError::TaxCodeCountMismatch {
                expected: 1,
                got: 0
            }
        );
        assert_eq!(issuer.accounting(&seller()).unwrap().spoiled, 1);
        run(&mut issuer, 2_000, &[], &mut journal);
        assert_eq!(
            spoiled_numbers(&journal),
            vec![(1, ItemError::CommandFailed)]
        );
    }

    #[test]
    fn aborting_an_older_tick_spoils_only_its_own_numbers() {
        let (mut issuer, mut journal) = ready();
        let before = issuer.accounting(&seller()).unwrap();
        let a = sample_request("o-a", 100);
        let first = issuer.begin_tick(1_000, vec![a.clone()]).unwrap();
        let second = issuer
            .begin_tick(1_000, vec![sample_request("o-2", 100)])
            .unwrap();
        // A retry of o-a waits for the first tick; o-3 is new.
        let third = issuer
            .begin_tick(1_000, vec![a.clone(), sample_request("o-3", 100)])
            .unwrap();
        assert_eq!(
            third.outcomes()[0],
            Outcome::AwaitsEarlierTick { tick: first.id }
        );
        issuer.abort_tick(second).unwrap();
        // Nothing is blocked: a tick may begin while the aborted one waits for the first.
        let fourth = issuer.begin_tick(1_000, Vec::new()).unwrap();
        assert_eq!(issuer.ticks_in_flight(), 4);
        issuer.abort_tick(first).unwrap();
        // Both aborted ticks are at the front now: their numbers are queued, in order.
        assert_eq!(issuer.ticks_in_flight(), 2);
        let codes = fake_codes(&third);
        let three = issuer.finish_tick(third, &codes, &mut journal).unwrap();
        assert_eq!(
            three.answers[0],
            Answer::Rejected(IssueError::TaxCodeRefused(ItemError::CommandFailed)),
            "the retry gets the failure of the tick it waited for"
        );
        assert_eq!(issued(&three.answers[1]).number.get(), 3);
        let four = issuer.finish_tick(fourth, &[], &mut journal).unwrap();
        assert!(four.seqs.is_empty());
        assert_eq!(
            spoiled_numbers(&journal),
            vec![(1, ItemError::CommandFailed), (2, ItemError::CommandFailed)]
        );
        let after = issuer.accounting(&seller()).unwrap();
        assert_eq!((after.in_flight, after.issued, after.spoiled), (0, 1, 2));
        assert_eq!(after.available, before.available - 3);
        assert!(issuer.resolved.is_empty() && issuer.in_flight.is_empty());
        // The retry of o-a takes a fresh number: never 1 again.
        let retry = run(&mut issuer, 2_000, &[a], &mut journal);
        assert_eq!(issued(&retry.answers[0]).number.get(), 4);
        let (recovered, _) = crate::journal::replay::recover(config(), &journal, 2_000).unwrap();
        assert_eq!(
            recovered.accounting(&seller()),
            issuer.accounting(&seller())
        );
    }

    #[test]
    fn a_later_aborted_tick_spoils_after_the_earlier_one_finishes() {
        let (mut issuer, mut journal) = ready();
        let first = issuer
            .begin_tick(1_000, vec![sample_request("o-1", 100)])
            .unwrap();
        let second = issuer
            .begin_tick(1_000, vec![sample_request("o-2", 100)])
            .unwrap();
        issuer.abort_tick(second).unwrap();
        assert_eq!(issuer.accounting(&seller()).unwrap().spoiled, 1);
        // Number 2 must not be journaled before number 1.
        assert_eq!(issuer.pending_control_records(), 1, "only the reservation");
        let codes = fake_codes(&first);
        let one = issuer.finish_tick(first, &codes, &mut journal).unwrap();
        assert_eq!(issued(&one.answers[0]).number.get(), 1);
        assert_eq!(issuer.pending_control_records(), 1, "the spoiled number 2");
        run(&mut issuer, 2_000, &[], &mut journal);
        assert_eq!(
            spoiled_numbers(&journal),
            vec![(2, ItemError::CommandFailed)]
        );
        crate::journal::replay::recover(config(), &journal, 2_000).unwrap();
    }

    #[test]
    fn cancel_gives_the_newest_ticks_numbers_back_exactly() {
        let (mut issuer, mut journal) = ready();
        let before = issuer.accounting(&seller()).unwrap();
        let requests: Vec<_> = (0..4)
            .map(|i| sample_request(&format!("o-{i}"), 100))
            .collect();
        let tick = issuer.begin_tick(1_000, requests.clone()).unwrap();
        assert_eq!(tick.item_count(), 4);
        assert_eq!(tick.requests(), &requests[..]);
        assert_eq!(issuer.accounting(&seller()).unwrap().in_flight, 4);
        // Later (empty) ticks may begin up to the bound.
        let later: Vec<Tick> = (1..TICKS_IN_FLIGHT_MAX)
            .map(|_| issuer.begin_tick(1_000, Vec::new()).unwrap())
            .collect();
        assert_eq!(
            issuer.begin_tick(1_000, Vec::new()).unwrap_err(),
            TickError::TickInFlight
        );
        for t in later.into_iter().rev() {
            issuer.cancel_tick(t).unwrap();
        }
        assert_eq!(issuer.ticks_in_flight(), 1);
        let back = issuer.cancel_tick(tick).unwrap();
        assert_eq!(back, requests, "cancel hands the requests back unchanged");
        assert_eq!(issuer.accounting(&seller()).unwrap(), before);
        assert!(issuer.index().is_empty());
        let commit = run(&mut issuer, 1_000, &back, &mut journal);
        let numbers: Vec<u32> = commit
            .answers
            .iter()
            .map(|a| issued(a).number.get())
            .collect();
        assert_eq!(numbers, vec![1, 2, 3, 4]);
        assert!(spoiled_numbers(&journal).is_empty());
    }

    #[test]
    fn cancelling_a_tick_that_is_not_the_newest_aborts_it() {
        let (mut issuer, mut journal) = ready();
        let first = issuer
            .begin_tick(1_000, vec![sample_request("o-1", 100)])
            .unwrap();
        let second = issuer
            .begin_tick(1_000, vec![sample_request("o-2", 100)])
            .unwrap();
        assert_eq!(issuer.cancel_tick(first), Err(TickError::NotNewest));
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.in_flight, a.spoiled), (1, 1));
        let codes = fake_codes(&second);
        let two = issuer.finish_tick(second, &codes, &mut journal).unwrap();
        assert_eq!(issued(&two.answers[0]).number.get(), 2);
        assert_eq!(
            spoiled_numbers(&journal),
            vec![(1, ItemError::CommandFailed)]
        );
    }

    #[test]
    fn issued_invoices_carry_their_own_request() {
        // Rejections, duplicates and conflicts between the new invoices: each invoice
        // must still get the request it was admitted for (the tick pairs items with
        // requests by index, without cloning).
        let (mut issuer, mut journal) = ready();
        let mut stranger = sample_request("o-x", 100);
        stranger.seller = TaxpayerId::parse("91110000600037341L").unwrap();
        let r0 = sample_request("o-0", 100);
        let mut conflicting = r0.clone();
        conflicting.buyer_name = "李四".into();
        let r1 = sample_request("o-1", 200);
        let r2 = sample_request("o-2", 300);
        let requests = vec![
            stranger,
            r0.clone(),
            r0.clone(),
            conflicting,
            r1.clone(),
            sample_request("o-3", 5_000_000),
            r2.clone(),
        ];
        let tick = issuer.begin_tick(1_000, requests).unwrap();
        let mut codes = fake_codes(&tick);
        codes[1] = Err(ItemError::NumberNotHeld);
        let commit = issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        assert_eq!(
            commit.answers[0],
            Answer::Rejected(IssueError::UnknownSeller)
        );
        assert_eq!(issued(&commit.answers[1]).request, r0);
        assert!(matches!(commit.answers[2], Answer::Replay { .. }));
        assert_eq!(
            commit.answers[3],
            Answer::Rejected(IssueError::IdempotencyConflict)
        );
        assert_eq!(
            commit.answers[4],
            Answer::Rejected(IssueError::TaxCodeRefused(ItemError::NumberNotHeld))
        );
        assert!(matches!(
            commit.answers[5],
            Answer::Rejected(IssueError::CeilingExceeded { .. })
        ));
        assert_eq!(issued(&commit.answers[6]).request, r2);
        let recs = records(&journal);
        for answer in [&commit.answers[1], &commit.answers[6]] {
            let Answer::Issued { seq, invoice } = answer else {
                unreachable!()
            };
            assert_eq!(
                &decode_issued(recs[*seq as usize - 1].body).unwrap(),
                invoice
            );
        }
    }

    #[test]
    fn refused_item_spoils_its_number() {
        let (mut issuer, mut journal) = ready();
        let requests: Vec<_> = (0..3)
            .map(|i| sample_request(&format!("o-{i}"), 100))
            .collect();
        let tick = issuer.begin_tick(1_000, requests.clone()).unwrap();
        let mut codes = fake_codes(&tick);
        codes[1] = Err(ItemError::NumberNotHeld);
        if let Ok((_, check)) = &mut codes[2] {
            check[0] = b'x';
        }
        let commit = issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        assert_eq!(
            commit.answers[1],
            Answer::Rejected(IssueError::TaxCodeRefused(ItemError::NumberNotHeld))
        );
        assert_eq!(
            commit.answers[2],
            Answer::Rejected(IssueError::TaxCodeRefused(ItemError::InvalidCheckCode))
        );
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.issued, a.spoiled, a.available), (1, 2, 7));
        let kinds: Vec<u8> = records(&journal).iter().map(|r| r.kind).collect();
        assert_eq!(kinds, vec![1, 3, 9, 9]);
        // A retry of the refused order takes a fresh number.
        let commit = run(&mut issuer, 2_000, &requests[1..2], &mut journal);
        assert_eq!(issued(&commit.answers[0]).number.get(), 4);
    }

    #[test]
    fn tick_protocol_errors() {
        let (mut issuer, mut journal) = ready();
        let (mut other, _) = ready();
        let tick = other.begin_tick(1, Vec::new()).unwrap();
        assert_eq!(
            issuer.finish_tick(tick, &[], &mut journal).unwrap_err(),
            TickError::NotInFlight
        );
        let many = vec![sample_request("o", 1); 65];
        assert!(matches!(
            issuer.begin_tick(1, many.clone()),
            Err(TickError::TooManyRequests { count: 65, max: 64 })
        ));
        let tick = issuer.begin_tick(1, many[..2].to_vec()).unwrap();
        assert_eq!(
            issuer.finish_tick(tick, &[], &mut journal).unwrap_err(),
            TickError::TaxCodeCountMismatch {
                expected: 1,
                got: 0
            }
        );
        assert!(journal.is_empty());
        // The answer came back, so the command ran: its one number is spoiled.
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.available, a.spoiled), (9, 1));
        assert!(!issuer.tick_in_flight());
    }

    #[test]
    fn red_rules() {
        let (mut issuer, mut journal) = ready();
        let blue = sample_request("blue", 1_000); // total 3,270
        let commit = run(&mut issuer, 1_000, &[blue], &mut journal);
        let original = issued(&commit.answers[0]).clone();
        let mut unknown = red_of(&original, "r0", -100);
        if let InvoiceKind::Red(r) = &mut unknown.kind {
            r.original_order_id = "nope".into();
        }
        let mut mismatch = red_of(&original, "r1", -100);
        if let InvoiceKind::Red(r) = &mut mismatch.kind {
            r.original_number = InvoiceNumber::new(9).unwrap();
        }
        let too_much = red_of(&original, "r2", -1_001);
        let part1 = red_of(&original, "r3", -600); // |total| 1,962
        let part2 = red_of(&original, "r4", -400); // 1,308: cumulative 3,270 = original
        let part3 = red_of(&original, "r5", -1);
        let commit = run(
            &mut issuer,
            2_000,
            &[unknown, mismatch, too_much, part1, part2, part3],
            &mut journal,
        );
        assert_eq!(
            commit.answers[0],
            Answer::Rejected(IssueError::RedOriginalUnknown)
        );
        assert_eq!(
            commit.answers[1],
            Answer::Rejected(IssueError::RedOriginalMismatch)
        );
        assert!(matches!(
            commit.answers[2],
            Answer::Rejected(IssueError::RedExceedsOriginal { .. })
        ));
        let red = issued(&commit.answers[3]).clone();
        issued(&commit.answers[4]);
        assert_eq!(
            commit.answers[5],
            Answer::Rejected(IssueError::RedExceedsOriginal {
                red_fen: 3,
                remaining_fen: 0
            })
        );
        let red_of_red = red_of(&red, "r6", -1);
        let commit = run(&mut issuer, 3_000, &[red_of_red], &mut journal);
        assert_eq!(commit.answers[0], Answer::Rejected(IssueError::RedOfRed));
    }

    #[test]
    fn ceiling_seller_and_empty_pool() {
        let mut issuer = Issuer::new(config()).unwrap();
        let mut journal = Vec::new();
        let mut stranger = sample_request("o-2", 100);
        stranger.seller = TaxpayerId::parse("91110000600037341L").unwrap();
        let requests = [
            sample_request("o-1", 100),
            stranger,
            sample_request("o-3", 5_000_000),
        ];
        let tick = issuer.begin_tick(1, requests.to_vec()).unwrap();
        assert_eq!(tick.refill_requests().len(), 1);
        assert_eq!(tick.refill_requests()[0].count, 50);
        let codes = fake_codes(&tick);
        let commit = issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        assert_eq!(
            commit.answers[0],
            Answer::Rejected(IssueError::NoNumbersAvailable)
        );
        assert_eq!(
            commit.answers[1],
            Answer::Rejected(IssueError::UnknownSeller)
        );
        assert!(matches!(
            commit.answers[2],
            Answer::Rejected(IssueError::CeilingExceeded { .. })
        ));
        // The refill is not repeated until a segment arrives.
        let tick = issuer.begin_tick(2, Vec::new()).unwrap();
        assert!(tick.refill_requests().is_empty());
        issuer.abort_tick(tick).unwrap();
        issuer.add_segment(&seller(), segment(1, 3)).unwrap();
        let tick = issuer.begin_tick(3, requests[..1].to_vec()).unwrap();
        assert!(
            tick.refill_requests().is_empty(),
            "3 - 1 is not below watermark 2"
        );
        let codes = fake_codes(&tick);
        issuer.finish_tick(tick, &codes, &mut journal).unwrap();
        let tick = issuer
            .begin_tick(4, vec![sample_request("o-4", 100)])
            .unwrap();
        assert_eq!(tick.refill_requests().len(), 1, "3 - 2 < watermark 2");
        issuer.abort_tick(tick).unwrap();
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
    fn control_records_and_returns() {
        let (mut issuer, mut journal) = ready();
        run(&mut issuer, 1, &[sample_request("o", 1)], &mut journal);
        issuer.queue_uploaded_to(2).unwrap();
        assert_eq!(issuer.queue_uploaded_to(9), Err(ControlError::BadSeq));
        assert_eq!(
            issuer.queue_uploaded_to(1),
            Err(ControlError::BadSeq),
            "a queued watermark is not overtaken backwards"
        );
        issuer.queue_batch_root(1, 2, [1; 32], [2; 64]).unwrap();
        assert_eq!(
            issuer.queue_batch_root(2, 2, [1; 32], [2; 64]),
            Err(ControlError::BadSeq)
        );
        assert_eq!(
            issuer.return_unused(&seller()).unwrap(),
            vec![segment(2, 9)]
        );
        assert_eq!(issuer.pending_control_records(), 3);
        let commit = run(&mut issuer, 2, &[], &mut journal);
        assert_eq!(commit.seqs, 3..6);
        assert_eq!(issuer.upload_watermark_seq(), 2);
        assert_eq!(issuer.batch_root_last_seq(), 2);
        let a = issuer.accounting(&seller()).unwrap();
        assert_eq!((a.issued, a.returned, a.available), (1, 9, 0));
        let (mut recovered, _) = crate::journal::replay::recover(config(), &journal, 2).unwrap();
        assert_eq!(recovered.upload_watermark_seq(), 2);
        assert_eq!(recovered.batch_root_last_seq(), 2);
        assert_eq!(
            recovered.accounting(&seller()),
            issuer.accounting(&seller())
        );
        assert_eq!(recovered.queue_uploaded_to(1), Err(ControlError::BadSeq));
        assert_eq!(
            recovered.queue_batch_root(1, 3, [0; 32], [0; 64]),
            Err(ControlError::BadSeq)
        );
        recovered.queue_batch_root(3, 5, [0; 32], [0; 64]).unwrap();
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
