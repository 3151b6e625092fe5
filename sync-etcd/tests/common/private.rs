//! A private etcd (or a three-member cluster) for one test: free loopback ports, a temporary
//! data directory, killed and cleaned up on drop. The shared test etcd cannot have auth or TLS
//! switched on, nor lose its quorum.

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
    /// Whether the process has exited (it could not bind a port another process took).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_some())
    }

    /// Starts `etcd` named `name`, serving clients on `scheme://` (`http` or `https`), with
    /// `extra` flags. Does not wait for it: the caller knows how to ask it for health.
    pub fn start(name: &str, scheme: &str, extra: &[String]) -> Result<PrivateEtcd, String> {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string());
        // Both bound at once, so the two ports differ.
        let (client, peer) = (bind()?, bind()?);
        let port =
            |l: &std::net::TcpListener| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string());
        let (client_port, peer_port) = (port(&client)?, port(&peer)?);
        drop((client, peer));
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

/// Three etcd members on loopback, each its own process, for tests that stop members.
pub struct PrivateCluster {
    children: Vec<Child>,
    /// `http://127.0.0.1:<port>` of each member's client URL.
    pub endpoints: Vec<String>,
    dir: PathBuf,
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateCluster {
    /// Starts three members; does not wait for them (ask each for health).
    pub fn start() -> Result<PrivateCluster, String> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| e.to_string())
        };
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free()?, free()?)))
            .collect::<Result<_, String>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let dir = std::env::temp_dir().join(super::unique("cluster", "etcd"));
        let mut cluster = PrivateCluster {
            children: Vec::new(),
            endpoints: Vec::new(),
            dir,
        };
        for (i, (client, peer)) in ports.into_iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .arg(format!("--name=m{i}"))
                .arg("--data-dir")
                .arg(cluster.dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial.join(",")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting a private etcd member: {e}"))?;
            cluster.children.push(child);
            cluster.endpoints.push(client_url);
        }
        Ok(cluster)
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) member `n`.
    pub fn signal(&self, n: usize, stop: bool) -> Result<(), String> {
        let sig = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([sig, &self.children[n].id().to_string()])
            .status()
            .map_err(|e| format!("kill {sig}: {e}"))?;
        if !status.success() {
            return Err(format!("kill {sig} member {n}: {status}"));
        }
        Ok(())
    }
}
