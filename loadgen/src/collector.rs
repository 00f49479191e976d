//! The collector thread: receives every completed exchange over a crossbeam channel,
//! verifies it, records latency into HDR histograms (overall, per shard, per interval),
//! streams the interval histograms to an .hlog file, keeps the timeline and drives the
//! progress bar. It owns all of that state, so nothing on the sending path takes a lock.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use appliance_client::ClientError;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::gen::{Feedback, Slot};
use crate::scenario::Mode;
use crate::verify::{client_error_kind, Tally, Verifier};
use crate::Clock;

/// Largest latency recorded: one hour in ns (larger values are clamped to it).
pub const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

/// How long the collector sleeps when its channel is empty.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A new latency histogram: ns, 1 ns .. 1 h, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid bounds")
}

/// One exchange, as the sender saw it.
#[derive(Debug)]
pub struct Completion {
    /// When the request was meant to be sent (open loop) or was sent (closed loop), ns
    /// since the run's clock base.
    pub intended_ns: u64,
    /// When the sending task actually started it.
    pub sent_ns: u64,
    /// When the reply had arrived in full.
    pub done_ns: u64,
    /// Home shard of its requests.
    pub shard: u16,
    /// Inside the measured window (not warm-up).
    pub measured: bool,
    /// What each request expects.
    pub slots: Vec<Slot>,
    /// The reply frame, or why there was none.
    pub reply: Result<Vec<u8>, ClientError>,
}

/// One point of the timeline (one interval).
#[derive(Debug, Clone, Serialize)]
pub struct IntervalPoint {
    /// End of the interval, seconds since the start of the measured window.
    pub t_s: f64,
    /// Invoices answered in the interval, per second.
    pub invoices_per_s: f64,
    /// Requests answered in the interval, per second.
    pub requests_per_s: f64,
    /// Median request latency in the interval, µs (0 when nothing completed).
    pub p50_us: f64,
    /// p99 request latency in the interval, µs.
    pub p99_us: f64,
    /// Largest request latency in the interval, µs.
    pub max_us: f64,
    /// Errors in the interval.
    pub errors: u64,
}

/// How the collector is set up for one run.
pub struct CollectorConfig {
    /// Open or closed loop (which start time latency counts from).
    pub mode: Mode,
    /// Shards (per-shard histograms).
    pub shard_count: u16,
    /// Interval length, ns.
    pub interval_ns: u64,
    /// Start of the measured window on the run's clock, ns.
    pub measure_start_ns: u64,
    /// Measured window length, ns (for the progress bar).
    pub duration_ns: u64,
    /// Wall-clock time of the measured window's start (the .hlog StartTime).
    pub wall_start: SystemTime,
    /// Where to write the interval log.
    pub hlog: Option<PathBuf>,
    /// Live view.
    pub progress: Option<indicatif::ProgressBar>,
    /// Where issued fresh orders go (retry and red pools).
    pub feedback: Option<Sender<Feedback>>,
    /// The run's clock.
    pub clock: Clock,
}

/// What the collector hands back after the last completion.
pub struct Collected {
    /// Request latency over the measured window, ns.
    pub latency: Histogram<u64>,
    /// The same per home shard.
    pub by_shard: Vec<Histogram<u64>>,
    /// Open loop: actual send − intended send (loadgen's own lateness), ns.
    pub send_lag: Histogram<u64>,
    /// Outcomes in the measured window.
    pub tally: Tally,
    /// Outcomes during warm-up.
    pub warmup_tally: Tally,
    /// Requests completed in the measured window.
    pub requests: u64,
    /// Invoices in those requests.
    pub invoices: u64,
    /// Last completion of a measured request, ns on the run's clock.
    pub last_done_ns: u64,
    /// Per-interval throughput and latency.
    pub timeline: Vec<IntervalPoint>,
    /// The verifier (its number set carries over to the next sweep step).
    pub verifier: Verifier,
    /// Intervals written to the .hlog (untagged, i.e. overall).
    pub hlog_intervals: u64,
}

struct Interval {
    index: u64,
    overall: Histogram<u64>,
    by_shard: Vec<Histogram<u64>>,
    invoices: u64,
    errors: u64,
}

type HlogWriter<'a, 'b> = hdrhistogram::serialization::interval_log::IntervalLogWriter<
    'a,
    'b,
    BufWriter<File>,
    V2DeflateSerializer,
>;

/// Writes the .hlog header the way HdrHistogram's Java `HistogramLogWriter` does, so its
/// `HistogramLogProcessor` and the Rust `IntervalLogIterator` both read the file.
fn hlog_header(out: &mut impl Write, wall_start: SystemTime, comment: &str) -> std::io::Result<()> {
    let start = wall_start
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    writeln!(out, "#[{comment}]")?;
    writeln!(out, "#[Histogram log format version 1.3]")?;
    writeln!(out, "#[StartTime: {start:.3} (seconds since epoch)]")?;
    writeln!(
        out,
        "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\""
    )
}

/// Runs the collector until every sender of `rx` is gone.
pub fn collect(
    config: CollectorConfig,
    rx: Receiver<Completion>,
    verifier: Verifier,
) -> std::io::Result<Collected> {
    let shards = usize::from(config.shard_count);
    let mut out = Collected {
        latency: histogram(),
        by_shard: (0..shards).map(|_| histogram()).collect(),
        send_lag: histogram(),
        tally: Tally::default(),
        warmup_tally: Tally::default(),
        requests: 0,
        invoices: 0,
        last_done_ns: config.measure_start_ns,
        timeline: Vec::new(),
        verifier,
        hlog_intervals: 0,
    };
    let mut interval = Interval {
        index: 0,
        overall: histogram(),
        by_shard: (0..shards).map(|_| histogram()).collect(),
        invoices: 0,
        errors: 0,
    };
    let mut file: Option<BufWriter<File>> = None;
    let mut serializer = V2DeflateSerializer::new();
    let mut hlog: Option<HlogWriter> = match &config.hlog {
        Some(path) => {
            let file = file.insert(BufWriter::new(File::create(path)?));
            hlog_header(
                file,
                config.wall_start,
                "loadgen request latency, ns; untagged = all shards, Tag=shardN per home shard",
            )?;
            Some(
                IntervalLogWriterBuilder::new()
                    // Interval_Max in ms, as the Java tools write it for ns histograms.
                    .with_max_value_divisor(1e6)
                    .begin_log_with(file, &mut serializer)?,
            )
        }
        None => None,
    };
    let shard_tags: Vec<String> = (0..shards).map(|i| format!("shard{i}")).collect();
    let flush = |interval: &mut Interval,
                 end_ns: u64,
                 out: &mut Collected,
                 hlog: &mut Option<HlogWriter>|
     -> std::io::Result<()> {
        let start_ns = interval.index * config.interval_ns;
        let length_ns = end_ns
            .saturating_sub(config.measure_start_ns)
            .saturating_sub(start_ns)
            .clamp(1, config.interval_ns);
        let seconds = length_ns as f64 / 1e9;
        if let Some(log) = hlog.as_mut() {
            let at = Duration::from_nanos(start_ns);
            let length = Duration::from_nanos(length_ns);
            let io = |e| std::io::Error::other(format!("hlog: {e}"));
            log.write_histogram(&interval.overall, at, length, None)
                .map_err(io)?;
            if shards > 1 {
                for (h, tag) in interval.by_shard.iter().zip(&shard_tags) {
                    log.write_histogram(h, at, length, Tag::new(tag))
                        .map_err(io)?;
                }
            }
            out.hlog_intervals += 1;
        }
        let h = &interval.overall;
        let us = |v: u64| v as f64 / 1e3;
        let point = IntervalPoint {
            t_s: (start_ns + length_ns) as f64 / 1e9,
            invoices_per_s: interval.invoices as f64 / seconds,
            requests_per_s: h.len() as f64 / seconds,
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            errors: interval.errors,
        };
        if let Some(pb) = &config.progress {
            pb.set_position(
                ((start_ns + length_ns) / 1_000_000).min(config.duration_ns / 1_000_000),
            );
            pb.set_message(format!(
                "{:>9.0} inv/s  p99 {:>9.3} ms  max {:>9.3} ms  errors {}",
                point.invoices_per_s,
                point.p99_us / 1e3,
                point.max_us / 1e3,
                out.tally.errors_total()
            ));
        }
        out.timeline.push(point);
        interval.overall.reset();
        for h in &mut interval.by_shard {
            h.reset();
        }
        interval.invoices = 0;
        interval.errors = 0;
        interval.index += 1;
        Ok(())
    };
    let mut any_measured = false;
    loop {
        let completion = match rx.try_recv() {
            Ok(c) => c,
            Err(TryRecvError::Empty) => {
                // Poll rather than block: a receiver parked on the channel makes every
                // send a futex wake-up and a context switch on loadgen's own core(s).
                // Timestamps were taken by the senders, so the delay costs nothing.
                std::thread::sleep(POLL_INTERVAL);
                // Flush intervals that ended with nothing completing (a stalled server
                // shows as empty intervals, live).
                let now = config.clock.now_ns();
                while any_measured
                    && now >= config.measure_start_ns + (interval.index + 1) * config.interval_ns
                {
                    let end = config.measure_start_ns + (interval.index + 1) * config.interval_ns;
                    flush(&mut interval, end, &mut out, &mut hlog)?;
                }
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
        };
        let Completion {
            intended_ns,
            sent_ns,
            done_ns,
            shard,
            measured,
            slots,
            reply,
        } = completion;
        let tally = if measured {
            &mut out.tally
        } else {
            &mut out.warmup_tally
        };
        let errors_before = tally.errors_total();
        match &reply {
            Ok(bytes) => {
                let feedback = &config.feedback;
                out.verifier.check_reply(bytes, &slots, tally, |n, issued| {
                    if let Some(tx) = feedback {
                        // The pools are bounded; a full channel only means fewer
                        // candidates for retries.
                        let _ = tx.try_send((n, issued));
                    }
                });
            }
            Err(e) => Verifier::transport_error(&client_error_kind(e), slots.len(), tally),
        }
        let errors = tally.errors_total() - errors_before;
        if !measured {
            continue;
        }
        any_measured = true;
        let start = match config.mode {
            Mode::Open => intended_ns,
            Mode::Closed => sent_ns,
        };
        let latency = done_ns.saturating_sub(start).clamp(1, LATENCY_NS_MAX);
        let lag = sent_ns.saturating_sub(intended_ns).clamp(1, LATENCY_NS_MAX);
        out.latency.saturating_record(latency);
        out.send_lag.saturating_record(lag);
        if let Some(h) = out.by_shard.get_mut(usize::from(shard)) {
            h.saturating_record(latency);
        }
        out.requests += 1;
        out.invoices += slots.len() as u64;
        out.last_done_ns = out.last_done_ns.max(done_ns);
        let index = done_ns.saturating_sub(config.measure_start_ns) / config.interval_ns;
        while index > interval.index {
            let end = config.measure_start_ns + (interval.index + 1) * config.interval_ns;
            flush(&mut interval, end, &mut out, &mut hlog)?;
        }
        interval.overall.saturating_record(latency);
        if let Some(h) = interval.by_shard.get_mut(usize::from(shard)) {
            h.saturating_record(latency);
        }
        interval.invoices += slots.len() as u64;
        interval.errors += errors;
    }
    if any_measured && (!interval.overall.is_empty() || interval.errors > 0) {
        let end = out.last_done_ns;
        flush(&mut interval, end, &mut out, &mut hlog)?;
    }
    drop(hlog);
    if let Some(file) = file.as_mut() {
        file.flush()?;
    }
    Ok(out)
}
