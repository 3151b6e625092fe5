//! Certificates made by the test (rcgen) and a private etcd serving TLS with them, on free
//! loopback ports with a temporary data dir, killed on drop.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// A temporary directory holding:
///
/// - `ca.pem` (and its key, unused), the CA that signed `server.pem` / `server-key.pem` (names
///   `localhost` and `127.0.0.1`) and `client.pem` / `client-key.pem`;
/// - `other-ca.pem` and `other-client.pem` / `other-client-key.pem`, a CA etcd does not trust
///   and a client certificate it signed;
/// - `other-key.pem`, a key of no certificate.
pub struct Pki {
    pub dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new() -> Result<Pki, String> {
        let dir = std::env::temp_dir().join(super::unique("tls", "pki"));
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

    pub fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join(name), text)
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `path(name)` for a URL query (`/` escaped).
    pub fn query(&self, name: &str) -> String {
        self.path(name).replace('%', "%25").replace('/', "%2F")
    }
}

/// A private etcd serving TLS with `server.pem`: with `mutual`, it also requires a client
/// certificate signed by `ca.pem` (`--client-cert-auth --trusted-ca-file`).
pub struct TlsEtcd {
    etcd: super::private::PrivateEtcd,
    /// `127.0.0.1:<port>` of its client URL.
    pub authority: String,
}

impl TlsEtcd {
    /// Starts it and waits (blocking, up to 15 s) until `etcdctl endpoint health` over TLS
    /// says it is healthy.
    pub fn start(pki: &Pki, mutual: bool) -> Result<TlsEtcd, String> {
        let mut flags = vec![
            "--cert-file".to_string(),
            pki.path("server.pem"),
            "--key-file".to_string(),
            pki.path("server-key.pem"),
        ];
        if mutual {
            flags.extend([
                "--client-cert-auth".to_string(),
                "--trusted-ca-file".to_string(),
                pki.path("ca.pem"),
            ]);
        }
        let etcd = super::private::PrivateEtcd::start("tls", "https", &flags)?;
        let authority = etcd.authority.clone();
        let client_url = format!("https://{authority}");
        let etcd = TlsEtcd { etcd, authority };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut etcdctl = Command::new("etcdctl");
            for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETCDCTL_")) {
                etcdctl.env_remove(k);
            }
            let healthy = etcdctl
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={client_url}"))
                .arg(format!("--cacert={}", pki.path("ca.pem")))
                .arg(format!("--cert={}", pki.path("client.pem")))
                .arg(format!("--key={}", pki.path("client-key.pem")))
                .args(["endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                return Err("the private TLS etcd did not become healthy within 15s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcds://<authority>/<namespace>?ca_file=<pki's ca.pem>&ttl=2s` followed by `extra`
    /// (`&key=value…`).
    pub fn url(&self, pki: &Pki, namespace: &str, extra: &str) -> String {
        format!(
            "etcds://{}/{namespace}?ca_file={}&ttl=2s{extra}",
            self.authority,
            pki.query("ca.pem")
        )
    }
}
