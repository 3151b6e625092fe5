//! Live behaviour beyond the conformance suite: what an acquire and release cost in HTTP
//! requests (counted by a proxy), exclusion with the real `consul lock` both ways, the
//! holder's loss and the lock-delay when its session is destroyed, and ACL tokens.
//!
//! Needs `SYNC_TEST_CONSUL` (and `SYNC_TEST_CONSUL_ACL`, whose `?token=` is the master token,
//! for the ACL case), and the `consul` binary for the interop cases: on PATH or where
//! `cargo xtask services up consul` fetched it.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use common::{
    Agent, Needs, TestFn, TestResult,
    counting::{CountingProxy, Request, list},
    err, unique,
};
use reqwest::Method;
use serde_json::json;
use sync_consul::{Client, Config};
use sync_core::{Backend, ErrorKind, HandlerError, Job, JobContext, LockOptions, WorkerOptions};
use tokio::{process::Child, time::Instant};

/// The `Flags` of Consul's `api.Lock`, which `consul lock` writes and checks.
const LOCK_FLAGS: u64 = 0x2ddc_cbc0_58a5_0c18;

/// The session's own background requests: its renewal and the blocking query (`index=`)
/// that watches it. Every other request counts, other `/v1/session/…` ones too (a plain read
/// of the session from an acquire would).
fn is_session_upkeep(r: &Request, session: &str) -> bool {
    r.is("PUT", &format!("/v1/session/renew/{session}")) || is_session_watch(r, session)
}

fn is_session_watch(r: &Request, session: &str) -> bool {
    r.is("GET", &format!("/v1/session/info/{session}")) && r.query.contains("index=")
}

/// An uncontended acquire and release with a live session cost two HTTP requests, both
/// `PUT /v1/txn`, counted by a proxy between the client and the agent.
async fn uncontended_acquire_release_is_two_requests(url: String) -> TestResult {
    let agent = Agent::from_url(&url)?;
    let proxy = CountingProxy::start(&agent.address).await?;
    let through = proxy.addr().to_string();
    let client = common::connect(&url, &unique("two"), |c| c.with_address(through)).await?;
    let session = client.session_id().await.map_err(err)?;
    // The proxy sees what the client sends: its session was created through it.
    let connecting = proxy.since(0);
    if !connecting.iter().any(|r| r.is("PUT", "/v1/session/create")) {
        return Err(format!(
            "the proxy saw no session created: {}",
            list(&connecting)
        ));
    }
    // The session's background tasks start with a plain read and a renewal: count from
    // when its watch blocks, so that only the upkeep above can come in between.
    let watching = proxy
        .wait_for(0, Duration::from_secs(10), |r| {
            is_session_watch(r, &session)
        })
        .await;
    watching.map_err(|e| format!("the session's watch never blocked: {e}"))?;
    let lock = client.lock().map_err(err)?;
    let mut upkeep = 0;
    for round in 0..5 {
        let mark = proxy.mark();
        let guard = lock
            .acquire("orders", LockOptions::new())
            .await
            .map_err(err)?;
        guard.release().await.map_err(err)?;
        let (own, counted): (Vec<Request>, Vec<Request>) = proxy
            .since(mark)
            .into_iter()
            .partition(|r| is_session_upkeep(r, &session));
        upkeep += own.len();
        let txns = counted.iter().filter(|r| r.is("PUT", "/v1/txn")).count();
        if counted.len() != 2 || txns != 2 {
            return Err(format!(
                "round {round}: an uncontended acquire+release sent {} (besides the session's \
                 own {}), not two PUT /v1/txn",
                list(&counted),
                list(&own)
            ));
        }
    }
    println!(
        "measured: acquire+release = 2 requests (PUT /v1/txn each) in each of 5 rounds; \
         the session's own renew/watch requests meanwhile: {upkeep}"
    );
    client.close().await.map_err(err)
}

/// A running `consul lock`, its stderr kept in a file for the failure messages.
struct ConsulLock {
    child: Child,
    stderr: PathBuf,
}

impl ConsulLock {
    /// `consul lock -http-addr=<address> -name=<name> <prefix> <script>`, without the user's
    /// CONSUL_* settings (they are for their own agent, not this one).
    fn spawn(
        consul: &Path,
        address: &str,
        name: &str,
        prefix: &str,
        script: &str,
    ) -> Result<ConsulLock, String> {
        let stderr = std::env::temp_dir().join(format!("{name}.stderr"));
        let file = std::fs::File::create(&stderr).map_err(err)?;
        let mut command = tokio::process::Command::new(consul);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CONSUL_")) {
            command.env_remove(k);
        }
        let child = command
            .arg("lock")
            .arg(format!("-http-addr={address}"))
            .arg(format!("-name={name}"))
            .args([prefix, script])
            // consul lock runs the script with $SHELL.
            .env("SHELL", "/bin/sh")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning consul lock: {e}"))?;
        Ok(ConsulLock { child, stderr })
    }

    /// What it printed on stderr, for a failure message.
    fn said(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("consul lock said: {:?}", text.trim())
    }

    /// Fails if it exited.
    fn still_running(&mut self) -> TestResult {
        match self.child.try_wait().map_err(err)? {
            None => Ok(()),
            Some(status) => Err(format!("consul lock exited ({status}); {}", self.said())),
        }
    }

    /// Waits (up to 10 s) for it to exit on its own.
    async fn exited(&mut self) -> TestResult {
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("consul lock failed ({status}); {}", self.said())),
            Ok(Err(e)) => Err(err(e)),
            Err(_) => Err(format!("consul lock did not exit; {}", self.said())),
        }
    }

    /// SIGTERM: consul lock stops its child and releases the lock, then exits.
    async fn terminate(&mut self) -> TestResult {
        if let Some(pid) = self.child.id() {
            // The shell's own `kill`: no procps needed.
            tokio::process::Command::new("sh")
                .args(["-c", &format!("kill -TERM {pid}")])
                .status()
                .await
                .map_err(|e| format!("kill: {e}"))?;
        }
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .map_err(|_| format!("consul lock did not exit after SIGTERM; {}", self.said()))?
            .map_err(err)?;
        Ok(())
    }
}

impl Drop for ConsulLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// While `consul lock <ns>/<id> sleep 30` holds, `try_acquire` of `id` in `<ns>` is None and
/// `acquire` waits (a bounded one times out); once consul lock lets go, a waiting `acquire`
/// gets the lock.
async fn consul_lock_excludes_library(url: String) -> TestResult {
    let consul = common::consul_binary()?;
    let agent = Agent::from_url(&url)?;
    let (ns, id) = (unique("interop"), "orders");
    let key = format!("{ns}/{id}/.lock");
    let mut ctl = ConsulLock::spawn(
        &consul,
        &agent.address,
        &unique("cli"),
        &format!("{ns}/{id}"),
        "sleep 30",
    )?;
    let held = agent.wait_held(&key, Duration::from_secs(10)).await;
    let held = held.map_err(|e| format!("{e}; {}", ctl.said()))?;
    if held["Flags"].as_u64() != Some(LOCK_FLAGS) {
        return Err(format!("consul lock wrote {held}, not api.Lock's flags"));
    }
    let client = common::connect(&url, &ns, |c| c).await?;
    let lock = client.lock().map_err(err)?;
    if let Some(g) = lock.try_acquire(id).await.map_err(err)? {
        return Err(format!(
            "try_acquire got {id} (token {}) while consul lock held it",
            g.fencing_token()
        ));
    }
    let bounded = LockOptions::new().with_wait(Duration::from_millis(500));
    match lock.acquire(id, bounded).await {
        Err(e) if e.kind() == ErrorKind::Timeout => {}
        other => {
            return Err(format!(
                "a bounded acquire while consul lock held it: {other:?}"
            ));
        }
    }
    let waiting = LockOptions::new().with_wait(Duration::from_secs(20));
    let mut waiter = Box::pin(lock.acquire(id, waiting));
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), &mut waiter).await {
        return Err(format!(
            "a waiting acquire finished while consul lock held it: {got:?}"
        ));
    }
    ctl.still_running()?;
    ctl.terminate().await?;
    let let_go = Instant::now();
    let guard = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .map_err(|_| "acquire still waiting 10s after consul lock let go".to_string())?
        .map_err(|e| format!("acquire after consul lock let go: {e}"))?;
    println!(
        "measured: handoff from consul lock's exit to acquire: {:?}",
        let_go.elapsed()
    );
    let now = agent.kv(&key).await?.unwrap_or_default();
    let ours = client.session_id().await.map_err(err)?;
    if now["Session"].as_str() != Some(ours.as_str()) {
        return Err(format!(
            "after the acquire the key is {now}, not held by {ours}"
        ));
    }
    guard.release().await.map_err(err)?;
    client.close().await.map_err(err)
}

/// Waits (up to 10 s) for `path` to exist.
async fn appears(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// While the library holds `id` in `<ns>`, `consul lock <ns>/<id> 'touch MARKER'` (through a
/// counting proxy) reads the lock key, recognises a lock and blocks on it without running its
/// child; once the library releases, the child runs and consul lock exits cleanly.
async fn library_excludes_consul_lock(url: String) -> TestResult {
    let consul = common::consul_binary()?;
    let agent = Agent::from_url(&url)?;
    let (ns, id) = (unique("interop"), "orders");
    let key = format!("{ns}/{id}/.lock");
    let client = common::connect(&url, &ns, |c| c).await?;
    let guard = client
        .lock()
        .map_err(err)?
        .acquire(id, LockOptions::new())
        .await
        .map_err(err)?;
    let proxy = CountingProxy::start(&agent.address).await?;
    let marker = std::env::temp_dir().join(unique("marker"));
    let script = format!("touch '{}'", marker.display());
    let address = proxy.addr().to_string();
    let mut ctl = ConsulLock::spawn(
        &consul,
        &address,
        &unique("cli"),
        &format!("{ns}/{id}"),
        &script,
    )?;
    // api.Lock reads the key, and only when a session holds it with the lock flags does it
    // wait: a blocking query (`index=`) on it, with no acquire before (once it holds, it
    // watches the key the same way). Foreign flags would make it exit instead.
    let kv = format!("/v1/kv/{key}");
    let is_acquire = |r: &Request| r.is("PUT", &kv) && r.query.contains("acquire=");
    let blocking = proxy
        .wait_for(0, Duration::from_secs(10), |r| {
            r.is("GET", &kv) && r.query.contains("index=")
        })
        .await;
    blocking.map_err(|e| format!("consul lock never waited on {key}: {e}; {}", ctl.said()))?;
    let sent = proxy.since(0);
    if sent.iter().any(is_acquire) || marker.exists() {
        return Err(format!(
            "consul lock took the lock the library holds: {}",
            list(&sent)
        ));
    }
    ctl.still_running()?;
    let mark = proxy.mark();
    guard.release().await.map_err(err)?;
    let acquired = proxy
        .wait_for(mark, Duration::from_secs(10), is_acquire)
        .await;
    acquired.map_err(|e| format!("consul lock did not acquire after the release: {e}"))?;
    if !appears(&marker).await {
        return Err(format!(
            "consul lock did not run its child after the release; {}",
            ctl.said()
        ));
    }
    let _ = std::fs::remove_file(&marker);
    ctl.exited().await?;
    client.close().await.map_err(err)
}

/// Destroying the holder's session (as an operator would) fires the holder's `lost()` at
/// once, seen by the session watch, well before the next renewal; a waiter in another client
/// gets the lock only after the holder's lock-delay, with a higher fencing token.
async fn destroyed_session_loses_then_hands_over_after_lock_delay(url: String) -> TestResult {
    const DELAY: Duration = Duration::from_secs(3);
    let ttl = Duration::from_secs(10);
    let agent = Agent::from_url(&url)?;
    let (ns, id) = (unique("delay"), "orders");
    let holder = common::connect(&url, &ns, |c| c.with_ttl(ttl).with_lock_delay(DELAY)).await?;
    let waiter = common::connect(&url, &ns, |c| c.with_ttl(ttl)).await?;
    let held = holder
        .lock()
        .map_err(err)?
        .acquire(id, LockOptions::new())
        .await
        .map_err(err)?;
    let lock = waiter.lock().map_err(err)?;
    let waiting = tokio::spawn(async move {
        let got = lock
            .acquire(id, LockOptions::new().with_wait(Duration::from_secs(30)))
            .await;
        (got, Instant::now())
    });
    // The waiter must be waiting, not granted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if waiting.is_finished() {
        return Err(format!(
            "the waiter finished while the lock was held: {:?}",
            waiting.await
        ));
    }
    let session = holder.session_id().await.map_err(err)?;
    let sent = Instant::now();
    agent
        .ok(Method::PUT, &format!("session/destroy/{session}"), None)
        .await?;
    let destroyed = Instant::now();
    let reason = tokio::time::timeout(ttl / 5, held.lost())
        .await
        .map_err(|_| format!("lost() did not fire within {:?} of the destroy", ttl / 5))?;
    let lost_at = Instant::now();
    let lost_after = lost_at.duration_since(sent);
    let (got, granted_at) = tokio::time::timeout(DELAY + Duration::from_secs(5), waiting)
        .await
        .map_err(|_| "the waiter was not granted within the lock-delay + 5s".to_string())?
        .map_err(err)?;
    let granted = got.map_err(|e| format!("the waiter: {e}"))?;
    if granted_at <= lost_at {
        return Err("the waiter was granted before the holder's lost() fired".into());
    }
    let handoff = granted_at.duration_since(destroyed);
    println!(
        "measured: lost() {lost_after:?} after the destroy was sent ({reason}); the waiter \
         granted {handoff:?} after the destroy answered (lock-delay {DELAY:?})"
    );
    if handoff < DELAY.mul_f64(0.9) || handoff > DELAY + Duration::from_secs(3) {
        return Err(format!(
            "the waiter was granted {handoff:?} after the destroy, outside [0.9 x the \
             lock-delay {DELAY:?}, the lock-delay + 3s]"
        ));
    }
    if granted.fencing_token() <= held.fencing_token() {
        return Err(format!(
            "fencing token {} after the loss is not above the lost holder's {}",
            granted.fencing_token(),
            held.fencing_token()
        ));
    }
    match held.release().await {
        Err(e) if e.kind() == ErrorKind::LockLost => {}
        other => {
            return Err(format!(
                "the lost holder's release: {other:?}, not LockLost"
            ));
        }
    }
    granted.release().await.map_err(err)?;
    holder.close().await.map_err(err)?;
    waiter.close().await.map_err(err)
}

/// `client`'s try of lock `id`.
async fn try_take(client: &Client, id: &str) -> Result<Option<sync_core::LockGuard>, String> {
    client
        .lock()
        .map_err(err)?
        .try_acquire(id)
        .await
        .map_err(err)
}

/// A release whose first send is held in flight (its answer never comes) and is then let
/// through late must not delete a later grant of the same key to the same client: the key's
/// new holder would keep believing it holds it while another client takes the free key.
async fn late_release_spares_a_later_grant(url: String) -> TestResult {
    use sync_conformance::proxy::{FaultProxy, hosts, through_all};
    let upstream = hosts(&url).ok_or("no agent address in the URL")?;
    let proxy = FaultProxy::start_all(&upstream).await.map_err(err)?;
    let through = through_all(&url, proxy.addrs());
    let (ns, id) = (unique("late-release"), "orders");
    let client = common::connect(&through, &ns, |c| {
        c.with_request_timeout(Duration::from_secs(1))
    })
    .await?;
    let other = common::connect(&url, &ns, |c| c).await?;
    let lock = client.lock().map_err(err)?;
    let first = lock.acquire(id, LockOptions::new()).await.map_err(err)?;
    // The release's first send is held; its resend, after the timeout, answers.
    proxy.hold_next(b"\"Verb\":\"check-session\"".to_vec());
    let released = first.release().await;
    let second = lock.acquire(id, LockOptions::new()).await.map_err(err)?;
    // The first send arrives now, after the second grant.
    proxy.release();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let taken = try_take(&other, id).await?;
    if let Some(taken) = taken {
        let lost = second.is_lost();
        let _ = taken.release().await;
        if !lost {
            return Err(format!(
                "another client was granted the lock while the second guard still holds it \
                 (not lost): the late release deleted the later grant (release: {released:?})"
            ));
        }
    }
    second.release().await.map_err(err)?;
    client.close().await.map_err(err)?;
    other.close().await.map_err(err)
}

/// How a grant's first send, held in flight, is given up on.
#[derive(Clone, Copy, Debug)]
enum GivenUp {
    /// Its answer never comes, it is sent again, and the resend is granted; the lock is then
    /// released.
    Resent,
    /// The caller stops waiting for it (the acquire is cancelled); its clean-up runs, and the
    /// lock is then taken and released again through the same client.
    Cancelled,
}

/// A grant whose first send is held in flight and let through only after the client gave up
/// on it must not lock the key again: nobody would release it while the client's session
/// lives, and every other client would wait for it.
async fn late_grant_is_fenced(url: String) -> TestResult {
    for how in [GivenUp::Resent, GivenUp::Cancelled] {
        late_grant_after(&url, how)
            .await
            .map_err(|e| format!("{how:?}: {e}"))?;
    }
    Ok(())
}

async fn late_grant_after(url: &str, how: GivenUp) -> TestResult {
    use sync_conformance::proxy::{FaultProxy, hosts, through_all};
    let upstream = hosts(url).ok_or("no agent address in the URL")?;
    let proxy = FaultProxy::start_all(&upstream).await.map_err(err)?;
    let through = through_all(url, proxy.addrs());
    let (ns, id) = (unique("late-grant"), "orders");
    let client = common::connect(&through, &ns, |c| {
        c.with_request_timeout(Duration::from_secs(1))
    })
    .await?;
    let other = common::connect(url, &ns, |c| c).await?;
    let lock = client.lock().map_err(err)?;
    proxy.hold_next(b"\"Verb\":\"lock\"".to_vec());
    match how {
        GivenUp::Resent => {
            let guard = lock.acquire(id, LockOptions::new()).await.map_err(err)?;
            guard.release().await.map_err(err)?;
        }
        GivenUp::Cancelled => {
            let cancelled = tokio::time::timeout(
                Duration::from_millis(300),
                lock.acquire(id, LockOptions::new()),
            );
            if let Ok(got) = cancelled.await {
                return Err(format!("the held grant answered: {got:?}"));
            }
            // The clean-up keeps the client's turn on the key until it is done.
            let deadline = Instant::now() + Duration::from_secs(10);
            let guard = loop {
                if let Some(g) = lock.try_acquire(id).await.map_err(err)? {
                    break g;
                }
                if Instant::now() > deadline {
                    return Err("the clean-up did not end within 10s".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            guard.release().await.map_err(err)?;
        }
    }
    let session = client.session_id().await.map_err(err)?;
    // The first send arrives now. Unfenced, it locks the key at once.
    proxy.release();
    let key = format!("{ns}/{id}/.lock");
    let admin = Agent::from_url(url)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(entry) = admin.kv(&key).await? {
            if entry["Session"].as_str() == Some(session.as_str()) {
                return Err(format!(
                    "the late grant locked the key for the client's session: {entry}"
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = try_take(&other, id).await?;
    taken
        .ok_or("another client could not take the free lock")?
        .release()
        .await
        .map_err(err)?;
    // The fence the client moved does not hold back its own later grants.
    let again = lock.acquire(id, LockOptions::new()).await.map_err(err)?;
    again.release().await.map_err(err)?;
    client.close().await.map_err(err)?;
    other.close().await.map_err(err)?;
    drop(proxy);
    Ok(())
}

/// A release that fails leaves the key held by the client's session; the next grant of it
/// through the same client re-takes it, and still gets a larger fencing token (Consul keeps an
/// entry's ModifyIndex when a write changes nothing, so the grant must change the value).
async fn regrant_after_a_failed_release_gets_a_new_token(url: String) -> TestResult {
    use sync_conformance::proxy::{Fault, FaultProxy, hosts, through_all};
    let upstream = hosts(&url).ok_or("no agent address in the URL")?;
    let proxy = FaultProxy::start_all(&upstream).await.map_err(err)?;
    let through = through_all(&url, proxy.addrs());
    let ns = unique("regrant");
    let client = common::connect(&through, &ns, |c| {
        c.with_request_timeout(Duration::from_secs(1))
    })
    .await?;
    let lock = client.lock().map_err(err)?;
    let first = lock
        .acquire("orders", LockOptions::new())
        .await
        .map_err(err)?;
    let token = first.fencing_token();
    // Refused connections: the release is never sent, and the key stays the session's.
    proxy.set(Fault::Reset);
    if first.release().await.is_ok() {
        return Err("the release succeeded through a proxy refusing every connection".into());
    }
    proxy.set(Fault::Pass);
    let second = lock
        .acquire("orders", LockOptions::new())
        .await
        .map_err(err)?;
    let again = second.fencing_token();
    second.release().await.map_err(err)?;
    client.close().await.map_err(err)?;
    if again <= token {
        return Err(format!(
            "the second grant's fencing token {again} is not above the first's {token}"
        ));
    }
    Ok(())
}

/// A leader that proclaimed resigns cleanly (its release is guarded by the index of its last
/// proclamation) and the group is free for the next candidate at once.
async fn resign_after_proclaim_hands_over(url: String) -> TestResult {
    let ns = unique("proclaim");
    let client = common::connect(&url, &ns, |c| c).await?;
    let other = common::connect(&url, &ns, |c| c).await?;
    let leader = client.leader("group").map_err(err)?;
    let elected = leader
        .elect("a", sync_core::ElectOptions::default())
        .await
        .map_err(err)?;
    elected.proclaim(b"one").await.map_err(err)?;
    elected.proclaim(b"two").await.map_err(err)?;
    elected.resign().await.map_err(|e| format!("resign: {e}"))?;
    let next = other.leader("group").map_err(err)?;
    let got = next
        .elect(
            "b",
            sync_core::ElectOptions::default().with_wait(Duration::from_secs(2)),
        )
        .await
        .map_err(|e| format!("b after a resigned: {e}"))?;
    drop(got);
    client.close().await.map_err(err)?;
    other.close().await.map_err(err)
}

/// A policy and a token of it, made with the master token; deleted by `remove`.
struct AclToken {
    policy: String,
    /// The policy's name (an update must repeat it).
    name: String,
    accessor: String,
    secret: String,
}

impl AclToken {
    async fn create(admin: &Agent, rules: &str) -> Result<AclToken, String> {
        let name = unique("policy");
        let policy = admin
            .ok(
                Method::PUT,
                "acl/policy",
                Some(json!({"Name": name, "Rules": rules})),
            )
            .await?;
        let policy = policy["ID"]
            .as_str()
            .ok_or("a policy without ID")?
            .to_string();
        let token = admin
            .ok(
                Method::PUT,
                "acl/token",
                Some(json!({"Policies": [{"ID": policy}]})),
            )
            .await?;
        let field = |f: &str| {
            token[f]
                .as_str()
                .map(str::to_string)
                .ok_or(format!("a token without {f}"))
        };
        Ok(AclToken {
            policy,
            name,
            accessor: field("AccessorID")?,
            secret: field("SecretID")?,
        })
    }

    async fn remove(self, admin: &Agent) -> TestResult {
        admin
            .ok(
                Method::DELETE,
                &format!("acl/token/{}", self.accessor),
                None,
            )
            .await?;
        admin
            .ok(Method::DELETE, &format!("acl/policy/{}", self.policy), None)
            .await?;
        Ok(())
    }
}

/// Session rights alone: what a token keeps when its key rights are taken away.
const SESSIONS: &str = r#"session_prefix "" { policy = "write" }"#;

/// Runs `case` with a token that may write the keys under a new namespace (`what`, made
/// unique) and sessions, then deletes the token.
async fn with_key_writer(
    url: &str,
    what: &str,
    case: impl AsyncFnOnce(&str, &str, &Agent, &AclToken) -> TestResult,
) -> TestResult {
    let admin = Agent::from_url(url)?;
    let ns = unique(what);
    let token = AclToken::create(&admin, &key_writer(&ns)).await?;
    let checked = case(url, &ns, &admin, &token).await;
    token.remove(&admin).await?;
    checked
}

/// The rules of a token that may write the keys under `ns` and sessions.
fn key_writer(ns: &str) -> String {
    format!(r#"key_prefix "{ns}/" {{ policy = "write" }} {SESSIONS}"#)
}

/// The fault: `token` keeps its session rights and loses those on the keys.
async fn take_key_rights(admin: &Agent, token: &AclToken) -> TestResult {
    set_rules(admin, token, SESSIONS).await
}

async fn set_rules(admin: &Agent, token: &AclToken, rules: &str) -> TestResult {
    let body = json!({"Name": token.name, "Rules": rules});
    let policy = format!("acl/policy/{}", token.policy);
    admin.ok(Method::PUT, &policy, Some(body)).await.map(drop)
}

/// Unauthorized, with a message that points at the token.
fn check_unauthorized<T: std::fmt::Debug>(what: &str, got: sync_core::Result<T>) -> TestResult {
    match got {
        Err(e) if e.kind() == ErrorKind::Unauthorized && e.to_string().contains("token") => {
            println!("seen: {what}: {e}");
            Ok(())
        }
        other => Err(format!(
            "{what}: {other:?}, not Unauthorized naming the token"
        )),
    }
}

/// A token with write rights on the namespace's keys and on sessions acquires and releases;
/// no token or an unknown one is Unauthorized at connect (creating the session); a token
/// with session rights but none on the keys is Unauthorized at acquire.
async fn acl_tokens(url: String) -> TestResult {
    let admin = Agent::from_url(&url)?;
    let ns = unique("acl");
    let writer = AclToken::create(&admin, &key_writer(&ns)).await?;
    let checked = match AclToken::create(&admin, SESSIONS).await {
        Ok(keyless) => {
            let checked = acl_cases(&url, &ns, &writer, &keyless).await;
            checked.and(keyless.remove(&admin).await)
        }
        Err(e) => Err(e),
    };
    writer.remove(&admin).await?;
    checked
}

async fn acl_cases(url: &str, ns: &str, writer: &AclToken, keyless: &AclToken) -> TestResult {
    let with = |token: Option<&str>| -> Result<Config, String> {
        let mut config = common::config(url, ns)?;
        config.token = token.map(str::to_string);
        Ok(config)
    };
    let client = Client::connect(with(Some(&writer.secret))?)
        .await
        .map_err(|e| format!("connect with a token that may: {e}"))?;
    let guard = client
        .lock()
        .map_err(err)?
        .acquire("orders", LockOptions::new())
        .await
        .map_err(|e| format!("acquire with a token that may: {e}"))?;
    guard.release().await.map_err(err)?;
    client.close().await.map_err(err)?;
    let none = Client::connect(with(None)?).await;
    check_unauthorized("connect without a token", none)?;
    let unknown = uuid::Uuid::new_v4().to_string();
    let wrong = Client::connect(with(Some(&unknown))?).await;
    check_unauthorized("connect with an unknown token", wrong)?;
    let client = Client::connect(with(Some(&keyless.secret))?)
        .await
        .map_err(|e| format!("connect with a token that may write sessions: {e}"))?;
    let acquired = client
        .lock()
        .map_err(err)?
        .acquire(
            "orders",
            LockOptions::new().with_wait(Duration::from_secs(5)),
        )
        .await;
    check_unauthorized("acquire with a token without key rights", acquired)?;
    let idle = Arc::new(|_: JobContext| async { Ok::<_, HandlerError>(Vec::new()) });
    let worker = (client.task().map_err(err)?)
        .work("orders", idle, WorkerOptions::new())
        .await;
    check_unauthorized("work with a token without key rights", worker)?;
    client.close().await.map_err(err)
}

/// A worker whose token loses its rights on the keys says so (an error naming the refusal)
/// within a rights check's period, rather than idling on a queue that only reads empty; with
/// its rights back, it takes jobs again.
async fn worker_says_when_its_rights_go(url: String) -> TestResult {
    with_key_writer(&url, "acl-worker", worker_rights).await
}

async fn worker_rights(url: &str, ns: &str, admin: &Agent, token: &AclToken) -> TestResult {
    common::logs::keep();
    let client = common::connect(url, ns, |c| c.with_token(&token.secret)).await?;
    let task = client.task().map_err(err)?;
    let done = Arc::new(|_: JobContext| async { Ok::<_, HandlerError>(b"done".to_vec()) });
    let worker = task
        .work("rights", done, WorkerOptions::new())
        .await
        .map_err(err)?;
    take_key_rights(admin, token).await?;
    // Every 30 s at most, plus the 10 s an idle worker trusts its blocking query.
    let said = "checking the rights on the queue";
    let deadline = Instant::now() + Duration::from_secs(50);
    while !common::logs::seen(said) {
        if Instant::now() > deadline {
            return Err(format!(
                "no error logged within 50s of the worker's rights going ({said:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set_rules(admin, token, &key_writer(ns)).await?;
    let id = task.submit(Job::new("rights", "x")).await.map_err(err)?;
    let within = Duration::from_secs(40);
    sync_conformance::task::succeeded_within(&*task, &id, within).await?;
    worker.stop().await;
    client.close().await.map_err(err)
}

/// A worker whose token loses its rights while a job runs records the job's outcome once the
/// rights are back: it does not give the outcome up (giving the claim up is refused too) and
/// leave the job Running for as long as the worker's session lives.
async fn refused_outcome_is_recorded_once_the_rights_are_back(url: String) -> TestResult {
    with_key_writer(&url, "acl-outcome", outcome_after_rights).await
}

async fn outcome_after_rights(url: &str, ns: &str, admin: &Agent, token: &AclToken) -> TestResult {
    common::logs::keep();
    let client = common::connect(url, ns, |c| c.with_token(&token.secret)).await?;
    let submitter = common::connect(url, ns, |c| c).await?;
    let (mut gate, handler) = sync_conformance::task::Gate::new();
    let worker = (client.task().map_err(err)?)
        .work("outcome", handler, WorkerOptions::new())
        .await
        .map_err(err)?;
    let task = submitter.task().map_err(err)?;
    let id = task.submit(Job::new("outcome", "x")).await.map_err(err)?;
    gate.started(Duration::from_secs(10)).await?;
    // The fault: the rights go while the job runs, so its outcome's write is refused.
    take_key_rights(admin, token).await?;
    gate.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::logs::seen_all(&[&id.0, "outcome"]) {
        if Instant::now() > deadline {
            return Err("no refused outcome logged within 10s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_rules(admin, token, &key_writer(ns)).await?;
    // The write is tried again after 0.5 s, then 1 s, 2 s: well within 5 s.
    sync_conformance::task::succeeded_within(&*task, &id, Duration::from_secs(5)).await?;
    worker.stop().await;
    submitter.close().await.map_err(err)?;
    client.close().await.map_err(err)
}

/// A holder whose token loses its rights on the held key is told at the next key check (it
/// can no longer see the key deleted), with the refusal as the reason.
async fn held_key_refused_to_its_holder_is_lost(url: String) -> TestResult {
    with_key_writer(&url, "acl-refused", lost_with_rights).await
}

async fn lost_with_rights(url: &str, ns: &str, admin: &Agent, token: &AclToken) -> TestResult {
    let client = common::connect(url, ns, |c| c.with_token(&token.secret)).await?;
    let guard = (client.lock().map_err(err)?)
        .acquire("held", LockOptions::new())
        .await
        .map_err(err)?;
    // Held across a key check (every half TTL) while the rights last: still held.
    tokio::time::sleep(sync_consul::MIN_TTL / 2 + Duration::from_secs(1)).await;
    if guard.is_lost() {
        return Err(format!(
            "lost with its rights: {:?}",
            guard.loss_signal().reason()
        ));
    }
    take_key_rights(admin, token).await?;
    let within = sync_consul::MIN_TTL;
    let reason = tokio::time::timeout(within, guard.lost())
        .await
        .map_err(|_| format!("lost() did not fire within {within:?} of the rights going"))?;
    if !reason.contains("refused") {
        return Err(format!("lost() reason: {reason}"));
    }
    client.close().await.map_err(err)
}

/// A follower whose token loses its rights on the group's key is told once, and its stream
/// ends: it does not ask again and again.
async fn follow_ends_when_its_reads_are_refused(url: String) -> TestResult {
    with_key_writer(&url, "acl-follow", follow_refused).await
}

async fn follow_refused(url: &str, ns: &str, admin: &Agent, token: &AclToken) -> TestResult {
    let follower = common::connect(url, ns, |c| c.with_token(&token.secret)).await?;
    let candidate = Client::connect(common::config(url, ns)?)
        .await
        .map_err(err)?;
    let mut follow = sync_conformance::leader::follow_empty(&follower, "g").await?;
    let elected = (candidate.leader("g").map_err(err)?)
        .elect("a", sync_core::ElectOptions::new())
        .await
        .map_err(err)?;
    take_key_rights(admin, token).await?;
    // Changes the follower must read, with no rights left to read them.
    elected.resign().await.map_err(err)?;
    let again = (candidate.leader("g").map_err(err)?)
        .elect("b", sync_core::ElectOptions::new())
        .await
        .map_err(err)?;
    let refusal =
        sync_conformance::leader::refused_then_ends(&mut follow, Duration::from_secs(15)).await?;
    println!("seen: {refusal}");
    again.resign().await.map_err(err)?;
    drop(follow);
    follower.close().await.map_err(err)?;
    candidate.close().await.map_err(err)
}

fn main() -> std::process::ExitCode {
    let tests: [(&'static str, Needs, TestFn); 13] = [
        (
            "lock::uncontended_acquire_release_is_two_requests",
            Needs::Consul,
            |u| Box::pin(uncontended_acquire_release_is_two_requests(u)),
        ),
        (
            "interop::consul_lock_excludes_library",
            Needs::Consul,
            |u| Box::pin(consul_lock_excludes_library(u)),
        ),
        (
            "interop::library_excludes_consul_lock",
            Needs::Consul,
            |u| Box::pin(library_excludes_consul_lock(u)),
        ),
        (
            "lock::destroyed_session_loses_then_hands_over_after_lock_delay",
            Needs::Consul,
            |u| Box::pin(destroyed_session_loses_then_hands_over_after_lock_delay(u)),
        ),
        (
            "lock::late_release_spares_a_later_grant",
            Needs::Consul,
            |u| Box::pin(late_release_spares_a_later_grant(u)),
        ),
        ("lock::late_grant_is_fenced", Needs::Consul, |u| {
            Box::pin(late_grant_is_fenced(u))
        }),
        (
            "lock::regrant_after_a_failed_release_gets_a_new_token",
            Needs::Consul,
            |u| Box::pin(regrant_after_a_failed_release_gets_a_new_token(u)),
        ),
        (
            "leader::resign_after_proclaim_hands_over",
            Needs::Consul,
            |u| Box::pin(resign_after_proclaim_hands_over(u)),
        ),
        ("acl::tokens", Needs::Acl, |u| Box::pin(acl_tokens(u))),
        (
            "acl::held_key_refused_to_its_holder_is_lost",
            Needs::Acl,
            |u| Box::pin(held_key_refused_to_its_holder_is_lost(u)),
        ),
        ("acl::worker_says_when_its_rights_go", Needs::Acl, |u| {
            Box::pin(worker_says_when_its_rights_go(u))
        }),
        (
            "acl::refused_outcome_is_recorded_once_the_rights_are_back",
            Needs::Acl,
            |u| Box::pin(refused_outcome_is_recorded_once_the_rights_are_back(u)),
        ),
        (
            "acl::follow_ends_when_its_reads_are_refused",
            Needs::Acl,
            |u| Box::pin(follow_ends_when_its_reads_are_refused(u)),
        ),
    ];
    common::run(&tests)
}
