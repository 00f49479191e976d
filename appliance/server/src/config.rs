//! The `serve` configuration file (TOML). Every setting, its default and its meaning is
//! listed in docs/operations.md; `appliance serve --print-default-config` prints a
//! commented example.

use crate::journal::JournalSync;
use crate::quic::auth::ClientGrant;
use crate::quic::tls::TlsFiles;
use appliance_core::TaxpayerId;
use hsm_driver::route::Route;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceConfig {
    /// Where journals live: one `shard-<i>` directory per shard, plus the appliance's
    /// identity (`identity.toml`) and its lock (`LOCK`). Must not be tmpfs or ramfs
    /// (refused at start unless `unsafe_allow_volatile_data_dir`).
    pub data_dir: PathBuf,
    /// Accept a data dir on a filesystem that loses its contents at reboot (tmpfs,
    /// ramfs). Unsafe: invoices acknowledged to clients vanish at the next reboot, and
    /// the numbers their journals held are lost. For tests only. Default false.
    #[serde(default)]
    pub unsafe_allow_volatile_data_dir: bool,
    /// Where the UDP port locks live (`udp-<port>.lock`): every instance on the host
    /// must use the same one. Default: `/run/einvoice` when this user can create and
    /// write it, else `/tmp/einvoice-<uid>`.
    #[serde(default)]
    pub runtime_dir: Option<PathBuf>,
    /// Shards (one glommio executor each). Default: one per CPU.
    #[serde(default)]
    pub shards: Option<u32>,
    /// CPU of each shard (index = shard id). Default: shard i on CPU i mod CPUs; an empty
    /// list leaves shards unpinned.
    #[serde(default)]
    pub cpus: Option<Vec<usize>>,
    /// Microseconds a shard keeps polling for work before its thread sleeps. 0 (the
    /// default) sleeps at once, right when the cores are shared with other processes;
    /// on cores dedicated to the shards, 50-200 saves a sleep and a wake-up (system
    /// calls and a context switch) per request at moderate per-invoice load.
    #[serde(default)]
    pub spin_before_park_us: u64,
    /// Network addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// TLS material (server certificate and the CA client certificates must chain to).
    pub tls: TlsFiles,
    /// Client identities (certificate Common Names) and the sellers each may issue for.
    pub clients: Vec<ClientGrant>,
    /// The tax server.
    pub tax_server: TaxServerConfig,
    /// Seller taxpayers served.
    pub taxpayers: Vec<TaxpayerEntry>,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
}

/// Network addresses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// The shared service port (UDP, every shard, SO_REUSEPORT). Default `0.0.0.0:4433`.
    pub service: SocketAddr,
    /// Each shard's own UDP port, index = shard id. Default: empty, meaning service port
    /// + 1 + shard id (or free ports when the service port is 0).
    pub shard_ports: Vec<u16>,
    /// Control port (HTTP: `/metrics` in Prometheus text format, `/status` in JSON).
    /// Default `127.0.0.1:9443`.
    pub control: SocketAddr,
    /// Disable the control port. Default false.
    pub control_disabled: bool,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            service: "0.0.0.0:4433".parse().expect("static address"),
            shard_ports: Vec::new(),
            control: "127.0.0.1:9443".parse().expect("static address"),
            control_disabled: false,
        }
    }
}

/// How the tax server is reached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaxServerConfig {
    /// Route of the tax server serving every taxpayer without its own `route`:
    /// `tcp://host:port`, or `pcie:/path/to/region` (a PCIe card's region; see
    /// docs/hsm-pcie.md; each shard takes a free queue pair).
    pub route: String,
    /// Longest wait for one connect, ms. Default 1,000.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Deadline of one command, ms. Default 5,000.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_call_timeout_ms() -> u64 {
    5_000
}

/// One seller taxpayer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TaxpayerEntry {
    /// Unified social credit code (18 characters, GB 32100-2015 check character).
    pub id: String,
    /// Single-invoice ceiling in fen (set by the tax authority).
    pub ceiling_fen: i64,
    /// Per shard: requisition more numbers when fewer than this remain. Default 20,000.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: u32,
    /// Per shard: numbers asked for per requisition. Default 100,000.
    #[serde(default = "default_refill_count")]
    pub refill_count: u32,
    /// This taxpayer's tax server, when it is not `tax_server.route` (same syntax).
    #[serde(default)]
    pub route: Option<String>,
}

fn default_low_watermark() -> u32 {
    20_000
}
fn default_refill_count() -> u32 {
    100_000
}

/// Limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests per tick (one tax-code command, one journal commit). Default 8,192; at
    /// least the protocol's batch limit (4,096).
    pub tick_requests_max: u32,
    /// Orders each shard's idempotency index remembers, allocated exactly at start
    /// (56 B each plus an 8-16 B table slot share; 16..=2^30). Default 4,000,000
    /// (246 MiB per shard). Sizing: docs/operations.md, "Idempotency index".
    pub index_capacity_orders: u32,
    /// Days an order is remembered for idempotent replay. Default 35.
    pub retention_days: u32,
    /// Bytes per journal segment file. Default 1 GiB.
    pub journal_segment_bytes: u64,
    /// How a journal commit is made durable: `"dsync"` (segment files opened with
    /// O_DSYNC, one operation per commit) or `"fdatasync"` (a write, then an
    /// fdatasync). Default `"dsync"`. Same guarantee either way; see docs/journal.md.
    pub journal_sync: JournalSync,
    /// Ticks a shard keeps in flight: while one tick's tax codes are out, the next tick
    /// can already take numbers and send its own command. Default 2; 1 to 4.
    pub ticks_in_flight: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tick_requests_max: 8_192,
            index_capacity_orders: 4_000_000,
            retention_days: 35,
            journal_segment_bytes: crate::journal::SEGMENT_BYTES_MAX_DEFAULT,
            journal_sync: JournalSync::default(),
            ticks_in_flight: 2,
        }
    }
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Detail (line and column included).
        message: String,
    },
    /// A value out of range or inconsistent with another.
    #[error("{0}")]
    Invalid(String),
}

impl ApplianceConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<ApplianceConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: ApplianceConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    /// Shards to run.
    pub fn shard_count(&self) -> u32 {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
    }

    /// The CPU of shard `i`, if pinned.
    pub fn cpu_of(&self, shard: u32) -> Option<usize> {
        match &self.cpus {
            Some(list) if list.is_empty() => None,
            Some(list) => list.get(shard as usize).copied(),
            None => {
                let cpus = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                Some(shard as usize % cpus)
            }
        }
    }

    /// Per-shard ports as configured (possibly all 0 = free ports).
    pub fn shard_ports(&self) -> Vec<u16> {
        let shards = self.shard_count();
        if !self.listen.shard_ports.is_empty() {
            return self.listen.shard_ports.clone();
        }
        let base = self.listen.service.port();
        (0..shards)
            .map(|i| {
                if base == 0 {
                    0
                } else {
                    base.saturating_add(1 + i as u16)
                }
            })
            .collect()
    }

    /// Checks values that serde cannot.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let shards = self.shard_count();
        if shards == 0 || shards > 256 {
            return invalid(format!("shards = {shards}; 1..=256 allowed"));
        }
        if let Some(cpus) = &self.cpus {
            if !cpus.is_empty() && cpus.len() != shards as usize {
                return invalid(format!("{} cpus listed for {shards} shards", cpus.len()));
            }
        }
        if !self.listen.shard_ports.is_empty() && self.listen.shard_ports.len() != shards as usize {
            return invalid(format!(
                "{} shard ports listed for {shards} shards",
                self.listen.shard_ports.len()
            ));
        }
        // Every UDP socket has SO_REUSEPORT (crate::quic::bind): a port listed twice, or a
        // shard port equal to the service port, would silently be shared.
        let service_port = self.listen.service.port();
        let mut ports = std::collections::HashSet::new();
        for port in self.listen.shard_ports.iter().copied().filter(|&p| p != 0) {
            if port == service_port || !ports.insert(port) {
                return invalid(format!(
                    "listen.shard_ports: port {port} is used twice (shard ports must differ from each other and from the service port)"
                ));
            }
        }
        if self.taxpayers.is_empty() {
            return invalid("no taxpayers configured".into());
        }
        if self.clients.is_empty() {
            return invalid("no clients configured: nobody could issue".into());
        }
        if self.limits.tick_requests_max < appliance_proto::BATCH_REQUESTS_MAX {
            return invalid(format!(
                "limits.tick_requests_max = {} is below the protocol batch limit {}",
                self.limits.tick_requests_max,
                appliance_proto::BATCH_REQUESTS_MAX
            ));
        }
        if self.limits.retention_days == 0 {
            return invalid("limits.retention_days must be at least 1".into());
        }
        let index_bounds = appliance_core::idempotency::INDEX_CAPACITY_MIN
            ..=appliance_core::idempotency::INDEX_CAPACITY_MAX;
        if !index_bounds.contains(&self.limits.index_capacity_orders) {
            return invalid(format!(
                "limits.index_capacity_orders = {} is outside {}..={}",
                self.limits.index_capacity_orders,
                index_bounds.start(),
                index_bounds.end()
            ));
        }
        let ticks_max = appliance_core::issuer::TICKS_IN_FLIGHT_MAX as u32;
        if !(1..=ticks_max).contains(&self.limits.ticks_in_flight) {
            return invalid(format!(
                "limits.ticks_in_flight = {} is outside 1..={ticks_max}",
                self.limits.ticks_in_flight
            ));
        }
        self.routes()?;
        Ok(())
    }

    /// The tax servers (the default first) and the taxpayers served by another one than
    /// the default (index into the list).
    pub fn routes(&self) -> Result<(Vec<Route>, HashMap<TaxpayerId, usize>), ConfigError> {
        let parse = |s: &str| {
            s.parse::<Route>()
                .map_err(|e| ConfigError::Invalid(format!("route {s:?}: {e}")))
        };
        let mut routes = vec![parse(&self.tax_server.route)?];
        let mut taxpayer_routes = HashMap::new();
        for taxpayer in &self.taxpayers {
            let Some(route) = &taxpayer.route else {
                continue;
            };
            let route = parse(route)?;
            let index = match routes.iter().position(|r| *r == route) {
                Some(i) => i,
                None => {
                    routes.push(route);
                    routes.len() - 1
                }
            };
            if index != 0 {
                let id = TaxpayerId::parse(&taxpayer.id)
                    .map_err(|e| ConfigError::Invalid(format!("taxpayer {}: {e}", taxpayer.id)))?;
                taxpayer_routes.insert(id, index);
            }
        }
        Ok((routes, taxpayer_routes))
    }
}

/// A commented example configuration with every default spelled out.
pub const EXAMPLE: &str = r#"# appliance serve --config appliance.toml
data_dir = "/var/lib/einvoice"      # identity.toml, LOCK, one shard-<i> journal dir per shard; not tmpfs
# unsafe_allow_volatile_data_dir = false  # true accepts tmpfs/ramfs: invoices vanish at reboot (tests only)
# runtime_dir = "/run/einvoice"     # UDP port locks; default /run/einvoice, else /tmp/einvoice-<uid>
# shards = 2                        # default: one per CPU
# cpus = [0, 1]                     # default: shard i on CPU i mod CPUs; [] = unpinned
# spin_before_park_us = 0           # poll this long before sleeping (dedicated cores)

[listen]
service = "0.0.0.0:4433"            # shared UDP port, every shard (SO_REUSEPORT)
# shard_ports = [4434, 4435]        # default: service port + 1 + shard id
control = "127.0.0.1:9443"          # HTTP: /metrics (Prometheus), /status (JSON)
control_disabled = false

[tls]
cert = "/etc/einvoice/server.pem"   # server certificate chain, PEM
key = "/etc/einvoice/server.key"    # its private key, PEM
client_ca = "/etc/einvoice/ca.pem"  # client certificates must chain to this CA

[[clients]]
identity = "ticketing"              # client certificate Common Name
sellers = ["*"]                     # every seller; or a list of credit codes

[tax_server]
route = "tcp://127.0.0.1:7300"      # or "pcie:/dev/shm/hsm.pcie" for a card in this box
connect_timeout_ms = 1000
call_timeout_ms = 5000

[[taxpayers]]
id = "91110000717000000B"           # the seller's unified social credit code
ceiling_fen = 10000000              # single-invoice ceiling (100,000.00 yuan)
low_watermark = 20000               # per shard
refill_count = 100000               # per shard and requisition
# route = "tcp://10.0.0.9:7300"     # this taxpayer's own tax server, if not the default

[limits]
tick_requests_max = 8192
index_capacity_orders = 4000000     # per shard, 64 B each
retention_days = 35
journal_segment_bytes = 1073741824
journal_sync = "dsync"              # or "fdatasync": a write, then an fdatasync
ticks_in_flight = 2                 # per shard; 1 to 4
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses_and_passes_the_checks() {
        let config: ApplianceConfig = toml::from_str(EXAMPLE).unwrap();
        config.check().unwrap();
        for taxpayer in &config.taxpayers {
            appliance_core::TaxpayerId::parse(&taxpayer.id).unwrap();
        }
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.listen, ListenConfig::default());
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let mut config: ApplianceConfig = toml::from_str(EXAMPLE).unwrap();
        config.shards = Some(2);
        config.cpus = Some(vec![0, 1, 2]);
        assert!(matches!(config.check(), Err(ConfigError::Invalid(_))));
        config.cpus = None;
        config.limits.tick_requests_max = 100;
        assert!(matches!(config.check(), Err(ConfigError::Invalid(_))));
        config.limits.tick_requests_max = 8192;
        config.tax_server.route = "udp://x".into();
        assert!(matches!(config.check(), Err(ConfigError::Invalid(_))));
        config.tax_server.route = "tcp://127.0.0.1:7300".into();
        config.check().unwrap();
        // A second taxpayer on its own PCIe tax server; a third on the default one.
        let mut other = config.taxpayers[0].clone();
        other.id = "91110000717000001E".into();
        other.route = Some("pcie:/dev/shm/card.pcie".into());
        let mut third = config.taxpayers[0].clone();
        third.id = "91110000717000002H".into();
        third.route = Some("tcp://127.0.0.1:7300".into());
        config.taxpayers.push(other);
        config.taxpayers.push(third);
        let (routes, by_taxpayer) = config.routes().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[1].transport(), "pcie");
        assert_eq!(by_taxpayer.len(), 1);
        assert_eq!(
            by_taxpayer[&TaxpayerId::parse("91110000717000001E").unwrap()],
            1
        );
        assert_eq!(config.shard_ports(), vec![4434, 4435]);
        // Shard ports are SO_REUSEPORT too: none may repeat, nor be the service port.
        config.listen.shard_ports = vec![5000, 5000];
        assert!(matches!(config.check(), Err(ConfigError::Invalid(_))));
        config.listen.shard_ports = vec![4433, 5000];
        assert!(matches!(config.check(), Err(ConfigError::Invalid(_))));
        config.listen.shard_ports = vec![0, 0];
        config.check().unwrap();
        config.listen.shard_ports = Vec::new();
        let unknown = EXAMPLE.replace("[limits]", "[limits]\nbogus = 1");
        assert!(toml::from_str::<ApplianceConfig>(&unknown).is_err());
    }
}
