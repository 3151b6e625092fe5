//! Certificates for the TLS tests of network backends, made by the test (rcgen): a CA, a
//! server certificate for `localhost` and `127.0.0.1`, client certificates signed by it and by
//! another CA, in a temporary directory removed on drop.
//!
//! ```
//! let pki = sync_conformance::pki::Pki::new().unwrap();
//! assert!(std::path::Path::new(&pki.path("ca.pem")).exists());
//! ```

use std::path::PathBuf;

/// A temporary directory holding:
///
/// - `ca.pem` (and its key, unused), the CA that signed `server.pem` / `server-key.pem` (names
///   `localhost` and `127.0.0.1`) and `client.pem` / `client-key.pem`;
/// - `other-ca.pem` and `other-client.pem` / `other-client-key.pem`, a CA the servers do not trust
///   and a client certificate it signed;
/// - `other-key.pem`, a key of no certificate.
pub struct Pki {
    /// The directory (removed on drop).
    pub dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    /// Makes the certificates in a new temporary directory.
    pub fn new() -> Result<Pki, String> {
        let dir = std::env::temp_dir().join(format!("sync-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
        let pki = Pki { dir };
        pki.make()
            .map_err(|e| format!("making certificates: {e}"))?;
        Ok(pki)
    }

    fn make(&self) -> Result<(), Box<dyn std::error::Error>> {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
            KeyPair,
        };
        let make_ca = |name: &str| -> Result<(String, Issuer<'static, KeyPair>), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let pem = params.self_signed(&key)?.pem();
            Ok((pem, Issuer::new(params, key)))
        };
        let leaf = |names: &[&str],
                    usages: Vec<Eku>,
                    issuer: &Issuer<'static, KeyPair>|
         -> Result<(String, String), rcgen::Error> {
            let key = KeyPair::generate()?;
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, names[0]);
            params.extended_key_usages = usages;
            Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
        };
        let (ca_pem, ca) = make_ca("sync test CA")?;
        self.write("ca.pem", &ca_pem)?;
        // etcd also dials itself with its server certificate (its gateway), hence ClientAuth.
        let (cert, key) = leaf(
            &["localhost", "127.0.0.1"],
            vec![Eku::ServerAuth, Eku::ClientAuth],
            &ca,
        )?;
        self.write("server.pem", &cert)?;
        self.write("server-key.pem", &key)?;
        let (cert, key) = leaf(&["client"], vec![Eku::ClientAuth], &ca)?;
        self.write("client.pem", &cert)?;
        self.write("client-key.pem", &key)?;
        let (other_pem, other) = make_ca("another CA")?;
        self.write("other-ca.pem", &other_pem)?;
        let (cert, key) = leaf(&["client"], vec![Eku::ClientAuth], &other)?;
        self.write("other-client.pem", &cert)?;
        self.write("other-client-key.pem", &key)?;
        self.write("other-key.pem", &KeyPair::generate()?.serialize_pem())?;
        Ok(())
    }

    /// Writes a file of the test's own into the directory.
    pub fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join(name), text)
    }

    /// The path of one of the files.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `path(name)` for a URL query (`/` escaped).
    pub fn query(&self, name: &str) -> String {
        self.path(name).replace('%', "%25").replace('/', "%2F")
    }
}
