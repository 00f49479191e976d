//! The tax-server command set and its wire codec, sans-IO.
//!
//! A frame is a 24-byte [`FrameHeader`] followed by `body_len` bytes of body, all
//! little-endian (docs/design/foundation.md, "Tax server command set"). Requests carry an
//! [`Opcode`]; responses carry the request's opcode with [`RESPONSE_FLAG`] set, the same
//! correlation id, and a [`Status`]. A non-ok response's body is a bounded UTF-8 message.
//!
//! - Encoding appends to a caller-provided `Vec<u8>` so that a writer can queue many frames
//!   into one buffer and send them with one system call.
//! - Decoding takes `&[u8]`, checks every length against the bytes present and against the
//!   named limits before allocating, and returns a typed [`DecodeError`]; no input panics.
//! - [`FrameDecoder`] reassembles frames from a byte stream delivered in arbitrary chunks
//!   and is shared by the TCP client and the emulator.
//!
//! The hot path is `TaxCodes`: an [`InvoiceBatch`] keeps the items in their wire layout in
//! one contiguous buffer (plus an offset table), so encoding a batch is one copy and a
//! decoded batch hands out borrowed item slices; the per-item results are a slice of the
//! fixed 56-byte [`TaxCodeItem`] read in place with zerocopy.

use std::fmt;

use appliance_core::canonical::CANONICAL_BYTES_MAX;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::crypto::{
    CheckCode, TaxCode, TaxCodeAlgorithm, CHECK_CODE_DIGITS, SM2_PUBLIC_KEY_BYTES,
    SM2_SIGNATURE_BYTES, TAX_CODE_BYTES,
};

/// Magic at the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TXSV";
/// Protocol version written and accepted by this build.
/// Version 2: every grant, return and TaxCodes command names its holder as (appliance id,
/// shard) ([`Holder`]), and `Inventory` reports each held segment's coded mark.
pub const PROTOCOL_VERSION: u8 = 2;
/// Bytes of [`FrameHeader`].
pub const FRAME_HEADER_BYTES: usize = 24;
/// Largest frame body: bounds the memory one frame can make a peer allocate.
pub const FRAME_BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Set in the opcode of every response.
pub const RESPONSE_FLAG: u8 = 0x80;
/// Most invoices in one `TaxCodes` command (a shard's tick is at most this big).
pub const TAX_CODES_BATCH_MAX: usize = 4096;
/// Most invoices in one `Upload` command.
pub const UPLOAD_BATCH_MAX: usize = 4096;
/// Largest canonical invoice accepted as a batch item (the core's own bound).
pub const INVOICE_BYTES_MAX: usize = CANONICAL_BYTES_MAX;
/// Largest UTF-8 message of an error response; longer messages are cut at a character
/// boundary when encoded.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;
/// Largest device id or firmware string in `DeviceInfo`.
pub const DEVICE_STRING_BYTES_MAX: usize = 64;
/// Most taxpayers one device serves (bounds `DeviceInfo` and `Inventory`).
pub const TAXPAYERS_MAX: usize = 4096;
/// Most segments listed per taxpayer in an `Inventory` answer.
pub const INVENTORY_SEGMENTS_MAX: usize = 65_536;
/// Largest `Nop` payload.
pub const NOP_BYTES_MAX: usize = FRAME_BODY_BYTES_MAX;
/// Bytes of a taxpayer id (unified social credit code).
pub const TAXPAYER_BYTES: usize = 18;
/// Bytes of one `TaxCodes` result item.
pub const TAX_CODE_ITEM_BYTES: usize = 56;
/// Bytes of a [`Holder`] on the wire.
pub const HOLDER_BYTES: usize = 20;

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

/// The fixed 24-byte frame header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    /// [`FRAME_MAGIC`].
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// Request opcode, or request opcode | [`RESPONSE_FLAG`] in a response.
    pub opcode: u8,
    /// Responses: a [`Status`] code (0 = ok). Requests: 0.
    pub status: U16,
    /// Chosen by the requester, echoed by the response; matches responses to requests.
    pub correlation_id: U64,
    /// Bytes of body after the header, at most [`FRAME_BODY_BYTES_MAX`].
    pub body_len: U32,
    /// CRC32C (Castagnoli) of the body: catches corruption between the two processes'
    /// buffers, which TCP's 16-bit checksum does not reliably do.
    pub body_crc32c: U32,
}

const _: () = assert!(core::mem::size_of::<FrameHeader>() == FRAME_HEADER_BYTES);

impl FrameHeader {
    /// A header for `body` with the given fields; computes the length and CRC.
    pub fn new(opcode: u8, status: u16, correlation_id: u64, body: &[u8]) -> Self {
        Self {
            magic: FRAME_MAGIC,
            version: PROTOCOL_VERSION,
            opcode,
            status: U16::new(status),
            correlation_id: U64::new(correlation_id),
            // Callers check the body bound first; saturating keeps this total anyway.
            body_len: U32::new(u32::try_from(body.len()).unwrap_or(u32::MAX)),
            body_crc32c: U32::new(crc32c::crc32c(body)),
        }
    }

    /// Whether this header is a response (opcode has [`RESPONSE_FLAG`]).
    pub fn is_response(&self) -> bool {
        self.opcode & RESPONSE_FLAG != 0
    }

    /// The command opcode without the response flag.
    pub fn command(&self) -> u8 {
        self.opcode & !RESPONSE_FLAG
    }

    /// The correlation id.
    pub fn correlation_id(&self) -> u64 {
        self.correlation_id.get()
    }

    /// The body length.
    pub fn body_len(&self) -> usize {
        self.body_len.get() as usize
    }
}

/// Command opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Device identity, public key and capabilities.
    DeviceInfo = 1,
    /// Obtain a number segment from the device's inventory.
    Requisition = 2,
    /// Give an unused segment back.
    ReturnSegment = 3,
    /// Tax control codes for a batch of canonical invoices.
    TaxCodes = 4,
    /// SM2 signature of a 32-byte digest.
    Sign = 5,
    /// Upload issued invoices to the authority.
    Upload = 6,
    /// Period report and counter clear.
    ReportAndClear = 7,
    /// Inventory and grants per taxpayer.
    Inventory = 8,
    /// Echo (transport cost measurement).
    Nop = 9,
    /// Emulator fault injection.
    SetFaults = 10,
}

impl Opcode {
    /// All opcodes, in numeric order.
    pub const ALL: [Opcode; 10] = [
        Opcode::DeviceInfo,
        Opcode::Requisition,
        Opcode::ReturnSegment,
        Opcode::TaxCodes,
        Opcode::Sign,
        Opcode::Upload,
        Opcode::ReportAndClear,
        Opcode::Inventory,
        Opcode::Nop,
        Opcode::SetFaults,
    ];

    /// The opcode of a request byte, `None` if unknown (or if it has the response flag).
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|op| *op as u8 == byte)
    }

    /// The byte of this opcode in a request.
    pub fn request_byte(self) -> u8 {
        self as u8
    }

    /// The byte of this opcode in a response.
    pub fn response_byte(self) -> u8 {
        self as u8 | RESPONSE_FLAG
    }
}

/// Device status codes of a response (whole command).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Success; the body is the command's response.
    Ok = 0,
    /// The request body does not decode.
    Malformed = 1,
    /// The opcode is not a known command.
    UnknownCommand = 2,
    /// The frame's protocol version is not supported.
    UnsupportedVersion = 3,
    /// The taxpayer is not served by this device.
    UnknownTaxpayer = 4,
    /// The device's inventory for the taxpayer cannot cover the requested count.
    InventoryExhausted = 5,
    /// A number was not granted to the caller (whole-command form).
    NumberNotGranted = 6,
    /// The batch exceeds the device's batch limit.
    BatchTooLarge = 7,
    /// The returned segment is not held by the caller.
    SegmentNotHeld = 8,
    /// The key needed for the command is not available (token missing or locked).
    KeyUnavailable = 9,
    /// The command is not allowed (e.g. `SetFaults` without fault injection enabled).
    Forbidden = 10,
    /// An internal device error.
    Internal = 11,
    /// The device refuses work for now (overloaded or told to refuse); retry later.
    Busy = 12,
    /// The device could not make its state durable; nothing was granted.
    StorageFailure = 13,
    /// The frame body failed its CRC32C.
    ChecksumMismatch = 14,
    /// A retried requisition reused a request id with different parameters.
    RequestIdConflict = 15,
}

impl Status {
    /// All statuses, in numeric order.
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::Malformed,
        Status::UnknownCommand,
        Status::UnsupportedVersion,
        Status::UnknownTaxpayer,
        Status::InventoryExhausted,
        Status::NumberNotGranted,
        Status::BatchTooLarge,
        Status::SegmentNotHeld,
        Status::KeyUnavailable,
        Status::Forbidden,
        Status::Internal,
        Status::Busy,
        Status::StorageFailure,
        Status::ChecksumMismatch,
        Status::RequestIdConflict,
    ];

    /// The status of a wire code, `None` if unknown.
    pub fn from_u16(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u16 == code)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Per-item status of a `TaxCodes` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TaxCodeStatus {
    /// The tax and check codes are valid.
    Ok = 0,
    /// The item is not a well-formed canonical invoice.
    MalformedInvoice = 1,
    /// The number is not inside a segment granted to the caller and not returned.
    NumberNotGranted = 2,
    /// The seller is not served by this device.
    UnknownTaxpayer = 3,
    /// The number lies in a segment granted to another holder (another appliance, or
    /// another shard): coding it would let two issuers use one number.
    NotHolder = 4,
}

impl TaxCodeStatus {
    /// The status of a wire byte, `None` if unknown.
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Ok),
            1 => Some(Self::MalformedInvoice),
            2 => Some(Self::NumberNotGranted),
            3 => Some(Self::UnknownTaxpayer),
            4 => Some(Self::NotHolder),
            _ => None,
        }
    }
}

/// Per-item status of an `Upload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum UploadStatus {
    /// Stored for the authority.
    Accepted = 0,
    /// Already uploaded with the same bytes and tax code (a retry): safe to forget.
    Duplicate = 1,
    /// The tax code does not verify under the device key.
    Forged = 2,
    /// The number was never granted to this device.
    NotGranted = 3,
    /// A different invoice was already uploaded under this code and number.
    Conflict = 4,
    /// The item is not a well-formed canonical invoice.
    Malformed = 5,
}

impl UploadStatus {
    /// The status of a wire byte, `None` if unknown.
    pub fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::Accepted),
            1 => Some(Self::Duplicate),
            2 => Some(Self::Forged),
            3 => Some(Self::NotGranted),
            4 => Some(Self::Conflict),
            5 => Some(Self::Malformed),
            _ => None,
        }
    }
}

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with [`FRAME_MAGIC`] (stream out of sync).
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame's protocol version is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// `body_len` exceeds [`FRAME_BODY_BYTES_MAX`].
    #[error("frame body of {0} bytes exceeds the limit")]
    BodyTooLarge(u32),
    /// The body's CRC32C does not match the header.
    #[error("body checksum mismatch (header {expected:#010x}, body {actual:#010x})")]
    BodyChecksum {
        /// CRC in the header.
        expected: u32,
        /// CRC of the bytes received.
        actual: u32,
    },
    /// The opcode is not a known command.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// A request arrived where a response was expected, or the reverse, or a response
    /// names another command than its request.
    #[error("unexpected opcode {0:#04x}")]
    UnexpectedOpcode(u8),
    /// The status code is not a known [`Status`].
    #[error("unknown status {0}")]
    UnknownStatus(u16),
    /// The body ends before `field` is complete.
    #[error("body truncated in {0}")]
    Truncated(&'static str),
    /// Bytes remain after the last field.
    #[error("{0} trailing bytes after the body")]
    TrailingBytes(usize),
    /// A count or length exceeds its limit.
    #[error("{what} is {value}, limit {max}")]
    LimitExceeded {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A string field is not UTF-8.
    #[error("{0} is not UTF-8")]
    InvalidUtf8(&'static str),
    /// A field has a value outside its domain (unknown enum byte, non-zero reserved).
    #[error("invalid {what}: {value}")]
    InvalidValue {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A count or length exceeds its limit.
    #[error("{what} is {value}, limit {max}")]
    LimitExceeded {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// An error response was requested with [`Status::Ok`].
    #[error("an error response needs a non-ok status")]
    OkIsNotAnError,
}

fn limit(what: &'static str, value: usize, max: usize) -> Result<(), EncodeError> {
    if value > max {
        Err(EncodeError::LimitExceeded {
            what,
            value: value as u64,
            max: max as u64,
        })
    } else {
        Ok(())
    }
}

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

/// What a TaxCodes batch's limit errors name.
const TAX_CODES_ITEMS: &str = "tax codes batch items";

/// One canonical-invoice batch in its wire layout (`len u16 + bytes` per item, optionally
/// followed by a fixed-size suffix), with an offset table. Shared by [`InvoiceBatch`]
/// and [`UploadBatch`].
#[derive(Clone, Default, PartialEq, Eq)]
struct RawBatch {
    /// Items exactly as on the wire, without the leading count.
    wire: Vec<u8>,
    /// Offset in `wire` of each item's length prefix.
    starts: Vec<u32>,
}

impl RawBatch {
    fn with_capacity(items: usize, bytes: usize) -> Self {
        Self {
            wire: Vec::with_capacity(bytes),
            starts: Vec::with_capacity(items),
        }
    }

    fn clear(&mut self) {
        self.wire.clear();
        self.starts.clear();
    }

    fn push(
        &mut self,
        item_max: usize,
        invoice: &[u8],
        suffix: &[u8],
        what: &'static str,
    ) -> Result<(), EncodeError> {
        limit(what, self.starts.len() + 1, item_max)?;
        limit("invoice bytes", invoice.len(), INVOICE_BYTES_MAX)?;
        let added = 2 + invoice.len() + suffix.len();
        // Keep the whole body (count prefix + items) within a frame.
        limit(
            "batch body bytes",
            4 + self.wire.len() + added,
            FRAME_BODY_BYTES_MAX,
        )?;
        let start = self.wire.len();
        // `invoice.len() <= INVOICE_BYTES_MAX < u16::MAX` was checked above.
        self.wire
            .extend_from_slice(&(invoice.len() as u16).to_le_bytes());
        self.wire.extend_from_slice(invoice);
        self.wire.extend_from_slice(suffix);
        self.starts.push(start as u32);
        Ok(())
    }

    fn push_with(
        &mut self,
        item_max: usize,
        what: &'static str,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), EncodeError> {
        limit(what, self.starts.len() + 1, item_max)?;
        let start = self.wire.len();
        self.wire.extend_from_slice(&[0, 0]);
        write(&mut self.wire);
        let len = self.wire.len() - start - 2;
        let checked = limit("invoice bytes", len, INVOICE_BYTES_MAX).and_then(|()| {
            limit(
                "batch body bytes",
                4 + self.wire.len(),
                FRAME_BODY_BYTES_MAX,
            )
        });
        if let Err(e) = checked {
            // Leave the batch exactly as it was before the failed push.
            self.wire.truncate(start);
            return Err(e);
        }
        self.wire[start..start + 2].copy_from_slice(&(len as u16).to_le_bytes());
        self.starts.push(start as u32);
        Ok(())
    }

    fn len(&self) -> usize {
        self.starts.len()
    }

    /// Item `i`: the invoice bytes and the suffix.
    fn get(&self, i: usize, suffix_len: usize) -> Option<(&[u8], &[u8])> {
        let start = *self.starts.get(i)? as usize;
        let len = u16::from_le_bytes([*self.wire.get(start)?, *self.wire.get(start + 1)?]);
        let body = start + 2;
        let end = body + len as usize;
        Some((
            self.wire.get(body..end)?,
            self.wire.get(end..end + suffix_len)?,
        ))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.starts.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.wire);
    }

    /// Parses `count u32, then count x (len u16 + bytes + suffix)` and must consume all of
    /// `body`.
    fn decode(
        body: &[u8],
        item_max: usize,
        suffix_len: usize,
        what: &'static str,
    ) -> Result<Self, DecodeError> {
        let mut starts = Vec::new();
        let (_, wire) = Self::walk(body, item_max, suffix_len, what, Some(&mut starts))?;
        Ok(Self {
            wire: wire.to_vec(),
            starts,
        })
    }

    /// Checks the layout [`RawBatch::decode`] accepts, with the same errors, without
    /// copying anything; with `starts`, each item's offset in the wire bytes is pushed
    /// there. Returns the count and the wire bytes (the body after the count).
    fn walk<'a>(
        body: &'a [u8],
        item_max: usize,
        suffix_len: usize,
        what: &'static str,
        mut starts: Option<&mut Vec<u32>>,
    ) -> Result<(usize, &'a [u8]), DecodeError> {
        let mut r = Reader::new(body);
        let count = r.u32("batch count")? as usize;
        if count > item_max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: count as u64,
                max: item_max as u64,
            });
        }
        if let Some(starts) = starts.as_deref_mut() {
            starts.reserve_exact(count);
        }
        let wire = r.rest();
        let mut pos = 0usize;
        for _ in 0..count {
            let len_bytes = wire
                .get(pos..pos + 2)
                .ok_or(DecodeError::Truncated("item length"))?;
            let len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
            if len > INVOICE_BYTES_MAX {
                return Err(DecodeError::LimitExceeded {
                    what: "invoice bytes",
                    value: len as u64,
                    max: INVOICE_BYTES_MAX as u64,
                });
            }
            let end = pos + 2 + len + suffix_len;
            if end > wire.len() {
                return Err(DecodeError::Truncated("item"));
            }
            // `wire.len() <= FRAME_BODY_BYTES_MAX` fits u32 for frames from the decoder; a
            // caller handing a larger slice gets a limit error instead of a wrapped offset.
            let start = u32::try_from(pos).map_err(|_| DecodeError::LimitExceeded {
                what: "batch body bytes",
                value: pos as u64,
                max: u32::MAX as u64,
            })?;
            if let Some(starts) = starts.as_deref_mut() {
                starts.push(start);
            }
            pos = end;
        }
        if pos != wire.len() {
            return Err(DecodeError::TrailingBytes(wire.len() - pos));
        }
        Ok((count, wire))
    }
}

/// Walks a validated batch's wire bytes item by item (no offset-table lookups).
#[derive(Debug, Clone)]
struct RawIter<'a> {
    wire: &'a [u8],
    remaining: usize,
    suffix_len: usize,
}

impl<'a> RawIter<'a> {
    fn new(raw: &'a RawBatch, suffix_len: usize) -> Self {
        Self {
            wire: &raw.wire,
            remaining: raw.starts.len(),
            suffix_len,
        }
    }
}

impl<'a> Invoices<'a> {
    /// Checks a `TaxCodes` request body exactly as [`Request::decode`] does (same
    /// errors) and iterates its invoices in place: no copy of the body and no offset
    /// table. The emulator's hot path uses it instead of building an [`InvoiceBatch`].
    pub fn decode(body: &'a [u8]) -> Result<(Holder, Self), DecodeError> {
        let (holder, rest) = split_holder(body)?;
        let (count, wire) = RawBatch::walk(rest, TAX_CODES_BATCH_MAX, 0, TAX_CODES_ITEMS, None)?;
        Ok((
            holder,
            Self {
                raw: RawIter {
                    wire,
                    remaining: count,
                    suffix_len: 0,
                },
            },
        ))
    }
}

impl<'a> Iterator for RawIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // Batches are validated on push and on decode, so the `?`s never stop early; they
        // keep a corrupted batch from panicking.
        let len = u16::from_le_bytes([*self.wire.first()?, *self.wire.get(1)?]) as usize;
        let end = 2 + len + self.suffix_len;
        let item = self.wire.get(2..2 + len)?;
        let suffix = self.wire.get(2 + len..end)?;
        self.wire = self.wire.get(end..)?;
        self.remaining -= 1;
        Some((item, suffix))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// Iterator over the canonical invoices of an [`InvoiceBatch`].
#[derive(Debug, Clone)]
pub struct Invoices<'a> {
    raw: RawIter<'a>,
}

impl<'a> Iterator for Invoices<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        self.raw.next().map(|(invoice, _)| invoice)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.raw.size_hint()
    }
}

impl ExactSizeIterator for Invoices<'_> {}

/// Iterator over the `(canonical invoice, tax code)` items of an [`UploadBatch`].
#[derive(Debug, Clone)]
pub struct UploadItems<'a> {
    raw: RawIter<'a>,
}

impl<'a> Iterator for UploadItems<'a> {
    type Item = (&'a [u8], TaxCode);

    fn next(&mut self) -> Option<Self::Item> {
        let (invoice, suffix) = self.raw.next()?;
        Some((invoice, suffix.try_into().ok()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.raw.size_hint()
    }
}

impl ExactSizeIterator for UploadItems<'_> {}

/// The invoices of a `TaxCodes` command: canonical invoices in one contiguous buffer in
/// their wire layout, so that encoding is one copy and a shard can reuse the allocation
/// tick after tick ([`InvoiceBatch::clear`]).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InvoiceBatch {
    holder: Holder,
    raw: RawBatch,
}

impl InvoiceBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `items` invoices of `bytes` total.
    pub fn with_capacity(items: usize, bytes: usize) -> Self {
        Self {
            holder: Holder::default(),
            raw: RawBatch::with_capacity(items, bytes + 2 * items),
        }
    }

    /// The holder the batch is coded for: the device codes only numbers of segments
    /// granted to it (others get [`TaxCodeStatus::NotHolder`]).
    pub fn holder(&self) -> Holder {
        self.holder
    }

    /// Sets the holder (kept by [`InvoiceBatch::clear`]).
    pub fn set_holder(&mut self, holder: Holder) {
        self.holder = holder;
    }

    /// Removes every item, keeping the allocation and the holder.
    pub fn clear(&mut self) {
        self.raw.clear();
    }

    /// Appends one canonical invoice. Fails when the batch is full
    /// ([`TAX_CODES_BATCH_MAX`]), the invoice exceeds [`INVOICE_BYTES_MAX`], or the body
    /// would exceed [`FRAME_BODY_BYTES_MAX`].
    pub fn push(&mut self, canonical: &[u8]) -> Result<(), EncodeError> {
        self.raw
            .push(TAX_CODES_BATCH_MAX, canonical, &[], TAX_CODES_ITEMS)
    }

    /// Appends one invoice written in place by `write` (which appends its canonical bytes
    /// to the vector it is given), saving the copy from a scratch buffer. On error the
    /// batch is unchanged.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), EncodeError> {
        self.raw
            .push_with(TAX_CODES_BATCH_MAX, TAX_CODES_ITEMS, write)
    }

    /// Number of invoices.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether there are no invoices.
    pub fn is_empty(&self) -> bool {
        self.raw.len() == 0
    }

    /// Invoice `i`'s canonical bytes.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        self.raw.get(i, 0).map(|(invoice, _)| invoice)
    }

    /// The invoices in order.
    pub fn iter(&self) -> Invoices<'_> {
        Invoices {
            raw: RawIter::new(&self.raw, 0),
        }
    }

    /// Body bytes this batch encodes to.
    pub fn encoded_len(&self) -> usize {
        4 + self.raw.wire.len()
    }
}

impl fmt::Debug for InvoiceBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InvoiceBatch")
            .field("holder", &self.holder)
            .field("items", &self.len())
            .field("bytes", &self.raw.wire.len())
            .finish()
    }
}

/// The items of an `Upload` command: canonical invoice and its tax code, in wire layout.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UploadBatch {
    raw: RawBatch,
}

impl UploadBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes every item, keeping the allocation.
    pub fn clear(&mut self) {
        self.raw.clear();
    }

    /// Appends one issued invoice with its tax code. Fails when the batch is full
    /// ([`UPLOAD_BATCH_MAX`]), the invoice exceeds [`INVOICE_BYTES_MAX`], or the body
    /// would exceed [`FRAME_BODY_BYTES_MAX`].
    pub fn push(&mut self, canonical: &[u8], tax_code: &TaxCode) -> Result<(), EncodeError> {
        self.raw
            .push(UPLOAD_BATCH_MAX, canonical, tax_code, "upload batch items")
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.raw.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.raw.len() == 0
    }

    /// Item `i`: canonical bytes and tax code.
    pub fn get(&self, i: usize) -> Option<(&[u8], TaxCode)> {
        let (invoice, suffix) = self.raw.get(i, TAX_CODE_BYTES)?;
        let code: TaxCode = suffix.try_into().ok()?;
        Some((invoice, code))
    }

    /// The items in order.
    pub fn iter(&self) -> UploadItems<'_> {
        UploadItems {
            raw: RawIter::new(&self.raw, TAX_CODE_BYTES),
        }
    }
}

impl fmt::Debug for UploadBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadBatch")
            .field("items", &self.len())
            .field("bytes", &self.raw.wire.len())
            .finish()
    }
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

/// A request body as two borrowed pieces whose concatenation is exactly what
/// [`Request::encode_body`] appends: a short head (a TaxCodes batch's holder and item
/// count, an Upload batch's item count, or nothing) and the bulk, already in wire layout
/// ([`Request::body_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyParts<'a> {
    head: [u8; BODY_HEAD_BYTES_MAX],
    head_len: usize,
    bulk: &'a [u8],
}

impl<'a> BodyParts<'a> {
    /// The head (0, 4 or 24 bytes).
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// The bulk bytes after the head.
    pub fn bulk(&self) -> &'a [u8] {
        self.bulk
    }

    /// Body bytes in all.
    pub fn len(&self) -> usize {
        self.head_len + self.bulk.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Largest [`BodyParts`] head: a TaxCodes holder and count.
const BODY_HEAD_BYTES_MAX: usize = HOLDER_BYTES + 4;

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

/// Bounds-checked little-endian reader over a body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    /// `u8 length + UTF-8 bytes`, at most `max`.
    fn short_string(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = self.u8(what)? as usize;
        if len > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: len as u64,
                max: max as u64,
            });
        }
        let bytes = self.take(len, what)?;
        let s = core::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(what))?;
        Ok(s.to_owned())
    }

    /// A count of items of `item_bytes` each, checked against `max` and against the bytes
    /// left, so that a hostile count cannot make us allocate.
    fn count(
        &mut self,
        count: usize,
        max: usize,
        min_item_bytes: usize,
        what: &'static str,
    ) -> Result<usize, DecodeError> {
        if count > max {
            return Err(DecodeError::LimitExceeded {
                what,
                value: count as u64,
                max: max as u64,
            });
        }
        if count.saturating_mul(min_item_bytes) > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(count)
    }

    fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Bytes of one held segment in an `Inventory` answer: segment, holder, request id,
/// coded mark.
const HELD_SEGMENT_BYTES: usize = 16 + HOLDER_BYTES + 8 + 4;

/// Splits a TaxCodes body into its holder and the batch after it.
fn split_holder(body: &[u8]) -> Result<(Holder, &[u8]), DecodeError> {
    let head = body
        .get(..HOLDER_BYTES)
        .ok_or(DecodeError::Truncated("holder"))?;
    let mut h = [0u8; HOLDER_BYTES];
    h.copy_from_slice(head);
    Ok((Holder::from_bytes(&h), &body[HOLDER_BYTES..]))
}

fn put_segment(out: &mut Vec<u8>, s: &Segment) {
    out.extend_from_slice(&s.code.to_le_bytes());
    out.extend_from_slice(&s.first.to_le_bytes());
    out.extend_from_slice(&s.count.to_le_bytes());
}

fn get_segment(r: &mut Reader<'_>) -> Result<Segment, DecodeError> {
    Ok(Segment {
        code: r.u64("segment code")?,
        first: r.u32("segment first")?,
        count: r.u32("segment count")?,
    })
}

fn put_short_string(
    out: &mut Vec<u8>,
    s: &str,
    what: &'static str,
    max: usize,
) -> Result<(), EncodeError> {
    limit(what, s.len(), max)?;
    // max <= 255 for every short string, checked by the limit above.
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn bool_byte(r: &mut Reader<'_>, what: &'static str) -> Result<u8, DecodeError> {
    let b = r.u8(what)?;
    if b > 1 {
        return Err(DecodeError::InvalidValue {
            what,
            value: u64::from(b),
        });
    }
    Ok(b)
}

impl Request {
    /// The opcode of this command.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::DeviceInfo => Opcode::DeviceInfo,
            Request::Requisition { .. } => Opcode::Requisition,
            Request::ReturnSegment { .. } => Opcode::ReturnSegment,
            Request::TaxCodes(_) => Opcode::TaxCodes,
            Request::Sign { .. } => Opcode::Sign,
            Request::Upload(_) => Opcode::Upload,
            Request::ReportAndClear { .. } => Opcode::ReportAndClear,
            Request::Inventory(_) => Opcode::Inventory,
            Request::Nop(_) => Opcode::Nop,
            Request::SetFaults(_) => Opcode::SetFaults,
        }
    }

    /// Appends the body of this command to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Request::DeviceInfo => {}
            Request::Requisition {
                taxpayer,
                count,
                holder,
                request_id,
            } => {
                out.extend_from_slice(taxpayer);
                out.extend_from_slice(&count.to_le_bytes());
                holder.encode(out);
                out.extend_from_slice(&request_id.to_le_bytes());
            }
            Request::ReturnSegment {
                taxpayer,
                segment,
                holder,
            } => {
                out.extend_from_slice(taxpayer);
                put_segment(out, segment);
                holder.encode(out);
            }
            Request::TaxCodes(batch) => {
                batch.holder.encode(out);
                batch.raw.encode(out);
            }
            Request::Sign { digest } => out.extend_from_slice(digest),
            Request::Upload(batch) => batch.raw.encode(out),
            Request::ReportAndClear {
                taxpayer,
                period_end_ms,
            } => {
                out.extend_from_slice(taxpayer);
                out.extend_from_slice(&period_end_ms.to_le_bytes());
            }
            Request::Inventory(InventoryScope::All) => out.push(0),
            Request::Inventory(InventoryScope::Taxpayer(t)) => {
                out.push(1);
                out.extend_from_slice(t);
            }
            Request::Inventory(InventoryScope::Holder(h)) => {
                out.push(2);
                h.encode(out);
            }
            Request::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                out.extend_from_slice(bytes);
            }
            Request::SetFaults(f) => {
                out.extend_from_slice(&f.latency_us.to_le_bytes());
                out.extend_from_slice(&f.drop_every_nth_connection.to_le_bytes());
                out.push(f.refuse);
                out.extend_from_slice(&f.stall_ms.to_le_bytes());
                out.push(f.reset_connections);
            }
        }
        Ok(())
    }

    /// The body of the bulk commands (TaxCodes, Upload, Nop) as [`BodyParts`] borrowed
    /// from the request, checked as [`Request::encode_body`] checks it; `Ok(None)` for
    /// the other commands, whose bodies are small (encode those). A transport copies the
    /// parts straight to their destination (the PCIe data area) instead of encoding a
    /// ~1 MB batch into a buffer and copying that again.
    pub fn body_parts(&self) -> Result<Option<BodyParts<'_>>, EncodeError> {
        fn batch<'b>(holder: Option<&Holder>, raw: &'b RawBatch) -> BodyParts<'b> {
            let mut head = [0u8; BODY_HEAD_BYTES_MAX];
            let mut len = 0;
            if let Some(h) = holder {
                head[..HOLDER_BYTES].copy_from_slice(&h.to_bytes());
                len = HOLDER_BYTES;
            }
            // Pushes keep the count within the batch maxima, far below u32::MAX.
            head[len..len + 4].copy_from_slice(&(raw.starts.len() as u32).to_le_bytes());
            BodyParts {
                head,
                head_len: len + 4,
                bulk: &raw.wire,
            }
        }
        Ok(match self {
            Request::TaxCodes(b) => Some(batch(Some(&b.holder), &b.raw)),
            Request::Upload(b) => Some(batch(None, &b.raw)),
            Request::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                Some(BodyParts {
                    head: [0; BODY_HEAD_BYTES_MAX],
                    head_len: 0,
                    bulk: bytes,
                })
            }
            _ => None,
        })
    }

    /// Decodes a request body for `opcode` (the header's opcode byte).
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request, DecodeError> {
        if opcode & RESPONSE_FLAG != 0 {
            return Err(DecodeError::UnexpectedOpcode(opcode));
        }
        let op = Opcode::from_u8(opcode).ok_or(DecodeError::UnknownOpcode(opcode))?;
        // Batches parse their whole body themselves.
        match op {
            Opcode::TaxCodes => {
                let (holder, rest) = split_holder(body)?;
                return Ok(Request::TaxCodes(InvoiceBatch {
                    holder,
                    raw: RawBatch::decode(rest, TAX_CODES_BATCH_MAX, 0, TAX_CODES_ITEMS)?,
                }));
            }
            Opcode::Upload => {
                return Ok(Request::Upload(UploadBatch {
                    raw: RawBatch::decode(
                        body,
                        UPLOAD_BATCH_MAX,
                        TAX_CODE_BYTES,
                        "upload batch items",
                    )?,
                }))
            }
            Opcode::Nop => {
                // A frame body is already bounded by FRAME_BODY_BYTES_MAX == NOP_BYTES_MAX.
                if body.len() > NOP_BYTES_MAX {
                    return Err(DecodeError::LimitExceeded {
                        what: "nop bytes",
                        value: body.len() as u64,
                        max: NOP_BYTES_MAX as u64,
                    });
                }
                return Ok(Request::Nop(body.to_vec()));
            }
            _ => {}
        }
        let mut r = Reader::new(body);
        let req = match op {
            Opcode::DeviceInfo => Request::DeviceInfo,
            Opcode::Requisition => Request::Requisition {
                taxpayer: r.array("taxpayer")?,
                count: r.u32("count")?,
                holder: Holder::from_bytes(&r.array("holder")?),
                request_id: r.u64("request id")?,
            },
            Opcode::ReturnSegment => Request::ReturnSegment {
                taxpayer: r.array("taxpayer")?,
                segment: get_segment(&mut r)?,
                holder: Holder::from_bytes(&r.array("holder")?),
            },
            Opcode::Sign => Request::Sign {
                digest: r.array("digest")?,
            },
            Opcode::ReportAndClear => Request::ReportAndClear {
                taxpayer: r.array("taxpayer")?,
                period_end_ms: r.u64("period end")?,
            },
            Opcode::Inventory => match r.u8("inventory scope")? {
                0 => Request::Inventory(InventoryScope::All),
                1 => Request::Inventory(InventoryScope::Taxpayer(r.array("taxpayer")?)),
                2 => Request::Inventory(InventoryScope::Holder(Holder::from_bytes(
                    &r.array("holder")?,
                ))),
                other => {
                    return Err(DecodeError::InvalidValue {
                        what: "inventory scope",
                        value: u64::from(other),
                    })
                }
            },
            Opcode::SetFaults => Request::SetFaults(FaultConfig {
                latency_us: r.u32("latency")?,
                drop_every_nth_connection: r.u32("drop every nth")?,
                refuse: bool_byte(&mut r, "refuse")?,
                stall_ms: r.u32("stall")?,
                reset_connections: bool_byte(&mut r, "reset connections")?,
            }),
            Opcode::TaxCodes | Opcode::Upload | Opcode::Nop => {
                // Handled above; kept total rather than unreachable!().
                return Err(DecodeError::UnexpectedOpcode(opcode));
            }
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// The opcode of the command this answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::DeviceInfo(_) => Opcode::DeviceInfo,
            Response::Requisition(_) => Opcode::Requisition,
            Response::ReturnSegment => Opcode::ReturnSegment,
            Response::TaxCodes(_) => Opcode::TaxCodes,
            Response::Sign(_) => Opcode::Sign,
            Response::Upload(_) => Opcode::Upload,
            Response::ReportAndClear(_) => Opcode::ReportAndClear,
            Response::Inventory(_) => Opcode::Inventory,
            Response::Nop(_) => Opcode::Nop,
            Response::SetFaults => Opcode::SetFaults,
        }
    }

    /// Appends the body of this answer to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Response::DeviceInfo(info) => {
                put_short_string(out, &info.device_id, "device id", DEVICE_STRING_BYTES_MAX)?;
                put_short_string(out, &info.firmware, "firmware", DEVICE_STRING_BYTES_MAX)?;
                out.extend_from_slice(&info.sm2_public_key);
                out.push(info.tax_code_algorithm as u8);
                out.extend_from_slice(&info.batch_max.to_le_bytes());
                limit("taxpayers", info.taxpayers.len(), TAXPAYERS_MAX)?;
                out.extend_from_slice(&(info.taxpayers.len() as u16).to_le_bytes());
                for t in &info.taxpayers {
                    out.extend_from_slice(t);
                }
            }
            Response::Requisition(segment) => put_segment(out, segment),
            Response::ReturnSegment | Response::SetFaults => {}
            Response::TaxCodes(items) => {
                limit("tax code results", items.len(), TAX_CODES_BATCH_MAX)?;
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                out.extend_from_slice(items.as_slice().as_bytes());
            }
            Response::Sign(sig) => out.extend_from_slice(sig),
            Response::Upload(statuses) => {
                limit("upload results", statuses.len(), UPLOAD_BATCH_MAX)?;
                out.extend_from_slice(&(statuses.len() as u32).to_le_bytes());
                out.extend(statuses.iter().map(|s| *s as u8));
            }
            Response::ReportAndClear(p) => {
                out.extend_from_slice(&p.taxpayer);
                for v in [
                    p.period_start_ms,
                    p.period_end_ms,
                    p.blue_count,
                    p.red_count,
                    p.uploaded_count,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [p.amount_fen, p.tax_fen, p.total_fen] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Response::Inventory(list) => {
                limit("inventory taxpayers", list.len(), TAXPAYERS_MAX)?;
                out.extend_from_slice(&(list.len() as u16).to_le_bytes());
                for inv in list {
                    limit(
                        "inventory segments",
                        inv.segments.len(),
                        INVENTORY_SEGMENTS_MAX,
                    )?;
                    out.extend_from_slice(&inv.taxpayer);
                    out.extend_from_slice(&inv.remaining.to_le_bytes());
                    out.extend_from_slice(&inv.issued.to_le_bytes());
                    out.extend_from_slice(&inv.uploaded.to_le_bytes());
                    out.extend_from_slice(&(inv.segments.len() as u32).to_le_bytes());
                    for s in &inv.segments {
                        put_segment(out, &s.segment);
                        s.holder.encode(out);
                        out.extend_from_slice(&s.request_id.to_le_bytes());
                        out.extend_from_slice(&s.coded_end.to_le_bytes());
                    }
                }
            }
            Response::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                out.extend_from_slice(bytes);
            }
        }
        Ok(())
    }

    /// Decodes an ok-status response body for the command `op`.
    pub fn decode(op: Opcode, body: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(body);
        let resp = match op {
            Opcode::DeviceInfo => {
                let device_id = r.short_string("device id", DEVICE_STRING_BYTES_MAX)?;
                let firmware = r.short_string("firmware", DEVICE_STRING_BYTES_MAX)?;
                let sm2_public_key = r.array("sm2 public key")?;
                let alg = r.u8("tax code algorithm")?;
                let tax_code_algorithm =
                    TaxCodeAlgorithm::from_u8(alg).ok_or(DecodeError::InvalidValue {
                        what: "tax code algorithm",
                        value: u64::from(alg),
                    })?;
                let batch_max = r.u32("batch max")?;
                let n = r.u16("taxpayer count")? as usize;
                let n = r.count(n, TAXPAYERS_MAX, TAXPAYER_BYTES, "taxpayers")?;
                let mut taxpayers = Vec::with_capacity(n);
                for _ in 0..n {
                    taxpayers.push(r.array("taxpayer")?);
                }
                Response::DeviceInfo(DeviceInfo {
                    device_id,
                    firmware,
                    sm2_public_key,
                    tax_code_algorithm,
                    batch_max,
                    taxpayers,
                })
            }
            Opcode::Requisition => Response::Requisition(get_segment(&mut r)?),
            Opcode::ReturnSegment => Response::ReturnSegment,
            Opcode::SetFaults => Response::SetFaults,
            Opcode::TaxCodes => {
                let n = r.u32("result count")? as usize;
                let n = r.count(
                    n,
                    TAX_CODES_BATCH_MAX,
                    TAX_CODE_ITEM_BYTES,
                    "tax code results",
                )?;
                let bytes = r.take(n * TAX_CODE_ITEM_BYTES, "tax code results")?;
                let items = <[TaxCodeItem]>::ref_from_bytes(bytes)
                    .map_err(|_| DecodeError::Truncated("tax code results"))?;
                for item in items {
                    if item.status().is_none() {
                        return Err(DecodeError::InvalidValue {
                            what: "tax code status",
                            value: u64::from(item.status),
                        });
                    }
                    if item.reserved != [0; 3] {
                        return Err(DecodeError::InvalidValue {
                            what: "tax code item reserved",
                            value: u64::from(u32::from_le_bytes([
                                item.reserved[0],
                                item.reserved[1],
                                item.reserved[2],
                                0,
                            ])),
                        });
                    }
                }
                Response::TaxCodes(items.to_vec())
            }
            Opcode::Sign => Response::Sign(r.array("signature")?),
            Opcode::Upload => {
                let n = r.u32("result count")? as usize;
                let n = r.count(n, UPLOAD_BATCH_MAX, 1, "upload results")?;
                let bytes = r.take(n, "upload results")?;
                let mut statuses = Vec::with_capacity(n);
                for &b in bytes {
                    statuses.push(UploadStatus::from_u8(b).ok_or(DecodeError::InvalidValue {
                        what: "upload status",
                        value: u64::from(b),
                    })?);
                }
                Response::Upload(statuses)
            }
            Opcode::ReportAndClear => Response::ReportAndClear(PeriodReport {
                taxpayer: r.array("taxpayer")?,
                period_start_ms: r.u64("period start")?,
                period_end_ms: r.u64("period end")?,
                blue_count: r.u64("blue count")?,
                red_count: r.u64("red count")?,
                uploaded_count: r.u64("uploaded count")?,
                amount_fen: r.i64("amount")?,
                tax_fen: r.i64("tax")?,
                total_fen: r.i64("total")?,
            }),
            Opcode::Inventory => {
                let n = r.u16("taxpayer count")? as usize;
                // 18 + 3 x 8 + 4 bytes is the smallest per-taxpayer record.
                let n = r.count(n, TAXPAYERS_MAX, 46, "inventory taxpayers")?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let taxpayer = r.array("taxpayer")?;
                    let remaining = r.u64("remaining")?;
                    let issued = r.u64("issued")?;
                    let uploaded = r.u64("uploaded")?;
                    let m = r.u32("segment count")? as usize;
                    let m = r.count(
                        m,
                        INVENTORY_SEGMENTS_MAX,
                        HELD_SEGMENT_BYTES,
                        "inventory segments",
                    )?;
                    let mut segments = Vec::with_capacity(m);
                    for _ in 0..m {
                        segments.push(HeldSegment {
                            segment: get_segment(&mut r)?,
                            holder: Holder::from_bytes(&r.array("holder")?),
                            request_id: r.u64("request id")?,
                            coded_end: r.u32("coded end")?,
                        });
                    }
                    list.push(TaxpayerInventory {
                        taxpayer,
                        remaining,
                        issued,
                        uploaded,
                        segments,
                    });
                }
                Response::Inventory(list)
            }
            Opcode::Nop => Response::Nop(r.rest().to_vec()),
        };
        r.finish()?;
        Ok(resp)
    }

    /// Decodes a response frame to the command `request` (whose opcode the caller recorded
    /// when sending): `Ok(Ok(_))` for a successful answer, `Ok(Err(_))` for a device
    /// error, `Err(_)` when the frame does not decode or does not answer that command.
    pub fn decode_frame(
        request: Opcode,
        header: &FrameHeader,
        body: &[u8],
    ) -> Result<Result<Response, DeviceError>, DecodeError> {
        if header.opcode != request.response_byte() {
            return Err(DecodeError::UnexpectedOpcode(header.opcode));
        }
        let code = header.status.get();
        let status = Status::from_u16(code).ok_or(DecodeError::UnknownStatus(code))?;
        if status == Status::Ok {
            return Response::decode(request, body).map(Ok);
        }
        if body.len() > ERROR_MESSAGE_BYTES_MAX {
            return Err(DecodeError::LimitExceeded {
                what: "error message",
                value: body.len() as u64,
                max: ERROR_MESSAGE_BYTES_MAX as u64,
            });
        }
        let message = core::str::from_utf8(body)
            .map_err(|_| DecodeError::InvalidUtf8("error message"))?
            .to_owned();
        Ok(Err(DeviceError { status, message }))
    }
}

/// Appends one whole frame to `out`: a header with `opcode`, `status` and
/// `correlation_id`, then the body that `write_body` appends. The length and CRC are
/// filled in after the body is written, so bodies are built in place (the emulator writes
/// `TaxCodes` results straight into its output buffer). On error `out` is unchanged.
pub fn encode_frame<E>(
    out: &mut Vec<u8>,
    opcode: u8,
    status: u16,
    correlation_id: u64,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<EncodeError>,
{
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    if let Err(e) = write_body(out) {
        out.truncate(start);
        return Err(e);
    }
    let body_len = out.len() - start - FRAME_HEADER_BYTES;
    if let Err(e) = limit("frame body bytes", body_len, FRAME_BODY_BYTES_MAX) {
        out.truncate(start);
        return Err(e.into());
    }
    let (head, body) = out[start..].split_at_mut(FRAME_HEADER_BYTES);
    let header = FrameHeader::new(opcode, status, correlation_id, body);
    head.copy_from_slice(header.as_bytes());
    Ok(())
}

/// Appends a request frame.
pub fn encode_request(
    out: &mut Vec<u8>,
    correlation_id: u64,
    request: &Request,
) -> Result<(), EncodeError> {
    encode_frame(
        out,
        request.opcode().request_byte(),
        0,
        correlation_id,
        |o| request.encode_body(o),
    )
}

/// Appends an ok response frame.
pub fn encode_response(
    out: &mut Vec<u8>,
    correlation_id: u64,
    response: &Response,
) -> Result<(), EncodeError> {
    encode_frame(
        out,
        response.opcode().response_byte(),
        Status::Ok as u16,
        correlation_id,
        |o| response.encode_body(o),
    )
}

/// Appends an error response frame answering the request opcode byte `request_opcode`
/// (raw, so that unknown commands can be answered with [`Status::UnknownCommand`]). The
/// message is cut to [`ERROR_MESSAGE_BYTES_MAX`] at a character boundary.
pub fn encode_error(
    out: &mut Vec<u8>,
    request_opcode: u8,
    correlation_id: u64,
    status: Status,
    message: &str,
) -> Result<(), EncodeError> {
    if status == Status::Ok {
        return Err(EncodeError::OkIsNotAnError);
    }
    let mut cut = message.len().min(ERROR_MESSAGE_BYTES_MAX);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    encode_frame(
        out,
        request_opcode | RESPONSE_FLAG,
        status as u16,
        correlation_id,
        |o| {
            o.extend_from_slice(&message.as_bytes()[..cut]);
            Ok::<(), EncodeError>(())
        },
    )
}

/// A frame taken from a [`FrameDecoder`]: its header and a borrowed body.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The body (`header.body_len` bytes, CRC checked).
    pub body: &'a [u8],
}

/// A frame the decoder could not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct FrameError {
    /// What was wrong.
    pub error: DecodeError,
    /// The offending header (its correlation id lets the receiver answer or fail the one
    /// call the frame belongs to).
    pub header: FrameHeader,
    /// Whether the stream is unusable from here (bad magic or length: frame boundaries are
    /// lost; the connection must be closed). When false the frame was skipped and the
    /// next one can be read.
    pub fatal: bool,
}

/// Reassembles frames from a byte stream delivered in arbitrary chunks.
///
/// Bytes go in with [`FrameDecoder::extend`] (a copy) or, to read from a socket straight
/// into the decoder, with [`FrameDecoder::read_buf`] + [`FrameDecoder::commit`]. Frames
/// come out of [`FrameDecoder::next_frame`] borrowing the internal buffer; consumed bytes
/// are reclaimed lazily, so the steady state allocates nothing.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    start: usize,
    /// End of received bytes in `buf` (the rest is spare room for `read_buf`).
    end: usize,
    /// Set after a fatal error: every later call returns it again.
    poisoned: Option<FrameError>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves unconsumed bytes to the front when that frees a useful amount of room.
    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start >= self.buf.len() / 2 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        let room = self.read_buf(bytes.len());
        room[..bytes.len()].copy_from_slice(bytes);
        self.commit(bytes.len());
    }

    /// Spare room of at least `min` bytes to receive into; call [`FrameDecoder::commit`]
    /// with the number of bytes written.
    pub fn read_buf(&mut self, min: usize) -> &mut [u8] {
        self.compact();
        if self.buf.len() - self.end < min {
            self.buf.resize(self.end + min, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of the last [`FrameDecoder::read_buf`] as received (clamped to the
    /// room that was handed out).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<FrameRef<'_>>, FrameError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..self.end];
        let Ok((header, _)) = FrameHeader::read_from_prefix(avail) else {
            return Ok(None);
        };
        if header.magic != FRAME_MAGIC {
            return Err(self.poison(DecodeError::BadMagic(header.magic), header));
        }
        let body_len = header.body_len.get();
        if body_len as usize > FRAME_BODY_BYTES_MAX {
            return Err(self.poison(DecodeError::BodyTooLarge(body_len), header));
        }
        let total = FRAME_HEADER_BYTES + body_len as usize;
        if avail.len() < total {
            // Reserve the whole frame once instead of growing chunk by chunk.
            let need = self.start + total;
            if self.buf.capacity() < need {
                self.buf.reserve(need - self.buf.len());
            }
            return Ok(None);
        }
        let frame_start = self.start;
        self.start += total;
        if header.version != PROTOCOL_VERSION {
            return Err(FrameError {
                error: DecodeError::UnsupportedVersion(header.version),
                header,
                fatal: false,
            });
        }
        let body = &self.buf[frame_start + FRAME_HEADER_BYTES..frame_start + total];
        let actual = crc32c::crc32c(body);
        if actual != header.body_crc32c.get() {
            return Err(FrameError {
                error: DecodeError::BodyChecksum {
                    expected: header.body_crc32c.get(),
                    actual,
                },
                header,
                fatal: false,
            });
        }
        Ok(Some(FrameRef { header, body }))
    }

    fn poison(&mut self, error: DecodeError, header: FrameHeader) -> FrameError {
        let e = FrameError {
            error,
            header,
            fatal: true,
        };
        self.poisoned = Some(e.clone());
        e
    }
}

/// Decodes exactly one whole frame from `bytes` (header + body, nothing after): for tools
/// and tests that hold a complete frame.
pub fn decode_frame(bytes: &[u8]) -> Result<FrameRef<'_>, DecodeError> {
    let (header, rest) =
        FrameHeader::read_from_prefix(bytes).map_err(|_| DecodeError::Truncated("header"))?;
    if header.magic != FRAME_MAGIC {
        return Err(DecodeError::BadMagic(header.magic));
    }
    if header.version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(header.version));
    }
    let body_len = header.body_len.get();
    if body_len as usize > FRAME_BODY_BYTES_MAX {
        return Err(DecodeError::BodyTooLarge(body_len));
    }
    let len = body_len as usize;
    if rest.len() < len {
        return Err(DecodeError::Truncated("body"));
    }
    if rest.len() > len {
        return Err(DecodeError::TrailingBytes(rest.len() - len));
    }
    let actual = crc32c::crc32c(rest);
    if actual != header.body_crc32c.get() {
        return Err(DecodeError::BodyChecksum {
            expected: header.body_crc32c.get(),
            actual,
        });
    }
    Ok(FrameRef { header, body: rest })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TP: Taxpayer = *b"91110000600037341L";

    fn sample_batch(n: usize) -> InvoiceBatch {
        let mut b = InvoiceBatch::new();
        b.set_holder(Holder::new(0xabc, 2));
        for i in 0..n {
            b.push(&vec![i as u8; 100 + i % 7]).expect("within limits");
        }
        b
    }

    fn sample_requests() -> Vec<Request> {
        let mut upload = UploadBatch::new();
        upload.push(b"invoice-a", &[1; 32]).expect("ok");
        upload.push(b"", &[2; 32]).expect("ok");
        vec![
            Request::DeviceInfo,
            Request::Requisition {
                taxpayer: TP,
                count: 1000,
                holder: Holder::new(u128::MAX - 7, 3),
                request_id: u64::MAX,
            },
            Request::ReturnSegment {
                taxpayer: TP,
                segment: Segment {
                    code: 144_031_900_111,
                    first: 500,
                    count: 20,
                },
                holder: Holder::new(1, 2),
            },
            Request::Inventory(InventoryScope::Holder(Holder::new(5, 6))),
            Request::TaxCodes(sample_batch(17)),
            Request::TaxCodes(InvoiceBatch::new()),
            Request::Sign { digest: [9; 32] },
            Request::Upload(upload),
            Request::ReportAndClear {
                taxpayer: TP,
                period_end_ms: 1_700_000_000_000,
            },
            Request::Inventory(InventoryScope::All),
            Request::Inventory(InventoryScope::Taxpayer(TP)),
            Request::Nop(b"ping".to_vec()),
            Request::Nop(Vec::new()),
            Request::SetFaults(FaultConfig {
                latency_us: 5,
                drop_every_nth_connection: 3,
                refuse: 1,
                stall_ms: 100,
                reset_connections: 0,
            }),
        ]
    }

    fn sample_responses() -> Vec<Response> {
        let code = [0xab; 32];
        vec![
            Response::DeviceInfo(DeviceInfo {
                device_id: "EMU-0001".into(),
                firmware: "emu 0.1.0".into(),
                sm2_public_key: [4; 65],
                tax_code_algorithm: TaxCodeAlgorithm::HmacSm3,
                batch_max: TAX_CODES_BATCH_MAX as u32,
                taxpayers: vec![TP, *b"91310000MA1FL8XQ30"],
            }),
            Response::Requisition(Segment {
                code: 144_031_900_111,
                first: 1,
                count: 10_000,
            }),
            Response::ReturnSegment,
            Response::TaxCodes(vec![
                TaxCodeItem::ok(code, crate::crypto::check_code(&code)),
                TaxCodeItem::failed(TaxCodeStatus::NumberNotGranted),
            ]),
            Response::TaxCodes(Vec::new()),
            Response::Sign([7; 64]),
            Response::Upload(vec![
                UploadStatus::Accepted,
                UploadStatus::Duplicate,
                UploadStatus::Forged,
                UploadStatus::NotGranted,
                UploadStatus::Conflict,
                UploadStatus::Malformed,
            ]),
            Response::ReportAndClear(PeriodReport {
                taxpayer: TP,
                period_start_ms: 1,
                period_end_ms: 2,
                blue_count: 3,
                red_count: 4,
                uploaded_count: 5,
                amount_fen: -6,
                tax_fen: 7,
                total_fen: 1,
            }),
            Response::Inventory(vec![TaxpayerInventory {
                taxpayer: TP,
                remaining: 1_000_000,
                issued: 20,
                uploaded: 10,
                segments: vec![HeldSegment {
                    segment: Segment {
                        code: 1,
                        first: 2,
                        count: 3,
                    },
                    holder: Holder::new(0x1234, 1),
                    request_id: 99,
                    coded_end: 4,
                }],
            }]),
            Response::Nop(vec![1, 2, 3]),
            Response::SetFaults,
        ]
    }

    #[test]
    fn header_layout() {
        let h = FrameHeader::new(4, 0x0102, 0x1122_3344_5566_7788, b"abc");
        let bytes = h.as_bytes();
        assert_eq!(&bytes[0..4], b"TXSV");
        assert_eq!(bytes[4], PROTOCOL_VERSION);
        assert_eq!(bytes[5], 4);
        assert_eq!(&bytes[6..8], &[0x02, 0x01]);
        assert_eq!(&bytes[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[16..20], &3u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &crc32c::crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn every_request_round_trips() {
        for (i, req) in sample_requests().into_iter().enumerate() {
            let mut out = Vec::new();
            encode_request(&mut out, i as u64, &req).expect("encode");
            let frame = decode_frame(&out).expect("frame");
            assert_eq!(frame.header.correlation_id(), i as u64);
            assert!(!frame.header.is_response());
            assert_eq!(frame.header.opcode, req.opcode() as u8);
            let back = Request::decode(frame.header.opcode, frame.body).expect("decode");
            assert_eq!(back, req);
        }
    }

    /// The borrowed parts a transport copies are byte for byte the encoded body.
    #[test]
    fn body_parts_concatenate_to_the_encoded_body() {
        let mut bulk = 0;
        for req in sample_requests() {
            let mut encoded = Vec::new();
            req.encode_body(&mut encoded).expect("encode");
            match req.body_parts().expect("parts") {
                Some(parts) => {
                    bulk += 1;
                    assert_eq!([parts.head(), parts.bulk()].concat(), encoded, "{req:?}");
                    assert_eq!(parts.len(), encoded.len());
                    assert_eq!(parts.is_empty(), encoded.is_empty());
                }
                None => assert!(!matches!(
                    req,
                    Request::TaxCodes(_) | Request::Upload(_) | Request::Nop(_)
                )),
            }
        }
        assert_eq!(bulk, 5);
    }

    /// The in-place TaxCodes decoder accepts and refuses exactly what `Request::decode`
    /// does, with the same errors, and yields the same invoices.
    #[test]
    fn in_place_tax_codes_decode_matches_request_decode() {
        let op = Opcode::TaxCodes.request_byte();
        let mut bodies = Vec::new();
        for n in [0, 1, 17] {
            let mut b = Vec::new();
            Request::TaxCodes(sample_batch(n))
                .encode_body(&mut b)
                .expect("encode");
            bodies.push(b);
        }
        let good = bodies[2].clone();
        // Every truncation, trailing bytes, a lying count, an oversized count and item.
        for cut in 0..good.len() {
            bodies.push(good[..cut].to_vec());
        }
        bodies.push([good.as_slice(), &[0]].concat());
        let mut lying = good.clone();
        lying[HOLDER_BYTES..HOLDER_BYTES + 4].copy_from_slice(&18u32.to_le_bytes());
        bodies.push(lying);
        let mut lying = good.clone();
        lying[HOLDER_BYTES..HOLDER_BYTES + 4].copy_from_slice(&16u32.to_le_bytes());
        bodies.push(lying);
        let mut huge = good.clone();
        huge[HOLDER_BYTES..HOLDER_BYTES + 4]
            .copy_from_slice(&(TAX_CODES_BATCH_MAX as u32 + 1).to_le_bytes());
        bodies.push(huge);
        let mut long_item = good.clone();
        long_item[HOLDER_BYTES + 4..HOLDER_BYTES + 6].copy_from_slice(&u16::MAX.to_le_bytes());
        bodies.push(long_item);
        for body in bodies {
            match (Request::decode(op, &body), Invoices::decode(&body)) {
                (Ok(Request::TaxCodes(batch)), Ok((holder, items))) => {
                    assert_eq!(holder, batch.holder());
                    assert_eq!(items.len(), batch.len());
                    assert!(items.eq(batch.iter()));
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                (a, b) => panic!("decoders disagree: {a:?} / {:?}", b.map(|(_, i)| i.len())),
            }
        }
    }

    #[test]
    fn every_response_round_trips() {
        for (i, resp) in sample_responses().into_iter().enumerate() {
            let mut out = Vec::new();
            encode_response(&mut out, i as u64, &resp).expect("encode");
            let frame = decode_frame(&out).expect("frame");
            assert!(frame.header.is_response());
            let back = Response::decode_frame(resp.opcode(), &frame.header, frame.body)
                .expect("decode")
                .expect("ok status");
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn error_response_round_trips_and_truncates_at_char_boundary() {
        let mut out = Vec::new();
        let long = "税".repeat(ERROR_MESSAGE_BYTES_MAX); // 3 bytes each
        encode_error(&mut out, 2, 42, Status::InventoryExhausted, &long).expect("encode");
        let frame = decode_frame(&out).expect("frame");
        let err = Response::decode_frame(Opcode::Requisition, &frame.header, frame.body)
            .expect("decodes")
            .expect_err("device error");
        assert_eq!(err.status, Status::InventoryExhausted);
        assert!(err.message.len() <= ERROR_MESSAGE_BYTES_MAX);
        assert!(err.message.len() > ERROR_MESSAGE_BYTES_MAX - 3);
        assert_eq!(
            encode_error(&mut out, 2, 1, Status::Ok, "x"),
            Err(EncodeError::OkIsNotAnError)
        );
        // Unknown commands can be answered too.
        let mut out = Vec::new();
        encode_error(&mut out, 0x55, 7, Status::UnknownCommand, "no such command").expect("ok");
        assert_eq!(decode_frame(&out).expect("frame").header.opcode, 0xd5);
    }

    #[test]
    fn response_to_the_wrong_command_is_rejected() {
        let mut out = Vec::new();
        encode_response(&mut out, 1, &Response::SetFaults).expect("encode");
        let frame = decode_frame(&out).expect("frame");
        assert_eq!(
            Response::decode_frame(Opcode::Nop, &frame.header, frame.body),
            Err(DecodeError::UnexpectedOpcode(
                Opcode::SetFaults.response_byte()
            ))
        );
    }

    #[test]
    fn batch_limits() {
        let mut b = InvoiceBatch::new();
        assert!(matches!(
            b.push(&vec![0; INVOICE_BYTES_MAX + 1]),
            Err(EncodeError::LimitExceeded { .. })
        ));
        for _ in 0..TAX_CODES_BATCH_MAX {
            b.push(b"x").expect("room");
        }
        assert!(b.push(b"x").is_err());
        assert_eq!(b.len(), TAX_CODES_BATCH_MAX);
        b.clear();
        assert!(b.is_empty());
        b.push_with(|v| v.extend_from_slice(b"in place"))
            .expect("fits");
        let before = b.clone();
        assert!(b
            .push_with(|v| v.extend_from_slice(&[1; INVOICE_BYTES_MAX + 1]))
            .is_err());
        assert_eq!(b, before);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![b"in place".as_slice()]);
        assert_eq!(b.get(0), Some(b"in place".as_slice()));
        assert_eq!(b.get(1), None);
    }

    #[test]
    fn hostile_counts_are_rejected_before_allocating() {
        let mut body = [0u8; HOLDER_BYTES].to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[0; 8]);
        assert!(matches!(
            Request::decode(Opcode::TaxCodes as u8, &body),
            Err(DecodeError::LimitExceeded { .. })
        ));
        let body = 4000u32.to_le_bytes();
        assert!(matches!(
            Response::decode(Opcode::TaxCodes, &body),
            Err(DecodeError::Truncated(_))
        ));
        let mut inv = 1u16.to_le_bytes().to_vec();
        inv.extend_from_slice(&[0u8; 42]);
        inv.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Response::decode(Opcode::Inventory, &inv).is_err());
    }

    #[test]
    fn decode_is_strict() {
        // Trailing bytes.
        assert_eq!(
            Request::decode(Opcode::DeviceInfo as u8, &[0]),
            Err(DecodeError::TrailingBytes(1))
        );
        // Unknown opcode and response flag on a request.
        assert_eq!(
            Request::decode(0x33, &[]),
            Err(DecodeError::UnknownOpcode(0x33))
        );
        assert!(Request::decode(0x81, &[]).is_err());
        // Non-boolean switch.
        let mut faults = Vec::new();
        Request::SetFaults(FaultConfig::default())
            .encode_body(&mut faults)
            .expect("ok");
        faults[8] = 2;
        assert!(Request::decode(Opcode::SetFaults as u8, &faults).is_err());
        // Unknown per-item status and non-zero reserved bytes.
        let mut body = 1u32.to_le_bytes().to_vec();
        let mut item = TaxCodeItem::failed(TaxCodeStatus::MalformedInvoice);
        item.status = 9;
        body.extend_from_slice(item.as_bytes());
        assert!(Response::decode(Opcode::TaxCodes, &body).is_err());
        item.status = 0;
        item.reserved[1] = 1;
        body.truncate(4);
        body.extend_from_slice(item.as_bytes());
        assert!(Response::decode(Opcode::TaxCodes, &body).is_err());
    }

    #[test]
    fn decoder_reassembles_byte_by_byte() {
        let mut stream = Vec::new();
        let reqs = sample_requests();
        for (i, r) in reqs.iter().enumerate() {
            encode_request(&mut stream, i as u64, r).expect("encode");
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for byte in &stream {
            dec.extend(std::slice::from_ref(byte));
            while let Some(f) = dec.next_frame().expect("valid stream") {
                got.push(Request::decode(f.header.opcode, f.body).expect("decode"));
            }
        }
        assert_eq!(got, reqs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn decoder_read_buf_commit() {
        let mut stream = Vec::new();
        encode_request(&mut stream, 5, &Request::Nop(vec![1; 1000])).expect("encode");
        let mut dec = FrameDecoder::new();
        let buf = dec.read_buf(4096);
        buf[..stream.len()].copy_from_slice(&stream);
        dec.commit(stream.len());
        let f = dec.next_frame().expect("ok").expect("frame");
        assert_eq!(f.header.correlation_id(), 5);
        assert_eq!(f.body.len(), 1000);
        assert!(dec.next_frame().expect("ok").is_none());
    }

    #[test]
    fn decoder_skips_corrupt_frames_and_poisons_on_bad_framing() {
        let mut stream = Vec::new();
        encode_request(&mut stream, 1, &Request::Nop(b"aaaa".to_vec())).expect("encode");
        let first_len = stream.len();
        encode_request(&mut stream, 2, &Request::Nop(b"bbbb".to_vec())).expect("encode");
        stream[FRAME_HEADER_BYTES] ^= 0xff; // corrupt the first body
        let mut dec = FrameDecoder::new();
        dec.extend(&stream);
        let e = dec.next_frame().expect_err("checksum");
        assert!(!e.fatal);
        assert_eq!(e.header.correlation_id(), 1);
        assert!(matches!(e.error, DecodeError::BodyChecksum { .. }));
        let f = dec.next_frame().expect("ok").expect("second frame");
        assert_eq!(f.header.correlation_id(), 2);

        // Wrong version: skipped, not fatal.
        let mut v2 = stream[first_len..].to_vec();
        v2[4] = PROTOCOL_VERSION + 1;
        let mut dec = FrameDecoder::new();
        dec.extend(&v2);
        dec.extend(&stream[first_len..]);
        let e = dec.next_frame().expect_err("version");
        assert_eq!(
            e.error,
            DecodeError::UnsupportedVersion(PROTOCOL_VERSION + 1)
        );
        assert!(!e.fatal);
        assert!(dec.next_frame().expect("ok").is_some());

        // Bad magic: fatal and sticky.
        let mut bad = stream.clone();
        bad[0] = b'X';
        let mut dec = FrameDecoder::new();
        dec.extend(&bad);
        assert!(dec.next_frame().expect_err("magic").fatal);
        assert!(dec.next_frame().expect_err("still poisoned").fatal);

        // Oversized body length: fatal before any allocation of that size.
        let mut huge = FrameHeader::new(9, 0, 1, b"");
        huge.body_len = U32::new(u32::MAX);
        let mut dec = FrameDecoder::new();
        dec.extend(huge.as_bytes());
        let e = dec.next_frame().expect_err("too large");
        assert!(e.fatal);
        assert_eq!(e.error, DecodeError::BodyTooLarge(u32::MAX));
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let tp = proptest::array::uniform18(any::<u8>());
        prop_oneof![
            Just(Request::DeviceInfo),
            (tp, any::<u32>(), any::<(u128, u32)>(), any::<u64>()).prop_map(
                |(taxpayer, count, (appliance, shard), request_id)| Request::Requisition {
                    taxpayer,
                    count,
                    holder: Holder::new(appliance, shard),
                    request_id
                }
            ),
            (tp, any::<u64>(), any::<u32>(), any::<u32>(), any::<u128>()).prop_map(
                |(taxpayer, code, first, count, appliance)| Request::ReturnSegment {
                    taxpayer,
                    segment: Segment { code, first, count },
                    holder: Holder::new(appliance, first),
                }
            ),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40)
                .prop_map(|items| {
                    let mut b = InvoiceBatch::new();
                    for i in &items {
                        b.push(i).expect("small");
                    }
                    Request::TaxCodes(b)
                }),
            any::<[u8; 32]>().prop_map(|digest| Request::Sign { digest }),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..300),
                    any::<[u8; 32]>()
                ),
                0..20
            )
            .prop_map(|items| {
                let mut b = UploadBatch::new();
                for (i, c) in &items {
                    b.push(i, c).expect("small");
                }
                Request::Upload(b)
            }),
            (tp, any::<u64>()).prop_map(|(taxpayer, period_end_ms)| {
                Request::ReportAndClear {
                    taxpayer,
                    period_end_ms,
                }
            }),
            Just(Request::Inventory(InventoryScope::All)),
            tp.prop_map(|t| Request::Inventory(InventoryScope::Taxpayer(t))),
            proptest::collection::vec(any::<u8>(), 0..500).prop_map(Request::Nop),
            (any::<u32>(), any::<u32>(), 0u8..2, any::<u32>(), 0u8..2).prop_map(
                |(latency_us, drop_every_nth_connection, refuse, stall_ms, reset_connections)| {
                    Request::SetFaults(FaultConfig {
                        latency_us,
                        drop_every_nth_connection,
                        refuse,
                        stall_ms,
                        reset_connections,
                    })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            for op in 0..=255u8 {
                let _ = Request::decode(op, &bytes);
            }
            for op in Opcode::ALL {
                let _ = Response::decode(op, &bytes);
            }
            let _ = decode_frame(&bytes);
            let mut dec = FrameDecoder::new();
            dec.extend(&bytes);
            for _ in 0..64 {
                match dec.next_frame() {
                    Ok(Some(f)) => {
                        let _ = Request::decode(f.header.opcode, f.body);
                        if let Some(op) = Opcode::from_u8(f.header.command()) {
                            let _ = Response::decode_frame(op, &f.header, f.body);
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.fatal => break,
                    Err(_) => {}
                }
            }
        }

        #[test]
        fn framed_garbage_bodies_never_panic(
            op in any::<u8>(),
            status in any::<u16>(),
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let header = FrameHeader::new(op, status, 1, &body);
            let mut dec = FrameDecoder::new();
            dec.extend(header.as_bytes());
            dec.extend(&body);
            let f = dec.next_frame().expect("well framed").expect("whole");
            let _ = Request::decode(f.header.opcode, f.body);
            for req_op in Opcode::ALL {
                let _ = Response::decode_frame(req_op, &f.header, f.body);
            }
        }

        #[test]
        fn requests_round_trip_through_chunked_stream(
            reqs in proptest::collection::vec(arb_request(), 1..8),
            chunk in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for (i, r) in reqs.iter().enumerate() {
                encode_request(&mut stream, i as u64, r).expect("encode");
            }
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                dec.extend(piece);
                while let Some(f) = dec.next_frame().expect("valid") {
                    got.push((f.header.correlation_id(), Request::decode(f.header.opcode, f.body).expect("decode")));
                }
            }
            prop_assert_eq!(got.len(), reqs.len());
            for (i, (id, r)) in got.into_iter().enumerate() {
                prop_assert_eq!(id, i as u64);
                prop_assert_eq!(&r, &reqs[i]);
            }
        }

        #[test]
        fn tax_code_results_round_trip(
            items in proptest::collection::vec((0u8..4, any::<[u8; 32]>()), 0..100)
        ) {
            let items: Vec<TaxCodeItem> = items
                .into_iter()
                .map(|(s, code)| {
                    let mut it = TaxCodeItem::ok(code, crate::crypto::check_code(&code));
                    it.status = s;
                    it
                })
                .collect();
            let resp = Response::TaxCodes(items);
            let mut out = Vec::new();
            encode_response(&mut out, 9, &resp).expect("encode");
            let f = decode_frame(&out).expect("frame");
            let back = Response::decode_frame(Opcode::TaxCodes, &f.header, f.body)
                .expect("decode")
                .expect("ok");
            prop_assert_eq!(back, resp);
        }
    }
}
