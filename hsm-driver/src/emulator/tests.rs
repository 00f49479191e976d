//! Sans-IO tests of the device logic (no sockets).
