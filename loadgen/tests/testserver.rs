//! Against loadgen's own protocol test server (in process, loopback QUIC): reports and
//! counts, coordinated omission, and the sweep's capacity search.

mod common;

use std::time::Duration;

use loadgen::run::{run_once, RunState, Target};
use loadgen::scenario::{Mode, Scenario};
use loadgen::testserver::{TestServer, TestServerOptions};
use loadgen::CpuPicker;

/// The tests measure latency: run them one at a time so that they do not compete for
/// the machine's cores (cargo runs a file's tests on parallel threads).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn start(options: TestServerOptions, dir: &std::path::Path) -> TestServer {
    TestServer::start(options, &dir.join("pki")).unwrap()
}

fn run(
    rt: &tokio::runtime::Runtime,
    scenario: &Scenario,
    out: Option<&std::path::Path>,
) -> loadgen::run::RunOutput {
    let target = rt.block_on(Target::connect(scenario)).unwrap();
    let mut state = RunState::new(scenario, &target);
    let output = run_once(
        rt,
        &target,
        scenario,
        scenario.rate,
        &mut state,
        out,
        &CpuPicker::new(&[]),
    )
    .unwrap();
    rt.block_on(target.close());
    output
}

#[test]
fn fixed_rate_with_retries_and_reds_reports_and_counts_add_up() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        TestServerOptions {
            shards: 2,
            ..TestServerOptions::default()
        },
        dir.path(),
    );
    let rt = common::runtime(2);
    let mut scenario = common::scenario(server.addr, &server.pki.ca);
    scenario.rate = 3_000.0;
    scenario.invoices_per_request = 5;
    scenario.mix.retry_share = 0.3;
    scenario.mix.red_share = 0.1;
    scenario.mix.lines_max = 4;
    let out = dir.path().join("out");
    let output = run(&rt, &scenario, Some(&out));
    let r = &output.report;
    assert_eq!(r.errors_total, 0, "{}", r.text());
    assert_eq!(r.warmup_errors_total, 0);
    assert_eq!(r.shards, 2);
    assert_eq!(r.requests_sent, r.requests_completed);
    assert_eq!(r.invoices_sent, r.invoices_completed);
    assert_eq!(r.invoices_completed, 5 * r.requests_completed);
    assert_eq!(
        r.invoices_issued + r.invoices_replayed,
        r.invoices_completed
    );
    assert!(r.invoices_replayed > 0 && r.invoices_issued > 0);
    // Every number the server handed out was seen once (warm-up included).
    assert_eq!(r.distinct_numbers, server.numbers());
    assert_eq!(
        r.latency_by_shard.iter().map(|p| p.count).sum::<u64>(),
        r.latency.count
    );
    for file in [
        "summary.json",
        "latency.hlog",
        "latency-percentiles.svg",
        "timeline.svg",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    let (intervals, untagged, tagged) = common::read_hlog(&out.join("latency.hlog"));
    assert!(intervals >= 1);
    assert_eq!(untagged, r.requests_completed, "hlog intervals add up");
    assert_eq!(tagged, r.requests_completed, "per-shard intervals add up");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["requests_completed"], r.requests_completed);
    assert!(summary["verdict"]["met"].as_bool().unwrap());
}

#[test]
fn coordinated_omission_open_loop_shows_the_stall_closed_loop_hides_it() {
    let _serial = serial();
    let stall = Duration::from_millis(500);
    let options = TestServerOptions {
        stall: Some((Duration::from_millis(400), stall)),
        stateful: false,
        ..TestServerOptions::default()
    };
    let rt = common::runtime(2);
    let dir = tempfile::tempdir().unwrap();

    let server = start(options.clone(), dir.path());
    let mut scenario = common::scenario(server.addr, &server.pki.ca);
    scenario.warmup_s = 0.0;
    scenario.duration_s = 2.0;
    scenario.rate = 1_000.0;
    let open = run(&rt, &scenario, None).report;
    drop(server);

    let server = start(options, dir.path());
    let mut scenario = common::scenario(server.addr, &server.pki.ca);
    scenario.warmup_s = 0.0;
    scenario.duration_s = 2.0;
    scenario.mode = Mode::Closed;
    scenario.streams = 4;
    let closed = run(&rt, &scenario, None).report;

    eprintln!("{}{}", open.text(), closed.text());
    let stall_ms = stall.as_secs_f64() * 1e3;
    let ms = |us: f64| us / 1e3;
    // Open loop: requests meant to go out during the stall wait for its end, from
    // stall_ms down to 0, i.e. stall/duration = 25% of them; so p99 is the stall less 1%
    // of the run (20 ms), and the worst is the whole stall.
    assert!(
        ms(open.latency.p99_us) >= stall_ms - 20.0 - 10.0,
        "open loop p99 {} ms hides the stall\n{}",
        ms(open.latency.p99_us),
        open.text()
    );
    assert!(
        ms(open.latency.max_us) >= stall_ms * 0.95,
        "{}",
        open.text()
    );
    assert!(ms(open.latency.p90_us) >= stall_ms * 0.5, "{}", open.text());
    // Closed loop: only the 4 requests in flight saw the stall; everything else was
    // simply not sent, so the percentiles look healthy and only the max shows it.
    assert!(
        ms(closed.latency.p99_us) < stall_ms / 5.0,
        "closed loop p99 {} ms\n{}",
        ms(closed.latency.p99_us),
        closed.text()
    );
    assert!(
        ms(closed.latency.max_us) >= stall_ms * 0.95,
        "{}",
        closed.text()
    );
    assert!(closed.mode_description.contains("UNCORRECTED"));
    assert_eq!(open.errors_total + closed.errors_total, 0);
}

#[test]
fn sweep_finds_a_known_capacity_within_one_step() {
    let _serial = serial();
    let capacity = 2_000.0;
    let step = 500.0;
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        TestServerOptions {
            capacity_invoices_per_s: Some(capacity),
            stateful: false,
            ..TestServerOptions::default()
        },
        dir.path(),
    );
    let rt = common::runtime(2);
    let mut scenario = common::scenario(server.addr, &server.pki.ca);
    scenario.invoices_per_request = 10;
    scenario.duration_s = 1.0;
    scenario.warmup_s = 0.3;
    scenario.sweep.start_rate = 500.0;
    scenario.sweep.step_rate = step;
    scenario.sweep.max_rate = 5_000.0;
    scenario.objective.p99_ms = 50.0;
    let target = rt.block_on(Target::connect(&scenario)).unwrap();
    let out = dir.path().join("sweep");
    let report = loadgen::sweep::sweep(
        &rt,
        &target,
        &scenario,
        Some(&out),
        &CpuPicker::new(&[]),
        |_| {},
    )
    .unwrap();
    rt.block_on(target.close());
    eprintln!("{}", report.text());
    let found = report.capacity_invoices_per_s.expect("some step met");
    assert!(
        found <= capacity && found >= capacity - step,
        "capacity {found} for a server of {capacity}\n{}",
        report.text()
    );
    assert_eq!(report.broke_at_invoices_per_s, Some(found + step));
    assert!(out.join("sweep.json").exists() && out.join("sweep.svg").exists());
    assert!(out.join("step-01-500").join("latency.hlog").exists());
}

#[test]
fn both_schedulers_send_exactly_the_planned_requests() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let server = start(TestServerOptions::default(), dir.path());
    // One thread is a current-thread runtime, which runs tasks only inside block_on: both
    // schedulers must still complete every request there.
    for (threads, scheduler) in [1, 2].into_iter().flat_map(|threads| {
        [
            loadgen::scenario::Scheduler::Thread,
            loadgen::scenario::Scheduler::Runtime,
        ]
        .map(|scheduler| (threads, scheduler))
    }) {
        let rt = common::runtime(threads);
        let mut scenario = common::scenario(server.addr, &server.pki.ca);
        scenario.scheduler = scheduler;
        scenario.rate = 2_000.0;
        scenario.invoices_per_request = 2;
        let r = run(&rt, &scenario, None).report;
        // 1 s at 1,000 requests/s: the intended times fix the count.
        assert!(
            r.requests_sent.abs_diff(1_000) <= 1,
            "{threads} {scheduler:?}: {}",
            r.text()
        );
        assert_eq!(r.requests_completed, r.requests_sent);
        assert_eq!(r.errors_total, 0, "{}", r.text());
        assert!(r.verdict.met, "{threads} {scheduler:?}: {}", r.text());
    }
}
