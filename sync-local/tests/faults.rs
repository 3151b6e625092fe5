//! Local-only checks of the fault hooks the conformance suite relies on.

use std::time::Duration;

use sync_core::{Backend, ElectOptions, Elected, ErrorKind, LockGuard, LockOptions};
use sync_local::{Client, Cluster, Config};

fn config() -> Config {
    Config::default().with_ttl(Duration::from_millis(200))
}

fn two_clients(cluster: &Cluster) -> (Client, Client) {
    (
        cluster.client(config()).unwrap(),
        cluster.client(config()).unwrap(),
    )
}

/// `client` takes the free lock `id`.
async fn take(client: &Client, id: &str) -> LockGuard {
    let lock = client.lock().unwrap();
    lock.acquire(id, LockOptions::new()).await.unwrap()
}

/// `client` holds lock "x" and leads group "g" as candidate "a".
async fn holding(client: &Client) -> (LockGuard, Elected) {
    let guard = take(client, "x").await;
    let elected = client
        .leader("g")
        .unwrap()
        .elect("a", ElectOptions::new())
        .await
        .unwrap();
    (guard, elected)
}

#[tokio::test]
async fn revoke_fires_lost_before_the_next_grant() {
    let (a, b) = two_clients(&Cluster::new());
    let guard = take(&a, "x").await;
    let lost = guard.loss_signal();
    let waiter = tokio::spawn({
        let lock = b.lock().unwrap();
        async move {
            let g = lock.acquire("x", LockOptions::new()).await.unwrap();
            // The old holder must already know.
            assert!(
                lost.is_lost(),
                "granted before the holder heard of its loss"
            );
            g.fencing_token()
        }
    });
    a.revoke();
    let token = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("handed over")
        .unwrap();
    assert!(token > guard.fencing_token());
    assert_eq!(guard.lost().await, "session revoked");
    assert_eq!(
        guard.release().await.unwrap_err().kind(),
        ErrorKind::LockLost
    );
    // The revoked client opens a new session on its next call.
    assert!(a.lock().unwrap().try_acquire("y").await.unwrap().is_some());
}

#[tokio::test]
async fn killed_client_fails_calls_and_frees_after_ttl() {
    let (a, b) = two_clients(&Cluster::new());
    let (guard, elected) = holding(&a).await;
    a.kill();
    let err = a.lock().unwrap().try_acquire("z").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let started = tokio::time::Instant::now();
    let next = b
        .lock()
        .unwrap()
        .acquire("x", LockOptions::new().with_wait(Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "freed too early"
    );
    assert!(guard.is_lost() && elected.is_revoked());
    drop(next);
}

#[tokio::test]
async fn dropping_the_client_keeps_a_guard_alive() {
    let cluster = Cluster::new();
    let a = cluster.client(config()).unwrap();
    let guard = take(&a, "x").await;
    drop(a);
    let b = cluster.client(config()).unwrap();
    let wait = b
        .lock()
        .unwrap()
        .acquire(
            "x",
            LockOptions::new().with_wait(Duration::from_millis(600)),
        )
        .await;
    assert_eq!(wait.unwrap_err().kind(), ErrorKind::Timeout);
    assert!(!guard.is_lost());
    guard.release().await.unwrap();
}

#[tokio::test]
async fn config_rejects_bad_values() {
    let err = Cluster::new()
        .client(Config::default().with_ttl(Duration::ZERO))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("at least 50ms"), "{err}");
    assert!(Config::from_url("etcd://x").is_err());
    assert!(Config::from_url("local://?bogus=1").is_err());
}

/// A killed client releases nothing, even when its guard, leadership and client are dropped:
/// the lock and the leadership free only when the session expires, about one TTL later.
#[tokio::test]
async fn killed_client_dropped_frees_after_ttl_not_before_and_not_never() {
    let (a, b) = two_clients(&Cluster::new());
    let (guard, elected) = holding(&a).await;
    a.kill();
    let started = tokio::time::Instant::now();
    drop(guard);
    drop(elected);
    drop(a);
    let next = b
        .lock()
        .unwrap()
        .acquire("x", LockOptions::new().with_wait(Duration::from_secs(2)))
        .await
        .expect("the dead client's session expires and frees the lock");
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "a killed client's dropped guard released the lock at once"
    );
    let leads = b
        .leader("g")
        .unwrap()
        .elect("b", ElectOptions::new().with_wait(Duration::from_secs(2)))
        .await
        .expect("the dead client's leadership ends with its session");
    drop((next, leads));
}

/// Explicit releases and leader calls of a killed client fail with Closed and free nothing.
#[tokio::test]
async fn killed_client_calls_fail_closed_and_free_nothing() {
    let (a, b) = two_clients(&Cluster::new());
    let lock = a.lock().unwrap();
    let guard = lock.acquire("x", LockOptions::new()).await.unwrap();
    let _second = lock.acquire("y", LockOptions::new()).await.unwrap();
    let leader = a.leader("g").unwrap();
    let elected = leader.elect("a", ElectOptions::new()).await.unwrap();
    a.kill();
    assert_eq!(guard.release().await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        lock.release("y").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(
        elected.proclaim(b"v").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(leader.leader().await.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        elected.resign().await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    let lb = b.lock().unwrap();
    assert!(lb.try_acquire("x").await.unwrap().is_none(), "x was freed");
    assert!(lb.try_acquire("y").await.unwrap().is_none(), "y was freed");
    assert_eq!(
        b.leader("g")
            .unwrap()
            .leader()
            .await
            .unwrap()
            .map(|l| l.candidate),
        Some("a".to_string()),
        "the leadership was resigned"
    );
}

/// A job claimed by a client that is killed and then dropped is redelivered once the dead
/// session expires; it is not left Running forever.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_killed_worker_client_still_redelivers() {
    use std::sync::Arc;
    use sync_core::{Job, JobContext, JobState, WorkerOptions};
    use tokio::sync::Semaphore;

    let cluster = Cluster::new();
    let dying = cluster.client(config()).unwrap();
    let (gate, started) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let worker = dying
        .task()
        .unwrap()
        .work(
            "gated",
            Arc::new({
                let (gate, started) = (gate.clone(), started.clone());
                move |job: JobContext| {
                    let (gate, started) = (gate.clone(), started.clone());
                    async move {
                        started.add_permits(1);
                        if job.attempt == 1 {
                            let _ = gate.acquire().await;
                        }
                        Ok(Vec::new())
                    }
                }
            }),
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let other = cluster.client(config()).unwrap();
    let task = other.task().unwrap();
    let id = task.submit(Job::new("gated", "")).await.unwrap();
    started.acquire().await.unwrap().forget();
    dying.kill();
    gate.add_permits(1);
    worker.stop().await;
    drop(dying);
    let _alive = task
        .work(
            "gated",
            Arc::new(|_: JobContext| async { Ok(Vec::new()) }),
            WorkerOptions::new(),
        )
        .await
        .unwrap();
    let done = task
        .wait(&id, Some(Duration::from_secs(3)))
        .await
        .expect("redelivered after the dead session expired");
    assert_eq!((done.state, done.attempts), (JobState::Succeeded, 2));
}

/// A revoke racing an acquire never makes the acquire report a loss of a lock it never held:
/// it retries on a fresh session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_racing_acquire_is_not_a_loss() {
    let cluster = Cluster::new();
    let a = cluster.client(config()).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let revoker = std::thread::spawn({
        let (a, stop) = (a.clone(), stop.clone());
        move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                a.revoke();
            }
        }
    });
    let (lock, leader) = (a.lock().unwrap(), a.leader("g").unwrap());
    let mut result = Ok(());
    // Bounded in time too: under load a wait may end in a Timeout (every grant it got was lost
    // as it arrived), and 20 000 of those would take hours.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    for _ in 0..20_000 {
        if std::time::Instant::now() > until {
            break;
        }
        match lock.try_acquire("k").await {
            Ok(Some(g)) => drop(g),
            Ok(None) => {}
            Err(e) => {
                result = Err(format!("try_acquire: {e}"));
                break;
            }
        }
        match leader
            .elect("a", ElectOptions::new().with_wait(Duration::from_secs(1)))
            .await
        {
            Ok(e) => drop(e),
            // Not a loss: the wait ran out while each grant's session was revoked under it.
            Err(e) if e.kind() == ErrorKind::Timeout => {}
            Err(e) => {
                result = Err(format!("elect: {e}"));
                break;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    revoker.join().unwrap();
    result.unwrap();
}
