//! Waits and timeouts at the edge of what a clock can hold: `Duration::MAX` means "no limit"
//! (or is refused with an error), never a panic (DESIGN §2: nothing panics on bad input).

use std::{sync::Arc, time::Duration};

use sync_core::{ElectOptions, Job, JobContext, JobState, LockOptions, WorkerOptions};

use crate::{CaseResult, Ctx, ensure, stays_pending, within};

/// `Duration::MAX` as an acquire wait, an election wait and a job wait: granted at once when
/// free, pending (not panicking) while held elsewhere.
pub async fn duration_max_waits_never_panic(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let forever = LockOptions::new().with_wait(Duration::MAX);
    let guard = within(
        ctx.prompt(),
        "acquire of a free lock with wait MAX",
        async { a.lock()?.acquire("max-wait", forever.clone()).await },
    )
    .await??;
    let lb = b.lock()?;
    let mut blocked = Box::pin(lb.acquire("max-wait", forever));
    stays_pending(
        ctx.prompt() / 4,
        "acquire of a held lock with wait MAX",
        &mut blocked,
    )
    .await?;
    guard.release().await?;
    let next = within(
        ctx.prompt(),
        "the waiter with wait MAX, after the release",
        blocked,
    )
    .await??;
    next.release().await?;

    let elected = within(ctx.prompt(), "elect with wait MAX", async {
        let opts = ElectOptions::new().with_wait(Duration::MAX);
        a.leader("max-wait-group")?.elect("A", opts).await
    })
    .await??;
    elected.resign().await?;

    let task = a.task()?;
    let _worker = task
        .work(
            "max-wait-job",
            Arc::new(|job: JobContext| async move { Ok(job.payload) }),
            WorkerOptions::new(),
        )
        .await?;
    let id = task.submit(Job::new("max-wait-job", "x")).await?;
    let done = within(
        ctx.prompt() * 2,
        "wait(Some(Duration::MAX)) for a job",
        task.wait(&id, Some(Duration::MAX)),
    )
    .await??;
    ensure!(done.state == JobState::Succeeded, "the job: {done:?}");
    Ok(())
}
