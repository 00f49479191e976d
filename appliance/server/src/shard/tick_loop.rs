//! The tick loop: waits for batches, tax codes of the oldest tick in flight, held
//! batches becoming ready or shutdown; gathers waiting batches into a tick, begins it
//! (its tax codes go out), and finishes ticks in the order they began, handing their
//! journal bytes and answers to the committer.

use super::answers::answer_all;
use super::committer::{seal_tick, CommitJob};
use super::tax_server::CodesTask;
use super::{internal, micros, BatchSlot, Message, Shard, ShardConfig, ShardError};
use super::{IssueFailure, JOURNAL_BLOCK_BYTES};
use crate::metrics::{ShardMetrics, Stage};
use appliance_core::journal::frame::begin_commit;
use appliance_core::{IndexFill, IssueError, IssueRequest, Outcome, TaxCodeResult, Tick};
use glommio::channels::local_channel::LocalSender;
use std::collections::VecDeque;
use std::time::Instant;

impl Shard {
    /// The tick loop. On an error, the requests of the ticks in flight and of a batch held
    /// over for the next tick are answered with [`IssueFailure::ShardStopped`].
    pub(super) async fn serve(
        &mut self,
        config: &ShardConfig,
        rx: &flume::Receiver<Message>,
        shutdown: &flume::Receiver<()>,
        commit_tx: &LocalSender<CommitJob>,
    ) -> Result<(), ShardError> {
        // Ticks whose tax codes are out, oldest first; they finish in this order.
        let mut pipeline: VecDeque<TickInFlight> = VecDeque::new();
        let mut carry: Option<Message> = None;
        let served = self
            .serve_loop(config, rx, shutdown, commit_tx, &mut pipeline, &mut carry)
            .await;
        if let Err(e) = &served {
            let failure = IssueFailure::ShardStopped(e.to_string());
            for tick in pipeline {
                answer_all(tick.slots, failure.clone());
            }
            if let Some(Message::Issue {
                requests, reply, ..
            }) = carry
            {
                reply.send(vec![Err(failure.clone()); requests.len()]);
            }
            self.fail_held(&failure);
        }
        served
    }

    async fn serve_loop(
        &mut self,
        config: &ShardConfig,
        rx: &flume::Receiver<Message>,
        shutdown: &flume::Receiver<()>,
        commit_tx: &LocalSender<CommitJob>,
        pipeline: &mut VecDeque<TickInFlight>,
        carry: &mut Option<Message>,
    ) -> Result<(), ShardError> {
        let tick_max = config.issuer.tick_requests_max as usize;
        let depth = config
            .ticks_in_flight
            .clamp(1, appliance_core::issuer::TICKS_IN_FLIGHT_MAX);
        let mut stopping = false;
        loop {
            let event = if pipeline.len() >= depth {
                Event::Codes(oldest_codes(pipeline).await)
            } else if let Some(message) = carry.take() {
                Event::Message(message)
            } else if self.red.has_ready() {
                Event::Ready
            } else if stopping {
                // Serve what is already queued, then end. Peers' endpoints may still hold
                // this inbox, so "every sender dropped" cannot be waited for.
                match rx.try_recv() {
                    Ok(message) => Event::Message(message),
                    Err(_) if pipeline.is_empty() && !self.red.holds() => return Ok(()),
                    // Held batches' claim answers come through the inbox.
                    Err(_) if pipeline.is_empty() => match rx.recv_async().await {
                        Ok(message) => Event::Message(message),
                        Err(_) => return Ok(()),
                    },
                    Err(_) => Event::Codes(oldest_codes(pipeline).await),
                }
            } else {
                let message = async {
                    match rx.recv_async().await {
                        Ok(message) => Event::Message(message),
                        Err(_) => Event::Closed, // every sender dropped
                    }
                };
                let stop = async {
                    let _ = shutdown.recv_async().await;
                    Event::Stop
                };
                match pipeline.front_mut() {
                    None => futures_lite::future::or(message, stop).await,
                    // With a tick out, a new batch starts the next tick at once rather
                    // than waiting behind this one's tax codes.
                    Some(oldest) => {
                        let codes = async { Event::Codes(oldest.codes().await) };
                        futures_lite::future::or(codes, futures_lite::future::or(message, stop))
                            .await
                    }
                }
            };
            let first = match event {
                Event::Message(message) => Some(message),
                Event::Ready => None,
                Event::Closed if pipeline.is_empty() && !self.red.holds() => return Ok(()),
                Event::Closed | Event::Stop => {
                    stopping = true;
                    continue;
                }
                Event::Codes(codes) => {
                    // A failed tick is aborted (its numbers spoiled); the ticks begun
                    // after it are unaffected and finish in turn.
                    let oldest = pipeline.pop_front().expect("a tick is in flight");
                    self.finish_and_commit(oldest, codes, commit_tx).await?;
                    continue;
                }
            };
            // Gather every batch already waiting, up to the tick bound.
            let mut batches: Vec<(Vec<IssueRequest>, BatchSlot)> = Vec::new();
            let mut count = 0usize;
            // Batches held for red claims arrived before the messages below.
            self.take_ready(&mut batches, &mut count, tick_max);
            let mut next = first;
            if count >= tick_max {
                // The tick is full already: the message starts the next one.
                *carry = next.take();
            }
            while let Some(message) = next.take() {
                match message {
                    Message::Metrics { reply } => {
                        let _ = reply.send(self.metrics_snapshot());
                    }
                    Message::RedClaim { claim, reply } => self.on_red_claim(claim, reply),
                    Message::ClaimsDone { id, outcomes } => self.on_claims_done(id, outcomes),
                    Message::Issue {
                        requests,
                        reply,
                        enqueued,
                    } => {
                        // `submit` refuses batches above the tick bound, so every batch
                        // fits into an empty tick.
                        debug_assert!(requests.len() <= tick_max);
                        if count + requests.len() > tick_max && count > 0 {
                            *carry = Some(Message::Issue {
                                requests,
                                reply,
                                enqueued,
                            });
                            break;
                        }
                        let len = requests.len();
                        let slot = BatchSlot {
                            len,
                            reply,
                            enqueued,
                        };
                        // A batch with reds whose originals live on other shards waits
                        // for their claims, off the tick loop (`shard::red`).
                        if let Some((requests, slot)) = self.hold_for_claims(requests, slot) {
                            count += len;
                            batches.push((requests, slot));
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            self.apply_refills()?;
            if batches.is_empty() {
                // Queued control records ride on the next tick's commit when one is out.
                if pipeline.is_empty() {
                    if let Some(job) = self.empty_tick()? {
                        self.send_commit(commit_tx, job).await?;
                    }
                }
            } else {
                let tick = self.start_tick(batches, count, pipeline, commit_tx).await?;
                pipeline.push_back(tick);
            }
        }
    }

    /// The shard's metrics with the idempotency index gauges read now.
    fn metrics_snapshot(&self) -> ShardMetrics {
        let mut metrics = self.metrics.borrow().clone();
        let index = self.issuer.index();
        metrics.index_entries = u64::from(index.len());
        metrics.index_capacity = u64::from(index.capacity());
        metrics.index_full_refusals = self.issuer.index_full_refusals();
        metrics
    }

    /// Logs the idempotency index's fill step when it changed (once per tick at most,
    /// nothing per request): a warning at 80 % and 95 %, an error once per episode of
    /// `IndexFull` refusals, a note when expiry brings it back down.
    fn report_index_fill(&mut self) {
        let before = self.issuer.index_fill();
        let Some(step) = self.issuer.index_fill_change() else {
            return;
        };
        let index = self.issuer.index();
        let (entries, capacity) = (index.len(), index.capacity());
        match step {
            IndexFill::Full => tracing::error!(
                shard = self.id,
                entries,
                capacity,
                "idempotency index full: new orders refused (IndexFull) until orders expire; raise limits.index_capacity_orders (sizing: docs/operations.md)"
            ),
            _ if step > before => tracing::warn!(
                shard = self.id,
                entries,
                capacity,
                "idempotency index {} full; raise limits.index_capacity_orders before it fills (sizing: docs/operations.md)",
                if step == IndexFill::Above95 { "95 %" } else { "80 %" }
            ),
            _ => tracing::info!(
                shard = self.id,
                entries,
                capacity,
                ?step,
                "idempotency index fill fell back (orders expired)"
            ),
        }
    }

    /// Begins a tick and sends its tax-code commands; [`Shard::finish`] takes it from
    /// there once the codes are in. A pool that ran dry while its refill is on the way
    /// waits for the segment (after finishing the ticks in `pipeline`, whose answers
    /// would otherwise wait too) rather than refuse requests it could serve.
    async fn start_tick(
        &mut self,
        batches: Vec<(Vec<IssueRequest>, BatchSlot)>,
        count: usize,
        pipeline: &mut VecDeque<TickInFlight>,
        commit_tx: &LocalSender<CommitJob>,
    ) -> Result<TickInFlight, ShardError> {
        let tick_start = Instant::now();
        let mut requests: Vec<IssueRequest> = Vec::new();
        let mut slots = Vec::with_capacity(batches.len());
        {
            let mut metrics = self.metrics.borrow_mut();
            for (batch, slot) in batches {
                metrics.record(
                    Stage::QueueWait,
                    micros(tick_start - slot.enqueued),
                    slot.len as u64,
                );
                if requests.is_empty() {
                    // The first batch's vector becomes the tick's: a bulk tick is one
                    // batch of ~200 KB of requests, not worth copying.
                    requests = batch;
                    requests.reserve(count - requests.len());
                } else {
                    requests.extend(batch);
                }
                slots.push(slot);
            }
        }
        // The tick owns the requests; an abort hands them back for the retry below.
        let mut tick = self
            .issuer
            .begin_tick(self.clock.now_ms(), requests)
            .map_err(|e| internal(self.id, e))?;
        self.report_index_fill();
        self.spawn_refills(tick.refill_requests());
        let starved = |tick: &Tick| {
            tick.outcomes()
                .iter()
                .any(|o| matches!(o, Outcome::Rejected(IssueError::NoNumbersAvailable)))
        };
        if starved(&tick) && self.refills_in_flight > 0 {
            // The newest tick, its command not sent: cancelling gives its numbers back.
            let requests = self
                .issuer
                .cancel_tick(tick)
                .map_err(|e| internal(self.id, e))?;
            self.drain(pipeline, commit_tx).await?;
            while self.wait_for_refill().await? {
                if self.refills_in_flight == 0 {
                    break;
                }
            }
            tick = self
                .issuer
                .begin_tick(self.clock.now_ms(), requests)
                .map_err(|e| internal(self.id, e))?;
            self.spawn_refills(tick.refill_requests());
        }
        let codes = if tick.item_count() == 0 {
            None
        } else {
            Some(self.tax_codes(&tick))
        };
        Ok(TickInFlight {
            tick,
            slots,
            count,
            codes,
        })
    }

    /// Finishes every tick in `pipeline`, oldest first, and hands them to the committer:
    /// [`Shard::start_tick`] needs them out of the way before it waits for a refill.
    async fn drain(
        &mut self,
        pipeline: &mut VecDeque<TickInFlight>,
        commit_tx: &LocalSender<CommitJob>,
    ) -> Result<(), ShardError> {
        while let Some(mut oldest) = pipeline.pop_front() {
            let codes = oldest.codes().await;
            self.finish_and_commit(oldest, codes, commit_tx).await?;
        }
        Ok(())
    }

    /// [`Shard::finish`], then the tick's job to the committer.
    async fn finish_and_commit(
        &mut self,
        in_flight: TickInFlight,
        codes: Result<Vec<TaxCodeResult>, String>,
        commit_tx: &LocalSender<CommitJob>,
    ) -> Result<(), ShardError> {
        match self.finish(in_flight, codes)? {
            Some(job) => self.send_commit(commit_tx, job).await,
            None => Ok(()),
        }
    }

    /// Ends a tick with its tax codes: its journal bytes and answers for the committer,
    /// or `None` if the tick was aborted (its requests answered with the failure).
    fn finish(
        &mut self,
        in_flight: TickInFlight,
        codes: Result<Vec<TaxCodeResult>, String>,
    ) -> Result<Option<CommitJob>, ShardError> {
        let TickInFlight {
            tick, slots, count, ..
        } = in_flight;
        let codes = match codes {
            Ok(codes) => codes,
            Err(message) => {
                tracing::warn!(shard = self.id, %message, "tax codes failed; tick aborted, its numbers spoiled");
                // The device may have coded the items: the numbers are spoiled (journaled
                // with the next commit), never reused. Later ticks are unaffected.
                self.issuer
                    .abort_tick(tick)
                    .map_err(|e| internal(self.id, e))?;
                self.metrics.borrow_mut().rejected_requests += count as u64;
                answer_all(slots, IssueFailure::TaxServer(message));
                return Ok(None);
            }
        };
        let mut bytes =
            Vec::with_capacity(tick.canonical_bytes() + count * 128 + JOURNAL_BLOCK_BYTES);
        let start = begin_commit(&mut bytes);
        let commit = self
            .issuer
            .finish_tick(tick, &codes, &mut bytes)
            .map_err(|e| internal(self.id, e))?;
        self.report_index_fill();
        seal_tick(&mut bytes, start, &commit.seqs).map_err(|e| internal(self.id, e))?;
        {
            let mut metrics = self.metrics.borrow_mut();
            metrics.ticks += 1;
            metrics.tick_invoices_max = metrics.tick_invoices_max.max(count as u64);
        }
        Ok(Some(CommitJob {
            bytes,
            records: commit.journal_range,
            seqs: commit.seqs,
            answers: commit.answers,
            slots,
            claim_replies: std::mem::take(&mut self.red.replies),
        }))
    }
}

/// What the tick loop woke up for.
enum Event {
    /// A message from the inbox.
    Message(Message),
    /// The tax codes of the oldest tick in flight.
    Codes(Result<Vec<TaxCodeResult>, String>),
    /// Shutdown requested.
    Stop,
    /// Every sender of the inbox dropped.
    Closed,
    /// Batches held for red claims can join a tick.
    Ready,
}

/// The tax codes of the oldest tick in `pipeline`, waiting for them if needed.
async fn oldest_codes(pipeline: &mut VecDeque<TickInFlight>) -> Result<Vec<TaxCodeResult>, String> {
    pipeline
        .front_mut()
        .expect("a tick is in flight")
        .codes()
        .await
}

/// A tick whose tax codes are out.
struct TickInFlight {
    tick: Tick,
    slots: Vec<BatchSlot>,
    count: usize,
    /// The commands' task; `None` if no item needs a code (replays and refusals only).
    codes: Option<CodesTask>,
}

impl TickInFlight {
    /// The tax codes, waiting for them if needed. Dropped before it completes (the tick
    /// loop races it against new batches), it leaves the task running for a later call;
    /// once it has completed, the tick is taken out of the pipeline and never asked again.
    async fn codes(&mut self) -> Result<Vec<TaxCodeResult>, String> {
        match self.codes.as_mut() {
            Some(task) => task.await,
            None => Ok(Vec::new()),
        }
    }
}
