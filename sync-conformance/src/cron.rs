//! Cron cases (DESIGN §3 Cron): the `sync-cron` Cron driver over the backend's Leader, Task
//! and Map.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sync_core::{HandlerError, JobContext, Task, Worker, WorkerOptions};
use sync_cron::{Cron, Schedule};
use tokio::sync::mpsc;

use crate::{CaseResult, Client, Ctx, Failure, ensure, fail, stays_pending, within};

/// The interval of repeating schedules in these cases.
const INTERVAL: Duration = Duration::from_millis(200);

/// One firing as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Firing {
    schedule: String,
    term: u64,
    tick: u64,
    at: SystemTime,
}

fn label<T: std::str::FromStr>(job: &JobContext, key: &str) -> Result<T, HandlerError> {
    job.labels
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("label {key} missing or malformed in {:?}", job.labels).into())
}

/// The firing `job` records, from its Cron labels.
fn firing(job: &JobContext) -> Result<Firing, HandlerError> {
    Ok(Firing {
        schedule: label(job, "cron.schedule")?,
        term: label(job, "cron.term")?,
        tick: label(job, "cron.tick")?,
        at: SystemTime::now(),
    })
}

/// A worker for the job `name` that reports every firing on a channel.
async fn recorder(
    task: Arc<dyn Task>,
    name: &str,
) -> Result<(Worker, mpsc::UnboundedReceiver<Result<Firing, String>>), Failure> {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = task
        .work(
            name,
            Arc::new(move |job: JobContext| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(firing(&job).map_err(|e| e.to_string()));
                    Ok(Vec::new())
                }
            }),
            WorkerOptions::new(),
        )
        .await?;
    Ok((worker, rx))
}

async fn next_firing(
    rx: &mut mpsc::UnboundedReceiver<Result<Firing, String>>,
    limit: Duration,
    what: &str,
) -> Result<Firing, Failure> {
    match within(limit, what.to_string(), rx.recv()).await? {
        Some(Ok(f)) => Ok(f),
        Some(Err(e)) => fail!("{what}: a fired job was malformed: {e}"),
        None => fail!("{what}: the recording worker went away"),
    }
}

fn cron_on(client: &Client, group: &str, candidate: String) -> Result<Cron, Failure> {
    Ok(Cron::new(
        client.leader(group)?,
        client.task()?,
        client.map(group)?,
        candidate,
    ))
}

/// `count` schedulers, each on its own client, in election group `group`, all registering
/// `schedule` under the name `name` to submit `job`.
async fn schedulers(
    ctx: &Ctx,
    count: usize,
    group: &str,
    name: &str,
    schedule: Schedule,
    job: &str,
) -> Result<(Vec<Client>, Vec<Cron>), Failure> {
    let mut clients = Vec::new();
    let mut crons = Vec::new();
    for i in 0..count {
        let client = ctx.client().await?;
        let cron = cron_on(&client, group, format!("scheduler-{i}"))?;
        cron.schedule(name, schedule.clone(), sync_core::Job::new(job, ""))
            .await?;
        crons.push(cron);
        clients.push(client);
    }
    Ok((clients, crons))
}

/// A recording worker for `cron-job` and three schedulers in group `cron` registering the
/// schedule `tick`: every [`INTERVAL`] from now.
struct Ticking {
    worker_client: Client,
    worker: Worker,
    fired: mpsc::UnboundedReceiver<Result<Firing, String>>,
    /// The schedule's start.
    start: SystemTime,
    clients: Vec<Client>,
    crons: Vec<Cron>,
}

async fn ticking(ctx: &Ctx) -> Result<Ticking, Failure> {
    let worker_client = ctx.client().await?;
    let (worker, fired) = recorder(worker_client.task()?, "cron-job").await?;
    let start = SystemTime::now();
    let (clients, crons) = schedulers(
        ctx,
        3,
        "cron",
        "tick",
        Schedule::every_from(start, INTERVAL),
        "cron-job",
    )
    .await?;
    Ok(Ticking {
        worker_client,
        worker,
        fired,
        start,
        clients,
        crons,
    })
}

/// Checks that no tick of `seen` fired twice; `when` says over what.
#[track_caller]
fn ensure_each_tick_once(seen: &[Firing], when: &str) -> CaseResult {
    let mut per_tick: BTreeMap<u64, usize> = BTreeMap::new();
    for f in seen {
        *per_tick.entry(f.tick).or_default() += 1;
    }
    let dupes: Vec<_> = per_tick.iter().filter(|(_, n)| **n > 1).collect();
    ensure!(
        dupes.is_empty(),
        "ticks fired more than once {when} (tick → times): {dupes:?}; all firings: {seen:?}"
    );
    Ok(())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Three schedulers in one group register the same 200 ms schedule: the ticks fire once each
/// (only the leader fires), carry the schedule name, a term and tick labels, and are spaced by
/// at least the interval.
pub async fn one_fire_per_tick_across_instances(ctx: &Ctx) -> CaseResult {
    let Ticking {
        worker,
        mut fired,
        start,
        crons,
        ..
    } = ticking(ctx).await?;

    // Watch one tick past the five checked, so a duplicate of the fifth would have arrived.
    let mut seen: Vec<Firing> = Vec::new();
    let mut ticks: BTreeSet<u64> = BTreeSet::new();
    while ticks.len() < 6 {
        let f = next_firing(&mut fired, ctx.prompt() + INTERVAL * 2, "the next tick").await?;
        ticks.insert(f.tick);
        seen.push(f);
    }
    for cron in &crons {
        cron.stop().await;
    }
    worker.stop().await;

    ensure_each_tick_once(&seen, "across instances")?;
    ensure!(
        seen.iter().all(|f| f.schedule == "tick"),
        "cron.schedule label is not \"tick\": {seen:?}"
    );
    let ticks: Vec<u64> = ticks.into_iter().collect();
    let min_gap = INTERVAL.as_millis() as u64;
    ensure!(
        ticks.windows(2).all(|w| w[1] - w[0] >= min_gap),
        "ticks closer than the {INTERVAL:?} interval: {ticks:?}"
    );
    let first_ms = unix_ms(start);
    ensure!(
        ticks
            .iter()
            .all(|t| t.checked_sub(first_ms).is_some_and(|d| d % min_gap == 0)),
        "ticks {ticks:?} are not on the schedule start {first_ms} + k·{min_gap}"
    );
    Ok(())
}

/// Killing the leading scheduler's client hands firing to another scheduler: after the
/// failover ticks continue with a strictly greater term, every tick after it is later than
/// every tick before it, and no tick fires twice.
pub async fn failover_resumes_next_tick(ctx: &Ctx) -> CaseResult {
    let Ticking {
        worker_client,
        worker,
        mut fired,
        clients,
        crons,
        ..
    } = ticking(ctx).await?;
    let observer = worker_client.leader("cron")?;

    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            next_firing(
                &mut fired,
                ctx.prompt() + INTERVAL * 2,
                "a tick before failover",
            )
            .await?,
        );
    }
    let Some(leader) = observer.leader().await? else {
        fail!("ticks are firing but the group reports no leader");
    };
    let Some(dead) = (0..3).find(|i| leader.candidate == format!("scheduler-{i}")) else {
        fail!(
            "the leader {:?} is none of the schedulers",
            leader.candidate
        );
    };
    clients[dead].kill().await?;

    // The dead leader may legitimately fire until its lease expires; wait for the new term.
    let limit = ctx.expiry() + ctx.prompt();
    let deadline = tokio::time::Instant::now() + limit;
    let mut after = Vec::new();
    while after.len() < 3 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let f = next_firing(&mut fired, left, "ticks under a new leader after the kill").await?;
        if f.term > leader.term {
            after.push(f.clone());
        }
        seen.push(f);
    }
    for (i, cron) in crons.iter().enumerate() {
        if i != dead {
            cron.stop().await;
        }
    }
    worker.stop().await;

    ensure_each_tick_once(&seen, "across the failover")?;
    let old: Vec<&Firing> = seen.iter().filter(|f| f.term <= leader.term).collect();
    ensure!(
        old.iter().all(|f| f.term == leader.term),
        "firings with a term older than the killed leader's {}: {old:?}",
        leader.term
    );
    let last_old = old.iter().map(|f| f.tick).max().unwrap_or(0);
    ensure!(
        after.iter().all(|f| f.tick > last_old),
        "after failover ticks must be later than the last tick before it ({last_old}): {after:?}"
    );
    ensure!(
        after
            .windows(2)
            .all(|w| w[0].term <= w[1].term && w[0].tick < w[1].tick),
        "ticks under the new leader are out of order: {after:?}"
    );
    // The killed scheduler's driver is still running in this process: stopping it must not
    // hang the case, whatever its resignation does on a dead session.
    let _ = tokio::time::timeout(ctx.prompt(), crons[dead].stop()).await;
    Ok(())
}

/// A one-shot schedule registered on two schedulers fires exactly once, at (not before) its
/// time, labelled with that time.
pub async fn one_shot_fires_once(ctx: &Ctx) -> CaseResult {
    let worker_client = ctx.client().await?;
    let (worker, mut fired) = recorder(worker_client.task()?, "once-job").await?;
    // A whole millisecond, so the expected tick label is exact.
    let at = UNIX_EPOCH + Duration::from_millis(unix_ms(SystemTime::now()) + 300);
    let (_clients, crons) =
        schedulers(ctx, 2, "once", "once", Schedule::once(at), "once-job").await?;

    let f = next_firing(
        &mut fired,
        ctx.prompt() + Duration::from_millis(300),
        "the one-shot firing",
    )
    .await?;
    ensure!(
        f.tick == unix_ms(at) && f.schedule == "once",
        "the one-shot at {} fired as {f:?}",
        unix_ms(at)
    );
    ensure!(
        f.at >= at,
        "the one-shot ran {:?} before its time",
        at.duration_since(f.at).unwrap_or_default()
    );
    let mut again = Box::pin(fired.recv());
    stays_pending(
        Duration::from_secs(1),
        "a second firing of the one-shot",
        &mut again,
    )
    .await?;
    drop(again);
    for cron in &crons {
        cron.stop().await;
    }
    worker.stop().await;
    Ok(())
}
