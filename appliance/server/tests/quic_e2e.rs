//! End to end on loopback with real processes: the tax-server emulator and `appliance
//! serve` are child processes, the client library talks QUIC to them.

use appliance_client::pki::DevPki;
use appliance_client::{Client, ClientConfig};
use appliance_core::{IssueRequest, TaxpayerId};
use appliance_proto::{
    decode_error, encode_issue_frame, split_frame, ErrorCode, FrameKind, ItemResult,
    BATCH_REQUESTS_MAX,
};
use appliance_server::child::ListeningChild;
use appliance_server::workload::{invoice_code, seller, ticket_request};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SELLERS: u32 = 3;

struct Setup {
    dir: PathBuf,
    pki: DevPki,
    emulator: ListeningChild,
    control: SocketAddr,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = DevPki::generate(
            &dir.join("pki"),
            &["appliance.test"],
            &["ticketing", "catering", "stranger"],
        )
        .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
        command
            .arg("hsm-emu")
            .arg("--data-dir")
            .arg(dir.join("hsm"))
            .args(["--listen", "127.0.0.1:0"]);
        for i in 0..SELLERS {
            command
                .arg("--taxpayer")
                .arg(format!("{}:{}:1:99999999", seller(i), invoice_code(i)));
        }
        let emulator = ListeningChild::spawn(command, Duration::from_secs(60)).unwrap();
        // A free port for the control server (the serve banner's later lines are not
        // read by ListeningChild).
        let control = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Setup {
            dir,
            pki,
            emulator,
            control,
        }
    }

    fn config(&self) -> PathBuf {
        let path = self.dir.join("appliance.toml");
        let taxpayers: String = (0..SELLERS)
            .map(|i| {
                format!(
                    "[[taxpayers]]\nid = \"{}\"\nceiling_fen = 10000000\nlow_watermark = 20000\nrefill_count = 60000\n",
                    seller(i)
                )
            })
            .collect();
        let text = format!(
            r#"data_dir = "{data}"
shards = 2
cpus = []
[listen]
service = "127.0.0.1:0"
control = "{control}"
[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
[[clients]]
identity = "ticketing"
sellers = ["*"]
[[clients]]
identity = "catering"
sellers = ["{catering}"]
[tax_server]
route = "tcp://{hsm}"
{taxpayers}
[limits]
index_capacity_orders = 400000
"#,
            data = self.dir.join("data").display(),
            cert = self.pki.server_cert.display(),
            key = self.pki.server_key.display(),
            ca = self.pki.ca.display(),
            catering = seller(1),
            hsm = self.emulator.addr(),
            control = self.control,
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start_appliance(&self) -> ListeningChild {
        let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
        command.arg("serve").arg("--config").arg(self.config());
        ListeningChild::spawn(command, Duration::from_secs(60)).unwrap()
    }

    fn client_config(
        &self,
        addr: SocketAddr,
        identity: Option<&str>,
        shard_aware: bool,
    ) -> ClientConfig {
        let identity = identity.map(|name| {
            let paths = self.pki.client(name).unwrap();
            (paths.cert.as_path(), paths.key.as_path())
        });
        let mut config =
            ClientConfig::from_pem_files(addr, "localhost", &self.pki.ca, identity).unwrap();
        config.shard_aware = shard_aware;
        config
    }
}

impl Setup {
    /// A connected client with `identity`'s certificate.
    fn connect(
        &self,
        rt: &tokio::runtime::Runtime,
        appliance: &ListeningChild,
        identity: Option<&str>,
        shard_aware: bool,
    ) -> Client {
        rt.block_on(Client::connect(self.client_config(
            appliance.addr(),
            identity,
            shard_aware,
        )))
        .unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.emulator.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn orders(prefix: &str, count: u64) -> Vec<IssueRequest> {
    (0..count)
        .map(|n| ticket_request(seller((n % u64::from(SELLERS)) as u32), prefix, n))
        .collect()
}

/// Issues everything and returns the issued identity + codes per order, in order.
fn issue_all(
    client: &Client,
    rt: &tokio::runtime::Runtime,
    requests: Vec<IssueRequest>,
) -> Vec<(bool, appliance_proto::Issued)> {
    let outcomes = rt.block_on(client.issue(requests));
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok(ItemResult::Issued(issued)) => (false, issued),
            Ok(ItemResult::Replayed(issued)) => (true, issued),
            other => panic!("not issued: {other:?}"),
        })
        .collect()
}

fn counter(control: &str, name: &str) -> u64 {
    control
        .lines()
        .filter(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn control_metrics(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[test]
fn bulk_issue_restart_and_identical_replays() {
    let setup = Setup::new("quic-e2e");
    let rt = runtime();
    let mut appliance = setup.start_appliance();
    let client = setup.connect(&rt, &appliance, Some("ticketing"), true);
    assert_eq!(client.shard_count(), 2);
    let requests = orders("E2E", 100_000);
    let first = issue_all(&client, &rt, requests.clone());
    assert!(
        first.iter().all(|(replayed, _)| !replayed),
        "fresh orders are issued, not replayed"
    );
    let numbers: HashSet<_> = first.iter().map(|(_, i)| i.identity).collect();
    assert_eq!(numbers.len(), first.len(), "no number twice");
    for (_, issued) in &first {
        assert!(issued.check_code.iter().all(u8::is_ascii_digit));
    }
    let metrics = control_metrics(setup.control);
    assert_eq!(counter(&metrics, "einvoice_issued_invoices_total"), 100_000);
    // Both shards issued.
    assert!(metrics.contains("einvoice_issued_invoices_total{shard=\"1\"}"));
    // Every write carried at least one commit (more when ticks queued behind the disk).
    let commits = counter(&metrics, "einvoice_journal_ticks_total");
    let writes = counter(&metrics, "einvoice_journal_writes_total");
    assert!(
        writes > 0 && commits >= writes,
        "{commits} commits, {writes} writes"
    );
    rt.block_on(client.close());
    drop(client);

    // Kill (SIGKILL: nothing gets a chance to flush) and restart on the same data.
    appliance.kill();
    let appliance = setup.start_appliance();
    let client = setup.connect(&rt, &appliance, Some("ticketing"), true);
    let again = issue_all(&client, &rt, requests);
    for ((_, a), (replayed, b)) in first.iter().zip(&again) {
        assert!(replayed, "resent order must be a replay");
        assert_eq!(a, b, "replay differs from the first answer");
    }
    let metrics = control_metrics(setup.control);
    assert_eq!(
        counter(&metrics, "einvoice_issued_invoices_total"),
        0,
        "nothing new issued"
    );
    assert_eq!(
        counter(&metrics, "einvoice_replayed_invoices_total"),
        100_000
    );
    rt.block_on(client.close());
}

#[test]
fn shard_unaware_client_gets_the_same_invoices_via_forwarding() {
    let setup = Setup::new("quic-unaware");
    let rt = runtime();
    let appliance = setup.start_appliance();
    let unaware = setup.connect(&rt, &appliance, Some("ticketing"), false);
    let requests = orders("UNAWARE", 5_000);
    let via_service = issue_all(&unaware, &rt, requests.clone());
    assert!(via_service.iter().all(|(r, _)| !r));
    let numbers: HashSet<_> = via_service.iter().map(|(_, i)| i.identity).collect();
    assert_eq!(numbers.len(), via_service.len());
    let metrics = control_metrics(setup.control);
    assert!(
        counter(&metrics, "einvoice_forwarded_requests_total") > 0,
        "requests landing on the wrong shard are forwarded: {metrics}"
    );
    // The same orders through a shard-aware client: identical invoices, as replays.
    let aware = setup.connect(&rt, &appliance, Some("ticketing"), true);
    let via_shards = issue_all(&aware, &rt, requests);
    for ((_, a), (replayed, b)) in via_service.iter().zip(&via_shards) {
        assert!(replayed);
        assert_eq!(a, b);
    }
}

fn error_reply(reply: &[u8]) -> ErrorCode {
    let (header, body) = split_frame(reply).expect("a well-formed reply");
    assert_eq!(header.kind, FrameKind::Error, "expected an error frame");
    decode_error(body).expect("a well-formed error").0
}

#[test]
fn bad_input_gets_typed_errors_and_changes_nothing() {
    let setup = Setup::new("quic-bad");
    let rt = runtime();
    let appliance = setup.start_appliance();
    let client = setup.connect(&rt, &appliance, Some("ticketing"), true);
    let good = orders("GOOD", 10);
    let mut frame = Vec::new();
    encode_issue_frame(&mut frame, &good[..1]);

    // Truncated frame: the header promises more than arrives.
    let truncated = frame[..frame.len() - 3].to_vec();
    let reply = rt
        .block_on(client.exchange_raw(Some(0), truncated))
        .unwrap();
    assert_eq!(error_reply(&reply), ErrorCode::Malformed);
    // Shorter than a header.
    let reply = rt
        .block_on(client.exchange_raw(Some(0), frame[..7].to_vec()))
        .unwrap();
    assert_eq!(error_reply(&reply), ErrorCode::Malformed);
    // Wrong version.
    let mut wrong = frame.clone();
    wrong[4] = 99;
    let reply = rt.block_on(client.exchange_raw(Some(0), wrong)).unwrap();
    assert_eq!(error_reply(&reply), ErrorCode::UnsupportedVersion);
    // Oversized batch: one more request than allowed.
    let many: Vec<IssueRequest> = (0..u64::from(BATCH_REQUESTS_MAX) + 1)
        .map(|n| ticket_request(seller(0), "MANY", n))
        .collect();
    let mut big = Vec::new();
    encode_issue_frame(&mut big, &many);
    let reply = rt.block_on(client.exchange_raw(Some(0), big)).unwrap();
    assert_eq!(error_reply(&reply), ErrorCode::BatchTooLarge);
    // A frame kind clients may not send.
    let mut kind = frame.clone();
    kind[5] = FrameKind::IssueReply as u8;
    let reply = rt.block_on(client.exchange_raw(Some(0), kind)).unwrap();
    assert_eq!(error_reply(&reply), ErrorCode::UnexpectedKind);

    // A partial batch: invalid fields, an unknown taxpayer and valid requests together.
    let mut bad_amount = good[1].clone();
    bad_amount.amount_fen += 1;
    let unknown = {
        let mut r = good[2].clone();
        r.seller = TaxpayerId::with_check_char(b"91330000000000777").unwrap();
        r
    };
    let mut empty_name = good[3].clone();
    empty_name.buyer_name.clear();
    let batch = vec![
        good[4].clone(),
        bad_amount,
        unknown,
        empty_name,
        good[5].clone(),
    ];
    let results = rt.block_on(client.issue_frame(None, &batch)).unwrap();
    let codes: Vec<Option<ErrorCode>> = results
        .iter()
        .map(|r| match r {
            ItemResult::Failed { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            Some(ErrorCode::AmountMismatch),
            Some(ErrorCode::UnknownSeller),
            Some(ErrorCode::FieldLength),
            None
        ]
    );

    // Authorised for seller 1 only.
    let catering = setup.connect(&rt, &appliance, Some("catering"), true);
    let mixed = vec![
        ticket_request(seller(0), "CAT", 1),
        ticket_request(seller(1), "CAT", 2),
    ];
    let results = rt.block_on(catering.issue_frame(None, &mixed)).unwrap();
    assert!(
        matches!(
            &results[0],
            ItemResult::Failed {
                code: ErrorCode::Unauthorised,
                ..
            }
        ),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], ItemResult::Issued(_)),
        "{:?}",
        results[1]
    );

    // A certificate from the right CA whose identity has no authorisation: the
    // connection is closed.
    let stranger = rt.block_on(async {
        let client =
            Client::connect(setup.client_config(appliance.addr(), Some("stranger"), true)).await?;
        client.issue_frame(None, &good[6..7]).await
    });
    assert!(stranger.is_err(), "stranger must not issue: {stranger:?}");
    // No client certificate: the handshake fails.
    let anonymous = rt.block_on(Client::connect(setup.client_config(
        appliance.addr(),
        None,
        true,
    )));
    assert!(
        anonymous.is_err(),
        "a client without a certificate must be refused"
    );
    // A certificate from another CA: the handshake fails.
    let other = DevPki::generate(&setup.dir.join("other-pki"), &["x"], &["ticketing"]).unwrap();
    let mut forged = setup.client_config(appliance.addr(), None, true);
    forged.identity = Some(
        appliance_client::ClientIdentity::from_files(&other.clients[0].cert, &other.clients[0].key)
            .unwrap(),
    );
    let forged = rt.block_on(Client::connect(forged));
    assert!(
        forged.is_err(),
        "a certificate from a foreign CA is refused"
    );

    // The first connection still serves, and nothing was journaled for the refusals:
    // the two good requests of the partial batch plus catering's one are all that
    // was issued.
    let results = rt.block_on(client.issue_frame(None, &good[7..9])).unwrap();
    assert!(results.iter().all(|r| matches!(r, ItemResult::Issued(_))));
    let metrics = control_metrics(setup.control);
    assert_eq!(counter(&metrics, "einvoice_issued_invoices_total"), 5);
    assert!(counter(&metrics, "einvoice_frames_refused_total") >= 5);
    assert!(counter(&metrics, "einvoice_unauthorised_requests_total") >= 1);
    assert!(counter(&metrics, "einvoice_quic_unauthorised_connections_total") >= 1);
}
