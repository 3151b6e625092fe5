//! `syncctl lock ID -- CMD`: CMD runs while this process holds the lock.

use sync_core::LockOptions;

use crate::{
    backend,
    child::Signals,
    cli::{Global, LockArgs},
    exit::Exit,
    hold,
};

pub async fn run(global: &Global, args: LockArgs) -> Result<u8, Exit> {
    let subject = format!("lock {:?}", args.id);
    hold::session(
        global,
        args.hold.ttl,
        &subject,
        async |client, what, signals| hold_and_run(client, global, &args, what, signals).await,
    )
    .await
}

async fn hold_and_run(
    client: &dyn sync_core::Backend,
    global: &Global,
    args: &LockArgs,
    what: &str,
    signals: &mut Signals,
) -> Result<u8, Exit> {
    let lock = client.lock()?;
    let mut opts = LockOptions::new();
    if let Some(wait) = args.hold.wait {
        opts = opts.with_wait(wait);
    }
    let acquire = async { lock.acquire(&args.id, opts).await.map_err(Exit::from) };
    let holder = || async { lock.holder(&args.id).await.ok().flatten() };
    let guard = hold::wait(acquire, what, holder, global.quiet, signals).await?;
    let env = [
        ("SYNC_LOCK_ID", args.id.clone()),
        ("SYNC_FENCING_TOKEN", guard.fencing_token().to_string()),
    ];
    let status = hold::run(
        &args.hold,
        &env,
        what,
        guard.lost(),
        || !guard.is_lost(),
        signals,
    )
    .await;
    if guard.is_lost() {
        // Nothing left to release; only the backend's bookkeeping.
        let _ = tokio::time::timeout(backend::LET_GO, guard.release()).await;
        return status;
    }
    let released = hold::let_go(guard.release(), what).await;
    hold::after_release(status, released)
}
