//! An endpoint's datagram I/O with the kernel's segmentation offloads (quinn-udp).
//!
//! A bulk exchange moves ~200 KB of requests in and ~75 KB of answers out, some 200
//! datagrams each way. One system call (or one io_uring operation) per datagram cost a
//! shard more CPU than its whole issuance core, so:
//! - sends use UDP GSO: quinn-proto lays out up to [`UdpIo::max_gso_segments`]
//!   equal-sized datagrams in one buffer, and one `sendmsg` hands them all to the kernel;
//! - receives use UDP GRO and `recvmmsg`: one call returns several buffers, each holding
//!   up to 64 datagrams of one sender, split by their stride.
//!
//! The socket stays owned by glommio's [`UdpSocket`]: quinn-udp only issues
//! non-blocking calls on its descriptor, and when there is nothing to read the receiver
//! waits for readability with glommio's `peek_from` (an io_uring operation that
//! completes when a datagram is queued, without consuming it).

use bytes::BytesMut;
use glommio::net::UdpSocket;
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState, BATCH_SIZE};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Largest buffer the kernel fills with one GRO batch: coalesced datagrams keep the IP
/// packet's 16-bit length, so a batch never exceeds 64 KiB.
const GRO_BUFFER_BYTES: usize = 64 * 1024;

/// Receive buffers filled per `recvmmsg` (quinn-udp's batch, at most).
const RECV_BUFFERS: usize = if BATCH_SIZE < 8 { BATCH_SIZE } else { 8 };

/// Datagrams that arrived together from one sender: `data` holds them back to back,
/// each `stride` bytes long but the last, which may be shorter.
pub struct Received {
    /// The datagrams' bytes.
    pub data: BytesMut,
    /// Length of every datagram but the last.
    pub stride: usize,
    /// Who sent them.
    pub from: SocketAddr,
    /// The local address they were sent to, when the kernel reports it.
    pub local_ip: Option<IpAddr>,
    /// Their ECN codepoint.
    pub ecn: Option<quinn_proto::EcnCodepoint>,
}

/// One UDP socket with GSO/GRO state.
pub struct UdpIo {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl UdpIo {
    /// Takes over `socket`, enabling GRO and packet-info reporting where the kernel
    /// supports them.
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(sock_ref(&borrowed(&socket)))?;
        Ok(UdpIo { socket, state })
    }

    /// Datagrams one send may carry (1 where the kernel has no GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr().map_err(io::Error::from)
    }

    /// Waits for datagrams and appends every batch that one `recvmmsg` returns to `out`.
    /// `scratch` is the reusable receive area.
    pub async fn recv(&self, scratch: &mut RecvScratch, out: &mut Vec<Received>) -> io::Result<()> {
        loop {
            let mut metas = [RecvMeta::default(); RECV_BUFFERS];
            // A fixed array, not a Vec: this runs once per wake-up of the receiver.
            let mut chunks = scratch.buf.chunks_mut(GRO_BUFFER_BYTES);
            let mut iovs: [IoSliceMut<'_>; RECV_BUFFERS] = std::array::from_fn(|_| {
                IoSliceMut::new(
                    chunks
                        .next()
                        .expect("the scratch holds RECV_BUFFERS buffers"),
                )
            });
            let fd = borrowed(&self.socket);
            match self.state.recv(sock_ref(&fd), &mut iovs, &mut metas) {
                Ok(n) => {
                    for (meta, iov) in metas.iter().zip(iovs.iter()).take(n) {
                        if meta.len == 0 {
                            continue;
                        }
                        out.push(Received {
                            // One copy into a buffer of the exact size: quinn-proto keeps
                            // slices of it (stream data) for as long as it needs them,
                            // while the large receive area is reused at once.
                            data: BytesMut::from(&iov[..meta.len]),
                            stride: meta.stride.max(1),
                            from: meta.addr,
                            local_ip: meta.dst_ip,
                            ecn: meta
                                .ecn
                                .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8)),
                        });
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness: completes once a datagram is queued, consuming nothing.
                    let mut byte = [0u8; 1];
                    if let Err(e) = self.socket.peek_from(&mut byte).await {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends the datagrams quinn-proto laid out in `contents` (one, or several of
    /// `transmit.segment_size` bytes each). Send errors concern one peer and are only
    /// logged, as for any UDP sender: QUIC retransmits what is lost.
    pub async fn send(&self, transmit: &quinn_proto::Transmit, contents: &[u8]) {
        let udp_transmit = quinn_udp::Transmit {
            destination: transmit.destination,
            ecn: transmit
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        let fd = borrowed(&self.socket);
        match self.state.send(sock_ref(&fd), &udp_transmit) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The socket's send buffer is full: hand the datagrams to io_uring one by
                // one, which waits for room instead of dropping them.
                let segment = transmit.segment_size.unwrap_or(contents.len()).max(1);
                for datagram in contents.chunks(segment) {
                    if let Err(e) = self.socket.send_to(datagram, transmit.destination).await {
                        tracing::debug!(error = %e, destination = %transmit.destination, "udp send failed");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, destination = %transmit.destination, "udp send failed")
            }
        }
    }
}

/// The reusable receive area of one receiver.
pub struct RecvScratch {
    buf: Vec<u8>,
}

impl Default for RecvScratch {
    fn default() -> Self {
        RecvScratch {
            buf: vec![0u8; GRO_BUFFER_BYTES * RECV_BUFFERS],
        }
    }
}

fn borrowed(socket: &UdpSocket) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `socket`, which outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(socket.as_raw_fd()) }
}

fn sock_ref<'a>(fd: &'a BorrowedFd<'a>) -> UdpSockRef<'a> {
    UdpSockRef::from(fd)
}
