//! A holder whose process stops for longer than its TTL (a GC pause, SIGSTOP, a blocked
//! thread): when it resumes, its guard and its leadership must report the loss on the very
//! first check, before any of its background tasks has run (DESIGN §3 Lock: `is_lost()` is
//! computed, not only signalled).

use std::{sync::Arc, time::Duration};

use sync_core::{Backend, ElectOptions, LockOptions};

use crate::{CaseResult, Ctx, Failure, ensure};

/// How far past the TTL the pause goes: the lease is then certainly past its safe deadline.
const BEYOND_TTL: Duration = Duration::from_millis(200);

/// The holder runs on a runtime of its own, on one thread; the pause blocks that thread, so
/// nothing of the holder's client (keepalive, watches) runs during it — as in a stopped process.
pub async fn paused_holder_sees_loss_first(ctx: &Ctx) -> CaseResult {
    let connect = ctx.connect_later();
    let pause = ctx.ttl() + BEYOND_TTL;
    let outcome = tokio::task::spawn_blocking(move || -> Result<(bool, bool), Failure> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::new(format_args!("building the holder's runtime: {e}")))?;
        let (backend, guard, elected) = rt.block_on(async {
            let backend: Arc<dyn Backend> = connect.await?;
            let guard = backend
                .lock()?
                .acquire("paused-lock", LockOptions::new())
                .await?;
            let elected = backend
                .leader("paused-group")?
                .elect("holder", ElectOptions::new())
                .await?;
            Ok::<_, sync_core::Error>((backend, guard, elected))
        })?;
        if guard.is_lost() || elected.is_revoked() {
            return Err(Failure::new("lost before the pause"));
        }
        // The fault itself: this thread, and so the holder's whole runtime, stops.
        std::thread::sleep(pause);
        // First thing on resuming, before the runtime runs again.
        let seen = (guard.is_lost(), elected.is_revoked());
        rt.block_on(async move {
            drop((guard, elected));
            let _ = backend.close().await;
        });
        Ok(seen)
    })
    .await
    .map_err(|e| Failure::new(format_args!("the holder's thread failed: {e}")))??;
    let (lock_lost, leadership_revoked) = outcome;
    ensure!(
        lock_lost,
        "after a {pause:?} pause (TTL {:?}) the guard's is_lost() was false on the first check",
        ctx.ttl()
    );
    ensure!(
        leadership_revoked,
        "after a {pause:?} pause (TTL {:?}) is_revoked() was false on the first check",
        ctx.ttl()
    );
    Ok(())
}
