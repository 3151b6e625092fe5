//! What the lock costs, counted by etcd itself (its Prometheus `grpc_server_started_total`
//! counters and watcher gauges on `/metrics`), not timed: an uncontended acquire + release is
//! two Txns (create the contender key and read the owner; delete the key if it is still this
//! holding's) and opens no watch stream; a client holding many locks shares one watch stream
//! among their monitors. Needs `SYNC_TEST_ETCD`; run alone (it is its own test binary) so other
//! clients do not add to the counters.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{TestFn, TestResult};
use sync_core::{Backend, LockOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `/metrics` of `endpoint`.
async fn metrics(endpoint: &str) -> Result<String, String> {
    let authority = common::authority(endpoint);
    let mut stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// The value of the unlabelled metric `name` (a gauge such as the server's watcher count).
async fn gauge(endpoint: &str, name: &str) -> Result<u64, String> {
    let body = metrics(endpoint).await?;
    let value = body
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| format!("no {name} at {endpoint}/metrics"))?;
    let value: f64 = value.trim().parse().map_err(|e| format!("{name}: {e}"))?;
    Ok(value as u64)
}

/// `grpc_server_started_total` per method for the KV, Lease (unary) and Watch services.
async fn counters(endpoint: &str) -> Result<BTreeMap<String, u64>, String> {
    let body = metrics(endpoint).await?;
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_started_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let (Some(method), Some(service)) = (label("grpc_method"), label("grpc_service")) else {
            continue;
        };
        if !matches!(
            service.as_str(),
            "etcdserverpb.KV" | "etcdserverpb.Lease" | "etcdserverpb.Watch"
        ) {
            continue;
        }
        let value: f64 = value.trim().parse().map_err(|e| format!("{line}: {e}"))?;
        out.insert(method, value as u64);
    }
    if !out.contains_key("Txn") {
        return Err(format!(
            "no grpc_server_started_total{{grpc_method=\"Txn\"}} at {endpoint}/metrics"
        ));
    }
    Ok(out)
}

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

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
    if unary != 2 || d.get("Txn") != Some(&2) {
        return Err(format!(
            "an uncontended acquire + release cost {unary} requests ({d:?}); expected two Txns"
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

/// How many clients contend in [`contended_grants_cost_two_requests`], and how often each.
const CONTENDERS: usize = 8;
const ROUNDS: usize = 25;

/// Clients queued on one id are granted it on the delete event of the last older contender,
/// with no read: every grant costs its two Txns (create the key and count the older
/// contenders; delete it on release), as an uncontended one does, and each client one watch
/// stream at most.
async fn contended_grants_cost_two_requests(endpoint: String) -> TestResult {
    let namespace = format!("contended-{}", uuid::Uuid::new_v4().simple());
    let mut locks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CONTENDERS {
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
            for _ in 0..ROUNDS {
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
    let grants = (CONTENDERS * ROUNDS) as f64;
    let unary: u64 = UNARY.iter().map(|m| d.get(*m).copied().unwrap_or(0)).sum();
    let streams = d.get("Watch").copied().unwrap_or(0);
    println!(
        "{CONTENDERS} clients x {ROUNDS} grants of one id: {:.2} requests per grant ({d:?}), \
         {streams} watch streams",
        unary as f64 / grants
    );
    if unary as f64 > 2.0 * grants {
        return Err(format!(
            "{grants} contended grants cost {unary} requests ({d:?}); expected two per grant"
        ));
    }
    if streams > CONTENDERS as u64 {
        return Err(format!(
            "{CONTENDERS} contending clients opened {streams} watch streams; expected one each at most"
        ));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 3] = [
        (
            "requests::uncontended_acquire_release_costs_two_requests",
            |e| Box::pin(uncontended_acquire_release_costs_two_requests(e)),
        ),
        ("requests::held_locks_share_one_watch_stream", |e| {
            Box::pin(held_locks_share_one_watch_stream(e))
        }),
        ("requests::contended_grants_cost_two_requests", |e| {
            Box::pin(contended_grants_cost_two_requests(e))
        }),
    ];
    // One at a time: each counts what etcd serves while it runs.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    common::run(&tests, args)
}
