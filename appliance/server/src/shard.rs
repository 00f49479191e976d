//! One shard: a glommio executor pinned to a core that owns an issuer (number pools,
//! idempotency index), a journal and a connection to the tax server, and issues batches
//! handed to it through an in-process API ([`ShardHandle`]).
//!
//! A tick takes every batch waiting (up to `tick_requests_max` requests), gets all tax
//! codes of the tick in one TaxCodes command, writes all of the tick's records with one
//! O_DIRECT write and one fdatasync, and only then answers. Under load ticks grow and the
//! fixed costs (one HSM round trip, one fdatasync) are shared by more invoices. Up to
//! `ticks_in_flight` ticks have their tax codes out at once (a new batch starts the next
//! tick rather than wait behind the previous one's codes); they finish and commit in the
//! order they began.
//!
//! Failure policy:
//! - tax server unreachable or refusing a whole command: the tick is aborted (numbers go
//!   back to the pool, nothing journaled) and its requests get [`IssueFailure::TaxServer`],
//!   which is safe to retry; so do the requests of ticks begun after it, whose numbers
//!   can only go back with its own;
//! - journal write or fdatasync failure: the shard stops (fail-stop; see
//!   `journal::JournalError::Poisoned`); requests get [`IssueFailure::ShardStopped`] and
//!   a restart recovers from what is on disk;
//! - a stopped shard (failure or shutdown) answers every batch still in its inbox, and
//!   every batch sent to it later, with [`IssueFailure::ShardStopped`]: nobody waits
//!   for an answer that cannot come.

mod red;

pub use red::{HELD_BATCHES_MAX, RED_CLAIMS_WAITING_MAX};

use crate::journal::{Journal, JournalConfig, OpenError};
use crate::metrics::{ShardMetrics, Stage};
use appliance_core::canonical;
use appliance_core::journal::frame::{begin_commit, seal_commit, SealError};
use appliance_core::journal::record::{decode_issued, RecordError};
use appliance_core::journal::replay::{Recovery, RecoveryError};
use appliance_core::pool::RefillRequest;
use appliance_core::taxpayer::IdentityError;
use appliance_core::{
    Answer, IndexFill, Invoice, InvoiceCode, InvoiceNumber, IssueError, IssueRequest, Issuer,
    IssuerConfig, ItemError, NumberSegment, Outcome, TaxCodeResult, TaxpayerId, Tick,
};
use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use glommio::{LocalExecutorBuilder, Placement};
use hsm_driver::proto::{
    Holder, InventoryScope, InvoiceBatch, Request, Response, Segment, TaxCodeItem, TaxCodeStatus,
    TAX_CODES_BATCH_MAX,
};
use hsm_driver::route::{HsmClient, HsmClientConfig, Route};
use hsm_driver::tcp::HsmError;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
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
    /// The appliance's identity (128-bit id from its data dir): with the shard id it is
    /// the holder the tax server grants segments to, so that another appliance (or this
    /// one after its data dir was wiped) never adopts them.
    pub appliance_id: u128,
    /// Issuer settings (shard id, taxpayers, limits).
    pub issuer: IssuerConfig,
    /// The shard's journal.
    pub journal: JournalConfig,
    /// CPU to pin the executor to; `None` leaves it unpinned.
    pub cpu: Option<usize>,
    /// Tax servers: `tax_servers[0]` serves every seller not named in
    /// `taxpayer_routes`.
    pub tax_servers: Vec<Route>,
    /// Sellers served by another tax server than the first: seller → index into
    /// `tax_servers`.
    pub taxpayer_routes: HashMap<TaxpayerId, usize>,
    /// Tax-server client settings (both transports).
    pub hsm: HsmClientConfig,
    /// How long the executor polls for work before it sleeps (zero: sleeps at once).
    pub spin_before_park: Duration,
    /// Ticks kept in flight (1..=[`appliance_core::issuer::TICKS_IN_FLIGHT_MAX`]): the
    /// next tick takes its numbers and sends its tax-code command while the previous
    /// one's is still out.
    pub ticks_in_flight: usize,
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

/// An invoice as answered: issued by this request, or earlier for the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedInvoice {
    /// The invoice.
    pub invoice: Invoice,
    /// True when the order had already been issued (idempotent replay of the same request).
    pub replayed: bool,
}

/// Result of one request.
pub type IssueResult = Result<IssuedInvoice, IssueFailure>;

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
        reply: Reply,
        enqueued: Instant,
    },
    Metrics {
        reply: flume::Sender<ShardMetrics>,
    },
    /// From another shard: claim part of an original remembered here for its red
    /// (`shard::red`).
    RedClaim {
        claim: appliance_core::RedClaim,
        reply: flume::Sender<red::ClaimResult>,
    },
    /// From this shard's own claim task: the answers for a held batch.
    ClaimsDone {
        id: u64,
        outcomes: Vec<(appliance_core::RedClaim, red::ClaimResult)>,
    },
}

/// Where a batch's results go once its tick is durable.
enum Reply {
    /// A one-shot channel ([`ShardHandle::submit`]).
    Once(flume::Sender<Vec<IssueResult>>),
    /// A QUIC endpoint's answer queue.
    Endpoint(EndpointReply),
}

impl Reply {
    /// Delivers the results; a receiver that is gone no longer wants them.
    fn send(self, results: Vec<IssueResult>) {
        match self {
            Reply::Once(tx) => {
                let _ = tx.send(results);
            }
            Reply::Endpoint(reply) => reply.send(results),
        }
    }
}

/// Results of one batch, delivered to the endpoint that submitted it.
#[derive(Debug)]
pub struct Answered {
    /// The endpoint's name for the batch ([`EndpointReply::new`]).
    pub token: u64,
    /// One result per request, in order; **empty** when the batch was dropped unanswered
    /// (its shard stopped, or was already gone when it was submitted): every request of
    /// it then failed with [`IssueFailure::ShardStopped`].
    pub results: Vec<IssueResult>,
}

/// Where a QUIC endpoint wants one batch's results: its answer queue and its token for
/// the batch. Unlike a one-shot channel per batch it costs no allocation, and the
/// endpoint's driver takes the results itself (no task per request frame).
///
/// Dropped without an answer (the batch was lost with a stopped shard, or never reached
/// one), it sends an empty [`Answered`], so the endpoint never waits for an answer that
/// cannot come.
#[derive(Debug)]
pub struct EndpointReply {
    to: flume::Sender<Answered>,
    token: u64,
    answered: bool,
}

impl EndpointReply {
    /// Results of the batch go to `to`, tagged with `token`. The queue should be
    /// unbounded: shards answer from their tick loop and must never block on it (what
    /// bounds it is the number of request frames in flight).
    pub fn new(to: flume::Sender<Answered>, token: u64) -> EndpointReply {
        EndpointReply {
            to,
            token,
            answered: false,
        }
    }

    fn send(mut self, results: Vec<IssueResult>) {
        self.deliver(results);
    }

    fn deliver(&mut self, results: Vec<IssueResult>) {
        self.answered = true;
        let _ = self.to.send(Answered {
            token: self.token,
            results,
        });
    }
}

impl Drop for EndpointReply {
    fn drop(&mut self) {
        if !self.answered {
            self.deliver(Vec::new());
        }
    }
}

/// Handle to a running shard, usable from any thread.
#[derive(Debug)]
pub struct ShardHandle {
    shard_id: u32,
    batch_requests_max: usize,
    tx: Option<flume::Sender<Message>>,
    /// Dropped to tell the shard (and its QUIC endpoints) to stop.
    shutdown: Option<flume::Sender<()>>,
    join: Option<glommio::ExecutorJoinHandle<Result<(), ShardError>>>,
}

/// A shard's inbox as seen by other shards' QUIC endpoints (forwarded requests) and its
/// own: a channel, never shared state.
#[derive(Debug, Clone)]
pub struct ShardSender {
    tx: flume::Sender<Message>,
}

impl ShardSender {
    /// Queues a batch whose results go to `reply`. The batch must not exceed the shard's
    /// `tick_requests_max`, which is at least the protocol's `BATCH_REQUESTS_MAX`.
    ///
    /// Never blocks: when the inbox is full it returns the send as a future, for the
    /// caller to run (back-pressure without holding up its other work). A batch for a
    /// shard that stopped is dropped, and `reply` answers it as stopped.
    pub fn submit_to(
        &self,
        requests: Vec<IssueRequest>,
        reply: EndpointReply,
    ) -> Option<impl std::future::Future<Output = ()> + 'static> {
        let message = Message::Issue {
            requests,
            reply: Reply::Endpoint(reply),
            enqueued: Instant::now(),
        };
        match self.tx.try_send(message) {
            Ok(()) | Err(flume::TrySendError::Disconnected(_)) => None,
            Err(flume::TrySendError::Full(message)) => {
                let tx = self.tx.clone();
                Some(async move {
                    let _ = tx.send_async(message).await;
                })
            }
        }
    }

    /// A snapshot of the shard's metrics (blocking; for threads outside the shards).
    /// `None` if the shard stopped.
    pub fn metrics(&self) -> Option<ShardMetrics> {
        let (reply, rx) = flume::bounded(1);
        self.tx.send(Message::Metrics { reply }).ok()?;
        rx.recv().ok()
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Issue { requests, .. } => write!(f, "Issue({} requests)", requests.len()),
            Message::Metrics { .. } => write!(f, "Metrics"),
            Message::RedClaim { .. } => write!(f, "RedClaim"),
            Message::ClaimsDone { outcomes, .. } => write!(f, "ClaimsDone({})", outcomes.len()),
        }
    }
}

impl ShardHandle {
    /// Starts the shard and waits until it has recovered its journal, reached the tax
    /// server, adopted segments granted to it and filled its pools: when this returns
    /// `Ok`, the shard serves.
    pub fn spawn(config: ShardConfig) -> Result<ShardHandle, ShardError> {
        let mut handles = ShardHandle::spawn_group(vec![config], None)?;
        Ok(handles.pop().expect("one shard"))
    }

    /// Starts a group of shards that know each other (shard i is `configs[i]`, whose
    /// `issuer.shard_id` must be i), each serving QUIC when `quic` is given (one entry
    /// per shard). Returns once every shard serves; if one fails to start, the ones
    /// already started are stopped and its error is returned.
    pub fn spawn_group(
        configs: Vec<ShardConfig>,
        quic: Option<Vec<crate::quic::ShardQuic>>,
    ) -> Result<Vec<ShardHandle>, ShardError> {
        let count = configs.len();
        for (i, config) in configs.iter().enumerate() {
            if config.issuer.shard_id as usize != i {
                return Err(ShardError::Config {
                    shard: config.issuer.shard_id,
                    message: format!("shard at position {i} has id {}", config.issuer.shard_id),
                });
            }
            if (config.issuer.tick_requests_max as usize)
                < appliance_proto::BATCH_REQUESTS_MAX as usize
                && quic.is_some()
            {
                return Err(ShardError::Config {
                    shard: config.issuer.shard_id,
                    message: "tick_requests_max is below the protocol's batch limit".into(),
                });
            }
        }
        let inboxes: Vec<(flume::Sender<Message>, flume::Receiver<Message>)> = (0..count)
            .map(|_| flume::bounded(INBOX_BATCHES_MAX))
            .collect();
        let senders: Vec<ShardSender> = inboxes
            .iter()
            .map(|(tx, _)| ShardSender { tx: tx.clone() })
            .collect();
        let mut quic = quic.map(|q| q.into_iter().map(Some).collect::<Vec<_>>());
        let mut handles: Vec<ShardHandle> = Vec::with_capacity(count);
        for (config, (tx, rx)) in configs.into_iter().zip(inboxes) {
            let shard_id = config.issuer.shard_id;
            let batch_requests_max = config.issuer.tick_requests_max as usize;
            let (ready_tx, ready_rx) = flume::bounded(1);
            let (shutdown_tx, shutdown_rx) = flume::bounded::<()>(1);
            let placement = match config.cpu {
                Some(cpu) => Placement::Fixed(cpu),
                None => Placement::Unbound,
            };
            let shard_quic = quic
                .as_mut()
                .and_then(|q| q.get_mut(shard_id as usize).and_then(Option::take));
            let peers = senders.clone();
            let mut builder = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{shard_id}"))
                .io_memory(IO_MEMORY_BYTES);
            if !config.spin_before_park.is_zero() {
                builder = builder.spin_before_park(config.spin_before_park);
            }
            let join = builder
                .spawn(move || async move {
                    run(config, rx, ready_tx, shutdown_rx, peers, shard_quic).await
                })
                .map_err(|e| ShardError::Executor {
                    shard: shard_id,
                    message: e.to_string(),
                })?;
            match ready_rx.recv() {
                Ok(()) => handles.push(ShardHandle {
                    shard_id,
                    batch_requests_max,
                    tx: Some(tx),
                    shutdown: Some(shutdown_tx),
                    join: Some(join),
                }),
                Err(_) => {
                    // The shard ended before it was ready: its result says why.
                    drop(shutdown_tx);
                    let result = join.join();
                    stop_all(&mut handles);
                    return Err(match result {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => ShardError::Stopped { shard: shard_id },
                        Err(e) => ShardError::Executor {
                            shard: shard_id,
                            message: e.to_string(),
                        },
                    });
                }
            }
        }
        Ok(handles)
    }

    /// The shard's inbox as a sender other code can hold.
    pub fn sender_handle(&self) -> Option<ShardSender> {
        self.tx.as_ref().map(|tx| ShardSender { tx: tx.clone() })
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
                reply: Reply::Once(reply),
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

    /// Tells the shard to stop without waiting for it.
    fn signal_stop(&mut self) {
        self.tx.take();
        self.shutdown.take();
    }

    fn stop(&mut self) -> Result<(), ShardError> {
        self.signal_stop();
        match self.join.take() {
            Some(join) => join.join().map_err(|e| ShardError::Executor {
                shard: self.shard_id,
                message: e.to_string(),
            })?,
            None => Ok(()),
        }
    }
}

/// Signals every shard first, then waits for each: shards hold each other's inboxes
/// (forwarding), so stopping them one at a time would wait on a peer still running.
pub fn stop_all(handles: &mut [ShardHandle]) {
    for handle in handles.iter_mut() {
        handle.signal_stop();
    }
    for handle in handles.iter_mut() {
        if let Err(e) = handle.stop() {
            tracing::error!(shard = handle.shard_id, error = %e, "shard stopped with an error");
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

/// Requests of one submitted batch within a tick: how many, where to answer, and when
/// they arrived.
struct BatchSlot {
    len: usize,
    reply: Reply,
    enqueued: Instant,
}

/// A finished tick on its way to the disk: its records (padded to the block size), its
/// answers, and where they go once the records are durable.
struct CommitJob {
    /// One sealed commit (empty if the tick wrote no record).
    bytes: Vec<u8>,
    /// Where its records lie in `bytes` (between the commit header and the padding).
    records: Range<usize>,
    /// Their sequence numbers.
    seqs: Range<u64>,
    answers: Vec<Answer>,
    slots: Vec<BatchSlot>,
    /// Answers to other shards' red claims, sent once this job is durable.
    claim_replies: Vec<red::ClaimReply>,
}

/// The ticks' records as one commit: one header over every record, in order (their
/// sequence numbers run on from tick to tick), one padding.
fn merge_commits(jobs: &[&CommitJob]) -> Result<Vec<u8>, SealError> {
    let records: usize = jobs.iter().map(|job| job.records.len()).sum();
    let mut out = Vec::with_capacity(records + 2 * JOURNAL_BLOCK_BYTES);
    let start = begin_commit(&mut out);
    debug_assert!(jobs.windows(2).all(|w| w[0].seqs.end == w[1].seqs.start));
    for job in jobs {
        out.extend_from_slice(&job.bytes[job.records.clone()]);
    }
    let first_seq = jobs.first().map_or(0, |job| job.seqs.start);
    let last_seq = jobs.last().map_or(0, |job| job.seqs.end) - 1;
    seal_commit(&mut out, start, JOURNAL_BLOCK_BYTES, first_seq, last_seq)?;
    Ok(out)
}

/// How long a tick whose pool ran dry waits for a refill in flight before refusing.
const REFILL_WAIT: Duration = Duration::from_secs(2);
/// Finished ticks queued for the committer while it writes a group. With one, the tick
/// loop blocked on the channel as soon as a second tick was ready behind an fdatasync
/// (0.4-1.2 ms here), so under per-invoice load (tiny ticks) a shard spent its time
/// waiting for the disk. Eight let the tick loop go on issuing for several ticks while a
/// commit is in flight, and the committer then takes them all as its next group (one
/// write, one fdatasync). Beyond eight the tick loop waits: the disk is then the bound,
/// and waiting lets the next ticks grow, which is what amortises the fdatasync. Memory
/// stays bounded: at most this many ticks queued (each at most `tick_requests_max`
/// invoices, about 3.2 MiB at the default 8,192), plus the group being written (at most
/// `commit_bytes_max`, 16 MiB) and the one tick held back from it.
const COMMIT_QUEUE_TICKS: usize = 8;
/// Ticks committed together at most: the one the committer waited for plus every tick
/// queued behind it. Groups are also cut at [`COMMIT_GROUP_BYTES_MAX`] (see
/// `commit_loop`).
const COMMIT_GROUP_TICKS_MAX: usize = COMMIT_QUEUE_TICKS + 1;
/// Bytes of sealed ticks merged into one commit at most (a tick larger than this is
/// committed alone). Merging copies the records once more (into a fresh buffer of the
/// group's size): below 1 MiB the copy costs ~0.1 ms against the 0.4-1.2 ms fdatasync it
/// saves, which is the per-invoice case (ticks of a few KiB). Bulk ticks are ~4 MiB each,
/// their write time grows with their size, so merging them saves little, and bulk runs
/// that merged them showed 3-4 % more appliance CPU per invoice (docs/PERFORMANCE.md §14).
const COMMIT_GROUP_BYTES_MAX: usize = 1 << 20;

struct Shard {
    id: u32,
    /// (appliance id, shard id): whom the tax server grants this shard's segments to.
    holder: Holder,
    issuer: Issuer,
    /// One client per tax server (index as in `ShardConfig::tax_servers`).
    hsm: Vec<Rc<HsmClient>>,
    /// Sellers not on tax server 0.
    taxpayer_routes: HashMap<TaxpayerId, usize>,
    clock: ShardClock,
    metrics: Rc<RefCell<ShardMetrics>>,
    refills_tx: flume::Sender<RefillDone>,
    refills_rx: flume::Receiver<RefillDone>,
    refills_in_flight: usize,
    /// Cross-shard red claims, both roles (`shard::red`).
    red: red::RedShell,
}

async fn run(
    config: ShardConfig,
    rx: flume::Receiver<Message>,
    ready: flume::Sender<()>,
    shutdown: flume::Receiver<()>,
    peers: Vec<ShardSender>,
    quic: Option<crate::quic::ShardQuic>,
) -> Result<(), ShardError> {
    let (mut shard, journal) = start(&config).await?;
    shard.red = red::RedShell::new(peers.clone());
    let endpoints = match quic {
        Some(quic) => spawn_endpoints(&shard, quic, peers, &shutdown)?,
        None => {
            drop(peers);
            Vec::new()
        }
    };
    let _ = ready.send(());
    drop(ready);
    // The committer owns the journal from here on: it writes tick N while this task
    // already gets the tax codes of tick N+1.
    let (commit_tx, commit_rx) = glommio::channels::local_channel::new_bounded(COMMIT_QUEUE_TICKS);
    let committer = glommio::spawn_local(commit_loop(
        shard.id,
        journal,
        commit_rx,
        Rc::clone(&shard.metrics),
    ));
    let served = shard.serve(&config, &rx, &shutdown, &commit_tx).await;
    answer_inbox_as_stopped(shard.id, rx, &served, shard.metrics.borrow().clone());
    for endpoint in endpoints {
        endpoint.await;
    }
    drop(commit_tx);
    let committed = committer.await;
    served.and(committed)
}

/// Hands the inbox of a shard that stopped serving to a thread that answers every batch
/// in it, and every batch sent to it later, with [`IssueFailure::ShardStopped`] (metrics
/// requests with the last figures). Peers' endpoints and the handle keep the inbox open
/// after the shard is gone, and a batch left in it would hold its reply sender: its
/// caller (a QUIC stream forwarded from another shard, or a `ShardHandle::submit`) would
/// wait forever. The thread ends when the last sender is dropped.
fn answer_inbox_as_stopped(
    shard: u32,
    rx: flume::Receiver<Message>,
    served: &Result<(), ShardError>,
    metrics: ShardMetrics,
) {
    let failure = IssueFailure::ShardStopped(match served {
        Ok(()) => format!("shard {shard} shut down"),
        Err(e) => e.to_string(),
    });
    let spawned = std::thread::Builder::new()
        .name(format!("shard-{shard}-stopped"))
        .spawn(move || {
            for message in rx.iter() {
                match message {
                    Message::Issue {
                        requests, reply, ..
                    } => {
                        reply.send(vec![Err(failure.clone()); requests.len()]);
                    }
                    Message::Metrics { reply } => {
                        let _ = reply.send(metrics.clone());
                    }
                    Message::RedClaim { reply, .. } => {
                        let _ = reply.send(Err(IssueError::RedClaimUnavailable));
                    }
                    // Its held batches were answered when the shard stopped.
                    Message::ClaimsDone { .. } => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(shard, error = %e, "no thread to answer the stopped shard's inbox");
    }
}

/// Starts the shard's two QUIC endpoints (service port and own port).
fn spawn_endpoints(
    shard: &Shard,
    quic: crate::quic::ShardQuic,
    peers: Vec<ShardSender>,
    shutdown: &flume::Receiver<()>,
) -> Result<Vec<glommio::task::JoinHandle<()>>, ShardError> {
    let context = Rc::new(crate::quic::endpoint::EndpointContext {
        shard_id: shard.id,
        shards: peers,
        shard_ports: quic.shard_ports,
        authorisation: quic.authorisation,
        metrics: Rc::clone(&shard.metrics),
    });
    [quic.service_socket, quic.shard_socket]
        .into_iter()
        .map(|socket| {
            let socket = crate::quic::udp::UdpIo::new(glommio::net::UdpSocket::from(socket))
                .map_err(|e| ShardError::Config {
                    shard: shard.id,
                    message: format!("UDP socket: {e}"),
                })?;
            Ok(glommio::spawn_local(crate::quic::endpoint::serve(
                socket,
                Arc::clone(&quic.server_config),
                Rc::clone(&context),
                shutdown.clone(),
            ))
            .detach())
        })
        .collect()
}

async fn start(config: &ShardConfig) -> Result<(Shard, Journal), ShardError> {
    let id = config.issuer.shard_id;
    let mut recovery = Recovery::new(config.issuer.clone()).map_err(|e| ShardError::Config {
        shard: id,
        message: e.to_string(),
    })?;
    let mut journal = Journal::open(config.journal.clone(), |record| recovery.apply(&record))
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
    if config.tax_servers.is_empty()
        || config
            .taxpayer_routes
            .values()
            .any(|&i| i >= config.tax_servers.len())
    {
        return Err(ShardError::Config {
            shard: id,
            message: "a taxpayer route names no configured tax server".into(),
        });
    }
    let mut hsm = Vec::with_capacity(config.tax_servers.len());
    for route in &config.tax_servers {
        let client = HsmClient::connect(route, config.hsm)
            .await
            .map_err(|e| tax_server_error(id, format!("{route}: {e}")))?;
        hsm.push(Rc::new(client));
    }
    let (refills_tx, refills_rx) = flume::unbounded();
    let mut shard = Shard {
        id,
        holder: Holder::new(config.appliance_id, id),
        issuer,
        hsm,
        taxpayer_routes: config.taxpayer_routes.clone(),
        clock,
        metrics: Rc::new(RefCell::new(ShardMetrics::new(id))),
        refills_tx,
        refills_rx,
        refills_in_flight: 0,
        red: red::RedShell::default(),
    };
    // Adopted segments count as available at once, so `fill_pools` only asks for what is
    // still missing; one commit then makes every reservation durable before serving.
    // Reconciliation with the device's coded marks spoils, before anything is issued,
    // every number the device coded but the journal does not hold.
    shard.adopt_and_reconcile(config, &mut journal).await?;
    shard.fill_pools(config).await?;
    shard.commit_control_records(&mut journal).await?;
    Ok((shard, journal))
}

fn tax_server_error(shard: u32, e: impl std::fmt::Display) -> ShardError {
    ShardError::TaxServer {
        shard,
        message: e.to_string(),
    }
}

/// Seals the tick's journal bytes begun at `start` as one commit (header with length,
/// sequence range and payload CRC, padding to the block), or empties them if the tick
/// wrote no record: an empty commit is never written (the commit loop skips empty
/// buffers).
fn seal_tick(
    bytes: &mut Vec<u8>,
    start: usize,
    seqs: &std::ops::Range<u64>,
) -> Result<(), appliance_core::journal::frame::SealError> {
    if seqs.is_empty() {
        bytes.truncate(start);
        return Ok(());
    }
    seal_commit(bytes, start, JOURNAL_BLOCK_BYTES, seqs.start, seqs.end - 1).map(|_| ())
}

fn internal(shard: u32, e: impl std::fmt::Display) -> ShardError {
    ShardError::Config {
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
    /// Start-up, before any tick: asks every tax server for the segments granted to this
    /// holder (appliance id, shard) only, then
    /// - adopts those the journal does not know (a crash between the grant and the journal
    ///   commit of its reservation), which keeps every granted number accounted for;
    /// - spoils every number below a segment's coded mark that the journal holds no invoice
    ///   for (a crash between the tax codes and the commit, or a damaged last commit
    ///   dropped at recovery), so that no number the device coded is ever coded again for
    ///   another invoice. The spoiled records are committed before serving.
    ///
    /// Another appliance's segments (another appliance id, e.g. this host's previous data
    /// dir, or a second site on the same tax server) are never listed, so never adopted.
    async fn adopt_and_reconcile(
        &mut self,
        config: &ShardConfig,
        journal: &mut Journal,
    ) -> Result<(), ShardError> {
        let mut inventories = Vec::with_capacity(self.hsm.len());
        for hsm in &self.hsm {
            let response = hsm
                .call(&Request::Inventory(InventoryScope::Holder(self.holder)))
                .await
                .map_err(|e| tax_server_error(self.id, e))?;
            let Response::Inventory(inventory) = response else {
                return Err(tax_server_error(self.id, "unexpected answer to Inventory"));
            };
            inventories.push(inventory);
        }
        for seller_config in &config.issuer.taxpayers {
            let seller = seller_config.id;
            let route = self.route_of(&seller);
            let Some(inventory) = inventories[route]
                .iter()
                .find(|i| &i.taxpayer == seller.as_bytes())
            else {
                return Err(tax_server_error(
                    self.id,
                    format!(
                        "tax server {} does not serve {seller}",
                        config.tax_servers[route]
                    ),
                ));
            };
            for held in &inventory.segments {
                if held.holder != self.holder {
                    return Err(tax_server_error(
                        self.id,
                        format!(
                            "tax server listed a segment of holder {} when asked for {}'s",
                            held.holder, self.holder
                        ),
                    ));
                }
                let segment =
                    to_core_segment(&held.segment).map_err(|e| tax_server_error(self.id, e))?;
                let adopted = self
                    .issuer
                    .adopt_granted(&seller, segment)
                    .map_err(|e| tax_server_error(self.id, e))?;
                if adopted {
                    tracing::warn!(shard = self.id, holder = %self.holder, %seller, ?segment, "adopted a segment granted to this appliance's shard but not journaled");
                }
            }
            for held in &inventory.segments {
                self.spoil_coded(&seller, held, journal).await?;
            }
        }
        Ok(())
    }

    /// Spoils the numbers of `held` below its coded mark that the journal lacks,
    /// committing as often as the control queue fills.
    async fn spoil_coded(
        &mut self,
        seller: &TaxpayerId,
        held: &hsm_driver::proto::HeldSegment,
        journal: &mut Journal,
    ) -> Result<(), ShardError> {
        if held.coded_end <= held.segment.first {
            return Ok(());
        }
        let code = InvoiceCode::new(held.segment.code).map_err(|e| tax_server_error(self.id, e))?;
        let mut total = 0u64;
        loop {
            let (spoiled, left) = self
                .issuer
                .spoil_coded(seller, code, held.coded_end)
                .map_err(|e| internal(self.id, e))?;
            total += u64::from(spoiled);
            if spoiled == 0 || left == 0 {
                break;
            }
            self.commit_control_records(journal).await?;
        }
        if total > 0 {
            // A warning: the ticks in flight at a kill end here every time; a dropped
            // damaged commit was already reported at error level by the journal.
            tracing::warn!(
                shard = self.id,
                %seller,
                code = held.segment.code,
                coded_end = held.coded_end,
                spoiled = total,
                "the tax server coded numbers the journal holds no invoice for; spoiled them so none is coded again (a kill mid-tick, or a tail the journal's recovery dropped)"
            );
            self.metrics.borrow_mut().spoiled_at_start += total;
        }
        Ok(())
    }

    /// Index of the tax server serving `seller`.
    fn route_of(&self, seller: &TaxpayerId) -> usize {
        self.taxpayer_routes.get(seller).copied().unwrap_or(0)
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
                let hsm = &self.hsm[self.route_of(&seller)];
                let segment = requisition(hsm, self.holder, &seller, seller_config.refill_count)
                    .await
                    .map_err(|e| tax_server_error(self.id, e))?;
                self.issuer
                    .add_segment(&seller, segment)
                    .map_err(|e| tax_server_error(self.id, e))?;
            }
        }
        Ok(())
    }

    /// Start-up only: makes queued control records (segment reservations) durable with
    /// an empty tick, before the committer owns the journal.
    async fn commit_control_records(&mut self, journal: &mut Journal) -> Result<(), ShardError> {
        let Some(job) = self.empty_tick()? else {
            return Ok(());
        };
        journal
            .commit(&job.bytes)
            .await
            .map_err(|e| ShardError::Journal {
                shard: self.id,
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// An empty tick carrying the queued control records, if any.
    fn empty_tick(&mut self) -> Result<Option<CommitJob>, ShardError> {
        if self.issuer.pending_control_records() == 0 && self.red.replies.is_empty() {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let tick = self
            .issuer
            .begin_tick(now, Vec::new())
            .map_err(|e| internal(self.id, e))?;
        let mut bytes = Vec::with_capacity(JOURNAL_BLOCK_BYTES);
        let start = begin_commit(&mut bytes);
        let commit = self
            .issuer
            .finish_tick(tick, &[], &mut bytes)
            .map_err(|e| internal(self.id, e))?;
        seal_tick(&mut bytes, start, &commit.seqs).map_err(|e| internal(self.id, e))?;
        Ok(Some(CommitJob {
            bytes,
            records: commit.journal_range,
            seqs: commit.seqs,
            answers: commit.answers,
            slots: Vec::new(),
            claim_replies: std::mem::take(&mut self.red.replies),
        }))
    }

    /// The tick loop. On an error, the requests of the ticks in flight and of a batch held
    /// over for the next tick are answered with [`IssueFailure::ShardStopped`].
    async fn serve(
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

    async fn send_commit(
        &self,
        commit_tx: &LocalSender<CommitJob>,
        job: CommitJob,
    ) -> Result<(), ShardError> {
        if let Err(e) = commit_tx.send(job).await {
            // The committer stopped after a journal failure; it answered its own jobs,
            // this one is answered here.
            if let glommio::GlommioError::Closed(glommio::ResourceType::Channel(job)) = e {
                answer_all(
                    job.slots,
                    IssueFailure::ShardStopped("journal failed".into()),
                );
            }
            return Err(ShardError::Journal {
                shard: self.id,
                message: "the journal committer stopped".into(),
            });
        }
        Ok(())
    }

    fn apply_refills(&mut self) -> Result<(), ShardError> {
        while let Ok(refill) = self.refills_rx.try_recv() {
            self.apply_refill(refill)?;
        }
        Ok(())
    }

    fn apply_refill(&mut self, refill: RefillDone) -> Result<(), ShardError> {
        self.refills_in_flight -= 1;
        match refill.result {
            Ok(segment) => self.issuer.add_segment(&refill.seller, segment).map_err(|e| {
                tracing::error!(shard = self.id, seller = %refill.seller, error = %e, "granted segment refused by the pool");
                internal(self.id, e)
            }),
            Err(message) => {
                tracing::warn!(shard = self.id, seller = %refill.seller, %message, "requisition failed; will retry");
                self.issuer
                    .refill_failed(&refill.seller)
                    .map_err(|e| internal(self.id, e))
            }
        }
    }

    fn spawn_refills(&mut self, requests: &[RefillRequest]) {
        for request in requests {
            let hsm = Rc::clone(&self.hsm[self.route_of(&request.seller)]);
            let done = self.refills_tx.clone();
            let holder = self.holder;
            let seller = request.seller;
            let count = request.count;
            self.refills_in_flight += 1;
            glommio::spawn_local(async move {
                let result = requisition(&hsm, holder, &seller, count)
                    .await
                    .map_err(|e| e.to_string());
                let _ = done.send(RefillDone { seller, result });
            })
            .detach();
        }
    }

    /// Waits for one refill in flight to finish and applies it; false if none is in
    /// flight or none finished within [`REFILL_WAIT`].
    async fn wait_for_refill(&mut self) -> Result<bool, ShardError> {
        if self.refills_in_flight == 0 {
            return Ok(false);
        }
        let rx = self.refills_rx.clone();
        let waited =
            glommio::timer::timeout(REFILL_WAIT, async move { Ok(rx.recv_async().await.ok()) })
                .await;
        match waited {
            Ok(Some(refill)) => {
                self.apply_refill(refill)?;
                self.apply_refills()?;
                Ok(true)
            }
            _ => Ok(false),
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

    /// Sends the tick's tax-code commands: per tax server, one TaxCodes command per
    /// [`TAX_CODES_BATCH_MAX`] of its items (a tick may be larger than the device's
    /// batch), all in flight at once. The task yields the per-item results in tick
    /// order, or why a command as a whole failed, and records the stage's latency.
    fn tax_codes(&self, tick: &Tick) -> CodesTask {
        let start = Instant::now();
        let metrics = Rc::clone(&self.metrics);
        let count = tick.requests().len() as u64;
        let calls = self.tax_code_calls(tick);
        let items = tick.item_count();
        glommio::spawn_local(async move {
            let mut results: Vec<Option<TaxCodeResult>> = vec![None; items];
            let mut failure = None;
            // Every call is awaited, even after a failure: the device may still be
            // working on them, and the tick is only aborted once none is out.
            for (chunk, call) in calls? {
                match call.await {
                    Ok(codes) => {
                        for (&i, result) in chunk.iter().zip(codes) {
                            results[i] = Some(result);
                        }
                    }
                    Err(message) => failure = failure.or(Some(message)),
                }
            }
            metrics
                .borrow_mut()
                .record(Stage::TaxCode, micros(start.elapsed()), count);
            if let Some(message) = failure {
                return Err(message);
            }
            Ok(results
                .into_iter()
                .map(|r| r.expect("every item is in one group"))
                .collect())
        })
    }

    /// The tick's TaxCodes commands, each already running, with the tick positions of
    /// its items.
    fn tax_code_calls(&self, tick: &Tick) -> Result<Vec<(Vec<usize>, CodesTask)>, String> {
        let items: Vec<&[u8]> = tick.canonical_items().collect();
        // Items per tax server, in tick order; with one tax server (the usual case) that
        // is every item, without looking at them.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.hsm.len()];
        if self.hsm.len() == 1 {
            groups[0] = (0..items.len()).collect();
        } else {
            for (i, item) in items.iter().enumerate() {
                let header = canonical::decode_header(item).map_err(|e| e.to_string())?;
                let seller =
                    TaxpayerId::from_bytes(&header.seller_taxpayer).map_err(|e| e.to_string())?;
                groups[self.route_of(&seller)].push(i);
            }
        }
        let mut calls = Vec::new();
        for (route, positions) in groups.iter().enumerate() {
            for chunk in positions.chunks(TAX_CODES_BATCH_MAX) {
                let bytes = chunk.iter().map(|&i| items[i].len()).sum();
                let mut batch = InvoiceBatch::with_capacity(chunk.len(), bytes);
                batch.set_holder(self.holder);
                for &i in chunk {
                    batch.push(items[i]).map_err(|e| e.to_string())?;
                }
                let hsm = Rc::clone(&self.hsm[route]);
                let expected = chunk.len();
                let call = glommio::spawn_local(async move {
                    let response = hsm
                        .call(&Request::TaxCodes(batch))
                        .await
                        .map_err(|e: HsmError| e.to_string())?;
                    let Response::TaxCodes(items) = response else {
                        return Err("unexpected answer to TaxCodes".to_owned());
                    };
                    if items.len() != expected {
                        return Err(format!("{} tax codes for {expected} invoices", items.len()));
                    }
                    Ok(items.iter().map(item_result).collect::<Vec<_>>())
                });
                calls.push((chunk.to_vec(), call));
            }
        }
        Ok(calls)
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

/// Tax codes on their way: the per-item results in item order, or why a command failed.
type CodesTask = glommio::Task<Result<Vec<TaxCodeResult>, String>>;

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

fn answer_all(slots: Vec<BatchSlot>, failure: IssueFailure) {
    for slot in slots {
        slot.reply.send(vec![Err(failure.clone()); slot.len]);
    }
}

/// Writes finished ticks, then answers their requests. When the committer is free it
/// takes the tick it waited for and every tick already queued behind it (up to
/// [`COMMIT_GROUP_TICKS_MAX`] ticks and `commit_bytes_max` bytes) as one group: one
/// commit (their records under one header: one O_DIRECT write and one fdatasync for all
/// of them), then the answers of each tick in order. So under
/// load the fdatasync is shared by the ticks that queued up during the previous one.
///
/// After a journal failure it answers every tick of the group still unanswered, and
/// every tick queued, with [`IssueFailure::ShardStopped`] and stops: the shard is
/// fail-stop.
async fn commit_loop(
    shard: u32,
    mut journal: Journal,
    jobs: LocalReceiver<CommitJob>,
    metrics: Rc<RefCell<ShardMetrics>>,
) -> Result<(), ShardError> {
    // One group is one commit, so one write, bounded like any commit; the merged commit is
    // never larger than its ticks' sealed commits.
    let group_bytes_max = COMMIT_GROUP_BYTES_MAX.min(journal.config().commit_bytes_max);
    let mut group: VecDeque<CommitJob> = VecDeque::with_capacity(COMMIT_GROUP_TICKS_MAX);
    // A tick taken off the queue that would have made the group too large: it starts the
    // next group.
    let mut carry: Option<CommitJob> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut group_bytes = first.bytes.len();
        group.push_back(first);
        while group.len() < COMMIT_GROUP_TICKS_MAX {
            let Some(job) = try_recv(&jobs).await else {
                break;
            };
            if group_bytes + job.bytes.len() > group_bytes_max {
                carry = Some(job);
                break;
            }
            group_bytes += job.bytes.len();
            group.push_back(job);
        }
        if let Err(error) = commit_group(shard, &mut journal, &mut group, &metrics).await {
            let message = match &error {
                ShardError::Journal { message, .. } => message.clone(),
                other => other.to_string(),
            };
            // Closed explicitly, not dropped: dropping leaves glommio to close the
            // descriptors at a reactor turn that may never come once the shard stops,
            // and the directory lock would outlive the shard (a restart in this process
            // would find the journal locked). Before the answers, so that ticks the
            // tick loop queues meanwhile are drained below.
            if let Err(e) = journal.close().await {
                tracing::warn!(shard, error = %e, "closing the failed journal");
            }
            let failure = IssueFailure::ShardStopped(message);
            for job in group.drain(..).chain(carry.take()) {
                answer_all(job.slots, failure.clone());
            }
            while let Some(job) = try_recv(&jobs).await {
                answer_all(job.slots, failure.clone());
            }
            // Returning drops the receiver: the tick loop's next send fails, it answers
            // that tick itself and stops too.
            return Err(error);
        }
        debug_assert!(group.is_empty());
    }
    journal.close().await.map_err(|e| ShardError::Journal {
        shard,
        message: e.to_string(),
    })
}

/// A tick already queued, without waiting; `None` if there is none. glommio's local
/// channel has no `try_recv`: `recv` is polled once, and dropping it when it is pending
/// takes its waker off the channel again.
async fn try_recv(jobs: &LocalReceiver<CommitJob>) -> Option<CommitJob> {
    futures_lite::future::poll_once(jobs.recv()).await.flatten()
}

/// Makes the ticks of `group` durable with one `Journal::commit`, then answers them
/// in order. Each tick is taken off `group` once answered: on an error, `group` holds
/// exactly the ticks nobody has answered yet.
async fn commit_group(
    shard: u32,
    journal: &mut Journal,
    group: &mut VecDeque<CommitJob>,
    metrics: &RefCell<ShardMetrics>,
) -> Result<(), ShardError> {
    // A tick that wrote no record (only rejections or replays) has nothing to commit, but
    // is still answered in its place: its replays may need records of earlier ticks.
    let sealed: Vec<&CommitJob> = group.iter().filter(|job| !job.bytes.is_empty()).collect();
    if !sealed.is_empty() {
        let start = Instant::now();
        let writes_before = journal.writes_total();
        // Several ticks become ONE commit, not several commits in one write: a power loss
        // may keep any subset of a write's blocks, and recovery drops a torn commit
        // whole, but it refuses a whole commit behind a torn one (data after a hole),
        // which back-to-back commits in one write could leave (docs/journal.md).
        let merged;
        let bytes: &[u8] = match sealed.as_slice() {
            [one] => &one.bytes,
            many => {
                merged = merge_commits(many).map_err(|e| internal(shard, e))?;
                &merged
            }
        };
        if let Err(e) = journal.commit(bytes).await {
            tracing::error!(
                shard,
                ticks = sealed.len(),
                error = %e,
                "journal commit failed; stopping the shard"
            );
            return Err(ShardError::Journal {
                shard,
                message: e.to_string(),
            });
        }
        let latency_us = micros(start.elapsed());
        let mut m = metrics.borrow_mut();
        m.journal_ticks += sealed.len() as u64;
        m.journal_writes += journal.writes_total() - writes_before;
        // The group's commit latency is each of its ticks' commit latency.
        for job in group.iter().filter(|job| !job.bytes.is_empty()) {
            let count: usize = job.slots.iter().map(|s| s.len).sum();
            m.record(Stage::JournalCommit, latency_us, count as u64);
        }
    }
    // Replays need their invoices from the journal: one read per commit holding any of
    // them, for the whole group.
    let replay_seqs: Vec<u64> = group
        .iter()
        .flat_map(|job| job.answers.iter())
        .filter_map(|a| match a {
            Answer::Replay { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let mut replays = if replay_seqs.is_empty() {
        Vec::new()
    } else {
        journal
            .read_records(&replay_seqs)
            .await
            .map_err(|e| ShardError::Journal {
                shard,
                message: format!("reading records to replay: {e}"),
            })?
    }
    .into_iter();
    while let Some(job) = group.pop_front() {
        let mut answers = job.answers.into_iter();
        let slot_lens: Vec<usize> = job.slots.iter().map(|slot| slot.len).collect();
        let mut results: Vec<Vec<IssueResult>> = Vec::with_capacity(slot_lens.len());
        for len in slot_lens {
            let mut slot_results = Vec::with_capacity(len);
            for answer in answers.by_ref().take(len) {
                let replayed = match answer {
                    Answer::Replay { .. } => replays.next(),
                    _ => None,
                };
                match answer_one(shard, metrics, answer, replayed) {
                    Ok(result) => slot_results.push(result),
                    Err(error) => {
                        // Nothing of this tick was sent yet: it goes back to be answered
                        // as stopped with the rest.
                        group.push_front(CommitJob {
                            bytes: Vec::new(),
                            records: 0..0,
                            seqs: 0..0,
                            answers: Vec::new(),
                            slots: job.slots,
                            claim_replies: Vec::new(),
                        });
                        return Err(error);
                    }
                }
            }
            results.push(slot_results);
        }
        for (slot, results) in job.slots.into_iter().zip(results) {
            metrics.borrow_mut().record(
                Stage::Total,
                micros(slot.enqueued.elapsed()),
                slot.len as u64,
            );
            slot.reply.send(results);
        }
        // Claims granted in this job's records (or refused on the state up to it) are
        // answered once it is durable.
        for (reply, result) in job.claim_replies {
            let _ = reply.send(result);
        }
    }
    Ok(())
}

/// The answer to one request; `replayed` is the journal record of a replay.
fn answer_one(
    shard: u32,
    metrics: &RefCell<ShardMetrics>,
    answer: Answer,
    replayed: Option<(u8, Vec<u8>)>,
) -> Result<IssueResult, ShardError> {
    Ok(match answer {
        Answer::Issued { invoice, .. } => {
            metrics.borrow_mut().issued_invoices += 1;
            Ok(IssuedInvoice {
                invoice,
                replayed: false,
            })
        }
        Answer::Replay { seq, identity } => {
            let journal_error = |e: String| ShardError::Journal {
                shard,
                message: format!("record {seq}: {e}"),
            };
            let (_kind, body) = replayed.ok_or_else(|| journal_error("not read".into()))?;
            let invoice =
                decode_issued(&body).map_err(|e: RecordError| journal_error(e.to_string()))?;
            // Assert on both sides of the disk boundary: the index and the record agree.
            if invoice.identity() != identity {
                return Err(journal_error(format!(
                    "holds {:?}, the index says {identity:?}",
                    invoice.identity()
                )));
            }
            metrics.borrow_mut().replayed_invoices += 1;
            Ok(IssuedInvoice {
                invoice,
                replayed: true,
            })
        }
        Answer::Rejected(error) => {
            metrics.borrow_mut().rejected_requests += 1;
            Err(IssueFailure::Rejected(error))
        }
    })
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
        // Not granted at all, or granted to another holder: either way not this shard's.
        Some(TaxCodeStatus::NumberNotGranted | TaxCodeStatus::NotHolder) => {
            Err(ItemError::NumberNotHeld)
        }
        Some(TaxCodeStatus::UnknownTaxpayer) => Err(ItemError::UnknownTaxpayer),
        None => Err(ItemError::Device(item.status)),
    }
}

async fn requisition(
    hsm: &HsmClient,
    holder: Holder,
    seller: &TaxpayerId,
    count: u32,
) -> Result<NumberSegment, String> {
    // One id for this requisition and all its retries: a retry after a lost connection
    // gets the same segment from the device. If the appliance crashes instead, the
    // segment is adopted from the device's inventory at restart.
    let request_id: u64 = rand::random();
    let request = Request::Requisition {
        taxpayer: *seller.as_bytes(),
        count,
        holder,
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

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reply_answers_exactly_once() {
        let (tx, rx) = flume::unbounded();
        let failure = IssueFailure::TaxServer("down".into());
        Reply::Endpoint(EndpointReply::new(tx.clone(), 7)).send(vec![Err(failure.clone())]);
        let answered = rx.try_recv().expect("answered");
        assert_eq!(answered.token, 7);
        assert_eq!(answered.results, vec![Err(failure)]);
        assert!(
            rx.try_recv().is_err(),
            "the answer is not followed by a drop answer"
        );
    }

    #[test]
    fn an_endpoint_reply_dropped_unanswered_answers_empty() {
        let (tx, rx) = flume::unbounded();
        let message = Message::Issue {
            requests: Vec::new(),
            reply: Reply::Endpoint(EndpointReply::new(tx, 9)),
            enqueued: Instant::now(),
        };
        drop(message);
        let answered = rx.try_recv().expect("answered on drop");
        assert_eq!(answered.token, 9);
        assert!(answered.results.is_empty());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_batch_for_a_stopped_shard_is_answered_as_dropped() {
        let (inbox_tx, inbox_rx) = flume::bounded(1);
        drop(inbox_rx);
        let sender = ShardSender { tx: inbox_tx };
        let (tx, rx) = flume::unbounded();
        assert!(sender
            .submit_to(Vec::new(), EndpointReply::new(tx, 3))
            .is_none());
        let answered = rx.try_recv().expect("answered");
        assert_eq!(answered.token, 3);
        assert!(answered.results.is_empty());
    }

    #[test]
    fn a_full_inbox_hands_back_the_send() {
        let (inbox_tx, inbox_rx) = flume::bounded(1);
        let sender = ShardSender { tx: inbox_tx };
        let (tx, rx) = flume::unbounded();
        assert!(sender
            .submit_to(Vec::new(), EndpointReply::new(tx.clone(), 1))
            .is_none());
        let send = sender
            .submit_to(Vec::new(), EndpointReply::new(tx, 2))
            .expect("the inbox is full");
        assert_eq!(inbox_rx.len(), 1);
        drop(inbox_rx.try_recv().expect("first batch"));
        futures_lite::future::block_on(send);
        assert_eq!(
            inbox_rx.len(),
            1,
            "the second batch went in once there was room"
        );
        // The first batch was dropped unanswered; the second is still queued.
        assert_eq!(rx.try_recv().expect("dropped").token, 1);
        assert!(rx.try_recv().is_err());
    }
}
