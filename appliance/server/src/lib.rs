//! The issuing appliance: glommio shards, journal files, tax-server connections, and
//! the bulk demo.
#![deny(missing_docs)]

pub mod allocator;
pub mod child;
pub mod config;
pub mod demo;
pub mod identity;
pub mod inbox;
pub mod journal;
pub mod metrics;
pub mod ownership;
pub mod quic;
pub mod release;
pub mod serve;
pub mod shard;
pub mod workload;
