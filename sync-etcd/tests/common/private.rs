//! A private etcd for one test: free loopback ports, a temporary data directory, killed and
//! cleaned up on drop. The shared test etcd cannot have auth or TLS switched on.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

pub struct PrivateEtcd {
    child: Child,
    /// `127.0.0.1:<port>` of its client URL.
    pub authority: String,
    dir: PathBuf,
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateEtcd {
    /// Starts `etcd` named `name`, serving clients on `scheme://` (`http` or `https`), with
    /// `extra` flags. Does not wait for it: the caller knows how to ask it for health.
    pub fn start(name: &str, scheme: &str, extra: &[String]) -> Result<PrivateEtcd, String> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| e.to_string())
        };
        let (client_port, peer_port) = (free()?, free()?);
        let dir = std::env::temp_dir().join(super::unique(name, "etcd"));
        let authority = format!("127.0.0.1:{client_port}");
        let client_url = format!("{scheme}://{authority}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("{name}={peer_url}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting a private etcd (is `etcd` on PATH?): {e}"))?;
        Ok(PrivateEtcd {
            child,
            authority,
            dir,
        })
    }
}
