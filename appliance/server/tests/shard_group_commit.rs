//! The shard's committer under tiny ticks: one request per tick, many ticks queued behind
//! the disk, so the committer makes several ticks durable per write (one commit).
//! Every order is sent twice in a row, so a replay is answered from a record written by
//! an earlier tick, usually of the same group; then the shard restarts on its journal and
//! answers every order again, identically, from the recovered commits.
//!
//! Against a real tax-server emulator process and real journal files. How many ticks
//! share a write depends on timing, so it is printed, not asserted.

mod shard_support;

use appliance_core::Invoice;
use appliance_server::shard::{IssueResult, ShardConfig, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use shard_support::{fresh_dir, shard_config, start_emulator};
use std::collections::HashSet;
use std::path::Path;

const ORDERS: u64 = 300;

/// One request per tick: the smallest ticks, the most of them per fdatasync.
fn config(journal: &Path, hsm: std::net::SocketAddr) -> ShardConfig {
    shard_config(journal, hsm, 1, TcpClientConfig::default())
}

/// Submits every order twice in a row, each as its own batch (so its own tick), all
/// before waiting for any answer; returns the answers in submission order.
fn issue_twice_each(shard: &ShardHandle) -> Vec<IssueResult> {
    let receivers: Vec<_> = (0..ORDERS)
        .flat_map(|n| [n, n])
        .map(|n| {
            shard
                .submit(vec![ticket_request(seller(0), "GC", n)])
                .expect("queued")
        })
        .collect();
    receivers
        .into_iter()
        .map(|rx| {
            let mut results = rx.recv().expect("answered");
            assert_eq!(results.len(), 1);
            results.pop().unwrap()
        })
        .collect()
}

fn invoice(result: &IssueResult) -> (&Invoice, bool) {
    match result {
        Ok(issued) => (&issued.invoice, issued.replayed),
        Err(e) => panic!("request failed: {e}"),
    }
}

#[test]
fn queued_ticks_share_commits_and_replays_and_recovery_see_them() {
    let emulator_dir = fresh_dir("gc-emulator");
    let journal_dir = fresh_dir("gc-journal");
    let emulator = start_emulator(&emulator_dir);

    let shard = ShardHandle::spawn(config(&journal_dir, emulator.addr())).unwrap();
    let results = issue_twice_each(&shard);
    let mut first: Vec<Invoice> = Vec::new();
    for (i, pair) in results.chunks(2).enumerate() {
        let (issued, replayed) = invoice(&pair[0]);
        assert!(!replayed, "order {i}: the first request issues");
        let (again, replayed) = invoice(&pair[1]);
        assert!(replayed, "order {i}: the second request is a replay");
        assert_eq!(again, issued, "order {i}: the replay is the same invoice");
        first.push(issued.clone());
    }
    let numbers: HashSet<_> = first.iter().map(Invoice::identity).collect();
    assert_eq!(numbers.len(), first.len(), "no number twice");
    let metrics = shard.metrics().unwrap();
    assert_eq!(metrics.issued_invoices, ORDERS);
    assert_eq!(metrics.replayed_invoices, ORDERS);
    // Every issuing tick is one commit; control-record commits may add a few.
    assert!(metrics.journal_ticks >= ORDERS, "{metrics:?}");
    assert!(
        metrics.journal_writes >= 1 && metrics.journal_writes <= metrics.journal_ticks,
        "{metrics:?}"
    );
    eprintln!(
        "{} commits in {} writes",
        metrics.journal_ticks, metrics.journal_writes
    );
    shard.shutdown().unwrap();

    // Recovery reads the grouped commits back one by one: every order is a replay.
    let shard = ShardHandle::spawn(config(&journal_dir, emulator.addr())).unwrap();
    let results = issue_twice_each(&shard);
    for (i, result) in results.iter().enumerate() {
        let (again, replayed) = invoice(result);
        assert!(replayed, "request {i} after restart is a replay");
        assert_eq!(again, &first[i / 2], "request {i} after restart");
    }
    shard.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&journal_dir);
    let _ = std::fs::remove_dir_all(&emulator_dir);
}
