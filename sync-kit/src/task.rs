//! The task worker machinery every backend shares: the claim loop with its bounded pool, panic
//! capture, the output limit, what an attempt's outcome makes of a job (retry with backoff, or
//! final), and a graceful stop. A backend implements [`JobStore`] — submit, status, wait, and
//! a [`JobQueue`] per job name that claims one job and records an outcome — and
//! [`checked::task`](crate::checked::task) makes the `Task` handle of it: workers start through
//! [`start_worker`], waits are bounded by [`wait_for_job`].

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use sync_core::{
    Error, ErrorKind, Handler, Job, JobContext, JobId, JobState, JobStatus, MAX_PAYLOAD_LEN,
    Result, Worker, WorkerOptions, raw::WorkerControl,
};
use tokio::{
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tracing::Instrument;

/// The largest pool a worker accepts: what a tokio semaphore, and taking every permit back in
/// one call on stop, can count.
pub const MAX_CONCURRENCY: usize = if (u32::MAX as usize) < Semaphore::MAX_PERMITS {
    u32::MAX as usize
} else {
    Semaphore::MAX_PERMITS
};

/// How long the claim loop rests after a failed claim before trying again.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// The most jobs the claim loop asks for in one claim (the free permits of its pool, up to
/// this).
pub const MAX_CLAIM_BATCH: usize = 16;

/// What an attempt produced: the handler's output, or why it failed (its error, a panic, an
/// output over the limit).
pub type Outcome = std::result::Result<Vec<u8>, String>;

/// The answer to one claim.
pub enum Claimed<C> {
    /// A job was claimed: the backend's claim and the handler's context.
    Job(C, JobContext),
    /// Several jobs were claimed at once (at most the `max` asked for; an empty list reads as
    /// a failed try and is retried at once).
    Jobs(Vec<(C, JobContext)>),
    /// Nothing is startable now; the future resolves once something may be (a push, the
    /// earliest delayed retry, or a safety-net poll). It must have been armed before the queue
    /// was looked at, so a job queued in between is not missed.
    Empty(BoxFuture<'static, ()>),
}

/// A backend's jobs: all of a `Task` handle but the worker machinery and the wait's timeout,
/// which sync-kit adds once for every backend. Input comes validated (see
/// [`checked`](crate::checked)).
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// The queue the workers of one job name take from.
    type Queue: JobQueue;

    /// Stores and queues `job`; its new id.
    async fn submit(&self, job: Job) -> Result<JobId>;

    /// The job's current status; NotFound for a job this store does not have.
    async fn status(&self, id: &JobId) -> Result<JobStatus>;

    /// Waits, with no limit, until the job is final; its final status.
    async fn wait(&self, id: &JobId) -> Result<JobStatus>;

    /// The queue of the jobs named `name`, for a new worker; Closed once the client is gone.
    async fn queue(&self, name: &str) -> Result<Self::Queue>;
}

/// Starts a worker on `store`'s queue of the jobs named `name`.
pub async fn start_worker<S: JobStore>(
    backend: &'static str,
    store: &S,
    name: &str,
    handler: Arc<dyn Handler>,
    opts: WorkerOptions,
) -> Result<Worker> {
    let queue = Arc::new(store.queue(name).await?);
    spawn_worker(backend, queue, name, handler, opts)
}

/// A backend's job queue as a worker sees it.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// The backend's record of one claimed attempt.
    type Claim: Send + 'static;

    /// Claims the oldest startable job named `name`, or up to `max` of them (`max` ≥ 1: the
    /// worker's free permits) where the backend can claim several in one round trip. An error
    /// of kind [`Closed`](ErrorKind::Closed) stops the worker; any other is retried after a
    /// pause.
    async fn claim(&self, name: &str, max: usize) -> Result<Claimed<Self::Claim>>;

    /// Records the outcome of the attempt holding `claim`, unless the claim was lost meanwhile
    /// (then the job was, or will be, handed to another worker).
    async fn finish(&self, claim: Self::Claim, outcome: Outcome);

    /// Resolves once the client is gone (killed or closed): the worker stops at once and its
    /// running attempts stop without reporting, as a dead process's would.
    async fn closed(&self);

    /// Backend work that runs beside the claim loop while the worker runs (etcd's reaper of
    /// orphaned claims); it must end once `stop` turns true.
    fn chores(self: Arc<Self>, stop: watch::Receiver<bool>) -> Option<BoxFuture<'static, ()>> {
        let _ = stop;
        None
    }
}

/// Starts a worker taking jobs named `name` from `queue` with a pool of `opts.concurrency`.
///
/// `opts` come through [`checked::task`](crate::checked::task), which has validated them; only
/// the pool's upper bound, which depends on this machinery, is checked here.
pub fn spawn_worker<Q: JobQueue>(
    backend: &'static str,
    queue: Arc<Q>,
    name: &str,
    handler: Arc<dyn Handler>,
    opts: WorkerOptions,
) -> Result<Worker> {
    check_concurrency(opts.concurrency).map_err(|e| e.with_backend(backend).with_id(name))?;
    let (stop, stopped) = watch::channel(false);
    let pool = Arc::new(Semaphore::new(opts.concurrency));
    let span = tracing::debug_span!("worker", backend, primitive = "task", id = name);
    let mut tasks = JoinSet::new();
    if let Some(chores) = queue.clone().chores(stopped.clone()) {
        tasks.spawn(chores.instrument(span.clone()));
    }
    let claims = ClaimLoop {
        queue,
        name: name.to_string(),
        handler,
        pool: pool.clone(),
    };
    tasks.spawn(claims.run(stopped).instrument(span));
    tracing::debug!(
        backend,
        primitive = "task",
        id = name,
        concurrency = opts.concurrency,
        "worker started"
    );
    Ok(Worker::new(Box::new(PoolWorker {
        stop,
        pool,
        concurrency: opts.concurrency,
        tasks: Some(tasks),
    })))
}

/// A pool of at most [`MAX_CONCURRENCY`].
fn check_concurrency(n: usize) -> Result<()> {
    if n > MAX_CONCURRENCY {
        return Err(Error::invalid(format!(
            "worker concurrency (pool) is {n}; the maximum is {MAX_CONCURRENCY}"
        )));
    }
    Ok(())
}

struct ClaimLoop<Q: JobQueue> {
    queue: Arc<Q>,
    name: String,
    handler: Arc<dyn Handler>,
    pool: Arc<Semaphore>,
}

impl<Q: JobQueue> ClaimLoop<Q> {
    /// Takes a permit of the pool (and every other free one, up to [`MAX_CLAIM_BATCH`]), then
    /// claims jobs for them, until stopped or closed. A claim under way is never cancelled (its
    /// answer may be jobs this worker now owns): stop and close are heeded only while waiting.
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut permits = Vec::new();
        let mut retry = crate::retry::Retry::new(CLAIM_RETRY);
        loop {
            if permits.is_empty() {
                let permit = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    () = this.queue.closed() => return,
                    p = this.pool.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                permits.push(permit);
            }
            if *stop.borrow() {
                return;
            }
            // Permits freed meanwhile join the next claim.
            while permits.len() < MAX_CLAIM_BATCH {
                match this.pool.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let claimed = this.queue.claim(&this.name, permits.len()).await;
            if claimed.is_ok() {
                retry.succeeded();
            }
            let pause = match claimed {
                Ok(Claimed::Job(claim, ctx)) => {
                    let permit = permits.pop().expect("a permit per claim");
                    this.clone().spawn_attempt(claim, ctx, permit);
                    continue;
                }
                Ok(Claimed::Jobs(jobs)) => {
                    for (claim, ctx) in jobs {
                        // A backend that returned more than asked keeps the rest waiting
                        // for a permit (never more attempts than the pool).
                        let permit = match permits.pop() {
                            Some(p) => p,
                            None => match this.pool.clone().acquire_owned().await {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                        };
                        this.clone().spawn_attempt(claim, ctx, permit);
                    }
                    continue;
                }
                Ok(Claimed::Empty(wake)) => wake,
                Err(e) if e.kind() == ErrorKind::Closed => {
                    tracing::info!(error = %e, "worker stops: client gone");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a job failed; retrying");
                    Box::pin(tokio::time::sleep(retry.after(&e, "claiming a job")))
                }
            };
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                () = this.queue.closed() => return,
                () = pause => {}
            }
        }
    }

    fn spawn_attempt(
        self: Arc<Self>,
        claim: Q::Claim,
        ctx: JobContext,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let span = tracing::debug_span!("attempt", job = %ctx.id, attempt = ctx.attempt);
        tokio::spawn(
            async move {
                let _permit = permit;
                tokio::select! {
                    biased;
                    () = self.queue.closed() => {}
                    () = self.attempt(claim, ctx) => {}
                }
            }
            .instrument(span),
        );
    }

    async fn attempt(&self, claim: Q::Claim, ctx: JobContext) {
        tracing::debug!("job claimed");
        let outcome = run_handler(self.handler.clone(), ctx).await;
        self.queue.finish(claim, outcome).await;
    }
}

/// Runs one attempt of a handler in a task of its own, so that its panic is the attempt's
/// failure and not the worker's, and checks its output against [`MAX_PAYLOAD_LEN`].
pub async fn run_handler(handler: Arc<dyn Handler>, ctx: JobContext) -> Outcome {
    let mut task = AbortOnDrop(tokio::spawn(async move { handler.call(ctx).await }));
    match (&mut task.0).await {
        Ok(Ok(output)) if output.len() > MAX_PAYLOAD_LEN => Err(format!(
            "the handler's output is {} bytes; the maximum is {MAX_PAYLOAD_LEN}",
            output.len()
        )),
        Ok(Ok(output)) => Ok(output),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) if e.is_panic() => Err(format!(
            "handler panicked: {}",
            crate::panic_message(e.into_panic().as_ref())
        )),
        Err(_) => Err("handler was cancelled".to_string()),
    }
}

/// Aborts the handler's task when its attempt is dropped (the worker's client closed or was
/// killed): a dead worker's handler must not run on.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What an attempt's outcome makes of its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The job succeeded with this output.
    Succeeded(Vec<u8>),
    /// The attempt failed with attempts left: queue the job again after `delay`.
    Retry {
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// Every attempt failed.
    Failed,
}

/// Applies attempt `attempt`'s outcome to `status` (state, last error) and says what comes
/// next: success, a retry after the job's backoff, or failure once out of attempts.
pub fn apply_outcome(job: &Job, status: &mut JobStatus, attempt: u32, outcome: Outcome) -> Next {
    status.output = None;
    match outcome {
        Ok(output) => {
            status.state = JobState::Succeeded;
            tracing::debug!(job = %status.id, attempt, "job succeeded");
            Next::Succeeded(output)
        }
        Err(error) if attempt < job.max_attempts => {
            let delay = job.retry_delay(attempt.saturating_add(1));
            tracing::info!(job = %status.id, attempt, %error, ?delay, "job attempt failed; retrying");
            status.state = JobState::Queued;
            status.last_error = Some(error);
            Next::Retry { delay }
        }
        Err(error) => {
            tracing::warn!(job = %status.id, attempt, %error, "job failed");
            status.state = JobState::Failed;
            status.last_error = Some(error);
            Next::Failed
        }
    }
}

/// Applies the loss of the worker running `status`'s job (its lease or session ended): the job
/// is queued again, or failed once out of attempts. Returns whether it is queued again.
pub fn apply_worker_loss(job: &Job, status: &mut JobStatus, reason: &str) -> bool {
    let requeue = status.attempts < job.max_attempts;
    status.last_error = Some(format!("worker lost: {reason}"));
    status.state = if requeue {
        JobState::Queued
    } else {
        JobState::Failed
    };
    requeue
}

/// The running worker: stop signal, pool and loops.
struct PoolWorker {
    stop: watch::Sender<bool>,
    pool: Arc<Semaphore>,
    concurrency: usize,
    tasks: Option<JoinSet<()>>,
}

#[async_trait]
impl WorkerControl for PoolWorker {
    async fn stop(&mut self) {
        self.stop.send_replace(true);
        if let Some(mut tasks) = self.tasks.take() {
            while tasks.join_next().await.is_some() {}
        }
        // Every permit back = every running attempt finished and recorded.
        let all = u32::try_from(self.concurrency).unwrap_or(u32::MAX);
        let _ = self.pool.acquire_many(all).await;
        tracing::debug!(primitive = "task", "worker stopped");
    }

    fn stop_in_background(mut self: Box<Self>) {
        self.stop.send_replace(true);
        if let Some(mut tasks) = self.tasks.take() {
            // The loops end on the stop signal; detach them rather than abort mid-claim.
            tasks.detach_all();
        }
    }
}

/// Waits for `fut` up to `timeout` (forever with `None`); past it, a Timeout error naming the
/// job and the limit.
pub async fn wait_for_job<T>(
    backend: &'static str,
    job: &str,
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match timeout {
        None => fut.await,
        Some(limit) => tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("job did not finish within {limit:?}"),
            )
            .with_backend(backend)
            .with_id(job))
        }),
    }
}
