//! Redis: sync-redis against the redis crate doing the minimal requests ("raw": `SET key token
//! NX PX ttl` and an owner-checked release script) and rslock ("peer": Redlock on one server).
//! Commands per op are Redis's own count (`INFO commandstats` deltas) around each
//! implementation's part of a round; nothing else should talk to this Redis meanwhile.

use std::{
    collections::BTreeMap,
    process::ExitCode,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use redis::aio::MultiplexedConnection as Conn;
use rslock::LockManager;
use serde::{Deserialize, Serialize};
use sync_bench::report::{Better, Report, Row, Sample};
use sync_core::{Backend, Lock, LockOptions};

use crate::{
    Ctx, OrMsg, Result,
    etcd::{latency, push, rss_mb},
    scenario, unique,
};

const B: &str = "redis";
/// Commands a round sets off in the background land within this, so they are counted.
const SETTLE: Duration = Duration::from_millis(100);
/// The lock TTL of every implementation (sync-redis's default).
const TTL: Duration = Duration::from_secs(10);
/// How long raw's waiters sleep between `SET NX` tries.
const RAW_RETRY: Duration = Duration::from_millis(10);
/// In flight at once where a scenario acquires many keys.
const IN_FLIGHT: usize = 64;

/// Redis counts the commands a script runs (`redis.call`) in `INFO commandstats` as well as the
/// EVALSHA that ran it, so they are left out: what remains is what the client sent. sync-redis
/// sends none of these itself (only EVALSHA, SUBSCRIBE, PING…), so all of them go.
const SYNC_INNER: &[&str] = &["get", "set", "del", "pexpire", "pttl", "time", "publish"];
/// raw's and rslock's release scripts run GET and DEL; their SET (and raw's PEXPIRE) are sent
/// by the client, so those stay.
const RELEASE_INNER: &[&str] = &["get", "del"];

/// raw's release: delete the key only if it still holds our token.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) \
         else return 0 end",
    )
});

pub(crate) async fn run(ctx: Ctx, url: &str, report: &mut Report) {
    let r = match Redis::new(ctx, url).await {
        Ok(r) => r,
        Err(e) => return crate::skip(report, B, "*", &e),
    };
    scenario(report, B, "uncontended acquire+release", r.uncontended()).await;
    scenario(report, B, "handoff", r.handoff()).await;
    scenario(report, B, "64 tasks on one id", r.one_id()).await;
    scenario(report, B, "one client holding N locks", r.held()).await;
}

/// Top-level commands Redis served, by name, from two `INFO commandstats`.
#[derive(Debug, Default, PartialEq)]
struct Cmds(BTreeMap<String, u64>);

/// `cmdstat_<name>:calls=<n>,…` lines into name → calls.
fn parse_commandstats(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

impl Cmds {
    /// What was sent between `before` and `after`, without `inner` (see [`SYNC_INNER`]) and
    /// the counting's own INFO.
    fn since(
        after: &BTreeMap<String, u64>,
        before: &BTreeMap<String, u64>,
        inner: &[&str],
    ) -> Cmds {
        let delta = after
            .iter()
            .filter(|(name, _)| name.as_str() != "info" && !inner.contains(&name.as_str()))
            .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        Cmds(delta)
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    fn count(&self, names: &[&str]) -> u64 {
        names.iter().filter_map(|n| self.0.get(*n)).sum()
    }

    /// `evalsha 2.00, subscribe 0.010` per op.
    fn per_op(&self, ops: usize) -> String {
        let ops = ops.max(1) as f64;
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, n)| format!("{name} {:.3}", *n as f64 / ops))
            .collect();
        format!("cmds/op {}", parts.join(", "))
    }
}

fn with_cmds(mut s: Sample, cmds: &Cmds, ops: usize) -> Sample {
    s.requests_per_op = Some(cmds.total() as f64 / ops.max(1) as f64);
    s.detail = cmds.per_op(ops);
    s
}

fn fairness(counts: &[usize]) -> String {
    let min = counts.iter().min().unwrap_or(&0);
    let max = counts.iter().max().unwrap_or(&0);
    format!("per-task ops min/max {min}/{max}")
}

struct Redis {
    url: String,
    /// The server as the redis crate takes it (db and credentials from the config).
    raw_url: String,
    ctx: Ctx,
    admin: Conn,
}

impl Redis {
    async fn new(ctx: Ctx, url: &str) -> Result<Redis> {
        let config = sync_redis::Config::from_url(url).or_msg("SYNC_TEST_REDIS")?;
        if config.cluster || config.tls {
            return Err("the bench takes a plain redis:// server".into());
        }
        let auth = match (&config.user, &config.password) {
            (Some(u), Some(p)) => format!("{u}:{p}@"),
            (None, Some(p)) => format!(":{p}@"),
            _ => String::new(),
        };
        let raw_url = format!("redis://{auth}{}/{}", config.endpoints[0], config.db);
        let admin = connect(&raw_url).await?;
        let r = Redis {
            url: url.to_string(),
            raw_url,
            ctx,
            admin,
        };
        r.commandstats().await?;
        Ok(r)
    }

    fn pick<T>(&self, quick: T, full: T) -> T {
        self.ctx.pick(quick, full)
    }

    async fn lib(&self, ns: &str) -> Result<sync_redis::Client> {
        lib_client(&self.url, ns, TTL).await
    }

    async fn lock(&self, ns: &str) -> Result<(sync_redis::Client, Arc<dyn Lock>)> {
        let c = self.lib(ns).await?;
        let lock = c.lock().or_msg("lock handle")?;
        Ok((c, lock))
    }

    /// An rslock manager on its own connection, with its defaults (3 tries per `lock`, up to
    /// 200 ms apart).
    fn rslock(&self) -> Result<LockManager> {
        let client = redis::Client::open(self.raw_url.as_str()).or_msg("rslock client")?;
        Ok(LockManager::from_clients(vec![client]))
    }

    async fn commandstats(&self) -> Result<BTreeMap<String, u64>> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.admin.clone())
            .await
            .or_msg("INFO commandstats")?;
        Ok(parse_commandstats(&info))
    }

    /// Runs `f`, and counts the commands Redis served meanwhile (plus [`SETTLE`]).
    async fn counted<T>(
        &self,
        inner: &[&str],
        f: impl Future<Output = Result<T>>,
    ) -> Result<(T, Cmds)> {
        let before = self.commandstats().await?;
        let out = f.await?;
        tokio::time::sleep(SETTLE).await;
        let after = self.commandstats().await?;
        Ok((out, Cmds::since(&after, &before, inner)))
    }

    /// Runs `op` `n` times one after the other; what each call returned (its latency) and the
    /// commands counted.
    async fn clocked(
        &self,
        n: usize,
        inner: &[&str],
        mut op: impl AsyncFnMut() -> Result<Duration>,
    ) -> Result<(Vec<Duration>, Cmds)> {
        self.counted(inner, async {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                lat.push(op().await?);
            }
            Ok(lat)
        })
        .await
    }

    /// Deletes every key of a run (they all hold the run's random namespace).
    async fn cleanup(&self, ns: &str) {
        let mut conn = self.admin.clone();
        let keys: Vec<String> =
            match redis::AsyncCommands::scan_match(&mut conn, format!("*{ns}*")).await {
                Ok(iter) => iter.filter_map(|k| async { k.ok() }).collect().await,
                Err(_) => return,
            };
        for chunk in keys.chunks(1000) {
            let _: redis::RedisResult<i64> =
                redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
        }
    }

    async fn uncontended(&self) -> Result<Vec<Row>> {
        let n = self.pick(100, 1000);
        let ns = unique("bench");
        let (lib, lock) = self.lock(&ns).await?;
        let mut raw = connect(&self.raw_url).await?;
        let peer = self.rslock()?;
        let (key, res) = (format!("{ns}:raw:one"), format!("{ns}:peer:one"));
        let mut row = Row::new(B, "uncontended acquire+release", "p50 µs", Better::Lower)
            .with_raw("SET NX PX + release script")
            .with_peer("rslock acquire + release")
            .with_note(format!("{n} sequential ops per round, one id"));
        // Warm-up: connections open and scripts loaded before anything is counted.
        sync_cycle(&lock, "one").await?;
        raw_cycle(&mut raw, &key).await?;
        peer_cycle(&peer, &res).await?;
        for _ in 0..self.ctx.rounds {
            let (lat, cmds) = self
                .clocked(n, SYNC_INNER, async || {
                    timed(sync_cycle(&lock, "one")).await
                })
                .await?;
            row.sync.rounds.push(with_cmds(latency(&lat), &cmds, n));
            let (lat, cmds) = self
                .clocked(n, RELEASE_INNER, async || {
                    timed(raw_cycle(&mut raw, &key)).await
                })
                .await?;
            push(&mut row.raw, with_cmds(latency(&lat), &cmds, n));
            let (lat, cmds) = self
                .clocked(n, RELEASE_INNER, async || {
                    timed(peer_cycle(&peer, &res)).await
                })
                .await?;
            push(&mut row.peer, with_cmds(latency(&lat), &cmds, n));
        }
        lib.close().await.or_msg("close")?;
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn handoff(&self) -> Result<Vec<Row>> {
        let n = self.pick(10, 40);
        let wait = Duration::from_millis(30);
        let ns = unique("bench");
        let ((a, la), (b, lb)) = (self.lock(&ns).await?, self.lock(&ns).await?);
        let (mut ra, rb) = (connect(&self.raw_url).await?, connect(&self.raw_url).await?);
        let (pa, pb) = (self.rslock()?, self.rslock()?);
        let (key, res) = (format!("{ns}:raw:handoff"), format!("{ns}:peer:handoff"));
        let mut row = Row::new(
            B,
            "handoff (release → waiter granted)",
            "p50 µs",
            Better::Lower,
        )
        .with_raw(format!("SET NX retried every {} ms", RAW_RETRY.as_millis()))
        .with_peer("rslock acquire, default retries (3 tries 0–200 ms apart, repeated)")
        .with_note(format!(
            "{n} handoffs per round between two clients; the waiter waits {} ms first; \
                 cmds/op counts the whole cycle",
            wait.as_millis()
        ));
        peer_cycle(&pb, &res).await?;
        for _ in 0..self.ctx.rounds {
            let (lat, cmds) = self
                .clocked(n, SYNC_INNER, async || {
                    let g = la
                        .acquire("handoff", LockOptions::new())
                        .await
                        .or_msg("acquire")?;
                    let lb = lb.clone();
                    let waiter = tokio::spawn(async move { sync_cycle(&lb, "handoff").await });
                    handoff_after(wait, g.release(), waiter).await
                })
                .await?;
            row.sync.rounds.push(with_cmds(latency(&lat), &cmds, n));

            let (lat, cmds) = self
                .clocked(n, RELEASE_INNER, async || {
                    let token = token();
                    raw_acquire(&mut ra, &key, &token).await?;
                    let (mut rb, key2) = (rb.clone(), key.clone());
                    let waiter = tokio::spawn(async move { raw_cycle(&mut rb, &key2).await });
                    handoff_after(wait, raw_release(&mut ra, &key, &token), waiter).await
                })
                .await?;
            push(&mut row.raw, with_cmds(latency(&lat), &cmds, n));

            let (lat, cmds) = self
                .clocked(n, RELEASE_INNER, async || {
                    let g = pa
                        .acquire(res.as_str(), TTL)
                        .await
                        .or_msg("rslock acquire")?;
                    let (pb, res2) = (pb.clone(), res.clone());
                    let waiter = tokio::spawn(async move { peer_cycle(&pb, &res2).await });
                    handoff_after(
                        wait,
                        async {
                            g.release().await;
                            Ok::<_, String>(())
                        },
                        waiter,
                    )
                    .await
                })
                .await?;
            push(&mut row.peer, with_cmds(latency(&lat), &cmds, n));
        }
        a.close().await.or_msg("close")?;
        b.close().await.or_msg("close")?;
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn one_id(&self) -> Result<Vec<Row>> {
        const TASKS: usize = 64;
        const CLIENTS: usize = 4;
        let window = self.pick(Duration::from_millis(1000), Duration::from_secs(5));
        let ns = unique("bench");
        let mut libs = Vec::new();
        let mut raws = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..CLIENTS {
            libs.push(self.lock(&ns).await?);
            raws.push(connect(&self.raw_url).await?);
            peers.push(self.rslock()?);
        }
        let (key, res) = (format!("{ns}:raw:one"), format!("{ns}:peer:one"));
        for p in &peers {
            peer_cycle(p, &res).await?;
        }
        let mut row = Row::new(
            B,
            format!("{TASKS} tasks on one id, {CLIENTS} clients"),
            "ops/s",
            Better::Higher,
        )
        .with_raw(format!(
            "SET NX retried every {} ms + release script",
            RAW_RETRY.as_millis()
        ))
        .with_peer("rslock acquire + release, default retries")
        .with_note(format!(
            "{TASKS} tasks spread over {CLIENTS} clients (connections), {:.1} s per round",
            window.as_secs_f64()
        ));
        for _ in 0..self.ctx.rounds {
            let (s, cmds) = self
                .counted(
                    SYNC_INNER,
                    contend(TASKS, window, |i| {
                        let lock = libs[i % CLIENTS].1.clone();
                        async move { sync_cycle(&lock, "one").await }
                    }),
                )
                .await?;
            row.sync.rounds.push(throughput(s, &cmds));
            let (s, cmds) = self
                .counted(
                    RELEASE_INNER,
                    contend(TASKS, window, |i| {
                        let (mut conn, key) = (raws[i % CLIENTS].clone(), key.clone());
                        async move { raw_cycle(&mut conn, &key).await }
                    }),
                )
                .await?;
            push(&mut row.raw, throughput(s, &cmds));
            let (s, cmds) = self
                .counted(
                    RELEASE_INNER,
                    contend(TASKS, window, |i| {
                        let (peer, res) = (peers[i % CLIENTS].clone(), res.clone());
                        async move { peer_cycle(&peer, &res).await }
                    }),
                )
                .await?;
            push(&mut row.peer, throughput(s, &cmds));
        }
        for (c, _) in libs {
            let _ = c.close().await;
        }
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn held(&self) -> Result<Vec<Row>> {
        let n = 10_000;
        let ttl = Duration::from_secs(3);
        let hold = self.pick(Duration::from_secs(3), Duration::from_secs(9));
        let exe = std::env::current_exe().or_msg("the bench's own path")?;
        let scenario = format!("one client holding {n} locks");
        let note = format!(
            "each in a child process (RSS = its VmRSS while holding); TTL {} s, renewed every \
             TTL/3; renewal commands (sync: evalsha/eval; raw: pexpire) counted over {} s of \
             holding; raw: one PEXPIRE per key per tick, pipelined, not owner-checked",
            ttl.as_secs(),
            hold.as_secs()
        );
        let mut rows = ["renewal commands/s", "client RSS MB"].map(|metric| {
            Row::new(B, scenario.clone(), metric, Better::Lower)
                .with_raw("SET NX PX per key, PEXPIRE per key per tick")
                .with_note(note.clone())
        });
        for _ in 0..self.ctx.rounds {
            for which in ["sync", "raw"] {
                let ns = unique("bench");
                let out = tokio::process::Command::new(&exe)
                    .args(["--child", "redis-held", which, &n.to_string()])
                    .arg(hold.as_millis().to_string())
                    .arg(ttl.as_millis().to_string())
                    .arg(&self.url)
                    .arg(&ns)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await
                    .or_msg("running the child")?;
                self.cleanup(&ns).await;
                if !out.status.success() {
                    return Err(format!("child {which} failed ({})", out.status));
                }
                let held: Held =
                    serde_json::from_slice(&out.stdout).or_msg("the child's answer")?;
                let mut renew = Sample::value(held.renewals_per_s);
                renew.detail = format!(
                    "all cmds/s {:.1}; acquired all in {:.2} s",
                    held.cmds_per_s, held.acquire_s
                );
                for (row, s) in rows.iter_mut().zip([renew, Sample::value(held.rss_mb)]) {
                    match which {
                        "sync" => row.sync.rounds.push(s),
                        _ => push(&mut row.raw, s),
                    }
                }
            }
        }
        Ok(rows.into_iter().map(Row::finish).collect())
    }
}

async fn connect(url: &str) -> Result<Conn> {
    redis::Client::open(url)
        .or_msg("redis url")?
        .get_multiplexed_async_connection()
        .await
        .or_msg("connecting to redis")
}

async fn lib_client(url: &str, ns: &str, ttl: Duration) -> Result<sync_redis::Client> {
    let config = sync_redis::Config::from_url(url)
        .or_msg("redis url")?
        .with_namespace(ns)
        .with_ttl(ttl);
    sync_redis::Client::connect(config)
        .await
        .or_msg("connecting sync-redis")
}

fn token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub(crate) async fn timed<T>(f: impl Future<Output = Result<T>>) -> Result<Duration> {
    let t = Instant::now();
    f.await?;
    Ok(t.elapsed())
}

/// Waits `wait` (the waiter is queued by then), releases, and returns how long after the
/// release the waiter was granted.
pub(crate) async fn handoff_after<E: std::fmt::Display>(
    wait: Duration,
    release: impl Future<Output = std::result::Result<(), E>>,
    waiter: tokio::task::JoinHandle<Result<Instant>>,
) -> Result<Duration> {
    tokio::time::sleep(wait).await;
    let t0 = Instant::now();
    release.await.or_msg("release")?;
    let t1 = waiter.await.or_msg("waiter")??;
    Ok(t1.saturating_duration_since(t0))
}

/// Acquires and releases at once; when it was granted.
pub(crate) async fn sync_cycle(lock: &Arc<dyn Lock>, id: &str) -> Result<Instant> {
    let g = lock
        .acquire(id, LockOptions::new())
        .await
        .or_msg("acquire")?;
    let granted = Instant::now();
    g.release().await.or_msg("release")?;
    Ok(granted)
}

/// Acquires and releases at once; when it was granted.
async fn peer_cycle(peer: &LockManager, res: &str) -> Result<Instant> {
    let g = peer.acquire(res, TTL).await.or_msg("rslock acquire")?;
    let granted = Instant::now();
    g.release().await;
    Ok(granted)
}

/// Acquires with the raw loop and releases at once; when it was granted.
async fn raw_cycle(conn: &mut Conn, key: &str) -> Result<Instant> {
    let token = token();
    raw_acquire(conn, key, &token).await?;
    let granted = Instant::now();
    raw_release(conn, key, &token).await?;
    Ok(granted)
}

/// `SET key token NX PX ttl` until it is granted, [`RAW_RETRY`] apart.
async fn raw_acquire(conn: &mut Conn, key: &str, token: &str) -> Result<()> {
    while !raw_try(conn, key, token).await? {
        tokio::time::sleep(RAW_RETRY).await;
    }
    Ok(())
}

async fn raw_try(conn: &mut Conn, key: &str, token: &str) -> Result<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(token)
        .arg("NX")
        .arg("PX")
        .arg(TTL.as_millis() as u64)
        .query_async(conn)
        .await
        .or_msg("SET NX")?;
    Ok(set.is_some())
}

async fn raw_release(conn: &mut Conn, key: &str, token: &str) -> Result<()> {
    let deleted: i64 = RELEASE
        .key(key)
        .arg(token)
        .invoke_async(conn)
        .await
        .or_msg("release script")?;
    if deleted != 1 {
        return Err(format!("raw: {key} was not ours at release"));
    }
    Ok(())
}

/// Ops done by `tasks` tasks looping `op(i)` until `window` is over, per task, and how long
/// they took (the last ones finish their op after the window).
pub(crate) struct Contended {
    pub(crate) counts: Vec<usize>,
    pub(crate) took: Duration,
}

async fn contend<F, Fut, T>(tasks: usize, window: Duration, op: F) -> Result<Contended>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let deadline = started + window;
    let counts = stream::iter(0..tasks)
        .map(|i| {
            let op = &op;
            async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    op(i).await?;
                    n += 1;
                }
                Ok::<_, String>(n)
            }
        })
        .buffer_unordered(tasks)
        .try_collect()
        .await?;
    Ok(Contended {
        counts,
        took: started.elapsed(),
    })
}

fn throughput(c: Contended, cmds: &Cmds) -> Sample {
    let total: usize = c.counts.iter().sum();
    let mut s = with_cmds(
        Sample::value(total as f64 / c.took.as_secs_f64()),
        cmds,
        total,
    );
    s.detail = format!("{}; {}", s.detail, fairness(&c.counts));
    s
}

/// What a `redis-held` child measured.
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    acquire_s: f64,
    rss_mb: f64,
    renewals_per_s: f64,
    cmds_per_s: f64,
}

/// `--child redis-held <sync|raw> N HOLD_MS TTL_MS URL NAMESPACE`: one client acquires N locks
/// (64 in flight), holds them for HOLD_MS, and prints a [`Held`] as JSON. In a process of its
/// own so that its RSS is its own.
pub(crate) fn child_main(args: &[String]) -> ExitCode {
    let run = || -> Result<Held> {
        let [which, n, hold, ttl, url, ns] = args else {
            return Err(format!("bad child arguments {args:?}"));
        };
        let n: usize = n.parse().or_msg("N")?;
        let hold = Duration::from_millis(hold.parse().or_msg("HOLD_MS")?);
        let ttl = Duration::from_millis(ttl.parse().or_msg("TTL_MS")?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .or_msg("tokio")?;
        runtime.block_on(held_child(which, n, hold, ttl, url, ns))
    };
    match run() {
        Ok(held) => {
            println!("{}", serde_json::to_string(&held).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sync-bench redis child: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn held_child(
    which: &str,
    n: usize,
    hold: Duration,
    ttl: Duration,
    url: &str,
    ns: &str,
) -> Result<Held> {
    let r = Redis::new(
        Ctx {
            quick: true,
            rounds: 1,
        },
        url,
    )
    .await?;
    let started = Instant::now();
    let (keep, inner, renewal): (Box<dyn std::any::Any + Send>, _, &[&str]) = match which {
        "sync" => (
            Box::new(sync_hold(url, ns, n, ttl).await?),
            SYNC_INNER,
            &["evalsha", "eval"],
        ),
        "raw" => (
            Box::new(raw_hold(&r.raw_url, ns, n, ttl).await?),
            RELEASE_INNER,
            &["pexpire"],
        ),
        other => return Err(format!("unknown variant {other}")),
    };
    let acquire_s = started.elapsed().as_secs_f64();
    let ((), cmds) = r
        .counted(inner, async {
            tokio::time::sleep(hold).await;
            Ok(())
        })
        .await?;
    let rss_mb = rss_mb();
    drop(keep);
    let secs = (hold + SETTLE).as_secs_f64();
    Ok(Held {
        acquire_s,
        rss_mb,
        renewals_per_s: cmds.count(renewal) as f64 / secs,
        cmds_per_s: cmds.total() as f64 / secs,
    })
}

/// sync-redis holding `n` locks: its client and the guards.
async fn sync_hold(
    url: &str,
    ns: &str,
    n: usize,
    ttl: Duration,
) -> Result<(sync_redis::Client, Vec<sync_core::LockGuard>)> {
    let c = lib_client(url, ns, ttl).await?;
    let lock = c.lock().or_msg("lock handle")?;
    let guards = stream::iter(0..n)
        .map(|i| {
            let lock = lock.clone();
            async move { lock.acquire(&format!("held-{i}"), LockOptions::new()).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect()
        .await
        .or_msg("acquire")?;
    Ok((c, guards))
}

/// The raw client holding `n` keys: `SET NX PX` each, then every TTL/3 one `PEXPIRE` per key
/// in one pipeline, until the returned task is dropped.
async fn raw_hold(raw_url: &str, ns: &str, n: usize, ttl: Duration) -> Result<AbortOnDrop> {
    let conn = connect(raw_url).await?;
    let keys: Vec<String> = (0..n).map(|i| format!("{ns}:raw:held-{i}")).collect();
    stream::iter(&keys)
        .map(|key| {
            let mut conn = conn.clone();
            async move {
                match raw_try(&mut conn, key, &token()).await? {
                    true => Ok(()),
                    false => Err(format!("{key} was taken")),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    let ttl_ms = ttl.as_millis() as u64;
    let task = tokio::spawn(async move {
        let mut conn = conn;
        loop {
            tokio::time::sleep(ttl / 3).await;
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("PEXPIRE").arg(key).arg(ttl_ms).ignore();
            }
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                eprintln!("sync-bench redis child: PEXPIRE: {e}");
            }
        }
    });
    Ok(AbortOnDrop(task))
}

pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_deltas_leave_out_script_inner_commands_and_info() {
        let before = parse_commandstats(
            "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5\r\ncmdstat_get:calls=3,usec=1\r\n",
        );
        let after = parse_commandstats(
            "cmdstat_evalsha:calls=14,usec=9\r\ncmdstat_get:calls=7,usec=1\r\n\
             cmdstat_script|load:calls=1,usec=2\r\ncmdstat_info:calls=9,usec=2\r\n",
        );
        let cmds = Cmds::since(&after, &before, SYNC_INNER);
        assert_eq!(cmds.total(), 5);
        assert_eq!(cmds.count(&["evalsha"]), 4);
        assert_eq!(cmds.per_op(2), "cmds/op evalsha 2.000, script|load 0.500");
    }
}
