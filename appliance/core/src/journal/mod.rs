//! Journal records: framing (`frame`) and, on top of it, the record kinds of the invoice
//! life cycle.

pub mod frame;
