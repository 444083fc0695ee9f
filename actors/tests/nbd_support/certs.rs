//! Test certificates for NBD over TLS, made with rcgen (shared by the actor crate's unit
//! tests and the CLI's process tests, included with `#[path]`).
//!
//! Two unrelated CAs: the right one signs the server certificate (for 127.0.0.1 and
//! localhost) and a client certificate; the other ("foreign") CA signs a client
//! certificate of its own. The client directories have the file names libnbd
//! (`nbds://...?tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR,endpoint=client`)
//! read: `ca-cert.pem`, and optionally `client-cert.pem` and `client-key.pem`.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Where [`TestPki::write`] put everything.
pub struct TestPki {
    /// The server's certificate and key (mode 0600), for `nbd_tls_cert`/`nbd_tls_key`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The right CA's certificate, for `nbd_tls_client_ca`.
    pub ca: PathBuf,
    /// Trusts the right CA and holds a client certificate it signed.
    pub client: PathBuf,
    /// Trusts the right CA, holds no client certificate.
    pub client_no_cert: PathBuf,
    /// Trusts only the foreign CA (and holds a client certificate that CA signed).
    pub client_wrong_ca: PathBuf,
    /// Trusts the right CA, but holds a client certificate signed by the foreign CA.
    pub client_foreign_cert: PathBuf,
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("self-signed CA");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![purpose];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = p.signed_by(&key, &ca.issuer).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

fn write(path: &Path, text: &str, private: bool) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mode = if private { 0o600 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A client directory: `ca-cert.pem` and, if given, `client-cert.pem`/`client-key.pem`.
fn client_dir(dir: &Path, ca: &Ca, cert: Option<&(String, String)>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("client dir");
    write(&dir.join("ca-cert.pem"), &ca.pem, false);
    if let Some((c, k)) = cert {
        write(&dir.join("client-cert.pem"), c, false);
        write(&dir.join("client-key.pem"), k, true);
    }
    dir.to_path_buf()
}

impl TestPki {
    /// Makes both CAs and every certificate, and writes them under `dir`.
    pub fn write(dir: &Path) -> TestPki {
        let right = ca("tidemark test CA");
        let foreign = ca("some other CA");
        let (server_cert, server_key) = leaf(
            &right,
            "tidemark test server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(&right, "client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let foreign_client = leaf(
            &foreign,
            "foreign client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let server = dir.join("server");
        std::fs::create_dir_all(&server).expect("server dir");
        write(&server.join("server-cert.pem"), &server_cert, false);
        write(&server.join("server-key.pem"), &server_key, true);
        write(&server.join("ca-cert.pem"), &right.pem, false);
        TestPki {
            server_cert: server.join("server-cert.pem"),
            server_key: server.join("server-key.pem"),
            ca: server.join("ca-cert.pem"),
            client: client_dir(&dir.join("client"), &right, Some(&client)),
            client_no_cert: client_dir(&dir.join("client-no-cert"), &right, None),
            client_wrong_ca: client_dir(
                &dir.join("client-wrong-ca"),
                &foreign,
                Some(&foreign_client),
            ),
            client_foreign_cert: client_dir(
                &dir.join("client-foreign-cert"),
                &right,
                Some(&foreign_client),
            ),
        }
    }
}
