//! The driver's queue engine (`hsm_driver::pcie::queue`) against a scripted device (the
//! sans-IO device side, [`hsm_emulator::pcie::device`]) over heap memory: the protocol, back-pressure, and every way
//! a completion can lie. Plus a model test: random interleavings of submissions,
//! out-of-order completions and corruptions, checking that every call ends exactly
//! once, answers reach their own call, and no buffer leaks.

//!
//! Moved from a unit test of the driver's queue module when the device side became the
//! emulator crate's; it uses only the engine's public interface.

use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use hsm_driver::pcie::mem::{DeviceMemory, HeapMemory};
use hsm_driver::pcie::queue::*;
use hsm_driver::pcie::regs::*;
use hsm_driver::proto::{self, Opcode, Response, Status};
use hsm_driver::tcp::HsmError;
use hsm_emulator::pcie::device::{Corruption, DeviceCq, DeviceSq, Fetched};
use proptest::prelude::*;
use std::sync::Arc;
use std::task::Wake;

const TOKEN: u32 = 0x5EED;

struct Rig {
    mem: HeapMemory,
    engine: QueueEngine,
    sq: DeviceSq,
    cq: DeviceCq,
}

struct NoWake;
impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

fn waker() -> Waker {
    Waker::from(Arc::new(NoWake))
}

fn rig(entries: u32, data_bytes: usize, max_in_flight: usize) -> Rig {
    let (geoms, dma) = plan_layout(1, entries, data_bytes).expect("layout");
    let g = geoms[0];
    Rig {
        mem: HeapMemory::new(dma),
        engine: QueueEngine::new(g, 0, TOKEN, max_in_flight),
        sq: DeviceSq::new(g, 0),
        cq: DeviceCq::new(g, 0),
    }
}

impl Rig {
    fn submit(&mut self, cid: u64, body: &[u8]) -> Result<u16, SubmitError> {
        let (bar, dma) = (self.mem.bar(), self.mem.dma());
        self.engine
            .submit(&bar, &dma, Opcode::Nop, cid, body, body.len(), false)
    }

    /// Device: fetch everything pending.
    fn fetch_all(&mut self) -> Vec<(ValidSubmission, u32, Vec<u8>)> {
        let (bar, dma) = (self.mem.bar(), self.mem.dma());
        let n = self.sq.pending(&bar).expect("doorbell in range");
        (0..n)
            .map(
                |_| match self.sq.fetch(&dma, TOKEN).expect("descriptor ok") {
                    Fetched::Valid { sub, sq_head } => {
                        let body = self.sq.read_request(&dma, &sub).expect("in range");
                        (sub, sq_head, body)
                    }
                    other => panic!("refused {other:?}"),
                },
            )
            .collect()
    }

    /// Device: answer a Nop by echoing its body (optionally lying).
    fn answer(
        &mut self,
        sub: &ValidSubmission,
        sq_head: u32,
        body: &[u8],
        corrupt: Option<Corruption>,
    ) {
        let (bar, dma) = (self.mem.bar(), self.mem.dma());
        assert!(self.cq.has_room(&bar).expect("head ok"));
        let (flags, len) = self.cq.write_response(&dma, sub, body).expect("in range");
        let e = CompletionEntry::new(
            sub.tag,
            sub.opcode | proto::RESPONSE_FLAG,
            flags,
            0,
            sub.correlation_id,
            len,
            crc32c::crc32c(body),
            sq_head,
        );
        self.cq.post(&dma, e, corrupt).expect("in range");
    }

    /// Device: post an arbitrary completion entry.
    fn post_raw(&mut self, e: CompletionEntry) {
        let dma = self.mem.dma();
        self.cq.post(&dma, e, None).expect("in range");
    }

    fn poll(&mut self) -> Result<usize, QueueFault> {
        let (bar, dma) = (self.mem.bar(), self.mem.dma());
        self.engine.poll(&bar, &dma)
    }

    fn outcome(&mut self, tag: u16, cid: u64) -> Option<Outcome> {
        match self.engine.poll_outcome(tag, cid, &waker()) {
            Poll::Ready(o) => Some(o),
            Poll::Pending => None,
        }
    }
}

fn nop_answer(o: Option<Outcome>) -> Result<Vec<u8>, HsmError> {
    match o.expect("finished") {
        Outcome::Answer(Ok(Response::Nop(b))) => Ok(b),
        Outcome::Answer(Ok(other)) => panic!("unexpected {other:?}"),
        Outcome::Answer(Err(e)) => Err(e),
        Outcome::Overflow { needed } => panic!("overflow {needed}"),
    }
}

#[test]
fn round_trip_and_wrap_many_times() {
    let mut r = rig(4, 64 * 1024, 64);
    for i in 0..50u64 {
        let body = vec![i as u8; (i as usize * 37) % 5000];
        let tag = r.submit(i + 1, &body).expect("room");
        assert!(r.outcome(tag, i + 1).is_none(), "not answered yet");
        let fetched = r.fetch_all();
        assert_eq!(fetched.len(), 1);
        let (sub, head, req) = &fetched[0];
        assert_eq!(req, &body);
        r.answer(sub, *head, req, None);
        assert_eq!(r.poll(), Ok(1));
        assert_eq!(nop_answer(r.outcome(tag, i + 1)).expect("ok"), body);
    }
    assert_eq!(r.engine.in_flight(), 0);
    assert_eq!(
        r.engine.allocator().free_chunks(),
        r.engine.allocator().chunks()
    );
}

#[test]
fn out_of_order_completions_reach_their_calls() {
    let mut r = rig(8, 64 * 1024, 64);
    let tags: Vec<(u16, u64)> = (1..=8u64)
        .map(|cid| (r.submit(cid, &cid.to_le_bytes()).expect("room"), cid))
        .collect();
    let mut fetched = r.fetch_all();
    fetched.reverse();
    for (sub, head, body) in &fetched {
        r.answer(sub, *head, body, None);
    }
    assert_eq!(r.poll(), Ok(8));
    for (tag, cid) in tags {
        assert_eq!(
            nop_answer(r.outcome(tag, cid)).expect("ok"),
            cid.to_le_bytes()
        );
    }
}

#[test]
fn ring_and_buffers_push_back_and_lose_nothing() {
    // 2 entries: the third submission waits.
    let mut r = rig(2, 64 * 1024, 64);
    let a = r.submit(1, b"a").expect("room");
    let _b = r.submit(2, b"b").expect("room");
    assert_eq!(r.submit(3, b"c"), Err(SubmitError::Full));
    let fetched = r.fetch_all();
    r.answer(&fetched[0].0, fetched[0].1, b"a", None);
    r.poll().expect("ok");
    // Room again only once the answer was taken (the tag holds the outcome).
    assert_eq!(r.submit(3, b"c"), Err(SubmitError::Full));
    nop_answer(r.outcome(a, 1)).expect("ok");
    r.submit(3, b"c").expect("room now");
    // Buffers: 64 KiB of data, two 40 KiB commands do not fit together.
    let mut r = rig(8, 64 * 1024, 64);
    r.submit(1, &[0; 40_000]).expect("room");
    assert_eq!(r.submit(2, &[0; 40_000]), Err(SubmitError::Full));
    assert_eq!(
        r.submit(3, &[0; 70_000]),
        Err(SubmitError::TooLarge {
            needed: 70_000,
            max: 64 * 1024
        })
    );
    // max_in_flight bounds below the ring size.
    let mut r = rig(8, 64 * 1024, 1);
    r.submit(1, b"x").expect("room");
    assert_eq!(r.submit(2, b"y"), Err(SubmitError::Full));
}

#[test]
fn corrupt_data_fails_only_that_call() {
    let mut r = rig(4, 64 * 1024, 64);
    let t1 = r.submit(1, b"one").expect("room");
    let t2 = r.submit(2, b"two").expect("room");
    let f = r.fetch_all();
    r.answer(&f[0].0, f[0].1, b"one", Some(Corruption::DataCrc));
    r.answer(&f[1].0, f[1].1, b"two", None);
    assert_eq!(r.poll(), Ok(2));
    assert!(matches!(
        nop_answer(r.outcome(t1, 1)),
        Err(HsmError::Malformed(_))
    ));
    assert_eq!(nop_answer(r.outcome(t2, 2)).expect("ok"), b"two");
    assert_eq!(r.engine.stats().rejected, 1);
}

#[test]
fn corrupt_descriptor_is_fatal_and_untrusted() {
    let mut r = rig(4, 64 * 1024, 64);
    let t1 = r.submit(1, b"one").expect("room");
    let f = r.fetch_all();
    r.answer(&f[0].0, f[0].1, b"one", Some(Corruption::Descriptor));
    assert!(r.poll().is_err());
    // The call is still in flight (the entry was not trusted); the shell fails it.
    assert!(r.outcome(t1, 1).is_none());
    assert_eq!(r.engine.fail_all(|| HsmError::ConnectionLost), 1);
    assert!(matches!(
        nop_answer(r.outcome(t1, 1)),
        Err(HsmError::ConnectionLost)
    ));
    assert_eq!(
        r.engine.allocator().free_chunks(),
        r.engine.allocator().chunks()
    );
}

#[test]
fn lying_completions_are_rejected_without_reading_outside() {
    // Length beyond the buffer: the call fails, nothing beyond its extent is read.
    let mut r = rig(4, 64 * 1024, 64);
    let t = r.submit(1, b"x").expect("room");
    let f = r.fetch_all();
    let (sub, head, _) = f[0];
    r.post_raw(CompletionEntry::new(
        sub.tag,
        0x89,
        0,
        0,
        1,
        u32::MAX,
        0,
        head,
    ));
    assert_eq!(r.poll(), Ok(1));
    assert!(matches!(
        nop_answer(r.outcome(t, 1)),
        Err(HsmError::Malformed(_))
    ));

    // Wrong opcode: that call fails.
    let t = r.submit(2, b"x").expect("room");
    let f = r.fetch_all();
    let (sub, head, _) = f[0];
    r.post_raw(CompletionEntry::new(
        sub.tag,
        0x81,
        0,
        0,
        2,
        0,
        crc32c::crc32c(&[]),
        head,
    ));
    assert_eq!(r.poll(), Ok(1));
    assert!(matches!(
        nop_answer(r.outcome(t, 2)),
        Err(HsmError::Malformed(_))
    ));

    // Unknown status code: that call fails.
    let t = r.submit(3, b"x").expect("room");
    let f = r.fetch_all();
    let (sub, head, _) = f[0];
    r.post_raw(CompletionEntry::new(
        sub.tag,
        0x89,
        0,
        999,
        3,
        0,
        crc32c::crc32c(&[]),
        head,
    ));
    assert_eq!(r.poll(), Ok(1));
    assert!(matches!(
        nop_answer(r.outcome(t, 3)),
        Err(HsmError::Malformed(_))
    ));

    // A device error is a device error.
    let t = r.submit(4, b"x").expect("room");
    let f = r.fetch_all();
    let (sub, head, _) = f[0];
    let msg = b"busy now";
    let dma = r.mem.dma();
    let (_, len) = r.cq.write_response(&dma, &sub, msg).expect("fits");
    r.post_raw(CompletionEntry::new(
        sub.tag,
        0x89,
        0,
        Status::Busy as u16,
        4,
        len,
        crc32c::crc32c(msg),
        head,
    ));
    assert_eq!(r.poll(), Ok(1));
    match nop_answer(r.outcome(t, 4)) {
        Err(HsmError::Device { status, message }) => {
            assert_eq!(status, Status::Busy);
            assert_eq!(message, "busy now");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn completions_of_unknown_calls_are_fatal() {
    // Tag out of range.
    let mut r = rig(4, 64 * 1024, 64);
    r.submit(1, b"x").expect("room");
    let f = r.fetch_all();
    r.post_raw(CompletionEntry::new(9, 0x89, 0, 0, 1, 0, 0, f[0].1));
    assert!(r.poll().is_err());
    // Correlation id mismatch.
    let mut r = rig(4, 64 * 1024, 64);
    let t = r.submit(1, b"x").expect("room");
    let f = r.fetch_all();
    r.post_raw(CompletionEntry::new(t, 0x89, 0, 0, 77, 0, 0, f[0].1));
    assert!(r.poll().is_err());
    // The same completion twice.
    let mut r = rig(4, 64 * 1024, 64);
    r.submit(1, b"x").expect("room");
    let f = r.fetch_all();
    r.answer(&f[0].0, f[0].1, b"x", None);
    r.answer(&f[0].0, f[0].1, b"x", None);
    assert!(r.poll().is_err());
    // A submission head beyond the tail.
    let mut r = rig(4, 64 * 1024, 64);
    let t = r.submit(1, b"x").expect("room");
    r.fetch_all();
    r.post_raw(CompletionEntry::new(t, 0x89, 0, 0, 1, 0, 0, 5));
    assert!(r.poll().is_err());
}

#[test]
fn overflow_only_for_calls_that_allow_it() {
    let mut r = rig(4, 64 * 1024, 64);
    let (bar, dma) = (r.mem.bar(), r.mem.dma());
    let t = r
        .engine
        .submit(&bar, &dma, Opcode::Nop, 1, b"", 1024, true)
        .expect("room");
    let f = r.fetch_all();
    let big = vec![1u8; 5000];
    r.answer(&f[0].0, f[0].1, &big, None);
    assert_eq!(r.poll(), Ok(1));
    assert!(matches!(
        r.outcome(t, 1),
        Some(Outcome::Overflow { needed: 5000 })
    ));
    let t = r.submit(2, b"").expect("room");
    let f = r.fetch_all();
    r.answer(&f[0].0, f[0].1, &big, None);
    assert_eq!(r.poll(), Ok(1));
    assert!(matches!(
        nop_answer(r.outcome(t, 2)),
        Err(HsmError::Malformed(_))
    ));
}

#[test]
fn abandoned_call_keeps_its_buffer_until_completed() {
    let mut r = rig(4, 8192, 64);
    let t = r.submit(1, &[0; 4096]).expect("room");
    r.engine.abandon(t, 1);
    assert_eq!(r.engine.in_flight(), 1);
    assert_eq!(r.engine.allocator().free_chunks(), 1);
    let f = r.fetch_all();
    r.answer(&f[0].0, f[0].1, b"late", None);
    assert_eq!(r.poll(), Ok(1));
    assert_eq!(r.engine.in_flight(), 0);
    assert_eq!(r.engine.allocator().free_chunks(), 2);
    // Its outcome is gone: a poll of the old call is "lost", not someone else's answer.
    assert!(matches!(
        nop_answer(r.outcome(t, 1)),
        Err(HsmError::ConnectionLost)
    ));
}

#[test]
fn device_rejects_hostile_doorbells_and_descriptors() {
    let mut r = rig(4, 64 * 1024, 64);
    let bar = r.mem.bar();
    // Tail more than a ring ahead.
    bar.u32_at(queue_reg(0, Q_SQ_TAIL))
        .expect("reg")
        .store(9, Ordering::Release);
    assert!(r.sq.pending(&bar).is_err());
    // Head doorbell ahead of the completion tail.
    bar.u32_at(queue_reg(0, Q_CQ_HEAD))
        .expect("reg")
        .store(3, Ordering::Release);
    assert!(r.cq.has_room(&bar).is_err());
    // A scribbled descriptor.
    bar.u32_at(queue_reg(0, Q_CQ_HEAD))
        .expect("reg")
        .store(0, Ordering::Release);
    r.submit(1, b"x").expect("room");
    let dma = r.mem.dma();
    let g = *r.engine.geometry();
    dma.write(g.sq_offset + 16, &[0xFF; 8]).expect("in range");
    assert!(r.sq.fetch(&dma, TOKEN).is_err());
}

#[test]
fn allocator_first_fit_and_reuse() {
    let mut a = ChunkAllocator::new(130);
    let x = a.alloc(64).expect("x");
    let y = a.alloc(64).expect("y");
    assert_eq!((x.first, y.first), (0, 64));
    assert!(a.alloc(3).is_none());
    a.free(x);
    let z = a.alloc(10).expect("z");
    assert_eq!(z.first, 0);
    // 54 free between z and y, 2 after y: 55 fits nowhere, 54 fits between.
    assert!(a.alloc(55).is_none());
    assert_eq!(a.alloc(54).map(|e| e.first), Some(10));
    assert_eq!(a.alloc(2).map(|e| e.first), Some(128));
    assert_eq!(a.free_chunks(), 0);
    assert!(a.alloc(0).is_none());
}

/// One step of the model.
#[derive(Debug, Clone)]
enum Step {
    Submit(usize),
    Fetch,
    Complete { pick: usize, corrupt: u8 },
    Poll,
    Abandon(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0usize..6000).prop_map(Step::Submit),
        2 => Just(Step::Fetch),
        3 => (any::<usize>(), 0u8..20).prop_map(|(pick, corrupt)| Step::Complete { pick, corrupt }),
        2 => Just(Step::Poll),
        1 => any::<usize>().prop_map(Step::Abandon),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random interleavings of driver and device, with completions out of order and
    /// some corrupted: every call finishes exactly once with its own answer (or an
    /// error), the engine never panics, and all buffers come back.
    #[test]
    fn model(steps in proptest::collection::vec(step(), 1..200)) {
        let mut r = rig(8, 32 * 1024, 64);
        let mut next_cid = 1u64;
        // Calls submitted and not finished: (tag, cid, body, abandoned).
        let mut calls: Vec<(u16, u64, Vec<u8>, bool)> = Vec::new();
        let mut fetched: Vec<(ValidSubmission, u32, Vec<u8>)> = Vec::new();
        let mut finished = std::collections::HashSet::new();
        for s in steps {
            match s {
                Step::Submit(len) => {
                    let body: Vec<u8> = (0..len).map(|i| (i as u64 ^ next_cid) as u8).collect();
                    match r.submit(next_cid, &body) {
                        Ok(tag) => calls.push((tag, next_cid, body, false)),
                        Err(SubmitError::Full) => {}
                        Err(e) => prop_assert!(false, "unexpected {e:?}"),
                    }
                    next_cid += 1;
                }
                Step::Fetch => fetched.extend(r.fetch_all()),
                Step::Complete { pick, corrupt } if !fetched.is_empty() => {
                    let (sub, head, body) = fetched.swap_remove(pick % fetched.len());
                    let c = match corrupt { 0 => Some(Corruption::DataCrc), 1 => Some(Corruption::Descriptor), _ => None };
                    r.answer(&sub, head, &body, c);
                }
                Step::Complete { .. } => {}
                Step::Poll => {
                    if r.poll().is_err() {
                        // The shell tears the queue down and starts over.
                        r.engine.fail_all(|| HsmError::ConnectionLost);
                        let g = *r.engine.geometry();
                        r.engine.reattach(g, TOKEN, 64);
                        r.sq = DeviceSq::new(g, 0);
                        r.cq = DeviceCq::new(g, 0);
                        r.cq.clear_ring(&r.mem.dma()).expect("clear");
                        let bar = r.mem.bar();
                        bar.u32_at(queue_reg(0, Q_SQ_TAIL)).expect("reg").store(0, Ordering::Release);
                        bar.u32_at(queue_reg(0, Q_CQ_HEAD)).expect("reg").store(0, Ordering::Release);
                        fetched.clear();
                    }
                }
                Step::Abandon(pick) if !calls.is_empty() => {
                    let i = pick % calls.len();
                    let (tag, cid, _, _) = calls[i];
                    r.engine.abandon(tag, cid);
                    calls[i].3 = true;
                }
                Step::Abandon(_) => {}
            }
            // Take every finished outcome.
            let mut i = 0;
            while i < calls.len() {
                let (tag, cid, ref body, abandoned) = calls[i];
                if abandoned {
                    calls.swap_remove(i);
                    continue;
                }
                match r.outcome(tag, cid) {
                    None => i += 1,
                    Some(o) => {
                        prop_assert!(finished.insert(cid), "call {} finished twice", cid);
                        match o {
                            Outcome::Answer(Ok(Response::Nop(b))) => prop_assert_eq!(&b, body),
                            Outcome::Answer(Err(HsmError::Malformed(_) | HsmError::ConnectionLost)) => {}
                            other => prop_assert!(false, "unexpected {:?}", other),
                        }
                        calls.swap_remove(i);
                    }
                }
            }
        }
        // Drain: the device answers everything fetched or pending, honestly.
        fetched.extend(r.fetch_all());
        for (sub, head, body) in fetched.drain(..) {
            r.answer(&sub, head, &body, None);
        }
        if r.poll().is_err() {
            r.engine.fail_all(|| HsmError::ConnectionLost);
        }
        prop_assert_eq!(r.engine.in_flight(), 0);
        prop_assert_eq!(r.engine.allocator().free_chunks(), r.engine.allocator().chunks());
    }
}

#[test]
fn slow_command_completes_after_the_ring_wrapped_many_times() {
    // A long TaxCodes stays with the device while many quick commands go round the
    // 4-entry ring; its completion's old submission head is still valid.
    let mut r = rig(4, 64 * 1024, 64);
    let slow = r.submit(1, b"slow").expect("room");
    let f = r.fetch_all();
    let (slow_sub, slow_head, _) = f[0];
    for cid in 2..30u64 {
        let t = r.submit(cid, b"quick").expect("room");
        let f = r.fetch_all();
        r.answer(&f[0].0, f[0].1, b"quick", None);
        assert_eq!(r.poll(), Ok(1));
        nop_answer(r.outcome(t, cid)).expect("quick");
    }
    r.answer(&slow_sub, slow_head, b"slow", None);
    assert_eq!(r.poll(), Ok(1));
    assert_eq!(nop_answer(r.outcome(slow, 1)).expect("slow"), b"slow");
}
