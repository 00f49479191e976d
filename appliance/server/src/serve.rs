//! `appliance serve`: shards with their QUIC endpoints, started from an
//! [`ApplianceConfig`], and the control port (Prometheus metrics and status).

use crate::config::{ApplianceConfig, ConfigError};
use crate::journal::JournalConfig;
use crate::metrics::{prometheus_text, ShardMetrics};
use crate::quic::auth::{AuthError, Authorisation};
use crate::quic::tls::TlsError;
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
    /// A socket could not be bound.
    #[error("bind: {0}")]
    Bind(std::io::Error),
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
}

impl Appliance {
    /// Binds the sockets, starts every shard (journal recovery, tax server, pools) and
    /// the control port. Returns once every shard serves.
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
        check_layout(&config.data_dir, shards)?;
        let authorisation = Arc::new(Authorisation::new(&config.clients)?);
        let crypto = crate::quic::tls::server_crypto(&config.tls)?;
        let server_config = crate::quic::server_config(crypto);
        let sockets = crate::quic::bind(
            config.listen.service,
            shards as usize,
            &config.shard_ports(),
        )
        .map_err(ServeError::Bind)?;
        let service_addr = sockets.service_addr;
        let shard_ports = sockets.shard_ports.clone();
        let (tax_servers, taxpayer_routes) = config.routes()?;
        let hsm = HsmClientConfig::from(TcpClientConfig {
            connect_timeout: Duration::from_millis(config.tax_server.connect_timeout_ms),
            call_timeout: Duration::from_millis(config.tax_server.call_timeout_ms),
            ..TcpClientConfig::default()
        });
        let mut journal = JournalConfig::new(config.data_dir.join("shard-0"));
        journal.segment_bytes_max = config.limits.journal_segment_bytes;
        journal.sync = config.limits.journal_sync;
        let shard_configs = (0..shards)
            .map(|shard_id| ShardConfig {
                // Replaced by the data dir's identity (appliance init) in this session.
                appliance_id: 0,
                issuer: IssuerConfig {
                    shard_id,
                    taxpayers: taxpayers.clone(),
                    retention_ms: u64::from(config.limits.retention_days) * 24 * 3600 * 1000,
                    index_capacity_orders: config.limits.index_capacity_orders,
                    tick_requests_max: config.limits.tick_requests_max,
                },
                journal: JournalConfig {
                    dir: config.data_dir.join(format!("shard-{shard_id}")),
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
        let control = if config.listen.control_disabled {
            None
        } else {
            Some(
                ControlServer::start(config.listen.control, senders.clone())
                    .map_err(ServeError::Bind)?,
            )
        };
        tracing::info!(%service_addr, ?shard_ports, shards, "appliance serving");
        Ok(Appliance {
            handles,
            senders,
            service_addr,
            shard_ports,
            control,
        })
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
    fn start(addr: SocketAddr, senders: Vec<ShardSender>) -> std::io::Result<ControlServer> {
        let listener = TcpListener::bind(addr)?;
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
                            if let Err(e) = serve_control(stream, &senders) {
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

fn serve_control(stream: TcpStream, senders: &[ShardSender]) -> std::io::Result<()> {
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
                serde_json::json!({ "running": running, "shards": shards }).to_string(),
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
