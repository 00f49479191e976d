//! A shard's inbox and its answers: the messages a shard takes ([`ShardSender`]), what a
//! batch's requests get back ([`IssueResult`]), and the two ways a batch is answered (a
//! one-shot channel, or a QUIC endpoint's answer queue through [`EndpointReply`]).
//!
//! Both the shards (`crate::shard`) and the QUIC endpoints (`crate::quic`) use this
//! module, and it uses neither: the endpoints submit batches and take their answers
//! without importing the shard, which only imports `quic` to start its endpoints.

use crate::metrics::ShardMetrics;
use appliance_core::{Invoice, IssueError, IssueRequest};
use std::time::Instant;

/// Why a request got no invoice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueFailure {
    /// The request was refused by validation or by the rules; retrying it unchanged is
    /// refused again.
    #[error("rejected: {0}")]
    Rejected(IssueError),
    /// The tax server could not be asked; nothing was issued, retrying is safe.
    #[error("tax server unavailable: {0}")]
    TaxServer(String),
    /// The shard stopped (journal failure or shutdown); retry after restart.
    #[error("shard stopped: {0}")]
    ShardStopped(String),
}

/// An invoice as answered: issued by this request, or earlier for the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedInvoice {
    /// The invoice.
    pub invoice: Invoice,
    /// True when the order had already been issued (idempotent replay of the same request).
    pub replayed: bool,
}

/// Result of one request.
pub type IssueResult = Result<IssuedInvoice, IssueFailure>;

/// What the original's shard answers a red claim (`shard::red`).
pub(crate) type ClaimResult = Result<(), IssueError>;

/// A message to a shard's inbox.
pub(crate) enum Message {
    Issue {
        requests: Vec<IssueRequest>,
        reply: Reply,
        enqueued: Instant,
    },
    Metrics {
        reply: flume::Sender<ShardMetrics>,
    },
    /// From another shard: claim part of an original remembered here for its red
    /// (`shard::red`).
    RedClaim {
        claim: appliance_core::RedClaim,
        reply: flume::Sender<ClaimResult>,
    },
    /// From this shard's own claim task: the answers for a held batch.
    ClaimsDone {
        id: u64,
        outcomes: Vec<(appliance_core::RedClaim, ClaimResult)>,
    },
}

/// Where a batch's results go once its tick is durable.
pub(crate) enum Reply {
    /// A one-shot channel ([`ShardHandle::submit`](crate::shard::ShardHandle::submit)).
    Once(flume::Sender<Vec<IssueResult>>),
    /// A QUIC endpoint's answer queue.
    Endpoint(EndpointReply),
}

impl Reply {
    /// Delivers the results; a receiver that is gone no longer wants them.
    pub(crate) fn send(self, results: Vec<IssueResult>) {
        match self {
            Reply::Once(tx) => {
                let _ = tx.send(results);
            }
            Reply::Endpoint(reply) => reply.send(results),
        }
    }
}

/// Results of one batch, delivered to the endpoint that submitted it.
#[derive(Debug)]
pub struct Answered {
    /// The endpoint's name for the batch ([`EndpointReply::new`]).
    pub token: u64,
    /// One result per request, in order; **empty** when the batch was dropped unanswered
    /// (its shard stopped, or was already gone when it was submitted): every request of
    /// it then failed with [`IssueFailure::ShardStopped`].
    pub results: Vec<IssueResult>,
}

/// Where a QUIC endpoint wants one batch's results: its answer queue and its token for
/// the batch. Unlike a one-shot channel per batch it costs no allocation, and the
/// endpoint's driver takes the results itself (no task per request frame).
///
/// Dropped without an answer (the batch was lost with a stopped shard, or never reached
/// one), it sends an empty [`Answered`], so the endpoint never waits for an answer that
/// cannot come.
#[derive(Debug)]
pub struct EndpointReply {
    to: flume::Sender<Answered>,
    token: u64,
    answered: bool,
}

impl EndpointReply {
    /// Results of the batch go to `to`, tagged with `token`. The queue should be
    /// unbounded: shards answer from their tick loop and must never block on it (what
    /// bounds it is the number of request frames in flight).
    pub fn new(to: flume::Sender<Answered>, token: u64) -> EndpointReply {
        EndpointReply {
            to,
            token,
            answered: false,
        }
    }

    fn send(mut self, results: Vec<IssueResult>) {
        self.deliver(results);
    }

    fn deliver(&mut self, results: Vec<IssueResult>) {
        self.answered = true;
        let _ = self.to.send(Answered {
            token: self.token,
            results,
        });
    }
}

impl Drop for EndpointReply {
    fn drop(&mut self) {
        if !self.answered {
            self.deliver(Vec::new());
        }
    }
}

/// A shard's inbox as seen by other shards' QUIC endpoints (forwarded requests) and its
/// own: a channel, never shared state.
#[derive(Debug, Clone)]
pub struct ShardSender {
    pub(crate) tx: flume::Sender<Message>,
}

impl ShardSender {
    /// Queues a batch whose results go to `reply`. The batch must not exceed the shard's
    /// `tick_requests_max`, which is at least the protocol's `BATCH_REQUESTS_MAX`.
    ///
    /// Never blocks: when the inbox is full it returns the send as a future, for the
    /// caller to run (back-pressure without holding up its other work). A batch for a
    /// shard that stopped is dropped, and `reply` answers it as stopped.
    pub fn submit_to(
        &self,
        requests: Vec<IssueRequest>,
        reply: EndpointReply,
    ) -> Option<impl std::future::Future<Output = ()> + 'static> {
        let message = Message::Issue {
            requests,
            reply: Reply::Endpoint(reply),
            enqueued: Instant::now(),
        };
        match self.tx.try_send(message) {
            Ok(()) | Err(flume::TrySendError::Disconnected(_)) => None,
            Err(flume::TrySendError::Full(message)) => {
                let tx = self.tx.clone();
                Some(async move {
                    let _ = tx.send_async(message).await;
                })
            }
        }
    }

    /// A snapshot of the shard's metrics (blocking; for threads outside the shards).
    /// `None` if the shard stopped.
    pub fn metrics(&self) -> Option<ShardMetrics> {
        let (reply, rx) = flume::bounded(1);
        self.tx.send(Message::Metrics { reply }).ok()?;
        rx.recv().ok()
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Issue { requests, .. } => write!(f, "Issue({} requests)", requests.len()),
            Message::Metrics { .. } => write!(f, "Metrics"),
            Message::RedClaim { .. } => write!(f, "RedClaim"),
            Message::ClaimsDone { outcomes, .. } => write!(f, "ClaimsDone({})", outcomes.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reply_answers_exactly_once() {
        let (tx, rx) = flume::unbounded();
        let failure = IssueFailure::TaxServer("down".into());
        Reply::Endpoint(EndpointReply::new(tx.clone(), 7)).send(vec![Err(failure.clone())]);
        let answered = rx.try_recv().expect("answered");
        assert_eq!(answered.token, 7);
        assert_eq!(answered.results, vec![Err(failure)]);
        assert!(
            rx.try_recv().is_err(),
            "the answer is not followed by a drop answer"
        );
    }

    #[test]
    fn an_endpoint_reply_dropped_unanswered_answers_empty() {
        let (tx, rx) = flume::unbounded();
        let message = Message::Issue {
            requests: Vec::new(),
            reply: Reply::Endpoint(EndpointReply::new(tx, 9)),
            enqueued: Instant::now(),
        };
        drop(message);
        let answered = rx.try_recv().expect("answered on drop");
        assert_eq!(answered.token, 9);
        assert!(answered.results.is_empty());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_batch_for_a_stopped_shard_is_answered_as_dropped() {
        let (inbox_tx, inbox_rx) = flume::bounded(1);
        drop(inbox_rx);
        let sender = ShardSender { tx: inbox_tx };
        let (tx, rx) = flume::unbounded();
        assert!(sender
            .submit_to(Vec::new(), EndpointReply::new(tx, 3))
            .is_none());
        let answered = rx.try_recv().expect("answered");
        assert_eq!(answered.token, 3);
        assert!(answered.results.is_empty());
    }

    #[test]
    fn a_full_inbox_hands_back_the_send() {
        let (inbox_tx, inbox_rx) = flume::bounded(1);
        let sender = ShardSender { tx: inbox_tx };
        let (tx, rx) = flume::unbounded();
        assert!(sender
            .submit_to(Vec::new(), EndpointReply::new(tx.clone(), 1))
            .is_none());
        let send = sender
            .submit_to(Vec::new(), EndpointReply::new(tx, 2))
            .expect("the inbox is full");
        assert_eq!(inbox_rx.len(), 1);
        drop(inbox_rx.try_recv().expect("first batch"));
        futures_lite::future::block_on(send);
        assert_eq!(
            inbox_rx.len(),
            1,
            "the second batch went in once there was room"
        );
        // The first batch was dropped unanswered; the second is still queued.
        assert_eq!(rx.try_recv().expect("dropped").token, 1);
        assert!(rx.try_recv().is_err());
    }
}
