//! Which shard is an order's home: the shard whose idempotency index remembers it.
//!
//! The key is (seller, order id) for a blue invoice and (seller, original order id) for a
//! red one, so that a red invoice lands where its original is remembered. Clients use the
//! same function to send each order straight to its home shard.

use appliance_core::idempotency::key_fingerprint;
use appliance_core::{InvoiceKind, IssueRequest};

/// Home shard of a request among `shards` shards (≥ 1).
pub fn home_shard(request: &IssueRequest, shards: u32) -> u32 {
    assert!(shards > 0, "at least one shard");
    let order_id = match &request.kind {
        InvoiceKind::Blue => request.order_id.as_str(),
        InvoiceKind::Red(reference) => reference.original_order_id.as_str(),
    };
    // The high half of the fingerprint: the index uses the low half for its table slot,
    // so routing and slot choice stay independent.
    let high = (key_fingerprint(&request.seller, order_id) >> 64) as u64;
    // Multiply-shift maps uniformly onto 0..shards without a division.
    ((u128::from(high) * u128::from(shards)) >> 64) as u32
}
