//! The drills on a three-node etcd cluster of the drill's own (free loopback ports, a
//! temporary data directory, gone afterwards):
//!
//! - **leader kill**: the lock drill's workers run while the cluster's leader is killed (-9)
//!   over and over and restarted a moment later;
//! - **restart**: the same, with every member killed at once and restarted (an etcd restart);
//! - **frozen endpoint**: one worker holds a lock and makes calls without pause while each
//!   member in turn is stopped (SIGSTOP) for longer than the request timeout. No call may take
//!   more than twice the request timeout, and the held lock must stay held: its lease is
//!   renewed through the live members.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};

use super::{Dice, Run, now_us};
use crate::{Result, fmt_duration, install, probe};

/// How long a frozen member stays stopped: past the request timeout, twice.
const FREEZE_FOR: Duration = Duration::from_secs(5);
/// The request timeout of the frozen-endpoint run's client: longer than an election (a second
/// or two here), as it should be.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Its lease TTL: the default.
const CALLS_TTL: Duration = Duration::from_secs(10);

/// One of the cluster drills.
type ClusterRun<'a> = &'a dyn Fn(&mut Cluster) -> Result<ExitCode>;

/// Runs the three cluster drills, `length` each, on a cluster started for them.
pub(crate) fn drill(examples: &Path, length: Duration) -> Result<ExitCode> {
    let mut cluster = Cluster::start()?;
    say!("drill cluster: three etcd members at {}", cluster.url());
    let worker = examples.join("drill_worker");
    let mut code = ExitCode::SUCCESS;
    let runs: [(&str, ClusterRun); 3] = [
        ("leader kill", &|c| leader_kill(&worker, c, length)),
        ("restart", &|c| restart(&worker, c, length)),
        ("frozen endpoint", &|c| {
            frozen_endpoint(&examples.join("drill_calls"), c, length)
        }),
    ];
    for (name, run) in runs {
        if crate::interrupted() {
            break;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        if run(&mut cluster)? != ExitCode::SUCCESS {
            say!("drill cluster {name}: FAILED");
            code = ExitCode::FAILURE;
        }
    }
    Ok(code)
}

/// The lock drill while the leader is killed (-9) and restarted again and again.
fn leader_kill(worker: &Path, cluster: &mut Cluster, length: Duration) -> Result<ExitCode> {
    let mut run = Run::start(worker, "lock", &cluster.url(), length)?;
    let until = Instant::now() + length;
    let (mut kills, mut longest_election) = (0, Duration::ZERO);
    while Instant::now() < until && !crate::interrupted() {
        thread::sleep(Duration::from_millis(2000 + run.dice.below(2000)));
        run.collect();
        let Some(leader) = cluster.leader() else {
            continue;
        };
        cluster.kill(leader);
        let killed = Instant::now();
        let elected = wait_until(Duration::from_secs(15), || cluster.leader().is_some());
        longest_election = longest_election.max(killed.elapsed());
        if !elected {
            say!("drill cluster: no leader within 15 s of killing member {leader}");
        }
        thread::sleep(Duration::from_millis(500));
        cluster.spawn(leader)?;
        kills += 1;
    }
    let rows = [
        ("leaders killed (-9) and restarted", kills.to_string()),
        (
            "longest election after a kill",
            format!("{:.2} s", longest_election.as_secs_f64()),
        ),
    ];
    Ok(run.finish("lock, leader kill", &rows))
}

/// The lock drill while the whole cluster is killed (-9) and restarted again and again.
fn restart(worker: &Path, cluster: &mut Cluster, length: Duration) -> Result<ExitCode> {
    let mut run = Run::start(worker, "lock", &cluster.url(), length)?;
    let until = Instant::now() + length;
    let mut restarts = 0;
    while Instant::now() < until && !crate::interrupted() {
        thread::sleep(Duration::from_millis(3000 + run.dice.below(2000)));
        run.collect();
        for member in 0..cluster.members.len() {
            cluster.kill(member);
        }
        thread::sleep(Duration::from_millis(500 + run.dice.below(1000)));
        for member in 0..cluster.members.len() {
            cluster.spawn(member)?;
        }
        restarts += 1;
    }
    let rows = [("cluster restarts (all members -9)", restarts.to_string())];
    Ok(run.finish("lock, restart", &rows))
}

/// One worker's calls while each member in turn is frozen; see the module docs.
fn frozen_endpoint(calls: &Path, cluster: &mut Cluster, length: Duration) -> Result<ExitCode> {
    let url = format!(
        "{}/drill-calls-{}?ttl={}s&request_timeout={}s",
        cluster.url(),
        now_us(),
        CALLS_TTL.as_secs(),
        REQUEST_TIMEOUT.as_secs()
    );
    // Long enough to freeze a follower and then the leader.
    let run_for = length.max(FREEZE_FOR * 2 + Duration::from_secs(6));
    say!(
        "drill frozen endpoint: one worker on {url} for {}, each member stopped for {} in turn",
        fmt_duration(run_for),
        fmt_duration(FREEZE_FOR)
    );
    let mut child = Command::new(calls)
        .args([url.as_str(), &run_for.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or("drill: no worker stdout")?;
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut frozen = Vec::new();
    let mut dice = Dice::seeded();
    thread::sleep(Duration::from_secs(1));
    // A follower, then the leader, and so on.
    while started.elapsed() + FREEZE_FOR < run_for && !crate::interrupted() {
        let leader = cluster.leader();
        let follower = (leader.unwrap_or(0) + 1 + dice.below(2) as usize) % 3;
        let (member, role) = match (frozen.len() % 2, leader) {
            (1, Some(leader)) => (leader, "leader"),
            _ => (follower, "follower"),
        };
        cluster.signal(member, signal::Signal::SIGSTOP);
        thread::sleep(FREEZE_FOR);
        cluster.signal(member, signal::Signal::SIGCONT);
        frozen.push(role);
        let _ = cluster.wait_healthy(Duration::from_secs(10));
        thread::sleep(Duration::from_secs(1));
    }
    let exited = wait_until(run_for + Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let verdict = judge_calls(lines.try_iter().collect());
    let rows = [
        ("members frozen, in turn", frozen.join(", ")),
        (
            "request timeout / bound (2x)",
            format!(
                "{} / {}",
                fmt_duration(REQUEST_TIMEOUT),
                fmt_duration(2 * REQUEST_TIMEOUT)
            ),
        ),
    ];
    Ok(verdict.print(&rows))
}

/// What the frozen-endpoint worker's lines say.
#[derive(Debug, Default)]
struct Calls {
    calls: u64,
    failed: u64,
    worst_ms: u64,
    held_lost: bool,
    violations: Vec<String>,
}

/// Judges the lines of `drill_calls`: a call slower than twice the request timeout, a lost
/// held lock, or no summary line at all is a violation.
fn judge_calls(lines: Vec<String>) -> Calls {
    let bound_ms = 2 * REQUEST_TIMEOUT.as_millis() as u64;
    // Scheduling on a busy two-core machine, never the timeouts themselves.
    let slack_ms = bound_ms / 10;
    let mut out = Calls::default();
    let mut done = false;
    for line in &lines {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("SLOW") => {
                let (Some(op), Some(Ok(ms))) = (parts.next(), parts.next().map(str::parse::<u64>))
                else {
                    continue;
                };
                if ms > bound_ms + slack_ms {
                    out.violations.push(format!(
                        "{op} took {ms} ms, over twice the request timeout: {line}"
                    ));
                }
            }
            Some("LOST") => out.violations.push(format!(
                "the held lock was lost with one member of three frozen: {line}"
            )),
            Some("DONE") => {
                let numbers: Vec<u64> = parts
                    .clone()
                    .take(3)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                if let [calls, failed, worst] = numbers[..] {
                    (out.calls, out.failed, out.worst_ms) = (calls, failed, worst);
                    out.held_lost = parts.nth(3) == Some("true");
                    done = true;
                }
            }
            _ => {}
        }
    }
    if !done {
        out.violations
            .push("the worker never finished (no DONE line)".to_string());
    }
    out
}

impl Calls {
    fn print(&self, extra: &[(&str, String)]) -> ExitCode {
        let rows = [
            ("calls", self.calls.to_string()),
            (
                "calls failed (a write's answer lost)",
                self.failed.to_string(),
            ),
            ("slowest call", format!("{} ms", self.worst_ms)),
            ("held lock lost", self.held_lost.to_string()),
        ];
        say!("drill frozen endpoint summary:");
        let rows = rows
            .iter()
            .cloned()
            .chain(extra.iter().map(|(k, v)| (*k, v.clone())))
            .chain([("violations", self.violations.len().to_string())]);
        for (what, n) in rows {
            eprintln!("  {what:<48} {n:>8}");
        }
        for v in &self.violations {
            say!("VIOLATION: {v}");
        }
        if self.violations.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// One member: its ports and, while it runs, its process.
struct Member {
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// Three etcd members on loopback.
pub(crate) struct Cluster {
    dir: PathBuf,
    members: Vec<Member>,
    etcd: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in 0..self.members.len() {
            self.kill(member);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// Starts three members and waits until each is healthy.
    fn start() -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("sync-drill-cluster-{}", now_us()));
        std::fs::create_dir_all(&dir)?;
        let mut members = Vec::new();
        for _ in 0..3 {
            members.push(Member {
                client: free_port()?,
                peer: free_port()?,
                child: None,
            });
        }
        let mut cluster = Cluster {
            dir,
            members,
            etcd: install::require("etcd")?,
        };
        for member in 0..3 {
            cluster.spawn(member)?;
        }
        cluster.wait_healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// `etcd://` with every member's client address.
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    /// Starts member `n` (again: its data directory, if any, is kept).
    fn spawn(&mut self, n: usize) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("m{i}=http://127.0.0.1:{}", m.peer))
            .collect();
        let member = &self.members[n];
        let client = format!("http://127.0.0.1:{}", member.client);
        let peer = format!("http://127.0.0.1:{}", member.peer);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{n}.log")))?;
        let mut command = Command::new(&self.etcd);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .arg(format!("--name=m{n}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.join(format!("m{n}")).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if std::env::consts::ARCH == "aarch64" {
            // etcd 3.4 refuses to start on arm64 without this.
            command.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        self.members[n].child = Some(command.spawn()?);
        Ok(())
    }

    /// Kills member `n` (-9) and reaps it.
    fn kill(&mut self, n: usize) {
        if let Some(mut child) = self.members[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, n: usize, sig: signal::Signal) {
        if let Some(child) = &self.members[n].child {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), sig);
        }
    }

    fn addr(&self, n: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.members[n].client))
    }

    fn healthy(&self, n: usize) -> bool {
        let answer = probe::http(self.addr(n), "GET", "/health", b"", Duration::from_secs(1));
        matches!(answer, Ok((200, body)) if String::from_utf8_lossy(&body).contains("\"health\":\"true\""))
    }

    fn wait_healthy(&self, within: Duration) -> Result<()> {
        let all = || (0..self.members.len()).all(|n| self.healthy(n));
        if !wait_until(within, all) {
            bail!(
                "drill cluster: not every member was healthy within {} (logs in {})",
                fmt_duration(within),
                self.dir.display()
            );
        }
        Ok(())
    }

    /// The member that says it leads (its `etcd_server_is_leader` metric is 1).
    fn leader(&self) -> Option<usize> {
        (0..self.members.len()).find(|&n| {
            self.members[n].child.is_some()
                && probe::http(self.addr(n), "GET", "/metrics", b"", Duration::from_secs(1))
                    .is_ok_and(|(_, body)| {
                        String::from_utf8_lossy(&body)
                            .lines()
                            .any(|l| l.trim() == "etcd_server_is_leader 1")
                    })
        })
    }
}

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `done` every 100 ms for up to `within`; whether it came true.
pub(super) fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &[&str]) -> Vec<String> {
        text.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn slow_calls_lost_locks_and_silence_are_violations() {
        let fine = judge_calls(lines(&["SLOW read 1005 ok", "DONE 900 1 1005 false"]));
        assert!(fine.violations.is_empty(), "{:?}", fine.violations);
        assert_eq!((fine.calls, fine.failed, fine.worst_ms), (900, 1, 1005));
        let over = 2 * REQUEST_TIMEOUT.as_millis() * 12 / 10;
        let slow = judge_calls(vec![
            format!("SLOW write {over} Unavailable x"),
            format!("DONE 9 1 {over} false"),
        ]);
        assert_eq!(slow.violations.len(), 1, "{:?}", slow.violations);
        let lost = judge_calls(lines(&["LOST 123 lease gone", "DONE 9 0 10 true"]));
        assert_eq!(lost.violations.len(), 1, "{:?}", lost.violations);
        assert!(lost.held_lost);
        assert_eq!(judge_calls(lines(&["SLOW read 5 ok"])).violations.len(), 1);
    }
}
