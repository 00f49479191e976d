//! Deterministic simulation of one shard against the real tax-server logic.
//!
//! The sans-IO issuer is driven tick by tick, from a seeded random generator, against the
//! emulator's command handling in-process (`Emulator::execute`, with its persistent data
//! dir), over a simulated disk that keeps exactly the bytes of completed commits. Faults:
//! the process crashes in the middle of a commit (its answers were never released: the
//! write is torn at a random byte, or, as a power loss may leave it, a random subset of its
//! 4 KiB blocks persisted out of order with zeros elsewhere; recovery must drop the whole
//! commit) or between ticks, and restarts from the durable bytes;
//! the tax server fails a whole command (the tick is aborted), before executing it or
//! after (it coded the items, then the answer was lost: a "doomed" tick), refuses a
//! requisition, or restarts from its data dir; a requisition is granted but the crash
//! comes before the reservation reaches the journal (the restarted shard adopts it from
//! the inventory).
//!
//! At the end the tax server itself is the judge: every invoice ever acknowledged is
//! uploaded, together with every invoice the device coded in a doomed tick, and each must
//! be accepted (its tax code verifies under the device key; a different invoice under the
//! same number would be a conflict). Every doomed tick's numbers are journaled as spoiled
//! (unless a crash came before the commit carrying them: that window is the same as for
//! any tick whose command ran before a crash). Numbers of acknowledged invoices are
//! unique, every acknowledged order re-sent after crashes got the same invoice, and the
//! numbers the device granted to the shard are all accounted for.

use appliance_core::journal::frame::{begin_commit, scan, seal_commit, ScanEnd, KIND_PADDING};
use appliance_core::journal::record::{decode_issued, Record};
use appliance_core::journal::replay::recover;
use appliance_core::money::tax_fen;
use appliance_core::{
    canonical, Answer, Invoice, InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, Issuer,
    IssuerConfig, ItemError, LineItem, NumberSegment, TaxRate, TaxpayerConfig, TaxpayerId,
};
use hsm_driver::proto::{
    Holder, InventoryScope, InvoiceBatch, Request, Response, TaxCodeStatus, UploadBatch,
    UploadStatus,
};
use hsm_emulator::{Config, Emulator, Grant};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const SHARD: u32 = 3;
/// The simulated appliance's holder at the device.
const HOLDER: Holder = Holder {
    appliance: 0x51a1_0000_0000_0000_0000_0000_0000_0003,
    shard: SHARD,
};
const STEPS: usize = 400;

fn sellers() -> Vec<TaxpayerId> {
    (0..2u32)
        .map(|i| {
            let first17 = format!("91330000{:09}", 700_000_000 + i);
            TaxpayerId::with_check_char(first17.as_bytes().try_into().unwrap()).unwrap()
        })
        .collect()
}

fn issuer_config() -> IssuerConfig {
    IssuerConfig {
        shard_id: SHARD,
        taxpayers: sellers()
            .into_iter()
            .map(|id| TaxpayerConfig {
                id,
                ceiling_fen: 10_000_000,
                // Small segments so that refills, adoption and exhaustion happen often.
                low_watermark: 10,
                refill_count: 25,
            })
            .collect(),
        retention_ms: u64::MAX / 4,
        index_capacity_orders: 1 << 14,
        tick_requests_max: 64,
    }
}

fn request(seller: TaxpayerId, order: u64) -> IssueRequest {
    let unit_price_fen = 1_000 + (order * 37 % 90_000) as i64;
    let quantity = 1 + (order % 3) as u32;
    let amount = unit_price_fen * i64::from(quantity);
    let rate = TaxRate::from_bp(900).unwrap();
    let tax = tax_fen(amount, rate);
    IssueRequest {
        seller,
        order_id: format!("S{order:08}"),
        buyer_name: format!("旅客{order}"),
        buyer_taxpayer: None,
        lines: vec![LineItem {
            name: format!("铁路客票 D{}", order % 700),
            quantity,
            unit_price_fen,
        }],
        tax_rate: rate,
        issuer_ref: "HZH".into(),
        amount_fen: amount,
        tax_fen: tax,
        total_fen: amount + tax,
        kind: InvoiceKind::Blue,
    }
}

struct World {
    rng: StdRng,
    hsm_dir: PathBuf,
    /// `None` only while the device restarts (its data-dir lock must be released before
    /// it is opened again).
    hsm: Option<Emulator>,
    issuer: Issuer,
    /// Bytes of every completed commit: what the disk holds.
    durable: Vec<u8>,
    /// Where the commit torn by the last crash starts: recovery must cut exactly there.
    torn_from: Option<usize>,
    /// Crashes that persisted a commit's blocks out of order (multi-block commits only).
    out_of_order: u32,
    acked: HashMap<String, Invoice>,
    /// Items the device coded in doomed ticks (canonical bytes, tax code) whose commit
    /// carrying their spoiled numbers is durable.
    doomed: Vec<(Vec<u8>, [u8; 32])>,
    /// Doomed items whose spoiled numbers wait for the next durable commit (a crash
    /// before it loses them).
    doomed_pending: Vec<(Vec<u8>, [u8; 32])>,
    sent_orders: u64,
    now_ms: u64,
    crashes: u32,
    hsm_restarts: u32,
    adopted: u32,
    /// Every number the device coded, with the tax code it gave: the device must never
    /// code one number for two different invoices.
    coded: HashMap<(u64, u32), [u8; 32]>,
    /// Numbers spoiled at restarts because the device had coded them and the journal had
    /// lost them.
    spoiled_coded: u32,
}

fn open_hsm(dir: &Path) -> Emulator {
    let grants = sellers()
        .iter()
        .enumerate()
        .map(|(i, s)| Grant::new(s.as_str(), 330_012_000_001 + i as u64, 1, 5_000_000).unwrap())
        .collect();
    Emulator::open(&Config::new(dir, grants)).expect("emulator opens")
}

fn call(hsm: &Emulator, request: Request) -> Response {
    let mut effects = Default::default();
    hsm.execute(request, &mut effects).expect("device command")
}

impl World {
    fn new(seed: u64, dir: &Path) -> World {
        let hsm_dir = dir.join("hsm");
        let hsm = open_hsm(&hsm_dir);
        let mut world = World {
            rng: StdRng::seed_from_u64(seed),
            hsm_dir,
            hsm: Some(hsm),
            issuer: Issuer::new(issuer_config()).unwrap(),
            durable: Vec::new(),
            torn_from: None,
            out_of_order: 0,
            acked: HashMap::new(),
            doomed: Vec::new(),
            doomed_pending: Vec::new(),
            sent_orders: 0,
            now_ms: 1_790_000_000_000,
            crashes: 0,
            hsm_restarts: 0,
            adopted: 0,
            coded: HashMap::new(),
            spoiled_coded: 0,
        };
        world.restart();
        world
    }

    /// A process restart: recover from the durable bytes, cut a torn tail, adopt
    /// segments the device granted that the journal never recorded, and refill.
    fn restart(&mut self) {
        // Spoiled numbers not yet durable are lost with the process.
        self.doomed_pending.clear();
        let (issuer, end) = recover(issuer_config(), &self.durable, self.now_ms).expect("recovery");
        match end {
            ScanEnd::Clean { end } | ScanEnd::TornTail { end, .. } => {
                // All or nothing: a torn commit is cut at its start, whatever persisted.
                if let Some(start) = self.torn_from.take() {
                    assert_eq!(end, start, "torn commit not cut at its start");
                }
                self.durable.truncate(end)
            }
            ScanEnd::Corrupt { offset, error } => panic!("corrupt journal at {offset}: {error}"),
        }
        self.issuer = issuer;
        let Response::Inventory(inventories) =
            call(self.hsm(), Request::Inventory(InventoryScope::All))
        else {
            panic!("inventory answer");
        };
        for seller in sellers() {
            let inventory = inventories
                .iter()
                .find(|i| &i.taxpayer == seller.as_bytes())
                .unwrap();
            for held in inventory.segments.iter().filter(|h| h.holder == HOLDER) {
                let segment = NumberSegment::new(
                    InvoiceCode::new(held.segment.code).unwrap(),
                    InvoiceNumber::new(held.segment.first).unwrap(),
                    held.segment.count,
                )
                .unwrap();
                if self.issuer.adopt_granted(&seller, segment).unwrap() {
                    self.adopted += 1;
                }
            }
            // As the server does: numbers the device coded that the journal lost (a crash
            // after TaxCodes) are spoiled before anything is issued.
            for held in inventory.segments.iter().filter(|h| h.holder == HOLDER) {
                let code = InvoiceCode::new(held.segment.code).unwrap();
                let (spoiled, left) = self
                    .issuer
                    .spoil_coded(&seller, code, held.coded_end)
                    .unwrap();
                assert_eq!(left, 0, "a tick's numbers fit the control queue");
                self.spoiled_coded += spoiled;
            }
        }
        // Start-up commit of the adoptions, then one tick to trigger refills.
        self.commit_empty();
    }

    fn commit_empty(&mut self) {
        let tick = self.issuer.begin_tick(self.now_ms, Vec::new()).unwrap();
        let refills = tick.refill_requests().to_vec();
        let mut bytes = Vec::new();
        let start = begin_commit(&mut bytes);
        let commit = self.issuer.finish_tick(tick, &[], &mut bytes).unwrap();
        if !commit.seqs.is_empty() {
            seal_commit(
                &mut bytes,
                start,
                4096,
                commit.seqs.start,
                commit.seqs.end - 1,
            )
            .unwrap();
            self.durable.extend_from_slice(&bytes);
            self.doomed.append(&mut self.doomed_pending);
        }
        self.refill(&refills);
    }

    fn refill(&mut self, refills: &[appliance_core::pool::RefillRequest]) {
        for refill in refills {
            if self.rng.random_bool(0.1) {
                self.issuer.refill_failed(&refill.seller).unwrap();
                continue;
            }
            let request_id = self.rng.random();
            let response = call(
                self.hsm(),
                Request::Requisition {
                    taxpayer: *refill.seller.as_bytes(),
                    count: refill.count,
                    holder: HOLDER,
                    request_id,
                },
            );
            let Response::Requisition(s) = response else {
                panic!("requisition answer")
            };
            if self.rng.random_bool(0.05) {
                // Granted, then the process dies before the reservation is journaled.
                self.crash();
                return;
            }
            let segment = NumberSegment::new(
                InvoiceCode::new(s.code).unwrap(),
                InvoiceNumber::new(s.first).unwrap(),
                s.count,
            )
            .unwrap();
            self.issuer.add_segment(&refill.seller, segment).unwrap();
        }
    }

    fn hsm(&self) -> &Emulator {
        self.hsm.as_ref().expect("the device is open between steps")
    }

    fn crash(&mut self) {
        self.crashes += 1;
        self.restart();
    }

    fn pick_requests(&mut self) -> Vec<IssueRequest> {
        let sellers = sellers();
        let n = self.rng.random_range(1..=48);
        (0..n)
            .map(|_| {
                // New orders mostly; some re-sent (acknowledged or lost in a crash).
                let order = if self.sent_orders > 0 && self.rng.random_bool(0.2) {
                    self.rng.random_range(0..self.sent_orders)
                } else {
                    self.sent_orders += 1;
                    self.sent_orders - 1
                };
                request(sellers[(order % 2) as usize], order)
            })
            .collect()
    }

    fn read_issued(&self, seq: u64) -> Invoice {
        let mut found = None;
        scan::<()>(&self.durable, |r| {
            if r.kind != KIND_PADDING && r.seq == seq {
                found = Some(decode_issued(r.body).expect("issued record"));
            }
            Ok(())
        })
        .unwrap();
        found.unwrap_or_else(|| panic!("record {seq} is not durable"))
    }

    fn step(&mut self) {
        self.now_ms += self.rng.random_range(0..50);
        match self.rng.random_range(0..100) {
            0..=3 => self.crash(),
            4..=6 => {
                self.hsm_restarts += 1;
                self.hsm = None;
                self.hsm = Some(open_hsm(&self.hsm_dir));
            }
            _ => self.tick(),
        }
    }

    /// Remembers that the device coded `invoice` (canonical bytes) with `tax_code`; a
    /// number coded before for another invoice fails the run.
    fn note_coded(&mut self, invoice: &[u8], tax_code: [u8; 32]) {
        let h = appliance_core::canonical::decode_header(invoice).unwrap();
        let identity = (h.invoice_code.get(), h.invoice_number.get());
        if let Some(earlier) = self.coded.insert(identity, tax_code) {
            assert_eq!(
                earlier, tax_code,
                "number {identity:?} coded for two different invoices"
            );
        }
    }

    fn tick(&mut self) {
        let requests = self.pick_requests();
        let tick = self
            .issuer
            .begin_tick(self.now_ms, requests.clone())
            .unwrap();
        let refills = tick.refill_requests().to_vec();
        if tick.item_count() > 0 && self.rng.random_bool(0.05) {
            // The whole TaxCodes command failed (timeout, connection lost). The shell
            // cannot tell whether the device ran it; here it did in 3 cases of 5: the
            // device coded every item, then the answer was lost (a doomed tick).
            if self.rng.random_bool(0.6) {
                let items: Vec<Vec<u8>> = tick.canonical_items().map(<[u8]>::to_vec).collect();
                let mut batch = InvoiceBatch::new();
                batch.set_holder(HOLDER);
                for item in &items {
                    batch.push(item).unwrap();
                }
                let Response::TaxCodes(coded) = call(self.hsm(), Request::TaxCodes(batch)) else {
                    panic!("tax codes answer")
                };
                for (item, code) in items.into_iter().zip(coded.iter()) {
                    assert_eq!(code.status(), Some(TaxCodeStatus::Ok));
                    self.note_coded(&item, code.tax_code);
                    self.doomed_pending.push((item, code.tax_code));
                }
            }
            self.issuer.abort_tick(tick).unwrap();
            self.refill(&refills);
            return;
        }
        let codes = if tick.item_count() == 0 {
            Vec::new()
        } else {
            let mut batch = InvoiceBatch::new();
            batch.set_holder(HOLDER);
            for item in tick.canonical_items() {
                batch.push(item).unwrap();
            }
            let Response::TaxCodes(items) = call(self.hsm(), Request::TaxCodes(batch)) else {
                panic!("tax codes answer")
            };
            for (invoice, item) in tick.canonical_items().zip(items.iter()) {
                self.note_coded(invoice, item.tax_code);
            }
            items
                .iter()
                .map(|item| {
                    assert_eq!(
                        item.status(),
                        Some(TaxCodeStatus::Ok),
                        "device refused a number the shard holds"
                    );
                    Ok((item.tax_code, item.check_code))
                })
                .collect()
        };
        let mut bytes = Vec::new();
        let start = begin_commit(&mut bytes);
        let commit = self.issuer.finish_tick(tick, &codes, &mut bytes).unwrap();
        if commit.seqs.is_empty() {
            bytes.clear(); // no empty commits
        } else {
            seal_commit(
                &mut bytes,
                start,
                4096,
                commit.seqs.start,
                commit.seqs.end - 1,
            )
            .unwrap();
        }
        if !bytes.is_empty() && self.rng.random_bool(0.05) {
            self.torn_from = Some(self.durable.len());
            // The first commit of the journal is always torn as a prefix: until a commit
            // header has been seen, recovery must read the stream by the bare rules,
            // under which a lost first block followed by valid records is corruption
            // (docs/journal.md, "Known limits").
            if self.durable.is_empty() || self.rng.random_bool(0.5) {
                // Crash mid-write: a random prefix reaches the disk, nothing is answered.
                let cut = self.rng.random_range(0..bytes.len());
                self.durable.extend_from_slice(&bytes[..cut]);
            } else {
                // Power loss mid-write: a random strict subset of the blocks persisted,
                // in any order; the others read as zeros (the preallocated file).
                let blocks = bytes.len() / 4096;
                self.out_of_order += u32::from(blocks > 1);
                let mut persisted: Vec<bool> =
                    (0..blocks).map(|_| self.rng.random_bool(0.5)).collect();
                if persisted.iter().all(|&p| p) {
                    let lost = self.rng.random_range(0..blocks);
                    persisted[lost] = false;
                }
                for (block, persisted) in bytes.chunks_mut(4096).zip(persisted) {
                    if !persisted {
                        block.fill(0);
                    }
                }
                self.durable.extend_from_slice(&bytes);
            }
            self.crash();
            return;
        }
        self.durable.extend_from_slice(&bytes);
        if !bytes.is_empty() {
            self.doomed.append(&mut self.doomed_pending);
        }
        for (request, answer) in requests.iter().zip(commit.answers) {
            let invoice = match answer {
                Answer::Issued { invoice, .. } => invoice,
                Answer::Replay { seq, identity } => {
                    let invoice = self.read_issued(seq);
                    assert_eq!(invoice.identity(), identity);
                    invoice
                }
                Answer::Rejected(e) => {
                    assert!(
                        matches!(e, appliance_core::IssueError::NoNumbersAvailable),
                        "valid request refused: {e}"
                    );
                    continue;
                }
            };
            assert_eq!(&invoice.request, request);
            if let Some(earlier) = self.acked.get(&request.order_id) {
                assert_eq!(
                    earlier, &invoice,
                    "order {} answered differently",
                    request.order_id
                );
            }
            self.acked.insert(request.order_id.clone(), invoice);
        }
        self.refill(&refills);
    }
}

fn run(seed: u64) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sim-{seed}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut world = World::new(seed, &dir);
    for _ in 0..STEPS {
        world.step();
    }

    // Numbers of acknowledged invoices are unique.
    let mut owners: HashMap<(u64, u32), &str> = HashMap::new();
    for (order, invoice) in &world.acked {
        if let Some(other) = owners.insert((invoice.code.get(), invoice.number.get()), order) {
            panic!(
                "seed {seed}: number {:?} issued to {other} and {order}",
                invoice.identity()
            );
        }
    }
    // Every doomed tick's numbers are journaled as spoiled, for the failed command.
    let mut spoiled: HashMap<(u64, u32), ItemError> = HashMap::new();
    scan::<()>(&world.durable, |r| {
        if r.kind != KIND_PADDING {
            if let Ok(Record::NumberSpoiled {
                identity, reason, ..
            }) = Record::decode(r.kind, r.body)
            {
                spoiled.insert((identity.code.get(), identity.number.get()), reason);
            }
        }
        Ok(())
    })
    .unwrap();
    for (item, _) in &world.doomed {
        let c = canonical::decode(item).unwrap();
        assert_eq!(
            spoiled.get(&(c.code.get(), c.number.get())),
            Some(&ItemError::CommandFailed),
            "seed {seed}: doomed number {:?}/{:?} not journaled as spoiled",
            c.code,
            c.number
        );
    }
    assert!(!world.doomed.is_empty(), "seed {seed}: no doomed tick ran");
    // The device accepts every invoice it coded in a doomed tick and every acknowledged
    // one: tax codes genuine, no number under two different invoices.
    let uploads: Vec<(Vec<u8>, [u8; 32])> = world
        .doomed
        .iter()
        .cloned()
        .chain(
            world
                .acked
                .values()
                .map(|invoice| (canonical::encode(invoice), invoice.tax_control_code)),
        )
        .collect();
    for chunk in uploads.chunks(256) {
        let mut batch = UploadBatch::new();
        for (bytes, tax_code) in chunk {
            batch.push(bytes, tax_code).unwrap();
        }
        let Response::Upload(statuses) = call(world.hsm(), Request::Upload(batch)) else {
            panic!("upload answer")
        };
        for ((bytes, _), status) in chunk.iter().zip(statuses) {
            let c = canonical::decode(bytes).unwrap();
            assert_eq!(
                status,
                UploadStatus::Accepted,
                "seed {seed}: {:?}/{:?} (order {})",
                c.code,
                c.number,
                c.request.order_id
            );
        }
    }
    // Every number the device granted to this shard is accounted for by the issuer.
    let Response::Inventory(inventories) =
        call(world.hsm(), Request::Inventory(InventoryScope::All))
    else {
        panic!("inventory answer")
    };
    for seller in sellers() {
        let granted: u64 = inventories
            .iter()
            .find(|i| &i.taxpayer == seller.as_bytes())
            .unwrap()
            .segments
            .iter()
            .filter(|h| h.holder == HOLDER)
            .map(|h| u64::from(h.segment.count))
            .sum();
        let accounting = world.issuer.accounting(&seller).unwrap();
        assert_eq!(
            accounting.reserved - accounting.returned,
            granted,
            "seed {seed}: granted numbers unaccounted"
        );
    }
    assert!(!world.acked.is_empty());
    eprintln!(
        "seed {seed}: {} invoices acknowledged, {} coded in doomed ticks, {} crashes ({} with multi-block commits persisted out of order), {} tax-server restarts, {} segments adopted, {} coded numbers spoiled at restarts",
        world.acked.len(),
        world.doomed.len(),
        world.crashes,
        world.out_of_order,
        world.hsm_restarts,
        world.adopted,
        world.spoiled_coded
    );
    drop(world);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn simulated_crashes_and_tax_server_faults_keep_every_invariant() {
    let base: u64 = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    for seed in base..base + 6 {
        run(seed);
    }
}
