//! The bulk demo (`appliance demo`, what `cargo run --release` runs): starts the
//! tax-server emulator as a separate child process, generates a throw-away CA and
//! certificates, starts the appliance (one shard per core, QUIC on loopback) on a
//! throw-away data dir, issues synthetic railway invoices in bulk through the client
//! library over QUIC with mutual TLS, verifies every answer, and prints throughput and
//! per-shard latency.
//!
//! Verification: every invoice number is unique across the run; every check code derives
//! from its tax code; a sample of invoices is uploaded to the tax server, which accepts
//! them only if their tax codes verify under the device key; the same sample re-sent
//! comes back identical (idempotent replay) and issues nothing new.

use crate::child::ListeningChild;
use crate::config::{ApplianceConfig, Limits, ListenConfig, TaxServerConfig, TaxpayerEntry};
use crate::metrics::{latency_table, ShardMetrics, Stage};
use crate::quic::auth::ClientGrant;
use crate::quic::tls::TlsFiles;
use crate::serve::Appliance;
use crate::workload::{invoice_code, seller, ticket_request};
use appliance_client::pki::DevPki;
use appliance_client::{Client, ClientConfig, Issued, ItemResult};
use appliance_core::idempotency::INDEX_CAPACITY_MIN;
use appliance_core::{canonical, Invoice, IssueRequest};
use appliance_proto::home_shard;
use hdrhistogram::Histogram;
use hsm_driver::proto::{Request, Response, UploadBatch, UploadStatus};
use hsm_driver::tcp::{blocking, TcpClientConfig};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
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
    /// Reach the emulator over TCP instead of its PCIe interface (a shared-memory region
    /// standing in for a card in this box; the default, as the emulator runs locally).
    pub tcp: bool,
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
            tcp: false,
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
        None => {
            remove_stale_data_dirs(Path::new(DATA_PARENT));
            PathBuf::from(format!("{DATA_PARENT}/{DEMO_PREFIX}{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&data_dir).map_err(setup)?;
    if options.data_dir.is_none() && !options.keep_data {
        std::fs::write(data_dir.join(THROWAWAY_MARKER), b"").map_err(setup)?;
    }
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
    // The PCIe region lives in shared memory (/dev/shm), one queue pair per shard.
    remove_stale_regions(Path::new(SHM_DIR));
    let region = PathBuf::from(format!(
        "{SHM_DIR}/{DEMO_PREFIX}{}{REGION_SUFFIX}",
        std::process::id()
    ));
    if !options.tcp {
        command
            .arg("--pcie")
            .arg(&region)
            .arg("--pcie-queues")
            .arg(options.shards.to_string());
    }
    let emulator = ListeningChild::spawn(command, Duration::from_secs(60)).map_err(setup)?;
    let _region = RemoveOnDrop(region.clone());
    let route = if options.tcp {
        format!("tcp://{}", emulator.addr())
    } else {
        format!("pcie:{}", region.display())
    };
    println!(
        "demo: tax-server emulator pid {} on tcp://{} (appliance uses {route})",
        emulator.pid(),
        emulator.addr()
    );

    // A throw-away CA, the server's certificate and the demo client's certificate.
    let pki = DevPki::generate(&data_dir.join("pki"), &["localhost"], &["demo"]).map_err(setup)?;
    let per_shard_orders =
        options.invoices / u64::from(options.shards) + options.invoices / 10 + 1_000;
    let index_capacity = (per_shard_orders.min(1 << 30) as u32).max(INDEX_CAPACITY_MIN);
    let config = ApplianceConfig {
        data_dir: data_dir.join("journal"),
        unsafe_allow_volatile_data_dir: false,
        runtime_dir: None,
        shards: Some(options.shards),
        cpus: if options.pin { None } else { Some(Vec::new()) },
        spin_before_park_us: 0,
        listen: ListenConfig {
            service: "127.0.0.1:0".parse().expect("static address"),
            shard_ports: Vec::new(),
            control: "127.0.0.1:0".parse().expect("static address"),
            control_disabled: false,
        },
        tls: TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: pki.ca.clone(),
        },
        clients: vec![ClientGrant {
            identity: "demo".into(),
            sellers: vec!["*".into()],
        }],
        tax_server: TaxServerConfig {
            route,
            connect_timeout_ms: 1_000,
            call_timeout_ms: 5_000,
        },
        taxpayers: sellers
            .iter()
            .map(|s| TaxpayerEntry {
                id: s.to_string(),
                // 100,000 yuan: above any ticket, so only malformed requests hit it.
                ceiling_fen: 10_000_000,
                low_watermark: 100_000,
                refill_count: 250_000,
                route: None,
            })
            .collect(),
        limits: Limits {
            index_capacity_orders: index_capacity,
            ..Limits::default()
        },
    };
    let appliance = Appliance::start(&config).map_err(setup)?;
    println!(
        "demo: appliance serving QUIC on {} (shard ports {:?}), metrics on http://{}/metrics",
        appliance.service_addr(),
        appliance.shard_ports(),
        appliance
            .control_addr()
            .map_or("-".to_owned(), |a| a.to_string())
    );

    // Requests are generated up front, grouped by home shard and cut into batches, so
    // that the timed phase measures the appliance and the transport.
    let shards = options.shards;
    let mut per_shard: Vec<Vec<IssueRequest>> = vec![Vec::new(); shards as usize];
    for n in 0..options.invoices {
        let request = ticket_request(sellers[(n % u64::from(options.sellers)) as usize], "D", n);
        per_shard[home_shard(&request, shards) as usize].push(request);
    }
    let batches: Vec<(u16, Vec<IssueRequest>)> = per_shard
        .into_iter()
        .enumerate()
        .flat_map(|(shard, requests)| {
            let mut requests = requests.into_iter();
            std::iter::from_fn(move || {
                let batch: Vec<IssueRequest> =
                    requests.by_ref().take(options.batch_requests).collect();
                (!batch.is_empty()).then_some((shard as u16, batch))
            })
        })
        .collect();

    // One thread for the whole client (quinn's drivers and every exchange): no wake-ups
    // across threads, which cost more CPU than the client's own work (as in loadgen).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup)?;
    let mut client_config = ClientConfig::from_pem_files(
        appliance.service_addr(),
        "localhost",
        &pki.ca,
        Some((&pki.clients[0].cert, &pki.clients[0].key)),
    )
    .map_err(setup)?;
    client_config.shard_aware = true;
    let client = runtime
        .block_on(Client::connect(client_config))
        .map_err(setup)?;

    let start = Instant::now();
    let window = options.window_batches * shards as usize;
    let (issued, batch_latency) = runtime.block_on(issue_batches(&client, batches, window))?;
    let elapsed = start.elapsed();
    let metrics = appliance.metrics();
    let report = DemoReport {
        invoices: issued.len() as u64,
        elapsed,
        shards: metrics,
    };

    verify_unique_and_check_codes(&issued, options.invoices)?;
    let sample: Vec<&Invoice> = issued
        .iter()
        .step_by((issued.len() / options.sample_invoices.max(1)).max(1))
        .collect();
    verify_upload(emulator.addr(), &sample)?;
    verify_replay(&runtime, &client, &appliance, &sample)?;
    runtime.block_on(client.close());

    println!(
        "demo: issued {} invoices in {:.2} s = {:.0} invoices/s over QUIC (durable: O_DIRECT + fdatasync per tick; tax codes from the emulator)",
        report.invoices,
        elapsed.as_secs_f64(),
        report.invoices_per_s()
    );
    println!(
        "demo: client-observed batch latency (ms): p50 {:.1}, p99 {:.1}, max {:.1}",
        batch_latency.value_at_quantile(0.5) as f64 / 1000.0,
        batch_latency.value_at_quantile(0.99) as f64 / 1000.0,
        batch_latency.max() as f64 / 1000.0
    );
    println!("demo: verified: {} unique numbers, check codes, {} uploaded and accepted by the tax server, {} replayed identically", issued.len(), sample.len(), sample.len());
    for stage in Stage::ALL {
        println!("\nper-shard latency, stage {} (µs):", stage.name());
        print!("{}", latency_table(&report.shards, stage));
    }
    let forwarded: u64 = report
        .shards
        .iter()
        .map(|m| m.quic.forwarded_requests)
        .sum();
    println!("\ndemo: forwarded between shards: {forwarded} (a shard-aware client sends each order to its home shard)");
    appliance.shutdown();
    drop(emulator);
    Ok(report)
}

/// A demo's throw-away data dir (unless `--data-dir`) and PCIe region are named by its
/// pid: `DATA_PARENT/DEMO_PREFIX<pid>` and `SHM_DIR/DEMO_PREFIX<pid>REGION_SUFFIX`.
const DATA_PARENT: &str = "/var/tmp";
const SHM_DIR: &str = "/dev/shm";
const DEMO_PREFIX: &str = "einvoice-demo-";
const REGION_SUFFIX: &str = ".pcie";
/// Present in a default data dir that the demo would have removed at its end (no
/// `--keep-data`): only such dirs are removed when their demo is found dead.
const THROWAWAY_MARKER: &str = ".throwaway";

/// Entries of `dir` named `DEMO_PREFIX<pid><suffix>` whose process is gone.
fn dead_demos(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            name.to_str()
                .and_then(|n| n.strip_prefix(DEMO_PREFIX))
                .and_then(|n| n.strip_suffix(suffix))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| !process_alive(pid))
        })
        .map(|entry| entry.path())
        .collect()
}

/// Whether `pid` is a running process: a zombie (killed, not yet reaped by whoever
/// inherited it) is not.
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold any
        // byte, so look after the last ')'.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Removes the PCIe regions of earlier demos whose process is gone. A demo killed with
/// SIGKILL cannot remove its own (its emulator child is signalled and exits, but the
/// 32 MiB of shared memory stay); the next demo does.
fn remove_stale_regions(dir: &Path) {
    for region in dead_demos(dir, REGION_SUFFIX) {
        let _ = std::fs::remove_file(region);
    }
}

/// Removes the throw-away data dirs (~2 GB of journal segments) of earlier demos killed
/// before they could; dirs kept with `--keep-data` carry no marker and stay.
fn remove_stale_data_dirs(dir: &Path) {
    for data in dead_demos(dir, "") {
        if data.join(THROWAWAY_MARKER).is_file() {
            let _ = std::fs::remove_dir_all(data);
        }
    }
}

/// Removes a file when dropped (the demo's PCIe region).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sends every batch, as one frame to its home shard, with at most `window` in flight;
/// returns the issued invoices (rebuilt from request + answer) and the per-batch latency
/// histogram (µs). Frames are sent as they are (`issue_frame`: no regrouping, no
/// retries): on loopback any failure is a finding, reported as such.
async fn issue_batches(
    client: &Client,
    batches: Vec<(u16, Vec<IssueRequest>)>,
    window: usize,
) -> Result<(Vec<Invoice>, Histogram<u64>), DemoError> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(window));
    let mut tasks = tokio::task::JoinSet::new();
    for (shard, batch) in batches {
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| setup(e.to_string()))?;
        let client = client.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let outcomes = client.issue_frame(Some(shard), &batch).await;
            drop(permit);
            (batch, outcomes, sent.elapsed())
        });
    }
    let mut invoices = Vec::new();
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds");
    while let Some(joined) = tasks.join_next().await {
        let (batch, outcomes, took) = joined.map_err(|e| setup(e.to_string()))?;
        latency.saturating_record(took.as_micros() as u64);
        let outcomes = outcomes
            .map_err(|e| DemoError::Verify(format!("a batch of {} failed: {e}", batch.len())))?;
        for (request, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                ItemResult::Issued(issued) => invoices.push(rebuild(request, &issued)),
                other => {
                    return Err(DemoError::Verify(format!(
                        "order {} not issued: {other:?}",
                        request.order_id
                    )))
                }
            }
        }
    }
    Ok((invoices, latency))
}

/// The full invoice from the request and the server's answer (what a ticketing system
/// stores and prints).
fn rebuild(request: IssueRequest, issued: &Issued) -> Invoice {
    Invoice {
        request,
        code: issued.identity.code,
        number: issued.identity.number,
        issue_time_ms: issued.issue_time_ms,
        tax_control_code: issued.tax_control_code,
        check_code: issued.check_code,
    }
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

/// Re-sends the sample through QUIC: every order must come back as a replay of the same
/// invoice, and nothing new may be issued.
fn verify_replay(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    appliance: &Appliance,
    sample: &[&Invoice],
) -> Result<(), DemoError> {
    let issued_count = |a: &Appliance| a.metrics().iter().map(|m| m.issued_invoices).sum::<u64>();
    let before = issued_count(appliance);
    let requests: Vec<IssueRequest> = sample.iter().map(|i| i.request.clone()).collect();
    let outcomes = runtime.block_on(client.issue(requests));
    for (invoice, outcome) in sample.iter().zip(outcomes) {
        match outcome {
            Ok(ItemResult::Replayed(again))
                if rebuild(invoice.request.clone(), &again) == **invoice => {}
            other => {
                return Err(DemoError::Verify(format!(
                    "replay of {:?} answered {other:?}",
                    invoice.identity()
                )))
            }
        }
    }
    let after = issued_count(appliance);
    if after != before {
        return Err(DemoError::Verify(format!(
            "replays issued {} new invoices",
            after - before
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_regions_of_dead_demos_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let region = |pid: &str| {
            dir.path()
                .join(format!("{DEMO_PREFIX}{pid}{REGION_SUFFIX}"))
        };
        // Above the kernel's largest pid_max: never a live process.
        let dead = region("999999999");
        let alive = region(&std::process::id().to_string());
        let other = dir.path().join("einvoice-e2e-4433.pcie");
        let odd = region("not-a-pid");
        for path in [&dead, &alive, &other, &odd] {
            std::fs::write(path, b"region").unwrap();
        }
        remove_stale_regions(dir.path());
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(other.exists());
        assert!(odd.exists());
    }

    #[test]
    fn a_zombie_is_not_alive() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie until `wait`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_alive(pid) {
            assert!(std::time::Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn only_the_throwaway_data_dirs_of_dead_demos_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let data = |pid: &str, marked: bool| {
            let path = dir.path().join(format!("{DEMO_PREFIX}{pid}"));
            std::fs::create_dir_all(path.join("journal")).unwrap();
            std::fs::write(path.join("journal/segment"), b"records").unwrap();
            if marked {
                std::fs::write(path.join(THROWAWAY_MARKER), b"").unwrap();
            }
            path
        };
        let dead = data("999999999", true);
        let kept = data("999999998", false); // --keep-data
        let alive = data(&std::process::id().to_string(), true);
        remove_stale_data_dirs(dir.path());
        assert!(!dead.exists());
        assert!(kept.join("journal/segment").exists());
        assert!(alive.join("journal/segment").exists());
    }
}
