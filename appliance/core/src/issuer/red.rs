//! Red invoices whose original lives on another shard: the claim protocol, sans I/O.
//!
//! Every request is homed by its own key (seller, order id), a red one too
//! ([`crate::routing::key_home_shard`]), so one key has one home and one index: it is
//! issued at most once, as blue or as red. A red invoice's original, however, is
//! remembered by the original's home shard S, which may differ from the red's home H.
//! The rules that need the original (known, same code and number, not red itself, Σ reds
//! ≤ original) are checked where it lives, on S:
//!
//! ```text
//! H: issuer.red_claim_needed(request) -> Some(claim)     shell: send claim to S = home
//!                                                        of claim.original_fingerprint
//! S: issuer.claim_red(now_ms, &claim) -> Ok / Err        checks; Ok queues a RedClaimed
//!                                                        record for S's next commit
//!    shell: answer H only once that commit is durable
//! H: issuer.red_claim_answered(claim, result)            then begin_tick with the red:
//!                                                        a granted claim admits it, a
//!                                                        refusal refuses it
//! ```
//!
//! What a claim means on S: once granted, |red fen| counts in the original's red total
//! (`IdempotencyIndex::red_total_fen`) exactly like a red issued on S, whether or not H
//! then issues the red. So Σ (reds issued on S + claims granted to other shards) ≤ the
//! original's total, and since every red issued anywhere holds a claim (or was issued on
//! S), the rule holds across shards. A claim whose red is never issued keeps its amount
//! reserved (conservative: never too much red, possibly too little).
//!
//! Claims are remembered on S by the red's key: a retried claim for the same red (H
//! restarted, or the tick issuing it failed) is granted again without being counted
//! twice, a claim for the same red key with another amount or original is an
//! `IdempotencyConflict`. They are forgotten after the retention window, like orders.
//!
//! On H the answers wait, by claim, for the tick that takes the red: a grant
//! stays until the red is issued (a retry after a failed tick re-uses it; H does not
//! journal it, a restart simply claims again), a refusal answers the red (and duplicates
//! of it in the same tick) and is replaced by the next claim of a retry. At most
//! [`RED_ANSWERS_MAX`] answers are kept, oldest dropped first (a dropped grant is claimed
//! again, idempotently).

use std::collections::{HashMap, VecDeque};

use super::Issuer;
use crate::idempotency::{key_fingerprint, FingerprintMap};
use crate::invoice::{InvoiceIdentity, InvoiceKind, IssueRequest};
use crate::journal::record::Record;
use crate::journal::replay::RecoveryError;
use crate::validate::IssueError;

/// Claim answers a red invoice's home shard keeps for reds not yet issued. The shell
/// bounds the reds waiting for claims below this.
pub const RED_ANSWERS_MAX: usize = 4096;

/// What a red invoice claims on its original's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RedClaim {
    /// Key fingerprint of (seller, original order id).
    pub original_fingerprint: u128,
    /// Code and number the red names for its original.
    pub original: InvoiceIdentity,
    /// Key fingerprint of the red's own (seller, order id).
    pub red_fingerprint: u128,
    /// |total| of the red invoice, fen.
    pub red_fen: i64,
}

impl RedClaim {
    /// The claim a red request makes on its original; `None` for a blue request.
    pub fn of(request: &IssueRequest) -> Option<RedClaim> {
        let InvoiceKind::Red(reference) = &request.kind else {
            return None;
        };
        Some(RedClaim {
            original_fingerprint: key_fingerprint(&request.seller, &reference.original_order_id),
            original: InvoiceIdentity {
                code: reference.original_code,
                number: reference.original_number,
            },
            red_fingerprint: key_fingerprint(&request.seller, &request.order_id),
            red_fen: request.total_fen.saturating_abs(),
        })
    }
}

/// Claims granted here (original's side) and claim answers waiting here (red's side).
#[derive(Debug, Default)]
pub(crate) struct RedClaims {
    /// Granted claims by the red's key fingerprint, with their grant time.
    granted: FingerprintMap<(RedClaim, u64)>,
    /// (grant time, red key) in grant order (times never decrease): expiry pops the front.
    granted_order: VecDeque<(u64, u128)>,
    /// Answers by claim (two requests for the same red key with other amounts or
    /// originals have their own answers), with the stamp of their insertion.
    answers: HashMap<RedClaim, (Result<(), IssueError>, u64)>,
    /// (claim, stamp) in insertion order; a pair whose stamp no longer matches its entry
    /// is stale.
    answers_order: VecDeque<(RedClaim, u64)>,
    answers_stamp: u64,
}

impl RedClaims {
    /// Forgets claims past the retention window, by the index's own rule (whole seconds):
    /// a claim is never older than its original, so it is forgotten no earlier than the
    /// original, and a retried claim can never be counted twice against a remembered
    /// original.
    fn expire_granted(&mut self, now_ms: u64, retention_ms: u64) {
        let (now_s, retention_s) = (now_ms / 1000, retention_ms / 1000);
        while let Some(&(time_ms, red)) = self.granted_order.front() {
            if now_s.saturating_sub(time_ms / 1000) <= retention_s {
                break;
            }
            self.granted_order.pop_front();
            self.granted.remove(&red);
        }
    }

    fn grant(&mut self, claim: RedClaim, time_ms: u64) {
        self.granted.insert(claim.red_fingerprint, (claim, time_ms));
        self.granted_order
            .push_back((time_ms, claim.red_fingerprint));
    }

    /// Forgets the answer for a red that was issued (its key is in the index now): one
    /// emptiness check for every other request.
    pub(super) fn issued(&mut self, request: &IssueRequest) {
        if !self.answers.is_empty() {
            if let Some(claim) = RedClaim::of(request) {
                self.answers.remove(&claim);
            }
        }
    }
}

impl Issuer {
    /// Claims granted to other shards' reds and remembered here.
    pub fn red_claims_granted(&self) -> usize {
        self.red.granted.len()
    }

    /// Claim answers waiting here for their reds.
    pub fn red_claim_answers(&self) -> usize {
        self.red.answers.len()
    }

    /// The rules a red of `red_fen` against the original `original` (key fingerprint)
    /// must meet here, where the original is remembered. Reds in flight count as
    /// claimed: all of them may be issued.
    pub(super) fn check_red_against(
        &self,
        original: u128,
        identity: InvoiceIdentity,
        red_fen: i64,
    ) -> Result<(), IssueError> {
        let entry = self
            .index
            .get(original)
            .ok_or(IssueError::RedOriginalUnknown)?;
        if entry.code != identity.code.get() || entry.number != identity.number.get() {
            return Err(IssueError::RedOriginalMismatch);
        }
        if entry.total_fen < 0 {
            return Err(IssueError::RedOfRed);
        }
        let used_fen = self
            .index
            .red_total_fen(original)
            .saturating_add(self.in_flight_red_fen.get(&original).copied().unwrap_or(0));
        let remaining_fen = entry.total_fen.saturating_sub(used_fen);
        if red_fen > remaining_fen {
            return Err(IssueError::RedExceedsOriginal {
                red_fen,
                remaining_fen,
            });
        }
        Ok(())
    }

    /// Original's side: checks another shard's red against the original remembered here
    /// and, if it may be issued, claims its amount. A granted claim counts in the
    /// original's red total at once and queues a `RedClaimed` record for the next commit;
    /// answer the red's shard only once that commit is durable (a refusal too: it may
    /// rest on records of the commits before). A claim already granted for the same red
    /// key is granted again without counting twice; one with another amount or original
    /// is an `IdempotencyConflict`. A refusal changes nothing.
    pub fn claim_red(&mut self, now_ms: u64, claim: &RedClaim) -> Result<(), IssueError> {
        let now_ms = now_ms.max(self.clock_ms);
        // The same expiry as a tick at this time (recovery repeats it at the record).
        self.index.expire(now_ms);
        self.red.expire_granted(now_ms, self.config.retention_ms);
        if let Some((granted, _)) = self.red.granted.get(&claim.red_fingerprint) {
            return if granted == claim {
                Ok(())
            } else {
                Err(IssueError::IdempotencyConflict)
            };
        }
        if claim.red_fen <= 0 {
            // A red of zero is refused by validation on its own shard; never claimed.
            return Err(IssueError::EmptyInvoice);
        }
        self.check_red_against(claim.original_fingerprint, claim.original, claim.red_fen)?;
        if self.red.granted.len() >= self.index.capacity() as usize {
            return Err(IssueError::IndexFull);
        }
        if self.control.len() >= super::CONTROL_RECORDS_MAX {
            return Err(IssueError::RedClaimUnavailable);
        }
        // Claim times join the tick times: never backwards along the journal, so that
        // recovery expires at each record exactly as here.
        self.clock_ms = now_ms;
        self.control.push(Record::RedClaimed {
            claim: *claim,
            claim_time_ms: now_ms,
        });
        self.index
            .add_red_fen(claim.original_fingerprint, claim.red_fen);
        self.red.grant(*claim, now_ms);
        Ok(())
    }

    /// Red's side: the claim `request` must get from its original's shard before a tick
    /// can take it, or `None` when it needs none: a blue request, a red whose own key is
    /// remembered or being issued here (the tick answers it as a replay, a duplicate or a
    /// conflict), a red whose original is remembered here (checked locally), or one
    /// whose claim was already granted. The caller sends the claim to the home shard of
    /// `claim.original_fingerprint`; if that is this shard, the original is unknown and
    /// the tick says so.
    pub fn red_claim_needed(&self, request: &IssueRequest) -> Option<RedClaim> {
        let claim = RedClaim::of(request)?;
        if self.index.get(claim.red_fingerprint).is_some()
            || self
                .in_flight
                .iter()
                .any(|t| t.firsts.contains_key(&claim.red_fingerprint))
            || self.index.get(claim.original_fingerprint).is_some()
        {
            return None;
        }
        match self.red.answers.get(&claim) {
            Some((Ok(()), _)) => None,
            _ => Some(claim),
        }
    }

    /// Red's side: the original's shard answered `claim` (or could not:
    /// [`IssueError::RedClaimUnavailable`]). The next tick taking the red admits it on a
    /// grant, or refuses it with the refusal.
    pub fn red_claim_answered(&mut self, claim: RedClaim, result: Result<(), IssueError>) {
        let red = &mut self.red;
        red.answers_stamp += 1;
        let stamp = red.answers_stamp;
        red.answers.insert(claim, (result, stamp));
        red.answers_order.push_back((claim, stamp));
        while red.answers_order.len() > RED_ANSWERS_MAX {
            let (key, stamp) = red
                .answers_order
                .pop_front()
                .expect("longer than the bound");
            if red.answers.get(&key).is_some_and(|(_, s)| *s == stamp) {
                red.answers.remove(&key);
            }
        }
    }

    /// Admission of a red whose original is not remembered here: by its claim's answer.
    pub(super) fn admit_remote_red(&self, request: &IssueRequest) -> Result<(), IssueError> {
        match RedClaim::of(request).and_then(|claim| self.red.answers.get(&claim)) {
            Some((result, _)) => result.clone(),
            None => Err(IssueError::RedOriginalUnknown),
        }
    }

    /// Recovery of a `RedClaimed` record: the claim counts in its original's red total
    /// again (if the original is still remembered) and is remembered by the red's key.
    pub(crate) fn replay_red_claim(
        &mut self,
        seq: u64,
        claim: &RedClaim,
        claim_time_ms: u64,
    ) -> Result<(), RecoveryError> {
        self.clock_ms = self.clock_ms.max(claim_time_ms);
        self.index.expire(self.clock_ms);
        self.red
            .expire_granted(self.clock_ms, self.config.retention_ms);
        if self.red.granted.contains_key(&claim.red_fingerprint) {
            return Err(RecoveryError::BadReference { seq });
        }
        if self.red.granted.len() >= self.index.capacity() as usize {
            return Err(RecoveryError::IndexFull { seq });
        }
        if self.index.get(claim.original_fingerprint).is_some() {
            self.index
                .add_red_fen(claim.original_fingerprint, claim.red_fen);
        }
        self.red.grant(*claim, claim_time_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::{Invoice, RedReference};
    use crate::issuer::tests::{config, fake_codes, segment, seller};
    use crate::issuer::{Answer, Commit};
    use crate::journal::replay::recover;
    use crate::validate::tests::sample_request;

    /// Shard `id` with its own numbers.
    fn shard(id: u32) -> (Issuer, Vec<u8>) {
        let mut c = config();
        c.shard_id = id;
        let mut issuer = Issuer::new(c).unwrap();
        issuer
            .add_segment(&seller(), segment(1 + 100 * id, 50))
            .unwrap();
        (issuer, Vec::new())
    }

    fn run(issuer: &mut Issuer, now_ms: u64, requests: &[IssueRequest], j: &mut Vec<u8>) -> Commit {
        let tick = issuer.begin_tick(now_ms, requests.to_vec()).unwrap();
        let codes = fake_codes(&tick);
        issuer.finish_tick(tick, &codes, j).unwrap()
    }

    fn red_of(original: &Invoice, order_id: &str, unit_price_fen: i64) -> IssueRequest {
        let mut r = sample_request(order_id, unit_price_fen);
        r.kind = InvoiceKind::Red(RedReference {
            original_code: original.code,
            original_number: original.number,
            original_order_id: original.request.order_id.clone(),
        });
        r
    }

    fn issued(answer: &Answer) -> Invoice {
        match answer {
            Answer::Issued { invoice, .. } => invoice.clone(),
            other => panic!("not issued: {other:?}"),
        }
    }

    /// The red's shard `h` asks the original's shard `s` (commit included), then issues.
    fn claim_and_issue(
        (s, sj): (&mut Issuer, &mut Vec<u8>),
        (h, hj): (&mut Issuer, &mut Vec<u8>),
        now_ms: u64,
        red: &IssueRequest,
    ) -> Answer {
        if let Some(claim) = h.red_claim_needed(red) {
            let result = s.claim_red(now_ms, &claim);
            run(s, now_ms, &[], sj);
            h.red_claim_answered(claim, result);
        }
        run(h, now_ms, std::slice::from_ref(red), hj)
            .answers
            .remove(0)
    }

    #[test]
    fn a_remote_red_is_claimed_on_its_original_shard() {
        let (mut s, mut sj) = shard(0);
        let (mut h, mut hj) = shard(1);
        let original =
            issued(&run(&mut s, 1_000, &[sample_request("blue", 1_000)], &mut sj).answers[0]);
        // 3,270 fen: two reds of 1,962 and 1,308 use it up exactly.
        let part1 = red_of(&original, "r1", -600);
        let part2 = red_of(&original, "r2", -400);
        let red1 = issued(&claim_and_issue(
            (&mut s, &mut sj),
            (&mut h, &mut hj),
            2_000,
            &part1,
        ));
        assert_eq!(
            s.index().red_total_fen(key_fingerprint(&seller(), "blue")),
            1_962
        );
        assert_eq!(h.index().originals_with_reds(), 0, "H accounts nothing");
        assert_eq!(h.red_claim_answers(), 0, "the grant went with the issue");
        // A retry of the same red is a replay on H: no second claim.
        assert!(h.red_claim_needed(&part1).is_none());
        issued(&claim_and_issue(
            (&mut s, &mut sj),
            (&mut h, &mut hj),
            2_000,
            &part2,
        ));
        let too_much = red_of(&original, "r3", -1);
        assert_eq!(
            claim_and_issue((&mut s, &mut sj), (&mut h, &mut hj), 3_000, &too_much),
            Answer::Rejected(IssueError::RedExceedsOriginal {
                red_fen: 3,
                remaining_fen: 0
            })
        );
        // A red of the red, homed on a third shard: the red's shard H holds it and
        // refuses the claim as a red of a red.
        let (mut t, mut tj) = shard(2);
        let red_of_red = red_of(&red1, "r4", -1);
        assert_eq!(
            claim_and_issue((&mut h, &mut hj), (&mut t, &mut tj), 3_000, &red_of_red),
            Answer::Rejected(IssueError::RedOfRed)
        );
        // A refusal is not kept for a retry: the next attempt claims again.
        assert!(t.red_claim_needed(&red_of_red).is_some());
        let mut mismatch = red_of(&original, "r5", -1);
        if let InvoiceKind::Red(r) = &mut mismatch.kind {
            r.original_number = crate::taxpayer::InvoiceNumber::new(77).unwrap();
        }
        assert_eq!(
            claim_and_issue((&mut s, &mut sj), (&mut h, &mut hj), 3_000, &mismatch),
            Answer::Rejected(IssueError::RedOriginalMismatch)
        );
    }

    #[test]
    fn a_retried_claim_counts_once_and_survives_a_restart() {
        let (mut s, mut sj) = shard(0);
        let (h, _) = shard(1);
        let original =
            issued(&run(&mut s, 1_000, &[sample_request("blue", 1_000)], &mut sj).answers[0]);
        let red = red_of(&original, "r1", -600);
        let claim = h.red_claim_needed(&red).unwrap();
        assert_eq!(s.claim_red(2_000, &claim), Ok(()));
        assert_eq!(s.pending_control_records(), 1);
        assert_eq!(s.claim_red(2_000, &claim), Ok(()), "idempotent");
        assert_eq!(s.pending_control_records(), 1, "not journaled twice");
        let mut other = claim;
        other.red_fen += 1;
        assert_eq!(
            s.claim_red(2_000, &other),
            Err(IssueError::IdempotencyConflict)
        );
        run(&mut s, 2_000, &[], &mut sj);
        let original_fp = key_fingerprint(&seller(), "blue");
        assert_eq!(s.index().red_total_fen(original_fp), 1_962);
        // The tick issuing the red on H failed: the claim stays; a retry is granted again.
        let (mut back, _) = recover(s.config().clone(), &sj, 2_000).unwrap();
        assert_eq!(back.index().red_total_fen(original_fp), 1_962);
        assert_eq!(back.red_claims_granted(), 1);
        assert_eq!(back.claim_red(3_000, &claim), Ok(()));
        assert_eq!(back.pending_control_records(), 0);
        assert_eq!(back.index().red_total_fen(original_fp), 1_962);
        // 3,270 − 1,962 = 1,308 left: a red of 1,309 is refused after the restart too.
        let bigger = h.red_claim_needed(&red_of(&original, "r2", -401)).unwrap();
        assert!(matches!(
            back.claim_red(3_000, &bigger),
            Err(IssueError::RedExceedsOriginal {
                remaining_fen: 1_308,
                ..
            })
        ));
    }

    #[test]
    fn claims_expire_with_the_retention_window() {
        let (mut s, mut sj) = shard(0);
        let (h, _) = shard(1);
        let original =
            issued(&run(&mut s, 1_000, &[sample_request("blue", 1_000)], &mut sj).answers[0]);
        let claim = h.red_claim_needed(&red_of(&original, "r1", -600)).unwrap();
        s.claim_red(2_000, &claim).unwrap();
        run(&mut s, 2_000, &[], &mut sj);
        // Retention 10 s: at 12 s the original (1 s) is forgotten, the claim (2 s) not
        // yet, and a retry still counts once.
        assert_eq!(s.claim_red(12_000, &claim), Ok(()));
        assert_eq!(s.red_claims_granted(), 1);
        assert_eq!(s.index().get(key_fingerprint(&seller(), "blue")), None);
        assert_eq!(
            s.claim_red(13_000, &claim),
            Err(IssueError::RedOriginalUnknown)
        );
        assert_eq!(s.red_claims_granted(), 0);
    }

    #[test]
    fn answers_are_bounded_oldest_first() {
        let (mut h, _) = shard(1);
        let original = Invoice {
            request: sample_request("blue", 1_000),
            code: segment(1, 1).code,
            number: segment(1, 1).first,
            issue_time_ms: 0,
            tax_control_code: [0; 32],
            check_code: [b'0'; 20],
        };
        let claims: Vec<RedClaim> = (0..=RED_ANSWERS_MAX)
            .map(|i| RedClaim::of(&red_of(&original, &format!("r{i}"), -1)).unwrap())
            .collect();
        for claim in &claims {
            h.red_claim_answered(*claim, Ok(()));
        }
        assert_eq!(h.red_claim_answers(), RED_ANSWERS_MAX);
        // Re-answering the same red does not evict it with its old pair.
        h.red_claim_answered(claims[RED_ANSWERS_MAX], Ok(()));
        assert!(h.red.answers.contains_key(&claims[RED_ANSWERS_MAX]));
        assert!(!h.red.answers.contains_key(&claims[0]));
    }
}
