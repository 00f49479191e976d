//! A blocking, sequential client over `std::net::TcpStream` for tools and tests: one
//! call at a time, same codec and error type as the pipelined client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Instant;

use super::{HsmError, TcpClientConfig};
use crate::proto::{encode_request, FrameDecoder, Request, Response};

/// Bytes asked of each socket read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Blocking tax-server client. A broken connection is re-established on the next call
/// (one attempt per call, no backoff: the caller decides when to retry).
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    config: TcpClientConfig,
    stream: Option<TcpStream>,
    decoder: FrameDecoder,
    next_id: u64,
    out: Vec<u8>,
}

impl Client {
    /// Connects to `addr` (first resolved address). `config.max_in_flight` and the
    /// backoff settings are unused here.
    pub fn connect(addr: impl ToSocketAddrs, config: TcpClientConfig) -> Result<Self, HsmError> {
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            HsmError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "address resolves to nothing",
            ))
        })?;
        let mut client = Client {
            addr,
            config,
            stream: None,
            decoder: FrameDecoder::new(),
            next_id: 1,
            out: Vec::new(),
        };
        client.reconnect()?;
        Ok(client)
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    fn reconnect(&mut self) -> Result<(), HsmError> {
        self.stream = None;
        // Bytes of the old connection are meaningless on the new one.
        self.decoder = FrameDecoder::new();
        let stream = TcpStream::connect_timeout(&self.addr, self.config.connect_timeout)
            .map_err(HsmError::from_io)?;
        stream.set_nodelay(true).map_err(HsmError::from_io)?;
        self.stream = Some(stream);
        Ok(())
    }

    /// Sends one command and waits for its answer, at most `call_timeout`. Answers to
    /// earlier, timed-out calls are recognised by correlation id and skipped.
    pub fn call(&mut self, request: &Request) -> Result<Response, HsmError> {
        let deadline = Instant::now() + self.config.call_timeout;
        let id = self.next_id;
        self.out.clear();
        encode_request(&mut self.out, id, request)?;
        self.next_id += 1;
        if self.stream.is_none() {
            self.reconnect()?;
        }
        let outcome = self.exchange(id, request, deadline);
        if let Err(e) = &outcome {
            // Transport trouble leaves the stream in an unknown state: start afresh next
            // time. A timeout or a bad answer keeps it (late answers are skipped by id).
            if matches!(
                e,
                HsmError::ConnectionLost | HsmError::Io(_) | HsmError::Refused
            ) {
                self.stream = None;
            }
        }
        outcome
    }

    fn exchange(
        &mut self,
        id: u64,
        request: &Request,
        deadline: Instant,
    ) -> Result<Response, HsmError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(HsmError::ConnectionLost);
        };
        let remaining = time_left(deadline)?;
        stream
            .set_write_timeout(Some(remaining))
            .map_err(HsmError::from_io)?;
        stream.write_all(&self.out).map_err(HsmError::from_io)?;
        loop {
            loop {
                let frame = match self.decoder.next_frame() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    // Frame boundaries are lost; the stream must be dropped.
                    Err(e) if e.fatal => return Err(HsmError::ConnectionLost),
                    Err(e) if e.header.correlation_id() == id => {
                        return Err(HsmError::Malformed(e.error.to_string()))
                    }
                    // A corrupt answer to an earlier, abandoned call: skip it.
                    Err(_) => continue,
                };
                if frame.header.correlation_id() != id {
                    continue;
                }
                return match Response::decode_frame(request.opcode(), &frame.header, frame.body) {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(device)) => Err(device.into()),
                    Err(e) => Err(HsmError::Malformed(e.to_string())),
                };
            }
            let remaining = time_left(deadline)?;
            stream
                .set_read_timeout(Some(remaining))
                .map_err(HsmError::from_io)?;
            let buf = self.decoder.read_buf(READ_CHUNK_BYTES);
            let n = stream.read(buf).map_err(HsmError::from_io)?;
            if n == 0 {
                return Err(HsmError::ConnectionLost);
            }
            self.decoder.commit(n);
        }
    }
}

fn time_left(deadline: Instant) -> Result<std::time::Duration, HsmError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(HsmError::Timeout)
    } else {
        Ok(left)
    }
}
