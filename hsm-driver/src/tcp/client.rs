//! The glommio shell of the pipelined client: connects, runs one reader and one writer
//! task per connection, and races each call against its deadline. All protocol state is
//! in [`super::pipeline`].

use std::cell::RefCell;
use std::future::poll_fn;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use futures_lite::future::or;
use futures_lite::io::{split, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::task::JoinHandle;

use super::pipeline::{Backoff, CallTable, Dispatch};
use super::{HsmError, TcpClientConfig};
use crate::proto::{FrameDecoder, Request, Response};

/// Bytes asked of each socket read: a 4,096-invoice TaxCodes answer is ~230 KB, so a
/// few reads per batch; small enough not to waste memory per connection.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Counters of one client, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Calls answered (successfully or with a device error).
    pub answered: u64,
    /// Connections established (the first one included).
    pub connects: u64,
    /// Connections lost or closed because of a transport or framing error.
    pub connections_lost: u64,
    /// Frames whose correlation id matched no waiting call (late or bogus); dropped.
    pub unknown_answers: u64,
    /// Frames skipped for a bad checksum or version.
    pub corrupt_frames: u64,
    /// Calls that hit their deadline.
    pub timeouts: u64,
}

/// Why the last connect attempt failed, to answer calls that arrive during backoff.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LastFailure {
    Refused,
    Timeout,
    Lost,
}

impl LastFailure {
    /// The error a call gets while the client waits to retry after this failure.
    pub(crate) fn to_error(self) -> HsmError {
        match self {
            LastFailure::Refused => HsmError::Refused,
            LastFailure::Timeout => HsmError::Timeout,
            LastFailure::Lost => HsmError::ConnectionLost,
        }
    }
}

struct State {
    table: CallTable,
    backoff: Backoff,
    /// Bumped on every connect; tasks of an older connection see the change and exit.
    generation: u64,
    up: bool,
    closed: bool,
    last_failure: LastFailure,
    writer_waker: Option<Waker>,
    reader: Option<JoinHandle<()>>,
    stats: ClientStats,
}

struct Shared {
    addr: SocketAddr,
    config: TcpClientConfig,
    /// One permit per call in flight: the back-pressure bound.
    permits: Semaphore,
    /// Serialises connect attempts so that one dropped connection causes one reconnect,
    /// not one per waiting call.
    connect_lock: Semaphore,
    state: RefCell<State>,
}

/// Pipelined tax-server client for one glommio executor (a shard).
///
/// It is `!Send` by design: clone it (cheap, reference counted) into the tasks of the
/// shard that owns it. All clones share one connection.
#[derive(Clone)]
pub struct TcpClient {
    shared: Rc<Shared>,
}

impl std::fmt::Debug for TcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpClient")
            .field("addr", &self.shared.addr)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Sleeps until `deadline` (returns at once if it passed).
pub(crate) async fn sleep_until(deadline: Instant) {
    let wait = deadline.saturating_duration_since(Instant::now());
    if !wait.is_zero() {
        glommio::timer::sleep(wait).await;
    }
}

/// One permit of `semaphore`, or `Timeout` at `deadline` (`Closed` once the client closed
/// the semaphore): every wait of a call counts against the call's one deadline.
pub(crate) async fn permit_until(
    semaphore: &Semaphore,
    deadline: Instant,
) -> Result<glommio::sync::Permit<'_>, HsmError> {
    or(
        async {
            semaphore
                .acquire_permit(1)
                .await
                .map_err(|_| HsmError::Closed)
        },
        async {
            sleep_until(deadline).await;
            Err(HsmError::Timeout)
        },
    )
    .await
}

impl TcpClient {
    /// Connects to the tax server at `addr` (the first address it resolves to). Must be
    /// called inside a glommio executor. Fails if this first connection fails, so that
    /// a misconfigured address is reported at start-up.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: TcpClientConfig,
    ) -> Result<TcpClient, HsmError> {
        let addr = addr
            .to_socket_addrs()
            .map_err(HsmError::Io)?
            .next()
            .ok_or_else(|| {
                HsmError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "address resolves to nothing",
                ))
            })?;
        let config = TcpClientConfig {
            max_in_flight: config.max_in_flight.max(1),
            ..config
        };
        let client = TcpClient {
            shared: Rc::new(Shared {
                addr,
                config,
                permits: Semaphore::new(config.max_in_flight as u64),
                connect_lock: Semaphore::new(1),
                state: RefCell::new(State {
                    table: CallTable::new(),
                    backoff: Backoff::new(
                        config.reconnect_backoff_min,
                        config.reconnect_backoff_max,
                    ),
                    generation: 0,
                    up: false,
                    closed: false,
                    last_failure: LastFailure::Lost,
                    writer_waker: None,
                    reader: None,
                    stats: ClientStats::default(),
                }),
            }),
        };
        let deadline = Instant::now() + config.connect_timeout;
        client.ensure_connected(deadline).await?;
        Ok(client)
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The configuration in use.
    pub fn config(&self) -> TcpClientConfig {
        self.shared.config
    }

    /// Counters so far.
    pub fn stats(&self) -> ClientStats {
        self.shared.state.borrow().stats
    }

    /// Calls currently in flight.
    pub fn in_flight(&self) -> usize {
        self.shared.state.borrow().table.in_flight()
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.state.borrow().up
    }

    /// Sends one command and waits for its answer, at most `call_timeout`.
    ///
    /// Safe to call from many tasks at once: commands are pipelined on one connection.
    /// If `max_in_flight` calls are outstanding the call first waits for a slot. If the
    /// connection is down, the call reconnects (honouring the backoff) within its own
    /// deadline.
    pub async fn call(&self, request: &Request) -> Result<Response, HsmError> {
        let deadline = Instant::now() + self.shared.config.call_timeout;
        let outcome = self.call_until(request, deadline).await;
        if matches!(outcome, Err(HsmError::Timeout)) {
            self.shared.state.borrow_mut().stats.timeouts += 1;
        }
        outcome
    }

    async fn call_until(&self, request: &Request, deadline: Instant) -> Result<Response, HsmError> {
        let shared = &self.shared;
        let _permit = permit_until(&shared.permits, deadline).await?;
        let id = loop {
            self.ensure_connected(deadline).await?;
            let mut st = shared.state.borrow_mut();
            if st.closed {
                return Err(HsmError::Closed);
            }
            // No await since `ensure_connected` returned, but re-check: submit only onto
            // a live connection, whose writer will pick the frame up.
            if st.up {
                let id = st.table.submit(request)?;
                let writer = st.writer_waker.take();
                drop(st);
                if let Some(w) = writer {
                    w.wake();
                }
                break id;
            }
        };
        let mut guard = AbandonGuard {
            shared,
            id,
            armed: true,
        };
        let outcome = or(
            poll_fn(|cx| shared.state.borrow_mut().table.poll_outcome(id, cx.waker())),
            async {
                sleep_until(deadline).await;
                shared.state.borrow_mut().table.time_out(id)
            },
        )
        .await;
        guard.armed = false;
        if matches!(&outcome, Ok(_) | Err(HsmError::Device { .. })) {
            shared.state.borrow_mut().stats.answered += 1;
        }
        outcome
    }

    /// Returns once a connection is up, connecting (after the backoff) if needed.
    async fn ensure_connected(&self, deadline: Instant) -> Result<(), HsmError> {
        let shared = &self.shared;
        {
            let st = shared.state.borrow();
            if st.closed {
                return Err(HsmError::Closed);
            }
            if st.up {
                return Ok(());
            }
        }
        let _connecting = permit_until(&shared.connect_lock, deadline).await?;
        let ready_at = {
            let st = shared.state.borrow();
            if st.closed {
                return Err(HsmError::Closed);
            }
            if st.up {
                // Another call connected while this one waited for the lock.
                return Ok(());
            }
            st.backoff.ready_at()
        };
        if let Some(at) = ready_at {
            if at >= deadline {
                // The next attempt is after this call's deadline: fail now with the
                // reason of the last failure instead of sleeping into a timeout.
                return Err(shared.state.borrow().last_failure.to_error());
            }
            sleep_until(at).await;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let connect_timeout = shared.config.connect_timeout.min(remaining);
        if connect_timeout.is_zero() {
            return Err(HsmError::Timeout);
        }
        let attempt = TcpStream::connect_timeout(shared.addr, connect_timeout)
            .await
            .map_err(|e| HsmError::from_io(std::io::Error::from(e)));
        let stream = match attempt {
            Ok(stream) => stream,
            Err(e) => {
                let mut st = shared.state.borrow_mut();
                st.backoff.on_failure(Instant::now());
                st.last_failure = match e {
                    HsmError::Refused => LastFailure::Refused,
                    HsmError::Timeout => LastFailure::Timeout,
                    _ => LastFailure::Lost,
                };
                return Err(e);
            }
        };
        // Requests are small and latency-bound; Nagle would hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let (rd, wr) = split(stream);
        let mut st = shared.state.borrow_mut();
        if st.closed {
            return Err(HsmError::Closed);
        }
        st.generation += 1;
        st.up = true;
        st.backoff.on_success();
        st.stats.connects += 1;
        let generation = st.generation;
        // glommio runs a spawned task right away, up to its first await: no borrow of
        // the state may be held across the spawns.
        drop(st);
        let reader = glommio::spawn_local(read_loop(self.shared.clone(), rd, generation)).detach();
        glommio::spawn_local(write_loop(self.shared.clone(), wr, generation)).detach();
        let mut st = shared.state.borrow_mut();
        if st.generation == generation && st.up {
            st.reader = Some(reader);
        }
        drop(st);
        tracing::debug!(addr = %shared.addr, generation, "connected to tax server");
        Ok(())
    }

    /// Closes the client: calls in flight and later calls fail with
    /// [`HsmError::Closed`]; the connection is shut.
    pub fn close(&self) {
        let mut st = self.shared.state.borrow_mut();
        if st.closed {
            return;
        }
        st.closed = true;
        st.up = false;
        st.table.fail_all(|| HsmError::Closed);
        let reader = st.reader.take();
        let writer = st.writer_waker.take();
        drop(st);
        if let Some(reader) = reader {
            reader.cancel();
        }
        if let Some(w) = writer {
            w.wake();
        }
        self.shared.permits.close();
        self.shared.connect_lock.close();
    }
}

/// Removes a call from the table if its future is dropped before completion, so that
/// abandoned calls do not accumulate.
struct AbandonGuard<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut st) = self.shared.state.try_borrow_mut() {
                st.table.abandon(self.id);
            }
        }
    }
}

/// Tears down connection `generation` (if still current): every call in flight fails
/// with `ConnectionLost`, the next call reconnects after the backoff.
fn connection_lost(shared: &Shared, generation: u64, from_writer: bool, reason: &str) {
    let mut st = shared.state.borrow_mut();
    if st.generation != generation || !st.up {
        return;
    }
    st.up = false;
    st.stats.connections_lost += 1;
    st.last_failure = LastFailure::Lost;
    st.backoff.on_failure(Instant::now());
    let failed = st.table.fail_all(|| HsmError::ConnectionLost);
    let reader = st.reader.take();
    let writer = st.writer_waker.take();
    drop(st);
    if let Some(w) = writer {
        w.wake();
    }
    if from_writer {
        // The reader is parked in a read on a dead socket: stop it so both halves drop
        // and the socket closes. (The reader never cancels itself: it is returning.)
        if let Some(reader) = reader {
            reader.cancel();
        }
    }
    tracing::warn!(addr = %shared.addr, generation, failed, reason, "tax server connection lost");
}

async fn read_loop(shared: Rc<Shared>, mut rd: ReadHalf<TcpStream>, generation: u64) {
    let mut decoder = FrameDecoder::new();
    let reason = 'conn: loop {
        let buf = decoder.read_buf(READ_CHUNK_BYTES);
        let n = match rd.read(buf).await {
            Ok(0) => break 'conn "closed by peer".to_string(),
            Ok(n) => n,
            Err(e) => break 'conn format!("read: {e}"),
        };
        decoder.commit(n);
        let mut st = shared.state.borrow_mut();
        if st.generation != generation {
            return;
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Dispatch::Unknown(id) = st.table.on_frame(&frame.header, frame.body) {
                        st.stats.unknown_answers += 1;
                        tracing::debug!(id, "answer for no waiting call dropped");
                    }
                }
                Ok(None) => break,
                Err(e) if !e.fatal => {
                    st.stats.corrupt_frames += 1;
                    if let Dispatch::Unknown(id) = st.table.on_corrupt_frame(&e) {
                        st.stats.unknown_answers += 1;
                        tracing::debug!(id, error = %e, "corrupt frame for no waiting call");
                    }
                }
                Err(e) => break 'conn format!("framing: {e}"),
            }
        }
    };
    connection_lost(&shared, generation, false, &reason);
}

async fn write_loop(shared: Rc<Shared>, mut wr: WriteHalf<TcpStream>, generation: u64) {
    let mut buf = Vec::new();
    loop {
        let more = poll_fn(|cx| {
            let mut st = shared.state.borrow_mut();
            if st.generation != generation || !st.up {
                return Poll::Ready(false);
            }
            // Everything queued since the last write goes out in this one write.
            if st.table.take_output(&mut buf) {
                Poll::Ready(true)
            } else {
                st.writer_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if !more {
            return;
        }
        let written = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await;
        if let Err(e) = written {
            connection_lost(&shared, generation, true, &format!("write: {e}"));
            return;
        }
    }
}
