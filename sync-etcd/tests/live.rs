//! Live behaviour beyond the conformance suite: the key layout, loss when another client
//! deletes the key, several endpoints. Needs `SYNC_TEST_ETCD` and `etcdctl` on the PATH.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use common::{TestFn, TestResult};
use sync_core::{ElectOptions, ErrorKind, LockOptions};

fn config(endpoint: &str, namespace: &str) -> sync_etcd::Config {
    sync_etcd::Config::default()
        .with_endpoints([endpoint])
        .with_namespace(namespace)
        .with_ttl(sync_etcd::MIN_TTL)
}

fn unique(what: &str) -> String {
    format!("sync-live-{what}-{}", uuid::Uuid::new_v4().simple())
}

async fn etcdctl(endpoint: &str, args: &[&str]) -> Result<String, String> {
    let mut command = tokio::process::Command::new("etcdctl");
    // The user's ETCDCTL_* settings are for their own etcd, not this one.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETCDCTL_")) {
        command.env_remove(k);
    }
    let out = command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .await
        .map_err(|e| format!("etcdctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Contender keys are `<ns>/<escaped id>/<lease-hex>`, and the fencing token is the key's
/// create revision.
async fn key_layout(endpoint: String) -> TestResult {
    let ns = unique("layout");
    let client = sync_etcd::Client::connect(config(&endpoint, &ns))
        .await
        .map_err(|e| e.to_string())?;
    let guard = client
        .lock()
        .acquire("a/b", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let lease = client.lease_id().await.map_err(|e| e.to_string())?;
    let expected = format!("{ns}/a%2Fb/{lease}");
    let keys = etcdctl(
        &endpoint,
        &["get", "--prefix", "--keys-only", &format!("{ns}/")],
    )
    .await?;
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    if keys != [expected.as_str()] {
        return Err(format!(
            "keys under {ns}/: {keys:?}, expected [{expected:?}]"
        ));
    }
    let json = etcdctl(&endpoint, &["get", &expected, "-w", "json"]).await?;
    let rev = format!("\"create_revision\":{}", guard.fencing_token());
    if !json.contains(&rev) {
        return Err(format!(
            "fencing token {} is not the key's create revision: {json}",
            guard.fencing_token()
        ));
    }
    guard.release().await.map_err(|e| e.to_string())?;
    let left = etcdctl(
        &endpoint,
        &["get", "--prefix", "--keys-only", &format!("{ns}/")],
    )
    .await?;
    if !left.trim().is_empty() {
        return Err(format!("keys left after release: {left:?}"));
    }
    Ok(())
}

/// Another client deleting the holder's key fires `lost()` promptly; release is then LockLost.
async fn lost_when_key_deleted(endpoint: String) -> TestResult {
    let ns = unique("deleted");
    let client = sync_etcd::Client::connect(config(&endpoint, &ns))
        .await
        .map_err(|e| e.to_string())?;
    let guard = client
        .lock()
        .acquire("victim", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let elected = client
        .leader("group")
        .map_err(|e| e.to_string())?
        .elect("me", ElectOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/victim/")]).await?;
    let reason = tokio::time::timeout(Duration::from_secs(2), guard.lost())
        .await
        .map_err(|_| "lost() did not fire within 2s of the key's deletion".to_string())?;
    if !reason.contains("deleted") {
        return Err(format!("lost() reason: {reason}"));
    }
    if elected.is_revoked() {
        return Err("deleting the lock key revoked an unrelated leadership".into());
    }
    match guard.release().await {
        Err(e) if e.kind() == ErrorKind::LockLost => {}
        other => return Err(format!("release after the key was deleted: {other:?}")),
    }
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/group/")]).await?;
    tokio::time::timeout(Duration::from_secs(2), elected.revoked())
        .await
        .map_err(|_| "revoked() did not fire within 2s of the key's deletion".to_string())?;
    Ok(())
}

/// With several endpoints, one of them dead, the client still works.
async fn several_endpoints(endpoint: String) -> TestResult {
    let authority = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let url = format!(
        "etcd://127.0.0.1:1,{authority}/{}?ttl_ms=2000",
        unique("multi")
    );
    let client = tokio::time::timeout(Duration::from_secs(15), sync_etcd::Client::from_url(&url))
        .await
        .map_err(|_| "connecting with a dead endpoint in the list hung".to_string())?
        .map_err(|e| e.to_string())?;
    for i in 0..5 {
        let guard = tokio::time::timeout(
            Duration::from_secs(10),
            client.lock().acquire(&format!("m{i}"), LockOptions::new()),
        )
        .await
        .map_err(|_| "acquire hung".to_string())?
        .map_err(|e| e.to_string())?;
        guard.release().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A TCP proxy to etcd that can stall: while paused it forwards nothing (the connections stay
/// open), like a network partition.
async fn stalling_proxy(endpoint: &str) -> Result<(String, Arc<AtomicBool>), String> {
    let upstream = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let paused = Arc::new(AtomicBool::new(false));
    let p = paused.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, p.clone()));
            tokio::spawn(pump(ro, wi, p.clone()));
        }
    });
    Ok((format!("http://{addr}"), paused))
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    paused: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Renewals failing (a partition: the holder's connection stalls) fire `lost()` before the
/// lease can expire on the server, so the holder knows before another client is granted the
/// lock; afterwards release is LockLost.
async fn lost_before_expiry_when_renewals_fail(endpoint: String) -> TestResult {
    let ns = unique("partition");
    let (proxied, paused) = stalling_proxy(&endpoint).await?;
    let holder = sync_etcd::Client::connect(config(&proxied, &ns))
        .await
        .map_err(|e| e.to_string())?;
    let other = sync_etcd::Client::connect(config(&endpoint, &ns))
        .await
        .map_err(|e| e.to_string())?;
    let guard = holder
        .lock()
        .acquire("p", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let lost = guard.loss_signal();
    let lo = other.lock();
    let waiter = tokio::spawn(async move {
        let g = lo.acquire("p", LockOptions::new()).await;
        (g, lost.is_lost(), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled = Instant::now();
    paused.store(true, Ordering::SeqCst);
    let reason = tokio::time::timeout(sync_etcd::MIN_TTL, guard.lost())
        .await
        .map_err(|_| "lost() did not fire within one TTL of renewals stalling".to_string())?;
    let lost_after = stalled.elapsed();
    let (granted, holder_knew, at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| {
            "the other client was not granted the lock after the lease expired".to_string()
        })?
        .map_err(|e| e.to_string())?;
    let granted = granted.map_err(|e| e.to_string())?;
    if !holder_knew {
        return Err(
            "the other client was granted the lock before the holder's lost() fired".into(),
        );
    }
    eprintln!(
        "lost() {lost_after:?} after the stall ({reason}); other client granted {:?} after it",
        at.duration_since(stalled)
    );
    if !reason.contains("safe deadline") {
        return Err(format!("lost() reason: {reason}"));
    }
    paused.store(false, Ordering::SeqCst);
    match tokio::time::timeout(Duration::from_secs(10), guard.release()).await {
        Ok(Err(e)) if e.kind() == ErrorKind::LockLost => {}
        other => return Err(format!("release after the loss: {other:?}")),
    }
    granted.release().await.map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 4] = [
        ("live::lost_before_expiry_when_renewals_fail", |e| {
            Box::pin(lost_before_expiry_when_renewals_fail(e))
        }),
        ("live::key_layout", |e| Box::pin(key_layout(e))),
        ("live::lost_when_key_deleted", |e| {
            Box::pin(lost_when_key_deleted(e))
        }),
        ("live::several_endpoints", |e| {
            Box::pin(several_endpoints(e))
        }),
    ];
    common::run(&tests, libtest_mimic::Arguments::from_args())
}
