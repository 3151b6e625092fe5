//! Distributed task execution: named jobs with byte payloads, run by workers in any process.

use std::{collections::BTreeMap, fmt, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::{Error, LossSignal, Result};

/// The longest job payload accepted by default, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 512 * 1024;

/// A job to run: a handler name, a payload and its retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// The handler name workers registered with [`Task::work`].
    pub name: String,
    /// Opaque input for the handler.
    pub payload: Vec<u8>,
    /// Free-form tags carried to the handler and the status (Cron puts term and tick here).
    pub labels: BTreeMap<String, String>,
    /// Attempts before the job is marked Failed (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles with each further retry.
    pub backoff: Duration,
    /// The idempotency key: submitting a job with a key that a job (still within its
    /// retention) already has returns that job's id instead of queueing a second one. The key
    /// becomes the job's id. `None`: every submit is a new job with a fresh id.
    #[serde(default)]
    pub key: Option<String>,
}

impl Job {
    /// A job for handler `name` with `payload`, 3 attempts and a 100 ms backoff.
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Job {
            name: name.into(),
            payload: payload.into(),
            labels: BTreeMap::new(),
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            key: None,
        }
    }

    /// Makes submission idempotent: a second submit with the same `key` yields the first job's
    /// id, never a second job, even when the first submit's answer was lost. The key is the
    /// job's id, so it follows the id rules.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a label.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the number of attempts.
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets the first retry delay.
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Checks the job against the id rules and limits.
    pub fn validate(&self) -> Result<()> {
        crate::id::validate("job name", &self.name)?;
        if let Some(key) = &self.key {
            crate::id::validate("job key", key).map_err(|e| e.with_id(&self.name))?;
        }
        if self.max_attempts == 0 {
            return Err(Error::invalid("max_attempts must be at least 1").with_id(&self.name));
        }
        if self.payload.len() > MAX_PAYLOAD_LEN {
            return Err(Error::invalid(format!(
                "payload is {} bytes; the maximum is {MAX_PAYLOAD_LEN}",
                self.payload.len()
            ))
            .with_id(&self.name));
        }
        Ok(())
    }

    /// The delay before attempt `next_attempt` (2 = first retry), capped at one minute.
    pub fn retry_delay(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(16);
        // Saturating: `backoff` is caller input (or decoded from a backend), and `Duration *`
        // panics on overflow.
        self.backoff
            .saturating_mul(2u32.pow(doublings))
            .min(Duration::from_secs(60))
    }
}

/// A job's id, unique within the backend namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        JobId(s)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum JobState {
    /// Waiting for a worker (also between retries).
    Queued,
    /// Claimed by a worker.
    Running,
    /// A handler returned Ok.
    Succeeded,
    /// Every attempt failed.
    Failed,
}

impl JobState {
    /// Succeeded or Failed.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// What a backend knows of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobStatus {
    /// The job id.
    pub id: JobId,
    /// The handler name.
    pub name: String,
    /// The state.
    pub state: JobState,
    /// Attempts started so far (redeliveries count).
    pub attempts: u32,
    /// The last handler error, or why the last attempt was abandoned.
    pub last_error: Option<String>,
    /// The handler's output once Succeeded.
    pub output: Option<Vec<u8>>,
    /// The job's labels.
    pub labels: BTreeMap<String, String>,
}

impl JobStatus {
    /// A new status in Queued with no attempts yet.
    pub fn queued(id: JobId, job: &Job) -> Self {
        JobStatus {
            id,
            name: job.name.clone(),
            state: JobState::Queued,
            attempts: 0,
            last_error: None,
            output: None,
            labels: job.labels.clone(),
        }
    }
}

/// What a handler is given for one attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JobContext {
    /// The job id.
    pub id: JobId,
    /// The handler name.
    pub name: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The job's labels.
    pub labels: BTreeMap<String, String>,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// The claim's fencing token: strictly increases with each claim of this job, so a
    /// resource the handler writes to can refuse a stale attempt's writes.
    pub token: u64,
    /// Signals that the claim ended (the worker's lease was lost and the job may be handed to
    /// another worker) while the handler still runs.
    claim: Option<LossSignal>,
}

impl JobContext {
    /// Built by backends.
    pub fn new(id: JobId, job: &Job, attempt: u32) -> Self {
        JobContext {
            id,
            name: job.name.clone(),
            payload: job.payload.clone(),
            labels: job.labels.clone(),
            attempt,
            token: 0,
            claim: None,
        }
    }

    /// Built by backends: the claim's fencing token and loss signal.
    pub fn with_claim(mut self, token: u64, lost: LossSignal) -> Self {
        self.token = token;
        self.claim = Some(lost);
        self
    }

    /// Whether this attempt's claim has ended: stop, or fence, side effects.
    pub fn is_lost(&self) -> bool {
        self.claim.as_ref().is_some_and(LossSignal::is_lost)
    }

    /// Resolves (with the reason) once this attempt's claim has ended; never, for a backend
    /// that gave the attempt no loss signal.
    pub async fn lost(&self) -> String {
        match &self.claim {
            Some(signal) => signal.wait().await,
            None => std::future::pending().await,
        }
    }

    /// A clone of the claim's loss signal, to watch from another task.
    pub fn loss_signal(&self) -> Option<LossSignal> {
        self.claim.clone()
    }
}

/// The error a handler returns; recorded as the job's `last_error`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one attempt of a job.
pub trait Handler: Send + Sync + 'static {
    /// Runs the job; Ok carries the output.
    fn call(&self, ctx: JobContext) -> BoxFuture<'static, Result<Vec<u8>, HandlerError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, HandlerError>> + Send + 'static,
{
    fn call(&self, ctx: JobContext) -> BoxFuture<'static, Result<Vec<u8>, HandlerError>> {
        Box::pin(self(ctx))
    }
}

/// Options for [`Task::work`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// How many jobs this worker runs at once (the pool size, at least 1).
    pub concurrency: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions { concurrency: 1 }
    }
}

impl WorkerOptions {
    /// A pool of one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the pool size.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::invalid(
                "worker concurrency (pool) must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The backend side of a running worker, boxed inside a [`Worker`].
#[async_trait]
pub trait WorkerControl: Send + Sync + 'static {
    /// Stops taking jobs and waits for running ones to finish.
    async fn stop(&mut self);
    /// Stops taking jobs without waiting (called from `Drop`).
    fn stop_in_background(self: Box<Self>);
}

/// A registered worker pool. Dropping it stops taking new jobs.
#[must_use = "dropping the Worker stops it"]
pub struct Worker {
    inner: Option<Box<dyn WorkerControl>>,
}

impl Worker {
    /// Built by backends.
    pub fn new(inner: Box<dyn WorkerControl>) -> Self {
        Worker { inner: Some(inner) }
    }

    /// Stops taking jobs and waits for the running ones.
    pub async fn stop(mut self) {
        if let Some(mut inner) = self.inner.take() {
            inner.stop().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.stop_in_background();
        }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// Distributed job execution with at-least-once delivery.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::sync::Arc;
/// use sync_core::{Backend, Job, JobContext, JobState, Task, WorkerOptions};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let task: Arc<dyn Task> = client.task()?;
///
/// let _worker = task
///     .work(
///         "resize",
///         Arc::new(|job: JobContext| async move { Ok(job.payload.repeat(2)) }),
///         WorkerOptions::new().with_concurrency(4),
///     )
///     .await?;
/// let status = task.run(Job::new("resize", "ab")).await?;
/// assert_eq!(status.state, JobState::Succeeded);
/// assert_eq!(status.output.as_deref(), Some(&b"abab"[..]));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Task: Send + Sync {
    /// Queues a job and returns its id.
    async fn submit(&self, job: Job) -> Result<JobId>;

    /// The job's current status; NotFound for an unknown id.
    async fn status(&self, id: &JobId) -> Result<JobStatus>;

    /// Waits until the job is Succeeded or Failed (`timeout` bounds the wait).
    async fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus>;

    /// Registers a handler for jobs named `name` and takes them with a bounded pool.
    async fn work(
        &self,
        name: &str,
        handler: Arc<dyn Handler>,
        opts: WorkerOptions,
    ) -> Result<Worker>;

    /// Submits and waits for the outcome.
    async fn run(&self, job: Job) -> Result<JobStatus> {
        let id = self.submit(job).await?;
        self.wait(&id, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps_without_overflow() {
        let job = Job::new("j", "").with_backoff(Duration::from_millis(100));
        assert_eq!(job.retry_delay(2), Duration::from_millis(100));
        assert_eq!(job.retry_delay(3), Duration::from_millis(200));
        assert_eq!(job.retry_delay(100), Duration::from_secs(60));
        // A huge backoff (caller input, or a job decoded from a backend) must not panic.
        let huge = Job::new("j", "").with_backoff(Duration::MAX);
        assert_eq!(huge.retry_delay(2), Duration::from_secs(60));
        assert_eq!(huge.retry_delay(5), Duration::from_secs(60));
    }
}
