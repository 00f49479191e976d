//! The appliance's wire protocol over QUIC (docs/protocol.md), shared by the server, the
//! client library and loadgen. Pure codecs: no I/O.
//!
//! One bidirectional stream = one exchange: the client writes one frame and finishes its
//! side, the server answers one frame and finishes. Frames: a 16-byte header
//! ([`frame`]), then a body: issue requests ([`request`]), results or an error
//! ([`response`]), or the hello exchange ([`hello`]). [`routing`] says which shard is an
//! order's home.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod frame;
pub mod hello;
pub mod request;
pub mod response;
pub mod routing;

pub use frame::{
    split_frame, FrameKind, Header, HeaderError, ALPN, BATCH_REQUESTS_MAX, FRAME_BYTES_MAX,
    HEADER_BYTES, STREAMS_PER_CONNECTION_MAX, VERSION,
};
pub use hello::{encode_hello_frame, HelloError, HelloReply};
pub use request::{
    decode_request, encode_issue_frame, encode_request, split_items, BodyError, ItemDecodeError,
};
pub use response::{
    decode_error, decode_results, encode_error_frame, encode_result, ErrorCode, Issued, ItemResult,
    ReplyError,
};
pub use routing::home_shard;
