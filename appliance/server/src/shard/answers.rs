//! Answers: one request's result from the tick's answer (and, for a replay, its journal
//! record), a batch failed whole, and the inbox of a shard that stopped, answered so that
//! nobody waits for an answer that cannot come.

use super::{BatchSlot, IssueFailure, IssueResult, IssuedInvoice, Message, ShardError};
use crate::metrics::ShardMetrics;
use appliance_core::journal::record::{decode_issued, RecordError};
use appliance_core::{Answer, IssueError};
use std::cell::RefCell;

/// Hands the inbox of a shard that stopped serving to a thread that answers every batch
/// in it, and every batch sent to it later, with [`IssueFailure::ShardStopped`] (metrics
/// requests with the last figures). Peers' endpoints and the handle keep the inbox open
/// after the shard is gone, and a batch left in it would hold its reply sender: its
/// caller (a QUIC stream forwarded from another shard, or a `ShardHandle::submit`) would
/// wait forever. The thread ends when the last sender is dropped.
pub(super) fn answer_inbox_as_stopped(
    shard: u32,
    rx: flume::Receiver<Message>,
    served: &Result<(), ShardError>,
    metrics: ShardMetrics,
) {
    let failure = IssueFailure::ShardStopped(match served {
        Ok(()) => format!("shard {shard} shut down"),
        Err(e) => e.to_string(),
    });
    let spawned = std::thread::Builder::new()
        .name(format!("shard-{shard}-stopped"))
        .spawn(move || {
            for message in rx.iter() {
                match message {
                    Message::Issue {
                        requests, reply, ..
                    } => {
                        reply.send(vec![Err(failure.clone()); requests.len()]);
                    }
                    Message::Metrics { reply } => {
                        let _ = reply.send(metrics.clone());
                    }
                    Message::RedClaim { reply, .. } => {
                        let _ = reply.send(Err(IssueError::RedClaimUnavailable));
                    }
                    // Its held batches were answered when the shard stopped.
                    Message::ClaimsDone { .. } => {}
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(shard, error = %e, "no thread to answer the stopped shard's inbox");
    }
}

pub(super) fn answer_all(slots: Vec<BatchSlot>, failure: IssueFailure) {
    for slot in slots {
        slot.reply.send(vec![Err(failure.clone()); slot.len]);
    }
}

/// The answer to one request; `replayed` is the journal record of a replay.
pub(super) fn answer_one(
    shard: u32,
    metrics: &RefCell<ShardMetrics>,
    answer: Answer,
    replayed: Option<(u8, Vec<u8>)>,
) -> Result<IssueResult, ShardError> {
    Ok(match answer {
        Answer::Issued { invoice, .. } => {
            metrics.borrow_mut().issued_invoices += 1;
            Ok(IssuedInvoice {
                invoice,
                replayed: false,
            })
        }
        Answer::Replay { seq, identity } => {
            let journal_error = |e: String| ShardError::Journal {
                shard,
                message: format!("record {seq}: {e}"),
            };
            let (_kind, body) = replayed.ok_or_else(|| journal_error("not read".into()))?;
            let invoice =
                decode_issued(&body).map_err(|e: RecordError| journal_error(e.to_string()))?;
            // Assert on both sides of the disk boundary: the index and the record agree.
            if invoice.identity() != identity {
                return Err(journal_error(format!(
                    "holds {:?}, the index says {identity:?}",
                    invoice.identity()
                )));
            }
            metrics.borrow_mut().replayed_invoices += 1;
            Ok(IssuedInvoice {
                invoice,
                replayed: true,
            })
        }
        Answer::Rejected(error) => {
            metrics.borrow_mut().rejected_requests += 1;
            Err(IssueFailure::Rejected(error))
        }
    })
}
