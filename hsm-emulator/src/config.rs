//! Emulator configuration: a TOML file and/or command-line flags (flags win; taxpayer
//! grants from both are combined). Every setting has a default documented here and in
//! docs/hsm-emulator.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::keys::{Pkcs11Settings, DEFAULT_WRAP_KEY_LABEL, SOFTHSM2_MODULE_PATH};

/// Bytes of a taxpayer id (unified social credit code).
pub const TAXPAYER_BYTES: usize = 18;
/// Largest invoice code (12 digits).
pub const INVOICE_CODE_MAX: u64 = 999_999_999_999;
/// Largest invoice number (8 digits).
pub const INVOICE_NUMBER_MAX: u32 = 99_999_999;
/// Limit on configured grants.
pub const GRANTS_MAX: usize = 1024;
/// Limit on worker threads.
pub const THREADS_MAX: usize = 64;
/// Default worker threads.
pub const THREADS_DEFAULT: usize = 2;
/// Default limit on open connections.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;
/// Default environment variable holding the PKCS#11 user PIN.
pub const PIN_ENV_DEFAULT: &str = "HSM_EMU_PKCS11_PIN";

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
    /// A value is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// One authority grant: `count` numbers of `invoice_code` from `first`, for `taxpayer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Taxpayer id, 18 ASCII bytes with a valid GB 32100 check character.
    pub taxpayer: [u8; TAXPAYER_BYTES],
    /// Invoice code, at most 12 digits.
    pub invoice_code: u64,
    /// First number.
    pub first: u32,
    /// Numbers granted (≥ 1; `first + count - 1` ≤ 99,999,999).
    pub count: u32,
}

const USCC_CHARSET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// Whether `id` is a unified social credit code with a valid check character
/// (GB 32100-2015: weights 3^i mod 31, check = (31 - sum mod 31) mod 31).
pub fn taxpayer_id_valid(id: &[u8]) -> bool {
    if id.len() != TAXPAYER_BYTES {
        return false;
    }
    let mut sum = 0u32;
    let mut weight = 1u32;
    for &b in &id[..17] {
        let Some(v) = USCC_CHARSET.iter().position(|&c| c == b) else {
            return false;
        };
        sum += v as u32 * weight;
        weight = weight * 3 % 31;
    }
    let expected = USCC_CHARSET[((31 - sum % 31) % 31) as usize];
    id[17] == expected
}

impl Grant {
    /// Parses `ID:CODE:FIRST:COUNT`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 4 {
            return Err(ConfigError::Invalid(format!(
                "taxpayer grant {s:?} is not ID:CODE:FIRST:COUNT"
            )));
        }
        let num = |p: &str, what: &str| -> Result<u64, ConfigError> {
            p.parse::<u64>()
                .map_err(|_| ConfigError::Invalid(format!("{what} {p:?} in {s:?} is not a number")))
        };
        let first = u32::try_from(num(parts[2], "first number")?)
            .map_err(|_| ConfigError::Invalid(format!("first number too large in {s:?}")))?;
        let count = u32::try_from(num(parts[3], "count")?)
            .map_err(|_| ConfigError::Invalid(format!("count too large in {s:?}")))?;
        Self::new(parts[0], num(parts[1], "invoice code")?, first, count)
    }

    /// A checked grant.
    pub fn new(
        taxpayer: &str,
        invoice_code: u64,
        first: u32,
        count: u32,
    ) -> Result<Self, ConfigError> {
        if !taxpayer_id_valid(taxpayer.as_bytes()) {
            return Err(ConfigError::Invalid(format!(
                "taxpayer {taxpayer:?} is not a valid unified social credit code"
            )));
        }
        if invoice_code == 0 || invoice_code > INVOICE_CODE_MAX {
            return Err(ConfigError::Invalid(format!(
                "invoice code {invoice_code} out of range"
            )));
        }
        let last = u64::from(first) + u64::from(count);
        if first == 0 || count == 0 || last - 1 > u64::from(INVOICE_NUMBER_MAX) {
            return Err(ConfigError::Invalid(format!(
                "numbers {first}..+{count} out of range 1..=99999999"
            )));
        }
        let mut tp = [0u8; TAXPAYER_BYTES];
        tp.copy_from_slice(taxpayer.as_bytes());
        Ok(Self {
            taxpayer: tp,
            invoice_code,
            first,
            count,
        })
    }
}

/// Which key backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyBackendKind {
    /// Keys in a 0600 file of the data dir.
    #[default]
    Software,
    /// Keys wrapped by an AES key inside a PKCS#11 token.
    Pkcs11,
}

/// Fault switches; all off by default. The same switches are set at run time by the
/// `SetFaults` command when fault injection is allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSettings {
    /// Added latency per command, µs.
    pub latency_us: u32,
    /// Close every Nth accepted connection after its first request, unanswered (0 = off).
    pub drop_every_nth_connection: u32,
    /// Refuse connections: close each one as soon as it is accepted.
    pub refuse: bool,
    /// Answer nothing for this long, ms (from start-up or from the SetFaults command).
    pub stall_ms: u32,
}

/// The `[key_backend]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyBackendConfig {
    /// `software` (default) or `pkcs11`.
    pub kind: KeyBackendKind,
    /// PKCS#11 module; default the Debian SoftHSM2 path.
    pub module: PathBuf,
    /// Token label; default `hsm-emu`.
    pub token_label: String,
    /// User PIN; prefer `pin_env` so the PIN is not in a file.
    pub pin: Option<String>,
    /// Environment variable holding the PIN; default `HSM_EMU_PKCS11_PIN`.
    pub pin_env: String,
    /// Label of the wrapping key; default `hsm-emu-wrap`.
    pub wrap_key_label: String,
}

impl Default for KeyBackendConfig {
    fn default() -> Self {
        Self {
            kind: KeyBackendKind::Software,
            module: PathBuf::from(SOFTHSM2_MODULE_PATH),
            token_label: "hsm-emu".into(),
            pin: None,
            pin_env: PIN_ENV_DEFAULT.into(),
            wrap_key_label: DEFAULT_WRAP_KEY_LABEL.into(),
        }
    }
}

/// One `[[taxpayer]]` entry of the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// Taxpayer id.
    pub id: String,
    /// Invoice code.
    pub invoice_code: u64,
    /// First number.
    pub first: u32,
    /// Numbers granted.
    pub count: u32,
}

/// The config file's schema.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Data directory (required, here or by flag).
    pub data_dir: Option<PathBuf>,
    /// Listen address; default `127.0.0.1:0`.
    pub listen: Option<String>,
    /// Worker threads; default 2.
    pub threads: Option<usize>,
    /// Serve `SetFaults`; default false.
    pub allow_fault_injection: bool,
    /// Device id reported by DeviceInfo; default chosen on first start.
    pub device_id: Option<String>,
    /// Limit on open connections; default 256.
    pub connections_max: Option<usize>,
    /// Key backend.
    pub key_backend: KeyBackendConfig,
    /// Grants.
    pub taxpayer: Vec<GrantConfig>,
    /// Start-up fault switches.
    pub faults: FaultSettings,
    /// Also serve a PCIe region (docs/hsm-pcie.md).
    pub pcie: Option<PcieFileConfig>,
}

/// The `[pcie]` table of the config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PcieFileConfig {
    /// Region file (e.g. under /dev/shm); required in the table.
    pub path: Option<PathBuf>,
    /// Queue pairs; default 8.
    pub queues: Option<usize>,
    /// Entries per ring; default 64.
    pub queue_entries: Option<u32>,
    /// Data area per queue, MiB; default 16.
    pub data_mib: Option<usize>,
    /// Firmware polling after a command it ran itself, µs; default
    /// [`PCIE_SPIN_US_DEFAULT`].
    pub spin_us: Option<u32>,
}

/// Default PCIe queue pairs: room for the shards of a large box.
pub const PCIE_QUEUES_DEFAULT: usize = 8;
/// Default ring entries per queue.
pub const PCIE_QUEUE_ENTRIES_DEFAULT: u32 = 64;
/// Default data area per queue, MiB: the largest legal frame body (16 MiB) fits.
pub const PCIE_DATA_MIB_DEFAULT: usize = 16;
/// Default firmware polling after a command it ran itself, µs: none. With the doorbell
/// wake, polling only saves the wake-up of a driver that submits again at once, and it
/// costs CPU the clients share: end to end on this 2-core machine 0 beat 50 and 200 µs
/// on emulator CPU per invoice (27 vs 50 vs 114 µs at 2,000/s) and on the appliance's
/// tax_code stage (p50 62-67 vs 137-206 vs 136-150 µs at 2,000/s; 219-398 vs 478-879 vs
/// 477-523 µs at 25,000/s). docs/PERFORMANCE.md §12.
pub const PCIE_SPIN_US_DEFAULT: u32 = 0;
/// Most firmware polling, µs: beyond this it is a busy core, not a latency tweak.
pub const PCIE_SPIN_US_MAX: u32 = 10_000;

/// The PCIe region the emulator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcieSettings {
    /// Region file.
    pub path: PathBuf,
    /// Queue pairs, 1..=30.
    pub queues: usize,
    /// Entries per ring: a power of two in 2..=1024.
    pub queue_entries: u32,
    /// Bytes of each queue's data area (whole 4 KiB chunks, at most 64 MiB).
    pub data_bytes: usize,
    /// Firmware polling after a command it ran itself before it sleeps, µs.
    pub spin_us: u32,
}

impl PcieSettings {
    /// Defaults for a region at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            queues: PCIE_QUEUES_DEFAULT,
            queue_entries: PCIE_QUEUE_ENTRIES_DEFAULT,
            data_bytes: PCIE_DATA_MIB_DEFAULT << 20,
            spin_us: PCIE_SPIN_US_DEFAULT,
        }
    }
}

/// Command-line flags of `hsm-emu` (and `appliance hsm-emu`).
#[derive(Debug, Parser, Clone)]
#[command(name = "hsm-emu", about = "Tax-server (cipher machine) emulator")]
pub struct Args {
    /// TOML config file; flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory: keys, state.json, uploads.log.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Listen address (port 0 = ephemeral; the chosen address is printed).
    #[arg(long)]
    pub listen: Option<String>,
    /// Authority grant `ID:CODE:FIRST:COUNT`; repeatable.
    #[arg(long = "taxpayer")]
    pub taxpayers: Vec<String>,
    /// Key backend.
    #[arg(long, value_enum)]
    pub key_backend: Option<KeyBackendKind>,
    /// PKCS#11 module path.
    #[arg(long)]
    pub pkcs11_module: Option<PathBuf>,
    /// PKCS#11 token label.
    #[arg(long)]
    pub pkcs11_token_label: Option<String>,
    /// PKCS#11 user PIN (visible in `ps`; prefer the environment variable).
    #[arg(long)]
    pub pkcs11_pin: Option<String>,
    /// PKCS#11 wrapping key label.
    #[arg(long)]
    pub pkcs11_wrap_key_label: Option<String>,
    /// Serve SetFaults (otherwise it answers Forbidden).
    #[arg(long)]
    pub allow_fault_injection: bool,
    /// Worker threads executing commands.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device id reported by DeviceInfo.
    #[arg(long)]
    pub device_id: Option<String>,
    /// Limit on open connections.
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// Fault: added latency per command, µs.
    #[arg(long)]
    pub latency_us: Option<u32>,
    /// Fault: close every Nth connection after its first request.
    #[arg(long)]
    pub drop_every_nth_connection: Option<u32>,
    /// Fault: refuse connections (close on accept).
    #[arg(long)]
    pub refuse: bool,
    /// Fault: answer nothing for the first N ms after start-up.
    #[arg(long)]
    pub stall_ms: Option<u32>,
    /// Also serve the PCIe interface in this region file (e.g. /dev/shm/hsm-emu.pcie).
    #[arg(long)]
    pub pcie: Option<PathBuf>,
    /// PCIe queue pairs (one per appliance shard).
    #[arg(long)]
    pub pcie_queues: Option<usize>,
    /// PCIe ring entries per queue (power of two, 2..=1024).
    #[arg(long)]
    pub pcie_queue_entries: Option<u32>,
    /// PCIe data area per queue, MiB (1..=64): the largest command or answer.
    #[arg(long)]
    pub pcie_data_mib: Option<usize>,
    /// PCIe firmware polling after a command it ran itself, µs (0..=10000), before it
    /// sleeps until a doorbell wakes it.
    #[arg(long)]
    pub pcie_spin_us: Option<u32>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Worker threads.
    pub threads: usize,
    /// Serve SetFaults.
    pub allow_fault_injection: bool,
    /// Device id for a fresh data dir (a recorded one wins).
    pub device_id: Option<String>,
    /// Limit on open connections.
    pub connections_max: usize,
    /// Key backend kind.
    pub key_backend: KeyBackendKind,
    /// PKCS#11 settings (PIN resolved), when the backend is PKCS#11.
    pub pkcs11: Option<Pkcs11Settings>,
    /// Authority grants.
    pub grants: Vec<Grant>,
    /// Start-up faults.
    pub faults: FaultSettings,
    /// The PCIe region to serve besides TCP, if any.
    pub pcie: Option<PcieSettings>,
}

impl Config {
    /// A config with defaults for `data_dir` and `grants` (tests and embedding).
    pub fn new(data_dir: &Path, grants: Vec<Grant>) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: THREADS_DEFAULT,
            allow_fault_injection: false,
            device_id: None,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            key_backend: KeyBackendKind::Software,
            pkcs11: None,
            grants,
            faults: FaultSettings::default(),
            pcie: None,
        }
    }

    /// Resolves flags (and the file they name) into a config.
    pub fn from_args(args: &Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .ok_or_else(|| ConfigError::Invalid("no data dir (--data-dir or data_dir)".into()))?;
        let listen_text = args
            .listen
            .clone()
            .or(file.listen.clone())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("listen address {listen_text:?}")))?;
        let threads = args.threads.or(file.threads).unwrap_or(THREADS_DEFAULT);
        if threads == 0 || threads > THREADS_MAX {
            return Err(ConfigError::Invalid(format!(
                "threads {threads} not in 1..={THREADS_MAX}"
            )));
        }
        let connections_max = args
            .connections_max
            .or(file.connections_max)
            .unwrap_or(CONNECTIONS_MAX_DEFAULT);
        if connections_max == 0 || connections_max > 65_536 {
            return Err(ConfigError::Invalid(
                "connections_max not in 1..=65536".into(),
            ));
        }
        let mut grants = Vec::new();
        for g in &file.taxpayer {
            grants.push(Grant::new(&g.id, g.invoice_code, g.first, g.count)?);
        }
        for s in &args.taxpayers {
            grants.push(Grant::parse(s)?);
        }
        if grants.len() > GRANTS_MAX {
            return Err(ConfigError::Invalid(format!(
                "more than {GRANTS_MAX} grants"
            )));
        }
        let mut kb = file.key_backend.clone();
        if let Some(k) = args.key_backend {
            kb.kind = k;
        }
        if let Some(m) = &args.pkcs11_module {
            kb.module = m.clone();
        }
        if let Some(l) = &args.pkcs11_token_label {
            kb.token_label = l.clone();
        }
        if let Some(l) = &args.pkcs11_wrap_key_label {
            kb.wrap_key_label = l.clone();
        }
        if let Some(p) = &args.pkcs11_pin {
            kb.pin = Some(p.clone());
        }
        let pkcs11 = match kb.kind {
            KeyBackendKind::Software => None,
            KeyBackendKind::Pkcs11 => {
                let pin = match kb.pin.clone() {
                    Some(p) => p,
                    None => std::env::var(&kb.pin_env).map_err(|_| {
                        ConfigError::Invalid(format!(
                            "PKCS#11 backend needs a PIN: --pkcs11-pin, key_backend.pin or ${}",
                            kb.pin_env
                        ))
                    })?,
                };
                Some(Pkcs11Settings {
                    module_path: kb.module.clone(),
                    token_label: kb.token_label.clone(),
                    user_pin: pin,
                    wrap_key_label: kb.wrap_key_label.clone(),
                })
            }
        };
        let mut faults = file.faults;
        if let Some(v) = args.latency_us {
            faults.latency_us = v;
        }
        if let Some(v) = args.drop_every_nth_connection {
            faults.drop_every_nth_connection = v;
        }
        if args.refuse {
            faults.refuse = true;
        }
        if let Some(v) = args.stall_ms {
            faults.stall_ms = v;
        }
        let file_pcie = file.pcie.clone().unwrap_or_default();
        let pcie = match args.pcie.clone().or(file_pcie.path.clone()) {
            None => None,
            Some(path) => {
                let queues = args
                    .pcie_queues
                    .or(file_pcie.queues)
                    .unwrap_or(PCIE_QUEUES_DEFAULT);
                let queue_entries = args
                    .pcie_queue_entries
                    .or(file_pcie.queue_entries)
                    .unwrap_or(PCIE_QUEUE_ENTRIES_DEFAULT);
                let data_mib = args
                    .pcie_data_mib
                    .or(file_pcie.data_mib)
                    .unwrap_or(PCIE_DATA_MIB_DEFAULT);
                if queues == 0 || queues > hsm_driver::pcie::regs::QUEUES_MAX {
                    return Err(ConfigError::Invalid(format!(
                        "pcie queues {queues} not in 1..={}",
                        hsm_driver::pcie::regs::QUEUES_MAX
                    )));
                }
                if !queue_entries.is_power_of_two()
                    || !(hsm_driver::pcie::regs::RING_ENTRIES_MIN
                        ..=hsm_driver::pcie::regs::RING_ENTRIES_MAX)
                        .contains(&queue_entries)
                {
                    return Err(ConfigError::Invalid(format!(
                        "pcie queue entries {queue_entries} not a power of two in 2..=1024"
                    )));
                }
                let spin_us = args
                    .pcie_spin_us
                    .or(file_pcie.spin_us)
                    .unwrap_or(PCIE_SPIN_US_DEFAULT);
                if spin_us > PCIE_SPIN_US_MAX {
                    return Err(ConfigError::Invalid(format!(
                        "pcie spin {spin_us} µs above {PCIE_SPIN_US_MAX}"
                    )));
                }
                if data_mib == 0 || data_mib > 64 {
                    return Err(ConfigError::Invalid(format!(
                        "pcie data MiB {data_mib} not in 1..=64"
                    )));
                }
                Some(PcieSettings {
                    path,
                    queues,
                    queue_entries,
                    data_bytes: data_mib << 20,
                    spin_us,
                })
            }
        };
        Ok(Self {
            pcie,
            data_dir,
            listen,
            threads,
            allow_fault_injection: args.allow_fault_injection || file.allow_fault_injection,
            device_id: args.device_id.clone().or(file.device_id.clone()),
            connections_max,
            key_backend: kb.kind,
            pkcs11,
            grants,
            faults,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_character() {
        assert!(taxpayer_id_valid(b"91350100M000100Y43"));
        assert!(!taxpayer_id_valid(b"91350100M000100Y44"));
        assert!(!taxpayer_id_valid(b"short"));
    }

    #[test]
    fn parse_grant_and_file() {
        let g = Grant::parse("91350100M000100Y43:144031900111:1:1000").unwrap();
        assert_eq!((g.invoice_code, g.first, g.count), (144031900111, 1, 1000));
        assert!(Grant::parse("91350100M000100Y43:1:0:5").is_err());
        assert!(Grant::parse("91350100M000100Y43:1:99999999:2").is_err());
        let file: FileConfig = toml::from_str(
            r#"
            data_dir = "/tmp/x"
            threads = 3
            [key_backend]
            kind = "pkcs11"
            token_label = "t"
            [[taxpayer]]
            id = "91350100M000100Y43"
            invoice_code = 144031900111
            first = 1
            count = 10
            [faults]
            latency_us = 5
            "#,
        )
        .unwrap();
        assert_eq!(file.key_backend.kind, KeyBackendKind::Pkcs11);
        assert_eq!(file.taxpayer.len(), 1);
        assert_eq!(file.faults.latency_us, 5);
    }

    #[test]
    fn pcie_settings_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("emu.toml");
        std::fs::write(
            &path,
            r#"
            data_dir = "/tmp/x"
            [[taxpayer]]
            id = "91350100M000100Y43"
            invoice_code = 144031900111
            first = 1
            count = 10
            [pcie]
            path = "/dev/shm/from-file"
            queues = 3
            "#,
        )
        .unwrap();
        let args = |extra: &[&str]| {
            let mut v = vec!["hsm-emu", "--config", path.to_str().unwrap()];
            v.extend_from_slice(extra);
            Config::from_args(&Args::try_parse_from(v).unwrap())
        };
        let c = args(&[]).unwrap();
        let p = c.pcie.expect("pcie from the file");
        assert_eq!(p.path, PathBuf::from("/dev/shm/from-file"));
        assert_eq!((p.queues, p.queue_entries, p.data_bytes), (3, 64, 16 << 20));
        let c = args(&["--pcie", "/dev/shm/flag", "--pcie-data-mib", "2"]).unwrap();
        let p = c.pcie.expect("pcie from the flag");
        assert_eq!(
            (p.path, p.queues, p.data_bytes),
            ("/dev/shm/flag".into(), 3, 2 << 20)
        );
        assert!(args(&["--pcie-queue-entries", "48"]).is_err());
        assert!(args(&["--pcie-queues", "31"]).is_err());
        assert!(args(&["--pcie-data-mib", "0"]).is_err());
        assert!(
            Config::from_args(&Args::try_parse_from(["hsm-emu", "--data-dir", "/x"]).unwrap())
                .unwrap()
                .pcie
                .is_none()
        );
    }
}
