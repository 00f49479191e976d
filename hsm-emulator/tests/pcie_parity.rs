//! Parity: the same command sequence over TCP and over PCIe gives identical answers.
//!
//! Two emulator processes start from copies of one data dir (same device keys, same
//! grants); one is driven over TCP, the other over PCIe, through `HsmClient` and a
//! `Route` each, so the transport switch the appliance uses is what is tested.

mod emulator_support;
mod pcie_support;

use std::path::Path;

use emulator_support::{invoice, seller_a, seller_b, tp, Emu};
use hsm_driver::proto::{
    FaultConfig, InventoryScope, InvoiceBatch, Request, Response, Segment, Status, UploadBatch,
};
use hsm_driver::route::{HsmClient, HsmClientConfig, Route};
use hsm_driver::tcp::{HsmError, TcpClientConfig};
use hsm_emulator::crypto::Sm2Verifier;

const CODE: u64 = 144_031_900_111;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "lock" {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// What a step yielded, transport-independent: the answer, or the device's status.
/// Signatures are randomised (SM2), so a Sign answer is replaced by whether it verifies.
#[derive(Debug, PartialEq)]
enum Seen {
    Answer(Response),
    SignatureVerifies(bool),
    Device(Status),
}

async fn call(client: &HsmClient, request: &Request) -> Result<Response, Status> {
    match client.call(request).await {
        Ok(r) => Ok(r),
        Err(HsmError::Device { status, .. }) => Err(status),
        Err(e) => panic!(
            "{} transport failed on {:?}: {e}",
            client.transport(),
            request.opcode()
        ),
    }
}

fn seen(r: Result<Response, Status>) -> Seen {
    match r {
        Ok(r) => Seen::Answer(r),
        Err(s) => Seen::Device(s),
    }
}

/// The whole command set, including refusals, a 1 MiB Nop and a 4,096-invoice batch.
async fn sequence(client: HsmClient) -> Vec<Seen> {
    let a = seller_a();
    let b = seller_b();
    let mut out = Vec::new();
    let info = call(&client, &Request::DeviceInfo)
        .await
        .expect("device info");
    let public_key = match &info {
        Response::DeviceInfo(i) => i.sm2_public_key,
        other => panic!("unexpected {other:?}"),
    };
    out.push(Seen::Answer(info));
    let req = Request::Requisition {
        taxpayer: tp(&a),
        count: 100,
        holder: hsm_driver::proto::Holder::new(0, 0),
        request_id: 1,
    };
    let seg_a = match call(&client, &req).await.expect("requisition") {
        Response::Requisition(s) => s,
        other => panic!("unexpected {other:?}"),
    };
    out.push(Seen::Answer(Response::Requisition(seg_a)));
    out.push(seen(call(&client, &req).await)); // retry: same segment
    out.push(seen(
        call(
            &client,
            &Request::Requisition {
                taxpayer: tp(&emulator_support::taxpayer("91440000300000000")),
                count: 5,
                holder: hsm_driver::proto::Holder::new(0, 0),
                request_id: 2,
            },
        )
        .await,
    ));
    // TaxCodes with good and bad items.
    let invoices: Vec<Vec<u8>> = (0..50u32)
        .map(|i| invoice(&a, seg_a.code, seg_a.first + i, false, i as u8))
        .collect();
    let mut batch = InvoiceBatch::new();
    for inv in &invoices {
        batch.push(inv).expect("fits");
    }
    batch
        .push(&invoice(&a, seg_a.code, seg_a.first + 5000, false, 1))
        .expect("fits");
    batch.push(b"not an invoice").expect("fits");
    batch
        .push(&invoice(
            &emulator_support::taxpayer("91440000300000000"),
            CODE,
            1,
            false,
            1,
        ))
        .expect("fits");
    let codes = call(&client, &Request::TaxCodes(batch))
        .await
        .expect("tax codes");
    let items = match &codes {
        Response::TaxCodes(items) => items.clone(),
        other => panic!("unexpected {other:?}"),
    };
    out.push(Seen::Answer(codes));
    // Uploads: accepted, then duplicates, then a forged code.
    let mut up = UploadBatch::new();
    for (inv, item) in invoices.iter().zip(&items).take(10) {
        up.push(inv, &item.tax_code).expect("fits");
    }
    out.push(seen(call(&client, &Request::Upload(up.clone())).await));
    out.push(seen(call(&client, &Request::Upload(up)).await));
    let mut forged = UploadBatch::new();
    forged.push(&invoices[11], &[7u8; 32]).expect("fits");
    out.push(seen(call(&client, &Request::Upload(forged)).await));
    // Sign.
    let digest = [0x42u8; 32];
    match call(&client, &Request::Sign { digest })
        .await
        .expect("sign")
    {
        Response::Sign(sig) => {
            let v = Sm2Verifier::from_public_key(&public_key).expect("key");
            out.push(Seen::SignatureVerifies(v.verify(&digest, &sig).is_ok()));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Report, returns (ok, retry ok, not held), inventories.
    out.push(seen(
        call(
            &client,
            &Request::ReportAndClear {
                taxpayer: tp(&a),
                period_end_ms: 1_800_000_000_000,
            },
        )
        .await,
    ));
    let tail = Segment {
        code: seg_a.code,
        first: seg_a.first + 60,
        count: 40,
    };
    let ret = Request::ReturnSegment {
        taxpayer: tp(&a),
        segment: tail,
        holder: hsm_driver::proto::Holder::default(),
    };
    out.push(seen(call(&client, &ret).await));
    out.push(seen(call(&client, &ret).await));
    out.push(seen(
        call(
            &client,
            &Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: seg_a.code,
                    first: seg_a.first + 500,
                    count: 1,
                },
                holder: hsm_driver::proto::Holder::default(),
            },
        )
        .await,
    ));
    out.push(seen(
        call(&client, &Request::Inventory(InventoryScope::All)).await,
    ));
    out.push(seen(
        call(
            &client,
            &Request::Inventory(InventoryScope::Taxpayer(tp(&a))),
        )
        .await,
    ));
    // Transport-sized payloads.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    out.push(seen(call(&client, &Request::Nop(big)).await));
    out.push(seen(call(&client, &Request::Nop(Vec::new())).await));
    out.push(seen(
        call(&client, &Request::SetFaults(FaultConfig::default())).await,
    ));
    // The largest batch the device takes: 4,096 invoices, ~1 MB of request.
    let seg_b = match call(
        &client,
        &Request::Requisition {
            taxpayer: tp(&b),
            count: 4096,
            holder: hsm_driver::proto::Holder::new(0, 1),
            request_id: 9,
        },
    )
    .await
    .expect("requisition b")
    {
        Response::Requisition(s) => s,
        other => panic!("unexpected {other:?}"),
    };
    let mut batch = InvoiceBatch::new();
    batch.set_holder(hsm_driver::proto::Holder::new(0, 1));
    for i in 0..4096u32 {
        batch
            .push(&invoice(
                &b,
                seg_b.code,
                seg_b.first + i,
                i % 7 == 0,
                (i % 251) as u8,
            ))
            .expect("fits");
    }
    out.push(seen(call(&client, &Request::TaxCodes(batch)).await));
    client.close();
    out
}

#[test]
fn same_sequence_same_answers_over_tcp_and_pcie() {
    let root = tempfile::tempdir().expect("tmp");
    let dir_tcp = root.path().join("tcp");
    let dir_pcie = root.path().join("pcie");
    let grants = [
        "--taxpayer".to_string(),
        format!("{}:{CODE}:1:100000", seller_a()),
        "--taxpayer".to_string(),
        format!("{}:{}:1:100000", seller_b(), CODE + 1),
    ];
    let grant_args: Vec<&str> = grants.iter().map(String::as_str).collect();
    // Initialise one device (keys, grants), then clone its data dir.
    Emu::start(&dir_tcp, &grant_args).kill();
    copy_dir(&dir_tcp, &dir_pcie);

    let regions = pcie_support::region_dir();
    let region = pcie_support::region_in(&regions);
    let region_arg = region.to_string_lossy().into_owned();
    let emu_tcp = Emu::start(&dir_tcp, &grant_args);
    let mut pcie_args = grant_args.clone();
    pcie_args.extend_from_slice(&["--pcie", &region_arg, "--pcie-queues", "2"]);
    let _emu_pcie = Emu::start(&dir_pcie, &pcie_args);

    let tcp_route = Route::tcp(emu_tcp.addr);
    let pcie_route: Route = format!("pcie:{region_arg}").parse().expect("route");
    assert_eq!(pcie_route.transport(), "pcie");
    let config = HsmClientConfig::from(TcpClientConfig {
        call_timeout: std::time::Duration::from_secs(30),
        ..TcpClientConfig::default()
    });
    let over_tcp = pcie_support::run(move || async move {
        let c = HsmClient::connect(&tcp_route, config).await.expect("tcp");
        assert_eq!(c.transport(), "tcp");
        sequence(c).await
    });
    let over_pcie = pcie_support::run(move || async move {
        let c = HsmClient::connect(&pcie_route, config).await.expect("pcie");
        assert_eq!(c.transport(), "pcie");
        sequence(c).await
    });
    assert_eq!(over_tcp.len(), over_pcie.len());
    for (i, (t, p)) in over_tcp.iter().zip(&over_pcie).enumerate() {
        assert_eq!(t, p, "step {i} differs between TCP and PCIe");
    }
    // The sequence did exercise refusals and the signature.
    assert!(over_pcie.contains(&Seen::Device(Status::UnknownTaxpayer)));
    assert!(over_pcie.contains(&Seen::Device(Status::SegmentNotHeld)));
    assert!(over_pcie.contains(&Seen::Device(Status::Forbidden)));
    assert!(over_pcie.contains(&Seen::SignatureVerifies(true)));
}
