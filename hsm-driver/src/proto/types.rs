//! The command set's value types: who holds a segment, segments, fault switches,
//! inventory scopes, the fixed-size `TaxCodes` result item, the structured answers, and
//! the [`Request`] and [`Response`] enums themselves (their codecs are in `request.rs` and
//! `response.rs`).

use super::*;

/// Who holds a segment: one shard of one appliance. The appliance id is the random 128-bit
/// id of the appliance's data dir, so a second appliance, or the same host after its data
/// dir was wiped, is another holder even with the same shard numbers: it can neither adopt
/// nor code the numbers of a segment granted to someone else.
///
/// Wire layout (20 bytes): `appliance` u128 @0, `shard` u32 @16, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Holder {
    /// The appliance's id (from its data dir).
    pub appliance: u128,
    /// The shard within the appliance.
    pub shard: u32,
}

impl Holder {
    /// A holder.
    pub fn new(appliance: u128, shard: u32) -> Self {
        Self { appliance, shard }
    }

    /// Appends the 20-byte wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// The 20-byte wire form.
    pub fn to_bytes(&self) -> [u8; HOLDER_BYTES] {
        let mut b = [0u8; HOLDER_BYTES];
        b[..16].copy_from_slice(&self.appliance.to_le_bytes());
        b[16..].copy_from_slice(&self.shard.to_le_bytes());
        b
    }

    /// Reads the 20-byte wire form.
    pub fn from_bytes(b: &[u8; HOLDER_BYTES]) -> Self {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[..16]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[16..]);
        Self {
            appliance: u128::from_le_bytes(a),
            shard: u32::from_le_bytes(s),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}/{}", self.appliance, self.shard)
    }
}

/// An 18-character unified social credit code, ASCII.
pub type Taxpayer = [u8; TAXPAYER_BYTES];

/// A number segment: `count` consecutive numbers from `first` under invoice `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Segment {
    /// Invoice code (12 decimal digits).
    pub code: u64,
    /// First invoice number of the segment.
    pub first: u32,
    /// Numbers in the segment.
    pub count: u32,
}

impl Segment {
    /// Whether `number` under `code` lies in this segment.
    pub fn contains(&self, code: u64, number: u32) -> bool {
        code == self.code
            && number >= self.first
            && u64::from(number) < u64::from(self.first) + u64::from(self.count)
    }
}

/// Fault switches of the emulator (`SetFaults`). All zero = no faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FaultConfig {
    /// Added latency per command, microseconds.
    pub latency_us: u32,
    /// Drop every n-th accepted connection (0 = never).
    pub drop_every_nth_connection: u32,
    /// Refuse every command with [`Status::Busy`] (0 = no, 1 = yes).
    pub refuse: u8,
    /// Stall (stop reading) for this long once, milliseconds.
    pub stall_ms: u32,
    /// Reset all open connections now (0 = no, 1 = yes).
    pub reset_connections: u8,
}

/// Whether an `Inventory` asks about one taxpayer or all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InventoryScope {
    /// Every taxpayer the device serves.
    All,
    /// One taxpayer.
    Taxpayer(Taxpayer),
    /// Every taxpayer, listing only the segments of one holder: what a starting appliance
    /// shard adopts and reconciles with its journal.
    Holder(Holder),
}

/// One `TaxCodes` result, 56 bytes on the wire, read in place from the response body.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct TaxCodeItem {
    /// A [`TaxCodeStatus`] byte.
    pub status: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// The tax control code (zero unless ok).
    pub tax_code: TaxCode,
    /// The 20-digit check code (zero bytes unless ok).
    pub check_code: CheckCode,
}

const _: () = assert!(core::mem::size_of::<TaxCodeItem>() == TAX_CODE_ITEM_BYTES);
const _: () = assert!(CHECK_CODE_DIGITS == 20);

impl TaxCodeItem {
    /// A successful result.
    pub fn ok(tax_code: TaxCode, check_code: CheckCode) -> Self {
        Self {
            status: TaxCodeStatus::Ok as u8,
            reserved: [0; 3],
            tax_code,
            check_code,
        }
    }

    /// A failed result with zero codes.
    pub fn failed(status: TaxCodeStatus) -> Self {
        Self {
            status: status as u8,
            reserved: [0; 3],
            tax_code: [0; TAX_CODE_BYTES],
            check_code: [0; CHECK_CODE_DIGITS],
        }
    }

    /// The typed status (decoded items are validated, so this is `Some` for them).
    pub fn status(&self) -> Option<TaxCodeStatus> {
        TaxCodeStatus::from_u8(self.status)
    }
}

/// `DeviceInfo` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device identifier (serial), UTF-8, at most [`DEVICE_STRING_BYTES_MAX`].
    pub device_id: String,
    /// Firmware version, UTF-8, at most [`DEVICE_STRING_BYTES_MAX`].
    pub firmware: String,
    /// The device's SM2 public key, uncompressed SEC1.
    pub sm2_public_key: [u8; SM2_PUBLIC_KEY_BYTES],
    /// The tax-code algorithm.
    pub tax_code_algorithm: TaxCodeAlgorithm,
    /// Largest `TaxCodes` batch the device accepts.
    pub batch_max: u32,
    /// Taxpayers the device serves, at most [`TAXPAYERS_MAX`].
    pub taxpayers: Vec<Taxpayer>,
}

/// A segment held by a caller, as listed by `Inventory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeldSegment {
    /// The segment.
    pub segment: Segment,
    /// Holder it was granted to.
    pub holder: Holder,
    /// The requisition's request id, so that a restarted holder can match it to its own
    /// pending requisition.
    pub request_id: u64,
    /// Coded mark: one past the highest number of the segment the device has given a tax
    /// code (0 when none). Every number below it may have been coded, so a holder whose
    /// journal lost them (a crash between TaxCodes and the commit, a damaged last commit)
    /// must never use them again.
    pub coded_end: u32,
}

/// `Inventory` answer for one taxpayer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaxpayerInventory {
    /// The taxpayer.
    pub taxpayer: Taxpayer,
    /// Numbers still in the device, not granted.
    pub remaining: u64,
    /// Tax codes issued since the device was initialised.
    pub issued: u64,
    /// Invoices uploaded since the device was initialised.
    pub uploaded: u64,
    /// Segments granted and not returned, at most [`INVENTORY_SEGMENTS_MAX`].
    pub segments: Vec<HeldSegment>,
}

/// `ReportAndClear` answer: counters since the previous clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PeriodReport {
    /// The taxpayer.
    pub taxpayer: Taxpayer,
    /// Start of the period (the previous clear), ms since the Unix epoch.
    pub period_start_ms: u64,
    /// End of the period as requested, ms since the Unix epoch.
    pub period_end_ms: u64,
    /// Blue invoices given tax codes in the period.
    pub blue_count: u64,
    /// Red invoices given tax codes in the period.
    pub red_count: u64,
    /// Invoices uploaded in the period.
    pub uploaded_count: u64,
    /// Sum of amounts (tax excluded), fen; red invoices count negative.
    pub amount_fen: i64,
    /// Sum of taxes, fen.
    pub tax_fen: i64,
    /// Sum of totals, fen.
    pub total_fen: i64,
}

/// A command to the tax server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Device identity and capabilities.
    DeviceInfo,
    /// A new segment of `count` numbers for `taxpayer`, granted to `holder`. A retry with
    /// the same `(holder, request_id)` gets the same segment.
    Requisition {
        /// Seller.
        taxpayer: Taxpayer,
        /// Numbers wanted.
        count: u32,
        /// Holder (appliance id, shard).
        holder: Holder,
        /// Caller-chosen idempotency key of this requisition.
        request_id: u64,
    },
    /// Give back the unused `segment` of `taxpayer`, held by `holder`.
    ReturnSegment {
        /// Seller.
        taxpayer: Taxpayer,
        /// The unused segment (may be the tail of a granted one).
        segment: Segment,
        /// The holder the segment was granted to (the device refuses another's).
        holder: Holder,
    },
    /// Tax codes for a batch of canonical invoices.
    TaxCodes(InvoiceBatch),
    /// SM2 signature of a digest.
    Sign {
        /// The 32-byte digest (e.g. a batch Merkle root).
        digest: [u8; 32],
    },
    /// Upload issued invoices.
    Upload(UploadBatch),
    /// Report the period ending at `period_end_ms` and clear the counters.
    ReportAndClear {
        /// Seller.
        taxpayer: Taxpayer,
        /// End of the period, ms since the Unix epoch.
        period_end_ms: u64,
    },
    /// Inventory of one taxpayer or all.
    Inventory(InventoryScope),
    /// Echo these bytes.
    Nop(Vec<u8>),
    /// Set the emulator's fault switches.
    SetFaults(FaultConfig),
}

/// A successful answer of the tax server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to [`Request::DeviceInfo`].
    DeviceInfo(DeviceInfo),
    /// The granted segment.
    Requisition(Segment),
    /// The segment was returned.
    ReturnSegment,
    /// One result per invoice, in request order.
    TaxCodes(Vec<TaxCodeItem>),
    /// SM2 signature `r ‖ s`.
    Sign([u8; SM2_SIGNATURE_BYTES]),
    /// One status per item, in request order.
    Upload(Vec<UploadStatus>),
    /// The period's counters.
    ReportAndClear(PeriodReport),
    /// Per-taxpayer inventory.
    Inventory(Vec<TaxpayerInventory>),
    /// The echoed bytes.
    Nop(Vec<u8>),
    /// The faults are set.
    SetFaults,
}

/// A non-ok answer: the device's status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    /// The status (never [`Status::Ok`]).
    pub status: Status,
    /// Human-readable detail, at most [`ERROR_MESSAGE_BYTES_MAX`] bytes.
    pub message: String,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}
