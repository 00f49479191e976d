//! Persistence across SIGKILL restarts of a real `hsm-emu`: a number is never granted
//! twice, every answered grant survives, retried requisitions are idempotent, uploads
//! and keys are remembered, and two emulators cannot share a data dir.

mod emulator_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use emulator_support::*;
use hsm_driver::proto::{InventoryScope, Request, Response, Segment, UploadStatus};
use hsm_driver::tcp::HsmError;

const CODE: u64 = 144_031_900_111;
const ROUNDS: u64 = 4;
const WORKERS: u32 = 3;

fn grant() -> String {
    format!("{}:{CODE}:1:5000000", seller_a())
}

/// Requisitions from several holders while the process is killed with SIGKILL between
/// (and during) requisitions; after each restart every holder first retries the request
/// whose answer it may have lost.
#[test]
fn sigkill_mid_load_never_grants_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let g = grant();
    let answered: Arc<Mutex<Vec<(u32, u64, Segment)>>> = Arc::default();
    // Next request id per holder; an id is advanced only once it was answered.
    let next_id: Arc<Vec<AtomicU64>> = Arc::new((0..WORKERS).map(|_| AtomicU64::new(1)).collect());
    for round in 0..ROUNDS {
        let emu = Emu::start(&dir, &["--taxpayer", &g]);
        let addr = emu.addr;
        let count = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..WORKERS)
            .map(|holder| {
                let answered = Arc::clone(&answered);
                let next_id = Arc::clone(&next_id);
                let count = Arc::clone(&count);
                thread::spawn(move || {
                    let mut c = client(addr);
                    loop {
                        let id = next_id[holder as usize].load(Ordering::SeqCst);
                        let req = Request::Requisition {
                            taxpayer: tp(&seller_a()),
                            count: 97 + holder,
                            holder: hsm_driver::proto::Holder::new(0, holder),
                            request_id: id,
                        };
                        match c.call(&req) {
                            Ok(Response::Requisition(seg)) => {
                                answered.lock().unwrap().push((holder, id, seg));
                                next_id[holder as usize].fetch_add(1, Ordering::SeqCst);
                                count.fetch_add(1, Ordering::SeqCst);
                            }
                            // The process was killed: stop; the same id is retried after
                            // the restart.
                            Err(HsmError::ConnectionLost | HsmError::Refused | HsmError::Io(_)) => {
                                return
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                })
            })
            .collect();
        // Kill at a different load point each round; never a timed wait.
        let target = 20 + round * 37;
        // Bounded by the workers: if they all stopped (the emulator died on its own),
        // stop waiting and let the assertion below fail instead of hanging.
        while count.load(Ordering::SeqCst) < target && !workers.iter().all(|w| w.is_finished()) {
            thread::yield_now();
        }
        assert!(
            count.load(Ordering::SeqCst) >= target,
            "emulator stopped answering"
        );
        emu.kill();
        for w in workers {
            w.join().unwrap();
        }
    }

    // After the last restart: retry each holder's possibly-lost request, then check.
    let emu = Emu::start(&dir, &["--taxpayer", &g]);
    let mut c = emu.client();
    let all = answered.lock().unwrap().clone();
    assert!(all.len() as u64 >= (0..ROUNDS).map(|r| 20 + r * 37).sum::<u64>());
    // Replays of answered requests give the same segment (idempotent across restarts).
    for &(holder, id, seg) in all.iter().step_by(7) {
        assert_eq!(
            requisition(&mut c, &seller_a(), 97 + holder, holder, id),
            seg
        );
    }
    // No number granted twice.
    let mut segs: Vec<Segment> = all.iter().map(|x| x.2).collect();
    segs.sort_by_key(|s| (s.code, s.first));
    for w in segs.windows(2) {
        assert!(
            u64::from(w[0].first) + u64::from(w[0].count) <= u64::from(w[1].first),
            "overlap {:?} {:?}",
            w[0],
            w[1]
        );
    }
    // Every answered grant is in the device's inventory with its holder and request id
    // (it was durable before the answer).
    let Response::Inventory(inv) = ok(&mut c, Request::Inventory(InventoryScope::All)) else {
        panic!()
    };
    let held: std::collections::HashSet<(Segment, u32, u64)> = inv[0]
        .segments
        .iter()
        .map(|h| (h.segment, h.holder.shard, h.request_id))
        .collect();
    for &(holder, id, seg) in &all {
        assert!(held.contains(&(seg, holder, id)), "lost grant {seg:?}");
    }
    // The inventory accounts for every number: held + remaining = granted.
    let held_numbers: u64 = inv[0]
        .segments
        .iter()
        .map(|h| u64::from(h.segment.count))
        .sum();
    assert_eq!(held_numbers + inv[0].remaining, 5_000_000);
    // A new requisition continues after everything granted so far.
    let fresh = requisition(&mut c, &seller_a(), 10, 99, 1);
    let max_end = inv[0]
        .segments
        .iter()
        .map(|h| h.segment.first + h.segment.count)
        .max()
        .unwrap();
    assert_eq!(fresh.first, max_end);
}

#[test]
fn uploads_keys_and_returns_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let g = grant();
    let a = seller_a();
    let inv1 = invoice(&a, CODE, 1, false, 1);
    let inv1_other = invoice(&a, CODE, 1, false, 2);
    let (code1, code1_other, public_key) = {
        let emu = Emu::start(&dir, &["--taxpayer", &g]);
        let mut c = emu.client();
        requisition(&mut c, &a, 100, 0, 1);
        ok(
            &mut c,
            Request::ReturnSegment {
                taxpayer: tp(&a),
                segment: Segment {
                    code: CODE,
                    first: 51,
                    count: 50,
                },
                holder: hsm_driver::proto::Holder::default(),
            },
        );
        let items = tax_codes(&mut c, &[inv1.clone(), inv1_other.clone()]);
        assert_eq!(
            upload(&mut c, &[(inv1.clone(), items[0].tax_code)]),
            vec![UploadStatus::Accepted]
        );
        let Response::DeviceInfo(info) = ok(&mut c, Request::DeviceInfo) else {
            panic!()
        };
        emu.kill();
        (items[0].tax_code, items[1].tax_code, info.sm2_public_key)
    };
    let emu = Emu::start(&dir, &["--taxpayer", &g]);
    let mut c = emu.client();
    let Response::DeviceInfo(info) = ok(&mut c, Request::DeviceInfo) else {
        panic!()
    };
    assert_eq!(info.sm2_public_key, public_key, "same keys after restart");
    assert_eq!(
        tax_codes(&mut c, std::slice::from_ref(&inv1))[0].tax_code,
        code1
    );
    assert_eq!(
        upload(&mut c, &[(inv1.clone(), code1), (inv1_other, code1_other)]),
        vec![UploadStatus::Duplicate, UploadStatus::Conflict]
    );
    // The returned range stays returned: never re-granted, no tax codes in it.
    let items = tax_codes(&mut c, &[invoice(&a, CODE, 60, false, 0)]);
    assert_eq!(
        items[0].status(),
        Some(hsm_driver::proto::TaxCodeStatus::NumberNotGranted)
    );
    let next = requisition(&mut c, &a, 10, 0, 2);
    assert_eq!(next.first, 101);
    let Response::ReportAndClear(r) = ok(
        &mut c,
        Request::ReportAndClear {
            taxpayer: tp(&a),
            period_end_ms: 5,
        },
    ) else {
        panic!()
    };
    assert_eq!(r.uploaded_count, 1);
    emu.kill();
    // The clear mark survives too.
    let emu = Emu::start(&dir, &["--taxpayer", &g]);
    let mut c = emu.client();
    let Response::ReportAndClear(r) = ok(
        &mut c,
        Request::ReportAndClear {
            taxpayer: tp(&a),
            period_end_ms: 6,
        },
    ) else {
        panic!()
    };
    assert_eq!((r.period_start_ms, r.uploaded_count), (5, 0));
}

#[test]
fn one_emulator_per_data_dir_and_config_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let g = grant();
    let _first = Emu::start(&dir, &["--taxpayer", &g]);
    match Emu::try_start(&dir, &["--taxpayer", &g], &[]) {
        Ok(_) => panic!("second emulator on the same data dir"),
        Err(log) => assert!(log.contains("in use"), "{log}"),
    }
    drop(_first);
    // A grant that contradicts the recorded one is refused at start-up.
    let changed = format!("{}:{CODE}:1:4000000", seller_a());
    match Emu::try_start(&dir, &["--taxpayer", &changed], &[]) {
        Ok(_) => panic!("started with a conflicting grant"),
        Err(log) => assert!(log.contains("conflicts"), "{log}"),
    }
}
