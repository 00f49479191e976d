//! Per-tax-server transport choice: a [`Route`] names a tax server as
//! `tcp://host:port` or `pcie:/path/to/region` (optionally `#queue`), and [`HsmClient`]
//! is the client for either, with the calling shape of [`TcpClient`].
//!
//! ```text
//! tcp://127.0.0.1:7400            TCP to host:port (IPv6 as tcp://[::1]:7400)
//! pcie:/dev/shm/hsm-emu.pcie      PCIe region file, first queue pair no live driver owns
//! pcie:/dev/shm/hsm-emu.pcie#3    PCIe region file, queue pair 3
//! ```

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::pcie::{PcieClient, PcieClientConfig, QueueSelect};
use crate::proto::{Request, Response};
use crate::tcp::{HsmError, TcpClient, TcpClientConfig};

/// Where a tax server is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// TCP to `host:port`.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// PCIe through the region file at `path`.
    Pcie {
        /// The region file (absolute).
        path: PathBuf,
        /// The queue pair, or `None` for the first free one.
        queue: Option<usize>,
    },
}

/// Why a route string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Neither `tcp://` nor `pcie:`.
    #[error("route {0:?} has no known scheme (expected tcp://host:port or pcie:/path)")]
    UnknownScheme(String),
    /// `tcp://` without a `host:port` that parses.
    #[error("bad TCP address {0:?} (expected host:port)")]
    BadTcpAddress(String),
    /// The port is not a number in 1..=65535.
    #[error("bad port {0:?}")]
    BadPort(String),
    /// The PCIe path is empty or relative.
    #[error("PCIe path {0:?} must be absolute")]
    RelativePath(String),
    /// The `#queue` suffix is not a number.
    #[error("bad PCIe queue {0:?}")]
    BadQueue(String),
}

impl FromStr for Route {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
                let (h, p) = v6
                    .split_once("]:")
                    .ok_or_else(|| RouteError::BadTcpAddress(rest.into()))?;
                (h, p)
            } else {
                rest.rsplit_once(':')
                    .ok_or_else(|| RouteError::BadTcpAddress(rest.into()))?
            };
            if host.is_empty() || (host.contains(':') && !rest.starts_with('[')) {
                return Err(RouteError::BadTcpAddress(rest.into()));
            }
            let port: u16 = port.parse().map_err(|_| RouteError::BadPort(port.into()))?;
            if port == 0 {
                return Err(RouteError::BadPort("0".into()));
            }
            return Ok(Route::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if let Some(rest) = s.strip_prefix("pcie:") {
            let (path, queue) = match rest.rsplit_once('#') {
                Some((p, q)) => {
                    let q: usize = q.parse().map_err(|_| RouteError::BadQueue(q.into()))?;
                    (p, Some(q))
                }
                None => (rest, None),
            };
            if !path.starts_with('/') {
                return Err(RouteError::RelativePath(path.into()));
            }
            return Ok(Route::Pcie {
                path: PathBuf::from(path),
                queue,
            });
        }
        Err(RouteError::UnknownScheme(s.into()))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Tcp { host, port } if host.contains(':') => write!(f, "tcp://[{host}]:{port}"),
            Route::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Route::Pcie { path, queue } => {
                write!(f, "pcie:{}", path.display())?;
                if let Some(q) = queue {
                    write!(f, "#{q}")?;
                }
                Ok(())
            }
        }
    }
}

impl Route {
    /// A TCP route to a socket address.
    pub fn tcp(addr: std::net::SocketAddr) -> Self {
        Route::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A PCIe route to the first free queue of the region at `path`.
    pub fn pcie(path: impl Into<PathBuf>) -> Self {
        Route::Pcie {
            path: path.into(),
            queue: None,
        }
    }

    /// `"tcp"` or `"pcie"`.
    pub fn transport(&self) -> &'static str {
        match self {
            Route::Tcp { .. } => "tcp",
            Route::Pcie { .. } => "pcie",
        }
    }
}

/// Settings for both transports; [`HsmClient::connect`] uses the one the route needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HsmClientConfig {
    /// TCP settings.
    pub tcp: TcpClientConfig,
    /// PCIe settings.
    pub pcie: PcieClientConfig,
}

impl From<TcpClientConfig> for HsmClientConfig {
    /// The TCP settings as given; PCIe with the same deadlines and bounds.
    fn from(tcp: TcpClientConfig) -> Self {
        Self {
            tcp,
            pcie: PcieClientConfig::from(tcp),
        }
    }
}

/// A tax-server client over either transport, for one glommio executor (a shard).
/// Cheap to clone; clones share the connection or queue pair.
#[derive(Debug, Clone)]
pub enum HsmClient {
    /// Over TCP.
    Tcp(TcpClient),
    /// Over PCIe.
    Pcie(PcieClient),
}

impl HsmClient {
    /// Connects along `route` (inside a glommio executor); fails if the first
    /// connection or queue attach fails.
    pub async fn connect(route: &Route, config: HsmClientConfig) -> Result<Self, HsmError> {
        match route {
            Route::Tcp { host, port } => Ok(HsmClient::Tcp(
                TcpClient::connect((host.as_str(), *port), config.tcp).await?,
            )),
            Route::Pcie { path, queue } => {
                let select = queue.map_or(QueueSelect::Any, QueueSelect::Index);
                Ok(HsmClient::Pcie(
                    PcieClient::connect(path, select, config.pcie).await?,
                ))
            }
        }
    }

    /// Sends one command and waits for its answer (see [`TcpClient::call`] and
    /// [`PcieClient::call`]: pipelined, bounded in flight, one deadline per call).
    pub async fn call(&self, request: &Request) -> Result<Response, HsmError> {
        match self {
            HsmClient::Tcp(c) => c.call(request).await,
            HsmClient::Pcie(c) => c.call(request).await,
        }
    }

    /// Closes the client; calls in flight and later fail with [`HsmError::Closed`].
    pub fn close(&self) {
        match self {
            HsmClient::Tcp(c) => c.close(),
            HsmClient::Pcie(c) => c.close(),
        }
    }

    /// `"tcp"` or `"pcie"`.
    pub fn transport(&self) -> &'static str {
        match self {
            HsmClient::Tcp(_) => "tcp",
            HsmClient::Pcie(_) => "pcie",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        for s in [
            "tcp://127.0.0.1:7400",
            "tcp://tax-server.local:1",
            "tcp://[::1]:7400",
            "pcie:/dev/shm/hsm-emu.pcie",
            "pcie:/dev/shm/hsm-emu.pcie#3",
        ] {
            let r: Route = s.parse().expect(s);
            assert_eq!(r.to_string(), s);
            assert_eq!(r.to_string().parse::<Route>().expect("again"), r);
        }
        assert_eq!(
            "pcie:/x#2".parse::<Route>(),
            Ok(Route::Pcie {
                path: "/x".into(),
                queue: Some(2)
            })
        );
        assert_eq!(
            "tcp://[::1]:9".parse::<Route>(),
            Ok(Route::Tcp {
                host: "::1".into(),
                port: 9
            })
        );
    }

    #[test]
    fn typed_errors() {
        assert!(matches!(
            "udp://x:1".parse::<Route>(),
            Err(RouteError::UnknownScheme(_))
        ));
        assert!(matches!(
            "127.0.0.1:1".parse::<Route>(),
            Err(RouteError::UnknownScheme(_))
        ));
        assert!(matches!(
            "tcp://host".parse::<Route>(),
            Err(RouteError::BadTcpAddress(_))
        ));
        assert!(matches!(
            "tcp://:80".parse::<Route>(),
            Err(RouteError::BadTcpAddress(_))
        ));
        assert!(matches!(
            "tcp://::1:80".parse::<Route>(),
            Err(RouteError::BadTcpAddress(_))
        ));
        assert!(matches!(
            "tcp://h:http".parse::<Route>(),
            Err(RouteError::BadPort(_))
        ));
        assert!(matches!(
            "tcp://h:0".parse::<Route>(),
            Err(RouteError::BadPort(_))
        ));
        assert!(matches!(
            "tcp://h:70000".parse::<Route>(),
            Err(RouteError::BadPort(_))
        ));
        assert!(matches!(
            "pcie:rel/path".parse::<Route>(),
            Err(RouteError::RelativePath(_))
        ));
        assert!(matches!(
            "pcie:".parse::<Route>(),
            Err(RouteError::RelativePath(_))
        ));
        assert!(matches!(
            "pcie:/p#q".parse::<Route>(),
            Err(RouteError::BadQueue(_))
        ));
    }

    #[test]
    fn route_constructors() {
        let addr: std::net::SocketAddr = "[::1]:5".parse().expect("addr");
        assert_eq!(Route::tcp(addr).to_string(), "tcp://[::1]:5");
        assert_eq!(Route::pcie("/r").transport(), "pcie");
    }
}
