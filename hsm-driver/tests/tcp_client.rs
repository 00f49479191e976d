//! The glommio pipelined client against the in-test server (tests/tcp_support).

mod tcp_support;

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hsm_driver::proto::{Request, Response, Status};
use hsm_driver::tcp::{HsmError, TcpClient, TcpClientConfig};
use tcp_support::{run, TestServer};

fn config() -> TcpClientConfig {
    TcpClientConfig {
        connect_timeout: Duration::from_secs(2),
        // Generous: only the `silent` requests are meant to time out.
        call_timeout: Duration::from_secs(10),
        max_in_flight: 1024,
        reconnect_backoff_min: Duration::from_millis(1),
        reconnect_backoff_max: Duration::from_millis(50),
    }
}

async fn nop(client: &TcpClient, payload: &[u8]) -> Result<Vec<u8>, HsmError> {
    match client.call(&Request::Nop(payload.to_vec())).await? {
        Response::Nop(bytes) => Ok(bytes),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn thousand_concurrent_calls_are_pipelined_and_matched() {
    let server = TestServer::start();
    let addr = server.addr;
    let (results, stats) = run(move || async move {
        let client = TcpClient::connect(addr, config()).await.expect("connect");
        let tasks: Vec<_> = (0..1000u32)
            .map(|i| {
                let client = client.clone();
                glommio::spawn_local(async move {
                    let payload = format!("call-{i}").into_bytes();
                    let got = nop(&client, &payload).await.expect("call");
                    got == payload
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await {
                ok += 1;
            }
        }
        (ok, client.stats())
    });
    assert_eq!(results, 1000);
    assert_eq!(stats.answered, 1000);
    assert_eq!(stats.connects, 1);
    assert_eq!(server.stats.requests.load(Ordering::SeqCst), 1000);
    // Many frames arrived per read: the writer batched queued frames.
    assert!(server.stats.max_frames_per_read.load(Ordering::SeqCst) > 1);
}

#[test]
fn in_flight_is_bounded() {
    let server = TestServer::start();
    let addr = server.addr;
    let ok = run(move || async move {
        let cfg = TcpClientConfig {
            max_in_flight: 8,
            ..config()
        };
        let client = TcpClient::connect(addr, cfg).await.expect("connect");
        let tasks: Vec<_> = (0..300u32)
            .map(|i| {
                let client = client.clone();
                glommio::spawn_local(async move {
                    let payload = i.to_le_bytes();
                    nop(&client, &payload).await.map(|b| b == payload)
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if t.await.expect("call") {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, 300);
    // The server answers everything it has read before reading again, so no read can
    // hold more requests than the client lets be in flight.
    let max = server.stats.max_frames_per_read.load(Ordering::SeqCst);
    assert!((1..=8).contains(&max), "max frames per read {max}");
}

#[test]
fn call_times_out_and_client_keeps_working() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let cfg = TcpClientConfig {
            call_timeout: Duration::from_millis(200),
            ..config()
        };
        let client = TcpClient::connect(addr, cfg).await.expect("connect");
        let e = nop(&client, b"silent").await.expect_err("no answer");
        assert!(matches!(e, HsmError::Timeout), "{e:?}");
        assert!(e.is_transient());
        assert_eq!(client.in_flight(), 0);
        assert_eq!(nop(&client, b"after").await.expect("works"), b"after");
        let s = client.stats();
        assert_eq!(s.timeouts, 1);
        assert_eq!(s.connects, 1);
    });
}

#[test]
fn dropped_connection_fails_in_flight_calls_and_reconnects() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let client = TcpClient::connect(addr, config()).await.expect("connect");
        // A call parked at the server, then a request that makes it drop the connection.
        let parked = {
            let c = client.clone();
            glommio::spawn_local(async move { nop(&c, b"silent").await })
        };
        glommio::yield_if_needed().await;
        glommio::executor().yield_task_queue_now().await;
        let e = nop(&client, b"drop").await.expect_err("dropped");
        assert!(matches!(e, HsmError::ConnectionLost), "{e:?}");
        let e = parked.await.expect_err("lost too");
        assert!(matches!(e, HsmError::ConnectionLost), "{e:?}");
        // The next call reconnects.
        assert_eq!(nop(&client, b"again").await.expect("reconnected"), b"again");
        let s = client.stats();
        assert_eq!(s.connects, 2);
        assert_eq!(s.connections_lost, 1);
    });
    assert_eq!(server.stats.connections.load(Ordering::SeqCst), 2);
}

#[test]
fn malformed_answers_are_typed_and_the_connection_survives() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let client = TcpClient::connect(addr, config()).await.expect("connect");
        // Body that does not decode as a Sign answer.
        let e = client
            .call(&Request::Sign { digest: [1; 32] })
            .await
            .expect_err("malformed");
        assert!(matches!(e, HsmError::Malformed(_)), "{e:?}");
        // Body corrupted after its checksum.
        let e = nop(&client, b"crc").await.expect_err("checksum");
        assert!(matches!(e, HsmError::Malformed(_)), "{e:?}");
        // A stray answer first, then ours.
        assert_eq!(nop(&client, b"unknown").await.expect("ok"), b"unknown");
        // A device error.
        match nop(&client, b"busy").await {
            Err(HsmError::Device { status, message }) => {
                assert_eq!(status, Status::Busy);
                assert_eq!(message, "try later");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            nop(&client, b"still fine").await.expect("ok"),
            b"still fine"
        );
        let s = client.stats();
        assert_eq!(s.connects, 1, "no reconnect was needed");
        assert_eq!(s.unknown_answers, 1);
        assert_eq!(s.corrupt_frames, 1);
    });
}

#[test]
fn broken_framing_drops_the_connection_and_the_client_recovers() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let client = TcpClient::connect(addr, config()).await.expect("connect");
        let e = nop(&client, b"garbage").await.expect_err("framing");
        assert!(matches!(e, HsmError::ConnectionLost), "{e:?}");
        assert_eq!(nop(&client, b"next").await.expect("ok"), b"next");
        assert_eq!(client.stats().connects, 2);
    });
}

#[test]
fn connect_to_nothing_is_refused() {
    // Bind then drop a listener to get a port with (almost certainly) nothing on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let e = run(move || async move {
        TcpClient::connect(addr, config())
            .await
            .map(|_| ())
            .expect_err("nothing listens")
    });
    assert!(matches!(e, HsmError::Refused), "{e:?}");
}

#[test]
fn closed_client_fails_calls() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let client = Rc::new(TcpClient::connect(addr, config()).await.expect("connect"));
        let parked = {
            let c = client.clone();
            glommio::spawn_local(async move { nop(&c, b"silent").await })
        };
        glommio::executor().yield_task_queue_now().await;
        client.close();
        assert!(matches!(parked.await, Err(HsmError::Closed)));
        assert!(matches!(nop(&client, b"x").await, Err(HsmError::Closed)));
    });
}

#[test]
fn oversized_request_is_rejected_locally() {
    let server = TestServer::start();
    let addr = server.addr;
    run(move || async move {
        let client = TcpClient::connect(addr, config()).await.expect("connect");
        let big = Request::Nop(vec![0; hsm_driver::proto::NOP_BYTES_MAX + 1]);
        assert!(matches!(
            client.call(&big).await,
            Err(HsmError::InvalidRequest(_))
        ));
        assert_eq!(nop(&client, b"ok").await.expect("ok"), b"ok");
    });
}
