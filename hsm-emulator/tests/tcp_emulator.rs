//! The glommio `TcpClient` (the driver the appliance shards use) against the real
//! `hsm-emu` process: every command with checked answers, pipelining on one connection,
//! each fault switch seen through the client as its typed `HsmError`, and a SIGKILL +
//! restart of the emulator on the same port while a task keeps calling.
//!
//! The process helpers are local rather than `mod emulator_support;`: that module is
//! being reworked by its owner, and these tests need a restart on an explicit address,
//! which is all they use of it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_core::canonical;
use appliance_core::money::tax_fen;
use appliance_core::{
    Invoice, InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, RedReference,
    TaxRate, TaxpayerId,
};
use hsm_driver::proto::{
    FaultConfig, HeldSegment, Holder, InventoryScope, InvoiceBatch, Request, Response, Segment,
    Status, TaxCodeItem, TaxCodeStatus, TaxpayerInventory, UploadBatch, UploadStatus,
    TAX_CODES_BATCH_MAX,
};
use hsm_driver::tcp::{HsmError, TcpClient, TcpClientConfig};
use hsm_emulator::crypto::{self, Sm2Verifier, TaxCode, TaxCodeAlgorithm, TaxCodeKey};
use hsm_emulator::keys::{DeviceKeys, KeyBackend, SoftwareBackend};

// ---------------------------------------------------------------------------------------
// The emulator process.

/// Invoice code granted to seller 0 (as the appliance demo's authority does).
const CODE_A: u64 = 11_002_300_001;
/// Invoice code granted to seller 1.
const CODE_B: u64 = 11_002_300_011;
/// Numbers granted to seller 0 / seller 1.
const GRANT_A: u32 = 1_000_000;
const GRANT_B: u32 = 1_000;

/// A running `hsm-emu` child; dropping it SIGKILLs and reaps it, so a failed test never
/// leaves a process behind.
struct Emu {
    child: Child,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl Emu {
    /// Starts `hsm-emu` on `data_dir` listening on `listen` (an explicit address to
    /// restart on the same port, or port 0) with both sellers' grants, and waits for its
    /// `listening` line. `Err` carries the emulator's stderr when it exits before it.
    fn try_start(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<Emu, String> {
        let grant_a = format!("{}:{CODE_A}:1:{GRANT_A}", seller(0).as_str());
        let grant_b = format!("{}:{CODE_B}:1:{GRANT_B}", seller(1).as_str());
        // Next to the data dir, appended across restarts so one file tells the story.
        let log_path = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("emulator log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-emu"))
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--listen",
                listen,
                "--taxpayer",
                &grant_a,
                "--taxpayer",
                &grant_b,
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn hsm-emu");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok());
        match (n, addr) {
            (n, Some(addr)) if n > 0 => Ok(Emu {
                child,
                addr,
                data_dir: data_dir.to_path_buf(),
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "first line {line:?}; stderr: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ))
            }
        }
    }

    fn start(data_dir: &Path, extra: &[&str]) -> Emu {
        Self::try_start(data_dir, "127.0.0.1:0", extra)
            .unwrap_or_else(|e| panic!("hsm-emu did not start: {e}"))
    }

    /// The device keys the emulator generated in its data dir (software backend). Only
    /// a test can do this: it is what lets it check tax codes and signatures
    /// independently of the emulator's own code paths.
    fn keys(&self) -> DeviceKeys {
        SoftwareBackend::new(&self.data_dir)
            .open()
            .expect("device keys in the data dir")
    }

    fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// Runs `f` on a fresh glommio executor (one per test: a shard's world) and returns its
/// result.
fn run<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 * 1024)
        .spawn(f)
        .expect("executor")
        .join()
        .expect("executor join")
}

fn config(call_timeout: Duration) -> TcpClientConfig {
    TcpClientConfig {
        connect_timeout: Duration::from_secs(2),
        call_timeout,
        max_in_flight: 1024,
        // Short backoff keeps the reconnect tests quick; the doubling still applies.
        reconnect_backoff_min: Duration::from_millis(5),
        reconnect_backoff_max: Duration::from_millis(100),
    }
}

/// A client for checks whose answers must come: a generous deadline so that a loaded
/// 2-core machine does not turn a slow answer into a false failure.
async fn patient_client(addr: SocketAddr) -> TcpClient {
    TcpClient::connect(addr, config(Duration::from_secs(20)))
        .await
        .expect("connect")
}

// ---------------------------------------------------------------------------------------
// Invoices.

/// The `i`-th railway seller, as `appliance_server::workload::seller` makes it (that crate
/// is not a dependency of this one).
fn seller(i: u32) -> TaxpayerId {
    let first17 = format!("91110000717{:06}", i % 1_000_000);
    let bytes: [u8; 17] = first17.as_bytes().try_into().expect("17 ASCII digits");
    TaxpayerId::with_check_char(&bytes).expect("digits are in the code charset")
}

/// A railway ticket request as `appliance_server::workload::ticket_request` builds it: one
/// line at 9% VAT with the declared amounts the validator expects.
fn ticket_request(seller: TaxpayerId, prefix: &str, n: u64) -> IssueRequest {
    const STATIONS: [&str; 4] = ["北京南", "上海虹桥", "广州南", "成都东"];
    let rate = TaxRate::from_bp(900).expect("9% is a legal rate");
    let unit_price_fen = 5_000 + (n * 7_919 % 150_000) as i64;
    let tax = tax_fen(unit_price_fen, rate);
    IssueRequest {
        seller,
        order_id: format!("{prefix}{n:012}"),
        buyer_name: format!("旅客{}", n % 100_000),
        buyer_taxpayer: None,
        lines: vec![LineItem {
            name: format!(
                "铁路客票 G{} {}-{}",
                1 + n % 9_000,
                STATIONS[(n % 4) as usize],
                STATIONS[((n + 1) % 4) as usize]
            ),
            quantity: 1,
            unit_price_fen,
        }],
        tax_rate: rate,
        issuer_ref: format!("G{}", 1 + n % 9_000),
        amount_fen: unit_price_fen,
        tax_fen: tax,
        total_fen: unit_price_fen + tax,
        kind: InvoiceKind::Blue,
    }
}

const ISSUE_TIME_MS: u64 = 1_700_000_000_000;

/// An issued-to-be invoice (codes still zero) for `number` under `code`.
fn invoice(request: IssueRequest, code: u64, number: u32) -> Invoice {
    Invoice {
        request,
        code: InvoiceCode::new(code).expect("code in range"),
        number: InvoiceNumber::new(number).expect("number in range"),
        issue_time_ms: ISSUE_TIME_MS,
        tax_control_code: [0; 32],
        check_code: [0; 20],
    }
}

fn blue(seller_index: u32, code: u64, number: u32, prefix: &str) -> Invoice {
    invoice(
        ticket_request(seller(seller_index), prefix, u64::from(number)),
        code,
        number,
    )
}

/// A full refund of `original` as a red invoice numbered `number`.
fn red_of(original: &Invoice, number: u32) -> Invoice {
    let mut request = original.request.clone();
    for line in &mut request.lines {
        line.unit_price_fen = -line.unit_price_fen;
    }
    request.order_id = format!("refund-{}", original.request.order_id);
    request.amount_fen = -request.amount_fen;
    request.tax_fen = tax_fen(request.amount_fen, request.tax_rate);
    request.total_fen = request.amount_fen + request.tax_fen;
    request.kind = InvoiceKind::Red(RedReference {
        original_code: original.code,
        original_number: original.number,
        original_order_id: original.request.order_id.clone(),
    });
    invoice(request, original.code.get(), number)
}

// ---------------------------------------------------------------------------------------
// Calls.

async fn call_ok(c: &TcpClient, req: Request) -> Response {
    let op = req.opcode();
    c.call(&req)
        .await
        .unwrap_or_else(|e| panic!("{op:?} failed: {e}"))
}

/// Calls and expects a device error; returns its status.
async fn device_status(c: &TcpClient, req: Request) -> Status {
    match c.call(&req).await {
        Err(HsmError::Device { status, .. }) => status,
        other => panic!("{:?}: expected a device error, got {other:?}", req.opcode()),
    }
}

async fn requisition(
    c: &TcpClient,
    seller: TaxpayerId,
    count: u32,
    holder: u32,
    request_id: u64,
) -> Result<Segment, HsmError> {
    match c
        .call(&Request::Requisition {
            taxpayer: *seller.as_bytes(),
            count,
            holder: Holder::new(0, holder),
            request_id,
        })
        .await?
    {
        Response::Requisition(s) => Ok(s),
        other => panic!("Requisition answered with {other:?}"),
    }
}

/// TaxCodes for `items` on behalf of shard `shard` (appliance id 0).
async fn tax_codes(
    c: &TcpClient,
    shard: u32,
    items: &[&[u8]],
) -> Result<Vec<TaxCodeItem>, HsmError> {
    let mut batch = InvoiceBatch::new();
    batch.set_holder(Holder::new(0, shard));
    for item in items {
        batch.push(item).expect("batch within limits");
    }
    match c.call(&Request::TaxCodes(batch)).await? {
        Response::TaxCodes(results) => {
            assert_eq!(results.len(), items.len(), "one result per item");
            Ok(results)
        }
        other => panic!("TaxCodes answered with {other:?}"),
    }
}

async fn upload(c: &TcpClient, items: &[(&[u8], TaxCode)]) -> Vec<UploadStatus> {
    let mut batch = UploadBatch::new();
    for (bytes, code) in items {
        batch.push(bytes, code).expect("batch within limits");
    }
    match call_ok(c, Request::Upload(batch)).await {
        Response::Upload(statuses) => {
            assert_eq!(statuses.len(), items.len(), "one status per item");
            statuses
        }
        other => panic!("Upload answered with {other:?}"),
    }
}

async fn nop(c: &TcpClient, payload: &[u8]) -> Result<(), HsmError> {
    match c.call(&Request::Nop(payload.to_vec())).await? {
        Response::Nop(echo) => {
            assert_eq!(echo, payload, "Nop echoes its bytes");
            Ok(())
        }
        other => panic!("Nop answered with {other:?}"),
    }
}

async fn set_faults(control: &TcpClient, faults: FaultConfig) {
    assert_eq!(
        call_ok(control, Request::SetFaults(faults)).await,
        Response::SetFaults
    );
}

/// Checks an ok `TaxCodes` result against an independent computation with the device
/// key: the tax code is HMAC-SM3 over exactly these canonical bytes and the check code
/// derives from it.
fn assert_codes(key: &TaxCodeKey, canonical_bytes: &[u8], item: &TaxCodeItem) {
    assert_eq!(item.status(), Some(TaxCodeStatus::Ok));
    assert_eq!(item.tax_code, crypto::tax_code(key, canonical_bytes));
    assert!(crypto::verify(key, canonical_bytes, &item.tax_code));
    assert_eq!(item.check_code, crypto::check_code(&item.tax_code));
    assert!(item.check_code.iter().all(u8::is_ascii_digit));
}

async fn sleep_ms(ms: u64) {
    glommio::timer::sleep(Duration::from_millis(ms)).await;
}

/// Waits (bounded) until `cond` holds; the bound only turns a hang into a failure.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        sleep_ms(2).await;
    }
}

/// Nop until one is answered; every failure on the way must be of the `allowed` kind.
/// Returns how many attempts failed. Bounded so that "never recovers" fails the test.
async fn recover(c: &TcpClient, allowed: fn(&HsmError) -> bool) -> usize {
    for failed in 0..50 {
        match nop(c, b"recovered?").await {
            Ok(()) => return failed,
            Err(e) => {
                assert!(allowed(&e), "unexpected error while recovering: {e:?}");
                sleep_ms(20).await;
            }
        }
    }
    panic!("the client did not recover");
}

// ---------------------------------------------------------------------------------------
// Every command.

#[test]
fn every_command_through_the_glommio_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No --allow-fault-injection: SetFaults must be Forbidden here.
    let emu = Emu::start(&dir.path().join("emu"), &[]);
    let keys = emu.keys();
    let addr = emu.addr;
    let tax_key = keys.tax_key().to_vec();
    let public_key = *keys.public_key();
    run(move || async move {
        let key = TaxCodeKey::hmac_sm3(&tax_key);
        let c = patient_client(addr).await;
        let (a, b) = (seller(0), seller(1));

        // DeviceInfo.
        let Response::DeviceInfo(info) = call_ok(&c, Request::DeviceInfo).await else {
            panic!("DeviceInfo answered with another response");
        };
        assert!(!info.device_id.is_empty());
        assert!(info.firmware.starts_with("hsm-emu"), "{}", info.firmware);
        assert_eq!(info.sm2_public_key, public_key);
        assert_eq!(info.tax_code_algorithm, TaxCodeAlgorithm::HmacSm3);
        assert_eq!(info.batch_max as usize, TAX_CODES_BATCH_MAX);
        assert_eq!(info.taxpayers, vec![*a.as_bytes(), *b.as_bytes()]);

        // Requisition: segments are carved in order; a retry with the same request id
        // is answered with the same segment and carves nothing.
        let s1 = requisition(&c, a, 200, 1, 1).await.expect("grant");
        assert_eq!(
            s1,
            Segment {
                code: CODE_A,
                first: 1,
                count: 200
            }
        );
        assert_eq!(requisition(&c, a, 200, 1, 1).await.expect("retry"), s1);
        let s2 = requisition(&c, a, 50, 1, 2).await.expect("grant");
        assert_eq!(
            s2,
            Segment {
                code: CODE_A,
                first: 201,
                count: 50
            }
        );
        let sb = requisition(&c, b, GRANT_B, 2, 1).await.expect("grant B");
        assert_eq!(
            sb,
            Segment {
                code: CODE_B,
                first: 1,
                count: GRANT_B
            }
        );
        let req = |taxpayer: TaxpayerId, holder, request_id| Request::Requisition {
            taxpayer: *taxpayer.as_bytes(),
            count: 10,
            holder: Holder::new(0, holder),
            request_id,
        };
        assert_eq!(
            device_status(&c, req(b, 1, 2)).await,
            Status::RequestIdConflict
        );
        assert_eq!(
            device_status(&c, req(b, 2, 2)).await,
            Status::InventoryExhausted
        );
        assert_eq!(
            device_status(&c, req(seller(7), 1, 3)).await,
            Status::UnknownTaxpayer
        );

        // ReturnSegment: the tail 231..=250 of s2; a retry is fine; a range never
        // granted is not held.
        let tail = Segment {
            code: CODE_A,
            first: 231,
            count: 20,
        };
        for _ in 0..2 {
            assert_eq!(
                call_ok(
                    &c,
                    Request::ReturnSegment {
                        taxpayer: *a.as_bytes(),
                        segment: tail,
                        holder: Holder::new(0, 1),
                    }
                )
                .await,
                Response::ReturnSegment
            );
        }
        assert_eq!(
            device_status(
                &c,
                Request::ReturnSegment {
                    taxpayer: *a.as_bytes(),
                    segment: Segment {
                        code: CODE_A,
                        first: 5_000,
                        count: 10
                    },
                    holder: Holder::new(0, 1),
                }
            )
            .await,
            Status::SegmentNotHeld
        );

        // TaxCodes for a batch of real canonical invoices (64 blue tickets and one red
        // refund of the first), plus one item of every per-item failure.
        let mut issued: Vec<Invoice> = (1..=64).map(|n| blue(0, CODE_A, n, "T")).collect();
        issued.push(red_of(&issued[0], 65));
        let issued_bytes: Vec<Vec<u8>> = issued.iter().map(canonical::encode).collect();
        let returned = canonical::encode(&blue(0, CODE_A, 240, "T"));
        let never_granted = canonical::encode(&blue(0, CODE_A, 100_000, "T"));
        let unknown_seller = canonical::encode(&blue(7, CODE_A, 2, "T"));
        let truncated = &issued_bytes[1][..issued_bytes[1].len() - 1];
        let mut items: Vec<&[u8]> = issued_bytes.iter().map(Vec::as_slice).collect();
        items.extend([
            returned.as_slice(),
            never_granted.as_slice(),
            unknown_seller.as_slice(),
            truncated,
            b"not an invoice".as_slice(),
        ]);
        let results = tax_codes(&c, 1, &items).await.expect("TaxCodes");
        for (bytes, item) in issued_bytes.iter().zip(&results) {
            assert_codes(&key, bytes, item);
        }
        let failures: Vec<_> = results[issued.len()..]
            .iter()
            .map(|item| {
                // Failed items carry no codes.
                assert_eq!(item.tax_code, [0; 32]);
                item.status()
            })
            .collect();
        use TaxCodeStatus::*;
        assert_eq!(
            failures,
            [
                NumberNotGranted,
                NumberNotGranted,
                UnknownTaxpayer,
                MalformedInvoice,
                MalformedInvoice
            ]
            .map(Some)
        );
        // What an auditor does: the codes are not part of the canonical bytes, so the
        // invoice with its codes re-encodes to exactly what was MACed.
        for (inv, item) in issued.iter_mut().zip(&results) {
            inv.tax_control_code = item.tax_code;
            inv.check_code = item.check_code;
        }
        for (inv, bytes) in issued.iter().zip(&issued_bytes) {
            assert_eq!(&canonical::encode(inv), bytes);
            assert!(crypto::verify(&key, bytes, &inv.tax_control_code));
        }
        // Seller B gets a code too (for the per-taxpayer counters below).
        let b1 = canonical::encode(&blue(1, CODE_B, 1, "B"));
        assert_codes(
            &key,
            &b1,
            &tax_codes(&c, 2, &[&b1]).await.expect("TaxCodes B")[0],
        );
        let (mut blue_codes, red_codes) = (64u64, 1u64);

        // Upload: every issued invoice is accepted; a retry is a duplicate.
        let pairs: Vec<(&[u8], TaxCode)> = issued_bytes
            .iter()
            .zip(&issued)
            .map(|(b, inv)| (b.as_slice(), inv.tax_control_code))
            .collect();
        assert!(upload(&c, &pairs)
            .await
            .iter()
            .all(|s| *s == UploadStatus::Accepted));
        assert_eq!(
            upload(&c, &pairs[..2]).await,
            [UploadStatus::Duplicate, UploadStatus::Duplicate]
        );
        // A tampered tax code is forged; the true one is then accepted.
        let late = canonical::encode(&blue(0, CODE_A, 66, "T"));
        let late_code = tax_codes(&c, 1, &[&late]).await.expect("TaxCodes")[0].tax_code;
        blue_codes += 1;
        let mut tampered = late_code;
        tampered[31] ^= 1;
        assert_eq!(
            upload(&c, &[(&late, tampered)]).await,
            [UploadStatus::Forged]
        );
        assert_eq!(
            upload(&c, &[(&late, late_code)]).await,
            [UploadStatus::Accepted]
        );
        // Another invoice under an uploaded number, with its own valid code: conflict.
        let other = canonical::encode(&blue(0, CODE_A, 2, "OTHER"));
        let other_code = tax_codes(&c, 1, &[&other]).await.expect("TaxCodes")[0].tax_code;
        blue_codes += 1;
        // A number the device never granted, even with a correctly keyed code.
        let forged_identity = crypto::tax_code(&key, &never_granted);
        assert_eq!(
            upload(
                &c,
                &[
                    (&other, other_code),
                    (&never_granted, forged_identity),
                    (b"junk", [0; 32]),
                ]
            )
            .await,
            [
                UploadStatus::Conflict,
                UploadStatus::NotGranted,
                UploadStatus::Malformed
            ]
        );
        let accepted: Vec<&Invoice> = issued.iter().collect();
        let late_inv = blue(0, CODE_A, 66, "T");
        let uploaded_count = accepted.len() as u64 + 1;
        let sum = |f: fn(&IssueRequest) -> i64| {
            accepted.iter().map(|i| f(&i.request)).sum::<i64>() + f(&late_inv.request)
        };

        // Sign: verifies under the DeviceInfo public key, and not for another digest.
        let digest = crypto::sm3_digest(b"batch root of tick 1");
        let Response::Sign(signature) = call_ok(&c, Request::Sign { digest }).await else {
            panic!("Sign answered with another response");
        };
        let verifier = Sm2Verifier::from_public_key(&info.sm2_public_key).expect("key");
        verifier.verify(&digest, &signature).expect("signature");
        assert!(verifier
            .verify(&crypto::sm3_digest(b"something else"), &signature)
            .is_err());

        // Inventory of one taxpayer and of all.
        let Response::Inventory(inv_a) = call_ok(
            &c,
            Request::Inventory(InventoryScope::Taxpayer(*a.as_bytes())),
        )
        .await
        else {
            panic!("Inventory answered with another response");
        };
        let expected_a = TaxpayerInventory {
            taxpayer: *a.as_bytes(),
            remaining: u64::from(GRANT_A - 250),
            issued: blue_codes + red_codes,
            uploaded: uploaded_count,
            segments: vec![
                HeldSegment {
                    segment: s1,
                    holder: Holder::new(0, 1),
                    request_id: 1,
                    coded_end: 67, // numbers 1-64 and 66 were coded
                },
                // s2 less its returned tail.
                HeldSegment {
                    segment: Segment {
                        code: CODE_A,
                        first: 201,
                        count: 30,
                    },
                    holder: Holder::new(0, 1),
                    request_id: 2,
                    coded_end: 0,
                },
            ],
        };
        assert_eq!(inv_a, vec![expected_a.clone()]);
        let Response::Inventory(all) = call_ok(&c, Request::Inventory(InventoryScope::All)).await
        else {
            panic!("Inventory answered with another response");
        };
        assert_eq!(all.len(), 2);
        let find = |t: TaxpayerId| all.iter().find(|i| i.taxpayer == *t.as_bytes()).cloned();
        assert_eq!(find(a), Some(expected_a));
        assert_eq!(
            find(b),
            Some(TaxpayerInventory {
                taxpayer: *b.as_bytes(),
                remaining: 0,
                issued: 1,
                uploaded: 0,
                segments: vec![HeldSegment {
                    segment: sb,
                    holder: Holder::new(0, 2),
                    request_id: 1,
                    coded_end: 2,
                }],
            })
        );

        // ReportAndClear: the period's counts and sums, then an empty period; a period
        // end before the previous one is malformed.
        let report = |end| Request::ReportAndClear {
            taxpayer: *a.as_bytes(),
            period_end_ms: end,
        };
        let Response::ReportAndClear(r) = call_ok(&c, report(1_000)).await else {
            panic!("ReportAndClear answered with another response");
        };
        assert_eq!(r.taxpayer, *a.as_bytes());
        assert_eq!((r.period_start_ms, r.period_end_ms), (0, 1_000));
        assert_eq!((r.blue_count, r.red_count), (blue_codes, red_codes));
        assert_eq!(r.uploaded_count, uploaded_count);
        assert_eq!(r.amount_fen, sum(|q| q.amount_fen));
        assert_eq!(r.tax_fen, sum(|q| q.tax_fen));
        assert_eq!(r.total_fen, sum(|q| q.total_fen));
        let Response::ReportAndClear(r2) = call_ok(&c, report(2_000)).await else {
            panic!("ReportAndClear answered with another response");
        };
        assert_eq!((r2.period_start_ms, r2.period_end_ms), (1_000, 2_000));
        assert_eq!(
            (r2.blue_count, r2.red_count, r2.uploaded_count, r2.total_fen),
            (0, 0, 0, 0)
        );
        assert_eq!(device_status(&c, report(1_500)).await, Status::Malformed);

        // Nop: empty, small and 64 KiB payloads come back unchanged.
        for len in [0usize, 1, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            nop(&c, &payload).await.expect("Nop");
        }

        // SetFaults is refused without --allow-fault-injection.
        assert_eq!(
            device_status(&c, Request::SetFaults(FaultConfig::default())).await,
            Status::Forbidden
        );

        // Every call above went over one connection and got its answer.
        let stats = c.stats();
        assert_eq!(stats.connects, 1);
        assert_eq!(stats.connections_lost, 0);
        assert_eq!(stats.timeouts, 0);
    });
}

// ---------------------------------------------------------------------------------------
// Pipelining.

#[test]
fn five_hundred_concurrent_calls_pipeline_on_one_connection() {
    const CALLS: u32 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = Emu::start(&dir.path().join("emu"), &[]);
    let keys = emu.keys();
    let addr = emu.addr;
    let tax_key = keys.tax_key().to_vec();
    let public_key = *keys.public_key();
    let (ok, stats, max_seen_in_flight) = run(move || async move {
        let key = Rc::new(TaxCodeKey::hmac_sm3(&tax_key));
        let verifier = Rc::new(Sm2Verifier::from_public_key(&public_key).expect("key"));
        let c = patient_client(addr).await;
        let seg = requisition(&c, seller(0), CALLS, 1, 1)
            .await
            .expect("grant");
        let max_in_flight = Rc::new(Cell::new(0usize));
        let tasks: Vec<_> = (0..CALLS)
            .map(|i| {
                let (c, key, verifier) = (c.clone(), key.clone(), verifier.clone());
                let max_in_flight = max_in_flight.clone();
                glommio::spawn_local(async move {
                    // Calls already in flight when this one is made: > 0 only if calls
                    // overlap on the connection instead of running one by one.
                    max_in_flight.set(max_in_flight.get().max(c.in_flight()));
                    match i % 3 {
                        0 => {
                            // Varied sizes, so frames split across reads differently.
                            let payload: Vec<u8> = (0..(i as usize * 37) % 5_000)
                                .map(|j| (j ^ i as usize) as u8)
                                .collect();
                            nop(&c, &payload).await.is_ok()
                        }
                        1 => {
                            let digest = crypto::sm3_digest(&i.to_le_bytes());
                            match c.call(&Request::Sign { digest }).await {
                                Ok(Response::Sign(sig)) => verifier.verify(&digest, &sig).is_ok(),
                                _ => false,
                            }
                        }
                        _ => {
                            let bytes = canonical::encode(&blue(0, CODE_A, seg.first + i, "P"));
                            match tax_codes(&c, 1, &[&bytes]).await {
                                Ok(items) => {
                                    items[0].status() == Some(TaxCodeStatus::Ok)
                                        && items[0].tax_code == crypto::tax_code(&key, &bytes)
                                }
                                Err(_) => false,
                            }
                        }
                    }
                })
                .detach()
            })
            .collect();
        let mut ok = 0u32;
        for t in tasks {
            if t.await == Some(true) {
                ok += 1;
            }
        }
        (ok, c.stats(), max_in_flight.get())
    });
    assert_eq!(ok, CALLS, "every call answered correctly");
    assert_eq!(stats.connects, 1, "one connection carried them all");
    assert_eq!(stats.answered, u64::from(CALLS) + 1);
    assert_eq!((stats.timeouts, stats.connections_lost), (0, 0));
    assert_eq!((stats.unknown_answers, stats.corrupt_frames), (0, 0));
    assert!(
        max_seen_in_flight > 1,
        "calls were not pipelined (max in flight {max_seen_in_flight})"
    );
}

// ---------------------------------------------------------------------------------------
// Fault switches. Each test runs its own emulator with fault injection and 8 workers: a
// command held by latency or a stall occupies a worker, and the control client's
// SetFaults must find a free one. The control client has its own connection, which
// `reset_connections` spares (it resets all but the sender's).

fn fault_emulator(dir: &Path) -> Emu {
    Emu::start(
        &dir.join("emu"),
        &["--allow-fault-injection", "--threads", "8"],
    )
}

/// Short enough that a fault makes the call miss it quickly, long enough for a healthy
/// answer on a loaded machine (and `recover` retries anyway).
const SHORT_CALL: Duration = Duration::from_millis(500);

#[test]
fn latency_fault_times_out_then_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = fault_emulator(dir.path());
    let addr = emu.addr;
    run(move || async move {
        let control = patient_client(addr).await;
        let c = TcpClient::connect(addr, config(SHORT_CALL))
            .await
            .expect("connect");
        nop(&c, b"before").await.expect("healthy");
        set_faults(
            &control,
            FaultConfig {
                latency_us: 5_000_000,
                ..FaultConfig::default()
            },
        )
        .await;
        assert!(matches!(nop(&c, b"slow").await, Err(HsmError::Timeout)));
        assert_eq!(c.stats().timeouts, 1);
        // A timeout is not a transport failure: the connection stays up.
        assert!(c.is_connected());
        set_faults(&control, FaultConfig::default()).await;
        recover(&c, |e| matches!(e, HsmError::Timeout)).await;
        let stats = c.stats();
        assert_eq!((stats.connects, stats.connections_lost), (1, 0));
    });
}

#[test]
fn stall_fault_times_out_then_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = fault_emulator(dir.path());
    let addr = emu.addr;
    run(move || async move {
        let control = patient_client(addr).await;
        let c = TcpClient::connect(addr, config(SHORT_CALL))
            .await
            .expect("connect");
        nop(&c, b"before").await.expect("healthy");
        set_faults(
            &control,
            FaultConfig {
                stall_ms: 10_000,
                ..FaultConfig::default()
            },
        )
        .await;
        assert!(matches!(nop(&c, b"stalled").await, Err(HsmError::Timeout)));
        assert!(c.is_connected());
        // SetFaults is never stalled: clearing ends the stall long before 10 s.
        set_faults(&control, FaultConfig::default()).await;
        recover(&c, |e| matches!(e, HsmError::Timeout)).await;
        assert_eq!(c.stats().connects, 1);
    });
}

#[test]
fn dropped_connections_are_connection_lost_then_the_client_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = fault_emulator(dir.path());
    let addr = emu.addr;
    run(move || async move {
        let control = patient_client(addr).await;
        let c = TcpClient::connect(addr, config(Duration::from_secs(10)))
            .await
            .expect("connect");
        nop(&c, b"before").await.expect("healthy");
        // Drop every new connection after its first request, and reset the current one
        // so that the client has to make new ones.
        set_faults(
            &control,
            FaultConfig {
                drop_every_nth_connection: 1,
                reset_connections: 1,
                ..FaultConfig::default()
            },
        )
        .await;
        wait_for("the reset to reach the client", || !c.is_connected()).await;
        for _ in 0..2 {
            // The client reconnects by itself; the emulator drops the request unanswered.
            assert!(matches!(
                nop(&c, b"dropped").await,
                Err(HsmError::ConnectionLost)
            ));
        }
        let stats = c.stats();
        assert_eq!(stats.connects, 3, "{stats:?}");
        assert_eq!(stats.connections_lost, 3, "{stats:?}");
        // Every 2nd from now: the next connection is served.
        set_faults(
            &control,
            FaultConfig {
                drop_every_nth_connection: 2,
                ..FaultConfig::default()
            },
        )
        .await;
        nop(&c, b"first connection since the switch")
            .await
            .expect("served");
        assert_eq!(c.stats().connects, 4);
    });
}

#[test]
fn refuse_fault_is_busy_on_open_connections_and_closes_new_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = fault_emulator(dir.path());
    let addr = emu.addr;
    run(move || async move {
        let control = patient_client(addr).await;
        let c = TcpClient::connect(addr, config(Duration::from_secs(10)))
            .await
            .expect("connect");
        nop(&c, b"before").await.expect("healthy");
        set_faults(
            &control,
            FaultConfig {
                refuse: 1,
                ..FaultConfig::default()
            },
        )
        .await;
        // The open connection is answered, with Busy: a transient device error.
        let busy = nop(&c, b"refused").await.expect_err("busy");
        assert!(
            matches!(
                &busy,
                HsmError::Device {
                    status: Status::Busy,
                    ..
                }
            ),
            "{busy:?}"
        );
        assert!(busy.is_transient());
        // New connections are closed on accept. The TCP handshake itself succeeds (the
        // kernel completes it before the emulator accepts), so the client sees the
        // connection lost, not refused.
        set_faults(
            &control,
            FaultConfig {
                refuse: 1,
                reset_connections: 1,
                ..FaultConfig::default()
            },
        )
        .await;
        wait_for("the reset to reach the client", || !c.is_connected()).await;
        let closed = nop(&c, b"closed on accept").await.expect_err("closed");
        assert!(matches!(closed, HsmError::ConnectionLost), "{closed:?}");
        set_faults(&control, FaultConfig::default()).await;
        recover(&c, |e| matches!(e, HsmError::ConnectionLost)).await;
        assert!(c.stats().connects >= 3);
    });
}

#[test]
fn reset_fails_in_flight_calls_and_the_client_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let emu = fault_emulator(dir.path());
    let addr = emu.addr;
    run(move || async move {
        let control = patient_client(addr).await;
        let c = TcpClient::connect(addr, config(Duration::from_secs(20)))
            .await
            .expect("connect");
        nop(&c, b"before").await.expect("healthy");
        // Latency keeps three calls in flight (three of the four workers) for seconds.
        set_faults(
            &control,
            FaultConfig {
                latency_us: 5_000_000,
                ..FaultConfig::default()
            },
        )
        .await;
        let in_flight: Vec<_> = (0..3u8)
            .map(|i| {
                let c = c.clone();
                glommio::spawn_local(async move { nop(&c, &[i]).await }).detach()
            })
            .collect();
        wait_for("three calls in flight", || c.in_flight() == 3).await;
        // The latency stays on through the reset: a request the emulator had not yet
        // handed to a worker must not slip through unslowed between the switch change
        // and the reset (both happen in one SetFaults, the switches first).
        set_faults(
            &control,
            FaultConfig {
                latency_us: 5_000_000,
                reset_connections: 1,
                ..FaultConfig::default()
            },
        )
        .await;
        for t in in_flight {
            let outcome = t.await.expect("task ran");
            assert!(
                matches!(outcome, Err(HsmError::ConnectionLost)),
                "{outcome:?}"
            );
        }
        set_faults(&control, FaultConfig::default()).await;
        nop(&c, b"after").await.expect("reconnected by itself");
        let stats = c.stats();
        assert_eq!(
            (stats.connects, stats.connections_lost),
            (2, 1),
            "{stats:?}"
        );
        // The control connection was spared.
        assert_eq!(control.stats().connects, 1);
    });
}

// ---------------------------------------------------------------------------------------
// SIGKILL and restart mid-load.

/// Counts an error seen during the outage; only the transport kinds are expected.
fn note(errors: &mut BTreeMap<&'static str, u32>, refused_seen: &AtomicU32, e: HsmError) {
    let kind = match e {
        HsmError::ConnectionLost => "ConnectionLost",
        HsmError::Refused => {
            refused_seen.fetch_add(1, Ordering::AcqRel);
            "Refused"
        }
        HsmError::Timeout => "Timeout",
        other => panic!("unexpected error during the outage: {other:?}"),
    };
    *errors.entry(kind).or_default() += 1;
}

/// Phases of the restart test, set by the thread that owns the emulator process.
const RUNNING: u32 = 0;
const KILLED: u32 = 1;
const RESTARTED: u32 = 2;

#[test]
fn emulator_killed_and_restarted_mid_load_client_reconnects_and_never_regrants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("emu");
    let emu = Emu::start(&data_dir, &[]);
    let addr = emu.addr;
    let keys = emu.keys();
    let phase = Arc::new(AtomicU32::new(RUNNING));
    let progress = Arc::new(AtomicU32::new(0));
    let refused_seen = Arc::new(AtomicU32::new(0));

    // The process owner: SIGKILL once the load is under way, keep the device down until
    // the client has found nothing listening, then restart on the same address and data
    // dir. Waits are bounded so that a stuck load fails the test instead of hanging it.
    let owner = {
        let (phase, progress, refused_seen) =
            (phase.clone(), progress.clone(), refused_seen.clone());
        std::thread::spawn(move || {
            let wait = |what: &str, cond: &dyn Fn() -> bool| {
                let give_up = Instant::now() + Duration::from_secs(15);
                while !cond() {
                    assert!(Instant::now() < give_up, "gave up waiting for {what}");
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            wait("load before the kill", &|| {
                progress.load(Ordering::Acquire) >= 20
            });
            emu.kill();
            phase.store(KILLED, Ordering::Release);
            wait("the client to find the device gone", &|| {
                refused_seen.load(Ordering::Acquire) > 0
            });
            // The port may linger briefly; the emulator binds with SO_REUSEADDR (std), so
            // retries are for safety only.
            let mut attempts = 0;
            let restarted = loop {
                match Emu::try_start(&data_dir, &addr.to_string(), &[]) {
                    Ok(e) => break e,
                    Err(e) if attempts < 50 => {
                        attempts += 1;
                        eprintln!("restart attempt {attempts} failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("hsm-emu did not restart on {addr}: {e}"),
                }
            };
            assert_eq!(restarted.addr, addr, "same port");
            phase.store(RESTARTED, Ordering::Release);
            restarted
        })
    };

    let tax_key = keys.tax_key().to_vec();
    let (grants, errors, stats, inventory, retried) = run(move || async move {
        let key = TaxCodeKey::hmac_sm3(&tax_key);
        let a = seller(0);
        let c = TcpClient::connect(addr, config(Duration::from_secs(2)))
            .await
            .expect("connect");
        // request id -> (segment, phase in which it was answered)
        let mut grants: BTreeMap<u64, (Segment, u32)> = BTreeMap::new();
        let mut errors: BTreeMap<&'static str, u32> = BTreeMap::new();
        let mut segment: Option<(Segment, u32)> = None; // segment, next offset
        let mut request_id = 0u64;
        let mut successes_after_restart = 0;
        let give_up = Instant::now() + Duration::from_secs(25);
        while successes_after_restart < 40 {
            assert!(
                Instant::now() < give_up,
                "load made no progress: {errors:?}"
            );
            let now = phase.load(Ordering::Acquire);
            // Numbers: a new segment when the current one is used up. A failed
            // requisition is retried with the same request id until answered, as the
            // appliance does, so that a grant made just before the kill is not lost.
            if segment.is_none_or(|(s, next)| next == s.count) {
                request_id += 1;
                match requisition(&c, a, 10, 7, request_id).await {
                    Ok(s) => {
                        grants.insert(request_id, (s, now));
                        segment = Some((s, 0));
                    }
                    Err(e) => {
                        note(&mut errors, &refused_seen, e);
                        request_id -= 1;
                        sleep_ms(5).await;
                        continue;
                    }
                }
            }
            let Some((s, next)) = segment else {
                unreachable!("a segment was just ensured")
            };
            // Two invoices per TaxCodes; a failed call is retried with the same numbers.
            let invoices: Vec<Vec<u8>> = (next..(next + 2).min(s.count))
                .map(|k| canonical::encode(&blue(0, s.code, s.first + k, "R")))
                .collect();
            let refs: Vec<&[u8]> = invoices.iter().map(Vec::as_slice).collect();
            let outcome = match tax_codes(&c, 7, &refs).await {
                Ok(items) => {
                    for (bytes, item) in invoices.iter().zip(&items) {
                        // The keys survive the restart: codes verify under the same key.
                        assert_codes(&key, bytes, item);
                    }
                    segment = Some((s, next + invoices.len() as u32));
                    nop(&c, &request_id.to_le_bytes()).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => {
                    progress.fetch_add(1, Ordering::AcqRel);
                    if phase.load(Ordering::Acquire) == RESTARTED {
                        successes_after_restart += 1;
                    }
                }
                Err(e) => {
                    note(&mut errors, &refused_seen, e);
                    sleep_ms(5).await;
                }
            }
        }
        // After the restart, a retry of a grant answered before the kill is answered
        // with the same segment (the device's grant memory is durable).
        let (first_id, (first_segment, _)) = grants.iter().next().map(|(k, v)| (*k, *v)).unwrap();
        let retried = requisition(&c, a, 10, 7, first_id).await.expect("retry") == first_segment;
        let Response::Inventory(inventory) = call_ok(
            &c,
            Request::Inventory(InventoryScope::Taxpayer(*a.as_bytes())),
        )
        .await
        else {
            panic!("Inventory answered with another response");
        };
        (grants, errors, c.stats(), inventory, retried)
    });
    let _restarted = owner.join().expect("process owner");

    assert!(
        errors.get("Refused").copied().unwrap_or(0) > 0,
        "{errors:?}"
    );
    assert!(
        stats.connects >= 2,
        "the client reconnected by itself: {stats:?}"
    );
    assert!(stats.connections_lost >= 1, "{stats:?}");
    let before = grants.values().filter(|(_, p)| *p == RUNNING).count();
    let after = grants.values().filter(|(_, p)| *p == RESTARTED).count();
    assert!(
        before > 0 && after > 0,
        "grants before {before}, after {after}"
    );
    // No number granted twice: all segments, from before and after the kill, disjoint.
    let mut segments: Vec<Segment> = grants.values().map(|(s, _)| *s).collect();
    segments.sort_by_key(|s| s.first);
    for pair in segments.windows(2) {
        assert_eq!(pair[0].code, pair[1].code);
        assert!(
            pair[0].first + pair[0].count <= pair[1].first,
            "overlap: {pair:?}"
        );
    }
    assert!(
        retried,
        "a pre-kill request id was answered with another segment"
    );
    // The device lists exactly the grants the client was answered: every request id
    // retried until answered, so none is orphaned.
    assert_eq!(inventory.len(), 1);
    let listed: BTreeMap<u64, Segment> = inventory[0]
        .segments
        .iter()
        .map(|h| {
            assert_eq!(h.holder, Holder::new(0, 7));
            (h.request_id, h.segment)
        })
        .collect();
    let answered: BTreeMap<u64, Segment> = grants.iter().map(|(k, (s, _))| (*k, *s)).collect();
    assert_eq!(listed, answered);
}
