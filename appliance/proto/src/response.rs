//! Replies: the [`FrameKind::IssueReply`](crate::FrameKind::IssueReply) body (one result
//! per request, in request order), the [`FrameKind::Error`](crate::FrameKind::Error) body
//! (the whole exchange refused), and the error codes both use.
//!
//! Result item layout (little-endian):
//! ```text
//! status            u16     0 issued now, 1 issued earlier (idempotent replay),
//!                           otherwise an ErrorCode
//! issued / replay:  code u64, number u32, issue_time_ms u64,
//!                   tax_control_code 32 B, check_code 20 B ASCII digits
//! error:            message u16 length + UTF-8 (human-readable detail)
//! ```
//! Error frame body: code u16, message u16 length + UTF-8.

use appliance_core::{InvoiceCode, InvoiceIdentity, InvoiceNumber, IssueError};

/// Why a request (or a whole exchange) was refused. Codes are stable: a client may match
/// on them; the message beside a code is for people. They start at 2 because a result's
/// status 0 and 1 mean issued and replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    // Whole exchange (Error frame).
    /// The frame could not be parsed (bad magic, truncated, item boundaries wrong).
    Malformed = 2,
    /// The frame's protocol version is not spoken by the server.
    UnsupportedVersion = 3,
    /// The frame is larger than `FRAME_BYTES_MAX`.
    FrameTooLarge = 4,
    /// The batch is empty or has more than `BATCH_REQUESTS_MAX` requests.
    BatchTooLarge = 5,
    /// A frame kind the server does not accept from clients.
    UnexpectedKind = 6,

    // One request, refused by its content: retrying it unchanged is refused again.
    /// The item could not be decoded (bad taxpayer id, illegal rate, not UTF-8, lengths).
    InvalidItem = 10,
    /// A text field is too short or too long.
    FieldLength = 11,
    /// No lines or more than 16.
    LineCount = 12,
    /// A line with quantity zero.
    QuantityZero = 13,
    /// A line price of the wrong sign for the invoice kind.
    LineSign = 14,
    /// Amount arithmetic overflows.
    AmountOverflow = 15,
    /// A blue invoice with a zero amount.
    EmptyInvoice = 16,
    /// Declared amount ≠ Σ lines.
    AmountMismatch = 17,
    /// Declared tax ≠ computed tax.
    TaxMismatch = 18,
    /// Declared total ≠ amount + tax.
    TotalMismatch = 19,
    /// The seller is not served by this appliance.
    UnknownSeller = 20,
    /// Total above the seller's single-invoice ceiling.
    CeilingExceeded = 21,
    /// A red invoice whose original order is unknown.
    RedOriginalUnknown = 22,
    /// A red invoice naming another code/number than its original order's invoice.
    RedOriginalMismatch = 23,
    /// A red invoice offsetting a red invoice.
    RedOfRed = 24,
    /// Red invoices would exceed the original.
    RedExceedsOriginal = 25,
    /// The order was already issued from a different request.
    IdempotencyConflict = 26,
    /// The client's certificate is not authorised for the seller.
    Unauthorised = 27,

    // Nothing was issued; retrying the same request later is safe and may succeed
    // (except IndexFull, see there).
    /// The seller's pool is empty; a refill is under way.
    NoNumbersAvailable = 40,
    /// The idempotency index is full. Not retryable: the refusal lasts until orders
    /// expire (retention days) or the operator raises `limits.index_capacity_orders`, so
    /// a client retry cannot help. The code keeps its number (stable wire values).
    IndexFull = 41,
    /// The tax server could not be asked.
    TaxServerUnavailable = 42,
    /// The shard stopped (journal failure or shutdown).
    ShardStopped = 43,
    /// The server is shedding load.
    Overloaded = 44,
    /// The tax server refused this invoice's number (the number was spoiled and will never
    /// be used; a retry gets another number).
    TaxCodeRefused = 45,
    /// A red invoice whose original lives on another shard: that shard could not confirm
    /// the claim on the original (stopped, or too many reds waiting); nothing was issued.
    RedClaimUnavailable = 46,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 30] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::UnexpectedKind,
        ErrorCode::InvalidItem,
        ErrorCode::FieldLength,
        ErrorCode::LineCount,
        ErrorCode::QuantityZero,
        ErrorCode::LineSign,
        ErrorCode::AmountOverflow,
        ErrorCode::EmptyInvoice,
        ErrorCode::AmountMismatch,
        ErrorCode::TaxMismatch,
        ErrorCode::TotalMismatch,
        ErrorCode::UnknownSeller,
        ErrorCode::CeilingExceeded,
        ErrorCode::RedOriginalUnknown,
        ErrorCode::RedOriginalMismatch,
        ErrorCode::RedOfRed,
        ErrorCode::RedExceedsOriginal,
        ErrorCode::IdempotencyConflict,
        ErrorCode::Unauthorised,
        ErrorCode::NoNumbersAvailable,
        ErrorCode::IndexFull,
        ErrorCode::TaxServerUnavailable,
        ErrorCode::ShardStopped,
        ErrorCode::Overloaded,
        ErrorCode::TaxCodeRefused,
        ErrorCode::RedClaimUnavailable,
    ];

    /// The code for a wire value.
    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == value)
    }

    /// Whether resending the same request later may succeed (nothing was issued):
    /// codes 40 and above, except [`ErrorCode::IndexFull`], which only an operator can
    /// lift (a retry would just be refused again).
    pub fn is_retryable(self) -> bool {
        (self as u16) >= 40 && self != ErrorCode::IndexFull
    }

    /// The code for a core refusal.
    pub fn from_issue_error(error: &IssueError) -> ErrorCode {
        match error {
            IssueError::FieldLength { .. } => ErrorCode::FieldLength,
            IssueError::LineCount(_) => ErrorCode::LineCount,
            IssueError::QuantityZero(_) => ErrorCode::QuantityZero,
            IssueError::LineSign(_) => ErrorCode::LineSign,
            IssueError::AmountOverflow => ErrorCode::AmountOverflow,
            IssueError::EmptyInvoice => ErrorCode::EmptyInvoice,
            IssueError::AmountMismatch { .. } => ErrorCode::AmountMismatch,
            IssueError::TaxMismatch { .. } => ErrorCode::TaxMismatch,
            IssueError::TotalMismatch { .. } => ErrorCode::TotalMismatch,
            IssueError::UnknownSeller => ErrorCode::UnknownSeller,
            IssueError::CeilingExceeded { .. } => ErrorCode::CeilingExceeded,
            IssueError::RedOriginalUnknown => ErrorCode::RedOriginalUnknown,
            IssueError::RedOriginalMismatch => ErrorCode::RedOriginalMismatch,
            IssueError::RedOfRed => ErrorCode::RedOfRed,
            IssueError::RedExceedsOriginal { .. } => ErrorCode::RedExceedsOriginal,
            IssueError::IdempotencyConflict => ErrorCode::IdempotencyConflict,
            IssueError::IndexFull => ErrorCode::IndexFull,
            IssueError::NoNumbersAvailable => ErrorCode::NoNumbersAvailable,
            IssueError::TaxCodeRefused(_) => ErrorCode::TaxCodeRefused,
            IssueError::RedClaimUnavailable => ErrorCode::RedClaimUnavailable,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self, *self as u16)
    }
}

/// What the server returns for an issued invoice: everything the client does not already
/// have in its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    /// Invoice code and number.
    pub identity: InvoiceIdentity,
    /// Issue time, ms since the Unix epoch.
    pub issue_time_ms: u64,
    /// Tax control code from the tax server.
    pub tax_control_code: [u8; 32],
    /// 20 ASCII digits.
    pub check_code: [u8; 20],
}

/// One request's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult {
    /// Issued by this request.
    Issued(Issued),
    /// Issued earlier for the same order and the same request (idempotent replay): the
    /// same invoice as the first time.
    Replayed(Issued),
    /// Refused.
    Failed {
        /// Why.
        code: ErrorCode,
        /// Detail for people.
        message: String,
    },
}

/// Bytes of an issued result after its status.
const ISSUED_BYTES: usize = 8 + 4 + 8 + 32 + 20;
/// Messages are cut to this many bytes on the wire.
pub const MESSAGE_BYTES_MAX: usize = 1024;

/// Appends one result.
pub fn encode_result(out: &mut Vec<u8>, result: &ItemResult) {
    match result {
        ItemResult::Issued(issued) | ItemResult::Replayed(issued) => {
            let status: u16 = if matches!(result, ItemResult::Issued(_)) {
                0
            } else {
                1
            };
            out.extend_from_slice(&status.to_le_bytes());
            out.extend_from_slice(&issued.identity.code.get().to_le_bytes());
            out.extend_from_slice(&issued.identity.number.get().to_le_bytes());
            out.extend_from_slice(&issued.issue_time_ms.to_le_bytes());
            out.extend_from_slice(&issued.tax_control_code);
            out.extend_from_slice(&issued.check_code);
        }
        ItemResult::Failed { code, message } => {
            out.extend_from_slice(&(*code as u16).to_le_bytes());
            put_message(out, message);
        }
    }
}

fn put_message(out: &mut Vec<u8>, message: &str) {
    let mut len = message.len().min(MESSAGE_BYTES_MAX);
    while !message.is_char_boundary(len) {
        len -= 1;
    }
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..len]);
}

/// Why a reply could not be decoded (the server is buggy or not ours).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Fewer bytes than the fields need, or bytes left over.
    #[error("reply length does not match its fields")]
    Length,
    /// An unknown status or error code.
    #[error("unknown status {0}")]
    Status(u16),
    /// A code or number out of range, or a check code that is not 20 digits.
    #[error("invalid issued invoice in reply")]
    Invalid,
    /// A message that is not UTF-8.
    #[error("message is not UTF-8")]
    Utf8,
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], ReplyError> {
    if rest.len() < n {
        return Err(ReplyError::Length);
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_message(rest: &mut &[u8]) -> Result<String, ReplyError> {
    let len = u16::from_le_bytes(take(rest, 2)?.try_into().expect("2 bytes")) as usize;
    let bytes = take(rest, len)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ReplyError::Utf8)
}

/// Decodes `count` results from an issue reply body.
pub fn decode_results(body: &[u8], count: u32) -> Result<Vec<ItemResult>, ReplyError> {
    let mut rest = body;
    let mut results = Vec::with_capacity(count.min(crate::BATCH_REQUESTS_MAX) as usize);
    for _ in 0..count {
        let status = u16::from_le_bytes(take(&mut rest, 2)?.try_into().expect("2 bytes"));
        match status {
            0 | 1 => {
                let b = take(&mut rest, ISSUED_BYTES)?;
                let code = InvoiceCode::new(u64::from_le_bytes(b[0..8].try_into().unwrap()))
                    .map_err(|_| ReplyError::Invalid)?;
                let number = InvoiceNumber::new(u32::from_le_bytes(b[8..12].try_into().unwrap()))
                    .map_err(|_| ReplyError::Invalid)?;
                let check_code: [u8; 20] = b[52..72].try_into().unwrap();
                if !check_code.iter().all(u8::is_ascii_digit) {
                    return Err(ReplyError::Invalid);
                }
                let issued = Issued {
                    identity: InvoiceIdentity { code, number },
                    issue_time_ms: u64::from_le_bytes(b[12..20].try_into().unwrap()),
                    tax_control_code: b[20..52].try_into().unwrap(),
                    check_code,
                };
                results.push(if status == 0 {
                    ItemResult::Issued(issued)
                } else {
                    ItemResult::Replayed(issued)
                });
            }
            other => {
                let code = ErrorCode::from_u16(other).ok_or(ReplyError::Status(other))?;
                let message = take_message(&mut rest)?;
                results.push(ItemResult::Failed { code, message });
            }
        }
    }
    if !rest.is_empty() {
        return Err(ReplyError::Length);
    }
    Ok(results)
}

/// Appends a whole error frame.
pub fn encode_error_frame(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    let at = crate::frame::begin_frame(out, crate::FrameKind::Error, 0);
    out.extend_from_slice(&(code as u16).to_le_bytes());
    put_message(out, message);
    crate::frame::finish_frame(out, at);
}

/// Decodes an error frame's body.
pub fn decode_error(body: &[u8]) -> Result<(ErrorCode, String), ReplyError> {
    let mut rest = body;
    let raw = u16::from_le_bytes(take(&mut rest, 2)?.try_into().expect("2 bytes"));
    let code = ErrorCode::from_u16(raw).ok_or(ReplyError::Status(raw))?;
    let message = take_message(&mut rest)?;
    if !rest.is_empty() {
        return Err(ReplyError::Length);
    }
    Ok((code, message))
}
