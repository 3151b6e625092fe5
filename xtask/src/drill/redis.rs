//! `cargo xtask drill redis [cluster|task|restart]`: the drills on Redis.
//!
//! - On the Redis server (SYNC_TEST_REDIS's, or one started and stopped here) and on the Redis
//!   Cluster (SYNC_TEST_REDIS_CLUSTER's, likewise): the lock and leader drills of [`super`],
//!   and the task drill ([`super::task`]) when the backend reports the Task capability.
//! - **restart**: the lock drill on a redis-server of its own (a free port, no persistence),
//!   killed (-9) whenever a lock is held and started again on the same port with the same
//!   arguments, every few seconds. A restart erases every lock and fence key, and the holder
//!   learns of it only at its next renewal: another worker may be granted the lock before
//!   that, and the old holder may still write. Such overlaps are counted, not violations; what
//!   must hold is that tokens never go back (sync-redis's clock floor), so that a fenced
//!   resource rejects the old holder's write once a newer token was written, and that the old
//!   holder stops writing within one TTL of the restart.
//!
//! `cluster` runs only the Redis Cluster drills, `task` only the task drills, `restart` only
//! the restart drill.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{
    Run, Scope, build_worker,
    cluster::{free_port, wait_until},
    drills_where_capable, now_us, on_service,
};
use crate::{Result, probe, services::Service};

/// Runs the Redis drills of `scope`, `length` each.
pub(super) fn drill(length: Duration, scope: Scope) -> Result<ExitCode> {
    let worker = build_worker()?;
    let only_task = matches!(scope, Scope::Task);
    let mut codes = Vec::new();
    if matches!(scope, Scope::All | Scope::Task) {
        codes.push(on_service(Service::Redis, |url| {
            drills_where_capable(&worker, url, length, only_task)
        })?);
    }
    if matches!(scope, Scope::All | Scope::Cluster | Scope::Task) && !crate::interrupted() {
        codes.push(on_service(Service::RedisCluster, |url| {
            drills_where_capable(&worker, url, length, only_task)
        })?);
    }
    if matches!(scope, Scope::All | Scope::Restart) && !crate::interrupted() {
        codes.push(restart(&worker, length)?);
    }
    let failed = codes.into_iter().find(|c| *c != ExitCode::SUCCESS);
    Ok(failed.unwrap_or(ExitCode::SUCCESS))
}

/// The lock drill while the server is killed (-9) and restarted, losing every key, whenever a
/// lock is held, every few seconds.
fn restart(worker: &Path, length: Duration) -> Result<ExitCode> {
    let mut server = Server::start()?;
    let mut run = Run::start(worker, "lock", &server.url(), length)?;
    let until = Instant::now() + length;
    let mut longest = Duration::ZERO;
    while Instant::now() < until && !crate::interrupted() {
        thread::sleep(Duration::from_millis(2000 + run.dice.below(2000)));
        // Aim at a hold: the restart should erase a lock someone is using.
        wait_until(Duration::from_secs(1), || run.held());
        let (killed, since) = (now_us(), Instant::now());
        server.kill();
        server.spawn()?;
        longest = longest.max(since.elapsed());
        run.restarted(killed, now_us());
    }
    let rows = [(
        "longest restart (kill to PING)",
        format!("{:.2} s", longest.as_secs_f64()),
    )];
    Ok(run.finish("lock, Redis restart", &rows))
}

/// A redis-server of the drill's own, without persistence: a kill loses every key.
struct Server {
    port: u16,
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
    /// Starts it on a free port and waits until it answers.
    fn start() -> Result<Server> {
        let dir = std::env::temp_dir().join(format!("sync-drill-redis-{}", now_us()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Server {
            port: free_port()?,
            dir,
            child: None,
        };
        server.spawn()?;
        say!(
            "drill restart: a redis-server of its own at {}",
            server.url()
        );
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again: same port, same arguments, as `services up` runs Redis: no
    /// persistence) and waits until it answers PING.
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let mut command = crate::services::redis_server(self.port, &self.dir)?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(command.spawn()?);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + Duration::from_secs(10);
        // Polled often: the time it answers bounds which grants the restart erased.
        while !pings(addr) {
            if Instant::now() > until {
                bail!(
                    "drill restart: redis-server did not answer within 10 s (log in {})",
                    self.dir.display()
                );
            }
            thread::sleep(Duration::from_millis(5));
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

fn pings(addr: SocketAddr) -> bool {
    probe::Redis::connect(addr, Duration::from_millis(200))
        .and_then(|mut redis| redis.cmd(&[b"PING"]))
        .is_ok()
}
