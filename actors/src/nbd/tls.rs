//! TLS for the NBD server: the server's x509 certificate and private key, and
//! optionally a CA that every client certificate must be signed by, loaded into a
//! rustls acceptor (the `ring` provider; TLS 1.2 and 1.3).
//!
//! The protocol side (`NBD_OPT_STARTTLS`, refusing everything else before it) is the
//! sans-IO core's ([`tidemark::nbd::TlsPolicy`]); this module only holds the
//! credentials and wraps a stream when the core asks for it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// The PEM files a TLS-serving NBD server is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain: its own certificate first, then any
    /// intermediates.
    pub cert: PathBuf,
    /// The private key of that certificate (PKCS#8, PKCS#1 or SEC1). It must not be
    /// readable or writable by group or others.
    pub key: PathBuf,
    /// If set, clients must present a certificate signed by one of these CAs;
    /// otherwise no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Which of the [`TlsFiles`] a [`TlsError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// Credentials that cannot be used, with the file and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TlsError {
    pub file: TlsFile,
    pub path: PathBuf,
    pub reason: String,
}

/// A loaded TLS server configuration, cheap to clone (one per connection).
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    client_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files: the certificate chain must hold at least one
    /// certificate, the key must match it and must not be accessible by group or
    /// others (as ssh insists for private keys), and the client CA file, if any, must
    /// hold at least one usable CA certificate.
    pub fn load(files: &TlsFiles) -> Result<ServerTls, TlsError> {
        let err = |file: TlsFile, path: &Path, reason: String| TlsError {
            file,
            path: path.to_path_buf(),
            reason,
        };
        let certs = read_certs(&files.cert).map_err(|r| err(TlsFile::Cert, &files.cert, r))?;
        check_private(&files.key).map_err(|r| err(TlsFile::Key, &files.key, r))?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            err(
                TlsFile::Key,
                &files.key,
                format!("no usable private key in PEM: {e}"),
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(TlsFile::Cert, &files.cert, e.to_string()))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                let ca_certs = read_certs(ca).map_err(|r| err(TlsFile::ClientCa, ca, r))?;
                for c in ca_certs {
                    roots.add(c).map_err(|e| {
                        err(
                            TlsFile::ClientCa,
                            ca,
                            format!("not a usable CA certificate: {e}"),
                        )
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| err(TlsFile::ClientCa, ca, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            err(
                TlsFile::Key,
                &files.key,
                format!(
                    "cannot be used with the certificate in {}: {e}",
                    files.cert.display()
                ),
            )
        })?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            client_auth: files.client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate signed by the configured CA.
    pub fn requires_client_cert(&self) -> bool {
        self.client_auth
    }

    pub(super) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM CERTIFICATE".into());
    }
    Ok(certs)
}

/// A private key file must be accessible by its owner only.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "is accessible by group or others (mode {:04o}); a private key must be \
             readable by its owner only: chmod 600 it",
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../tests/nbd_support/certs.rs"]
mod test_certs;

#[cfg(test)]
mod tests {
    use super::test_certs::TestPki;
    use super::*;

    fn files(pki: &TestPki, client_ca: bool) -> TlsFiles {
        TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: client_ca.then(|| pki.ca.clone()),
        }
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn good_files_load_with_and_without_client_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::write(dir.path());
        let tls = ServerTls::load(&files(&pki, false)).expect("loads");
        assert!(!tls.requires_client_cert());
        let tls = ServerTls::load(&files(&pki, true)).expect("loads with a client CA");
        assert!(tls.requires_client_cert());
    }

    #[test]
    fn unusable_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::write(dir.path());
        let missing = dir.path().join("missing.pem");
        // A key someone else may read is refused, as ssh refuses it.
        let open_key = dir.path().join("open-key.pem");
        std::fs::copy(&pki.server_key, &open_key).expect("copy");
        chmod(&open_key, 0o640);
        // The client's key does not belong to the server's certificate.
        let other_key = pki.client.join("client-key.pem");
        let cases: Vec<(&str, TlsFiles, TlsFile, &str)> = vec![
            (
                "key readable by group",
                TlsFiles {
                    key: open_key.clone(),
                    ..files(&pki, false)
                },
                TlsFile::Key,
                "chmod 600",
            ),
            (
                "key of another certificate",
                TlsFiles {
                    key: other_key,
                    ..files(&pki, false)
                },
                TlsFile::Key,
                "cannot be used with the certificate",
            ),
            (
                "certificate file holding a key",
                TlsFiles {
                    cert: pki.server_key.clone(),
                    ..files(&pki, false)
                },
                TlsFile::Cert,
                "no PEM CERTIFICATE",
            ),
            (
                "missing certificate",
                TlsFiles {
                    cert: missing.clone(),
                    ..files(&pki, false)
                },
                TlsFile::Cert,
                "cannot read",
            ),
            (
                "missing key",
                TlsFiles {
                    key: missing.clone(),
                    ..files(&pki, false)
                },
                TlsFile::Key,
                "cannot read",
            ),
            (
                "missing client CA",
                TlsFiles {
                    client_ca: Some(missing.clone()),
                    ..files(&pki, false)
                },
                TlsFile::ClientCa,
                "cannot read",
            ),
            (
                "client CA file holding a key",
                TlsFiles {
                    client_ca: Some(pki.server_key.clone()),
                    ..files(&pki, false)
                },
                TlsFile::ClientCa,
                "no PEM CERTIFICATE",
            ),
        ];
        for (name, f, which, needle) in cases {
            let e = ServerTls::load(&f).expect_err(name);
            assert_eq!(e.file, which, "{name}: {e}");
            let text = e.to_string();
            assert!(text.contains(needle), "{name}: {text:?} lacks {needle:?}");
        }
        // The same key with mode 0600 loads.
        chmod(&open_key, 0o600);
        ServerTls::load(&TlsFiles {
            key: open_key,
            ..files(&pki, false)
        })
        .expect("a private key file loads");
    }
}
