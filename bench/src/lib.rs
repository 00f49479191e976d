//! Benchmarks live in `bench/benches/`; this crate has no library code.
