//! Key backends of the tax-server emulator: where the device keys come from.
//!
//! A cipher machine holds two device keys: the tax-code MAC key (HMAC-SM3) and the SM2
//! signing key. [`KeyBackend::open`] yields both as [`DeviceKeys`], generating them on the
//! first start and loading the same keys on every later start.
//!
//! - [`SoftwareBackend`]: the keys live in a file of the data dir (mode 0600). Fine for
//!   tests and demos; anyone who can read the data dir has the keys.
//! - [`Pkcs11Backend`]: a PKCS#11 token (SoftHSM2 in tests) holds a non-extractable
//!   AES-256 key; the device keys are stored in the data dir only as an AES-GCM blob that
//!   the token encrypted, and the token decrypts it at start-up. SoftHSM2 has no SM2/SM3
//!   mechanisms, so the keys must be used in process memory once unwrapped: the token
//!   protects them at rest, not in use (docs/hsm-emulator.md says more).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sm3::Digest;

/// Bytes of the tax-code MAC key.
pub const TAX_KEY_BYTES: usize = 32;
/// Bytes of the SM2 secret scalar.
pub const SIGN_KEY_BYTES: usize = 32;
/// SM2 distinguishing identifier used with the device signing key (GM/T 0009 default).
pub const SM2_DISTID: &str = "1234567812345678";

/// Name of the software backend's key file inside `<data dir>/keys/`.
pub const SOFTWARE_KEY_FILE: &str = "device-keys.bin";
/// Name of the PKCS#11 backend's wrapped key file inside `<data dir>/keys/`.
pub const WRAPPED_KEY_FILE: &str = "device-keys.p11";

const SOFTWARE_MAGIC: [u8; 4] = *b"HSMK";
const WRAPPED_MAGIC: [u8; 4] = *b"HSMW";
const FILE_VERSION: u8 = 1;
// Plain key material: tax key then SM2 secret.
const PLAIN_BYTES: usize = TAX_KEY_BYTES + SIGN_KEY_BYTES;
// Software file: magic 4, version 1, 3 zero, keys 64, crc32c 4.
const SOFTWARE_FILE_BYTES: usize = 8 + PLAIN_BYTES + 4;
const GCM_IV_BYTES: usize = 12;
const GCM_TAG_BYTES: usize = 16;
// Wrapped file: magic 4, version 1, 3 zero, iv 12, ciphertext 64, tag 16.
const WRAPPED_FILE_BYTES: usize = 8 + GCM_IV_BYTES + PLAIN_BYTES + GCM_TAG_BYTES;
// Bounds the retries of rejection sampling for the SM2 scalar; a random 256-bit string
// is out of range with probability < 2^-32, so hitting this means a broken RNG.
const SCALAR_TRIES_MAX: u32 = 16;
// Bounds how many slots are inspected when looking for a token by label.
const SLOTS_MAX: usize = 256;

/// Errors of the key backends. Each names the file or token step that failed so that an
/// operator can tell a wrong PIN from a damaged key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A key file exists but its layout, version or checksum is wrong.
    #[error("key file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The stored SM2 secret is not a valid scalar.
    #[error("stored SM2 signing key is invalid")]
    InvalidSigningKey,
    /// The OS random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),
    /// The PKCS#11 module could not be loaded (missing file, not a PKCS#11 library).
    #[error("PKCS#11 module {path}: {reason}")]
    ModuleLoad {
        /// The module path.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// No initialised token carries the configured label.
    #[error("no PKCS#11 token labelled {0:?}")]
    TokenNotFound(String),
    /// The token refused the user PIN.
    #[error("PKCS#11 token refused the PIN")]
    WrongPin,
    /// The token's PIN is locked after too many wrong attempts.
    #[error("PKCS#11 token PIN is locked")]
    PinLocked,
    /// The wrapped key file exists but the token has no wrapping key with the label:
    /// the blob can never be opened with this token.
    #[error("token has no wrapping key {0:?} but a wrapped key file exists")]
    WrappingKeyMissing(String),
    /// The token refused to decrypt the wrapped blob: it was tampered with, or was
    /// wrapped by another token or key.
    #[error("token rejected the wrapped device keys (tampered, or another wrapping key)")]
    UnwrapRejected,
    /// Any other PKCS#11 failure, with the function and return value.
    #[error("PKCS#11: {0}")]
    Pkcs11(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The device keys held by the emulator while it runs. Zeroed on drop; `Debug` shows only
/// the key id.
pub struct DeviceKeys {
    tax_key: [u8; TAX_KEY_BYTES],
    sign_secret: [u8; SIGN_KEY_BYTES],
    public_key: [u8; 65],
    key_id: String,
}

impl DeviceKeys {
    /// Builds the keys from raw material, validating the SM2 scalar and deriving the
    /// public key and key id.
    pub fn from_material(
        tax_key: [u8; TAX_KEY_BYTES],
        sign_secret: [u8; SIGN_KEY_BYTES],
    ) -> Result<Self, KeyError> {
        let secret =
            sm2::SecretKey::from_slice(&sign_secret).map_err(|_| KeyError::InvalidSigningKey)?;
        let point = secret.public_key().to_sec1_bytes();
        let public_key: [u8; 65] = point
            .as_ref()
            .try_into()
            .map_err(|_| KeyError::InvalidSigningKey)?;
        // The key id names the key pair without revealing anything: the first 8 bytes of
        // SM3(uncompressed public key), in hex.
        let digest = sm3::Sm3::digest(public_key);
        let key_id = hex::encode(&digest[..8]);
        Ok(Self {
            tax_key,
            sign_secret,
            public_key,
            key_id,
        })
    }

    /// Fresh random keys from the OS generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut tax_key = [0u8; TAX_KEY_BYTES];
        fill_random(&mut tax_key)?;
        for _ in 0..SCALAR_TRIES_MAX {
            let mut secret = [0u8; SIGN_KEY_BYTES];
            fill_random(&mut secret)?;
            match Self::from_material(tax_key, secret) {
                Ok(keys) => return Ok(keys),
                Err(KeyError::InvalidSigningKey) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KeyError::Random("no valid SM2 scalar drawn".into()))
    }

    /// The tax-code MAC key (HMAC-SM3).
    pub fn tax_key(&self) -> &[u8; TAX_KEY_BYTES] {
        &self.tax_key
    }

    /// The SM2 secret scalar, big-endian.
    pub fn sign_secret(&self) -> &[u8; SIGN_KEY_BYTES] {
        &self.sign_secret
    }

    /// The SM2 public key, SEC1 uncompressed (0x04 ‖ x ‖ y).
    pub fn public_key(&self) -> &[u8; 65] {
        &self.public_key
    }

    /// The SM2 signing key with [`SM2_DISTID`].
    pub fn signing_key(&self) -> Result<sm2::dsa::SigningKey, KeyError> {
        sm2::dsa::SigningKey::from_slice(SM2_DISTID, &self.sign_secret)
            .map_err(|_| KeyError::InvalidSigningKey)
    }

    /// A stable, non-secret identifier of this key set (16 hex digits).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn plain(&self) -> [u8; PLAIN_BYTES] {
        let mut out = [0u8; PLAIN_BYTES];
        out[..TAX_KEY_BYTES].copy_from_slice(&self.tax_key);
        out[TAX_KEY_BYTES..].copy_from_slice(&self.sign_secret);
        out
    }

    fn from_plain(plain: &[u8]) -> Result<Self, KeyError> {
        let mut tax_key = [0u8; TAX_KEY_BYTES];
        let mut sign = [0u8; SIGN_KEY_BYTES];
        if plain.len() != PLAIN_BYTES {
            return Err(KeyError::InvalidSigningKey);
        }
        tax_key.copy_from_slice(&plain[..TAX_KEY_BYTES]);
        sign.copy_from_slice(&plain[TAX_KEY_BYTES..]);
        Self::from_material(tax_key, sign)
    }
}

impl Drop for DeviceKeys {
    fn drop(&mut self) {
        // Volatile writes so the zeroing is not optimised away as a dead store.
        for b in self.tax_key.iter_mut().chain(self.sign_secret.iter_mut()) {
            // SAFETY: `b` is a valid, exclusive reference to a byte.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn fill_random(buf: &mut [u8]) -> Result<(), KeyError> {
    use rand::TryRngCore;
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| KeyError::Random(e.to_string()))
}

/// A source of the device keys.
pub trait KeyBackend: Send {
    /// Short name for logs and DeviceInfo (`software`, `pkcs11`).
    fn kind(&self) -> &'static str;

    /// Loads the device keys, generating and persisting them first if none exist yet.
    /// Calling it again (or after a restart) yields the same keys.
    fn open(&self) -> Result<DeviceKeys, KeyError>;
}

/// Keys in a plain file `<data dir>/keys/device-keys.bin`, mode 0600, with a CRC32C.
#[derive(Debug, Clone)]
pub struct SoftwareBackend {
    dir: PathBuf,
}

impl SoftwareBackend {
    /// A backend keeping its file in `<data_dir>/keys/`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("keys"),
        }
    }

    /// Path of the key file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(SOFTWARE_KEY_FILE)
    }
}

impl KeyBackend for SoftwareBackend {
    fn kind(&self) -> &'static str {
        "software"
    }

    fn open(&self) -> Result<DeviceKeys, KeyError> {
        let path = self.path();
        match read_small(&path, SOFTWARE_FILE_BYTES)? {
            Some(bytes) => {
                if bytes.len() != SOFTWARE_FILE_BYTES {
                    return Err(KeyError::Corrupt {
                        path,
                        reason: "wrong length",
                    });
                }
                if bytes[..4] != SOFTWARE_MAGIC || bytes[4] != FILE_VERSION {
                    return Err(KeyError::Corrupt {
                        path,
                        reason: "bad magic or version",
                    });
                }
                let body = &bytes[..8 + PLAIN_BYTES];
                let stored =
                    u32::from_le_bytes(bytes[8 + PLAIN_BYTES..].try_into().unwrap_or_default());
                if crc32c::crc32c(body) != stored {
                    return Err(KeyError::Corrupt {
                        path,
                        reason: "checksum mismatch",
                    });
                }
                DeviceKeys::from_plain(&bytes[8..8 + PLAIN_BYTES])
            }
            None => {
                let keys = DeviceKeys::generate()?;
                let mut file = Vec::with_capacity(SOFTWARE_FILE_BYTES);
                file.extend_from_slice(&SOFTWARE_MAGIC);
                file.extend_from_slice(&[FILE_VERSION, 0, 0, 0]);
                file.extend_from_slice(&keys.plain());
                let crc = crc32c::crc32c(&file);
                file.extend_from_slice(&crc.to_le_bytes());
                write_secret_file(&self.dir, SOFTWARE_KEY_FILE, &file)?;
                // Wipe the temporary plain copy.
                file.iter_mut().for_each(|b| *b = 0);
                Ok(keys)
            }
        }
    }
}

/// Reads a file of at most `max_bytes` (one more is read to detect oversize files).
/// `None` when it does not exist.
fn read_small(path: &Path, max_bytes: usize) -> Result<Option<Vec<u8>>, KeyError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut bytes = Vec::with_capacity(max_bytes + 1);
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    Ok(Some(bytes))
}

/// Writes `bytes` to `dir/name` durably with mode 0600: temporary file, fsync, rename,
/// fsync of the directory, so a crash leaves either no file or the whole file.
pub(crate) fn write_secret_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    // A stale temporary file from a crash mid-write is garbage: remove it first so
    // create_new can apply the mode.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Settings of the PKCS#11 backend.
#[derive(Clone)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (SoftHSM2: `/usr/lib/softhsm/libsofthsm2.so`).
    pub module_path: PathBuf,
    /// Label of the initialised token to use.
    pub token_label: String,
    /// The token's user PIN.
    pub user_pin: String,
    /// Label of the AES-256 wrapping key inside the token (created if absent and no
    /// wrapped file exists yet).
    pub wrap_key_label: String,
}

impl std::fmt::Debug for Pkcs11Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Settings")
            .field("module_path", &self.module_path)
            .field("token_label", &self.token_label)
            .field("wrap_key_label", &self.wrap_key_label)
            .finish_non_exhaustive()
    }
}

/// Default SoftHSM2 module path on Debian.
pub const SOFTHSM2_MODULE_PATH: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// Default label of the wrapping key.
pub const DEFAULT_WRAP_KEY_LABEL: &str = "hsm-emu-wrap";

/// Device keys wrapped (AES-256-GCM) by a non-extractable key inside a PKCS#11 token;
/// the blob lives in `<data dir>/keys/device-keys.p11`.
#[derive(Debug, Clone)]
pub struct Pkcs11Backend {
    dir: PathBuf,
    settings: Pkcs11Settings,
}

impl Pkcs11Backend {
    /// A backend keeping its wrapped blob in `<data_dir>/keys/`.
    pub fn new(data_dir: &Path, settings: Pkcs11Settings) -> Self {
        Self {
            dir: data_dir.join("keys"),
            settings,
        }
    }

    /// Path of the wrapped key file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(WRAPPED_KEY_FILE)
    }

    // Additional authenticated data binds the blob to its purpose and wrapping key label.
    fn aad(&self) -> Vec<u8> {
        let mut aad = b"hsm-emu device keys v1/".to_vec();
        aad.extend_from_slice(self.settings.wrap_key_label.as_bytes());
        aad
    }
}

mod p11 {
    //! Thin helpers over `cryptoki` so the backend reads as the steps it takes.
    use super::{KeyError, SLOTS_MAX};
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::session::{Session, UserType};
    use cryptoki::slot::Slot;
    use cryptoki::types::AuthPin;
    use std::path::Path;

    pub(super) fn map(e: Error) -> KeyError {
        match e {
            Error::Pkcs11(RvError::PinIncorrect, _) => KeyError::WrongPin,
            Error::Pkcs11(RvError::PinLocked, _) => KeyError::PinLocked,
            other => KeyError::Pkcs11(other.to_string()),
        }
    }

    pub(super) fn load(module: &Path) -> Result<Pkcs11, KeyError> {
        if !module.exists() {
            return Err(KeyError::ModuleLoad {
                path: module.to_path_buf(),
                reason: "file not found".into(),
            });
        }
        let ctx = Pkcs11::new(module).map_err(|e| KeyError::ModuleLoad {
            path: module.to_path_buf(),
            reason: e.to_string(),
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            // Another context of this process initialised the module and has not
            // finalised it yet: the module is usable as it is.
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
            Err(e) => Err(map(e)),
        }
    }

    pub(super) fn find_token(ctx: &Pkcs11, label: &str) -> Result<Slot, KeyError> {
        let slots = ctx.get_slots_with_initialized_token().map_err(map)?;
        for slot in slots.into_iter().take(SLOTS_MAX) {
            let info = ctx.get_token_info(slot).map_err(map)?;
            if info.label().trim_end() == label {
                return Ok(slot);
            }
        }
        Err(KeyError::TokenNotFound(label.to_string()))
    }

    pub(super) fn login(ctx: &Pkcs11, slot: Slot, pin: &str) -> Result<Session, KeyError> {
        let session = ctx.open_rw_session(slot).map_err(map)?;
        session
            .login(UserType::User, Some(&AuthPin::from(pin.to_string())))
            .map_err(map)?;
        Ok(session)
    }
}

impl KeyBackend for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }

    fn open(&self) -> Result<DeviceKeys, KeyError> {
        let ctx = p11::load(&self.settings.module_path)?;
        let result = self.open_in(&ctx);
        // cryptoki does not finalise on drop; without this a later open in the same
        // process would find the module still initialised. Sessions are closed by now.
        let _ = ctx.finalize();
        result
    }
}

impl Pkcs11Backend {
    fn open_in(&self, ctx: &cryptoki::context::Pkcs11) -> Result<DeviceKeys, KeyError> {
        use cryptoki::mechanism::aead::GcmParams;
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, KeyType, ObjectClass};

        let slot = p11::find_token(ctx, &self.settings.token_label)?;
        let session = p11::login(ctx, slot, &self.settings.user_pin)?;
        let label = self.settings.wrap_key_label.as_bytes().to_vec();
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.clone()),
        ];
        let found = session.find_objects(&template).map_err(p11::map)?;
        let path = self.path();
        let existing = read_small(&path, WRAPPED_FILE_BYTES)?;
        let aad = self.aad();

        match existing {
            Some(blob) => {
                let key = *found.first().ok_or_else(|| {
                    KeyError::WrappingKeyMissing(self.settings.wrap_key_label.clone())
                })?;
                if blob.len() != WRAPPED_FILE_BYTES {
                    return Err(KeyError::Corrupt {
                        path,
                        reason: "wrong length",
                    });
                }
                if blob[..4] != WRAPPED_MAGIC || blob[4] != FILE_VERSION {
                    return Err(KeyError::Corrupt {
                        path,
                        reason: "bad magic or version",
                    });
                }
                let mut iv = [0u8; GCM_IV_BYTES];
                iv.copy_from_slice(&blob[8..8 + GCM_IV_BYTES]);
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_BYTES as u64 * 8).into())
                    .map_err(p11::map)?;
                // Any decrypt failure here is the token refusing the tag: the blob was
                // changed or wrapped under another key.
                let mut plain = session
                    .decrypt(&Mechanism::AesGcm(params), key, &blob[8 + GCM_IV_BYTES..])
                    .map_err(|_| KeyError::UnwrapRejected)?;
                let keys = DeviceKeys::from_plain(&plain);
                plain.iter_mut().for_each(|b| *b = 0);
                keys
            }
            None => {
                // First start: make (or reuse) the wrapping key inside the token. It is
                // sensitive and non-extractable, so it never leaves the token.
                let key = match found.first() {
                    Some(k) => *k,
                    None => session
                        .generate_key(
                            &Mechanism::AesKeyGen,
                            &[
                                Attribute::Class(ObjectClass::SECRET_KEY),
                                Attribute::KeyType(KeyType::AES),
                                Attribute::ValueLen(32u64.into()),
                                Attribute::Token(true),
                                Attribute::Private(true),
                                Attribute::Sensitive(true),
                                Attribute::Extractable(false),
                                Attribute::Encrypt(true),
                                Attribute::Decrypt(true),
                                Attribute::Label(label),
                            ],
                        )
                        .map_err(p11::map)?,
                };
                let keys = DeviceKeys::generate()?;
                let mut iv = [0u8; GCM_IV_BYTES];
                session.generate_random_slice(&mut iv).map_err(p11::map)?;
                let iv_copy = iv;
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_BYTES as u64 * 8).into())
                    .map_err(p11::map)?;
                let mut plain = keys.plain();
                let sealed = session
                    .encrypt(&Mechanism::AesGcm(params), key, &plain)
                    .map_err(p11::map);
                plain.iter_mut().for_each(|b| *b = 0);
                let sealed = sealed?;
                if sealed.len() != PLAIN_BYTES + GCM_TAG_BYTES {
                    return Err(KeyError::Pkcs11(format!(
                        "AES-GCM returned {} bytes, expected {}",
                        sealed.len(),
                        PLAIN_BYTES + GCM_TAG_BYTES
                    )));
                }
                let mut file = Vec::with_capacity(WRAPPED_FILE_BYTES);
                file.extend_from_slice(&WRAPPED_MAGIC);
                file.extend_from_slice(&[FILE_VERSION, 0, 0, 0]);
                file.extend_from_slice(&iv_copy);
                file.extend_from_slice(&sealed);
                write_secret_file(&self.dir, WRAPPED_KEY_FILE, &file)?;
                Ok(keys)
            }
        }
    }
}

/// Initialises a fresh token with `label` in the first slot without a token, and sets
/// its user PIN. For tests and first-time setup; production tokens are initialised by
/// the operator's tooling. Returns an error if no free slot exists.
pub fn pkcs11_init_token(
    module: &Path,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<(), KeyError> {
    let ctx = p11::load(module)?;
    let result = init_token_in(&ctx, label, so_pin, user_pin);
    let _ = ctx.finalize();
    result
}

fn init_token_in(
    ctx: &cryptoki::context::Pkcs11,
    label: &str,
    so_pin: &str,
    user_pin: &str,
) -> Result<(), KeyError> {
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let slots = ctx.get_all_slots().map_err(p11::map)?;
    let mut free = None;
    for slot in slots.into_iter().take(SLOTS_MAX) {
        let info = ctx.get_token_info(slot).map_err(p11::map)?;
        if !info.token_initialized() {
            free = Some(slot);
            break;
        }
    }
    let slot =
        free.ok_or_else(|| KeyError::Pkcs11("no slot with an uninitialised token".into()))?;
    let so = AuthPin::from(so_pin.to_string());
    ctx.init_token(slot, &so, label).map_err(p11::map)?;
    // SoftHSM2 moves an initialised token to a new slot id: look it up again by label.
    let slot = p11::find_token(ctx, label)?;
    let session = ctx.open_rw_session(slot).map_err(p11::map)?;
    session.login(UserType::So, Some(&so)).map_err(p11::map)?;
    session
        .init_pin(&AuthPin::from(user_pin.to_string()))
        .map_err(p11::map)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_generate_then_load_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SoftwareBackend::new(dir.path());
        let a = backend.open().unwrap();
        let b = backend.open().unwrap();
        assert_eq!(a.tax_key(), b.tax_key());
        assert_eq!(a.sign_secret(), b.sign_secret());
        assert_eq!(a.key_id(), b.key_id());
        let mode = fs::metadata(backend.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn software_corrupt_file_is_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SoftwareBackend::new(dir.path());
        backend.open().unwrap();
        let mut bytes = fs::read(backend.path()).unwrap();
        bytes[20] ^= 1;
        fs::write(backend.path(), &bytes).unwrap();
        assert!(matches!(backend.open(), Err(KeyError::Corrupt { .. })));
    }
}
