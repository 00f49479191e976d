//! The shard's side of cross-shard red claims (docs/design/red-claims.md).
//!
//! A red invoice is homed by its own key. When its original's home is another shard, the
//! red's shard (H) holds the red's batch aside, sends the original's shard (S) a
//! [`Message::RedClaim`] through S's inbox (a message, never shared state) and goes on
//! ticking; a task waits for the answers and posts them back to H's own inbox
//! ([`Message::ClaimsDone`]), and the batch joins a later tick. S checks the claim
//! (`Issuer::claim_red`), and answers only once the commit carrying the claim's record
//! (or, for a refusal, the next commit) is durable: the answers ride on that commit job.
//!
//! Order and bounds:
//! * held batches join ticks in arrival order, and while any is held, a new batch
//!   naming a key of a held batch is held behind it, so the first request for a key wins
//!   whatever the kind;
//! * at most [`RED_CLAIMS_WAITING_MAX`] claims wait at once and
//!   [`HELD_BATCHES_MAX`] batches are held; beyond that a red's claim is answered
//!   [`IssueError::RedClaimUnavailable`] at once (retry later), and a batch that only
//!   collides with a held key goes on unheld (one invoice per key still holds; only the
//!   winner between the two may differ);
//! * a peer that stopped, or drops the claim, answers `RedClaimUnavailable`.
//!
//! Blue batches pay one kind check per request when nothing is held.

use std::collections::{HashMap, VecDeque};

use appliance_core::idempotency::key_fingerprint;
use appliance_core::routing::key_home_shard;
use appliance_core::{InvoiceKind, IssueError, IssueRequest, RedClaim};

use super::{BatchSlot, Message, Shard, ShardSender};
use crate::inbox::ClaimResult;

/// Claims a shard waits for at once, all held batches together.
pub const RED_CLAIMS_WAITING_MAX: usize = 256;
/// Batches a shard holds aside at once (waiting for claims, or behind one that does).
pub const HELD_BATCHES_MAX: usize = 256;

const _: () = assert!(RED_CLAIMS_WAITING_MAX <= appliance_core::issuer::red::RED_ANSWERS_MAX);

/// A claim's answer on its way back to the red's shard.
pub(super) type ClaimReply = (flume::Sender<ClaimResult>, ClaimResult);

/// A batch held aside until its reds' claims are answered.
struct HeldBatch {
    id: u64,
    requests: Vec<IssueRequest>,
    slot: BatchSlot,
    /// The answers, once they are all in.
    outcomes: Option<Vec<(RedClaim, ClaimResult)>>,
    claims: usize,
}

/// Red-claim state of one shard (both roles).
#[derive(Default)]
pub(super) struct RedShell {
    /// Every shard's inbox, this one's included (index = shard id).
    peers: Vec<ShardSender>,
    /// Original's side: answers to send once the next commit job is durable.
    pub(super) replies: Vec<ClaimReply>,
    /// Red's side: held batches, in arrival order.
    held: VecDeque<HeldBatch>,
    /// Held batches whose answers are in (already given to the issuer), in order, for
    /// the next ticks.
    ready: VecDeque<(Vec<IssueRequest>, BatchSlot)>,
    /// Key fingerprints of the requests of held and ready batches, with counts.
    keys: HashMap<u128, u32>,
    claims_waiting: usize,
    next_id: u64,
}

impl RedShell {
    pub(super) fn new(peers: Vec<ShardSender>) -> RedShell {
        RedShell {
            peers,
            ..RedShell::default()
        }
    }

    /// Whether a held batch can join the next tick.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether batches wait for claims (the shard may not stop before they are answered).
    pub(super) fn holds(&self) -> bool {
        !self.held.is_empty() || !self.ready.is_empty()
    }

    fn add_keys(&mut self, requests: &[IssueRequest]) {
        for r in requests {
            *self
                .keys
                .entry(key_fingerprint(&r.seller, &r.order_id))
                .or_insert(0) += 1;
        }
    }

    fn remove_keys(&mut self, requests: &[IssueRequest]) {
        for r in requests {
            let key = key_fingerprint(&r.seller, &r.order_id);
            if let Some(count) = self.keys.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    self.keys.remove(&key);
                }
            }
        }
    }
}

impl Shard {
    /// Original's side: checks and claims, and keeps the answer for the next commit job.
    pub(super) fn on_red_claim(&mut self, claim: RedClaim, reply: flume::Sender<ClaimResult>) {
        let result = self.issuer.claim_red(self.clock.now_ms(), &claim);
        if let Err(e) = &result {
            tracing::debug!(shard = self.id, error = %e, "red claim refused");
        }
        self.red.replies.push((reply, result));
    }

    /// Red's side: returns the batch if it can go into a tick now; otherwise holds it
    /// (sending its claims) and returns `None`.
    pub(super) fn hold_for_claims(
        &mut self,
        requests: Vec<IssueRequest>,
        slot: BatchSlot,
    ) -> Option<(Vec<IssueRequest>, BatchSlot)> {
        let shards = self.red.peers.len() as u32;
        let keyed = !self.red.keys.is_empty();
        let has_red = shards > 1
            && requests
                .iter()
                .any(|r| matches!(r.kind, InvoiceKind::Red(_)));
        if !has_red && !keyed {
            return Some((requests, slot));
        }
        let mut claims: Vec<(RedClaim, u32)> = Vec::new();
        if has_red {
            for request in &requests {
                let Some(claim) = self.issuer.red_claim_needed(request) else {
                    continue;
                };
                let home = key_home_shard(claim.original_fingerprint, shards);
                // Homed here and not remembered: the tick refuses it as unknown.
                if home != self.id && !claims.iter().any(|(c, _)| *c == claim) {
                    claims.push((claim, home));
                }
            }
        }
        let collides = keyed
            && requests.iter().any(|r| {
                self.red
                    .keys
                    .contains_key(&key_fingerprint(&r.seller, &r.order_id))
            });
        if claims.is_empty() && !collides {
            return Some((requests, slot));
        }
        if self.red.held.len() + self.red.ready.len() >= HELD_BATCHES_MAX
            || self.red.claims_waiting + claims.len() > RED_CLAIMS_WAITING_MAX
        {
            for (claim, _) in claims {
                self.issuer
                    .red_claim_answered(claim, Err(IssueError::RedClaimUnavailable));
            }
            return Some((requests, slot));
        }
        self.red.add_keys(&requests);
        let id = self.red.next_id;
        self.red.next_id += 1;
        let waiting = claims.len();
        self.red.held.push_back(HeldBatch {
            id,
            requests,
            slot,
            outcomes: if waiting == 0 { Some(Vec::new()) } else { None },
            claims: waiting,
        });
        if waiting > 0 {
            self.red.claims_waiting += waiting;
            self.send_claims(id, claims);
        }
        self.promote_held();
        None
    }

    /// Sends the claims to their shards from a task, which posts the answers back to this
    /// shard's inbox: the tick loop never waits for a peer.
    fn send_claims(&self, id: u64, claims: Vec<(RedClaim, u32)>) {
        let peers = self.red.peers.clone();
        let home = self.red.peers[self.id as usize].clone();
        glommio::spawn_local(async move {
            let mut waits = Vec::with_capacity(claims.len());
            for (claim, shard) in claims {
                let (reply, answer) = flume::bounded(1);
                let message = Message::RedClaim { claim, reply };
                let sent = peers[shard as usize].tx.send_async(message).await.is_ok();
                waits.push((claim, sent.then_some(answer)));
            }
            let mut outcomes = Vec::with_capacity(waits.len());
            for (claim, answer) in waits {
                let result = match answer {
                    // A peer that stopped drops the claim (and its reply sender).
                    Some(answer) => answer
                        .recv_async()
                        .await
                        .unwrap_or(Err(IssueError::RedClaimUnavailable)),
                    None => Err(IssueError::RedClaimUnavailable),
                };
                outcomes.push((claim, result));
            }
            // If this shard stopped meanwhile, its held batches were answered already.
            let _ = home
                .tx
                .send_async(Message::ClaimsDone { id, outcomes })
                .await;
        })
        .detach();
    }

    /// Red's side: the answers of a held batch's claims are in.
    pub(super) fn on_claims_done(&mut self, id: u64, outcomes: Vec<(RedClaim, ClaimResult)>) {
        if let Some(held) = self.red.held.iter_mut().find(|h| h.id == id) {
            self.red.claims_waiting -= held.claims;
            held.outcomes = Some(outcomes);
        }
        self.promote_held();
    }

    /// Moves answered batches at the front of the held queue to the ready queue, giving
    /// their answers to the issuer.
    fn promote_held(&mut self) {
        while self.red.held.front().is_some_and(|h| h.outcomes.is_some()) {
            let held = self.red.held.pop_front().expect("checked above");
            for (claim, result) in held.outcomes.expect("checked above") {
                self.issuer.red_claim_answered(claim, result);
            }
            self.red.ready.push_back((held.requests, held.slot));
        }
    }

    /// Adds ready batches, oldest first, to a tick being gathered (up to `tick_max`
    /// requests, one batch at least).
    pub(super) fn take_ready(
        &mut self,
        batches: &mut Vec<(Vec<IssueRequest>, BatchSlot)>,
        count: &mut usize,
        tick_max: usize,
    ) {
        while let Some((requests, _)) = self.red.ready.front() {
            if *count + requests.len() > tick_max && *count > 0 {
                break;
            }
            let (requests, slot) = self.red.ready.pop_front().expect("checked above");
            self.red.remove_keys(&requests);
            *count += requests.len();
            batches.push((requests, slot));
        }
    }

    /// Every held batch, answered with `failure` (the shard stops).
    pub(super) fn fail_held(&mut self, failure: &super::IssueFailure) {
        let held = std::mem::take(&mut self.red.held);
        let ready = std::mem::take(&mut self.red.ready);
        let slots = held
            .into_iter()
            .map(|h| h.slot)
            .chain(ready.into_iter().map(|(_, slot)| slot));
        super::answers::answer_all(slots.collect(), failure.clone());
        self.red.keys.clear();
        self.red.claims_waiting = 0;
    }
}
