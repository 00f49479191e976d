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

/// Up to this many invoice codes, [`Verifier`] finds a code's bitmap by a linear scan.
const FEW_CODES: usize = 16;

/// Numbers seen, per invoice code: one bit per number (8 digits: at most 12.5 MB per
/// code, allocated as far as the highest number seen).
#[derive(Default)]
pub struct Verifier {
    /// Invoice code → index into `bitmaps`, once there are more than `FEW_CODES`.
    codes: HashMap<u64, usize>,
    /// The codes in the order first seen (index = bitmap): a run sees a few codes (one
    /// per segment in use) interleaved answer by answer, which a scan of a handful of
    /// u64s finds faster than the map's SipHash.
    code_list: Vec<u64>,
    bitmaps: Vec<Vec<u64>>,
    /// Distinct invoice numbers seen.
    pub numbers: u64,
}

impl Verifier {
    /// Marks a number seen; false if it was already.
    fn first_sight(&mut self, issued: &Issued) -> bool {
        let code = issued.identity.code.get();
        let found = if self.code_list.len() <= FEW_CODES {
            self.code_list.iter().position(|&c| c == code)
        } else {
            self.codes.get(&code).copied()
        };
        let index = match found {
            Some(index) => index,
            None => {
                let index = self.bitmaps.len();
                self.bitmaps.push(Vec::new());
                self.code_list.push(code);
                self.codes.insert(code, index);
                index
            }
        };
        let bits = &mut self.bitmaps[index];
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
        if !check_code_matches(&issued.tax_control_code, &issued.check_code) {
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

/// 10^20: the check code is the tax code's head modulo this.
const CHECK_MODULUS: u128 = 100_000_000_000_000_000_000;
/// 5^20, the odd factor of 10^20 = 2^20 · 5^20.
const FIVE_POW_20: u128 = 95_367_431_640_625;

/// The inverse of an odd `d` modulo 2^128 (Newton's iteration: each step doubles the
/// correct low bits, from 3 to beyond 128).
const fn inverse_mod_2_128(d: u128) -> u128 {
    let mut inverse = d;
    let mut i = 0;
    while i < 7 {
        inverse = inverse.wrapping_mul(2u128.wrapping_sub(d.wrapping_mul(inverse)));
        i += 1;
    }
    inverse
}

const FIVE_POW_20_INVERSE: u128 = inverse_mod_2_128(FIVE_POW_20);
/// An n is a multiple of 5^20 iff n · (5^20)⁻¹ mod 2^128 ≤ this (Granlund-Montgomery).
const FIVE_POW_20_MULTIPLES_MAX: u128 = u128::MAX / FIVE_POW_20;

/// Whether `check` is the check code the tax server derives from `tax`
/// (`hsm_driver::crypto::check_code`: the first 16 bytes as a big-endian u128, modulo
/// 10^20, as 20 zero-padded digits), decided exactly but without its three u128
/// divisions, a twentieth of loadgen's CPU per invoice in bulk: with c the number the
/// digits spell (< 10^20), head mod 10^20 = c iff head ≥ c and head − c is a multiple of
/// 2^20 (low bits) and of 5^20 (a multiply by the inverse and a compare). A test pins it
/// to `check_code` on random and mutated codes.
pub fn check_code_matches(tax: &[u8; 32], check: &[u8; 20]) -> bool {
    let mut halves = [0u64; 2];
    for (half, digits) in halves.iter_mut().zip(check.chunks_exact(10)) {
        for &digit in digits {
            if !digit.is_ascii_digit() {
                return false;
            }
            *half = *half * 10 + u64::from(digit - b'0');
        }
    }
    let c = u128::from(halves[0]) * 10_000_000_000 + u128::from(halves[1]);
    debug_assert!(c < CHECK_MODULUS);
    let mut head = [0u8; 16];
    head.copy_from_slice(&tax[..16]);
    let head = u128::from_be_bytes(head);
    let Some(rest) = head.checked_sub(c) else {
        return false;
    };
    rest & ((1 << 20) - 1) == 0
        && (rest >> 20).wrapping_mul(FIVE_POW_20_INVERSE) <= FIVE_POW_20_MULTIPLES_MAX
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
    fn check_code_matches_is_check_code_equality() {
        assert_eq!(FIVE_POW_20 * (1 << 20), CHECK_MODULUS);
        assert_eq!(FIVE_POW_20.wrapping_mul(FIVE_POW_20_INVERSE), 1);
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut heads: Vec<u128> = vec![
            0,
            1,
            CHECK_MODULUS - 1,
            CHECK_MODULUS,
            CHECK_MODULUS + 1,
            u128::MAX,
            u128::MAX - CHECK_MODULUS,
        ];
        for _ in 0..20_000 {
            heads.push(u128::from(next()) << 64 | u128::from(next()));
            // Small heads (below the modulus), where head − c can underflow.
            heads.push(u128::from(next()) % (CHECK_MODULUS * 3));
        }
        for head in heads {
            let mut tax = [0u8; 32];
            tax[..16].copy_from_slice(&head.to_be_bytes());
            tax[16..].copy_from_slice(&[0xA5; 16]);
            let good = hsm_driver::crypto::check_code(&tax);
            assert!(check_code_matches(&tax, &good), "{head}");
            // Every single-digit change is caught, and so is a non-digit.
            for at in 0..20 {
                let mut bad = good;
                bad[at] = b'0' + (bad[at] - b'0' + 1 + (next() % 9) as u8) % 10;
                assert_ne!(bad, good);
                assert!(!check_code_matches(&tax, &bad), "{head} digit {at}");
                let mut bad = good;
                bad[at] = b'a';
                assert!(!check_code_matches(&tax, &bad));
            }
            // The code of a neighbouring head is wrong for this one.
            let mut other = tax;
            other[15] ^= 1;
            let wrong = hsm_driver::crypto::check_code(&other);
            assert_eq!(check_code_matches(&tax, &wrong), wrong == good);
        }
    }

    #[test]
    fn numbers_are_unique_per_code_across_code_changes() {
        let mut v = Verifier::default();
        let mut with_code = |code: u64, number: u32| {
            let mut i = issued(number);
            i.identity.code = InvoiceCode::new(code).unwrap();
            v.first_sight(&i)
        };
        assert!(with_code(44_031_900_111, 5));
        assert!(with_code(44_031_900_112, 5));
        assert!(!with_code(44_031_900_111, 5));
        assert!(with_code(44_031_900_111, 6));
        assert!(!with_code(44_031_900_112, 5));
        assert!(with_code(44_031_900_113, 99_999_999));
        assert!(!with_code(44_031_900_113, 99_999_999));
        // Past the linear scan's few codes, the map takes over and still knows them all.
        for code in 0..40u64 {
            assert!(with_code(44_031_901_000 + code, 1));
        }
        for code in 0..40u64 {
            assert!(!with_code(44_031_901_000 + code, 1));
            assert!(with_code(44_031_901_000 + code, 2));
        }
        assert!(!with_code(44_031_900_111, 6));
        assert_eq!(v.numbers, 4 + 80);
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
