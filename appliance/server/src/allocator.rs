//! Tuning of the global allocator (mimalloc) for a long-running appliance.
//!
//! By default mimalloc returns freed memory to the operating system after a delay
//! ("purge"). Every tick allocates and frees buffers of hundreds of kilobytes (journal
//! commit, DMA buffer, tax-code batch, answers); with purging, many of those come back
//! as fresh pages that fault in and are zeroed by the kernel, which cost ~7% of a
//! shard's CPU in the bulk benchmark (docs/PERFORMANCE.md §10). The appliance's
//! footprint is sized up front (the idempotency index dominates it) and is meant to stay
//! flat, so the freed memory is kept for reuse instead.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (mimalloc.h; the Rust
/// bindings do not name it). [`PURGE_DELAY_DEFAULT_MS`] is its documented default, which
/// a unit test checks, so that a renumbering in a new mimalloc fails the tests instead of
/// silently changing another option.
pub const PURGE_DELAY_OPTION: mi_option_t = 15;
/// mimalloc v3's default purge delay in milliseconds (options.c).
pub const PURGE_DELAY_DEFAULT_MS: i64 = 1000;

/// Keeps freed memory for reuse (purge delay -1: never purge). Call once at start-up,
/// before the shards start; an operator's `MIMALLOC_PURGE_DELAY` still wins when set.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mimalloc's option setters are thread-safe plain stores of a long.
    unsafe { mi_option_set(PURGE_DELAY_OPTION, -1) };
}

/// The purge delay in force, in milliseconds (-1: never).
// `c_long` is `i64` here but 32 bits on other targets.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads an option value.
    i64::from(unsafe { mi_option_get(PURGE_DELAY_OPTION) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_index_is_the_purge_delay() {
        // The test binary's allocator is the system one, but the option table is
        // mimalloc's own: the default proves the index names the purge delay.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), PURGE_DELAY_DEFAULT_MS);
            keep_freed_memory();
            assert_eq!(purge_delay_ms(), -1);
        }
    }
}
