//! A shard with two ticks in flight loses its tax server (the emulator process is
//! stopped with SIGSTOP, so every command times out) while batches keep coming:
//! - every request of every tick out at the time, and of the ticks begun after, is
//!   answered with `IssueFailure::TaxServer` (safe to retry), none is left unanswered;
//! - once the emulator runs again (SIGCONT), the same orders are issued under fresh
//!   numbers: the commands that timed out may still be executed by the device once it
//!   resumes (they are queued on its socket), so every number the aborted ticks took is
//!   spoiled, never reused. The issued numbers are exactly the ones after them, none
//!   skipped, none twice, and the shard's accounting counts the aborted ones as spoiled.

mod shard_support;

use appliance_server::shard::{IssueFailure, IssueResult, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use shard_support::{fresh_dir, shard_config, start_emulator};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

const BATCH: u64 = 20;
const BATCHES: u64 = 8;

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

fn submit_all(shard: &ShardHandle, from: u64) -> Vec<flume::Receiver<Vec<IssueResult>>> {
    (0..BATCHES)
        .map(|b| {
            let first = from + b * BATCH;
            let requests = (first..first + BATCH)
                .map(|n| ticket_request(seller(0), "pipe", n))
                .collect();
            shard.submit(requests).unwrap()
        })
        .collect()
}

fn answers(replies: Vec<flume::Receiver<Vec<IssueResult>>>) -> Vec<IssueResult> {
    replies
        .into_iter()
        .flat_map(|r| r.recv_timeout(Duration::from_secs(60)).expect("answered"))
        .collect()
}

#[test]
fn ticks_in_flight_fail_together_and_spoil_every_number_they_took() {
    let dir = fresh_dir("ticks-in-flight");
    let emulator = start_emulator(&dir.join("hsm"));
    // Small ticks, so that the batches below make several; calls time out quickly.
    let config = shard_config(
        &dir.join("journal"),
        emulator.addr(),
        2 * BATCH as u32,
        TcpClientConfig {
            call_timeout: Duration::from_millis(500),
            ..TcpClientConfig::default()
        },
    );
    let shard = ShardHandle::spawn(config).unwrap();

    // The tax server stops answering while 8 batches (4 ticks' worth) arrive.
    signal(emulator.pid(), "-STOP");
    let failed = answers(submit_all(&shard, 0));
    signal(emulator.pid(), "-CONT");
    assert_eq!(failed.len() as u64, BATCHES * BATCH);
    for result in &failed {
        assert!(
            matches!(result, Err(IssueFailure::TaxServer(_))),
            "{result:?}"
        );
    }

    // The same orders again, then new ones: all issued, after the spoiled numbers.
    let mut numbers = BTreeSet::new();
    for from in [0, BATCHES * BATCH] {
        for result in answers(submit_all(&shard, from)) {
            let issued = result.expect("issued once the tax server is back");
            assert!(!issued.replayed);
            assert!(numbers.insert(issued.invoice.number.get()), "number twice");
        }
    }
    let spoiled = (BATCHES * BATCH) as u32;
    let n = 2 * (BATCHES * BATCH) as u32;
    assert_eq!(
        numbers,
        (spoiled + 1..=spoiled + n).collect::<BTreeSet<_>>(),
        "the aborted ticks' numbers 1..={spoiled} are never issued"
    );
    shard.shutdown().unwrap();
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
}
