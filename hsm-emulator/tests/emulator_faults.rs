//! Fault switches of a real `hsm-emu` process, at run time (SetFaults) and as start-up
//! flags. No timing assertions: each fault is observed by what the client sees (an
//! answer, a typed error, a closed or reset connection, a read that must wait).

mod emulator_support;

use std::io::ErrorKind;
use std::time::Duration;

use emulator_support::*;
use hsm_driver::proto::{FaultConfig, Opcode, Request, Response, Status};

fn start(dir: &std::path::Path, extra: &[&str]) -> Emu {
    let grant = format!("{}:144031900111:1:100000", seller_a());
    let mut args = vec!["--taxpayer", grant.as_str(), "--allow-fault-injection"];
    args.extend_from_slice(extra);
    Emu::start(dir, &args)
}

fn set(c: &mut hsm_driver::tcp::blocking::Client, f: FaultConfig) {
    assert_eq!(ok(c, Request::SetFaults(f)), Response::SetFaults);
}

fn nop_works(addr: std::net::SocketAddr) -> bool {
    let mut raw = Raw::connect(addr);
    raw.send(1, &Request::Nop(vec![9]));
    matches!(raw.recv_response(Opcode::Nop), Ok((1, Ok(Response::Nop(b)))) if b == vec![9])
}

#[test]
fn latency_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    set(
        &mut c,
        FaultConfig {
            latency_us: 20_000,
            ..Default::default()
        },
    );
    for i in 0..5u8 {
        assert_eq!(ok(&mut c, Request::Nop(vec![i])), Response::Nop(vec![i]));
    }
    set(&mut c, FaultConfig::default());
}

#[test]
fn drop_every_nth_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    set(
        &mut c,
        FaultConfig {
            drop_every_nth_connection: 3,
            ..Default::default()
        },
    );
    // Counting restarts at SetFaults: connections 1 and 2 work, 3 is dropped after its
    // first request, unanswered; then 4 and 5 work, 6 is dropped.
    let seen: Vec<bool> = (0..6).map(|_| nop_works(emu.addr)).collect();
    assert_eq!(seen, vec![true, true, false, true, true, false]);
    set(&mut c, FaultConfig::default());
    assert!(nop_works(emu.addr));
}

#[test]
fn refuse_then_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    set(
        &mut c,
        FaultConfig {
            refuse: 1,
            ..Default::default()
        },
    );
    // New connections are closed at once.
    assert!(!nop_works(emu.addr));
    // Open ones get a typed Busy for every command except SetFaults.
    assert_eq!(refused(&mut c, Request::DeviceInfo), Status::Busy);
    set(&mut c, FaultConfig::default());
    assert!(nop_works(emu.addr));
    assert!(matches!(
        ok(&mut c, Request::DeviceInfo),
        Response::DeviceInfo(_)
    ));
}

#[test]
fn stall_holds_answers_until_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    // Long enough that the short read below certainly finds nothing.
    set(
        &mut c,
        FaultConfig {
            stall_ms: 60_000,
            ..Default::default()
        },
    );
    let mut raw = Raw::connect(emu.addr);
    raw.send(7, &Request::Nop(vec![1, 2, 3]));
    raw.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let err = raw.recv().expect_err("no answer during a stall");
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err:?}"
    );
    // Clearing the stall releases the held command.
    set(&mut c, FaultConfig::default());
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (id, r) = raw.recv_response(Opcode::Nop).unwrap();
    assert_eq!((id, r), (7, Ok(Response::Nop(vec![1, 2, 3]))));
}

#[test]
fn reset_connections_resets_others() {
    let tmp = tempfile::tempdir().unwrap();
    let emu = start(&tmp.path().join("d"), &[]);
    let mut c = emu.client();
    let mut victims: Vec<Raw> = (0..3).map(|_| Raw::connect(emu.addr)).collect();
    for (i, v) in victims.iter_mut().enumerate() {
        v.send(i as u64, &Request::Nop(vec![]));
        v.recv().expect("answered before the reset");
    }
    set(
        &mut c,
        FaultConfig {
            reset_connections: 1,
            ..Default::default()
        },
    );
    for v in &mut victims {
        let err = v.recv().expect_err("reset");
        assert!(
            matches!(
                err.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
            ),
            "{err:?}"
        );
    }
    // The connection that asked survives; new connections work.
    assert_eq!(ok(&mut c, Request::Nop(vec![5])), Response::Nop(vec![5]));
    assert!(nop_works(emu.addr));
}

#[test]
fn startup_fault_flags() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let emu = start(&tmp.path().join("refuse"), &["--refuse"]);
        assert!(!nop_works(emu.addr));
    }
    {
        let emu = start(
            &tmp.path().join("drop"),
            &["--drop-every-nth-connection", "1"],
        );
        assert!(!nop_works(emu.addr));
        assert!(!nop_works(emu.addr));
    }
    {
        let emu = start(&tmp.path().join("lat"), &["--latency-us", "5000"]);
        assert!(nop_works(emu.addr));
    }
    {
        let emu = start(&tmp.path().join("stall"), &["--stall-ms", "60000"]);
        let mut raw = Raw::connect(emu.addr);
        raw.send(1, &Request::Nop(vec![]));
        raw.stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(raw.recv().is_err());
        // SetFaults is never stalled, so the stall can be lifted.
        let mut c = emu.client();
        set(&mut c, FaultConfig::default());
        raw.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        assert!(raw.recv().is_ok());
    }
}

#[test]
fn set_faults_forbidden_without_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let grant = format!("{}:144031900111:1:10", seller_a());
    let emu = Emu::start(&tmp.path().join("d"), &["--taxpayer", &grant]);
    let mut c = emu.client();
    assert_eq!(
        refused(
            &mut c,
            Request::SetFaults(FaultConfig {
                refuse: 1,
                ..Default::default()
            })
        ),
        Status::Forbidden
    );
    assert!(nop_works(emu.addr));
}
