//! The issuing appliance: glommio shards, journal files, tax-server connections.
#![deny(missing_docs)]

pub mod journal;
