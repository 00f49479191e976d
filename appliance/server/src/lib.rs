//! The issuing appliance: glommio shards, journal files, tax-server connections, and
//! the bulk demo.
#![deny(missing_docs)]

pub mod child;
pub mod demo;
pub mod journal;
pub mod metrics;
pub mod shard;
pub mod workload;
