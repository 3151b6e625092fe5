//! `cargo xtask drill consul [task|restart]`: the drills on Consul, with sessions of the
//! shortest TTL Consul takes (10 s), no lock-delay, and workers stopped for 12 s.
//!
//! - On the Consul agent (SYNC_TEST_CONSUL's, or one started and stopped here): the lock drill
//!   of [`super`], then the leader and task drills ([`super::task`]) when the backend reports
//!   those capabilities (sync-consul gains them over time: until then each is skipped, and
//!   says so).
//! - **restart**: the lock drill on a Consul server of its own — a real single server
//!   (`-server -bootstrap-expect=1`) with a data directory, so that it keeps its raft log —
//!   killed (-9) whenever a lock is held, down for up to 3 s, and started again on the same
//!   ports. Sessions and locks survive a restart (the new leader gives every session a fresh
//!   TTL), so nothing is excused: two holders overlapping is a violation, and every token (a
//!   raft index) must be above the ones granted before the restart.
//!
//! `task` runs only the task drill, `restart` only the restart drill.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{Run, Scope, build_worker, cluster::wait_until, drills_where_capable, on_service};
use crate::{Result, fmt_duration, install, probe, services::Service};

/// How long a consul server may take to answer a consistent read after a (re)start.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Runs the Consul drills of `scope`, `length` each.
pub(super) fn drill(length: Duration, scope: Scope) -> Result<ExitCode> {
    let worker = build_worker()?;
    let mut codes = Vec::new();
    if matches!(scope, Scope::All | Scope::Task) {
        let only_task = scope == Scope::Task;
        codes.push(on_service(Service::Consul, |url| {
            drills_where_capable(&worker, url, length, only_task)
        })?);
    }
    if matches!(scope, Scope::All | Scope::Restart) && !crate::interrupted() {
        codes.push(restart(&worker, length)?);
    }
    let failed = codes.into_iter().find(|c| *c != ExitCode::SUCCESS);
    Ok(failed.unwrap_or(ExitCode::SUCCESS))
}

/// The lock drill while the server is killed (-9) and restarted, keeping its data, whenever a
/// lock is held, every few seconds.
fn restart(worker: &Path, length: Duration) -> Result<ExitCode> {
    let mut server = Server::start()?;
    let mut run = Run::start(worker, "lock", &server.url(), length)?;
    let until = Instant::now() + length;
    let (mut longest, mut down_total, mut restarts) = (Duration::ZERO, Duration::ZERO, 0u32);
    let mut held_at_kill = 0;
    while !crate::interrupted() {
        // A restart takes a few seconds: none is begun that could not end within the drill.
        let nap = Duration::from_millis(2000 + run.dice.below(2000));
        if Instant::now() + nap + Duration::from_secs(4) > until {
            break;
        }
        thread::sleep(nap);
        run.reap_exited();
        // Aim at a hold: the restart should land while someone uses the lock.
        held_at_kill += usize::from(wait_until(Duration::from_secs(1), || run.held()));
        let since = Instant::now();
        server.kill();
        // Down for a while: sometimes past a renewal (every 5 s), rarely past a holder's
        // deadline (8 s after its last renewal was sent).
        thread::sleep(Duration::from_millis(run.dice.below(3000)));
        server.spawn()?;
        let took = since.elapsed();
        longest = longest.max(took);
        down_total += took;
        restarts += 1;
        run.restarted_keeping_data();
    }
    let mean = down_total / restarts.max(1);
    let rows = [
        (
            "restarts that landed while a lock was held",
            held_at_kill.to_string(),
        ),
        (
            "kill to a consistent read: mean / longest",
            format!("{} / {}", fmt_duration(mean), fmt_duration(longest)),
        ),
    ];
    Ok(run.finish("lock, Consul server restart", &rows))
}

/// A Consul server of the drill's own: one voter that bootstraps itself, its raft log and
/// snapshots in a data directory under the target directory, on free loopback ports.
struct Server {
    consul: PathBuf,
    /// http, server (raft RPC), serf LAN, serf WAN.
    ports: [u16; 4],
    dir: PathBuf,
    child: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    /// Starts it and waits until it answers a consistent read.
    fn start() -> Result<Server> {
        let dir = crate::target_dir()
            .join("drill")
            .join(format!("consul-restart-{}", super::now_us()));
        std::fs::create_dir_all(dir.join("data"))?;
        let mut server = Server {
            consul: install::consul()?,
            ports: free_ports()?,
            dir,
            child: None,
        };
        let started = Instant::now();
        server.spawn()?;
        say!(
            "drill restart: a Consul server of its own at {} (data in {}), up in {}",
            server.url(),
            server.dir.display(),
            fmt_duration(started.elapsed())
        );
        Ok(server)
    }

    fn url(&self) -> String {
        format!("consul://127.0.0.1:{}", self.ports[0])
    }

    fn command(&self) -> Command {
        let [http, server, serf_lan, serf_wan] = self.ports;
        let mut c = Command::new(&self.consul);
        c.args(["agent", "-server", "-bootstrap-expect=1", "-log-level=info"])
            .arg("-node=sync-drill-restart")
            .arg(format!("-data-dir={}", self.dir.join("data").display()))
            .args(["-bind=127.0.0.1", "-client=127.0.0.1"])
            .arg(format!("-http-port={http}"))
            .arg(format!("-server-port={server}"))
            .arg(format!("-serf-lan-port={serf_lan}"))
            .arg(format!("-serf-wan-port={serf_wan}"))
            .args(["-dns-port=-1", "-grpc-port=-1"])
            .args(["-hcl", "disable_update_check = true"])
            // Production timing (Consul's default, 5, is for small dev machines): an election
            // takes about a second, not five.
            .args(["-hcl", "performance { raft_multiplier = 1 }"])
            .env("CHECKPOINT_DISABLE", "1");
        c
    }

    /// Starts it (again: same ports, same data) and waits until it answers a consistent read,
    /// which needs an elected leader that has applied its log.
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("consul.log"))?;
        let mut command = self.command();
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(command.spawn()?);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports[0]));
        // Polled often: the time it answers bounds how long the holders went unrenewed.
        let until = Instant::now() + READY_WITHIN;
        while !answers(addr) {
            if Instant::now() > until {
                bail!(
                    "drill restart: consul did not answer a consistent read within {} (log in {})",
                    fmt_duration(READY_WITHIN),
                    self.dir.join("consul.log").display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills it (-9) and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the agent at `addr` answers a consistent read: 404 for a key nobody writes.
fn answers(addr: SocketAddr) -> bool {
    let path = "/v1/kv/sync-drill-ready?consistent";
    matches!(
        probe::http(addr, "GET", path, b"", Duration::from_millis(500)),
        Ok((404 | 200, _))
    )
}

/// Four distinct free loopback ports, TCP and UDP (serf gossips on both), held together while
/// they are picked so that none comes up twice.
fn free_ports() -> Result<[u16; 4]> {
    let mut held = Vec::new();
    let mut ports = [0u16; 4];
    let mut i = 0;
    while i < ports.len() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        // Serf needs the UDP port too; try another when it is taken.
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) else {
            continue;
        };
        held.push((tcp, udp));
        ports[i] = port;
        i += 1;
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports().unwrap();
        for (i, p) in ports.iter().enumerate() {
            assert!(!ports[i + 1..].contains(p), "{ports:?}");
        }
    }

    #[test]
    fn the_server_keeps_its_data_and_listens_on_its_own_ports() {
        let server = Server {
            consul: PathBuf::from("consul"),
            ports: [1, 2, 3, 4],
            dir: PathBuf::from("/d"),
            child: None,
        };
        let args: Vec<String> = server
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "-server",
            "-bootstrap-expect=1",
            "-data-dir=/d/data",
            "-http-port=1",
            "-server-port=2",
            "-serf-lan-port=3",
            "-serf-wan-port=4",
            "-dns-port=-1",
            "-grpc-port=-1",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        assert!(!args.iter().any(|a| a == "-dev"), "{args:?}");
        std::mem::forget(server);
    }
}
