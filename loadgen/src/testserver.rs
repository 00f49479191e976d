//! A small QUIC server that speaks the appliance protocol with fake but well-formed
//! invoices: unique numbers, tax control codes, check codes derived from them as the tax
//! server derives them, and (when stateful) idempotent replays. Switches: a stall (stop
//! answering for a known time) and a capacity limit (a token bucket in invoices/s whose
//! excess queues). Tests use it; the benchmark measures loadgen's own overhead against it
//! (`loadgen test-server`, stateless: it does not even decode the requests).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appliance_client::pki::{self, DevPki};
use appliance_core::{InvoiceCode, InvoiceIdentity, InvoiceNumber, TaxpayerId};
use appliance_proto::frame::{begin_frame, finish_frame};
use appliance_proto::{
    decode_request, encode_error_frame, encode_result, split_frame, split_items, ErrorCode,
    FrameKind, HelloReply, Issued, ItemResult, BATCH_REQUESTS_MAX, FRAME_BYTES_MAX,
};

use crate::Clock;

/// How the test server behaves.
#[derive(Debug, Clone)]
pub struct TestServerOptions {
    /// Shards announced in hello, each with its own port.
    pub shards: u16,
    /// Tokio worker threads.
    pub threads: usize,
    /// CPUs to pin them to.
    pub cpus: Vec<usize>,
    /// Stall: `(after, length)`: from `after` past the first issue frame, answer nothing
    /// for `length`; what arrives meanwhile is answered when the stall ends.
    pub stall: Option<(Duration, Duration)>,
    /// Capacity in invoices/s: each frame takes its invoices' worth of tokens, served in
    /// arrival order; a frame is answered when its tokens are served.
    pub capacity_invoices_per_s: Option<f64>,
    /// Remember orders and answer resent ones `Replayed` (decodes every request);
    /// stateless answers everything `Issued` without decoding.
    pub stateful: bool,
    /// Concurrent streams per connection (announced in hello and enforced).
    pub streams_max: u32,
}

impl Default for TestServerOptions {
    fn default() -> Self {
        TestServerOptions {
            shards: 1,
            threads: 1,
            cpus: Vec::new(),
            stall: None,
            capacity_invoices_per_s: None,
            stateful: true,
            streams_max: 1024,
        }
    }
}

struct State {
    options: TestServerOptions,
    clock: Clock,
    /// ns of the first issue frame + 1 (0: none yet).
    first_issue_ns: AtomicU64,
    next_number: AtomicU64,
    /// Token bucket: when the capacity is next free, ns on `clock`.
    next_free_ns: Mutex<u64>,
    orders: Mutex<HashMap<(TaxpayerId, String), Issued>>,
    hello: HelloReply,
    /// Issue frames answered.
    pub frames: AtomicU64,
}

/// A running test server; stopped when dropped.
pub struct TestServer {
    runtime: Option<tokio::runtime::Runtime>,
    /// One thread: the thread driving the server's current-thread runtime, and the
    /// sender that stops it.
    driver: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    /// The service port.
    pub addr: SocketAddr,
    /// Per-shard ports.
    pub shard_addrs: Vec<SocketAddr>,
    /// The PKI (its CA is what loadgen trusts).
    pub pki: DevPki,
    state: Arc<State>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        if let Some((stop, thread)) = self.driver.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// First invoice code handed out; numbers are 1..=99,999,999 per code.
const CODE_BASE: u64 = 44_031_900_000;
const NUMBERS_PER_CODE: u64 = 99_999_999;

fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl State {
    fn issue_new(&self) -> Issued {
        let n = self.next_number.fetch_add(1, Ordering::Relaxed);
        let mut tax = [0u8; 32];
        for (i, chunk) in tax.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&mix64(n ^ ((i as u64) << 56) ^ 0x7E57).to_le_bytes());
        }
        Issued {
            identity: InvoiceIdentity {
                code: InvoiceCode::new(CODE_BASE + n / NUMBERS_PER_CODE).expect("12 digits"),
                number: InvoiceNumber::new((n % NUMBERS_PER_CODE + 1) as u32).expect("8 digits"),
            },
            issue_time_ms: 1_700_000_000_000 + n,
            tax_control_code: tax,
            check_code: hsm_driver::crypto::check_code(&tax),
        }
    }

    /// When the reply to a frame of `invoices` arriving now may go out, ns on the clock.
    fn release_at(&self, invoices: u32) -> u64 {
        let now = self.clock.now_ns();
        let mut at = now;
        let first = match self.first_issue_ns.compare_exchange(
            0,
            now + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => now,
            Err(first) => first - 1,
        };
        if let Some((after, length)) = self.options.stall {
            let start = first + after.as_nanos() as u64;
            let end = start + length.as_nanos() as u64;
            if (start..end).contains(&now) {
                at = end;
            }
        }
        if let Some(capacity) = self.options.capacity_invoices_per_s {
            let mut next_free = self.next_free_ns.lock().unwrap_or_else(|e| e.into_inner());
            let start = (*next_free).max(at);
            *next_free = start + (f64::from(invoices) * 1e9 / capacity) as u64;
            at = *next_free;
        }
        at
    }

    fn respond(&self, frame: &[u8], shard: u16) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        let (header, body) = match split_frame(frame) {
            Ok(split) => split,
            Err(e) => {
                encode_error_frame(&mut out, ErrorCode::Malformed, &e.to_string());
                return (out, 0);
            }
        };
        match header.kind {
            FrameKind::Hello => {
                let mut hello = self.hello.clone();
                hello.shard_id = shard;
                hello.encode_frame(&mut out);
                (out, 0)
            }
            FrameKind::Issue => {
                let items = match split_items(body, header.count) {
                    Ok(items) => items,
                    Err(e) => {
                        encode_error_frame(&mut out, ErrorCode::Malformed, &e.to_string());
                        return (out, 0);
                    }
                };
                out.reserve(16 + 76 * items.len());
                let at = begin_frame(&mut out, FrameKind::IssueReply, items.len() as u32);
                for item in &items {
                    let result = if self.options.stateful {
                        match decode_request(item) {
                            Err(e) => ItemResult::Failed {
                                code: ErrorCode::InvalidItem,
                                message: e.to_string(),
                            },
                            Ok(request) => {
                                let key = (request.seller, request.order_id);
                                let mut orders =
                                    self.orders.lock().unwrap_or_else(|e| e.into_inner());
                                match orders.get(&key) {
                                    Some(issued) => ItemResult::Replayed(*issued),
                                    None => {
                                        let issued = self.issue_new();
                                        orders.insert(key, issued);
                                        ItemResult::Issued(issued)
                                    }
                                }
                            }
                        }
                    } else {
                        ItemResult::Issued(self.issue_new())
                    };
                    encode_result(&mut out, &result);
                }
                finish_frame(&mut out, at);
                self.frames.fetch_add(1, Ordering::Relaxed);
                (out, items.len() as u32)
            }
            _ => {
                encode_error_frame(&mut out, ErrorCode::UnexpectedKind, "hello or issue");
                (out, 0)
            }
        }
    }
}

fn server_config(pki: &DevPki, streams_max: u32) -> Result<quinn::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = pki::load_certs(&pki.server_cert).map_err(|e| e.to_string())?;
    let key = pki::load_key(&pki.server_key).map_err(|e| e.to_string())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![appliance_proto::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(streams_max.into());
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("in range")));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl TestServer {
    /// Generates a PKI in `pki_dir` and starts the server on loopback ports.
    pub fn start(options: TestServerOptions, pki_dir: &Path) -> Result<TestServer, String> {
        assert!(options.shards >= 1);
        let pki = DevPki::generate(pki_dir, &["loadgen.test"], &["loadgen"])
            .map_err(|e| e.to_string())?;
        let picker = crate::CpuPicker::new(&options.cpus);
        // One thread: a current-thread runtime on a thread of its own, for the reason
        // `crate::runtime` gives (no wake-ups between quinn's drivers and the streams'
        // tasks), which lets one core answer loadgen's 100,000 requests/s.
        let runtime = if options.threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            crate::runtime(options.threads, &picker)
        }
        .map_err(|e| e.to_string())?;
        let config = server_config(&pki, options.streams_max)?;
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let guard = runtime.enter();
        let service =
            quinn::Endpoint::server(config.clone(), loopback).map_err(|e| e.to_string())?;
        let shards = (0..options.shards)
            .map(|_| quinn::Endpoint::server(config.clone(), loopback))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        drop(guard);
        let addr = service.local_addr().map_err(|e| e.to_string())?;
        let shard_addrs = shards
            .iter()
            .map(|e| e.local_addr())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let options_threads = options.threads;
        let state = Arc::new(State {
            hello: HelloReply {
                shard_id: 0,
                shard_count: options.shards,
                batch_requests_max: BATCH_REQUESTS_MAX,
                frame_bytes_max: FRAME_BYTES_MAX as u32,
                streams_max: options.streams_max,
                shard_ports: shard_addrs.iter().map(|a| a.port()).collect(),
            },
            options,
            clock: Clock::start(),
            first_issue_ns: AtomicU64::new(0),
            next_number: AtomicU64::new(0),
            next_free_ns: Mutex::new(0),
            orders: Mutex::new(HashMap::new()),
            frames: AtomicU64::new(0),
        });
        let endpoints = std::iter::once((0u16, service))
            .chain(shards.into_iter().enumerate().map(|(i, e)| (i as u16, e)));
        for (shard, endpoint) in endpoints {
            let state = state.clone();
            runtime.spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Ok(connection) = incoming.await {
                            serve(connection, shard, state).await;
                        }
                    });
                }
            });
        }
        let (runtime, driver) = if options_threads <= 1 {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("test-server".into())
                .spawn(move || {
                    picker.pin_next();
                    let _ = runtime.block_on(stopped);
                    runtime.shutdown_background();
                })
                .map_err(|e| e.to_string())?;
            (None, Some((stop, thread)))
        } else {
            (Some(runtime), None)
        };
        Ok(TestServer {
            runtime,
            driver,
            addr,
            shard_addrs,
            pki,
            state,
        })
    }

    /// Issue frames answered so far.
    pub fn frames(&self) -> u64 {
        self.state.frames.load(Ordering::Relaxed)
    }

    /// Invoice numbers handed out so far.
    pub fn numbers(&self) -> u64 {
        self.state.next_number.load(Ordering::Relaxed)
    }
}

async fn serve(connection: quinn::Connection, shard: u16, state: Arc<State>) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let state = state.clone();
        tokio::spawn(async move {
            let frame = match recv.read_to_end(FRAME_BYTES_MAX).await {
                Ok(frame) => frame,
                Err(_) => return,
            };
            let (reply, invoices) = state.respond(&frame, shard);
            if invoices > 0
                && (state.options.stall.is_some()
                    || state.options.capacity_invoices_per_s.is_some())
            {
                let at = state.release_at(invoices);
                let now = state.clock.now_ns();
                if at > now {
                    tokio::time::sleep(Duration::from_nanos(at - now)).await;
                }
            }
            if send.write_all(&reply).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}
