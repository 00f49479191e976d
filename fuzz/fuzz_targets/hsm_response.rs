//! Tax-server answers as the driver (TCP client, PCIe queue engine) decodes them:
//! `Response::decode_frame` for the command it sent, over a header it received.
//!
//! Invariants: nothing panics; an answer to command `op` is accepted only with the
//! response byte of `op` and a known status; an ok answer re-encodes to the same body
//! (`encode_response`); a device error re-encodes through `encode_error` to the same
//! status and message bytes.
#![no_main]

use fuzz_support::Input;
use hsm_driver::proto::{
    decode_frame, encode_error, encode_response, FrameHeader, Opcode, Response, Status,
    RESPONSE_FLAG,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let op = Opcode::ALL[usize::from(inp.u8()) % Opcode::ALL.len()];
    // Mostly the right response byte and a known status, so that bodies are reached.
    let opcode = match inp.u8() % 8 {
        0 => inp.u8(),
        _ => op.response_byte(),
    };
    let status = match inp.u8() % 4 {
        0 => inp.u16(),
        1 => Status::ALL[usize::from(inp.u8()) % Status::ALL.len()] as u16,
        _ => Status::Ok as u16,
    };
    let cid = inp.u64();
    let body = inp.rest();
    let header = FrameHeader::new(opcode, status, cid, body);
    let Ok(answer) = Response::decode_frame(op, &header, body) else {
        return;
    };
    assert_eq!(opcode, op.response_byte());
    assert_eq!(opcode & RESPONSE_FLAG, RESPONSE_FLAG);
    let mut frame = Vec::new();
    match answer {
        Ok(resp) => {
            assert_eq!(status, Status::Ok as u16);
            assert_eq!(resp.opcode(), op);
            encode_response(&mut frame, cid, &resp).expect("a decoded answer encodes");
        }
        Err(device) => {
            assert_eq!(device.status as u16, status);
            assert_ne!(device.status, Status::Ok);
            encode_error(
                &mut frame,
                op.request_byte(),
                cid,
                device.status,
                &device.message,
            )
            .expect("a decoded error encodes");
        }
    }
    let again = decode_frame(&frame).expect("own frame decodes");
    assert_eq!(
        again.header, header,
        "same header: opcode, status, id, length, CRC"
    );
    assert_eq!(again.body, body, "answers are exact");
});
