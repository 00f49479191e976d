//! Journal records: framing (`frame`), the record kinds of the invoice life cycle
//! (`record`) and recovery of an issuer from the records (`replay`).

pub mod frame;
pub mod record;
pub mod replay;
