//! The client against the in-test server (tests/common): hello, shard-aware routing,
//! result order across shards and frame splits, idempotent retries, mutual TLS.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use appliance_client::pki::DevPki;
use appliance_client::{
    Client, ClientConfig, ClientError, ClientIdentity, ErrorCode, ItemResult, RetryPolicy,
};
use common::{request, MockServer, SHARDS};

fn config(server: &MockServer, pki: &DevPki, client: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::from_pem_files(
        server.service_addr,
        "localhost",
        &pki.ca,
        client
            .and_then(|name| pki.client(name))
            .map(|c| (c.cert.as_path(), c.key.as_path())),
    )
    .unwrap();
    // Short backoff keeps the retry tests quick; the timeout only guards against hangs.
    config.retry = RetryPolicy {
        attempts_max: 5,
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(10),
    };
    config
}

fn issued_identity(outcome: &Result<ItemResult, ClientError>) -> appliance_core::InvoiceIdentity {
    match outcome {
        Ok(ItemResult::Issued(i)) | Ok(ItemResult::Replayed(i)) => i.identity,
        other => panic!("not issued: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aware_routing_keeps_order_across_shards_and_frames() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(dir.path(), &["appliance.test"], &["ticketing"]).unwrap();
    // 8 requests per frame: 300 requests become dozens of frames over both shards.
    let server = MockServer::start(&pki, 8);
    let client = Client::connect(config(&server, &pki, Some("ticketing")))
        .await
        .unwrap();
    assert_eq!(client.shard_count(), SHARDS);
    assert_eq!(
        client.hello().shard_ports,
        server
            .shard_addrs
            .iter()
            .map(|a| a.port())
            .collect::<Vec<_>>()
    );
    assert_eq!(client.streams_per_connection(), 16);

    let orders: Vec<String> = (0..300).map(|i| format!("T{i:05}")).collect();
    let outcomes = client
        .issue(orders.iter().map(|o| request(o)).collect())
        .await;
    assert_eq!(outcomes.len(), orders.len());
    for (order, outcome) in orders.iter().zip(&outcomes) {
        assert!(
            matches!(outcome, Ok(ItemResult::Issued(_))),
            "{order}: {outcome:?}"
        );
        // Order preserved: the i-th result is the invoice the server holds for order i.
        assert_eq!(
            issued_identity(outcome),
            server.invoice_of(order).unwrap().identity
        );
    }
    let frames = server.state.frames.lock().unwrap().clone();
    assert!(frames.len() >= 300 / 8);
    let mut ports = HashSet::new();
    for frame in &frames {
        let port_shard = frame
            .port_shard
            .expect("shard-aware frames use shard ports");
        assert!(
            frame.homes.iter().all(|&h| h == u32::from(port_shard)),
            "{frame:?}"
        );
        assert!(frame.homes.len() <= 8);
        ports.insert(port_shard);
    }
    assert_eq!(ports.len(), usize::from(SHARDS));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_unaware_client_uses_the_service_port() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(dir.path(), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let mut config = config(&server, &pki, Some("ticketing"));
    config.shard_aware = false;
    config.streams_per_connection = Some(4);
    let client = Client::connect(config).await.unwrap();
    assert_eq!(client.streams_per_connection(), 4);
    let orders: Vec<String> = (0..50).map(|i| format!("U{i}")).collect();
    let outcomes = client
        .issue(orders.iter().map(|o| request(o)).collect())
        .await;
    for (order, outcome) in orders.iter().zip(&outcomes) {
        assert_eq!(
            issued_identity(outcome),
            server.invoice_of(order).unwrap().identity
        );
    }
    assert!(server
        .state
        .frames
        .lock()
        .unwrap()
        .iter()
        .all(|f| f.port_shard.is_none()));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_is_retried_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(dir.path(), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let client = Client::connect(config(&server, &pki, Some("ticketing")))
        .await
        .unwrap();
    // The first two frames are issued and then answered by dropping the connection: the
    // client cannot know they were issued and must resend the same requests.
    server
        .state
        .drop_after_issue
        .store(2, std::sync::atomic::Ordering::Release);
    let orders: Vec<String> = (0..40).map(|i| format!("D{i}")).collect();
    let outcomes = client
        .issue(orders.iter().map(|o| request(o)).collect())
        .await;
    let mut replayed = 0;
    for (order, outcome) in orders.iter().zip(&outcomes) {
        if matches!(outcome, Ok(ItemResult::Replayed(_))) {
            replayed += 1;
        }
        assert_eq!(
            issued_identity(outcome),
            server.invoice_of(order).unwrap().identity
        );
    }
    assert!(
        replayed > 0,
        "the dropped frames' requests come back as replays"
    );
    // One number per order: nothing was issued twice.
    assert_eq!(
        server
            .state
            .numbers_used
            .load(std::sync::atomic::Ordering::Acquire),
        40
    );
    // A second run of the same orders is all replays with the same identities.
    let again = client
        .issue(orders.iter().map(|o| request(o)).collect())
        .await;
    for (first, second) in outcomes.iter().zip(&again) {
        assert!(matches!(second, Ok(ItemResult::Replayed(_))));
        assert_eq!(issued_identity(first), issued_identity(second));
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_refusals_are_retried_and_the_last_one_is_returned() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(dir.path(), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let mut config = config(&server, &pki, Some("ticketing"));
    config.retry.attempts_max = 3;
    let client = Client::connect(config).await.unwrap();

    server
        .state
        .retryable_items
        .store(7, std::sync::atomic::Ordering::Release);
    let orders: Vec<String> = (0..20).map(|i| format!("R{i}")).collect();
    let outcomes = client
        .issue(orders.iter().map(|o| request(o)).collect())
        .await;
    for (order, outcome) in orders.iter().zip(&outcomes) {
        assert!(matches!(outcome, Ok(ItemResult::Issued(_))), "{outcome:?}");
        assert_eq!(
            issued_identity(outcome),
            server.invoice_of(order).unwrap().identity
        );
    }

    // More refusals than attempts: the request's final outcome is the server's refusal.
    server
        .state
        .retryable_items
        .store(3, std::sync::atomic::Ordering::Release);
    let outcomes = client.issue(vec![request("R-last")]).await;
    assert!(
        matches!(
            &outcomes[0],
            Ok(ItemResult::Failed {
                code: ErrorCode::NoNumbersAvailable,
                ..
            })
        ),
        "{outcomes:?}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_refused_and_single_frames_work() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(dir.path(), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let client = Client::connect(config(&server, &pki, Some("ticketing")))
        .await
        .unwrap();

    let reply = client
        .exchange_raw(Some(1), b"not a frame".to_vec())
        .await
        .unwrap();
    let (header, body) = appliance_proto::split_frame(&reply).unwrap();
    assert_eq!(header.kind, appliance_proto::FrameKind::Error);
    assert_eq!(
        appliance_proto::decode_error(body).unwrap().0,
        ErrorCode::Malformed
    );

    let shard = client.home_shard(&request("S1"));
    let results = client
        .issue_frame(Some(shard), &[request("S1"), request("S2")])
        .await
        .unwrap();
    assert!(matches!(results[0], ItemResult::Issued(_)));
    assert!(matches!(
        client.issue_frame(Some(SHARDS), &[request("S3")]).await,
        Err(ClientError::NoSuchShard { .. })
    ));
    assert!(matches!(
        client.issue_frame(None, &[]).await,
        Err(ClientError::BatchSize(0))
    ));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_of_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&dir.path().join("good"), &[], &["ticketing"]).unwrap();
    let other = DevPki::generate(&dir.path().join("other"), &[], &["intruder"]).unwrap();
    let server = MockServer::start(&pki, 4096);

    let no_cert = Client::connect(config(&server, &pki, None)).await;
    assert!(matches!(no_cert, Err(ClientError::Tls(_))), "{no_cert:?}");

    let mut wrong_ca = config(&server, &pki, None);
    let intruder = other.client("intruder").unwrap();
    wrong_ca.identity = Some(ClientIdentity::from_files(&intruder.cert, &intruder.key).unwrap());
    let refused = Client::connect(wrong_ca).await;
    assert!(matches!(refused, Err(ClientError::Tls(_))), "{refused:?}");

    // And the client refuses a server whose certificate is not from its CA.
    let distrusting = ClientConfig {
        ca_pem: std::fs::read(&other.ca).unwrap(),
        ..config(&server, &pki, Some("ticketing"))
    };
    let refused = Client::connect(distrusting).await;
    assert!(matches!(refused, Err(ClientError::Tls(_))), "{refused:?}");

    let ok = Client::connect(config(&server, &pki, Some("ticketing")))
        .await
        .unwrap();
    ok.close().await;
}
