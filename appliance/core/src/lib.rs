//! Sans-IO issuance core of the invoice appliance: validation, number pools, idempotency,
//! journal records and canonical invoice bytes. No I/O, no clock, no threads: time and
//! randomness come in as arguments, so that every behaviour can be simulated.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod canonical;
pub mod idempotency;
pub mod invoice;
pub mod issuer;
pub mod journal;
pub mod money;
pub mod pool;
pub mod taxpayer;
pub mod validate;

pub use invoice::{Invoice, InvoiceIdentity, InvoiceKind, IssueRequest, LineItem, RedReference};
pub use issuer::{
    Answer, Commit, Issuer, IssuerConfig, Outcome, TaxCodeResult, TaxpayerConfig, Tick,
};
pub use money::TaxRate;
pub use taxpayer::{InvoiceCode, InvoiceNumber, NumberSegment, TaxpayerId};
pub use validate::{IssueError, ItemError};
