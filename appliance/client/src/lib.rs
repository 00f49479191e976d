//! Client library for the appliance's QUIC service (docs/client.md, docs/protocol.md).
//!
//! * [`Client`]: connects, runs hello, and when shard-aware keeps one connection per
//!   shard so that every order goes straight to its home shard; issues in bulk with
//!   bounded concurrency and retries that keep idempotency ([`Client::issue`]); lower
//!   level single-frame calls for tests and load generators ([`Client::issue_frame`],
//!   [`Client::exchange_raw`]).
//! * [`ClientConfig`]: address, TLS trust and identity, limits, [`RetryPolicy`].
//! * [`ClientError`]: typed failures; [`ClientError::is_retryable`] says whether the
//!   outcome is unknown or nothing was issued.
//! * [`pki`]: a throwaway CA with server and client certificates for dev and tests.
//! * [`cli`]: the `issue` command (`appliance issue ...`), as a library module.
//!
//! Every type is cheap to clone and every call takes `&self`, so one client can serve
//! many tasks.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cli;
mod client;
mod config;
mod error;
pub mod pki;

pub use appliance_proto::{ErrorCode, HelloReply, Issued, ItemResult};
pub use client::{Client, IssueOutcome};
pub use config::{ClientConfig, ClientIdentity, RetryPolicy};
pub use error::ClientError;
