//! [`ClientConfig`]: where the service is, whom to trust, who we are, and the limits of
//! concurrency, time and retries. Building the QUIC/TLS configuration from it is here too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ClientError;
use crate::pki;

/// The client's own certificate chain and key, for mutual TLS. The appliance takes the
/// certificate's Common Name as the client identity.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate chain, leaf first, PEM.
    pub cert_chain_pem: Vec<u8>,
    /// Private key of the leaf, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    // The key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_chain_pem_bytes", &self.cert_chain_pem.len())
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Reads the chain and the key from PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<ClientIdentity, ClientError> {
        Ok(ClientIdentity {
            cert_chain_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))
}

/// How exchanges whose outcome is unknown, and retryable refusals, are retried. The same
/// requests are resent every time: the appliance's idempotency (seller, order id) turns a
/// resend of something already issued into a `Replayed` answer with the same invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included (1 = no retry).
    pub attempts_max: u32,
    /// Delay before the first retry; doubles per retry up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest delay between two attempts.
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 5,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Delay after failed attempt `attempt` (1-based): exponential, capped, with jitter
    /// in [½, 1] of it so that clients that failed together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(20);
        let full = self
            .backoff_initial
            .saturating_mul(1u32 << shift)
            .min(self.backoff_max);
        let full_ns = u64::try_from(full.as_nanos()).unwrap_or(u64::MAX);
        if full_ns < 2 {
            return full;
        }
        Duration::from_nanos(rand::random_range(full_ns / 2..=full_ns))
    }
}

/// Everything [`crate::Client::connect`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The appliance's service address (the port every shard shares).
    pub server_addr: SocketAddr,
    /// Name checked against the server certificate's SANs.
    pub server_name: String,
    /// PEM certificate(s) of the CA(s) whose server certificates are trusted.
    pub ca_pem: Vec<u8>,
    /// Our certificate and key for mutual TLS; `None` connects without one (an appliance
    /// that requires client certificates then refuses the handshake).
    pub identity: Option<ClientIdentity>,
    /// Open one connection per shard, to the shard's own port, and send each order to its
    /// home shard; otherwise everything goes over the service connection and the server
    /// forwards what landed on another shard.
    pub shard_aware: bool,
    /// Concurrent streams per connection; `None` = the server's `streams_max` from hello.
    /// Never above the server's limit (more streams would only queue for credit).
    pub streams_per_connection: Option<u32>,
    /// Longest wait for one exchange's reply (stream open to reply end).
    pub exchange_timeout: Duration,
    /// Longest wait for a QUIC handshake.
    pub connect_timeout: Duration,
    /// Retries of [`crate::Client::issue`].
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// A configuration with the defaults: shard-aware, the server's stream limit, 10 s
    /// exchange timeout, 5 s connect timeout, [`RetryPolicy::default`], no client
    /// certificate.
    pub fn new(server_addr: SocketAddr, server_name: impl Into<String>, ca_pem: Vec<u8>) -> Self {
        ClientConfig {
            server_addr,
            server_name: server_name.into(),
            ca_pem,
            identity: None,
            shard_aware: true,
            streams_per_connection: None,
            exchange_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }

    /// Like [`ClientConfig::new`], reading the CA and (when given) the client
    /// certificate and key from PEM files.
    pub fn from_pem_files(
        server_addr: SocketAddr,
        server_name: impl Into<String>,
        ca: &Path,
        client_cert_and_key: Option<(&Path, &Path)>,
    ) -> Result<Self, ClientError> {
        let mut config = ClientConfig::new(server_addr, server_name, read(ca)?);
        if let Some((cert, key)) = client_cert_and_key {
            config.identity = Some(ClientIdentity::from_files(cert, key)?);
        }
        Ok(config)
    }

    /// The quinn configuration: TLS 1.3 on ring, our roots only (no platform store: the
    /// appliance has its own CA), ALPN [`appliance_proto::ALPN`], keep-alives so that an
    /// idle connection between bulk windows survives NAT and idle timers.
    pub(crate) fn quic_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let cas = pki::certs_from_pem(&self.ca_pem).map_err(ClientError::Config)?;
        if cas.is_empty() {
            return Err(ClientError::Config("no CA certificate in ca_pem".into()));
        }
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &self.identity {
            Some(identity) => {
                let chain: Vec<CertificateDer<'static>> =
                    pki::certs_from_pem(&identity.cert_chain_pem).map_err(ClientError::Config)?;
                if chain.is_empty() {
                    return Err(ClientError::Config(
                        "no certificate in cert_chain_pem".into(),
                    ));
                }
                let key: PrivateKeyDer<'static> =
                    pki::key_from_pem(&identity.key_pem).map_err(ClientError::Config)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Config(format!("client certificate: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![appliance_proto::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut transport = quinn::TransportConfig::default();
        // The server never opens streams towards us.
        transport.max_concurrent_bidi_streams(0u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        transport.keep_alive_interval(Some(Duration::from_secs(3)));
        // Dead peers are detected by the idle timeout; 10 s keeps a crashed server from
        // holding requests much longer than one exchange timeout.
        let idle = quinn::IdleTimeout::try_from(Duration::from_secs(10))
            .map_err(|e| ClientError::Config(e.to_string()))?;
        transport.max_idle_timeout(Some(idle));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}
