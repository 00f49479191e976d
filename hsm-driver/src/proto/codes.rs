//! Opcodes and statuses: the command [`Opcode`]s, the whole-command [`Status`], and the
//! per-item statuses of `TaxCodes` and `Upload`.

use super::*;

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
