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
//!
//! Modules by job, all re-exported here so that `hsm_driver::proto::X` names every item:
//! `frame` (header, frame encoding, [`FrameDecoder`]), `codes` (opcodes and statuses),
//! `error` (decode and encode errors), `types` (the command set's values, [`Request`] and
//! [`Response`]), `batch` ([`InvoiceBatch`], [`UploadBatch`]), `request` and `response`
//! (the two body codecs) and `wire` (the primitives they share).

mod batch;
mod codes;
mod error;
mod frame;
mod request;
mod response;
#[cfg(test)]
mod tests;
mod types;
mod wire;

use std::fmt;

use appliance_core::canonical::CANONICAL_BYTES_MAX;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::crypto::{
    CheckCode, TaxCode, TaxCodeAlgorithm, CHECK_CODE_DIGITS, SM2_PUBLIC_KEY_BYTES,
    SM2_SIGNATURE_BYTES, TAX_CODE_BYTES,
};

pub use batch::{InvoiceBatch, Invoices, UploadBatch, UploadItems};
pub use codes::{Opcode, Status, TaxCodeStatus, UploadStatus};
pub use error::{DecodeError, EncodeError};
pub use frame::{
    decode_frame, encode_error, encode_frame, encode_request, encode_response, FrameDecoder,
    FrameError, FrameHeader, FrameRef,
};
pub use request::BodyParts;
pub use types::{
    DeviceError, DeviceInfo, FaultConfig, HeldSegment, Holder, InventoryScope, PeriodReport,
    Request, Response, Segment, TaxCodeItem, Taxpayer, TaxpayerInventory,
};

// Crate-private pieces the sibling modules share (each reaches them through `super::*`).
use batch::{RawBatch, TAX_CODES_ITEMS};
use error::limit;
use wire::{
    bool_byte, get_segment, put_segment, put_short_string, split_holder, Reader, HELD_SEGMENT_BYTES,
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
