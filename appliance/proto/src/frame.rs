//! The 16-byte frame header that starts every message on a stream, and the limits.
//!
//! One bidirectional QUIC stream carries one exchange: the client writes one frame and
//! finishes its side; the server answers with one frame and finishes. So a frame never
//! needs to be found inside a byte stream: its end is the stream's end, and the header's
//! `body_bytes` is checked against what actually arrived.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// ALPN protocol id negotiated by TLS; a client without it is refused at the handshake.
pub const ALPN: &[u8] = b"einvoice/1";
/// Frame magic, ASCII "EINV".
pub const MAGIC: [u8; 4] = *b"EINV";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Header bytes.
pub const HEADER_BYTES: usize = 16;
/// Largest frame (header + body) either side accepts; a stream carrying more is refused
/// with [`crate::ErrorCode::FrameTooLarge`] without being read further.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most invoice requests in one issue frame. A railway ticket request encodes to about
/// 150-300 B, so a full batch is ~1 MiB; the largest legal request (~2.2 KiB) would not
/// fit 4,096 times in [`FRAME_BYTES_MAX`], so bulk clients split by both limits
/// (the client library does).
pub const BATCH_REQUESTS_MAX: u32 = 4096;
/// Concurrent bidirectional streams a client may open per connection.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → server: who are you (shard count, ports, limits)? Empty body.
    Hello = 1,
    /// Server → client: the answer to [`FrameKind::Hello`].
    HelloReply = 2,
    /// Client → server: a batch of invoice requests.
    Issue = 3,
    /// Server → client: one result per request of an [`FrameKind::Issue`] frame, in order.
    IssueReply = 4,
    /// Server → client: the whole exchange was refused (malformed frame, limits, version).
    Error = 5,
}

impl FrameKind {
    /// The kind for a header byte.
    pub fn from_u8(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::HelloReply,
            3 => FrameKind::Issue,
            4 => FrameKind::IssueReply,
            5 => FrameKind::Error,
            _ => return None,
        })
    }
}

/// Wire layout of the header, little-endian, no padding.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// [`VERSION`].
    pub version: u8,
    /// [`FrameKind`] as a byte.
    pub kind: u8,
    /// Reserved, zero.
    pub flags: U16,
    /// Items in the body (requests, results; 0 for hello and error frames).
    pub count: U32,
    /// Body bytes after the header.
    pub body_bytes: U32,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_BYTES);

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Items in the body.
    pub count: u32,
    /// Body bytes.
    pub body_bytes: u32,
}

/// Why a frame was refused before its body was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`HEADER_BYTES`] bytes arrived.
    #[error("truncated header: {0} bytes")]
    Truncated(usize),
    /// Not [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// A version this side does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Non-zero reserved flags.
    #[error("reserved flags set: {0:#x}")]
    Flags(u16),
    /// The header announces more than [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// The body that arrived is not the length the header announced.
    #[error("body has {actual} bytes, header says {announced}")]
    BodyLength {
        /// From the header.
        announced: u32,
        /// What arrived.
        actual: usize,
    },
}

impl Header {
    /// Encodes this header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let raw = RawHeader {
            magic: MAGIC,
            version: VERSION,
            kind: self.kind as u8,
            flags: U16::new(0),
            count: U32::new(self.count),
            body_bytes: U32::new(self.body_bytes),
        };
        let mut out = [0u8; HEADER_BYTES];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Validates the first [`HEADER_BYTES`] of `bytes` (the body may not have arrived yet,
    /// so its length is not checked here: see [`split_frame`]).
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let Some(head) = bytes.get(..HEADER_BYTES) else {
            return Err(HeaderError::Truncated(bytes.len()));
        };
        let raw = RawHeader::read_from_bytes(head).map_err(|_| HeaderError::Truncated(0))?;
        if raw.magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if raw.version != VERSION {
            return Err(HeaderError::UnsupportedVersion(raw.version));
        }
        let kind = FrameKind::from_u8(raw.kind).ok_or(HeaderError::UnknownKind(raw.kind))?;
        if raw.flags.get() != 0 {
            return Err(HeaderError::Flags(raw.flags.get()));
        }
        let total = HEADER_BYTES as u64 + u64::from(raw.body_bytes.get());
        if total > FRAME_BYTES_MAX as u64 {
            return Err(HeaderError::TooLarge(total));
        }
        Ok(Header {
            kind,
            count: raw.count.get(),
            body_bytes: raw.body_bytes.get(),
        })
    }
}

/// Validates a whole frame (what one side of a stream carried) and returns the header
/// and the body.
pub fn split_frame(frame: &[u8]) -> Result<(Header, &[u8]), HeaderError> {
    let header = Header::decode(frame)?;
    let body = &frame[HEADER_BYTES..];
    if body.len() != header.body_bytes as usize {
        return Err(HeaderError::BodyLength {
            announced: header.body_bytes,
            actual: body.len(),
        });
    }
    Ok((header, body))
}

/// Appends a frame with `body` to `out`.
pub fn write_frame(out: &mut Vec<u8>, kind: FrameKind, count: u32, body: &[u8]) {
    let header = Header {
        kind,
        count,
        body_bytes: body.len() as u32,
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(body);
}

/// Starts a frame whose body is appended afterwards; [`finish_frame`] fills in the body
/// length. Returns the header's offset.
pub fn begin_frame(out: &mut Vec<u8>, kind: FrameKind, count: u32) -> usize {
    let at = out.len();
    out.extend_from_slice(
        &Header {
            kind,
            count,
            body_bytes: 0,
        }
        .encode(),
    );
    at
}

/// Fills in the body length of the frame begun at `at` with [`begin_frame`].
pub fn finish_frame(out: &mut [u8], at: usize) {
    let body = (out.len() - at - HEADER_BYTES) as u32;
    out[at + 12..at + 16].copy_from_slice(&body.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_strictness() {
        let h = Header {
            kind: FrameKind::Issue,
            count: 7,
            body_bytes: 3,
        };
        let mut frame = h.encode().to_vec();
        frame.extend_from_slice(b"abc");
        assert_eq!(split_frame(&frame).unwrap(), (h, &b"abc"[..]));
        assert_eq!(
            split_frame(&frame[..18]),
            Err(HeaderError::BodyLength {
                announced: 3,
                actual: 2
            })
        );
        assert_eq!(
            Header::decode(&frame[..15]),
            Err(HeaderError::Truncated(15))
        );
        let mut bad = frame.clone();
        bad[4] = 2;
        assert_eq!(
            Header::decode(&bad),
            Err(HeaderError::UnsupportedVersion(2))
        );
        let mut bad = frame.clone();
        bad[5] = 9;
        assert_eq!(Header::decode(&bad), Err(HeaderError::UnknownKind(9)));
        let mut bad = frame.clone();
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(HeaderError::BadMagic));
        let mut bad = frame.clone();
        bad[6] = 1;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Flags(1)));
        let mut bad = frame;
        bad[12..16].copy_from_slice(&(FRAME_BYTES_MAX as u32).to_le_bytes());
        assert!(matches!(
            Header::decode(&bad),
            Err(HeaderError::TooLarge(_))
        ));
    }

    #[test]
    fn begin_finish_sets_body_length() {
        let mut out = vec![9u8; 3];
        let at = begin_frame(&mut out, FrameKind::IssueReply, 2);
        out.extend_from_slice(&[1, 2, 3, 4, 5]);
        finish_frame(&mut out, at);
        let (h, body) = split_frame(&out[3..]).unwrap();
        assert_eq!(h.body_bytes, 5);
        assert_eq!(body, &[1, 2, 3, 4, 5]);
    }
}
