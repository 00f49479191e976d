//! One shard: a glommio executor pinned to a core that owns an issuer (number pools,
//! idempotency index), a journal and a connection to the tax server, and issues batches
//! handed to it through an in-process API ([`ShardHandle`]).
//!
//! A tick takes every batch waiting (up to `tick_requests_max` requests), gets all tax
//! codes of the tick in one TaxCodes command, writes all of the tick's records with one
//! O_DIRECT write and one fdatasync, and only then answers. Under load ticks grow and the
//! fixed costs (one HSM round trip, one fdatasync) are shared by more invoices.
//!
//! Failure policy:
//! - tax server unreachable or refusing a whole command: the tick is aborted (numbers go
//!   back to the pool, nothing journaled) and its requests get [`IssueFailure::TaxServer`],
//!   which is safe to retry;
//! - journal write or fdatasync failure: the shard stops (fail-stop; see
//!   `journal::JournalError::Poisoned`); requests get [`IssueFailure::ShardStopped`] and
//!   a restart recovers from what is on disk.

use crate::journal::{Journal, JournalConfig, JournalError, OpenError};
use crate::metrics::{ShardMetrics, Stage};
use appliance_core::journal::frame::pad_to_block;
use appliance_core::journal::record::{decode_issued, RecordError};
use appliance_core::journal::replay::{Recovery, RecoveryError};
use appliance_core::pool::RefillRequest;
use appliance_core::taxpayer::IdentityError;
use appliance_core::{
    Answer, Invoice, InvoiceCode, InvoiceNumber, IssueError, IssueRequest, Issuer, IssuerConfig,
    ItemError, NumberSegment, TaxCodeResult, TaxpayerId,
};
use glommio::{LocalExecutorBuilder, Placement};
use hsm_driver::proto::{
    InventoryScope, InvoiceBatch, Request, Response, Segment, TaxCodeItem, TaxCodeStatus,
};
use hsm_driver::tcp::{HsmError, TcpClient, TcpClientConfig};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Journal writes are padded to this block size (O_DIRECT alignment).
pub const JOURNAL_BLOCK_BYTES: usize = 4096;
/// Batches waiting in a shard's inbox; senders block (or wait) beyond it.
pub const INBOX_BATCHES_MAX: usize = 1024;
/// Bytes of io_uring buffer memory per shard executor. glommio locks this memory; the
/// machine's memlock limit (8 MiB here) is shared by all shards of the process, so keep
/// it small: journal writes use their own DMA buffers, not this pool.
pub const IO_MEMORY_BYTES: usize = 512 * 1024;

/// Settings of one shard.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Issuer settings (shard id, taxpayers, limits).
    pub issuer: IssuerConfig,
    /// The shard's journal.
    pub journal: JournalConfig,
    /// CPU to pin the executor to; `None` leaves it unpinned.
    pub cpu: Option<usize>,
    /// Tax-server address.
    pub hsm_addr: SocketAddr,
    /// Tax-server client settings.
    pub hsm: TcpClientConfig,
}

/// Why a request got no invoice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueFailure {
    /// The request was refused by validation or by the rules; retrying it unchanged is
    /// refused again.
    #[error("rejected: {0}")]
    Rejected(IssueError),
    /// The tax server could not be asked; nothing was issued, retrying is safe.
    #[error("tax server unavailable: {0}")]
    TaxServer(String),
    /// The shard stopped (journal failure or shutdown); retry after restart.
    #[error("shard stopped: {0}")]
    ShardStopped(String),
}

/// Result of one request.
pub type IssueResult = Result<Invoice, IssueFailure>;

/// Why a shard could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Invalid issuer configuration.
    #[error("shard {shard}: configuration: {message}")]
    Config {
        /// Shard id.
        shard: u32,
        /// Detail.
        message: String,
    },
    /// The journal could not be opened or recovered.
    #[error("shard {shard}: journal: {message}")]
    Journal {
        /// Shard id.
        shard: u32,
        /// Detail (names file and offset for corruption).
        message: String,
    },
    /// The tax server could not be reached or refused a start-up command.
    #[error("shard {shard}: tax server: {message}")]
    TaxServer {
        /// Shard id.
        shard: u32,
        /// Detail.
        message: String,
    },
    /// The executor could not be started.
    #[error("shard {shard}: executor: {message}")]
    Executor {
        /// Shard id.
        shard: u32,
        /// Detail.
        message: String,
    },
    /// A batch larger than the shard's tick bound.
    #[error("batch of {count} requests exceeds the bound of {max}")]
    BatchTooLarge {
        /// Requests in the batch.
        count: usize,
        /// `tick_requests_max` of the shard.
        max: usize,
    },
    /// The shard is no longer running.
    #[error("shard {shard} stopped")]
    Stopped {
        /// Shard id.
        shard: u32,
    },
}

enum Message {
    Issue {
        requests: Vec<IssueRequest>,
        reply: flume::Sender<Vec<IssueResult>>,
        enqueued: Instant,
    },
    Metrics {
        reply: flume::Sender<ShardMetrics>,
    },
}

/// Handle to a running shard, usable from any thread.
#[derive(Debug)]
pub struct ShardHandle {
    shard_id: u32,
    batch_requests_max: usize,
    tx: Option<flume::Sender<Message>>,
    join: Option<glommio::ExecutorJoinHandle<Result<(), ShardError>>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Issue { requests, .. } => write!(f, "Issue({} requests)", requests.len()),
            Message::Metrics { .. } => write!(f, "Metrics"),
        }
    }
}

impl ShardHandle {
    /// Starts the shard and waits until it has recovered its journal, reached the tax
    /// server, adopted segments granted to it and filled its pools: when this returns
    /// `Ok`, the shard serves.
    pub fn spawn(config: ShardConfig) -> Result<ShardHandle, ShardError> {
        let shard_id = config.issuer.shard_id;
        let batch_requests_max = config.issuer.tick_requests_max as usize;
        let (tx, rx) = flume::bounded(INBOX_BATCHES_MAX);
        let (ready_tx, ready_rx) = flume::bounded(1);
        let placement = match config.cpu {
            Some(cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let join = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{shard_id}"))
            .io_memory(IO_MEMORY_BYTES)
            .spawn(move || async move { run(config, rx, ready_tx).await })
            .map_err(|e| ShardError::Executor {
                shard: shard_id,
                message: e.to_string(),
            })?;
        match ready_rx.recv() {
            Ok(()) => Ok(ShardHandle {
                shard_id,
                batch_requests_max,
                tx: Some(tx),
                join: Some(join),
            }),
            Err(_) => {
                // The shard ended before it was ready: its result says why.
                let result = join.join();
                Err(match result {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => ShardError::Stopped { shard: shard_id },
                    Err(e) => ShardError::Executor {
                        shard: shard_id,
                        message: e.to_string(),
                    },
                })
            }
        }
    }

    /// Shard id.
    pub fn shard_id(&self) -> u32 {
        self.shard_id
    }

    /// Queues a batch; the receiver yields one result per request, in order, once the
    /// batch's tick is durable. Blocks while the inbox is full (back-pressure). A batch
    /// larger than the shard's `tick_requests_max` is refused whole.
    pub fn submit(
        &self,
        requests: Vec<IssueRequest>,
    ) -> Result<flume::Receiver<Vec<IssueResult>>, ShardError> {
        if requests.len() > self.batch_requests_max {
            return Err(ShardError::BatchTooLarge {
                count: requests.len(),
                max: self.batch_requests_max,
            });
        }
        let (reply, rx) = flume::bounded(1);
        self.sender()?
            .send(Message::Issue {
                requests,
                reply,
                enqueued: Instant::now(),
            })
            .map_err(|_| ShardError::Stopped {
                shard: self.shard_id,
            })?;
        Ok(rx)
    }

    /// Issues a batch and waits for its results.
    pub fn issue(&self, requests: Vec<IssueRequest>) -> Result<Vec<IssueResult>, ShardError> {
        self.submit(requests)?
            .recv()
            .map_err(|_| ShardError::Stopped {
                shard: self.shard_id,
            })
    }

    /// A snapshot of the shard's latency histograms and counters.
    pub fn metrics(&self) -> Result<ShardMetrics, ShardError> {
        let (reply, rx) = flume::bounded(1);
        self.sender()?
            .send(Message::Metrics { reply })
            .map_err(|_| ShardError::Stopped {
                shard: self.shard_id,
            })?;
        rx.recv().map_err(|_| ShardError::Stopped {
            shard: self.shard_id,
        })
    }

    /// Stops accepting batches, lets the shard finish the ones queued, and waits for it.
    pub fn shutdown(mut self) -> Result<(), ShardError> {
        self.stop()
    }

    fn sender(&self) -> Result<&flume::Sender<Message>, ShardError> {
        self.tx.as_ref().ok_or(ShardError::Stopped {
            shard: self.shard_id,
        })
    }

    fn stop(&mut self) -> Result<(), ShardError> {
        self.tx.take();
        match self.join.take() {
            Some(join) => join.join().map_err(|e| ShardError::Executor {
                shard: self.shard_id,
                message: e.to_string(),
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for ShardHandle {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Milliseconds since the Unix epoch, never going backwards within a shard: issue times
/// must not decrease along the journal even if the wall clock is stepped back.
struct ShardClock {
    last_ms: u64,
}

impl ShardClock {
    fn now_ms(&mut self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_ms = self.last_ms.max(wall);
        self.last_ms
    }
}

/// A requisition finished by a background task, applied before the next tick.
struct RefillDone {
    seller: TaxpayerId,
    result: Result<NumberSegment, String>,
}

struct Shard {
    id: u32,
    issuer: Issuer,
    journal: Journal,
    hsm: Rc<TcpClient>,
    clock: ShardClock,
    metrics: ShardMetrics,
    refills: Rc<RefCell<Vec<RefillDone>>>,
    journal_buf: Vec<u8>,
}

async fn run(
    config: ShardConfig,
    rx: flume::Receiver<Message>,
    ready: flume::Sender<()>,
) -> Result<(), ShardError> {
    let mut shard = start(&config).await?;
    let _ = ready.send(());
    drop(ready);
    shard.serve(&config, rx).await
}

async fn start(config: &ShardConfig) -> Result<Shard, ShardError> {
    let id = config.issuer.shard_id;
    let mut recovery = Recovery::new(config.issuer.clone()).map_err(|e| ShardError::Config {
        shard: id,
        message: e.to_string(),
    })?;
    let journal = Journal::open(config.journal.clone(), |record| recovery.apply(&record))
        .await
        .map_err(|e: OpenError<RecoveryError>| ShardError::Journal {
            shard: id,
            message: e.to_string(),
        })?;
    let mut clock = ShardClock { last_ms: 0 };
    let issuer = recovery.finish(clock.now_ms());
    if issuer.next_seq() != journal.next_seq() {
        return Err(ShardError::Journal {
            shard: id,
            message: format!(
                "recovered issuer expects sequence {} but the journal continues at {}",
                issuer.next_seq(),
                journal.next_seq()
            ),
        });
    }
    let hsm = TcpClient::connect(config.hsm_addr, config.hsm)
        .await
        .map_err(|e| ShardError::TaxServer {
            shard: id,
            message: e.to_string(),
        })?;
    let mut shard = Shard {
        id,
        issuer,
        journal,
        hsm: Rc::new(hsm),
        clock,
        metrics: ShardMetrics::new(id),
        refills: Rc::new(RefCell::new(Vec::new())),
        journal_buf: Vec::with_capacity(1 << 20),
    };
    shard.adopt_granted_segments(config).await?;
    shard.fill_pools(config).await?;
    Ok(shard)
}

fn tax_server_error(shard: u32, e: impl std::fmt::Display) -> ShardError {
    ShardError::TaxServer {
        shard,
        message: e.to_string(),
    }
}

fn to_core_segment(segment: &Segment) -> Result<NumberSegment, IdentityError> {
    NumberSegment::new(
        InvoiceCode::new(segment.code)?,
        InvoiceNumber::new(segment.first)?,
        segment.count,
    )
}

impl Shard {
    /// Segments the tax server granted to this shard that the journal does not know: a
    /// crash between the grant and the journal commit of its reservation. Adopting them
    /// keeps every granted number accounted for.
    async fn adopt_granted_segments(&mut self, config: &ShardConfig) -> Result<(), ShardError> {
        let response = self
            .hsm
            .call(&Request::Inventory(InventoryScope::All))
            .await
            .map_err(|e| tax_server_error(self.id, e))?;
        let Response::Inventory(inventories) = response else {
            return Err(tax_server_error(self.id, "unexpected answer to Inventory"));
        };
        for seller_config in &config.issuer.taxpayers {
            let seller = seller_config.id;
            let Some(inventory) = inventories
                .iter()
                .find(|i| &i.taxpayer == seller.as_bytes())
            else {
                return Err(tax_server_error(
                    self.id,
                    format!("tax server does not serve {seller}"),
                ));
            };
            let reserved = self.issuer.reserved_segments(&seller);
            for held in inventory.segments.iter().filter(|h| h.holder == self.id) {
                let segment =
                    to_core_segment(&held.segment).map_err(|e| tax_server_error(self.id, e))?;
                // Any overlap means the journal knows (part of) it: a partially returned
                // segment shows up smaller in the device than it was reserved.
                if !reserved.iter().any(|r| overlaps(r, &segment)) {
                    tracing::warn!(shard = self.id, %seller, ?segment, "adopting a segment granted to this shard but not journaled");
                    self.issuer
                        .add_segment(&seller, segment)
                        .map_err(|e| tax_server_error(self.id, e))?;
                }
            }
        }
        self.commit_control_records().await
    }

    /// Requisitions synchronously until every seller's pool is above its low watermark,
    /// so that the first requests do not find an empty pool.
    async fn fill_pools(&mut self, config: &ShardConfig) -> Result<(), ShardError> {
        for seller_config in &config.issuer.taxpayers {
            let seller = seller_config.id;
            let available = self
                .issuer
                .accounting(&seller)
                .map(|a| a.available)
                .unwrap_or(0);
            if available < u64::from(seller_config.low_watermark) || available == 0 {
                let segment = requisition(&self.hsm, self.id, &seller, seller_config.refill_count)
                    .await
                    .map_err(|e| tax_server_error(self.id, e))?;
                self.issuer
                    .add_segment(&seller, segment)
                    .map_err(|e| tax_server_error(self.id, e))?;
            }
        }
        self.commit_control_records().await
    }

    /// Makes queued control records (segment reservations) durable with an empty tick.
    async fn commit_control_records(&mut self) -> Result<(), ShardError> {
        if self.issuer.pending_control_records() == 0 {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let tick = self
            .issuer
            .begin_tick(now, &[])
            .map_err(|e| ShardError::Config {
                shard: self.id,
                message: e.to_string(),
            })?;
        self.journal_buf.clear();
        self.issuer
            .finish_tick(tick, &[], &mut self.journal_buf)
            .map_err(|e| ShardError::Config {
                shard: self.id,
                message: e.to_string(),
            })?;
        pad_to_block(&mut self.journal_buf, JOURNAL_BLOCK_BYTES);
        self.journal
            .commit(&self.journal_buf)
            .await
            .map_err(|e| ShardError::Journal {
                shard: self.id,
                message: e.to_string(),
            })?;
        Ok(())
    }

    async fn serve(
        &mut self,
        config: &ShardConfig,
        rx: flume::Receiver<Message>,
    ) -> Result<(), ShardError> {
        let tick_max = config.issuer.tick_requests_max as usize;
        let mut carry: Option<Message> = None;
        loop {
            let first = match carry.take() {
                Some(message) => message,
                None => match rx.recv_async().await {
                    Ok(message) => message,
                    Err(_) => return Ok(()), // every handle dropped: orderly shutdown
                },
            };
            // Gather every batch already waiting, up to the tick bound.
            let mut batches: Vec<(Vec<IssueRequest>, flume::Sender<Vec<IssueResult>>, Instant)> =
                Vec::new();
            let mut count = 0usize;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Metrics { reply } => {
                        let _ = reply.send(self.metrics.clone());
                    }
                    Message::Issue {
                        requests,
                        reply,
                        enqueued,
                    } => {
                        // `submit` refuses batches above the tick bound, so every batch
                        // fits into an empty tick.
                        debug_assert!(requests.len() <= tick_max);
                        if count + requests.len() > tick_max && count > 0 {
                            carry = Some(Message::Issue {
                                requests,
                                reply,
                                enqueued,
                            });
                            break;
                        } else {
                            count += requests.len();
                            batches.push((requests, reply, enqueued));
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            self.apply_refills()?;
            if batches.is_empty() {
                self.commit_control_records().await?;
                continue;
            }
            self.tick(batches, count).await?;
        }
    }

    fn apply_refills(&mut self) -> Result<(), ShardError> {
        let done: Vec<RefillDone> = std::mem::take(&mut *self.refills.borrow_mut());
        for refill in done {
            match refill.result {
                Ok(segment) => {
                    if let Err(e) = self.issuer.add_segment(&refill.seller, segment) {
                        tracing::error!(shard = self.id, seller = %refill.seller, error = %e, "granted segment refused by the pool");
                        return Err(ShardError::Config {
                            shard: self.id,
                            message: e.to_string(),
                        });
                    }
                }
                Err(message) => {
                    tracing::warn!(shard = self.id, seller = %refill.seller, %message, "requisition failed; will retry");
                    let _ = self.issuer.refill_failed(&refill.seller);
                }
            }
        }
        Ok(())
    }

    fn spawn_refills(&self, requests: &[RefillRequest]) {
        for request in requests {
            let hsm = Rc::clone(&self.hsm);
            let done = Rc::clone(&self.refills);
            let shard = self.id;
            let seller = request.seller;
            let count = request.count;
            glommio::spawn_local(async move {
                let result = requisition(&hsm, shard, &seller, count)
                    .await
                    .map_err(|e| e.to_string());
                done.borrow_mut().push(RefillDone { seller, result });
            })
            .detach();
        }
    }

    async fn tick(
        &mut self,
        batches: Vec<(Vec<IssueRequest>, flume::Sender<Vec<IssueResult>>, Instant)>,
        count: usize,
    ) -> Result<(), ShardError> {
        let tick_start = Instant::now();
        let mut requests = Vec::with_capacity(count);
        let mut shape = Vec::with_capacity(batches.len());
        for (batch, reply, enqueued) in batches {
            shape.push((batch.len(), reply, enqueued));
            requests.extend(batch);
        }
        for (len, _, enqueued) in &shape {
            self.metrics.record(
                Stage::QueueWait,
                micros(tick_start - *enqueued),
                *len as u64,
            );
        }
        let now = self.clock.now_ms();
        let tick = self
            .issuer
            .begin_tick(now, &requests)
            .map_err(|e| ShardError::Config {
                shard: self.id,
                message: e.to_string(),
            })?;
        self.spawn_refills(tick.refill_requests());

        let codes = if tick.item_count() == 0 {
            Vec::new()
        } else {
            let hsm_start = Instant::now();
            let result = self.tax_codes(&tick).await;
            self.metrics
                .record(Stage::TaxCode, micros(hsm_start.elapsed()), count as u64);
            match result {
                Ok(codes) => codes,
                Err(message) => {
                    self.issuer
                        .abort_tick(tick)
                        .map_err(|e| ShardError::Config {
                            shard: self.id,
                            message: e.to_string(),
                        })?;
                    let failure = IssueFailure::TaxServer(message);
                    for (len, reply, _) in shape {
                        let _ = reply.send(vec![Err(failure.clone()); len]);
                    }
                    self.metrics.rejected_requests += count as u64;
                    return Ok(());
                }
            }
        };

        self.journal_buf.clear();
        let commit = self
            .issuer
            .finish_tick(tick, &codes, &mut self.journal_buf)
            .map_err(|e| ShardError::Config {
                shard: self.id,
                message: e.to_string(),
            })?;
        if !self.journal_buf.is_empty() {
            pad_to_block(&mut self.journal_buf, JOURNAL_BLOCK_BYTES);
            let journal_start = Instant::now();
            if let Err(e) = self.journal.commit(&self.journal_buf).await {
                let failure = IssueFailure::ShardStopped(e.to_string());
                for (len, reply, _) in shape {
                    let _ = reply.send(vec![Err(failure.clone()); len]);
                }
                tracing::error!(shard = self.id, error = %e, "journal commit failed; stopping the shard");
                return Err(ShardError::Journal {
                    shard: self.id,
                    message: e.to_string(),
                });
            }
            self.metrics.record(
                Stage::JournalCommit,
                micros(journal_start.elapsed()),
                count as u64,
            );
        }

        self.metrics.ticks += 1;
        self.metrics.tick_invoices_max = self.metrics.tick_invoices_max.max(count as u64);
        let mut answers = commit.answers.into_iter();
        for (len, reply, enqueued) in shape {
            let mut results = Vec::with_capacity(len);
            for answer in answers.by_ref().take(len) {
                results.push(self.answer(answer).await?);
            }
            self.metrics
                .record(Stage::Total, micros(enqueued.elapsed()), len as u64);
            let _ = reply.send(results);
        }
        Ok(())
    }

    async fn answer(&mut self, answer: Answer) -> Result<IssueResult, ShardError> {
        Ok(match answer {
            Answer::Issued { invoice, .. } => {
                self.metrics.issued_invoices += 1;
                Ok(invoice)
            }
            Answer::Replay { seq, identity } => {
                let invoice = self.read_issued(seq).await?;
                if invoice.identity() != identity {
                    return Err(ShardError::Journal {
                        shard: self.id,
                        message: format!(
                            "record {seq} holds {:?}, the index says {identity:?}",
                            invoice.identity()
                        ),
                    });
                }
                self.metrics.replayed_invoices += 1;
                Ok(invoice)
            }
            Answer::Rejected(error) => {
                self.metrics.rejected_requests += 1;
                Err(IssueFailure::Rejected(error))
            }
        })
    }

    async fn read_issued(&self, seq: u64) -> Result<Invoice, ShardError> {
        let journal_error = |e: String| ShardError::Journal {
            shard: self.id,
            message: format!("record {seq}: {e}"),
        };
        let (_kind, body) = self
            .journal
            .read_record(seq)
            .await
            .map_err(|e: JournalError| journal_error(e.to_string()))?;
        decode_issued(&body).map_err(|e: RecordError| journal_error(e.to_string()))
    }

    /// One TaxCodes command for the whole tick. Returns the per-item results, or why the
    /// command as a whole failed.
    async fn tax_codes(&self, tick: &appliance_core::Tick) -> Result<Vec<TaxCodeResult>, String> {
        let mut batch = InvoiceBatch::with_capacity(tick.item_count(), tick.canonical_bytes());
        for item in tick.canonical_items() {
            batch.push(item).map_err(|e| e.to_string())?;
        }
        let response = self
            .hsm
            .call(&Request::TaxCodes(batch))
            .await
            .map_err(|e: HsmError| e.to_string())?;
        let Response::TaxCodes(items) = response else {
            return Err("unexpected answer to TaxCodes".into());
        };
        if items.len() != tick.item_count() {
            return Err(format!(
                "{} tax codes for {} invoices",
                items.len(),
                tick.item_count()
            ));
        }
        Ok(items.iter().map(item_result).collect())
    }
}

fn item_result(item: &TaxCodeItem) -> TaxCodeResult {
    match item.status() {
        Some(TaxCodeStatus::Ok) => {
            if item.check_code.iter().all(u8::is_ascii_digit) {
                Ok((item.tax_code, item.check_code))
            } else {
                Err(ItemError::InvalidCheckCode)
            }
        }
        Some(TaxCodeStatus::MalformedInvoice) => Err(ItemError::MalformedInvoice),
        Some(TaxCodeStatus::NumberNotGranted) => Err(ItemError::NumberNotHeld),
        Some(TaxCodeStatus::UnknownTaxpayer) => Err(ItemError::UnknownTaxpayer),
        None => Err(ItemError::Device(item.status)),
    }
}

async fn requisition(
    hsm: &TcpClient,
    shard: u32,
    seller: &TaxpayerId,
    count: u32,
) -> Result<NumberSegment, String> {
    // A fresh id per requisition: a retry of the same call after a lost connection reuses
    // it (the device answers with the same segment); a crash loses it, and the segment
    // is adopted from the inventory at restart.
    let request_id: u64 = rand::random();
    let request = Request::Requisition {
        taxpayer: *seller.as_bytes(),
        count,
        holder: shard,
        request_id,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        match hsm.call(&request).await {
            Ok(Response::Requisition(segment)) => {
                return to_core_segment(&segment).map_err(|e| e.to_string())
            }
            Ok(_) => return Err("unexpected answer to Requisition".into()),
            Err(e) if e.is_transient() && attempts < 5 => {
                glommio::timer::sleep(Duration::from_millis(20 * attempts)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn overlaps(a: &NumberSegment, b: &NumberSegment) -> bool {
    a.code == b.code
        && u64::from(a.first.get()) < u64::from(b.first.get()) + u64::from(b.count)
        && u64::from(b.first.get()) < u64::from(a.first.get()) + u64::from(a.count)
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}
