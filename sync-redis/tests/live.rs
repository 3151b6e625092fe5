//! Live behaviour beyond the conformance suite: what an acquire costs in commands, one renewal
//! call per tick for many locks, pushed handoff, loss and fencing across a Redis restart that
//! lost the data, ACL credentials, loss when another client deletes the key, and a job's
//! finish sent again through a short outage.
//!
//! Needs `SYNC_TEST_REDIS` (and `SYNC_TEST_REDIS_ACL` for the ACL case) and `redis-server` on
//! the PATH for the cases that run a private server (command counts and restarts must not be
//! disturbed by other tests).

mod common;

use std::{future::Future, path::PathBuf, pin::Pin, process::Child, time::Duration};

use common::{TestFn, TestResult, err};
use redis::AsyncCommands;
use sync_core::{Backend, ErrorKind, LockOptions};
use sync_redis::{Client, Config};
use tokio::time::Instant;

fn unique(what: &str) -> String {
    common::unique(&format!("live-{what}"))
}

async fn connect(url: &str, ns: &str, ttl: Duration) -> Result<Client, String> {
    let config = Config::from_url(url)
        .map_err(err)?
        .with_namespace(ns)
        .with_ttl(ttl);
    Client::connect(config).await.map_err(err)
}

/// A Redis server of one test's own, without persistence, on a free port; killed on drop.
struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    async fn start() -> Result<PrivateRedis, String> {
        let port = common::free_port()?;
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).map_err(err)?;
        let mut redis = PrivateRedis {
            child: None,
            port,
            dir,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> TestResult {
        let child = common::redis_server(&["--port", &self.port.to_string()], &self.dir)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = self.raw().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("the private redis-server did not answer PING within 20s".into())
    }

    /// Kills the server (its data is lost: no persistence) and starts it again on its port.
    async fn restart(&mut self) -> TestResult {
        self.kill();
        self.spawn().await
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn raw(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let client = redis::Client::open(self.url()).map_err(err)?;
        client.get_multiplexed_async_connection().await.map_err(err)
    }

    /// Commands this test's clients sent since the last `CONFIG RESETSTAT` (refused ones too),
    /// per name. Redis
    /// counts the commands a script runs as well; those (what our scripts call) are left out,
    /// as are the test's own INFO and CONFIG.
    async fn calls(&self) -> Result<Vec<(String, u64)>, String> {
        const IN_SCRIPTS: [&str; 7] = ["get", "set", "time", "publish", "del", "pexpire", "pttl"];
        let mut c = self.raw().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                // Run, and refused before running (NOPERM, say).
                let calls: u64 = (rest.split(','))
                    .filter_map(|f| f.split_once('='))
                    .filter(|(k, _)| matches!(*k, "calls" | "rejected_calls"))
                    .filter_map(|(_, v)| v.parse::<u64>().ok())
                    .sum();
                let ours = !IN_SCRIPTS.contains(&name)
                    && !matches!(
                        name,
                        "info" | "config|resetstat" | "hello" | "client|setinfo" | "ping"
                    );
                ours.then(|| (name.to_string(), calls))
            })
            .collect())
    }

    /// `ACL SETUSER name rules…`.
    async fn set_user(&self, name: &str, rules: &[&str]) -> TestResult {
        let mut c = self.raw().await?;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(name)
            .arg(rules)
            .query_async::<()>(&mut c)
            .await
            .map_err(err)
    }

    async fn reset_stats(&self) -> TestResult {
        let mut c = self.raw().await?;
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut c)
            .await
            .map_err(err)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn total(calls: &[(String, u64)]) -> u64 {
    calls.iter().map(|(_, n)| n).sum()
}

/// An uncontended acquire and release cost two commands in all: one script each.
async fn uncontended_acquire_release_is_two_commands(_: String) -> TestResult {
    let redis = PrivateRedis::start().await?;
    let client = connect(&redis.url(), &unique("two"), Duration::from_secs(30)).await?;
    let lock = client.lock().map_err(err)?;
    // Loads the scripts once (EVALSHA, then EVAL on NOSCRIPT).
    lock.acquire("warm", LockOptions::new())
        .await
        .map_err(err)?
        .release()
        .await
        .map_err(err)?;
    for round in 0..3 {
        redis.reset_stats().await?;
        let guard = lock
            .acquire("orders", LockOptions::new())
            .await
            .map_err(err)?;
        guard.release().await.map_err(err)?;
        let calls = redis.calls().await?;
        if total(&calls) != 2 {
            return Err(format!(
                "round {round}: an uncontended acquire+release sent {calls:?}, not two commands"
            ));
        }
    }
    Ok(())
}

/// 10 000 locks held through one client are renewed in one script call per tick.
async fn ten_thousand_locks_one_renewal_call_per_tick(_: String) -> TestResult {
    const LOCKS: usize = 10_000;
    let redis = PrivateRedis::start().await?;
    let ttl = Duration::from_secs(3);
    let ns = unique("many");
    let client = connect(&redis.url(), &ns, ttl).await?;
    let lock = client.lock().map_err(err)?;
    let mut guards = Vec::with_capacity(LOCKS);
    for chunk in (0..LOCKS).collect::<Vec<_>>().chunks(500) {
        let grants = chunk
            .iter()
            .map(|i| lock.acquire_owned(format!("held-{i}")));
        for g in futures::future::join_all(grants).await {
            guards.push(g.map_err(err)?);
        }
    }
    // The first renewal loads its script on this fresh server (EVALSHA, SCRIPT LOAD,
    // EVALSHA); count from after it until two more calls.
    redis.reset_stats().await?;
    wait_for_calls(&redis, 3, 10 * ttl).await?;
    redis.reset_stats().await?;
    let started = Instant::now();
    let calls = wait_for_calls(&redis, 2, 10 * ttl).await?;
    let elapsed = started.elapsed();
    let tick = ttl / 3;
    if total(&calls) != 2 || elapsed < tick - Duration::from_millis(100) {
        return Err(format!(
            "in {elapsed:?} (tick {tick:?}) the renewals of {LOCKS} locks sent {calls:?}: \
             more than one call per tick"
        ));
    }
    let lost = guards.iter().filter(|g| g.is_lost()).count();
    if lost > 0 {
        return Err(format!("{lost} of {LOCKS} locks lost while renewed"));
    }
    let mut raw = redis.raw().await?;
    let sample = format!("{{{ns}:lock:held-{}}}", LOCKS - 1);
    let pttl: i64 = raw.pttl(&sample).await.map_err(err)?;
    if pttl <= 0 {
        return Err(format!("{sample} has PTTL {pttl}: not renewed"));
    }
    Ok(())
}

trait AcquireOwned {
    fn acquire_owned(
        &self,
        id: String,
    ) -> Pin<Box<dyn Future<Output = sync_core::Result<sync_core::LockGuard>> + Send + '_>>;
}

impl AcquireOwned for std::sync::Arc<dyn sync_core::Lock> {
    fn acquire_owned(
        &self,
        id: String,
    ) -> Pin<Box<dyn Future<Output = sync_core::Result<sync_core::LockGuard>> + Send + '_>> {
        Box::pin(async move { self.acquire(&id, LockOptions::new()).await })
    }
}

/// On a Redis Cluster, the held keys are renewed in one call per node per tick, not one per
/// slot: MONITOR on every node counts the renewal scripts naming this test's keys.
async fn cluster_renews_in_one_call_per_node_per_tick(_: String) -> TestResult {
    const LOCKS: usize = 1000;
    let url = std::env::var("SYNC_TEST_REDIS_CLUSTER")
        .map_err(|_| "SYNC_TEST_REDIS_CLUSTER is not set (cargo xtask test sets it)")?;
    let ns = unique("cluster-renew");
    let ttl = Duration::from_secs(3);
    let client = connect(&url, &ns, ttl).await?;
    let lock = client.lock().map_err(err)?;
    let grants = (0..LOCKS).map(|i| lock.acquire_owned(format!("held-{i}")));
    let guards: Vec<_> = futures::future::join_all(grants)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let nodes = Config::from_url(&url).map_err(err)?.endpoints;
    let mut counters = Vec::new();
    for node in &nodes {
        counters.push(count_renewals(node, &ns).await?);
    }
    let counts = || -> Vec<usize> {
        counters
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
            .collect()
    };
    // Past the first rounds (which may load the script on a node), count two more per node.
    wait_until(10 * ttl, || counts().iter().all(|n| *n >= 2)).await?;
    let base = counts();
    let started = Instant::now();
    wait_until(10 * ttl, || {
        counts().iter().zip(&base).all(|(n, b)| n - b >= 2)
    })
    .await?;
    let elapsed = started.elapsed();
    let made: Vec<usize> = counts().iter().zip(&base).map(|(n, b)| n - b).collect();
    let tick = ttl / 3;
    if elapsed < tick - Duration::from_millis(100) || made.iter().any(|n| *n > 3) {
        return Err(format!(
            "in {elapsed:?} (tick {tick:?}) the {} nodes saw {made:?} renewal calls for \
             {LOCKS} locks: more than one per node per tick",
            nodes.len()
        ));
    }
    if guards.iter().any(|g| g.is_lost()) {
        return Err("a lock was lost while renewed".into());
    }
    Ok(())
}

/// Counts, from MONITOR on `node`, the script calls clients sent naming keys of `ns` (the
/// commands scripts run inside show as `[0 lua]` and are not counted).
async fn count_renewals(
    node: &str,
    ns: &str,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicUsize>, String> {
    use futures::StreamExt;
    let client = redis::Client::open(format!("redis://{node}")).map_err(err)?;
    let monitor = client.get_async_monitor().await.map_err(err)?;
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, ns) = (count.clone(), ns.to_string());
    tokio::spawn(async move {
        let mut lines = monitor.into_on_message::<String>();
        while let Some(line) = lines.next().await {
            let call = line.contains("] \"EVALSHA\"") || line.contains("] \"evalsha\"");
            if call && !line.contains("lua]") && line.contains(&ns) {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    Ok(count)
}

async fn wait_until(within: Duration, mut done: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("not done within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits (bounded) until the clients sent at least `n` commands; the calls by then.
async fn wait_for_calls(
    redis: &PrivateRedis,
    n: u64,
    within: Duration,
) -> Result<Vec<(String, u64)>, String> {
    let deadline = Instant::now() + within;
    loop {
        let calls = redis.calls().await?;
        if total(&calls) >= n {
            return Ok(calls);
        }
        if Instant::now() > deadline {
            return Err(format!("fewer than {n} calls within {within:?}: {calls:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A waiter is woken by the release's message, not by its poll: with a 30 s poll and a 30 s
/// TTL, the median handoff over five rounds is well under 100 ms.
async fn handoff_is_pushed_not_polled(url: String) -> TestResult {
    let ns = unique("handoff");
    let config = |url: &str| {
        Config::from_url(url).map(|c| {
            c.with_namespace(ns.clone())
                .with_ttl(Duration::from_secs(30))
                .with_poll(Duration::from_secs(30))
        })
    };
    let holder = Client::connect(config(&url).map_err(err)?)
        .await
        .map_err(err)?;
    let waiter = Client::connect(config(&url).map_err(err)?)
        .await
        .map_err(err)?;
    let mut handoffs = Vec::new();
    for _ in 0..5 {
        let guard = holder
            .lock()
            .map_err(err)?
            .acquire("baton", LockOptions::new())
            .await
            .map_err(err)?;
        let lock = waiter.lock().map_err(err)?;
        let waiting = tokio::spawn(async move {
            let g = lock.acquire("baton", LockOptions::new()).await;
            (Instant::now(), g)
        });
        // Let the waiter subscribe and find the lock held.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let released = Instant::now();
        guard.release().await.map_err(err)?;
        let (granted, g) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .map_err(|_| "the waiter was not granted within 10s of the release")?
            .map_err(err)?;
        g.map_err(err)?.release().await.map_err(err)?;
        handoffs.push(granted - released);
    }
    handoffs.sort();
    let median = handoffs[2];
    eprintln!("handoffs: {handoffs:?}");
    if median >= Duration::from_millis(100) {
        return Err(format!(
            "median handoff {median:?} with a 30s poll: {handoffs:?}"
        ));
    }
    Ok(())
}

/// Redis restarted without persistence while a lock is held: the holder's `lost()` fires, and
/// the next grant's fencing token is larger than the lost one.
async fn restart_without_persistence_fires_lost_and_fences(_: String) -> TestResult {
    let mut redis = PrivateRedis::start().await?;
    let ttl = Duration::from_secs(2);
    let ns = unique("restart");
    let holder = connect(&redis.url(), &ns, ttl).await?;
    let guard = holder
        .lock()
        .map_err(err)?
        .acquire("fenced", LockOptions::new())
        .await
        .map_err(err)?;
    let old = guard.fencing_token();
    redis.restart().await?;
    tokio::time::timeout(2 * ttl, guard.lost())
        .await
        .map_err(|_| format!("the holder saw no loss within {:?} of the restart", 2 * ttl))?;
    let other = connect(&redis.url(), &ns, ttl).await?;
    let next = other
        .lock()
        .map_err(err)?
        .acquire("fenced", LockOptions::new().with_wait(2 * ttl))
        .await
        .map_err(err)?;
    if next.fencing_token() <= old {
        return Err(format!(
            "token {} after the restart is not above the lost token {old}",
            next.fencing_token()
        ));
    }
    Ok(())
}

/// The ACL user's credentials work; a wrong password is Unauthorized at connect.
async fn acl_credentials(_: String) -> TestResult {
    let Ok(url) = std::env::var("SYNC_TEST_REDIS_ACL") else {
        return Err("SYNC_TEST_REDIS_ACL is not set (cargo xtask test sets it)".into());
    };
    let ns = unique("acl");
    let client = connect(&url, &ns, Duration::from_secs(5)).await?;
    client
        .lock()
        .map_err(err)?
        .acquire("acl", LockOptions::new())
        .await
        .map_err(err)?
        .release()
        .await
        .map_err(err)?;
    let mut config = Config::from_url(&url).map_err(err)?.with_namespace(ns);
    let user = config.user.clone().unwrap_or_else(|| "default".into());
    config = config.with_auth(user, "not-the-password");
    match Client::connect(config).await {
        Err(e) if e.kind() == ErrorKind::Unauthorized => Ok(()),
        Err(e) => Err(format!("a wrong password gave {:?}: {e}", e.kind())),
        Ok(_) => Err("a wrong password connected".into()),
    }
}

/// A release whose answer is lost (it applied; the proxy dropped the answer) is resolved by a
/// resend that finds the key gone: the holder hears Ok, not LockLost, and the key is gone.
async fn release_whose_answer_is_lost_is_ok(url: String) -> TestResult {
    use sync_conformance::proxy::{Fault, FaultProxy};
    let server = sync_conformance::proxy::hosts(&url).ok_or("no server address")?;
    let proxy = FaultProxy::start_all(&server).await.map_err(err)?;
    let ns = unique("lost-release");
    let config = Config::from_url(&sync_conformance::proxy::through_all(&url, proxy.addrs()))
        .map_err(err)?
        .with_namespace(ns.clone())
        .with_ttl(Duration::from_secs(10))
        .with_request_timeout(Duration::from_secs(1));
    let client = Client::connect(config).await.map_err(err)?;
    let guard = client
        .lock()
        .map_err(err)?
        .acquire("ambiguous", LockOptions::new())
        .await
        .map_err(err)?;
    // The channel is an argument of the release script only.
    proxy.hold_next(format!("{{{ns}:lock:ambiguous}}:changed"));
    let releasing = tokio::spawn(guard.release());
    tokio::time::timeout(Duration::from_secs(5), proxy.held())
        .await
        .map_err(|_| "the release never reached the proxy")?;
    proxy.set(Fault::DropResponses);
    proxy.release();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Fault::Pass);
    let released = tokio::time::timeout(Duration::from_secs(10), releasing)
        .await
        .map_err(|_| "the release did not finish")?
        .map_err(err)?;
    released.map_err(|e| format!("a release whose answer was lost: {e}"))?;
    let raw = redis::Client::open(url.as_str()).map_err(err)?;
    let mut raw = raw.get_multiplexed_async_connection().await.map_err(err)?;
    let exists: bool = raw
        .exists(format!("{{{ns}:lock:ambiguous}}"))
        .await
        .map_err(err)?;
    if exists {
        return Err("the key is still there after the release".into());
    }
    Ok(())
}

/// Another client deleting the lock key is seen by the holder at its next renewal.
async fn lost_when_key_deleted(url: String) -> TestResult {
    let ttl = Duration::from_secs(3);
    let ns = unique("deleted");
    let client = connect(&url, &ns, ttl).await?;
    let guard = client
        .lock()
        .map_err(err)?
        .acquire("doomed", LockOptions::new())
        .await
        .map_err(err)?;
    let raw = redis::Client::open(url.as_str()).map_err(err)?;
    let mut raw = raw.get_multiplexed_async_connection().await.map_err(err)?;
    let _: () = raw
        .del(format!("{{{ns}:lock:doomed}}"))
        .await
        .map_err(err)?;
    tokio::time::timeout(ttl, guard.lost())
        .await
        .map_err(|_| "no loss within one TTL of the key's deletion")?;
    Ok(())
}

/// A follower whose ACL user loses its rights on the keys is told once, and its stream ends:
/// it does not read the group again and again.
async fn follow_ends_when_its_reads_are_refused(_: String) -> TestResult {
    let redis = PrivateRedis::start().await?;
    redis
        .set_user("follower", &["on", ">pw", "~*", "&*", "+@all"])
        .await?;
    let ns = unique("follow-refused");
    let authority = redis.url().replace("redis://", "redis://follower:pw@");
    let follower = connect(&authority, &ns, Duration::from_secs(5)).await?;
    let candidate = connect(&redis.url(), &ns, Duration::from_secs(5)).await?;
    let mut follow = sync_conformance::leader::follow_empty(&follower, "g").await?;
    let elected = (candidate.leader("g").map_err(err)?)
        .elect("a", sync_core::ElectOptions::new())
        .await
        .map_err(err)?;
    // The fault: the user keeps its channels and loses every key.
    redis.set_user("follower", &["resetkeys"]).await?;
    // A change the follower must read, with no rights left to read it.
    elected.resign().await.map_err(err)?;
    let refusal =
        sync_conformance::leader::refused_then_ends(&mut follow, Duration::from_secs(15)).await?;
    println!("seen: {refusal}");
    redis.reset_stats().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = redis.calls().await?;
    if total(&calls) > 0 {
        return Err(format!("commands in 1s after the stream ended: {calls:?}"));
    }
    drop((follow, follower, candidate));
    Ok(())
}

/// A worker whose ACL user loses its keys asks ever less often (not twice a second per loop
/// for as long as it runs), and takes jobs again once the rights are back.
async fn worker_without_rights_backs_off(_: String) -> TestResult {
    use std::sync::Arc;
    use sync_core::{HandlerError, Job, JobContext, WorkerOptions};

    let redis = PrivateRedis::start().await?;
    redis
        .set_user("worker", &["on", ">pw", "~*", "&*", "+@all"])
        .await?;
    let ns = unique("worker-refused");
    let as_worker = redis.url().replace("redis://", "redis://worker:pw@");
    let worker_client = connect(&as_worker, &ns, Duration::from_secs(5)).await?;
    let submitter = connect(&redis.url(), &ns, Duration::from_secs(5)).await?;
    let handler = Arc::new(|job: JobContext| async move { Ok::<_, HandlerError>(job.payload) });
    let worker = (worker_client.task().map_err(err)?)
        .work("refused", handler, WorkerOptions::new())
        .await
        .map_err(err)?;
    // The fault: the user keeps its channels and loses every key.
    redis.set_user("worker", &["resetkeys"]).await?;
    // A job for the worker to claim, with no rights left to claim it.
    let task = submitter.task().map_err(err)?;
    let id = task.submit(Job::new("refused", "x")).await.map_err(err)?;
    // Every loop has met the refusal by now, and waits 4 s or more between two asks: at most
    // one each in the next 3 s, where a loop that does not back off asks 6 times.
    tokio::time::sleep(Duration::from_secs(8)).await;
    redis.reset_stats().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = redis.calls().await?;
    if total(&calls) > 3 {
        return Err(format!("commands in 3s, 8s into the refusal: {calls:?}"));
    }
    println!("commands in 3s, 8s into the refusal: {calls:?}");
    redis.set_user("worker", &["~*"]).await?;
    sync_conformance::task::succeeded_within(&*task, &id, Duration::from_secs(20)).await?;
    worker.stop().await;
    drop((worker_client, submitter));
    Ok(())
}

/// A finish that meets Redis away (the worker's connections cut and refused for 1.5 s, well
/// within the claim's safe time) is sent again once Redis is back: the job succeeds after its
/// one attempt, rather than its claim expiring and the job running a second time.
async fn finish_during_an_outage_is_recorded_once(url: String) -> TestResult {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    use sync_conformance::proxy::{Fault, FaultProxy};
    use sync_core::{HandlerError, Job, JobContext, WorkerOptions};

    let server = sync_conformance::proxy::hosts(&url).ok_or("no server address")?;
    let proxy = Arc::new(FaultProxy::start_all(&server).await.map_err(err)?);
    let ns = unique("finish-outage");
    let config = Config::from_url(&sync_conformance::proxy::through_all(&url, proxy.addrs()))
        .map_err(err)?
        .with_namespace(ns.clone())
        .with_ttl(Duration::from_secs(10))
        .with_request_timeout(Duration::from_secs(1));
    let worker_client = Client::connect(config).await.map_err(err)?;
    let submitter = connect(&url, &ns, Duration::from_secs(10)).await?;
    let runs = Arc::new(AtomicU32::new(0));
    let ran = Arc::new(tokio::sync::watch::channel(false).0);
    let handler = {
        let (proxy, runs, ran) = (proxy.clone(), runs.clone(), ran.clone());
        Arc::new(move |_job: JobContext| {
            let (proxy, runs, ran) = (proxy.clone(), runs.clone(), ran.clone());
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The fault: Redis is away when the attempt ends.
                    proxy.set(Fault::Reset);
                    ran.send_replace(true);
                }
                Ok::<_, HandlerError>(b"done".to_vec())
            }
        })
    };
    let worker = (worker_client.task().map_err(err)?)
        .work("outage", handler, WorkerOptions::new())
        .await
        .map_err(err)?;
    let task = submitter.task().map_err(err)?;
    let id = task.submit(Job::new("outage", "x")).await.map_err(err)?;
    let mut ran = ran.subscribe();
    tokio::time::timeout(Duration::from_secs(10), ran.wait_for(|r| *r))
        .await
        .map_err(|_| "the job did not start within 10s")?
        .map_err(err)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set(Fault::Pass);
    sync_conformance::task::succeeded_within(&*task, &id, Duration::from_secs(6)).await?;
    let status = task.status(&id).await.map_err(err)?;
    let runs = runs.load(Ordering::SeqCst);
    worker.stop().await;
    if status.attempts != 1 || runs != 1 {
        return Err(format!(
            "{runs} runs, {} attempts recorded: the finish was not sent again",
            status.attempts
        ));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: Vec<(&'static str, TestFn)> = vec![
        ("live::uncontended_acquire_release_is_two_commands", |u| {
            Box::pin(uncontended_acquire_release_is_two_commands(u))
        }),
        ("live::ten_thousand_locks_one_renewal_call_per_tick", |u| {
            Box::pin(ten_thousand_locks_one_renewal_call_per_tick(u))
        }),
        ("live::handoff_is_pushed_not_polled", |u| {
            Box::pin(handoff_is_pushed_not_polled(u))
        }),
        (
            "live::restart_without_persistence_fires_lost_and_fences",
            |u| Box::pin(restart_without_persistence_fires_lost_and_fences(u)),
        ),
        ("live::acl_credentials", |u| Box::pin(acl_credentials(u))),
        ("live::cluster_renews_in_one_call_per_node_per_tick", |u| {
            Box::pin(cluster_renews_in_one_call_per_node_per_tick(u))
        }),
        ("live::release_whose_answer_is_lost_is_ok", |u| {
            Box::pin(release_whose_answer_is_lost_is_ok(u))
        }),
        ("live::lost_when_key_deleted", |u| {
            Box::pin(lost_when_key_deleted(u))
        }),
        ("live::follow_ends_when_its_reads_are_refused", |u| {
            Box::pin(follow_ends_when_its_reads_are_refused(u))
        }),
        ("live::worker_without_rights_backs_off", |u| {
            Box::pin(worker_without_rights_backs_off(u))
        }),
        ("live::finish_during_an_outage_is_recorded_once", |u| {
            Box::pin(finish_during_an_outage_is_recorded_once(u))
        }),
    ];
    common::run(&tests)
}
