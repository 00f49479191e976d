//! The issue exchange of a QUIC endpoint: a request frame read by the driver
//! (`super::endpoint`) is answered (hello), refused, or, for an issue frame, decoded and
//! authorised item by item, its requests grouped by home shard and submitted to those
//! shards' inboxes
//! ([`ShardSender::submit_to`](crate::inbox::ShardSender::submit_to)); the shards'
//! answers come back through the driver's answer queue, and the last one of a frame
//! completes its reply frame.

use super::endpoint::{header_error_code, Driver, EndpointContext};
use crate::inbox::{Answered, EndpointReply, IssueFailure, IssueResult};
use appliance_proto::{
    encode_result, home_shard, split_frame, split_items, ErrorCode, FrameKind, HelloReply,
    ItemResult, BATCH_REQUESTS_MAX, FRAME_BYTES_MAX, HEADER_BYTES, STREAMS_PER_CONNECTION_MAX,
};
use quinn_proto::{ConnectionHandle, StreamId};

/// Bits of an answer token that name the home shard (the rest name the frame).
const TOKEN_SHARD_BITS: u32 = 16;

/// An issue frame whose requests are with their home shards.
pub(super) struct PendingFrame {
    ch: ConnectionHandle,
    stream: StreamId,
    /// One per request of the frame; those refused before submission are already set.
    results: Vec<Option<ItemResult>>,
    /// Per home shard: the positions in the frame of the requests it was given.
    positions: Vec<Vec<u32>>,
    /// Shards whose answer has not come yet.
    outstanding: usize,
}

impl PendingFrame {
    /// Takes shard `shard`'s results for its group (empty: the batch was dropped, so
    /// its requests stay without a result and are answered as `ShardStopped`); returns
    /// whether that was the frame's last answer.
    fn take_answer(&mut self, shard: usize, results: Vec<IssueResult>) -> bool {
        // Each batch's `EndpointReply` answers exactly once.
        assert!(
            self.outstanding > 0,
            "frame answered more often than submitted"
        );
        let positions = std::mem::take(&mut self.positions[shard]);
        for (position, result) in positions.into_iter().zip(results) {
            self.results[position as usize] = Some(to_item_result(result));
        }
        self.outstanding -= 1;
        self.outstanding == 0
    }
}

impl Driver {
    pub(super) fn handle_frame(&mut self, ch: ConnectionHandle, id: StreamId, bytes: Vec<u8>) {
        let (header, body) = match split_frame(&bytes) {
            Ok(split) => split,
            Err(e) => {
                self.refuse_stream(ch, id, header_error_code(&e), &e.to_string());
                return;
            }
        };
        match header.kind {
            FrameKind::Hello => {
                let hello = HelloReply {
                    shard_id: self.context.shard_id as u16,
                    shard_count: self.context.shards.len() as u16,
                    batch_requests_max: BATCH_REQUESTS_MAX,
                    frame_bytes_max: FRAME_BYTES_MAX as u32,
                    streams_max: STREAMS_PER_CONNECTION_MAX,
                    shard_ports: self.context.shard_ports.clone(),
                };
                let mut frame = Vec::new();
                hello.encode_frame(&mut frame);
                self.reply(ch, id, frame);
            }
            FrameKind::Issue => {
                let items = match split_items(body, header.count) {
                    Ok(items) => items,
                    Err(appliance_proto::BodyError::Count(count)) => {
                        self.refuse_stream(
                            ch,
                            id,
                            ErrorCode::BatchTooLarge,
                            &format!("batch of {count} requests; 1..={BATCH_REQUESTS_MAX} allowed"),
                        );
                        return;
                    }
                    Err(e) => {
                        self.refuse_stream(ch, id, ErrorCode::Malformed, &e.to_string());
                        return;
                    }
                };
                let identity = self.conns[&ch].identity.clone().expect("connected");
                let exchange = Exchange::prepare(&self.context, &identity, &items);
                self.submit(ch, id, exchange);
            }
            FrameKind::HelloReply | FrameKind::IssueReply | FrameKind::Error => {
                self.refuse_stream(
                    ch,
                    id,
                    ErrorCode::UnexpectedKind,
                    "servers accept hello and issue frames only",
                );
            }
        }
    }

    /// Hands a frame's requests to their home shards; the reply goes out once every
    /// shard has answered ([`Driver::answered`]), at once if none was given any.
    fn submit(&mut self, ch: ConnectionHandle, stream: StreamId, exchange: Exchange) {
        let frame = self.next_frame;
        self.next_frame += 1;
        let mut outstanding = 0;
        let mut positions = Vec::with_capacity(exchange.groups.len());
        for (shard, (requests, at)) in exchange.groups.into_iter().enumerate() {
            if !requests.is_empty() {
                if shard as u32 != self.context.shard_id {
                    self.context.metrics.borrow_mut().quic.forwarded_requests +=
                        requests.len() as u64;
                }
                debug_assert!(shard < 1 << TOKEN_SHARD_BITS);
                let token = frame << TOKEN_SHARD_BITS | shard as u64;
                let reply = EndpointReply::new(self.answers_tx.clone(), token);
                // Whatever happens to the batch now, an answer comes back for it.
                outstanding += 1;
                if let Some(send) = self.context.shards[shard].submit_to(requests, reply) {
                    // The inbox is full: wait for room without holding up the driver.
                    glommio::spawn_local(send).detach();
                }
            }
            positions.push(at);
        }
        if outstanding == 0 {
            self.reply(ch, stream, encode_reply(exchange.results));
            return;
        }
        self.pending.insert(
            frame,
            PendingFrame {
                ch,
                stream,
                results: exchange.results,
                positions,
                outstanding,
            },
        );
    }

    /// One shard's answer to a frame; the last one completes the frame's reply.
    pub(super) fn answered(&mut self, answered: Answered) {
        let frame = answered.token >> TOKEN_SHARD_BITS;
        let shard = (answered.token & ((1 << TOKEN_SHARD_BITS) - 1)) as usize;
        let Some(pending) = self.pending.get_mut(&frame) else {
            return;
        };
        if pending.take_answer(shard, answered.results) {
            let done = self.pending.remove(&frame).expect("present");
            self.reply(done.ch, done.stream, encode_reply(done.results));
        }
    }
}

/// One issue frame on its way through the shards.
struct Exchange {
    results: Vec<Option<ItemResult>>,
    /// Per home shard: the requests and their positions in the frame.
    groups: Vec<(Vec<appliance_core::IssueRequest>, Vec<u32>)>,
}

impl Exchange {
    /// Decodes and authorises every item; what fails gets its result now, the rest is
    /// grouped by home shard.
    fn prepare(context: &EndpointContext, identity: &str, items: &[&[u8]]) -> Exchange {
        let shards = context.shards.len() as u32;
        let mut results = vec![None; items.len()];
        let mut groups: Vec<(Vec<_>, Vec<u32>)> =
            (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
        for (i, item) in items.iter().enumerate() {
            match appliance_proto::decode_request(item) {
                Err(e) => {
                    results[i] = Some(ItemResult::Failed {
                        code: ErrorCode::InvalidItem,
                        message: e.to_string(),
                    })
                }
                Ok(request) if !context.authorisation.may_issue(identity, &request.seller) => {
                    context.metrics.borrow_mut().quic.unauthorised_requests += 1;
                    tracing::warn!(
                        shard = context.shard_id,
                        identity,
                        seller = %request.seller,
                        "client not authorised for seller"
                    );
                    results[i] = Some(ItemResult::Failed {
                        code: ErrorCode::Unauthorised,
                        message: format!("client {identity} may not issue for {}", request.seller),
                    });
                }
                Ok(request) => {
                    let home = home_shard(&request, shards) as usize;
                    if groups[home].0.capacity() == 0 {
                        // A shard-aware client's frame goes to one shard: room for the
                        // rest of it at once rather than regrowing (and moving) the
                        // requests as they come.
                        groups[home].0.reserve_exact(items.len() - i);
                        groups[home].1.reserve_exact(items.len() - i);
                    }
                    groups[home].0.push(request);
                    groups[home].1.push(i as u32);
                }
            }
        }
        Exchange { results, groups }
    }
}

/// The reply frame: one result per request, in order. A request without a result (its
/// shard dropped the batch) failed with `ShardStopped`.
fn encode_reply(results: Vec<Option<ItemResult>>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_BYTES + results.len() * 74);
    let at = appliance_proto::frame::begin_frame(
        &mut frame,
        FrameKind::IssueReply,
        results.len() as u32,
    );
    for result in results {
        let result = result.unwrap_or_else(|| ItemResult::Failed {
            code: ErrorCode::ShardStopped,
            message: "shard stopped".into(),
        });
        encode_result(&mut frame, &result);
    }
    appliance_proto::frame::finish_frame(&mut frame, at);
    frame
}

fn to_item_result(result: IssueResult) -> ItemResult {
    match result {
        Ok(issued) => {
            let invoice = &issued.invoice;
            let wire = appliance_proto::Issued {
                identity: invoice.identity(),
                issue_time_ms: invoice.issue_time_ms,
                tax_control_code: invoice.tax_control_code,
                check_code: invoice.check_code,
            };
            if issued.replayed {
                ItemResult::Replayed(wire)
            } else {
                ItemResult::Issued(wire)
            }
        }
        Err(IssueFailure::Rejected(error)) => ItemResult::Failed {
            code: ErrorCode::from_issue_error(&error),
            message: error.to_string(),
        },
        Err(IssueFailure::TaxServer(message)) => ItemResult::Failed {
            code: ErrorCode::TaxServerUnavailable,
            message,
        },
        Err(IssueFailure::ShardStopped(message)) => ItemResult::Failed {
            code: ErrorCode::ShardStopped,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_proto::decode_results;
    use quinn_proto::Dir;

    fn codes(frame: &[u8]) -> Vec<ErrorCode> {
        let (header, body) = split_frame(frame).unwrap();
        assert_eq!(header.kind, FrameKind::IssueReply);
        decode_results(body, header.count)
            .unwrap()
            .into_iter()
            .map(|result| match result {
                ItemResult::Failed { code, .. } => code,
                other => panic!("expected a failure, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_frame_completes_with_its_last_answer_and_a_dropped_batch_reads_shard_stopped() {
        let mut pending = PendingFrame {
            ch: ConnectionHandle(0),
            stream: StreamId::new(quinn_proto::Side::Client, Dir::Bi, 0),
            // Item 0 was refused before submission; 1 and 3 went to shard 0, 2 to shard 1.
            results: vec![
                Some(ItemResult::Failed {
                    code: ErrorCode::InvalidItem,
                    message: "bad".into(),
                }),
                None,
                None,
                None,
            ],
            positions: vec![vec![1, 3], vec![2]],
            outstanding: 2,
        };
        // Shard 1 stopped and its batch was dropped: an empty answer.
        assert!(!pending.take_answer(1, Vec::new()));
        let down = IssueFailure::TaxServer("down".into());
        let refused = IssueFailure::Rejected(appliance_core::IssueError::IdempotencyConflict);
        assert!(pending.take_answer(0, vec![Err(down), Err(refused)]));
        assert_eq!(
            codes(&encode_reply(pending.results)),
            vec![
                ErrorCode::InvalidItem,
                ErrorCode::TaxServerUnavailable,
                ErrorCode::ShardStopped,
                ErrorCode::from_issue_error(&appliance_core::IssueError::IdempotencyConflict),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "answered more often")]
    fn an_answer_beyond_the_submitted_batches_is_a_bug() {
        let mut pending = PendingFrame {
            ch: ConnectionHandle(0),
            stream: StreamId::new(quinn_proto::Side::Client, Dir::Bi, 0),
            results: vec![None],
            positions: vec![vec![0]],
            outstanding: 1,
        };
        assert!(pending.take_answer(0, Vec::new()));
        pending.take_answer(0, Vec::new());
    }
}
