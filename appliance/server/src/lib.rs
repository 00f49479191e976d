//! The issuing appliance: glommio shards, journal files, tax-server connections.
#![deny(missing_docs)]

pub mod child;
pub mod journal;
pub mod metrics;
