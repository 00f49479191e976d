//! The transport ceiling the appliance is compared with: a plain quinn request/response
//! echo with the appliance's payload sizes, one exchange per bidirectional stream, mutual
//! TLS as the appliance uses it.
//!
//! Request = 16 B header + 160 B × n (a typical encoded ticket request); reply = 16 B
//! header + 74 B × n (status + issued result). Groups:
//! * `quic_echo/single` (n = 1, per-invoice traffic) and `quic_echo/bulk_1000`
//!   (n = 1,000, bulk windows);
//! * in each, `latency`: one exchange at a time (time per iteration = round trip), and
//!   `streams_64`: 64 exchanges in flight on one connection (time per iteration =
//!   1 / exchange throughput; criterion's elements/s are invoices/s).
//!
//! Server and client each run a current-thread tokio runtime on their own thread, so on
//! this 2-core machine each side has about one core, as in quinn's own perf tool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_client::pki::{self, DevPki};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

// Like the other benches and the binaries.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HEADER_BYTES: usize = 16;
const REQUEST_BYTES_PER_INVOICE: usize = 160;
const REPLY_BYTES_PER_INVOICE: usize = 74;
const STREAMS: u64 = 64;

fn request_bytes(n: usize) -> usize {
    HEADER_BYTES + REQUEST_BYTES_PER_INVOICE * n
}

fn reply_bytes_for(request_len: usize) -> usize {
    let n = request_len.saturating_sub(HEADER_BYTES) / REQUEST_BYTES_PER_INVOICE;
    HEADER_BYTES + REPLY_BYTES_PER_INVOICE * n
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(256u32.into());
    Arc::new(transport)
}

/// Starts the echo server on its own thread; returns its address.
fn start_server(pki: &DevPki) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&pki.ca).expect("ca") {
        roots.add(ca).expect("ca");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki::load_certs(&pki.server_cert).expect("cert"),
            pki::load_key(&pki.server_key).expect("key"),
        )
        .expect("server cert");
    tls.alpn_protocols = vec![appliance_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr"))
                .expect("bind");
            addr_tx
                .send(endpoint.local_addr().expect("addr"))
                .expect("send");
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(connection) = incoming.await else {
                        return;
                    };
                    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                        tokio::spawn(async move {
                            let Ok(request) = recv.read_to_end(4 << 20).await else {
                                return;
                            };
                            let reply = vec![0u8; reply_bytes_for(request.len())];
                            if send.write_all(&reply).await.is_ok() {
                                let _ = send.finish();
                            }
                        });
                    }
                });
            }
        });
    });
    addr_rx.recv().expect("server address")
}

async fn connect(pki: &DevPki, addr: SocketAddr) -> quinn::Connection {
    let client = pki.client("bench").expect("client cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in pki::load_certs(&pki.ca).expect("ca") {
        roots.add(ca).expect("ca");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki::load_certs(&client.cert).expect("cert"),
            pki::load_key(&client.key).expect("key"),
        )
        .expect("client cert");
    tls.alpn_protocols = vec![appliance_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("bind");
    endpoint
        .connect_with(config, addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake")
}

async fn exchange(connection: &quinn::Connection, request: &[u8]) {
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    send.write_all(request).await.expect("write");
    send.finish().expect("finish");
    let reply = recv.read_to_end(4 << 20).await.expect("read");
    assert_eq!(reply.len(), reply_bytes_for(request.len()));
}

/// `iters` exchanges, `STREAMS` in flight at a time.
async fn concurrent(
    connection: &quinn::Connection,
    request: &Arc<Vec<u8>>,
    iters: u64,
) -> Duration {
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..STREAMS {
        // Iterations split evenly; the first `iters % STREAMS` workers take one more.
        let count = iters / STREAMS + u64::from(worker < iters % STREAMS);
        let connection = connection.clone();
        let request = request.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..count {
                exchange(&connection, &request).await;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    started.elapsed()
}

fn quic_echo(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = DevPki::generate(dir.path(), &[], &["bench"]).expect("pki");
    let addr = start_server(&pki);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let connection = runtime.block_on(connect(&pki, addr));

    for (group_name, n) in [("quic_echo/single", 1usize), ("quic_echo/bulk_1000", 1_000)] {
        let request = Arc::new(vec![0x5au8; request_bytes(n)]);
        let mut group = c.benchmark_group(group_name);
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(5));
        group.bench_function("latency", |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        exchange(&connection, &request).await;
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_function("streams_64", |b| {
            b.iter_custom(|iters| runtime.block_on(concurrent(&connection, &request, iters)))
        });
        group.finish();
    }
    runtime.block_on(async {
        connection.close(0u32.into(), b"done");
    });
}

criterion_group!(benches, quic_echo);
criterion_main!(benches);
