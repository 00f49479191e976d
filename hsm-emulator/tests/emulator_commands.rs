//! Every command of the command set against a real `hsm-emu` process.

mod emulator_support;

use emulator_support::*;
use hsm_driver::proto::{
    FaultConfig, InventoryScope, Request, Response, Segment, Status, TaxCodeStatus, UploadStatus,
};
use hsm_emulator::crypto::{self, TaxCodeAlgorithm, TaxCodeKey};
use hsm_emulator::keys::{KeyBackend, SoftwareBackend};

const CODE_A: u64 = 144_031_900_111;
const CODE_A2: u64 = 144_031_900_112;
const CODE_B: u64 = 131_001_900_222;

fn start(dir: &std::path::Path, extra: &[&str]) -> Emu {
    let a = format!("{}:{CODE_A}:1:1000", seller_a());
    let a2 = format!("{}:{CODE_A2}:5000:100", seller_a());
    let b = format!("{}:{CODE_B}:1:50", seller_b());
    let mut args = vec!["--taxpayer", &a, "--taxpayer", &a2, "--taxpayer", &b];
    args.extend_from_slice(extra);
    Emu::start(dir, &args)
}

#[test]
fn device_info_nop_and_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    let Response::DeviceInfo(info) = ok(&mut c, Request::DeviceInfo) else {
        panic!("device info")
    };
    assert_eq!(info.tax_code_algorithm, TaxCodeAlgorithm::HmacSm3);
    assert_eq!(info.taxpayers, vec![tp(&seller_a()), tp(&seller_b())]);
    assert!(info.device_id.starts_with("EMU-"));
    assert!(info.firmware.starts_with("hsm-emu"));
    assert_eq!(info.sm2_public_key[0], 0x04);

    let payload = vec![7u8; 100_000];
    assert_eq!(
        ok(&mut c, Request::Nop(payload.clone())),
        Response::Nop(payload)
    );
    assert_eq!(
        ok(&mut c, Request::Nop(Vec::new())),
        Response::Nop(Vec::new())
    );

    let digest = crypto::sm3_digest(b"batch root");
    let Response::Sign(sig) = ok(&mut c, Request::Sign { digest }) else {
        panic!("sign")
    };
    crypto::sm2_verify(&info.sm2_public_key, &digest, &sig).expect("signature verifies");
    // SetFaults is refused without --allow-fault-injection.
    assert_eq!(
        refused(&mut c, Request::SetFaults(FaultConfig::default())),
        Status::Forbidden
    );
}

#[test]
fn requisition_return_inventory() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    let a = seller_a();
    let s1 = requisition(&mut c, &a, 600, 0, 1);
    assert_eq!(
        s1,
        Segment {
            code: CODE_A,
            first: 1,
            count: 600
        }
    );
    // Idempotent: the same (holder, request id) gets the same segment.
    assert_eq!(requisition(&mut c, &a, 600, 0, 1), s1);
    // Carving continues in order; a grant's tail may be shorter than asked.
    let s2 = requisition(&mut c, &a, 600, 1, 1);
    assert_eq!(
        s2,
        Segment {
            code: CODE_A,
            first: 601,
            count: 400
        }
    );
    let s3 = requisition(&mut c, &a, 60, 1, 2);
    assert_eq!(
        s3,
        Segment {
            code: CODE_A2,
            first: 5000,
            count: 60
        }
    );
    // Unknown taxpayer, bad count, request id reused for another taxpayer.
    let stranger = taxpayer("91440000300000000");
    assert_eq!(
        refused(
            &mut c,
            Request::Requisition {
                taxpayer: tp(&stranger),
                count: 1,
                holder: hsm_driver::proto::Holder::new(0, 0),
                request_id: 9
            }
        ),
        Status::UnknownTaxpayer
    );
    assert_eq!(
        refused(
            &mut c,
            Request::Requisition {
                taxpayer: tp(&a),
                count: 0,
                holder: hsm_driver::proto::Holder::new(0, 0),
                request_id: 9
            }
        ),
        Status::Malformed
    );
    assert_eq!(
        refused(
            &mut c,
            Request::Requisition {
                taxpayer: tp(&seller_b()),
                count: 1,
                holder: hsm_driver::proto::Holder::new(0, 0),
                request_id: 1
            }
        ),
        Status::RequestIdConflict
    );
    // Exhaust A.
    let s4 = requisition(&mut c, &a, 1000, 2, 1);
    assert_eq!(s4.count, 40);
    assert_eq!(
        refused(
            &mut c,
            Request::Requisition {
                taxpayer: tp(&a),
                count: 1,
                holder: hsm_driver::proto::Holder::new(0, 2),
                request_id: 2
            }
        ),
        Status::InventoryExhausted
    );

    // Another holder (another appliance's shard 0) cannot return s1's numbers.
    assert_eq!(
        refused(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: CODE_A,
                    first: 501,
                    count: 100,
                },
                holder: hsm_driver::proto::Holder::new(1, 0),
            }
        ),
        Status::SegmentNotHeld
    );
    // Return the tail of s1; returning it again is an idempotent no-op; overlapping or
    // ungranted ranges are refused.
    let tail = Segment {
        code: CODE_A,
        first: 501,
        count: 100,
    };
    assert_eq!(
        ok(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: tail,
                holder: hsm_driver::proto::Holder::new(0, 0),
            }
        ),
        Response::ReturnSegment
    );
    assert_eq!(
        ok(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: tail,
                holder: hsm_driver::proto::Holder::new(0, 0),
            }
        ),
        Response::ReturnSegment
    );
    assert_eq!(
        refused(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: CODE_A,
                    first: 550,
                    count: 10
                },
                holder: hsm_driver::proto::Holder::new(0, 0),
            }
        ),
        Status::SegmentNotHeld
    );
    assert_eq!(
        refused(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: CODE_B,
                    first: 1,
                    count: 1
                },
                holder: hsm_driver::proto::Holder::new(0, 0),
            }
        ),
        Status::SegmentNotHeld
    );

    let Response::Inventory(inv) = ok(&mut c, Request::Inventory(InventoryScope::Taxpayer(tp(&a))))
    else {
        panic!("inventory")
    };
    assert_eq!(inv.len(), 1);
    let held: Vec<(Segment, u32, u64)> = inv[0]
        .segments
        .iter()
        .map(|h| (h.segment, h.holder.shard, h.request_id))
        .collect();
    assert_eq!(
        held,
        vec![
            (
                Segment {
                    code: CODE_A,
                    first: 1,
                    count: 500
                },
                0,
                1
            ),
            (s2, 1, 1),
            (s3, 1, 2),
            (s4, 2, 1),
        ]
    );
    assert_eq!(inv[0].remaining, 0);
    let Response::Inventory(all) = ok(&mut c, Request::Inventory(InventoryScope::All)) else {
        panic!("inventory")
    };
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].remaining, 50);
    assert!(all[1].segments.is_empty());
}

#[test]
fn tax_codes_statuses_and_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let emu = start(&dir, &[]);
    let mut c = emu.client();
    let a = seller_a();
    let seg = requisition(&mut c, &a, 100, 0, 1);
    ok(
        &mut c,
        Request::ReturnSegment {
            taxpayer: tp(&a),
            segment: Segment {
                code: CODE_A,
                first: 91,
                count: 10,
            },
            holder: hsm_driver::proto::Holder::new(0, 0),
        },
    );
    let good = invoice(&a, CODE_A, seg.first, false, 1);
    let red = invoice(&a, CODE_A, seg.first + 1, true, 2);
    let mut bad_magic = invoice(&a, CODE_A, 3, false, 3);
    bad_magic[0] = b'X';
    let truncated = invoice(&a, CODE_A, 4, false, 4)[..100].to_vec();
    let not_granted = invoice(&a, CODE_A, 500, false, 5);
    let returned = invoice(&a, CODE_A, 95, false, 6);
    let wrong_code = invoice(&a, CODE_B, 5, false, 7);
    let stranger = invoice(&taxpayer("91440000300000000"), CODE_A, 5, false, 8);
    let items = tax_codes(
        &mut c,
        &[
            good.clone(),
            red.clone(),
            bad_magic,
            truncated,
            not_granted,
            returned,
            wrong_code,
            stranger,
        ],
    );
    let statuses: Vec<_> = items.iter().map(|i| i.status().unwrap()).collect();
    assert_eq!(
        statuses,
        vec![
            TaxCodeStatus::Ok,
            TaxCodeStatus::Ok,
            TaxCodeStatus::MalformedInvoice,
            TaxCodeStatus::MalformedInvoice,
            TaxCodeStatus::NumberNotGranted,
            TaxCodeStatus::NumberNotGranted,
            TaxCodeStatus::NumberNotGranted,
            TaxCodeStatus::UnknownTaxpayer,
        ]
    );
    // The codes are HMAC-SM3 under the device key (read from the software key file).
    let keys = SoftwareBackend::new(&dir).open().unwrap();
    let key = TaxCodeKey::hmac_sm3(keys.tax_key());
    assert_eq!(items[0].tax_code, crypto::tax_code(&key, &good));
    assert_eq!(items[0].check_code, crypto::check_code(&items[0].tax_code));
    assert_eq!(items[1].tax_code, crypto::tax_code(&key, &red));
    assert_eq!(items[2].tax_code, [0; 32]);
    // Same invoice, same code (deterministic MAC).
    assert_eq!(
        tax_codes(&mut c, std::slice::from_ref(&good))[0].tax_code,
        items[0].tax_code
    );
    // An empty batch is fine.
    assert!(tax_codes(&mut c, &[]).is_empty());

    let Response::Inventory(inv) = ok(&mut c, Request::Inventory(InventoryScope::Taxpayer(tp(&a))))
    else {
        panic!()
    };
    assert_eq!(inv[0].issued, 3);
}

#[test]
fn upload_statuses_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    let a = seller_a();
    requisition(&mut c, &a, 100, 0, 1);
    let inv1 = invoice(&a, CODE_A, 1, false, 1);
    let inv2 = invoice(&a, CODE_A, 2, false, 2);
    let red3 = invoice(&a, CODE_A, 3, true, 3);
    let items = tax_codes(&mut c, &[inv1.clone(), inv2.clone(), red3.clone()]);
    let (k1, k2, k3) = (items[0].tax_code, items[1].tax_code, items[2].tax_code);
    let other_bytes_same_number = invoice(&a, CODE_A, 1, false, 99);
    let other_code = tax_codes(&mut c, std::slice::from_ref(&other_bytes_same_number))[0].tax_code;
    let mut forged = k2;
    forged[0] ^= 1;
    let not_granted = invoice(&a, CODE_A, 700, false, 4);
    let mut malformed = inv1.clone();
    malformed.truncate(50);
    let statuses = upload(
        &mut c,
        &[
            (inv1.clone(), k1),
            (inv1.clone(), k1),
            (inv2.clone(), forged),
            (not_granted, [0; 32]),
            (other_bytes_same_number.clone(), other_code),
            (malformed, k1),
            (red3.clone(), k3),
        ],
    );
    assert_eq!(
        statuses,
        vec![
            UploadStatus::Accepted,
            UploadStatus::Duplicate,
            UploadStatus::Forged,
            UploadStatus::NotGranted,
            UploadStatus::Conflict,
            UploadStatus::Malformed,
            UploadStatus::Accepted,
        ]
    );
    assert_eq!(
        upload(&mut c, &[(inv2.clone(), k2)]),
        vec![UploadStatus::Accepted]
    );
    // A range holding uploaded invoices cannot be returned.
    assert_eq!(
        refused(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: CODE_A,
                    first: 2,
                    count: 5
                },
                holder: hsm_driver::proto::Holder::new(0, 0),
            }
        ),
        Status::SegmentNotHeld
    );

    let Response::ReportAndClear(r) = ok(
        &mut c,
        Request::ReportAndClear {
            taxpayer: tp(&a),
            period_end_ms: 1_000,
        },
    ) else {
        panic!()
    };
    assert_eq!(r.taxpayer, tp(&a));
    assert_eq!((r.period_start_ms, r.period_end_ms), (0, 1_000));
    assert_eq!(r.uploaded_count, 3);
    // 2 blue of 10,000 + 1,300 tax, one red of -10,000 - 1,300.
    assert_eq!(
        (r.amount_fen, r.tax_fen, r.total_fen),
        (10_000, 1_300, 11_300)
    );
    assert_eq!((r.blue_count, r.red_count), (3, 1));
    let Response::ReportAndClear(r2) = ok(
        &mut c,
        Request::ReportAndClear {
            taxpayer: tp(&a),
            period_end_ms: 2_000,
        },
    ) else {
        panic!()
    };
    assert_eq!(
        (
            r2.period_start_ms,
            r2.uploaded_count,
            r2.blue_count,
            r2.total_fen
        ),
        (1_000, 0, 0, 0)
    );
    assert_eq!(
        refused(
            &mut c,
            Request::ReportAndClear {
                taxpayer: tp(&a),
                period_end_ms: 10
            }
        ),
        Status::Malformed
    );
    assert_eq!(
        refused(
            &mut c,
            Request::ReportAndClear {
                taxpayer: tp(&taxpayer("91440000300000000")),
                period_end_ms: 3_000
            }
        ),
        Status::UnknownTaxpayer
    );
    let Response::Inventory(inv) = ok(&mut c, Request::Inventory(InventoryScope::Taxpayer(tp(&a))))
    else {
        panic!()
    };
    assert_eq!(inv[0].uploaded, 3);
}

#[test]
fn malformed_frames_get_typed_errors() {
    use hsm_driver::proto::{encode_frame, EncodeError, Opcode};
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut raw = Raw::connect(emu.addr);
    // Unknown opcode.
    let mut out = Vec::new();
    encode_frame(&mut out, 0x55, 0, 1, |_| Ok::<(), EncodeError>(())).unwrap();
    // Requisition with a short body.
    encode_frame(&mut out, Opcode::Requisition.request_byte(), 0, 2, |o| {
        o.extend_from_slice(&[1, 2, 3]);
        Ok::<(), EncodeError>(())
    })
    .unwrap();
    raw.send_bytes(&out).unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let (_, status, id, _) = raw.recv().unwrap();
        got.push((id, status));
    }
    got.sort_unstable();
    assert_eq!(
        got,
        vec![
            (1, Status::UnknownCommand as u16),
            (2, Status::Malformed as u16)
        ]
    );
    // The connection survives typed errors.
    raw.send(3, &Request::Nop(vec![1]));
    let (id, r) = raw.recv_response(Opcode::Nop).unwrap();
    assert_eq!((id, r), (3, Ok(Response::Nop(vec![1]))));
}

#[test]
fn config_file_only() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let conf = tmp.path().join("emu.toml");
    std::fs::write(
        &conf,
        format!(
            r#"
data_dir = "{}"
listen = "127.0.0.1:0"
threads = 3
device_id = "EMU-CONF-1"

[key_backend]
kind = "software"

[[taxpayer]]
id = "{}"
invoice_code = {CODE_B}
first = 10
count = 20

[faults]
latency_us = 1000
"#,
            data.display(),
            seller_b()
        ),
    )
    .unwrap();
    let conf_s = conf.to_string_lossy().into_owned();
    let emu = Emu::try_start_exact(&data, &["--config", &conf_s], &[]).expect("starts");
    let mut c = emu.client();
    let Response::DeviceInfo(info) = ok(&mut c, Request::DeviceInfo) else {
        panic!()
    };
    assert_eq!(info.device_id, "EMU-CONF-1");
    assert_eq!(info.taxpayers, vec![tp(&seller_b())]);
    assert_eq!(
        requisition(&mut c, &seller_b(), 100, 0, 1),
        Segment {
            code: CODE_B,
            first: 10,
            count: 20
        }
    );
    // Bad config values stop start-up with a message.
    std::fs::write(&conf, "data_dir = \"/tmp/x\"\nthreads = 0\n").unwrap();
    let err = Emu::try_start_exact(&data, &["--config", &conf_s], &[])
        .err()
        .expect("refused");
    assert!(err.contains("threads"), "{err}");
    std::fs::write(&conf, "no_such_key = 1\n").unwrap();
    let err = Emu::try_start_exact(&data, &["--config", &conf_s], &[])
        .err()
        .expect("refused");
    assert!(err.contains("no_such_key"), "{err}");
}
