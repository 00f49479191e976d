//! Tax-server frame reassembly (`hsm_driver::proto::FrameDecoder`), shared by the TCP
//! client and the emulator: a byte stream delivered in arbitrary chunks, through both of
//! its inputs (`extend`, and `read_buf` + `commit` as a socket read uses them).
//!
//! Invariants: nothing panics; how the stream is chunked changes nothing: the frames and
//! errors that come out, in order, and the bytes left buffered, equal those of one
//! decoder given the whole stream at once; every frame delivered is what `decode_frame`
//! accepts for its bytes; a fatal error repeats on every later call.
#![no_main]

use fuzz_support::{mutate, Input};
use hsm_driver::proto::{
    decode_frame, encode_error, encode_request, FrameDecoder, FrameError, Holder, InventoryScope,
    Request, Status, FRAME_HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;
use zerocopy::IntoBytes;

/// What one `next_frame` call gave: a frame's bytes, or an error.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Frame(Vec<u8>),
    Error(FrameError),
}

/// Takes every frame available now. Returns true once a fatal error was seen.
fn drain(d: &mut FrameDecoder, events: &mut Vec<Event>) -> bool {
    loop {
        match d.next_frame() {
            Ok(None) => return false,
            Ok(Some(f)) => {
                let mut bytes = f.header.as_bytes().to_vec();
                bytes.extend_from_slice(f.body);
                let check = decode_frame(&bytes).expect("a delivered frame decodes alone");
                assert_eq!(check.header, f.header);
                events.push(Event::Frame(bytes));
            }
            Err(e) => {
                let fatal = e.fatal;
                events.push(Event::Error(e.clone()));
                if fatal {
                    assert_eq!(d.next_frame().err(), Some(e), "a fatal error sticks");
                    return true;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    // Chunk sizes come first so that the stream can be the rest of the input.
    let cuts: Vec<usize> = (0..16).map(|_| usize::from(inp.u8() % 64) + 1).collect();
    let stream = if mode & 1 == 0 {
        inp.rest().to_vec()
    } else {
        // Structured: a few valid frames (requests and error answers), then damage.
        let mut s = Vec::new();
        for cid in 0..u64::from(inp.range(1, 4)) {
            match inp.u8() % 4 {
                0 => encode_request(&mut s, cid, &Request::DeviceInfo).expect("encodes"),
                1 => {
                    let len = usize::from(inp.u8());
                    let nop = Request::Nop(inp.bytes(len).to_vec());
                    encode_request(&mut s, cid, &nop).expect("encodes")
                }
                2 => {
                    let scope = InventoryScope::Holder(Holder::new(1, inp.u32()));
                    encode_request(&mut s, cid, &Request::Inventory(scope)).expect("encodes")
                }
                _ => encode_error(&mut s, inp.u8(), cid, Status::Busy, "busy").expect("encodes"),
            }
        }
        mutate(&mut s, &mut inp, 4);
        s
    };

    // Reference: the whole stream at once.
    let mut whole = FrameDecoder::new();
    whole.extend(&stream);
    let mut expected = Vec::new();
    let fatal = drain(&mut whole, &mut expected);

    // The same stream in chunks, alternating the two ways bytes go in.
    let mut chunked = FrameDecoder::new();
    let mut events = Vec::new();
    let mut at = 0;
    let mut i = 0;
    let mut stopped = false;
    while at < stream.len() && !stopped {
        let n = cuts[i % cuts.len()].min(stream.len() - at);
        let piece = &stream[at..at + n];
        if i % 2 == 0 {
            chunked.extend(piece);
        } else {
            // Ask for more room than is used, as a socket read does.
            let room = chunked.read_buf(n + 7);
            assert!(room.len() >= n + 7);
            room[..n].copy_from_slice(piece);
            chunked.commit(n);
        }
        at += n;
        i += 1;
        stopped = drain(&mut chunked, &mut events);
    }
    assert_eq!(events, expected, "chunking changes nothing");
    assert_eq!(stopped, fatal);
    if !fatal {
        assert_eq!(chunked.buffered(), whole.buffered());
        let used: usize = expected
            .iter()
            .map(|e| match e {
                Event::Frame(b) => b.len(),
                Event::Error(e) => FRAME_HEADER_BYTES + e.header.body_len(),
            })
            .sum();
        assert_eq!(
            used + whole.buffered(),
            stream.len(),
            "every byte accounted for"
        );
    }
});
