//! Against a real appliance on loopback: the tax-server emulator and `appliance serve` run
//! as child processes (as in appliance/server/tests/quic_e2e.rs); loadgen runs a short
//! fixed-rate scenario with retries and red invoices and its reports are checked against
//! themselves and against the appliance's own Prometheus counters.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use appliance_client::pki::DevPki;
use appliance_server::child::ListeningChild;
use appliance_server::workload::{invoice_code, seller};
use loadgen::run::{run_once, RunState, Target};
use loadgen::CpuPicker;

const SELLERS: u32 = 3;

/// The `appliance` binary of this build profile. Cargo builds a package's binaries only
/// for that package's own tests; `cargo test --workspace` (CI) compiles appliance-server's
/// tests, and so the binary, before running any test. When it is missing (`cargo test -p
/// loadgen` on a fresh tree) it is built here. An existing binary is used as is: after
/// changing the appliance, rebuild it (`cargo build -p appliance-server`) or set
/// `LOADGEN_BUILD_APPLIANCE=1`.
fn appliance_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_owned();
    let bin = profile_dir.join("appliance");
    if bin.exists() && std::env::var_os("LOADGEN_BUILD_APPLIANCE").is_none() {
        return bin;
    }
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut build = Command::new(cargo);
    build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--quiet",
        "-p",
        "appliance-server",
        "--bin",
        "appliance",
    ]);
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "building the appliance binary failed");
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

fn metrics(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn config(dir: &Path, pki: &DevPki, hsm: SocketAddr, control: SocketAddr) -> PathBuf {
    let taxpayers: String = (0..SELLERS)
        .map(|i| {
            format!(
                "[[taxpayers]]\nid = \"{}\"\nceiling_fen = 10000000\nlow_watermark = 20000\nrefill_count = 60000\n",
                seller(i)
            )
        })
        .collect();
    let text = format!(
        r#"data_dir = "{data}"
shards = 2
cpus = []
[listen]
service = "127.0.0.1:0"
control = "{control}"
[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"
[[clients]]
identity = "ticketing"
sellers = ["*"]
[tax_server]
route = "tcp://{hsm}"
{taxpayers}
[limits]
index_capacity_orders = 400000
"#,
        data = dir.join("data").display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
    );
    let path = dir.join("appliance.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn fixed_rate_run_against_the_appliance() {
    let bin = appliance_bin();
    let dir = tempfile::tempdir().unwrap();
    let pki =
        DevPki::generate(&dir.path().join("pki"), &["appliance.test"], &["ticketing"]).unwrap();
    let mut emulator = Command::new(&bin);
    emulator
        .arg("hsm-emu")
        .arg("--data-dir")
        .arg(dir.path().join("hsm"))
        .args(["--listen", "127.0.0.1:0"]);
    for i in 0..SELLERS {
        emulator
            .arg("--taxpayer")
            .arg(format!("{}:{}:1:99999999", seller(i), invoice_code(i)));
    }
    let emulator = ListeningChild::spawn(emulator, Duration::from_secs(60)).unwrap();
    let control = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut serve = Command::new(&bin);
    serve
        .arg("serve")
        .arg("--config")
        .arg(config(dir.path(), &pki, emulator.addr(), control));
    let appliance = ListeningChild::spawn(serve, Duration::from_secs(60)).unwrap();

    let client = pki.client("ticketing").unwrap();
    let mut scenario = common::scenario(appliance.addr(), &pki.ca);
    scenario.cert = Some(client.cert.clone());
    scenario.key = Some(client.key.clone());
    scenario.sellers = SELLERS;
    scenario.rate = 4_000.0;
    scenario.invoices_per_request = 10;
    scenario.duration_s = 2.0;
    scenario.warmup_s = 0.5;
    scenario.mix.retry_share = 0.2;
    scenario.mix.red_share = 0.05;
    scenario.mix.lines_max = 4;
    scenario.objective.p99_ms = 10_000.0;

    let rt = common::runtime(2);
    let target = rt.block_on(Target::connect(&scenario)).unwrap();
    assert_eq!(target.shard_count, 2);
    let mut state = RunState::new(&scenario, &target);
    let out = dir.path().join("out");
    let output = run_once(
        &rt,
        &target,
        &scenario,
        scenario.rate,
        &mut state,
        Some(&out),
        &CpuPicker::new(&[]),
    )
    .unwrap();
    rt.block_on(target.close());
    let r = &output.report;
    eprintln!("{}", r.text());

    // Every answer verified: no refusals, no duplicate number, every retry answered with
    // the invoice first issued.
    assert_eq!(r.errors_total, 0, "{:?}", r.errors);
    assert_eq!(r.warmup_errors_total, 0);
    assert!(r.invoices_replayed > 0, "the retry share produced replays");
    // Counts add up.
    assert_eq!(r.requests_sent, r.requests_completed);
    assert_eq!(r.invoices_sent, r.invoices_completed);
    assert_eq!(r.invoices_completed, 10 * r.requests_completed);
    assert_eq!(
        r.invoices_issued + r.invoices_replayed,
        r.invoices_completed
    );
    let (intervals, untagged, tagged) = common::read_hlog(&out.join("latency.hlog"));
    assert!(intervals >= 2);
    assert_eq!(untagged, r.requests_completed);
    assert_eq!(tagged, r.requests_completed);
    for file in ["summary.json", "latency-percentiles.svg", "timeline.svg"] {
        assert!(out.join(file).exists(), "{file}");
    }
    // The appliance agrees: it issued exactly the distinct numbers loadgen saw (warm-up
    // included), and replayed at least the measured retries.
    let m = metrics(control);
    let [fresh, retries, reds] = state.generated();
    assert_eq!(
        counter(&m, "einvoice_issued_invoices_total"),
        r.distinct_numbers
    );
    assert_eq!(r.distinct_numbers, fresh + reds);
    assert_eq!(counter(&m, "einvoice_replayed_invoices_total"), retries);
    assert!(r.invoices_replayed <= retries);
}
