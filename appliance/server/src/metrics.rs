//! Per-shard, per-stage latency histograms (HDR, microseconds) and their report.
//!
//! Each shard owns one [`ShardMetrics`] and records into it without sharing; a snapshot
//! is a plain clone sent to whoever asks (the demo, and later the control port), so the
//! issuing path never touches another core's memory.

use hdrhistogram::Histogram;
use std::fmt::Write as _;

/// Highest latency the histograms track: larger values saturate at this bound (60 s).
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// Stages of one issue request on its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From arrival at the shard to the start of the tick that takes it.
    QueueWait,
    /// The tick's tax-code command to the tax server.
    TaxCode,
    /// The tick's journal write and fdatasync.
    JournalCommit,
    /// From arrival at the shard to its answer being released.
    Total,
}

impl Stage {
    /// Every stage, in report order.
    pub const ALL: [Stage; 4] = [
        Stage::QueueWait,
        Stage::TaxCode,
        Stage::JournalCommit,
        Stage::Total,
    ];

    /// Short name used in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Stage::QueueWait => "queue_wait",
            Stage::TaxCode => "tax_code",
            Stage::JournalCommit => "journal_commit",
            Stage::Total => "total",
        }
    }
}

/// Latency histograms and counters of one shard.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    /// Shard index.
    pub shard_id: u32,
    stages: [Histogram<u64>; 4],
    /// Invoices newly issued (journaled and answered).
    pub issued_invoices: u64,
    /// Requests answered with the invoice issued earlier for the same order.
    pub replayed_invoices: u64,
    /// Requests answered with an error.
    pub rejected_requests: u64,
    /// Ticks run (each is one tax-code command and one journal commit at most).
    pub ticks: u64,
    /// Invoices in the largest tick.
    pub tick_invoices_max: u64,
    /// Ticks with records made durable by the shard's committer.
    pub journal_ticks: u64,
    /// Journal writes (one O_DIRECT write and one fdatasync each) that made them durable:
    /// below `journal_ticks` when group commit carried several ticks per fdatasync.
    pub journal_writes: u64,
    /// Numbers spoiled at start-up because the tax server had coded them but the journal
    /// held no invoice for them (non-zero only after a crash mid-tick or a dropped
    /// damaged commit).
    pub spoiled_at_start: u64,
    /// Counters of the shard's QUIC endpoints.
    pub quic: QuicMetrics,
    /// Orders the shard's idempotency index holds now (gauge, read at each snapshot).
    pub index_entries: u64,
    /// Orders the index can hold: `limits.index_capacity_orders` as allocated (gauge).
    pub index_capacity: u64,
    /// New orders refused `IndexFull` since the shard started.
    pub index_full_refusals: u64,
}

/// Counters of one shard's QUIC endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuicMetrics {
    /// Connections accepted (handshake started).
    pub connections_accepted: u64,
    /// Connections closed because the client identity has no authorisation.
    pub unauthorised_connections: u64,
    /// Requests refused because the client may not issue for their seller.
    pub unauthorised_requests: u64,
    /// Streams answered with an error frame (malformed, too large, wrong version...).
    pub frames_refused: u64,
    /// Requests received here whose home is another shard, forwarded to it.
    pub forwarded_requests: u64,
}

impl QuicMetrics {
    fn merge(&mut self, other: &QuicMetrics) {
        self.connections_accepted += other.connections_accepted;
        self.unauthorised_connections += other.unauthorised_connections;
        self.unauthorised_requests += other.unauthorised_requests;
        self.frames_refused += other.frames_refused;
        self.forwarded_requests += other.forwarded_requests;
    }
}

fn new_histogram() -> Histogram<u64> {
    // 3 significant digits: 0.1% resolution is ample for latency percentiles.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

impl ShardMetrics {
    /// Empty metrics for shard `shard_id`.
    pub fn new(shard_id: u32) -> Self {
        ShardMetrics {
            shard_id,
            stages: [
                new_histogram(),
                new_histogram(),
                new_histogram(),
                new_histogram(),
            ],
            issued_invoices: 0,
            replayed_invoices: 0,
            rejected_requests: 0,
            ticks: 0,
            tick_invoices_max: 0,
            journal_ticks: 0,
            journal_writes: 0,
            spoiled_at_start: 0,
            quic: QuicMetrics::default(),
            index_entries: 0,
            index_capacity: 0,
            index_full_refusals: 0,
        }
    }

    /// Records `count` requests that spent `latency_us` in `stage`.
    pub fn record(&mut self, stage: Stage, latency_us: u64, count: u64) {
        if count > 0 {
            self.stages[stage as usize]
                .saturating_record_n(latency_us.clamp(1, LATENCY_US_MAX), count);
        }
    }

    /// The histogram of one stage.
    pub fn stage(&self, stage: Stage) -> &Histogram<u64> {
        &self.stages[stage as usize]
    }

    /// Adds another shard's figures into this one (for an all-shards line).
    pub fn merge(&mut self, other: &ShardMetrics) {
        for (mine, theirs) in self.stages.iter_mut().zip(other.stages.iter()) {
            // Same bounds on both sides, so addition cannot fail.
            mine.add(theirs).expect("histograms share bounds");
        }
        self.issued_invoices += other.issued_invoices;
        self.replayed_invoices += other.replayed_invoices;
        self.rejected_requests += other.rejected_requests;
        self.ticks += other.ticks;
        self.tick_invoices_max = self.tick_invoices_max.max(other.tick_invoices_max);
        self.journal_ticks += other.journal_ticks;
        self.journal_writes += other.journal_writes;
        self.spoiled_at_start += other.spoiled_at_start;
        self.quic.merge(&other.quic);
        self.index_entries += other.index_entries;
        self.index_capacity += other.index_capacity;
        self.index_full_refusals += other.index_full_refusals;
    }
}

/// Renders a per-shard latency table of one stage: p50, p99, p99.9 and max in µs.
pub fn latency_table(shards: &[ShardMetrics], stage: Stage) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "shard", "invoices", "ticks", "p50_us", "p99_us", "p99.9_us", "max_us"
    );
    let mut all = ShardMetrics::new(u32::MAX);
    for shard in shards {
        all.merge(shard);
        push_row(&mut out, &shard.shard_id.to_string(), shard, stage);
    }
    if shards.len() > 1 {
        push_row(&mut out, "all", &all, stage);
    }
    out
}

fn push_row(out: &mut String, label: &str, m: &ShardMetrics, stage: Stage) {
    let h = m.stage(stage);
    let _ = writeln!(
        out,
        "{:>6} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9}",
        label,
        m.issued_invoices + m.replayed_invoices,
        m.ticks,
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

/// A counter's name, help text and how to read it from a shard's metrics.
type Counter = (&'static str, &'static str, fn(&ShardMetrics) -> u64);

/// Renders every shard's metrics in the Prometheus text exposition format: per shard
/// and stage a latency summary (quantiles 0.5, 0.99, 0.999 and 1 = max, in
/// microseconds), and the counters.
pub fn prometheus_text(shards: &[ShardMetrics]) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP einvoice_stage_latency_us Latency of one request in a stage, microseconds.\n",
    );
    out.push_str("# TYPE einvoice_stage_latency_us summary\n");
    for m in shards {
        for stage in Stage::ALL {
            let h = m.stage(stage);
            for (q, v) in [
                ("0.5", h.value_at_quantile(0.5)),
                ("0.99", h.value_at_quantile(0.99)),
                ("0.999", h.value_at_quantile(0.999)),
                ("1", h.max()),
            ] {
                let _ = writeln!(
                    out,
                    "einvoice_stage_latency_us{{shard=\"{}\",stage=\"{}\",quantile=\"{q}\"}} {v}",
                    m.shard_id,
                    stage.name()
                );
            }
            let _ = writeln!(
                out,
                "einvoice_stage_latency_us_sum{{shard=\"{}\",stage=\"{}\"}} {}",
                m.shard_id,
                stage.name(),
                (h.mean() * h.len() as f64) as u64
            );
            let _ = writeln!(
                out,
                "einvoice_stage_latency_us_count{{shard=\"{}\",stage=\"{}\"}} {}",
                m.shard_id,
                stage.name(),
                h.len()
            );
        }
    }
    let counters: [Counter; 16] = [
        (
            "einvoice_issued_invoices_total",
            "Invoices newly issued.",
            |m| m.issued_invoices,
        ),
        (
            "einvoice_replayed_invoices_total",
            "Requests answered with an earlier invoice.",
            |m| m.replayed_invoices,
        ),
        (
            "einvoice_rejected_requests_total",
            "Requests answered with an error.",
            |m| m.rejected_requests,
        ),
        ("einvoice_ticks_total", "Ticks run.", |m| m.ticks),
        (
            "einvoice_tick_invoices_max",
            "Invoices in the largest tick.",
            |m| m.tick_invoices_max,
        ),
        (
            "einvoice_journal_ticks_total",
            "Ticks with records made durable in the journal.",
            |m| m.journal_ticks,
        ),
        (
            "einvoice_journal_writes_total",
            "Journal writes (one O_DIRECT write and one fdatasync each) that made them durable.",
            |m| m.journal_writes,
        ),
        (
            "einvoice_spoiled_at_start_total",
            "Numbers spoiled at start-up: coded by the tax server, absent from the journal.",
            |m| m.spoiled_at_start,
        ),
        (
            "einvoice_quic_connections_total",
            "QUIC connections accepted.",
            |m| m.quic.connections_accepted,
        ),
        (
            "einvoice_quic_unauthorised_connections_total",
            "Connections closed for an unauthorised client identity.",
            |m| m.quic.unauthorised_connections,
        ),
        (
            "einvoice_unauthorised_requests_total",
            "Requests refused: client not authorised for the seller.",
            |m| m.quic.unauthorised_requests,
        ),
        (
            "einvoice_frames_refused_total",
            "Streams answered with an error frame.",
            |m| m.quic.frames_refused,
        ),
        (
            "einvoice_forwarded_requests_total",
            "Requests forwarded to their home shard.",
            |m| m.quic.forwarded_requests,
        ),
        (
            "einvoice_index_entries",
            "Orders held by the idempotency index.",
            |m| m.index_entries,
        ),
        (
            "einvoice_index_capacity",
            "Orders the idempotency index can hold (limits.index_capacity_orders).",
            |m| m.index_capacity,
        ),
        (
            "einvoice_index_full_refusals_total",
            "New orders refused because the idempotency index was full.",
            |m| m.index_full_refusals,
        ),
    ];
    for (name, help, get) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in shards {
            let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", m.shard_id, get(m));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_counts_and_keeps_percentiles() {
        let mut a = ShardMetrics::new(0);
        let mut b = ShardMetrics::new(1);
        a.record(Stage::Total, 100, 99);
        b.record(Stage::Total, 10_000, 1);
        a.issued_invoices = 99;
        b.issued_invoices = 1;
        let mut all = ShardMetrics::new(9);
        all.merge(&a);
        all.merge(&b);
        assert_eq!(all.stage(Stage::Total).len(), 100);
        assert_eq!(all.issued_invoices, 100);
        assert!(all.stage(Stage::Total).value_at_quantile(0.5) < 200);
        assert!(all.stage(Stage::Total).max() >= 9_990);
        let table = latency_table(&[a, b], Stage::Total);
        assert_eq!(table.lines().count(), 4, "{table}");
    }

    #[test]
    fn journal_counters_are_served_and_merged() {
        let mut a = ShardMetrics::new(0);
        a.journal_ticks = 12;
        a.journal_writes = 3;
        let mut all = ShardMetrics::new(9);
        all.merge(&a);
        all.merge(&a);
        assert_eq!((all.journal_ticks, all.journal_writes), (24, 6));
        let text = prometheus_text(&[a]);
        assert!(text.contains("# TYPE einvoice_journal_writes_total counter"));
        assert!(text.contains("einvoice_journal_ticks_total{shard=\"0\"} 12\n"));
        assert!(text.contains("einvoice_journal_writes_total{shard=\"0\"} 3\n"));
    }

    #[test]
    fn index_gauges_are_served_per_shard() {
        let mut a = ShardMetrics::new(2);
        a.index_entries = 3_200_000;
        a.index_capacity = 4_000_000;
        a.index_full_refusals = 7;
        let text = prometheus_text(&[a]);
        assert!(text.contains("# TYPE einvoice_index_entries gauge\n"));
        assert!(text.contains("einvoice_index_entries{shard=\"2\"} 3200000\n"));
        assert!(text.contains("# TYPE einvoice_index_capacity gauge\n"));
        assert!(text.contains("einvoice_index_capacity{shard=\"2\"} 4000000\n"));
        assert!(text.contains("# TYPE einvoice_index_full_refusals_total counter\n"));
        assert!(text.contains("einvoice_index_full_refusals_total{shard=\"2\"} 7\n"));
    }

    #[test]
    fn out_of_range_latency_saturates() {
        let mut m = ShardMetrics::new(0);
        m.record(Stage::TaxCode, u64::MAX, 1);
        m.record(Stage::TaxCode, 0, 1);
        assert_eq!(m.stage(Stage::TaxCode).len(), 2);
    }
}
