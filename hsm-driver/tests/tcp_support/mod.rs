//! A small tax-server stand-in for the TCP client tests, built on the crate's codec:
//! std threads and sockets (independent of glommio), one thread per connection.
//!
//! Behaviour is chosen per request by the `Nop` payload (other commands: see
//! [`answer`]), so one server serves every scenario:
//! - `silent`: never answered (timeouts);
//! - `drop`: the connection is closed at once (reconnect);
//! - `garbage`: bytes without frame magic are sent (fatal framing error);
//! - `crc`: the answer's body is corrupted after its checksum was computed;
//! - `unknown`: an answer with a correlation id nobody waits for, then the real one;
//! - `busy`: a device error (`Status::Busy`);
//! - anything else: echoed.
//!
//! `Sign` is answered with a 3-byte body (malformed); every frame read in one socket
//! read is answered in reverse order, in one write (out-of-order pipelining).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use hsm_driver::proto::{
    encode_error, encode_frame, encode_response, EncodeError, FrameDecoder, FrameHeader, Opcode,
    Request, Response, Status, FRAME_HEADER_BYTES,
};

/// Counters the tests check.
#[derive(Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Request frames received.
    pub requests: AtomicUsize,
    /// Most request frames decoded from one socket read.
    pub max_frames_per_read: AtomicUsize,
}

/// A running test server; it stops accepting when dropped (threads are detached and end
/// with their connections).
pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    stop: Arc<AtomicBool>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

impl TestServer {
    pub fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                thread::spawn(move || serve(conn, s));
            }
        });
        TestServer { addr, stats, stop }
    }
}

enum Action {
    Answer(Vec<u8>),
    Silent,
    Drop,
}

fn answer(header: &FrameHeader, body: &[u8]) -> Action {
    let id = header.correlation_id();
    let mut out = Vec::new();
    let request = match Request::decode(header.opcode, body) {
        Ok(r) => r,
        Err(e) => {
            encode_error(
                &mut out,
                header.opcode,
                id,
                Status::Malformed,
                &e.to_string(),
            )
            .expect("encode");
            return Action::Answer(out);
        }
    };
    match request {
        Request::Nop(payload) => match payload.as_slice() {
            b"silent" => return Action::Silent,
            b"drop" => return Action::Drop,
            b"garbage" => out.extend_from_slice(b"this is not a frame at all, no magic here"),
            b"crc" => {
                encode_response(&mut out, id, &Response::Nop(payload.clone())).expect("encode");
                out[FRAME_HEADER_BYTES] ^= 0xff;
            }
            b"unknown" => {
                encode_response(&mut out, id + 1_000_000, &Response::Nop(b"stray".to_vec()))
                    .expect("encode");
                encode_response(&mut out, id, &Response::Nop(payload.clone())).expect("encode");
            }
            b"busy" => {
                encode_error(&mut out, Opcode::Nop as u8, id, Status::Busy, "try later")
                    .expect("encode");
            }
            _ => encode_response(&mut out, id, &Response::Nop(payload.clone())).expect("encode"),
        },
        Request::Sign { .. } => {
            encode_frame(&mut out, Opcode::Sign.response_byte(), 0, id, |o| {
                o.extend_from_slice(b"abc");
                Ok::<(), EncodeError>(())
            })
            .expect("encode");
        }
        other => {
            encode_error(
                &mut out,
                other.opcode() as u8,
                id,
                Status::UnknownCommand,
                "test server",
            )
            .expect("encode");
        }
    }
    Action::Answer(out)
}

fn serve(mut conn: TcpStream, stats: Arc<ServerStats>) {
    let _ = conn.set_nodelay(true);
    let mut decoder = FrameDecoder::new();
    loop {
        let buf = decoder.read_buf(64 * 1024);
        let n = match conn.read(buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.commit(n);
        let mut answers = Vec::new();
        let mut frames = 0;
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    frames += 1;
                    match answer(&f.header, f.body) {
                        Action::Answer(bytes) => answers.push(bytes),
                        Action::Silent => {}
                        Action::Drop => return,
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        stats.requests.fetch_add(frames, Ordering::SeqCst);
        stats
            .max_frames_per_read
            .fetch_max(frames, Ordering::SeqCst);
        // Reverse order: the client must match answers by correlation id.
        let out: Vec<u8> = answers.into_iter().rev().flatten().collect();
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// Runs `f` on a fresh glommio executor and returns its output.
///
/// On this machine (memlock 8 MiB) the default builder works: glommio 0.9 only refuses
/// to start below 512 KiB of memlock (sys/uring.rs, `MIN_MEMLOCK_LIMIT`) and, when its
/// 10 MiB default I/O buffer cannot be registered, logs a warning and uses unregistered
/// buffers. `io_memory` is lowered to 512 KiB anyway so that the test executors running
/// side by side stay under the limit and keep registered buffers.
pub fn run<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 * 1024)
        .spawn(f)
        .expect("executor")
        .join()
        .expect("executor join")
}
