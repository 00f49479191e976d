//! The PKCS#11 key backend against a real SoftHSM2 token, in-process and through a real
//! `hsm-emu` process. SoftHSM2 must be installed (`apt-get install -y softhsm2`): a
//! missing module fails the test, it is never skipped.
//!
//! One test function only: SOFTHSM2_CONF is process-wide, and the module keeps global
//! state, so the steps run in sequence.

mod emulator_support;

use std::path::Path;

use emulator_support::*;
use hsm_driver::proto::{Request, Response};
use hsm_emulator::crypto::{self, TaxCodeKey};
use hsm_emulator::keys::{
    pkcs11_init_token, KeyBackend, KeyError, Pkcs11Backend, Pkcs11Settings, SOFTHSM2_MODULE_PATH,
    WRAPPED_KEY_FILE,
};

const TOKEN: &str = "hsm-emu-test";
const PIN: &str = "user-pin-1234";

fn settings(pin: &str, label: &str) -> Pkcs11Settings {
    Pkcs11Settings {
        module_path: SOFTHSM2_MODULE_PATH.into(),
        token_label: label.into(),
        user_pin: pin.into(),
        wrap_key_label: "hsm-emu-wrap".into(),
    }
}

fn write_conf(root: &Path) -> std::path::PathBuf {
    let tokens = root.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = root.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    conf
}

#[test]
fn pkcs11_backend_with_softhsm2() {
    assert!(
        Path::new(SOFTHSM2_MODULE_PATH).exists(),
        "SoftHSM2 module {SOFTHSM2_MODULE_PATH} is missing: install it with \
         `apt-get install -y softhsm2` (CI does this in .ci/run)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path());
    std::env::set_var("SOFTHSM2_CONF", &conf);
    pkcs11_init_token(Path::new(SOFTHSM2_MODULE_PATH), TOKEN, "so-pin-1234", PIN)
        .expect("init token");

    // Generate on first open, same keys on the next.
    let data = tmp.path().join("data");
    let backend = Pkcs11Backend::new(&data, settings(PIN, TOKEN));
    assert_eq!(backend.kind(), "pkcs11");
    let k1 = backend.open().expect("first open generates");
    let k2 = backend.open().expect("second open unwraps");
    assert_eq!(k1.tax_key(), k2.tax_key());
    assert_eq!(k1.sign_secret(), k2.sign_secret());
    assert_eq!(k1.key_id(), k2.key_id());
    let wrapped = data.join("keys").join(WRAPPED_KEY_FILE);
    let blob = std::fs::read(&wrapped).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&wrapped).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The blob is ciphertext: the raw tax key does not appear in it.
    assert!(!blob.windows(32).any(|w| w == k1.tax_key()));

    // Wrong PIN: typed error.
    let wrong = Pkcs11Backend::new(&data, settings("not-the-pin", TOKEN));
    assert!(matches!(wrong.open(), Err(KeyError::WrongPin)), "wrong PIN");
    // Unknown token.
    let missing = Pkcs11Backend::new(&data, settings(PIN, "no-such-token"));
    assert!(matches!(missing.open(), Err(KeyError::TokenNotFound(_))));
    // Tampered ciphertext or IV: the token refuses to unwrap.
    for pos in [10, 30, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[pos] ^= 0x01;
        std::fs::write(&wrapped, &bad).unwrap();
        assert!(
            matches!(backend.open(), Err(KeyError::UnwrapRejected)),
            "tampered byte {pos}"
        );
    }
    // Truncated: structural error before the token is asked.
    std::fs::write(&wrapped, &blob[..40]).unwrap();
    assert!(matches!(backend.open(), Err(KeyError::Corrupt { .. })));
    std::fs::write(&wrapped, &blob).unwrap();
    assert_eq!(backend.open().unwrap().tax_key(), k1.tax_key());

    // A module path that does not exist is a typed error too.
    let mut s = settings(PIN, TOKEN);
    s.module_path = tmp.path().join("nope.so");
    assert!(matches!(
        Pkcs11Backend::new(&data, s).open(),
        Err(KeyError::ModuleLoad { .. })
    ));

    // The real process with the PKCS#11 backend uses the same keys, across restarts.
    let conf_s = conf.to_string_lossy().into_owned();
    let grant = format!("{}:144031900111:1:1000", seller_a());
    let args = [
        "--key-backend",
        "pkcs11",
        "--pkcs11-token-label",
        TOKEN,
        "--taxpayer",
        &grant,
    ];
    let env = [
        ("SOFTHSM2_CONF", conf_s.as_str()),
        ("HSM_EMU_PKCS11_PIN", PIN),
    ];
    let key = TaxCodeKey::hmac_sm3(k1.tax_key());
    let inv = invoice(&seller_a(), 144_031_900_111, 1, false, 1);
    for round in 0..2 {
        let emu = Emu::start_with_env(&data, &args, &env);
        let mut c = emu.client();
        let Response::DeviceInfo(info) = ok(&mut c, Request::DeviceInfo) else {
            panic!()
        };
        assert_eq!(&info.sm2_public_key, k1.public_key(), "round {round}");
        assert!(info.firmware.ends_with("pkcs11"));
        requisition(&mut c, &seller_a(), 10, 0, 1);
        let items = tax_codes(&mut c, std::slice::from_ref(&inv));
        assert_eq!(items[0].tax_code, crypto::tax_code(&key, &inv));
        emu.kill();
    }
    // A wrong PIN stops the process at start-up with the typed error on stderr.
    let bad_env = [
        ("SOFTHSM2_CONF", conf_s.as_str()),
        ("HSM_EMU_PKCS11_PIN", "bad"),
    ];
    match Emu::try_start(&data, &args, &bad_env) {
        Ok(_) => panic!("started with a wrong PIN"),
        Err(log) => assert!(log.contains("refused the PIN"), "stderr: {log}"),
    }
}
