//! An in-test QUIC server that speaks the appliance protocol, standing in for the real
//! server: hello with two shards on two ports plus a service port, deterministic
//! "issuing" from an in-memory map with idempotent replays, and fault switches (drop the
//! connection after issuing a frame, answer retryable errors first).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use appliance_client::pki::{self, DevPki};
use appliance_core::{
    InvoiceCode, InvoiceIdentity, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, TaxRate,
    TaxpayerId,
};
use appliance_proto::{
    decode_request, encode_error_frame, encode_result, split_frame, split_items, ErrorCode,
    FrameKind, HeaderError, HelloReply, Issued, ItemResult, FRAME_BYTES_MAX,
};

pub const SELLER: &str = "91350100M000100Y43";
pub const SHARDS: u16 = 2;

/// One issue frame as the server saw it.
#[derive(Debug, Clone)]
pub struct FrameLog {
    /// Which endpoint received it: `None` the service port, `Some(i)` shard i's port.
    pub port_shard: Option<u16>,
    /// Home shard of every decoded request.
    pub homes: Vec<u32>,
}

#[derive(Default)]
pub struct State {
    /// (seller, order id) → (request, invoice).
    pub issued: Mutex<HashMap<(String, String), (IssueRequest, Issued)>>,
    /// Numbers handed out (each new issue takes one).
    pub numbers_used: AtomicU32,
    /// Issue frames to process (issue!) and then answer by closing the connection.
    pub drop_after_issue: AtomicU32,
    /// Items to answer with `NoNumbersAvailable` (nothing issued) before issuing again.
    pub retryable_items: AtomicU32,
    pub frames: Mutex<Vec<FrameLog>>,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

pub struct MockServer {
    runtime: Option<tokio::runtime::Runtime>,
    pub service_addr: SocketAddr,
    pub shard_addrs: Vec<SocketAddr>,
    pub state: Arc<State>,
}

impl Drop for MockServer {
    fn drop(&mut self) {
        // Allowed inside a test's async context, unlike dropping the runtime.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

enum Action {
    Reply(Vec<u8>),
    DropConnection,
}

impl MockServer {
    /// Starts the service endpoint and one endpoint per shard on loopback, verifying
    /// clients against `pki.ca` (mutual TLS required).
    pub fn start(pki: &DevPki, batch_requests_max: u32) -> MockServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in pki::load_certs(&pki.ca).unwrap() {
            roots.add(ca).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                pki::load_certs(&pki.server_cert).unwrap(),
                pki::load_key(&pki.server_key).unwrap(),
            )
            .unwrap();
        tls.alpn_protocols = vec![appliance_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(16u32.into());
        config.transport_config(Arc::new(transport));

        let state = Arc::new(State::default());
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // Entering (not blocking on) the runtime: tests call this from inside their own.
        let guard = runtime.enter();
        let service = quinn::Endpoint::server(config.clone(), loopback).unwrap();
        let shards: Vec<quinn::Endpoint> = (0..SHARDS)
            .map(|_| quinn::Endpoint::server(config.clone(), loopback).unwrap())
            .collect();
        drop(guard);
        let service_addr = service.local_addr().unwrap();
        let shard_addrs: Vec<SocketAddr> = shards.iter().map(|e| e.local_addr().unwrap()).collect();
        let hello = Arc::new(HelloReply {
            shard_id: 0,
            shard_count: SHARDS,
            batch_requests_max,
            frame_bytes_max: FRAME_BYTES_MAX as u32,
            streams_max: 16,
            shard_ports: shard_addrs.iter().map(|a| a.port()).collect(),
        });
        let endpoints = std::iter::once((None, service)).chain(
            shards
                .into_iter()
                .enumerate()
                .map(|(i, e)| (Some(i as u16), e)),
        );
        for (label, endpoint) in endpoints {
            let state = state.clone();
            let hello = hello.clone();
            runtime.spawn(async move {
                while let Some(incoming) = endpoint.accept().await {
                    let state = state.clone();
                    let hello = hello.clone();
                    tokio::spawn(async move {
                        if let Ok(connection) = incoming.await {
                            serve(connection, label, state, hello).await;
                        }
                    });
                }
            });
        }
        MockServer {
            runtime: Some(runtime),
            service_addr,
            shard_addrs,
            state,
        }
    }

    /// The invoice the server holds for an order.
    pub fn invoice_of(&self, order_id: &str) -> Option<Issued> {
        let issued = self.state.issued.lock().unwrap();
        issued
            .get(&(SELLER.to_owned(), order_id.to_owned()))
            .map(|(_, i)| *i)
    }
}

async fn serve(
    connection: quinn::Connection,
    label: Option<u16>,
    state: Arc<State>,
    hello: Arc<HelloReply>,
) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let state = state.clone();
        let hello = hello.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            let action = match recv.read_to_end(FRAME_BYTES_MAX).await {
                Ok(frame) => respond(&frame, label, &state, &hello),
                Err(quinn::ReadToEndError::TooLong) => {
                    let mut out = Vec::new();
                    encode_error_frame(&mut out, ErrorCode::FrameTooLarge, "frame too large");
                    Action::Reply(out)
                }
                Err(_) => return,
            };
            match action {
                Action::Reply(reply) => {
                    if send.write_all(&reply).await.is_ok() {
                        let _ = send.finish();
                    }
                }
                Action::DropConnection => connection.close(1u32.into(), b"dropped by test"),
            }
        });
    }
}

fn error_frame(code: ErrorCode, message: &str) -> Action {
    let mut out = Vec::new();
    encode_error_frame(&mut out, code, message);
    Action::Reply(out)
}

fn respond(frame: &[u8], label: Option<u16>, state: &State, hello: &HelloReply) -> Action {
    let (header, body) = match split_frame(frame) {
        Ok(split) => split,
        Err(HeaderError::UnsupportedVersion(v)) => {
            return error_frame(ErrorCode::UnsupportedVersion, &format!("version {v}"))
        }
        Err(e) => return error_frame(ErrorCode::Malformed, &e.to_string()),
    };
    match header.kind {
        FrameKind::Hello => {
            let mut reply = hello.clone();
            reply.shard_id = label.unwrap_or(0);
            let mut out = Vec::new();
            reply.encode_frame(&mut out);
            Action::Reply(out)
        }
        FrameKind::Issue => {
            let items = match split_items(body, header.count) {
                Ok(items) => items,
                Err(e) => return error_frame(ErrorCode::Malformed, &e.to_string()),
            };
            if header.count > hello.batch_requests_max {
                return error_frame(ErrorCode::BatchTooLarge, "batch too large");
            }
            let mut homes = Vec::new();
            let mut results = Vec::new();
            for item in items {
                let result = match decode_request(item) {
                    Err(e) => ItemResult::Failed {
                        code: ErrorCode::InvalidItem,
                        message: e.to_string(),
                    },
                    Ok(request) => {
                        homes.push(appliance_proto::home_shard(&request, u32::from(SHARDS)));
                        issue(state, request)
                    }
                };
                results.push(result);
            }
            state.frames.lock().unwrap().push(FrameLog {
                port_shard: label,
                homes,
            });
            if take_one(&state.drop_after_issue) {
                return Action::DropConnection;
            }
            let mut out = Vec::new();
            let at = appliance_proto::frame::begin_frame(
                &mut out,
                FrameKind::IssueReply,
                results.len() as u32,
            );
            for result in &results {
                encode_result(&mut out, result);
            }
            appliance_proto::frame::finish_frame(&mut out, at);
            Action::Reply(out)
        }
        _ => error_frame(
            ErrorCode::UnexpectedKind,
            "clients send hello or issue frames",
        ),
    }
}

fn issue(state: &State, request: IssueRequest) -> ItemResult {
    let mut issued = state.issued.lock().unwrap();
    let key = (request.seller.as_str().to_owned(), request.order_id.clone());
    if let Some((earlier, invoice)) = issued.get(&key) {
        return if *earlier == request {
            ItemResult::Replayed(*invoice)
        } else {
            ItemResult::Failed {
                code: ErrorCode::IdempotencyConflict,
                message: "order issued from another request".into(),
            }
        };
    }
    if take_one(&state.retryable_items) {
        return ItemResult::Failed {
            code: ErrorCode::NoNumbersAvailable,
            message: "refill under way".into(),
        };
    }
    let number = state.numbers_used.fetch_add(1, Ordering::AcqRel) + 1;
    let invoice = Issued {
        identity: InvoiceIdentity {
            code: InvoiceCode::new(44_031_900_111).unwrap(),
            number: InvoiceNumber::new(number).unwrap(),
        },
        issue_time_ms: 1_700_000_000_000 + u64::from(number),
        tax_control_code: [number as u8; 32],
        check_code: format!("{number:020}").as_bytes().try_into().unwrap(),
    };
    issued.insert(key, (request, invoice));
    ItemResult::Issued(invoice)
}

/// A valid blue request for `order_id`.
pub fn request(order_id: &str) -> IssueRequest {
    IssueRequest {
        seller: TaxpayerId::parse(SELLER).unwrap(),
        order_id: order_id.to_owned(),
        buyer_name: "Zhang San".into(),
        buyer_taxpayer: None,
        lines: vec![LineItem {
            name: "G101 Beijing-Shanghai".into(),
            quantity: 1,
            unit_price_fen: 55_300,
        }],
        tax_rate: TaxRate::from_bp(900).unwrap(),
        issuer_ref: "BJP".into(),
        amount_fen: 55_300,
        tax_fen: 4_977,
        total_fen: 60_277,
        kind: InvoiceKind::Blue,
    }
}
