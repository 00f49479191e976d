//! Sans-IO issuance core of the invoice appliance: validation, number pools, idempotency,
//! journal records and canonical invoice bytes. No I/O, no clock, no threads: time and
//! randomness come in as arguments, so that every behaviour can be simulated.
//!
//! # Modules (one job each)
//! * [`taxpayer`]: unified social credit codes (GB 32100-2015), invoice codes, numbers,
//!   segments.
//! * [`money`]: legal tax rates and the exact tax formula in integer fen.
//! * [`invoice`]: the request and the issued invoice.
//! * [`validate`]: stateless checks and [`IssueError`], every reason to refuse.
//! * [`canonical`]: the canonical bytes the tax code is computed over; strict decode.
//! * [`pool`]: a seller's number segments, cursors, refill requests, accounting.
//! * [`idempotency`]: the bounded (seller, order id) index, 64 B per order.
//! * [`routing`]: the home shard of a (seller, order id) key.
//! * [`issuer`]: the tick state machine (`begin_tick` / `finish_tick` / `abort_tick` /
//!   `cancel_tick`), control records and start-up reconciliation, and the cross-shard
//!   claim on a red invoice's original ([`issuer::red`]); one file each in `issuer/`.
//! * [`journal`]: record framing, record bodies of every kind, recovery.
//!
//! # How a shell drives it
//! ```text
//! let tick = issuer.begin_tick(now_ms, requests)?;    // send tick.refill_requests()
//! // one TaxCodes command with tick.canonical_items(); per item Ok((tax, check)) or Err
//! match hsm result {
//!     Ok(codes) => { let commit = issuer.finish_tick(tick, &codes, &mut buf)?;
//!                    // pad, write, fdatasync buf; then release commit.answers }
//!     Err(_)    => requests = issuer.abort_tick(tick)?, // numbers spoiled; retry or refuse
//! }
//! // a tick whose command was never sent: requests = issuer.cancel_tick(tick)? (exact)
//! // once per tick: if let Some(step) = issuer.index_fill_change() { log it }
//! // restart: journal::replay::Recovery::apply per record, then finish(now_ms)
//! ```
//!
//! # Where this crate refines docs/design/foundation.md
//! * Red invoices carry the original's order id in the canonical body (after
//!   `issuer_ref`), so that a red invoice decodes back completely from its bytes.
//! * Idempotency entries are added at `finish_tick` (when records get sequence numbers);
//!   in-tick duplicates are found through a tick-local map. Abort has nothing to undo in
//!   the index.
//! * A number whose item the tax server refuses, or that an aborted tick took (its
//!   command may have run on the device), is journaled as `NumberSpoiled` and never
//!   reused; pool accounting has a `spoiled` state next to available, issued, returned.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod canonical;
pub mod idempotency;
pub mod invoice;
pub mod issuer;
pub mod journal;
pub mod money;
pub mod pool;
pub mod routing;
pub mod taxpayer;
pub mod validate;

pub use idempotency::IndexFill;
pub use invoice::{Invoice, InvoiceIdentity, InvoiceKind, IssueRequest, LineItem, RedReference};
pub use issuer::red::RedClaim;
pub use issuer::{
    Answer, Commit, ControlError, Issuer, IssuerConfig, Outcome, TaxCodeResult, TaxpayerConfig,
    Tick, TickError,
};
pub use journal::replay::{recover, Recovery, RecoveryError};
pub use money::TaxRate;
pub use pool::{NumberAccounting, RefillRequest};
pub use taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};
pub use validate::{IssueError, ItemError};
