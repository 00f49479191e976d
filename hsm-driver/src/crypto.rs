//! The GM/T cryptography the driver side of the tax logic needs, over the RustCrypto
//! crates: checking what a tax server produced, never producing it.
//!
//! - Check code: the 20 decimal digits printed on the invoice, derived from the tax code.
//! - SM3 digests, and SM2 signature verification (GB/T 32918) over 32-byte digests
//!   (batch roots), with the default distinguishing identifier of GM/T 0009, so that
//!   signatures any standard SM2 signer made (GmSSL, OpenSSL 3 with
//!   `distid:1234567812345678`) check with the digest as the message.
//! - The sizes, algorithm identifiers and errors both sides share.
//!
//! Computing tax control codes (HMAC-SM3, SM4-CMAC under the device's tax key) and SM2
//! signing are the device's job: they live in the emulator crate (`hsm_emulator::crypto`),
//! so no key-holding code is linked into the appliance. This module is used by the
//! appliance, auditors and tests; it performs no I/O.

use sm2::dsa::signature::Verifier;
use sm2::dsa::{Signature, VerifyingKey};
use sm3::{Digest, Sm3};

/// Bytes of a tax control code.
pub const TAX_CODE_BYTES: usize = 32;
/// Decimal digits of a check code.
pub const CHECK_CODE_DIGITS: usize = 20;
/// Bytes of an SM2 public key in uncompressed SEC1 form (`04 ‖ x ‖ y`).
pub const SM2_PUBLIC_KEY_BYTES: usize = 65;
/// Bytes of an SM2 secret scalar.
pub const SM2_SECRET_KEY_BYTES: usize = 32;
/// Bytes of an SM2 signature `r ‖ s`.
pub const SM2_SIGNATURE_BYTES: usize = 64;
/// Default SM2 distinguishing identifier (GM/T 0009-2012 §10), used by every verifier
/// here and every signer (the emulator's) unless a caller names another one.
pub const SM2_DEFAULT_DIST_ID: &str = "1234567812345678";

/// 10^20: check codes are the tax code's leading u128 reduced to 20 decimal digits (the
/// tests' reference formula; [`check_code`] computes it without u128 division).
#[cfg(test)]
const CHECK_CODE_MODULUS: u128 = 100_000_000_000_000_000_000;

/// A tax control code.
pub type TaxCode = [u8; TAX_CODE_BYTES];
/// A check code: 20 ASCII digits, zero padded.
pub type CheckCode = [u8; CHECK_CODE_DIGITS];

/// Errors of the key handling and signature checks in this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The bytes are not a valid SM2 secret scalar (zero or not below the group order).
    #[error("invalid SM2 secret key")]
    InvalidSecretKey,
    /// The bytes are not an uncompressed SEC1 point on the SM2 curve.
    #[error("invalid SM2 public key")]
    InvalidPublicKey,
    /// The signature bytes are not a well-formed `r ‖ s` pair (zero or out of range).
    #[error("malformed SM2 signature")]
    MalformedSignature,
    /// The signature is well formed but does not match the message and key.
    #[error("SM2 signature does not verify")]
    BadSignature,
    /// A key of the wrong length for the algorithm.
    #[error("invalid key length {0}")]
    InvalidKeyLength(usize),
    /// The distinguishing identifier is too long (its bit length must fit a u16).
    #[error("invalid SM2 distinguishing identifier")]
    InvalidDistId,
}

/// Tax-code algorithm identifiers as announced on the wire (`DeviceInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TaxCodeAlgorithm {
    /// HMAC-SM3 over the canonical bytes; the 32-byte MAC is the tax code.
    HmacSm3 = 1,
    /// SM4-CMAC over the canonical bytes; the 16-byte tag followed by 16 zero bytes is the
    /// tax code (the zero half keeps the code's size fixed across algorithms).
    Sm4Cmac = 2,
}

impl TaxCodeAlgorithm {
    /// The algorithm for a wire identifier, `None` for an unknown one.
    pub fn from_u8(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::HmacSm3),
            2 => Some(Self::Sm4Cmac),
            _ => None,
        }
    }
}

/// The 20-digit check code printed on an invoice: the first 16 bytes of the tax code as a
/// big-endian u128, reduced mod 10^20, written as zero-padded ASCII digits.
///
/// Computed without u128 division (which compiles to `__udivti3`/`__umodti3` calls with
/// a hardware `div` inside, a visible share of the emulator's per-item work): the head
/// is divided by 10^8 three times by schoolbook long division over four 32-bit limbs,
/// whose every step divides a u64 by a constant (a multiply and a shift). The
/// remainders are the low 8 digits, the next 8 and, mod 10^4, the top 4 of the low 20:
/// exactly `head % 10^20` in decimal (tests compare it with the u128 formula). Digits
/// are written two at a time from a table.
pub fn check_code(code: &TaxCode) -> CheckCode {
    const GROUP: u32 = 100_000_000;
    let mut limbs = [0u32; 4];
    for (limb, bytes) in limbs.iter_mut().zip(code[..16].chunks_exact(4)) {
        *limb = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let low = div_rem_limbs(&mut limbs, GROUP);
    let mid = div_rem_limbs(&mut limbs, GROUP);
    let top = div_rem_limbs(&mut limbs, 10_000);
    let mut digits = [b'0'; CHECK_CODE_DIGITS];
    write_digit_pairs(&mut digits[..4], top);
    write_digit_pairs(&mut digits[4..12], mid);
    write_digit_pairs(&mut digits[12..], low);
    digits
}

/// Divides the big-endian 128-bit number in `limbs` by `divisor` (at most 10^8, so
/// that `remainder << 32 | limb` < 2^59 fits a u64 and every quotient limb fits a
/// u32) in place, returning the remainder.
#[inline(always)]
fn div_rem_limbs(limbs: &mut [u32; 4], divisor: u32) -> u32 {
    let d = u64::from(divisor);
    let mut rest = 0u64;
    for limb in limbs.iter_mut() {
        let current = (rest << 32) | u64::from(*limb);
        // current < divisor * 2^32, so the quotient fits a u32.
        *limb = (current / d) as u32;
        rest = current % d;
    }
    // rest < divisor fits a u32.
    rest as u32
}

/// "00" to "99": the two ASCII digits of `n` at `2n..2n + 2`.
const DIGIT_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut n = 0;
    while n < 100 {
        t[2 * n] = b'0' + (n / 10) as u8;
        t[2 * n + 1] = b'0' + (n % 10) as u8;
        n += 1;
    }
    t
};

/// Writes `value` as exactly `out.len()` decimal digits, zero padded (`out.len()` is
/// even; the caller passes a value below 10^len).
#[inline(always)]
fn write_digit_pairs(out: &mut [u8], mut value: u32) {
    for pair in out.rchunks_exact_mut(2) {
        let at = (value % 100) as usize * 2;
        pair.copy_from_slice(&DIGIT_PAIRS[at..at + 2]);
        value /= 100;
    }
}

/// SM3 digest of `data`.
pub fn sm3_digest(data: &[u8]) -> [u8; 32] {
    Sm3::digest(data).into()
}

/// An SM2 verifying key bound to a distinguishing identifier.
#[derive(Clone, Debug)]
pub struct Sm2Verifier {
    key: VerifyingKey,
}

impl Sm2Verifier {
    /// A verifier from an uncompressed SEC1 public key, with [`SM2_DEFAULT_DIST_ID`].
    pub fn from_public_key(public: &[u8; SM2_PUBLIC_KEY_BYTES]) -> Result<Self, CryptoError> {
        Self::with_dist_id(SM2_DEFAULT_DIST_ID, public)
    }

    /// A verifier of `key` (the public half of a signer; the emulator's `Sm2Signer`
    /// hands out its verifier this way).
    pub fn from_verifying_key(key: VerifyingKey) -> Self {
        Self { key }
    }

    /// A verifier with another distinguishing identifier (interoperating with signers
    /// that do not use the default).
    pub fn with_dist_id(dist_id: &str, public: &[u8]) -> Result<Self, CryptoError> {
        if dist_id.len() > usize::from(u16::MAX / 8) {
            return Err(CryptoError::InvalidDistId);
        }
        let key = VerifyingKey::from_sec1_bytes(dist_id, public)
            .map_err(|_| CryptoError::InvalidPublicKey)?;
        Ok(Self { key })
    }

    /// Checks `signature` (`r ‖ s`) over `message` (for batch roots: the 32-byte digest).
    pub fn verify(
        &self,
        message: &[u8],
        signature: &[u8; SM2_SIGNATURE_BYTES],
    ) -> Result<(), CryptoError> {
        let signature = Signature::from_bytes(&(*signature).into())
            .map_err(|_| CryptoError::MalformedSignature)?;
        self.key
            .verify(message, &signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

/// Verifies an SM2 signature over a 32-byte digest under an uncompressed public key with
/// the default distinguishing identifier.
pub fn sm2_verify(
    public: &[u8; SM2_PUBLIC_KEY_BYTES],
    digest: &[u8; 32],
    signature: &[u8; SM2_SIGNATURE_BYTES],
) -> Result<(), CryptoError> {
    Sm2Verifier::from_public_key(public)?.verify(digest, signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let v = hex::decode(s).expect("test hex");
        v.try_into().expect("test hex length")
    }

    /// GB/T 32905-2016 Appendix A, example 1.
    #[test]
    fn sm3_abc_vector() {
        assert_eq!(
            hex::encode(sm3_digest(b"abc")),
            "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
        );
    }

    /// GB/T 32905-2016 Appendix A, example 2: "abcd" repeated 16 times (64 bytes).
    #[test]
    fn sm3_abcd16_vector() {
        let msg = b"abcd".repeat(16);
        assert_eq!(
            hex::encode(sm3_digest(&msg)),
            "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
        );
    }

    #[test]
    fn check_code_digits() {
        let mut code = [0u8; 32];
        assert_eq!(&check_code(&code), b"00000000000000000000");
        code[15] = 42;
        assert_eq!(&check_code(&code), b"00000000000000000042");
        code = [0xff; 32];
        // u128::MAX = 340282366920938463463374607431768211455; mod 10^20:
        assert_eq!(&check_code(&code), b"63374607431768211455");
        // Bytes after the 16th do not matter.
        let mut other = code;
        other[16..].fill(0);
        assert_eq!(check_code(&code), check_code(&other));
    }

    /// The u128 formula the limb arithmetic replaces (and which it must equal bit for
    /// bit): the head mod 10^20, zero padded.
    fn check_code_by_u128(code: &TaxCode) -> CheckCode {
        let mut head = [0u8; 16];
        head.copy_from_slice(&code[..16]);
        let value = u128::from_be_bytes(head) % CHECK_CODE_MODULUS;
        let mut digits = [0u8; CHECK_CODE_DIGITS];
        digits.copy_from_slice(format!("{value:020}").as_bytes());
        digits
    }

    /// Values around every boundary the limb division could get wrong: powers of two
    /// and of ten (limb and group edges), their neighbours, multiples of 10^20, and the
    /// extremes; plus a million pseudo-random heads from a fixed-seed generator.
    #[test]
    fn check_code_equals_u128_formula_at_edges_and_many_values() {
        let mut heads: Vec<u128> = vec![0, 1, u128::MAX, u128::MAX - 1];
        for k in 0..128 {
            heads.push(1u128 << k);
        }
        let mut p = 1u128;
        while let Some(next) = p.checked_mul(10) {
            heads.push(p);
            p = next;
        }
        let top = u128::MAX / CHECK_CODE_MODULUS;
        for k in [1, 2, 3, 10, 1 << 32, 1 << 40, top - 1, top] {
            heads.push(CHECK_CODE_MODULUS * k);
        }
        let edges = heads.clone();
        for h in edges {
            for delta in [
                1u128,
                2,
                9,
                10,
                11,
                999_999_999,
                1_000_000_000,
                1_000_000_001,
            ] {
                heads.push(h.wrapping_add(delta));
                heads.push(h.wrapping_sub(delta));
            }
        }
        // xorshift128+: deterministic, so a failure reproduces.
        let (mut s0, mut s1) = (0x9E37_79B9_7F4A_7C15u64, 0xD1B5_4A32_D192_ED03u64);
        let mut next = || {
            let (mut x, y) = (s0, s1);
            s0 = y;
            x ^= x << 23;
            s1 = x ^ y ^ (x >> 17) ^ (y >> 26);
            s1.wrapping_add(y)
        };
        for _ in 0..1_000_000 {
            heads.push((u128::from(next()) << 64) | u128::from(next()));
        }
        for head in heads {
            let mut code = [0u8; 32];
            code[..16].copy_from_slice(&head.to_be_bytes());
            assert_eq!(
                check_code(&code),
                check_code_by_u128(&code),
                "head {head:#034x}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn check_code_is_the_decimal_of_the_head_mod_ten_pow_20(head: u128) {
            let mut code = [0u8; 32];
            code[..16].copy_from_slice(&head.to_be_bytes());
            let expected = format!("{:020}", head % CHECK_CODE_MODULUS);
            proptest::prop_assert_eq!(&check_code(&code)[..], expected.as_bytes());
        }
    }

    /// The signature the sm2 crate's own tests made with OpenSSL
    /// (`openssl pkeyutl -sign -digest sm3 -pkeyopt distid:example@rustcrypto.org`),
    /// checked through our verifier: an independent implementation agrees with ours.
    #[test]
    fn sm2_verifies_openssl_signature() {
        let public: [u8; 65] = unhex(
            "0408D77AE04C01CC4C1104360DD8AF6B6F7DF334283D7C1A6AFD5652407B87BEE5014E2A57C36C150D16324DC664E31E6432359609C4E79847A5B161C8C7364C8A",
        );
        let sig: [u8; 64] = unhex(
            "d1dcccedd9fb785e0f67c16b7c52901625c0b69de9bca2144acc7be713cad2fcf7d1eae6e3a157b36c65f672f738ca8b46298bf149a6510072c431b49cd88b1c",
        );
        let v = Sm2Verifier::with_dist_id("example@rustcrypto.org", &public).expect("key");
        assert_eq!(v.verify(b"testing", &sig), Ok(()));
        assert_eq!(v.verify(b"testinG", &sig), Err(CryptoError::BadSignature));
        // The same key under the default identifier is a different Z_A: no match.
        let d = Sm2Verifier::from_public_key(&public).expect("key");
        assert_eq!(d.verify(b"testing", &sig), Err(CryptoError::BadSignature));
    }
}
