//! `appliance`: the issuing appliance binary.
//!
//! - `appliance` or `appliance demo`: the bulk demo (tax-server emulator as a child
//!   process, shards on every core, throughput and per-shard latency).
//! - `appliance init --data-dir D [--name N]`: gives a new data dir its appliance
//!   identity (`serve` also does on first start).
//! - `appliance serve --config appliance.toml`: the QUIC service (docs/operations.md).
//! - `appliance issue --input orders.jsonl --output invoices.jsonl ...`: issue a file's
//!   invoices through a running appliance.
//! - `appliance hsm-emu ...`: the tax-server emulator (same flags as `hsm-emu`), so that
//!   one binary can start its own tax server as a separate process.
//! - `appliance issue-loop ...`: issues synthetic orders on one shard and prints each
//!   acknowledged invoice; the crash test kills it at random moments.

use appliance_core::issuer::RETENTION_MS_DEFAULT;
use appliance_core::{IssuerConfig, TaxpayerConfig};
use appliance_server::demo::{self, DemoOptions};
use appliance_server::journal::JournalConfig;
use appliance_server::shard::{ShardConfig, ShardHandle};
use appliance_server::workload::{seller, ticket_request};
use clap::{Parser, Subcommand};
use hsm_driver::tcp::TcpClientConfig;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "appliance",
    about = "Railway e-invoice issuing appliance",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bulk demo on the embedded default: emulator child process, one shard per core.
    Demo(DemoArgs),
    /// Give a new data dir its appliance identity (a random id and a name); refused when
    /// it already has one. `serve` does this on first start too (see docs/operations.md).
    Init(InitArgs),
    /// Serve invoice requests over QUIC as configured (see docs/operations.md).
    Serve(ServeArgs),
    /// Return to the tax authority the unused numbers of an appliance whose data dir is
    /// lost for good (a dry run unless --execute; see docs/operations.md).
    ReleaseHolder(ReleaseArgs),
    /// Issue the invoices of a CSV or JSON-lines file through a running appliance and
    /// write the issued invoices (or errors) as JSON lines (see docs/client.md).
    Issue(appliance_client::cli::IssueArgs),
    /// Run the tax-server emulator (see `appliance hsm-emu --help`).
    #[command(disable_help_flag = true)]
    HsmEmu {
        /// Emulator flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Issue synthetic orders `from..to` on one shard, printing `ACK <order> <code>
    /// <number> <check code>` per acknowledged invoice (used by the crash test).
    #[command(hide = true)]
    IssueLoop(IssueLoopArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, required_unless_present = "print_default_config")]
    config: Option<PathBuf>,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

#[derive(clap::Args)]
struct ReleaseArgs {
    /// The tax server (tcp://host:port).
    #[arg(long)]
    tax_server: String,
    /// The lost appliance's id (32 hex digits, from its identity.toml or /status).
    #[arg(long)]
    appliance_id: String,
    /// Return the numbers; without it, only list what would be returned.
    #[arg(long)]
    execute: bool,
}

/// Lists, and with --execute returns, the unused numbers of a lost appliance.
fn release_holder(args: ReleaseArgs) -> Result<(), String> {
    use appliance_server::release;
    let id = release::parse_id(&args.appliance_id).map_err(|e| e.to_string())?;
    let rows = release::release(&args.tax_server, id, args.execute).map_err(|e| e.to_string())?;
    print!("{}", release::table(&rows, args.execute));
    if !args.execute {
        println!("dry run: nothing returned (add --execute once the appliance is gone for good)");
    }
    Ok(())
}

#[derive(clap::Args)]
struct InitArgs {
    /// The data directory (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// A name for people (logs, the control port's status). Default: the host name.
    #[arg(long)]
    name: Option<String>,
}

/// Creates the data dir's identity and prints it.
fn init(args: InitArgs) -> Result<(), String> {
    let identity = appliance_server::identity::create(&args.data_dir, args.name.as_deref())
        .map_err(|e| e.to_string())?;
    println!(
        "appliance {} ({}) created in {}",
        identity.id_hex(),
        identity.name,
        args.data_dir
            .join(appliance_server::identity::IDENTITY_FILE)
            .display()
    );
    Ok(())
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Invoices to issue.
    #[arg(long, default_value_t = 1_000_000)]
    invoices: u64,
    /// Shards (default: one per CPU).
    #[arg(long)]
    shards: Option<u32>,
    /// Requests per batch.
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Batches in flight per shard.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Seller taxpayers.
    #[arg(long, default_value_t = 4)]
    sellers: u32,
    /// Do not pin shards to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Data directory (default: a fresh one under /var/tmp, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the data directory.
    #[arg(long)]
    keep_data: bool,
    /// Reach the tax-server emulator over TCP instead of its PCIe interface.
    #[arg(long)]
    tcp: bool,
}

#[derive(clap::Args)]
struct IssueLoopArgs {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    hsm: SocketAddr,
    #[arg(long, default_value_t = 2)]
    sellers: u32,
    #[arg(long, default_value = "C")]
    prefix: String,
    #[arg(long)]
    from: u64,
    #[arg(long)]
    to: u64,
    #[arg(long, default_value_t = 50)]
    batch: usize,
}

/// Runs the appliance until SIGINT or SIGTERM, then stops the shards (queued work is
/// finished and made durable first) and prints their latency tables.
fn serve(args: ServeArgs) -> Result<(), String> {
    use appliance_server::config::{ApplianceConfig, EXAMPLE};
    use appliance_server::metrics::{latency_table, Stage};
    if args.print_default_config {
        print!("{EXAMPLE}");
        return Ok(());
    }
    let path = args.config.expect("clap requires --config");
    let config = ApplianceConfig::load(&path).map_err(|e| e.to_string())?;
    // Block the stop signals in this thread before any other thread exists, so every
    // thread inherits the mask and only the sigwait below receives them.
    // SAFETY: plain libc calls on a local, zero-initialised sigset.
    let signals = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let appliance =
        appliance_server::serve::Appliance::start(&config).map_err(|e| e.to_string())?;
    // `listening <addr>` first: the line supervisors and tests wait for.
    println!("listening {}", appliance.service_addr());
    println!(
        "serving {} shards on {} (shard ports {:?}); control {}; appliance {} ({}{})",
        appliance.shard_ports().len(),
        appliance.service_addr(),
        appliance.shard_ports(),
        appliance
            .control_addr()
            .map_or("disabled".to_owned(), |a| a.to_string()),
        appliance.identity().id_hex(),
        appliance.identity().name,
        if appliance.identity_created() {
            ", identity created now"
        } else {
            ""
        }
    );
    let mut signal = 0;
    // SAFETY: `signals` is an initialised set; sigwait only writes `signal`.
    unsafe { libc::sigwait(&signals, &mut signal) };
    println!("signal {signal}: stopping");
    let metrics = appliance.shutdown();
    for stage in Stage::ALL {
        print!("{}", latency_table(&metrics, stage));
    }
    Ok(())
}

fn main() -> ExitCode {
    appliance_server::allocator::keep_freed_memory();
    let cli = Cli::parse();
    if let Some(Cmd::HsmEmu { args }) = &cli.command {
        let argv = std::iter::once("hsm-emu".to_string()).chain(args.iter().cloned());
        return match hsm_emulator::run_from_args(argv) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hsm-emu: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let result = match cli.command {
        None => demo::run(&DemoOptions::default())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Some(Cmd::Demo(args)) => {
            let defaults = DemoOptions::default();
            let options = DemoOptions {
                invoices: args.invoices,
                shards: args.shards.unwrap_or(defaults.shards),
                pin: !args.no_pin,
                batch_requests: args.batch,
                window_batches: args.window,
                sellers: args.sellers,
                data_dir: args.data_dir,
                keep_data: args.keep_data,
                tcp: args.tcp,
                ..defaults
            };
            demo::run(&options).map(|_| ()).map_err(|e| e.to_string())
        }
        Some(Cmd::IssueLoop(args)) => issue_loop(args),
        Some(Cmd::Init(args)) => init(args),
        Some(Cmd::Serve(args)) => serve(args),
        Some(Cmd::ReleaseHolder(args)) => release_holder(args),
        Some(Cmd::Issue(args)) => appliance_client::cli::run_issue(&args)
            .map(|summary| println!("{summary}"))
            .map_err(|e| e.to_string()),
        Some(Cmd::HsmEmu { .. }) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("appliance: {e}");
            ExitCode::FAILURE
        }
    }
}

fn issue_loop(args: IssueLoopArgs) -> Result<(), String> {
    let sellers: Vec<_> = (0..args.sellers).map(seller).collect();
    // The data dir is this one shard's journal dir; its identity sits beside the
    // segments (the journal ignores files that are not segments).
    let (identity, _) = appliance_server::identity::load_or_create(&args.data_dir, None)
        .map_err(|e| e.to_string())?;
    let config = ShardConfig {
        appliance_id: identity.id,
        issuer: IssuerConfig {
            shard_id: 0,
            taxpayers: sellers
                .iter()
                .map(|s| TaxpayerConfig {
                    id: *s,
                    ceiling_fen: 10_000_000,
                    low_watermark: 2_000,
                    refill_count: 5_000,
                })
                .collect(),
            retention_ms: RETENTION_MS_DEFAULT,
            // The crash test runs this for a fixed time per cycle, so the orders it sends
            // grow with the machine's speed; 2^16 filled up on an idle 2-core machine
            // ("idempotency index full"). 2^20 orders is 64 MiB, allocated once.
            index_capacity_orders: 1 << 20,
            tick_requests_max: 1_024,
        },
        journal: JournalConfig::new(&args.data_dir),
        cpu: None,
        tax_servers: vec![hsm_driver::route::Route::tcp(args.hsm)],
        taxpayer_routes: Default::default(),
        hsm: TcpClientConfig::default().into(),
        spin_before_park: std::time::Duration::ZERO,
        ticks_in_flight: 2,
    };
    let shard = ShardHandle::spawn(config).map_err(|e| e.to_string())?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready").map_err(|e| e.to_string())?;
    stdout.flush().map_err(|e| e.to_string())?;
    let mut n = args.from;
    while n < args.to {
        let end = (n + args.batch as u64).min(args.to);
        let requests: Vec<_> = (n..end)
            .map(|i| {
                ticket_request(
                    sellers[(i % u64::from(args.sellers)) as usize],
                    &args.prefix,
                    i,
                )
            })
            .collect();
        let results = shard.issue(requests).map_err(|e| e.to_string())?;
        for result in results {
            match result {
                Ok(issued) => writeln!(
                    stdout,
                    "ACK {} {} {} {}",
                    issued.invoice.request.order_id,
                    issued.invoice.code.get(),
                    issued.invoice.number.get(),
                    String::from_utf8_lossy(&issued.invoice.check_code)
                ),
                Err(e) => writeln!(stdout, "ERR {e}"),
            }
            .map_err(|e| e.to_string())?;
        }
        stdout.flush().map_err(|e| e.to_string())?;
        n = end;
    }
    shard.shutdown().map_err(|e| e.to_string())
}
