//! Driver for the cipher-machine tax server: the command set and its wire codec, the
//! GM/T crypto of the tax logic, the TCP and PCIe transports used by appliance shards
//! (and [`route`], which picks one per tax-server address), and the tax-server emulator
//! (binary `hsm-emu`) used by default and in tests.
#![deny(missing_docs)]

pub mod crypto;
pub mod emulator;
pub mod keys;
pub mod pcie;
pub mod proto;
pub mod route;
pub mod tcp;

pub use route::{HsmClient, HsmClientConfig, Route};
