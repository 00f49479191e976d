//! Appliance server.
