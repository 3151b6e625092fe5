//! Live behaviour beyond the conformance suite: the key layout, loss when another client
//! deletes the key, several endpoints, full-size task payloads and outputs, queue scans past
//! delayed retries, and paged map listings. Needs `SYNC_TEST_ETCD` and `etcdctl` on the PATH.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use common::{TestFn, TestResult};
use sync_conformance::proxy::Fault;
use sync_core::{
    Backend, ElectOptions, ErrorKind, HandlerError, Job, JobContext, JobState, Lock, LockOptions,
    MAX_PAYLOAD_LEN, MAX_VALUE_LEN, WorkerOptions,
};

fn unique(what: &str) -> String {
    common::unique("live", what)
}

async fn etcdctl(endpoint: &str, args: &[&str]) -> Result<String, String> {
    let out = common::etcdctl(endpoint)
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
    let client = common::connect(&endpoint, &ns).await?;
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
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
    let client = common::connect(&endpoint, &ns).await?;
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
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

/// A burst of held locks (more than the hub sends watch creates for at once) is watched in
/// full: deleting every key at once, before most of their watches exist, reaches every holder.
async fn every_key_of_a_burst_is_watched(endpoint: String) -> TestResult {
    use futures::{StreamExt, TryStreamExt};
    const HELD: usize = 400;
    let ns = unique("burst");
    let client = common::connect(&endpoint, &ns).await?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let guards = futures::stream::iter(0..HELD)
        .map(|i| {
            let lock = lock.clone();
            async move { lock.acquire(&format!("k{i}"), LockOptions::new()).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .map_err(|e| e.to_string())?;
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    let all_lost = futures::future::join_all(guards.iter().map(|g| g.lost()));
    let reasons = tokio::time::timeout(Duration::from_secs(10), all_lost)
        .await
        .map_err(|_| {
            let left = guards.iter().filter(|g| !g.is_lost()).count();
            format!("{left} of {HELD} holders did not hear of their key's delete within 10 s")
        })?;
    if let Some(r) = reasons.iter().find(|r| !r.contains("deleted")) {
        return Err(format!("lost() reason: {r}"));
    }
    Ok(())
}

/// A held key deleted while the client's shared watch stream is cut is still seen: the
/// stream is re-opened and the key's monitor resumes from the revision it watched from,
/// so the delete made meanwhile is replayed, not missed.
async fn lost_when_key_deleted_while_the_watch_stream_is_down(endpoint: String) -> TestResult {
    let ns = unique("stream-down");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    // A lease long enough that the short cut does not end it: the loss must come from the
    // watch.
    let config = common::config(&proxied, &ns).with_ttl(Duration::from_secs(10));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    // A follower opens the client's watch stream, so the held key's monitor joins it at once.
    let _follow = follow_empty_group(&client).await?;
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("victim", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    proxy.set(Fault::Reset);
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/victim/")]).await?;
    proxy.set(Fault::Pass);
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .map_err(|_| {
            "lost() did not fire within 5 s of a delete made while the stream was cut".to_string()
        })?;
    if !reason.contains("deleted") {
        return Err(format!("lost() reason: {reason}"));
    }
    drop(proxy);
    Ok(())
}

/// The store revision, read through `etcdctl`.
async fn revision(endpoint: &str, key: &str) -> Result<i64, String> {
    let out = etcdctl(endpoint, &["put", key, "x", "-w", "json"]).await?;
    let at = out
        .find("\"revision\":")
        .ok_or(format!("no revision in {out}"))?;
    let digits: String = out[at + 11..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().map_err(|_| format!("bad revision in {out}"))
}

/// Held keys' watches that etcd cancels because their start revision was compacted (the
/// stream was cut meanwhile) are read again: a key deleted meanwhile is lost, a key still
/// there is watched again, and its later delete is still seen.
async fn held_keys_are_read_again_after_a_compaction(endpoint: String) -> TestResult {
    let ns = unique("compacted");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let config = common::config(&proxied, &ns).with_ttl(Duration::from_secs(10));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let kept = (lock.acquire("kept", LockOptions::new()).await).map_err(|e| e.to_string())?;
    let victim = (lock.acquire("victim", LockOptions::new()).await).map_err(|e| e.to_string())?;
    // Past the monitors' grace: both keys are watched on the stream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Reset);
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/victim/")]).await?;
    let now = revision(&endpoint, &format!("{ns}/bump")).await?;
    etcdctl(&endpoint, &["compact", &now.to_string()]).await?;
    proxy.set(Fault::Pass);
    let reason = tokio::time::timeout(Duration::from_secs(5), victim.lost())
        .await
        .map_err(|_| "a key deleted before a compaction was not found lost".to_string())?;
    if !reason.contains("deleted") {
        return Err(format!("lost() reason: {reason}"));
    }
    if kept.is_lost() {
        return Err(format!(
            "a key still held was lost: {:?}",
            kept.lost().await
        ));
    }
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/kept/")]).await?;
    tokio::time::timeout(Duration::from_secs(5), kept.lost())
        .await
        .map_err(|_| "a key read again after a compaction was not watched again".to_string())?;
    drop(proxy);
    Ok(())
}

/// A held key whose watch etcd cancelled (compacted) is read again before it is watched
/// again. If its lock is released while that read cannot get through, the read stops with it
/// instead of asking again for as long as the outage lasts. On a private etcd, so that its
/// reads can be counted: a proxy holds the re-read back, the guard is dropped, the connection
/// is cut for a while, and once it is back no read may reach etcd.
async fn released_key_is_not_read_again(_endpoint: String) -> TestResult {
    let (_etcd, endpoint) = healthy_private_etcd("unread", &[]).await?;
    let ns = unique("unread");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let config = common::config(&proxied, &ns).with_ttl(Duration::from_secs(10));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lease = client.lease_id().await.map_err(|e| e.to_string())?;
    let guard = (client.lock().map_err(|e| e.to_string())?)
        .acquire("k", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    // Past the monitor's grace: the key is watched on the stream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Reset);
    // Two revisions on: the watch starts at the one after the key's, compacted too.
    revision(&endpoint, &format!("{ns}/bump")).await?;
    let now = revision(&endpoint, &format!("{ns}/bump")).await?;
    etcdctl(&endpoint, &["compact", &now.to_string()]).await?;
    proxy.hold_next(range_request(&format!("{ns}/k/{lease}")));
    proxy.set(Fault::Pass);
    tokio::time::timeout(Duration::from_secs(10), proxy.held())
        .await
        .map_err(|_| "the key whose watch was compacted was not read again".to_string())?;
    drop(guard);
    proxy.set(Fault::Reset);
    proxy.release();
    // Several of the re-read's retry pauses (200 ms) into the outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = common::metrics::counters(&endpoint).await?;
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = common::metrics::counters(&endpoint).await?;
    let after = common::metrics::delta(&before, &after);
    if let Some(reads) = after.get("Range") {
        return Err(format!(
            "{reads} read(s) after the outage, of a key released during it: {after:?}"
        ));
    }
    await_keys(&endpoint, &format!("{ns}/k/"), 0).await?;
    Ok(())
}

/// A gRPC-framed RangeRequest for `key` alone, as the proxy sees it on the wire.
fn range_request(key: &str) -> Vec<u8> {
    let len = u8::try_from(key.len()).expect("a short key");
    let mut bytes = vec![0, 0, 0, 0, len + 2, 0x0a, len];
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// A queue deeper than the waiters that count every older key down (64): the deep ones
/// watch a far older key and read again, and still every one is granted, one at a time.
async fn deep_queue_is_granted_one_at_a_time(endpoint: String) -> TestResult {
    const WAITERS: usize = 70;
    let ns = unique("deep");
    let holder = common::connect(&endpoint, &ns).await?;
    let held = holder
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("one", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let inside = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        let client = common::connect(&endpoint, &ns).await?;
        let lock = client.lock().map_err(|e| e.to_string())?;
        let inside = inside.clone();
        waiters.push(tokio::spawn(async move {
            let wait = LockOptions::new().with_wait(Duration::from_secs(30));
            let guard = lock.acquire("one", wait).await.map_err(|e| e.to_string())?;
            if inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst) != 0 {
                return Err("two holders at once".to_string());
            }
            tokio::task::yield_now().await;
            inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            guard.release().await.map_err(|e| e.to_string())?;
            drop(client);
            Ok(())
        }));
    }
    // Every waiter's key is in place (so the queue is deep) before the holder lets go.
    await_keys(&endpoint, &format!("{ns}/one/"), WAITERS + 1).await?;
    held.release().await.map_err(|e| e.to_string())?;
    for waiter in waiters {
        waiter.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// With several endpoints, one of them dead, the client still works.
async fn several_endpoints(endpoint: String) -> TestResult {
    let authority = common::authority(endpoint.as_str());
    let url = format!("etcd://127.0.0.1:1,{authority}/{}?ttl=2s", unique("multi"));
    let client = tokio::time::timeout(Duration::from_secs(15), sync_etcd::Client::from_url(&url))
        .await
        .map_err(|_| "connecting with a dead endpoint in the list hung".to_string())?
        .map_err(|e| e.to_string())?;
    for i in 0..5 {
        let guard = tokio::time::timeout(
            Duration::from_secs(10),
            client
                .lock()
                .map_err(|e| e.to_string())?
                .acquire(&format!("m{i}"), LockOptions::new()),
        )
        .await
        .map_err(|_| "acquire hung".to_string())?
        .map_err(|e| e.to_string())?;
        guard.release().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A client of `endpoint` in `ns` whose requests go first through a fault proxy, then, once
/// the proxy leaves one unanswered for a second, straight to `endpoint`.
async fn proxied_first(
    endpoint: &str,
    ns: &str,
) -> Result<(sync_conformance::proxy::FaultProxy, sync_etcd::Client), String> {
    let (proxy, proxied) = common::proxy(endpoint).await?;
    let config = common::config(&proxied, ns)
        .with_endpoints([proxied.as_str(), endpoint])
        .with_request_timeout(Duration::from_secs(1));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok((proxy, client))
}

/// An endpoint that accepts and never answers (a stopped member) is passed over: after it
/// freezes, reads still succeed (one waits out the request timeout, then goes to the next
/// endpoint), the held lock's lease is renewed through the live endpoint, and locking works.
/// Only a write whose answer the frozen endpoint swallowed may fail, once, saying so.
async fn a_frozen_endpoint_is_passed_over(endpoint: String) -> TestResult {
    let (proxy, client) = proxied_first(&endpoint, &unique("frozen")).await?;
    let (lock, map) = (
        client.lock().map_err(|e| e.to_string())?,
        client.map("m").map_err(|e| e.to_string())?,
    );
    let held = lock
        .acquire("held", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    map.write("k", b"v").await.map_err(|e| e.to_string())?;
    proxy.set(Fault::Freeze);
    let mut ambiguous = Vec::new();
    // Past two TTLs of freeze: a lease renewed only through the frozen endpoint would be lost.
    let until = Instant::now() + 2 * sync_etcd::MIN_TTL + Duration::from_millis(500);
    let mut rounds = 0;
    while Instant::now() < until {
        rounds += 1;
        map.read("k")
            .await
            .map_err(|e| format!("round {rounds}: a read with one endpoint frozen: {e}"))?;
        if let Err(e) = map.write("k", b"w").await {
            ambiguous.push(format!("write: {e}"));
        }
        let wait = LockOptions::new().with_wait(Duration::from_secs(5));
        match lock.acquire("other", wait).await {
            Ok(guard) => {
                if let Err(e) = guard.release().await {
                    ambiguous.push(format!("release: {e}"));
                }
            }
            Err(e) => ambiguous.push(format!("acquire: {e}")),
        }
    }
    if held.is_lost() {
        return Err(format!(
            "the held lock was lost while one of two endpoints was frozen: {:?}",
            held.loss_signal().reason()
        ));
    }
    if ambiguous.len() > 1
        || ambiguous
            .iter()
            .any(|e| !e.contains("may have been applied"))
    {
        return Err(format!(
            "calls failed with one endpoint frozen ({rounds} rounds): {ambiguous:?}"
        ));
    }
    held.release().await.map_err(|e| e.to_string())?;
    drop(proxy);
    Ok(())
}

/// A delete an endpoint holds unanswered (a follower that forwarded it to a leader that just
/// died) is sent again on the next endpoint a second later, not after the request timeout:
/// with a 30 s timeout, a release through a frozen endpoint returns, and a dropped guard's
/// lock is free for another client, within 10 s. Before, each waited out the 30 s. So is a
/// new session's lease grant.
async fn held_deletes_are_sent_again_elsewhere(endpoint: String) -> TestResult {
    let ns = unique("hedged-delete");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let config = common::config(&proxied, &ns)
        .with_endpoints([proxied.as_str(), endpoint.as_str()])
        .with_request_timeout(Duration::from_secs(30));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let (released, dropped) = (
        lock.acquire("released", LockOptions::new())
            .await
            .map_err(|e| e.to_string())?,
        lock.acquire("dropped", LockOptions::new())
            .await
            .map_err(|e| e.to_string())?,
    );
    proxy.set(Fault::Freeze);
    let bound = Duration::from_secs(10);
    tokio::time::timeout(bound, released.release())
        .await
        .map_err(|_| "a release through a frozen endpoint took 10 s".to_string())?
        .map_err(|e| format!("a release through a frozen endpoint: {e}"))?;
    drop(dropped);
    // A session started while the first endpoint is frozen: its lease grant is hedged too
    // (with this TTL the grant could otherwise wait 30 s).
    let late = common::config(&proxied, &ns)
        .with_endpoints([proxied.as_str(), endpoint.as_str()])
        .with_request_timeout(Duration::from_secs(30))
        .with_ttl(Duration::from_secs(30));
    let late = sync_etcd::Client::connect(late)
        .await
        .map_err(|e| e.to_string())?;
    let late_lock = late.lock().map_err(|e| e.to_string())?;
    let first = late_lock.acquire("late", LockOptions::new());
    tokio::time::timeout(bound, first)
        .await
        .map_err(|_| "a first acquire with the first endpoint frozen took 10 s".to_string())?
        .map_err(|e| format!("a first acquire with the first endpoint frozen: {e}"))?
        .release()
        .await
        .map_err(|e| e.to_string())?;
    let other = common::connect(&endpoint, &ns).await?;
    let other_lock = other.lock().map_err(|e| e.to_string())?;
    for id in ["released", "dropped"] {
        let wait = LockOptions::new().with_wait(bound);
        let guard = other_lock.acquire(id, wait).await.map_err(|e| {
            format!("lock {id:?} was not free 10 s after its holder let go of it: {e}")
        })?;
        guard.release().await.map_err(|e| e.to_string())?;
    }
    drop(proxy);
    Ok(())
}

/// Follows group `g` on `client`, which must first report it leaderless.
async fn follow_empty_group(client: &sync_etcd::Client) -> Result<sync_core::FollowStream, String> {
    sync_conformance::leader::follow_empty(client, "g").await
}

/// A follower whose watch sits on an endpoint that stopped answering (no events, no error)
/// still sees a new leader: the watch is trusted only so long (here two seconds), then the
/// follower reads again, which passes over the frozen endpoint. Well within the ten-second
/// fallback poll.
async fn follow_moves_off_a_frozen_endpoint(endpoint: String) -> TestResult {
    use futures::StreamExt;

    let ns = unique("follow-frozen");
    let (proxy, follower) = proxied_first(&endpoint, &ns).await?;
    let candidate = common::connect(&endpoint, &ns).await?;
    let mut follow = follow_empty_group(&follower).await?;
    proxy.set(Fault::Freeze);
    let elected = candidate
        .leader("g")
        .map_err(|e| e.to_string())?
        .elect("b", ElectOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let seen = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(report) = follow.next().await {
            if let Ok(Some(info)) = report {
                return Some(info);
            }
        }
        None
    })
    .await
    .map_err(|_| "the new leader was not reported within 8 s of a frozen endpoint".to_string())?;
    match seen {
        Some(info) if info.candidate == "b" => {}
        other => return Err(format!("the follower reported {other:?}")),
    }
    elected.resign().await.map_err(|e| e.to_string())?;
    drop(proxy);
    Ok(())
}

/// A private three-member cluster, once every member answers healthy.
async fn healthy_cluster() -> Result<common::private::PrivateCluster, String> {
    let cluster = common::private::PrivateCluster::start()?;
    until_healthy(&cluster).await?;
    Ok(cluster)
}

/// Waits (up to 20 s) until every member of `cluster` answers healthy.
async fn until_healthy(cluster: &common::private::PrivateCluster) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    for member in &cluster.endpoints {
        while etcdctl(member, &["endpoint", "health"]).await.is_err() {
            if Instant::now() > deadline {
                return Err("the private cluster was not healthy within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A lock held through a member that loses its quorum (the other two stopped): `lost()`
/// fires within one TTL, since no renewal can be confirmed; an acquire there fails within its
/// wait instead of hanging; once the quorum is back another client is granted the lock, and
/// so is this handle while the lost guard is still held (as for two processes), with a
/// greater token; the lost guard's release is then LockLost and leaves the new grant alone.
async fn lock_held_through_a_member_cut_off_from_the_quorum(_endpoint: String) -> TestResult {
    let cluster = healthy_cluster().await?;
    let ns = unique("quorum");
    let config =
        common::config(&cluster.endpoints[0], &ns).with_request_timeout(Duration::from_secs(1));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let guard = lock
        .acquire("q", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    cluster.signal(1, true)?;
    cluster.signal(2, true)?;
    let cut_off = Instant::now();
    let lost = tokio::time::timeout(sync_etcd::MIN_TTL + Duration::from_secs(1), guard.lost())
        .await
        .map(|reason| (reason, cut_off.elapsed()));
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        lock.acquire("r", LockOptions::new().with_wait(Duration::from_secs(3))),
    )
    .await;
    cluster.signal(1, false)?;
    cluster.signal(2, false)?;
    let (reason, after) =
        lost.map_err(|_| "lost() did not fire within one TTL (+1 s) of the quorum's loss")?;
    eprintln!("lost() {after:?} after the quorum's loss: {reason}");
    match refused {
        Ok(Err(e)) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout) => {
            eprintln!("acquire without a quorum: {e}");
        }
        Ok(other) => return Err(format!("acquire without a quorum gave {other:?}")),
        Err(_) => return Err("acquire without a quorum did not answer within 10 s".into()),
    }
    until_healthy(&cluster).await?;
    let other = common::connect(&cluster.endpoints[0], &ns).await?;
    let theirs = other
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("q", LockOptions::new().with_wait(Duration::from_secs(20)))
        .await
        .map_err(|e| format!("another client's acquire once the quorum was back: {e}"))?;
    theirs.release().await.map_err(|e| e.to_string())?;
    // As for another process: the lost guard, still held, does not hold this handle up.
    let again = lock
        .acquire("q", LockOptions::new().with_wait(Duration::from_secs(20)))
        .await
        .map_err(|e| {
            format!("acquire (the lost guard still held) once the quorum was back: {e}")
        })?;
    if again.fencing_token() <= guard.fencing_token() {
        return Err(format!(
            "fencing token {} after the outage, {} before",
            again.fencing_token(),
            guard.fencing_token()
        ));
    }
    match guard.release().await {
        Err(e) if e.kind() == ErrorKind::LockLost => {}
        other => return Err(format!("release of the lost guard: {other:?}")),
    }
    if again.is_lost() {
        return Err("releasing the lost guard lost the new one".into());
    }
    again.release().await.map_err(|e| e.to_string())
}

/// A follower connected to a member that loses its quorum (the other two stopped) is told,
/// instead of waiting silently for events that cannot come: its watch asks for a leader
/// (etcd cancels it without one) and its re-reads fail fast on a member without one.
async fn follow_reports_a_member_cut_off_from_the_quorum(_endpoint: String) -> TestResult {
    use futures::StreamExt;

    let cluster = healthy_cluster().await?;
    let config = common::config(&cluster.endpoints[0], &unique("quorum"))
        .with_request_timeout(Duration::from_secs(1));
    let client = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let mut follow = follow_empty_group(&client).await?;
    cluster.signal(1, true)?;
    cluster.signal(2, true)?;
    let told = tokio::time::timeout(Duration::from_secs(15), follow.next()).await;
    cluster.signal(1, false)?;
    cluster.signal(2, false)?;
    match told {
        // etcd's own word, not a timeout of ours: the request asked for a leader.
        Ok(Some(Err(e)))
            if e.kind() == ErrorKind::Unavailable && format!("{e:?}").contains("no leader") =>
        {
            Ok(())
        }
        Ok(other) => Err(format!(
            "the follower of a member without quorum got {other:?}"
        )),
        Err(_) => Err("the follower of a member without quorum heard nothing for 15 s".into()),
    }
}

/// Renewals failing (a partition: the holder's connection stalls) fire `lost()` before the
/// lease can expire on the server, so the holder knows before another client is granted the
/// lock; afterwards release is LockLost.
async fn lost_before_expiry_when_renewals_fail(endpoint: String) -> TestResult {
    let ns = unique("partition");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let holder = common::connect(&proxied, &ns).await?;
    let other = common::connect(&endpoint, &ns).await?;
    let guard = holder
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("p", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let lost = guard.loss_signal();
    let lo = other.lock().map_err(|e| e.to_string())?;
    let waiter = tokio::spawn(async move {
        let g = lo.acquire("p", LockOptions::new()).await;
        (g, lost.is_lost(), Instant::now())
    });
    // The other client is queued (its contender key written) before the stall.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = etcdctl(
            &endpoint,
            &["get", "--prefix", "--keys-only", &format!("{ns}/p/")],
        )
        .await?;
        if keys.lines().filter(|l| !l.is_empty()).count() == 2 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the other client did not queue within 5s: {keys:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stalled = Instant::now();
    // Connections stay open, nothing is forwarded either way: a partition.
    proxy.set(Fault::Freeze);
    // It fires at the safe deadline, within one TTL of the stall; the extra second only
    // absorbs a late timer on a loaded machine. What matters is checked below: the holder
    // knew before the other client was granted, and the reason is the deadline, not the
    // key's delete.
    let reason = tokio::time::timeout(sync_etcd::MIN_TTL + Duration::from_secs(1), guard.lost())
        .await
        .map_err(|_| {
            "lost() did not fire within one TTL (+1 s) of renewals stalling".to_string()
        })?;
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
    proxy.set(Fault::Pass);
    match tokio::time::timeout(Duration::from_secs(10), guard.release()).await {
        Ok(Err(e)) if e.kind() == ErrorKind::LockLost => {}
        other => return Err(format!("release after the loss: {other:?}")),
    }
    granted.release().await.map_err(|e| e.to_string())
}

/// A payload and an output of the largest accepted size round-trip through `run()` (records
/// are JSON, where bytes would be ~4x larger than etcd's request limit allows: payload and
/// output are kept raw beside the record), and the record itself stays small.
async fn task_full_size_payload_and_output(endpoint: String) -> TestResult {
    let ns = unique("payload");
    let client = common::connect(&endpoint, &ns).await?;
    let task = client.task().map_err(|e| e.to_string())?;
    let handler = Arc::new(|ctx: JobContext| async move {
        let mut out = ctx.payload;
        out.reverse();
        Ok::<_, HandlerError>(out)
    });
    let worker = task
        .work("big", handler, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    for len in [500 * 1024, MAX_PAYLOAD_LEN] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut expected = payload.clone();
        expected.reverse();
        let status = tokio::time::timeout(
            Duration::from_secs(20),
            task.run(Job::new("big", payload).with_max_attempts(1)),
        )
        .await
        .map_err(|_| format!("a {len}-byte job did not finish within 20s"))?
        .map_err(|e| format!("running a {len}-byte job: {e}"))?;
        if status.state != JobState::Succeeded {
            return Err(format!("a {len}-byte job: {status:?}"));
        }
        if status.output.as_deref() != Some(&expected[..]) {
            return Err(format!(
                "a {len}-byte job's output from run() is not the reversed payload ({:?} bytes)",
                status.output.as_ref().map(Vec::len)
            ));
        }
        let again = task.status(&status.id).await.map_err(|e| e.to_string())?;
        if again.output.as_deref() != Some(&expected[..]) {
            return Err(format!("a {len}-byte job's output from status() differs"));
        }
        let record = etcdctl(
            &endpoint,
            &[
                "get",
                "--print-value-only",
                &format!("{ns}/:task/jobs/{}", status.id),
            ],
        )
        .await?;
        if record.is_empty() || record.len() > 4096 {
            return Err(format!(
                "the job record is {} bytes; payload and output belong beside it",
                record.len()
            ));
        }
    }
    worker.stop().await;
    Ok(())
}

/// A handler output over MAX_PAYLOAD_LEN fails the attempt, with the reason in last_error.
async fn task_output_over_the_limit_fails(endpoint: String) -> TestResult {
    let ns = unique("output");
    let client = common::connect(&endpoint, &ns).await?;
    let task = client.task().map_err(|e| e.to_string())?;
    let handler = Arc::new(|ctx: JobContext| async move {
        let len = if ctx.attempt == 1 {
            MAX_PAYLOAD_LEN + 1
        } else {
            3
        };
        Ok::<_, HandlerError>(vec![7u8; len])
    });
    let worker = task
        .work("out", handler, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let run = |attempts: u32| {
        let task = task.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                task.run(
                    Job::new("out", "x")
                        .with_max_attempts(attempts)
                        .with_backoff(Duration::from_millis(10)),
                ),
            )
            .await
            .map_err(|_| "the job did not finish within 20s".to_string())?
            .map_err(|e| e.to_string())
        }
    };
    let failed = run(1).await?;
    let error = failed.last_error.clone().unwrap_or_default();
    if failed.state != JobState::Failed
        || failed.output.is_some()
        || !error.contains("output")
        || !error.contains(&MAX_PAYLOAD_LEN.to_string())
    {
        return Err(format!(
            "an over-long output: {:?} after {} attempts, last error {:?}, output of {:?} bytes",
            failed.state,
            failed.attempts,
            failed.last_error,
            failed.output.as_ref().map(Vec::len)
        ));
    }
    // A failed attempt like any other: retried.
    let retried = run(2).await?;
    if retried.state != JobState::Succeeded
        || retried.attempts != 2
        || retried.output.as_deref() != Some(&[7u8; 3][..])
    {
        return Err(format!(
            "an over-long output, then a retry: {:?} after {} attempts, output of {:?} bytes",
            retried.state,
            retried.attempts,
            retried.output.as_ref().map(Vec::len)
        ));
    }
    worker.stop().await;
    Ok(())
}

/// More delayed retries than one queue scan reads (64), all ahead of a startable job, do not
/// hold it up until a delay expires: the worker pages through the queue.
async fn task_delayed_retries_do_not_starve_newer_jobs(endpoint: String) -> TestResult {
    const DELAYED: usize = 70;
    let ns = unique("starve");
    let client = common::connect(&endpoint, &ns).await?;
    let task = client.task().map_err(|e| e.to_string())?;
    let handler = Arc::new(|ctx: JobContext| async move {
        if ctx.payload == b"retry" && ctx.attempt == 1 {
            return Err::<Vec<u8>, HandlerError>("the first attempt fails".into());
        }
        Ok(b"done".to_vec())
    });
    let worker = task
        .work("starve", handler, WorkerOptions::new().with_concurrency(8))
        .await
        .map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for _ in 0..DELAYED {
        let job = Job::new("starve", "retry")
            .with_max_attempts(2)
            .with_backoff(Duration::from_secs(30));
        ids.push(task.submit(job).await.map_err(|e| e.to_string())?);
    }
    // Every one of them failed once and waits 30 s for its retry, queued again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut waiting = 0;
        for id in &ids {
            let s = task.status(id).await.map_err(|e| e.to_string())?;
            if s.state == JobState::Queued && s.attempts == 1 {
                waiting += 1;
            }
        }
        if waiting == DELAYED {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {waiting} of {DELAYED} jobs failed once within 20s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let id = task
        .submit(Job::new("starve", "fresh"))
        .await
        .map_err(|e| e.to_string())?;
    let status = task
        .wait(&id, Some(Duration::from_secs(10)))
        .await
        .map_err(|e| {
            format!("a startable job behind {DELAYED} delayed retries did not finish: {e}")
        })?;
    if status.state != JobState::Succeeded {
        return Err(format!("the startable job: {status:?}"));
    }
    eprintln!(
        "a job behind {DELAYED} delayed retries finished in {:?}",
        started.elapsed()
    );
    worker.stop().await;
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

/// A corrupt queue entry whose start time is `u64::MAX` ms (far beyond any clock) must not
/// panic the worker's claim loop: later jobs still run.
async fn task_corrupt_far_future_queue_entry(endpoint: String) -> TestResult {
    let ns = unique("corrupt");
    let client = common::connect(&endpoint, &ns).await?;
    let task = client.task().map_err(|e| e.to_string())?;
    let queue_key = format!("{ns}/:task/queue/corrupt/not-a-job");
    etcdctl(&endpoint, &["put", &queue_key, &u64::MAX.to_string()]).await?;
    let handler = Arc::new(|ctx: JobContext| async move { Ok::<_, HandlerError>(ctx.payload) });
    let worker = task
        .work("corrupt", handler, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let id = task
        .submit(Job::new("corrupt", "fine"))
        .await
        .map_err(|e| e.to_string())?;
    let status = task
        .wait(&id, Some(Duration::from_secs(10)))
        .await
        .map_err(|e| format!("a job behind a corrupt queue entry did not finish: {e}"))?;
    if status.state != JobState::Succeeded {
        return Err(format!("the job behind a corrupt entry: {status:?}"));
    }
    worker.stop().await;
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

/// `entries()` over several pages (600 entries, a first page of 256): every entry, sorted by key, with
/// its version — and one consistent snapshot even while keys are written at both ends of the
/// range during the listing.
async fn map_entries_over_several_pages(endpoint: String) -> TestResult {
    use futures::StreamExt;

    let ns = unique("entries");
    let client = common::connect(&endpoint, &ns).await?;
    let map = client.map("big").map_err(|e| e.to_string())?;
    let prefixes = ["m/", "m ", "n", "\u{e4}/"];
    let written: Vec<(String, Vec<u8>, u64)> = futures::stream::iter(0..600)
        .map(|i| {
            let map = map.clone();
            async move {
                let key = format!("{}{i:04}", prefixes[i % prefixes.len()]);
                let value = format!("value {i}").into_bytes();
                let version = map.write(&key, &value).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((key, value, version))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let written: BTreeMap<String, (Vec<u8>, u64)> = written
        .into_iter()
        .map(|(k, v, version)| (k, (v, version)))
        .collect();

    // A writer adding keys that sort first and last in etcd's key order, one after another.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (map, stop) = (map.clone(), stop.clone());
        tokio::spawn(async move {
            let mut log = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let key = if n % 2 == 0 {
                    format!("0-{n:06}")
                } else {
                    format!("zz-{n:06}")
                };
                let version = map.write(&key, b"w").await.map_err(|e| e.to_string())?;
                log.push((key, version));
                n += 1;
            }
            Ok::<_, String>(log)
        })
    };
    let mut listings = Vec::new();
    for _ in 0..10 {
        listings.push(map.entries().await.map_err(|e| e.to_string())?);
        // Not a wait for anything: spaces the listings so the writer's keys land between them.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let log = writer.await.map_err(|e| e.to_string())??;
    if log.is_empty() {
        return Err("the concurrent writer wrote nothing".into());
    }

    for entries in &listings {
        if !entries.windows(2).all(|w| w[0].key < w[1].key) {
            return Err("entries() is not sorted by key".into());
        }
        let listed: BTreeMap<&str, &sync_core::Entry> =
            entries.iter().map(|e| (e.key.as_str(), e)).collect();
        for (key, (value, version)) in &written {
            match listed.get(key.as_str()) {
                Some(e) if &e.value == value && e.version == *version => {}
                other => return Err(format!("entry {key:?}: {other:?}")),
            }
        }
        // One snapshot: every write at or below the newest version listed is in it.
        let newest = entries.iter().map(|e| e.version).max().unwrap_or(0);
        for (key, version) in &log {
            if *version <= newest && !listed.contains_key(key.as_str()) {
                return Err(format!(
                    "{key:?} (version {version}) is missing from a listing that has version \
                     {newest}: not one snapshot"
                ));
            }
        }
        if entries.len()
            != written.len()
                + listed
                    .keys()
                    .filter(|k| k.starts_with("0-") || k.starts_with("zz-"))
                    .count()
        {
            return Err(format!("unexpected entries: {} listed", entries.len()));
        }
    }
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

/// `entries()` of a map larger than gRPC's 4 MiB response limit (10 values of 500 KiB).
async fn map_entries_beyond_the_grpc_message_limit(endpoint: String) -> TestResult {
    let ns = unique("entries-large");
    let client = common::connect(&endpoint, &ns).await?;
    let map = client.map("large").map_err(|e| e.to_string())?;
    let len = (500 * 1024).min(MAX_VALUE_LEN);
    for i in 0..10u8 {
        map.write(&format!("k{i}"), &vec![i; len])
            .await
            .map_err(|e| e.to_string())?;
    }
    let entries = map.entries().await.map_err(|e| e.to_string())?;
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    if keys != expected {
        return Err(format!("keys {keys:?}"));
    }
    for (i, e) in entries.iter().enumerate() {
        if e.value.len() != len || e.value.iter().any(|&b| b != i as u8) {
            return Err(format!("the value of {:?} differs", e.key));
        }
    }
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

/// A reaper that looked at a job while it was queued must not delete the in-flight marker a
/// worker writes when it claims the job a moment later: without it, that worker's death would
/// leave the job Running forever. The reaper's request is held back by a proxy until the claim
/// is made, then let through.
async fn reaper_spares_a_newer_claims_marker(endpoint: String) -> TestResult {
    let ns = unique("reaper");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let direct = common::connect(&endpoint, &ns).await?;
    let task = direct.task().map_err(|e| e.to_string())?;
    let id = task
        .submit(Job::new("held", "x"))
        .await
        .map_err(|e| e.to_string())?;
    // A marker with no claim while the job is Queued: the reaper's look finds it stale.
    let marker = format!("{ns}/:task/inflight/{id}");
    etcdctl(&endpoint, &["put", &marker, ""]).await?;
    proxy.hold_next(marker.as_bytes());
    let reaping = common::connect(&proxied, &ns).await?;
    let idle = Arc::new(|_: JobContext| async { Ok::<_, HandlerError>(Vec::new()) });
    let reaper = reaping
        .task()
        .map_err(|e| e.to_string())?
        .work("idle", idle, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), proxy.held())
        .await
        .map_err(|_| "the reaper sent nothing about the stale marker within 10s".to_string())?;
    // A worker claims the job while the reaper's request is held.
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let blocking = Arc::new(move |_: JobContext| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            futures::future::pending::<()>().await;
            Ok::<_, HandlerError>(Vec::new())
        }
    });
    let _holder = task
        .work("held", blocking, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .map_err(|_| "the job was not claimed within 10s".to_string())?;
    proxy.release();
    // Must not happen within: the reaper's request removing the new claim's marker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = etcdctl(&endpoint, &["get", "--keys-only", &marker]).await?;
    if left.trim().is_empty() {
        return Err("the reaper deleted the in-flight marker of a newer claim".into());
    }
    // The claiming worker dies: the job is redelivered and done by another.
    direct.kill().await;
    let other = common::connect(&endpoint, &ns).await?;
    let other_task = other.task().map_err(|e| e.to_string())?;
    let done = Arc::new(|_: JobContext| async { Ok::<_, HandlerError>(b"done".to_vec()) });
    let _worker = other_task
        .work("held", done, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let status = other_task
        .wait(&id, Some(Duration::from_secs(20)))
        .await
        .map_err(|e| format!("the job of a dead worker was not redelivered: {e}"))?;
    if status.state != JobState::Succeeded {
        return Err(format!("the redelivered job: {status:?}"));
    }
    reaper.stop().await;
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

/// The keys under `prefix`, once there are `n` of them (within 10 s).
async fn await_keys(endpoint: &str, prefix: &str, n: usize) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = etcdctl(endpoint, &["get", "--prefix", "--keys-only", prefix]).await?;
        let keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if keys.len() == n {
            return Ok(keys);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{n} keys under {prefix} expected within 10s: {keys:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Guards dropped by the hundred (more than the deletes a client keeps in flight) all have
/// their keys deleted, the same ids can then be taken again at once, and the lease stays.
async fn many_dropped_guards_are_all_released(endpoint: String) -> TestResult {
    let ns = unique("dropped");
    let client = common::connect(&endpoint, &ns).await?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let mut guards = Vec::new();
    for i in 0..300 {
        let guard = lock.acquire(&format!("id-{i}"), LockOptions::new()).await;
        guards.push(guard.map_err(|e| e.to_string())?);
    }
    drop(guards);
    await_keys(&endpoint, &format!("{ns}/"), 0).await?;
    for i in 0..300 {
        let again = lock.try_acquire(&format!("id-{i}")).await;
        if again.map_err(|e| e.to_string())?.is_none() {
            return Err(format!("id-{i} was still held after its guard was dropped"));
        }
    }
    Ok(())
}

/// A waiting acquire cancelled while etcd cannot be reached leaves its contender key behind
/// only until etcd is back: the cleanup is retried, so the key (on a lease that stays renewed)
/// does not block every later contender.
async fn cancelled_acquire_cleans_up_after_an_outage(endpoint: String) -> TestResult {
    let ns = unique("cancel-outage");
    let prefix = format!("{ns}/c/");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let holder = common::connect(&endpoint, &ns).await?;
    // A TTL that outlasts the outage: its lease stays renewed throughout.
    let config = common::config(&proxied, &ns).with_ttl(Duration::from_secs(5));
    let waiter = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let held = holder
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("c", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let lock = waiter.lock().map_err(|e| e.to_string())?;
    let acquire = tokio::spawn(async move { lock.acquire("c", LockOptions::new()).await });
    await_keys(&endpoint, &prefix, 2).await?;
    proxy.set(Fault::Reset);
    acquire.abort();
    let _ = acquire.await;
    // The injected outage: the cancelled acquire's delete fails throughout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Pass);
    held.release().await.map_err(|e| e.to_string())?;
    let third = common::connect(&endpoint, &ns).await?;
    let granted = third
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("c", LockOptions::new().with_wait(Duration::from_secs(5)))
        .await
        .map_err(|e| {
            format!("the cancelled acquire's key still blocks the lock 5s after the outage: {e}")
        })?;
    granted.release().await.map_err(|e| e.to_string())?;
    await_keys(&endpoint, &prefix, 0).await?;
    Ok(())
}

/// An acquire dropped while its create request is on the wire leaves no key once that
/// request lands: the create is still answered, and what it wrote is deleted. (The proxy holds
/// the request until the acquire is gone; a watch from before shows the put and its delete.)
async fn acquire_dropped_mid_create_leaves_no_key(endpoint: String) -> TestResult {
    let ns = unique("mid-create");
    let prefix = format!("{ns}/c/");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    let client = common::connect(&proxied, &ns).await?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let mut raw = etcd_client::Client::connect([endpoint.replace("etcd://", "http://")], None)
        .await
        .map_err(|e| e.to_string())?;
    let from = raw.get("/", None).await.map_err(|e| e.to_string())?;
    let from = from.header().map_or(0, |h| h.revision()) + 1;
    let watch = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(from);
    let mut events = raw
        .watch(prefix.as_str(), Some(watch))
        .await
        .map_err(|e| e.to_string())?;
    proxy.hold_next(prefix.as_bytes());
    let acquire = tokio::spawn(async move { lock.acquire("c", LockOptions::new()).await });
    tokio::time::timeout(Duration::from_secs(10), proxy.held())
        .await
        .map_err(|_| "the acquire sent no create request within 10s".to_string())?;
    acquire.abort();
    let _ = acquire.await;
    proxy.release();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 {
        let next = tokio::time::timeout_at(deadline, events.message()).await;
        let Ok(Ok(Some(resp))) = next else {
            return Err(format!(
                "the held create and the cleanup's delete within 10s; saw {seen:?}"
            ));
        };
        seen.extend(
            resp.events()
                .iter()
                .map(|e| format!("{:?}", e.event_type())),
        );
    }
    if seen[..2] != ["Put", "Delete"] {
        return Err(format!("the held create, then its delete: saw {seen:?}"));
    }
    await_keys(&endpoint, &prefix, 0).await?;
    Ok(())
}

/// A release whose delete goes unanswered sends it again on the next endpoint, and the
/// session writes that key name no more: the first delete, applied late, then finds nothing,
/// where it would otherwise delete the next holding's key (same lease, same name) and free
/// the lock under its holder. A proxy holds the delete back until the client gives up on
/// it; the test then sends that same delete itself, as etcd would apply it late (the proxy
/// cannot be trusted to: the client has cancelled the request on that connection). For a
/// release, a guard dropped (released in the background) and a try_acquire taking its key
/// back.
async fn release_applied_late_spares_the_next_holding(endpoint: String) -> TestResult {
    for how in [
        FirstDelete::Release,
        FirstDelete::Drop,
        FirstDelete::TryAcquire,
    ] {
        late_delete_spares_the_next_holding(&endpoint, how)
            .await
            .map_err(|e| format!("{how:?}: {e}"))?;
    }
    Ok(())
}

/// What sends the first delete of a contender key.
#[derive(Clone, Copy, Debug)]
enum FirstDelete {
    /// The release of a held lock.
    Release,
    /// A held guard dropped: released in the background.
    Drop,
    /// A try_acquire of a lock held elsewhere, taking its own key back.
    TryAcquire,
}

async fn late_delete_spares_the_next_holding(endpoint: &str, how: FirstDelete) -> TestResult {
    let ns = unique("late");
    let (proxy, client) = proxied_first(endpoint, &ns).await?;
    let key = format!(
        "{ns}/k/{}",
        client.lease_id().await.map_err(|e| e.to_string())?
    );
    let lock = client.lock().map_err(|e| e.to_string())?;
    let first = match how {
        FirstDelete::TryAcquire => None,
        _ => Some(
            lock.acquire("k", LockOptions::new())
                .await
                .map_err(|e| e.to_string())?,
        ),
    };
    let other = common::connect(endpoint, &ns).await?;
    let held_elsewhere = match how {
        FirstDelete::TryAcquire => Some(
            (other.lock().map_err(|e| e.to_string())?)
                .acquire("k", LockOptions::new())
                .await
                .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    // A DeleteRange of the key alone is framed like a Range of it.
    proxy.hold_next(range_request(&key));
    match (how, first) {
        (FirstDelete::Release, Some(first)) => first
            .release()
            .await
            .map_err(|e| format!("a release sent again on the next endpoint: {e}"))?,
        (FirstDelete::Drop, first) => drop(first),
        // Fails or not: the delete's outcome is unknown, and the cleanup sends it again.
        _ => drop(lock.try_acquire("k").await),
    }
    tokio::time::timeout(Duration::from_secs(1), proxy.held())
        .await
        .map_err(|_| "the delete did not reach the proxy".to_string())?;
    if let Some(guard) = held_elsewhere {
        guard.release().await.map_err(|e| e.to_string())?;
    }
    let second = lock
        .acquire("k", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    etcdctl(endpoint, &["del", &key]).await?;
    let prefix = format!("{ns}/k/");
    let keys = etcdctl(endpoint, &["get", "--prefix", "--keys-only", &prefix]).await?;
    if keys.trim().is_empty() {
        return Err(format!(
            "the late delete of {key} freed the next holding's lock"
        ));
    }
    second
        .release()
        .await
        .map_err(|e| format!("releasing the next holding: {e}"))?;
    drop(proxy);
    await_keys(endpoint, &prefix, 0).await?;
    Ok(())
}

/// An acquire whose create goes unanswered fails or is retried, and its cleanup deletes the
/// key. Should etcd apply that create late after all, the key it leaves on the client's live lease would
/// block the lock for every other client: the client deletes it when it lands. A proxy holds
/// the create back until the client gives up on it; once the cleanup's delete is done, the
/// test writes that same key itself, as the late create would. On a private etcd, so that the
/// cleanup's delete can be seen done.
async fn late_create_is_swept_up(_endpoint: String) -> TestResult {
    let (_etcd, endpoint) = healthy_private_etcd("late-create", &[]).await?;
    let ns = unique("late-create");
    let (proxy, client) = proxied_first(&endpoint, &ns).await?;
    let lease = client.lease_id().await.map_err(|e| e.to_string())?;
    let prefix = format!("{ns}/k/");
    let key = format!("{prefix}{lease}");
    let before = common::metrics::answered(&endpoint).await?;
    proxy.hold_next(prefix.as_bytes());
    // Granted on a retry (through the other endpoint), or failed: either way the first
    // create's outcome is unknown.
    let acquired = (client.lock().map_err(|e| e.to_string())?)
        .acquire("k", LockOptions::new())
        .await;
    tokio::time::timeout(Duration::from_secs(1), proxy.held())
        .await
        .map_err(|_| "the create did not reach the proxy".to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = common::metrics::answered(&endpoint).await?;
        let done = common::metrics::delta(&before, &done);
        if done.contains_key("DeleteRange") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the cleanup's delete within 10s: {done:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The late create lands once the lock is free again.
    if let Ok(guard) = acquired {
        guard.release().await.map_err(|e| e.to_string())?;
    }
    etcdctl(&endpoint, &["put", &format!("--lease={lease}"), &key, ""]).await?;
    await_keys(&endpoint, &prefix, 0)
        .await
        .map_err(|e| format!("the key of a late create stayed: {e}"))?;
    let other = common::connect(&endpoint, &ns).await?;
    let wait = LockOptions::new().with_wait(Duration::from_secs(5));
    (other.lock().map_err(|e| e.to_string())?)
        .acquire("k", wait)
        .await
        .map_err(|e| format!("another client after the late create: {e}"))?
        .release()
        .await
        .map_err(|e| e.to_string())?;
    drop(proxy);
    Ok(())
}

/// `elect` that adopts an existing contender key of its own lease (left over with another
/// value) proclaims its own candidate and value: followers never see the stale one.
async fn elect_adopting_a_key_proclaims_its_value(endpoint: String) -> TestResult {
    let ns = unique("adopt");
    let client = common::connect(&endpoint, &ns).await?;
    let lease = client.lease_id().await.map_err(|e| e.to_string())?;
    let key = format!("{ns}/g/{lease}");
    etcdctl(
        &endpoint,
        &["put", &format!("--lease={lease}"), &key, "stale"],
    )
    .await?;
    let leader = client.leader("g").map_err(|e| e.to_string())?;
    let elected = leader
        .elect("me", ElectOptions::new().with_value("fresh"))
        .await
        .map_err(|e| e.to_string())?;
    let seen = leader.leader().await.map_err(|e| e.to_string())?;
    match &seen {
        Some(info) if info.candidate == "me" && info.value == b"fresh" => {}
        other => return Err(format!("the adopted key shows {other:?}, not me/fresh")),
    }
    if seen.map(|i| i.term) != Some(elected.term()) {
        return Err("the leader's term is not the elected term".into());
    }
    elected.resign().await.map_err(|e| e.to_string())?;
    Ok(())
}

/// A holder whose renewals went unanswered past the safe deadline (while etcd, receiving them,
/// kept the lease alive) and whose release then failed in an outage: once etcd is reachable
/// again the old lease is revoked, so the lock frees at once rather than a TTL later.
async fn lost_lease_is_revoked_after_an_outage(endpoint: String) -> TestResult {
    let ns = unique("revoke-outage");
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    // Long enough that waiting for the lease's own expiry cannot pass for the fix.
    let ttl = Duration::from_secs(10);
    let config = common::config(&proxied, &ns).with_ttl(ttl);
    let holder = sync_etcd::Client::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    let lock = holder.lock().map_err(|e| e.to_string())?;
    let guard = lock
        .acquire("r", LockOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    // Renewals still reach etcd, their answers never come back.
    proxy.set(Fault::DropResponses);
    tokio::time::timeout(ttl, guard.lost())
        .await
        .map_err(|_| "lost() did not fire within one TTL of unanswered renewals".to_string())?;
    // The outage: the release and the revoke of the old lease (on the next call) both fail.
    proxy.set(Fault::Reset);
    if guard.release().await.is_ok() {
        return Err("release succeeded through a cut connection".into());
    }
    let _ = lock.try_acquire("next").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Pass);
    let restored = Instant::now();
    let other = common::connect(&endpoint, &ns).await?;
    let granted = other
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("r", LockOptions::new().with_wait(Duration::from_secs(4)))
        .await
        .map_err(|e| format!("the released lock stayed blocked after the outage: {e}"))?;
    eprintln!("granted {:?} after the outage ended", restored.elapsed());
    granted.release().await.map_err(|e| e.to_string())
}

/// Credentials sent to an etcd without authentication are a configuration mistake, named as
/// such: InvalidArgument saying that authentication is not enabled, not a generic Backend error.
async fn credentials_to_an_etcd_without_auth(endpoint: String) -> TestResult {
    let authority = common::authority(&endpoint);
    let url = format!("etcd://someone:pw@{authority}/{}", unique("noauth"));
    let config = sync_etcd::Config::from_url(&url).map_err(|e| e.to_string())?;
    let err = match sync_etcd::Client::connect(config).await {
        Ok(_) => return Err("connecting with credentials to an etcd without auth worked".into()),
        Err(e) => e,
    };
    let text = err.to_string();
    if err.kind() != ErrorKind::InvalidArgument || !text.contains("authentication is not enabled") {
        return Err(format!(
            "credentials to an etcd without auth: {:?}: {text}",
            err.kind()
        ));
    }
    if text.contains("pw@") || text.contains(":pw") {
        return Err(format!("the error echoes the password: {text}"));
    }
    Ok(())
}

/// A private etcd with authentication on and auth tokens that expire after 2 s: started for
/// one test on free loopback ports, with its data in a temporary directory; killed on drop.
struct AuthEtcd {
    _etcd: common::private::PrivateEtcd,
    client_url: String,
}

/// A private etcd named `name` with `flags`, once healthy, and its client URL.
async fn healthy_private_etcd(
    name: &str,
    flags: &[String],
) -> Result<(common::private::PrivateEtcd, String), String> {
    let etcd = common::private::PrivateEtcd::start(name, "http", flags)?;
    let client_url = format!("http://{}", etcd.authority);
    let deadline = Instant::now() + Duration::from_secs(15);
    while etcdctl(&client_url, &["endpoint", "health"]).await.is_err() {
        if Instant::now() > deadline {
            return Err("the private etcd did not become healthy within 15s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((etcd, client_url))
}

impl AuthEtcd {
    const TOKEN_TTL: Duration = Duration::from_secs(2);

    async fn start() -> Result<AuthEtcd, String> {
        let flags = [
            "--auth-token".to_string(),
            "simple".to_string(),
            "--auth-token-ttl".to_string(),
            Self::TOKEN_TTL.as_secs().to_string(),
        ];
        let (etcd, client_url) = healthy_private_etcd("auth", &flags).await?;
        let etcd = AuthEtcd {
            _etcd: etcd,
            client_url,
        };
        for args in [
            &["user", "add", "root", "--new-user-password=secret"][..],
            &["user", "grant-role", "root", "root"][..],
            // A user with no rights at all, for the calls that must be refused.
            &["user", "add", "nobody", "--new-user-password=nothing"][..],
            &["auth", "enable"][..],
        ] {
            etcdctl(&etcd.client_url, args).await?;
        }
        Ok(etcd)
    }

    /// A client of this etcd as `credentials` (`user:password`) in `namespace`, with the
    /// shortest lease.
    async fn client(
        &self,
        credentials: &str,
        namespace: &str,
    ) -> Result<sync_etcd::Client, String> {
        let authority = self.client_url.trim_start_matches("http://");
        let url = format!("etcd://{credentials}@{authority}/{namespace}");
        let config = sync_etcd::Config::from_url(&url)
            .map_err(|e| e.to_string())?
            .with_ttl(sync_etcd::MIN_TTL);
        sync_etcd::Client::connect(config)
            .await
            .map_err(|e| format!("connecting as {credentials}: {e}"))
    }

    /// Runs `etcdctl` as root.
    async fn root_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["--user=root:secret"];
        all.extend_from_slice(args);
        etcdctl(&self.client_url, &all).await
    }

    /// Adds user `holder` (password `pw`) with read and write rights under `<namespace>/`
    /// through its role `rw`.
    async fn add_holder(&self, namespace: &str) -> Result<(), String> {
        let prefix = format!("{namespace}/");
        let setup: [&[&str]; 4] = [
            &["user", "add", "holder", "--new-user-password=pw"],
            &["role", "add", "rw"],
            &[
                "role",
                "grant-permission",
                "rw",
                "--prefix=true",
                "readwrite",
                &prefix,
            ],
            &["user", "grant-role", "holder", "rw"],
        ];
        for args in setup {
            self.root_etcdctl(args).await?;
        }
        Ok(())
    }

    /// Takes the `holder`'s rights away (`grant: false`) or gives them back, through `root`.
    async fn holder_rights(root: &etcd_client::Client, grant: bool) -> TestResult {
        let mut auth = root.auth_client();
        let done = if grant {
            auth.user_grant_role("holder", "rw").await.map(drop)
        } else {
            auth.user_revoke_role("holder", "rw").await.map(drop)
        };
        done.map_err(|e| format!("changing the holder's rights: {e}"))
    }

    /// A raw etcd client as root: changes made through it land at once.
    async fn root_client(&self) -> Result<etcd_client::Client, String> {
        let options = etcd_client::ConnectOptions::new()
            .with_user("root", "secret")
            .with_auto_token_refresh(true);
        let authority = self.client_url.trim_start_matches("http://");
        etcd_client::Client::connect([authority], Some(options))
            .await
            .map_err(|e| format!("connecting as root: {e}"))
    }
}

/// A lock held across twice the auth token's TTL, with no calls of its own meanwhile, releases
/// cleanly: the client refreshes an expired token instead of failing every call Unauthorized.
async fn lock_outlives_the_auth_token(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let client = etcd.client("root:secret", &unique("auth")).await?;
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("outlives-token", LockOptions::new())
        .await
        .map_err(|e| format!("acquiring: {e}"))?;
    // The fault: the token expires while nothing but the lease keepalive talks to etcd.
    tokio::time::sleep(AuthEtcd::TOKEN_TTL * 2 + Duration::from_millis(500)).await;
    let released = guard.release().await;
    drop(etcd);
    released.map_err(|e| format!("releasing after the token expired: {e}"))
}

/// Watches added after the auth token of the client's watch stream expired still work: etcd
/// refuses them on that stream (an answer with no watch id), and the client opens a new
/// stream with a fresh token instead of leaving the waiter and the held key unwatched, or
/// asking again and again on the old one.
async fn watches_outlive_the_stream_token(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("stream-token");
    let a = etcd.client("root:secret", &ns).await?;
    let b = etcd.client("root:secret", &ns).await?;
    let (la, lb) = (
        a.lock().map_err(|e| e.to_string())?,
        b.lock().map_err(|e| e.to_string())?,
    );
    let acquire = |lock: &Arc<dyn Lock>, id: &'static str| {
        let lock = lock.clone();
        async move {
            (lock
                .acquire(id, LockOptions::new().with_wait(Duration::from_secs(20)))
                .await)
                .map_err(|e| format!("acquiring {id}: {e}"))
        }
    };
    // Held past the monitor's grace, so `a` has a watch stream open with its first token.
    let _kept = acquire(&la, "kept").await?;
    // The fault: that stream's token expires.
    tokio::time::sleep(AuthEtcd::TOKEN_TTL * 2 + Duration::from_millis(500)).await;

    // A waiter's watch, added on the old stream.
    let held_by_b = acquire(&lb, "contended").await?;
    let waiting = tokio::spawn(acquire(&la, "contended"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    held_by_b
        .release()
        .await
        .map_err(|e| format!("releasing: {e}"))?;
    let granted = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .map_err(|_| "the waiter was not granted within 5s of the release".to_string())?
        .map_err(|e| e.to_string())??;

    // Held past its monitor's grace: `a` then sits idle. Re-reading and re-watching after each
    // refusal instead would be a request per round trip, for as long as the lock is held.
    let url = etcd.client_url.clone();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let idle = common::metrics::over(&url, Duration::from_secs(1)).await?;
    let reads: u64 = ["Range", "Txn", "Watch"]
        .iter()
        .filter_map(|m| idle.get(*m))
        .sum();
    if reads > 2 {
        return Err(format!("requests in 1s of holding, idle: {idle:?}"));
    }

    // A held key's monitor, added after the expiry too, still sees the key deleted.
    let key = format!("{ns}/contended/");
    etcdctl(&url, &["--user=root:secret", "del", "--prefix", &key]).await?;
    let reason = tokio::time::timeout(Duration::from_secs(3), granted.lost())
        .await
        .map_err(|_| "lost() did not fire within 3s of the key's deletion".to_string())?;
    if !reason.contains("deleted") {
        return Err(format!("lost() reason: {reason}"));
    }
    drop((a, b));
    Ok(())
}

/// A held key whose watch and read etcd now refuses (the holder lost its rights, and the
/// watch had to be added again) is reported lost, once: the client cannot tell any more
/// whether it holds the lock, and does not keep asking.
async fn held_key_refused_to_its_holder_is_lost(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("refused");
    let url = etcd.client_url.clone();
    etcd.add_holder(&ns).await?;
    // Revoking through an open connection is quick: it must land within a monitor's grace.
    let root = etcd.root_client().await?;
    let client = etcd.client("holder:pw", &ns).await?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let first = (lock.acquire("first", LockOptions::new()).await).map_err(|e| e.to_string())?;
    // Watched on a stream whose token then expires.
    tokio::time::sleep(AuthEtcd::TOKEN_TTL * 2 + Duration::from_millis(500)).await;
    let second = (lock.acquire("second", LockOptions::new()).await).map_err(|e| e.to_string())?;
    // The fault: the rights go while `second` is in its grace. Its watch, added after it,
    // finds the stream's token stale; on the new stream both watches are refused.
    AuthEtcd::holder_rights(&root, false).await?;
    for (what, guard) in [("first", &first), ("second", &second)] {
        let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
            .await
            .map_err(|_| format!("{what}: lost() did not fire within 5s of the refusal"))?;
        if !reason.contains("refused") {
            return Err(format!("{what}: lost() reason: {reason}"));
        }
    }
    let after = common::metrics::over(&url, Duration::from_secs(1)).await?;
    let asked = after.get("Range").copied().unwrap_or(0);
    if asked > 2 {
        return Err(format!("reads in 1s after the loss: {after:?}"));
    }
    drop((first, second, client, root));
    Ok(())
}

/// A follower whose rights on the group are revoked is told once, and its stream ends: it
/// does not read the group again and again.
async fn follow_ends_when_its_reads_are_refused(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("follow-refused");
    etcd.add_holder(&ns).await?;
    let root = etcd.root_client().await?;
    let follower = etcd.client("holder:pw", &ns).await?;
    let candidate = etcd.client("root:secret", &ns).await?;
    let mut follow = follow_empty_group(&follower).await?;
    let elected = (candidate.leader("g").map_err(|e| e.to_string())?)
        .elect("a", ElectOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    AuthEtcd::holder_rights(&root, false).await?;
    // A change the follower must read, with no rights left to read it.
    elected.resign().await.map_err(|e| e.to_string())?;
    let refusal =
        sync_conformance::leader::refused_then_ends(&mut follow, Duration::from_secs(15)).await?;
    println!("seen: {refusal}");
    let after = common::metrics::over(&etcd.client_url, Duration::from_secs(1)).await?;
    if after.get("Range").copied().unwrap_or(0) > 1 {
        return Err(format!("reads in 1s after the stream ended: {after:?}"));
    }
    drop((follow, follower, candidate, root));
    Ok(())
}

/// A worker whose rights are revoked asks ever less often (not twice a second per loop for
/// as long as it runs), and takes jobs again once the rights are back.
async fn worker_without_rights_backs_off(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("worker-refused");
    etcd.add_holder(&ns).await?;
    let root = etcd.root_client().await?;
    let worker_client = etcd.client("holder:pw", &ns).await?;
    let submitter = etcd.client("root:secret", &ns).await?;
    let handler = Arc::new(|job: JobContext| async move { Ok::<_, HandlerError>(job.payload) });
    let worker = (worker_client.task().map_err(|e| e.to_string())?)
        .work("refused", handler, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    AuthEtcd::holder_rights(&root, false).await?;
    // A job for the worker to claim, with no rights left to claim it.
    let task = submitter.task().map_err(|e| e.to_string())?;
    let id = (task.submit(Job::new("refused", "x")).await).map_err(|e| e.to_string())?;
    // Every loop has met the refusal by now, and waits 4 s or more between two asks: at most
    // one each in the next 3 s, where a loop that does not back off asks 6 times.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = common::metrics::over(&etcd.client_url, Duration::from_secs(3)).await?;
    let asked: u64 = ["Range", "Txn"].iter().filter_map(|m| after.get(*m)).sum();
    if asked > 3 {
        return Err(format!("requests in 3s, 8s into the refusal: {after:?}"));
    }
    println!("requests in 3s, 8s into the refusal: {after:?}");
    AuthEtcd::holder_rights(&root, true).await?;
    // Each of the worker's loops backs off while refused (doubling, up to 30 s between asks):
    // one refused for 11 s or more may wait 16 s before it asks again, and the job must then
    // be claimed and finished. (Under 60 s, the whole test's bound, so that a failure says
    // what the job's state was.)
    sync_conformance::task::succeeded_within(&*task, &id, Duration::from_secs(40)).await?;
    worker.stop().await;
    drop((worker_client, submitter, root));
    Ok(())
}

/// A worker whose rights are revoked while a job runs records the job's outcome once the
/// rights are back: it does not give the outcome up and leave the job Running for as long as
/// the worker's lease lives.
async fn refused_outcome_is_recorded_once_the_rights_are_back(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("outcome-refused");
    etcd.add_holder(&ns).await?;
    let root = etcd.root_client().await?;
    let worker_client = etcd.client("holder:pw", &ns).await?;
    let submitter = etcd.client("root:secret", &ns).await?;
    let (mut gate, handler) = sync_conformance::task::Gate::new();
    let worker = (worker_client.task().map_err(|e| e.to_string())?)
        .work("refused", handler, WorkerOptions::new())
        .await
        .map_err(|e| e.to_string())?;
    let task = submitter.task().map_err(|e| e.to_string())?;
    let id = (task.submit(Job::new("refused", "x")).await).map_err(|e| e.to_string())?;
    gate.started(Duration::from_secs(10)).await?;
    // The fault: the rights go while the job runs, so its outcome's write is refused.
    AuthEtcd::holder_rights(&root, false).await?;
    let refused = |m: std::collections::BTreeMap<String, u64>| m.get("Txn").copied();
    let before = refused(common::metrics::refused(&etcd.client_url).await?).unwrap_or(0);
    gate.open();
    wait_until("the refused outcome", Duration::from_secs(10), || async {
        let now = refused(common::metrics::refused(&etcd.client_url).await?).unwrap_or(0);
        Ok(now > before)
    })
    .await?;
    AuthEtcd::holder_rights(&root, true).await?;
    // The write is tried again after 0.5 s, then 1 s, 2 s: well within 5 s.
    sync_conformance::task::succeeded_within(&*task, &id, Duration::from_secs(5)).await?;
    worker.stop().await;
    drop((worker_client, submitter, root));
    Ok(())
}

/// Polls `done` every 50 ms until it holds, for at most `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, done: F) -> TestResult
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let deadline = Instant::now() + limit;
    while !done().await? {
        if Instant::now() > deadline {
            return Err(format!("{what}: not seen within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A client whose password changed, holding a lock whose watch stream must be opened again
/// (cut, after the token expired), tells the holder instead of logging in again and again.
async fn held_key_lost_when_the_credentials_are_refused(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("credentials");
    etcd.add_holder(&ns).await?;
    let root = etcd.root_client().await?;
    let (proxy, proxied) = common::proxy(&etcd.client_url).await?;
    let url = format!("etcd://holder:pw@{}/{ns}", common::authority(&proxied));
    // A lease that outlasts the cut: the loss must come from the refused login.
    let config = (sync_etcd::Config::from_url(&url).map_err(|e| e.to_string()))?
        .with_ttl(Duration::from_secs(10));
    let client = (sync_etcd::Client::connect(config).await).map_err(|e| e.to_string())?;
    let lock = client.lock().map_err(|e| e.to_string())?;
    let guard = (lock.acquire("held", LockOptions::new()).await).map_err(|e| e.to_string())?;
    // Watched, then the faults: the password changes, the token expires, the stream is cut.
    tokio::time::sleep(Duration::from_secs(1)).await;
    root.auth_client()
        .user_change_password("holder", "changed")
        .await
        .map_err(|e| format!("changing the password: {e}"))?;
    tokio::time::sleep(AuthEtcd::TOKEN_TTL * 2 + Duration::from_millis(500)).await;
    proxy.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set(Fault::Pass);
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .map_err(|_| "lost() did not fire within 5s of the refused login".to_string())?;
    if !reason.contains("refused") {
        return Err(format!("lost() reason: {reason}"));
    }
    let idle = common::metrics::over(&etcd.client_url, Duration::from_secs(1)).await?;
    if idle.get("Watch").copied().unwrap_or(0) > 1 {
        return Err(format!(
            "watch streams opened in 1s after the loss: {idle:?}"
        ));
    }
    drop((guard, client, root, proxy));
    Ok(())
}

/// A lock whose release etcd refuses for good (the user lost its rights while holding) is
/// reported lost and its lease ends, so the key does not block everyone for as long as the
/// process lives; the release itself says why.
async fn unreleasable_lock_is_lost_and_its_lease_ends(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let ns = unique("unreleasable");
    let prefix = format!("{ns}/");
    etcd.add_holder(&ns).await?;
    let client = etcd.client("holder:pw", &ns).await?;
    let guard = client
        .lock()
        .map_err(|e| e.to_string())?
        .acquire("l", LockOptions::new())
        .await
        .map_err(|e| format!("acquiring: {e}"))?;
    let lost = guard.loss_signal();
    // The fault: the holder loses its rights while holding.
    (etcd
        .root_etcdctl(&["user", "revoke-role", "holder", "rw"])
        .await)?;
    match guard.release().await {
        Err(e) if e.kind() == ErrorKind::Unauthorized => {}
        other => return Err(format!("release without rights: {other:?}")),
    }
    if !lost.is_lost() {
        return Err("the guard whose release was refused was not reported lost".into());
    }
    // The key goes with the lease: within a TTL (revoked, or expired once renewals stopped).
    let deadline = Instant::now() + 3 * sync_etcd::MIN_TTL;
    loop {
        let left = (etcd
            .root_etcdctl(&["get", "--prefix", "--keys-only", &prefix])
            .await)?;
        if left.trim().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("the unreleasable key is still there: {left}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    drop(etcd);
    Ok(())
}

/// A worker on a client without the rights to claim jobs fails at `work()`, like every other
/// call, instead of starting and failing every claim in the background.
async fn work_without_rights_fails(_endpoint: String) -> TestResult {
    let etcd = AuthEtcd::start().await?;
    let client = etcd.client("nobody:nothing", &unique("rights")).await?;
    let handler = Arc::new(|ctx: JobContext| async move { Ok::<_, HandlerError>(ctx.payload) });
    let task = client.task().map_err(|e| e.to_string())?;
    let worked = task.work("anything", handler, WorkerOptions::new()).await;
    drop(etcd);
    match worked {
        Ok(_) => Err("work() started a worker on a client that may claim nothing".into()),
        Err(e) if e.kind() == ErrorKind::Unauthorized => Ok(()),
        Err(e) => Err(format!("work() without rights: {:?}: {e}", e.kind())),
    }
}

/// A claim of several jobs in one request whose answer is lost (it committed) is settled job
/// by job before the worker answers: each job is taken up by the worker whose claim committed
/// and runs once, none is stranded Running.
async fn task_batched_claim_answer_lost(endpoint: String) -> TestResult {
    const JOBS: usize = 4;
    let ns = unique("batch-lost");
    let direct = common::connect(&endpoint, &ns).await?;
    let task = direct.task().map_err(|e| e.to_string())?;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let job = Job::new("batch", vec![i as u8]).with_key(format!("batch-{i}"));
        ids.push(task.submit(job).await.map_err(|e| e.to_string())?);
    }
    let (proxy, proxied) = common::proxy(&endpoint).await?;
    // The worker's first claim names every queued job's claim key.
    proxy.hold_next("claims/batch-0");
    let worker_client = common::connect(&proxied, &ns).await?;
    let runs = Arc::new(std::sync::Mutex::new(BTreeMap::<Vec<u8>, usize>::new()));
    let counted = runs.clone();
    let handler = Arc::new(move |ctx: JobContext| {
        *counted
            .lock()
            .unwrap()
            .entry(ctx.payload.clone())
            .or_default() += 1;
        async move { Ok::<_, HandlerError>(ctx.payload) }
    });
    let _worker = worker_client
        .task()
        .map_err(|e| e.to_string())?
        .work("batch", handler, WorkerOptions::new().with_concurrency(8))
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(10), proxy.held())
        .await
        .map_err(|_| "the worker sent no claim within 10 s".to_string())?;
    // The claim reaches etcd; its answer (and every other one, briefly) is lost.
    proxy.set(Fault::DropResponses);
    proxy.release();
    let deadline = Instant::now() + Duration::from_secs(5);
    let committed = loop {
        let mut running = 0;
        for id in &ids {
            if task.status(id).await.map_err(|e| e.to_string())?.state == JobState::Running {
                running += 1;
            }
        }
        if running == JOBS {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!(
                "{running} of {JOBS} jobs Running 5 s after their claim"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    proxy.set(Fault::Pass);
    committed?;
    for id in &ids {
        let done = task
            .wait(id, Some(Duration::from_secs(30)))
            .await
            .map_err(|e| format!("job {id} whose claim answer was lost (stranded?): {e}"))?;
        if done.state != JobState::Succeeded || done.attempts != 1 {
            return Err(format!(
                "job {id} whose claim answer was lost ended {done:?}"
            ));
        }
    }
    let runs = runs.lock().unwrap().clone();
    if runs.len() != JOBS || runs.values().any(|n| *n != 1) {
        return Err(format!("handler runs per job: {runs:?}"));
    }
    etcdctl(&endpoint, &["del", "--prefix", &format!("{ns}/")]).await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, TestFn); 39] = [
        ("live::every_key_of_a_burst_is_watched", |e| {
            Box::pin(every_key_of_a_burst_is_watched(e))
        }),
        ("live::late_create_is_swept_up", |e| {
            Box::pin(late_create_is_swept_up(e))
        }),
        ("live::release_applied_late_spares_the_next_holding", |e| {
            Box::pin(release_applied_late_spares_the_next_holding(e))
        }),
        ("live::released_key_is_not_read_again", |e| {
            Box::pin(released_key_is_not_read_again(e))
        }),
        ("live::acquire_dropped_mid_create_leaves_no_key", |e| {
            Box::pin(acquire_dropped_mid_create_leaves_no_key(e))
        }),
        ("live::worker_without_rights_backs_off", |e| {
            Box::pin(worker_without_rights_backs_off(e))
        }),
        (
            "live::refused_outcome_is_recorded_once_the_rights_are_back",
            |e| Box::pin(refused_outcome_is_recorded_once_the_rights_are_back(e)),
        ),
        ("live::follow_ends_when_its_reads_are_refused", |e| {
            Box::pin(follow_ends_when_its_reads_are_refused(e))
        }),
        (
            "live::held_key_lost_when_the_credentials_are_refused",
            |e| Box::pin(held_key_lost_when_the_credentials_are_refused(e)),
        ),
        ("live::held_key_refused_to_its_holder_is_lost", |e| {
            Box::pin(held_key_refused_to_its_holder_is_lost(e))
        }),
        ("live::watches_outlive_the_stream_token", |e| {
            Box::pin(watches_outlive_the_stream_token(e))
        }),
        ("live::many_dropped_guards_are_all_released", |e| {
            Box::pin(many_dropped_guards_are_all_released(e))
        }),
        ("live::held_keys_are_read_again_after_a_compaction", |e| {
            Box::pin(held_keys_are_read_again_after_a_compaction(e))
        }),
        (
            "live::lock_held_through_a_member_cut_off_from_the_quorum",
            |e| Box::pin(lock_held_through_a_member_cut_off_from_the_quorum(e)),
        ),
        (
            "live::follow_reports_a_member_cut_off_from_the_quorum",
            |e| Box::pin(follow_reports_a_member_cut_off_from_the_quorum(e)),
        ),
        ("live::follow_moves_off_a_frozen_endpoint", |e| {
            Box::pin(follow_moves_off_a_frozen_endpoint(e))
        }),
        ("live::unreleasable_lock_is_lost_and_its_lease_ends", |e| {
            Box::pin(unreleasable_lock_is_lost_and_its_lease_ends(e))
        }),
        ("live::a_frozen_endpoint_is_passed_over", |e| {
            Box::pin(a_frozen_endpoint_is_passed_over(e))
        }),
        ("live::held_deletes_are_sent_again_elsewhere", |e| {
            Box::pin(held_deletes_are_sent_again_elsewhere(e))
        }),
        ("live::work_without_rights_fails", |e| {
            Box::pin(work_without_rights_fails(e))
        }),
        ("live::lock_outlives_the_auth_token", |e| {
            Box::pin(lock_outlives_the_auth_token(e))
        }),
        ("live::lost_lease_is_revoked_after_an_outage", |e| {
            Box::pin(lost_lease_is_revoked_after_an_outage(e))
        }),
        ("live::cancelled_acquire_cleans_up_after_an_outage", |e| {
            Box::pin(cancelled_acquire_cleans_up_after_an_outage(e))
        }),
        ("live::elect_adopting_a_key_proclaims_its_value", |e| {
            Box::pin(elect_adopting_a_key_proclaims_its_value(e))
        }),
        ("live::reaper_spares_a_newer_claims_marker", |e| {
            Box::pin(reaper_spares_a_newer_claims_marker(e))
        }),
        ("live::credentials_to_an_etcd_without_auth", |e| {
            Box::pin(credentials_to_an_etcd_without_auth(e))
        }),
        ("live::lost_before_expiry_when_renewals_fail", |e| {
            Box::pin(lost_before_expiry_when_renewals_fail(e))
        }),
        ("live::key_layout", |e| Box::pin(key_layout(e))),
        ("live::lost_when_key_deleted", |e| {
            Box::pin(lost_when_key_deleted(e))
        }),
        ("live::deep_queue_is_granted_one_at_a_time", |e| {
            Box::pin(deep_queue_is_granted_one_at_a_time(e))
        }),
        (
            "live::lost_when_key_deleted_while_the_watch_stream_is_down",
            |e| Box::pin(lost_when_key_deleted_while_the_watch_stream_is_down(e)),
        ),
        ("live::several_endpoints", |e| {
            Box::pin(several_endpoints(e))
        }),
        ("live::task_batched_claim_answer_lost", |e| {
            Box::pin(task_batched_claim_answer_lost(e))
        }),
        ("live::task_full_size_payload_and_output", |e| {
            Box::pin(task_full_size_payload_and_output(e))
        }),
        ("live::task_output_over_the_limit_fails", |e| {
            Box::pin(task_output_over_the_limit_fails(e))
        }),
        ("live::task_corrupt_far_future_queue_entry", |e| {
            Box::pin(task_corrupt_far_future_queue_entry(e))
        }),
        ("live::task_delayed_retries_do_not_starve_newer_jobs", |e| {
            Box::pin(task_delayed_retries_do_not_starve_newer_jobs(e))
        }),
        ("live::map_entries_over_several_pages", |e| {
            Box::pin(map_entries_over_several_pages(e))
        }),
        ("live::map_entries_beyond_the_grpc_message_limit", |e| {
            Box::pin(map_entries_beyond_the_grpc_message_limit(e))
        }),
    ];
    common::run(&tests, libtest_mimic::Arguments::from_args())
}
