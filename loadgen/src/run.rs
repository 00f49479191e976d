//! The engine: connections, the open-loop scheduler, closed-loop workers, and one run
//! from start to report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use appliance_client::{Client, ClientConfig, ClientIdentity, RetryPolicy};
use appliance_server::workload::seller;
use crossbeam_channel::Sender;
use tokio::sync::Semaphore;

use crate::collector::{collect, Collected, CollectorConfig, Completion};
use crate::gen::{Feedback, Frame, Generator};
use crate::report::RunReport;
use crate::scenario::{Mode, Scenario, Scheduler};
use crate::verify::Verifier;
use crate::{Clock, CpuPicker};

/// Why a run could not be carried out (as opposed to errors counted in its report).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Could not connect.
    #[error("connect: {0}")]
    Connect(#[from] appliance_client::ClientError),
    /// Writing reports.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The connections to the appliance.
pub struct Target {
    /// One client per configured connection (each its own UDP socket and, when
    /// shard-aware, one QUIC connection per shard).
    pub clients: Vec<Client>,
    /// Shards, from hello.
    pub shard_count: u16,
    /// Whether frames go to each shard's own port.
    pub shard_aware: bool,
}

impl Target {
    /// Connects `scenario.connections` clients.
    pub async fn connect(scenario: &Scenario) -> Result<Target, RunError> {
        let addr: SocketAddr = tokio::net::lookup_host(&scenario.server)
            .await
            .map_err(|e| RunError::Config(format!("server {}: {e}", scenario.server)))?
            .next()
            .ok_or_else(|| RunError::Config(format!("server {}: no address", scenario.server)))?;
        let ca = scenario
            .ca
            .as_ref()
            .ok_or_else(|| RunError::Config("--ca is required (the appliance's CA, PEM)".into()))?;
        let ca_pem =
            std::fs::read(ca).map_err(|e| RunError::Config(format!("{}: {e}", ca.display())))?;
        let identity = match (&scenario.cert, &scenario.key) {
            (Some(cert), Some(key)) => Some(ClientIdentity::from_files(cert, key)?),
            (None, None) => None,
            _ => return Err(RunError::Config("--cert and --key go together".into())),
        };
        let mut clients = Vec::new();
        for _ in 0..scenario.connections {
            let mut config = ClientConfig::new(addr, scenario.server_name.clone(), ca_pem.clone());
            config.identity = identity.clone();
            config.shard_aware = scenario.shard_aware;
            config.streams_per_connection = Some(scenario.streams);
            config.exchange_timeout = Duration::from_millis(scenario.timeout_ms);
            // loadgen sends every frame exactly once: a retry would hide a failure and
            // distort the latency of what it measures.
            config.retry = RetryPolicy {
                attempts_max: 1,
                ..RetryPolicy::default()
            };
            clients.push(Client::connect(config).await?);
        }
        let shard_count = clients[0].shard_count();
        Ok(Target {
            clients,
            shard_count,
            shard_aware: scenario.shard_aware,
        })
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for c in &self.clients {
            c.close().await;
        }
    }
}

/// What carries over from one run to the next within a sweep: the generator (order
/// numbering, retry and red pools) and the verifier (numbers seen).
pub struct RunState {
    generator: Arc<Mutex<Generator>>,
    feedback: Option<Sender<Feedback>>,
    verifier: Option<Verifier>,
    /// The order id prefix in use.
    pub prefix: String,
}

impl RunState {
    /// Fresh state for `scenario` against `target`.
    pub fn new(scenario: &Scenario, target: &Target) -> RunState {
        let prefix = scenario.order_prefix.clone().unwrap_or_else(|| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            format!("LG{}{:03}-", now.as_secs(), now.subsec_millis())
        });
        let wants_feedback = scenario.mix.retry_share > 0.0 || scenario.mix.red_share > 0.0;
        let (tx, rx) = if wants_feedback {
            let (tx, rx) = crossbeam_channel::bounded(1 << 16);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let generator = Generator::new(
            (0..scenario.sellers).map(seller).collect(),
            prefix.clone(),
            scenario.mix.clone(),
            target.shard_count,
            scenario.invoices_per_request as usize,
            scenario.seed,
            rx,
        );
        RunState {
            generator: Arc::new(Mutex::new(generator)),
            feedback: tx,
            verifier: Some(Verifier::default()),
            prefix,
        }
    }

    /// Requests generated so far by kind: fresh, retry, red.
    pub fn generated(&self) -> [u64; 3] {
        self.generator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generated
    }
}

/// One run's result: the report and the overall histogram (for plots).
pub struct RunOutput {
    /// The report (also written as summary.json when there is an output directory).
    pub report: RunReport,
    /// Everything the collector gathered.
    pub collected: Collected,
}

/// Shortest time between two wake-ups of the runtime scheduler. Arming a timer is a
/// costly syscall on a VM (the hrtimer reprogramming traps to the hypervisor: a fifth of
/// loadgen's CPU at 100,000 requests/s when it woke for every request), so at high rates
/// requests due within this spacing go out together, up to this late (the lateness is
/// in the send-lag histogram and, open loop, in the latency). At rates below one request
/// per spacing every request still gets its own, precise wake-up. 250 µs rather than
/// 100 µs: 7.5-7.9 instead of 9.2-9.3 µs of CPU per request at 100,000 requests/s on one
/// core, with a send lag p99 under 0.3 ms (docs/PERFORMANCE.md §9).
const SLEEP_SPACING_NS: u64 = 250_000;

/// Head start before the first intended send: connections are up, threads started.
const LEAD_NS: u64 = 20_000_000;

/// Runs `scenario` once at `rate` invoices/s (open loop; ignored in closed loop),
/// writing reports into `out_dir` if given.
pub fn run_once(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    scenario: &Scenario,
    rate: f64,
    state: &mut RunState,
    out_dir: Option<&Path>,
    cpus: &CpuPicker,
) -> Result<RunOutput, RunError> {
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir)?;
    }
    let clock = Clock::start();
    let cpu_start_s = crate::process_cpu_s();
    let warmup_ns = (scenario.warmup_s * 1e9) as u64;
    let duration_ns = (scenario.duration_s * 1e9) as u64;
    let measure_start_ns = LEAD_NS + warmup_ns;
    let end_ns = measure_start_ns + duration_ns;
    let wall_start = SystemTime::now() + Duration::from_nanos(measure_start_ns);
    let (tx, rx) = crossbeam_channel::unbounded::<Completion>();
    let progress = (scenario.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let pb = indicatif::ProgressBar::new(duration_ns / 1_000_000);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {pos:>6}/{len} ms  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb
        });
    let collector_config = CollectorConfig {
        mode: scenario.mode,
        shard_count: target.shard_count,
        interval_ns: scenario.interval_ms * 1_000_000,
        measure_start_ns,
        duration_ns,
        wall_start,
        hlog: out_dir.map(|d| d.join("latency.hlog")),
        progress: progress.clone(),
        feedback: state.feedback.clone(),
        clock,
    };
    let verifier = state.verifier.take().unwrap_or_default();
    let collector_cpus = cpus.clone();
    let collector = std::thread::Builder::new()
        .name("loadgen-collector".into())
        .spawn(move || {
            collector_cpus.pin_next();
            collect(collector_config, rx, verifier)
        })?;

    let sent = match scenario.mode {
        Mode::Open => open_loop(
            rt,
            target,
            scenario,
            rate,
            state,
            clock,
            measure_start_ns,
            end_ns,
            tx,
            cpus,
        )?,
        Mode::Closed => closed_loop(
            rt,
            target,
            scenario,
            state,
            clock,
            measure_start_ns,
            end_ns,
            tx,
        ),
    };
    let collected = collector
        .join()
        .map_err(|_| RunError::Config("collector thread panicked".into()))??;
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    let cpu_s = crate::process_cpu_s() - cpu_start_s;
    let mut report = RunReport::new(
        scenario,
        target,
        match scenario.mode {
            Mode::Open => Some(rate),
            Mode::Closed => None,
        },
        &collected,
        measure_start_ns,
        sent,
    );
    report.set_cpu(cpu_s, clock.now_ns() as f64 / 1e9, sent);
    if let Some(dir) = out_dir {
        report.write_json(&dir.join("summary.json"))?;
        crate::plot::percentiles(
            &dir.join("latency-percentiles.svg"),
            &[(&report.label, &collected.latency)],
        )
        .map_err(|e| RunError::Config(format!("plot: {e}")))?;
        crate::plot::timeline(
            &dir.join("timeline.svg"),
            &report.label,
            &collected.timeline,
        )
        .map_err(|e| RunError::Config(format!("plot: {e}")))?;
    }
    Ok(RunOutput { report, collected })
}

/// What a run sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Requests in the measured window.
    pub requests: u64,
    /// Invoices in them.
    pub invoices: u64,
    /// Requests including warm-up.
    pub requests_total: u64,
    /// Invoices including warm-up.
    pub invoices_total: u64,
}

impl Sent {
    fn add(&mut self, invoices: usize, measured: bool) {
        self.requests_total += 1;
        self.invoices_total += invoices as u64;
        if measured {
            self.requests += 1;
            self.invoices += invoices as u64;
        }
    }

    fn merge(&mut self, other: Sent) {
        self.requests += other.requests;
        self.invoices += other.invoices;
        self.requests_total += other.requests_total;
        self.invoices_total += other.invoices_total;
    }
}

/// The open loop's cap on requests in flight: `in_flight_max`, and
/// `in_flight_invoices_max` in whole requests but never below the streams that could be
/// in use at once (so the invoice cap never throttles the exchanges themselves).
fn in_flight_requests_max(scenario: &Scenario, shard_count: u16) -> u32 {
    let streams = u64::from(scenario.connections)
        * u64::from(scenario.streams)
        * if scenario.shard_aware {
            u64::from(shard_count)
        } else {
            1
        };
    let by_invoices = u64::from(scenario.in_flight_invoices_max)
        .div_ceil(u64::from(scenario.invoices_per_request.max(1)))
        .max(streams);
    u64::from(scenario.in_flight_max)
        .min(by_invoices)
        .try_into()
        .unwrap_or(u32::MAX)
}

#[allow(clippy::too_many_arguments)]
fn open_loop(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    scenario: &Scenario,
    rate: f64,
    state: &RunState,
    clock: Clock,
    measure_start_ns: u64,
    end_ns: u64,
    tx: Sender<Completion>,
    cpus: &CpuPicker,
) -> Result<Sent, RunError> {
    let per_frame = f64::from(scenario.invoices_per_request);
    let spacing_ns = per_frame * 1e9 / rate;
    if spacing_ns < 1.0 {
        return Err(RunError::Config(format!("rate {rate} too high")));
    }
    let handle = rt.handle().clone();
    let in_flight_max = in_flight_requests_max(scenario, target.shard_count);
    let in_flight = Arc::new(Semaphore::new(in_flight_max as usize));
    let drained = in_flight.clone();
    let generator = state.generator.clone();
    let clients = target.clients.clone();
    let shard_aware = target.shard_aware;
    // Sends request `k` (intended at `intended_ns`) on a new task; from the scheduler
    // thread through `handle`, or from the scheduler task itself.
    let send = move |handle: &tokio::runtime::Handle,
                     k: u64,
                     intended_ns: u64,
                     frame: Frame,
                     permit: tokio::sync::OwnedSemaphorePermit| {
        let Frame {
            shard,
            bytes,
            slots,
        } = frame;
        let measured = intended_ns >= measure_start_ns;
        let invoices = slots.len();
        let client = clients[(k % clients.len() as u64) as usize].clone();
        let tx = tx.clone();
        let shard_arg = shard_aware.then_some(shard);
        handle.spawn(async move {
            let sent_ns = clock.now_ns();
            let reply = client.exchange_raw(shard_arg, bytes).await;
            let done_ns = clock.now_ns();
            let _ = tx.send(Completion {
                intended_ns,
                sent_ns,
                done_ns,
                shard,
                measured,
                slots,
                reply,
            });
            // Released after the completion is sent: the end-of-run drain waits for it.
            drop(permit);
        });
        (invoices, measured)
    };
    // Intended times are computed from k, never from when the previous send happened:
    // falling behind does not move them.
    let intended = move |k: u64| LEAD_NS + (k as f64 * spacing_ns) as u64;
    let sent = match scenario.scheduler {
        Scheduler::Thread => {
            let scheduler_cpus = cpus.clone();
            // The thread reports its count over a oneshot that the runtime awaits: a
            // current-thread runtime runs the send tasks only while this thread is in
            // `block_on`, so it must not simply sit in `join`.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let scheduler = std::thread::Builder::new()
                .name("loadgen-scheduler".into())
                .spawn(move || {
                    scheduler_cpus.pin_next();
                    crate::tighten_timer_slack();
                    let mut generator = generator.lock().unwrap_or_else(|e| e.into_inner());
                    let mut sent = Sent::default();
                    let mut k: u64 = 0;
                    loop {
                        let intended_ns = intended(k);
                        if intended_ns >= end_ns {
                            break;
                        }
                        let frame = generator.next_frame();
                        let now = clock.now_ns();
                        if intended_ns > now {
                            std::thread::sleep(Duration::from_nanos(intended_ns - now));
                        }
                        let permit = match in_flight.clone().try_acquire_owned() {
                            Ok(permit) => permit,
                            Err(_) => match handle.block_on(in_flight.clone().acquire_owned()) {
                                Ok(permit) => permit,
                                Err(_) => break,
                            },
                        };
                        let (invoices, measured) = send(&handle, k, intended_ns, frame, permit);
                        sent.add(invoices, measured);
                        k += 1;
                    }
                    let _ = done_tx.send(sent);
                })?;
            let sent = rt.block_on(done_rx);
            scheduler
                .join()
                .map_err(|_| RunError::Config("scheduler thread panicked".into()))?;
            sent.map_err(|_| RunError::Config("scheduler thread ended without a count".into()))
        }
        Scheduler::Runtime => rt.block_on(async move {
            let handle = tokio::runtime::Handle::current();
            // µs precision without leaving the runtime's thread (tokio's own timer ticks
            // in ms); everything already due when the task runs goes out at once.
            let timer = crate::timer::PreciseTimer::new()?;
            let mut sent = Sent::default();
            let mut k: u64 = 0;
            // End of the last sleep: the next may not end before it + SLEEP_SPACING_NS.
            let mut woke_ns: u64 = 0;
            loop {
                let intended_ns = intended(k);
                if intended_ns >= end_ns {
                    break;
                }
                let now = clock.now_ns();
                if intended_ns > now {
                    let wake_ns = intended_ns.max(woke_ns + SLEEP_SPACING_NS);
                    timer.sleep_until(clock.instant(wake_ns)).await?;
                    woke_ns = wake_ns;
                }
                let permit = match in_flight.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => break,
                };
                // Locked per frame: the guard must not live across the awaits (no one
                // else takes it during an open-loop run, so it costs an uncontended lock).
                let frame = generator
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_frame();
                let (invoices, measured) = send(&handle, k, intended_ns, frame, permit);
                sent.add(invoices, measured);
                k += 1;
                if k % 64 == 0 {
                    // Falling behind, this loop never sleeps: let the sends just spawned
                    // (and replies) run on this thread.
                    tokio::task::yield_now().await;
                }
            }
            Ok(sent)
        }),
    }?;
    // Drive the runtime until every request sent has completed (each holds a permit until
    // its completion is with the collector): a current-thread runtime runs its tasks only
    // inside `block_on`, and the collector ends only when the last task is done. Bounded
    // by the exchange timeout.
    let _all = rt.block_on(drained.acquire_many_owned(in_flight_max));
    Ok(sent)
}

#[allow(clippy::too_many_arguments)]
fn closed_loop(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    scenario: &Scenario,
    state: &RunState,
    clock: Clock,
    measure_start_ns: u64,
    end_ns: u64,
    tx: Sender<Completion>,
) -> Sent {
    let workers = scenario.connections as usize * scenario.streams as usize;
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        // Start together at the lead, like the open loop's first send.
        tokio::time::sleep_until(clock.instant(LEAD_NS).into()).await;
        for w in 0..workers {
            let client = target.clients[w % target.clients.len()].clone();
            let generator = state.generator.clone();
            let tx = tx.clone();
            let shard_aware = target.shard_aware;
            tasks.spawn(async move {
                let mut sent = Sent::default();
                loop {
                    let sent_ns = clock.now_ns();
                    if sent_ns >= end_ns {
                        break;
                    }
                    let Frame {
                        shard,
                        bytes,
                        slots,
                    } = generator
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .next_frame();
                    let measured = sent_ns >= measure_start_ns;
                    sent.add(slots.len(), measured);
                    let reply = client
                        .exchange_raw(shard_aware.then_some(shard), bytes)
                        .await;
                    let done_ns = clock.now_ns();
                    let _ = tx.send(Completion {
                        intended_ns: sent_ns,
                        sent_ns,
                        done_ns,
                        shard,
                        measured,
                        slots,
                        reply,
                    });
                }
                sent
            });
        }
        drop(tx);
        let mut total = Sent::default();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(sent) = joined {
                total.merge(sent);
            }
        }
        total
    })
}

/// The output directory of sweep step `index` at `rate`.
pub fn step_dir(out: &Path, index: usize, rate: f64) -> PathBuf {
    out.join(format!("step-{:02}-{:.0}", index + 1, rate))
}
