//! sync-local against tokio's own primitives, in this process.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use sync_bench::{
    report::{Better, Report, Row, Sample},
    stats::quantile,
};
use sync_core::{Backend, Job, JobContext, Lock, LockOptions, WorkerOptions};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use crate::{Ctx, OrMsg, Result, scenario};

const B: &str = "local";

pub(crate) async fn run(ctx: Ctx, report: &mut Report) {
    scenario(report, B, "uncontended acquire+release", uncontended(ctx)).await;
    scenario(report, B, "8 tasks on one id", eight_on_one(ctx)).await;
    scenario(report, B, "hot id, 1000 idle waiters", hot_id(ctx)).await;
    scenario(report, B, "Task jobs/s", jobs(ctx)).await;
}

fn client() -> Result<sync_local::Client> {
    sync_local::Cluster::new()
        .client(Default::default())
        .or_msg("sync-local client")
}

const BATCH: usize = 1000;

/// Nanoseconds per operation over batches of [`BATCH`]: (p50, p99) of the batches.
fn batch_sample(batches: &[f64]) -> Sample {
    Sample {
        value: quantile(batches, 0.5).unwrap_or(0.0),
        p99: quantile(batches, 0.99),
        ..Sample::default()
    }
}

async fn uncontended(ctx: Ctx) -> Result<Vec<Row>> {
    let ops = ctx.pick(20_000, 200_000);
    let lock = client()?.lock().or_msg("lock handle")?;
    let mutex = Mutex::new(0u64);
    let mut row = Row::new(B, "uncontended acquire+release", "ns/op", Better::Lower)
        .with_peer("tokio::sync::Mutex lock + drop")
        .with_note(format!(
            "{ops} ops per round, one task; p50/p99 of batches of {BATCH}"
        ));
    for _ in 0..ctx.rounds {
        let mut batches = Vec::new();
        for _ in 0..ops / BATCH {
            let t = Instant::now();
            for _ in 0..BATCH {
                lock.acquire("uncontended", LockOptions::new())
                    .await
                    .or_msg("acquire")?
                    .release()
                    .await
                    .or_msg("release")?;
            }
            batches.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
        }
        row.sync.rounds.push(batch_sample(&batches));
        let mut batches = Vec::new();
        for _ in 0..ops / BATCH {
            let t = Instant::now();
            for _ in 0..BATCH {
                let mut g = mutex.lock().await;
                *g += 1;
                drop(g);
            }
            batches.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
        }
        if let Some(peer) = row.peer.as_mut() {
            peer.rounds.push(batch_sample(&batches));
        }
    }
    Ok(vec![row.finish()])
}

/// `tasks` tasks taking and releasing lock `id` on `lock` for `window`: ops/s.
async fn contend(lock: Arc<dyn Lock>, id: &str, tasks: usize, window: Duration) -> Result<f64> {
    let deadline = Instant::now() + window;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let lock = lock.clone();
        let id = id.to_string();
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let g = lock.acquire(&id, LockOptions::new()).await?;
                g.release().await?;
                n += 1;
            }
            Ok::<u64, sync_core::Error>(n)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.or_msg("task")?.or_msg("acquire/release")?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn contend_tokio(tasks: usize, window: Duration) -> Result<f64> {
    let mutex = Arc::new(Mutex::new(0u64));
    let deadline = Instant::now() + window;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let mutex = mutex.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                *mutex.lock().await += 1;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.or_msg("task")?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn eight_on_one(ctx: Ctx) -> Result<Vec<Row>> {
    let window = ctx.pick(Duration::from_millis(500), Duration::from_secs(3));
    let lock = client()?.lock().or_msg("lock handle")?;
    let mut row = Row::new(B, "8 tasks on one id", "ops/s", Better::Higher)
        .with_peer("8 tasks on one tokio::sync::Mutex")
        .with_note(format!(
            "{:.1} s per round, one handle, multi-thread runtime",
            window.as_secs_f64()
        ));
    for _ in 0..ctx.rounds {
        let ops = contend(lock.clone(), "one", 8, window).await?;
        row.sync.rounds.push(Sample::value(ops));
        let ops = contend_tokio(8, window).await?;
        if let Some(peer) = row.peer.as_mut() {
            peer.rounds.push(Sample::value(ops));
        }
    }
    Ok(vec![row.finish()])
}

async fn hot_id(ctx: Ctx) -> Result<Vec<Row>> {
    const IDLE: usize = 1000;
    let window = ctx.pick(Duration::from_millis(500), Duration::from_secs(3));
    let backend = client()?;
    let lock = backend.lock().or_msg("lock handle")?;
    let mut row = Row::new(
        B,
        "hot id, 1000 idle waiters on other ids",
        "ops/s",
        Better::Higher,
    )
    .with_raw("the same hot id without the waiters")
    .with_note(format!(
        "8 tasks on the hot id, {:.1} s per round; {IDLE} other ids held, each with a \
             waiter blocked on it",
        window.as_secs_f64()
    ));
    for _ in 0..ctx.rounds {
        // The idle crowd: each id held by one contender and waited on by another.
        let mut guards = Vec::new();
        for i in 0..IDLE {
            guards.push(
                lock.acquire(&format!("idle-{i}"), LockOptions::new())
                    .await
                    .or_msg("holding an idle id")?,
            );
        }
        let mut waiters = Vec::new();
        for i in 0..IDLE {
            let lock = lock.clone();
            waiters.push(tokio::spawn(async move {
                let _ = lock.acquire(&format!("idle-{i}"), LockOptions::new()).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ops = contend(lock.clone(), "hot", 8, window).await?;
        row.sync.rounds.push(Sample::value(ops));
        for w in &waiters {
            w.abort();
        }
        for w in waiters {
            let _ = w.await;
        }
        drop(guards);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ops = contend(lock.clone(), "hot", 8, window).await?;
        if let Some(raw) = row.raw.as_mut() {
            raw.rounds.push(Sample::value(ops));
        }
    }
    Ok(vec![row.finish()])
}

async fn jobs(ctx: Ctx) -> Result<Vec<Row>> {
    let jobs: usize = ctx.pick(5_000, 50_000);
    const CONCURRENCY: usize = 8;
    let mut row = Row::new(B, "Task: queued no-op jobs", "jobs/s", Better::Higher)
        .with_peer("tokio mpsc + a pool of 8 tasks, a oneshot result per job")
        .with_note(format!(
            "{jobs} jobs queued first, then 1 worker × concurrency {CONCURRENCY}"
        ));
    for round in 0..ctx.rounds {
        // sync-local: submit all, then time one worker draining them.
        let backend = client()?;
        let task = backend.task().or_msg("task handle")?;
        let name = format!("noop-{round}");
        for i in 0..jobs {
            task.submit(Job::new(name.clone(), i.to_le_bytes().to_vec()))
                .await
                .or_msg("submit")?;
        }
        let done = Arc::new(AtomicUsize::new(0));
        let all = Arc::new(Notify::new());
        let (d, a) = (done.clone(), all.clone());
        let started = Instant::now();
        let worker = task
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
                WorkerOptions::new().with_concurrency(CONCURRENCY),
            )
            .await
            .or_msg("work")?;
        tokio::time::timeout(Duration::from_secs(300), all.notified())
            .await
            .or_msg("waiting for the jobs")?;
        row.sync
            .rounds
            .push(Sample::value(jobs as f64 / started.elapsed().as_secs_f64()));
        worker.stop().await;

        // tokio: the same jobs through a channel to a pool.
        type Reply = oneshot::Sender<Vec<u8>>;
        let (tx, rx) = mpsc::unbounded_channel::<(Vec<u8>, Reply)>();
        let mut results = Vec::with_capacity(jobs);
        for i in 0..jobs {
            let (rtx, rrx) = oneshot::channel();
            tx.send((i.to_le_bytes().to_vec(), rtx))
                .or_msg("queueing")?;
            results.push(rrx);
        }
        drop(tx);
        let started = Instant::now();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Vec::new();
        for _ in 0..CONCURRENCY {
            let rx = rx.clone();
            pool.push(tokio::spawn(async move {
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some((payload, reply)) = next else {
                        break;
                    };
                    let _ = reply.send(payload);
                }
            }));
        }
        for r in results {
            r.await.or_msg("a job's result")?;
        }
        if let Some(peer) = row.peer.as_mut() {
            peer.rounds
                .push(Sample::value(jobs as f64 / started.elapsed().as_secs_f64()));
        }
        for p in pool {
            let _ = p.await;
        }
    }
    Ok(vec![row.finish()])
}
