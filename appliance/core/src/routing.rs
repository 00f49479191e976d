//! Which shard is the home of an idempotency key (seller, order id): the one shard whose
//! index remembers it. Every request is homed by its own key, a red invoice included;
//! a red invoice's original is found on the home of the original's key
//! (docs/design/red-claims.md).

/// Home shard of the key with this fingerprint
/// ([`key_fingerprint`](crate::idempotency::key_fingerprint)) among `shards` shards (≥ 1).
///
/// The high half of the fingerprint is used: the index takes its table slot from the low
/// half, so routing and slot choice stay independent.
pub fn key_home_shard(fingerprint: u128, shards: u32) -> u32 {
    assert!(shards > 0, "at least one shard");
    let high = (fingerprint >> 64) as u64;
    // Multiply-shift maps uniformly onto 0..shards without a division.
    ((u128::from(high) * u128::from(shards)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homes_are_in_range_and_spread() {
        let mut counts = [0u32; 5];
        for i in 0..10_000u128 {
            let fingerprint = i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
            counts[key_home_shard(fingerprint, 5) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 1_500), "{counts:?}");
        assert_eq!(key_home_shard(u128::MAX, 1), 0);
        assert_eq!(key_home_shard(u128::MAX, 8), 7);
    }
}
