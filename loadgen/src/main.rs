//! `loadgen`: the capacity planner's load generator (loadgen/README.md).
//!
//! - `loadgen run ...`: one run, open loop (default) or closed loop.
//! - `loadgen sweep ...`: raise the rate in steps until the objective breaks.
//! - `loadgen test-server ...`: a protocol-speaking QUIC server with fake invoices, a
//!   stall switch and a capacity limit (tests, and loadgen's own overhead benchmark).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use loadgen::run::{run_once, RunState, Target};
use loadgen::scenario::{Mode, Scenario};
use loadgen::testserver::{TestServer, TestServerOptions};
use loadgen::CpuPicker;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load generator and capacity planner for the e-invoice appliance",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run at a fixed rate (open loop) or fixed concurrency (closed loop).
    Run(Flags),
    /// Raise the rate in steps until the objective breaks; report the capacity.
    Sweep(Flags),
    /// A QUIC server speaking the protocol with fake invoices (for tests and benchmarks).
    TestServer(TestServerArgs),
}

/// Every scenario setting as a flag; a flag overrides the scenario file.
#[derive(clap::Args, Debug, Default)]
struct Flags {
    /// TOML scenario file (flags override it).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Appliance service address, host:port.
    #[arg(long)]
    server: Option<String>,
    /// Name checked against the server certificate.
    #[arg(long)]
    server_name: Option<String>,
    /// CA certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// open (constant rate, coordinated omission corrected) or closed.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Target rate, invoices per second (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Measured duration, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up, seconds.
    #[arg(long)]
    warmup: Option<f64>,
    /// QUIC connections.
    #[arg(long)]
    connections: Option<u32>,
    /// Concurrent streams per connection (closed loop: workers per connection).
    #[arg(long)]
    streams: Option<u32>,
    /// Invoices per request (1 = per-invoice; up to 4096 = bulk).
    #[arg(long)]
    invoices_per_request: Option<u32>,
    /// Send every order to its home shard's port.
    #[arg(long, overrides_with = "no_shard_aware")]
    shard_aware: bool,
    /// Send everything to the service port (the appliance forwards).
    #[arg(long)]
    no_shard_aware: bool,
    /// Seller taxpayers.
    #[arg(long)]
    sellers: Option<u32>,
    /// Line items per invoice, fewest.
    #[arg(long)]
    lines_min: Option<u32>,
    /// Line items per invoice, most.
    #[arg(long)]
    lines_max: Option<u32>,
    /// Lowest line price, fen.
    #[arg(long)]
    price_min_fen: Option<i64>,
    /// Highest line price, fen.
    #[arg(long)]
    price_max_fen: Option<i64>,
    /// Tax rate, basis points.
    #[arg(long)]
    tax_rate_bp: Option<u16>,
    /// Share of red invoices (0..1).
    #[arg(long)]
    red_share: Option<f64>,
    /// Share of retries of earlier orders (0..1).
    #[arg(long)]
    retry_share: Option<f64>,
    /// Tokio worker threads.
    #[arg(long)]
    threads: Option<usize>,
    /// CPUs to pin loadgen's threads to, e.g. 0,1.
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Open loop: scheduler as a runtime task (default: no thread hand-off per request,
    /// wakes at most every 250 µs) or on its own thread (a wake-up per request).
    #[arg(long, value_enum)]
    scheduler: Option<loadgen::scenario::Scheduler>,
    /// Open loop: most requests in flight.
    #[arg(long)]
    in_flight_max: Option<u32>,
    /// Open loop: most invoices in flight (never below the streams in use).
    #[arg(long)]
    in_flight_invoices_max: Option<u32>,
    /// Reply timeout, ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Order id prefix (default: unique per run).
    #[arg(long)]
    order_prefix: Option<String>,
    /// Interval of the .hlog and timeline, ms.
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Report directory (summary.json, latency.hlog, SVG plots).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Seed of the mix's random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// Objective: p99 bound, ms.
    #[arg(long)]
    p99_ms: Option<f64>,
    /// Objective: most errors.
    #[arg(long)]
    errors_max: Option<u64>,
    /// Objective: achieved rate at least this share of the target.
    #[arg(long)]
    achieved_min_ratio: Option<f64>,
    /// Sweep: first rate, invoices/s.
    #[arg(long)]
    start_rate: Option<f64>,
    /// Sweep: step, invoices/s.
    #[arg(long)]
    step_rate: Option<f64>,
    /// Sweep: highest rate, invoices/s.
    #[arg(long)]
    max_rate: Option<f64>,
    /// Print the effective scenario as TOML and exit.
    #[arg(long)]
    print_scenario: bool,
}

macro_rules! set {
    ($flag:expr => $field:expr) => {
        if let Some(v) = $flag.clone() {
            $field = v.into();
        }
    };
}

impl Flags {
    fn scenario(&self) -> Result<Scenario, String> {
        let mut s = match &self.scenario {
            Some(path) => Scenario::load(path).map_err(|e| e.to_string())?,
            None => Scenario::default(),
        };
        set!(self.server => s.server);
        set!(self.server_name => s.server_name);
        if let Some(v) = &self.ca {
            s.ca = Some(v.clone());
        }
        if let Some(v) = &self.cert {
            s.cert = Some(v.clone());
        }
        if let Some(v) = &self.key {
            s.key = Some(v.clone());
        }
        set!(self.mode => s.mode);
        set!(self.rate => s.rate);
        set!(self.duration => s.duration_s);
        set!(self.warmup => s.warmup_s);
        set!(self.connections => s.connections);
        set!(self.streams => s.streams);
        set!(self.invoices_per_request => s.invoices_per_request);
        if self.shard_aware {
            s.shard_aware = true;
        }
        if self.no_shard_aware {
            s.shard_aware = false;
        }
        set!(self.sellers => s.sellers);
        set!(self.lines_min => s.mix.lines_min);
        set!(self.lines_max => s.mix.lines_max);
        set!(self.price_min_fen => s.mix.price_min_fen);
        set!(self.price_max_fen => s.mix.price_max_fen);
        set!(self.tax_rate_bp => s.mix.tax_rate_bp);
        set!(self.red_share => s.mix.red_share);
        set!(self.retry_share => s.mix.retry_share);
        set!(self.threads => s.threads);
        set!(self.cpus => s.cpus);
        set!(self.scheduler => s.scheduler);
        set!(self.in_flight_max => s.in_flight_max);
        set!(self.in_flight_invoices_max => s.in_flight_invoices_max);
        set!(self.timeout_ms => s.timeout_ms);
        if let Some(v) = &self.order_prefix {
            s.order_prefix = Some(v.clone());
        }
        set!(self.interval_ms => s.interval_ms);
        if let Some(v) = &self.out {
            s.out_dir = Some(v.clone());
        }
        if self.quiet {
            s.progress = false;
        }
        set!(self.seed => s.seed);
        set!(self.p99_ms => s.objective.p99_ms);
        set!(self.errors_max => s.objective.errors_max);
        set!(self.achieved_min_ratio => s.objective.achieved_min_ratio);
        set!(self.start_rate => s.sweep.start_rate);
        set!(self.step_rate => s.sweep.step_rate);
        set!(self.max_rate => s.sweep.max_rate);
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }
}

#[derive(clap::Args)]
struct TestServerArgs {
    /// Shards announced in hello (each gets its own port).
    #[arg(long, default_value_t = 1)]
    shards: u16,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs to pin the workers to, e.g. 1.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Where to write the PKI (ca.pem for loadgen's --ca).
    #[arg(long)]
    pki_dir: PathBuf,
    /// Stall: start this many ms after the first issue frame.
    #[arg(long, requires = "stall_ms")]
    stall_after_ms: Option<u64>,
    /// Stall length, ms.
    #[arg(long)]
    stall_ms: Option<u64>,
    /// Capacity limit, invoices/s (excess queues).
    #[arg(long)]
    capacity: Option<f64>,
    /// Do not remember orders (no replays, no decoding): the cheapest server.
    #[arg(long)]
    stateless: bool,
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .try_init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(flags) => run(flags, false),
        Cmd::Sweep(flags) => run(flags, true),
        Cmd::TestServer(args) => test_server(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(flags: Flags, sweep: bool) -> Result<ExitCode, String> {
    let scenario = flags.scenario()?;
    if flags.print_scenario {
        print!("{}", toml::to_string(&scenario).map_err(|e| e.to_string())?);
        return Ok(ExitCode::SUCCESS);
    }
    let cpus = CpuPicker::new(&scenario.cpus);
    let rt = loadgen::runtime(scenario.threads, &cpus).map_err(|e| e.to_string())?;
    let target = rt
        .block_on(Target::connect(&scenario))
        .map_err(|e| e.to_string())?;
    let out = scenario.out_dir.clone();
    let met = if sweep {
        let report =
            loadgen::sweep::sweep(&rt, &target, &scenario, out.as_deref(), &cpus, |step| {
                print!("{}", step.text());
            })
            .map_err(|e| e.to_string())?;
        print!("{}", report.text());
        report.capacity_invoices_per_s.is_some()
    } else {
        let mut state = RunState::new(&scenario, &target);
        let output = run_once(
            &rt,
            &target,
            &scenario,
            scenario.rate,
            &mut state,
            out.as_deref(),
            &cpus,
        )
        .map_err(|e| e.to_string())?;
        print!("{}", output.report.text());
        output.report.verdict.met
    };
    if let Some(dir) = &out {
        println!("reports in {}", dir.display());
    }
    rt.block_on(target.close());
    Ok(if met {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn test_server(args: TestServerArgs) -> Result<ExitCode, String> {
    let options = TestServerOptions {
        shards: args.shards,
        threads: args.threads,
        cpus: args.cpus,
        stall: args
            .stall_after_ms
            .zip(args.stall_ms)
            .map(|(a, s)| (Duration::from_millis(a), Duration::from_millis(s))),
        capacity_invoices_per_s: args.capacity,
        stateful: !args.stateless,
        ..TestServerOptions::default()
    };
    let server = TestServer::start(options, &args.pki_dir)?;
    println!("listening {}", server.addr);
    println!("ca {}", server.pki.ca.display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
