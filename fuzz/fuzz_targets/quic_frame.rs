//! The appliance's QUIC wire protocol, both directions: one stream's bytes through
//! `split_frame`, then the body by its kind (issue requests as the server reads them,
//! issue replies, error and hello replies as the client reads them).
//!
//! Invariants: nothing panics; whatever decodes re-encodes to the very bytes it came
//! from (each codec is exact), except reply messages longer than the encoder's cut,
//! which must come back cut.
#![no_main]

use appliance_proto::frame::{split_frame, FrameKind, HEADER_BYTES};
use appliance_proto::response::MESSAGE_BYTES_MAX;
use appliance_proto::{
    decode_error, decode_request, decode_results, encode_error_frame, encode_issue_frame,
    encode_request, encode_result, split_items, ErrorCode, HelloReply, ItemResult,
};
use fuzz_support::{mutate, request, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        check_frame(inp.rest());
    } else {
        // Structured: a valid issue frame of 1..=4 requests, then damage.
        let n = inp.range(1, 4) as usize;
        let requests: Vec<_> = (0..n).map(|_| request(&mut inp)).collect();
        let mut frame = Vec::new();
        encode_issue_frame(&mut frame, &requests);
        let (_, body) = split_frame(&frame).expect("own frame splits");
        let items = split_items(body, n as u32).expect("own items split");
        for (item, req) in items.iter().zip(&requests) {
            assert_eq!(&decode_request(item).expect("own item decodes"), req);
        }
        mutate(&mut frame, &mut inp, 4);
        check_frame(&frame);
    }
});

fn check_frame(frame: &[u8]) {
    let Ok((header, body)) = split_frame(frame) else {
        return;
    };
    assert_eq!(body.len(), header.body_bytes as usize);
    assert_eq!(&frame[..HEADER_BYTES], &header.encode());
    match header.kind {
        FrameKind::Issue => {
            let Ok(items) = split_items(body, header.count) else {
                return;
            };
            assert_eq!(items.len(), header.count as usize);
            let mut again = Vec::new();
            for item in &items {
                match decode_request(item) {
                    Ok(req) => {
                        let mut out = Vec::new();
                        encode_request(&mut out, &req);
                        assert_eq!(&out[4..], *item, "request re-encodes exactly");
                        again.extend_from_slice(&out);
                    }
                    Err(_) => {
                        again.extend_from_slice(&(item.len() as u32).to_le_bytes());
                        again.extend_from_slice(item);
                    }
                }
            }
            assert_eq!(again, body, "items tile the body");
        }
        FrameKind::IssueReply => {
            let Ok(results) = decode_results(body, header.count) else {
                return;
            };
            assert_eq!(results.len(), header.count as usize);
            let mut out = Vec::new();
            for r in &results {
                encode_result(&mut out, r);
            }
            let long = results.iter().any(
                |r| matches!(r, ItemResult::Failed { message, .. } if message.len() > MESSAGE_BYTES_MAX),
            );
            if long {
                // The encoder cuts messages; what it writes decodes to the cut ones.
                let cut = decode_results(&out, header.count).expect("encoder output decodes");
                for (c, r) in cut.iter().zip(&results) {
                    match (c, r) {
                        (
                            ItemResult::Failed {
                                code: a,
                                message: m,
                            },
                            ItemResult::Failed {
                                code: b,
                                message: full,
                            },
                        ) => {
                            assert_eq!(a, b);
                            assert!(full.starts_with(m.as_str()));
                            assert!(m.len() <= MESSAGE_BYTES_MAX);
                        }
                        _ => assert_eq!(c, r),
                    }
                }
            } else {
                assert_eq!(out, body, "results re-encode exactly");
            }
        }
        FrameKind::Error => {
            let Ok((code, message)) = decode_error(body) else {
                return;
            };
            assert!(ErrorCode::ALL.contains(&code));
            let mut out = Vec::new();
            encode_error_frame(&mut out, code, &message);
            let (_, again) = split_frame(&out).expect("own error frame splits");
            let (code2, message2) = decode_error(again).expect("own error body decodes");
            assert_eq!(code2, code);
            if message.len() <= MESSAGE_BYTES_MAX {
                assert_eq!(again, body, "error body re-encodes exactly");
                assert_eq!(message2, message);
            } else {
                assert!(message.starts_with(message2.as_str()));
            }
        }
        FrameKind::HelloReply => {
            let Ok(hello) = HelloReply::decode(body) else {
                return;
            };
            let mut out = Vec::new();
            hello.encode_frame(&mut out);
            assert_eq!(&out[HEADER_BYTES..], body, "hello re-encodes exactly");
        }
        FrameKind::Hello => {}
    }
}
