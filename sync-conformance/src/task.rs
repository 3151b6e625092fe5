//! Task cases (DESIGN §3 Task).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use sync_core::{
    ErrorKind, Handler, HandlerError, Job, JobContext, JobId, JobState, JobStatus, MAX_PAYLOAD_LEN,
    WorkerOptions,
};
use tokio::sync::{mpsc, watch};

use crate::{
    CaseResult, Ctx, Failure, ensure, eventually, expect_kind, fail,
    spans::{Seen, spans_of},
    stays_pending, within,
};

/// Retries in these cases wait this long, so they stay fast.
const BACKOFF: Duration = Duration::from_millis(10);

fn handler<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<u8>, HandlerError>> + Send + 'static,
{
    Arc::new(f)
}

/// How long a job run to completion by a live worker may take in these cases.
fn finish(ctx: &Ctx) -> Duration {
    ctx.prompt() * 5
}

/// A worker with concurrency N given 3N blocking jobs runs exactly N handlers at once — never
/// more, and not fewer while jobs wait — with the rest Queued, and then finishes them all.
pub async fn pool_bounds_concurrency(ctx: &Ctx) -> CaseResult {
    const N: usize = 3;
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (worker_side, submit_side) = (a.task()?, b.task()?);

    let (running_tx, mut running) = watch::channel(0usize);
    let running_tx = Arc::new(running_tx);
    let max_seen = Arc::new(AtomicUsize::new(0));
    let (gate_tx, gate) = watch::channel(false);
    let h = {
        let (running_tx, max_seen) = (running_tx.clone(), max_seen.clone());
        handler(move |_job| {
            let (running_tx, max_seen, mut gate) =
                (running_tx.clone(), max_seen.clone(), gate.clone());
            async move {
                running_tx.send_modify(|r| {
                    *r += 1;
                    max_seen.fetch_max(*r, Ordering::SeqCst);
                });
                let _ = gate.wait_for(|open| *open).await;
                running_tx.send_modify(|r| *r -= 1);
                Ok(Vec::new())
            }
        })
    };
    let worker = worker_side
        .work("pool", h, WorkerOptions::new().with_concurrency(N))
        .await?;

    let mut ids = Vec::new();
    for i in 0..3 * N {
        ids.push(
            submit_side
                .submit(Job::new("pool", format!("{i}")).with_backoff(BACKOFF))
                .await?,
        );
    }
    within(
        ctx.prompt(),
        format!("{N} handlers running at once"),
        running.wait_for(|r| *r >= N),
    )
    .await??;
    // A pool that overshoots would start a job in this window.
    stays_pending(
        Duration::from_millis(300),
        format!("a worker with concurrency {N} running more than {N} handlers at once"),
        &mut Box::pin(running.wait_for(|r| *r > N)),
    )
    .await?;

    let mut states = HashMap::new();
    for id in &ids {
        *states
            .entry(submit_side.status(id).await?.state)
            .or_insert(0) += 1;
    }
    ensure!(
        states.get(&JobState::Running) == Some(&N)
            && states.get(&JobState::Queued) == Some(&(2 * N)),
        "with {N} handlers blocked, expected {N} Running and {} Queued; got {states:?}",
        2 * N
    );

    gate_tx.send_replace(true);
    for id in &ids {
        let status = within(
            finish(ctx),
            "a pooled job finishing",
            submit_side.wait(id, None),
        )
        .await??;
        ensure!(
            status.state == JobState::Succeeded,
            "job {id} ended {status:?}"
        );
    }
    let max = max_seen.load(Ordering::SeqCst);
    ensure!(max == N, "max concurrent handlers was {max}, expected {N}");
    worker.stop().await;
    Ok(())
}

/// `run` returns the outcome: Succeeded with the handler's output, or (with one attempt)
/// Failed with the handler's error as `last_error`; labels travel with the job.
pub async fn run_returns_outcome(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let task = a.task()?;
    let _worker = b
        .task()?
        .work(
            "echo",
            handler(|job: JobContext| async move {
                if job.payload == b"fail" {
                    return Err("boom: asked to fail".into());
                }
                let mut out = job.payload.clone();
                out.reverse();
                Ok(out)
            }),
            WorkerOptions::new(),
        )
        .await?;

    let ok = within(
        finish(ctx),
        "run of a succeeding job",
        task.run(
            Job::new("echo", "hello")
                .with_label("case", "ok")
                .with_max_attempts(1),
        ),
    )
    .await??;
    ensure!(
        ok.state == JobState::Succeeded
            && ok.output.as_deref() == Some(&b"olleh"[..])
            && ok.attempts == 1
            && ok.name == "echo"
            && ok.labels.get("case").map(String::as_str) == Some("ok"),
        "succeeding job: {ok:?}"
    );

    let failed = within(
        finish(ctx),
        "run of a failing job",
        task.run(Job::new("echo", "fail").with_max_attempts(1)),
    )
    .await??;
    ensure!(
        failed.state == JobState::Failed
            && failed.attempts == 1
            && failed
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("boom: asked to fail")),
        "failing job with one attempt: {failed:?}"
    );
    Ok(())
}

/// Failed attempts are retried up to `max_attempts`: a handler failing twice then succeeding
/// ends Succeeded after 3 attempts; one always failing ends Failed after exactly 3, with the
/// last attempt's error. Each attempt is called once, numbered 1, 2, 3.
pub async fn retries_until_max_attempts(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let task = a.task()?;
    let calls: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let h = {
        let calls = calls.clone();
        handler(move |job: JobContext| {
            let calls = calls.clone();
            async move {
                let kind = String::from_utf8_lossy(&job.payload).into_owned();
                calls
                    .lock()
                    .unwrap()
                    .entry(kind.clone())
                    .or_default()
                    .push(job.attempt);
                if kind == "flaky" && job.attempt >= 3 {
                    return Ok(b"done".to_vec());
                }
                Err(format!("{kind} attempt {}", job.attempt).into())
            }
        })
    };
    let _worker = b.task()?.work("retry", h, WorkerOptions::new()).await?;

    let job = |kind: &str| {
        Job::new("retry", kind)
            .with_max_attempts(3)
            .with_backoff(BACKOFF)
    };
    let flaky = within(finish(ctx), "flaky job finishing", task.run(job("flaky"))).await??;
    ensure!(
        flaky.state == JobState::Succeeded
            && flaky.attempts == 3
            && flaky.output.as_deref() == Some(&b"done"[..]),
        "a job failing twice then succeeding: {flaky:?}"
    );
    let never = within(finish(ctx), "failing job finishing", task.run(job("never"))).await??;
    ensure!(
        never.state == JobState::Failed
            && never.attempts == 3
            && never
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("never attempt 3")),
        "a job failing every attempt with max_attempts 3: {never:?}"
    );
    let calls = calls.lock().unwrap().clone();
    for kind in ["flaky", "never"] {
        ensure!(
            calls.get(kind).map(Vec::as_slice) == Some(&[1, 2, 3][..]),
            "{kind}: the handler saw attempts {:?}, expected [1, 2, 3]",
            calls.get(kind)
        );
    }
    Ok(())
}

/// A job whose worker dies mid-run (its client killed: no heartbeat, no result) is handed to
/// another worker after the visibility timeout and Succeeds there, with attempts ≥ 2.
pub async fn redelivery_after_worker_death(ctx: &Ctx) -> CaseResult {
    let (a, b, c) = (
        ctx.client().await?,
        ctx.client().await?,
        ctx.client().await?,
    );
    let submitter = c.task()?;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let stuck = handler(move |job: JobContext| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(job.attempt);
            std::future::pending::<()>().await;
            Ok(Vec::new())
        }
    });
    let _dead_worker = a
        .task()?
        .work("redeliver", stuck, WorkerOptions::new())
        .await?;

    let id = submitter
        .submit(
            Job::new("redeliver", "x")
                .with_max_attempts(3)
                .with_backoff(BACKOFF),
        )
        .await?;
    let Some(attempt) = within(
        ctx.prompt(),
        "the first worker starting the job",
        started.recv(),
    )
    .await?
    else {
        fail!("the first worker's handler was dropped without running");
    };
    ensure!(attempt == 1, "first delivery had attempt {attempt}");
    let status = submitter.status(&id).await?;
    ensure!(
        status.state == JobState::Running && status.attempts == 1,
        "while the first worker runs it: {status:?}"
    );

    a.kill().await?;
    // Registered only now, so the first delivery surely went to the worker that dies.
    let _live_worker = b
        .task()?
        .work(
            "redeliver",
            handler(|job: JobContext| async move { Ok(format!("attempt {}", job.attempt).into()) }),
            WorkerOptions::new(),
        )
        .await?;
    let done = within(
        ctx.expiry() + ctx.prompt(),
        "the job redelivered to the live worker and finished",
        submitter.wait(&id, None),
    )
    .await??;
    ensure!(
        done.state == JobState::Succeeded && done.attempts >= 2,
        "after its worker died the job ended {done:?}; expected Succeeded with attempts >= 2"
    );
    ensure!(
        done.output.as_deref() == Some(format!("attempt {}", done.attempts).as_bytes()),
        "the output {:?} is not from the last attempt ({})",
        done.output,
        done.attempts
    );
    ensure!(
        started.try_recv().is_err(),
        "the killed client's worker took the job again"
    );
    Ok(())
}

/// `status` reports Queued with no attempts before any worker runs a job, then the final state
/// with attempts and the last error; `status` of an unknown id is NotFound.
pub async fn status_reports_attempts_and_error(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let task = a.task()?;
    let id = task
        .submit(
            Job::new("status", "x")
                .with_label("k", "v")
                .with_max_attempts(2)
                .with_backoff(BACKOFF),
        )
        .await?;
    let queued = task.status(&id).await?;
    let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
    ensure!(
        queued.id == id
            && queued.name == "status"
            && queued.state == JobState::Queued
            && queued.attempts == 0
            && queued.last_error.is_none()
            && queued.output.is_none()
            && queued.labels == labels,
        "status before any worker: {queued:?}"
    );

    let _worker = b
        .task()?
        .work(
            "status",
            handler(|job: JobContext| async move { Err(format!("boom {}", job.attempt).into()) }),
            WorkerOptions::new(),
        )
        .await?;
    let done: JobStatus = within(
        finish(ctx),
        "the job failing for good",
        task.wait(&id, None),
    )
    .await??;
    ensure!(
        done.state == JobState::Failed
            && done.attempts == 2
            && done
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("boom 2")),
        "final status after two failed attempts: {done:?}"
    );
    let again = task.status(&id).await?;
    ensure!(
        again == done,
        "status() after wait() differs: {again:?} vs {done:?}"
    );

    expect_kind(
        "status of an unknown job id",
        task.status(&JobId("no-such-job".to_string())).await,
        ErrorKind::NotFound,
    )?;
    Ok(())
}

/// An output over [`MAX_PAYLOAD_LEN`] fails the attempt with an error naming the limit on every
/// backend (it is never stored, nor silently cut); an output of exactly the limit succeeds.
pub async fn output_over_limit_fails(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let task = client.task()?;
    let _worker = task
        .work(
            "sized",
            handler(|job: JobContext| async move {
                let extra = usize::from(job.payload == b"over");
                Ok(vec![7u8; MAX_PAYLOAD_LEN + extra])
            }),
            WorkerOptions::new(),
        )
        .await?;

    let over = Job::new("sized", "over").with_max_attempts(1);
    let over = within(
        finish(ctx),
        "run of a job whose output is too big",
        task.run(over),
    )
    .await??;
    let error = over.last_error.as_deref().unwrap_or_default();
    ensure!(
        over.state == JobState::Failed
            && over.output.is_none()
            && error.contains(&MAX_PAYLOAD_LEN.to_string()),
        "an output of {} bytes must fail the attempt naming the limit {MAX_PAYLOAD_LEN}: {over:?}",
        MAX_PAYLOAD_LEN + 1
    );

    let at = Job::new("sized", "at").with_max_attempts(1);
    let at = within(
        finish(ctx),
        "run of a job whose output is at the limit",
        task.run(at),
    )
    .await??;
    ensure!(
        at.state == JobState::Succeeded
            && at.output.as_ref().map(Vec::len) == Some(MAX_PAYLOAD_LEN),
        "an output of exactly {MAX_PAYLOAD_LEN} bytes must succeed: state {:?}, {:?} bytes",
        at.state,
        at.output.as_ref().map(Vec::len)
    );
    Ok(())
}

/// A job submitted twice with one idempotency key is one job: the second submit (even with
/// another payload, even after the first finished) returns the first job's id, and the handler
/// runs once. This is what makes a submit whose answer was lost safe to send again.
pub async fn idempotent_submit(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let task = client.task()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let _worker = task
        .work(
            "once",
            handler(move |job: JobContext| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { Ok(job.payload) }
            }),
            WorkerOptions::new(),
        )
        .await?;
    let first = task
        .submit(Job::new("once", "a").with_key("order-42"))
        .await?;
    let again = task
        .submit(Job::new("once", "b").with_key("order-42"))
        .await?;
    ensure!(first == again, "one key, two jobs: {first} and {again}");
    let done = within(finish(ctx), "the keyed job", task.wait(&first, None)).await??;
    ensure!(
        done.state == JobState::Succeeded && done.output.as_deref() == Some(&b"a"[..]),
        "the keyed job ran with the first submit's payload: {done:?}"
    );
    let late = task
        .submit(Job::new("once", "c").with_key("order-42"))
        .await?;
    ensure!(
        late == first,
        "a submit after the job finished made job {late}"
    );
    let other = task
        .submit(Job::new("once", "d").with_key("order-43"))
        .await?;
    ensure!(other != first, "two keys, one job");
    within(finish(ctx), "the second key's job", task.wait(&other, None)).await??;
    ensure!(
        calls.load(Ordering::SeqCst) == 2,
        "two keys must run the handler twice, not {} times",
        calls.load(Ordering::SeqCst)
    );
    Ok(())
}

/// A handler whose claim ends while it runs (its worker's lease is revoked) is told through
/// `JobContext::lost()`; the job is handed on, and the next attempt's fencing token is higher,
/// so a resource can refuse the stale attempt's writes.
pub async fn handler_sees_claim_loss(ctx: &Ctx) -> CaseResult {
    let (worker_client, submitter) = (ctx.client().await?, ctx.client().await?);
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(u32, u64, Option<String>)>();
    let limit = ctx.expiry();
    let _worker = worker_client
        .task()?
        .work(
            "fenced",
            handler(move |job: JobContext| {
                let seen = seen_tx.clone();
                async move {
                    if job.attempt > 1 {
                        let _ = seen.send((job.attempt, job.token, None));
                        return Ok(Vec::new());
                    }
                    let _ = seen.send((job.attempt, job.token, None));
                    let reason = tokio::time::timeout(limit, job.lost()).await.ok();
                    let _ = seen.send((job.attempt, job.token, reason));
                    Err("stopped: the claim was lost".into())
                }
            }),
            WorkerOptions::new(),
        )
        .await?;
    let task = submitter.task()?;
    let id = task
        .submit(Job::new("fenced", "").with_max_attempts(3))
        .await?;
    let Some((1, first_token, None)) =
        within(limit, "the first attempt starting", seen.recv()).await?
    else {
        fail!("the first attempt did not start as attempt 1");
    };
    worker_client.revoke().await?;
    let Some((1, _, reason)) =
        within(limit, "the first attempt hearing of its loss", seen.recv()).await?
    else {
        fail!("the first attempt did not report back");
    };
    ensure!(
        reason.is_some_and(|r| !r.is_empty()),
        "JobContext::lost() did not resolve after the worker's lease was revoked"
    );
    let Some((2, second_token, None)) = within(limit, "the second attempt", seen.recv()).await?
    else {
        fail!("the job was not handed to a second attempt");
    };
    ensure!(
        second_token > first_token,
        "the second attempt's fencing token {second_token} is not above the first's {first_token}"
    );
    let done = within(finish(ctx), "the job finishing", task.wait(&id, None)).await??;
    ensure!(done.state == JobState::Succeeded, "the job: {done:?}");
    Ok(())
}

/// A finished job stays readable for the retention and is gone (NotFound) soon after: nothing
/// grows without bound. Harnesses configure [`JOB_RETENTION`](crate::JOB_RETENTION).
pub async fn finished_jobs_disappear_after_retention(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let task = client.task()?;
    let _worker = task
        .work(
            "kept",
            handler(|job: JobContext| async move { Ok(job.payload) }),
            WorkerOptions::new(),
        )
        .await?;
    let done = within(
        finish(ctx),
        "a job to finish",
        task.run(Job::new("kept", "x")),
    )
    .await??;
    ensure!(done.state == JobState::Succeeded, "the job: {done:?}");
    // A window in which the finished job must NOT be gone yet.
    tokio::time::sleep(crate::JOB_RETENTION / 2).await;
    let kept = task.status(&done.id).await?;
    ensure!(
        kept.output.as_deref() == Some(&b"x"[..]),
        "half-way through the retention the job lost its output: {kept:?}"
    );
    let limit = crate::JOB_RETENTION * 2 + ctx.prompt();
    eventually(limit, "the finished job being removed", || {
        let task = task.clone();
        let id = done.id.clone();
        async move {
            match task.status(&id).await {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
                Err(e) => Err(Failure::new(format_args!("status: {e}"))),
                Ok(_) => Ok(false),
            }
        }
    })
    .await
}

/// A claim whose answer is lost (the request reaches the server and commits; the worker never
/// hears back) neither loses nor strands the job: the worker must find out that the claim is
/// its own and run the job, or give the claim up so the job is handed on — never leave it
/// Running under a claim nobody works on. The job Succeeds within a few request timeouts plus
/// the lease expiry, and its handler runs exactly once.
///
/// The worker's claim request is held at the fault proxy by the claim key it names
/// (`claims/<id>`, as etcd's worker writes it), then sent on while every answer is dropped.
pub async fn ambiguous_claim_neither_loses_nor_strands_the_job(ctx: &Ctx) -> CaseResult {
    const ID: &str = "ambiguous-claim";
    let (worker_client, proxy) = ctx.proxied_client().await?;
    let submitter = ctx.client().await?;
    let task = submitter.task()?;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let _worker = worker_client
        .task()?
        .work(
            "ambiguous",
            handler(move |job: JobContext| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { Ok(job.payload) }
            }),
            WorkerOptions::new(),
        )
        .await?;

    proxy.hold_next(format!("claims/{ID}"));
    let id = task
        .submit(
            Job::new("ambiguous", "x")
                .with_key(ID)
                .with_backoff(BACKOFF),
        )
        .await?;
    within(ctx.prompt(), "the worker's claim request", proxy.held()).await?;
    // The claim reaches the server; its answer (and every other one, briefly) is lost.
    proxy.set(crate::proxy::Fault::DropResponses);
    proxy.release();
    let claimed = eventually(ctx.prompt(), "the claim committing", || {
        let task = task.clone();
        let id = id.clone();
        async move { Ok(task.status(&id).await?.state == JobState::Running) }
    })
    .await;
    proxy.set(crate::proxy::Fault::Pass);
    claimed?;

    let limit = crate::fault::FROZEN_CALL_BOUND + ctx.expiry() + ctx.prompt();
    let done = within(
        limit,
        "the job whose claim answer was lost finishing (stranded?)",
        task.wait(&id, None),
    )
    .await??;
    ensure!(
        done.state == JobState::Succeeded && done.output.as_deref() == Some(&b"x"[..]),
        "the job whose claim answer was lost ended {done:?}"
    );
    let runs = calls.load(Ordering::SeqCst);
    ensure!(
        runs == 1,
        "the handler ran {runs} times for one job whose claim answer was lost"
    );
    Ok(())
}

/// A handler that tells when a job starts and returns its payload only once let go: a live
/// test changes something while the job runs (takes the worker's rights away, say).
pub struct Gate {
    started: mpsc::Receiver<()>,
    go: Arc<tokio::sync::Notify>,
}

impl Gate {
    /// The gate and its handler.
    pub fn new() -> (Gate, Arc<dyn Handler>) {
        let (tell, started) = mpsc::channel(1);
        let go = Arc::new(tokio::sync::Notify::new());
        let held = go.clone();
        let gated = handler(move |job: JobContext| {
            let (tell, held) = (tell.clone(), held.clone());
            async move {
                let _ = tell.send(()).await;
                held.notified().await;
                Ok(job.payload)
            }
        });
        (Gate { started, go }, gated)
    }

    /// Waits (up to `limit`) until a job started.
    pub async fn started(&mut self, limit: Duration) -> Result<(), String> {
        match tokio::time::timeout(limit, self.started.recv()).await {
            Ok(Some(())) => Ok(()),
            _ => Err(format!("no job started within {limit:?}")),
        }
    }

    /// Lets the job that started (or the next one) return.
    pub fn open(&self) {
        self.go.notify_one();
    }
}

/// For a backend's own tests: waits until job `id` has succeeded, up to `limit`.
pub async fn succeeded_within(
    task: &dyn sync_core::Task,
    id: &JobId,
    limit: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let status = task.status(id).await.map_err(|e| e.to_string())?;
        if status.state == JobState::Succeeded {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "job {id} did not succeed within {limit:?}: {status:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each task operation shows a `tracing` subscriber exactly one span (DESIGN §2), `sync`,
/// with the operation and the job's name or id; the backend nests no second span in it.
pub async fn one_span_per_operation(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let task = client.task()?;
    // Whatever a first use sets up is not part of what is heard.
    task.submit(Job::new("warm-up", b"".to_vec())).await?;
    let (done, seen) = spans_of(async {
        let id = task.submit(Job::new("spans", b"".to_vec())).await?;
        task.status(&id).await?;
        Ok::<_, Failure>(id)
    })
    .await;
    let id = done?;
    let expected = [
        Seen::op("task.submit", "spans"),
        Seen::op("task.status", &id.0),
    ];
    ensure!(
        seen == expected,
        "the spans opened were {seen:#?}, expected {expected:#?}"
    );
    Ok(())
}
