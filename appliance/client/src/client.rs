//! [`Client`]: connections (one per shard when shard-aware), the hello exchange, one
//! exchange per stream with bounded concurrency, and bulk issuing with retries that keep
//! idempotency.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use appliance_core::IssueRequest;
use appliance_proto::{
    decode_error, decode_results, encode_hello_frame, encode_request, split_frame, FrameKind,
    Header, HelloReply, ItemResult, BATCH_REQUESTS_MAX, FRAME_BYTES_MAX, HEADER_BYTES,
};
use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::config::ClientConfig;
use crate::error::{connect_error, connection_error, ClientError};

/// What [`Client::issue`] gives back for one request: the server's answer (issued,
/// replayed, or refused with an error code), or why no answer was had after every
/// attempt.
pub type IssueOutcome = Result<ItemResult, ClientError>;

/// A connection to the appliance: cheap to clone (an `Arc`), shareable across tasks; every
/// method takes `&self`.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server_addr", &self.inner.config.server_addr)
            .field("shard_aware", &self.inner.config.shard_aware)
            .field("hello", &self.inner.hello)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ClientConfig,
    hello: HelloReply,
    /// The service-port connection: hello, `shard = None`, and everything when not
    /// shard-aware.
    service: Arc<Link>,
    /// Index = shard id. Shard-unaware, or a shard without its own port: the service link.
    shards: Vec<Arc<Link>>,
    streams_per_connection: u32,
    batch_requests_max: usize,
    frame_bytes_max: usize,
}

/// One QUIC connection slot: reconnects on demand, bounds concurrent streams.
struct Link {
    addr: SocketAddr,
    server_name: String,
    endpoint: quinn::Endpoint,
    quic: quinn::ClientConfig,
    connect_timeout: std::time::Duration,
    /// The live connection, if any. A std mutex: held only to clone or replace the handle.
    current: Mutex<Option<quinn::Connection>>,
    /// Serialises reconnects so that a lost connection is replaced once, not once per
    /// waiting exchange.
    reconnecting: tokio::sync::Mutex<()>,
    /// One permit per stream in flight on this link.
    permits: Semaphore,
    closed: std::sync::atomic::AtomicBool,
}

impl Link {
    fn new(
        addr: SocketAddr,
        config: &ClientConfig,
        quic: quinn::ClientConfig,
        endpoint: Option<quinn::Endpoint>,
    ) -> Result<Link, ClientError> {
        let endpoint = match endpoint {
            Some(endpoint) => endpoint,
            None => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect {
                    addr,
                    reason: format!("bind UDP socket: {e}"),
                })?
            }
        };
        Ok(Link {
            addr,
            server_name: config.server_name.clone(),
            endpoint,
            quic,
            connect_timeout: config.connect_timeout,
            current: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
            // Permits are added once hello has told the server's limit.
            permits: Semaphore::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn live(&self) -> Option<quinn::Connection> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// The live connection, reconnecting if it was lost.
    async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let _guard = self.reconnecting.lock().await;
        // Another exchange may have reconnected while this one waited.
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ClientError::Closed);
        }
        let connecting = self
            .endpoint
            .connect_with(self.quic.clone(), self.addr, &self.server_name)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(name) => {
                    ClientError::Config(format!("invalid server name {name:?}"))
                }
                other => ClientError::Connect {
                    addr: self.addr,
                    reason: other.to_string(),
                },
            })?;
        let connection = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(ClientError::Connect {
                    addr: self.addr,
                    reason: format!("no handshake within {:?}", self.connect_timeout),
                })
            }
            Ok(Err(e)) => return Err(connect_error(self.addr, &e)),
            Ok(Ok(connection)) => connection,
        };
        tracing::debug!(addr = %self.addr, "connected");
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection.clone());
        Ok(connection)
    }

    fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.permits.close();
        if let Some(connection) = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            connection.close(0u32.into(), b"client closed");
        }
    }
}

/// One exchange on one new stream: write the frame, finish, read the reply to its end.
/// The frame is handed to quinn as an owned chunk: no copy into its send buffer (a bulk
/// frame is ~200 KB).
async fn stream_exchange(
    connection: &quinn::Connection,
    frame: Bytes,
) -> Result<Vec<u8>, ClientError> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| connection_error(&e))?;
    match send.write_chunk(frame).await {
        // `finish` fails only if the stream was already stopped; the read below tells why.
        Ok(()) => drop(send.finish()),
        // A server refusing a frame early (too large) stops our side and still answers
        // with an Error frame: read it rather than report a bare "stopped".
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(quinn::WriteError::ConnectionLost(e)) => return Err(connection_error(&e)),
        Err(e) => return Err(ClientError::ConnectionLost(e.to_string())),
    }
    match recv.read_to_end(FRAME_BYTES_MAX).await {
        Ok(reply) => Ok(reply),
        Err(quinn::ReadToEndError::TooLong) => Err(ClientError::MalformedReply(format!(
            "reply longer than {FRAME_BYTES_MAX} bytes"
        ))),
        Err(quinn::ReadToEndError::Read(e)) => Err(match e {
            quinn::ReadError::Reset(code) => ClientError::StreamReset(code.into_inner()),
            quinn::ReadError::ConnectionLost(e) => connection_error(&e),
            other => ClientError::ConnectionLost(other.to_string()),
        }),
    }
}

/// Decodes an issue exchange's reply: `expected` results, or the server's refusal.
fn decode_issue_reply(reply: &[u8], expected: usize) -> Result<Vec<ItemResult>, ClientError> {
    let (header, body) =
        split_frame(reply).map_err(|e| ClientError::MalformedReply(e.to_string()))?;
    match header.kind {
        FrameKind::IssueReply => {
            if header.count as usize != expected {
                return Err(ClientError::MalformedReply(format!(
                    "{} results for {expected} requests",
                    header.count
                )));
            }
            decode_results(body, header.count)
                .map_err(|e| ClientError::MalformedReply(e.to_string()))
        }
        FrameKind::Error => {
            let (code, message) =
                decode_error(body).map_err(|e| ClientError::MalformedReply(e.to_string()))?;
            Err(ClientError::Refused { code, message })
        }
        other => Err(ClientError::MalformedReply(format!(
            "{other:?} frame in answer to an issue frame"
        ))),
    }
}

/// Runs hello on `connection` and checks the reply.
async fn hello_on(
    connection: &quinn::Connection,
    timeout: std::time::Duration,
) -> Result<HelloReply, ClientError> {
    let mut frame = Vec::with_capacity(HEADER_BYTES);
    encode_hello_frame(&mut frame);
    let reply = match tokio::time::timeout(timeout, stream_exchange(connection, frame.into())).await
    {
        Err(_) => return Err(ClientError::Timeout(timeout)),
        // TLS failures surface here when the server refuses our certificate after our side
        // of the handshake completed (TLS 1.3 client auth): keep them typed as Tls.
        Ok(Err(e @ (ClientError::Tls(_) | ClientError::Closed))) => return Err(e),
        Ok(Err(e)) => return Err(ClientError::Hello(e.to_string())),
        Ok(Ok(reply)) => reply,
    };
    let (header, body) = split_frame(&reply).map_err(|e| ClientError::Hello(e.to_string()))?;
    match header.kind {
        FrameKind::HelloReply => {
            HelloReply::decode(body).map_err(|e| ClientError::Hello(e.to_string()))
        }
        FrameKind::Error => {
            let (code, message) =
                decode_error(body).map_err(|e| ClientError::Hello(e.to_string()))?;
            Err(ClientError::Refused { code, message })
        }
        other => Err(ClientError::Hello(format!(
            "{other:?} frame in answer to hello"
        ))),
    }
}

/// A frame to send and the positions (in the caller's request list) it carries.
struct FramePlan {
    shard: u16,
    indices: Vec<usize>,
    frame: Vec<u8>,
}

/// Splits `indices` (all for one shard) into issue frames of at most `batch_max`
/// requests and `bytes_max` bytes. A request too large for any frame goes alone; the
/// server refuses that frame and the refusal becomes the request's result.
fn plan_frames(
    requests: &[IssueRequest],
    shard: u16,
    indices: &[usize],
    batch_max: usize,
    bytes_max: usize,
) -> Vec<FramePlan> {
    let mut plans = Vec::new();
    let mut frame = vec![0u8; HEADER_BYTES];
    let mut taken: Vec<usize> = Vec::new();
    let close = |frame: &mut Vec<u8>, taken: &mut Vec<usize>, plans: &mut Vec<FramePlan>| {
        let header = Header {
            kind: FrameKind::Issue,
            count: taken.len() as u32,
            body_bytes: (frame.len() - HEADER_BYTES) as u32,
        };
        frame[..HEADER_BYTES].copy_from_slice(&header.encode());
        plans.push(FramePlan {
            shard,
            indices: std::mem::take(taken),
            frame: std::mem::replace(frame, vec![0u8; HEADER_BYTES]),
        });
    };
    for &index in indices {
        let before = frame.len();
        encode_request(&mut frame, &requests[index]);
        let full = taken.len() >= batch_max || frame.len() > bytes_max;
        if full && !taken.is_empty() {
            // Move this request's bytes to the next frame.
            let item = frame.split_off(before);
            close(&mut frame, &mut taken, &mut plans);
            frame.extend_from_slice(&item);
        }
        taken.push(index);
    }
    if !taken.is_empty() {
        close(&mut frame, &mut taken, &mut plans);
    }
    plans
}

impl Client {
    /// Connects to the service port, runs hello, and when shard-aware connects to every
    /// shard's own port (checking with a hello that the port answers as that shard).
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.streams_per_connection == Some(0) {
            return Err(ClientError::Config(
                "streams_per_connection must be ≥ 1".into(),
            ));
        }
        if config.retry.attempts_max == 0 {
            return Err(ClientError::Config("retry.attempts_max must be ≥ 1".into()));
        }
        let quic = config.quic_config()?;
        let service = Arc::new(Link::new(config.server_addr, &config, quic.clone(), None)?);
        let connection = service.connection().await?;
        let hello = hello_on(&connection, config.exchange_timeout).await?;
        tracing::debug!(?hello, "hello");

        let streams_per_connection = match config.streams_per_connection {
            Some(limit) => limit.min(hello.streams_max),
            None => hello.streams_max,
        }
        .max(1);
        let batch_requests_max = hello.batch_requests_max.clamp(1, BATCH_REQUESTS_MAX) as usize;
        let frame_bytes_max =
            (hello.frame_bytes_max as usize).clamp(HEADER_BYTES + 1, FRAME_BYTES_MAX);

        let mut shards = Vec::with_capacity(usize::from(hello.shard_count));
        for (shard, &port) in hello.shard_ports.iter().enumerate() {
            if !config.shard_aware || port == 0 {
                shards.push(service.clone());
                continue;
            }
            let addr = SocketAddr::new(config.server_addr.ip(), port);
            if addr == config.server_addr {
                shards.push(service.clone());
                continue;
            }
            let link = Arc::new(Link::new(addr, &config, quic.clone(), None)?);
            let connection = link.connection().await?;
            let answer = hello_on(&connection, config.exchange_timeout).await?;
            // A port answering as another shard would make every request a forwarded one:
            // a deployment error worth failing loudly for.
            if usize::from(answer.shard_id) != shard || answer.shard_count != hello.shard_count {
                return Err(ClientError::Hello(format!(
                    "port {port} answered as shard {} of {}, expected shard {shard} of {}",
                    answer.shard_id, answer.shard_count, hello.shard_count
                )));
            }
            link.permits.add_permits(streams_per_connection as usize);
            shards.push(link);
        }
        service.permits.add_permits(streams_per_connection as usize);
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                hello,
                service,
                shards,
                streams_per_connection,
                batch_requests_max,
                frame_bytes_max,
            }),
        })
    }

    /// Number of shards of the service.
    pub fn shard_count(&self) -> u16 {
        self.inner.hello.shard_count
    }

    /// What the service said in hello.
    pub fn hello(&self) -> &HelloReply {
        &self.inner.hello
    }

    /// Concurrent streams this client opens per connection.
    pub fn streams_per_connection(&self) -> u32 {
        self.inner.streams_per_connection
    }

    /// Most requests the client puts in one frame (the server's limit).
    pub fn batch_requests_max(&self) -> usize {
        self.inner.batch_requests_max
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The home shard of `request` (where [`Client::issue`] sends it when shard-aware).
    pub fn home_shard(&self, request: &IssueRequest) -> u16 {
        let shard = appliance_proto::home_shard(request, u32::from(self.shard_count()));
        // home_shard is < shard_count, which is a u16.
        shard as u16
    }

    fn link(&self, shard: Option<u16>) -> Result<&Arc<Link>, ClientError> {
        match shard {
            None => Ok(&self.inner.service),
            Some(shard) => {
                self.inner
                    .shards
                    .get(usize::from(shard))
                    .ok_or(ClientError::NoSuchShard {
                        shard,
                        shard_count: self.shard_count(),
                    })
            }
        }
    }

    /// One exchange on `link`, bounded by the link's stream permits and the timeout.
    async fn exchange_on(&self, link: &Link, frame: Bytes) -> Result<Vec<u8>, ClientError> {
        // The permit wait is outside the timeout: it is our own queue, not the server's.
        let _permit = link
            .permits
            .acquire()
            .await
            .map_err(|_| ClientError::Closed)?;
        let connection = link.connection().await?;
        let timeout = self.inner.config.exchange_timeout;
        match tokio::time::timeout(timeout, stream_exchange(&connection, frame)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(timeout)),
        }
    }

    /// Sends `frame` as is on a new stream of shard `shard`'s connection (`None`: the
    /// service connection; shard-unaware clients use the service connection for every
    /// shard) and returns the reply's bytes unchecked. No retry. For tests and load
    /// generators that build their own frames.
    pub async fn exchange_raw(
        &self,
        shard: Option<u16>,
        frame: Vec<u8>,
    ) -> Result<Vec<u8>, ClientError> {
        let link = self.link(shard)?;
        self.exchange_on(link, frame.into()).await
    }

    /// Sends `requests` as one issue frame to shard `shard` (as in
    /// [`Client::exchange_raw`]) and decodes the reply: one result per request, in order.
    /// No splitting, no retry: what load generators need to control exactly what is on
    /// the wire.
    pub async fn issue_frame(
        &self,
        shard: Option<u16>,
        requests: &[IssueRequest],
    ) -> Result<Vec<ItemResult>, ClientError> {
        if requests.is_empty() || requests.len() > self.inner.batch_requests_max {
            return Err(ClientError::BatchSize(requests.len()));
        }
        let link = self.link(shard)?;
        let mut frame = Vec::with_capacity(HEADER_BYTES + 256 * requests.len());
        appliance_proto::encode_issue_frame(&mut frame, requests);
        let reply = self.exchange_on(link, frame.into()).await?;
        decode_issue_reply(&reply, requests.len())
    }

    /// Issues every request and returns one outcome per request, in the order given.
    ///
    /// Each request goes to its home shard's connection when shard-aware (else the service
    /// connection), in frames split by the server's request and byte limits, sent
    /// concurrently (at most `streams_per_connection` in flight per connection).
    ///
    /// Retries (up to `retry.attempts_max` attempts per request, with backoff): a frame
    /// whose outcome is unknown (connection lost, timeout, stream reset) is resent with
    /// the same requests, reconnecting if needed; the server answers `Replayed` with the
    /// same invoice for what it had already issued. Requests refused with a retryable
    /// code (nothing issued) are resent alone. Requests are never changed between
    /// attempts. What still fails after the last attempt is returned as that request's
    /// outcome: `Ok(ItemResult::Failed { .. })` for the server's last refusal, `Err` for a
    /// transport failure.
    pub async fn issue(&self, requests: Vec<IssueRequest>) -> Vec<IssueOutcome> {
        let count = requests.len();
        if count == 0 {
            return Vec::new();
        }
        let requests: Arc<[IssueRequest]> = requests.into();
        let shard_count = usize::from(self.shard_count());
        let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); shard_count];
        for (index, request) in requests.iter().enumerate() {
            // Shard-unaware, every link is the service link, but grouping by home shard
            // still costs nothing and keeps frames shard-homogeneous for the server.
            per_shard[usize::from(self.home_shard(request))].push(index);
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut task_indices = std::collections::HashMap::new();
        for (shard, indices) in per_shard.iter().enumerate() {
            for plan in plan_frames(
                &requests,
                shard as u16,
                indices,
                self.inner.batch_requests_max,
                self.inner.frame_bytes_max,
            ) {
                let client = self.clone();
                let requests = requests.clone();
                let plan_indices = plan.indices.clone();
                let handle = tasks.spawn(async move { client.run_frame(&requests, plan).await });
                task_indices.insert(handle.id(), plan_indices);
            }
        }
        let mut outcomes: Vec<Option<IssueOutcome>> = vec![None; count];
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((_, results)) => {
                    for (index, outcome) in results {
                        outcomes[index] = Some(outcome);
                    }
                }
                Err(e) => {
                    let error = ClientError::Internal(format!("frame task failed: {e}"));
                    for &index in task_indices.get(&e.id()).into_iter().flatten() {
                        outcomes[index] = Some(Err(error.clone()));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(ClientError::Internal("request lost".into()))))
            .collect()
    }

    /// Sends one planned frame with retries; returns an outcome per index.
    async fn run_frame(
        &self,
        requests: &[IssueRequest],
        plan: FramePlan,
    ) -> Vec<(usize, IssueOutcome)> {
        let retry = self.inner.config.retry;
        let mut done = Vec::with_capacity(plan.indices.len());
        let mut pending = plan.indices;
        // Bytes: each attempt hands quinn the same buffer (a reference count, no copy).
        let mut frame = Bytes::from(plan.frame);
        let link = match self.link(Some(plan.shard)) {
            Ok(link) => link.clone(),
            Err(e) => return pending.into_iter().map(|i| (i, Err(e.clone()))).collect(),
        };
        let mut attempt = 1;
        loop {
            let last = attempt >= retry.attempts_max;
            let result = match self.exchange_on(&link, frame.clone()).await {
                Ok(reply) => decode_issue_reply(&reply, pending.len()),
                Err(e) => Err(e),
            };
            let mut again = Vec::new();
            match result {
                Ok(results) => {
                    for (index, result) in pending.iter().copied().zip(results) {
                        match &result {
                            ItemResult::Failed { code, .. } if code.is_retryable() && !last => {
                                again.push(index)
                            }
                            _ => done.push((index, Ok(result))),
                        }
                    }
                }
                Err(e) if e.is_retryable() && !last => {
                    tracing::debug!(error = %e, attempt, "exchange failed; resending");
                    again = pending;
                }
                Err(e) => {
                    done.extend(pending.into_iter().map(|i| (i, Err(e.clone()))));
                }
            }
            if again.is_empty() {
                return done;
            }
            tokio::time::sleep(retry.backoff(attempt)).await;
            attempt += 1;
            // The same requests, re-encoded: only the frame's composition may shrink.
            let mut next = Vec::with_capacity(frame.len());
            let at = appliance_proto::frame::begin_frame(
                &mut next,
                FrameKind::Issue,
                again.len() as u32,
            );
            for &index in &again {
                encode_request(&mut next, &requests[index]);
            }
            appliance_proto::frame::finish_frame(&mut next, at);
            frame = next.into();
            pending = again;
        }
    }

    /// Closes every connection and waits (bounded by the connect timeout) for the close
    /// to reach the server. Exchanges still in flight fail with [`ClientError::Closed`]
    /// or [`ClientError::ConnectionLost`].
    pub async fn close(&self) {
        let mut endpoints = vec![self.inner.service.endpoint.clone()];
        self.inner.service.close();
        for link in &self.inner.shards {
            link.close();
            endpoints.push(link.endpoint.clone());
        }
        let wait = async {
            for endpoint in endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(self.inner.config.connect_timeout, wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_core::{InvoiceKind, LineItem, TaxRate, TaxpayerId};

    fn request(order: usize) -> IssueRequest {
        IssueRequest {
            seller: TaxpayerId::parse("91350100M000100Y43").unwrap(),
            order_id: format!("order-{order}"),
            buyer_name: "buyer".into(),
            buyer_taxpayer: None,
            lines: vec![LineItem {
                name: "ticket".into(),
                quantity: 1,
                unit_price_fen: 100,
            }],
            tax_rate: TaxRate::from_bp(900).unwrap(),
            issuer_ref: "ref".into(),
            amount_fen: 100,
            tax_fen: 9,
            total_fen: 109,
            kind: InvoiceKind::Blue,
        }
    }

    #[test]
    fn frames_split_by_count_and_bytes_and_decode_back() {
        let requests: Vec<IssueRequest> = (0..25).map(request).collect();
        let indices: Vec<usize> = (0..25).collect();
        let by_count = plan_frames(&requests, 0, &indices, 10, FRAME_BYTES_MAX);
        assert_eq!(
            by_count.iter().map(|p| p.indices.len()).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        let item = {
            let mut b = Vec::new();
            encode_request(&mut b, &requests[0]);
            b.len()
        };
        let by_bytes = plan_frames(&requests, 0, &indices, 100, HEADER_BYTES + 3 * item + 2);
        assert!(by_bytes.iter().all(|p| p.indices.len() <= 3));
        let mut seen = Vec::new();
        for plan in by_bytes.iter().chain(&by_count) {
            let (header, body) = split_frame(&plan.frame).unwrap();
            assert_eq!(header.kind, FrameKind::Issue);
            let items = appliance_proto::split_items(body, header.count).unwrap();
            assert_eq!(items.len(), plan.indices.len());
            for (bytes, &i) in items.iter().zip(&plan.indices) {
                assert_eq!(appliance_proto::decode_request(bytes).unwrap(), requests[i]);
                seen.push(i);
            }
        }
        seen.sort_unstable();
        let expected: Vec<usize> = (0..25).chain(0..25).collect::<Vec<_>>();
        let mut expected = expected;
        expected.sort_unstable();
        assert_eq!(seen, expected);
    }

    #[test]
    fn reply_decoding_is_strict() {
        let mut error = Vec::new();
        appliance_proto::encode_error_frame(&mut error, appliance_proto::ErrorCode::Malformed, "x");
        assert!(matches!(
            decode_issue_reply(&error, 1),
            Err(ClientError::Refused { .. })
        ));
        let mut hello = Vec::new();
        encode_hello_frame(&mut hello);
        assert!(matches!(
            decode_issue_reply(&hello, 1),
            Err(ClientError::MalformedReply(_))
        ));
        assert!(matches!(
            decode_issue_reply(b"garbage", 1),
            Err(ClientError::MalformedReply(_))
        ));
        let mut reply = Vec::new();
        let at = appliance_proto::frame::begin_frame(&mut reply, FrameKind::IssueReply, 2);
        for _ in 0..2 {
            appliance_proto::encode_result(
                &mut reply,
                &ItemResult::Failed {
                    code: appliance_proto::ErrorCode::Overloaded,
                    message: "busy".into(),
                },
            );
        }
        appliance_proto::frame::finish_frame(&mut reply, at);
        assert_eq!(decode_issue_reply(&reply, 2).unwrap().len(), 2);
        assert!(matches!(
            decode_issue_reply(&reply, 3),
            Err(ClientError::MalformedReply(_))
        ));
    }
}
