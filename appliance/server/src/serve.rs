//! `appliance serve`: shards with their QUIC endpoints, started from an
//! [`ApplianceConfig`], and the control port (Prometheus metrics and status).

use crate::config::{ApplianceConfig, ConfigError};
use crate::identity::{Identity, IdentityError};
use crate::journal::JournalConfig;
use crate::metrics::{prometheus_text, ShardMetrics};
use crate::ownership::{Lock, OwnershipError};
use crate::quic::auth::{AuthError, Authorisation};
use crate::quic::tls::TlsError;
use crate::quic::BindError;
use crate::shard::{stop_all, ShardConfig, ShardError, ShardHandle, ShardSender};
use appliance_core::idempotency::{IdempotencyIndex, IndexEntry};
use appliance_core::{IssuerConfig, TaxpayerConfig, TaxpayerId};
use hsm_driver::route::HsmClientConfig;
use hsm_driver::tcp::TcpClientConfig;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why the appliance could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The TLS material is unusable.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The authorisation table is invalid.
    #[error("clients: {0}")]
    Auth(#[from] AuthError),
    /// The data dir or a port belongs to another instance, or the data dir is on a
    /// volatile filesystem.
    #[error("{0}")]
    Ownership(#[from] OwnershipError),
    /// The appliance identity could not be read or created.
    #[error("{0}")]
    Identity(#[from] IdentityError),
    /// A socket could not be bound.
    #[error("{0}")]
    Bind(#[from] BindError),
    /// A shard failed to start.
    #[error("{0}")]
    Shard(#[from] ShardError),
}

/// A running appliance.
pub struct Appliance {
    handles: Vec<ShardHandle>,
    senders: Vec<ShardSender>,
    service_addr: SocketAddr,
    shard_ports: Vec<u16>,
    control: Option<ControlServer>,
    identity: Identity,
    identity_created: bool,
    /// The data dir's and the ports' locks, held for the appliance's life. Declared
    /// last: fields drop after `Drop::drop` stopped the shards, so the locks are
    /// released only once nothing serves any more.
    _locks: Vec<Lock>,
}

impl Appliance {
    /// Starts the appliance, in an order that leaves nothing half-taken when a step
    /// fails:
    /// 1. checks the configuration and loads the TLS material (nothing written yet);
    /// 2. refuses a data dir on a volatile filesystem, then takes the data dir's lock and
    ///    the lock of every configured UDP port ([`crate::ownership`]);
    /// 3. loads the appliance identity, creating it on a fresh data dir (refused when
    ///    the data dir has journals but no identity), and checks the shard layout;
    /// 4. binds every socket: the service port, the shard ports and the control port
    ///    (ports left to the kernel are locked once known);
    /// 5. starts every shard (journal recovery, the tax server: segment adoption,
    ///    pools), then serves the control port.
    ///
    /// Nothing before step 5 contacts the tax server, so a start refused or failing
    /// there has adopted no segments. Returns once every shard serves.
    pub fn start(config: &ApplianceConfig) -> Result<Appliance, ServeError> {
        config.check()?;
        let shards = config.shard_count();
        log_index_allocation(config.limits.index_capacity_orders, shards);
        let taxpayers = config
            .taxpayers
            .iter()
            .map(|t| {
                Ok(TaxpayerConfig {
                    id: TaxpayerId::parse(&t.id)
                        .map_err(|e| ConfigError::Invalid(format!("taxpayer {}: {e}", t.id)))?,
                    ceiling_fen: t.ceiling_fen,
                    low_watermark: t.low_watermark,
                    refill_count: t.refill_count,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let authorisation = Arc::new(Authorisation::new(&config.clients)?);
        let crypto = crate::quic::tls::server_crypto(&config.tls)?;
        let server_config = crate::quic::server_config(crypto);
        let (tax_servers, taxpayer_routes) = config.routes()?;

        // Ownership: the data dir, then every port known before binding.
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| ConfigError::Read {
            path: data_dir.clone(),
            source,
        })?;
        crate::ownership::check_persistent(data_dir, config.unsafe_allow_volatile_data_dir)?;
        let mut locks = vec![crate::ownership::lock_data_dir(data_dir)?];
        let runtime_dir = match &config.runtime_dir {
            Some(dir) => {
                crate::ownership::prepare_runtime_dir(dir)?;
                dir.clone()
            }
            None => {
                let dir = crate::ownership::default_runtime_dir();
                crate::ownership::prepare_runtime_dir(&dir)?;
                dir
            }
        };
        crate::ownership::remove_stale_port_locks(&runtime_dir);
        let service = config.listen.service;
        let configured_ports = config.shard_ports();
        let lock_port = |locks: &mut Vec<Lock>, port: u16, what: &str| {
            let addr = SocketAddr::new(service.ip(), port);
            crate::ownership::lock_udp_port(&runtime_dir, addr, what, data_dir)
                .map(|lock| locks.push(lock))
        };
        if service.port() != 0 {
            lock_port(&mut locks, service.port(), "service address")?;
        }
        for (shard, &port) in configured_ports.iter().enumerate() {
            if port != 0 {
                lock_port(&mut locks, port, &crate::quic::shard_port_name(shard))?;
            }
        }

        // The data dir: identity first (before anything else is written in it).
        let (identity, identity_created) = crate::identity::load_or_create(data_dir, None)?;
        if identity_created {
            tracing::info!(id = %identity.id_hex(), name = %identity.name, data_dir = %data_dir.display(), "created the appliance identity");
        }
        check_layout(data_dir, shards)?;

        // Every socket, before any shard starts.
        let sockets = crate::quic::bind(service, shards as usize, &configured_ports)?;
        let service_addr = sockets.service_addr;
        let shard_ports = sockets.shard_ports.clone();
        if service.port() == 0 {
            lock_port(&mut locks, service_addr.port(), "service address")?;
        }
        for (shard, (&asked, &bound)) in configured_ports.iter().zip(&shard_ports).enumerate() {
            if asked == 0 {
                lock_port(&mut locks, bound, &crate::quic::shard_port_name(shard))?;
            }
        }
        let control_listener = if config.listen.control_disabled {
            None
        } else {
            Some(
                TcpListener::bind(config.listen.control).map_err(|source| BindError {
                    transport: "tcp",
                    addr: config.listen.control,
                    what: "control port".into(),
                    source,
                })?,
            )
        };

        let hsm = HsmClientConfig::from(TcpClientConfig {
            connect_timeout: Duration::from_millis(config.tax_server.connect_timeout_ms),
            call_timeout: Duration::from_millis(config.tax_server.call_timeout_ms),
            ..TcpClientConfig::default()
        });
        let mut journal = JournalConfig::new(data_dir.join("shard-0"));
        journal.segment_bytes_max = config.limits.journal_segment_bytes;
        journal.sync = config.limits.journal_sync;
        let shard_configs = (0..shards)
            .map(|shard_id| ShardConfig {
                appliance_id: identity.id,
                issuer: IssuerConfig {
                    shard_id,
                    taxpayers: taxpayers.clone(),
                    retention_ms: u64::from(config.limits.retention_days) * 24 * 3600 * 1000,
                    index_capacity_orders: config.limits.index_capacity_orders,
                    tick_requests_max: config.limits.tick_requests_max,
                },
                journal: JournalConfig {
                    dir: data_dir.join(format!("shard-{shard_id}")),
                    ..journal.clone()
                },
                cpu: config.cpu_of(shard_id),
                tax_servers: tax_servers.clone(),
                taxpayer_routes: taxpayer_routes.clone(),
                hsm,
                spin_before_park: Duration::from_micros(config.spin_before_park_us),
                ticks_in_flight: config.limits.ticks_in_flight as usize,
            })
            .collect();
        let quic = crate::quic::per_shard(sockets, server_config, authorisation);
        let handles = ShardHandle::spawn_group(shard_configs, Some(quic))?;
        let senders = handles
            .iter()
            .filter_map(ShardHandle::sender_handle)
            .collect::<Vec<_>>();
        let mut appliance = Appliance {
            handles,
            senders,
            service_addr,
            shard_ports,
            control: None,
            identity,
            identity_created,
            _locks: locks,
        };
        if let Some(listener) = control_listener {
            // On failure `appliance` drops: the shards stop, then the locks go.
            appliance.control = Some(
                ControlServer::serve(
                    listener,
                    appliance.senders.clone(),
                    appliance.identity.clone(),
                )
                .map_err(|source| BindError {
                    transport: "tcp",
                    addr: config.listen.control,
                    what: "control port".into(),
                    source,
                })?,
            );
        }
        tracing::info!(%service_addr, shard_ports = ?appliance.shard_ports, shards, appliance = %appliance.identity.id_hex(), "appliance serving");
        Ok(appliance)
    }

    /// This appliance's identity (from the data dir).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether this start created the identity (the data dir was new).
    pub fn identity_created(&self) -> bool {
        self.identity_created
    }

    /// The service address (port resolved).
    pub fn service_addr(&self) -> SocketAddr {
        self.service_addr
    }

    /// Per-shard ports.
    pub fn shard_ports(&self) -> &[u16] {
        &self.shard_ports
    }

    /// The control port's address, if enabled.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control.as_ref().map(|c| c.addr)
    }

    /// A snapshot of every shard's metrics.
    pub fn metrics(&self) -> Vec<ShardMetrics> {
        collect_metrics(&self.senders)
    }

    /// Stops the control port and every shard (queued work is finished first), and
    /// returns the last metrics.
    pub fn shutdown(mut self) -> Vec<ShardMetrics> {
        let metrics = self.metrics();
        if let Some(control) = self.control.take() {
            control.stop();
        }
        self.senders.clear();
        stop_all(&mut self.handles);
        metrics
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(control) = self.control.take() {
            control.stop();
        }
        stop_all(&mut self.handles);
    }
}

/// File in the data dir recording the shard count the journals were written with.
pub const LAYOUT_FILE: &str = "shards";

/// Refuses to start with another shard count than the data dir was written with: an
/// order's home shard depends on the count, and each shard's idempotency index only
/// knows its own orders, so a changed count could issue an order twice. A new data dir
/// records the count.
pub fn check_layout(data_dir: &std::path::Path, shards: u32) -> Result<(), ConfigError> {
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(recorded) if recorded == shards => Ok(()),
            Ok(recorded) => Err(ConfigError::Invalid(format!(
                "{} was written by {recorded} shards; this configuration has {shards} (resharding is not supported)",
                data_dir.display()
            ))),
            Err(_) => Err(ConfigError::Invalid(format!(
                "{}: not a shard count",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)
                .and_then(|()| std::fs::write(&path, format!("{shards}\n")))
                .map_err(|source| ConfigError::Read { path, source })
        }
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// Start-up line of what each shard's idempotency index allocates: the configured
/// capacity is held exactly (`check` refused values outside the index's bounds); the
/// table beside it rounds up to a power of two.
fn log_index_allocation(configured: u32, shards: u32) {
    let allocated = IdempotencyIndex::capacity_for(configured);
    let table_slots = IdempotencyIndex::table_slots_for(allocated);
    let bytes =
        u64::from(allocated) * std::mem::size_of::<IndexEntry>() as u64 + table_slots as u64 * 4;
    tracing::info!(
        configured,
        allocated,
        table_slots,
        shards,
        "idempotency index per shard: configured {configured} orders, allocated {allocated} orders + {table_slots} table slots ({} MiB)",
        bytes >> 20
    );
}

fn collect_metrics(senders: &[ShardSender]) -> Vec<ShardMetrics> {
    senders.iter().filter_map(ShardSender::metrics).collect()
}

/// The control port: a minimal HTTP/1.1 server on its own thread (not a shard's), serving
/// `GET /metrics` (Prometheus text) and `GET /status` (JSON). Shards answer metric
/// requests over their inbox channels, so the control thread never touches their memory.
struct ControlServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Serves `listener` (bound before the shards started) on its own thread.
    fn serve(
        listener: TcpListener,
        senders: Vec<ShardSender>,
        identity: Identity,
    ) -> std::io::Result<ControlServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = serve_control(stream, &senders, &identity) {
                                tracing::debug!(error = %e, "control request failed");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => tracing::warn!(error = %e, "control accept failed"),
                    }
                }
            })?;
        Ok(ControlServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Bytes of a control request line and headers read at most.
const CONTROL_REQUEST_BYTES_MAX: u64 = 8 * 1024;

fn serve_control(
    stream: TcpStream,
    senders: &[ShardSender],
    identity: &Identity,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(std::io::Read::take(
        stream.try_clone()?,
        CONTROL_REQUEST_BYTES_MAX,
    ));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain the headers; nothing in them matters here.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match (line.split_whitespace().next(), path) {
        (Some("GET"), "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            prometheus_text(&collect_metrics(senders)),
        ),
        (Some("GET"), "/status") => {
            let shards: Vec<serde_json::Value> = collect_metrics(senders)
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "shard": m.shard_id,
                        "issued_invoices": m.issued_invoices,
                        "replayed_invoices": m.replayed_invoices,
                        "rejected_requests": m.rejected_requests,
                        "ticks": m.ticks,
                        "forwarded_requests": m.quic.forwarded_requests,
                        "index_entries": m.index_entries,
                        "index_capacity": m.index_capacity,
                        "index_full_refusals": m.index_full_refusals,
                    })
                })
                .collect();
            let running = shards.len() == senders.len();
            (
                "200 OK",
                "application/json",
                serde_json::json!({
                    "appliance": { "id": identity.id_hex(), "name": identity.name },
                    "running": running,
                    "shards": shards,
                })
                .to_string(),
            )
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_count_of_a_data_dir_cannot_change() {
        let dir = tempfile::tempdir().unwrap();
        check_layout(dir.path(), 2).unwrap();
        check_layout(dir.path(), 2).unwrap();
        assert!(matches!(
            check_layout(dir.path(), 3),
            Err(ConfigError::Invalid(_))
        ));
    }
}
