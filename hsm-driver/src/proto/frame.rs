//! Frames: the fixed 24-byte [`FrameHeader`], encoding whole frames into a caller's
//! buffer, [`FrameDecoder`] (reassembly from a byte stream, shared by the TCP client and
//! the emulator) and [`decode_frame`] for one whole frame.

use super::*;

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
