//! The device's GM/T cryptography, over the RustCrypto crates: what a tax server computes
//! with the keys only it holds.
//!
//! - Tax control code: HMAC-SM3 (GB/T 32905 hash in the RFC 2104 construction) of the
//!   canonical invoice bytes under the device's tax key, 32 bytes. SM4-CMAC (GB/T 32907
//!   block cipher in the NIST SP 800-38B construction) is the alternative algorithm a
//!   device may announce in `DeviceInfo`.
//! - SM2 signatures (GB/T 32918) over 32-byte digests (batch roots), with the default
//!   distinguishing identifier of GM/T 0009, so that any standard SM2 verifier (GmSSL,
//!   OpenSSL 3 with `distid:1234567812345678`) checks them with the digest as the message.
//!
//! The check code, SM3 digests and SM2 verification are in `hsm_driver::crypto`, which
//! auditors and the appliance use without linking any of this; they are re-exported
//! here. Performs no I/O.

use cmac::Cmac;
use hmac::{Hmac, KeyInit, Mac};
// The shared half (sizes, errors, check code, SM3, SM2 verification), re-exported so that
// device code and its tests name one module for the whole of the tax logic's crypto.
pub use hsm_driver::crypto::*;
use sm2::dsa::signature::Signer;
use sm2::dsa::{Signature, SigningKey};
use sm3::Sm3;
use sm4::cipher::{BlockCipherDecrypt, BlockCipherEncrypt};
use sm4::Sm4;

/// Bytes of an SM4 key and block.
pub const SM4_BLOCK_BYTES: usize = 16;

/// A device tax key, pre-keyed: the HMAC inner and outer pads (or the CMAC subkeys) are
/// computed once at construction, and each MAC clones that state instead of re-deriving
/// it. That halves the SM3 compressions per invoice for the ~250-byte canonical invoices
/// of the hot path.
#[derive(Clone)]
pub struct TaxCodeKey {
    mac: KeyedMac,
}

#[derive(Clone)]
enum KeyedMac {
    HmacSm3(Hmac<Sm3>),
    Sm4Cmac(Cmac<Sm4>),
}

impl TaxCodeKey {
    /// An HMAC-SM3 key. Any length is valid (RFC 2104: keys longer than the 64-byte block
    /// are hashed first); device keys are 32 random bytes.
    pub fn hmac_sm3(key: &[u8]) -> Self {
        // `new_from_slice` of HMAC accepts every key length, so the error arm is never
        // taken; it keeps the function total without a panic path and computes the same
        // RFC 2104 key block (hashed key, zero padded to the 64-byte block).
        let mac = match <Hmac<Sm3> as KeyInit>::new_from_slice(key) {
            Ok(mac) => mac,
            Err(_) => {
                let mut block = [0u8; 64];
                block[..32].copy_from_slice(&sm3_digest(key));
                <Hmac<Sm3> as KeyInit>::new(&block.into())
            }
        };
        Self {
            mac: KeyedMac::HmacSm3(mac),
        }
    }

    /// An SM4-CMAC key (16 bytes).
    pub fn sm4_cmac(key: &[u8; SM4_BLOCK_BYTES]) -> Self {
        Self {
            mac: KeyedMac::Sm4Cmac(<Cmac<Sm4> as KeyInit>::new(&(*key).into())),
        }
    }

    /// A key of the given algorithm from raw key bytes.
    pub fn new(algorithm: TaxCodeAlgorithm, key: &[u8]) -> Result<Self, CryptoError> {
        match algorithm {
            TaxCodeAlgorithm::HmacSm3 => Ok(Self::hmac_sm3(key)),
            TaxCodeAlgorithm::Sm4Cmac => {
                let key: &[u8; SM4_BLOCK_BYTES] = key
                    .try_into()
                    .map_err(|_| CryptoError::InvalidKeyLength(key.len()))?;
                Ok(Self::sm4_cmac(key))
            }
        }
    }

    /// The algorithm of this key.
    pub fn algorithm(&self) -> TaxCodeAlgorithm {
        match self.mac {
            KeyedMac::HmacSm3(_) => TaxCodeAlgorithm::HmacSm3,
            KeyedMac::Sm4Cmac(_) => TaxCodeAlgorithm::Sm4Cmac,
        }
    }
}

impl core::fmt::Debug for TaxCodeKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Never print key material, not even its derived pads.
        f.debug_struct("TaxCodeKey")
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

/// The tax control code of one canonical invoice under `key`.
pub fn tax_code(key: &TaxCodeKey, canonical: &[u8]) -> TaxCode {
    let mut code = [0u8; TAX_CODE_BYTES];
    match &key.mac {
        KeyedMac::HmacSm3(mac) => {
            let mut mac = mac.clone();
            mac.update(canonical);
            code.copy_from_slice(&mac.finalize().into_bytes());
        }
        KeyedMac::Sm4Cmac(mac) => {
            let mut mac = mac.clone();
            mac.update(canonical);
            code[..SM4_BLOCK_BYTES].copy_from_slice(&mac.finalize().into_bytes());
        }
    }
    code
}

/// Whether `code` is the tax control code of `canonical` under `key`, compared in
/// constant time (an auditor's oracle must not leak how many leading bytes matched).
pub fn verify(key: &TaxCodeKey, canonical: &[u8], code: &TaxCode) -> bool {
    match &key.mac {
        KeyedMac::HmacSm3(mac) => {
            let mut mac = mac.clone();
            mac.update(canonical);
            mac.verify_slice(code).is_ok()
        }
        KeyedMac::Sm4Cmac(mac) => {
            let mut mac = mac.clone();
            mac.update(canonical);
            // The zero half is public and fixed; checking it is not secret-dependent.
            let zero_tail = code[SM4_BLOCK_BYTES..].iter().all(|&b| b == 0);
            let tag_ok = mac.verify_slice(&code[..SM4_BLOCK_BYTES]).is_ok();
            tag_ok & zero_tail
        }
    }
}

/// Encrypts one 16-byte block with SM4 (raw block function, no mode).
pub fn sm4_encrypt_block(key: &[u8; SM4_BLOCK_BYTES], block: &mut [u8; SM4_BLOCK_BYTES]) {
    let cipher = <Sm4 as KeyInit>::new(&(*key).into());
    let mut b = (*block).into();
    cipher.encrypt_block(&mut b);
    block.copy_from_slice(&b);
}

/// Decrypts one 16-byte block with SM4 (raw block function, no mode).
pub fn sm4_decrypt_block(key: &[u8; SM4_BLOCK_BYTES], block: &mut [u8; SM4_BLOCK_BYTES]) {
    let cipher = <Sm4 as KeyInit>::new(&(*key).into());
    let mut b = (*block).into();
    cipher.decrypt_block(&mut b);
    block.copy_from_slice(&b);
}

/// An SM2 signing key bound to a distinguishing identifier.
#[derive(Clone)]
pub struct Sm2Signer {
    key: SigningKey,
}

impl Sm2Signer {
    /// A signer from a 32-byte big-endian secret scalar, with [`SM2_DEFAULT_DIST_ID`].
    pub fn from_secret_bytes(secret: &[u8; SM2_SECRET_KEY_BYTES]) -> Result<Self, CryptoError> {
        let key = SigningKey::from_slice(SM2_DEFAULT_DIST_ID, secret)
            .map_err(|_| CryptoError::InvalidSecretKey)?;
        Ok(Self { key })
    }

    /// A fresh random signer from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        use sm2::elliptic_curve::Generate;
        let secret = sm2::SecretKey::try_generate().map_err(|_| CryptoError::InvalidSecretKey)?;
        let key = SigningKey::new(SM2_DEFAULT_DIST_ID, &secret)
            .map_err(|_| CryptoError::InvalidSecretKey)?;
        Ok(Self { key })
    }

    /// The secret scalar, big endian (for persisting a software key).
    pub fn secret_bytes(&self) -> [u8; SM2_SECRET_KEY_BYTES] {
        self.key.to_bytes().into()
    }

    /// The public key, uncompressed SEC1 (`04 ‖ x ‖ y`).
    pub fn public_key(&self) -> [u8; SM2_PUBLIC_KEY_BYTES] {
        let mut out = [0u8; SM2_PUBLIC_KEY_BYTES];
        let sec1 = self.key.verifying_key().to_sec1_bytes();
        // An uncompressed SM2 point is always 65 bytes.
        out.copy_from_slice(&sec1[..SM2_PUBLIC_KEY_BYTES]);
        out
    }

    /// The verifier of this signer's signatures.
    pub fn verifier(&self) -> Sm2Verifier {
        Sm2Verifier::from_verifying_key(self.key.verifying_key().clone())
    }

    /// Signs a 32-byte digest as the SM2 message: e = SM3(Z_A ‖ digest), deterministic
    /// nonce (RFC 6979 style), so repeated signing of one root gives one signature.
    pub fn sign(&self, digest: &[u8; 32]) -> [u8; SM2_SIGNATURE_BYTES] {
        let signature: Signature = self.key.sign(digest);
        signature.to_bytes().into()
    }
}

impl core::fmt::Debug for Sm2Signer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm2Signer")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex<const N: usize>(s: &str) -> [u8; N] {
        let v = hex::decode(s).expect("test hex");
        v.try_into().expect("test hex length")
    }

    /// GB/T 32907-2016 Appendix A, example 1.
    #[test]
    fn sm4_standard_vector() {
        let key: [u8; 16] = unhex("0123456789abcdeffedcba9876543210");
        let mut block = key;
        sm4_encrypt_block(&key, &mut block);
        assert_eq!(hex::encode(block), "681edf34d206965e86b3e94f536e4246");
        sm4_decrypt_block(&key, &mut block);
        assert_eq!(block, key);
    }

    /// HMAC built by hand from the SM3 hash (RFC 2104), independent of the `hmac` crate:
    /// H((K ⊕ opad) ‖ H((K ⊕ ipad) ‖ m)).
    fn reference_hmac_sm3(key: &[u8], msg: &[u8]) -> [u8; 32] {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&sm3_digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
        let inner = sm3_digest(&[ipad.as_slice(), msg].concat());
        sm3_digest(&[opad.as_slice(), &inner].concat())
    }

    #[test]
    fn hmac_sm3_matches_reference_construction() {
        let msgs: [&[u8]; 4] = [b"", b"abc", &[0x5a; 63], &[0xa5; 250]];
        let keys: [&[u8]; 4] = [&[0x0b; 20], &[0x42; 32], &[0x11; 64], &[0x77; 131]];
        for key in keys {
            let k = TaxCodeKey::hmac_sm3(key);
            for msg in msgs {
                let code = tax_code(&k, msg);
                assert_eq!(code, reference_hmac_sm3(key, msg));
                assert!(verify(&k, msg, &code));
            }
        }
    }

    /// The pre-keyed `Hmac` agrees with the crate's `SimpleHmac`, which re-derives the
    /// pads from the key on every use (a second, independent code path).
    #[test]
    fn hmac_sm3_matches_simple_hmac() {
        let key = b"Jefe";
        let msg = b"what do ya want for nothing?";
        let mut simple = <hmac::SimpleHmac<Sm3> as KeyInit>::new_from_slice(key).expect("any len");
        simple.update(msg);
        let expected: [u8; 32] = simple.finalize().into_bytes().into();
        assert_eq!(tax_code(&TaxCodeKey::hmac_sm3(key), msg), expected);
        assert_eq!(expected, reference_hmac_sm3(key, msg));
    }

    #[test]
    fn reused_key_state_gives_identical_codes() {
        let k = TaxCodeKey::hmac_sm3(&[9u8; 32]);
        let a = tax_code(&k, b"invoice-1");
        let b = tax_code(&k, b"invoice-2");
        assert_ne!(a, b);
        assert_eq!(a, tax_code(&k, b"invoice-1"));
    }

    #[test]
    fn verify_rejects_tampering() {
        let k = TaxCodeKey::hmac_sm3(&[1u8; 32]);
        let msg = b"canonical invoice bytes";
        let mut code = tax_code(&k, msg);
        assert!(!verify(&k, b"canonical invoice byteS", &code));
        code[31] ^= 1;
        assert!(!verify(&k, msg, &code));
        let other = TaxCodeKey::hmac_sm3(&[2u8; 32]);
        assert!(!verify(&other, msg, &tax_code(&k, msg)));
    }

    #[test]
    fn sm4_cmac_codes() {
        let k = TaxCodeKey::new(TaxCodeAlgorithm::Sm4Cmac, &[3u8; 16]).expect("16-byte key");
        assert_eq!(k.algorithm(), TaxCodeAlgorithm::Sm4Cmac);
        let code = tax_code(&k, b"abc");
        assert_eq!(&code[16..], &[0u8; 16]);
        assert!(verify(&k, b"abc", &code));
        let mut bad = code;
        bad[20] = 1;
        assert!(!verify(&k, b"abc", &bad));
        assert_eq!(
            TaxCodeKey::new(TaxCodeAlgorithm::Sm4Cmac, &[3u8; 15]).map(|_| ()),
            Err(CryptoError::InvalidKeyLength(15))
        );
    }

    /// NIST SP 800-38B's CMAC construction cross-checked by hand with the SM4 block
    /// function: for a one-block message M, tag = E(K, M ⊕ K1), K1 = dbl(E(K, 0)).
    #[test]
    fn sm4_cmac_matches_reference_one_block() {
        let key: [u8; 16] = unhex("0123456789abcdeffedcba9876543210");
        let msg: [u8; 16] = unhex("00112233445566778899aabbccddeeff");
        let mut l = [0u8; 16];
        sm4_encrypt_block(&key, &mut l);
        let v = u128::from_be_bytes(l);
        let k1 = (v << 1) ^ if v >> 127 == 1 { 0x87 } else { 0 };
        let mut block = (u128::from_be_bytes(msg) ^ k1).to_be_bytes();
        sm4_encrypt_block(&key, &mut block);
        let code = tax_code(&TaxCodeKey::sm4_cmac(&key), &msg);
        assert_eq!(&code[..16], &block);
    }

    #[test]
    fn sm2_sign_verify_round_trip() {
        let signer = Sm2Signer::generate().expect("os rng");
        let digest = sm3_digest(b"batch root");
        let sig = signer.sign(&digest);
        let public = signer.public_key();
        assert_eq!(public[0], 0x04);
        assert_eq!(sm2_verify(&public, &digest, &sig), Ok(()));
        assert_eq!(signer.verifier().verify(&digest, &sig), Ok(()));

        let mut tampered = digest;
        tampered[0] ^= 1;
        assert_eq!(
            sm2_verify(&public, &tampered, &sig),
            Err(CryptoError::BadSignature)
        );
        let mut bad_sig = sig;
        bad_sig[40] ^= 0x10;
        assert!(sm2_verify(&public, &digest, &bad_sig).is_err());
        assert_eq!(
            sm2_verify(&public, &digest, &[0u8; 64]),
            Err(CryptoError::MalformedSignature)
        );
        let other = Sm2Signer::generate().expect("os rng");
        assert_eq!(
            sm2_verify(&other.public_key(), &digest, &sig),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn sm2_secret_round_trip_and_determinism() {
        let signer = Sm2Signer::generate().expect("os rng");
        let again = Sm2Signer::from_secret_bytes(&signer.secret_bytes()).expect("valid");
        assert_eq!(signer.public_key(), again.public_key());
        let digest = [7u8; 32];
        assert_eq!(signer.sign(&digest), again.sign(&digest));
        assert!(Sm2Signer::from_secret_bytes(&[0u8; 32]).is_err());
        assert!(Sm2Verifier::from_public_key(&[0u8; 65]).is_err());
    }
}
