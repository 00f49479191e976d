//! Shared pieces of the fuzz targets: a cursor that turns the fuzzer's bytes into values
//! (never failing: an exhausted input reads as zeros), builders of *valid* values that the
//! targets encode and then damage, and the damage itself.
//!
//! Why build valid values: most decoders here sit behind checksums (journal records and
//! commits, tax-server frames, PCIe descriptors) or strict validation (canonical
//! invoices: a taxpayer id's check character, the exact tax formula). Random bytes almost
//! never get past those, so every target has a "structured" mode: build a valid message
//! from the input, encode it with the crate's own encoder, apply a few input-chosen
//! mutations, and decode. The raw mode (the input is the message) still runs for the
//! outer checks.
#![deny(missing_docs)]

use appliance_core::money::{tax_fen, LEGAL_RATES_BP};
use appliance_core::{
    InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, RedReference, TaxRate,
    TaxpayerId,
};

/// Reads values off the fuzzer's input, front to back; past the end every read is zero.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.data)
    }

    /// `N` bytes, zero-filled past the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        debug_assert!(lo <= hi);
        lo + self.u32() % (hi - lo + 1)
    }

    /// A bool.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
}

/// Characters of a unified social credit code (GB 32100-2015).
const TAXPAYER_CHARS: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// A valid taxpayer id: 17 input-chosen characters and their check character.
pub fn taxpayer(inp: &mut Input<'_>) -> TaxpayerId {
    let mut first = [0u8; 17];
    for c in &mut first {
        *c = TAXPAYER_CHARS[usize::from(inp.u8()) % TAXPAYER_CHARS.len()];
    }
    TaxpayerId::with_check_char(&first).expect("characters from the code's alphabet")
}

/// A UTF-8 string of `lo..=hi` bytes. Mostly ASCII, with two- and three-byte characters
/// so that cutting and UTF-8 checks are exercised.
pub fn text(inp: &mut Input<'_>, lo: usize, hi: usize) -> String {
    let want = lo + usize::from(inp.u8()) % (hi - lo + 1);
    let mut s = String::with_capacity(want);
    while s.len() < want {
        let b = inp.u8();
        let c = match b % 8 {
            6 if s.len() + 2 <= want => 'é',
            7 if s.len() + 3 <= want => '票',
            _ => char::from(b' ' + b % 95),
        };
        s.push(c);
    }
    s
}

/// A valid invoice code.
pub fn invoice_code(inp: &mut Input<'_>) -> InvoiceCode {
    let max = appliance_core::taxpayer::INVOICE_CODE_MAX;
    InvoiceCode::new(1 + inp.u64() % max).expect("in range")
}

/// A valid invoice number.
pub fn invoice_number(inp: &mut Input<'_>) -> InvoiceNumber {
    let max = appliance_core::taxpayer::INVOICE_NUMBER_MAX;
    InvoiceNumber::new(1 + inp.u32() % max).expect("in range")
}

/// An issue request that passes `check_request` (blue or red, 1..=16 lines, exact
/// amounts): what a canonical invoice and an Issued record are built from.
pub fn request(inp: &mut Input<'_>) -> IssueRequest {
    use appliance_core::validate::*;
    let red = inp.u8() % 4 == 0;
    let rate = LEGAL_RATES_BP[usize::from(inp.u8()) % LEGAL_RATES_BP.len()];
    let tax_rate = TaxRate::from_bp(rate).expect("legal rate");
    let line_count = inp.range(LINES_MIN as u32, LINES_MAX as u32) as usize;
    let mut lines = Vec::with_capacity(line_count);
    for _ in 0..line_count {
        let quantity = inp.range(1, 1000);
        // Up to ~10^7 fen per unit: no overflow over 16 lines of 1,000 units.
        let price = i64::from(inp.range(1, 10_000_000));
        lines.push(LineItem {
            name: text(inp, LINE_NAME_BYTES_MIN, LINE_NAME_BYTES_MAX),
            quantity,
            unit_price_fen: if red { -price } else { price },
        });
    }
    let amount: i64 = lines
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price_fen)
        .sum();
    let tax = tax_fen(amount, tax_rate);
    let kind = if red {
        InvoiceKind::Red(RedReference {
            original_code: invoice_code(inp),
            original_number: invoice_number(inp),
            original_order_id: text(inp, ORDER_ID_BYTES_MIN, ORDER_ID_BYTES_MAX),
        })
    } else {
        InvoiceKind::Blue
    };
    let request = IssueRequest {
        seller: taxpayer(inp),
        order_id: text(inp, ORDER_ID_BYTES_MIN, ORDER_ID_BYTES_MAX),
        buyer_name: text(inp, BUYER_NAME_BYTES_MIN, BUYER_NAME_BYTES_MAX),
        buyer_taxpayer: inp.bool().then(|| taxpayer(inp)),
        lines,
        tax_rate,
        issuer_ref: text(inp, 0, ISSUER_REF_BYTES_MAX),
        amount_fen: amount,
        tax_fen: tax,
        total_fen: amount + tax,
        kind,
    };
    check_request(&request).expect("the builder makes valid requests");
    request
}

/// Applies up to `max_ops` input-chosen mutations to `buf`: flip bits, overwrite a byte,
/// overwrite a little-endian u32 (lengths, counts, checksums), truncate, zero a 512-byte
/// sector (a sector a torn write never reached), insert or delete bytes.
pub fn mutate(buf: &mut Vec<u8>, inp: &mut Input<'_>, max_ops: usize) {
    let ops = usize::from(inp.u8()) % (max_ops + 1);
    for _ in 0..ops {
        if inp.is_empty() {
            return;
        }
        let op = inp.u8() % 8;
        let at = if buf.is_empty() {
            0
        } else {
            inp.u32() as usize % buf.len()
        };
        match op {
            0 | 1 => {
                let mask = inp.u8().max(1);
                if let Some(b) = buf.get_mut(at) {
                    *b ^= mask;
                }
            }
            2 => {
                let v = inp.u8();
                if let Some(b) = buf.get_mut(at) {
                    *b = v;
                }
            }
            3 => {
                let v = inp.u32().to_le_bytes();
                let end = (at + 4).min(buf.len());
                let n = end - at;
                buf[at..end].copy_from_slice(&v[..n]);
            }
            4 => buf.truncate(at),
            5 => {
                let start = at / 512 * 512;
                let end = (start + 512).min(buf.len());
                buf[start..end].fill(0);
            }
            6 => {
                let n = usize::from(inp.u8() % 16) + 1;
                let ins = inp.bytes(n).to_vec();
                let at = at.min(buf.len());
                buf.splice(at..at, ins);
            }
            _ => {
                let n = usize::from(inp.u8() % 16) + 1;
                let end = (at + n).min(buf.len());
                buf.drain(at..end);
            }
        }
    }
}

/// Twenty ASCII digits (a check code).
pub fn check_code(inp: &mut Input<'_>) -> [u8; 20] {
    let mut out = [0u8; 20];
    for d in &mut out {
        *d = b'0' + inp.u8() % 10;
    }
    out
}

/// A valid journal record of an input-chosen kind (every kind of `RecordKind`).
pub fn record(inp: &mut Input<'_>) -> appliance_core::journal::record::Record {
    use appliance_core::canonical::CanonicalInvoice;
    use appliance_core::journal::record::Record;
    use appliance_core::{Invoice, InvoiceIdentity, ItemError, NumberSegment, RedClaim};
    let identity = |inp: &mut Input<'_>| InvoiceIdentity {
        code: invoice_code(inp),
        number: invoice_number(inp),
    };
    let segment = |inp: &mut Input<'_>| {
        let code = invoice_code(inp);
        let first = invoice_number(inp);
        let room = appliance_core::taxpayer::INVOICE_NUMBER_MAX - first.get() + 1;
        NumberSegment::new(code, first, 1 + inp.u32() % room).expect("within 8 digits")
    };
    match inp.u8() % 10 {
        0 => Record::SegmentReserved {
            seller: taxpayer(inp),
            segment: segment(inp),
        },
        1 => Record::SegmentReturned {
            seller: taxpayer(inp),
            segment: segment(inp),
        },
        2 => Record::Issued(Invoice {
            request: request(inp),
            code: invoice_code(inp),
            number: invoice_number(inp),
            issue_time_ms: inp.u64(),
            tax_control_code: inp.array(),
            check_code: check_code(inp),
        }),
        3 => Record::Pending(CanonicalInvoice {
            request: request(inp),
            code: invoice_code(inp),
            number: invoice_number(inp),
            issue_time_ms: inp.u64(),
        }),
        4 => Record::Completed {
            pending_seq: inp.u64(),
            tax_control_code: inp.array(),
            check_code: check_code(inp),
        },
        5 => Record::Voided {
            issued_seq: inp.u64(),
            identity: identity(inp),
            void_time_ms: inp.u64(),
        },
        6 => Record::UploadedTo {
            watermark_seq: inp.u64(),
        },
        7 => {
            let first_seq = inp.u64().max(1);
            Record::BatchRoot {
                first_seq,
                last_seq: first_seq.saturating_add(u64::from(inp.u32())),
                root: inp.array(),
                signature: inp.array(),
            }
        }
        8 => Record::NumberSpoiled {
            seller: taxpayer(inp),
            identity: identity(inp),
            reason: match inp.u8() % 7 {
                0 => ItemError::MalformedInvoice,
                1 => ItemError::NumberNotHeld,
                2 => ItemError::UnknownTaxpayer,
                3 => ItemError::Device(inp.u8()),
                4 => ItemError::InvalidCheckCode,
                5 => ItemError::CommandFailed,
                _ => ItemError::CodedNotJournaled,
            },
        },
        _ => Record::RedClaimed {
            claim: RedClaim {
                original_fingerprint: u128::from_le_bytes(inp.array()),
                original: identity(inp),
                red_fingerprint: u128::from_le_bytes(inp.array()),
                red_fen: i64::from(inp.u32()).max(1),
            },
            claim_time_ms: inp.u64(),
        },
    }
}
