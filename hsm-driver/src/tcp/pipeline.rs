//! Sans-IO core of the pipelined client: the correlation table with the frames queued for
//! the writer, and the reconnect backoff. The glommio shell (`TcpClient`) only moves bytes
//! and timers around these.

use std::collections::HashMap;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::proto::{encode_request, FrameError, FrameHeader, Opcode, Request, Response};

use super::HsmError;

/// What became of one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The frame answered the call with this correlation id (successfully, with a
    /// device error, or as a malformed answer).
    Completed(u64),
    /// No call waits for this correlation id (it timed out, was abandoned, or the peer
    /// is confused); the frame was dropped.
    Unknown(u64),
}

enum CallState {
    /// Sent or queued; the waker of the task awaiting the answer.
    Waiting(Option<Waker>),
    /// Answered; the outcome waits to be taken by the caller.
    Done(Result<Response, HsmError>),
}

struct Call {
    opcode: Opcode,
    state: CallState,
}

/// The calls in flight on one client and the request frames not yet handed to the
/// writer.
pub struct CallTable {
    next_id: u64,
    calls: HashMap<u64, Call>,
    out: Vec<u8>,
}

impl Default for CallTable {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CallTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallTable")
            .field("in_flight", &self.calls.len())
            .field("queued_bytes", &self.out.len())
            .finish()
    }
}

impl CallTable {
    /// An empty table. Correlation ids start at 1 and are never reused by this table
    /// (2^64 calls do not happen), so a late answer can never match a newer call.
    pub fn new() -> Self {
        Self {
            next_id: 1,
            calls: HashMap::new(),
            out: Vec::new(),
        }
    }

    /// Calls registered and not yet taken or abandoned.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Encodes `request` into the output queue under a fresh correlation id and
    /// registers the call. On error nothing is queued or registered.
    pub fn submit(&mut self, request: &Request) -> Result<u64, HsmError> {
        let id = self.next_id;
        encode_request(&mut self.out, id, request)?;
        self.next_id += 1;
        self.calls.insert(
            id,
            Call {
                opcode: request.opcode(),
                state: CallState::Waiting(None),
            },
        );
        Ok(id)
    }

    /// Whether frames wait for the writer.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// Hands every queued frame to the writer in one buffer: swaps the queue with
    /// `spare` (which must be empty; its allocation is reused for the next queue).
    /// Returns whether there was anything to write.
    pub fn take_output(&mut self, spare: &mut Vec<u8>) -> bool {
        spare.clear();
        std::mem::swap(&mut self.out, spare);
        !spare.is_empty()
    }

    /// Dispatches a whole, checksummed frame from the reader.
    pub fn on_frame(&mut self, header: &FrameHeader, body: &[u8]) -> Dispatch {
        let id = header.correlation_id();
        let Some(call) = self.calls.get_mut(&id) else {
            return Dispatch::Unknown(id);
        };
        let CallState::Waiting(waker) = &mut call.state else {
            // A second answer to an answered call: keep the first, drop this one.
            return Dispatch::Unknown(id);
        };
        let waker = waker.take();
        let outcome = match Response::decode_frame(call.opcode, header, body) {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(device)) => Err(HsmError::from(device)),
            Err(e) => Err(HsmError::Malformed(e.to_string())),
        };
        call.state = CallState::Done(outcome);
        if let Some(w) = waker {
            w.wake();
        }
        Dispatch::Completed(id)
    }

    /// Dispatches a frame the decoder skipped (bad checksum or version): the call it
    /// names fails with [`HsmError::Malformed`].
    pub fn on_corrupt_frame(&mut self, error: &FrameError) -> Dispatch {
        let id = error.header.correlation_id();
        match self.calls.get_mut(&id) {
            Some(Call {
                state: CallState::Waiting(waker),
                ..
            }) => {
                let waker = waker.take();
                self.complete(id, Err(HsmError::Malformed(error.error.to_string())));
                if let Some(w) = waker {
                    w.wake();
                }
                Dispatch::Completed(id)
            }
            _ => Dispatch::Unknown(id),
        }
    }

    fn complete(&mut self, id: u64, outcome: Result<Response, HsmError>) {
        if let Some(call) = self.calls.get_mut(&id) {
            call.state = CallState::Done(outcome);
        }
    }

    /// The outcome of call `id` if answered (removing the call), else remembers `waker`
    /// to be woken when it is. An unknown id (already taken or abandoned) yields
    /// [`HsmError::ConnectionLost`] rather than waiting forever.
    pub fn poll_outcome(&mut self, id: u64, waker: &Waker) -> Poll<Result<Response, HsmError>> {
        match self.calls.get_mut(&id) {
            None => Poll::Ready(Err(HsmError::ConnectionLost)),
            Some(Call {
                state: CallState::Waiting(w),
                ..
            }) => {
                match w {
                    Some(old) if old.will_wake(waker) => {}
                    _ => *w = Some(waker.clone()),
                }
                Poll::Pending
            }
            Some(Call {
                state: CallState::Done(_),
                ..
            }) => match self.calls.remove(&id) {
                Some(Call {
                    state: CallState::Done(outcome),
                    ..
                }) => Poll::Ready(outcome),
                _ => Poll::Ready(Err(HsmError::ConnectionLost)),
            },
        }
    }

    /// The deadline of call `id` passed: removes it and returns [`HsmError::Timeout`],
    /// or the outcome if the answer won the race.
    pub fn time_out(&mut self, id: u64) -> Result<Response, HsmError> {
        match self.calls.remove(&id) {
            Some(Call {
                state: CallState::Done(outcome),
                ..
            }) => outcome,
            _ => Err(HsmError::Timeout),
        }
    }

    /// The caller went away (its future was dropped): forget call `id`; a later answer
    /// is [`Dispatch::Unknown`]. Returns whether the call was still registered.
    pub fn abandon(&mut self, id: u64) -> bool {
        self.calls.remove(&id).is_some()
    }

    /// The connection ended: every waiting call fails with `make_error()` and the
    /// unsent frames are dropped (they belonged to those calls). Returns the number of
    /// calls failed.
    pub fn fail_all(&mut self, make_error: impl Fn() -> HsmError) -> usize {
        self.out.clear();
        let mut failed = 0;
        for call in self.calls.values_mut() {
            if let CallState::Waiting(waker) = &mut call.state {
                let waker = waker.take();
                call.state = CallState::Done(Err(make_error()));
                failed += 1;
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
        failed
    }
}

/// Exponential reconnect backoff: after a failure the next attempt waits `current`,
/// which doubles up to `max`; a successful connect resets it to `min`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    next_attempt: Option<Instant>,
}

impl Backoff {
    /// A backoff between `min` and `max` (`max` is raised to `min` if smaller).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
            next_attempt: None,
        }
    }

    /// Records a failure at `now`; returns when the next attempt may start.
    pub fn on_failure(&mut self, now: Instant) -> Instant {
        let at = now + self.current;
        self.next_attempt = Some(at);
        self.current = (self.current * 2).min(self.max);
        at
    }

    /// Records a successful connect.
    pub fn on_success(&mut self) {
        self.current = self.min;
        self.next_attempt = None;
    }

    /// When the next attempt may start (`None`: now).
    pub fn ready_at(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// The wait that the next failure will impose.
    pub fn current(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_error, encode_response, FrameDecoder, Status, FRAME_HEADER_BYTES};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountWaker(AtomicUsize);
    impl Wake for CountWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<CountWaker>, Waker) {
        let c = Arc::new(CountWaker(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn frames(bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
        let mut d = FrameDecoder::new();
        d.extend(bytes);
        let mut v = Vec::new();
        while let Some(f) = d.next_frame().expect("valid") {
            v.push((f.header, f.body.to_vec()));
        }
        v
    }

    #[test]
    fn answers_in_any_order_reach_their_calls() {
        let mut t = CallTable::new();
        let ids: Vec<u64> = (0..5)
            .map(|i| t.submit(&Request::Nop(vec![i])).expect("submit"))
            .collect();
        let mut wire = Vec::new();
        assert!(t.take_output(&mut wire));
        assert!(!t.has_output());
        let sent = frames(&wire);
        assert_eq!(sent.len(), 5);
        let (counter, w) = waker();
        for id in &ids {
            assert!(t.poll_outcome(*id, &w).is_pending());
        }
        // Answer in reverse order.
        let mut answers = Vec::new();
        for (h, body) in sent.iter().rev() {
            encode_response(
                &mut answers,
                h.correlation_id(),
                &Response::Nop(body.clone()),
            )
            .expect("encode");
        }
        for (h, body) in frames(&answers) {
            assert_eq!(
                t.on_frame(&h, &body),
                Dispatch::Completed(h.correlation_id())
            );
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 5);
        for (i, id) in ids.iter().enumerate() {
            match t.poll_outcome(*id, &w) {
                Poll::Ready(Ok(Response::Nop(b))) => assert_eq!(b, vec![i as u8]),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn unknown_duplicate_and_late_answers_are_dropped() {
        let mut t = CallTable::new();
        let id = t.submit(&Request::DeviceInfo).expect("submit");
        let mut wire = Vec::new();
        encode_response(&mut wire, 999, &Response::Nop(vec![])).expect("encode");
        let (h, b) = frames(&wire).remove(0);
        assert_eq!(t.on_frame(&h, &b), Dispatch::Unknown(999));
        // Times out, then the answer arrives late.
        assert!(matches!(t.time_out(id), Err(HsmError::Timeout)));
        let mut wire = Vec::new();
        encode_error(
            &mut wire,
            Opcode::DeviceInfo as u8,
            id,
            Status::Internal,
            "x",
        )
        .expect("encode");
        let (h, b) = frames(&wire).remove(0);
        assert_eq!(t.on_frame(&h, &b), Dispatch::Unknown(id));
    }

    #[test]
    fn device_errors_and_malformed_answers_are_typed() {
        let mut t = CallTable::new();
        let a = t.submit(&Request::DeviceInfo).expect("submit");
        let b = t
            .submit(&Request::Sign { digest: [0; 32] })
            .expect("submit");
        let mut wire = Vec::new();
        encode_error(
            &mut wire,
            Opcode::DeviceInfo as u8,
            a,
            Status::KeyUnavailable,
            "locked",
        )
        .expect("encode");
        // An answer to `b` with the wrong opcode.
        encode_response(&mut wire, b, &Response::SetFaults).expect("encode");
        for (h, body) in frames(&wire) {
            t.on_frame(&h, &body);
        }
        let (_, w) = waker();
        match t.poll_outcome(a, &w) {
            Poll::Ready(Err(HsmError::Device { status, message })) => {
                assert_eq!(status, Status::KeyUnavailable);
                assert_eq!(message, "locked");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            t.poll_outcome(b, &w),
            Poll::Ready(Err(HsmError::Malformed(_)))
        ));
    }

    #[test]
    fn corrupt_frames_fail_their_call_only() {
        let mut t = CallTable::new();
        let a = t.submit(&Request::Nop(vec![1])).expect("submit");
        let b = t.submit(&Request::Nop(vec![2])).expect("submit");
        let mut wire = Vec::new();
        encode_response(&mut wire, a, &Response::Nop(vec![1])).expect("encode");
        wire[FRAME_HEADER_BYTES] ^= 1;
        encode_response(&mut wire, b, &Response::Nop(vec![2])).expect("encode");
        let mut d = FrameDecoder::new();
        d.extend(&wire);
        let e = d.next_frame().expect_err("crc");
        assert_eq!(t.on_corrupt_frame(&e), Dispatch::Completed(a));
        let f = d.next_frame().expect("ok").expect("frame");
        assert_eq!(t.on_frame(&f.header, f.body), Dispatch::Completed(b));
        let (_, w) = waker();
        assert!(matches!(
            t.poll_outcome(a, &w),
            Poll::Ready(Err(HsmError::Malformed(_)))
        ));
        assert!(matches!(t.poll_outcome(b, &w), Poll::Ready(Ok(_))));
    }

    #[test]
    fn fail_all_wakes_everyone_and_drops_queued_frames() {
        let mut t = CallTable::new();
        let (counter, w) = waker();
        let ids: Vec<u64> = (0..3)
            .map(|_| t.submit(&Request::DeviceInfo).expect("submit"))
            .collect();
        for id in &ids {
            assert!(t.poll_outcome(*id, &w).is_pending());
        }
        assert!(t.has_output());
        assert_eq!(t.fail_all(|| HsmError::ConnectionLost), 3);
        assert!(!t.has_output());
        assert_eq!(counter.0.load(Ordering::SeqCst), 3);
        for id in ids {
            assert!(matches!(
                t.poll_outcome(id, &w),
                Poll::Ready(Err(HsmError::ConnectionLost))
            ));
        }
    }

    #[test]
    fn oversized_request_is_rejected_without_side_effects() {
        let mut t = CallTable::new();
        let big = Request::Nop(vec![0; crate::proto::NOP_BYTES_MAX + 1]);
        assert!(matches!(t.submit(&big), Err(HsmError::InvalidRequest(_))));
        assert_eq!(t.in_flight(), 0);
        assert!(!t.has_output());
    }

    #[test]
    fn abandon_forgets_the_call() {
        let mut t = CallTable::new();
        let id = t.submit(&Request::DeviceInfo).expect("submit");
        assert!(t.abandon(id));
        assert!(!t.abandon(id));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let now = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        assert_eq!(b.ready_at(), None);
        assert_eq!(b.on_failure(now), now + Duration::from_millis(10));
        assert_eq!(b.on_failure(now), now + Duration::from_millis(20));
        assert_eq!(b.on_failure(now), now + Duration::from_millis(35));
        assert_eq!(b.on_failure(now), now + Duration::from_millis(35));
        b.on_success();
        assert_eq!(b.ready_at(), None);
        assert_eq!(b.current(), Duration::from_millis(10));
    }
}
