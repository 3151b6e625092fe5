//! What the lock costs, counted by etcd itself (its Prometheus `grpc_server_started_total`
//! counters and watcher gauges on `/metrics`), not timed: an uncontended acquire + release is
//! a Txn (create the contender key and read the owner) and a DeleteRange (delete it), and opens
//! no watch stream; a client holding many locks shares one watch stream
//! among their monitors. Needs `SYNC_TEST_ETCD`; run alone (it is its own test binary) so other
//! clients do not add to the counters.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    TestFn, TestResult,
    metrics::{counters, delta, gauge},
};
use sync_core::{Backend, LockOptions};

const UNARY: [&str; 6] = [
    "Range",
    "Put",
    "DeleteRange",
    "Txn",
    "LeaseGrant",
    "LeaseRevoke",
];

async fn uncontended_acquire_release_costs_two_requests(endpoint: String) -> TestResult {
    let config = sync_etcd::Config::default()
        .with_endpoints([endpoint.as_str()])
        .with_namespace(format!("requests-{}", uuid::Uuid::new_v4().simple()))
        .with_ttl(Duration::from_secs(10));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    // Warm up: connection and lease are in place before counting.
    lock.acquire("warm-up", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?
        .release()
        .await
        .map_err(|e| e.to_string())?;

    let mut best: Option<(u64, BTreeMap<String, u64>)> = None;
    let mut streams = 0;
    for round in 0..5 {
        let before = counters(&endpoint).await?;
        let guard = lock
            .acquire(&format!("id-{round}"), LockOptions::new())
            .await
            .map_err(|e| e.to_string())?;
        guard.release().await.map_err(|e| e.to_string())?;
        // Not a wait for an event: a window in which any request this round set off in the
        // background (there must be none) lands before the counters are read, so it is counted.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = counters(&endpoint).await?;
        let d = delta(&before, &after);
        let unary: u64 = UNARY.iter().map(|m| d.get(*m).copied().unwrap_or(0)).sum();
        eprintln!("round {round}: {unary} unary requests, by method {d:?}");
        streams += d.get("Watch").copied().unwrap_or(0);
        if best.as_ref().is_none_or(|(b, _)| unary < *b) {
            best = Some((unary, d));
        }
    }
    let (unary, d) = best.ok_or("no rounds")?;
    println!(
        "uncontended acquire + release: {unary} etcd requests ({} Txn, {} DeleteRange); \
         watch streams opened in 5 rounds: {streams}",
        d.get("Txn").copied().unwrap_or(0),
        d.get("DeleteRange").copied().unwrap_or(0),
    );
    // Every round counts here, not the best: a stream opened now and then is the fault.
    if streams != 0 {
        return Err(format!(
            "5 uncontended acquire + release opened {streams} watch streams; expected none"
        ));
    }
    if unary != 2 || d.get("Txn") != Some(&1) || d.get("DeleteRange") != Some(&1) {
        return Err(format!(
            "an uncontended acquire + release cost {unary} requests ({d:?}); expected a Txn \
             and a DeleteRange"
        ));
    }
    Ok(())
}

/// This process's resident set, as /proc tells it (for the report, not asserted).
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| format!("RSS {}", v.trim()))
            })
        })
        .unwrap_or_default()
}

/// How many locks [`held_locks_share_one_watch_stream`] holds.
const HELD: usize = 1000;

/// Waits (at most `limit`) until etcd's gauge `name` satisfies `ok`; its last value.
async fn gauge_until(
    endpoint: &str,
    name: &str,
    limit: Duration,
    ok: impl Fn(u64) -> bool,
) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let value = gauge(endpoint, name).await?;
        if ok(value) || tokio::time::Instant::now() > deadline {
            return Ok(value);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client holding many locks watches every held key (its loss monitor) on one shared
/// stream: etcd sees one stream opened and one watcher per lock, and the monitors work
/// (deleting one key fires that guard's `lost()`); released, the watchers are cancelled.
async fn held_locks_share_one_watch_stream(endpoint: String) -> TestResult {
    const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
    let config = sync_etcd::Config::default()
        .with_endpoints([endpoint.as_str()])
        .with_namespace(format!("held-{}", uuid::Uuid::new_v4().simple()))
        .with_ttl(Duration::from_secs(10));
    let namespace = config.namespace.clone();
    let watchers_before = gauge(&endpoint, WATCHERS).await?;
    let before = counters(&endpoint).await?;
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let mut guards = Vec::with_capacity(HELD);
    for chunk in 0..HELD / 50 {
        let ids: Vec<String> = (0..50).map(|i| format!("id-{}", chunk * 50 + i)).collect();
        let acquired =
            futures::future::join_all(ids.iter().map(|id| lock.acquire(id, LockOptions::new())))
                .await;
        for guard in acquired {
            guards.push(guard.map_err(|e| e.to_string())?);
        }
    }
    // Every monitor has added its watch once etcd counts a watcher per held key.
    let want = watchers_before + HELD as u64;
    let watchers = gauge_until(&endpoint, WATCHERS, Duration::from_secs(20), |n| n >= want).await?;
    let d = delta(&before, &counters(&endpoint).await?);
    let streams = d.get("Watch").copied().unwrap_or(0);
    println!(
        "{HELD} held locks: {streams} watch streams opened, {} watchers; test process {}",
        watchers - watchers_before,
        rss()
    );
    if watchers < want {
        return Err(format!(
            "only {} of {HELD} held locks' monitors are watching after 20 s",
            watchers.saturating_sub(watchers_before)
        ));
    }
    if streams > 2 {
        return Err(format!(
            "{HELD} held locks opened {streams} watch streams; expected at most 2"
        ));
    }
    // The shared stream delivers: a key deleted behind one guard's back fires its lost().
    let victim = guards.swap_remove(HELD / 2);
    let key = format!(
        "{namespace}/id-{}/{}",
        HELD / 2,
        client.lease_id().await.map_err(|e| e.to_string())?
    );
    let status = common::etcdctl(&endpoint)
        .args(["del", &key])
        .output()
        .await
        .map_err(|e| format!("etcdctl: {e}"))?;
    if !String::from_utf8_lossy(&status.stdout).starts_with('1') {
        return Err(format!("deleting {key}: {status:?}"));
    }
    tokio::time::timeout(Duration::from_secs(5), victim.lost())
        .await
        .map_err(|_| "lost() did not fire within 5 s of the key's deletion".to_string())?;
    if guards.iter().any(|g| g.is_lost()) {
        return Err("deleting one key fired another guard's lost()".into());
    }
    for guard in guards {
        guard.release().await.map_err(|e| e.to_string())?;
    }
    drop(victim);
    // Released guards cancel their watches on the shared stream.
    let left = gauge_until(&endpoint, WATCHERS, Duration::from_secs(10), |n| {
        n <= watchers_before
    })
    .await?;
    if left > watchers_before {
        return Err(format!(
            "{} watchers left on etcd 10 s after every lock was released",
            left - watchers_before
        ));
    }
    Ok(())
}

/// A handoff to the only waiter is decided by the holder's delete event, with no read: each
/// grant costs its two requests (a Txn creates the key and counts the older contenders; a
/// DeleteRange deletes it on release), as an uncontended one does.
async fn handoff_costs_two_requests(endpoint: String) -> TestResult {
    contended_grants(endpoint, 2, 50, 2.0).await
}

/// In a queue of eight a waiter watches only the contender just older than it (a release
/// wakes one waiter), so a grant costs at most one read more.
async fn queued_grants_cost_three_requests(endpoint: String) -> TestResult {
    contended_grants(endpoint, 8, 25, 3.0).await
}

/// `contenders` clients taking one id `rounds` times each: at most `per_grant` requests per
/// grant, and one watch stream per client at most.
async fn contended_grants(
    endpoint: String,
    contenders: usize,
    rounds: usize,
    per_grant: f64,
) -> TestResult {
    let namespace = format!("contended-{}", uuid::Uuid::new_v4().simple());
    let mut locks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..contenders {
        let config = sync_etcd::Config::default()
            .with_endpoints([endpoint.as_str()])
            .with_namespace(namespace.clone())
            .with_ttl(Duration::from_secs(10));
        let client = sync_etcd::Client::connect(config)
            .await
            .map_err(|e| e.to_string())?;
        locks.push(client.lock().map_err(|e| e.to_string())?);
        clients.push(client);
    }
    let before = counters(&endpoint).await?;
    let holders = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runs = locks.into_iter().map(|lock| {
        let holders = holders.clone();
        async move {
            for _ in 0..rounds {
                let guard = lock
                    .acquire("one", LockOptions::new())
                    .await
                    .map_err(|e| e.to_string())?;
                if holders.fetch_add(1, std::sync::atomic::Ordering::SeqCst) != 0 {
                    return Err("two holders at once".to_string());
                }
                tokio::task::yield_now().await;
                holders.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                guard.release().await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
    });
    for run in futures::future::join_all(runs).await {
        run?;
    }
    let d = delta(&before, &counters(&endpoint).await?);
    let grants = (contenders * rounds) as f64;
    let unary: u64 = UNARY.iter().map(|m| d.get(*m).copied().unwrap_or(0)).sum();
    let streams = d.get("Watch").copied().unwrap_or(0);
    println!(
        "{contenders} clients x {rounds} grants of one id: {:.2} requests per grant ({d:?}), \
         {streams} watch streams",
        unary as f64 / grants
    );
    if unary as f64 > per_grant * grants {
        return Err(format!(
            "{grants} grants among {contenders} clients cost {unary} requests ({d:?}); \
             expected {per_grant} per grant at most"
        ));
    }
    if streams > contenders as u64 {
        return Err(format!(
            "{contenders} contending clients opened {streams} watch streams; expected one each at most"
        ));
    }
    Ok(())
}

/// A client for the task cases: its own namespace, a 10 s TTL.
async fn task_client(endpoint: &str, namespace: &str) -> Result<sync_etcd::Client, String> {
    let config = sync_etcd::Config::default()
        .with_endpoints([endpoint])
        .with_namespace(namespace)
        .with_ttl(Duration::from_secs(10));
    sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())
}

/// How many jobs [`task_job_costs_three_requests_with_idle_workers`] runs while counting, and
/// before.
const JOBS: usize = 20;
const WARM_UP: usize = 9;

/// A job submitted while three workers (each its own client) sit idle costs its submit, one
/// claim and one finish: the copy of the queue every worker keeps learns of the job from the
/// shared watch stream, and only the worker it falls to tries it — the others neither read the
/// queue nor race for the job, and no reaper rescans after a finished job.
async fn task_job_costs_three_requests_with_idle_workers(endpoint: String) -> TestResult {
    use std::sync::Arc;
    use sync_core::{Job, JobContext, WorkerOptions};
    let namespace = format!("task-idle-{}", uuid::Uuid::new_v4().simple());
    let submitter = task_client(&endpoint, &namespace).await?;
    let task = submitter.task().map_err(|e| e.to_string())?;
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let mut clients = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let client = task_client(&endpoint, &namespace).await?;
        let tx = tx.clone();
        let handler = Arc::new(move |_: JobContext| {
            let _ = tx.send(());
            async { Ok::<_, sync_core::HandlerError>(Vec::new()) }
        });
        workers.push(
            client
                .task()
                .map_err(|e| e.to_string())?
                .work("idle", handler, WorkerOptions::new().with_concurrency(8))
                .await
                .map_err(|e| e.to_string())?,
        );
        clients.push(client);
    }
    let one_job = |i: usize| {
        let task = task.clone();
        async move {
            task.submit(Job::new("idle", vec![i as u8]))
                .await
                .map_err(|e| e.to_string())
        }
    };
    // Warm up: connections, leases (each worker's retention lease, granted at its first
    // finish) and every worker's copy of the queue are in place.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..WARM_UP {
        one_job(i).await?;
        tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .map_err(|_| "a warm-up job did not start within 10 s".to_string())?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = counters(&endpoint).await?;
    for i in WARM_UP..WARM_UP + JOBS {
        one_job(i).await?;
        tokio::time::timeout(Duration::from_secs(10), started.recv())
            .await
            .map_err(|_| format!("job {i} did not start within 10 s"))?;
        // The finish, and whatever the job set off, lands before the next one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = delta(&before, &counters(&endpoint).await?);
    let unary: u64 = UNARY.iter().map(|m| d.get(*m).copied().unwrap_or(0)).sum();
    let per_job = unary as f64 / JOBS as f64;
    println!("a job with 3 idle workers: {per_job:.2} requests ({d:?})");
    for w in workers {
        w.stop().await;
    }
    if let Ok(extra) = started.try_recv() {
        return Err(format!("a job started twice: {extra:?}"));
    }
    // Submit, claim, finish: 3; a little over for a safety net or a worker slow to take its
    // job (the next in line then tries it too).
    if per_job > 3.25 {
        return Err(format!(
            "{JOBS} jobs with 3 idle workers cost {unary} requests, {per_job:.2} each ({d:?}); \
             expected 3 (submit, claim, finish)"
        ));
    }
    Ok(())
}

/// A worker whose whole pool is free claims the queued jobs for it in one request: a txn of
/// nested txns, one per job, with no read of the queue or the records before it.
async fn task_pool_claimed_in_one_request(endpoint: String) -> TestResult {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use sync_core::{Job, JobContext, WorkerOptions};
    const POOL: usize = 8;
    let namespace = format!("task-batch-{}", uuid::Uuid::new_v4().simple());
    let submitter = task_client(&endpoint, &namespace).await?;
    let task = submitter.task().map_err(|e| e.to_string())?;
    for i in 0..POOL {
        task.submit(Job::new("batch", vec![i as u8]))
            .await
            .map_err(|e| e.to_string())?;
    }
    let worker_client = task_client(&endpoint, &namespace).await?;
    let running = Arc::new(AtomicUsize::new(0));
    let all = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (r, a, rel) = (running.clone(), all.clone(), release.clone());
    let handler = Arc::new(move |_: JobContext| {
        let (r, a, rel) = (r.clone(), a.clone(), rel.clone());
        async move {
            let released = rel.notified();
            if r.fetch_add(1, Ordering::SeqCst) + 1 == POOL {
                a.notify_one();
            }
            released.await;
            Ok::<_, sync_core::HandlerError>(Vec::new())
        }
    });
    let before = counters(&endpoint).await?;
    let worker = worker_client
        .task()
        .map_err(|e| e.to_string())?
        .work(
            "batch",
            handler,
            WorkerOptions::new().with_concurrency(POOL),
        )
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), all.notified())
        .await
        .map_err(|_| {
            format!(
                "{} of {POOL} jobs running after 10 s",
                running.load(Ordering::SeqCst)
            )
        })?;
    let d = delta(&before, &counters(&endpoint).await?);
    release.notify_waiters();
    worker.stop().await;
    let unary: u64 = UNARY.iter().map(|m| d.get(*m).copied().unwrap_or(0)).sum();
    println!("a worker starting with {POOL} queued jobs: {unary} requests until all run ({d:?})");
    // Lease grant, rights probe, one read of the queue and the workers (which registers the
    // worker), the reaper's first scan, and one claim for the whole pool.
    if unary > 5 {
        return Err(format!(
            "starting a worker and claiming {POOL} queued jobs cost {unary} requests ({d:?}); \
             expected 5 (one claim for the pool)"
        ));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 6] = [
        (
            "requests::uncontended_acquire_release_costs_two_requests",
            |e| Box::pin(uncontended_acquire_release_costs_two_requests(e)),
        ),
        ("requests::held_locks_share_one_watch_stream", |e| {
            Box::pin(held_locks_share_one_watch_stream(e))
        }),
        ("requests::handoff_costs_two_requests", |e| {
            Box::pin(handoff_costs_two_requests(e))
        }),
        ("requests::queued_grants_cost_three_requests", |e| {
            Box::pin(queued_grants_cost_three_requests(e))
        }),
        (
            "requests::task_job_costs_three_requests_with_idle_workers",
            |e| Box::pin(task_job_costs_three_requests_with_idle_workers(e)),
        ),
        ("requests::task_pool_claimed_in_one_request", |e| {
            Box::pin(task_pool_claimed_in_one_request(e))
        }),
    ];
    // One at a time: each counts what etcd serves while it runs.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    common::run(&tests, args)
}
