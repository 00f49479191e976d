//! Identifiers of the domain: the seller's or buyer's unified social credit code
//! (GB 32100-2015), the 12-digit invoice code and the 8-digit invoice number.
//!
//! Each type can only hold a valid value, so code that receives one never re-checks it.

/// Characters of a unified social credit code (digits and upper-case letters without
/// I, O, Z, S, V). The index of a character is its numeric value in the check formula.
const CHARSET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
/// Weights 3^i mod 31 for positions 0..17 (GB 32100-2015, table 3).
const WEIGHTS: [u32; 17] = {
    let mut w = [0u32; 17];
    let mut i = 0;
    let mut p = 1u32;
    while i < 17 {
        w[i] = p;
        p = p * 3 % 31;
        i += 1;
    }
    w
};

/// Bytes of a unified social credit code.
pub const TAXPAYER_ID_BYTES: usize = 18;
/// Largest invoice code (12 decimal digits).
pub const INVOICE_CODE_MAX: u64 = 999_999_999_999;
/// Largest invoice number (8 decimal digits).
pub const INVOICE_NUMBER_MAX: u32 = 99_999_999;

/// Why a string is not a unified social credit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TaxpayerIdError {
    /// Not exactly 18 bytes.
    #[error("taxpayer id must be 18 characters, got {0} bytes")]
    Length(usize),
    /// A byte outside the GB 32100 character set.
    #[error("taxpayer id has an invalid character at position {0}")]
    InvalidChar(usize),
    /// The 18th character is not the check character of the first 17.
    #[error("taxpayer id check character is {found:?}, expected {expected:?}")]
    CheckChar {
        /// The check character computed from the first 17.
        expected: char,
        /// The character found.
        found: char,
    },
}

/// An 18-character unified social credit code with a valid check character.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaxpayerId([u8; TAXPAYER_ID_BYTES]);

fn char_value(b: u8) -> Option<u32> {
    CHARSET.iter().position(|&c| c == b).map(|p| p as u32)
}

impl TaxpayerId {
    /// Parses and checks a code given as text.
    pub fn parse(s: &str) -> Result<Self, TaxpayerIdError> {
        let bytes: &[u8; TAXPAYER_ID_BYTES] = s
            .as_bytes()
            .try_into()
            .map_err(|_| TaxpayerIdError::Length(s.len()))?;
        Self::from_bytes(bytes)
    }

    /// Checks a code given as its 18 ASCII bytes.
    pub fn from_bytes(bytes: &[u8; TAXPAYER_ID_BYTES]) -> Result<Self, TaxpayerIdError> {
        let mut sum = 0u32;
        for (i, &b) in bytes.iter().enumerate() {
            let v = char_value(b).ok_or(TaxpayerIdError::InvalidChar(i))?;
            if i < 17 {
                sum += v * WEIGHTS[i];
            }
        }
        let expected = Self::check_char_for_sum(sum);
        if bytes[17] != expected {
            return Err(TaxpayerIdError::CheckChar {
                expected: expected as char,
                found: bytes[17] as char,
            });
        }
        Ok(Self(*bytes))
    }

    /// Builds a valid code from its first 17 characters by appending the check character.
    pub fn with_check_char(first17: &[u8; 17]) -> Result<Self, TaxpayerIdError> {
        let mut sum = 0u32;
        for (i, &b) in first17.iter().enumerate() {
            sum += char_value(b).ok_or(TaxpayerIdError::InvalidChar(i))? * WEIGHTS[i];
        }
        let mut bytes = [0u8; TAXPAYER_ID_BYTES];
        bytes[..17].copy_from_slice(first17);
        bytes[17] = Self::check_char_for_sum(sum);
        Ok(Self(bytes))
    }

    fn check_char_for_sum(sum: u32) -> u8 {
        // 31 - (sum mod 31) is in 1..=31; 31 wraps to the character of value 0.
        CHARSET[((31 - sum % 31) % 31) as usize]
    }

    /// The 18 ASCII bytes.
    pub fn as_bytes(&self) -> &[u8; TAXPAYER_ID_BYTES] {
        &self.0
    }

    /// The code as text.
    pub fn as_str(&self) -> &str {
        // Every byte is from CHARSET, which is ASCII; the fallback is unreachable.
        core::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl core::fmt::Debug for TaxpayerId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "TaxpayerId({})", self.as_str())
    }
}

impl core::fmt::Display for TaxpayerId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a value is not an invoice code, number or segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Invoice code outside 1..=999,999,999,999 (zero marks "no original" on the wire).
    #[error("invoice code {0} is not 12 digits")]
    Code(u64),
    /// Invoice number outside 1..=99,999,999.
    #[error("invoice number {0} is not 8 digits")]
    Number(u32),
    /// Segment empty or running past the largest number.
    #[error("segment of {count} numbers from {first} is out of range")]
    Segment {
        /// First number.
        first: u32,
        /// Count of numbers.
        count: u32,
    },
}

/// A 12-digit invoice code (the leading digits may be zero when printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvoiceCode(u64);

impl InvoiceCode {
    /// Checks the range 1..=[`INVOICE_CODE_MAX`].
    pub fn new(code: u64) -> Result<Self, IdentityError> {
        if code == 0 || code > INVOICE_CODE_MAX {
            return Err(IdentityError::Code(code));
        }
        Ok(Self(code))
    }
    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// An 8-digit invoice number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvoiceNumber(u32);

impl InvoiceNumber {
    /// Checks the range 1..=[`INVOICE_NUMBER_MAX`].
    pub fn new(number: u32) -> Result<Self, IdentityError> {
        if number == 0 || number > INVOICE_NUMBER_MAX {
            return Err(IdentityError::Number(number));
        }
        Ok(Self(number))
    }
    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A contiguous range of numbers under one code, granted by the tax authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NumberSegment {
    /// Invoice code of every number in the segment.
    pub code: InvoiceCode,
    /// First number.
    pub first: InvoiceNumber,
    /// How many numbers (≥ 1); the last one is `first + count - 1` ≤ 99,999,999.
    pub count: u32,
}

impl NumberSegment {
    /// Checks that the segment is non-empty and stays within 8 digits.
    pub fn new(code: InvoiceCode, first: InvoiceNumber, count: u32) -> Result<Self, IdentityError> {
        let last = u64::from(first.get()) + u64::from(count);
        if count == 0 || last - 1 > u64::from(INVOICE_NUMBER_MAX) {
            return Err(IdentityError::Segment {
                first: first.get(),
                count,
            });
        }
        Ok(Self { code, first, count })
    }

    /// One past the last number (may be 100,000,000).
    pub fn end(&self) -> u32 {
        self.first.get() + self.count
    }

    /// Whether `number` lies in the segment.
    pub fn contains(&self, code: InvoiceCode, number: InvoiceNumber) -> bool {
        code == self.code && number.get() >= self.first.get() && number.get() < self.end()
    }

    /// Whether the two segments share a number.
    pub fn overlaps(&self, other: &NumberSegment) -> bool {
        self.code == other.code && self.first.get() < other.end() && other.first.get() < self.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_overlap_only_when_they_share_a_number_of_the_same_code() {
        let code = InvoiceCode::new(144_031_900_111).unwrap();
        let other_code = InvoiceCode::new(144_031_900_112).unwrap();
        let seg = |code, first, count| {
            NumberSegment::new(code, InvoiceNumber::new(first).unwrap(), count).unwrap()
        };
        let a = seg(code, 100, 10); // 100..=109
        assert!(a.overlaps(&seg(code, 109, 5)));
        assert!(seg(code, 109, 5).overlaps(&a));
        assert!(a.overlaps(&seg(code, 90, 11)));
        assert!(a.overlaps(&seg(code, 102, 2)));
        assert!(!a.overlaps(&seg(code, 110, 5)));
        assert!(!a.overlaps(&seg(code, 90, 10)));
        assert!(!a.overlaps(&seg(other_code, 100, 10)));
    }

    #[test]
    fn weights_are_gb32100() {
        assert_eq!(
            WEIGHTS,
            [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28]
        );
    }

    #[test]
    fn known_code_is_valid_and_any_single_change_is_caught() {
        // Published example codes (GB 32100-2015 examples / public registrations).
        let good = TaxpayerId::parse("91350100M000100Y43").unwrap();
        assert_eq!(
            TaxpayerId::with_check_char(b"91350100M000100Y4").unwrap(),
            good
        );
        assert!(TaxpayerId::parse("91110000600037341L").is_ok());
        for pos in 0..18 {
            for &c in CHARSET.iter() {
                let mut b = *good.as_bytes();
                if b[pos] == c {
                    continue;
                }
                b[pos] = c;
                assert!(TaxpayerId::from_bytes(&b).is_err(), "pos {pos} char {c}");
            }
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        assert_eq!(TaxpayerId::parse("123"), Err(TaxpayerIdError::Length(3)));
        assert!(matches!(
            TaxpayerId::parse("91350100M000100I43"),
            Err(TaxpayerIdError::InvalidChar(15))
        ));
        assert!(matches!(
            TaxpayerId::parse("91350100m000100Y43"),
            Err(TaxpayerIdError::InvalidChar(8))
        ));
    }

    #[test]
    fn check_char_31_wraps_to_zero() {
        // Find a prefix whose weighted sum is a multiple of 31: its check char must be '0'.
        let mut prefix = *b"00000000000000000";
        for c in CHARSET.iter() {
            prefix[16] = *c;
            let sum = char_value(*c).unwrap() * WEIGHTS[16];
            if sum % 31 == 0 {
                assert_eq!(
                    TaxpayerId::with_check_char(&prefix).unwrap().as_bytes()[17],
                    b'0'
                );
            }
        }
        assert_eq!(
            TaxpayerId::with_check_char(b"00000000000000000")
                .unwrap()
                .as_str(),
            "000000000000000000"
        );
    }

    #[test]
    fn identity_ranges() {
        assert!(InvoiceCode::new(0).is_err());
        assert!(InvoiceCode::new(INVOICE_CODE_MAX).is_ok());
        assert!(InvoiceCode::new(INVOICE_CODE_MAX + 1).is_err());
        assert!(InvoiceNumber::new(0).is_err());
        assert!(InvoiceNumber::new(INVOICE_NUMBER_MAX + 1).is_err());
        let code = InvoiceCode::new(1).unwrap();
        let first = InvoiceNumber::new(INVOICE_NUMBER_MAX).unwrap();
        assert!(NumberSegment::new(code, first, 1).is_ok());
        assert!(NumberSegment::new(code, first, 2).is_err());
        assert!(NumberSegment::new(code, first, 0).is_err());
    }
}
