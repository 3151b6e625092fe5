//! etcd: sync-etcd against etcd-client doing the minimal requests ("raw") and etcd's own Lock
//! and Election RPCs ("peer"). Requests and watch streams per operation are etcd's own count
//! (`/metrics`), taken around each implementation's part of a round; nothing else should talk
//! to this etcd meanwhile.

use std::{
    collections::VecDeque,
    future::Future,
    process::ExitCode,
    sync::{
        Arc, Mutex as StdMutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{
    Client as Raw, Compare, CompareOp, EventType, GetOptions, LockOptions as RpcLockOptions,
    PutOptions, ResignOptions, Txn, TxnOp, WatchOptions,
};
use futures::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};
use sync_bench::{
    metrics::{self, Cost},
    report::{Better, Report, Row, Sample},
    stats::{micros, quantile},
};
use sync_core::{Backend, ElectOptions, Job, JobContext, LockOptions, WorkerOptions};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{Ctx, OrMsg, Result, scenario, unique};

const B: &str = "etcd";
/// Requests a round sets off in the background land within this, so they are counted.
const SETTLE: Duration = Duration::from_millis(150);

/// Where sync and its baselines are timed one request after another, a round alternates
/// between them this many times: a drift of etcd's speed during the round (an fsync stall, a
/// compaction) then falls on all of them alike rather than on whichever ran at that moment.
const SLICES: usize = 20;

/// The fewest operations in a slice.
const SLICE_MIN: usize = 10;

/// The TTL of the raw and peer sides' leases, in seconds: they send no keep-alives, so it
/// outlasts any scenario (each revokes its leases at the end).
const RAW_LEASE_TTL: i64 = 600;

/// How many slices [`slices`] cuts `n` operations into.
fn slice_count(n: usize) -> usize {
    SLICES.min(n / SLICE_MIN).max(1)
}

/// `n` operations as [`SLICES`] slices of at least [`SLICE_MIN`] (fewer when `n` is smaller:
/// each slice costs a [`SETTLE`]).
fn slices(n: usize) -> impl Iterator<Item = usize> {
    let k = slice_count(n);
    (0..k).map(move |i| n * (i + 1) / k - n * i / k)
}

/// How many slices a round of the 64-clients scenario alternates sync and the peer in.
const CLIENT_SLICES: usize = 5;

/// `run`'s per-client operation counts and how long it took.
async fn timed_run(
    run: impl Future<Output = Result<Vec<usize>>>,
) -> Result<(Vec<usize>, Duration)> {
    let started = Instant::now();
    let counts = run.await?;
    Ok((counts, started.elapsed()))
}

/// One side's operations, time and costs over the slices of a throughput round.
#[derive(Default)]
struct Throughput {
    /// Per client, over the slices.
    counts: Vec<usize>,
    took: Duration,
    cost: Cost,
}

impl Throughput {
    fn add(&mut self, ((counts, took), cost): ((Vec<usize>, Duration), Cost)) {
        self.counts.resize(self.counts.len().max(counts.len()), 0);
        for (total, n) in self.counts.iter_mut().zip(counts) {
            *total += n;
        }
        self.took += took;
        self.cost.add(&cost);
    }

    /// Operations per second, with the costs and per-client fairness.
    fn sample(&self) -> Sample {
        let total: usize = self.counts.iter().sum();
        let rate = total as f64 / self.took.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut s = with_cost(Sample::value(rate), &self.cost, total);
        s.detail = format!(
            "per-client ops min/max {}/{}",
            self.counts.iter().min().unwrap_or(&0),
            self.counts.iter().max().unwrap_or(&0)
        );
        s
    }
}

/// One side's latencies and costs over the slices of a round.
#[derive(Default)]
struct Side {
    lat: Vec<Duration>,
    cost: Cost,
}

impl Side {
    fn add(&mut self, (lat, cost): (Vec<Duration>, Cost)) {
        self.lat.extend(lat);
        self.cost.add(&cost);
    }

    fn sample(&self) -> Sample {
        with_cost(latency(&self.lat), &self.cost, self.lat.len())
    }
}
/// In flight at once where a scenario sets up or holds many keys.
const IN_FLIGHT: usize = 64;

pub(crate) async fn run(ctx: Ctx, url: &str, report: &mut Report) {
    let e = Etcd {
        url: url.to_string(),
        authority: metrics::authority(url),
        ctx,
    };
    if let Err(err) = metrics::fetch(&e.authority).await {
        crate::skip(
            report,
            B,
            "*",
            &format!("cannot read etcd's /metrics: {err}"),
        );
        return;
    }
    scenario(report, B, "uncontended acquire+release", e.uncontended()).await;
    scenario(report, B, "handoff", e.handoff()).await;
    scenario(report, B, "64 tasks × 64 ids", e.many_ids()).await;
    scenario(report, B, "64 clients on one id", e.one_id()).await;
    scenario(report, B, "one client holding N locks", e.held()).await;
    scenario(report, B, "elect/resign", e.elect()).await;
    scenario(report, B, "Map", e.map()).await;
    scenario(report, B, "Task jobs/s", e.task_throughput()).await;
    scenario(report, B, "Task submit→start", e.task_latency()).await;
    scenario(report, B, "Cron requests per tick", e.cron()).await;
}

struct Etcd {
    url: String,
    authority: String,
    ctx: Ctx,
}

pub(crate) fn latency(lat: &[Duration]) -> Sample {
    let us = micros(lat);
    Sample {
        value: quantile(&us, 0.5).unwrap_or(0.0),
        p99: quantile(&us, 0.99),
        ..Sample::default()
    }
}

fn with_cost(mut s: Sample, cost: &Cost, ops: usize) -> Sample {
    let ops = ops.max(1) as f64;
    s.requests_per_op = Some(cost.requests as f64 / ops);
    s.streams_per_op = Some(cost.watch_streams as f64 / ops);
    s.server_cpu_us_per_op = Some(cost.cpu_seconds * 1e6 / ops);
    s.client_cpu_us_per_op = Some(cost.client_cpu_seconds * 1e6 / ops);
    s
}

pub(crate) fn push(v: &mut Option<sync_bench::report::Variant>, s: Sample) {
    if let Some(v) = v.as_mut() {
        v.rounds.push(s);
    }
}

fn put_if_absent(key: &str, lease: i64) -> Txn {
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            "",
            Some(PutOptions::new().with_lease(lease)),
        )])
}

impl Etcd {
    fn pick<T>(&self, quick: T, full: T) -> T {
        self.ctx.pick(quick, full)
    }

    async fn lib(&self, ns: &str) -> Result<sync_etcd::Client> {
        self.lib_ttl(ns, Duration::from_secs(10)).await
    }

    async fn lib_ttl(&self, ns: &str, ttl: Duration) -> Result<sync_etcd::Client> {
        let config = sync_etcd::Config::from_url(&self.url)
            .or_msg("etcd url")?
            .with_namespace(ns)
            .with_ttl(ttl);
        sync_etcd::Client::connect(config)
            .await
            .or_msg("connecting sync-etcd")
    }

    async fn raw(&self) -> Result<Raw> {
        Raw::connect([format!("http://{}", self.authority)], None)
            .await
            .or_msg("connecting etcd-client")
    }

    /// Runs `f`, and counts what etcd served meanwhile (plus [`SETTLE`]).
    async fn counted<T>(&self, f: impl Future<Output = Result<T>>) -> Result<(T, Cost)> {
        let before = metrics::fetch(&self.authority).await?;
        let out = f.await?;
        tokio::time::sleep(SETTLE).await;
        let after = metrics::fetch(&self.authority).await?;
        Ok((out, after.since(&before)))
    }

    /// Runs `op(i)` for i in 0..n, one after the other, timing each call; the latencies and
    /// what etcd counted meanwhile.
    async fn timed(
        &self,
        n: usize,
        mut op: impl AsyncFnMut(usize) -> Result<()>,
    ) -> Result<(Vec<Duration>, Cost)> {
        self.clocked(n, async |i| {
            let t = Instant::now();
            op(i).await?;
            Ok(t.elapsed())
        })
        .await
    }

    /// Like [`Etcd::timed`], for an `op` that times itself (a handoff: from the release to
    /// the waiter's grant).
    async fn clocked(
        &self,
        n: usize,
        mut op: impl AsyncFnMut(usize) -> Result<Duration>,
    ) -> Result<(Vec<Duration>, Cost)> {
        self.counted(async {
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                lat.push(op(i).await?);
            }
            Ok(lat)
        })
        .await
    }

    async fn cleanup(&self, raw: &mut Raw, prefix: &str) {
        let _ = raw
            .delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }

    async fn uncontended(&self) -> Result<Vec<Row>> {
        let n = self.pick(50, 500);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let lock = lib.lock().or_msg("lock handle")?;
        let mut raw = self.raw().await?;
        let lease = raw
            .lease_grant(RAW_LEASE_TTL, None)
            .await
            .or_msg("lease")?
            .id();
        let key = format!("{ns}/raw/uncontended");
        let mut row = Row::new(B, "uncontended acquire+release", "p50 µs", Better::Lower)
            .with_raw("txn put-if-absent + delete")
            .with_peer("etcd Lock + Unlock RPCs")
            .with_note(format!(
                "{n} sequential ops per round, one id, in {} slices alternating \
                 between sync, raw and peer",
                slice_count(n)
            ));
        lock.acquire("warm-up", LockOptions::new())
            .await
            .or_msg("warm-up")?
            .release()
            .await
            .or_msg("warm-up")?;
        let mut sync_op = async |_| {
            let g = lock
                .acquire("uncontended", LockOptions::new())
                .await
                .or_msg("acquire")?;
            g.release().await.or_msg("release")?;
            Ok(())
        };
        let mut kv = raw.kv_client();
        let mut raw_op = async |_| {
            let r = kv.txn(put_if_absent(&key, lease)).await.or_msg("txn")?;
            if !r.succeeded() {
                return Err("raw: the key was taken".into());
            }
            kv.delete(key.as_str(), None).await.or_msg("delete")?;
            Ok(())
        };
        let mut lc = raw.lock_client();
        let mut peer_op = async |_| {
            let r = lc
                .lock(
                    format!("{ns}/peer/uncontended"),
                    Some(RpcLockOptions::new().with_lease(lease)),
                )
                .await
                .or_msg("Lock")?;
            lc.unlock(r.key()).await.or_msg("Unlock")?;
            Ok(())
        };
        for _ in 0..self.ctx.rounds {
            let mut sides: [Side; 3] = Default::default();
            for slice in slices(n) {
                sides[0].add(self.timed(slice, &mut sync_op).await?);
                sides[1].add(self.timed(slice, &mut raw_op).await?);
                sides[2].add(self.timed(slice, &mut peer_op).await?);
            }
            row.sync.rounds.push(sides[0].sample());
            push(&mut row.raw, sides[1].sample());
            push(&mut row.peer, sides[2].sample());
        }
        let _ = raw.lease_revoke(lease).await;
        self.cleanup(&mut raw, &ns).await;
        lib.close().await.or_msg("close")?;
        Ok(vec![row.finish()])
    }

    async fn handoff(&self) -> Result<Vec<Row>> {
        // Enough that a round's p50 is not moved by a few handoffs that met an etcd stall.
        let n = self.pick(8, 100);
        let wait = Duration::from_millis(30);
        let ns = unique("bench");
        let (a, b) = (self.lib(&ns).await?, self.lib(&ns).await?);
        let (la, lb) = (
            a.lock().or_msg("lock handle")?,
            b.lock().or_msg("lock handle")?,
        );
        let (mut ra, rb) = (self.raw().await?, self.raw().await?);
        let lease_a = ra
            .lease_grant(RAW_LEASE_TTL, None)
            .await
            .or_msg("lease")?
            .id();
        let lease_b = ra
            .lease_grant(RAW_LEASE_TTL, None)
            .await
            .or_msg("lease")?
            .id();
        let mut row = Row::new(
            B,
            "handoff (release → waiter granted)",
            "p50 µs",
            Better::Lower,
        )
        .with_raw("delete → the waiter's watch event")
        .with_peer("Unlock → the waiting Lock RPC returns")
        .with_note(format!(
            "{n} handoffs per round between two clients, in {} slices alternating \
             between sync, raw and peer; the waiter waits {} ms first; req/op counts the \
             whole cycle",
            slice_count(n),
            wait.as_millis()
        ));
        let mut sync_op = async |_| {
            let ga = la
                .acquire("handoff", LockOptions::new())
                .await
                .or_msg("acquire")?;
            let lb = lb.clone();
            let waiter = tokio::spawn(async move {
                let g = lb.acquire("handoff", LockOptions::new()).await?;
                let t1 = Instant::now();
                g.release().await?;
                Ok::<_, sync_core::Error>(t1)
            });
            tokio::time::sleep(wait).await;
            let t0 = Instant::now();
            ga.release().await.or_msg("release")?;
            let t1 = waiter.await.or_msg("waiter")?.or_msg("waiter")?;
            Ok(t1.saturating_duration_since(t0))
        };
        let key = format!("{ns}/raw/handoff");
        let mut kv = ra.kv_client();
        let name = format!("{ns}/peer/handoff");
        let mut lc = ra.lock_client();
        let mut peer_op = async |_| {
            let held = lc
                .lock(
                    name.as_str(),
                    Some(RpcLockOptions::new().with_lease(lease_a)),
                )
                .await
                .or_msg("Lock")?;
            let mut lcb = rb.lock_client();
            let name = name.clone();
            let waiter = tokio::spawn(async move {
                let r = lcb
                    .lock(name, Some(RpcLockOptions::new().with_lease(lease_b)))
                    .await?;
                let t1 = Instant::now();
                lcb.unlock(r.key()).await?;
                Ok::<_, etcd_client::Error>(t1)
            });
            tokio::time::sleep(wait).await;
            let t0 = Instant::now();
            lc.unlock(held.key()).await.or_msg("Unlock")?;
            let t1 = waiter.await.or_msg("waiter")?.or_msg("waiter")?;
            Ok(t1.saturating_duration_since(t0))
        };
        for _ in 0..self.ctx.rounds {
            // The raw waiter's one watch stream, timestamping deletes as they arrive.
            let mut watch = rb.watch_client();
            let mut stream = watch.watch(key.as_str(), None).await.or_msg("watch")?;
            let (tx, mut deletes) = mpsc::unbounded_channel();
            let reader = tokio::spawn(async move {
                while let Ok(Some(resp)) = stream.message().await {
                    for ev in resp.events() {
                        if ev.event_type() == EventType::Delete {
                            let _ = tx.send(Instant::now());
                        }
                    }
                }
            });
            let mut raw_op = async |_| {
                kv.txn(put_if_absent(&key, lease_a)).await.or_msg("txn")?;
                tokio::time::sleep(wait).await;
                let t0 = Instant::now();
                kv.delete(key.as_str(), None).await.or_msg("delete")?;
                let t1 = tokio::time::timeout(Duration::from_secs(10), deletes.recv())
                    .await
                    .or_msg("waiting for the delete event")?
                    .ok_or("the watch ended")?;
                Ok(t1.saturating_duration_since(t0))
            };
            let mut sides: [Side; 3] = Default::default();
            for slice in slices(n) {
                sides[0].add(self.clocked(slice, &mut sync_op).await?);
                sides[1].add(self.clocked(slice, &mut raw_op).await?);
                sides[2].add(self.clocked(slice, &mut peer_op).await?);
            }
            reader.abort();
            row.sync.rounds.push(sides[0].sample());
            push(&mut row.raw, sides[1].sample());
            push(&mut row.peer, sides[2].sample());
        }
        let _ = ra.lease_revoke(lease_a).await;
        let _ = ra.lease_revoke(lease_b).await;
        self.cleanup(&mut ra, &ns).await;
        a.close().await.or_msg("close")?;
        b.close().await.or_msg("close")?;
        Ok(vec![row.finish()])
    }

    async fn many_ids(&self) -> Result<Vec<Row>> {
        const TASKS: usize = 64;
        let window = self.pick(Duration::from_millis(500), Duration::from_secs(5));
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let lock = lib.lock().or_msg("lock handle")?;
        let mut raw = self.raw().await?;
        let lease = raw
            .lease_grant(RAW_LEASE_TTL, None)
            .await
            .or_msg("lease")?
            .id();
        let mut row = Row::new(B, "64 tasks × 64 ids, one client", "ops/s", Better::Higher)
            .with_raw("txn put-if-absent + delete")
            .with_peer("etcd Lock + Unlock RPCs")
            .with_note(format!(
                "{TASKS} tasks, each its own id, {:.1} s per round",
                window.as_secs_f64()
            ));
        for _ in 0..self.ctx.rounds {
            let (ops, cost) = self
                .counted(async {
                    let deadline = Instant::now() + window;
                    let started = Instant::now();
                    let counts = stream::iter(0..TASKS)
                        .map(|i| {
                            let lock = lock.clone();
                            async move {
                                let mut n = 0usize;
                                while Instant::now() < deadline {
                                    let id = format!("id-{i}");
                                    let g = lock.acquire(&id, LockOptions::new()).await?;
                                    g.release().await?;
                                    n += 1;
                                }
                                Ok::<_, sync_core::Error>(n)
                            }
                        })
                        .buffer_unordered(TASKS)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("acquire/release")?;
                    Ok((counts.iter().sum::<usize>(), started.elapsed()))
                })
                .await?;
            let s = Sample::value(ops.0 as f64 / ops.1.as_secs_f64());
            row.sync.rounds.push(with_cost(s, &cost, ops.0));

            let (ops, cost) = self
                .counted(async {
                    let deadline = Instant::now() + window;
                    let started = Instant::now();
                    let counts = stream::iter(0..TASKS)
                        .map(|i| {
                            let mut kv = raw.kv_client();
                            let key = format!("{ns}/raw/id-{i}");
                            async move {
                                let mut n = 0usize;
                                while Instant::now() < deadline {
                                    kv.txn(put_if_absent(&key, lease)).await?;
                                    kv.delete(key.as_str(), None).await?;
                                    n += 1;
                                }
                                Ok::<_, etcd_client::Error>(n)
                            }
                        })
                        .buffer_unordered(TASKS)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("txn/delete")?;
                    Ok((counts.iter().sum::<usize>(), started.elapsed()))
                })
                .await?;
            let s = Sample::value(ops.0 as f64 / ops.1.as_secs_f64());
            push(&mut row.raw, with_cost(s, &cost, ops.0));

            let (ops, cost) = self
                .counted(async {
                    let deadline = Instant::now() + window;
                    let started = Instant::now();
                    let counts = stream::iter(0..TASKS)
                        .map(|i| {
                            let name = format!("{ns}/peer/id-{i}");
                            rpc_lock_loop(raw.lock_client(), name, lease, deadline)
                        })
                        .buffer_unordered(TASKS)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("Lock/Unlock")?;
                    Ok((counts.iter().sum::<usize>(), started.elapsed()))
                })
                .await?;
            let s = Sample::value(ops.0 as f64 / ops.1.as_secs_f64());
            push(&mut row.peer, with_cost(s, &cost, ops.0));
        }
        let _ = raw.lease_revoke(lease).await;
        self.cleanup(&mut raw, &ns).await;
        lib.close().await.or_msg("close")?;
        Ok(vec![row.finish()])
    }

    async fn one_id(&self) -> Result<Vec<Row>> {
        const CLIENTS: usize = 64;
        let window = self.pick(Duration::from_millis(500), Duration::from_secs(5));
        let ns = unique("bench");
        let mut libs = Vec::new();
        let mut raws = Vec::new();
        for _ in 0..CLIENTS {
            libs.push(self.lib(&ns).await?);
            let mut r = self.raw().await?;
            let lease = r
                .lease_grant(RAW_LEASE_TTL, None)
                .await
                .or_msg("lease")?
                .id();
            raws.push((r, lease));
        }
        let locks = libs
            .iter()
            .map(|c| c.lock())
            .collect::<sync_core::Result<Vec<_>>>()
            .or_msg("lock handle")?;
        let slice = window / CLIENT_SLICES as u32;
        let mut row = Row::new(B, "64 clients on one id", "ops/s", Better::Higher)
            .with_peer("etcd Lock + Unlock RPCs, 64 clients")
            .with_note(format!(
                "{CLIENTS} clients (connections, leases), {:.1} s per round in {CLIENT_SLICES} \
                 slices alternating between sync and peer; no raw: the minimal contended lock \
                 is the Lock RPC's own recipe",
                window.as_secs_f64()
            ));
        let name = format!("{ns}/peer/one");
        for _ in 0..self.ctx.rounds {
            let (mut sync_side, mut peer_side) = (Throughput::default(), Throughput::default());
            for _ in 0..CLIENT_SLICES {
                let sync_run = async {
                    let deadline = Instant::now() + slice;
                    stream::iter(locks.iter().cloned())
                        .map(|lock| async move {
                            let mut n = 0usize;
                            while Instant::now() < deadline {
                                let g = lock.acquire("one", LockOptions::new()).await?;
                                g.release().await?;
                                n += 1;
                            }
                            Ok::<_, sync_core::Error>(n)
                        })
                        .buffer_unordered(CLIENTS)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("acquire/release")
                };
                sync_side.add(self.counted(timed_run(sync_run)).await?);
                let peer_run = async {
                    let deadline = Instant::now() + slice;
                    stream::iter(raws.iter())
                        .map(|(r, lease)| {
                            rpc_lock_loop(r.lock_client(), name.clone(), *lease, deadline)
                        })
                        .buffer_unordered(CLIENTS)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("Lock/Unlock")
                };
                peer_side.add(self.counted(timed_run(peer_run)).await?);
            }
            row.sync.rounds.push(sync_side.sample());
            push(&mut row.peer, peer_side.sample());
        }
        for c in libs {
            let _ = c.close().await;
        }
        for (mut r, lease) in raws {
            let _ = r.lease_revoke(lease).await;
        }
        let mut raw = self.raw().await?;
        self.cleanup(&mut raw, &ns).await;
        Ok(vec![row.finish()])
    }

    async fn held(&self) -> Result<Vec<Row>> {
        let n = self.pick(500, 10_000);
        let hold = self.pick(Duration::from_secs(1), Duration::from_secs(6));
        let exe = std::env::current_exe().or_msg("the bench's own path")?;
        let mut rows = [
            Row::new(
                B,
                format!("one client holding {n} locks"),
                "s to acquire all",
                Better::Lower,
            ),
            Row::new(
                B,
                format!("one client holding {n} locks"),
                "client RSS MB",
                Better::Lower,
            ),
            Row::new(
                B,
                format!("one client holding {n} locks"),
                "watch streams opened",
                Better::Lower,
            ),
            Row::new(
                B,
                format!("one client holding {n} locks"),
                "lease keep-alives/s",
                Better::Lower,
            ),
        ];
        for row in &mut rows {
            *row = row
                .clone()
                .with_raw("one lease, txn put-if-absent per key")
                .with_peer("one lease, a Lock RPC per key")
                .with_note(format!(
                    "each in a child process (RSS = its VmRSS while holding); {IN_FLIGHT} \
                     acquires in flight; TTL {HELD_TTL} s; keep-alives counted over {:.1} s of \
                     holding",
                    hold.as_secs_f64()
                ));
        }
        for _ in 0..self.ctx.rounds {
            for which in ["sync", "raw", "peer"] {
                let ns = unique("bench");
                let out = tokio::process::Command::new(&exe)
                    .args(["--child", "held", which, &n.to_string()])
                    .arg(hold.as_millis().to_string())
                    .arg(&self.url)
                    .arg(&ns)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await
                    .or_msg("running the child")?;
                if !out.status.success() {
                    return Err(format!("child {which} failed ({})", out.status));
                }
                let held: Held =
                    serde_json::from_slice(&out.stdout).or_msg("the child's answer")?;
                let values = [
                    held.acquire_s,
                    held.rss_mb,
                    held.streams as f64,
                    held.keepalives_per_s,
                ];
                for (row, v) in rows.iter_mut().zip(values) {
                    let s = Sample::value(v);
                    match which {
                        "sync" => row.sync.rounds.push(s),
                        "raw" => push(&mut row.raw, s),
                        _ => push(&mut row.peer, s),
                    }
                }
                let mut raw = self.raw().await?;
                self.cleanup(&mut raw, &ns).await;
            }
        }
        Ok(rows.into_iter().map(Row::finish).collect())
    }

    async fn elect(&self) -> Result<Vec<Row>> {
        let n = self.pick(30, 300);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let leader = lib.leader("group").or_msg("leader handle")?;
        let mut raw = self.raw().await?;
        let lease = raw
            .lease_grant(RAW_LEASE_TTL, None)
            .await
            .or_msg("lease")?
            .id();
        let mut row = Row::new(B, "elect + resign, uncontended", "p50 µs", Better::Lower)
            .with_peer("etcd Campaign + Resign RPCs")
            .with_note(format!("{n} sequential elect/resign per round"));
        for _ in 0..self.ctx.rounds {
            let (lat, cost) = self
                .timed(n, async |_| {
                    let e = leader
                        .elect("me", ElectOptions::new())
                        .await
                        .or_msg("elect")?;
                    e.resign().await.or_msg("resign")?;
                    Ok(())
                })
                .await?;
            row.sync.rounds.push(with_cost(latency(&lat), &cost, n));
            let mut ec = raw.election_client();
            let (lat, cost) = self
                .timed(n, async |_| {
                    let r = ec
                        .campaign(format!("{ns}/peer/group"), "me", lease)
                        .await
                        .or_msg("Campaign")?;
                    let key = r.leader().cloned().ok_or("Campaign: no leader key")?;
                    ec.resign(Some(ResignOptions::new().with_leader(key)))
                        .await
                        .or_msg("Resign")?;
                    Ok(())
                })
                .await?;
            push(&mut row.peer, with_cost(latency(&lat), &cost, n));
        }
        let _ = raw.lease_revoke(lease).await;
        self.cleanup(&mut raw, &ns).await;
        lib.close().await.or_msg("close")?;
        Ok(vec![row.finish()])
    }

    async fn map(&self) -> Result<Vec<Row>> {
        let keys = self.pick(300, 10_000);
        let n = self.pick(50, 500);
        let scans = self.pick(3, 5);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let map = lib.map("bench").or_msg("map handle")?;
        let raw = self.raw().await?;
        let prefix = format!("{ns}/raw/map/");
        // Both maps hold `keys` entries before anything is timed.
        stream::iter(0..keys)
            .map(|i| {
                let map = map.clone();
                async move { map.write(&format!("k{i:06}"), b"0").await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("filling the map")?;
        stream::iter(0..keys)
            .map(|i| {
                let mut kv = raw.kv_client();
                let key = format!("{prefix}k{i:06}");
                async move { kv.put(key, "0", None).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("filling the raw keys")?;

        let mut write = Row::new(B, "Map write", "p50 µs", Better::Lower)
            .with_raw("put")
            .with_note(format!("{n} sequential writes of one key per round"));
        let mut cas = Row::new(B, "Map compare-and-swap", "p50 µs", Better::Lower)
            .with_raw("txn mod_revision = r → put")
            .with_note(format!(
                "{n} sequential swaps of one key, each on the last version"
            ));
        let mut entries = Row::new(
            B,
            format!("Map entries() over {keys} keys"),
            "p50 ms",
            Better::Lower,
        )
        .with_raw("one prefix range")
        .with_note(format!("{scans} scans per round"));
        let mut iterate = Row::new(
            B,
            format!("Map iterate rewriting {keys} keys"),
            "s",
            Better::Lower,
        )
        .with_raw("one prefix range + CAS per key, 16 in flight")
        .with_note("one pass per round; req/op is per key");
        let hot = format!("{prefix}hot");
        for round in 0..self.ctx.rounds {
            let (lat, cost) = self
                .timed(n, async |i| {
                    map.write("hot", format!("{i}").as_bytes())
                        .await
                        .or_msg("write")?;
                    Ok(())
                })
                .await?;
            write.sync.rounds.push(with_cost(latency(&lat), &cost, n));
            let mut kv = raw.kv_client();
            let (lat, cost) = self
                .timed(n, async |i| {
                    kv.put(hot.as_str(), format!("{i}"), None)
                        .await
                        .or_msg("put")?;
                    Ok(())
                })
                .await?;
            push(&mut write.raw, with_cost(latency(&lat), &cost, n));

            let mut version = map.read("hot").await.or_msg("read")?.map(|e| e.version);
            let (lat, cost) = self
                .timed(n, async |i| {
                    version = Some(
                        map.compare_and_swap("hot", version, format!("{i}").as_bytes())
                            .await
                            .or_msg("compare_and_swap")?,
                    );
                    Ok(())
                })
                .await?;
            cas.sync.rounds.push(with_cost(latency(&lat), &cost, n + 1));
            let mut kv = raw.kv_client();
            let got = kv.get(hot.as_str(), None).await.or_msg("get")?;
            let mut rev = got.kvs().first().map_or(0, |kv| kv.mod_revision());
            let (lat, cost) = self
                .timed(n, async |i| {
                    let r = kv
                        .txn(
                            Txn::new()
                                .when([Compare::mod_revision(hot.as_str(), CompareOp::Equal, rev)])
                                .and_then([TxnOp::put(hot.as_str(), format!("{i}"), None)]),
                        )
                        .await
                        .or_msg("txn")?;
                    if !r.succeeded() {
                        return Err("raw CAS: conflict".into());
                    }
                    rev = r.header().map_or(0, |h| h.revision());
                    Ok(())
                })
                .await?;
            push(&mut cas.raw, with_cost(latency(&lat), &cost, n + 1));

            let (lat, cost) = self
                .timed(scans, async |_| {
                    let all = map.entries().await.or_msg("entries")?;
                    if all.len() < keys {
                        return Err(format!("entries: {} of {keys}", all.len()));
                    }
                    Ok(())
                })
                .await?;
            let mut s = with_cost(latency(&lat), &cost, scans);
            s.value /= 1000.0;
            s.p99 = s.p99.map(|v| v / 1000.0);
            entries.sync.rounds.push(s);
            let mut kv = raw.kv_client();
            let (lat, cost) = self
                .timed(scans, async |_| {
                    let all = kv
                        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                        .await
                        .or_msg("range")?;
                    if all.kvs().len() < keys {
                        return Err(format!("range: {} of {keys}", all.kvs().len()));
                    }
                    Ok(())
                })
                .await?;
            let mut s = with_cost(latency(&lat), &cost, scans);
            s.value /= 1000.0;
            s.p99 = s.p99.map(|v| v / 1000.0);
            push(&mut entries.raw, s);

            let value = format!("r{round}");
            let (took, cost) = self
                .counted(async {
                    let t = Instant::now();
                    let changed = map
                        .iterate(|_, _| Some(value.as_bytes().to_vec()))
                        .await
                        .or_msg("iterate")?;
                    if changed < keys {
                        return Err(format!("iterate changed {changed} of {keys}"));
                    }
                    Ok(t.elapsed())
                })
                .await?;
            iterate
                .sync
                .rounds
                .push(with_cost(Sample::value(took.as_secs_f64()), &cost, keys));
            let (took, cost) = self
                .counted(async {
                    let t = Instant::now();
                    let mut kv = raw.kv_client();
                    let all = kv
                        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                        .await
                        .or_msg("range")?;
                    let swaps: Vec<(Vec<u8>, i64)> = all
                        .kvs()
                        .iter()
                        .map(|e| (e.key().to_vec(), e.mod_revision()))
                        .collect();
                    stream::iter(swaps)
                        .map(|(key, rev)| {
                            let mut kv = raw.kv_client();
                            let value = value.clone();
                            async move {
                                kv.txn(
                                    Txn::new()
                                        .when([Compare::mod_revision(
                                            key.clone(),
                                            CompareOp::Equal,
                                            rev,
                                        )])
                                        .and_then([TxnOp::put(key, value, None)]),
                                )
                                .await
                            }
                        })
                        .buffer_unordered(16)
                        .try_collect::<Vec<_>>()
                        .await
                        .or_msg("CAS")?;
                    Ok(t.elapsed())
                })
                .await?;
            push(
                &mut iterate.raw,
                with_cost(Sample::value(took.as_secs_f64()), &cost, keys),
            );
        }
        let mut raw = raw;
        self.cleanup(&mut raw, &ns).await;
        lib.close().await.or_msg("close")?;
        Ok(vec![
            write.finish(),
            cas.finish(),
            entries.finish(),
            iterate.finish(),
        ])
    }

    async fn task_throughput(&self) -> Result<Vec<Row>> {
        const CONCURRENCY: usize = 8;
        let jobs = self.pick(100, 2000);
        let mut rows: Vec<(usize, Row)> = [1usize, 2, 4]
            .into_iter()
            .map(|w| {
                let row = Row::new(
                    B,
                    format!("Task: {jobs} queued no-op jobs, {w} worker(s) × {CONCURRENCY}"),
                    "jobs/s",
                    Better::Higher,
                )
                .with_raw("queue: one listing per worker, then a claim txn + a result txn per job")
                .with_note("timed from the workers' start to the last job's end; req/op per job while working (submits not counted)");
                (w, row)
            })
            .collect();
        for round in 0..self.ctx.rounds {
            for (workers, row) in &mut rows {
                let ns = unique("bench");
                let s = self
                    .lib_jobs(&ns, round, *workers, jobs, CONCURRENCY)
                    .await?;
                row.sync.rounds.push(s);
                let s = self.raw_jobs(&ns, *workers, jobs, CONCURRENCY).await?;
                push(&mut row.raw, s);
                let mut raw = self.raw().await?;
                self.cleanup(&mut raw, &ns).await;
            }
        }
        Ok(rows.into_iter().map(|(_, r)| r.finish()).collect())
    }

    async fn lib_jobs(
        &self,
        ns: &str,
        round: usize,
        workers: usize,
        jobs: usize,
        concurrency: usize,
    ) -> Result<Sample> {
        let submitter = self.lib(ns).await?;
        let task = submitter.task().or_msg("task handle")?;
        let name = format!("noop-{round}");
        stream::iter(0..jobs)
            .map(|i| {
                let task = task.clone();
                let name = name.clone();
                async move { task.submit(Job::new(name, i.to_le_bytes().to_vec())).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("submit")?;
        let mut clients = Vec::new();
        for _ in 0..workers {
            clients.push(self.lib(ns).await?);
        }
        let done = Arc::new(AtomicUsize::new(0));
        let all = Arc::new(Notify::new());
        let ((took, handles), cost) = self
            .counted(async {
                let started = Instant::now();
                let mut handles = Vec::new();
                for c in &clients {
                    let (d, a) = (done.clone(), all.clone());
                    handles.push(
                        c.task()
                            .or_msg("task handle")?
                            .work(
                                &name,
                                Arc::new(move |_job: JobContext| {
                                    let (d, a) = (d.clone(), a.clone());
                                    async move {
                                        if d.fetch_add(1, Ordering::SeqCst) + 1 == jobs {
                                            a.notify_one();
                                        }
                                        Ok(Vec::new())
                                    }
                                }),
                                WorkerOptions::new().with_concurrency(concurrency),
                            )
                            .await
                            .or_msg("work")?,
                    );
                }
                tokio::time::timeout(Duration::from_secs(600), all.notified())
                    .await
                    .or_msg("waiting for the jobs")?;
                Ok((started.elapsed(), handles))
            })
            .await?;
        for h in handles {
            h.stop().await;
        }
        for c in clients {
            let _ = c.close().await;
        }
        let _ = submitter.close().await;
        Ok(with_cost(
            Sample::value(jobs as f64 / took.as_secs_f64()),
            &cost,
            jobs,
        ))
    }

    async fn raw_jobs(
        &self,
        ns: &str,
        workers: usize,
        jobs: usize,
        concurrency: usize,
    ) -> Result<Sample> {
        let raw = self.raw().await?;
        let queue = format!("{ns}/raw/q/");
        stream::iter(0..jobs)
            .map(|i| {
                let mut kv = raw.kv_client();
                let key = format!("{queue}{i:08}");
                async move { kv.put(key, i.to_le_bytes().to_vec(), None).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("queueing")?;
        let mut clients = Vec::new();
        for _ in 0..workers {
            let mut c = self.raw().await?;
            let lease = c
                .lease_grant(RAW_LEASE_TTL, None)
                .await
                .or_msg("lease")?
                .id();
            clients.push((c, lease));
        }
        let done = Arc::new(AtomicUsize::new(0));
        let (took, cost) = self
            .counted(async {
                let started = Instant::now();
                let runs = clients.iter().enumerate().map(|(w, (c, lease))| {
                    raw_worker(c.clone(), *lease, ns, w, workers, concurrency, done.clone())
                });
                futures::future::try_join_all(runs).await?;
                Ok(started.elapsed())
            })
            .await?;
        let finished = done.load(Ordering::SeqCst);
        if finished != jobs {
            return Err(format!("raw queue: {finished} of {jobs} jobs done"));
        }
        for (mut c, lease) in clients {
            let _ = c.lease_revoke(lease).await;
        }
        Ok(with_cost(
            Sample::value(jobs as f64 / took.as_secs_f64()),
            &cost,
            jobs,
        ))
    }

    async fn task_latency(&self) -> Result<Vec<Row>> {
        // Enough jobs that the p99 is not decided by one etcd stall (fsync on a shared disk
        // holds a write for milliseconds now and then): it is the 4th slowest of 400.
        let n = self.pick(10, 1000);
        let gap = Duration::from_millis(10);
        let mut row = Row::new(
            B,
            "Task submit → handler start, idle worker",
            "p50 µs",
            Better::Lower,
        )
        .with_raw("put → the worker's watch event → claim txn")
        .with_note(format!(
            "{n} jobs per round, one at a time, {} ms apart, in {} slices alternating \
             between sync and raw (each side's worker idles through the other's slices); one \
             worker × concurrency 8",
            gap.as_millis(),
            slice_count(n)
        ));
        for round in 0..self.ctx.rounds {
            let ns = unique("bench");
            let submitter = self.lib(&ns).await?;
            let worker_client = self.lib(&ns).await?;
            let task = submitter.task().or_msg("task handle")?;
            let (tx, mut started) = mpsc::unbounded_channel();
            let name = format!("latency-{round}");
            let worker = worker_client
                .task()
                .or_msg("task handle")?
                .work(
                    &name,
                    Arc::new(move |_job: JobContext| {
                        let _ = tx.send(Instant::now());
                        async { Ok(Vec::new()) }
                    }),
                    WorkerOptions::new().with_concurrency(8),
                )
                .await
                .or_msg("work")?;
            let mut sync_op = async |i: usize| {
                let t0 = Instant::now();
                task.submit(Job::new(name.as_str(), vec![i as u8]))
                    .await
                    .or_msg("submit")?;
                let t1 = tokio::time::timeout(Duration::from_secs(30), started.recv())
                    .await
                    .or_msg("waiting for the handler")?
                    .ok_or("the worker ended")?;
                tokio::time::sleep(gap).await;
                Ok(t1.saturating_duration_since(t0))
            };

            // Raw: a worker watching the queue prefix claims each job as its put arrives.
            let raw = self.raw().await?;
            let mut wc = self.raw().await?;
            let lease = wc
                .lease_grant(RAW_LEASE_TTL, None)
                .await
                .or_msg("lease")?
                .id();
            let queue = format!("{ns}/raw/q/");
            let (raw_tx, mut raw_started) = mpsc::unbounded_channel();
            let raw_worker =
                raw_latency_worker(&mut wc, ns.clone(), queue.clone(), lease, raw_tx).await?;
            let mut kv = raw.kv_client();
            let mut next = 0usize;
            let mut raw_op = async |_| {
                let t0 = Instant::now();
                kv.put(format!("{queue}{next:08}"), vec![next as u8], None)
                    .await
                    .or_msg("put")?;
                next += 1;
                let t1 = tokio::time::timeout(Duration::from_secs(30), raw_started.recv())
                    .await
                    .or_msg("waiting for the raw worker")?
                    .ok_or("the raw worker ended")?;
                tokio::time::sleep(gap).await;
                Ok(t1.saturating_duration_since(t0))
            };

            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut sides: [Side; 2] = Default::default();
            for slice in slices(n) {
                sides[0].add(self.clocked(slice, &mut sync_op).await?);
                sides[1].add(self.clocked(slice, &mut raw_op).await?);
            }
            row.sync.rounds.push(sides[0].sample());
            push(&mut row.raw, sides[1].sample());

            worker.stop().await;
            let _ = worker_client.close().await;
            let _ = submitter.close().await;
            raw_worker.abort();
            let _ = wc.lease_revoke(lease).await;
            let mut raw = raw;
            self.cleanup(&mut raw, &ns).await;
        }
        Ok(vec![row.finish()])
    }

    async fn cron(&self) -> Result<Vec<Row>> {
        let interval = Duration::from_millis(200);
        let window = self.pick(Duration::from_secs(1), Duration::from_secs(10));
        let mut row = Row::new(
            B,
            "Cron tick, 3 idle workers",
            "requests/tick",
            Better::Lower,
        )
        .with_raw("the same cron, no workers (the driver alone)")
        .with_note(format!(
            "every {} ms for {:.1} s per round; ticks counted from the cron's record; \
                 the least a tick needs is 2 (record CAS + submit)",
            interval.as_millis(),
            window.as_secs_f64()
        ));
        for round in 0..self.ctx.rounds {
            for with_workers in [true, false] {
                let ns = unique("bench");
                let driver = self.lib(&ns).await?;
                let mut workers = Vec::new();
                let mut clients = Vec::new();
                if with_workers {
                    for _ in 0..3 {
                        let c = self.lib(&ns).await?;
                        workers.push(
                            c.task()
                                .or_msg("task handle")?
                                .work(
                                    "tick",
                                    Arc::new(|_job: JobContext| async { Ok(Vec::new()) }),
                                    WorkerOptions::new().with_concurrency(8),
                                )
                                .await
                                .or_msg("work")?,
                        );
                        clients.push(c);
                    }
                }
                let map = driver.map("cron").or_msg("map handle")?;
                let cron = sync_cron::Cron::new(
                    driver.leader("cron").or_msg("leader handle")?,
                    driver.task().or_msg("task handle")?,
                    map.clone(),
                    format!("driver-{round}"),
                );
                cron.schedule(
                    "tick",
                    sync_cron::Schedule::every(interval),
                    Job::new("tick", Vec::new()),
                )
                .await
                .or_msg("schedule")?;
                let tick = |map: Arc<dyn sync_core::Map>| async move {
                    let Some(e) = map.read("tick").await.or_msg("reading the cron record")? else {
                        return Ok::<_, String>(None);
                    };
                    let v: serde_json::Value =
                        serde_json::from_slice(&e.value).or_msg("the cron record")?;
                    Ok(v["term"]
                        .as_u64()
                        .filter(|t| *t > 0)
                        .and(v["tick_ms"].as_u64()))
                };
                let deadline = Instant::now() + Duration::from_secs(20);
                let first = loop {
                    if let Some(t) = tick(map.clone()).await? {
                        break t;
                    }
                    if Instant::now() > deadline {
                        return Err("the cron fired nothing in 20 s".into());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let (_, cost) = self
                    .counted(async {
                        tokio::time::sleep(window).await;
                        Ok(())
                    })
                    .await?;
                let last = tick(map.clone()).await?.unwrap_or(first);
                let ticks = ((last - first) as f64 / interval.as_millis() as f64).round() as usize;
                cron.stop().await;
                for w in workers {
                    w.stop().await;
                }
                for c in clients {
                    let _ = c.close().await;
                }
                let _ = driver.close().await;
                let mut raw = self.raw().await?;
                self.cleanup(&mut raw, &ns).await;
                if ticks == 0 {
                    return Err("no tick fired while counting".into());
                }
                let mut s = with_cost(Sample::value(0.0), &cost, ticks);
                s.value = s.requests_per_op.unwrap_or(0.0);
                s.detail = format!("{ticks} ticks");
                if with_workers {
                    row.sync.rounds.push(s);
                } else {
                    push(&mut row.raw, s);
                }
            }
        }
        Ok(vec![row.finish()])
    }
}

/// One raw queue worker: lists the queue once, starts at its share of it (so workers do not
/// race for the head), and claims job by job with `concurrency` claims in flight: a claim is
/// one txn (the job key still there → delete it, put a running key on the worker's lease), a
/// result one more (delete the running key, put the outcome). Lists again when its list runs
/// out or a claim finds its job taken, until the queue is empty.
/// A raw queue's job: its queue entry, and where its claim and result go.
struct RawJob {
    key: Vec<u8>,
    running: String,
    done: String,
}

impl RawJob {
    fn of(ns: &str, key: &[u8]) -> RawJob {
        let id = String::from_utf8_lossy(key)
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        RawJob {
            key: key.to_vec(),
            running: format!("{ns}/raw/r/{id}"),
            done: format!("{ns}/raw/d/{id}"),
        }
    }

    /// Takes the entry if it is still queued, marking it running under `lease`.
    fn claim(&self, lease: i64) -> Txn {
        Txn::new()
            .when([Compare::version(self.key.clone(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::delete(self.key.clone(), None),
                TxnOp::put(
                    self.running.as_str(),
                    "",
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ])
    }

    /// The no-op handler's result.
    fn result(&self) -> Txn {
        Txn::new().and_then([
            TxnOp::delete(self.running.as_str(), None),
            TxnOp::put(self.done.as_str(), "ok", None),
        ])
    }
}

/// The raw queue's idle worker: watches the queue prefix and claims each job as its put
/// arrives (sending the time on `started`), then records it done. Runs until aborted.
async fn raw_latency_worker(
    wc: &mut Raw,
    ns: String,
    queue: String,
    lease: i64,
    started: mpsc::UnboundedSender<Instant>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut watch = wc.watch_client();
    let mut stream = watch
        .watch(queue.as_str(), Some(WatchOptions::new().with_prefix()))
        .await
        .or_msg("watch")?;
    let mut kv = wc.kv_client();
    Ok(tokio::spawn(async move {
        while let Ok(Some(resp)) = stream.message().await {
            for ev in resp.events() {
                if ev.event_type() != EventType::Put {
                    continue;
                }
                let Some(job) = ev.kv() else { continue };
                let raw_job = RawJob::of(&ns, job.key());
                let claimed = kv.txn(raw_job.claim(lease)).await;
                if matches!(&claimed, Ok(r) if r.succeeded()) {
                    let _ = started.send(Instant::now());
                    let _ = kv.txn(raw_job.result()).await;
                }
            }
        }
    }))
}

async fn raw_worker(
    client: Raw,
    lease: i64,
    ns: &str,
    w: usize,
    workers: usize,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Result<()> {
    let queue = format!("{ns}/raw/q/");
    let mut kv = client.kv_client();
    loop {
        let listing = kv
            .get(
                queue.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .or_msg("listing the queue")?;
        let mut keys: VecDeque<Vec<u8>> = listing.kvs().iter().map(|k| k.key().to_vec()).collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.rotate_left(keys.len() * w / workers);
        let keys = Arc::new(StdMutex::new(keys));
        let slots = (0..concurrency).map(|_| {
            let keys = keys.clone();
            let mut kv = client.kv_client();
            let done = done.clone();
            async move {
                loop {
                    let next = keys.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                    let Some(key) = next else {
                        return Ok::<_, String>(());
                    };
                    let raw_job = RawJob::of(ns, &key);
                    let claim = kv.txn(raw_job.claim(lease)).await.or_msg("claim")?;
                    if !claim.succeeded() {
                        // Another worker got here first: the rest of this listing is
                        // likely taken too. List again rather than try key after key.
                        keys.lock().unwrap_or_else(|e| e.into_inner()).clear();
                        continue;
                    }
                    // The no-op handler, then its result.
                    kv.txn(raw_job.result()).await.or_msg("result")?;
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        futures::future::try_join_all(slots).await?;
    }
}

/// The lease TTL of the held-locks children (renewed every third of it), short so that a
/// short hold sees renewals.
const HELD_TTL: i64 = 3;

/// What a held-locks child measured.
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    acquire_s: f64,
    rss_mb: f64,
    streams: u64,
    keepalives_per_s: f64,
}

/// `--child held <sync|raw|peer> N HOLD_MS URL NAMESPACE`: one client acquires N locks (64 in
/// flight), holds them for HOLD_MS, and prints a [`Held`] as JSON. In a process of its own so
/// that its RSS is its own.
pub(crate) fn child_main(args: &[String]) -> ExitCode {
    let run = || -> Result<Held> {
        let [what, which, n, hold, url, ns] = args else {
            return Err(format!("bad child arguments {args:?}"));
        };
        if what != "held" {
            return Err(format!("unknown child {what}"));
        }
        let n: usize = n.parse().or_msg("N")?;
        let hold = Duration::from_millis(hold.parse().or_msg("HOLD_MS")?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .or_msg("tokio")?;
        runtime.block_on(held_child(which, n, hold, url, ns))
    };
    match run() {
        Ok(held) => {
            println!("{}", serde_json::to_string(&held).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sync-bench child: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn held_child(which: &str, n: usize, hold: Duration, url: &str, ns: &str) -> Result<Held> {
    let e = Etcd {
        url: url.to_string(),
        authority: metrics::authority(url),
        ctx: Ctx {
            quick: true,
            rounds: 1,
        },
    };
    let before = metrics::fetch(&e.authority).await?;
    let started;
    let acquire_s;
    let mut keep = Vec::new();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut lib_client = None;
    match which {
        "sync" => {
            let c = e.lib_ttl(ns, Duration::from_secs(HELD_TTL as u64)).await?;
            let lock = c.lock().or_msg("lock handle")?;
            started = Instant::now();
            let guards = stream::iter(0..n)
                .map(|i| {
                    let lock = lock.clone();
                    async move { lock.acquire(&format!("held-{i}"), LockOptions::new()).await }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
                .or_msg("acquire")?;
            acquire_s = started.elapsed().as_secs_f64();
            keep.push(Box::new(guards) as Box<dyn std::any::Any + Send>);
            lib_client = Some(c);
        }
        "raw" | "peer" => {
            let mut c = e.raw().await?;
            let ttl = HELD_TTL;
            let lease = c.lease_grant(ttl, None).await.or_msg("lease")?.id();
            let (mut keeper, mut acks) = c.lease_keep_alive(lease).await.or_msg("keep-alive")?;
            // Renewed every third of the TTL, as sync-etcd does.
            tokio::spawn(async move {
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        _ = tokio::time::sleep(Duration::from_secs(ttl as u64) / 3) => {
                            if keeper.keep_alive().await.is_err() { break; }
                            let _ = acks.message().await;
                        }
                    }
                }
            });
            started = Instant::now();
            let peer = which == "peer";
            stream::iter(0..n)
                .map(|i| {
                    let mut c = c.clone();
                    let key = format!("{ns}/{which}/held-{i}");
                    async move {
                        if peer {
                            c.lock(key, Some(RpcLockOptions::new().with_lease(lease)))
                                .await
                                .map(|_| ())
                        } else {
                            c.txn(put_if_absent(&key, lease)).await.map(|_| ())
                        }
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
                .or_msg("acquire")?;
            acquire_s = started.elapsed().as_secs_f64();
            keep.push(Box::new(c) as Box<dyn std::any::Any + Send>);
        }
        other => return Err(format!("unknown variant {other}")),
    }
    let mid = metrics::fetch(&e.authority).await?;
    tokio::time::sleep(hold).await;
    let rss = rss_mb();
    let after = metrics::fetch(&e.authority).await?;
    let _ = stop_tx.send(());
    let streams = after.since(&before).watch_streams;
    let keepalives = after.since(&mid).keepalives as f64 / hold.as_secs_f64();
    drop(keep);
    if let Some(c) = lib_client {
        let _ = c.close().await;
    }
    Ok(Held {
        acquire_s,
        rss_mb: rss,
        streams,
        keepalives_per_s: keepalives,
    })
}

/// The peer's loop: etcd's Lock and Unlock RPCs on `name` until `deadline`; how many rounds.
async fn rpc_lock_loop(
    mut lc: etcd_client::LockClient,
    name: String,
    lease: i64,
    deadline: Instant,
) -> Result<usize, etcd_client::Error> {
    let mut n = 0usize;
    while Instant::now() < deadline {
        let held = lc
            .lock(name.as_str(), Some(RpcLockOptions::new().with_lease(lease)))
            .await?;
        lc.unlock(held.key()).await?;
        n += 1;
    }
    Ok(n)
}
