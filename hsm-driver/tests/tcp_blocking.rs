//! The blocking client against the in-test server (tests/tcp_support).

mod tcp_support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use hsm_driver::proto::{Request, Response, Status};
use hsm_driver::tcp::blocking::Client;
use hsm_driver::tcp::{HsmError, TcpClientConfig};
use tcp_support::TestServer;

fn config(call_timeout: Duration) -> TcpClientConfig {
    TcpClientConfig {
        connect_timeout: Duration::from_secs(2),
        call_timeout,
        ..TcpClientConfig::default()
    }
}

fn nop(client: &mut Client, payload: &[u8]) -> Result<Vec<u8>, HsmError> {
    match client.call(&Request::Nop(payload.to_vec()))? {
        Response::Nop(b) => Ok(b),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn sequential_calls_and_typed_errors() {
    let server = TestServer::start();
    let mut c = Client::connect(server.addr, config(Duration::from_secs(10))).expect("connect");
    for i in 0..100u32 {
        assert_eq!(nop(&mut c, &i.to_le_bytes()).expect("nop"), i.to_le_bytes());
    }
    match nop(&mut c, b"busy") {
        Err(HsmError::Device { status, .. }) => assert_eq!(status, Status::Busy),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        c.call(&Request::Sign { digest: [0; 32] }),
        Err(HsmError::Malformed(_))
    ));
    assert!(matches!(nop(&mut c, b"crc"), Err(HsmError::Malformed(_))));
    assert_eq!(nop(&mut c, b"unknown").expect("skips stray"), b"unknown");
    assert_eq!(server.stats.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn timeout_then_next_call_gets_its_own_answer() {
    let server = TestServer::start();
    let mut c = Client::connect(server.addr, config(Duration::from_millis(200))).expect("connect");
    assert!(matches!(nop(&mut c, b"silent"), Err(HsmError::Timeout)));
    assert!(c.is_connected());
    assert_eq!(nop(&mut c, b"mine").expect("ok"), b"mine");
}

#[test]
fn reconnects_after_drop_and_broken_framing() {
    let server = TestServer::start();
    let mut c = Client::connect(server.addr, config(Duration::from_secs(10))).expect("connect");
    assert!(matches!(
        nop(&mut c, b"drop"),
        Err(HsmError::ConnectionLost)
    ));
    assert!(!c.is_connected());
    assert_eq!(nop(&mut c, b"back").expect("reconnected"), b"back");
    assert!(matches!(
        nop(&mut c, b"garbage"),
        Err(HsmError::ConnectionLost)
    ));
    assert_eq!(nop(&mut c, b"again").expect("reconnected"), b"again");
    assert_eq!(server.stats.connections.load(Ordering::SeqCst), 3);
}

#[test]
fn refused_when_nothing_listens() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    assert!(matches!(
        Client::connect(addr, config(Duration::from_secs(1))),
        Err(HsmError::Refused)
    ));
}
