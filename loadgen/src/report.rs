//! The run report: what was asked, what was achieved, latency percentiles overall and per
//! shard, errors by kind, the timeline; as text and as a JSON summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::collector::{Collected, IntervalPoint};
use crate::run::{Sent, Target};
use crate::scenario::{Mode, Objective, Scenario};

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// 50th percentile.
    pub p50_us: f64,
    /// 90th.
    pub p90_us: f64,
    /// 99th.
    pub p99_us: f64,
    /// 99.9th.
    pub p999_us: f64,
    /// 99.99th.
    pub p9999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Percentiles {
    /// From a histogram of ns values.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Percentiles {
            count: h.len(),
            mean_us: h.mean() / 1e3,
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            p9999_us: us(0.9999),
            max_us: h.max() as f64 / 1e3,
        }
    }
}

/// Whether a run met its objective, and why not.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// The objective applied.
    pub objective: Objective,
    /// All conditions held.
    pub met: bool,
    /// The conditions that failed, in words.
    pub failures: Vec<String>,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Short label (mode and rate).
    pub label: String,
    /// What latency means in this run.
    pub mode: Mode,
    /// [`Mode::label`].
    pub mode_description: String,
    /// Target rate, invoices/s (open loop).
    pub target_invoices_per_s: Option<f64>,
    /// Target rate, requests/s (open loop).
    pub target_requests_per_s: Option<f64>,
    /// Measured window, s.
    pub duration_s: f64,
    /// Warm-up, s.
    pub warmup_s: f64,
    /// Invoices per request.
    pub invoices_per_request: u32,
    /// Connections.
    pub connections: u32,
    /// Streams per connection.
    pub streams: u32,
    /// Shard-aware routing.
    pub shard_aware: bool,
    /// Shards of the appliance.
    pub shards: u16,
    /// Requests sent in the measured window.
    pub requests_sent: u64,
    /// Invoices sent in the measured window.
    pub invoices_sent: u64,
    /// Requests answered (or failed) in the measured window.
    pub requests_completed: u64,
    /// Invoices in those requests.
    pub invoices_completed: u64,
    /// Invoices issued correctly (fresh and red).
    pub invoices_issued: u64,
    /// Retries answered with the original invoice.
    pub invoices_replayed: u64,
    /// Completed invoices per second: from the start of the measured window to its last
    /// answer.
    pub achieved_invoices_per_s: f64,
    /// Completed requests per second, likewise.
    pub achieved_requests_per_s: f64,
    /// Correctly answered invoices per second.
    pub goodput_invoices_per_s: f64,
    /// Request latency over the measured window.
    pub latency: Percentiles,
    /// Request latency per home shard.
    pub latency_by_shard: Vec<Percentiles>,
    /// Open loop: how late loadgen itself sent (actual − intended); large values mean
    /// loadgen, not the appliance, was the bottleneck.
    pub send_lag: Percentiles,
    /// Errors in the measured window.
    pub errors_total: u64,
    /// Errors by kind (`code:`, `transport:`, `frame:`, `verify:`).
    pub errors: BTreeMap<String, u64>,
    /// Errors during warm-up (not in the figures above).
    pub warmup_errors_total: u64,
    /// Distinct invoice numbers seen so far in the run (warm-up included).
    pub distinct_numbers: u64,
    /// loadgen's own cost: CPU time of the whole process over the run (warm-up
    /// included), seconds.
    pub loadgen_cpu_s: f64,
    /// Wall time of the whole run, seconds.
    pub loadgen_wall_s: f64,
    /// CPU cores loadgen kept busy on average (cpu / wall).
    pub loadgen_cores: f64,
    /// loadgen CPU per request sent (generation, encoding, QUIC, verification,
    /// recording), µs.
    pub loadgen_cpu_us_per_request: f64,
    /// loadgen CPU per invoice sent, µs.
    pub loadgen_cpu_us_per_invoice: f64,
    /// Per-interval throughput and latency.
    pub timeline: Vec<IntervalPoint>,
    /// Objective verdict.
    pub verdict: Verdict,
}

impl RunReport {
    /// Builds the report of a finished run.
    pub fn new(
        scenario: &Scenario,
        target: &Target,
        rate: Option<f64>,
        c: &Collected,
        measure_start_ns: u64,
        sent: Sent,
    ) -> RunReport {
        let window_ns = c
            .last_done_ns
            .saturating_sub(measure_start_ns)
            .max((scenario.duration_s * 1e9) as u64)
            .max(1);
        let per_s = |n: u64| n as f64 * 1e9 / window_ns as f64;
        let label = match rate {
            Some(r) => format!(
                "open loop {r:.0} inv/s × {} inv/request",
                scenario.invoices_per_request
            ),
            None => format!(
                "closed loop {} workers × {} inv/request",
                scenario.connections * scenario.streams,
                scenario.invoices_per_request
            ),
        };
        let latency = Percentiles::of(&c.latency);
        let errors_total = c.tally.errors_total();
        let achieved = per_s(c.invoices);
        let verdict = verdict(&scenario.objective, rate, achieved, &latency, errors_total);
        RunReport {
            label,
            mode: scenario.mode,
            mode_description: scenario.mode.label().to_owned(),
            target_invoices_per_s: rate,
            target_requests_per_s: rate.map(|r| r / f64::from(scenario.invoices_per_request)),
            duration_s: scenario.duration_s,
            warmup_s: scenario.warmup_s,
            invoices_per_request: scenario.invoices_per_request,
            connections: scenario.connections,
            streams: scenario.streams,
            shard_aware: scenario.shard_aware,
            shards: target.shard_count,
            requests_sent: sent.requests,
            invoices_sent: sent.invoices,
            requests_completed: c.requests,
            invoices_completed: c.invoices,
            invoices_issued: c.tally.issued,
            invoices_replayed: c.tally.replayed,
            achieved_invoices_per_s: achieved,
            achieved_requests_per_s: per_s(c.requests),
            goodput_invoices_per_s: per_s(c.tally.issued + c.tally.replayed),
            latency,
            latency_by_shard: c.by_shard.iter().map(Percentiles::of).collect(),
            send_lag: Percentiles::of(&c.send_lag),
            errors_total,
            errors: c.tally.errors.clone(),
            warmup_errors_total: c.warmup_tally.errors_total(),
            distinct_numbers: c.verifier.numbers,
            loadgen_cpu_s: 0.0,
            loadgen_wall_s: 0.0,
            loadgen_cores: 0.0,
            loadgen_cpu_us_per_request: 0.0,
            loadgen_cpu_us_per_invoice: 0.0,
            timeline: c.timeline.clone(),
            verdict,
        }
    }

    /// Records loadgen's own CPU use over the run.
    pub fn set_cpu(&mut self, cpu_s: f64, wall_s: f64, sent: Sent) {
        self.loadgen_cpu_s = cpu_s;
        self.loadgen_wall_s = wall_s;
        self.loadgen_cores = cpu_s / wall_s.max(1e-9);
        self.loadgen_cpu_us_per_request = cpu_s * 1e6 / sent.requests_total.max(1) as f64;
        self.loadgen_cpu_us_per_invoice = cpu_s * 1e6 / sent.invoices_total.max(1) as f64;
    }

    /// Writes the JSON summary.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== {}", self.label);
        let _ = writeln!(s, "mode: {}", self.mode_description);
        let _ = writeln!(
            s,
            "shards {} ({}), connections {}, streams/connection {}, measured {:.1} s after {:.1} s warm-up",
            self.shards,
            if self.shard_aware { "shard-aware" } else { "shard-unaware" },
            self.connections,
            self.streams,
            self.duration_s,
            self.warmup_s
        );
        match self.target_invoices_per_s {
            Some(target) => {
                let _ = writeln!(
                    s,
                    "rate: target {:.0} inv/s ({:.0} req/s), achieved {:.0} inv/s ({:.1}%), goodput {:.0} inv/s",
                    target,
                    self.target_requests_per_s.unwrap_or(0.0),
                    self.achieved_invoices_per_s,
                    100.0 * self.achieved_invoices_per_s / target,
                    self.goodput_invoices_per_s
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "rate: achieved {:.0} inv/s ({:.0} req/s), goodput {:.0} inv/s",
                    self.achieved_invoices_per_s,
                    self.achieved_requests_per_s,
                    self.goodput_invoices_per_s
                );
            }
        }
        let _ = writeln!(
            s,
            "requests sent {} completed {}; invoices sent {} completed {} issued {} replayed {}; distinct numbers {}",
            self.requests_sent,
            self.requests_completed,
            self.invoices_sent,
            self.invoices_completed,
            self.invoices_issued,
            self.invoices_replayed,
            self.distinct_numbers
        );
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "latency ms", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        let row = |s: &mut String, name: &str, p: &Percentiles| {
            let _ = writeln!(
                s,
                "{:<10} {:>9} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                name,
                p.count,
                p.p50_us / 1e3,
                p.p90_us / 1e3,
                p.p99_us / 1e3,
                p.p999_us / 1e3,
                p.p9999_us / 1e3,
                p.max_us / 1e3
            );
        };
        row(&mut s, "all", &self.latency);
        if self.latency_by_shard.len() > 1 {
            for (i, p) in self.latency_by_shard.iter().enumerate() {
                row(&mut s, &format!("shard {i}"), p);
            }
        }
        if self.mode == Mode::Open {
            row(&mut s, "send lag", &self.send_lag);
            if self.send_lag.p99_us > 1_000.0 {
                let _ = writeln!(
                    s,
                    "WARNING: loadgen sent late (send lag p99 {:.3} ms): it may be the bottleneck; give it more cores (--threads, --cpus)",
                    self.send_lag.p99_us / 1e3
                );
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "errors: none");
        } else {
            let _ = writeln!(s, "errors: {}", self.errors_total);
            for (kind, n) in &self.errors {
                let _ = writeln!(s, "  {kind:<32} {n}");
            }
        }
        let _ = writeln!(
            s,
            "loadgen itself: {:.2} CPU s over {:.2} s ({:.2} cores), {:.2} µs CPU/request, {:.3} µs CPU/invoice",
            self.loadgen_cpu_s,
            self.loadgen_wall_s,
            self.loadgen_cores,
            self.loadgen_cpu_us_per_request,
            self.loadgen_cpu_us_per_invoice
        );
        if self.warmup_errors_total > 0 {
            let _ = writeln!(s, "warm-up errors: {}", self.warmup_errors_total);
        }
        let _ = writeln!(
            s,
            "objective (p99 ≤ {} ms, errors ≤ {}, achieved ≥ {:.0}% of target): {}",
            self.verdict.objective.p99_ms,
            self.verdict.objective.errors_max,
            100.0 * self.verdict.objective.achieved_min_ratio,
            if self.verdict.met {
                "MET".to_owned()
            } else {
                format!("MISSED ({})", self.verdict.failures.join("; "))
            }
        );
        s
    }
}

/// Judges a run against `objective`.
pub fn verdict(
    objective: &Objective,
    target: Option<f64>,
    achieved: f64,
    latency: &Percentiles,
    errors: u64,
) -> Verdict {
    let mut failures = Vec::new();
    if latency.p99_us / 1e3 > objective.p99_ms {
        failures.push(format!(
            "p99 {:.3} ms > {} ms",
            latency.p99_us / 1e3,
            objective.p99_ms
        ));
    }
    if errors > objective.errors_max {
        failures.push(format!("{errors} errors > {}", objective.errors_max));
    }
    if let Some(target) = target {
        if achieved < objective.achieved_min_ratio * target {
            failures.push(format!(
                "achieved {achieved:.0} inv/s < {:.0}% of {target:.0}",
                100.0 * objective.achieved_min_ratio
            ));
        }
    }
    if latency.count == 0 {
        failures.push("no request completed".into());
    }
    Verdict {
        objective: objective.clone(),
        met: failures.is_empty(),
        failures,
    }
}
