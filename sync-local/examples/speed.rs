//! Timing figures for the local Lock against tokio's Mutex (prints numbers; asserts nothing):
//! `cargo run --release -p sync-local --example speed [ROUNDS]`.
//!
//! - uncontended acquire+release, ns/op: tokio Mutex; sync-local through the checked layer
//!   (what `Backend::lock` returns); sync-kit's checked layer around a lock that does nothing,
//!   and that do-nothing lock alone (so the layer's own share can be told apart);
//! - 8 tasks on one id, ops/s, against 8 tasks on one tokio Mutex;
//! - the same 8 tasks on a hot id with 1000 idle waiters on 1000 other (held) ids, against the
//!   same without them.
//!
//! Every scenario runs `ROUNDS` times (default 5), interleaved; the median is printed.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use sync_core::{
    Backend, Lock, LockGuard, LockOptions, LossSignal, Result,
    raw::{HeldLock, LossTrigger, loss_signal},
};
use sync_local::{Cluster, Config};

const UNCONTENDED_OPS: u32 = 200_000;
const TASKS: usize = 8;
const OPS_PER_TASK: u32 = 20_000;
const IDLE_WAITERS: usize = 1000;

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| sync_core::Error::new(sync_core::ErrorKind::Backend, e.to_string()))?;
    rt.block_on(run(rounds))
}

async fn run(rounds: usize) -> Result<()> {
    let client = Cluster::new().client(Config::default())?;
    let lock = client.lock()?;
    let noop_checked = sync_kit::checked::lock("noop", Arc::new(Noop::new()));
    let noop: Arc<dyn Lock> = Arc::new(Noop::new());

    let names = [
        "uncontended: tokio Mutex lock+unlock",
        "uncontended: sync-local acquire+release",
        "uncontended: sync-local acquire+drop",
        "uncontended: checked layer around a no-op lock",
        "uncontended: the no-op lock alone",
        "8 tasks, one id: tokio Mutex",
        "8 tasks, one id: sync-local",
        "8 tasks, hot id, no idle waiters",
        "8 tasks, hot id, 1000 idle waiters on other ids",
        "uncontended, 1000 idle waiters on other ids",
    ];
    let mut figures: Vec<Vec<Took>> = names.iter().map(|_| Vec::new()).collect();
    // `SPEED_ONLY=substring` runs only the scenarios whose name contains it (for a profiler).
    let only = std::env::var("SPEED_ONLY").unwrap_or_default();
    for _ in 0..rounds {
        for (i, name) in names.iter().enumerate() {
            if !name.contains(only.as_str()) {
                continue;
            }
            figures[i].push(match i {
                0 => tokio_uncontended().await,
                1 => lock_uncontended(lock.clone(), true).await,
                2 => lock_uncontended(lock.clone(), false).await,
                3 => lock_uncontended(noop_checked.clone(), true).await,
                4 => lock_uncontended(noop.clone(), true).await,
                5 => tokio_tasks().await,
                6 => lock_tasks(lock.clone(), "one").await?,
                7 => lock_tasks(lock.clone(), "hot").await?,
                8 => with_idle_waiters(&client, lock_tasks(lock.clone(), "hot")).await??,
                _ => with_idle_waiters(&client, lock_uncontended(lock.clone(), true)).await?,
            });
        }
    }
    println!(
        "{:<50} {:>14} {:>14}   (median of {rounds}; wall-clock min..max)",
        "", "wall-clock", "per CPU time"
    );
    for (name, mut took) in names.iter().zip(figures) {
        if took.is_empty() {
            continue;
        }
        let uncontended = name.starts_with("uncontended");
        let figure = |t: &Took, cpu: bool| {
            let time = if cpu { t.cpu } else { t.wall }.as_secs_f64();
            if uncontended {
                time * 1e9 / f64::from(t.ops)
            } else {
                f64::from(t.ops) / time
            }
        };
        let median = |took: &mut Vec<Took>, cpu: bool| {
            took.sort_by(|a, b| figure(a, cpu).total_cmp(&figure(b, cpu)));
            figure(&took[took.len() / 2], cpu)
        };
        let cpu = median(&mut took, true);
        let wall = median(&mut took, false);
        let (lo, hi) = (
            figure(&took[0], false),
            figure(&took[took.len() - 1], false),
        );
        let unit = if uncontended { "ns/op" } else { "ops/s" };
        println!("{name:<50} {wall:>14.0} {cpu:>14.0} {unit}   ({lo:.0}..{hi:.0})");
    }
    Ok(())
}

/// What a scenario took: its operations, wall-clock time and CPU time (every thread of the
/// process; on a loaded machine the wall clock also counts the time other processes ran).
struct Took {
    ops: u32,
    wall: Duration,
    cpu: Duration,
}

struct Timer {
    wall: Instant,
    cpu: Duration,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    fn stop(self, ops: u32) -> Took {
        Took {
            ops,
            wall: self.wall.elapsed(),
            cpu: cpu_time().saturating_sub(self.cpu),
        }
    }
}

/// The time every thread of this process has run on a CPU (Linux: the first field of each
/// thread's `schedstat`, in ns); zero where that cannot be read.
fn cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

async fn tokio_uncontended() -> Took {
    let m = tokio::sync::Mutex::new(0u64);
    let timer = Timer::start();
    for _ in 0..UNCONTENDED_OPS {
        let mut g = m.lock().await;
        *g += 1;
    }
    timer.stop(UNCONTENDED_OPS)
}

async fn lock_uncontended(lock: Arc<dyn Lock>, explicit: bool) -> Took {
    let timer = Timer::start();
    for _ in 0..UNCONTENDED_OPS {
        let g = lock.acquire("solo", LockOptions::new()).await;
        match (g, explicit) {
            (Ok(g), true) => {
                let _ = g.release().await;
            }
            (g, _) => drop(g),
        }
    }
    timer.stop(UNCONTENDED_OPS)
}

async fn tokio_tasks() -> Took {
    let m = Arc::new(tokio::sync::Mutex::new(0u64));
    let timer = Timer::start();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move {
                for _ in 0..OPS_PER_TASK {
                    *m.lock().await += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    timer.stop(TASKS as u32 * OPS_PER_TASK)
}

async fn lock_tasks(lock: Arc<dyn Lock>, id: &'static str) -> Result<Took> {
    let timer = Timer::start();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let lock = lock.clone();
            tokio::spawn(async move {
                for _ in 0..OPS_PER_TASK {
                    lock.acquire(id, LockOptions::new())
                        .await?
                        .release()
                        .await?;
                }
                Ok::<_, sync_core::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .map_err(|e| sync_core::Error::new(sync_core::ErrorKind::Backend, e.to_string()))??;
    }
    Ok(timer.stop(TASKS as u32 * OPS_PER_TASK))
}

/// Runs `scenario` while `IDLE_WAITERS` waiters wait, each on its own id held by another handle.
async fn with_idle_waiters<T>(
    client: &sync_local::Client,
    scenario: impl Future<Output = T>,
) -> Result<T> {
    let other = client.lock()?;
    let mut held = Vec::new();
    for i in 0..IDLE_WAITERS {
        held.push(
            other
                .acquire(&format!("idle-{i}"), LockOptions::new())
                .await?,
        );
    }
    let waiters: Vec<_> = (0..IDLE_WAITERS)
        .map(|i| {
            let other = other.clone();
            tokio::spawn(async move {
                other
                    .acquire(&format!("idle-{i}"), LockOptions::new())
                    .await
            })
        })
        .collect();
    // Let every waiter reach its wait.
    for _ in 0..10 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let figure = scenario.await;
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        let _ = w.await;
    }
    drop(held);
    Ok(figure)
}

/// A lock that grants everything at once, to time the layers around a backend.
struct Noop {
    _trigger: LossTrigger,
    signal: LossSignal,
}

impl Noop {
    fn new() -> Self {
        let (_trigger, signal) = loss_signal();
        Noop { _trigger, signal }
    }
}

#[async_trait]
impl Lock for Noop {
    async fn acquire(&self, id: &str, _opts: LockOptions) -> Result<LockGuard> {
        let signal = self.signal.clone();
        Ok(LockGuard::new(id, 1, signal, Box::new(NoopHeld)))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        self.acquire(id, LockOptions::new()).await.map(Some)
    }

    async fn release(&self, _id: &str) -> Result<()> {
        Ok(())
    }
}

struct NoopHeld;

#[async_trait]
impl HeldLock for NoopHeld {
    async fn release(&mut self, _: &str) -> Result<()> {
        Ok(())
    }

    fn release_in_background(self: Box<Self>, _: &str) {}
}
