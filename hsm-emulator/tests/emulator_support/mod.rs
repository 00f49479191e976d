//! Shared helpers of the emulator tests: a real `hsm-emu` child process in a temp data
//! dir (killed with SIGKILL on drop), canonical invoice bytes, and raw frame I/O.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use appliance_core::canonical::{
    CanonicalHeader, CANONICAL_HEADER_BYTES, CANONICAL_MAGIC, CANONICAL_VERSION,
};
use hsm_driver::proto::{self, FrameDecoder, Opcode, Request, Response};
use hsm_driver::tcp::blocking::Client;
use hsm_driver::tcp::{HsmError, TcpClientConfig};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::IntoBytes;

/// Bound on waiting for the `listening` line.
const STARTUP_TIMEOUT_S: u64 = 60;

const USCC: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// A valid unified social credit code from 17 characters.
pub fn taxpayer(first17: &str) -> String {
    let b = first17.as_bytes();
    assert_eq!(b.len(), 17);
    let mut sum = 0u32;
    let mut w = 1u32;
    for &c in b {
        sum += USCC.iter().position(|&x| x == c).expect("charset") as u32 * w;
        w = w * 3 % 31;
    }
    let check = USCC[((31 - sum % 31) % 31) as usize] as char;
    format!("{first17}{check}")
}

/// Seller A and B used across tests.
pub fn seller_a() -> String {
    taxpayer("91110000100000000")
}
/// Second seller.
pub fn seller_b() -> String {
    taxpayer("91310000200000000")
}

/// 18 bytes of a taxpayer id.
pub fn tp(s: &str) -> proto::Taxpayer {
    s.as_bytes().try_into().expect("18 bytes")
}

/// Canonical bytes of an invoice with a small body; only the header matters to the
/// emulator, `salt` varies the body so two invoices of one number differ.
pub fn invoice(seller: &str, code: u64, number: u32, red: bool, salt: u8) -> Vec<u8> {
    let body: Vec<u8> = (0..40u8).map(|i| i ^ salt).collect();
    let amount: i64 = if red { -10_000 } else { 10_000 };
    let tax = amount / 100 * 13;
    let header = CanonicalHeader {
        magic: CANONICAL_MAGIC,
        version: U16::new(CANONICAL_VERSION),
        kind: u8::from(red),
        line_count: 1,
        invoice_code: U64::new(code),
        invoice_number: U32::new(number),
        tax_rate_bp: U16::new(1300),
        reserved: [0; 6],
        issue_time_ms: U64::new(1_700_000_000_000),
        amount_fen: I64::new(amount),
        tax_fen: I64::new(tax),
        total_fen: I64::new(amount + tax),
        seller_taxpayer: tp(seller),
        buyer_taxpayer: [0; 18],
        original_code: U64::new(0),
        original_number: U32::new(0),
        body_len: U32::new(body.len() as u32),
    };
    let mut out = Vec::with_capacity(CANONICAL_HEADER_BYTES + body.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// Path of the built emulator.
pub fn emu_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hsm-emu")
}

/// A running `hsm-emu` child. Dropping it kills it (SIGKILL) and reaps it.
pub struct Emu {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Emu {
    /// Starts `hsm-emu --data-dir DIR --listen 127.0.0.1:0 ARGS...` and waits for its
    /// `listening` line. Stderr goes to `DIR/../emu-<pid>.log` next to the data dir.
    pub fn start(data_dir: &Path, args: &[&str]) -> Emu {
        Self::start_with_env(data_dir, args, &[])
    }

    /// As [`Emu::start`] with extra environment variables.
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Emu {
        match Self::try_start(data_dir, args, env) {
            Ok(e) => e,
            Err(msg) => panic!("hsm-emu did not start: {msg}"),
        }
    }

    /// Starts the emulator; `Err` with its stderr if it exits before listening.
    pub fn try_start(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Emu, String> {
        let dir = data_dir.to_string_lossy().into_owned();
        let mut full = vec!["--data-dir", dir.as_str(), "--listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Self::try_start_exact(data_dir, &full, env)
    }

    /// Starts the emulator with exactly `args` (no implied data dir or listen flag);
    /// `log_near` names where its stderr log goes.
    pub fn try_start_exact(
        log_near: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Emu, String> {
        let data_dir = log_near;
        let log_path = data_dir.with_extension(format!(
            "log{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(emu_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hsm-emu");
        let stdout = child.stdout.take().expect("stdout");
        // Read the line on a helper thread so a hung start-up fails the test after a
        // bound instead of hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let n = BufReader::new(stdout).read_line(&mut line).unwrap_or(0);
            let _ = tx.send((n, line));
        });
        let Ok((n, line)) = rx.recv_timeout(Duration::from_secs(STARTUP_TIMEOUT_S)) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(format!(
                "no `listening` line within {STARTUP_TIMEOUT_S} s; stderr: {log}"
            ));
        };
        if n == 0 {
            let _ = child.wait();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(log);
        }
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("address");
        Ok(Emu {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// A blocking client with a generous timeout.
    pub fn client(&self) -> Client {
        client(self.addr)
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A blocking client with a 30 s call timeout.
pub fn client(addr: SocketAddr) -> Client {
    let config = TcpClientConfig {
        call_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
        ..TcpClientConfig::default()
    };
    Client::connect(addr, config).expect("connect")
}

/// Calls and expects success.
pub fn ok(client: &mut Client, req: Request) -> Response {
    client
        .call(&req)
        .unwrap_or_else(|e| panic!("{:?} failed: {e}", req.opcode()))
}

/// Calls and expects a device error; returns its status.
pub fn refused(client: &mut Client, req: Request) -> proto::Status {
    match client.call(&req) {
        Err(HsmError::Device { status, .. }) => status,
        other => panic!("expected a device error, got {other:?}"),
    }
}

/// Requisition helper returning the segment.
pub fn requisition(
    client: &mut Client,
    seller: &str,
    count: u32,
    holder: u32,
    request_id: u64,
) -> proto::Segment {
    match ok(
        client,
        Request::Requisition {
            taxpayer: tp(seller),
            count,
            holder: proto::Holder::new(0, holder),
            request_id,
        },
    ) {
        Response::Requisition(s) => s,
        other => panic!("unexpected {other:?}"),
    }
}

/// Tax codes for a batch of invoices.
pub fn tax_codes(client: &mut Client, invoices: &[Vec<u8>]) -> Vec<proto::TaxCodeItem> {
    let mut batch = proto::InvoiceBatch::new();
    for i in invoices {
        batch.push(i).expect("push");
    }
    match ok(client, Request::TaxCodes(batch)) {
        Response::TaxCodes(items) => items,
        other => panic!("unexpected {other:?}"),
    }
}

/// Uploads (canonical, code) pairs.
pub fn upload(client: &mut Client, items: &[(Vec<u8>, [u8; 32])]) -> Vec<proto::UploadStatus> {
    let mut batch = proto::UploadBatch::new();
    for (c, code) in items {
        batch.push(c, code).expect("push");
    }
    match ok(client, Request::Upload(batch)) {
        Response::Upload(s) => s,
        other => panic!("unexpected {other:?}"),
    }
}

/// Raw connection for pipelining and fault tests: write frames, read frames.
pub struct Raw {
    pub stream: TcpStream,
    decoder: FrameDecoder,
}

impl Raw {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Raw {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    /// Writes one request frame.
    pub fn send(&mut self, correlation_id: u64, req: &Request) {
        let mut out = Vec::new();
        proto::encode_request(&mut out, correlation_id, req).expect("encode");
        self.stream.write_all(&out).expect("write");
    }

    /// Writes raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next frame: (opcode, status, correlation id, body). `Err` on EOF, reset
    /// or timeout.
    pub fn recv(&mut self) -> std::io::Result<(u8, u16, u64, Vec<u8>)> {
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => {
                    return Ok((
                        f.header.opcode,
                        f.header.status.get(),
                        f.header.correlation_id(),
                        f.body.to_vec(),
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ))
                }
            }
            let buf = self.decoder.read_buf(64 * 1024);
            let n = self.stream.read(buf)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            self.decoder.commit(n);
        }
    }

    /// Reads the answer and decodes it as an answer to `op`.
    pub fn recv_response(
        &mut self,
        op: Opcode,
    ) -> std::io::Result<(u64, Result<Response, proto::DeviceError>)> {
        let (opcode, status, id, body) = self.recv()?;
        let header = proto::FrameHeader::new(opcode, status, id, &body);
        let r = Response::decode_frame(op, &header, &body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        Ok((id, r))
    }
}
