//! The tick state machine: `begin_tick` / `finish_tick` / `abort_tick` / `cancel_tick`,
//! and the ticks in flight (see the module docs of [`crate::issuer`] for the design).

use std::ops::Range;

use super::{InFlight, Issuer, Resolved, TickError, TICKS_IN_FLIGHT_MAX};
use crate::canonical;
use crate::idempotency::{
    issue_time_s, key_fingerprint, request_digest, FingerprintMap, IndexEntry,
};
use crate::invoice::{Invoice, InvoiceIdentity, InvoiceKind, IssueRequest};
use crate::journal::frame::{encode_record, encode_record_with};
use crate::journal::record::{encode_issued, is_check_code, Record, RecordKind};
use crate::pool::RefillRequest;
use crate::taxpayer::{InvoiceCode, InvoiceNumber};
use crate::validate::{check_request, IssueError, ItemError};

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

impl Issuer {
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

pub(crate) fn entry_identity(entry: &IndexEntry) -> InvoiceIdentity {
    // Entries are only built from valid codes and numbers.
    InvoiceIdentity {
        code: InvoiceCode::new(entry.code).expect("index holds a valid code"),
        number: InvoiceNumber::new(entry.number).expect("index holds a valid number"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::RedReference;
    use crate::issuer::tests::{config, fake_codes, ready, run, segment, seller};
    use crate::journal::frame::{scan, RawRecord};
    use crate::journal::record::decode_issued;
    use crate::taxpayer::TaxpayerId;
    use crate::validate::tests::sample_request;

    fn records(journal: &[u8]) -> Vec<RawRecord<'_>> {
        let mut out = Vec::new();
        scan::<()>(journal, |r| {
            out.push(r);
            Ok(())
        })
        .unwrap();
        out
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
}
