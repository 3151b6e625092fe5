//! Local-only checks of the fault hooks the conformance suite relies on.

use std::time::Duration;

use sync_core::{ElectOptions, ErrorKind, LockOptions};
use sync_local::{Cluster, Config};

fn config() -> Config {
    Config::default().with_ttl(Duration::from_millis(200))
}

#[tokio::test]
async fn revoke_fires_lost_before_the_next_grant() {
    let cluster = Cluster::new();
    let (a, b) = (
        cluster.client(config()).unwrap(),
        cluster.client(config()).unwrap(),
    );
    let guard = a.lock().acquire("x", LockOptions::new()).await.unwrap();
    let lost = guard.loss_signal();
    let waiter = tokio::spawn({
        let lock = b.lock();
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
    assert!(a.lock().try_acquire("y").await.unwrap().is_some());
}

#[tokio::test]
async fn killed_client_fails_calls_and_frees_after_ttl() {
    let cluster = Cluster::new();
    let (a, b) = (
        cluster.client(config()).unwrap(),
        cluster.client(config()).unwrap(),
    );
    let guard = a.lock().acquire("x", LockOptions::new()).await.unwrap();
    let elected = a
        .leader("g")
        .unwrap()
        .elect("a", ElectOptions::new())
        .await
        .unwrap();
    a.kill();
    let err = a.lock().try_acquire("z").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    let started = tokio::time::Instant::now();
    let next = b
        .lock()
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
    let guard = a.lock().acquire("x", LockOptions::new()).await.unwrap();
    drop(a);
    let b = cluster.client(config()).unwrap();
    let wait = b
        .lock()
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
