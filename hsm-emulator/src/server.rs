//! The emulator's network shell: std threads, because an emulator needs clarity more than
//! scale. One accept thread; one reader thread per connection, which splits the byte
//! stream into frames with [`FrameDecoder`] and queues them; a pool of workers that
//! execute frames and write answers as each completes, so a connection's answers may
//! come back in another order than its requests (the protocol's correlation ids allow
//! it, and clients must cope).
//!
//! Bounds: at most `connections_max` connections (more are closed on accept), a job
//! queue of `threads × JOBS_PER_THREAD` frames (readers block when it is full, which
//! pushes back on clients through TCP), frames of at most `FRAME_BODY_BYTES_MAX`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use clap::Parser;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::config::{Args, Config, ConfigError};
use super::{lock, Emulator, EmulatorError};
use hsm_driver::proto::{self, DecodeError, FrameDecoder, Opcode, Status};

/// Frames queued per worker thread before readers block.
pub const JOBS_PER_THREAD: usize = 16;
/// Bytes asked from the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// A client that does not read its answers for this long is disconnected.
const WRITE_TIMEOUT_MS: u64 = 30_000;
/// How often idle workers look at the shutdown flag.
const WORKER_POLL_MS: u64 = 100;
/// Slice of a stall or latency sleep, so shutdown is not delayed by a long fault.
const SLEEP_SLICE_MS: u64 = 50;

/// Errors of the server and of `hsm-emu` start-up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad flags or config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The device could not be opened.
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
    /// Binding or configuring the listener failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// OS error.
        source: io::Error,
    },
    /// Spawning a thread failed.
    #[error("spawn thread: {0}")]
    Spawn(io::Error),
    /// Writing the `listening` line failed.
    #[error("stdout: {0}")]
    Stdout(io::Error),
    /// The PCIe region cannot be created or served.
    #[error("PCIe region {path}: {reason}")]
    Pcie {
        /// The region file.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
}

struct Conn {
    id: u64,
    // Writes are serialised per connection; readers use their own clone of the socket.
    writer: Mutex<TcpStream>,
    // A clone kept for shutdown from other threads (reset, shutdown of the server).
    control: TcpStream,
    dead: AtomicBool,
}

impl Conn {
    fn kill(&self, reset: bool) {
        self.dead.store(true, Ordering::Release);
        if reset {
            // SO_LINGER 0: the close sends RST instead of FIN, as a device reset would.
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid socket descriptor; the option struct outlives the call.
            unsafe {
                libc::setsockopt(
                    self.control.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
        let _ = self.control.shutdown(Shutdown::Both);
    }

    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        let mut w = lock(&self.writer);
        if let Err(e) = w.write_all(bytes) {
            tracing::debug!(conn = self.id, error = %e, "write failed; closing");
            drop(w);
            self.kill(false);
        }
    }
}

struct Job {
    conn: Arc<Conn>,
    opcode: u8,
    correlation_id: u64,
    body: Vec<u8>,
}

struct Shared {
    emulator: Arc<Emulator>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    connections_max: usize,
    shutdown: AtomicBool,
    next_conn_id: AtomicU64,
    // Reader threads, joined at shutdown so the device is released deterministically.
    // Finished ones are pruned on every accept, so at most `connections_max` live here.
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn reset_all_except(&self, keep: u64) {
        let victims: Vec<Arc<Conn>> = lock(&self.conns)
            .values()
            .filter(|c| c.id != keep)
            .cloned()
            .collect();
        tracing::info!(connections = victims.len(), "resetting connections");
        for c in victims {
            c.kill(true);
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// The bound address (with the ephemeral port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device behind the server.
    pub fn emulator(&self) -> &Arc<Emulator> {
        &self.shared.emulator
    }

    /// Blocks until the server stops (it stops only through [`Server::shutdown`]).
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting, closes every connection and joins the threads.
    pub fn shutdown(self) {
        self.shared.shutdown.store(true, Ordering::Release);
        // Wake the blocking accept with a throwaway connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).values().cloned().collect();
        for c in conns {
            c.kill(false);
        }
        let shared = Arc::clone(&self.shared);
        self.join();
        // The accept thread has exited, so no reader is added any more; each one ends
        // on its closed socket or on the closed job queue.
        let readers: Vec<JoinHandle<()>> = lock(&shared.readers).drain(..).collect();
        for r in readers {
            let _ = r.join();
        }
    }
}

/// Opens the emulator described by `config` and serves it.
pub fn serve(config: &Config) -> Result<Server, ServeError> {
    let emulator = Arc::new(Emulator::open(config)?);
    serve_emulator(emulator, config)
}

/// Serves an already opened emulator with the network settings of `config`.
pub fn serve_emulator(emulator: Arc<Emulator>, config: &Config) -> Result<Server, ServeError> {
    let listener = TcpListener::bind(config.listen).map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let shared = Arc::new(Shared {
        emulator,
        conns: Mutex::new(HashMap::new()),
        connections_max: config.connections_max,
        shutdown: AtomicBool::new(false),
        next_conn_id: AtomicU64::new(1),
        readers: Mutex::new(Vec::new()),
    });
    let (tx, rx) = bounded::<Job>(config.threads * JOBS_PER_THREAD);
    let mut threads = Vec::with_capacity(config.threads + 1);
    for i in 0..config.threads {
        let shared = Arc::clone(&shared);
        let rx = rx.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("hsm-emu-worker-{i}"))
                .spawn(move || worker(&shared, &rx))
                .map_err(ServeError::Spawn)?,
        );
    }
    {
        let shared = Arc::clone(&shared);
        threads.push(
            thread::Builder::new()
                .name("hsm-emu-accept".into())
                .spawn(move || accept_loop(&listener, &shared, &tx))
                .map_err(ServeError::Spawn)?,
        );
    }
    tracing::info!(%addr, threads = config.threads, "serving");
    Ok(Server {
        addr,
        shared,
        threads,
    })
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, tx: &Sender<Job>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                if shared.shutdown.load(Ordering::Acquire) {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        let faults = shared.emulator.faults();
        if faults.refusing() {
            tracing::info!(%peer, "refusing connection (fault)");
            drop(stream);
            continue;
        }
        if lock(&shared.conns).len() >= shared.connections_max {
            tracing::warn!(%peer, max = shared.connections_max, "connection limit reached");
            drop(stream);
            continue;
        }
        let drop_after_first = faults.drop_this_connection();
        let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)));
        let (Ok(writer), Ok(control)) = (stream.try_clone(), stream.try_clone()) else {
            tracing::warn!(%peer, "cannot clone socket");
            continue;
        };
        let conn = Arc::new(Conn {
            id,
            writer: Mutex::new(writer),
            control,
            dead: AtomicBool::new(false),
        });
        lock(&shared.conns).insert(id, Arc::clone(&conn));
        tracing::debug!(%peer, conn = id, drop_after_first, "connection accepted");
        let shared2 = Arc::clone(shared);
        let tx = tx.clone();
        let spawned = thread::Builder::new()
            .name(format!("hsm-emu-conn-{id}"))
            .spawn(move || {
                reader(stream, &conn, &shared2, &tx, drop_after_first);
                conn.kill(false);
                lock(&shared2.conns).remove(&conn.id);
            });
        match spawned {
            Ok(handle) => {
                let mut readers = lock(&shared.readers);
                readers.retain(|h| !h.is_finished());
                readers.push(handle);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot spawn connection thread");
                if let Some(c) = lock(&shared.conns).remove(&id) {
                    c.kill(false);
                }
            }
        }
    }
}

fn frame_error_status(e: &DecodeError) -> Status {
    match e {
        DecodeError::BodyChecksum { .. } => Status::ChecksumMismatch,
        DecodeError::UnsupportedVersion(_) => Status::UnsupportedVersion,
        DecodeError::UnknownOpcode(_) | DecodeError::UnexpectedOpcode(_) => Status::UnknownCommand,
        _ => Status::Malformed,
    }
}

fn reader(
    mut stream: TcpStream,
    conn: &Arc<Conn>,
    shared: &Shared,
    tx: &Sender<Job>,
    drop_after_first: bool,
) {
    let mut decoder = FrameDecoder::new();
    loop {
        let room = decoder.read_buf(READ_CHUNK_BYTES);
        let n = match stream.read(room) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        decoder.commit(n);
        loop {
            if shared.shutdown.load(Ordering::Acquire) || conn.dead.load(Ordering::Acquire) {
                return;
            }
            match decoder.next_frame() {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    if drop_after_first {
                        tracing::info!(conn = conn.id, "dropping connection mid-stream (fault)");
                        conn.kill(true);
                        return;
                    }
                    let job = Job {
                        conn: Arc::clone(conn),
                        opcode: frame.header.opcode,
                        correlation_id: frame.header.correlation_id(),
                        body: frame.body.to_vec(),
                    };
                    // Blocks when the workers are behind: back-pressure on this client.
                    if tx.send(job).is_err() {
                        return;
                    }
                }
                Err(fe) => {
                    let mut out = Vec::new();
                    let _ = proto::encode_error(
                        &mut out,
                        fe.header.opcode & !proto::RESPONSE_FLAG,
                        fe.header.correlation_id(),
                        frame_error_status(&fe.error),
                        &fe.error.to_string(),
                    );
                    conn.send(&out);
                    if fe.fatal {
                        tracing::info!(conn = conn.id, error = %fe.error, "unframeable input; closing");
                        return;
                    }
                }
            }
        }
    }
}

fn resets_connections(body: &[u8]) -> bool {
    matches!(
        proto::Request::decode(Opcode::SetFaults.request_byte(), body),
        Ok(proto::Request::SetFaults(f)) if f.reset_connections != 0
    )
}

fn sleep_while(shared: &Shared, mut remaining: Duration) {
    while !remaining.is_zero() && !shared.shutdown.load(Ordering::Acquire) {
        let slice = remaining.min(Duration::from_millis(SLEEP_SLICE_MS));
        thread::sleep(slice);
        remaining = remaining.saturating_sub(slice);
    }
}

fn worker(shared: &Shared, rx: &Receiver<Job>) {
    let mut out = Vec::with_capacity(READ_CHUNK_BYTES);
    loop {
        let job = match rx.recv_timeout(Duration::from_millis(WORKER_POLL_MS)) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => {
                if shared.shutdown.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if job.conn.dead.load(Ordering::Acquire) {
            continue;
        }
        let faults = shared.emulator.faults();
        // SetFaults is the control channel: never stalled, delayed or refused, so a test
        // can always switch a fault off again.
        let control = job.opcode == Opcode::SetFaults.request_byte();
        out.clear();
        if !control {
            // Re-read the switch every slice: a SetFaults may end the stall early.
            while let Some(left) = faults.stall_remaining() {
                if shared.shutdown.load(Ordering::Acquire) {
                    return;
                }
                thread::sleep(left.min(Duration::from_millis(SLEEP_SLICE_MS)));
            }
            sleep_while(shared, faults.latency());
        }
        if !control && faults.refusing() {
            let _ = proto::encode_error(
                &mut out,
                job.opcode,
                job.correlation_id,
                Status::Busy,
                "device refusing commands (fault)",
            );
            job.conn.send(&out);
            continue;
        }
        // A SetFaults that resets connections resets them before its switches change:
        // otherwise a command of a connection being reset, already past its dead check,
        // could be answered under the new switches in between.
        let reset_first =
            control && shared.emulator.allows_fault_injection() && resets_connections(&job.body);
        if reset_first {
            shared.reset_all_except(job.conn.id);
        }
        let effects =
            shared
                .emulator
                .handle_frame(job.opcode, job.correlation_id, &job.body, &mut out);
        // The reset happened above, before the answer: resetting again after answering
        // would also kill connections the client opened after reading that answer.
        debug_assert!(!effects.reset_connections || reset_first);
        job.conn.send(&out);
        // Do not keep a huge buffer around after one large batch.
        if out.capacity() > 4 * proto::FRAME_BODY_BYTES_MAX / 16 {
            out = Vec::with_capacity(READ_CHUNK_BYTES);
        }
    }
}

/// Runs `hsm-emu` with these arguments (the first is the program name): parses flags,
/// sets up logging to stderr, opens the device, serves TCP (and the PCIe region with
/// `--pcie`), prints `listening <addr>` on stdout (then, with `--pcie`,
/// `pcie <path> queues <n>`; both transports are ready before the first line), and
/// blocks for the life of the process.
pub fn run_from_args<I, T>(args: I) -> Result<(), ServeError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        // Help and version are printed and exit 0; usage errors exit 2 (clap's rules).
        Err(e) => e.exit(),
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let config = Config::from_args(&args)?;
    let server = serve(&config)?;
    let pcie = match &config.pcie {
        Some(settings) => Some(super::pcie::serve_pcie(
            Arc::clone(server.emulator()),
            settings,
            config.threads,
        )?),
        None => None,
    };
    // `listening` stays the first line: parents (appliance child.rs, tests) read it. Both
    // lines go out in one write: a parent that reads only the first line and closes the
    // pipe must not make the second write fail (EPIPE) and stop the emulator.
    let mut lines = format!("listening {}\n", server.local_addr());
    if let Some(p) = &pcie {
        lines.push_str(&format!(
            "pcie {} queues {}\n",
            p.path().display(),
            p.queues()
        ));
    }
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(lines.as_bytes())
        .map_err(ServeError::Stdout)?;
    stdout.flush().map_err(ServeError::Stdout)?;
    drop(stdout);
    server.join();
    drop(pcie);
    Ok(())
}
