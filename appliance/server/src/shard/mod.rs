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
//!
//! Files, one job each (docs/design/server.md has the module map):
//! - this one: settings, errors, the handle ([`ShardHandle`]) and `run`, which starts a
//!   shard's tasks on its executor;
//! - `startup`: journal recovery, adoption and reconciliation with the tax server's
//!   inventory, pool filling, before the shard serves;
//! - `tick_loop`: the tick loop (events, ticks in flight, gathering batches into ticks);
//! - `tax_server`: TaxCodes commands, requisitions and refills;
//! - `committer`: journal framing of ticks and the group committer;
//! - `answers`: answers to requests, and to batches a stopped shard cannot serve;
//! - `red`: cross-shard red claims.
//!
//! The inbox's message types and the answer types live in [`crate::inbox`], shared with
//! the QUIC endpoints.

mod answers;
mod committer;
mod red;
mod startup;
mod tax_server;
mod tick_loop;

pub use crate::inbox::{
    Answered, EndpointReply, IssueFailure, IssueResult, IssuedInvoice, ShardSender,
};
pub use red::{HELD_BATCHES_MAX, RED_CLAIMS_WAITING_MAX};

use crate::inbox::{Message, Reply};
use crate::journal::JournalConfig;
use crate::metrics::ShardMetrics;
use appliance_core::{IssueRequest, Issuer, IssuerConfig, TaxpayerId};
use glommio::{LocalExecutorBuilder, Placement};
use hsm_driver::proto::Holder;
use hsm_driver::route::{HsmClient, HsmClientConfig, Route};
use std::cell::RefCell;
use std::collections::HashMap;
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

/// Requests of one submitted batch within a tick: how many, where to answer, and when
/// they arrived.
struct BatchSlot {
    len: usize,
    reply: Reply,
    enqueued: Instant,
}

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
    refills_tx: flume::Sender<tax_server::RefillDone>,
    refills_rx: flume::Receiver<tax_server::RefillDone>,
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
    let (mut shard, journal) = startup::start(&config).await?;
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
    let (commit_tx, commit_rx) =
        glommio::channels::local_channel::new_bounded(committer::COMMIT_QUEUE_TICKS);
    let committer = glommio::spawn_local(committer::commit_loop(
        shard.id,
        journal,
        commit_rx,
        Rc::clone(&shard.metrics),
    ));
    let served = shard.serve(&config, &rx, &shutdown, &commit_tx).await;
    answers::answer_inbox_as_stopped(shard.id, rx, &served, shard.metrics.borrow().clone());
    for endpoint in endpoints {
        endpoint.await;
    }
    drop(commit_tx);
    let committed = committer.await;
    served.and(committed)
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

fn internal(shard: u32, e: impl std::fmt::Display) -> ShardError {
    ShardError::Config {
        shard,
        message: e.to_string(),
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}
