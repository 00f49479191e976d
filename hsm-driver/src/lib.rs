//! Driver for the cipher-machine tax server: the command set and its wire codec, the
//! GM/T crypto the driver side checks with (check codes, SM3, SM2 verification), and the
//! TCP and PCIe transports used by appliance shards (and [`route`], which picks one per
//! tax-server address). The tax-server emulator (binary `hsm-emu`) is the `hsm-emulator`
//! crate, so nothing device-side (keys, signing, PKCS#11) is linked into the appliance.
#![deny(missing_docs)]

pub mod crypto;
pub mod pcie;
pub mod proto;
pub mod route;
pub mod tcp;

pub use route::{HsmClient, HsmClientConfig, Route};
