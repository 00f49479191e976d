//! Why bytes did not decode ([`DecodeError`]) or a value could not be encoded
//! ([`EncodeError`]), and the limit check every encoder uses.

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame does not start with [`FRAME_MAGIC`](super::FRAME_MAGIC) (stream out of sync).
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame's protocol version is not [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// `body_len` exceeds [`FRAME_BODY_BYTES_MAX`](super::FRAME_BODY_BYTES_MAX).
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
    /// The status code is not a known [`Status`](super::Status).
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
    /// An error response was requested with [`Status::Ok`](super::Status::Ok).
    #[error("an error response needs a non-ok status")]
    OkIsNotAnError,
}

pub(super) fn limit(what: &'static str, value: usize, max: usize) -> Result<(), EncodeError> {
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
