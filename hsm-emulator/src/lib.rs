//! The tax-server emulator (binary `hsm-emu`): a cipher machine's tax logic with
//! persistent state, keys from a [`keys::KeyBackend`], and fault switches, served over the
//! TCP frame protocol of [`hsm_driver::proto`] and over the PCIe interface whose driver
//! side is [`hsm_driver::pcie`]. Everything device-side lives in this crate, so that the
//! appliance links only the driver.
//!
//! - [`Emulator`] is the device: state plus command handling, sans-IO. Its
//!   [`Emulator::handle_frame`] takes a request frame's opcode, correlation id and body
//!   and appends the response frame to a buffer; tests drive it without sockets.
//! - [`serve`] is the network shell: an accept thread, a reader thread per connection
//!   and a pool of worker threads answering frames as they complete (out of order).
//! - [`pcie`] serves the same device over the PCIe interface (docs/hsm-pcie.md): a
//!   firmware thread polling shared-memory rings in a file mapping, with the device's
//!   sans-IO side of the rings ([`pcie::device`]) and its interrupt sender
//!   ([`pcie::notify`]).
//! - [`keys`]: the device key backends (software file, PKCS#11 wrapped).
//! - [`crypto`]: tax control codes and SM2 signing (plus the driver's shared crypto,
//!   re-exported).
//! - [`run_from_args`] is the `hsm-emu` binary (and the `appliance hsm-emu` subcommand).
//!
//! Durability: every change a response depends on (grants, returns, report marks,
//! uploads) is on disk before the response is written; see docs/hsm-emulator.md.
#![deny(missing_docs)]

mod coded;
pub mod config;
mod counters;
pub mod crypto;
mod faults;
pub mod keys;
pub mod pcie;
mod server;
pub mod state;
pub mod uploads;

use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use appliance_core::canonical::{
    CanonicalHeader, CANONICAL_BYTES_MAX, CANONICAL_HEADER_BYTES, CANONICAL_MAGIC,
    CANONICAL_VERSION, KIND_BLUE, KIND_RED,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::keys::{KeyBackend, KeyError, Pkcs11Backend, SoftwareBackend};
use crypto::{Sm2Signer, TaxCodeAlgorithm, TaxCodeKey};
use hsm_driver::proto::{
    self, DecodeError, DeviceInfo, FaultConfig, HeldSegment, Holder, InventoryScope, Opcode,
    PeriodReport, Request, Response, Segment, Status, TaxCodeItem, TaxCodeStatus, Taxpayer,
    TaxpayerInventory, UploadStatus, INVENTORY_SEGMENTS_MAX, TAX_CODES_BATCH_MAX,
    TAX_CODE_ITEM_BYTES,
};

pub use config::{
    Args, Config, ConfigError, FaultSettings, Grant, KeyBackendKind, PcieFileConfig, PcieSettings,
};
pub use faults::Faults;
pub use pcie::{serve_pcie, FirmwareStats, PcieServer};
pub use server::{run_from_args, serve, ServeError, Server};
use state::{DeviceState, GrantHint, GrantIndex, NumberCheck, Refusal, StateError};
use uploads::{UploadLog, UploadRecord};

/// Firmware string reported by DeviceInfo.
pub const FIRMWARE: &str = concat!("hsm-emu ", env!("CARGO_PKG_VERSION"));
/// Name of the lock file that keeps two emulators off one data dir.
pub const LOCK_FILE: &str = "lock";

/// Errors opening the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The data dir cannot be created or locked.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory or lock file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Another emulator holds the data dir.
    #[error("data dir {0} is in use by another emulator")]
    Locked(PathBuf),
    /// The key backend failed.
    #[error("keys: {0}")]
    Keys(#[from] KeyError),
    /// The persistent state cannot be opened.
    #[error("state: {0}")]
    State(#[from] StateError),
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
}

/// Uploads and the running sums derived from them.
#[derive(Debug)]
struct UploadBook {
    log: UploadLog,
    /// Per taxpayer slot: sums of uploads since the last clear.
    since_clear: Vec<Sums>,
    /// Per taxpayer slot: all uploads ever accepted.
    total: Vec<u64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    count: u64,
    amount_fen: i64,
    tax_fen: i64,
    total_fen: i64,
}

impl Sums {
    fn add(&mut self, r: &UploadRecord) {
        self.count += 1;
        // Saturating: a hostile stream of maximal amounts must not wrap a report.
        self.amount_fen = self.amount_fen.saturating_add(r.amount_fen);
        self.tax_fen = self.tax_fen.saturating_add(r.tax_fen);
        self.total_fen = self.total_fen.saturating_add(r.total_fen);
    }
}

/// The emulated device.
pub struct Emulator {
    data_dir: PathBuf,
    // Held for the emulator's lifetime: the flock is released when the file closes,
    // including when the process is killed.
    _lock: File,
    device_id: String,
    key_id: String,
    backend_kind: &'static str,
    public_key: [u8; 65],
    tax_key: TaxCodeKey,
    signer: Sm2Signer,
    allow_fault_injection: bool,
    faults: Faults,
    // Lock order: state, then uploads, then counters.
    state: Mutex<DeviceState>,
    index: RwLock<Arc<GrantIndex>>,
    uploads: Mutex<UploadBook>,
    counters: Mutex<counters::Counters>,
    coded: coded::CodedMarks,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("data_dir", &self.data_dir)
            .field("device_id", &self.device_id)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// What the network shell must do after a command, beyond sending its answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// Reset every other open connection (SetFaults with `reset_connections`).
    pub reset_connections: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave these structures half-updated in a way
    // that matters: every change is built on a copy and swapped in after it is durable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refusal_status(r: &Refusal) -> Status {
    match r {
        Refusal::UnknownTaxpayer => Status::UnknownTaxpayer,
        Refusal::Exhausted => Status::InventoryExhausted,
        Refusal::BadRequest(_) => Status::Malformed,
        Refusal::RequestIdConflict => Status::RequestIdConflict,
        Refusal::NotGranted => Status::SegmentNotHeld,
        Refusal::NotHolder => Status::SegmentNotHeld,
        Refusal::ReturnConflict => Status::SegmentNotHeld,
        Refusal::Limit(_) => Status::Busy,
        Refusal::Storage(_) => Status::StorageFailure,
    }
}

fn device_error(status: Status, message: impl Into<String>) -> proto::DeviceError {
    proto::DeviceError {
        status,
        message: message.into(),
    }
}

fn from_refusal(r: Refusal) -> proto::DeviceError {
    device_error(refusal_status(&r), r.to_string())
}

/// Reads and checks the fixed header of a canonical invoice; `None` if malformed.
fn canonical_header(item: &[u8]) -> Option<CanonicalHeader> {
    if item.len() < CANONICAL_HEADER_BYTES || item.len() > CANONICAL_BYTES_MAX {
        return None;
    }
    let (hdr, _) = CanonicalHeader::read_from_prefix(item).ok()?;
    let body_len = usize::try_from(hdr.body_len.get()).ok()?;
    let well_formed = hdr.magic == CANONICAL_MAGIC
        && hdr.version.get() == CANONICAL_VERSION
        && (hdr.kind == KIND_BLUE || hdr.kind == KIND_RED)
        && CANONICAL_HEADER_BYTES + body_len == item.len();
    well_formed.then_some(hdr)
}

fn lock_data_dir(dir: &Path) -> Result<File, EmulatorError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| EmulatorError::DataDir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a valid, open descriptor; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(EmulatorError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

impl Emulator {
    /// Opens the device on `config.data_dir`: locks the dir, loads or generates keys,
    /// loads the state and merges the configured grants, replays the upload log.
    pub fn open(config: &Config) -> Result<Self, EmulatorError> {
        let dir = &config.data_dir;
        fs::create_dir_all(dir).map_err(|source| EmulatorError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let lock_file = lock_data_dir(dir)?;
        let backend: Box<dyn KeyBackend> = match config.key_backend {
            KeyBackendKind::Software => Box::new(SoftwareBackend::new(dir)),
            KeyBackendKind::Pkcs11 => {
                let settings = config.pkcs11.clone().ok_or_else(|| {
                    EmulatorError::Config("pkcs11 backend without settings".into())
                })?;
                Box::new(Pkcs11Backend::new(dir, settings))
            }
        };
        let keys = backend.open()?;
        let tax_key = TaxCodeKey::hmac_sm3(keys.tax_key());
        let signer = Sm2Signer::from_secret_bytes(keys.sign_secret())
            .map_err(|_| KeyError::InvalidSigningKey)?;
        let default_id = format!("EMU-{}", &keys.key_id()[..8.min(keys.key_id().len())]);
        let device_id = config.device_id.clone().unwrap_or(default_id);
        if device_id.is_empty() || device_id.len() > proto::DEVICE_STRING_BYTES_MAX {
            return Err(EmulatorError::Config("device id length".into()));
        }
        let state = DeviceState::open(dir, &config.grants, &device_id)?;
        let index = GrantIndex::build(&state);
        let slots = index.taxpayers.len();
        if slots > proto::TAXPAYERS_MAX {
            return Err(EmulatorError::Config("too many taxpayers".into()));
        }
        let log = UploadLog::open(dir)?;
        let mut book = UploadBook {
            log,
            since_clear: vec![Sums::default(); slots],
            total: vec![0; slots],
        };
        for r in book.log.records() {
            if let Some(slot) = index.taxpayer_slot(&r.seller) {
                book.total[slot] += 1;
                let tp = String::from_utf8_lossy(&r.seller);
                let mark = state
                    .clears
                    .get(tp.as_ref())
                    .map_or(0, |m| m.cleared_upload_seq);
                if r.seq > mark {
                    book.since_clear[slot].add(r);
                }
            }
        }
        let counters = counters::Counters::open(dir, &index.taxpayers)?;
        let coded = coded::CodedMarks::open(dir)?;
        let faults = Faults::new(config.faults);
        tracing::info!(
            data_dir = %dir.display(),
            device_id = %state.device_id,
            key_backend = backend.kind(),
            key_id = keys.key_id(),
            taxpayers = slots,
            segments = state.segments.len(),
            uploads = book.log.len(),
            "emulator state loaded"
        );
        Ok(Self {
            data_dir: dir.clone(),
            _lock: lock_file,
            device_id: state.device_id.clone(),
            key_id: keys.key_id().to_string(),
            backend_kind: backend.kind(),
            public_key: *keys.public_key(),
            tax_key,
            signer,
            allow_fault_injection: config.allow_fault_injection,
            faults,
            state: Mutex::new(state),
            index: RwLock::new(Arc::new(index)),
            uploads: Mutex::new(book),
            counters: Mutex::new(counters),
            coded,
        })
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The key id of the device keys.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The SM2 public key.
    pub fn public_key(&self) -> &[u8; 65] {
        &self.public_key
    }

    /// The pre-keyed tax-code key (tests recompute codes with it).
    pub fn tax_code_key(&self) -> &TaxCodeKey {
        &self.tax_key
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    fn index(&self) -> Arc<GrantIndex> {
        // The lock is held only to clone the Arc; checks run on the snapshot.
        self.index
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    fn publish_index(&self, state: &DeviceState) {
        let fresh = Arc::new(GrantIndex::build(state));
        match self.index.write() {
            Ok(mut g) => *g = fresh,
            Err(p) => *p.into_inner() = fresh,
        }
    }

    /// Handles one request frame and appends exactly one response frame to `out`.
    pub fn handle_frame(
        &self,
        opcode: u8,
        correlation_id: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Effects {
        // The hot path encodes its results in place instead of building a Response.
        if opcode == Opcode::TaxCodes.request_byte() {
            // Checked and walked in place: no copy of the (up to ~1 MB) body.
            return match proto::Invoices::decode(body) {
                Ok((holder, items)) => {
                    let count = items.len();
                    self.tax_codes_frame(correlation_id, &holder, items, count, out);
                    Effects::default()
                }
                Err(e) => {
                    let status = decode_status(&e);
                    self.error_frame(opcode, correlation_id, status, &e.to_string(), out)
                }
            };
        }
        let request = match Request::decode(opcode, body) {
            Ok(r) => r,
            Err(e) => {
                let status = decode_status(&e);
                return self.error_frame(opcode, correlation_id, status, &e.to_string(), out);
            }
        };
        let mut effects = Effects::default();
        match self.execute(request, &mut effects) {
            Ok(response) => {
                if let Err(e) = proto::encode_response(out, correlation_id, &response) {
                    return self.error_frame(
                        opcode,
                        correlation_id,
                        Status::Internal,
                        &e.to_string(),
                        out,
                    );
                }
            }
            Err(err) => {
                self.error_frame(opcode, correlation_id, err.status, &err.message, out);
            }
        }
        effects
    }

    fn error_frame(
        &self,
        opcode: u8,
        correlation_id: u64,
        status: Status,
        message: &str,
        out: &mut Vec<u8>,
    ) -> Effects {
        if status != Status::Internal && status != Status::StorageFailure {
            tracing::debug!(opcode, correlation_id, %status, message, "command refused");
        } else {
            tracing::warn!(opcode, correlation_id, %status, message, "command failed");
        }
        // encode_error only fails for Status::Ok, which is never passed here.
        let _ = proto::encode_error(out, opcode, correlation_id, status, message);
        Effects::default()
    }

    /// Executes a decoded request.
    pub fn execute(
        &self,
        request: Request,
        effects: &mut Effects,
    ) -> Result<Response, proto::DeviceError> {
        match request {
            Request::DeviceInfo => Ok(Response::DeviceInfo(self.device_info())),
            Request::Requisition {
                taxpayer,
                count,
                holder,
                request_id,
            } => self
                .requisition(&taxpayer, count, holder, request_id)
                .map(Response::Requisition),
            Request::ReturnSegment {
                taxpayer,
                segment,
                holder,
            } => self
                .return_segment(&taxpayer, segment, holder)
                .map(|()| Response::ReturnSegment),
            Request::TaxCodes(batch) => {
                let mut items = Vec::with_capacity(batch.len());
                let index = self.index();
                let mut tally = vec![(0u64, 0u64); index.taxpayers.len()];
                let mut hint = GrantHint::default();
                let holder = batch.holder();
                for item in batch.iter() {
                    items.push(self.tax_code_item(&index, &mut hint, &holder, item, &mut tally));
                }
                self.record_tally(&tally);
                Ok(Response::TaxCodes(items))
            }
            Request::Sign { digest } => Ok(Response::Sign(self.signer.sign(&digest))),
            Request::Upload(batch) => self.upload(batch.iter()).map(Response::Upload),
            Request::ReportAndClear {
                taxpayer,
                period_end_ms,
            } => self
                .report_and_clear(&taxpayer, period_end_ms)
                .map(Response::ReportAndClear),
            Request::Inventory(scope) => self.inventory(scope).map(Response::Inventory),
            Request::Nop(bytes) => Ok(Response::Nop(bytes)),
            Request::SetFaults(f) => {
                if !self.allow_fault_injection {
                    return Err(device_error(
                        Status::Forbidden,
                        "fault injection is off (start with --allow-fault-injection)",
                    ));
                }
                self.faults.set(&f);
                effects.reset_connections = f.reset_connections != 0;
                tracing::info!(?f, "faults set");
                Ok(Response::SetFaults)
            }
        }
    }

    /// Whether SetFaults is served (`--allow-fault-injection`).
    pub fn allows_fault_injection(&self) -> bool {
        self.allow_fault_injection
    }

    /// DeviceInfo.
    pub fn device_info(&self) -> DeviceInfo {
        let index = self.index();
        DeviceInfo {
            device_id: self.device_id.clone(),
            firmware: format!("{FIRMWARE} {}", self.backend_kind),
            sm2_public_key: self.public_key,
            tax_code_algorithm: TaxCodeAlgorithm::HmacSm3,
            batch_max: TAX_CODES_BATCH_MAX as u32,
            taxpayers: index.taxpayers.clone(),
        }
    }

    /// Requisition: carves a segment (or replays the one granted to `(holder,
    /// request_id)`), durable before it returns.
    pub fn requisition(
        &self,
        taxpayer: &Taxpayer,
        count: u32,
        holder: Holder,
        request_id: u64,
    ) -> Result<Segment, proto::DeviceError> {
        let tp = std::str::from_utf8(taxpayer)
            .map_err(|_| device_error(Status::UnknownTaxpayer, "taxpayer is not ASCII"))?;
        let mut state = lock(&self.state);
        let mut next = state.clone();
        let (i, changed) = next
            .requisition(tp, count, holder, request_id)
            .map_err(from_refusal)?;
        let s = &next.segments[i];
        let segment = Segment {
            code: s.invoice_code,
            first: s.first,
            count: s.count,
        };
        if changed {
            next.persist(&self.data_dir)
                .map_err(|e| device_error(Status::StorageFailure, e.to_string()))?;
            *state = next;
            self.publish_index(&state);
            tracing::info!(
                taxpayer = tp,
                %holder,
                request_id,
                ?segment,
                "segment granted"
            );
        }
        Ok(segment)
    }

    /// ReturnSegment: marks a range of a segment granted to `holder` returned (never
    /// re-granted).
    pub fn return_segment(
        &self,
        taxpayer: &Taxpayer,
        segment: Segment,
        holder: Holder,
    ) -> Result<(), proto::DeviceError> {
        let tp = std::str::from_utf8(taxpayer)
            .map_err(|_| device_error(Status::UnknownTaxpayer, "taxpayer is not ASCII"))?;
        let mut state = lock(&self.state);
        {
            // An uploaded invoice proves the number was used: it cannot be returned.
            let book = lock(&self.uploads);
            if book
                .log
                .any_in_range(segment.code, segment.first, segment.count)
            {
                return Err(device_error(
                    Status::SegmentNotHeld,
                    "range contains uploaded invoices",
                ));
            }
        }
        let mut next = state.clone();
        let changed = next
            .return_range(tp, segment.code, segment.first, segment.count, holder)
            .map_err(from_refusal)?;
        if changed {
            next.persist(&self.data_dir)
                .map_err(|e| device_error(Status::StorageFailure, e.to_string()))?;
            *state = next;
            self.publish_index(&state);
            tracing::info!(taxpayer = tp, %holder, ?segment, "segment returned");
        }
        Ok(())
    }

    /// One TaxCodes item against an index snapshot. `tally` counts (blue, red) per slot;
    /// `hint` carries the grant range of the previous item (a batch's numbers are
    /// usually consecutive in one segment).
    fn tax_code_item(
        &self,
        index: &GrantIndex,
        hint: &mut GrantHint,
        holder: &Holder,
        item: &[u8],
        tally: &mut [(u64, u64)],
    ) -> TaxCodeItem {
        let Some(hdr) = canonical_header(item) else {
            return TaxCodeItem::failed(TaxCodeStatus::MalformedInvoice);
        };
        let number = hdr.invoice_number.get();
        match index.check_hinted(
            hint,
            holder,
            &hdr.seller_taxpayer,
            hdr.invoice_code.get(),
            number,
        ) {
            NumberCheck::Held { slot, segment } => {
                // Marked before the answer leaves: a holder that loses this invoice in a
                // crash learns at restart that the number was coded.
                self.coded.note(segment, number);
                if let Some(t) = tally.get_mut(slot) {
                    if hdr.kind == KIND_RED {
                        t.1 += 1;
                    } else {
                        t.0 += 1;
                    }
                }
                // crypto::tax_code clones the pre-keyed HMAC state: no allocation and no
                // key schedule per item.
                let code = crypto::tax_code(&self.tax_key, item);
                TaxCodeItem::ok(code, crypto::check_code(&code))
            }
            NumberCheck::UnknownTaxpayer => TaxCodeItem::failed(TaxCodeStatus::UnknownTaxpayer),
            NumberCheck::NotGranted => TaxCodeItem::failed(TaxCodeStatus::NumberNotGranted),
            NumberCheck::NotHolder => TaxCodeItem::failed(TaxCodeStatus::NotHolder),
        }
    }

    fn record_tally(&self, tally: &[(u64, u64)]) {
        if tally.iter().all(|&(b, r)| b == 0 && r == 0) {
            return;
        }
        let mut c = lock(&self.counters);
        c.add(tally);
    }

    /// The TaxCodes hot path: results are written straight into the response frame in
    /// `out`; no lock is held while MACing and nothing is allocated per item.
    pub fn tax_codes_frame<'a>(
        &self,
        correlation_id: u64,
        holder: &Holder,
        items: impl Iterator<Item = &'a [u8]>,
        count: usize,
        out: &mut Vec<u8>,
    ) {
        let index = self.index();
        let mut tally = vec![(0u64, 0u64); index.taxpayers.len()];
        out.reserve(proto::FRAME_HEADER_BYTES + 4 + count * TAX_CODE_ITEM_BYTES);
        let result = proto::encode_frame(
            out,
            Opcode::TaxCodes.response_byte(),
            Status::Ok as u16,
            correlation_id,
            |o| {
                o.extend_from_slice(&(count as u32).to_le_bytes());
                let mut written = 0usize;
                let mut hint = GrantHint::default();
                for item in items.take(count) {
                    let r = self.tax_code_item(&index, &mut hint, holder, item, &mut tally);
                    o.extend_from_slice(r.as_bytes());
                    written += 1;
                }
                if written != count {
                    return Err(proto::EncodeError::LimitExceeded {
                        what: "tax code items",
                        value: written as u64,
                        max: count as u64,
                    });
                }
                Ok::<(), proto::EncodeError>(())
            },
        );
        if let Err(e) = result {
            let _ = proto::encode_error(
                out,
                Opcode::TaxCodes.request_byte(),
                correlation_id,
                Status::Internal,
                &e.to_string(),
            );
            return;
        }
        self.record_tally(&tally);
    }

    /// Upload: verifies each item's tax code and remembers accepted invoices durably
    /// (one fsync per batch) before answering.
    pub fn upload<'a>(
        &self,
        items: impl Iterator<Item = (&'a [u8], crypto::TaxCode)>,
    ) -> Result<Vec<UploadStatus>, proto::DeviceError> {
        let index = self.index();
        // Phase 1, no lock: header, grant and MAC checks.
        let mut statuses = Vec::new();
        let mut candidates: Vec<(usize, usize, UploadRecord)> = Vec::new();
        for (i, (canonical, code)) in items.enumerate() {
            let Some(hdr) = canonical_header(canonical) else {
                statuses.push(UploadStatus::Malformed);
                continue;
            };
            let slot = match index.check(
                &hdr.seller_taxpayer,
                hdr.invoice_code.get(),
                hdr.invoice_number.get(),
            ) {
                NumberCheck::Held { slot, .. } => slot,
                NumberCheck::UnknownTaxpayer | NumberCheck::NotGranted | NumberCheck::NotHolder => {
                    statuses.push(UploadStatus::NotGranted);
                    continue;
                }
            };
            if !crypto::verify(&self.tax_key, canonical, &code) {
                statuses.push(UploadStatus::Forged);
                continue;
            }
            statuses.push(UploadStatus::Accepted);
            candidates.push((
                i,
                slot,
                UploadRecord {
                    seq: 0,
                    invoice_code: hdr.invoice_code.get(),
                    invoice_number: hdr.invoice_number.get(),
                    kind: hdr.kind,
                    amount_fen: hdr.amount_fen.get(),
                    tax_fen: hdr.tax_fen.get(),
                    total_fen: hdr.total_fen.get(),
                    seller: hdr.seller_taxpayer,
                    tax_code: code,
                },
            ));
        }
        if candidates.is_empty() {
            return Ok(statuses);
        }
        // Phase 2, under the upload lock: duplicates and conflicts against the log and
        // within the batch, then one durable append.
        let mut book = lock(&self.uploads);
        let mut fresh: Vec<UploadRecord> = Vec::with_capacity(candidates.len());
        let mut fresh_slots: Vec<usize> = Vec::with_capacity(candidates.len());
        let mut in_batch: std::collections::HashMap<(u64, u32), [u8; 32]> =
            std::collections::HashMap::with_capacity(candidates.len());
        let mut seq = book.log.next_seq();
        for (i, slot, mut rec) in candidates {
            let key = (rec.invoice_code, rec.invoice_number);
            let known = book
                .log
                .lookup(key.0, key.1)
                .copied()
                .or_else(|| in_batch.get(&key).copied());
            statuses[i] = match known {
                Some(code) if code == rec.tax_code => UploadStatus::Duplicate,
                Some(_) => UploadStatus::Conflict,
                None => {
                    rec.seq = seq;
                    seq += 1;
                    in_batch.insert(key, rec.tax_code);
                    fresh.push(rec);
                    fresh_slots.push(slot);
                    UploadStatus::Accepted
                }
            };
        }
        book.log
            .append(&fresh)
            .map_err(|e| device_error(Status::StorageFailure, e.to_string()))?;
        for (rec, slot) in fresh.iter().zip(fresh_slots) {
            if let Some(s) = book.since_clear.get_mut(slot) {
                s.add(rec);
            }
            if let Some(t) = book.total.get_mut(slot) {
                *t += 1;
            }
        }
        Ok(statuses)
    }

    /// ReportAndClear: the counters since the last clear, then a durable clear mark.
    pub fn report_and_clear(
        &self,
        taxpayer: &Taxpayer,
        period_end_ms: u64,
    ) -> Result<PeriodReport, proto::DeviceError> {
        let index = self.index();
        let slot = index
            .taxpayer_slot(taxpayer)
            .ok_or_else(|| device_error(Status::UnknownTaxpayer, "taxpayer not served"))?;
        let tp = String::from_utf8_lossy(taxpayer).into_owned();
        let mut state = lock(&self.state);
        let mut book = lock(&self.uploads);
        let mut counters = lock(&self.counters);
        let previous = state.clears.get(&tp).cloned().unwrap_or_default();
        if period_end_ms < previous.period_end_ms {
            return Err(device_error(
                Status::Malformed,
                "period end is before the previous report's",
            ));
        }
        let sums = book.since_clear.get(slot).copied().unwrap_or_default();
        let (blue, red) = counters.since_clear(slot);
        let report = PeriodReport {
            taxpayer: *taxpayer,
            period_start_ms: previous.period_end_ms,
            period_end_ms,
            blue_count: blue,
            red_count: red,
            uploaded_count: sums.count,
            amount_fen: sums.amount_fen,
            tax_fen: sums.tax_fen,
            total_fen: sums.total_fen,
        };
        let mut next = state.clone();
        next.clears.insert(
            tp,
            state::ClearMark {
                cleared_upload_seq: book.log.next_seq() - 1,
                period_end_ms,
            },
        );
        next.persist(&self.data_dir)
            .map_err(|e| device_error(Status::StorageFailure, e.to_string()))?;
        *state = next;
        if let Some(s) = book.since_clear.get_mut(slot) {
            *s = Sums::default();
        }
        counters.clear(slot);
        Ok(report)
    }

    /// Inventory of one taxpayer or all.
    pub fn inventory(
        &self,
        scope: InventoryScope,
    ) -> Result<Vec<TaxpayerInventory>, proto::DeviceError> {
        let index = self.index();
        let only = match scope {
            InventoryScope::Holder(h) => Some(h),
            _ => None,
        };
        let slots: Vec<usize> = match scope {
            InventoryScope::All | InventoryScope::Holder(_) => (0..index.taxpayers.len()).collect(),
            InventoryScope::Taxpayer(t) => vec![index
                .taxpayer_slot(&t)
                .ok_or_else(|| device_error(Status::UnknownTaxpayer, "taxpayer not served"))?],
        };
        let state = lock(&self.state);
        let book = lock(&self.uploads);
        let counters = lock(&self.counters);
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let taxpayer = index.taxpayers[slot];
            let tp = String::from_utf8_lossy(&taxpayer);
            let mut segments = Vec::new();
            let mine = state
                .segments
                .iter()
                .enumerate()
                .filter(|(_, s)| s.taxpayer == tp && only.is_none_or(|h| s.holder() == h));
            for (i, s) in mine {
                let holder = s.holder();
                let coded_end = self.coded.get(i);
                // The held pieces: the segment minus its returned ranges.
                let mut cursor = u64::from(s.first);
                let end = u64::from(s.first) + u64::from(s.count);
                let mut push = |from: u64, to: u64| {
                    if to > from && segments.len() < INVENTORY_SEGMENTS_MAX {
                        segments.push(HeldSegment {
                            segment: Segment {
                                code: s.invoice_code,
                                first: from as u32,
                                count: (to - from) as u32,
                            },
                            holder,
                            request_id: s.request_id,
                            coded_end,
                        });
                    }
                };
                for &(f, c) in &s.returned {
                    push(cursor, u64::from(f));
                    cursor = u64::from(f) + u64::from(c);
                }
                push(cursor, end);
            }
            out.push(TaxpayerInventory {
                taxpayer,
                remaining: state.remaining(&tp),
                issued: counters.issued_total(slot),
                uploaded: book.total.get(slot).copied().unwrap_or(0),
                segments,
            });
        }
        Ok(out)
    }

    /// Applies fault switches directly (start-up flags use this too).
    pub fn set_faults(&self, f: &FaultConfig) {
        self.faults.set(f);
    }
}

fn decode_status(e: &DecodeError) -> Status {
    match e {
        DecodeError::UnknownOpcode(_) | DecodeError::UnexpectedOpcode(_) => Status::UnknownCommand,
        DecodeError::UnsupportedVersion(_) => Status::UnsupportedVersion,
        DecodeError::BodyChecksum { .. } => Status::ChecksumMismatch,
        DecodeError::LimitExceeded { what, .. } if what.contains("batch") => Status::BatchTooLarge,
        _ => Status::Malformed,
    }
}

#[cfg(test)]
mod tests;
