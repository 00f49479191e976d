//! Helpers shared by loadgen's integration tests.
#![allow(dead_code)]

use std::path::Path;

use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use loadgen::scenario::Scenario;

/// A quiet scenario with short defaults, pointed at `addr` trusting `ca`.
pub fn scenario(addr: std::net::SocketAddr, ca: &Path) -> Scenario {
    Scenario {
        server: addr.to_string(),
        server_name: "localhost".into(),
        ca: Some(ca.to_owned()),
        progress: false,
        duration_s: 1.0,
        warmup_s: 0.2,
        threads: 2,
        ..Scenario::default()
    }
}

pub fn runtime(threads: usize) -> tokio::runtime::Runtime {
    loadgen::runtime(threads, &loadgen::CpuPicker::new(&[])).unwrap()
}

/// Parses an .hlog back with HdrHistogram's own reader; returns (untagged interval count,
/// total samples in untagged intervals, total samples in tagged intervals).
pub fn read_hlog(path: &Path) -> (u64, u64, u64) {
    let bytes = std::fs::read(path).unwrap();
    let mut deserializer = Deserializer::new();
    let (mut intervals, mut untagged, mut tagged) = (0, 0, 0);
    let mut start_time = false;
    for entry in IntervalLogIterator::new(&bytes) {
        match entry.expect("hlog parses") {
            LogEntry::StartTime(_) => start_time = true,
            LogEntry::BaseTime(_) => {}
            LogEntry::Interval(interval) => {
                let decoded = base64_decode(interval.encoded_histogram());
                let h: hdrhistogram::Histogram<u64> = deserializer
                    .deserialize(&mut decoded.as_slice())
                    .expect("histogram decodes");
                if interval.tag().is_some() {
                    tagged += h.len();
                } else {
                    intervals += 1;
                    untagged += h.len();
                }
            }
        }
    }
    assert!(start_time, "StartTime header");
    (intervals, untagged, tagged)
}

/// Standard base64 (the .hlog encoding), without pulling in a crate for the tests.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        let n = chunk.len() * 6 / 8;
        for i in 0..n {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}
