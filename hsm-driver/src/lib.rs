//! Driver for the cipher-machine tax server: the command set and its wire codec, the
//! GM/T crypto of the tax logic, the TCP transport used by appliance shards, and the
//! tax-server emulator (binary `hsm-emu`) used by default and in tests.
#![deny(missing_docs)]

pub mod crypto;
pub mod emulator;
pub mod keys;
pub mod proto;
pub mod tcp;
