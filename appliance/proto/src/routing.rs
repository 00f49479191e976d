//! Which shard is an order's home: the shard whose idempotency index remembers it.
//!
//! The key is the request's own (seller, order id), for a red invoice too: one key, one
//! home, so that the same key can never be issued once as blue and once as red on two
//! shards. A red invoice's home shard asks its original's home shard to claim the amount
//! (docs/design/red-claims.md). Clients use the same function to send each order straight
//! to its home shard.

use appliance_core::idempotency::key_fingerprint;
use appliance_core::routing::key_home_shard;
use appliance_core::IssueRequest;

/// Home shard of a request among `shards` shards (≥ 1): the home of its own
/// (seller, order id), whatever its kind.
pub fn home_shard(request: &IssueRequest, shards: u32) -> u32 {
    key_home_shard(key_fingerprint(&request.seller, &request.order_id), shards)
}
