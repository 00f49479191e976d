//! The `issue` command: read invoices from a JSON-lines or CSV file, issue them in
//! batches, write one JSON line per invoice sent, print a summary. A library module so
//! that the `appliance` binary embeds it as `appliance issue ...`.

pub mod input;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{Client, ClientConfig, ClientError, ItemResult, RetryPolicy};
pub use input::{BadInput, InputFormat, InputInvoice, ParsedInput};

/// Arguments of `issue`.
#[derive(Debug, Clone, clap::Args)]
pub struct IssueArgs {
    /// The appliance's service address, host:port.
    #[arg(long)]
    pub server: String,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// PEM file of the CA that signed the server certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// PEM file of our client certificate (mutual TLS).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM file of our client key.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Input file: JSON lines or CSV.
    #[arg(long)]
    pub input: PathBuf,
    /// Output file: one JSON line per invoice sent, in input order.
    #[arg(long)]
    pub output: PathBuf,
    /// Input format; by default from the input's extension (.csv, else JSON lines).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// Invoices per batch (one progress step; split into frames by the server's limits).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Send each order to its home shard's own port (default).
    #[arg(long, overrides_with = "no_shard_aware")]
    pub shard_aware: bool,
    /// Send everything to the service port; the appliance forwards.
    #[arg(long, overrides_with = "shard_aware")]
    pub no_shard_aware: bool,
    /// Concurrent streams per connection (default: the server's limit).
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Per-exchange timeout, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Attempts per invoice, the first included.
    #[arg(long, default_value_t = 5)]
    pub attempts: u32,
    /// No progress bar and no summary on the terminal.
    #[arg(long)]
    pub quiet: bool,
}

impl IssueArgs {
    /// Arguments with the defaults for everything but the addresses and files.
    pub fn new(server: impl Into<String>, ca: PathBuf, input: PathBuf, output: PathBuf) -> Self {
        IssueArgs {
            server: server.into(),
            server_name: "localhost".into(),
            ca,
            cert: None,
            key: None,
            input,
            output,
            format: None,
            batch: 1000,
            shard_aware: false,
            no_shard_aware: false,
            concurrency: None,
            timeout_ms: 10_000,
            attempts: 5,
            quiet: false,
        }
    }

    /// Whether to route by shard: on unless `--no-shard-aware` came last.
    pub fn is_shard_aware(&self) -> bool {
        !self.no_shard_aware
    }
}

/// Why `issue` stopped before writing every result.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// An argument is unusable.
    #[error("{0}")]
    Args(String),
    /// Reading the input or writing the output failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting (TLS, hello) failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// What `issue` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssueSummary {
    /// Invoices read and sent.
    pub sent: usize,
    /// Issued by this run.
    pub issued: usize,
    /// Issued earlier (idempotent replay): the same invoice as before.
    pub replayed: usize,
    /// Refused by the appliance or failed in transport after every retry.
    pub failed: usize,
    /// Input invoices or lines not sent, with their line numbers.
    pub bad_input: Vec<BadInput>,
    /// Wall time from connect to the last result written.
    pub elapsed: Duration,
}

impl std::fmt::Display for IssueSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.sent as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "sent {} invoices in {:.2} s ({:.0}/s): {} issued, {} replayed, {} failed; {} bad input lines skipped",
            self.sent,
            secs,
            rate,
            self.issued,
            self.replayed,
            self.failed,
            self.bad_input.len()
        )
    }
}

/// One line of the output file.
#[derive(Debug, Serialize)]
struct OutputLine<'a> {
    line: usize,
    seller: &'a str,
    order_id: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issue_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issue_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tax_control_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    check_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replayed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

fn output_line<'a>(invoice: &'a InputInvoice, outcome: &crate::IssueOutcome) -> OutputLine<'a> {
    let mut out = OutputLine {
        line: invoice.line,
        seller: invoice.request.seller.as_str(),
        order_id: &invoice.request.order_id,
        status: "failed",
        code: None,
        number: None,
        issue_time: None,
        issue_time_ms: None,
        tax_control_code: None,
        check_code: None,
        replayed: None,
        error: None,
        error_code: None,
        message: None,
    };
    match outcome {
        Ok(ItemResult::Issued(issued)) | Ok(ItemResult::Replayed(issued)) => {
            let replayed = matches!(outcome, Ok(ItemResult::Replayed(_)));
            out.status = if replayed { "replayed" } else { "issued" };
            out.code = Some(format!("{:012}", issued.identity.code.get()));
            out.number = Some(format!("{:08}", issued.identity.number.get()));
            out.issue_time = Some(rfc3339_utc_ms(issued.issue_time_ms));
            out.issue_time_ms = Some(issued.issue_time_ms);
            out.tax_control_code = Some(hex::encode(issued.tax_control_code));
            // decode_results admits only ASCII digits here.
            out.check_code = Some(String::from_utf8_lossy(&issued.check_code).into_owned());
            out.replayed = Some(replayed);
        }
        Ok(ItemResult::Failed { code, message }) => {
            out.error = Some(format!("{code:?}"));
            out.error_code = Some(*code as u16);
            out.message = Some(message.clone());
        }
        Err(ClientError::Refused { code, message }) => {
            out.error = Some(format!("{code:?}"));
            out.error_code = Some(*code as u16);
            out.message = Some(message.clone());
        }
        Err(e) => {
            out.error = Some(e.kind_name().to_owned());
            out.message = Some(e.to_string());
        }
    }
    out
}

/// `ms` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (days to civil date after
/// H. Hinnant's algorithm; no date crate needed for one format).
pub fn rfc3339_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Reads and parses the input file.
pub fn read_input(
    path: &std::path::Path,
    format: Option<InputFormat>,
) -> Result<ParsedInput, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
        path: path.to_owned(),
        source,
    })?;
    let format = format
        .or_else(|| InputFormat::from_path(path))
        .unwrap_or(InputFormat::Jsonl);
    Ok(match format {
        InputFormat::Jsonl => input::parse_jsonl(&text),
        InputFormat::Csv => input::parse_csv(&text),
    })
}

fn resolve(server: &str) -> Result<SocketAddr, CliError> {
    server
        .to_socket_addrs()
        .map_err(|e| CliError::Args(format!("--server {server}: {e}")))?
        .next()
        .ok_or_else(|| CliError::Args(format!("--server {server}: no address")))
}

/// Runs `issue` to completion on its own tokio runtime (so call it from synchronous
/// code, not from inside a runtime). Bad input lines are reported on stderr and skipped;
/// every invoice sent gets one output line, in input order, whatever its outcome.
pub fn run_issue(args: &IssueArgs) -> Result<IssueSummary, CliError> {
    if args.batch == 0 {
        return Err(CliError::Args("--batch must be at least 1".into()));
    }
    if args.attempts == 0 {
        return Err(CliError::Args("--attempts must be at least 1".into()));
    }
    let server_addr = resolve(&args.server)?;
    let parsed = read_input(&args.input, args.format)?;
    for bad in &parsed.bad {
        eprintln!(
            "{}:{}: skipped: {}",
            args.input.display(),
            bad.line,
            bad.message
        );
    }
    let mut config = ClientConfig::from_pem_files(
        server_addr,
        args.server_name.clone(),
        &args.ca,
        args.cert.as_deref().zip(args.key.as_deref()),
    )?;
    config.shard_aware = args.is_shard_aware();
    config.streams_per_connection = args.concurrency;
    config.exchange_timeout = Duration::from_millis(args.timeout_ms.max(1));
    config.retry = RetryPolicy {
        attempts_max: args.attempts,
        ..RetryPolicy::default()
    };

    let output_io = |source| CliError::Io {
        path: args.output.clone(),
        source,
    };
    let file = std::fs::File::create(&args.output).map_err(output_io)?;
    let mut out = std::io::BufWriter::new(file);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Args(format!("tokio runtime: {e}")))?;
    let started = Instant::now();
    let mut summary = runtime.block_on(async {
        let client = Client::connect(config).await?;
        let progress = if args.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(parsed.invoices.len() as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} invoices ({per_sec}) {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        };
        let mut summary = IssueSummary::default();
        // One batch in flight: the client already splits a batch into concurrent frames
        // per shard, and writing results batch by batch keeps the output in input order.
        for chunk in parsed.invoices.chunks(args.batch) {
            let requests = chunk.iter().map(|i| i.request.clone()).collect();
            let outcomes = client.issue(requests).await;
            for (invoice, outcome) in chunk.iter().zip(&outcomes) {
                match outcome {
                    Ok(ItemResult::Issued(_)) => summary.issued += 1,
                    Ok(ItemResult::Replayed(_)) => summary.replayed += 1,
                    _ => summary.failed += 1,
                }
                let line = output_line(invoice, outcome);
                serde_json::to_writer(&mut out, &line)
                    .map_err(|e| output_io(std::io::Error::other(e)))?;
                out.write_all(b"\n").map_err(output_io)?;
            }
            summary.sent += chunk.len();
            progress.inc(chunk.len() as u64);
        }
        progress.finish_and_clear();
        client.close().await;
        Ok::<IssueSummary, CliError>(summary)
    })?;
    out.flush().map_err(output_io)?;
    summary.elapsed = started.elapsed();
    summary.bad_input = parsed.bad;
    if !args.quiet {
        println!("{summary}");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_utc() {
        assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_utc_ms(1_735_689_599_999),
            "2024-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn shard_aware_flags() {
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: IssueArgs,
        }
        use clap::Parser;
        let base = [
            "x", "--server", "h:1", "--ca", "c", "--input", "i", "--output", "o",
        ];
        let parse = |extra: &[&str]| {
            Cmd::try_parse_from(base.iter().chain(extra))
                .unwrap()
                .args
                .is_shard_aware()
        };
        assert!(parse(&[]));
        assert!(!parse(&["--no-shard-aware"]));
        assert!(parse(&["--no-shard-aware", "--shard-aware"]));
    }
}
