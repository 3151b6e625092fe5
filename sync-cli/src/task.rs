//! `syncctl task submit|run|status|worker`.

use std::{sync::Arc, time::Duration};

use sync_core::{
    ErrorKind, HandlerError, Job, JobContext, JobId, JobState, JobStatus, MAX_PAYLOAD_LEN,
    WorkerOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    child::{self, Ending, Io, Signals},
    cli::{Global, JobArgs, TaskCommand},
    exit::{self, Exit},
    map::value_or_stdin,
    output,
};

/// Runs the command on a connected client.
pub async fn run(
    client: &dyn sync_core::Backend,
    global: &Global,
    command: TaskCommand,
) -> Result<u8, Exit> {
    let task = client.task()?;
    match command {
        TaskCommand::Submit(args) => {
            let id = task.submit(job(args)?).await?;
            if global.json {
                output::json(&serde_json::json!({"id": id.0}));
            } else {
                output::line(&id.0);
            }
            Ok(0)
        }
        TaskCommand::Run { job: args, timeout } => {
            let id = task.submit(job(args)?).await?;
            let status = task.wait(&id, timeout).await.map_err(|e| waited(e, &id))?;
            outcome(global, &status, true)
        }
        TaskCommand::Status { id, wait } => {
            let id = JobId(id);
            let status = match wait {
                Some(wait) => task
                    .wait(&id, Some(wait))
                    .await
                    .map_err(|e| waited(e, &id))?,
                None => task
                    .status(&id)
                    .await
                    .map_err(|e| exit::negative_on(e, &[ErrorKind::NotFound]))?,
            };
            outcome(global, &status, false)
        }
        TaskCommand::Worker {
            name,
            concurrency,
            grace,
            command,
        } => work(&*task, global, &name, concurrency, grace, command).await,
    }
}

fn job(args: JobArgs) -> Result<Job, Exit> {
    let mut job = Job::new(args.name, value_or_stdin(args.payload)?);
    if let Some(key) = args.key {
        job = job.with_key(key);
    }
    for (k, v) in args.labels {
        job = job.with_label(k, v);
    }
    if let Some(n) = args.max_attempts {
        job = job.with_max_attempts(n);
    }
    if let Some(backoff) = args.backoff {
        job = job.with_backoff(backoff);
    }
    Ok(job)
}

/// An expired wait names the job, which goes on without us.
fn waited(e: sync_core::Error, id: &JobId) -> Exit {
    let mut exit = exit::negative_on(e, &[ErrorKind::NotFound]);
    if exit.status == exit::EXPIRED {
        exit.message = format!("job {id} is not done yet: {}", exit.message);
    }
    exit
}

/// Prints a job's status (`run` prints the output alone), and says whether it failed.
fn outcome(global: &Global, status: &JobStatus, output_only: bool) -> Result<u8, Exit> {
    if global.json {
        output::json(&status_json(status));
    } else if output_only {
        output::bytes(status.output.as_deref().unwrap_or_default());
    } else {
        let mut text = format!(
            "{} {} {} attempts={}",
            status.id,
            status.name,
            state(status.state),
            status.attempts
        );
        if let Some(e) = &status.last_error {
            text += &format!(" last_error={}", output::shown(e.as_bytes()));
        }
        output::line(&text);
    }
    match status.state {
        JobState::Failed => Err(Exit::new(
            exit::NEGATIVE,
            format!(
                "job {} failed after {} attempts: {}",
                status.id,
                status.attempts,
                status.last_error.as_deref().unwrap_or("no error recorded")
            ),
        )),
        _ => Ok(0),
    }
}

fn state(state: JobState) -> &'static str {
    match state {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        _ => "unknown",
    }
}

fn status_json(status: &JobStatus) -> serde_json::Value {
    let mut value = serde_json::json!({
        "id": status.id.0,
        "name": status.name,
        "state": state(status.state),
        "attempts": status.attempts,
        "last_error": status.last_error,
        "labels": status.labels,
    });
    match &status.output {
        Some(out) => output::put_bytes(&mut value, "output", out),
        None => {
            value["output"] = serde_json::Value::Null;
        }
    }
    value
}

/// Runs CMD for each job of `name` until SIGINT or SIGTERM; then stops taking jobs and waits
/// for the running ones.
async fn work(
    task: &dyn sync_core::Task,
    global: &Global,
    name: &str,
    concurrency: usize,
    grace: Duration,
    command: Vec<String>,
) -> Result<u8, Exit> {
    let mut signals = Signals::catch()?;
    let command = Arc::new(command);
    let handler = move |ctx: JobContext| {
        let command = Arc::clone(&command);
        async move { run_job(&command, ctx, grace).await }
    };
    let opts = WorkerOptions::new().with_concurrency(concurrency);
    let worker = task.work(name, Arc::new(handler), opts).await?;
    if !global.quiet {
        output::err(&format!(
            "working on {name:?} jobs ({concurrency} at a time)"
        ));
    }
    signals.recv().await;
    if !global.quiet {
        output::err("stopping: the running jobs finish first (a second signal ends them)");
    }
    tokio::select! {
        () = worker.stop() => Ok(0),
        // The commands die with syncctl; their claims end with the session, at close.
        got = signals.recv() => Err(child::interrupted(got)),
    }
}

/// One attempt: CMD with the payload on stdin; its stdout is the output.
async fn run_job(
    command: &[String],
    ctx: JobContext,
    grace: Duration,
) -> Result<Vec<u8>, HandlerError> {
    let env = [
        ("SYNC_JOB_ID", ctx.id.0.clone()),
        ("SYNC_JOB_NAME", ctx.name.clone()),
        ("SYNC_JOB_ATTEMPT", ctx.attempt.to_string()),
        ("SYNC_FENCING_TOKEN", ctx.token.to_string()),
    ];
    let mut cmd = child::spawn(command, &env, Io::Piped).map_err(|e| e.message)?;
    let stdin = cmd.child.stdin.take();
    let payload = ctx.payload.clone();
    // A CMD that does not read its stdin must not block us: the write goes on its own.
    let writer = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&payload).await;
        }
    });
    let stdout = cmd.child.stdout.take();
    let mut reader = tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(mut stdout) = stdout {
            let limit = u64::try_from(MAX_PAYLOAD_LEN + 1).unwrap_or(u64::MAX);
            let _ = (&mut stdout).take(limit).read_to_end(&mut out).await;
            // The rest is read and dropped, so that CMD is not killed by SIGPIPE: the attempt
            // fails for its output's size, not for a signal.
            let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
        }
        out
    });
    let lost = async {
        match ctx.loss_signal() {
            Some(signal) => signal.wait().await,
            None => std::future::pending().await,
        }
    };
    let ending = // Signals are the worker's (they stop it); a job's CMD only ends when its claim does.
    cmd.supervise(lost, grace, None).await.map_err(|e| e.message)?;
    writer.abort();
    cmd.end_leftovers(grace).await;
    // Whatever still holds its stdout open (a process that left its group) holds no job.
    let Ok(read) = tokio::time::timeout(grace, &mut reader).await else {
        reader.abort();
        return Err("the command's stdout stayed open after it exited".into());
    };
    let out = read.unwrap_or_default();
    match ending {
        Ending::Lost(reason) => {
            Err(format!("the claim was lost ({reason}); the command was terminated").into())
        }
        Ending::Exited(status) if !status.success() => Err(format!(
            "{} exited with status {}",
            command[0],
            exit::of_child(status)
        )
        .into()),
        Ending::Exited(_) if out.len() > MAX_PAYLOAD_LEN => {
            Err(format!("the output is over the limit of {MAX_PAYLOAD_LEN} bytes").into())
        }
        Ending::Exited(_) => Ok(out),
    }
}
