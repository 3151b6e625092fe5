//! One worker process of `cargo xtask drill`: it takes a lock over and over on the backend a
//! URL names and, holding it, "writes" to a fenced resource by printing its fencing token. The
//! drill kills (-9) and stops (SIGSTOP) these processes at random and judges their lines:
//!
//! ```text
//! GRANT <token> <us>   the lock was granted with this fencing token
//! WRITE <token> <us>   a write to the resource, made while the guard said it still held
//! LOST <token> <us>    the guard reported the loss before the write, so nothing was written
//! ```
//!
//! `<us>` is the wall clock in microseconds since the Unix epoch (one machine, one clock), so
//! the drill can order the lines of all workers.
//!
//! `cargo run -p sync-any --features etcd --example drill_worker -- <url> <lock|leader> <id> <seconds>`
//!
//! With `leader` the worker campaigns in election group `<id>` instead, and its token is the
//! leadership's term. While the backend is unreachable (a drill restarts it) a worker tries
//! again every 100 ms instead of exiting.
//!
//! `drill_worker <url> capable <capability> 0` prints `CAPABLE yes` or `CAPABLE no`: whether
//! the backend has that capability (`task`, `map`…), so the drill skips what it lacks.
//!
//! The task drill uses three more modes, where `<id>` is the job name (the queue):
//!
//! ```text
//! drill_worker <url> task <name> <seconds>                                 a worker, pool of 2
//! drill_worker <url> task-submit <name> <seconds> <start_us> <count> <from> the submitter
//! drill_worker <url> task-check <name> <seconds>                            the final check
//! ```
//!
//! A `task` worker runs the jobs named `<name>` for `<seconds>`; each attempt prints
//!
//! ```text
//! START <job> <token> <us>   the handler began an attempt; token = the claim's fencing token
//! DONE <job> <token> <us>    it finished while its claim still held; it returns the token
//! LOST <job> <token> <us>    the claim's loss signal fired first: it fails the attempt instead
//! ```
//!
//! (The time of DONE and LOST is read just before the loss signal is checked.)
//!
//! `task-submit` submits jobs `<from>..<count>`, job n with the idempotency key `<name>-n`, due
//! at `<start_us> + n * <seconds> / <count>`: a steady pace over `<seconds>`. A submitter that
//! was killed is started again from the first job whose SUBMIT line the drill has not seen: it
//! submits the jobs from there that are already due at once, with the same keys (some were
//! submitted already), and then keeps the pace. Each job `n` is also submitted a second time
//! when job `n + 3` is. Every submit prints `SUBMIT <key> <job id> <us>`.
//!
//! `task-check` reads job ids from stdin, one a line, waits for each with `wait(id, timeout)`
//! (all of them within `<seconds>`), and prints `STATUS <job id> <state> <attempts> <output>
//! <us>`, where the state is the status's (a job that did not finish in time: its current
//! one), `NotFound`, or `Error`, and the output is what the job returned (its token), or `-`.

use std::{
    io::{BufRead, Write},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use sync_core::{ErrorKind, Job, JobContext, JobId, LockOptions, WorkerOptions};

/// Attempts per drill job: a worker's loss counts as an attempt, and the drill's jobs must
/// outlast any run of bad luck under its chaos (the handler itself never fails but for a loss).
const MAX_ATTEMPTS: u32 = 100;

/// How long a lock or leader worker waits before trying again while the backend is down.
const RETRY: Duration = Duration::from_millis(100);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, what, id, seconds, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: drill_worker <backend url> <lock|leader|task|task-submit|task-check|capable> <id> <seconds> [<start_us> <count> <from>]"
        );
        return ExitCode::FAILURE;
    };
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("drill_worker: seconds must be a whole number, not {seconds:?}");
        return ExitCode::FAILURE;
    };
    let run_for = Duration::from_secs(seconds);
    let worked = match (what.as_str(), rest) {
        ("lock", []) => lock(url, id, run_for).await,
        ("leader", []) => lead(url, id, run_for).await,
        ("task", []) => work(url, id, run_for).await,
        ("task-submit", [start_us, count, from]) => {
            let (Ok(start_us), Ok(count), Ok(from)) = (
                start_us.parse::<u128>(),
                count.parse::<u64>(),
                from.parse::<u64>(),
            ) else {
                eprintln!(
                    "drill_worker: task-submit takes a start (us), a job count and the first job"
                );
                return ExitCode::FAILURE;
            };
            submit(url, id, run_for, start_us, from..count).await
        }
        ("task-check", []) => check(url, run_for).await,
        ("capable", []) => capable(url, id).await,
        (other, _) => {
            eprintln!("drill_worker: unknown mode {other:?} or wrong arguments for it");
            return ExitCode::FAILURE;
        }
    };
    match worked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drill_worker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn lock(url: &str, id: &str, run_for: Duration) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let lock = backend.lock()?;
    let until = tokio::time::Instant::now() + run_for;
    let mut out = std::io::stdout();
    while tokio::time::Instant::now() < until {
        let wait = LockOptions::new().with_wait(Duration::from_secs(2));
        let guard = match lock.acquire(id, wait).await {
            Ok(guard) => guard,
            Err(e) if e.kind() == sync_core::ErrorKind::Timeout => continue,
            // A backend restart is chaos to ride out, not a reason to quit.
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let token = guard.fencing_token();
        hold(&mut out, token, || guard.is_lost()).await;
        let _ = guard.release().await;
    }
    backend.close().await
}

async fn lead(url: &str, group: &str, run_for: Duration) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let leader = backend.leader(group)?;
    let me = std::process::id().to_string();
    let until = tokio::time::Instant::now() + run_for;
    let mut out = std::io::stdout();
    while tokio::time::Instant::now() < until {
        let wait = sync_core::ElectOptions::new().with_wait(Duration::from_secs(2));
        let elected = match leader.elect(&me, wait).await {
            Ok(elected) => elected,
            Err(e) if e.kind() == sync_core::ErrorKind::Timeout => continue,
            // A backend restart is chaos to ride out, not a reason to quit.
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        hold(&mut out, elected.term(), || elected.is_revoked()).await;
        let _ = elected.resign().await;
    }
    backend.close().await
}

/// A task worker: runs the jobs named `name` with a pool of 2 for `run_for`.
async fn work(url: &str, name: &str, run_for: Duration) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let task = backend.task()?;
    let handler = Arc::new(|ctx: JobContext| async move {
        let (job, token) = (ctx.id.clone(), ctx.token);
        say(format!("START {job} {token} {}", now_us()));
        // Long enough that kills and stops often land in the middle of an attempt.
        tokio::time::sleep(Duration::from_millis(100 + (token % 11) * 50)).await;
        // Read before the check: a DONE stamped after a pause past the TTL is a loss missed.
        let at = now_us();
        if ctx.is_lost() {
            say(format!("LOST {job} {token} {at}"));
            return Err("the claim was lost before the attempt finished".into());
        }
        say(format!("DONE {job} {token} {at}"));
        Ok(token.to_string().into_bytes())
    });
    let worker = task
        .work(name, handler, WorkerOptions::new().with_concurrency(2))
        .await?;
    tokio::time::sleep(run_for).await;
    worker.stop().await;
    backend.close().await
}

/// The submitter: the jobs `jobs` of `jobs.end` keyed jobs due at a steady pace over `span`
/// from `start_us` on.
async fn submit(
    url: &str,
    name: &str,
    span: Duration,
    start_us: u128,
    jobs: std::ops::Range<u64>,
) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let task = backend.task()?;
    let submit_one = async |n: u64| -> sync_core::Result<()> {
        let key = format!("{name}-{n}");
        let job = Job::new(name, key.clone())
            .with_key(key.clone())
            .with_max_attempts(MAX_ATTEMPTS);
        let mut tries = 0;
        let id = loop {
            tries += 1;
            match task.submit(job.clone()).await {
                Ok(id) => break id,
                // Resent with the same key: it can never queue the job twice.
                Err(e) if tries < 20 && e.kind() != ErrorKind::InvalidArgument => {
                    eprintln!("drill_worker: submitting {key} failed ({e}); again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        };
        say(format!("SUBMIT {key} {id} {}", now_us()));
        Ok(())
    };
    let span_us = span.as_micros();
    let count = jobs.end;
    for n in jobs {
        let due = start_us + span_us * u128::from(n) / u128::from(count.max(1));
        let now = now_us();
        if due > now {
            let wait = u64::try_from(due - now).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
        submit_one(n).await?;
        if n >= 3 {
            submit_one(n - 3).await?;
        }
    }
    backend.close().await
}

/// The final check, from a fresh client: the status of every job id read from stdin, waiting
/// up to `limit` in all for them to finish.
async fn check(url: &str, limit: Duration) -> sync_core::Result<()> {
    let ids: Vec<JobId> = std::io::stdin()
        .lock()
        .lines()
        .map_while(|l| l.ok())
        .filter(|l| !l.trim().is_empty())
        .map(|l| JobId(l.trim().to_string()))
        .collect();
    let backend = sync_any::connect(url).await?;
    let task = backend.task()?;
    let until = tokio::time::Instant::now() + limit;
    for id in ids {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let status = match task
            .wait(&id, Some(left.max(Duration::from_millis(50))))
            .await
        {
            Err(e) if e.kind() == ErrorKind::Timeout => task.status(&id).await,
            other => other,
        };
        let line = match status {
            Ok(s) => {
                let output = s
                    .output
                    .as_deref()
                    .map(|o| String::from_utf8_lossy(o).into_owned())
                    .filter(|o| !o.is_empty() && !o.contains(char::is_whitespace))
                    .unwrap_or_else(|| "-".to_string());
                format!("STATUS {id} {:?} {} {output}", s.state, s.attempts)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => format!("STATUS {id} NotFound 0 -"),
            Err(e) => {
                eprintln!("drill_worker: the status of {id}: {e}");
                format!("STATUS {id} Error 0 -")
            }
        };
        say(format!("{line} {}", now_us()));
    }
    backend.close().await
}

/// Prints whether the backend has the capability called `what` (its name, any case).
async fn capable(url: &str, what: &str) -> sync_core::Result<()> {
    let backend = sync_any::connect(url).await?;
    let has = backend
        .capabilities()
        .iter()
        .any(|c| format!("{c:?}").eq_ignore_ascii_case(what));
    say(format!("CAPABLE {}", if has { "yes" } else { "no" }));
    backend.close().await
}

/// One whole line on stdout, flushed at once: the drill may kill this process any moment.
fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The critical section: GRANT, some work, then the write — unless `lost` says it lost.
async fn hold(out: &mut std::io::Stdout, token: u64, lost: impl Fn() -> bool) {
    let _ = writeln!(out, "GRANT {token} {}", now_us());
    tokio::time::sleep(Duration::from_millis(20 + (token % 7) * 10)).await;
    let line = match lost() {
        true => format!("LOST {token} {}", now_us()),
        false => format!("WRITE {token} {}", now_us()),
    };
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}
