//! A shard whose idempotency index is tiny (16 orders) fills it: the refusals are
//! `IndexFull` with a message naming the setting to raise, and the metrics (the
//! Prometheus gauges and the status figures) show the entries, the capacity and the
//! refusals.

mod shard_support;

use appliance_core::IssueError;
use appliance_server::metrics::prometheus_text;
use appliance_server::shard::{IssueFailure, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use hsm_driver::tcp::TcpClientConfig;
use shard_support::{fresh_dir, shard_config, start_emulator};
use std::time::Duration;

#[test]
fn a_full_index_refuses_naming_the_setting_and_shows_in_the_metrics() {
    let dir = fresh_dir("index-capacity");
    let emulator = start_emulator(&dir.join("hsm"));
    let mut config = shard_config(
        &dir.join("journal"),
        emulator.addr(),
        64,
        TcpClientConfig::default(),
    );
    config.issuer.index_capacity_orders = 16;
    let shard = ShardHandle::spawn(config).unwrap();

    let requests = (0..20)
        .map(|n| ticket_request(seller(0), "full", n))
        .collect();
    let results = shard
        .submit(requests)
        .unwrap()
        .recv_timeout(Duration::from_secs(60))
        .expect("answered");
    let issued = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(issued, 16, "exactly the configured capacity is held");
    for result in &results[16..] {
        let Err(IssueFailure::Rejected(error)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(*error, IssueError::IndexFull);
        assert!(
            error.to_string().contains("limits.index_capacity_orders"),
            "{error}"
        );
    }

    let metrics = shard.metrics().unwrap();
    assert_eq!(
        (
            metrics.index_entries,
            metrics.index_capacity,
            metrics.index_full_refusals
        ),
        (16, 16, 4)
    );
    let text = prometheus_text(&[metrics]);
    assert!(
        text.contains("einvoice_index_entries{shard=\"0\"} 16\n"),
        "{text}"
    );
    assert!(
        text.contains("einvoice_index_capacity{shard=\"0\"} 16\n"),
        "{text}"
    );
    assert!(text.contains("einvoice_index_full_refusals_total{shard=\"0\"} 4\n"));
    shard.shutdown().unwrap();
    drop(emulator);
    let _ = std::fs::remove_dir_all(&dir);
}
