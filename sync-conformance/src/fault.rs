//! Cases that inject a network fault for real, through the suite's fault proxy
//! ([`crate::proxy`]): network backends only.

use std::time::Duration;

use sync_core::{ErrorKind, LockOptions};

use crate::{
    CaseResult, Context, Ctx, ensure, fail, lock::loss_precedes_grant, proxy::Fault, stays_pending,
    within,
};

/// A holder whose endpoint freezes (connections open, nothing forwarded) cannot renew; it must
/// learn of the loss — from its own safe deadline, as nothing reaches it — before another
/// client is granted the lock, and the new grant's fencing token is higher.
pub async fn frozen_holder_loses_before_another_grant(ctx: &Ctx) -> CaseResult {
    let (holder, proxy) = ctx.proxied_client().await?;
    let other = ctx.client().await?;
    let guard = holder.lock()?.acquire("frozen", LockOptions::new()).await?;
    let freeze = async {
        proxy.set(Fault::Freeze);
        Ok(())
    };
    let notice = ctx.expiry();
    loss_precedes_grant(ctx, &guard, other.lock()?, "a freeze", notice, freeze).await?;
    // Cut, so the holder's client winds down rather than wait on a frozen socket.
    proxy.set(Fault::Reset);
    Ok(())
}

/// A guard lost while its task still holds it (its endpoint froze past the safe deadline)
/// holds up no other contender of its own handle: once the endpoint thaws, an acquire on the
/// same handle is granted, as another process's would be, with a greater fencing token; the
/// lost guard's release then answers LockLost and leaves the new grant alone.
pub async fn lost_guard_holds_up_no_one(ctx: &Ctx) -> CaseResult {
    let (client, proxy) = ctx.proxied_client().await?;
    let lock = client.lock()?;
    let guard = lock.acquire("stranded", LockOptions::new()).await?;
    proxy.set(Fault::Freeze);
    let lost = within(ctx.expiry(), "the frozen holder's loss", guard.lost()).await;
    proxy.set(Fault::Pass);
    lost?;
    // Its old lease or session has to expire (or be revoked) on the server first.
    let again = within(
        ctx.expiry() * 2 + FROZEN_CALL_BOUND,
        "an acquire on the lost guard's handle",
        lock.acquire("stranded", LockOptions::new()),
    )
    .await?
    .context("the acquire on the lost guard's handle")?;
    ensure!(
        again.fencing_token() > guard.fencing_token(),
        "fencing token {} after the loss, {} before",
        again.fencing_token(),
        guard.fencing_token()
    );
    match guard.release().await {
        Err(e) if e.kind() == ErrorKind::LockLost => {}
        other => fail!("the lost guard's release gave {other:?}, not LockLost"),
    }
    ensure!(
        !again.is_lost(),
        "releasing the lost guard lost the new grant"
    );
    again.release().await?;
    Ok(())
}

/// The longest a call through a frozen endpoint may take to fail: harnesses configure a request
/// timeout well below it.
pub const FROZEN_CALL_BOUND: Duration = Duration::from_secs(15);

/// An endpoint that accepts and never answers (frozen) fails calls in bounded time — an error,
/// not a hang — and a call made after it thaws succeeds.
pub async fn frozen_endpoint_fails_calls_in_bounded_time(ctx: &Ctx) -> CaseResult {
    let (client, proxy) = ctx.proxied_client().await?;
    let map = client.map("frozen")?;
    map.write("k", b"before").await?;
    proxy.set(Fault::Freeze);
    let read = within(
        FROZEN_CALL_BOUND,
        "a read through a frozen endpoint",
        map.read("k"),
    )
    .await?;
    ensure!(
        read.is_err(),
        "a read through a frozen endpoint answered: {read:?}"
    );
    let write = within(
        FROZEN_CALL_BOUND,
        "a write through a frozen endpoint",
        map.write("k", b"frozen"),
    )
    .await?;
    ensure!(
        write.is_err(),
        "a write through a frozen endpoint answered: {write:?}"
    );
    proxy.set(Fault::Pass);
    let after = within(FROZEN_CALL_BOUND, "a read after the thaw", map.read("k")).await??;
    ensure!(after.is_some(), "the key is gone after the thaw");
    Ok(())
}

/// A waiter with no wait limit rides out its endpoint being unreachable (every connection cut
/// and refused for a while) instead of failing: once the endpoint is back and the holder
/// releases, the waiter is granted the lock, and the guard it gets is not already lost.
pub async fn waiter_rides_out_an_outage(ctx: &Ctx) -> CaseResult {
    let holder = ctx.client().await?;
    let (waiting, proxy) = ctx.proxied_client().await?;
    let guard = holder.lock()?.acquire("outage", LockOptions::new()).await?;
    let lock = waiting.lock()?;
    let mut waiter = Box::pin(async move { lock.acquire("outage", LockOptions::new()).await });
    stays_pending(
        ctx.prompt() / 4,
        "the waiter, while the lock is held",
        &mut waiter,
    )
    .await?;

    proxy.set(Fault::Reset);
    // The outage: shorter than the lease, long enough for every retry inside it to fail.
    let outage = (ctx.ttl() / 2).max(Duration::from_millis(500));
    stays_pending(outage, "the waiter, during the outage", &mut waiter).await?;
    proxy.set(Fault::Pass);

    guard.release().await?;
    let granted = within(
        ctx.expiry() + ctx.prompt(),
        "the waiter after the outage",
        waiter,
    )
    .await?
    .context("the waiter's acquire across the outage")?;
    ensure!(
        !granted.is_lost(),
        "the waiter was handed a guard that is already lost"
    );
    granted.release().await?;
    Ok(())
}

/// A compare-and-swap whose answer is lost (it reached the server and applied; the answer was
/// dropped) is resolved before the caller is answered: it reports success with the version it
/// wrote, the value changed once, and the old version is stale.
pub async fn ambiguous_swap_is_resolved(ctx: &Ctx) -> CaseResult {
    let (client, proxy) = ctx.proxied_client().await?;
    let map = client.map("ambiguous")?;
    let key = format!("counter-{}", uuid::Uuid::new_v4().simple());
    let v1 = map.write(&key, b"0").await?;

    // Hold the swap's request, then let it through with its answer thrown away.
    proxy.hold_next(key.as_bytes());
    let swapping = {
        let (map, key) = (map.clone(), key.clone());
        tokio::spawn(async move { map.compare_and_swap(&key, Some(v1), b"1").await })
    };
    within(ctx.prompt(), "the swap reaching the proxy", proxy.held()).await?;
    proxy.set(Fault::DropResponses);
    proxy.release();
    // The fault's duration: long enough for the swap to apply and its answer to be dropped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Fault::Pass);

    let swapped = within(
        FROZEN_CALL_BOUND,
        "the swap whose answer was lost",
        swapping,
    )
    .await?
    .context("the swap must not panic")?;
    let v2 = swapped.context("a swap whose answer was lost (it applied)")?;
    let Some(now) = map.read(&key).await? else {
        fail!("the key is gone after the swap");
    };
    ensure!(
        now.value == b"1" && now.version == v2,
        "the swap applied as {:?} at {}, but reported version {v2}",
        String::from_utf8_lossy(&now.value),
        now.version
    );
    let stale = map.compare_and_swap(&key, Some(v1), b"2").await;
    ensure!(
        stale
            .as_ref()
            .is_err_and(|e| e.kind() == sync_core::ErrorKind::Conflict),
        "the old version must be stale after the swap: {stale:?}"
    );
    Ok(())
}
