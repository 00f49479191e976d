//! The QUIC service: per shard, one endpoint on the shared service port (SO_REUSEPORT:
//! the kernel spreads clients over the shards by their address) and one on the shard's
//! own port (for shard-aware clients). Each endpoint is driven by quinn-proto from the
//! shard's executor ([`endpoint`]); TLS material and client identities are in [`tls`],
//! who may issue for which seller in [`auth`]. The protocol is docs/protocol.md.

pub mod auth;
pub mod endpoint;
mod exchange;
pub mod tls;
pub mod udp;

use appliance_proto::{FRAME_BYTES_MAX, STREAMS_PER_CONNECTION_MAX};
use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::{IdleTimeout, ServerConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Idle connections are closed after this long without packets (clients keep bulk
/// connections alive with QUIC keep-alives).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// UDP socket buffer bytes requested (the kernel may grant less): bulk frames arrive as
/// bursts of ~1,000 datagrams.
pub const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// The quinn-proto server configuration: crypto plus the protocol's limits.
pub fn server_config(crypto: Arc<QuicServerConfig>) -> Arc<ServerConfig> {
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(STREAMS_PER_CONNECTION_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // A whole frame may be in flight on a stream; the connection window bounds what
        // all streams together may have unread (the endpoint also caps what it buffers).
        .stream_receive_window(VarInt::from_u32(FRAME_BYTES_MAX as u32))
        .receive_window(VarInt::from_u32(4 * FRAME_BYTES_MAX as u32))
        .send_window(4 * FRAME_BYTES_MAX as u64)
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s is a valid idle timeout"),
        ));
    let mut config = ServerConfig::with_crypto(crypto);
    config.transport_config(Arc::new(transport));
    // Clients of one shard's port stay on it; there is no reason to let a connection
    // migrate to another address (and with SO_REUSEPORT another shard's socket).
    config.migration(false);
    Arc::new(config)
}

/// The UDP sockets of every shard, bound before the shards start so that the ports are
/// known (and reported in hello) before any client connects.
#[derive(Debug)]
pub struct BoundSockets {
    /// The service address actually bound (port resolved if 0 was asked).
    pub service_addr: SocketAddr,
    /// Per shard: its socket on the shared service port.
    pub service: Vec<Socket>,
    /// Per shard: its own socket.
    pub shard: Vec<Socket>,
    /// Per shard: the port of its own socket.
    pub shard_ports: Vec<u16>,
}

/// A socket could not be bound; names the address and what it was for.
#[derive(Debug, thiserror::Error)]
#[error("bind {transport} {addr} ({what}): {source}")]
pub struct BindError {
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// What the socket is for: `service address`, `shard 0 port`, `control port`.
    pub what: String,
    /// Underlying error.
    #[source]
    pub source: std::io::Error,
}

impl BindError {
    fn udp(addr: SocketAddr, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| BindError {
            transport: "udp",
            addr,
            what,
            source,
        }
    }
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer only means more loss under bursts.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bound_addr(socket: &Socket) -> std::io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("socket has no IP address"))
}

/// What shard `shard`'s own port is called in messages.
pub fn shard_port_name(shard: usize) -> String {
    format!("shard {shard} port")
}

/// Binds `shards` sockets on `service` and one socket per shard on the same IP at
/// `shard_ports[i]` (0 = any free port; the slice is `shards` long or empty, meaning
/// all 0).
///
/// Every socket on a configured port has SO_REUSEPORT, the shard ports' too: the shards
/// share the service port, and a restart right after a crash must bind although the
/// dead process's sockets linger for a few milliseconds (io_uring releases them late).
/// So the kernel would let another instance of the same user bind them as well: the
/// caller must hold the ports' locks ([`crate::ownership`]). A shard port of 0 is bound
/// without SO_REUSEPORT, so that the kernel picks a port nobody uses.
pub fn bind(
    service: SocketAddr,
    shards: usize,
    shard_ports: &[u16],
) -> Result<BoundSockets, BindError> {
    assert!(shards > 0, "at least one shard");
    if !shard_ports.is_empty() && shard_ports.len() != shards {
        return Err(BindError::udp(service, "shard ports")(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} shard ports for {shards} shards", shard_ports.len()),
        )));
    }
    const SERVICE: &str = "service address";
    let first = udp_socket(service, true).map_err(BindError::udp(service, SERVICE))?;
    let service_addr = bound_addr(&first).map_err(BindError::udp(service, SERVICE))?;
    let mut service_sockets = vec![first];
    for _ in 1..shards {
        service_sockets
            .push(udp_socket(service_addr, true).map_err(BindError::udp(service_addr, SERVICE))?);
    }
    let mut shard_sockets = Vec::with_capacity(shards);
    let mut ports = Vec::with_capacity(shards);
    for i in 0..shards {
        let addr = SocketAddr::new(service_addr.ip(), shard_ports.get(i).copied().unwrap_or(0));
        let socket =
            udp_socket(addr, addr.port() != 0).map_err(BindError::udp(addr, shard_port_name(i)))?;
        ports.push(
            bound_addr(&socket)
                .map_err(BindError::udp(addr, shard_port_name(i)))?
                .port(),
        );
        shard_sockets.push(socket);
    }
    Ok(BoundSockets {
        service_addr,
        service: service_sockets,
        shard: shard_sockets,
        shard_ports: ports,
    })
}

/// What one shard needs to serve QUIC.
pub struct ShardQuic {
    /// Its socket on the shared service port.
    pub service_socket: Socket,
    /// Its own socket.
    pub shard_socket: Socket,
    /// Every shard's own port, for hello.
    pub shard_ports: Vec<u16>,
    /// quinn-proto server configuration.
    pub server_config: Arc<ServerConfig>,
    /// The authorisation table.
    pub authorisation: Arc<auth::Authorisation>,
}

impl std::fmt::Debug for ShardQuic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardQuic")
            .field("shard_ports", &self.shard_ports)
            .finish_non_exhaustive()
    }
}

/// Splits bound sockets into one [`ShardQuic`] per shard.
pub fn per_shard(
    sockets: BoundSockets,
    server_config: Arc<ServerConfig>,
    authorisation: Arc<auth::Authorisation>,
) -> Vec<ShardQuic> {
    sockets
        .service
        .into_iter()
        .zip(sockets.shard)
        .map(|(service_socket, shard_socket)| ShardQuic {
            service_socket,
            shard_socket,
            shard_ports: sockets.shard_ports.clone(),
            server_config: Arc::clone(&server_config),
            authorisation: Arc::clone(&authorisation),
        })
        .collect()
}
