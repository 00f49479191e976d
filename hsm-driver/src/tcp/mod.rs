//! TCP transport to the tax server.
//!
//! - [`TcpClient`]: the client a glommio shard uses. Many tasks of one `LocalExecutor`
//!   call it concurrently; their commands are pipelined on one connection (correlation
//!   ids, answers in any order), queued frames go out in one write, one reader task
//!   dispatches answers, every call has a deadline, in-flight calls are bounded, and a
//!   dropped connection is re-established with exponential backoff.
//! - [`blocking::Client`]: sequential calls over `std::net::TcpStream` for tools and tests.
//!
//! The protocol state that needs no I/O (correlation table, frame assembly, backoff)
//! lives in [`pipeline`] so it is unit-tested without sockets or an executor.

pub mod blocking;
pub(crate) mod client;
pub mod pipeline;

use std::time::Duration;

pub use client::{ClientStats, TcpClient};

use crate::proto::{DeviceError, EncodeError, Status};

/// Errors of a call to the tax server.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// No answer before the call's deadline (connect time included). The command may
    /// still have been executed by the device.
    #[error("tax server call timed out")]
    Timeout,
    /// The tax server refused the connection (nothing listening).
    #[error("connection to the tax server refused")]
    Refused,
    /// The connection dropped (or could not be re-established yet) while the call was in
    /// flight; the command may or may not have been executed.
    #[error("connection to the tax server lost")]
    ConnectionLost,
    /// The device answered with a non-ok status.
    #[error("tax server error {status}: {message}")]
    Device {
        /// The device's status.
        status: Status,
        /// The device's message.
        message: String,
    },
    /// The answer did not decode (the connection stays usable unless the framing itself
    /// was broken).
    #[error("malformed answer from the tax server: {0}")]
    Malformed(String),
    /// The request cannot be encoded (a limit of the command set was exceeded).
    #[error("request not encodable: {0}")]
    InvalidRequest(#[from] EncodeError),
    /// The client was closed.
    #[error("tax server client closed")]
    Closed,
    /// Any other I/O error.
    #[error("tax server i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl HsmError {
    /// Maps an I/O error of connect or transfer to the typed variants.
    pub(crate) fn from_io(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::ConnectionRefused => HsmError::Refused,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => HsmError::Timeout,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => HsmError::ConnectionLost,
            _ => HsmError::Io(e),
        }
    }

    /// Whether retrying the same call later can succeed (transport trouble, a busy
    /// device), as opposed to an answer that will not change.
    pub fn is_transient(&self) -> bool {
        match self {
            HsmError::Timeout | HsmError::Refused | HsmError::ConnectionLost | HsmError::Io(_) => {
                true
            }
            HsmError::Device { status, .. } => *status == Status::Busy,
            HsmError::Malformed(_) | HsmError::InvalidRequest(_) | HsmError::Closed => false,
        }
    }
}

impl From<DeviceError> for HsmError {
    fn from(e: DeviceError) -> Self {
        HsmError::Device {
            status: e.status,
            message: e.message,
        }
    }
}

/// Settings of a TCP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpClientConfig {
    /// Longest wait for one TCP connect.
    pub connect_timeout: Duration,
    /// Deadline of one call, from the call until its answer, including any wait for
    /// an in-flight slot and for a reconnect.
    pub call_timeout: Duration,
    /// Most calls in flight on the connection; further calls wait (back-pressure). At
    /// least 1.
    pub max_in_flight: usize,
    /// First wait before reconnecting after a drop or failed connect.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between reconnect attempts (the wait doubles up to this).
    pub reconnect_backoff_max: Duration,
}

impl Default for TcpClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            // A 4,096-invoice TaxCodes batch takes the emulator ~10 ms; 5 s leaves room
            // for a loaded machine without hiding a dead device for long.
            call_timeout: Duration::from_secs(5),
            // A shard keeps one tick in flight plus control commands; 1,024 bounds the
            // queued request bytes of many small commands (Nop benchmarks) too.
            max_in_flight: 1024,
            reconnect_backoff_min: Duration::from_millis(10),
            reconnect_backoff_max: Duration::from_secs(1),
        }
    }
}
