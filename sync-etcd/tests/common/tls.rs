//! A private etcd serving TLS with the certificates of `sync_conformance::pki` (made by the
//! test), on free loopback ports with a temporary data dir, killed on drop.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

pub use sync_conformance::pki::Pki;

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
        // A port picked free may be taken by another test's etcd before this one binds it:
        // an etcd that exits at once is started again on other ports.
        for _ in 0..3 {
            let etcd = super::private::PrivateEtcd::start("tls", "https", &flags)?;
            match Self::wait_healthy(pki, etcd)? {
                Some(ready) => return Ok(ready),
                None => continue,
            }
        }
        Err("the private TLS etcd exited at start three times".into())
    }

    /// The etcd once healthy; None if it exited first.
    fn wait_healthy(
        pki: &Pki,
        mut etcd: super::private::PrivateEtcd,
    ) -> Result<Option<TlsEtcd>, String> {
        let authority = etcd.authority.clone();
        let client_url = format!("https://{authority}");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if etcd.exited() {
                return Ok(None);
            }
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
                return Ok(Some(TlsEtcd { etcd, authority }));
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
