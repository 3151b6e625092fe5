//! Lock cases (DESIGN §3 Lock).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use std::future::Future;

use sync_core::{ErrorKind, Lock, LockGuard, LockOptions, id::MAX_ID_LEN};

use crate::{
    CaseResult, Context, Ctx, Failure, ensure, ensure_increasing, expect_kind, fail,
    spans::{Seen, spans_of},
    stays_pending, within,
};

/// Runs `rounds` critical sections per contender, each contender a task on one of `handles`
/// (round-robin), checking that no two critical sections ever overlap and that the fencing
/// tokens of successive grants strictly increase.
async fn contend(
    ctx: &Ctx,
    id: &'static str,
    handles: &[Arc<dyn Lock>],
    contenders: usize,
    rounds: usize,
) -> CaseResult {
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    // Every contender may wait for all the others' sections; `prompt` per section is generous.
    let wait = ctx.prompt() * (contenders as u32).max(4);
    let mut tasks = Vec::new();
    for c in 0..contenders {
        let lock = handles[c % handles.len()].clone();
        let (inside, tokens) = (inside.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let guard = lock
                    .acquire(id, LockOptions::new().with_wait(wait))
                    .await
                    .context(format!("contender {c} round {round}: acquire"))?;
                let before = inside.fetch_add(1, Ordering::SeqCst);
                tokens.lock().unwrap().push(guard.fencing_token());
                // Give any other holder a chance to run inside the section if exclusion is broken.
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                inside.fetch_sub(1, Ordering::SeqCst);
                ensure!(
                    before == 0,
                    "contender {c} round {round}: {before} other holder(s) were inside the \
                     critical section"
                );
                guard
                    .release()
                    .await
                    .context(format!("contender {c} round {round}: release"))?;
            }
            Ok::<_, Failure>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let tokens = tokens.lock().unwrap().clone();
    ensure!(
        tokens.len() == contenders * rounds,
        "expected {} critical sections, saw {}",
        contenders * rounds,
        tokens.len()
    );
    ensure_increasing("fencing tokens of successive grants", &tokens)
}

/// Checks that a release of what is no longer held failed with NotHeld or LockLost.
#[track_caller]
fn expect_not_held(what: &str, result: sync_core::Result<()>) -> CaseResult {
    match &result {
        Err(e) if matches!(e.kind(), ErrorKind::NotHeld | ErrorKind::LockLost) => Ok(()),
        _ => Err(Failure::new(format_args!(
            "{what} gave {result:?}, not NotHeld or LockLost"
        ))),
    }
}

/// 8 contenders over two independent clients run 200 critical sections on one id: no two
/// ever overlap, every section runs, and successive grants carry increasing fencing tokens.
pub async fn mutual_exclusion(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let handles = [a.lock()?, b.lock()?];
    contend(ctx, "mutex", &handles, 8, 25).await
}

/// `try_acquire` returns `None` at once while the lock is held (by another client, or by
/// another guard of the same handle), and a guard once it is free again.
pub async fn try_acquire_when_held(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (la, lb) = (a.lock()?, b.lock()?);
    let guard = la.acquire("held", LockOptions::new()).await?;

    let other = within(
        ctx.prompt(),
        "try_acquire from another client",
        lb.try_acquire("held"),
    )
    .await??;
    ensure!(other.is_none(), "another client got a held lock: {other:?}");
    let same = within(
        ctx.prompt(),
        "try_acquire on the holder's handle",
        la.try_acquire("held"),
    )
    .await??;
    ensure!(
        same.is_none(),
        "a second guard on the holder's own handle got a held lock: {same:?}"
    );

    guard.release().await?;
    let after = lb.try_acquire("held").await?;
    ensure!(
        after.is_some(),
        "try_acquire of a released lock returned None"
    );
    Ok(())
}

/// An acquire bounded by `wait` on a held lock fails with a Timeout error after about
/// `wait` — not before it, and not much after.
pub async fn wait_timeout(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let _guard = a.lock()?.acquire("busy", LockOptions::new()).await?;
    let wait = Duration::from_millis(500);
    let start = Instant::now();
    let result = within(
        wait + ctx.prompt(),
        "acquire with a bounded wait returning",
        b.lock()?
            .acquire("busy", LockOptions::new().with_wait(wait)),
    )
    .await?;
    let took = start.elapsed();
    expect_kind(
        "acquire of a held lock with a wait",
        result,
        ErrorKind::Timeout,
    )?;
    // A little early is timer granularity; half the wait is a wrong bound.
    ensure!(
        took >= wait.mul_f32(0.9),
        "Timeout returned after {took:?}, before the {wait:?} wait had passed"
    );
    Ok(())
}

/// A waiting acquire is granted promptly once the holder releases (push, not a slow poll), and
/// not while the lock is still held.
pub async fn handoff_on_release(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let lb = b.lock()?;
    let guard = a.lock()?.acquire("handoff", LockOptions::new()).await?;
    let first = guard.fencing_token();

    let mut waiter = Box::pin(lb.acquire("handoff", LockOptions::new()));
    stays_pending(
        Duration::from_millis(300),
        "a waiter acquiring a held lock",
        &mut waiter,
    )
    .await?;
    guard.release().await?;
    let next = within(ctx.prompt(), "the waiter acquiring after release", waiter).await??;
    ensure!(
        next.fencing_token() > first,
        "fencing token went from {first} to {}",
        next.fencing_token()
    );
    Ok(())
}

/// A waiter that gives up in the middle of a queue passes nothing on: the one behind it
/// still waits for the holder, and is granted on the holder's release.
pub async fn cancelled_waiter_in_queue(ctx: &Ctx) -> CaseResult {
    let (a, b, c) = (
        ctx.client().await?,
        ctx.client().await?,
        ctx.client().await?,
    );
    let (lb, lc) = (b.lock()?, c.lock()?);
    let guard = a.lock()?.acquire("queue", LockOptions::new()).await?;
    let first = guard.fencing_token();
    let mut middle = Box::pin(lb.acquire("queue", LockOptions::new()));
    stays_pending(Duration::from_millis(300), "the first waiter", &mut middle).await?;
    let mut last = Box::pin(lc.acquire("queue", LockOptions::new()));
    stays_pending(Duration::from_millis(300), "the second waiter", &mut last).await?;
    drop(middle);
    stays_pending(
        Duration::from_millis(500),
        "the second waiter, after the first gave up while the lock is still held",
        &mut last,
    )
    .await?;
    guard.release().await?;
    let next = within(ctx.prompt(), "the second waiter after release", last).await??;
    ensure!(
        next.fencing_token() > first,
        "fencing token went from {first} to {}",
        next.fencing_token()
    );
    next.release().await?;
    Ok(())
}

/// Fencing tokens strictly increase over successive grants of one id, whoever holds it and
/// however it was freed (guard release, handle release, guard drop).
pub async fn fencing_tokens_increase(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (la, lb) = (a.lock()?, b.lock()?);
    let opts = || LockOptions::new().with_wait(ctx.prompt());
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let g = la.acquire("fence", opts()).await?;
        tokens.push(g.fencing_token());
        g.release().await?;

        let g = lb.acquire("fence", opts()).await?;
        tokens.push(g.fencing_token());
        drop(g);

        let g = la.acquire("fence", opts()).await.context("after a drop")?;
        tokens.push(g.fencing_token());
        la.release("fence").await?;
        drop(g);
    }
    ensure_increasing("fencing tokens", &tokens)
}

/// Another client's `holder()` names the holder's fencing token while the lock is held, and
/// nobody once it is released.
pub async fn holder_names_the_token(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (la, lb) = (a.lock()?, b.lock()?);
    let guard = la.acquire("holder", LockOptions::new()).await?;
    let token = format!("token {}", guard.fencing_token());
    let seen = lb.holder("holder").await?;
    ensure!(
        seen.as_deref().is_some_and(|who| who.contains(&token)),
        "holder() said {seen:?} while the grant with {token} held"
    );
    guard.release().await?;
    let after = lb.holder("holder").await?;
    ensure!(after.is_none(), "holder() said {after:?} after the release");
    Ok(())
}

/// Revoking the holder's lease fires the guard's `lost()` promptly, another client can then
/// acquire, and the holder learned of the loss before the other client's grant.
pub async fn lost_on_lease_revoke(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let guard = a.lock()?.acquire("revoked", LockOptions::new()).await?;
    ensure!(!guard.is_lost(), "a fresh guard reports lost");
    let contender = b.lock()?;
    let revoke = async { a.revoke().await.context("revoking the holder's lease") };
    loss_precedes_grant(ctx, &guard, contender, "revoke", ctx.prompt(), revoke).await?;
    Ok(())
}

/// Causes a loss of `guard` with `cause` while another handle waits for the same lock: the
/// holder's `lost()` must fire within `notice`, and the other grant must come after the
/// holder knew, with a higher fencing token. The other grant is released.
pub(crate) async fn loss_precedes_grant(
    ctx: &Ctx,
    guard: &LockGuard,
    contender: Arc<dyn Lock>,
    what: &str,
    notice: Duration,
    cause: impl Future<Output = CaseResult>,
) -> CaseResult {
    let lost = guard.loss_signal();
    let id = guard.id().to_string();
    let waiter = tokio::spawn(async move {
        let granted = contender.acquire(&id, LockOptions::new()).await;
        // Sampled the instant the grant is seen: the holder must already know.
        (granted, lost.is_lost())
    });
    cause.await?;
    let reason = within(
        notice,
        format!("the holder's lost() after {what}"),
        guard.lost(),
    )
    .await?;
    let (next, holder_knew) = within(
        ctx.expiry() + ctx.prompt(),
        format!("another client's grant after {what}"),
        waiter,
    )
    .await??;
    let next = next.context("the other client's acquire")?;
    ensure!(
        holder_knew,
        "the other client was granted the lock before the holder's lost() fired ({what})"
    );
    ensure!(
        next.fencing_token() > guard.fencing_token(),
        "fencing token did not increase after the loss ({what})"
    );
    ensure!(!reason.is_empty(), "lost() gave an empty reason ({what})");
    next.release().await?;
    Ok(())
}

/// A killed holder (no renewals, no release) keeps the lock until its lease expires: another
/// client is NOT granted it before about one TTL after the lease was granted, and IS granted it
/// within the expiry bound after the kill.
pub async fn dead_holder_expires_after_ttl(ctx: &Ctx) -> CaseResult {
    let ttl = ctx.ttl();
    let b = ctx.client().await?;
    let lb = b.lock()?;
    // The holder's lease is granted after this instant, so it cannot expire before start + TTL
    // whatever the backend's renewal schedule.
    let start = Instant::now();
    let a = ctx.client().await?;
    let guard = a.lock()?.acquire("dead", LockOptions::new()).await?;
    a.kill().await?;
    let killed = Instant::now();

    let mut waiter = Box::pin(lb.acquire("dead", LockOptions::new()));
    // 10% early is timer and clock granularity, not a lease that was cut short.
    let not_before = (start + ttl.mul_f32(0.9)).saturating_duration_since(Instant::now());
    stays_pending(
        not_before,
        format!("another client acquiring a dead holder's lock (TTL {ttl:?})"),
        &mut waiter,
    )
    .await?;
    let next = within(
        ctx.expiry().saturating_sub(killed.elapsed()),
        format!("another client acquiring after the holder died (TTL {ttl:?})"),
        waiter,
    )
    .await??;
    ensure!(
        next.fencing_token() > guard.fencing_token(),
        "fencing token did not increase after expiry"
    );
    Ok(())
}

/// Dropping a guard releases the lock in the background: a waiting client gets it promptly.
pub async fn drop_releases(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let lb = b.lock()?;
    let guard = a.lock()?.acquire("dropped", LockOptions::new()).await?;
    let mut waiter = Box::pin(lb.acquire("dropped", LockOptions::new()));
    stays_pending(
        Duration::from_millis(200),
        "a waiter acquiring a held lock",
        &mut waiter,
    )
    .await?;
    drop(guard);
    let next = within(
        ctx.prompt(),
        "the waiter acquiring after the guard was dropped",
        waiter,
    )
    .await??;
    next.release().await?;
    Ok(())
}

/// Dropping an in-flight acquire cancels it and leaves nothing behind: after the holder
/// releases, a third client can take the lock, and the cancelled handle holds nothing.
pub async fn cancelled_acquire_leaves_nothing(ctx: &Ctx) -> CaseResult {
    let (a, b, c) = (
        ctx.client().await?,
        ctx.client().await?,
        ctx.client().await?,
    );
    let (la, lb, lc) = (a.lock()?, b.lock()?, c.lock()?);
    let guard = la.acquire("cancel", LockOptions::new()).await?;

    let mut waiter = Box::pin(lb.acquire("cancel", LockOptions::new()));
    // Long enough for the waiter to have registered itself with the backend.
    stays_pending(
        Duration::from_millis(300),
        "a waiter acquiring a held lock",
        &mut waiter,
    )
    .await?;
    drop(waiter);

    guard.release().await?;
    // A window with no contender, in which a leaked waiter would be granted the lock. (This
    // sleep synchronizes nothing: it is the time something must NOT happen in.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cancellation cleanup may run in the background (Drop cannot await); allow it a moment.
    crate::eventually(
        ctx.prompt(),
        "a third client's try_acquire after the holder released",
        || {
            let lc = lc.clone();
            async move {
                Ok(match lc.try_acquire("cancel").await? {
                    Some(g) => {
                        g.release().await?;
                        true
                    }
                    None => false,
                })
            }
        },
    )
    .await
    .map_err(|e| {
        Failure::new(format!(
            "{e}; the cancelled acquire seems to have taken the lock or left a waiter behind"
        ))
    })?;
    expect_kind(
        "release(id) on the handle whose acquire was cancelled",
        lb.release("cancel").await,
        ErrorKind::NotHeld,
    )?;
    Ok(())
}

/// Two tasks sharing one `Arc<dyn Lock>` exclude each other exactly like two processes: a
/// second guard on the same handle is refused while the first lives, and concurrent critical
/// sections through one handle never overlap.
pub async fn same_handle_tasks_exclude(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let lock = client.lock()?;

    let guard = lock.acquire("shared", LockOptions::new()).await?;
    let mut second = Box::pin(lock.acquire("shared", LockOptions::new()));
    stays_pending(
        Duration::from_millis(300),
        "a second acquire on the holder's own handle",
        &mut second,
    )
    .await?;
    guard.release().await?;
    let g2 = within(ctx.prompt(), "the second acquire after release", second).await??;
    g2.release().await?;

    contend(ctx, "shared-many", &[lock], 4, 25).await
}

/// Ids that differ only in characters a naive key scheme would confuse (`a`, `a/b`, `a%2Fb`,
/// `a*`, unicode, and an id of exactly the maximum length) are independent locks: all held at
/// once by one client, all refused to another, and freeing one frees only that one.
pub async fn ids_do_not_collide(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (la, lb) = (a.lock()?, b.lock()?);
    let longest = "x".repeat(MAX_ID_LEN);
    let ids = [
        "a",
        "a/b",
        "a%2Fb",
        "a*",
        "ünï/cødé ✓",
        "a.b",
        longest.as_str(),
    ];

    let mut guards = Vec::new();
    for id in ids {
        let g = within(
            ctx.prompt(),
            format!("acquiring {id:.20?} while the others are held"),
            la.acquire(id, LockOptions::new()),
        )
        .await?
        .context(format!("acquire {id:.20?}"))?;
        guards.push(g);
    }
    for id in ids {
        let got = lb.try_acquire(id).await?;
        ensure!(got.is_none(), "another client got held lock {id:.20?}");
    }
    guards.remove(0).release().await?;
    ensure!(
        lb.try_acquire("a").await?.is_some(),
        "\"a\" was released but another client could not take it"
    );
    for id in &ids[1..] {
        let got = lb.try_acquire(id).await?;
        ensure!(
            got.is_none(),
            "releasing \"a\" also freed {id:.20?}: their keys overlap"
        );
    }
    Ok(())
}

/// Empty ids, ids over `MAX_ID_LEN` bytes and ids containing NUL are InvalidArgument for both
/// `acquire` and `try_acquire`.
pub async fn invalid_ids_rejected(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let lock = client.lock()?;
    let too_long = "x".repeat(MAX_ID_LEN + 1);
    for (what, id) in [
        ("empty id", ""),
        ("id over MAX_ID_LEN", too_long.as_str()),
        ("id with NUL", "a\0b"),
    ] {
        let acquired = within(
            ctx.prompt(),
            format!("acquire with {what}"),
            lock.acquire(id, LockOptions::new()),
        )
        .await?;
        expect_kind(
            format!("acquire with {what}"),
            acquired,
            ErrorKind::InvalidArgument,
        )?;
        let tried = lock.try_acquire(id).await;
        expect_kind(
            format!("try_acquire with {what}"),
            tried,
            ErrorKind::InvalidArgument,
        )?;
    }
    Ok(())
}

/// Releasing what is not held is NotHeld: a second `release(id)` on the handle, `release(id)`
/// of an id never held, and a guard already freed through the handle. A stale guard's release
/// or drop must not free a later holder's grant.
pub async fn release_not_held(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (la, lb) = (a.lock()?, b.lock()?);

    expect_kind(
        "release(id) of an id never held",
        la.release("never").await,
        ErrorKind::NotHeld,
    )?;

    let guard = la.acquire("twice", LockOptions::new()).await?;
    la.release("twice")
        .await
        .context("release(id) of a held lock")?;
    expect_kind(
        "a second release(id)",
        la.release("twice").await,
        ErrorKind::NotHeld,
    )?;

    // Now someone else holds it; the stale guard must not be able to free their grant.
    let other = within(
        ctx.prompt(),
        "another client acquiring after release(id)",
        lb.acquire("twice", LockOptions::new()),
    )
    .await??;
    expect_not_held(
        "releasing a guard already freed by release(id)",
        guard.release().await,
    )?;
    ensure!(
        lb.try_acquire("twice").await?.is_none() && la.try_acquire("twice").await?.is_none(),
        "the stale guard's release freed the other client's lock"
    );
    ensure!(!other.is_lost(), "the other client's guard reports lost");
    other.release().await?;
    Ok(())
}

/// A guard whose lease was revoked can no longer be released: `release()` is LockLost or
/// NotHeld, never Ok.
pub async fn release_after_revoke(ctx: &Ctx) -> CaseResult {
    let a = ctx.client().await?;
    let guard = a.lock()?.acquire("gone", LockOptions::new()).await?;
    a.revoke().await?;
    within(ctx.prompt(), "guard.lost() after revoke", guard.lost()).await?;
    expect_not_held(
        "release of a guard whose lease was revoked",
        guard.release().await,
    )
}

/// Each lock operation shows a `tracing` subscriber exactly one span (DESIGN §2), `sync`, with
/// the operation and the id; the backend nests no second span of its own in it.
pub async fn one_span_per_operation(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let lock = client.lock()?;
    // A session opens on first use: not part of what is heard.
    let warm_up = lock.acquire("warm-up", LockOptions::new()).await?;
    warm_up.release().await?;
    let (done, seen) = spans_of(async {
        let guard = lock.acquire("spans", LockOptions::new()).await?;
        guard.release().await?;
        let Some(guard) = lock.try_acquire("spans").await? else {
            fail!("try_acquire of a free lock granted nothing");
        };
        guard.release().await?;
        Ok::<_, Failure>(())
    })
    .await;
    done?;
    let expected = [
        Seen::op("lock.acquire", "spans"),
        Seen::op("lock.release", "spans"),
        Seen::op("lock.try_acquire", "spans"),
        Seen::op("lock.release", "spans"),
    ];
    ensure!(
        seen == expected,
        "the spans opened were {seen:#?}, expected {expected:#?}"
    );
    Ok(())
}
