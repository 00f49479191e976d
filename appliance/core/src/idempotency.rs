//! The idempotency index of one shard: which orders were issued, under which journal
//! sequence number, and with which request content.
//!
//! # Layout and memory per remembered order
//!
//! * A ring of [`IndexEntry`] in insertion order (= journal order), 56 bytes each:
//!   key fingerprint (xxh3-128 of seller ‖ order id, as two u64 so that the struct has
//!   8-byte alignment and no padding), request digest (xxh3-64), journal sequence, invoice
//!   code, number, issue time (u32 seconds) and total.
//! * An open-addressing (linear probing) table of u32 ring slots, with at least twice as
//!   many slots as the ring so that the load factor stays ≤ 0.5: the slot count is the
//!   power of two at or above 2 × capacity (a mask finds a home), so 8 to 16 bytes per
//!   order, 8 exactly when the capacity is a power of two.
//!
//! Both are allocated once, for exactly the configured capacity (clamped to
//! [`INDEX_CAPACITY_MIN`]..=[`INDEX_CAPACITY_MAX`]; the ring is not rounded, so the
//! configured number of orders is what the index holds), whatever the load: e.g. 8 Mi
//! orders per shard = 448 MiB of ring + 64 MiB of table = 512 MiB; 4,000,000 orders =
//! 213.6 MiB of ring + 32 MiB of table ([`IdempotencyIndex::memory_bytes`]).
//! Red totals live in a side map holding only originals that have reds (≈ 48 B each
//! with hashbrown overhead; reds are rare).
//!
//! Expiry pops the ring head while it is older than the retention window; deletion from
//! the table uses backward-shift deletion, so there are no tombstones and probe lengths
//! never degrade.

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3Default};

use crate::invoice::{InvoiceKind, IssueRequest};
use crate::taxpayer::TaxpayerId;
use crate::validate::ORDER_ID_BYTES_MAX;

/// Smallest capacity accepted (keeps the table math simple for tiny test configs).
pub const INDEX_CAPACITY_MIN: u32 = 16;
/// Largest capacity: 2^30 orders (64 GiB); ring slots must fit below the u32 empty mark.
pub const INDEX_CAPACITY_MAX: u32 = 1 << 30;
const EMPTY: u32 = u32::MAX;

/// Hasher for maps keyed by a fingerprint: the key already is a uniform xxh3 hash, so
/// its low 64 bits are the hash (SipHash over it again costs ~20 ns per lookup for
/// nothing). Other inputs are folded in with a multiply-xor, good enough for the u128
/// keys this is used with.
#[derive(Debug, Default, Clone, Copy)]
pub struct FingerprintHasher(u64);

impl core::hash::Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 ^= i as u64;
    }
}

/// `BuildHasher` for maps keyed by fingerprints.
pub type FingerprintBuildHasher = core::hash::BuildHasherDefault<FingerprintHasher>;

/// A map keyed by key fingerprints.
pub type FingerprintMap<V> = HashMap<u128, V, FingerprintBuildHasher>;

/// Hasher for the issuer's seller map (18-byte [`TaxpayerId`] keys, one lookup per
/// request): FxHash-style multiply-rotate over 8-byte words instead of SipHash. The keys
/// are the shard's configured sellers, so there is no hash-flooding concern; a request
/// naming an unknown seller costs one probe like any other.
#[derive(Debug, Default, Clone, Copy)]
pub struct TaxpayerIdHasher(u64);

impl TaxpayerIdHasher {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl core::hash::Hasher for TaxpayerIdHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the low bits (hashbrown's bucket index) depending only on
        // the low bits of the last word; fold the well-mixed high half into them.
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }
    fn write_usize(&mut self, i: usize) {
        // The slice length prefix `Hash` writes before the id's bytes.
        self.add(i as u64);
    }
}

/// Fingerprint of the idempotency key (seller, order id).
pub fn key_fingerprint(seller: &TaxpayerId, order_id: &str) -> u128 {
    // Seller ids are fixed-length, so seller ‖ order id is unambiguous. Order ids are
    // bounded by validation; a longer one is hashed on the heap path, never truncated.
    let mut buf = [0u8; 18 + ORDER_ID_BYTES_MAX];
    let bytes = order_id.as_bytes();
    if bytes.len() <= ORDER_ID_BYTES_MAX {
        buf[..18].copy_from_slice(seller.as_bytes());
        buf[18..18 + bytes.len()].copy_from_slice(bytes);
        xxh3_128(&buf[..18 + bytes.len()])
    } else {
        let mut v = seller.as_bytes().to_vec();
        v.extend_from_slice(bytes);
        xxh3_128(&v)
    }
}

/// Digest of every field of a request, to tell a retry (same digest) from a different
/// request reusing an order id (`IdempotencyConflict`).
///
/// The fields are hashed in a fixed, length-prefixed layout (strings as u32 length ‖
/// bytes, integers little-endian, absent buyer id as 18 zero bytes) with xxh3-64, so the
/// digest depends on the request's content only: recovery recomputes it from the request
/// decoded out of the journaled canonical invoice (`journal::replay`) with this same
/// function and gets the value the live issuer stored.
pub fn request_digest(request: &IssueRequest) -> u64 {
    let mut w = DigestWriter::new();
    w.put(request.seller.as_bytes());
    w.put_str(&request.order_id);
    w.put_str(&request.buyer_name);
    match &request.buyer_taxpayer {
        Some(t) => w.put(t.as_bytes()),
        None => w.put(&[0; 18]),
    }
    w.put(&(request.lines.len() as u32).to_le_bytes());
    for line in &request.lines {
        w.put_str(&line.name);
        w.put(&line.quantity.to_le_bytes());
        w.put(&line.unit_price_fen.to_le_bytes());
    }
    w.put(&request.tax_rate.bp().to_le_bytes());
    w.put_str(&request.issuer_ref);
    w.put(&request.amount_fen.to_le_bytes());
    w.put(&request.tax_fen.to_le_bytes());
    w.put(&request.total_fen.to_le_bytes());
    match &request.kind {
        InvoiceKind::Blue => w.put(&[0]),
        InvoiceKind::Red(r) => {
            w.put(&[1]);
            w.put(&r.original_code.get().to_le_bytes());
            w.put(&r.original_number.get().to_le_bytes());
            w.put_str(&r.original_order_id);
        }
    }
    w.finish()
}

/// Bytes [`DigestWriter`] gathers on the stack: a typical request's layout (~170 B) fits.
const DIGEST_BUFFER_BYTES: usize = 256;

/// Feeds the digest layout to xxh3-64 through a stack buffer. Typical requests fit in the
/// buffer and are hashed one-shot: no heap scratch, and none of the per-call overhead of
/// the streaming hasher (calling `Xxh3Default::update` per field measured 2.5× the
/// instructions of the old scratch-Vec digest). Longer ones spill into the streaming
/// hasher, whose result equals one-shot xxh3 over the same concatenated bytes, so the
/// digest does not depend on where the spill happened.
struct DigestWriter {
    buf: [u8; DIGEST_BUFFER_BYTES],
    len: usize,
    spilled: Option<Xxh3Default>,
}

impl DigestWriter {
    fn new() -> Self {
        Self {
            buf: [0; DIGEST_BUFFER_BYTES],
            len: 0,
            spilled: None,
        }
    }

    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() <= DIGEST_BUFFER_BYTES {
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            self.spill(bytes);
        }
    }

    #[inline(always)]
    fn put_str(&mut self, s: &str) {
        self.put(&(s.len() as u32).to_le_bytes());
        self.put(s.as_bytes());
    }

    #[cold]
    fn spill(&mut self, bytes: &[u8]) {
        let h = self.spilled.get_or_insert_with(Xxh3Default::new);
        h.update(&self.buf[..self.len]);
        h.update(bytes);
        self.len = 0;
    }

    // By reference: taking `self` by value copied the ~600-byte writer (a memcpy call
    // per digest).
    fn finish(&mut self) -> u64 {
        match &mut self.spilled {
            None => xxh3_64(&self.buf[..self.len]),
            Some(h) => {
                h.update(&self.buf[..self.len]);
                h.digest()
            }
        }
    }
}

/// One remembered order: 56 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct IndexEntry {
    /// xxh3-128 of seller ‖ order id, low half first.
    pub fingerprint: [u64; 2],
    /// [`request_digest`] of the issuing request.
    pub request_digest: u64,
    /// Journal sequence of the issued (or pending) record: replays are answered from it.
    pub seq: u64,
    /// Invoice code.
    pub code: u64,
    /// Invoice number.
    pub number: u32,
    /// Issue time, seconds since the Unix epoch (u32 lasts until 2106).
    pub issue_time_s: u32,
    /// Invoice total in fen (negative for red invoices).
    pub total_fen: i64,
}

const _: () = assert!(core::mem::size_of::<IndexEntry>() == 56);

impl IndexEntry {
    /// The fingerprint as one u128.
    pub fn fingerprint(&self) -> u128 {
        u128::from(self.fingerprint[0]) | (u128::from(self.fingerprint[1]) << 64)
    }
    /// Splits a u128 fingerprint into the stored form.
    pub fn split_fingerprint(fingerprint: u128) -> [u64; 2] {
        [fingerprint as u64, (fingerprint >> 64) as u64]
    }
}

/// Converts ms since the epoch into the entries' u32 seconds (saturating in 2106).
pub fn issue_time_s(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

/// Due entries [`IdempotencyIndex::expire`] warms, then removes, at a time: enough
/// misses in flight to overlap them, few enough lines to stay cached until used.
pub const EXPIRE_WARM_CHUNK: u32 = 64;

/// How full the index is, in the steps at which operators are warned (docs/operations.md,
/// "Idempotency index"). Ordered: a higher step is fuller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IndexFill {
    /// Below the first warning.
    Normal,
    /// At least [`INDEX_WARN_PERMILLE`] ‰ of the capacity holds orders.
    Above80,
    /// At least [`INDEX_CRITICAL_PERMILLE`] ‰ of the capacity holds orders.
    Above95,
    /// New orders were refused (`IssueError::IndexFull`).
    Full,
}

/// Fill (‰ of the capacity) at which [`IndexFill::Above80`] starts.
pub const INDEX_WARN_PERMILLE: u64 = 800;
/// Fill (‰ of the capacity) at which [`IndexFill::Above95`] starts.
pub const INDEX_CRITICAL_PERMILLE: u64 = 950;
/// How far (‰) the fill must fall below a step's threshold before the step is left, so
/// that a fill hovering at a threshold does not report a crossing every tick.
pub const INDEX_FILL_HYSTERESIS_PERMILLE: u64 = 50;

impl IndexFill {
    /// The step `current` moves to when `len` of `capacity` orders are held and
    /// `refused` says whether a new order was refused since the last call. Steps rise as
    /// soon as their threshold is reached; they fall only once the fill is
    /// [`INDEX_FILL_HYSTERESIS_PERMILLE`] below it (expiry freed room). `Full` lasts
    /// until the fill falls below the `Above95` threshold minus the hysteresis: one
    /// episode of refusals however many ticks it spans.
    pub fn next(current: IndexFill, len: u32, capacity: u32, refused: bool) -> IndexFill {
        let permille = u64::from(len) * 1000 / u64::from(capacity.max(1));
        let raised = if refused {
            IndexFill::Full
        } else if permille >= INDEX_CRITICAL_PERMILLE {
            IndexFill::Above95
        } else if permille >= INDEX_WARN_PERMILLE {
            IndexFill::Above80
        } else {
            IndexFill::Normal
        };
        let held = if permille + INDEX_FILL_HYSTERESIS_PERMILLE >= INDEX_CRITICAL_PERMILLE {
            current
        } else if permille + INDEX_FILL_HYSTERESIS_PERMILLE >= INDEX_WARN_PERMILLE {
            current.min(IndexFill::Above80)
        } else {
            IndexFill::Normal
        };
        raised.max(held)
    }
}

/// Bounded idempotency index (see the module docs for layout and memory).
#[derive(Clone)]
pub struct IdempotencyIndex {
    ring: Vec<IndexEntry>,
    /// Ring slot of the oldest live entry.
    head: u32,
    len: u32,
    table: Vec<u32>,
    retention_s: u64,
    red_totals_fen: FingerprintMap<i64>,
}

// Summarised: a derived Debug would print millions of entries into a log line.
impl core::fmt::Debug for IdempotencyIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IdempotencyIndex")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("retention_s", &self.retention_s)
            .field("originals_with_reds", &self.red_totals_fen.len())
            .finish()
    }
}

impl IdempotencyIndex {
    /// An empty index for exactly `capacity_orders` orders (clamped to
    /// [`INDEX_CAPACITY_MIN`]..=[`INDEX_CAPACITY_MAX`]), forgetting orders older than
    /// `retention_ms`. Its table has [`IdempotencyIndex::table_slots_for`] slots.
    pub fn new(capacity_orders: u32, retention_ms: u64) -> Self {
        let capacity = Self::capacity_for(capacity_orders);
        Self {
            ring: vec![IndexEntry::default(); capacity as usize],
            head: 0,
            len: 0,
            table: vec![EMPTY; Self::table_slots_for(capacity)],
            retention_s: retention_ms / 1000,
            red_totals_fen: FingerprintMap::default(),
        }
    }

    /// Orders an index configured for `capacity_orders` holds: the value clamped to
    /// [`INDEX_CAPACITY_MIN`]..=[`INDEX_CAPACITY_MAX`], not rounded.
    pub fn capacity_for(capacity_orders: u32) -> u32 {
        capacity_orders.clamp(INDEX_CAPACITY_MIN, INDEX_CAPACITY_MAX)
    }

    /// Table slots for `capacity` orders: the power of two at or above twice the
    /// capacity, so that the load factor stays ≤ 0.5 and a mask finds a home slot.
    pub fn table_slots_for(capacity: u32) -> usize {
        (2 * capacity as usize).next_power_of_two()
    }

    /// Orders the index can hold.
    pub fn capacity(&self) -> u32 {
        self.ring.len() as u32
    }

    /// Ring slot `offset` entries after the head. `head < capacity` and `offset ≤
    /// capacity`, so one conditional subtraction wraps it: no division per entry, the
    /// ring is not a power of two.
    #[inline(always)]
    fn slot(&self, offset: u32) -> usize {
        let slot = self.head as usize + offset as usize;
        if slot >= self.ring.len() {
            slot - self.ring.len()
        } else {
            slot
        }
    }

    /// Orders remembered now.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether no order is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of the ring and table (the red-total side map excluded).
    pub fn memory_bytes(&self) -> usize {
        self.ring.len() * core::mem::size_of::<IndexEntry>()
            + self.table.len() * core::mem::size_of::<u32>()
    }

    fn table_mask(&self) -> usize {
        self.table.len() - 1
    }

    fn home(&self, fingerprint_low: u64) -> usize {
        fingerprint_low as usize & self.table_mask()
    }

    /// Table position holding the entry with this fingerprint.
    fn find_position(&self, fingerprint: u128) -> Option<usize> {
        let parts = IndexEntry::split_fingerprint(fingerprint);
        let mut pos = self.home(parts[0]);
        // Load ≤ 0.5 guarantees an empty slot, so the loop ends; the bound is belt and
        // braces against a broken invariant.
        for _ in 0..self.table.len() {
            let slot = self.table[pos];
            if slot == EMPTY {
                return None;
            }
            if self.ring[slot as usize].fingerprint == parts {
                return Some(pos);
            }
            pos = (pos + 1) & self.table_mask();
        }
        None
    }

    /// The entry of an order, if remembered.
    pub fn get(&self, fingerprint: u128) -> Option<&IndexEntry> {
        self.find_position(fingerprint)
            .map(|pos| &self.ring[self.table[pos] as usize])
    }

    /// Starts loading what a later [`get`](Self::get) or [`insert`](Self::insert) of
    /// `fingerprint` reads first: the table line of its home slot and, if that slot is
    /// occupied, the ring entry it names.
    ///
    /// Why: at production capacity (8 Mi orders = 64 MiB of table, 448 MiB of ring) both
    /// are cache misses, and a lookup made in the middle of a request's other work
    /// (validation, number take, canonical encode) stalls the core on them one request
    /// at a time. Calling this for every request of a tick in a tight loop first lets
    /// the out-of-order core have many misses in flight at once, so the lookups that
    /// follow find the lines in cache.
    ///
    /// How: `_mm_prefetch` would be the natural tool, but on this toolchain calling it
    /// needs `unsafe` (a `#[target_feature]` function, even with SSE statically enabled),
    /// and this crate forbids `unsafe`. So this is an ordinary load whose value goes to
    /// [`std::hint::black_box`], which the compiler may not remove; independent loads
    /// overlap in the out-of-order core just as prefetches would. The ring read depends
    /// on the table read but has no branch: an empty home reads the ring's last entry,
    /// a line that stays cached. Reading stale or unrelated lines is harmless: this only
    /// warms the cache, the lookup itself is unchanged.
    pub fn prefetch(&self, fingerprint: u128) {
        let slot = self.table[self.home(fingerprint as u64)];
        // EMPTY (all ones) clamps to the last ring entry (a conditional move, no branch).
        let entry = &self.ring[(slot as usize).min(self.ring.len() - 1)];
        std::hint::black_box(entry.fingerprint[0]);
    }

    /// Remembers a new order.
    ///
    /// One walk from the home slot does both jobs: every entry with the same fingerprint
    /// would lie in the run between home and the first empty slot (linear probing with
    /// backward-shift deletion leaves no holes in a run), so checking the run's entries
    /// on the way is the same check as a separate `get`, and that first empty slot is
    /// where the order goes. A separate `get` walked the run twice, missing the cache
    /// twice on a production-sized table.
    ///
    /// # Panics
    /// If the index is full or the order already present: the issuer checks both before
    /// taking a number, so either is a programming error.
    pub fn insert(&mut self, entry: IndexEntry) {
        assert!(self.len < self.capacity(), "idempotency index full");
        let mask = self.table_mask();
        let mut pos = self.home(entry.fingerprint[0]);
        // len < capacity = half the table, so an empty slot exists and the walk ends
        // within the table; the count is belt and braces against a broken invariant.
        let mut probes = 0;
        while self.table[pos] != EMPTY {
            assert!(
                self.ring[self.table[pos] as usize].fingerprint != entry.fingerprint,
                "order inserted twice"
            );
            probes += 1;
            assert!(
                probes < self.table.len(),
                "idempotency table has no empty slot"
            );
            pos = (pos + 1) & mask;
        }
        let slot = self.slot(self.len);
        self.ring[slot] = entry;
        self.len += 1;
        self.table[pos] = slot as u32;
    }

    /// Forgets orders issued more than the retention window before `now_ms`, oldest
    /// first; returns how many. Red totals of a forgotten original go with it: reds
    /// against it are refused from then on (its original is unknown).
    ///
    /// In steady state about one order expires per order issued, and each removal
    /// misses the cache on its table line just as a lookup does. So the due entries are
    /// taken [`EXPIRE_WARM_CHUNK`] at a time: their table lines are warmed in a tight
    /// loop (misses in flight together, as in `begin_tick`), then removed. The chunk
    /// bounds what is warmed ahead, so a large backlog (after a long idle) does not
    /// evict its own lines.
    pub fn expire(&mut self, now_ms: u64) -> u32 {
        let now_s = now_ms / 1000;
        let mut expired = 0;
        loop {
            // Issue times never decrease along the ring, so the due entries are a prefix;
            // each is warmed as it is found.
            let mut due = 0u32;
            while due < EXPIRE_WARM_CHUNK && due < self.len {
                let entry = &self.ring[self.slot(due)];
                if now_s.saturating_sub(u64::from(entry.issue_time_s)) <= self.retention_s {
                    break;
                }
                self.prefetch(entry.fingerprint());
                due += 1;
            }
            if due == 0 {
                return expired;
            }
            for _ in 0..due {
                let entry = self.ring[self.head as usize];
                let pos = self
                    .find_position(entry.fingerprint())
                    .expect("ring entry missing from the table");
                self.remove_position(pos);
                self.red_totals_fen.remove(&entry.fingerprint());
                self.head = self.slot(1) as u32;
                self.len -= 1;
            }
            expired += due;
        }
    }

    /// Backward-shift deletion for linear probing.
    fn remove_position(&mut self, mut hole: usize) {
        let mask = self.table_mask();
        self.table[hole] = EMPTY;
        let mut probe = hole;
        loop {
            probe = (probe + 1) & mask;
            let slot = self.table[probe];
            if slot == EMPTY {
                return;
            }
            let home = self.home(self.ring[slot as usize].fingerprint[0]);
            // The entry at `probe` may stay if its home lies cyclically in (hole, probe].
            let stays = if hole <= probe {
                hole < home && home <= probe
            } else {
                hole < home || home <= probe
            };
            if !stays {
                self.table[hole] = slot;
                self.table[probe] = EMPTY;
                hole = probe;
            }
        }
    }

    /// Σ |red totals| already issued against an original.
    pub fn red_total_fen(&self, original_fingerprint: u128) -> i64 {
        self.red_totals_fen
            .get(&original_fingerprint)
            .copied()
            .unwrap_or(0)
    }

    /// Adds a red invoice's |total| to its original's running sum.
    pub fn add_red_fen(&mut self, original_fingerprint: u128, red_abs_fen: i64) {
        debug_assert!(red_abs_fen >= 0);
        let sum = self.red_totals_fen.entry(original_fingerprint).or_insert(0);
        *sum = sum.saturating_add(red_abs_fen);
    }

    /// Originals that have reds (size of the side map).
    pub fn originals_with_reds(&self) -> usize {
        self.red_totals_fen.len()
    }

    /// Entries oldest first (tests and diagnostics).
    pub fn entries(&self) -> impl Iterator<Item = &IndexEntry> + '_ {
        (0..self.len).map(move |i| &self.ring[self.slot(i)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64, time_s: u32) -> IndexEntry {
        let fp = xxh3_128(&i.to_le_bytes());
        IndexEntry {
            fingerprint: IndexEntry::split_fingerprint(fp),
            request_digest: i,
            seq: i + 1,
            code: 1,
            number: i as u32 + 1,
            issue_time_s: time_s,
            total_fen: 100,
        }
    }

    #[test]
    fn expiry_across_warm_chunks_removes_exactly_the_due_entries() {
        let chunk = EXPIRE_WARM_CHUNK as u64;
        let total = 4 * chunk + 7;
        let mut index = IdempotencyIndex::new(1024, 10_000);
        // Issue time = i / 2 s, so entries share seconds as they do live.
        for i in 0..total {
            index.insert(entry(i, (i / 2) as u32));
        }
        // now = 2 chunks + 13 s: times < chunk + 3 are due (two and a bit chunks).
        let now_s = chunk + 13;
        let due = 2 * (chunk + 3);
        assert_eq!(index.expire(now_s * 1000), due as u32);
        assert_eq!(u64::from(index.len()), total - due);
        for i in 0..total {
            let e = entry(i, (i / 2) as u32);
            assert_eq!(index.get(e.fingerprint()).is_some(), i >= due, "{i}");
        }
        // Nothing more is due at the same time; everything is due much later.
        assert_eq!(index.expire(now_s * 1000), 0);
        assert_eq!(u64::from(index.expire(1_000_000_000)), total - due);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn sizes_and_memory_per_order() {
        assert_eq!(core::mem::size_of::<IndexEntry>(), 56);
        // A power of two: 56 B entry + 2 table slots × 4 B = 64 B per order.
        let index = IdempotencyIndex::new(1024, 0);
        assert_eq!(index.capacity(), 1024);
        assert_eq!(index.memory_bytes(), 1024 * 64);
        // Any other capacity is held exactly (not rounded up); only the table rounds.
        let index = IdempotencyIndex::new(1000, 0);
        assert_eq!(index.capacity(), 1000);
        assert_eq!(IdempotencyIndex::table_slots_for(1000), 2048);
        assert_eq!(index.memory_bytes(), 1000 * 56 + 2048 * 4);
        assert_eq!(IdempotencyIndex::new(0, 0).capacity(), INDEX_CAPACITY_MIN);
        assert_eq!(IdempotencyIndex::capacity_for(4_000_000), 4_000_000);
    }

    #[test]
    fn a_capacity_that_is_not_a_power_of_two_wraps_its_ring_exactly() {
        // 20 orders, retention 0: fill, then keep expiring the oldest while inserting,
        // through several laps of the 20-entry ring.
        let mut index = IdempotencyIndex::new(20, 0);
        for i in 0..20u64 {
            index.insert(entry(i, i as u32));
        }
        assert_eq!(index.len(), 20);
        for i in 20..100u64 {
            // Forgets exactly the entry issued at i - 20 (older than 0 s).
            assert_eq!(index.expire((i - 19) * 1000), 1);
            index.insert(entry(i, i as u32));
            let seqs: Vec<u64> = index.entries().map(|e| e.seq).collect();
            // `entry(i)` has seq i + 1.
            assert_eq!(seqs, (i - 18..=i + 1).collect::<Vec<_>>());
            assert!(index.get(entry(i - 20, 0).fingerprint()).is_none());
            assert_eq!(
                index.get(entry(i - 19, 0).fingerprint()).unwrap().seq,
                i - 18
            );
        }
    }

    #[test]
    fn fill_steps_rise_at_once_and_fall_with_hysteresis() {
        use IndexFill::*;
        let step = |current, len, refused| IndexFill::next(current, len, 1000, refused);
        assert_eq!(step(Normal, 799, false), Normal);
        assert_eq!(step(Normal, 800, false), Above80);
        assert_eq!(step(Normal, 960, false), Above95, "two steps at once");
        assert_eq!(
            step(Above80, 760, false),
            Above80,
            "held within the hysteresis"
        );
        assert_eq!(step(Above80, 749, false), Normal, "re-armed after expiry");
        assert_eq!(step(Above95, 930, false), Above95);
        assert_eq!(step(Above95, 899, false), Above80);
        assert_eq!(step(Above95, 700, false), Normal);
        assert_eq!(step(Above95, 999, true), Full);
        assert_eq!(step(Full, 999, false), Full, "one episode");
        assert_eq!(step(Full, 900, false), Full);
        assert_eq!(step(Full, 899, false), Above80, "episode over");
        assert_eq!(step(Normal, 10, true), Full, "refused whatever the fill");
    }

    #[test]
    fn insert_get_expire_in_order() {
        let mut index = IdempotencyIndex::new(64, 10_000);
        for i in 0..64 {
            index.insert(entry(i, i as u32));
        }
        for i in 0..64 {
            let e = entry(i, i as u32);
            assert_eq!(index.get(e.fingerprint()), Some(&e));
        }
        assert!(index.get(xxh3_128(b"absent")).is_none());
        // now = 30 s, retention 10 s: entries with time < 20 go.
        assert_eq!(index.expire(30_000), 20);
        assert_eq!(index.len(), 44);
        for i in 0..64 {
            let e = entry(i, i as u32);
            assert_eq!(index.get(e.fingerprint()).is_some(), i >= 20, "{i}");
        }
        // The ring wraps: insert 20 more into the freed slots.
        for i in 64..84 {
            index.insert(entry(i, 40));
        }
        assert_eq!(index.len(), 64);
        let seqs: Vec<u64> = index.entries().map(|e| e.seq).collect();
        assert_eq!(seqs, (21..=84).collect::<Vec<_>>());
        for i in 20..84 {
            let e = entry(i, if i < 64 { i as u32 } else { 40 });
            assert_eq!(index.get(e.fingerprint()), Some(&e), "{i}");
        }
    }

    #[test]
    fn colliding_homes_survive_deletion() {
        // Force every fingerprint into the same home slot to exercise backward shift.
        let mut index = IdempotencyIndex::new(16, 0);
        let mk = |i: u64| IndexEntry {
            fingerprint: [0, i],
            seq: i,
            issue_time_s: i as u32,
            ..IndexEntry::default()
        };
        for i in 0..16 {
            index.insert(mk(i));
        }
        for round in 0..16 {
            // Retention 0: everything strictly older than now goes.
            assert_eq!(index.expire((round + 1) * 1000), 1);
            for i in 0..16 {
                assert_eq!(index.get(mk(i).fingerprint()).is_some(), i > round);
            }
        }
        assert!(index.is_empty());
    }

    /// An entry whose home is `home` (the fingerprint's low bits), told apart by `i`.
    fn homed(home: u64, i: u64) -> IndexEntry {
        IndexEntry {
            fingerprint: [home, i],
            seq: i,
            ..IndexEntry::default()
        }
    }

    #[test]
    #[should_panic(expected = "order inserted twice")]
    fn insert_twice_panics_after_the_probe_wraps() {
        // Capacity 16 = 32 table slots: home 31 is the last slot, so the run of
        // colliding entries wraps to slots 0, 1, 2, 3.
        let mut index = IdempotencyIndex::new(16, 0);
        for i in 0..5 {
            index.insert(homed(31, i));
        }
        assert_eq!(index.table[31], 0);
        assert_eq!(index.table[3], 4);
        // Found only by walking past the wrap to slot 3.
        index.insert(homed(31, 4));
    }

    #[test]
    fn insert_places_colliding_homes_in_one_run() {
        let mut index = IdempotencyIndex::new(16, 0);
        for i in 0..5 {
            index.insert(homed(31, i));
        }
        // Another home inside the run goes after it, at the first empty slot.
        index.insert(homed(1, 100));
        assert_eq!(index.table[4], 5);
        for i in 0..5 {
            assert_eq!(index.get(homed(31, i).fingerprint()), Some(&homed(31, i)));
        }
        assert_eq!(index.get(homed(1, 100).fingerprint()), Some(&homed(1, 100)));
        assert!(index.get(homed(31, 5).fingerprint()).is_none());
        assert!(index.get(homed(1, 5).fingerprint()).is_none());
    }

    #[test]
    fn colliding_homes_found_after_many_inserts_and_expiries() {
        // 4 homes (low bits 0, 1, 2 and 31 in a 32-slot table; the high bits above the
        // mask differ) shared by all entries, through several laps of the ring.
        let mut index = IdempotencyIndex::new(16, 0);
        let mk = |i: u64| IndexEntry {
            fingerprint: [[0, 1, 2, 31][i as usize % 4] | (i << 40), i],
            seq: i,
            issue_time_s: i as u32,
            ..IndexEntry::default()
        };
        for i in 0..200u64 {
            if index.len() == index.capacity() {
                // Retention 0: forgets the entries issued before i - 8 s, keeping the
                // newest 8, so deletions shift entries of a shared run back.
                index.expire((i - 8) * 1000);
            }
            index.insert(mk(i));
            let oldest = i + 1 - u64::from(index.len());
            for j in 0..=i {
                assert_eq!(
                    index.get(mk(j).fingerprint()).is_some(),
                    j >= oldest,
                    "{i} {j}"
                );
            }
            assert!(index.get(mk(i + 1).fingerprint()).is_none());
        }
        // The prefetch touch reads the same slots and changes nothing.
        for i in 0..210 {
            index.prefetch(mk(i).fingerprint());
        }
        assert_eq!(index.entries().count(), index.len() as usize);
    }

    #[test]
    fn red_totals_go_with_their_original() {
        let mut index = IdempotencyIndex::new(16, 0);
        let e = entry(1, 5);
        index.insert(e);
        index.add_red_fen(e.fingerprint(), 30);
        index.add_red_fen(e.fingerprint(), 20);
        assert_eq!(index.red_total_fen(e.fingerprint()), 50);
        index.expire(10_000);
        assert_eq!(index.red_total_fen(e.fingerprint()), 0);
        assert_eq!(index.originals_with_reds(), 0);
    }

    /// The scratch-Vec serialisation `request_digest` used before the stack writer: kept
    /// as the reference layout, so that a change to the layout (which would make old and
    /// new digests of one request differ) or to the spill path fails a test.
    fn reference_digest(request: &IssueRequest) -> u64 {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut v = Vec::new();
        v.extend_from_slice(request.seller.as_bytes());
        put_str(&mut v, &request.order_id);
        put_str(&mut v, &request.buyer_name);
        match &request.buyer_taxpayer {
            Some(t) => v.extend_from_slice(t.as_bytes()),
            None => v.extend_from_slice(&[0; 18]),
        }
        v.extend_from_slice(&(request.lines.len() as u32).to_le_bytes());
        for line in &request.lines {
            put_str(&mut v, &line.name);
            v.extend_from_slice(&line.quantity.to_le_bytes());
            v.extend_from_slice(&line.unit_price_fen.to_le_bytes());
        }
        v.extend_from_slice(&request.tax_rate.bp().to_le_bytes());
        put_str(&mut v, &request.issuer_ref);
        v.extend_from_slice(&request.amount_fen.to_le_bytes());
        v.extend_from_slice(&request.tax_fen.to_le_bytes());
        v.extend_from_slice(&request.total_fen.to_le_bytes());
        match &request.kind {
            InvoiceKind::Blue => v.push(0),
            InvoiceKind::Red(r) => {
                v.push(1);
                v.extend_from_slice(&r.original_code.get().to_le_bytes());
                v.extend_from_slice(&r.original_number.get().to_le_bytes());
                put_str(&mut v, &r.original_order_id);
            }
        }
        xxhash_rust::xxh3::xxh3_64(&v)
    }

    #[test]
    fn digest_equals_the_serialised_layout() {
        use crate::invoice::{LineItem, RedReference};
        use crate::taxpayer::{InvoiceCode, InvoiceNumber};
        let base = crate::validate::tests::sample_request("o-1", 100);
        let mut red = base.clone();
        red.kind = InvoiceKind::Red(RedReference {
            original_code: InvoiceCode::new(144_031_900_111).unwrap(),
            original_number: InvoiceNumber::new(7).unwrap(),
            original_order_id: "blue-7".into(),
        });
        red.buyer_taxpayer = Some(base.seller);
        // Over 256 bytes: spills into the streaming hasher.
        let mut long = base.clone();
        for i in 0..16 {
            long.lines.push(LineItem {
                name: format!("商品{i}-{}", "x".repeat(80)),
                quantity: i + 1,
                unit_price_fen: 1_000 * i64::from(i),
            });
        }
        long.buyer_name = "名".repeat(64);
        // One field longer than the stack buffer on its own.
        let mut huge = long.clone();
        huge.buyer_name = "名".repeat(100);
        for r in [&base, &red, &long, &huge] {
            assert_eq!(request_digest(r), reference_digest(r));
        }
    }

    #[test]
    fn taxpayer_id_hasher_spreads_ids() {
        use core::hash::BuildHasher;
        let build = core::hash::BuildHasherDefault::<TaxpayerIdHasher>::default();
        let ids = [
            "91350100M000100Y43",
            "91110000600037341L",
            "91350100M000100Y43",
        ]
        .map(|s| TaxpayerId::parse(s).unwrap());
        assert_eq!(build.hash_one(ids[0]), build.hash_one(ids[2]));
        assert_ne!(build.hash_one(ids[0]), build.hash_one(ids[1]));
    }

    #[test]
    fn digest_sees_every_field() {
        let base = crate::validate::tests::sample_request("o-1", 100);
        let d = request_digest(&base);
        let mut r = base.clone();
        r.buyer_name.push('x');
        assert_ne!(request_digest(&r), d);
        let mut r = base.clone();
        r.lines[0].quantity += 1;
        assert_ne!(request_digest(&r), d);
        let mut r = base.clone();
        r.issuer_ref.clear();
        assert_ne!(request_digest(&r), d);
        assert_eq!(request_digest(&base.clone()), d);
        assert_ne!(
            key_fingerprint(&base.seller, "o-1"),
            key_fingerprint(&base.seller, "o-2")
        );
    }
}
