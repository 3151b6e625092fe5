//! Cases that inject a network fault for real, through the suite's fault proxy
//! ([`crate::proxy`]): network backends only.

use sync_core::LockOptions;

use crate::{CaseResult, Context, Ctx, ensure, proxy::Fault, within};

/// A holder whose endpoint freezes (connections open, nothing forwarded) cannot renew; it must
/// learn of the loss — from its own safe deadline, as nothing reaches it — before another
/// client is granted the lock, and the new grant's fencing token is higher.
pub async fn frozen_holder_loses_before_another_grant(ctx: &Ctx) -> CaseResult {
    let (holder, proxy) = ctx.proxied_client().await?;
    let other = ctx.client().await?;
    let guard = holder.lock()?.acquire("frozen", LockOptions::new()).await?;
    let lost = guard.loss_signal();
    let contender = other.lock()?;
    let waiter = tokio::spawn(async move {
        let granted = contender.acquire("frozen", LockOptions::new()).await;
        // Sampled the instant the grant is seen: the frozen holder must already know.
        (granted, lost.is_lost())
    });

    proxy.set(Fault::Freeze);
    let reason = within(ctx.expiry(), "lost() of the frozen holder", guard.lost()).await?;
    let (next, holder_knew) = within(
        ctx.expiry() + ctx.prompt(),
        "the other client's grant after the freeze",
        waiter,
    )
    .await??;
    let next = next.context("the other client's acquire")?;
    ensure!(
        holder_knew,
        "the other client was granted the lock before the frozen holder knew it lost it"
    );
    ensure!(
        next.fencing_token() > guard.fencing_token(),
        "the fencing token did not increase after the loss"
    );
    ensure!(!reason.is_empty(), "lost() gave an empty reason");
    next.release().await?;
    // Thaw, so the holder's client can wind down rather than wait on a frozen socket.
    proxy.set(Fault::Reset);
    Ok(())
}
