//! TLS (the `tls` feature): the PEM files are read and checked before connecting, each problem
//! named with its file, and a TLS failure while connecting is told apart from an outage: a
//! certificate refused, by either side, is a setup mistake that no retry will mend.

use rustls_pki_types::{
    CertificateDer, PrivateKeyDer,
    pem::{self, SectionKind},
};
use std::{sync::Arc, time::Duration};

use sync_core::{Error, ErrorKind, Result};

use crate::{BACKEND, Config};

/// The TLS options of `config`, after checking its PEM files: `ca_file` holds at least one
/// certificate usable as a trust anchor; `cert_file` and `key_file` come together, the first
/// holds certificates, the second a private key, and the key is the first certificate's.
#[cfg(test)]
pub(crate) fn options(config: &Config) -> Result<etcd_client::TlsOptions> {
    check(config).map(|(options, _)| options)
}

/// The TLS options of `config` (see [`options`]) and a [`Probe`] with the same trust and
/// identity.
pub(crate) fn check(config: &Config) -> Result<(etcd_client::TlsOptions, Probe)> {
    let Some(ca_file) = &config.ca_file else {
        // Config::validate refuses TLS without a CA; this is for a config it never saw.
        return Err(invalid(
            "tls needs ca_file, the PEM of the CA that signed etcd's server certificate \
             (system roots are not used)",
        ));
    };
    let mut options = etcd_client::TlsOptions::new();
    let ca_pem = read("ca_file", ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    let mut identity = None;
    for ca in certificates("ca_file", ca_file, &ca_pem)? {
        roots.add(ca).map_err(|e| {
            file_err(
                "ca_file",
                ca_file,
                format!("holds a certificate that is not usable as a CA: {e}"),
            )
        })?;
    }
    options = options.ca_certificate(etcd_client::Certificate::from_pem(ca_pem));
    match (&config.cert_file, &config.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let cert_pem = read("cert_file", cert_file)?;
            let key_pem = read("key_file", key_file)?;
            identity = Some(check_identity(cert_file, &cert_pem, key_file, &key_pem)?);
            options = options.identity(etcd_client::Identity::from_pem(cert_pem, key_pem));
        }
        (None, None) => {}
        (Some(cert_file), None) => {
            return Err(invalid(format!(
                "cert_file {cert_file:?} is given without key_file: mutual TLS needs both"
            )));
        }
        (None, Some(key_file)) => {
            return Err(invalid(format!(
                "key_file {key_file:?} is given without cert_file: mutual TLS needs both"
            )));
        }
    }
    if let Some(domain) = &config.tls_domain {
        rustls_pki_types::ServerName::try_from(domain.as_str()).map_err(|e| {
            invalid(format!(
                "tls_domain {domain:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        options = options.domain_name(domain.clone());
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(format!("TLS setup: {e}")))?
    .with_root_certificates(roots);
    let client_config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid(format!("TLS client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    let probe = Probe {
        client_config: Arc::new(client_config),
        endpoints: config.endpoints.clone(),
        domain: config.tls_domain.clone(),
        timeout: config.connect_timeout.min(Duration::from_secs(3)),
    };
    Ok((options, probe))
}

/// A TLS handshake of its own with each endpoint, to tell why connecting failed: the status
/// of a failed call does not always carry the TLS error (with TLS 1.3 a server refuses a
/// client certificate after the client thinks the handshake is done, and the call only sees
/// the connection close).
pub(crate) struct Probe {
    client_config: Arc<rustls::ClientConfig>,
    endpoints: Vec<String>,
    domain: Option<String>,
    timeout: Duration,
}

impl Probe {
    /// What is wrong with TLS to the first endpoint that says so, or None (an outage, or
    /// nothing found). Blocking.
    pub(crate) fn diagnose(&self) -> Option<(ErrorKind, String)> {
        self.endpoints.iter().find_map(|e| self.diagnose_one(e))
    }

    fn diagnose_one(&self, endpoint: &str) -> Option<(ErrorKind, String)> {
        use std::{
            io::{Read, Write},
            net::{TcpStream, ToSocketAddrs},
        };
        let authority = endpoint
            .trim_start_matches("https://")
            .trim_end_matches('/');
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:443")
        };
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = self.domain.as_deref().unwrap_or(host).to_string();
        let name = rustls_pki_types::ServerName::try_from(name).ok()?;
        let addr = authority.to_socket_addrs().ok()?.next()?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout).ok()?;
        tcp.set_read_timeout(Some(self.timeout)).ok()?;
        tcp.set_write_timeout(Some(self.timeout)).ok()?;
        let conn = rustls::ClientConnection::new(self.client_config.clone(), name).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let found = |e: std::io::Error, handshaking: bool| -> Option<(ErrorKind, String)> {
            if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(classify(tls));
            }
            // A plain server closes on the ClientHello, with a reset when it closes before
            // reading all of it.
            let closed = e.kind() == std::io::ErrorKind::UnexpectedEof
                || (handshaking && e.kind() == std::io::ErrorKind::ConnectionReset);
            closed.then(|| {
                (
                    ErrorKind::InvalidArgument,
                    format!(
                        "{endpoint} closed the connection during the TLS handshake: does it \
                         serve TLS (etcd's --cert-file)? An etcd without TLS needs an etcd:// url"
                    ),
                )
            })
        };
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return found(e, true);
            }
        }
        // A server that refuses the client's certificate says so right after the handshake;
        // HTTP/2's preface asks for an answer in case it says nothing.
        if let Err(e) = tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .and_then(|()| tls.flush())
        {
            return found(e, false);
        }
        let mut buf = [0u8; 64];
        match tls.read(&mut buf) {
            Err(e) => found(e, false),
            // Closed without an alert, or answered: nothing TLS can tell.
            Ok(0) | Ok(1..) => None,
        }
    }
}

/// The client certificate chain and key: both parse, and the key is the certificate's.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn check_identity(
    cert_file: &str,
    cert_pem: &[u8],
    key_file: &str,
    key_pem: &[u8],
) -> Result<Identity> {
    let chain = certificates("cert_file", cert_file, cert_pem)?;
    let key = private_key(key_file, key_pem)?;
    let identity = (chain.clone(), key.clone_key());
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key).map_err(|e| {
        file_err(
            "key_file",
            key_file,
            format!("holds a private key that cannot be used: {e}"),
        )
    })?;
    match rustls::sign::CertifiedKey::new(chain, signing).keys_match() {
        Ok(()) => Ok(identity),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(invalid(format!(
                "cert_file {cert_file:?} and key_file {key_file:?} do not match: the key is \
                 not the certificate's"
            )))
        }
        Err(e) => Err(file_err(
            "cert_file",
            cert_file,
            format!("holds a certificate that cannot be used with key_file {key_file:?}: {e}"),
        )),
    }
}

fn read(key: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| file_err(key, path, format!("cannot be read: {e}")).with_source(e))
}

/// Every PEM section of a file, or what is wrong with it.
fn sections(key: &str, path: &str, pem: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>> {
    if pem.iter().all(u8::is_ascii_whitespace) {
        return Err(file_err(key, path, "is empty"));
    }
    let mut rest = pem;
    let mut found = Vec::new();
    loop {
        match pem::from_buf(&mut rest) {
            Ok(Some(section)) => found.push(section),
            Ok(None) => return Ok(found),
            Err(e) => return Err(file_err(key, path, format!("is not valid PEM: {e}"))),
        }
    }
}

/// The certificates of a PEM file, at least one.
fn certificates(key: &str, path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let sections = sections(key, path, pem)?;
    let certs: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if !certs.is_empty() {
        return Ok(certs);
    }
    let problem = if sections.iter().any(|(kind, _)| is_private_key(*kind)) {
        "holds a private key, not a certificate"
    } else {
        "holds no PEM certificate (no -----BEGIN CERTIFICATE----- section)"
    };
    Err(file_err(key, path, problem))
}

/// The one private key of a PEM file.
fn private_key(path: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    let sections = sections("key_file", path, pem)?;
    let mut keys = sections.into_iter().filter_map(|(kind, der)| match kind {
        SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.into())),
        SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.into())),
        SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.into())),
        _ => None,
    });
    match (keys.next(), keys.next()) {
        (Some(key), None) => Ok(key),
        (Some(_), Some(_)) => Err(file_err(
            "key_file",
            path,
            "holds more than one private key",
        )),
        (None, _) if pem_has_certificate(pem) => Err(file_err(
            "key_file",
            path,
            "holds a certificate, not a private key",
        )),
        (None, _) => Err(file_err(
            "key_file",
            path,
            "holds no PEM private key (no -----BEGIN [RSA |EC ]PRIVATE KEY----- section)",
        )),
    }
}

fn pem_has_certificate(pem: &[u8]) -> bool {
    let mut rest = pem;
    std::iter::from_fn(|| pem::from_buf(&mut rest).ok().flatten())
        .any(|(kind, _)| kind == SectionKind::Certificate)
}

fn is_private_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid(message).with_backend(BACKEND)
}

fn file_err(key: &str, path: &str, problem: impl std::fmt::Display) -> Error {
    invalid(format!("{key} {path:?} {problem}"))
}

/// A TLS failure in the cause of a failed call, as the kind it deserves and what to check:
/// the server's certificate refused here (InvalidArgument: `ca_file`, `tls_domain`), this
/// client's certificate refused by the server (Unauthorized: `cert_file`, `key_file`), or an
/// endpoint that does not speak TLS (InvalidArgument). None when no TLS error is in the cause.
pub(crate) fn rejection(e: &etcd_client::Error) -> Option<(ErrorKind, String)> {
    tls_cause(e).map(classify)
}

fn classify(tls: &rustls::Error) -> (ErrorKind, String) {
    match tls {
        rustls::Error::InvalidCertificate(why) => (
            ErrorKind::InvalidArgument,
            format!(
                "the server's certificate was refused ({why}): ca_file must hold the CA that \
                 signed etcd's --cert-file, and the endpoint host (or tls_domain) must be one \
                 of the certificate's names"
            ),
        ),
        rustls::Error::AlertReceived(alert) if refuses_our_certificate(*alert) => (
            ErrorKind::Unauthorized,
            format!(
                "etcd refused this client's certificate (TLS alert {alert:?}): with \
                 --client-cert-auth it needs cert_file and key_file signed by its \
                 --trusted-ca-file"
            ),
        ),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => (
            ErrorKind::InvalidArgument,
            format!(
                "the TLS handshake failed ({tls}): does the endpoint serve TLS (etcd's \
                 --cert-file)? An etcd without TLS needs an etcd:// url"
            ),
        ),
        other => (
            ErrorKind::InvalidArgument,
            format!("the TLS handshake failed: {other}"),
        ),
    }
}

/// The TLS alerts a server sends when it does not accept the client's certificate (or got
/// none).
fn refuses_our_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription::*;
    matches!(
        alert,
        BadCertificate
            | UnsupportedCertificate
            | CertificateRevoked
            | CertificateExpired
            | CertificateUnknown
            | UnknownCA
            | CertificateRequired
            | AccessDenied
    )
}

/// The rustls error in `e`'s cause, looking inside the I/O errors that carry it (an
/// `io::Error`'s `source()` skips the error it wraps).
fn tls_cause(e: &etcd_client::Error) -> Option<&rustls::Error> {
    // etcd-client's error gives no source; a status carries the transport failure as its own.
    let mut next: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        other => Some(other),
    };
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(inner);
        }
        next = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// A temporary directory with a CA, a client certificate it signed and that certificate's
    /// key, and a second, unrelated key.
    struct Files {
        dir: PathBuf,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Files {
        fn new(what: &str) -> Files {
            let dir = std::env::temp_dir().join(format!(
                "sync-etcd-tls-{what}-{}",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let client_key = rcgen::KeyPair::generate().unwrap();
            let client = rcgen::CertificateParams::new(vec!["client".to_string()])
                .unwrap()
                .signed_by(&client_key, &issuer)
                .unwrap();
            let other_key = rcgen::KeyPair::generate().unwrap();
            let files = Files { dir };
            files.write("ca.pem", &ca.pem());
            files.write("client.pem", &client.pem());
            files.write("client-key.pem", &client_key.serialize_pem());
            files.write("other-key.pem", &other_key.serialize_pem());
            files.write("empty.pem", "");
            files.write("garbage.pem", "this is not PEM\n\x01\x02\n");
            files.write(
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            );
            files.write("unterminated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
            files
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.dir.join(name), text).unwrap();
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).to_string_lossy().into_owned()
        }

        fn config(&self, ca: &str, cert: Option<&str>, key: Option<&str>) -> Config {
            let mut config = Config::default()
                .with_endpoints(["https://127.0.0.1:2379"])
                .with_tls(true)
                .with_ca_file(self.path(ca));
            config.cert_file = cert.map(|c| self.path(c));
            config.key_file = key.map(|k| self.path(k));
            config
        }
    }

    /// The InvalidArgument the config gets, which must name `names` and say `says`.
    fn refused(config: &Config, names: &[&str], says: &str) {
        let err = match options(config) {
            Ok(_) => panic!("{config:?} was accepted"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        let message = err.to_string();
        for name in names {
            let base = Path::new(name).file_name().unwrap().to_string_lossy();
            assert!(message.contains(&*base), "{message} does not name {name}");
        }
        assert!(message.contains(says), "{message} does not say {says:?}");
    }

    #[test]
    fn good_files_are_accepted() {
        let f = Files::new("good");
        options(&f.config("ca.pem", None, None)).unwrap();
        options(&f.config("ca.pem", Some("client.pem"), Some("client-key.pem"))).unwrap();
    }

    #[test]
    fn bad_ca_files_are_named() {
        let f = Files::new("ca");
        let ca = |name| f.config(name, None, None);
        refused(&ca("missing.pem"), &["missing.pem"], "cannot be read");
        refused(&ca("empty.pem"), &["empty.pem"], "is empty");
        refused(&ca("garbage.pem"), &["garbage.pem"], "no PEM certificate");
        refused(
            &ca("unterminated.pem"),
            &["unterminated.pem"],
            "not valid PEM",
        );
        refused(&ca("broken.pem"), &["broken.pem"], "not usable as a CA");
        refused(
            &ca("client-key.pem"),
            &["client-key.pem"],
            "a private key, not a certificate",
        );
    }

    #[test]
    fn bad_client_files_are_named() {
        let f = Files::new("client");
        let pair = |cert, key| f.config("ca.pem", cert, key);
        refused(
            &pair(Some("client.pem"), None),
            &["client.pem"],
            "without key_file",
        );
        refused(
            &pair(None, Some("client-key.pem")),
            &["client-key.pem"],
            "without cert_file",
        );
        refused(
            &pair(Some("client.pem"), Some("other-key.pem")),
            &["client.pem", "other-key.pem"],
            "do not match",
        );
        refused(
            &pair(Some("client.pem"), Some("client.pem")),
            &["client.pem"],
            "a certificate, not a private key",
        );
        refused(
            &pair(Some("client.pem"), Some("garbage.pem")),
            &["garbage.pem"],
            "no PEM private key",
        );
        refused(
            &pair(Some("client.pem"), Some("empty.pem")),
            &["empty.pem"],
            "is empty",
        );
        refused(
            &pair(Some("client-key.pem"), Some("client-key.pem")),
            &["client-key.pem"],
            "a private key, not a certificate",
        );
        // A key section whose contents are not a key.
        f.write(
            "bad-key.pem",
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        );
        refused(
            &pair(Some("client.pem"), Some("bad-key.pem")),
            &["bad-key.pem"],
            "cannot be used",
        );
    }
}
