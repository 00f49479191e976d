//! [`ClientError`]: every way an exchange with the appliance can fail, typed so that the
//! retry logic (and callers) can tell "the server said no" from "the outcome is unknown".

use std::net::SocketAddr;
use std::time::Duration;

use appliance_proto::ErrorCode;

/// Why the client could not get an answer.
///
/// `Clone` because one frame's failure becomes the result of every request in it. Causes
/// from quinn and rustls are kept as text: they are for people, while the variant is what
/// code matches on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A setting is unusable (empty CA file, unreadable key, zero limits, bad address).
    #[error("configuration: {0}")]
    Config(String),
    /// The TLS handshake failed: a certificate was refused by either side, or ALPN did not
    /// match. Retrying cannot help.
    #[error("TLS: {0}")]
    Tls(String),
    /// No QUIC connection could be established (nothing listening, handshake timed out).
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// Address dialled.
        addr: SocketAddr,
        /// Cause, for people.
        reason: String,
    },
    /// The hello exchange failed or its reply was unusable.
    #[error("hello: {0}")]
    Hello(String),
    /// The connection closed under an exchange: its outcome is unknown.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// No reply within the per-exchange timeout: its outcome is unknown.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server reset the reply stream without answering: its outcome is unknown.
    #[error("reply stream reset by the server (code {0})")]
    StreamReset(u64),
    /// The server refused the whole exchange with an Error frame.
    #[error("refused by the server: {code}: {message}")]
    Refused {
        /// The server's code.
        code: ErrorCode,
        /// The server's detail, for people.
        message: String,
    },
    /// The reply is not a frame this protocol allows (wrong kind, wrong count, bad bytes).
    #[error("malformed reply: {0}")]
    MalformedReply(String),
    /// A shard id at or above the shard count.
    #[error("no shard {shard}: the service has {shard_count}")]
    NoSuchShard {
        /// Shard asked for.
        shard: u16,
        /// Shards the service has.
        shard_count: u16,
    },
    /// A batch outside `1..=batch_requests_max` given to a single-frame call.
    #[error("batch of {0} requests outside 1..=batch_requests_max")]
    BatchSize(usize),
    /// [`crate::Client::close`] was called.
    #[error("client closed")]
    Closed,
    /// A bug in this library (a worker task panicked); the requests' outcome is unknown.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ClientError {
    /// Whether resending the same requests may succeed. True when the outcome is unknown
    /// (connection lost, timeout, reset: the server may or may not have issued, and a
    /// resend is answered `Replayed` for what was issued), when no connection could be
    /// made (the server may be restarting), and for a refusal whose code says nothing was
    /// issued.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::ConnectionLost(_)
            | ClientError::Timeout(_)
            | ClientError::StreamReset(_) => true,
            ClientError::Refused { code, .. } => code.is_retryable(),
            ClientError::Config(_)
            | ClientError::Tls(_)
            | ClientError::Hello(_)
            | ClientError::MalformedReply(_)
            | ClientError::NoSuchShard { .. }
            | ClientError::BatchSize(_)
            | ClientError::Closed
            | ClientError::Internal(_) => false,
        }
    }

    /// A short stable name for the variant (used by the CLI's output lines).
    pub fn kind_name(&self) -> &'static str {
        match self {
            ClientError::Config(_) => "Config",
            ClientError::Tls(_) => "Tls",
            ClientError::Connect { .. } => "Connect",
            ClientError::Hello(_) => "Hello",
            ClientError::ConnectionLost(_) => "ConnectionLost",
            ClientError::Timeout(_) => "Timeout",
            ClientError::StreamReset(_) => "StreamReset",
            ClientError::Refused { .. } => "Refused",
            ClientError::MalformedReply(_) => "MalformedReply",
            ClientError::NoSuchShard { .. } => "NoSuchShard",
            ClientError::BatchSize(_) => "BatchSize",
            ClientError::Closed => "Closed",
            ClientError::Internal(_) => "Internal",
        }
    }
}

/// QUIC reserves transport error codes 0x100..=0x1ff for TLS alerts (RFC 9001 §4.8).
fn is_crypto_code(code: u64) -> bool {
    (0x100..=0x1ff).contains(&code)
}

/// Maps a connection-level failure. A TLS alert becomes [`ClientError::Tls`] (not
/// retryable); anything else means the connection is gone.
pub(crate) fn connection_error(error: &quinn::ConnectionError) -> ClientError {
    use quinn::ConnectionError as E;
    match error {
        E::TransportError(e) if is_crypto_code(u64::from(e.code)) => {
            ClientError::Tls(e.to_string())
        }
        E::ConnectionClosed(close) if is_crypto_code(u64::from(close.error_code)) => {
            ClientError::Tls(close.to_string())
        }
        E::LocallyClosed => ClientError::Closed,
        other => ClientError::ConnectionLost(other.to_string()),
    }
}

/// Maps a failure while establishing a connection: TLS stays TLS, the rest is `Connect`.
pub(crate) fn connect_error(addr: SocketAddr, error: &quinn::ConnectionError) -> ClientError {
    match connection_error(error) {
        ClientError::ConnectionLost(reason) => ClientError::Connect { addr, reason },
        other => other,
    }
}
