//! What to run: a [`Scenario`] from a TOML file, overridden by command-line flags.
//!
//! Every field has a default (see [`Scenario::default`] and loadgen/README.md), so a
//! scenario file names only what differs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How requests are paced and how latency is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Constant rate: every request has an intended send time fixed in advance; latency is
    /// measured from that time, so a stalled server shows as latency (coordinated
    /// omission corrected, as wrk2).
    Open,
    /// A fixed number of workers, each sending its next request when the previous one was
    /// answered; latency from the actual send. Hides stalls (coordinated omission).
    Closed,
}

impl Mode {
    /// The label printed in every report.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Open => "open loop: constant rate, latency from the intended send time (coordinated omission corrected)",
            Mode::Closed => "closed loop: latency from the actual send time (UNCORRECTED: a stalled server sends fewer requests, so stalls are hidden)",
        }
    }
}

/// Where the open loop's scheduler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Its own thread, sleeping to each intended time (µs precision), handing every
    /// request to the runtime's thread (a wake-up and a context switch per request when
    /// that thread is idle).
    Thread,
    /// A task on the tokio runtime, the default: it sleeps on a timerfd (µs precision)
    /// but at most once per 250 µs, so at high rates requests due within 250 µs go out
    /// together, up to 250 µs late (counted); no thread hand-off per request, the
    /// cheapest at high request rates.
    Runtime,
}

/// The invoice mix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mix {
    /// Fewest line items per invoice (≥ 1).
    pub lines_min: u32,
    /// Most line items per invoice (≤ 16).
    pub lines_max: u32,
    /// Lowest unit price of a line, in fen (> 0).
    pub price_min_fen: i64,
    /// Highest unit price of a line, in fen.
    pub price_max_fen: i64,
    /// Tax rate in basis points (legal: 0, 100, 300, 500, 600, 900, 1300).
    pub tax_rate_bp: u16,
    /// Share of invoices that are red invoices offsetting an invoice issued earlier in
    /// the run (0..=1). Each original is offset at most once, in full.
    pub red_share: f64,
    /// Share of invoices that resend an earlier order unchanged (0..=1); the appliance
    /// must answer `Replayed` with the invoice it issued the first time.
    pub retry_share: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            lines_min: 1,
            lines_max: 1,
            price_min_fen: 5_000,
            price_max_fen: 155_000,
            tax_rate_bp: 900,
            red_share: 0.0,
            retry_share: 0.0,
        }
    }
}

/// The service-level objective a run is judged by (and a sweep searches the edge of).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Objective {
    /// p99 request latency bound, milliseconds.
    pub p99_ms: f64,
    /// Most errors tolerated (refusals, transport failures, verification mismatches).
    pub errors_max: u64,
    /// Achieved rate must be at least this share of the target rate (open loop).
    pub achieved_min_ratio: f64,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            p99_ms: 50.0,
            errors_max: 0,
            achieved_min_ratio: 0.95,
        }
    }
}

/// Sweep steps: target rates `start, start + step, ...` up to `max`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sweep {
    /// First target rate, invoices/s.
    pub start_rate: f64,
    /// Increment per step, invoices/s.
    pub step_rate: f64,
    /// Highest rate tried, invoices/s.
    pub max_rate: f64,
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep {
            start_rate: 10_000.0,
            step_rate: 10_000.0,
            max_rate: 1_000_000.0,
        }
    }
}

/// Everything one run (or one sweep) needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// The appliance's service address.
    pub server: String,
    /// Name checked against the server certificate.
    pub server_name: String,
    /// CA certificate (PEM) trusted for the server.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
    /// Open or closed loop.
    pub mode: Mode,
    /// Target rate in invoices per second (open loop). Requests per second = rate /
    /// invoices_per_request.
    pub rate: f64,
    /// Measured duration, seconds.
    pub duration_s: f64,
    /// Warm-up before the measured window, seconds (sent and verified, not recorded).
    pub warmup_s: f64,
    /// QUIC connections (each shard-aware connection set counts as one).
    pub connections: u32,
    /// Concurrent streams per connection (closed loop: workers per connection).
    pub streams: u32,
    /// Invoices per request: 1 per-invoice, up to the protocol maximum (4,096) in bulk.
    pub invoices_per_request: u32,
    /// Send each order to its home shard's port.
    pub shard_aware: bool,
    /// Seller taxpayers (the synthetic railway bureaus 0..sellers).
    pub sellers: u32,
    /// The invoice mix.
    pub mix: Mix,
    /// Tokio worker threads.
    pub threads: usize,
    /// CPUs to pin loadgen's threads to (round robin); empty = no pinning.
    pub cpus: Vec<usize>,
    /// Open loop: where the scheduler runs.
    pub scheduler: Scheduler,
    /// Open loop: most requests in flight; beyond it the scheduler waits (and the wait
    /// counts as latency, since latency is from the intended time).
    pub in_flight_max: u32,
    /// Open loop: most invoices in flight (in whole requests, never fewer than the
    /// streams loadgen can use at once); beyond it the scheduler waits, as for
    /// `in_flight_max`. Bounds the memory of requests queued behind a slow server:
    /// 65,536 bulk frames of 1,000 invoices would be 13 GB, and growing memory is paid
    /// in page faults.
    pub in_flight_invoices_max: u32,
    /// Longest wait for one reply, milliseconds (then a `Timeout` error).
    pub timeout_ms: u64,
    /// Order id prefix; default: `LG` + the run's start time, unique per run.
    pub order_prefix: Option<String>,
    /// Interval of the .hlog and of the timeline, milliseconds.
    pub interval_ms: u64,
    /// Where reports go (summary.json, latency.hlog, *.svg); none: text report only.
    pub out_dir: Option<PathBuf>,
    /// Live progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Seed of the mix's random choices.
    pub seed: u64,
    /// The objective.
    pub objective: Objective,
    /// Sweep steps.
    pub sweep: Sweep,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            server: "127.0.0.1:4433".into(),
            server_name: "localhost".into(),
            ca: None,
            cert: None,
            key: None,
            mode: Mode::Open,
            rate: 10_000.0,
            duration_s: 10.0,
            warmup_s: 2.0,
            connections: 1,
            streams: 256,
            invoices_per_request: 1,
            shard_aware: true,
            sellers: 4,
            mix: Mix::default(),
            threads: 1,
            cpus: Vec::new(),
            scheduler: Scheduler::Runtime,
            in_flight_max: 65_536,
            in_flight_invoices_max: 262_144,
            timeout_ms: 30_000,
            order_prefix: None,
            interval_ms: 1_000,
            out_dir: None,
            progress: true,
            seed: 1,
            objective: Objective::default(),
            sweep: Sweep::default(),
        }
    }
}

/// Why a scenario cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The file is not a valid scenario.
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    /// A value out of range.
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

impl Scenario {
    /// Reads a TOML scenario file.
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| ScenarioError::Parse(path.into(), e))
    }

    /// Checks ranges; every limit here is one the appliance or loadgen would otherwise
    /// trip over mid-run.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(m));
        if !(self.rate.is_finite() && self.rate > 0.0) && self.mode == Mode::Open {
            return bad(format!("rate must be > 0, got {}", self.rate));
        }
        if !(self.duration_s > 0.0 && self.duration_s.is_finite()) {
            return bad("duration_s must be > 0".into());
        }
        if !(self.warmup_s >= 0.0 && self.warmup_s.is_finite()) {
            return bad("warmup_s must be ≥ 0".into());
        }
        if self.connections == 0 || self.streams == 0 || self.threads == 0 {
            return bad("connections, streams and threads must be ≥ 1".into());
        }
        if self.invoices_per_request == 0
            || self.invoices_per_request > appliance_proto::BATCH_REQUESTS_MAX
        {
            return bad(format!(
                "invoices_per_request must be 1..={}",
                appliance_proto::BATCH_REQUESTS_MAX
            ));
        }
        if self.sellers == 0 {
            return bad("sellers must be ≥ 1".into());
        }
        let m = &self.mix;
        if m.lines_min == 0 || m.lines_max < m.lines_min || m.lines_max > 16 {
            return bad("mix: 1 ≤ lines_min ≤ lines_max ≤ 16".into());
        }
        if m.price_min_fen <= 0 || m.price_max_fen < m.price_min_fen {
            return bad("mix: 0 < price_min_fen ≤ price_max_fen".into());
        }
        if appliance_core::TaxRate::from_bp(m.tax_rate_bp).is_err() {
            return bad(format!("mix: illegal tax rate {} bp", m.tax_rate_bp));
        }
        let share = |s: f64| (0.0..=1.0).contains(&s);
        if !share(m.red_share) || !share(m.retry_share) || m.red_share + m.retry_share > 1.0 {
            return bad("mix: red_share and retry_share in 0..=1, sum ≤ 1".into());
        }
        if self.interval_ms == 0
            || self.in_flight_max == 0
            || self.in_flight_invoices_max == 0
            || self.timeout_ms == 0
        {
            return bad(
                "interval_ms, in_flight_max, in_flight_invoices_max and timeout_ms must be ≥ 1"
                    .into(),
            );
        }
        if let Some(prefix) = &self.order_prefix {
            // Order ids are prefix + 'R'? + 12 digits, at most 64 bytes.
            if prefix.is_empty() || prefix.len() > 40 {
                return bad("order_prefix must be 1..=40 bytes".into());
            }
        }
        let s = &self.sweep;
        if !(s.start_rate > 0.0 && s.step_rate > 0.0 && s.max_rate >= s.start_rate) {
            return bad("sweep: start_rate > 0, step_rate > 0, max_rate ≥ start_rate".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_toml_round_trips() {
        let s = Scenario::default();
        s.validate().unwrap();
        let text = toml::to_string(&s).unwrap();
        let back: Scenario = toml::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn partial_file_and_bad_values() {
        let s: Scenario = toml::from_str(
            "rate = 500.0\nmode = \"closed\"\n[mix]\nretry_share = 0.1\n[objective]\np99_ms = 5.0\n",
        )
        .unwrap();
        assert_eq!(s.mode, Mode::Closed);
        assert_eq!(s.mix.retry_share, 0.1);
        assert_eq!(s.mix.lines_max, 1);
        s.validate().unwrap();
        assert!(toml::from_str::<Scenario>("bogus = 1").is_err());
        let bad = Scenario {
            invoices_per_request: 5000,
            ..Scenario::default()
        };
        assert!(bad.validate().is_err());
        let mut bad = Scenario::default();
        bad.mix.red_share = 0.7;
        bad.mix.retry_share = 0.7;
        assert!(bad.validate().is_err());
    }
}
