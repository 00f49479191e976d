//! One QUIC endpoint on one UDP socket, driven by quinn-proto (sans-IO) from the shard's
//! glommio executor: no Send futures, no locks, no other thread.
//!
//! Two tasks share the executor with the shard's tick loop:
//! - the receiver reads datagrams from the socket and queues them for the driver;
//! - the driver owns the quinn-proto endpoint and every connection: it feeds datagrams
//!   in, reads requests from streams, hands each issue frame's requests to their home
//!   shards (this one or, forwarded, another: always over the shard's inbox channel),
//!   takes the shards' answers from its answer queue once they are durable, writes the
//!   replies, sends what quinn-proto wants sent and fires its timers.
//!
//! This file is the quinn-proto driver: datagrams in and out, connections, streams and
//! timers. What an endpoint does with a request frame once it is read (hello, or an issue
//! frame's requests to their shards and the answers back) is the issue exchange, in
//! `super::exchange`. A request frame costs no task and no channel of its own: the
//! shards answer into the driver's one answer queue, tagged with the frame
//! (`exchange::PendingFrame`).
//!
//! Limits (TigerStyle: a bound on everything): connections per endpoint, streams per
//! connection (QUIC flow control enforces it on the client), bytes buffered per stream
//! ([`FRAME_BYTES_MAX`]) and per connection ([`CONNECTION_INBOUND_BYTES_MAX`]), datagrams
//! queued between receiver and driver.

use super::auth::Authorisation;
use super::exchange::PendingFrame;
use super::udp::{Received, RecvScratch, UdpIo};
use crate::inbox::{Answered, ShardSender};
use crate::metrics::ShardMetrics;
use appliance_proto::{
    encode_error_frame, ErrorCode, Header, HeaderError, FRAME_BYTES_MAX, HEADER_BYTES,
};
use bytes::BytesMut;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Event, ReadError, ServerConfig, StreamEvent, StreamId,
    VarInt, WriteError,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Connections one endpoint serves at once; more are refused at the handshake.
pub const CONNECTIONS_MAX: usize = 1024;
/// Bytes of request frames being received per connection (reserved from their headers);
/// a frame that would exceed it is refused with the retryable `Overloaded` error.
pub const CONNECTION_INBOUND_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Inputs queued between the receiver task and the driver (an input holds one GRO batch
/// of up to 64 datagrams).
const INPUT_QUEUE_MAX: usize = 1024;
/// Inputs the driver takes per turn before it drives the connections.
const INPUTS_PER_TURN_MAX: usize = 128;
/// Answers the driver takes per turn before it drives the connections.
const ANSWERS_PER_TURN_MAX: usize = 1024;
/// Bytes quinn-proto may lay out for one send (GSO batch or single datagram).
const TRANSMIT_BYTES_MAX: usize = 64 * 1024;

/// Application error codes of QUIC CONNECTION_CLOSE and STOP_SENDING frames.
pub mod close_code {
    /// The client's certificate names an identity with no authorisation.
    pub const UNAUTHORISED_CLIENT: u32 = 0x10;
    /// The endpoint is shutting down.
    pub const SHUTDOWN: u32 = 0x11;
    /// The request frame is larger than the limit (STOP_SENDING on that stream).
    pub const FRAME_TOO_LARGE: u32 = 0x12;
    /// The request frame's header is invalid (STOP_SENDING on that stream).
    pub const MALFORMED: u32 = 0x13;
    /// The connection has too many request bytes in flight (STOP_SENDING; retry later).
    pub const OVERLOADED: u32 = 0x14;
}

/// What the endpoint knows about the appliance, shared by its exchanges.
pub struct EndpointContext {
    /// This shard.
    pub shard_id: u32,
    /// Every shard's inbox, index = shard id (this shard's own included).
    pub shards: Vec<ShardSender>,
    /// The per-shard UDP ports, for hello.
    pub shard_ports: Vec<u16>,
    /// Who may issue for which seller.
    pub authorisation: Arc<Authorisation>,
    /// Counters of this shard's endpoints.
    pub metrics: Rc<RefCell<ShardMetrics>>,
}

/// A request frame being received.
#[derive(Default)]
struct Inbound {
    bytes: Vec<u8>,
    /// Bytes reserved against the connection's budget once the header arrived (0 before).
    reserved: usize,
}

/// A reply being sent.
struct Outbound {
    frame: Vec<u8>,
    written: usize,
}

pub(super) struct Conn {
    inner: quinn_proto::Connection,
    pub(super) identity: Option<Rc<str>>,
    inbound: HashMap<StreamId, Inbound>,
    /// Bytes reserved by the frames being received.
    inbound_bytes: usize,
    outbound: HashMap<StreamId, Outbound>,
}

/// Runs one endpoint on `socket` until `shutdown` disconnects.
pub async fn serve(
    socket: UdpIo,
    server_config: Arc<ServerConfig>,
    context: Rc<EndpointContext>,
    shutdown: flume::Receiver<()>,
) {
    let socket = Rc::new(socket);
    let local_ip = socket.local_addr().ok().map(|a| a.ip());
    let (input_tx, input_rx) = flume::bounded(INPUT_QUEUE_MAX);
    let receiver = glommio::spawn_local(receive(Rc::clone(&socket), input_tx));
    // Unbounded because shards must never block on it; what bounds it is the number of
    // frames in flight (streams per connection × connections).
    let (answers_tx, answers_rx) = flume::unbounded();
    let endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        Some(Arc::clone(&server_config)),
        true,
        None,
    );
    let mut driver = Driver {
        endpoint,
        socket,
        local_ip,
        conns: HashMap::new(),
        context,
        answers_tx,
        pending: HashMap::new(),
        next_frame: 0,
        buf: Vec::with_capacity(TRANSMIT_BYTES_MAX),
    };
    driver.run(input_rx, answers_rx, shutdown).await;
    receiver.cancel().await;
}

async fn receive(socket: Rc<UdpIo>, inputs: flume::Sender<Received>) {
    let mut scratch = RecvScratch::default();
    let mut received = Vec::new();
    loop {
        match socket.recv(&mut scratch, &mut received).await {
            Ok(()) => {
                for batch in received.drain(..) {
                    if inputs.send_async(batch).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // ICMP errors surface as receive errors on unconnected UDP sockets; they
                // concern one peer, not the endpoint.
                tracing::debug!(error = %e, "udp receive error");
            }
        }
    }
}

pub(super) struct Driver {
    endpoint: quinn_proto::Endpoint,
    socket: Rc<UdpIo>,
    local_ip: Option<std::net::IpAddr>,
    pub(super) conns: HashMap<ConnectionHandle, Conn>,
    pub(super) context: Rc<EndpointContext>,
    /// Where shards answer this endpoint's frames.
    pub(super) answers_tx: flume::Sender<Answered>,
    /// Frames waiting for their shards' answers, by frame number.
    pub(super) pending: HashMap<u64, PendingFrame>,
    pub(super) next_frame: u64,
    buf: Vec<u8>,
}

enum Wake {
    Input(Option<Received>),
    Answer(Answered),
    Timer,
    Shutdown,
}

impl Driver {
    async fn run(
        &mut self,
        inputs: flume::Receiver<Received>,
        answers: flume::Receiver<Answered>,
        shutdown: flume::Receiver<()>,
    ) {
        loop {
            let timeout = self
                .conns
                .values_mut()
                .filter_map(|c| c.inner.poll_timeout())
                .min();
            let wait = timeout.map(|t| t.saturating_duration_since(Instant::now()));
            let wake = {
                let input = async { Wake::Input(inputs.recv_async().await.ok()) };
                // The driver holds a sender itself, so this never ends.
                let answer = async {
                    match answers.recv_async().await {
                        Ok(answered) => Wake::Answer(answered),
                        Err(_) => futures_lite::future::pending().await,
                    }
                };
                let stop = async {
                    let _ = shutdown.recv_async().await;
                    Wake::Shutdown
                };
                let timer = async {
                    match wait {
                        Some(d) => glommio::timer::sleep(d).await,
                        None => futures_lite::future::pending::<()>().await,
                    }
                    Wake::Timer
                };
                futures_lite::future::or(
                    futures_lite::future::or(input, answer),
                    futures_lite::future::or(stop, timer),
                )
                .await
            };
            match wake {
                Wake::Input(Some(input)) => {
                    self.handle_datagrams(input).await;
                    for _ in 1..INPUTS_PER_TURN_MAX {
                        match inputs.try_recv() {
                            Ok(input) => self.handle_datagrams(input).await,
                            Err(_) => break,
                        }
                    }
                }
                Wake::Answer(answered) => self.answered(answered),
                Wake::Input(None) => return,
                Wake::Timer => {}
                Wake::Shutdown => {
                    self.close_all().await;
                    return;
                }
            }
            // Answers that came meanwhile go out in this pass too.
            for _ in 0..ANSWERS_PER_TURN_MAX {
                match answers.try_recv() {
                    Ok(answered) => self.answered(answered),
                    Err(_) => break,
                }
            }
            self.drive_all().await;
        }
    }

    async fn close_all(&mut self) {
        let now = Instant::now();
        for conn in self.conns.values_mut() {
            conn.inner.close(
                now,
                VarInt::from_u32(close_code::SHUTDOWN),
                bytes::Bytes::from_static(b"shutting down"),
            );
        }
        // One pass sends the CONNECTION_CLOSE frames; clients do not wait for more.
        self.drive_all().await;
    }

    async fn handle_datagrams(&mut self, mut batch: Received) {
        while !batch.data.is_empty() {
            let datagram = batch.data.split_to(batch.stride.min(batch.data.len()));
            self.handle_datagram(&batch, datagram).await;
        }
    }

    async fn handle_datagram(&mut self, batch: &Received, data: BytesMut) {
        let now = Instant::now();
        let local_ip = batch.local_ip.or(self.local_ip);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        match self
            .endpoint
            .handle(now, batch.from, local_ip, batch.ecn, data, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, event)) => {
                if let Some(conn) = self.conns.get_mut(&ch) {
                    conn.inner.handle_event(event);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if self.conns.len() >= CONNECTIONS_MAX {
                    tracing::warn!(
                        shard = self.context.shard_id,
                        "connection limit reached; refusing"
                    );
                    let transmit = self.endpoint.refuse(incoming, &mut buf);
                    self.socket.send(&transmit, &buf[..transmit.size]).await;
                } else {
                    match self.endpoint.accept(incoming, now, &mut buf, None) {
                        Ok((ch, inner)) => {
                            self.context.metrics.borrow_mut().quic.connections_accepted += 1;
                            self.conns.insert(
                                ch,
                                Conn {
                                    inner,
                                    identity: None,
                                    inbound: HashMap::new(),
                                    inbound_bytes: 0,
                                    outbound: HashMap::new(),
                                },
                            );
                        }
                        Err(e) => {
                            tracing::debug!(cause = %e.cause, "accept failed");
                            if let Some(transmit) = e.response {
                                self.socket.send(&transmit, &buf[..transmit.size]).await;
                            }
                        }
                    }
                }
            }
            Some(DatagramEvent::Response(transmit)) => {
                self.socket.send(&transmit, &buf[..transmit.size]).await;
            }
            None => {}
        }
        self.buf = buf;
    }

    async fn drive_all(&mut self) {
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in handles {
            self.drive(ch).await;
        }
    }

    /// Everything one connection has to do now: timers, application events, endpoint
    /// events, datagrams to send; and removal once drained.
    async fn drive(&mut self, ch: ConnectionHandle) {
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(&ch) else {
            return;
        };
        if conn.inner.poll_timeout().is_some_and(|t| t <= now) {
            conn.inner.handle_timeout(now);
        }
        loop {
            let Some(conn) = self.conns.get_mut(&ch) else {
                return;
            };
            let Some(event) = conn.inner.poll() else {
                break;
            };
            match event {
                Event::Connected => self.on_connected(ch),
                Event::ConnectionLost { reason } => {
                    tracing::debug!(shard = self.context.shard_id, %reason, "connection lost");
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    let mut opened = Vec::new();
                    while let Some(id) = conn.inner.streams().accept(Dir::Bi) {
                        opened.push(id);
                    }
                    for id in opened {
                        self.read_stream(ch, id);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => self.read_stream(ch, id),
                Event::Stream(StreamEvent::Writable { id }) => write_reply(conn, id),
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    // The client gave up on the reply; the work is done anyway.
                    conn.outbound.remove(&id);
                }
                Event::Stream(_)
                | Event::HandshakeDataReady
                | Event::DatagramReceived
                | Event::DatagramsUnblocked => {}
            }
        }
        let conn = self.conns.get_mut(&ch).expect("present");
        while let Some(event) = conn.inner.poll_endpoint_events() {
            if let Some(event) = self.endpoint.handle_event(ch, event) {
                conn.inner.handle_event(event);
            }
        }
        let mut buf = std::mem::take(&mut self.buf);
        let segments_max = self.socket.max_gso_segments();
        loop {
            buf.clear();
            let conn = self.conns.get_mut(&ch).expect("present");
            // Room for as many full-size datagrams as one GSO send carries.
            let segments = (TRANSMIT_BYTES_MAX / conn.inner.current_mtu().max(1) as usize)
                .clamp(1, segments_max);
            let Some(transmit) = conn.inner.poll_transmit(now, segments, &mut buf) else {
                break;
            };
            self.socket.send(&transmit, &buf[..transmit.size]).await;
        }
        self.buf = buf;
        let conn = self.conns.get_mut(&ch).expect("present");
        if conn.inner.is_drained() {
            self.conns.remove(&ch);
        }
    }

    /// The handshake is done: the client certificate was verified against the CA; its
    /// identity must also be one the authorisation knows.
    fn on_connected(&mut self, ch: ConnectionHandle) {
        let conn = self.conns.get_mut(&ch).expect("present");
        let identity = conn
            .inner
            .crypto_session()
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().and_then(super::tls::client_identity));
        match identity {
            Some(identity) if self.context.authorisation.knows(&identity) => {
                conn.identity = Some(Rc::from(identity));
            }
            other => {
                tracing::warn!(
                    shard = self.context.shard_id,
                    remote = %conn.inner.remote_address(),
                    identity = ?other,
                    "client identity not authorised; closing the connection"
                );
                self.context
                    .metrics
                    .borrow_mut()
                    .quic
                    .unauthorised_connections += 1;
                conn.inner.close(
                    Instant::now(),
                    VarInt::from_u32(close_code::UNAUTHORISED_CLIENT),
                    bytes::Bytes::from_static(b"client identity not authorised"),
                );
            }
        }
    }

    /// Reads what arrived on a request stream; a finished frame is handled.
    ///
    /// Everything that arrives is read at once: data left unread inside quinn-proto would
    /// hold connection-level flow-control credit that other streams need to finish. What
    /// bounds memory is the reservation: once a frame's header is in, its announced size
    /// is reserved against [`CONNECTION_INBOUND_BYTES_MAX`], and a frame that does not
    /// fit is refused with the retryable [`ErrorCode::Overloaded`] (its stream stopped,
    /// so the client stops sending it).
    fn read_stream(&mut self, ch: ConnectionHandle, id: StreamId) {
        let conn = self.conns.get_mut(&ch).expect("present");
        if conn.identity.is_none() {
            return; // closing, or not yet connected
        }
        let inbound = conn.inbound.entry(id).or_default();
        let mut recv = conn.inner.recv_stream(id);
        let Ok(mut chunks) = recv.read(true) else {
            let released = conn.inbound.remove(&id).map_or(0, |i| i.reserved);
            conn.inbound_bytes -= released;
            return;
        };
        let mut finished = false;
        let mut reset = false;
        let mut too_large = false;
        loop {
            match chunks.next(usize::MAX) {
                Ok(Some(chunk)) => {
                    if inbound.bytes.len() + chunk.bytes.len() > FRAME_BYTES_MAX {
                        too_large = true;
                        break;
                    }
                    inbound.bytes.extend_from_slice(&chunk.bytes);
                }
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(ReadError::Blocked) => break,
                Err(ReadError::Reset(_)) => {
                    reset = true;
                    break;
                }
            }
        }
        let _ = chunks.finalize();
        // Check the header as soon as it is there, so that a frame announcing too much
        // or speaking another version is refused before its body is buffered.
        let mut refuse: Option<(ErrorCode, String)> = None;
        if too_large {
            refuse = Some((
                ErrorCode::FrameTooLarge,
                format!("frame exceeds {FRAME_BYTES_MAX} bytes"),
            ));
        } else if inbound.reserved == 0 && inbound.bytes.len() >= HEADER_BYTES {
            match Header::decode(&inbound.bytes) {
                Err(e) => refuse = Some((header_error_code(&e), e.to_string())),
                Ok(header) => {
                    let need = HEADER_BYTES + header.body_bytes as usize;
                    if conn.inbound_bytes + need > CONNECTION_INBOUND_BYTES_MAX {
                        refuse = Some((
                            ErrorCode::Overloaded,
                            "too many request bytes in flight on this connection".into(),
                        ));
                    } else {
                        inbound.reserved = need;
                        conn.inbound_bytes += need;
                        // One allocation for the whole frame instead of regrowing (and
                        // copying) it chunk by chunk.
                        inbound
                            .bytes
                            .reserve_exact(need.saturating_sub(inbound.bytes.len()));
                    }
                }
            }
        }
        if refuse.is_none() && inbound.reserved > 0 && inbound.bytes.len() > inbound.reserved {
            refuse = Some((
                ErrorCode::Malformed,
                "more body bytes than the header announced".into(),
            ));
        }
        if reset || refuse.is_some() || finished {
            let inbound = conn.inbound.remove(&id).expect("present");
            conn.inbound_bytes -= inbound.reserved;
            if reset {
                return;
            }
            if let Some((code, message)) = refuse {
                let stop = match code {
                    ErrorCode::FrameTooLarge => close_code::FRAME_TOO_LARGE,
                    ErrorCode::Overloaded => close_code::OVERLOADED,
                    _ => close_code::MALFORMED,
                };
                let _ = conn.inner.recv_stream(id).stop(VarInt::from_u32(stop));
                self.refuse_stream(ch, id, code, &message);
                return;
            }
            self.handle_frame(ch, id, inbound.bytes);
        }
    }

    pub(super) fn refuse_stream(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        code: ErrorCode,
        message: &str,
    ) {
        self.context.metrics.borrow_mut().quic.frames_refused += 1;
        tracing::debug!(shard = self.context.shard_id, %code, message, "frame refused");
        let mut frame = Vec::new();
        encode_error_frame(&mut frame, code, message);
        self.reply(ch, id, frame);
    }

    pub(super) fn reply(&mut self, ch: ConnectionHandle, id: StreamId, frame: Vec<u8>) {
        if let Some(conn) = self.conns.get_mut(&ch) {
            conn.outbound.insert(id, Outbound { frame, written: 0 });
            write_reply(conn, id);
        }
    }
}

pub(super) fn header_error_code(e: &HeaderError) -> ErrorCode {
    match e {
        HeaderError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        HeaderError::TooLarge(_) => ErrorCode::FrameTooLarge,
        HeaderError::Truncated(_)
        | HeaderError::BadMagic
        | HeaderError::UnknownKind(_)
        | HeaderError::Flags(_)
        | HeaderError::BodyLength { .. } => ErrorCode::Malformed,
    }
}

/// Writes as much of a queued reply as flow control allows; finishes the stream when
/// all of it is written.
fn write_reply(conn: &mut Conn, id: StreamId) {
    let Some(out) = conn.outbound.get_mut(&id) else {
        return;
    };
    let mut send = conn.inner.send_stream(id);
    while out.written < out.frame.len() {
        match send.write(&out.frame[out.written..]) {
            Ok(n) => out.written += n,
            Err(WriteError::Blocked) => return,
            Err(_) => {
                // Stopped or closed by the client: nothing more to send.
                conn.outbound.remove(&id);
                return;
            }
        }
    }
    let _ = send.finish();
    conn.outbound.remove(&id);
}
