//! The `issue` command.
