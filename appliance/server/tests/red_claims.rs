//! Red invoices across shards: every request is homed by its own (seller, order id), a
//! red one too, and a red whose original lives on another shard claims the amount there
//! (a message between shards, durable on the original's shard before the red is
//! answered). Four shards in this process (no QUIC), one tax-server emulator process,
//! real journal files; orders are picked so that the red's key and its original's key
//! have different home shards.
//!
//! Checked: one invoice per (seller, order id) whatever the kind and the order of
//! arrival; a red of a red is `RedOfRed`; the reds of one original, issued on several
//! shards, some of them at once, never exceed it; and all of that still holds after the
//! shards restart on their journals (the claims are replayed).

mod shard_support;

use appliance_core::money::tax_fen;
use appliance_core::{Invoice, InvoiceKind, IssueError, IssueRequest, RedReference};
use appliance_proto::home_shard;
use appliance_server::shard::{stop_all, IssueFailure, IssueResult, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use shard_support::{fresh_dir, shard_config, start_emulator};
use std::path::Path;

const SHARDS: u32 = 4;

fn spawn(journals: &Path, hsm: std::net::SocketAddr) -> Vec<ShardHandle> {
    let configs = (0..SHARDS)
        .map(|i| {
            let mut c = shard_config(
                &journals.join(format!("shard-{i}")),
                hsm,
                64,
                TcpClientConfig::default(),
            );
            c.issuer.shard_id = i;
            c
        })
        .collect();
    ShardHandle::spawn_group(configs, None).expect("shards start")
}

fn home(request: &IssueRequest) -> usize {
    home_shard(request, SHARDS) as usize
}

/// Sends each request to its home shard, all before waiting for any answer; the answers
/// in order.
fn issue_all(shards: &[ShardHandle], requests: &[IssueRequest]) -> Vec<IssueResult> {
    let receivers: Vec<_> = requests
        .iter()
        .map(|r| shards[home(r)].submit(vec![r.clone()]).expect("queued"))
        .collect();
    receivers
        .into_iter()
        .map(|rx| rx.recv().expect("answered").pop().expect("one result"))
        .collect()
}

fn issue(shards: &[ShardHandle], request: &IssueRequest) -> IssueResult {
    issue_all(shards, std::slice::from_ref(request))
        .pop()
        .unwrap()
}

fn blue(order_id: &str) -> IssueRequest {
    let mut r = ticket_request(seller(0), "", 1_234);
    r.order_id = order_id.into();
    r
}

/// A red of `price_fen` (> 0) against `original`, under its own order id.
fn red(original: &Invoice, order_id: &str, price_fen: i64) -> IssueRequest {
    let mut r = original.request.clone();
    r.order_id = order_id.into();
    r.lines.truncate(1);
    r.lines[0].unit_price_fen = -price_fen;
    r.lines[0].quantity = 1;
    r.amount_fen = -price_fen;
    r.tax_fen = tax_fen(-price_fen, r.tax_rate);
    r.total_fen = r.amount_fen + r.tax_fen;
    r.kind = InvoiceKind::Red(RedReference {
        original_code: original.code,
        original_number: original.number,
        original_order_id: original.request.order_id.clone(),
    });
    r
}

fn issued(result: &IssueResult) -> Invoice {
    match result {
        Ok(i) if !i.replayed => i.invoice.clone(),
        other => panic!("expected a new invoice, got {other:?}"),
    }
}

fn refused(result: &IssueResult) -> IssueError {
    match result {
        Err(IssueFailure::Rejected(e)) => e.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// An order id `prefix-n` whose home differs from every home in `not`.
fn order_away_from(prefix: &str, not: &[usize]) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| !not.contains(&home(&blue(id))))
        .unwrap()
}

#[test]
fn one_invoice_per_key_and_reds_claimed_across_shards() {
    let emulator_dir = fresh_dir("red-emulator");
    let journals = fresh_dir("red-journals");
    let emulator = start_emulator(&emulator_dir);
    let shards = spawn(&journals, emulator.addr());

    let original = issued(&issue(&shards, &blue("orig")));
    let s = home(&original.request);
    let amount = original.request.amount_fen;

    // Blue first, then a red under the same key (homed away from the original): the red
    // is refused, never a second invoice.
    let k1 = order_away_from("k1", &[s]);
    let blue1 = issued(&issue(&shards, &blue(&k1)));
    assert_eq!(
        refused(&issue(&shards, &red(&original, &k1, 100))),
        IssueError::IdempotencyConflict
    );

    // Red first, then a blue under the same key, sent together: the red (first) wins.
    let k2 = order_away_from("k2", &[s]);
    let both = issue_all(&shards, &[red(&original, &k2, 100), blue(&k2)]);
    let red2 = issued(&both[0]);
    assert_eq!(refused(&both[1]), IssueError::IdempotencyConflict);
    // The red again is a replay of the same invoice.
    let again = issue(&shards, &red(&original, &k2, 100)).expect("replay");
    assert!(again.replayed);
    assert_eq!(again.invoice, red2);

    // A red of the red, homed away from the red: the red's shard says so.
    let k3 = order_away_from("k3", &[home(&red2.request)]);
    assert_eq!(
        refused(&issue(&shards, &red(&red2, &k3, 1))),
        IssueError::RedOfRed
    );

    // Reds of one original from every shard, six at once, each a quarter of the amount:
    // what is issued never exceeds the original.
    let reds: Vec<IssueRequest> = (0..6)
        .map(|i| {
            red(
                &original,
                &order_away_from(&format!("q{i}"), &[s]),
                amount / 4,
            )
        })
        .collect();
    let results = issue_all(&shards, &reds);
    let mut red_total = red2.request.total_fen.abs();
    for result in &results {
        match result {
            Ok(i) => red_total += issued(&Ok(i.clone())).request.total_fen.abs(),
            Err(_) => assert!(matches!(
                refused(result),
                IssueError::RedExceedsOriginal { .. }
            )),
        }
    }
    assert!(red_total <= original.request.total_fen, "{red_total}");
    assert!(results.iter().any(Result::is_ok) && results.iter().any(Result::is_err));
    let remaining = original.request.total_fen - red_total;

    stop_all(&mut { shards });
    // After a restart every shard replays its journal: the claims held on the
    // original's shard still count, and every key is still taken.
    let shards = spawn(&journals, emulator.addr());
    let over = red(&original, &order_away_from("after", &[s]), amount);
    match refused(&issue(&shards, &over)) {
        IssueError::RedExceedsOriginal { remaining_fen, .. } => {
            assert_eq!(remaining_fen, remaining)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        refused(&issue(&shards, &blue(&k2))),
        IssueError::IdempotencyConflict
    );
    let again = issue(&shards, &blue(&k1)).expect("replay");
    assert!(again.replayed);
    assert_eq!(again.invoice, blue1);
    assert_eq!(
        refused(&issue(&shards, &red(&red2, &k3, 1))),
        IssueError::RedOfRed
    );
    drop(shards);
    let _ = std::fs::remove_dir_all(&journals);
    let _ = std::fs::remove_dir_all(&emulator_dir);
}
