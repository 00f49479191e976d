//! Faults on the PCIe transport, against the real `hsm-emu` process: device reset and
//! queue error with commands in flight, ring and buffer back-pressure, corrupt
//! completions, the emulator killed and restarted, hostile regions, queue ownership.
//! No test asserts a timing; every wait is bounded.

mod emulator_support;
mod pcie_support;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use emulator_support::{invoice, seller_a, tp, Emu};
use hsm_driver::pcie::mem::{DeviceMemory, FileMapping};
use hsm_driver::pcie::regs::{
    self, queue_reg, BAR_BYTES, DEVICE_MAGIC, FAULT_CORRUPT_DATA, FAULT_CORRUPT_DESCRIPTOR,
    FAULT_QUEUE_ERROR, INTERFACE_VERSION, STATUS_READY,
};
use hsm_driver::pcie::{PcieClient, PcieClientConfig, QueueSelect};
use hsm_driver::proto::{FaultConfig, InvoiceBatch, Request, Response, TaxCodeStatus};
use hsm_driver::tcp::HsmError;

const CODE: u64 = 144_031_900_111;

struct Device {
    _emu: Emu,
    region: PathBuf,
    _regions: tempfile::TempDir,
    _data: tempfile::TempDir,
}

fn grant() -> String {
    format!("{}:{CODE}:1:1000000", seller_a())
}

fn start(extra: &[&str]) -> Device {
    let data = tempfile::tempdir().expect("tmp");
    let regions = pcie_support::region_dir();
    let region = pcie_support::region_in(&regions);
    let region_arg = region.to_string_lossy().into_owned();
    let g = grant();
    let mut args = vec!["--taxpayer", g.as_str(), "--pcie", region_arg.as_str()];
    args.extend_from_slice(extra);
    let emu = Emu::start(&data.path().join("emu"), &args);
    Device {
        _emu: emu,
        region,
        _regions: regions,
        _data: data,
    }
}

async fn connect(region: &Path, config: PcieClientConfig) -> PcieClient {
    PcieClient::connect(region, QueueSelect::Any, config)
        .await
        .expect("attach")
}

fn nop(tag: u64, len: usize) -> (Request, Vec<u8>) {
    let body: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(31).wrapping_add(tag) as u8)
        .collect();
    (Request::Nop(body.clone()), body)
}

async fn echo(client: &PcieClient, tag: u64, len: usize) -> Result<(), HsmError> {
    let (req, body) = nop(tag, len);
    match client.call(&req).await? {
        Response::Nop(b) if b == body => Ok(()),
        other => panic!("wrong echo {other:?}"),
    }
}

/// Waits (bounded) until `n` calls are in flight.
async fn until_in_flight(client: &PcieClient, n: usize) {
    let start = Instant::now();
    while client.in_flight() < n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "calls never got in flight"
        );
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
}

/// Stalls the device, puts `n` Nops in flight, applies `fault`, and checks that they
/// all fail with `ConnectionLost` and that the same client then works again.
fn in_flight_fault(fault: impl FnOnce(&PcieClient, &Path) + Send + 'static) {
    let dev = start(&["--allow-fault-injection"]);
    let region = dev.region.clone();
    let stats = pcie_support::run(move || async move {
        let client = Rc::new(connect(&region, pcie_support::config()).await);
        client
            .call(&Request::SetFaults(FaultConfig {
                stall_ms: 60_000,
                ..FaultConfig::default()
            }))
            .await
            .expect("stall");
        let calls: Vec<_> = (0..6u64)
            .map(|i| {
                let c = Rc::clone(&client);
                glommio::spawn_local(async move { echo(&c, i, 100).await })
            })
            .collect();
        until_in_flight(&client, 6).await;
        fault(&client, &region);
        for call in calls {
            match call.await {
                Err(HsmError::ConnectionLost) => {}
                other => panic!("in-flight call after fault: {other:?}"),
            }
        }
        assert_eq!(client.in_flight(), 0);
        // The shard carries on: the next calls re-attach (first one clears the stall).
        client
            .call(&Request::SetFaults(FaultConfig::default()))
            .await
            .expect("clear faults after re-attach");
        for i in 0..20 {
            echo(&client, i, 1000).await.expect("echo after fault");
        }
        client.stats()
    });
    assert!(stats.teardowns >= 1, "{stats:?}");
    assert!(stats.attaches >= 2, "{stats:?}");
    drop(dev);
}

#[test]
fn device_reset_with_commands_in_flight() {
    in_flight_fault(|client, _| client.reset_device());
}

#[test]
fn queue_error_with_commands_in_flight() {
    in_flight_fault(|client, region| {
        let q = client.queue().expect("attached");
        pcie_support::inject(region, FAULT_QUEUE_ERROR, q);
    });
}

#[test]
fn full_ring_and_data_area_push_back_without_loss() {
    // 4 ring entries and 1 MiB of buffers, 48 callers with commands of up to 300 KB.
    let dev = start(&["--pcie-queue-entries", "4", "--pcie-data-mib", "1"]);
    let region = dev.region.clone();
    let stats = pcie_support::run(move || async move {
        let client = Rc::new(connect(&region, pcie_support::config()).await);
        let seller = seller_a();
        let segment = match client
            .call(&Request::Requisition {
                taxpayer: tp(&seller),
                count: 1000,
                holder: hsm_driver::proto::Holder::new(0, 0),
                request_id: 1,
            })
            .await
            .expect("requisition")
        {
            Response::Requisition(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        let tasks: Vec<_> = (0..48u64)
            .map(|t| {
                let c = Rc::clone(&client);
                let seller = seller.clone();
                glommio::spawn_local(async move {
                    for round in 0..4u64 {
                        let len = ((t * 7919 + round * 104_729) % 300_000) as usize;
                        echo(&c, t * 10 + round, len)
                            .await
                            .expect("echo under pressure");
                    }
                    let mut batch = InvoiceBatch::new();
                    for i in 0..20u32 {
                        let n = segment.first + (t as u32 * 20 + i) % 1000;
                        batch
                            .push(&invoice(&seller, segment.code, n, false, 0))
                            .expect("fits");
                    }
                    match c.call(&Request::TaxCodes(batch)).await.expect("tax codes") {
                        Response::TaxCodes(items) => {
                            assert_eq!(items.len(), 20);
                            assert!(items.iter().all(|i| i.status == TaxCodeStatus::Ok as u8));
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        // A command larger than the whole data area is refused up front, typed.
        match client.call(&Request::Nop(vec![0; 2 << 20])).await {
            Err(HsmError::InvalidRequest(_)) => {}
            other => panic!("oversized command: {other:?}"),
        }
        assert_eq!(client.max_command_bytes(), Some(1 << 20));
        client.stats()
    });
    assert!(
        stats.full_waits > 0,
        "the test did not fill the queue: {stats:?}"
    );
    assert_eq!(stats.teardowns, 0, "{stats:?}");
    assert_eq!(stats.answered, 1 + 48 * 5);
    drop(dev);
}

#[test]
fn corrupt_completions_are_rejected() {
    let dev = start(&["--allow-fault-injection"]);
    let region = dev.region.clone();
    let stats = pcie_support::run(move || async move {
        let client = connect(&region, pcie_support::config()).await;
        echo(&client, 1, 64).await.expect("healthy");
        let q = client.queue().expect("attached");
        // Bad data CRC: that call fails, the queue stays up.
        pcie_support::inject(&region, FAULT_CORRUPT_DATA, q);
        pcie_support::wait_injected(&region);
        match echo(&client, 2, 64).await {
            Err(HsmError::Malformed(m)) => assert!(m.contains("CRC"), "{m}"),
            other => panic!("corrupt data accepted: {other:?}"),
        }
        echo(&client, 3, 64).await.expect("next call fine");
        assert_eq!(client.stats().teardowns, 0);
        // Bad descriptor: not attributable, so the queue is torn down and re-attached.
        pcie_support::inject(&region, FAULT_CORRUPT_DESCRIPTOR, q);
        pcie_support::wait_injected(&region);
        match echo(&client, 4, 64).await {
            Err(HsmError::ConnectionLost) => {}
            other => panic!("corrupt descriptor accepted: {other:?}"),
        }
        for i in 5..15 {
            echo(&client, i, 64).await.expect("after re-attach");
        }
        client.stats()
    });
    assert_eq!(stats.teardowns, 1, "{stats:?}");
    assert_eq!(stats.attaches, 2, "{stats:?}");
    drop(dev);
}

#[test]
fn emulator_killed_and_restarted() {
    let data = tempfile::tempdir().expect("tmp");
    let data_dir = data.path().join("emu");
    let regions = pcie_support::region_dir();
    let region = pcie_support::region_in(&regions);
    let region_arg = region.to_string_lossy().into_owned();
    let g = grant();
    let args = ["--taxpayer", g.as_str(), "--pcie", region_arg.as_str()];
    let emu = Emu::start(&data_dir, &args);
    let (to_test, from_test) = std::sync::mpsc::channel::<()>();
    let (to_harness, from_harness) = std::sync::mpsc::channel::<&'static str>();
    let region2 = region.clone();
    let handle = std::thread::spawn(move || {
        pcie_support::run(move || async move {
            let config = PcieClientConfig {
                call_timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_millis(500),
                ..pcie_support::config()
            };
            let client = connect(&region2, config).await;
            echo(&client, 1, 100).await.expect("before the kill");
            to_harness.send("killme").expect("harness");
            from_test.recv().expect("killed");
            // Dead device: the call fails (heartbeat stops, or no enable ack).
            match echo(&client, 2, 100).await {
                Err(HsmError::ConnectionLost | HsmError::Timeout | HsmError::Refused) => {}
                other => panic!("call to a dead device: {other:?}"),
            }
            to_harness.send("restartme").expect("harness");
            from_test.recv().expect("restarted");
            // The same client comes back once the device does (bounded retries).
            let mut ok = false;
            for i in 0..50 {
                if echo(&client, 10 + i, 100).await.is_ok() {
                    ok = true;
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            assert!(ok, "client did not recover after the restart");
            for i in 0..10 {
                echo(&client, 100 + i, 4096).await.expect("after restart");
            }
            client.stats()
        })
    });
    assert_eq!(from_harness.recv().expect("ready"), "killme");
    emu.kill();
    to_test.send(()).expect("test");
    assert_eq!(from_harness.recv().expect("ready"), "restartme");
    let emu = Emu::start(&data_dir, &args);
    to_test.send(()).expect("test");
    let stats = handle.join().expect("client thread");
    assert!(stats.attaches >= 2, "{stats:?}");
    drop(emu);
}

fn write_region(path: &Path, bytes: usize, setup: impl FnOnce(&FileMapping)) {
    std::fs::write(path, vec![0u8; bytes]).expect("write");
    let m = FileMapping::open(path).expect("map");
    setup(&m);
}

#[test]
fn hostile_or_missing_regions_are_refused() {
    let dir = pcie_support::region_dir();
    let missing = dir.path().join("missing");
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0xA5u8; 3 * BAR_BYTES]).expect("write");
    let huge_dma = dir.path().join("huge-dma");
    write_region(&huge_dma, 3 * BAR_BYTES, |m| {
        let bar = m.bar();
        bar.u32_at(regs::REG_MAGIC)
            .expect("r")
            .store(DEVICE_MAGIC, Ordering::Release);
        bar.u32_at(regs::REG_VERSION)
            .expect("r")
            .store(INTERFACE_VERSION, Ordering::Release);
        bar.u32_at(regs::REG_STATUS)
            .expect("r")
            .store(STATUS_READY, Ordering::Release);
        bar.u32_at(regs::REG_QUEUE_COUNT)
            .expect("r")
            .store(1, Ordering::Release);
        bar.u32_at(regs::REG_QUEUE_ENTRIES)
            .expect("r")
            .store(4, Ordering::Release);
        bar.u32_at(regs::REG_CHUNK_BYTES)
            .expect("r")
            .store(4096, Ordering::Release);
        bar.u64_at(regs::REG_DMA_BYTES)
            .expect("r")
            .store(1 << 40, Ordering::Release);
    });
    let outside = dir.path().join("outside");
    write_region(&outside, 3 * BAR_BYTES, |m| {
        let bar = m.bar();
        bar.u32_at(regs::REG_MAGIC)
            .expect("r")
            .store(DEVICE_MAGIC, Ordering::Release);
        bar.u32_at(regs::REG_VERSION)
            .expect("r")
            .store(INTERFACE_VERSION, Ordering::Release);
        bar.u32_at(regs::REG_STATUS)
            .expect("r")
            .store(STATUS_READY, Ordering::Release);
        bar.u32_at(regs::REG_QUEUE_COUNT)
            .expect("r")
            .store(1, Ordering::Release);
        bar.u32_at(regs::REG_QUEUE_ENTRIES)
            .expect("r")
            .store(4, Ordering::Release);
        bar.u32_at(regs::REG_CHUNK_BYTES)
            .expect("r")
            .store(4096, Ordering::Release);
        bar.u64_at(regs::REG_DMA_BYTES)
            .expect("r")
            .store(2 * BAR_BYTES as u64, Ordering::Release);
        // Data area running past the end of the mapping.
        bar.u64_at(queue_reg(0, regs::Q_SQ_OFFSET))
            .expect("r")
            .store(0, Ordering::Release);
        bar.u64_at(queue_reg(0, regs::Q_CQ_OFFSET))
            .expect("r")
            .store(512, Ordering::Release);
        bar.u64_at(queue_reg(0, regs::Q_DATA_OFFSET))
            .expect("r")
            .store(4096, Ordering::Release);
        bar.u64_at(queue_reg(0, regs::Q_DATA_BYTES))
            .expect("r")
            .store(1 << 20, Ordering::Release);
    });
    let results = pcie_support::run(move || async move {
        let config = PcieClientConfig {
            connect_timeout: Duration::from_millis(200),
            ..pcie_support::config()
        };
        let mut out = Vec::new();
        for p in [missing, garbage, huge_dma, outside] {
            out.push(
                PcieClient::connect(&p, QueueSelect::Any, config)
                    .await
                    .map(|_| ()),
            );
        }
        out
    });
    assert!(
        matches!(results[0], Err(HsmError::Refused)),
        "{:?}",
        results[0]
    );
    for r in &results[1..] {
        assert!(matches!(r, Err(HsmError::Malformed(_))), "{r:?}");
    }
}

#[test]
fn each_client_owns_its_own_queue() {
    let dev = start(&["--pcie-queues", "2"]);
    let region = dev.region.clone();
    pcie_support::run(move || async move {
        let config = pcie_support::config();
        let a = connect(&region, config).await;
        let b = connect(&region, config).await;
        assert_ne!(a.queue(), b.queue());
        assert!(PcieClient::connect(&region, QueueSelect::Any, config)
            .await
            .is_err());
        let qa = a.queue().expect("attached");
        assert!(PcieClient::connect(&region, QueueSelect::Index(qa), config)
            .await
            .is_err());
        assert!(PcieClient::connect(&region, QueueSelect::Index(7), config)
            .await
            .is_err());
        echo(&a, 1, 10).await.expect("a");
        echo(&b, 2, 10).await.expect("b");
        // Dropping a client gives its queue back.
        drop(a);
        let c = PcieClient::connect(&region, QueueSelect::Index(qa), config)
            .await
            .expect("queue released on drop");
        echo(&c, 3, 10).await.expect("c");
        echo(&b, 4, 10).await.expect("b still");
    });
    drop(dev);
}

#[test]
fn announces_listening_first_then_the_region() {
    use std::io::{BufRead, BufReader};
    let data = tempfile::tempdir().expect("tmp");
    let regions = pcie_support::region_dir();
    let region = pcie_support::region_in(&regions);
    let mut child = std::process::Command::new(emulator_support::emu_bin())
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--taxpayer",
            &grant(),
            "--pcie-queues",
            "3",
        ])
        .arg("--pcie")
        .arg(&region)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf-8");
    let second = lines.next().expect("a line").expect("utf-8");
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.starts_with("listening 127.0.0.1:"), "{first}");
    assert_eq!(second, format!("pcie {} queues 3", region.display()));
}
