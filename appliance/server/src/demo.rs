//! The bulk demo (`appliance demo`, what `cargo run --release` runs): starts the
//! tax-server emulator as a separate child process, starts one shard per core on a
//! throw-away data dir, issues synthetic railway invoices in bulk through the in-process
//! API, verifies every answer, and prints throughput and per-shard latency.
//!
//! Verification: every invoice number is unique across the run; every check code derives
//! from its tax code; a sample of invoices is uploaded to the tax server, which accepts
//! them only if their tax codes verify under the device key; the same sample re-sent
//! comes back identical (idempotent replay) and issues nothing new.

use crate::child::ListeningChild;
use crate::journal::JournalConfig;
use crate::metrics::{latency_table, ShardMetrics, Stage};
use crate::shard::{IssueResult, ShardConfig, ShardHandle};
use crate::workload::{invoice_code, seller, ticket_request};
use appliance_core::idempotency::INDEX_CAPACITY_MIN;
use appliance_core::issuer::RETENTION_MS_DEFAULT;
use appliance_core::{canonical, Invoice, IssueRequest, IssuerConfig, TaxpayerConfig};
use appliance_proto::home_shard;
use hsm_driver::proto::{Request, Response, UploadBatch, UploadStatus};
use hsm_driver::tcp::{blocking, TcpClientConfig};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Settings of one demo run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Invoices to issue.
    pub invoices: u64,
    /// Shards (one executor each).
    pub shards: u32,
    /// Pin shard `i` to CPU `i mod cpus`.
    pub pin: bool,
    /// Requests per batch handed to a shard.
    pub batch_requests: usize,
    /// Batches in flight per shard.
    pub window_batches: usize,
    /// Seller taxpayers the invoices are spread over.
    pub sellers: u32,
    /// Invoices uploaded and re-sent for verification.
    pub sample_invoices: usize,
    /// Data directory; a fresh one under /var/tmp when `None`.
    pub data_dir: Option<PathBuf>,
    /// Keep the data directory afterwards.
    pub keep_data: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            invoices: 1_000_000,
            shards: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            pin: true,
            batch_requests: 1_000,
            window_batches: 4,
            sellers: 4,
            sample_invoices: 1_000,
            data_dir: None,
            keep_data: false,
        }
    }
}

/// What went wrong in a demo run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Setting up (directories, emulator, shards) failed.
    #[error("setup: {0}")]
    Setup(String),
    /// An answer failed verification.
    #[error("verification failed: {0}")]
    Verify(String),
}

/// Figures of a finished demo run.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Invoices issued.
    pub invoices: u64,
    /// Wall time of the bulk phase.
    pub elapsed: Duration,
    /// Per-shard metrics at the end of the bulk phase.
    pub shards: Vec<ShardMetrics>,
}

impl DemoReport {
    /// Invoices per second over the bulk phase.
    pub fn invoices_per_s(&self) -> f64 {
        self.invoices as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

/// Runs the demo and prints its report to stdout.
pub fn run(options: &DemoOptions) -> Result<DemoReport, DemoError> {
    if options.shards == 0
        || options.sellers == 0
        || options.batch_requests == 0
        || options.window_batches == 0
    {
        return Err(setup(
            "shards, sellers, batch and window must be at least 1",
        ));
    }
    let data_dir = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => PathBuf::from(format!("/var/tmp/einvoice-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&data_dir).map_err(setup)?;
    let result = run_in(options, &data_dir);
    if !options.keep_data {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn run_in(options: &DemoOptions, data_dir: &std::path::Path) -> Result<DemoReport, DemoError> {
    let sellers: Vec<_> = (0..options.sellers).map(seller).collect();
    println!(
        "demo: {} invoices, {} shards, {} sellers, batches of {} ({} in flight per shard), data in {}",
        options.invoices,
        options.shards,
        options.sellers,
        options.batch_requests,
        options.window_batches,
        data_dir.display()
    );

    // The tax server: a separate process, this same binary's `hsm-emu` subcommand.
    let exe = std::env::current_exe().map_err(setup)?;
    let mut command = Command::new(exe);
    command
        .arg("hsm-emu")
        .arg("--data-dir")
        .arg(data_dir.join("hsm"))
        .args(["--listen", "127.0.0.1:0"]);
    for (i, s) in sellers.iter().enumerate() {
        command
            .arg("--taxpayer")
            .arg(format!("{}:{}:1:99999999", s, invoice_code(i as u32)));
    }
    let emulator = ListeningChild::spawn(command, Duration::from_secs(60)).map_err(setup)?;
    println!(
        "demo: tax-server emulator pid {} on {}",
        emulator.pid(),
        emulator.addr()
    );

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let per_shard_orders =
        options.invoices / u64::from(options.shards) + options.invoices / 10 + 1_000;
    let index_capacity = (per_shard_orders.min(1 << 30) as u32).max(INDEX_CAPACITY_MIN);
    let mut handles = Vec::new();
    for shard_id in 0..options.shards {
        let config = ShardConfig {
            issuer: IssuerConfig {
                shard_id,
                taxpayers: sellers
                    .iter()
                    .map(|s| TaxpayerConfig {
                        id: *s,
                        // 100,000 yuan: above any ticket, so only malformed requests hit it.
                        ceiling_fen: 10_000_000,
                        low_watermark: 100_000,
                        refill_count: 250_000,
                    })
                    .collect(),
                retention_ms: RETENTION_MS_DEFAULT,
                index_capacity_orders: index_capacity,
                tick_requests_max: 8_192,
            },
            journal: JournalConfig::new(data_dir.join(format!("shard-{shard_id}"))),
            cpu: options.pin.then_some(shard_id as usize % cpus),
            hsm_addr: emulator.addr(),
            hsm: TcpClientConfig::default(),
        };
        handles.push(ShardHandle::spawn(config).map_err(setup)?);
    }

    // Requests are generated up front so that the timed phase measures the appliance.
    let shards = options.shards;
    let mut per_shard: Vec<Vec<IssueRequest>> = vec![Vec::new(); shards as usize];
    for n in 0..options.invoices {
        let request = ticket_request(sellers[(n % u64::from(options.sellers)) as usize], "D", n);
        per_shard[home_shard(&request, shards) as usize].push(request);
    }

    let start = Instant::now();
    let issued: Vec<Result<Vec<Invoice>, DemoError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = handles
            .iter()
            .zip(per_shard)
            .map(|(handle, requests)| scope.spawn(move || drive(handle, requests, options)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("driver thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let mut invoices = Vec::with_capacity(options.invoices as usize);
    for shard_invoices in issued {
        invoices.extend(shard_invoices?);
    }
    let metrics: Vec<ShardMetrics> = handles
        .iter()
        .map(|h| h.metrics())
        .collect::<Result<_, _>>()
        .map_err(setup)?;
    let report = DemoReport {
        invoices: invoices.len() as u64,
        elapsed,
        shards: metrics,
    };

    verify_unique_and_check_codes(&invoices, options.invoices)?;
    let sample: Vec<&Invoice> = invoices
        .iter()
        .step_by((invoices.len() / options.sample_invoices.max(1)).max(1))
        .collect();
    verify_upload(emulator.addr(), &sample)?;
    verify_replay(&handles, &sample, shards)?;

    println!(
        "demo: issued {} invoices in {:.2} s = {:.0} invoices/s (durable: O_DIRECT + fdatasync per tick; tax codes from the emulator)",
        report.invoices,
        elapsed.as_secs_f64(),
        report.invoices_per_s()
    );
    println!("demo: verified: {} unique numbers, check codes, {} uploaded and accepted by the tax server, {} replayed identically", invoices.len(), sample.len(), sample.len());
    for stage in Stage::ALL {
        println!("\nper-shard latency, stage {} (µs):", stage.name());
        print!("{}", latency_table(&report.shards, stage));
    }
    for handle in handles {
        handle.shutdown().map_err(setup)?;
    }
    drop(emulator);
    Ok(report)
}

/// Sends one shard its requests with a bounded window of batches in flight.
fn drive(
    handle: &ShardHandle,
    requests: Vec<IssueRequest>,
    options: &DemoOptions,
) -> Result<Vec<Invoice>, DemoError> {
    let mut out = Vec::with_capacity(requests.len());
    let mut in_flight = std::collections::VecDeque::new();
    let mut chunks = requests.chunks(options.batch_requests);
    loop {
        while in_flight.len() < options.window_batches {
            let Some(chunk) = chunks.next() else { break };
            in_flight.push_back(handle.submit(chunk.to_vec()).map_err(setup)?);
        }
        let Some(rx) = in_flight.pop_front() else {
            break;
        };
        let results: Vec<IssueResult> = rx.recv().map_err(|_| setup("shard stopped"))?;
        for result in results {
            out.push(
                result
                    .map_err(|e| DemoError::Verify(format!("shard {}: {e}", handle.shard_id())))?
                    .invoice,
            );
        }
    }
    Ok(out)
}

fn verify_unique_and_check_codes(invoices: &[Invoice], expected: u64) -> Result<(), DemoError> {
    if invoices.len() as u64 != expected {
        return Err(DemoError::Verify(format!(
            "{} invoices for {expected} orders",
            invoices.len()
        )));
    }
    let mut numbers = HashSet::with_capacity(invoices.len());
    for invoice in invoices {
        if !numbers.insert((invoice.code, invoice.number)) {
            return Err(DemoError::Verify(format!(
                "number {:?} issued twice",
                invoice.identity()
            )));
        }
        if hsm_driver::crypto::check_code(&invoice.tax_control_code) != invoice.check_code {
            return Err(DemoError::Verify(format!(
                "check code of {:?} does not match its tax code",
                invoice.identity()
            )));
        }
    }
    Ok(())
}

/// Uploads the sample: the tax server accepts an invoice only if its tax code verifies
/// under the device key over the canonical bytes rebuilt from the answer.
fn verify_upload(addr: std::net::SocketAddr, sample: &[&Invoice]) -> Result<(), DemoError> {
    let mut client = blocking::Client::connect(addr, TcpClientConfig::default()).map_err(setup)?;
    for chunk in sample.chunks(512) {
        let mut batch = UploadBatch::new();
        for invoice in chunk {
            batch
                .push(&canonical::encode(invoice), &invoice.tax_control_code)
                .map_err(|e| DemoError::Verify(e.to_string()))?;
        }
        let response = client
            .call(&Request::Upload(batch))
            .map_err(|e| DemoError::Verify(e.to_string()))?;
        let Response::Upload(statuses) = response else {
            return Err(DemoError::Verify("unexpected answer to Upload".into()));
        };
        for (invoice, status) in chunk.iter().zip(&statuses) {
            if !matches!(status, UploadStatus::Accepted | UploadStatus::Duplicate) {
                return Err(DemoError::Verify(format!(
                    "tax server answered {status:?} for {:?}",
                    invoice.identity()
                )));
            }
        }
        if statuses.len() != chunk.len() {
            return Err(DemoError::Verify(
                "upload answered a different count".into(),
            ));
        }
    }
    Ok(())
}

fn verify_replay(
    handles: &[ShardHandle],
    sample: &[&Invoice],
    shards: u32,
) -> Result<(), DemoError> {
    let before: u64 = handles
        .iter()
        .map(|h| h.metrics().map(|m| m.issued_invoices).unwrap_or(0))
        .sum();
    for invoice in sample {
        let shard = home_shard(&invoice.request, shards) as usize;
        let results = handles[shard]
            .issue(vec![invoice.request.clone()])
            .map_err(setup)?;
        match results.into_iter().next() {
            Some(Ok(again)) if again.replayed && &again.invoice == *invoice => {}
            Some(Ok(again)) => {
                return Err(DemoError::Verify(format!(
                    "replay of {:?} answered {:?}",
                    invoice.identity(),
                    again.invoice.identity()
                )))
            }
            Some(Err(e)) => {
                return Err(DemoError::Verify(format!(
                    "replay of {:?}: {e}",
                    invoice.identity()
                )))
            }
            None => return Err(DemoError::Verify("replay got no answer".into())),
        }
    }
    let after: u64 = handles
        .iter()
        .map(|h| h.metrics().map(|m| m.issued_invoices).unwrap_or(0))
        .sum();
    if after != before {
        return Err(DemoError::Verify(format!(
            "replays issued {} new invoices",
            after - before
        )));
    }
    Ok(())
}
