//! A throwaway PKI for development and tests ([`DevPki`]), and PEM loading helpers that
//! the client (and the server) use.
//!
//! The CA's private key is never written: the PKI is for one test run or one demo, and a
//! CA key lying around in a work directory would be a key that signs anything.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the dev PKI could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed (e.g. a name that is not a valid DNS name).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A client name that cannot be a file name component or a DNS name.
    #[error("invalid client name {0:?}: use letters, digits, '-' and '.'")]
    ClientName(String),
}

/// Paths of one client's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertPaths {
    /// The identity: the certificate's Common Name and its DNS SAN.
    pub name: String,
    /// `client-<name>.pem`.
    pub cert: PathBuf,
    /// `client-<name>.key`.
    pub key: PathBuf,
}

/// The files of a generated dev PKI. The server loads `ca` to verify clients and
/// `server_cert`/`server_key` as its own identity; a client loads `ca` to verify the
/// server and its `client-<name>` pair as its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `ca.pem`: the CA certificate, trusted by both sides.
    pub ca: PathBuf,
    /// `server.pem`: the server certificate (SANs: the given names, localhost, 127.0.0.1).
    pub server_cert: PathBuf,
    /// `server.key`: its key, PKCS#8 PEM.
    pub server_key: PathBuf,
    /// One entry per client identity, in the order given.
    pub clients: Vec<ClientCertPaths>,
}

impl DevPki {
    /// Generates a CA, a server certificate for `server_names` (plus `localhost` and
    /// `127.0.0.1`) and one client certificate per name in `clients`, all signed by the
    /// CA, and writes them as PEM files into `dir` (created if missing; existing files
    /// are overwritten). Keys are ECDSA P-256.
    pub fn generate(
        dir: &Path,
        server_names: &[&str],
        clients: &[&str],
    ) -> Result<DevPki, PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        for name in clients {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(PkiError::ClientName((*name).to_owned()));
            }
        }

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = common_name("appliance dev CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut sans: Vec<String> = server_names.iter().map(|s| (*s).to_owned()).collect();
        for extra in ["localhost", "127.0.0.1"] {
            if !sans.iter().any(|s| s == extra) {
                sans.push(extra.to_owned());
            }
        }
        let server_key = KeyPair::generate()?;
        let mut server_params = CertificateParams::new(sans)?;
        server_params.distinguished_name =
            common_name(server_names.first().copied().unwrap_or("localhost"));
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let pki = DevPki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            clients: clients
                .iter()
                .map(|name| ClientCertPaths {
                    name: (*name).to_owned(),
                    cert: dir.join(format!("client-{name}.pem")),
                    key: dir.join(format!("client-{name}.key")),
                })
                .collect(),
        };
        write(&pki.ca, ca_cert.pem().as_bytes(), false)?;
        write(&pki.server_cert, server_cert.pem().as_bytes(), false)?;
        write(&pki.server_key, server_key.serialize_pem().as_bytes(), true)?;

        for paths in &pki.clients {
            let key = KeyPair::generate()?;
            // The identity is both the CN (what the appliance reads) and a DNS SAN
            // (what name-checking tools and future verifiers look at).
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::DnsName(paths.name.clone().try_into()?)];
            params.distinguished_name = common_name(&paths.name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer)?;
            write(&paths.cert, cert.pem().as_bytes(), false)?;
            write(&paths.key, key.serialize_pem().as_bytes(), true)?;
        }
        Ok(pki)
    }

    /// The certificate and key paths of client `name`.
    pub fn client(&self, name: &str) -> Option<&ClientCertPaths> {
        self.clients.iter().find(|c| c.name == name)
    }
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn write(path: &Path, contents: &[u8], secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, contents).map_err(io)?;
    if secret {
        // Keys readable by their owner only, as ssh and TLS servers expect.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
    }
    Ok(())
}

/// Every certificate in a PEM buffer (other PEM sections are skipped).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("PEM certificates: {e}"))
}

/// The first private key in a PEM buffer (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("PEM private key: {e}"))
}

/// [`certs_from_pem`] over a file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    certs_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`key_from_pem`] over a file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    key_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}
