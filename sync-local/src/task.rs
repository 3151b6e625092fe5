//! Task on the in-process backend: a per-cluster job table, FIFO queues per job name, workers
//! with a bounded pool, retries with backoff, and at-least-once redelivery bound to sessions.
//!
//! A claim (a job in Running) belongs to the worker client's session: when that session ends
//! (the client was killed and its TTL passed, or it was revoked) the job goes back to Queued for
//! another worker, and whatever the old handler reports later is ignored, because the claim
//! token it holds is no longer the job's.
//!
//! The seed's plain closure commands run on a [`CommandPool`].

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use sync_core::raw::{LossTrigger, loss_signal_until};
use sync_core::{
    Error, ErrorKind, HandlerError, Job, JobContext, JobId, JobState, JobStatus, Result,
};
use sync_kit::{
    panic_message,
    task::{JobQueue, JobStore, MAX_CONCURRENCY, Next, Outcome, apply_outcome, apply_worker_loss},
};
use tokio::{
    sync::{Notify, Semaphore, watch},
    task::JoinError,
    time::Instant,
};
use tracing::Instrument;

use crate::{
    BACKEND, Client,
    client::{ClientInner, Shared, locked},
};

/// Every job and queue of a cluster.
#[derive(Default)]
pub(crate) struct JobTable {
    state: Mutex<Jobs>,
}

#[derive(Default)]
struct Jobs {
    /// By namespaced job key (`<ns>/job/<id>`).
    jobs: HashMap<String, JobEntry>,
    /// By namespaced queue key (`<ns>/task/<name>`).
    queues: HashMap<String, Queue>,
    /// Finished job keys by when they may be forgotten, soonest first.
    finished: BTreeSet<(Instant, String)>,
}

/// How long a finished job's status is kept by default.
pub const JOB_RETENTION: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Queue {
    /// Job keys ready to be claimed, oldest first.
    ready: VecDeque<String>,
    /// Wakes one idle worker of the queue per job that becomes ready (a woken worker always
    /// claims, holding a free slot of its pool, or passes the wake-up on).
    wake: Arc<Notify>,
}

struct JobEntry {
    job: Job,
    queue: String,
    status: JobStatus,
    /// The current claim while Running.
    claim: Option<Claim>,
    /// The pending delayed requeue while Queued between retries.
    retry: Option<u64>,
    /// Bumped on every status change; `wait` subscribes.
    changed: watch::Sender<()>,
    /// How long the job stays visible once finished (its submitter's config).
    retention: Duration,
}

struct Claim {
    token: u64,
    session: u64,
    registration: u64,
    /// Tells the handler its claim ended; dropped (so the signal is lost) with the claim.
    lost: LossTrigger,
}

impl Jobs {
    /// Notes that `job_key` reached a final state, and forgets jobs past their retention, so a
    /// long-running cluster does not keep every job it ever ran.
    fn retire(&mut self, job_key: &str) {
        let now = Instant::now();
        let Some(keep) = self.jobs.get(job_key).map(|e| e.retention) else {
            return;
        };
        self.finished
            .insert((sync_kit::deadline(keep).max(now), job_key.to_string()));
        self.forget_expired(now);
    }

    fn forget_expired(&mut self, now: Instant) {
        while self.finished.first().is_some_and(|(at, _)| *at <= now) {
            let Some((_, key)) = self.finished.pop_first() else {
                break;
            };
            if self
                .jobs
                .get(&key)
                .is_some_and(|e| e.status.state.is_final())
            {
                self.jobs.remove(&key);
            }
        }
    }

    /// Puts `job_key` at the back of its queue and wakes one of the queue's idle workers.
    fn make_ready(&mut self, queue: &str, job_key: &str) {
        let q = self.queues.entry(queue.to_string()).or_default();
        q.ready.push_back(job_key.to_string());
        q.wake.notify_one();
    }
}

impl JobTable {
    fn queue_wake(&self, queue: &str) -> Arc<Notify> {
        locked(&self.state)
            .queues
            .entry(queue.to_string())
            .or_default()
            .wake
            .clone()
    }
}

/// What a worker took from its queue (the handler's [`JobContext`] travels beside it).
pub(crate) struct Claimed {
    job_key: String,
    id: JobId,
    attempt: u32,
    token: u64,
}

enum Take {
    Claimed(Claimed, Box<JobContext>),
    Empty,
    /// The session ended between looking it up and registering the claim; try again.
    SessionEnded,
}

/// Takes the oldest ready job of `queue` for `session`, binding the claim to the session.
fn take_next(shared: &Arc<Shared>, queue: &str, session: u64) -> Take {
    let mut state = locked(&shared.jobs.state);
    let Jobs { jobs, queues, .. } = &mut *state;
    let Some(q) = queues.get_mut(queue) else {
        return Take::Empty;
    };
    while let Some(job_key) = q.ready.pop_front() {
        let Some(entry) = jobs.get_mut(&job_key) else {
            continue;
        };
        if entry.status.state != JobState::Queued || entry.claim.is_some() {
            continue;
        }
        // Bound to the session's deadline too: a paused worker's handler sees the loss.
        let Some(deadline) = shared.session_deadline(session) else {
            // Put back: the job was never claimed, and is nowhere else.
            q.ready.push_front(job_key);
            return Take::SessionEnded;
        };
        let token = shared.next_revision();
        let on_end = {
            let weak = Arc::downgrade(shared);
            let job_key = job_key.clone();
            Box::new(move |reason: &str| worker_lost(&weak, &job_key, token, reason))
        };
        // Registered under the table lock: a session that ends at any point either never sees
        // this claim or requeues it.
        let registration = match shared.on_session_end(session, on_end) {
            Ok(r) => r,
            Err(_) => {
                q.ready.push_front(job_key);
                return Take::SessionEnded;
            }
        };
        entry.status.state = JobState::Running;
        entry.status.attempts = entry.status.attempts.saturating_add(1);
        let (lost, signal) = loss_signal_until(deadline);
        entry.claim = Some(Claim {
            token,
            session,
            registration,
            lost,
        });
        entry.changed.send_replace(());
        // The payload is copied once, straight into the handler's context.
        let ctx = JobContext::new(entry.status.id.clone(), &entry.job, entry.status.attempts)
            .with_claim(token, signal);
        let claimed = Claimed {
            id: ctx.id.clone(),
            attempt: ctx.attempt,
            job_key,
            token,
        };
        return Take::Claimed(claimed, Box::new(ctx));
    }
    Take::Empty
}

/// Session-end callback of a claim: the job goes back to Queued (or Failed once out of
/// attempts) unless the claim already finished.
fn worker_lost(shared: &Weak<Shared>, job_key: &str, token: u64, reason: &str) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let mut state = locked(&shared.jobs.state);
    let Some(entry) = state.jobs.get_mut(job_key) else {
        return;
    };
    if entry.claim.as_ref().is_none_or(|c| c.token != token) {
        return;
    }
    if let Some(claim) = entry.claim.take() {
        claim.lost.fire(format!("worker lost: {reason}"));
    }
    let requeue = apply_worker_loss(&entry.job, &mut entry.status, reason);
    entry.changed.send_replace(());
    tracing::warn!(backend = BACKEND, primitive = "task", job = %entry.status.id, attempts = entry.status.attempts, reason, redelivered = requeue, "a worker died holding the job");
    if requeue {
        let queue = entry.queue.clone();
        state.make_ready(&queue, job_key);
    } else {
        state.retire(job_key);
    }
}

/// Records the outcome of the attempt holding `claim`, if the claim is still the job's.
fn finish(client: &ClientInner, claim: &Claimed, outcome: std::result::Result<Vec<u8>, String>) {
    let shared = &client.shared;
    if client.session().is_err() {
        // A killed worker reports nothing; its session's expiry redelivers the job.
        tracing::debug!(backend = BACKEND, primitive = "task", id = %claim.id, "result of a killed worker dropped");
        return;
    }
    let (token, delay) = {
        let mut state = locked(&shared.jobs.state);
        let Some(entry) = state.jobs.get_mut(&claim.job_key) else {
            return;
        };
        let Some(c) = entry.claim.take_if(|c| c.token == claim.token) else {
            tracing::warn!(
                backend = BACKEND,
                primitive = "task",
                id = %claim.id,
                attempt = claim.attempt,
                "stale claim: the job was redelivered; this attempt's result is ignored"
            );
            return;
        };
        shared.cancel_on_end(c.session, c.registration);
        let attempt = entry.status.attempts;
        // The delay before the next attempt; None once the job is final.
        let requeue = match apply_outcome(&entry.job, &mut entry.status, attempt, outcome) {
            Next::Succeeded(output) => {
                entry.status.output = Some(output);
                None
            }
            Next::Retry { delay } => Some(delay),
            Next::Failed => None,
        };
        entry.changed.send_replace(());
        match requeue {
            None => {
                state.retire(&claim.job_key);
                return;
            }
            Some(delay) if delay.is_zero() => {
                let queue = entry.queue.clone();
                state.make_ready(&queue, &claim.job_key);
                return;
            }
            Some(delay) => {
                let token = shared.next_revision();
                entry.retry = Some(token);
                (token, delay)
            }
        }
    };
    let weak = Arc::downgrade(shared);
    let job_key = claim.job_key.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let mut state = locked(&shared.jobs.state);
        let Some(entry) = state.jobs.get_mut(&job_key) else {
            return;
        };
        if entry.retry != Some(token) || entry.status.state != JobState::Queued {
            return;
        }
        entry.retry = None;
        let queue = entry.queue.clone();
        state.make_ready(&queue, &job_key);
    });
}

/// A command pool of at least 1 and at most [`MAX_CONCURRENCY`].
fn check_pool(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("pool must be at least 1").with_backend(BACKEND));
    }
    if n > MAX_CONCURRENCY {
        return Err(
            Error::invalid(format!("pool is {n}; the maximum is {MAX_CONCURRENCY}"))
                .with_backend(BACKEND),
        );
    }
    Ok(())
}

/// Why a command's task ended without a result.
fn join_error_message(e: JoinError) -> String {
    if e.is_panic() {
        format!(
            "command panicked: {}",
            panic_message(e.into_panic().as_ref())
        )
    } else {
        "command was cancelled".to_string()
    }
}

pub(crate) struct LocalTask {
    client: Arc<ClientInner>,
}

impl LocalTask {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        LocalTask { client }
    }

    fn job_key(&self, id: &JobId) -> String {
        self.client.key(&["job", &id.0])
    }

    fn not_found(id: &JobId) -> Error {
        Error::new(ErrorKind::NotFound, "no such job in this namespace")
            .with_backend(BACKEND)
            .with_id(id.0.clone())
    }
}

#[async_trait]
impl JobStore for LocalTask {
    type Queue = LocalQueue;

    async fn submit(&self, job: Job) -> Result<JobId> {
        self.client.session()?;
        // A keyed job's id is its key: a second submit of the key finds the first job.
        let id = JobId(
            job.key
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        );
        let job_key = self.job_key(&id);
        let queue = self.client.key(&["task", &job.name]);
        let mut state = locked(&self.client.shared.jobs.state);
        state.forget_expired(Instant::now());
        if state.jobs.contains_key(&job_key) {
            tracing::debug!(backend = BACKEND, primitive = "task", job = %id, "job key already submitted");
            return Ok(id);
        }
        let status = JobStatus::queued(id.clone(), &job);
        state.jobs.insert(
            job_key.clone(),
            JobEntry {
                job,
                queue: queue.clone(),
                status,
                claim: None,
                retry: None,
                changed: watch::channel(()).0,
                retention: self.client.config.job_retention,
            },
        );
        state.make_ready(&queue, &job_key);
        tracing::debug!(backend = BACKEND, primitive = "task", job = %id, "job queued");
        Ok(id)
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        self.client.session()?;
        let mut state = locked(&self.client.shared.jobs.state);
        state.forget_expired(Instant::now());
        state
            .jobs
            .get(&self.job_key(id))
            .map(|e| e.status.clone())
            .ok_or_else(|| Self::not_found(id))
    }

    async fn wait(&self, id: &JobId) -> Result<JobStatus> {
        self.client.session()?;
        let job_key = self.job_key(id);
        loop {
            // Subscribe under the lock that guards the status, so no change is missed.
            let mut changed = {
                let state = locked(&self.client.shared.jobs.state);
                let entry = state
                    .jobs
                    .get(&job_key)
                    .ok_or_else(|| Self::not_found(id))?;
                if entry.status.state.is_final() {
                    return Ok(entry.status.clone());
                }
                entry.changed.subscribe()
            };
            // The sender is dropped when the job is forgotten.
            changed.changed().await.map_err(|_| Self::not_found(id))?;
        }
    }

    async fn queue(&self, name: &str) -> Result<LocalQueue> {
        self.client.session()?;
        Ok(LocalQueue {
            client: self.client.clone(),
            key: self.client.key(&["task", name]),
        })
    }
}

/// One job name's queue, as a worker of this client sees it.
pub(crate) struct LocalQueue {
    client: Arc<ClientInner>,
    key: String,
}

#[async_trait]
impl JobQueue for LocalQueue {
    type Claim = Claimed;

    async fn claim(&self, _name: &str, _max: usize) -> Result<sync_kit::task::Claimed<Claimed>> {
        loop {
            // Listen before looking, so a job queued between the look and the wait wakes us.
            let mut woken = Box::pin(
                self.client
                    .shared
                    .jobs
                    .queue_wake(&self.key)
                    .notified_owned(),
            );
            woken.as_mut().enable();
            let session = match self.client.session() {
                Ok(session) => session,
                Err(e) => {
                    // A dead worker claims nothing: a wake-up it was given goes to another.
                    self.client.shared.jobs.queue_wake(&self.key).notify_one();
                    return Err(e);
                }
            };
            match take_next(&self.client.shared, &self.key, session) {
                Take::Claimed(claim, ctx) => return Ok(sync_kit::task::Claimed::Job(claim, *ctx)),
                Take::SessionEnded => continue,
                Take::Empty => return Ok(sync_kit::task::Claimed::Empty(woken)),
            }
        }
    }

    async fn finish(&self, claim: Claimed, outcome: Outcome) {
        finish(&self.client, &claim, outcome);
    }

    /// A killed client's workers stop at their next claim (which fails with Closed); their
    /// running attempts finish, but `finish` drops what a dead process would never report.
    async fn closed(&self) {
        std::future::pending().await
    }
}

/// Seed parity: a plain closure, run on a [`CommandPool`] of the local backend.
///
/// The closure is synchronous and may block: it runs on tokio's blocking threads, never on a
/// runtime worker. It can be run many times, so it is `Fn`.
#[derive(Clone)]
pub struct Command {
    name: String,
    f: Arc<dyn Fn() -> std::result::Result<(), HandlerError> + Send + Sync>,
}

impl Command {
    /// A command called `name` (an id: non-empty, at most 512 bytes, no NUL) running `f`.
    ///
    /// ```
    /// let cmd = sync_local::Command::new("cleanup", || -> Result<(), std::io::Error> { Ok(()) });
    /// assert_eq!(cmd.name(), "cleanup");
    /// ```
    pub fn new<F, E>(name: impl Into<String>, f: F) -> Self
    where
        F: Fn() -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Into<HandlerError>,
    {
        Command {
            name: name.into(),
            f: Arc::new(move || f().map_err(Into::into)),
        }
    }

    /// The command's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A command's error, kept as the `source` of the error [`CommandPool::run`] returns.
struct CommandError(HandlerError);

impl fmt::Debug for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for CommandError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Seed parity: runs plain closure [`Command`]s on a bounded local pool and remembers the
/// status of the last run of each command name.
///
/// [`run`](CommandPool::run) returns every error: a command that returns `Err` (or panics) is an
/// [`ErrorKind::Backend`] error whose message includes the command's error (which is also its
/// `source`), and [`status`](CommandPool::status) then shows the run as Failed with that error
/// as `last_error`. A command runs once (one attempt); nothing is retried. Dropping the `run`
/// future does not cancel a command: it still runs and its status is still recorded.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use sync_core::{ErrorKind, JobState};
/// use sync_local::{Command, CommandPool};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let pool = CommandPool::new(&client, 2)?;
/// let ok = pool.run(Command::new("greet", || -> Result<(), String> { Ok(()) })).await?;
/// assert_eq!(ok.state, JobState::Succeeded);
///
/// let err = pool
///     .run(Command::new("greet", || Err::<(), _>("disk full")))
///     .await
///     .unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Backend);
/// assert!(err.to_string().contains("disk full"));
/// let last = pool.status("greet").unwrap();
/// assert_eq!((last.state, last.last_error.as_deref()), (JobState::Failed, Some("disk full")));
/// # Ok(()) }
/// ```
pub struct CommandPool {
    client: Arc<ClientInner>,
    permits: Arc<Semaphore>,
    size: usize,
    runs: Arc<CommandRuns>,
}

#[derive(Default)]
struct CommandRuns {
    next: AtomicU64,
    /// The last run of each command name: its sequence number and status.
    last: Mutex<HashMap<String, (u64, JobStatus)>>,
}

impl CommandRuns {
    /// Records `status` if run `seq` is still the name's last run.
    fn record(&self, seq: u64, status: &JobStatus) {
        let mut last = locked(&self.last);
        if let Some(slot) = last.get_mut(&status.name).filter(|(s, _)| *s == seq) {
            slot.1 = status.clone();
        }
    }
}

impl fmt::Debug for CommandPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandPool")
            .field("pool", &self.size)
            .finish_non_exhaustive()
    }
}

impl CommandPool {
    /// A pool of `pool` commands at once on `client`; 0 is InvalidArgument.
    pub fn new(client: &Client, pool: usize) -> Result<CommandPool> {
        check_pool(pool)?;
        client.inner.session()?;
        Ok(CommandPool {
            client: client.inner.clone(),
            permits: Arc::new(Semaphore::new(pool)),
            size: pool,
            runs: Default::default(),
        })
    }

    /// Runs `command` on the pool (waiting for a free slot) and returns its final status, or
    /// the command's error as an [`ErrorKind::Backend`] error.
    pub async fn run(&self, command: Command) -> Result<JobStatus> {
        let span =
            tracing::debug_span!("run", backend = BACKEND, primitive = "task", id = %command.name);
        async {
            sync_core::id::validate("command name", &command.name)
                .map_err(|e| e.with_backend(BACKEND))?;
            self.client.session()?;
            let name = command.name.clone();
            let mut status = JobStatus::queued(
                JobId(uuid::Uuid::new_v4().to_string()),
                &Job::new(&name, []),
            );
            let seq = self.runs.next.fetch_add(1, Ordering::SeqCst);
            locked(&self.runs.last).insert(name.clone(), (seq, status.clone()));

            let permits = self.permits.clone();
            let runs = self.runs.clone();
            let run = tokio::spawn(
                async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        status.state = JobState::Failed;
                        status.last_error = Some("command pool closed".into());
                        runs.record(seq, &status);
                        return (status, None);
                    };
                    status.state = JobState::Running;
                    status.attempts = 1;
                    runs.record(seq, &status);
                    let f = command.f.clone();
                    let error = match tokio::task::spawn_blocking(move || f()).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some((e.to_string(), Some(CommandError(e)))),
                        Err(e) => Some((join_error_message(e), None)),
                    };
                    match &error {
                        None => status.state = JobState::Succeeded,
                        Some((msg, _)) => {
                            tracing::warn!(error = %msg, "command failed");
                            status.state = JobState::Failed;
                            status.last_error = Some(msg.clone());
                        }
                    }
                    runs.record(seq, &status);
                    (status, error.and_then(|(_, source)| source))
                }
                .in_current_span(),
            );
            let (status, source) = run.await.map_err(|e| {
                Error::new(ErrorKind::Backend, join_error_message(e))
                    .with_backend(BACKEND)
                    .with_id(name.clone())
            })?;
            if status.state == JobState::Succeeded {
                return Ok(status);
            }
            let msg = status.last_error.clone().unwrap_or_default();
            let err = Error::new(ErrorKind::Backend, format!("command failed: {msg}"))
                .with_backend(BACKEND)
                .with_id(name);
            Err(match source {
                Some(source) => err.with_source(source),
                None => err,
            })
        }
        .instrument(span)
        .await
    }

    /// The status of the last run of the command called `name` through this pool (Queued or
    /// Running while it is under way), or None if it never ran here.
    pub fn status(&self, name: &str) -> Option<JobStatus> {
        locked(&self.runs.last).get(name).map(|(_, s)| s.clone())
    }

    /// The pool size.
    pub fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use std::time::Duration;

    use sync_core::{
        Backend, ErrorKind, Handler, HandlerError, Job, JobContext, JobId, JobState,
        MAX_PAYLOAD_LEN, Worker, WorkerOptions,
    };
    use tokio::sync::Semaphore;

    use super::{Command, CommandPool};
    use crate::{Client, Cluster, Config};

    const LONG: Option<Duration> = Some(Duration::from_secs(10));

    #[tokio::test]
    async fn a_ready_job_wakes_one_idle_worker() {
        let cluster = Cluster::new();
        let jobs = &cluster.shared.jobs;
        // Three idle workers listening, as `LocalQueue::claim` leaves them.
        let mut idle: Vec<_> = (0..3)
            .map(|_| Box::pin(jobs.queue_wake("q").notified_owned()))
            .collect();
        for w in &mut idle {
            w.as_mut().enable();
        }
        let woken = |idle: &mut Vec<_>| {
            let mut n = 0;
            idle.retain_mut(
                |w: &mut std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>| {
                    let ready = futures::FutureExt::now_or_never(w.as_mut()).is_some();
                    n += usize::from(ready);
                    !ready
                },
            );
            n
        };
        super::locked(&jobs.state).make_ready("q", "job-1");
        assert_eq!(woken(&mut idle), 1, "one job, one worker woken");
        super::locked(&jobs.state).make_ready("q", "job-2");
        super::locked(&jobs.state).make_ready("q", "job-3");
        assert_eq!(woken(&mut idle), 2);
    }

    fn client(cluster: &Cluster, ns: &str) -> Client {
        cluster
            .client(
                Config::default()
                    .with_namespace(ns)
                    .with_ttl(Duration::from_millis(100)),
            )
            .unwrap()
    }

    fn handler<F, Fut>(f: F) -> Arc<dyn Handler>
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, HandlerError>> + Send + 'static,
    {
        Arc::new(f)
    }

    fn echo() -> Arc<dyn Handler> {
        handler(|job: JobContext| async move { Ok(job.payload) })
    }

    #[tokio::test(start_paused = true)]
    async fn finished_jobs_are_forgotten_after_retention() {
        let cluster = Cluster::new();
        let config = Config::default()
            .with_ttl(Duration::from_secs(600))
            .with_job_retention(Duration::from_secs(60));
        let task = cluster.client(config).unwrap().task().unwrap();
        let _w = task
            .work("echo", echo(), WorkerOptions::new())
            .await
            .unwrap();
        let old = task.run(Job::new("echo", "a")).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        task.submit(Job::new("echo", "b")).await.unwrap();
        assert_eq!(
            task.status(&old.id).await.unwrap().state,
            JobState::Succeeded
        );

        tokio::time::advance(Duration::from_secs(2)).await;
        let fresh = task.submit(Job::new("echo", "c")).await.unwrap();
        let err = task.status(&old.id).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(task.status(&fresh).await.is_ok());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn run_submit_status_wait() {
        let cluster = Cluster::new();
        let task = client(&cluster, "t").task().unwrap();
        let id = task.submit(Job::new("echo", "hi")).await.unwrap();
        let s = task.status(&id).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Queued, 0));
        let err = task
            .wait(&id, Some(Duration::from_millis(30)))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);

        let worker = task
            .work("echo", echo(), WorkerOptions::new())
            .await
            .unwrap();
        let s = task.wait(&id, LONG).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Succeeded, 1));
        assert_eq!(s.output.as_deref(), Some(&b"hi"[..]));
        let s = task
            .run(Job::new("echo", "again").with_label("k", "v"))
            .await
            .unwrap();
        assert_eq!(s.output.as_deref(), Some(&b"again"[..]));
        assert_eq!(s.labels.get("k").map(String::as_str), Some("v"));
        worker.stop().await;

        let unknown = JobId("nope".into());
        assert_eq!(
            task.status(&unknown).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            task.wait(&unknown, None).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn limits_are_named() {
        let cluster = Cluster::new();
        let task = client(&cluster, "t").task().unwrap();
        let err = task
            .submit(Job::new("big", vec![0u8; MAX_PAYLOAD_LEN + 1]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains(&MAX_PAYLOAD_LEN.to_string()),
            "{err}"
        );
        assert_eq!(err.backend(), Some(crate::BACKEND));
        task.submit(Job::new("big", vec![0u8; MAX_PAYLOAD_LEN]))
            .await
            .unwrap();
        let err = task.submit(Job::new("", "")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = task
            .submit(Job::new("x", "").with_max_attempts(0))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);

        let err = task
            .work("x", echo(), WorkerOptions::new().with_concurrency(0))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("at least 1"), "{err}");
        let err = task
            .work(
                "x",
                echo(),
                WorkerOptions::new().with_concurrency(usize::MAX),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("maximum"), "{err}");
        let err = task
            .work("", echo(), WorkerOptions::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn namespaces_never_collide() {
        let cluster = Cluster::new();
        let a = client(&cluster, "a").task().unwrap();
        let b = client(&cluster, "b").task().unwrap();
        let _wb = b.work("echo", echo(), WorkerOptions::new()).await.unwrap();
        let id = a.submit(Job::new("echo", "x")).await.unwrap();
        assert_eq!(b.status(&id).await.unwrap_err().kind(), ErrorKind::NotFound);
        // A window in which b's worker must NOT take a's job.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(a.status(&id).await.unwrap().state, JobState::Queued);
        let _wa = a.work("echo", echo(), WorkerOptions::new()).await.unwrap();
        assert_eq!(a.wait(&id, LONG).await.unwrap().state, JobState::Succeeded);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retries_with_backoff_then_fails() {
        let cluster = Cluster::new();
        let task = client(&cluster, "t").task().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let _w = task
            .work(
                "flaky",
                handler(move |job: JobContext| {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        if job.payload == b"ok-on-2" && job.attempt == 2 {
                            Ok(b"done".to_vec())
                        } else {
                            Err(format!("boom {}", job.attempt).into())
                        }
                    }
                }),
                WorkerOptions::new(),
            )
            .await
            .unwrap();
        let job = Job::new("flaky", "ok-on-2").with_backoff(Duration::from_millis(300));
        let id = task.submit(job).await.unwrap();
        // During the backoff the job shows Queued with the first error.
        let s = loop {
            let s = task.status(&id).await.unwrap();
            if s.last_error.is_some() {
                break s;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!((s.state, s.attempts), (JobState::Queued, 1));
        assert_eq!(s.last_error.as_deref(), Some("boom 1"));
        let s = task.wait(&id, LONG).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Succeeded, 2));

        let job = Job::new("flaky", "never")
            .with_max_attempts(3)
            .with_backoff(Duration::from_millis(1));
        let s = task.run(job).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Failed, 3));
        assert_eq!(s.last_error.as_deref(), Some("boom 3"));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn panicking_handler_counts_as_failure() {
        let cluster = Cluster::new();
        let task = client(&cluster, "t").task().unwrap();
        let _w = task
            .work(
                "panics",
                handler(|job: JobContext| async move {
                    if job.attempt == 1 {
                        panic!("kaboom");
                    }
                    Ok(Vec::new())
                }),
                WorkerOptions::new(),
            )
            .await
            .unwrap();
        let job = Job::new("panics", "").with_backoff(Duration::from_millis(1));
        let s = task.run(job.clone()).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Succeeded, 2));
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .contains("panicked: kaboom"),
            "{s:?}"
        );

        let s = task.run(job.with_max_attempts(1)).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Failed, 1));
        assert_eq!(s.last_error.as_deref(), Some("handler panicked: kaboom"));
        // The worker survives its handlers' panics.
        let s = task
            .run(Job::new("panics", "").with_max_attempts(1))
            .await
            .unwrap();
        assert_eq!(s.state, JobState::Failed);
    }

    /// A handler whose attempt 1 blocks until `gate` opens and answers "stale"; later attempts
    /// answer "fresh".
    fn gated(gate: Arc<Semaphore>, started: Arc<Semaphore>) -> Arc<dyn Handler> {
        handler(move |job: JobContext| {
            let (gate, started) = (gate.clone(), started.clone());
            async move {
                started.add_permits(1);
                if job.attempt == 1 {
                    let _ = gate.acquire().await;
                    return Ok(b"stale".to_vec());
                }
                Ok(b"fresh".to_vec())
            }
        })
    }

    /// A fresh client of `cluster` running a [`gated`] worker with a pool of `concurrency`,
    /// with the handler's gate and its start signal.
    async fn gated_worker(
        cluster: &Cluster,
        concurrency: usize,
    ) -> (Client, Worker, Arc<Semaphore>, Arc<Semaphore>) {
        let worker_client = client(cluster, "t");
        let (gate, started) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
        let worker = worker_client
            .task()
            .unwrap()
            .work(
                "gated",
                gated(gate.clone(), started.clone()),
                WorkerOptions::new().with_concurrency(concurrency),
            )
            .await
            .unwrap();
        (worker_client, worker, gate, started)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stale_claim_result_is_ignored_after_revoke() {
        let cluster = Cluster::new();
        let (worker_client, w, gate, started) = gated_worker(&cluster, 2).await;
        let submitter = client(&cluster, "t").task().unwrap();
        let id = submitter.submit(Job::new("gated", "")).await.unwrap();
        started.acquire().await.unwrap().forget();
        assert_eq!(
            submitter.status(&id).await.unwrap().state,
            JobState::Running
        );

        worker_client.revoke();
        // Redelivered (to the same worker, on its new session) and finished by attempt 2.
        let s = submitter.wait(&id, LONG).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Succeeded, 2));
        assert_eq!(s.output.as_deref(), Some(&b"fresh"[..]));
        assert_eq!(
            s.last_error.as_deref(),
            Some("worker lost: session revoked")
        );

        // The first attempt finishes late; its result is dropped.
        gate.add_permits(1);
        w.stop().await;
        let s = submitter.status(&id).await.unwrap();
        assert_eq!(s.output.as_deref(), Some(&b"fresh"[..]));
        assert_eq!(s.attempts, 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn killed_worker_redelivers_to_another() {
        let cluster = Cluster::new();
        let (dying, _dead, gate, started) = gated_worker(&cluster, 1).await;
        let other = client(&cluster, "t").task().unwrap();
        let id = other.submit(Job::new("gated", "")).await.unwrap();
        started.acquire().await.unwrap().forget();
        dying.kill();
        // The killed worker's handler answers, but a dead process reports nothing.
        gate.add_permits(1);
        let _alive = other
            .work("gated", gated(gate, started), WorkerOptions::new())
            .await
            .unwrap();
        let s = other.wait(&id, LONG).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Succeeded, 2));
        assert_eq!(s.output.as_deref(), Some(&b"fresh"[..]));
        assert!(
            s.last_error
                .as_deref()
                .unwrap()
                .starts_with("worker lost: session expired")
        );
        assert_eq!(
            dying.task().unwrap().status(&id).await.unwrap_err().kind(),
            ErrorKind::Closed
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn worker_loss_on_last_attempt_fails_the_job() {
        let cluster = Cluster::new();
        let (worker_client, _w, gate, started) = gated_worker(&cluster, 1).await;
        let task = client(&cluster, "t").task().unwrap();
        let id = task
            .submit(Job::new("gated", "").with_max_attempts(1))
            .await
            .unwrap();
        started.acquire().await.unwrap().forget();
        worker_client.revoke();
        let s = task.wait(&id, LONG).await.unwrap();
        assert_eq!((s.state, s.attempts), (JobState::Failed, 1));
        assert_eq!(
            s.last_error.as_deref(),
            Some("worker lost: session revoked")
        );
        gate.add_permits(1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pool_is_bounded_and_stop_waits() {
        let cluster = Cluster::new();
        let task = client(&cluster, "t").task().unwrap();
        let (running, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (r, p, d) = (running.clone(), peak.clone(), done.clone());
        let w = task
            .work(
                "slow",
                handler(move |_job: JobContext| {
                    let (r, p, d) = (r.clone(), p.clone(), d.clone());
                    async move {
                        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                        p.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        r.fetch_sub(1, Ordering::SeqCst);
                        d.fetch_add(1, Ordering::SeqCst);
                        Ok(Vec::new())
                    }
                }),
                WorkerOptions::new().with_concurrency(3),
            )
            .await
            .unwrap();
        let mut ids = Vec::new();
        for _ in 0..9 {
            ids.push(task.submit(Job::new("slow", "")).await.unwrap());
        }
        for id in &ids {
            assert_eq!(
                task.wait(id, LONG).await.unwrap().state,
                JobState::Succeeded
            );
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);

        let id = task.submit(Job::new("slow", "")).await.unwrap();
        while task.status(&id).await.unwrap().state != JobState::Running {
            tokio::task::yield_now().await;
        }
        w.stop().await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            10,
            "stop waits for running handlers"
        );
        let after = task.submit(Job::new("slow", "")).await.unwrap();
        // A window in which the stopped worker must NOT take the job.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(task.status(&after).await.unwrap().state, JobState::Queued);

        // Dropping a worker stops it without blocking.
        let w = task
            .work("other", echo(), WorkerOptions::new())
            .await
            .unwrap();
        drop(w);
        let id = task.submit(Job::new("other", "")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(task.status(&id).await.unwrap().state, JobState::Queued);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn command_pool() {
        let cluster = Cluster::new();
        let client = client(&cluster, "t");
        let err = CommandPool::new(&client, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("pool must be at least 1"), "{err}");

        let pool = Arc::new(CommandPool::new(&client, 2).unwrap());
        assert_eq!(pool.status("c"), None);
        let s = pool
            .run(Command::new("c", || -> Result<(), std::io::Error> {
                Ok(())
            }))
            .await
            .unwrap();
        assert_eq!(
            (s.state, s.attempts, s.name.as_str()),
            (JobState::Succeeded, 1, "c")
        );
        assert_eq!(pool.status("c").unwrap().state, JobState::Succeeded);

        let err = pool
            .run(Command::new("c", || {
                Err::<(), _>(std::io::Error::other("disk full"))
            }))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Backend);
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(std::error::Error::source(&err).is_some());
        let s = pool.status("c").unwrap();
        assert_eq!(
            (s.state, s.last_error.as_deref()),
            (JobState::Failed, Some("disk full"))
        );

        let err = pool
            .run(Command::new("p", || -> Result<(), String> {
                panic!("oops")
            }))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("command panicked: oops"), "{err}");
        assert_eq!(pool.status("p").unwrap().state, JobState::Failed);
        let err = pool
            .run(Command::new("", || Ok::<(), String>(())))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);

        // At most `pool` commands at once; the blocking closures never stall the runtime.
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, p) = (running.clone(), peak.clone());
        let slow = Command::new("slow", move || -> Result<(), String> {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(30));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        });
        let runs: Vec<_> = (0..6)
            .map(|_| {
                let (pool, slow) = (pool.clone(), slow.clone());
                tokio::spawn(async move { pool.run(slow).await })
            })
            .collect();
        for r in runs {
            r.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);

        // The status always reflects the last run, even while it runs.
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = gate.clone();
        let blocked = Command::new("c", move || -> Result<(), String> {
            g.wait();
            Ok(())
        });
        let p2 = pool.clone();
        let run = tokio::spawn(async move { p2.run(blocked).await });
        while pool.status("c").unwrap().state != JobState::Running {
            tokio::task::yield_now().await;
        }
        gate.wait();
        run.await.unwrap().unwrap();
        assert_eq!(pool.status("c").unwrap().state, JobState::Succeeded);

        client.kill();
        let err = pool
            .run(Command::new("c", || Ok::<(), String>(())))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
    }
}
