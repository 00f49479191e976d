//! The journal's recovery scan (appliance-core `journal::frame::scan`): commit framing,
//! record framing, torn-tail versus corruption, over bytes read back from a file after a
//! crash, a torn write or damage.
//!
//! Invariants: nothing panics; every record handed over decodes at its offset with the
//! strict framing check, offsets ascend and are 8-aligned, no commit header is handed
//! over; the end offsets lie inside the buffer; a clean end is followed only by zeros;
//! and recovery's repair is stable: truncating the journal where the scan ended (as
//! recovery does for a torn tail) and scanning again ends cleanly there with the same
//! records. A journal the crate wrote itself, undamaged, scans clean with exactly the
//! records written, each body decoding to the record it was encoded from.
#![no_main]

use appliance_core::journal::frame::{
    begin_commit, decode_record_at, encode_record, scan, seal_commit, ScanEnd, KIND_COMMIT,
    KIND_PADDING, RECORD_ALIGN_BYTES,
};
use appliance_core::journal::record::Record;
use fuzz_support::{mutate, record, Input};
use libfuzzer_sys::fuzz_target;

/// (offset, seq, kind, body) of each record a scan handed over.
type Seen = Vec<(usize, u64, u8, Vec<u8>)>;

fn run(buf: &[u8]) -> (Seen, ScanEnd) {
    let mut seen = Seen::new();
    let end = scan::<()>(buf, |r| {
        seen.push((r.offset, r.seq, r.kind, r.body.to_vec()));
        Ok(())
    })
    .expect("the callback never fails");
    (seen, end)
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    if inp.u8() & 1 == 0 {
        check(inp.rest());
        return;
    }
    // Structured: up to 4 writes, each a sealed commit (or, for old-format streams, bare
    // records), of up to 3 records, with consecutive sequence numbers.
    let block = if inp.bool() { 512 } else { 4096 };
    let mut buf = Vec::new();
    let mut written = Vec::new();
    let mut seq = 1 + u64::from(inp.u16());
    let framed = inp.u8() % 4 != 0;
    for _ in 0..inp.range(1, 4) {
        let start = buf.len();
        if framed {
            begin_commit(&mut buf);
        }
        let first = seq;
        for _ in 0..inp.range(1, 3) {
            let rec = record(&mut inp);
            let mut body = Vec::new();
            rec.encode_body(&mut body);
            encode_record(&mut buf, rec.kind() as u8, seq, &body);
            written.push((seq, rec));
            seq += 1;
        }
        if framed {
            seal_commit(&mut buf, start, block, first, seq - 1).expect("seals");
        }
    }
    let (seen, end) = run(&buf);
    assert_eq!(end, ScanEnd::Clean { end: buf.len() });
    let records: Vec<_> = seen.iter().filter(|s| s.2 != KIND_PADDING).collect();
    assert_eq!(records.len(), written.len());
    for ((_, seq, kind, body), (wseq, rec)) in records.iter().zip(&written) {
        assert_eq!(seq, wseq);
        assert_eq!(*kind, rec.kind() as u8);
        assert_eq!(&Record::decode(*kind, body).expect("own body decodes"), rec);
    }
    // Sometimes a zeroed preallocated tail, as the journal file has.
    if inp.bool() {
        buf.resize(buf.len() + block, 0);
    }
    mutate(&mut buf, &mut inp, 6);
    check(&buf);
});

fn check(buf: &[u8]) {
    let (seen, end) = run(buf);
    let mut last = None;
    for (offset, seq, kind, body) in &seen {
        assert_eq!(offset % RECORD_ALIGN_BYTES, 0);
        assert!(last.is_none_or(|l| l < *offset), "offsets ascend");
        last = Some(*offset);
        assert_ne!(*kind, KIND_COMMIT, "commit headers are framing");
        let (raw, _) = decode_record_at(buf, *offset).expect("handed-over records decode");
        assert_eq!((raw.seq, raw.kind, raw.body), (*seq, *kind, &body[..]));
        // Body decoding never panics, whatever the framing let through.
        let _ = Record::decode(*kind, body);
    }
    let stop = match end {
        ScanEnd::Clean { end } => {
            assert!(end <= buf.len());
            assert!(
                buf[end..].iter().all(|&b| b == 0),
                "only zeros after a clean end"
            );
            end
        }
        ScanEnd::TornTail { end, bytes, .. } => {
            // `bytes` counts from `end` to just past the last non-zero byte.
            assert!(bytes >= 1 && end + bytes <= buf.len());
            assert_ne!(buf[end + bytes - 1], 0);
            assert!(buf[end + bytes..].iter().all(|&b| b == 0));
            end
        }
        ScanEnd::Corrupt { offset, .. } => {
            assert!(offset < buf.len());
            return;
        }
    };
    assert!(seen.last().is_none_or(|s| s.0 < stop));
    // Recovery truncates at `stop`: the prefix must scan clean with the same records.
    let (again, end2) = run(&buf[..stop]);
    assert_eq!(end2, ScanEnd::Clean { end: stop });
    assert_eq!(again, seen, "a repaired journal replays the same records");
}
