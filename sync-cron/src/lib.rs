//! # sync-cron
//!
//! Distributed cron for the `sync` toolkit: schedules fired by the leader of a group, as jobs on
//! a [`Task`] queue.
//!
//! A [`Cron`] is written once against the traits: a [`Leader`] decides who fires, a [`Task`]
//! runs what is fired, a [`Map`] records the last fired tick of every schedule so that a
//! tick runs once under normal operation, also across failovers, and a [`Time`] source says
//! when a tick is due (see [Time](#time)).
//!
//! # How it fires
//!
//! Every process that runs the same schedules builds a `Cron` over the same election group
//! and the same map, and registers the same schedules by name. Each `Cron` runs one background
//! driver (spawned on the first [`schedule`](Cron::schedule)) that campaigns in the group;
//! while elected it reads its time source, sleeps until the earliest next tick of its
//! schedules is due, and fires it:
//!
//! 1. on gaining leadership, read the schedule's record in the map (key = the schedule
//!    name, value = JSON `{"tick_ms": u64, "term": u64}`: the last fired tick in milliseconds
//!    since the Unix epoch and the term of the leader that fired it); ticks at or before it
//!    have fired;
//! 2. once the time source's `now_interval().earliest()` has reached the tick,
//!    compare-and-swap the record to `{tick, term}` against the version last seen (one map
//!    write per tick); on a conflict another writer won: read the record again and reconsider
//!    the tick from it;
//! 3. only once the swap succeeded, submit the schedule's job with the labels
//!    `cron.schedule` (the name), `cron.term` (the leader's term), `cron.tick` (the tick in
//!    milliseconds since the Unix epoch), `cron.earliest` and `cron.latest` (the interval it
//!    fired at; [`Firing::from_labels`] reads them all back), and the idempotency key
//!    `cron.<tick>.<name>`: a submit whose answer was lost is sent again, and can never make
//!    a second job, so each fired tick is exactly one job.
//!
//! When leadership is revoked the driver stops firing at once and campaigns again; on
//! [`stop`](Cron::stop) (or drop) it resigns. Backend and time-source errors are logged
//! (`tracing` warn) and retried after a short backoff; they never end the driver, and a time
//! source that fails makes it fire nothing until the source answers again (never on the
//! unchecked host clock instead).
//!
//! # Time
//!
//! A tick `t` fires only once the time source says it has certainly come:
//! `now_interval().earliest() >= t`. So a cron whose time source is honest (its interval
//! contains true time) never fires a tick early, and never records a tick that true time has
//! not reached, which would hold a later leader back; the cost is that a tick fires as late
//! as the interval's earliest time trails true time (at most the interval's width). The time source is set with [`Cron::builder`] and
//! [`CronBuilder::with_time`]; any backend's [`Time`] handle works:
//!
//! - **Default: the host clock** ([`SystemClock::default`]), taken at its word, with no
//!   stated uncertainty. It fires on time exactly as far as the host's clock is right: a
//!   host whose clock runs Δ ahead fires Δ early, and nothing in the cron can tell.
//! - **[`SystemClock::new`]`(uncertainty)`**: the host clock with the bound you know it keeps
//!   (say, what your NTP daemon guarantees); ticks fire that much later, and early only if
//!   the clock strays beyond it.
//! - **`sync-ntp`'s `Client::time()`**: an interval measured from NTP servers (round trip,
//!   root delay and dispersion, drift), independent of the host's clock setting.
//!
//! Each job carries the interval it fired at (`cron.earliest`, `cron.latest`; see
//! [`Firing`]), so a handler can see how sure the leader was of the time.
//!
//! A leader whose clock lied (ran ahead of its own interval) may have recorded a tick after
//! the latest time another leader's source allows. The next leader does not wait for that
//! tick: it resumes from its registration baseline, fires the latest tick due by its own
//! time source, then each next one. A tick the clock-ahead leader already submitted is
//! submitted again under the same idempotency key, so it stays one job (within the Task's
//! retention of finished jobs, 1 h by default).
//!
//! # Which ticks fire
//!
//! - **Nothing before registration.** The first [`schedule`](Cron::schedule) of a name
//!   anywhere writes a registration record (`term` 0, `tick_ms` = the registration time, as
//!   the time source's earliest time) if the map has none, so ticks certainly before the
//!   moment a schedule was first registered never fire. For [`Schedule::every`] (which starts
//!   at the host clock's now) on an exact clock the first tick is therefore
//!   `start + interval`; with a stated uncertainty the tick at `start` itself may fire too,
//!   as it is not certainly before the registration. For [`Schedule::every_from`] with a past
//!   start it is the first `start + k·interval` after registration. A later registration of
//!   the same name (another process, or after [`unschedule`](Cron::unschedule), which keeps
//!   the record) resumes from the record.
//! - **One-shots run even when late.** A [`Schedule::once`] whose time is at or before its
//!   first registration fires promptly, once (like `at(1)` with a past time), instead of
//!   being dropped; after it fired, the record says so and it never fires again, in any
//!   process.
//! - **Missed ticks coalesce.** After a failover (or any gap without a leader) the new leader
//!   resumes at the next tick after the recorded one. If several ticks were missed it fires
//!   only the latest of them, then continues on schedule — like a cron job's missed-start
//!   policy. A tick at or before the recorded one never fires — unless the recorded tick is
//!   after the latest time the leader's source allows (see [Time](#time)).
//! - **A stale leader steps down.** Terms only grow, so a record written under a higher term
//!   than this leader's means a newer leader exists and this one missed its revocation: it
//!   fires nothing, drops its leadership and campaigns again.
//!
//! Delivery of a fired tick is the [`Task`]'s (at-least-once to a worker). The recorded tick
//! and the submission are two steps: if the process dies between them, that tick is lost
//! (at-most-once firing), never doubled.
//!
//! # Example
//!
//! With the in-process backend (`sync-local`); any backend's handles work the same.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
//! use std::{sync::Arc, time::Duration};
//! use sync_core::{Backend, Job, JobContext, WorkerOptions};
//! use sync_cron::{Cron, Firing, Schedule};
//! use tokio::sync::mpsc;
//!
//! let client = sync_local::Cluster::new().client(Default::default())?;
//! let (tx, mut fired) = mpsc::unbounded_channel();
//! let _worker = client
//!     .task()?
//!     .work(
//!         "report",
//!         Arc::new(move |job: JobContext| {
//!             let tx = tx.clone();
//!             async move {
//!                 tx.send(job.labels).ok();
//!                 Ok(Vec::new())
//!             }
//!         }),
//!         WorkerOptions::new(),
//!     )
//!     .await?;
//!
//! // Every process builds the same Cron; only the leader of "cron" fires.
//! let cron = Cron::new(client.leader("cron")?, client.task()?, client.map("cron")?, "node-1");
//! cron.schedule("report", Schedule::every(Duration::from_millis(50)), Job::new("report", "")).await?;
//!
//! let first = Firing::from_labels(&fired.recv().await.expect("a firing"))?;
//! let second = Firing::from_labels(&fired.recv().await.expect("a firing"))?;
//! assert_eq!(first.schedule, "report");
//! assert!(second.tick > first.tick);
//! // Fired only once the time source's earliest time had reached the tick.
//! assert!(first.interval.earliest() >= first.tick);
//!
//! assert!(cron.unschedule("report").await?);
//! cron.stop().await;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod firing;
mod schedule;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, Job, Leader, Map, Result, Task, Time, TimeInterval,
    Version,
};
use sync_kit::locked;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use crate::firing::Firing;
pub use crate::schedule::{CronExpr, MIN_INTERVAL, Schedule};
use crate::schedule::{end_of_ms, from_ms, to_ms};
/// The default time source of a [`Cron`] (re-exported from `sync-kit`): the host's clock with
/// a stated uncertainty.
pub use sync_kit::clock::SystemClock;

/// The map value of a schedule: the last fired tick and the term that fired it (term 0: the
/// registration record, nothing fired yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    tick_ms: u64,
    term: u64,
}

impl Record {
    fn encode(self) -> Vec<u8> {
        serde_json::to_vec(&self).expect("a struct of two integers encodes")
    }

    fn decode(name: &str, bytes: &[u8]) -> Option<Record> {
        match serde_json::from_slice(bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(schedule = name, error = %e, "cron record is not valid JSON {{tick_ms, term}}; treating it as absent");
                None
            }
        }
    }
}

/// One registered schedule.
struct Registered {
    /// Unique per registration in this `Cron`, so a re-registration is seen as new.
    id: u64,
    name: String,
    schedule: Schedule,
    job: Job,
    /// Ticks at or before this millisecond never fire (when the map has no record).
    baseline_ms: u64,
}

struct Inner {
    leader: Arc<dyn Leader>,
    task: Arc<dyn Task>,
    map: Arc<dyn Map>,
    /// What a tick is judged due by: fired only once `earliest` has reached it.
    time: Arc<dyn Time>,
    candidate: String,
    schedules: Mutex<BTreeMap<String, Arc<Registered>>>,
    next_id: AtomicU64,
    /// Bumped on every schedule change.
    changes: watch::Sender<u64>,
    /// Set once by `stop`.
    stop: watch::Sender<bool>,
}

/// Fires schedules as [`Task`] jobs from the elected leader of a group; see the
/// [crate docs](crate) for an example and for which ticks fire.
pub struct Cron {
    inner: Arc<Inner>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = locked(&self.inner.schedules).keys().cloned().collect();
        f.debug_struct("Cron")
            .field("group", &self.inner.leader.group())
            .field("map", &self.inner.map.name())
            .field("candidate", &self.inner.candidate)
            .field("schedules", &names)
            .finish()
    }
}

/// Builds a [`Cron`]: the handles it needs, and the [`Time`] source it fires on.
///
/// Without [`with_time`](CronBuilder::with_time) the cron fires on the host's clock taken at
/// its word ([`SystemClock::default`]); see [the crate docs](crate#time) for what each choice
/// promises.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use sync_core::Backend;
/// use sync_cron::{Cron, SystemClock};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// // Any backend's Time plugs in, e.g. sync-ntp's `Client::time()`; here the host clock,
/// // stated to be within 20 ms of true time.
/// let clock = Arc::new(SystemClock::new(Duration::from_millis(20))?);
/// let cron = Cron::builder(client.leader("cron")?, client.task()?, client.map("cron")?, "node-1")
///     .with_time(clock)
///     .build();
/// # drop(cron);
/// # Ok(()) }
/// ```
pub struct CronBuilder {
    leader: Arc<dyn Leader>,
    task: Arc<dyn Task>,
    map: Arc<dyn Map>,
    candidate: String,
    time: Option<Arc<dyn Time>>,
}

impl fmt::Debug for CronBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CronBuilder")
            .field("group", &self.leader.group())
            .field("map", &self.map.name())
            .field("candidate", &self.candidate)
            .field("custom_time", &self.time.is_some())
            .finish()
    }
}

impl CronBuilder {
    /// Fires on `time`: a tick fires only once `time.now_interval()`'s earliest time has
    /// reached it. Any backend's [`Time`] handle works (`sync-ntp`'s measures its error).
    pub fn with_time(mut self, time: Arc<dyn Time>) -> Self {
        self.time = Some(time);
        self
    }

    /// The cron. Nothing runs until its first [`schedule`](Cron::schedule).
    pub fn build(self) -> Cron {
        let time = self
            .time
            .unwrap_or_else(|| Arc::new(SystemClock::default()));
        Cron {
            inner: Arc::new(Inner {
                leader: self.leader,
                task: self.task,
                map: self.map,
                time,
                candidate: self.candidate,
                schedules: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                changes: watch::Sender::new(0),
                stop: watch::Sender::new(false),
            }),
            driver: Mutex::new(None),
        }
    }
}

impl Cron {
    /// A cron driven by `leader` (campaigning as `candidate`), submitting to `task`,
    /// recording fired ticks in `map`, and firing on the host's clock
    /// ([`SystemClock::default`]). Nothing runs until the first
    /// [`schedule`](Cron::schedule). [`Cron::builder`] takes another time source.
    pub fn new(
        leader: Arc<dyn Leader>,
        task: Arc<dyn Task>,
        map: Arc<dyn Map>,
        candidate: impl Into<String>,
    ) -> Cron {
        Cron::builder(leader, task, map, candidate).build()
    }

    /// A builder for a cron over these handles; see [`CronBuilder`].
    pub fn builder(
        leader: Arc<dyn Leader>,
        task: Arc<dyn Task>,
        map: Arc<dyn Map>,
        candidate: impl Into<String>,
    ) -> CronBuilder {
        CronBuilder {
            leader,
            task,
            map,
            candidate: candidate.into(),
            time: None,
        }
    }

    /// Registers `schedule` under `name`: while this cron leads, each tick submits `job`
    /// (labelled `cron.schedule`, `cron.term`, `cron.tick`, `cron.earliest` and
    /// `cron.latest`: see [`Firing`]).
    ///
    /// Errors: an invalid name or job, or an interval under [`MIN_INTERVAL`], is
    /// [`ErrorKind::InvalidArgument`]; a name already registered on this cron is
    /// [`ErrorKind::Conflict`]; after [`stop`](Cron::stop), [`ErrorKind::Closed`]; polled
    /// outside a tokio runtime (which the driver runs on), [`ErrorKind::Unavailable`]; a
    /// failure of the time source (read for the registration time) or of the map (while
    /// writing the registration record) is returned as is, and nothing is registered.
    pub async fn schedule(&self, name: &str, schedule: Schedule, job: Job) -> Result<()> {
        sync_core::id::validate("schedule name", name)?;
        schedule.validate().map_err(|e| e.with_id(name))?;
        job.validate()?;
        self.check_open()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "the Cron driver needs a tokio runtime to run on",
            )
            .with_source(e)
            .with_id(name)
        })?;
        if locked(&self.inner.schedules).contains_key(name) {
            return Err(duplicate(name));
        }

        // Ticks certainly before the first registration anywhere never fire; a one-shot that
        // is already due stays due. The earliest time, not the host clock: a record ahead of
        // true time would hold back every later leader until true time caught up with it.
        let now = self
            .inner
            .time
            .now_interval()
            .await
            .map_err(|e| e.with_id(name))?;
        let now_ms = to_ms(now.earliest());
        let baseline_ms = match &schedule {
            Schedule::Once { at } => now_ms.min(to_ms(*at).saturating_sub(1)),
            _ => now_ms,
        };
        let registration = Record {
            tick_ms: baseline_ms,
            term: 0,
        };
        match self
            .inner
            .map
            .compare_and_swap(name, None, &registration.encode())
            .await
        {
            Ok(_) => debug!(schedule = name, baseline_ms, "cron schedule registered"),
            Err(e) if e.kind() == ErrorKind::Conflict => {
                debug!(schedule = name, "cron schedule resumes from its record")
            }
            Err(e) => return Err(e),
        }

        let registered = Arc::new(Registered {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            schedule,
            job,
            baseline_ms,
        });
        {
            let mut schedules = locked(&self.inner.schedules);
            if schedules.contains_key(name) {
                return Err(duplicate(name));
            }
            info!(schedule = name, when = %registered.schedule, job = %registered.job.name, "cron schedule added");
            schedules.insert(name.to_string(), registered);
        }
        self.inner.changes.send_modify(|n| *n += 1);
        self.ensure_driver(&runtime);
        Ok(())
    }

    /// Removes the schedule `name` from this cron; false if it was not registered. Its
    /// record stays in the map (other processes may still run the schedule).
    pub async fn unschedule(&self, name: &str) -> Result<bool> {
        sync_core::id::validate("schedule name", name)?;
        let removed = locked(&self.inner.schedules).remove(name).is_some();
        if removed {
            info!(schedule = name, "cron schedule removed");
            self.inner.changes.send_modify(|n| *n += 1);
        }
        Ok(removed)
    }

    /// Stops the driver and resigns leadership; waits (up to 10 s) for a firing in progress
    /// to finish. Further [`schedule`](Cron::schedule) calls fail with
    /// [`ErrorKind::Closed`].
    pub async fn stop(&self) {
        self.inner.stop.send_replace(true);
        let handle = locked(&self.driver).take();
        if let Some(mut handle) = handle {
            if tokio::time::timeout(Duration::from_secs(10), &mut handle)
                .await
                .is_err()
            {
                warn!("cron driver did not stop within 10s; aborting it");
                handle.abort();
            }
        }
    }

    fn check_open(&self) -> Result<()> {
        if *self.inner.stop.borrow() {
            return Err(Error::new(ErrorKind::Closed, "the cron has been stopped"));
        }
        Ok(())
    }

    fn ensure_driver(&self, runtime: &tokio::runtime::Handle) {
        let mut driver = locked(&self.driver);
        if driver.is_none() && !*self.inner.stop.borrow() {
            let span = info_span!(
                "cron",
                group = self.inner.leader.group(),
                candidate = %self.inner.candidate
            );
            *driver = Some(runtime.spawn(drive(Arc::clone(&self.inner)).instrument(span)));
        }
    }
}

impl Drop for Cron {
    fn drop(&mut self) {
        if let Some(handle) = locked(&self.driver).take() {
            // Dropping the driver's future drops its `Elected`, which resigns in the
            // background.
            handle.abort();
        }
    }
}

fn duplicate(name: &str) -> Error {
    Error::new(
        ErrorKind::Conflict,
        "a schedule of this name is already registered",
    )
    .with_id(name)
}

/// What the driver knows of a schedule's record: the last fired (or registration) tick, and
/// the record's version (`None`: the map has no record).
#[derive(Debug, Clone, Copy)]
struct Known {
    tick_ms: u64,
    version: Option<Version>,
}

/// How a leadership ended.
enum Outcome {
    Stopped,
    Revoked(String),
}

/// What a schedule needs next.
enum Step {
    Ended,
    Wait(SystemTime),
    Fire(SystemTime),
}

/// Jittered exponential backoff after failures: 100 ms doubling up to 5 s.
fn backoff(failures: u32) -> Duration {
    let cap = Duration::from_millis(100 * (1 << failures.min(6))).min(Duration::from_secs(5));
    cap / 2 + cap.mul_f64(rand::random::<f64>() / 2.0)
}

/// A leadership revoked sooner than this counts as a failure: the next campaign backs off.
const MIN_REIGN: Duration = Duration::from_secs(1);

/// The longest sleep between re-checks of the wall clock.
const MAX_NAP: Duration = Duration::from_secs(30);

async fn drive(inner: Arc<Inner>) {
    let mut failures = 0u32;
    loop {
        let elected = tokio::select! {
            biased;
            () = inner.stopped() => return,
            r = inner.leader.elect(&inner.candidate, ElectOptions::new()) => r,
        };
        let elected = match elected {
            // `failures` is reset only by a leadership that lasted (below), so a backend that
            // keeps electing and at once revoking is backed off, not spun on.
            Ok(elected) => elected,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                warn!(error = %e, retry_in = ?wait, "cron election failed");
                if inner.rest(wait).await {
                    continue;
                }
                return;
            }
        };
        info!(
            term = elected.term(),
            "cron leader elected; firing schedules"
        );
        let reign_started = tokio::time::Instant::now();
        match inner.lead(&elected).await {
            Outcome::Stopped => {
                let term = elected.term();
                match elected.resign().await {
                    Ok(()) => info!(term, "cron stopped; resigned"),
                    Err(e) => warn!(term, error = %e, "cron stopped; resigning failed"),
                }
                return;
            }
            Outcome::Revoked(reason) => {
                warn!(
                    term = elected.term(),
                    reason, "cron leadership lost; campaigning again"
                );
                drop(elected);
                if reign_started.elapsed() >= MIN_REIGN {
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                    if !inner.rest(backoff(failures)).await {
                        return;
                    }
                }
            }
        }
    }
}

impl Inner {
    /// Sleeps for `wait` unless stopped first; false if stopped.
    async fn rest(&self, wait: Duration) -> bool {
        tokio::select! {
            () = self.stopped() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    /// Resolves once `stop` was called.
    async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        // The sender lives in `self`, so this only returns once the flag is set.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Fires schedules while `elected` leads.
    async fn lead(&self, elected: &Elected) -> Outcome {
        let term = elected.term();
        let mut changes = self.changes.subscribe();
        // What is known of each schedule's record, per registration id.
        let mut last: HashMap<String, (u64, Known)> = HashMap::new();
        let mut failures = 0u32;
        loop {
            if self.is_stopped() {
                return Outcome::Stopped;
            }
            if let Some(reason) = elected.revocation_signal().reason() {
                return Outcome::Revoked(reason);
            }
            changes.borrow_and_update();
            let schedules: Vec<Arc<Registered>> =
                locked(&self.schedules).values().cloned().collect();
            last.retain(|name, (id, _)| schedules.iter().any(|s| &s.name == name && s.id == *id));

            // One reading of the time source per pass: every tick of the pass is judged on
            // it. The reading only ages while the pass runs, which can delay a firing but
            // never hasten it.
            let read_at = tokio::time::Instant::now();
            let now = match self.time.now_interval().await {
                Ok(now) => now,
                Err(e) => {
                    // Never fall back to the host clock: that is the unchecked clock a time
                    // source is there to replace.
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    warn!(term, error = %e, retry_in = ?wait, "cron time source failed; firing nothing until it answers");
                    tokio::select! {
                        biased;
                        () = self.stopped() => return Outcome::Stopped,
                        reason = elected.revoked() => return Outcome::Revoked(reason),
                        () = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            };

            let mut failed = false;
            let mut fired = false;
            let mut wake: Option<SystemTime> = None;
            for reg in &schedules {
                let known = match last.get(&reg.name) {
                    Some(&(_, known)) => Ok(known),
                    None => self.load(reg, term, &now).await,
                };
                let known = match known {
                    Ok(known) => known,
                    Err(e) if e.kind() == ErrorKind::NotHeld => {
                        return Outcome::Revoked(e.to_string());
                    }
                    Err(e) => {
                        warn!(schedule = %reg.name, error = %e, "cannot load cron record");
                        failed = true;
                        continue;
                    }
                };
                last.insert(reg.name.clone(), (reg.id, known));
                // Due only once the earliest possible true time has reached the tick, so the
                // tick fired (and recorded) is never after true time, nor after `latest`.
                match step(&reg.schedule, known.tick_ms, now.earliest()) {
                    Step::Ended => {}
                    Step::Wait(at) => wake = Some(wake.map_or(at, |w| w.min(at))),
                    Step::Fire(tick) => {
                        if let Some(reason) = elected.revocation_signal().reason() {
                            return Outcome::Revoked(reason);
                        }
                        match self.fire(reg, tick, term, known, &now).await {
                            Ok(now_known) => {
                                last.insert(reg.name.clone(), (reg.id, now_known));
                                fired = true;
                            }
                            Err(e) if e.kind() == ErrorKind::NotHeld => {
                                return Outcome::Revoked(e.to_string());
                            }
                            Err(e) => {
                                warn!(schedule = %reg.name, term, tick = to_ms(tick), error = %e, "cron firing failed");
                                last.remove(&reg.name);
                                failed = true;
                            }
                        }
                    }
                }
            }

            let nap = if failed {
                failures = failures.saturating_add(1);
                backoff(failures)
            } else if fired {
                failures = 0;
                continue;
            } else {
                failures = 0;
                // The time source's distance to the tick, less what this pass took; slept on
                // the monotonic clock, then checked against the time source again.
                wake.map_or(MAX_NAP, |w| {
                    w.duration_since(now.earliest())
                        .unwrap_or_default()
                        .saturating_sub(read_at.elapsed())
                        .min(MAX_NAP)
                })
            };
            tokio::select! {
                biased;
                () = self.stopped() => return Outcome::Stopped,
                reason = elected.revoked() => return Outcome::Revoked(reason),
                _ = changes.changed() => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Reads a schedule's record: its tick (the registration baseline if the map has none) and
    /// version. A record written under a higher term than `term` is NotHeld: terms only grow, so
    /// a newer leader exists and this one missed its revocation.
    ///
    /// A recorded tick after the latest time `now` allows was fired (or registered) on a clock
    /// that ran ahead of true time. Waiting for it would leave every tick until then unfired,
    /// so it is not trusted: the schedule resumes from this cron's registration baseline, and
    /// fires the latest tick due now, then each next one. A tick the clock-ahead leader already
    /// submitted is submitted again under the same idempotency key, so it stays one job.
    async fn load(&self, reg: &Registered, term: u64, now: &TimeInterval) -> Result<Known> {
        let name = reg.name.as_str();
        let entry = self.map.read(name).await?;
        let version = entry.as_ref().map(|e| e.version);
        let record = entry.and_then(|e| Record::decode(name, &e.value));
        if let Some(newer) = record.filter(|r| r.term > term) {
            return Err(Error::new(
                ErrorKind::NotHeld,
                format!(
                    "a newer leader (term {}) fired this schedule; term {term} steps down",
                    newer.term
                ),
            )
            .with_id(name));
        }
        let Some(record) = record else {
            return Ok(Known {
                tick_ms: reg.baseline_ms,
                version,
            });
        };
        let recorded = from_ms(record.tick_ms);
        if recorded.is_none_or(|t| t > now.latest()) {
            // `now` was read before the record: read the time again, after it, before calling
            // the record one from the future.
            let fresh = self.time.now_interval().await?;
            if recorded.is_none_or(|t| t > fresh.latest()) {
                warn!(
                    schedule = name,
                    recorded_tick = record.tick_ms,
                    recorded_term = record.term,
                    latest = to_ms(fresh.latest()),
                    "cron record is after the latest trusted time (a clock ahead of true time \
                     wrote it); not waiting for it: resuming from now"
                );
                return Ok(Known {
                    tick_ms: reg.baseline_ms,
                    version,
                });
            }
        }
        Ok(Known {
            tick_ms: record.tick_ms,
            version,
        })
    }

    /// Records `tick` with compare-and-swap against the version last seen and, if that
    /// succeeded, submits the job: one map write per tick while nobody else writes the record.
    /// On a conflict the record is read again and the tick reconsidered from it. Returns what
    /// is now known of the record. `now` is the reading `tick` was found due at; the job
    /// carries it.
    async fn fire(
        &self,
        reg: &Registered,
        tick: SystemTime,
        term: u64,
        known: Known,
        now: &TimeInterval,
    ) -> Result<Known> {
        let name = reg.name.as_str();
        let tick_ms = to_ms(tick);
        let record = Record { tick_ms, term };
        let version = match self
            .map
            .compare_and_swap(name, known.version, &record.encode())
            .await
        {
            Ok(version) => version,
            Err(e) if e.kind() == ErrorKind::Conflict => {
                debug!(
                    schedule = name,
                    tick = tick_ms,
                    "cron record changed under us; reading it again"
                );
                return self.load(reg, term, now).await;
            }
            Err(e) => return Err(e),
        };
        let fired = Known {
            tick_ms,
            version: Some(version),
        };

        let mut job = reg.job.clone().with_key(tick_key(name, tick_ms));
        for (label, value) in firing::labels(name, term, tick_ms, now) {
            job = job.with_label(label, value);
        }
        let (earliest, latest) = (to_ms(now.earliest()), to_ms(now.latest()));
        // The tick is recorded as ours now: try hard to submit it, even if leadership is
        // revoked meanwhile (nobody else will fire it). The tick's key makes a resend after a
        // lost answer, or a second leader's submit of the same tick, the same one job.
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            match self.task.submit(job.clone()).await {
                Ok(id) => {
                    info!(schedule = name, term, tick = tick_ms, earliest, latest, job = %id, "cron fired");
                    return Ok(fired);
                }
                Err(e) if attempt < ATTEMPTS && e.kind() != ErrorKind::InvalidArgument => {
                    let wait = backoff(attempt);
                    warn!(schedule = name, term, tick = tick_ms, error = %e, retry_in = ?wait, "cron job submission failed");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    error!(schedule = name, term, tick = tick_ms, error = %e, "cron job submission failed; this tick is lost");
                    return Ok(fired);
                }
            }
        }
        Ok(fired)
    }
}

/// The idempotency key of one tick of a schedule: `cron.<tick ms>.<name>`, or with a hash of
/// the name where the name is too long for a job key.
fn tick_key(name: &str, tick_ms: u64) -> String {
    let key = format!("cron.{tick_ms}.{name}");
    if key.len() <= sync_core::id::MAX_ID_LEN {
        return key;
    }
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("cron.{tick_ms}.#{hash:016x}")
}

/// What a schedule whose last fired tick is `last_ms` needs at `now`: nothing more, a wait,
/// or a firing of the latest due tick (missed ticks coalesce into it).
fn step(schedule: &Schedule, last_ms: u64, now: SystemTime) -> Step {
    let Some(after) = end_of_ms(last_ms) else {
        return Step::Ended;
    };
    match schedule.next_after(after) {
        None => Step::Ended,
        Some(next) if next > now => Step::Wait(next),
        Some(next) => Step::Fire(schedule.latest_between(after, now).unwrap_or(next)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    use chrono::{DateTime, Utc};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const T0: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    #[test]
    fn tick_keys_are_ids_even_for_long_names() {
        let short = tick_key("report", 42);
        assert_eq!(short, "cron.42.report");
        let long = "n".repeat(sync_core::id::MAX_ID_LEN);
        let key = tick_key(&long, 42);
        assert!(sync_core::id::validate("job key", &key).is_ok(), "{key}");
        assert_ne!(key, tick_key(&"m".repeat(sync_core::id::MAX_ID_LEN), 42));
    }

    #[test]
    fn step_resumes_after_the_recorded_tick() {
        let s = Schedule::every_from(at(T0), Duration::from_secs(10));
        let ms = |secs: u64| secs * 1000;
        // Nothing missed: wait for the next tick.
        assert!(matches!(step(&s, ms(T0 + 10), at(T0 + 15)), Step::Wait(t) if t == at(T0 + 20)));
        // Several missed: fire only the latest.
        assert!(matches!(step(&s, ms(T0 + 10), at(T0 + 55)), Step::Fire(t) if t == at(T0 + 50)));
        // Exactly due.
        assert!(matches!(step(&s, ms(T0 + 10), at(T0 + 20)), Step::Fire(t) if t == at(T0 + 20)));
        // A one-shot fired is over.
        let o = Schedule::once(at(T0));
        assert!(matches!(step(&o, ms(T0), at(T0 + 100)), Step::Ended));
        assert!(matches!(step(&o, ms(T0) - 1, at(T0 + 100)), Step::Fire(t) if t == at(T0)));
        // Sub-millisecond ticks never repeat a recorded millisecond.
        let fine =
            Schedule::every_from(at(T0) + Duration::from_micros(300), Duration::from_secs(1));
        assert!(
            matches!(step(&fine, ms(T0 + 1), at(T0 + 5)), Step::Fire(t) if to_ms(t) == ms(T0 + 4))
        );
        assert!(
            matches!(step(&fine, ms(T0 + 4), at(T0 + 4) + Duration::from_millis(1)), Step::Wait(t) if to_ms(t) == ms(T0 + 5))
        );
    }

    #[test]
    fn out_of_range_times_are_no_tick_not_a_panic() {
        // Representable as a SystemTime, far beyond chrono's range (±262,000 years).
        let far = UNIX_EPOCH + Duration::from_secs(1 << 60);
        let hourly = Schedule::cron("0 0 * * * *").unwrap();
        assert_eq!(hourly.next_after(far), None);
        assert_eq!(hourly.latest_between(at(T0), far), None);
        // A corrupt record far in the future (or u64::MAX) ends the schedule.
        assert!(matches!(step(&hourly, u64::MAX, at(T0)), Step::Ended));
        assert!(matches!(step(&hourly, 1 << 60, at(T0)), Step::Ended));
        let every = Schedule::every_from(at(T0), Duration::from_secs(10));
        assert!(matches!(
            step(&every, u64::MAX, at(T0)),
            Step::Ended | Step::Wait(_)
        ));
        // Just inside chrono's range.
        let edge = SystemTime::from(DateTime::<Utc>::MAX_UTC) - Duration::from_secs(86_400);
        let _ = hourly.next_after(edge);
        let _ = hourly.latest_between(at(T0), edge);
        // Display (used in the "schedule added" log line) of a far one-shot.
        assert!(!Schedule::once(far).to_string().is_empty());
        assert!(
            !Schedule::every_from(far, Duration::from_secs(1))
                .to_string()
                .is_empty()
        );
    }

    #[test]
    fn records_are_the_documented_json() {
        let r = Record {
            tick_ms: 1_700_000_000_000,
            term: 7,
        };
        assert_eq!(
            String::from_utf8(r.encode()).unwrap(),
            r#"{"tick_ms":1700000000000,"term":7}"#
        );
        assert_eq!(Record::decode("x", &r.encode()), Some(r));
        assert_eq!(Record::decode("x", b"garbage"), None);
    }
}
