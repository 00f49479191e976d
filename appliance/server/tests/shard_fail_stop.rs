//! Fail-stop of the shard's committer with ticks queued behind it: after a failed journal
//! write, every request of the failed group and every tick queued behind it is answered
//! with `ShardStopped`, and so is every batch still in the inbox or sent after the
//! stop, without waiting for the handle to go; none is answered as issued. A restart recovers from what was durable.
//!
//! The write failure is real: RLIMIT_FSIZE makes the kernel refuse writes beyond the
//! limit with EFBIG. The limit is per process, so this test lives alone in its own test
//! binary.

mod journal_support;
mod shard_support;

use appliance_server::shard::{IssueFailure, ShardConfig, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use journal_support::set_fsize_limit;
use shard_support::{fresh_dir, shard_config, start_emulator};
use std::path::Path;
use std::time::Duration;

const ORDERS: u64 = 200;

/// One request per tick, so that many ticks queue behind the failing write.
fn config(journal: &Path, hsm: std::net::SocketAddr) -> ShardConfig {
    shard_config(journal, hsm, 1, TcpClientConfig::default())
}

#[test]
fn a_failed_group_write_answers_every_queued_tick_and_restart_recovers() {
    // Without this the kernel's SIGXFSZ would kill the test process instead of letting the
    // write fail with EFBIG.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let emulator_dir = fresh_dir("fail-stop-emulator");
    let journal_dir = fresh_dir("fail-stop-journal");
    let emulator = start_emulator(&emulator_dir);

    let shard = ShardHandle::spawn(config(&journal_dir, emulator.addr())).unwrap();
    let durable = shard
        .issue(vec![ticket_request(seller(0), "FS", 0)])
        .unwrap()
        .pop()
        .unwrap()
        .expect("issued before the failure");
    // The start-up commit and this tick lie in the first blocks of the segment: every
    // later write is beyond the limit.
    let previous = set_fsize_limit(4096);
    let mut receivers = Vec::new();
    for n in 1..=ORDERS {
        // The inbox stays open after the stop (see below), so every submit is queued.
        receivers.push(
            shard
                .submit(vec![ticket_request(seller(0), "FS", n)])
                .expect("queued"),
        );
    }
    // Every batch is answered, before the handle is dropped: those of the failed group,
    // those queued behind it, and those still in the inbox (or sent to it later) when
    // the shard stopped.
    let mut stopped = 0;
    for rx in receivers {
        let results = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every batch is answered");
        for result in results {
            match result {
                Err(IssueFailure::ShardStopped(_)) => stopped += 1,
                other => panic!("expected ShardStopped, got {other:?}"),
            }
        }
    }
    assert!(
        shard.shutdown().is_err(),
        "the shard stopped on a journal error"
    );
    set_fsize_limit(previous);
    assert_eq!(
        stopped, ORDERS,
        "every request after the failure was answered as stopped"
    );

    // Only what was durable comes back; the rest is issued afresh.
    let shard = ShardHandle::spawn(config(&journal_dir, emulator.addr())).unwrap();
    let again = shard
        .issue(vec![ticket_request(seller(0), "FS", 0)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.invoice, durable.invoice);
    let fresh = shard
        .issue(vec![ticket_request(seller(0), "FS", 1)])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert!(
        !fresh.replayed,
        "nothing of the failed group was acknowledged"
    );
    shard.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&journal_dir);
    let _ = std::fs::remove_dir_all(&emulator_dir);
}
