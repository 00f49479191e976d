//! Every answer checked: numbers unique across the run, tax control and check codes
//! well-formed (the check code is the one the tax server derives from the tax control
//! code), replays answered with the original invoice. Anything else is an error of a
//! named kind.

use std::collections::{BTreeMap, HashMap};

use appliance_proto::{decode_error, decode_results, split_frame, FrameKind, Issued, ItemResult};

use crate::gen::{Expect, Slot};

/// Kinds of verification failure (besides the appliance's own error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mismatch {
    /// An invoice number handed out twice in the run.
    DuplicateNumber,
    /// A fresh order or red invoice answered `Replayed`.
    UnexpectedReplay,
    /// A resent order answered `Issued` (issued twice).
    RetryIssuedAgain,
    /// A resent order answered `Replayed` with another invoice than the first time.
    ReplayMismatch,
    /// The check code is not the one derived from the tax control code.
    BadCheckCode,
    /// A tax control code of all zeros.
    BadTaxControlCode,
    /// The reply frame could not be decoded or has the wrong number of results.
    MalformedReply,
}

impl Mismatch {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mismatch::DuplicateNumber => "verify:DuplicateNumber",
            Mismatch::UnexpectedReplay => "verify:UnexpectedReplay",
            Mismatch::RetryIssuedAgain => "verify:RetryIssuedAgain",
            Mismatch::ReplayMismatch => "verify:ReplayMismatch",
            Mismatch::BadCheckCode => "verify:BadCheckCode",
            Mismatch::BadTaxControlCode => "verify:BadTaxControlCode",
            Mismatch::MalformedReply => "verify:MalformedReply",
        }
    }
}

/// Outcome counts of checked answers.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Invoices issued (fresh and red) and correct.
    pub issued: u64,
    /// Retries answered with the original invoice.
    pub replayed: u64,
    /// Errors by kind: `code:<ErrorCode>` (refused by the appliance), `transport:<kind>`
    /// (no answer), `verify:<Mismatch>` (a wrong answer). One per invoice.
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    /// Total errors.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds `other` into this tally.
    pub fn add(&mut self, other: &Tally) {
        self.issued += other.issued;
        self.replayed += other.replayed;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    fn error(&mut self, kind: &str, n: u64) {
        if let Some(v) = self.errors.get_mut(kind) {
            *v += n;
        } else {
            self.errors.insert(kind.to_owned(), n);
        }
    }
}

/// Numbers seen, per invoice code: one bit per number (8 digits: at most 12.5 MB per
/// code, allocated as far as the highest number seen).
#[derive(Default)]
pub struct Verifier {
    seen: HashMap<u64, Vec<u64>>,
    /// Distinct invoice numbers seen.
    pub numbers: u64,
}

impl Verifier {
    /// Marks a number seen; false if it was already.
    fn first_sight(&mut self, issued: &Issued) -> bool {
        let bits = self.seen.entry(issued.identity.code.get()).or_default();
        let n = issued.identity.number.get() as usize;
        let word = n / 64;
        if bits.len() <= word {
            bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << (n % 64);
        let fresh = bits[word] & mask == 0;
        bits[word] |= mask;
        if fresh {
            self.numbers += 1;
        }
        fresh
    }

    fn codes_ok(issued: &Issued, tally: &mut Tally) -> bool {
        if issued.tax_control_code.iter().all(|&b| b == 0) {
            tally.error(Mismatch::BadTaxControlCode.name(), 1);
            return false;
        }
        if hsm_driver::crypto::check_code(&issued.tax_control_code) != issued.check_code {
            tally.error(Mismatch::BadCheckCode.name(), 1);
            return false;
        }
        true
    }

    /// Checks one reply (the whole frame as received) against the slots of its request;
    /// counts outcomes into `tally` and calls `fresh` for every correctly issued fresh
    /// blue order (the retry and red pools' feed).
    pub fn check_reply(
        &mut self,
        reply: &[u8],
        slots: &[Slot],
        tally: &mut Tally,
        mut fresh: impl FnMut(u64, Issued),
    ) {
        let results = match split_frame(reply) {
            Ok((header, body)) => match header.kind {
                FrameKind::IssueReply if header.count as usize == slots.len() => {
                    decode_results(body, header.count).ok()
                }
                FrameKind::Error => {
                    let kind = match decode_error(body) {
                        Ok((code, _)) => format!("frame:{code:?}"),
                        Err(_) => Mismatch::MalformedReply.name().to_owned(),
                    };
                    tally.error(&kind, slots.len() as u64);
                    return;
                }
                _ => None,
            },
            Err(_) => None,
        };
        let Some(results) = results else {
            tally.error(Mismatch::MalformedReply.name(), slots.len() as u64);
            return;
        };
        for (slot, result) in slots.iter().zip(results) {
            match (slot.expect, result) {
                (_, ItemResult::Failed { code, .. }) => {
                    tally.error(&format!("code:{code:?}"), 1);
                }
                (Expect::Fresh | Expect::Red, ItemResult::Issued(issued)) => {
                    if !self.first_sight(&issued) {
                        tally.error(Mismatch::DuplicateNumber.name(), 1);
                    } else if Self::codes_ok(&issued, tally) {
                        tally.issued += 1;
                        if slot.expect == Expect::Fresh {
                            fresh(slot.order, issued);
                        }
                    }
                }
                (Expect::Fresh | Expect::Red, ItemResult::Replayed(_)) => {
                    tally.error(Mismatch::UnexpectedReplay.name(), 1);
                }
                (Expect::Retry(original), ItemResult::Replayed(issued)) => {
                    if issued != original {
                        tally.error(Mismatch::ReplayMismatch.name(), 1);
                    } else {
                        tally.replayed += 1;
                    }
                }
                (Expect::Retry(_), ItemResult::Issued(issued)) => {
                    // Also a second number for one order: note it as seen.
                    self.first_sight(&issued);
                    tally.error(Mismatch::RetryIssuedAgain.name(), 1);
                }
            }
        }
    }

    /// Counts a request that got no answer.
    pub fn transport_error(kind: &str, slots: usize, tally: &mut Tally) {
        tally.error(&format!("transport:{kind}"), slots as u64);
    }
}

/// The variant name of a client error, for error counts.
pub fn client_error_kind(e: &appliance_client::ClientError) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("Unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use appliance_core::{InvoiceCode, InvoiceIdentity, InvoiceNumber};
    use appliance_proto::encode_result;
    use appliance_proto::frame::{begin_frame, finish_frame};

    fn issued(number: u32) -> Issued {
        let tax = [number as u8 | 1; 32];
        Issued {
            identity: InvoiceIdentity {
                code: InvoiceCode::new(44_031_900_111).unwrap(),
                number: InvoiceNumber::new(number).unwrap(),
            },
            issue_time_ms: 5,
            tax_control_code: tax,
            check_code: hsm_driver::crypto::check_code(&tax),
        }
    }

    fn reply(results: &[ItemResult]) -> Vec<u8> {
        let mut out = Vec::new();
        let at = begin_frame(&mut out, FrameKind::IssueReply, results.len() as u32);
        for r in results {
            encode_result(&mut out, r);
        }
        finish_frame(&mut out, at);
        out
    }

    #[test]
    fn mismatches_are_named() {
        let mut v = Verifier::default();
        let mut t = Tally::default();
        let fresh = |order| Slot {
            order,
            expect: Expect::Fresh,
        };
        let mut fed = Vec::new();
        let mut bad_check = issued(9);
        bad_check.check_code = [b'0'; 20];
        v.check_reply(
            &reply(&[
                ItemResult::Issued(issued(1)),
                ItemResult::Issued(issued(1)),
                ItemResult::Replayed(issued(2)),
                ItemResult::Issued(bad_check),
            ]),
            &[fresh(0), fresh(1), fresh(2), fresh(3)],
            &mut t,
            |n, i| fed.push((n, i)),
        );
        assert_eq!(t.issued, 1);
        assert_eq!(fed, vec![(0, issued(1))]);
        assert_eq!(t.errors["verify:DuplicateNumber"], 1);
        assert_eq!(t.errors["verify:UnexpectedReplay"], 1);
        assert_eq!(t.errors["verify:BadCheckCode"], 1);

        let retry = |i| Slot {
            order: 0,
            expect: Expect::Retry(i),
        };
        let mut t = Tally::default();
        v.check_reply(
            &reply(&[
                ItemResult::Replayed(issued(1)),
                ItemResult::Replayed(issued(3)),
                ItemResult::Issued(issued(4)),
            ]),
            &[retry(issued(1)), retry(issued(1)), retry(issued(1))],
            &mut t,
            |_, _| {},
        );
        assert_eq!(t.replayed, 1);
        assert_eq!(t.errors["verify:ReplayMismatch"], 1);
        assert_eq!(t.errors["verify:RetryIssuedAgain"], 1);

        let mut t = Tally::default();
        v.check_reply(b"junk", &[fresh(5), fresh(6)], &mut t, |_, _| {});
        assert_eq!(t.errors["verify:MalformedReply"], 2);
        v.check_reply(&reply(&[]), &[fresh(5)], &mut t, |_, _| {});
        assert_eq!(t.errors["verify:MalformedReply"], 3);
    }
}
