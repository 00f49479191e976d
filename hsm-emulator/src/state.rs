//! Persistent device state that is small and changes rarely: the authority's grants, the
//! segments carved from them (with holder and request id), returned ranges, and the
//! per-taxpayer report-and-clear marks.
//!
//! It lives in `<data dir>/state.json` and every change is written whole (temporary file,
//! fsync, rename, fsync of the directory) before the caller answers. A change is first
//! applied to a copy; the live state is replaced only once the copy is durable, so a
//! failed write leaves memory and disk agreeing.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{Grant, TAXPAYER_BYTES};
use hsm_driver::proto::Holder;

/// File name of the state inside the data dir.
pub const STATE_FILE: &str = "state.json";
/// Limit on segments the device remembers; a requisition past it is refused, so the
/// state file (rewritten on every change) stays a few megabytes at most.
pub const SEGMENTS_MAX: usize = 65_536;
/// Limit on returned sub-ranges per segment (returns of tails split nothing, but a
/// hostile caller could return every other number).
pub const RETURNS_PER_SEGMENT_MAX: usize = 64;
/// Largest segment one requisition may ask for.
pub const REQUISITION_COUNT_MAX: u32 = 10_000_000;
/// Limit on the state file's size when reading it back.
const STATE_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Layout version 2: segments name their holder as (appliance id, shard).
const STATE_VERSION: u32 = 2;

/// Errors of the persistent state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the data dir failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The state file cannot be decoded or breaks an invariant.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The configured grants contradict the grants recorded in the data dir.
    #[error("configuration conflicts with recorded state: {0}")]
    Conflict(String),
}

/// A device-level refusal of a command, each mapped to a wire status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The taxpayer is not served by this device.
    #[error("unknown taxpayer")]
    UnknownTaxpayer,
    /// The taxpayer's grants are used up.
    #[error("inventory exhausted")]
    Exhausted,
    /// A field is out of range.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The (holder, request id) pair was used for another requisition.
    #[error("request id reused for a different requisition")]
    RequestIdConflict,
    /// The range is not inside one granted segment of the taxpayer.
    #[error("range was not granted")]
    NotGranted,
    /// The range lies in a segment granted to another holder.
    #[error("range is held by another holder")]
    NotHolder,
    /// The range overlaps a range already returned, or an uploaded invoice.
    #[error("range conflicts with a return or an upload")]
    ReturnConflict,
    /// A device limit was reached.
    #[error("device limit reached: {0}")]
    Limit(&'static str),
    /// The durable write failed; nothing changed.
    #[error("storage failure: {0}")]
    Storage(String),
}

/// One authority grant and how far requisitions have carved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantState {
    /// Taxpayer (18 ASCII).
    pub taxpayer: String,
    /// Invoice code.
    pub invoice_code: u64,
    /// First number of the grant.
    pub first: u32,
    /// Numbers in the grant.
    pub count: u32,
    /// Numbers already carved into segments.
    pub carved: u32,
}

/// A segment granted to a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentState {
    /// Taxpayer (18 ASCII).
    pub taxpayer: String,
    /// Invoice code.
    pub invoice_code: u64,
    /// First number.
    pub first: u32,
    /// Numbers in the segment.
    pub count: u32,
    /// Id of the appliance that requisitioned it (32 hex digits).
    pub appliance: String,
    /// Shard of that appliance.
    pub shard: u32,
    /// The holder's request id.
    pub request_id: u64,
    /// Returned sub-ranges `(first, count)`, sorted, disjoint.
    pub returned: Vec<(u32, u32)>,
}

impl SegmentState {
    /// The holder (an unparsable appliance id, which `check` refuses on load, reads 0).
    pub fn holder(&self) -> Holder {
        Holder::new(
            u128::from_str_radix(&self.appliance, 16).unwrap_or(0),
            self.shard,
        )
    }

    /// Numbers of the segment not returned.
    pub fn held_count(&self) -> u32 {
        let returned: u64 = self.returned.iter().map(|r| u64::from(r.1)).sum();
        self.count
            .saturating_sub(u32::try_from(returned).unwrap_or(u32::MAX))
    }

    /// Whether `number` lies in the segment and not in a returned range.
    pub fn holds(&self, number: u32) -> bool {
        number >= self.first
            && u64::from(number) < u64::from(self.first) + u64::from(self.count)
            && !self
                .returned
                .iter()
                .any(|&(f, c)| number >= f && u64::from(number) < u64::from(f) + u64::from(c))
    }
}

/// Report-and-clear mark of one taxpayer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearMark {
    /// Uploads with a sequence number at or below this were reported.
    pub cleared_upload_seq: u64,
    /// Period end given with the last report, ms since the epoch.
    pub period_end_ms: u64,
}

/// The whole small state, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Layout version.
    pub version: u32,
    /// Device identifier, chosen on first start.
    pub device_id: String,
    /// Authority grants in configuration order.
    pub grants: Vec<GrantState>,
    /// Segments in requisition order.
    pub segments: Vec<SegmentState>,
    /// Report marks by taxpayer.
    pub clears: HashMap<String, ClearMark>,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub(crate) fn write_durable(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    f.write_all(bytes).map_err(io_at(&tmp))?;
    f.sync_all().map_err(io_at(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    // Without the directory fsync the rename itself may be lost in a crash, and the
    // device would come back with the previous state after answering with the new one.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))?;
    Ok(())
}

fn ranges_overlap(a_first: u32, a_count: u32, b_first: u32, b_count: u32) -> bool {
    let a_end = u64::from(a_first) + u64::from(a_count);
    let b_end = u64::from(b_first) + u64::from(b_count);
    u64::from(a_first) < b_end && u64::from(b_first) < a_end
}

impl DeviceState {
    /// Loads the state of `dir`, or a fresh state if there is none, then merges the
    /// configured grants: grants already recorded must match exactly, new ones must not
    /// overlap recorded ones (same code). Writes the result durably if it changed.
    pub fn open(dir: &Path, grants: &[Grant], device_id: &str) -> Result<Self, StateError> {
        let path = dir.join(STATE_FILE);
        let mut state = match File::open(&path) {
            Ok(f) => {
                let mut bytes = Vec::new();
                f.take(STATE_FILE_BYTES_MAX)
                    .read_to_end(&mut bytes)
                    .map_err(io_at(&path))?;
                let state: DeviceState =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                state.check().map_err(|reason| StateError::Corrupt {
                    path: path.clone(),
                    reason,
                })?;
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => DeviceState {
                version: STATE_VERSION,
                device_id: device_id.to_string(),
                grants: Vec::new(),
                segments: Vec::new(),
                clears: HashMap::new(),
            },
            Err(e) => return Err(io_at(&path)(e)),
        };
        let before = state.clone();
        for g in grants {
            let taxpayer = String::from_utf8_lossy(&g.taxpayer).into_owned();
            let existing = state
                .grants
                .iter()
                .find(|s| s.invoice_code == g.invoice_code && s.first == g.first);
            match existing {
                Some(s) if s.taxpayer == taxpayer && s.count == g.count => continue,
                Some(s) => {
                    return Err(StateError::Conflict(format!(
                        "grant code {} first {} is recorded for {} count {}, configured for {} count {}",
                        g.invoice_code, g.first, s.taxpayer, s.count, taxpayer, g.count
                    )))
                }
                None => {}
            }
            if let Some(s) = state.grants.iter().find(|s| {
                s.invoice_code == g.invoice_code
                    && ranges_overlap(s.first, s.count, g.first, g.count)
            }) {
                return Err(StateError::Conflict(format!(
                    "grant code {} first {} count {} overlaps recorded grant first {} count {}",
                    g.invoice_code, g.first, g.count, s.first, s.count
                )));
            }
            state.grants.push(GrantState {
                taxpayer,
                invoice_code: g.invoice_code,
                first: g.first,
                count: g.count,
                carved: 0,
            });
        }
        if state != before {
            state.persist(dir)?;
        }
        Ok(state)
    }

    /// Checks the invariants after reading (TigerStyle: assert on both sides of the disk).
    fn check(&self) -> Result<(), String> {
        if self.version != STATE_VERSION {
            return Err(format!(
                "version {} unsupported (this emulator reads version {STATE_VERSION}; version 1 \
                 state names holders by shard only and cannot be converted: start on a new \
                 data dir)",
                self.version
            ));
        }
        if self.segments.len() > SEGMENTS_MAX {
            return Err("too many segments".into());
        }
        for g in &self.grants {
            // A hand-edited file must not make `first + carved` overflow later.
            let end = u64::from(g.first) + u64::from(g.count);
            if g.carved > g.count
                || g.taxpayer.len() != TAXPAYER_BYTES
                || g.first == 0
                || end > u64::from(super::config::INVOICE_NUMBER_MAX) + 1
            {
                return Err(format!("grant {} {} inconsistent", g.invoice_code, g.first));
            }
        }
        for s in &self.segments {
            let inside = self.grants.iter().any(|g| {
                g.taxpayer == s.taxpayer
                    && g.invoice_code == s.invoice_code
                    && s.first >= g.first
                    && u64::from(s.first) + u64::from(s.count)
                        <= u64::from(g.first) + u64::from(g.carved)
            });
            let appliance_ok =
                s.appliance.len() == 32 && u128::from_str_radix(&s.appliance, 16).is_ok();
            if !inside || !appliance_ok || s.returned.len() > RETURNS_PER_SEGMENT_MAX {
                return Err(format!(
                    "segment {} {} not inside a carved grant",
                    s.invoice_code, s.first
                ));
            }
        }
        Ok(())
    }

    /// Writes the state durably.
    pub fn persist(&self, dir: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            path: dir.join(STATE_FILE),
            reason: e.to_string(),
        })?;
        write_durable(dir, STATE_FILE, &bytes)
    }

    /// Whether this device serves `taxpayer`.
    pub fn serves(&self, taxpayer: &str) -> bool {
        self.grants.iter().any(|g| g.taxpayer == taxpayer)
    }

    /// Numbers not yet carved for `taxpayer`.
    pub fn remaining(&self, taxpayer: &str) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.taxpayer == taxpayer)
            .map(|g| u64::from(g.count - g.carved))
            .sum()
    }

    /// Served taxpayers in grant order, without repeats.
    pub fn taxpayers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for g in &self.grants {
            if !out.contains(&g.taxpayer) {
                out.push(g.taxpayer.clone());
            }
        }
        out
    }

    /// Plans a requisition on a copy of the state. Returns the segment index and whether
    /// the state changed (false for an idempotent replay of a known request).
    pub fn requisition(
        &mut self,
        taxpayer: &str,
        count: u32,
        holder: Holder,
        request_id: u64,
    ) -> Result<(usize, bool), Refusal> {
        if let Some(i) = self
            .segments
            .iter()
            .position(|s| s.holder() == holder && s.request_id == request_id)
        {
            // A retry after a lost answer: same segment, provided it asks for the same
            // thing. The count may legitimately exceed what was granted (a grant's tail
            // can be shorter than asked), so only the taxpayer must match.
            return if self.segments[i].taxpayer == taxpayer {
                Ok((i, false))
            } else {
                Err(Refusal::RequestIdConflict)
            };
        }
        if !self.serves(taxpayer) {
            return Err(Refusal::UnknownTaxpayer);
        }
        if count == 0 || count > REQUISITION_COUNT_MAX {
            return Err(Refusal::BadRequest("requisition count out of range"));
        }
        if self.segments.len() >= SEGMENTS_MAX {
            return Err(Refusal::Limit("segments"));
        }
        let grant = self
            .grants
            .iter_mut()
            .find(|g| g.taxpayer == taxpayer && g.carved < g.count)
            .ok_or(Refusal::Exhausted)?;
        // A segment stays inside one grant (one invoice code, contiguous numbers), so it
        // may be shorter than asked at the end of a grant.
        let take = count.min(grant.count - grant.carved);
        let first = grant.first + grant.carved;
        grant.carved += take;
        let segment = SegmentState {
            taxpayer: taxpayer.to_string(),
            invoice_code: grant.invoice_code,
            first,
            count: take,
            appliance: format!("{:032x}", holder.appliance),
            shard: holder.shard,
            request_id,
            returned: Vec::new(),
        };
        self.segments.push(segment);
        Ok((self.segments.len() - 1, true))
    }

    /// Marks `first..first+count` of `code`, held by `holder`, returned. Returns whether
    /// the state changed (false for a retried identical return).
    pub fn return_range(
        &mut self,
        taxpayer: &str,
        code: u64,
        first: u32,
        count: u32,
        holder: Holder,
    ) -> Result<bool, Refusal> {
        if !self.serves(taxpayer) {
            return Err(Refusal::UnknownTaxpayer);
        }
        if count == 0 {
            return Err(Refusal::BadRequest("return count is zero"));
        }
        let end = u64::from(first) + u64::from(count);
        let seg = self
            .segments
            .iter_mut()
            .find(|s| {
                s.taxpayer == taxpayer
                    && s.invoice_code == code
                    && first >= s.first
                    && end <= u64::from(s.first) + u64::from(s.count)
            })
            .ok_or(Refusal::NotGranted)?;
        if seg.holder() != holder {
            return Err(Refusal::NotHolder);
        }
        if seg.returned.contains(&(first, count)) {
            return Ok(false);
        }
        if seg
            .returned
            .iter()
            .any(|&(f, c)| ranges_overlap(f, c, first, count))
        {
            return Err(Refusal::ReturnConflict);
        }
        if seg.returned.len() >= RETURNS_PER_SEGMENT_MAX {
            return Err(Refusal::Limit("returned ranges per segment"));
        }
        seg.returned.push((first, count));
        seg.returned.sort_unstable();
        Ok(true)
    }
}

/// Immutable lookup structure over the segments, rebuilt after every requisition or
/// return and shared by `Arc`: the tax-code hot path checks numbers against it without
/// holding any lock.
#[derive(Debug, Default)]
pub struct GrantIndex {
    /// Served taxpayers (index = taxpayer slot used by counters).
    pub taxpayers: Vec<[u8; TAXPAYER_BYTES]>,
    // (code, first, end exclusive, taxpayer slot, returned ranges), sorted by (code, first).
    ranges: Vec<IndexedRange>,
}

#[derive(Debug)]
struct IndexedRange {
    code: u64,
    first: u32,
    end: u64,
    taxpayer: usize,
    returned: Vec<(u32, u32)>,
    holder: Holder,
    /// Index of the segment in `DeviceState::segments` (its coded-mark slot).
    segment: usize,
}

/// The grant ranges and sellers of the last few held numbers
/// ([`GrantIndex::check_hinted`]), so that the next number of one of those segments is
/// checked without a search. A shard's batch interleaves its sellers (each with its own
/// segment), hence several entries. Starts empty; only ever used with the index that
/// filled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantHint {
    entries: [HintEntry; GRANT_HINTS],
    /// Entry the next miss replaces (round robin).
    next: usize,
}

/// Entries of a [`GrantHint`]: more than the sellers a batch usually mixes.
const GRANT_HINTS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HintEntry {
    range: usize,
    seller: [u8; TAXPAYER_BYTES],
    slot: usize,
}

impl Default for GrantHint {
    fn default() -> Self {
        Self {
            entries: [HintEntry {
                range: usize::MAX,
                seller: [0; TAXPAYER_BYTES],
                slot: usize::MAX,
            }; GRANT_HINTS],
            next: 0,
        }
    }
}

/// Outcome of checking one invoice's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumberCheck {
    /// Granted to the seller (and, for a holder's check, to that holder) and not
    /// returned.
    Held {
        /// The seller's taxpayer slot.
        slot: usize,
        /// Index of the segment in `DeviceState::segments`.
        segment: usize,
    },
    /// Granted to the seller, but to another holder.
    NotHolder,
    /// The seller is not served here.
    UnknownTaxpayer,
    /// The number is not in a live segment of this seller.
    NotGranted,
}

impl GrantIndex {
    /// Builds the index of `state`.
    pub fn build(state: &DeviceState) -> Self {
        let taxpayers: Vec<[u8; TAXPAYER_BYTES]> = state
            .taxpayers()
            .iter()
            .map(|t| {
                let mut b = [0u8; TAXPAYER_BYTES];
                let src = t.as_bytes();
                let n = src.len().min(TAXPAYER_BYTES);
                b[..n].copy_from_slice(&src[..n]);
                b
            })
            .collect();
        let mut ranges: Vec<IndexedRange> = state
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| IndexedRange {
                code: s.invoice_code,
                first: s.first,
                end: u64::from(s.first) + u64::from(s.count),
                taxpayer: taxpayers
                    .iter()
                    .position(|t| t == s.taxpayer.as_bytes())
                    .unwrap_or(usize::MAX),
                returned: s.returned.clone(),
                holder: s.holder(),
                segment: i,
            })
            .collect();
        ranges.sort_unstable_by_key(|r| (r.code, r.first));
        Self { taxpayers, ranges }
    }

    /// Slot of a served taxpayer.
    pub fn taxpayer_slot(&self, taxpayer: &[u8; TAXPAYER_BYTES]) -> Option<usize> {
        // Few taxpayers per device: a linear scan beats hashing here.
        self.taxpayers.iter().position(|t| t == taxpayer)
    }

    /// [`GrantIndex::check`] that first tries the ranges in `hint` (recent items'): a
    /// batch's numbers usually run consecutively through one segment per seller, so that
    /// costs a few comparisons instead of the taxpayer scan and the binary search.
    /// Same answer as `check` for every input (segments of one code never overlap, so a
    /// range holding the number is the one the search would find); `hint` is updated
    /// to the range of a held number.
    ///
    /// Unlike `check`, a number held for the seller but granted to another holder than
    /// `holder` is [`NumberCheck::NotHolder`].
    pub fn check_hinted(
        &self,
        hint: &mut GrantHint,
        holder: &Holder,
        seller: &[u8; TAXPAYER_BYTES],
        code: u64,
        number: u32,
    ) -> NumberCheck {
        for entry in &hint.entries {
            let Some(r) = self.ranges.get(entry.range) else {
                continue;
            };
            // The entry's slot is what the taxpayer scan gave for this very seller, and
            // a range holding (code, number) is the one the search would find.
            if entry.seller == *seller
                && r.code == code
                && number >= r.first
                && u64::from(number) < r.end
                && !r.is_returned(number)
                && r.holder == *holder
            {
                return NumberCheck::Held {
                    slot: entry.slot,
                    segment: r.segment,
                };
            }
        }
        let (check, range) = self.check_at(seller, code, number);
        if let (NumberCheck::Held { slot, .. }, Some(range)) = (check, range) {
            if self.ranges[range].holder != *holder {
                return NumberCheck::NotHolder;
            }
            hint.entries[hint.next] = HintEntry {
                range,
                seller: *seller,
                slot,
            };
            hint.next = (hint.next + 1) % GRANT_HINTS;
        }
        check
    }

    /// Checks that `number` of `code` is held for `seller`.
    pub fn check(&self, seller: &[u8; TAXPAYER_BYTES], code: u64, number: u32) -> NumberCheck {
        self.check_at(seller, code, number).0
    }

    /// `check`, with the index of the range that holds the number (for a held one).
    fn check_at(
        &self,
        seller: &[u8; TAXPAYER_BYTES],
        code: u64,
        number: u32,
    ) -> (NumberCheck, Option<usize>) {
        let Some(slot) = self.taxpayer_slot(seller) else {
            return (NumberCheck::UnknownTaxpayer, None);
        };
        // Segments never overlap, so the candidate is the last one starting at or
        // before (code, number).
        let idx = self
            .ranges
            .partition_point(|r| (r.code, r.first) <= (code, number));
        if idx == 0 {
            return (NumberCheck::NotGranted, None);
        }
        let r = &self.ranges[idx - 1];
        let inside = r.code == code && u64::from(number) < r.end && r.taxpayer == slot;
        if inside && !r.is_returned(number) {
            (
                NumberCheck::Held {
                    slot,
                    segment: r.segment,
                },
                Some(idx - 1),
            )
        } else {
            (NumberCheck::NotGranted, None)
        }
    }
}

impl IndexedRange {
    /// Whether `number` lies in one of the returned ranges.
    fn is_returned(&self, number: u32) -> bool {
        self.returned
            .iter()
            .any(|&(f, c)| number >= f && u64::from(number) < u64::from(f) + u64::from(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(shard: u32) -> Holder {
        Holder::new(0xfeed, shard)
    }

    fn tp(s: &str) -> [u8; TAXPAYER_BYTES] {
        s.as_bytes().try_into().unwrap()
    }

    const A: &str = "91110000100000000A";

    fn grants() -> Vec<Grant> {
        vec![
            Grant {
                taxpayer: tp(A),
                invoice_code: 11001,
                first: 1,
                count: 100,
            },
            Grant {
                taxpayer: tp(A),
                invoice_code: 11002,
                first: 500,
                count: 10,
            },
        ]
    }

    #[test]
    fn requisitions_carve_in_order_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeviceState::open(dir.path(), &grants(), "dev").unwrap();
        let (i, changed) = s.requisition(A, 60, h(0), 1).unwrap();
        assert!(changed);
        assert_eq!((s.segments[i].first, s.segments[i].count), (1, 60));
        let (j, _) = s.requisition(A, 60, h(0), 2).unwrap();
        assert_eq!((s.segments[j].first, s.segments[j].count), (61, 40));
        let (k, _) = s.requisition(A, 60, h(1), 2).unwrap();
        assert_eq!(
            (
                s.segments[k].invoice_code,
                s.segments[k].first,
                s.segments[k].count
            ),
            (11002, 500, 10)
        );
        assert_eq!(s.requisition(A, 1, h(1), 3), Err(Refusal::Exhausted));
        assert_eq!(s.requisition(A, 60, h(0), 1), Ok((i, false)));
        s.persist(dir.path()).unwrap();
        let again = DeviceState::open(dir.path(), &grants(), "other").unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn returns_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeviceState::open(dir.path(), &grants(), "dev").unwrap();
        s.requisition(A, 50, h(0), 1).unwrap();
        assert_eq!(s.return_range(A, 11001, 40, 11, h(0)), Ok(true));
        assert_eq!(s.return_range(A, 11001, 40, 11, h(0)), Ok(false));
        assert_eq!(
            s.return_range(A, 11001, 45, 2, h(0)),
            Err(Refusal::ReturnConflict)
        );
        assert_eq!(
            s.return_range(A, 11001, 51, 2, h(0)),
            Err(Refusal::NotGranted)
        );
        let idx = GrantIndex::build(&s);
        assert_eq!(
            idx.check(&tp(A), 11001, 1),
            NumberCheck::Held {
                slot: 0,
                segment: 0
            }
        );
        assert_eq!(
            idx.check(&tp(A), 11001, 39),
            NumberCheck::Held {
                slot: 0,
                segment: 0
            }
        );
        assert_eq!(idx.check(&tp(A), 11001, 40), NumberCheck::NotGranted);
        assert_eq!(idx.check(&tp(A), 11001, 51), NumberCheck::NotGranted);
        assert_eq!(idx.check(&tp(A), 11002, 500), NumberCheck::NotGranted);
        assert_eq!(
            idx.check(&tp("91110000100000001X"), 11001, 1),
            NumberCheck::UnknownTaxpayer
        );
    }

    /// `check_hinted` answers exactly as `check`, whatever the hint holds: a walk over
    /// numbers in and around every segment, two sellers, returned ranges, and hints left
    /// by every kind of earlier answer.
    #[test]
    fn hinted_check_equals_check() {
        const B: &str = "91110000100000001X";
        let dir = tempfile::tempdir().unwrap();
        let mut g = grants();
        g.push(Grant {
            taxpayer: tp(B),
            invoice_code: 11001,
            first: 200,
            count: 100,
        });
        let mut s = DeviceState::open(dir.path(), &g, "dev").unwrap();
        s.requisition(A, 30, h(0), 1).unwrap();
        s.requisition(A, 30, h(0), 2).unwrap();
        s.requisition(A, 5, h(1), 3).unwrap();
        s.requisition(B, 50, h(0), 4).unwrap();
        s.requisition(B, 20, h(0), 5).unwrap();
        s.return_range(A, 11001, 10, 5, h(0)).unwrap();
        s.return_range(B, 11001, 260, 3, h(0)).unwrap();
        let idx = GrantIndex::build(&s);
        let sellers = [tp(A), tp(B), tp("91110000100000002Y")];
        let mut probes = Vec::new();
        for code in [11000, 11001, 11002, 11003] {
            for number in (0..320).chain(495..520) {
                for seller in &sellers {
                    probes.push((*seller, code, number));
                }
            }
        }
        // Interleave probes in a scrambled order so hints come from every kind of answer.
        let mut hint = GrantHint::default();
        let n = probes.len();
        let mut held = 0;
        for i in 0..n * 3 {
            let (seller, code, number) = probes[(i * 7_919) % n];
            let holder = h((i % 2) as u32);
            let want = expected(&idx, &holder, &seller, code, number);
            held += usize::from(matches!(want, NumberCheck::Held { .. }));
            assert_eq!(
                idx.check_hinted(&mut hint, &holder, &seller, code, number),
                want,
                "{seller:?} {code} {number}"
            );
        }
        // In order, as a batch usually is.
        for &(seller, code, number) in &probes {
            assert_eq!(
                idx.check_hinted(&mut hint, &h(0), &seller, code, number),
                expected(&idx, &h(0), &seller, code, number)
            );
        }
        assert!(held > 0);
    }

    /// What `check_hinted` must answer: `check`, with a number held for another holder
    /// answered `NotHolder`.
    fn expected(
        idx: &GrantIndex,
        holder: &Holder,
        seller: &[u8; TAXPAYER_BYTES],
        code: u64,
        number: u32,
    ) -> NumberCheck {
        match idx.check(seller, code, number) {
            NumberCheck::Held { segment, .. }
                if idx
                    .ranges
                    .iter()
                    .any(|r| r.segment == segment && r.holder != *holder) =>
            {
                NumberCheck::NotHolder
            }
            other => other,
        }
    }

    #[test]
    fn another_holders_numbers_and_returns_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeviceState::open(dir.path(), &grants(), "dev").unwrap();
        let (i, _) = s.requisition(A, 10, h(0), 1).unwrap();
        // The same shard number of another appliance is another holder: a new segment,
        // not a replay of the first one.
        let other = Holder::new(0xbeef, 0);
        let (j, changed) = s.requisition(A, 10, other, 1).unwrap();
        assert!(changed && i != j);
        let idx = GrantIndex::build(&s);
        let mut hint = GrantHint::default();
        assert_eq!(
            idx.check_hinted(&mut hint, &other, &tp(A), 11001, 1),
            NumberCheck::NotHolder
        );
        assert_eq!(
            idx.check_hinted(&mut hint, &h(0), &tp(A), 11001, 1),
            NumberCheck::Held {
                slot: 0,
                segment: i
            }
        );
        assert_eq!(
            s.return_range(A, 11001, 5, 6, other),
            Err(Refusal::NotHolder)
        );
        assert_eq!(s.return_range(A, 11001, 5, 6, h(0)), Ok(true));
    }

    #[test]
    fn conflicting_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DeviceState::open(dir.path(), &grants(), "dev").unwrap();
        let mut g = grants();
        g[0].count = 99;
        assert!(matches!(
            DeviceState::open(dir.path(), &g, "dev"),
            Err(StateError::Conflict(_))
        ));
    }
}
