//! Start-up with real processes (`appliance serve`, `appliance init` and the tax-server
//! emulator as children): exclusive ports, the appliance identity, the volatile data
//! dir refusal, and a restart right after SIGKILL under load.

use appliance_client::pki::DevPki;
use appliance_client::{Client, ClientConfig, ItemResult, RetryPolicy};
use appliance_core::IssueRequest;
use appliance_server::child::ListeningChild;
use appliance_server::workload::{invoice_code, seller, ticket_request};
use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SELLERS: u32 = 2;
const APPLIANCE: &str = env!("CARGO_BIN_EXE_appliance");

/// A test's directory (on the target dir's disk filesystem), PKI and emulator.
struct Setup {
    dir: PathBuf,
    pki: DevPki,
    emulator: ListeningChild,
}

/// What one `serve` instance is configured with.
struct Instance {
    data_dir: PathBuf,
    service: SocketAddr,
    shard_ports: Vec<u16>,
    control: SocketAddr,
    extra: &'static str,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = DevPki::generate(&dir.join("pki"), &["appliance.test"], &["ticketing"]).unwrap();
        let mut command = Command::new(APPLIANCE);
        command
            .arg("hsm-emu")
            .arg("--data-dir")
            .arg(dir.join("hsm"))
            .args(["--listen", "127.0.0.1:0"]);
        for i in 0..SELLERS {
            command
                .arg("--taxpayer")
                .arg(format!("{}:{}:1:99999999", seller(i), invoice_code(i)));
        }
        let emulator = ListeningChild::spawn(command, Duration::from_secs(60)).unwrap();
        Setup { dir, pki, emulator }
    }

    /// An instance with its own data dir `name`, on `service` (port 0 = free ports).
    fn instance(&self, name: &str, service: SocketAddr, shard_ports: Vec<u16>) -> Instance {
        Instance {
            data_dir: self.dir.join(name),
            service,
            shard_ports,
            control: free_tcp_port(),
            extra: "",
        }
    }

    /// Writes `instance`'s configuration (one shard, small limits: quick to start).
    fn config(&self, instance: &Instance) -> PathBuf {
        let path = instance.data_dir.with_extension("toml");
        let taxpayers: String = (0..SELLERS)
            .map(|i| {
                format!(
                    "[[taxpayers]]\nid = \"{}\"\nceiling_fen = 10000000\nlow_watermark = 200\nrefill_count = 1000\n",
                    seller(i)
                )
            })
            .collect();
        let ports: Vec<String> = instance.shard_ports.iter().map(u16::to_string).collect();
        let text = format!(
            r#"data_dir = "{data}"
runtime_dir = "{runtime}"
shards = {shards}
cpus = []
{extra}
[listen]
service = "{service}"
shard_ports = [{ports}]
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
index_capacity_orders = 20000
journal_segment_bytes = 67108864
"#,
            data = instance.data_dir.display(),
            runtime = self.dir.join("run").display(),
            shards = instance.shard_ports.len().max(1),
            extra = instance.extra,
            service = instance.service,
            ports = ports.join(", "),
            control = instance.control,
            cert = self.pki.server_cert.display(),
            key = self.pki.server_key.display(),
            ca = self.pki.ca.display(),
            hsm = self.emulator.addr(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn serve_command(&self, instance: &Instance) -> Command {
        let mut command = Command::new(APPLIANCE);
        command
            .arg("serve")
            .arg("--config")
            .arg(self.config(instance));
        command
    }

    /// Starts `instance`; panics if it does not serve.
    fn start(&self, instance: &Instance) -> ListeningChild {
        ListeningChild::spawn(self.serve_command(instance), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("serve did not start: {e}"))
    }

    fn client(&self, rt: &tokio::runtime::Runtime, addr: SocketAddr) -> Client {
        let client = self.pki.client("ticketing").unwrap();
        let mut config = ClientConfig::from_pem_files(
            addr,
            "localhost",
            &self.pki.ca,
            Some((&client.cert, &client.key)),
        )
        .unwrap();
        config.shard_aware = true;
        // A connection to a killed instance is abandoned, not retried at length.
        config.retry = RetryPolicy {
            attempts_max: 1,
            ..RetryPolicy::default()
        };
        rt.block_on(Client::connect(config)).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.emulator.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A UDP port free right now (the kernel's pick).
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn orders(prefix: &str, count: u64) -> Vec<IssueRequest> {
    (0..count)
        .map(|n| ticket_request(seller((n % u64::from(SELLERS)) as u32), prefix, n))
        .collect()
}

/// Issues `requests` and asserts every one was issued (or replayed).
fn issue_all(rt: &tokio::runtime::Runtime, client: &Client, requests: Vec<IssueRequest>) {
    for outcome in rt.block_on(client.issue(requests)) {
        assert!(
            matches!(
                outcome,
                Ok(ItemResult::Issued(_)) | Ok(ItemResult::Replayed(_))
            ),
            "not issued: {outcome:?}"
        );
    }
}

/// Runs `command` to its exit (bounded: a process still serving after a minute is a
/// failure, so a `serve` that should have been refused cannot hang the test).
fn run_to_exit(mut command: Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} was still running after a minute (it should have exited)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

#[test]
fn a_second_instance_on_the_same_service_address_is_refused() {
    let setup = Setup::new("startup-second");
    let rt = runtime();
    let service = loopback(free_udp_port());
    let first = setup.instance("first", service, vec![free_udp_port()]);
    let mut serving = setup.start(&first);

    // Its own data dir and shard port, the same service address.
    let second = setup.instance("second", service, vec![free_udp_port()]);
    let output = run_to_exit(setup.serve_command(&second));
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "second instance: {stderr}{}",
        text(&output.stdout)
    );
    let expected = format!(
        "service address {service} is already served by another appliance (pid {}, data dir {}); lock {}",
        serving.pid(),
        first.data_dir.display(),
        setup
            .dir
            .join("run")
            .join(format!("udp-{}.lock", service.port()))
            .display()
    );
    assert!(stderr.contains(&expected), "{stderr}\nexpected: {expected}");
    // Refused before touching its data dir's contents.
    assert!(!second.data_dir.join("identity.toml").exists());

    // The first still serves, alone.
    let client = setup.client(&rt, serving.addr());
    issue_all(&rt, &client, orders("SECOND", 20));
    rt.block_on(client.close());
    // Its status shows the identity its data dir was given.
    let status = http_get(first.control, "/status");
    let id = identity_id(&first.data_dir);
    assert!(
        status.contains(&format!("\"appliance\":{{\"id\":\"{id}\"")),
        "{status}"
    );
    serving.kill();
}

#[test]
fn a_second_instance_on_the_same_data_dir_is_refused() {
    let setup = Setup::new("startup-datadir");
    let first = setup.instance("data", loopback(0), Vec::new());
    let mut serving = setup.start(&first);
    let second = setup.instance("data", loopback(0), Vec::new());
    let output = run_to_exit(setup.serve_command(&second));
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "data dir {} is already used by another appliance (pid {}",
            first.data_dir.display(),
            serving.pid()
        )),
        "{stderr}"
    );
    serving.kill();
}

#[test]
fn a_tmpfs_data_dir_is_refused_unless_allowed() {
    let shm = Path::new("/dev/shm");
    match appliance_server::ownership::volatile_filesystem(shm) {
        Ok(Some("tmpfs")) => {}
        other => {
            println!("skipped: /dev/shm is not a tmpfs here ({other:?})");
            return;
        }
    }
    let setup = Setup::new("startup-tmpfs");
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let volatile = RemoveDir(shm.join(format!("einvoice-startup-test-{}", std::process::id())));
    let mut instance = setup.instance("tmpfs", loopback(0), Vec::new());
    instance.data_dir = volatile.0.clone();
    let output = run_to_exit(setup.serve_command(&instance));
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "data dir {} is on tmpfs, which loses its contents at reboot",
            volatile.0.display()
        )) && stderr.contains("unsafe_allow_volatile_data_dir = true"),
        "{stderr}"
    );
    assert!(!volatile.0.join("identity.toml").exists());

    instance.extra = "unsafe_allow_volatile_data_dir = true";
    let mut serving = setup.start(&instance);
    assert!(volatile.0.join("identity.toml").exists());
    serving.kill();
}

#[test]
fn init_creates_an_identity_once_and_journals_without_one_are_refused() {
    let setup = Setup::new("startup-init");
    let data = setup.dir.join("initialised");
    let init = |name: &str| {
        let mut command = Command::new(APPLIANCE);
        command
            .arg("init")
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", name]);
        run_to_exit(command)
    };
    let output = init("north-1");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let identity = std::fs::read_to_string(data.join("identity.toml")).unwrap();
    assert!(identity.contains("name = \"north-1\""), "{identity}");
    assert!(text(&output.stdout).contains("(north-1)"));
    let output = init("north-2");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("already has an appliance identity"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(data.join("identity.toml")).unwrap(),
        identity
    );

    // An initialised data dir serves with that identity.
    let instance = setup.instance("initialised", loopback(0), Vec::new());
    let mut serving = setup.start(&instance);
    let status = http_get(instance.control, "/status");
    assert!(status.contains("\"name\":\"north-1\""), "{status}");
    serving.kill();

    // Journals without an identity (an older build's, or the identity was lost).
    let orphan = setup.instance("orphan", loopback(0), Vec::new());
    std::fs::create_dir_all(orphan.data_dir.join("shard-0")).unwrap();
    std::fs::write(
        orphan.data_dir.join("shard-0/00000000000000000001.journal"),
        b"records",
    )
    .unwrap();
    let output = run_to_exit(setup.serve_command(&orphan));
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("holds journals") && stderr.contains("Restore identity.toml"),
        "{stderr}"
    );
    assert!(!orphan.data_dir.join("identity.toml").exists());
}

/// Kill -9 and restart at once, 50 times, on fixed ports, with orders in flight at each
/// kill: every restart must bind (the dead process's sockets linger for a few
/// milliseconds after it is reaped).
#[test]
fn a_restart_right_after_kill_9_binds_every_time() {
    const CYCLES: u64 = 50;
    let setup = Setup::new("startup-restart");
    let rt = runtime();
    // One shard: the quickest start, so the restart binds while the dead process's
    // sockets are most likely still there.
    let instance = setup.instance("data", loopback(free_udp_port()), vec![free_udp_port()]);
    let mut serving = setup.start(&instance);
    let identity = std::fs::read_to_string(instance.data_dir.join("identity.toml")).unwrap();
    for cycle in 0..CYCLES {
        let client = setup.client(&rt, serving.addr());
        issue_all(&rt, &client, orders(&format!("R{cycle}-"), 10));
        // Orders in flight when the process dies.
        let load = {
            let client = client.clone();
            let requests = orders(&format!("L{cycle}-"), 200);
            rt.spawn(async move { client.issue(requests).await })
        };
        serving.kill();
        // No pause: restart at once.
        serving =
            match ListeningChild::spawn(setup.serve_command(&instance), Duration::from_secs(60)) {
                Ok(child) => child,
                Err(e) => panic!("cycle {cycle}: the restart failed: {e} (its error is above)"),
            };
        load.abort();
        drop(client);
    }
    let client = setup.client(&rt, serving.addr());
    issue_all(&rt, &client, orders("AFTER", 10));
    rt.block_on(client.close());
    serving.kill();
    // The identity did not change over the restarts.
    assert_eq!(
        std::fs::read_to_string(instance.data_dir.join("identity.toml")).unwrap(),
        identity
    );
}

/// The invoices of `outcomes` (issued or replayed), by invoice identity.
fn invoices(outcomes: Vec<appliance_client::IssueOutcome>) -> Vec<appliance_client::Issued> {
    outcomes
        .into_iter()
        .map(|outcome| match outcome {
            Ok(ItemResult::Issued(i) | ItemResult::Replayed(i)) => i,
            other => panic!("not issued: {other:?}"),
        })
        .collect()
}

/// `serve` with its log (stderr) in `log`.
fn start_logged(setup: &Setup, instance: &Instance, log: &Path) -> ListeningChild {
    let mut command = setup.serve_command(instance);
    command.stderr(std::fs::File::create(log).unwrap());
    ListeningChild::spawn(command, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("serve did not start: {e}"))
}

/// Two appliances with their own data dirs on one tax server never share a number, and
/// an appliance whose data dir was wiped is a new holder: it adopts nothing of its former
/// self and gets new segments.
#[test]
fn two_appliances_on_one_tax_server_never_share_a_number_even_after_a_wipe() {
    const ORDERS: u64 = 10_000;
    let setup = Setup::new("uniq-two");
    let rt = runtime();
    let a = setup.instance("a", loopback(free_udp_port()), vec![free_udp_port()]);
    let b = setup.instance("b", loopback(free_udp_port()), vec![free_udp_port()]);
    let mut serving_a = setup.start(&a);
    let mut serving_b = setup.start(&b);
    let client_a = setup.client(&rt, serving_a.addr());
    let client_b = setup.client(&rt, serving_b.addr());
    let mut seen = std::collections::HashMap::new();
    // In batches that the pools (1,000 numbers a refill) keep up with.
    for (name, client) in [("A", &client_a), ("B", &client_b)] {
        for batch in orders(name, ORDERS).chunks(200) {
            for invoice in invoices(rt.block_on(client.issue(batch.to_vec()))) {
                if let Some(other) = seen.insert(invoice.identity, name) {
                    panic!("{:?} issued by {other} and {name}", invoice.identity);
                }
            }
        }
    }
    assert_eq!(seen.len() as u64, 2 * ORDERS);
    rt.block_on(client_b.close());

    // B's disk is lost: a fresh data dir, the same ports, the same tax server.
    let lost_id = identity_id(&b.data_dir);
    serving_b.kill();
    std::fs::remove_dir_all(&b.data_dir).unwrap();
    let log = setup.dir.join("b-again.log");
    let mut serving_b = start_logged(&setup, &b, &log);
    let client_b = setup.client(&rt, serving_b.addr());
    for batch in orders("B2", 2_000).chunks(200) {
        for invoice in invoices(rt.block_on(client_b.issue(batch.to_vec()))) {
            if let Some(other) = seen.insert(invoice.identity, "B after the wipe") {
                panic!(
                    "{:?} issued by {other}, then again by B after the wipe",
                    invoice.identity
                );
            }
        }
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("adopted a segment"), "{log}");
    assert_ne!(identity_id(&b.data_dir), lost_id);

    // The operator gives the lost appliance's unused numbers back: a dry run lists them,
    // --execute returns them, and then none are left to return.
    let release = |execute: bool| {
        let mut command = Command::new(APPLIANCE);
        command.args([
            "release-holder",
            "--tax-server",
            &format!("tcp://{}", setup.emulator.addr()),
            "--appliance-id",
            &lost_id,
        ]);
        if execute {
            command.arg("--execute");
        }
        let output = run_to_exit(command);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    let dry = release(false);
    let listed = |out: &str, verb: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_suffix(&format!(" numbers {verb}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no total in {out}"))
    };
    assert!(dry.contains("dry run"), "{dry}");
    let unused = listed(&dry, "to return");
    assert!(unused > 0, "{dry}");
    assert_eq!(listed(&release(true), "returned"), unused);
    assert_eq!(listed(&release(false), "to return"), 0);
    // Returning them changed nothing for the live appliances.
    issue_all(&rt, &client_a, orders("A-AFTER", 100));
    issue_all(&rt, &client_b, orders("B-AFTER", 100));
    rt.block_on(client_a.close());
    rt.block_on(client_b.close());
    serving_a.kill();
    serving_b.kill();
}

/// The appliance id in `data_dir`'s identity file.
fn identity_id(data_dir: &Path) -> String {
    appliance_server::identity::load(data_dir)
        .unwrap()
        .expect("an identity")
        .id_hex()
}

/// The block offsets of `file`'s commits (a commit header record starts every commit, at
/// a 4 KiB block boundary).
fn commit_offsets(bytes: &[u8]) -> Vec<usize> {
    use appliance_core::journal::frame::{KIND_COMMIT, RECORD_MAGIC};
    (0..bytes.len() / 4096)
        .map(|b| b * 4096)
        .filter(|&o| bytes[o..o + 4] == RECORD_MAGIC && bytes[o + 16] == KIND_COMMIT)
        .collect()
}

/// One flipped byte in the last (acknowledged) commit of a stopped appliance's journal:
/// the restart says what it dropped, and no number comes back with a tax code other than
/// the one the tax server gave it first (the dropped commit's numbers are spoiled, the
/// resent orders get new numbers).
#[test]
fn a_damaged_last_commit_never_gets_its_numbers_coded_again() {
    let setup = Setup::new("uniq-flip");
    let rt = runtime();
    let a = setup.instance("a", loopback(free_udp_port()), vec![free_udp_port()]);
    let mut serving = setup.start(&a);
    let client = setup.client(&rt, serving.addr());
    issue_all(&rt, &client, orders("EARLY", 30));
    let first = invoices(rt.block_on(client.issue(orders("FLIP", 28))));
    rt.block_on(client.close());
    serving.kill();

    // The newest segment file's last commit holds the 28 invoices: flip a byte in its
    // first record.
    let shard_dir = a.data_dir.join("shard-0");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&shard_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let segment = files
        .iter()
        .rev()
        .find(|p| !commit_offsets(&std::fs::read(p).unwrap()).is_empty())
        .expect("a journal segment with commits")
        .clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    let last = *commit_offsets(&bytes).last().unwrap();
    bytes[last + appliance_core::journal::frame::COMMIT_HEADER_RECORD_BYTES + 40] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    let log = setup.dir.join("after-flip.log");
    let mut serving = start_logged(&setup, &a, &log);
    let client = setup.client(&rt, serving.addr());
    let again = invoices(rt.block_on(client.issue(orders("FLIP", 28))));
    let coded: std::collections::HashMap<_, _> = first
        .iter()
        .map(|i| (i.identity, i.tax_control_code))
        .collect();
    let mut reissued = 0;
    for invoice in &again {
        match coded.get(&invoice.identity) {
            Some(code) => assert_eq!(
                *code, invoice.tax_control_code,
                "{:?} came back with another tax code",
                invoice.identity
            ),
            None => reissued += 1,
        }
    }
    assert_eq!(reissued, 28, "the dropped commit's orders are issued anew");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("corrupt acknowledged commit"), "{log}");
    assert!(
        log.contains("the tax server coded numbers the journal holds no invoice for"),
        "{log}"
    );
    let metrics = http_get(a.control, "/metrics");
    assert!(
        metrics.contains("einvoice_spoiled_at_start_total{shard=\"0\"} 28\n"),
        "{metrics}"
    );
    rt.block_on(client.close());
    serving.kill();
}

/// A small idempotency index: the log warns at 80 % and 95 %, the gauges show it, and the
/// refusal (not retryable) names the setting to raise.
#[test]
fn a_small_index_warns_as_it_fills_then_refuses_naming_the_setting() {
    const CAPACITY: u64 = 16;
    let setup = Setup::new("uniq-index");
    let rt = runtime();
    let a = setup.instance("a", loopback(free_udp_port()), vec![free_udp_port()]);
    let path = setup.config(&a);
    let text = std::fs::read_to_string(&path).unwrap();
    let small = text.replace(
        "index_capacity_orders = 20000",
        &format!("index_capacity_orders = {CAPACITY}"),
    );
    assert_ne!(small, text);
    let log = setup.dir.join("index.log");
    let mut command = Command::new(APPLIANCE);
    command.arg("serve").arg("--config").arg(&path);
    // `serve_command` would rewrite the file: start from the edited one.
    std::fs::write(&path, small).unwrap();
    command.stderr(std::fs::File::create(&log).unwrap());
    let mut serving = ListeningChild::spawn(command, Duration::from_secs(60)).unwrap();
    let client = setup.client(&rt, serving.addr());
    let mut issued = 0;
    let mut refusals = Vec::new();
    // One order per request, so that every tick reports the fill it reached.
    for order in orders("IDX", CAPACITY + 4) {
        for outcome in rt.block_on(client.issue(vec![order])) {
            match outcome {
                Ok(ItemResult::Issued(_)) => issued += 1,
                Ok(ItemResult::Failed { code, message }) => refusals.push((code, message)),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(issued, CAPACITY, "{refusals:?}");
    assert_eq!(refusals.len(), 4);
    for (code, message) in &refusals {
        assert_eq!(*code, appliance_client::ErrorCode::IndexFull);
        assert!(!code.is_retryable());
        assert!(
            message.contains("limits.index_capacity_orders"),
            "{message}"
        );
    }
    let metrics = http_get(a.control, "/metrics");
    assert!(
        metrics.contains(&format!(
            "einvoice_index_entries{{shard=\"0\"}} {CAPACITY}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "einvoice_index_capacity{{shard=\"0\"}} {CAPACITY}\n"
        )),
        "{metrics}"
    );
    rt.block_on(client.close());
    serving.kill();
    let log = std::fs::read_to_string(&log).unwrap();
    for line in [
        "index 80 % full",
        "index 95 % full",
        "idempotency index full",
    ] {
        assert!(log.contains(line), "no {line:?} in {log}");
    }
    assert!(log.contains("limits.index_capacity_orders"), "{log}");
}
