//! The checking layer every backend handle goes through: ids and values are validated once,
//! here; every error names the backend, the operation and the id; every operation runs in one
//! `tracing` span (`backend`, `primitive`, `operation`, `id`); and the `metrics` facade records
//! operation counts and latencies, errors by kind, lock wait and hold times, and losses.
//!
//! A backend crate builds its raw handles (for tasks, its [`JobStore`]) and returns them
//! through [`lock`], [`leader`], [`task`], [`map`] and [`time`]; the raw handles may then
//! assume valid input.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `sync_operations_total` | counter | backend, primitive, operation |
//! | `sync_operation_seconds` | histogram | backend, primitive, operation |
//! | `sync_errors_total` | counter | backend, primitive, operation, kind |
//! | `sync_lock_wait_seconds` | histogram | backend |
//! | `sync_lock_hold_seconds` | histogram | backend |
//! | `sync_losses_total` | counter | backend, primitive |
//!
//! An operation a backend completes at once, in-process (sync-local's lock granted without a
//! wait, and its release), is counted with a time of zero and a wait of zero. The clock is read
//! once for it, where the loss check and the hold time need it; timing it too would take two
//! more readings, a good part of what the whole operation costs.
//!
//! No exporter is bundled: install any `metrics` recorder (the `metrics` example of this crate
//! serves them to Prometheus).

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use futures::{StreamExt, future::BoxFuture};
use metrics::{Key, Label, Level, Metadata};
use sync_core::{
    ElectOptions, Elected, Entry, Error, ErrorKind, FollowStream, Handler, Job, JobId, JobStatus,
    Leader, LeaderInfo, Lock, LockGuard, LockOptions, LossSignal, Map, Result, Task, Time,
    TimeInterval, Version, Worker, WorkerOptions,
    raw::{HeldLock, Leadership, validate_value},
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::task::{JobStore, start_worker, wait_for_job};

/// Checks an id by sync-core's rules (`what` names it: "lock id", "map key"…), naming the
/// backend in the error.
///
/// ```
/// let err = sync_kit::checked::check_id("etcd", "lock id", "").unwrap_err();
/// assert_eq!(err.to_string(), "etcd: invalid argument: lock id must not be empty");
/// ```
pub fn check_id(backend: &'static str, what: &str, id: &str) -> Result<()> {
    sync_core::id::validate(what, id).map_err(|e| e.with_backend(backend))
}

/// One operation's context: where it counts and what its errors name.
#[derive(Clone, Copy)]
struct Op {
    backend: &'static str,
    primitive: &'static str,
    operation: &'static str,
    /// Its metric keys, made once: recording builds, allocates and hashes nothing.
    keys: &'static OpKeys,
}

struct OpKeys {
    total: Key,
    seconds: Key,
}

/// What the checked layer's metrics are registered with (what the `metrics` macros would give).
static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Interned for the life of the process: one per distinct (backend, primitive, operation), or
/// per backend — a small, bounded set, leaked once. The keys reach whatever recorder is
/// installed when they are recorded (no handle is cached), so a recorder installed later sees
/// them too.
fn interned<K: Eq + std::hash::Hash, V: Send + Sync + 'static>(
    cache: &'static OnceLock<Mutex<HashMap<K, &'static V>>>,
    key: K,
    make: impl FnOnce() -> V,
) -> &'static V {
    let mut cache = crate::locked(cache.get_or_init(Default::default));
    cache
        .entry(key)
        .or_insert_with(|| Box::leak(Box::new(make())))
}

/// Labels leaked for the life of the process (only ever called through [`interned`]).
fn static_labels(pairs: &[(&'static str, &'static str)]) -> &'static [Label] {
    let labels: Vec<Label> = (pairs.iter())
        .map(|&(k, v)| Label::from_static_parts(k, v))
        .collect();
    Box::leak(labels.into_boxed_slice())
}

fn observe(key: &Key, took: Duration) {
    metrics::with_recorder(|r| r.register_histogram(key, &META).record(took.as_secs_f64()));
}

/// What an operation acts on: an id (lock id, map key, group…) and, for a map's, the map.
#[derive(Clone, Copy)]
struct At<'a> {
    id: &'a str,
    map: Option<&'a str>,
}

impl<'a> From<&'a str> for At<'a> {
    fn from(id: &'a str) -> Self {
        At { id, map: None }
    }
}

impl<'a> From<&'a String> for At<'a> {
    fn from(id: &'a String) -> Self {
        id.as_str().into()
    }
}

impl Op {
    /// Runs `fut` in its span, records it, and names backend, operation and id in its error.
    async fn run<'a, T>(
        self,
        at: impl Into<At<'a>>,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let at = at.into();
        let start = Instant::now();
        let result = in_span_async(self.span(at), fut).await;
        self.record(start.elapsed(), result.as_ref().err());
        result.map_err(|e| e.in_context(self.backend, self.operation, at.id))
    }

    fn span<'a>(self, at: impl Into<At<'a>>) -> tracing::Span {
        // Checked first: with tracing's `log` feature on (a dependency may turn it on), a
        // disabled span would still be built and offered to `log`, costing more than the
        // in-process operation it wraps.
        if !tracing::level_enabled!(tracing::Level::DEBUG) {
            return tracing::Span::none();
        }
        let At { id, map } = at.into();
        tracing::debug_span!(
            "sync",
            backend = self.backend,
            primitive = self.primitive,
            operation = self.operation,
            id,
            map
        )
    }

    /// Runs `fut` only if the input `check` passed; a refusal is counted and named like any
    /// other error. (`fut` is lazy: nothing reaches the backend before it is polled.)
    async fn checked<'a, T>(
        self,
        at: impl Into<At<'a>>,
        check: Result<()>,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        self.run(at, async move {
            check?;
            fut.await
        })
        .await
    }

    fn record(self, took: Duration, error: Option<&Error>) {
        self.record_with(took, error, None);
    }

    /// [`record`](Op::record), and one more histogram (`also`) in the same look-up of the
    /// recorder.
    fn record_with(self, took: Duration, error: Option<&Error>, also: Option<(&Key, Duration)>) {
        metrics::with_recorder(|r| {
            r.register_counter(&self.keys.total, &META).increment(1);
            (r.register_histogram(&self.keys.seconds, &META)).record(took.as_secs_f64());
            if let Some((key, value)) = also {
                r.register_histogram(key, &META).record(value.as_secs_f64());
            }
        });
        if let Some(e) = error {
            let kind = e.kind().to_string();
            metrics::counter!(
                "sync_errors_total",
                "backend" => self.backend,
                "primitive" => self.primitive,
                "operation" => self.operation,
                "kind" => kind
            )
            .increment(1);
        }
    }
}

/// Runs `f` (which does not wait) in `span`. An operation that tries a fast path first and
/// then waits builds its span once and runs both in it (one span per operation).
fn in_span<T>(span: &tracing::Span, f: impl FnOnce() -> T) -> T {
    if span.is_disabled() {
        return f();
    }
    span.in_scope(f)
}

/// Runs `fut` in `span` (see [`in_span`]).
async fn in_span_async<T>(span: tracing::Span, fut: impl Future<Output = T>) -> T {
    if span.is_disabled() {
        return fut.await;
    }
    fut.instrument(span).await
}

/// The context of one operation (its metric keys interned on first use).
fn op(backend: &'static str, primitive: &'static str, operation: &'static str) -> Op {
    type Cache = OnceLock<Mutex<HashMap<[&'static str; 3], &'static OpKeys>>>;
    static KEYS: Cache = OnceLock::new();
    let keys = interned(&KEYS, [backend, primitive, operation], || {
        let labels = static_labels(&[
            ("backend", backend),
            ("primitive", primitive),
            ("operation", operation),
        ]);
        OpKeys {
            total: Key::from_static_parts("sync_operations_total", labels),
            seconds: Key::from_static_parts("sync_operation_seconds", labels),
        }
    });
    Op {
        backend,
        primitive,
        operation,
        keys,
    }
}

fn count_loss(backend: &'static str, primitive: &'static str, signal: &LossSignal) {
    if let Some(reason) = signal.reason() {
        count_lost(backend, primitive, &reason);
    }
}

fn count_lost(backend: &'static str, primitive: &'static str, reason: &str) {
    tracing::warn!(backend, primitive, %reason, "held until lost");
    metrics::counter!("sync_losses_total", "backend" => backend, "primitive" => primitive)
        .increment(1);
}

/// Waits for a grant (a lock, a leadership) through transient failures: while the backend is
/// unreachable, or the session a wait stood on was lost (nothing was granted yet), `attempt`
/// runs again after a backoff until the caller's `wait` ends; a grant already lost when it
/// arrives is given back (dropped) and waited for again, so a caller never gets a stale one.
///
/// Returns the grant with the instant it was checked at.
async fn until_granted<T, Fut>(
    wait: Option<Duration>,
    lost: impl Fn(&T, Instant) -> bool,
    mut attempt: impl FnMut(Option<Duration>) -> Fut,
) -> Result<(T, Instant)>
where
    Fut: Future<Output = Result<T>>,
{
    let deadline = wait.map(crate::deadline);
    let not_granted = |why: &str| {
        let waited = wait.unwrap_or_default();
        Error::new(
            ErrorKind::Timeout,
            format!("not granted within {waited:?}; last: {why}"),
        )
    };
    // The first retry is at once (a grant lost as it arrived is usually a race just lost).
    let mut pause = Duration::ZERO;
    let mut last: Option<String> = None;
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let why = match attempt(left).await {
            Ok(granted) => {
                let now = Instant::now();
                if !lost(&granted, now) {
                    return Ok((granted, now));
                }
                "the grant was lost as it arrived".to_string()
            }
            Err(e) if matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::LockLost) => {
                e.to_string()
            }
            // A retry's timeout is over what was left of the caller's wait: name the whole
            // wait, and the failure that made it retry.
            Err(e) if e.kind() == ErrorKind::Timeout && last.is_some() => {
                return Err(not_granted(last.as_deref().unwrap_or_default()));
            }
            Err(e) => return Err(e),
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(not_granted(&why));
        }
        tracing::warn!(reason = %why, retry_in = ?pause, "waiting for a grant through a transient failure");
        last = Some(why);
        tokio::time::sleep(left.map_or(pause, |l| l.min(pause))).await;
        pause = (pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    }
}

/// Wraps a backend's raw Lock handle.
pub fn lock(backend: &'static str, inner: Arc<dyn Lock>) -> Arc<dyn Lock> {
    Arc::new(CheckedLock {
        ops: lock_ops(backend),
        inner,
    })
}

/// Wraps the raw Lock handle of an in-process backend (see [`InProcessLock`]): the same checks,
/// spans and metrics as [`lock`], without a second allocation or a future per guard.
pub fn lock_in_process<L: InProcessLock>(backend: &'static str, inner: Arc<L>) -> Arc<dyn Lock> {
    Arc::new(CheckedLock {
        ops: lock_ops(backend),
        inner,
    })
}

/// A raw lock whose immediate grant and its release are in-process operations (one look at a
/// table, no wait, no I/O), wrapped with [`lock_in_process`]. The checked layer then keeps its
/// side of a guard (timing, loss counting) in the same allocation as the backend's.
pub trait InProcessLock: Lock + 'static {
    /// The backend side of a guard granted by [`grant_held`](InProcessLock::grant_held).
    type Held: InProcessHeld;

    /// [`Lock::grant_now`] unboxed: the fencing token, loss signal and backend side of a grant
    /// that needs no wait, if one can be had right now; `None` means "go through `acquire`".
    fn grant_held(&self, id: &str) -> Option<(u64, LossSignal, Self::Held)>;
}

/// The backend side of a guard of an [`InProcessLock`].
pub trait InProcessHeld: Send + Sync + 'static {
    /// Releases the lock `id` at once; NotHeld or LockLost if it was no longer held (`lost` is
    /// the grant's loss signal, kept by the checked layer, which tells the two apart).
    fn release_held(&mut self, id: &str, lost: &LossSignal) -> Result<()>;

    /// Releases without waiting (the guard was dropped).
    fn release_held_in_background(self);
}

/// The [`LockOps`] of `backend`, made on first use.
fn lock_ops(backend: &'static str) -> &'static LockOps {
    type Cache = OnceLock<Mutex<HashMap<&'static str, &'static LockOps>>>;
    static OPS: Cache = OnceLock::new();
    interned(&OPS, backend, || {
        let labels = static_labels(&[("backend", backend)]);
        LockOps {
            backend,
            acquire: op(backend, "lock", "lock.acquire"),
            try_acquire: op(backend, "lock", "lock.try_acquire"),
            release: op(backend, "lock", "lock.release"),
            wait: Key::from_static_parts("sync_lock_wait_seconds", labels),
            hold: Key::from_static_parts("sync_lock_hold_seconds", labels),
        }
    })
}

/// A backend's lock operations and metric keys, made once per backend.
struct LockOps {
    backend: &'static str,
    acquire: Op,
    try_acquire: Op,
    release: Op,
    wait: Key,
    hold: Key,
}

/// `L` is `dyn Lock`, or an [`InProcessLock`] known by type.
struct CheckedLock<L: ?Sized> {
    ops: &'static LockOps,
    inner: Arc<L>,
}

/// How the checked layer gets an immediate grant of the lock it wraps, timed: the guard, its
/// backend side wrapped in a [`TimedHold`]. None when there is none, or it was lost as it
/// arrived (the full path retries that).
trait GrantNow: Lock {
    fn timed_grant(&self, ops: &'static LockOps, id: &str) -> Option<LockGuard>;
}

impl GrantNow for dyn Lock {
    fn timed_grant(&self, ops: &'static LockOps, id: &str) -> Option<LockGuard> {
        let guard = self.grant_now(id)?;
        let now = Instant::now();
        if guard.is_lost_at(now) {
            return None;
        }
        Some(timed(ops, guard, now))
    }
}

impl<L: InProcessLock> GrantNow for L {
    fn timed_grant(&self, ops: &'static LockOps, id: &str) -> Option<LockGuard> {
        let (token, lost, held) = self.grant_held(id)?;
        let now = Instant::now();
        if lost.is_lost_at(now) {
            held.release_held_in_background();
            return None;
        }
        let timed = TimedHold {
            ops,
            inner: InProcess(held),
            since: now,
            lost: lost.clone(),
        };
        Some(LockGuard::new(id, token, lost, Box::new(timed)))
    }
}

/// Times the hold of `guard` (from `now`, when it was granted) and counts a loss when it ends.
fn timed(ops: &'static LockOps, guard: LockGuard, now: Instant) -> LockGuard {
    let lost = guard.loss_signal();
    guard.map_held(|inner| {
        Box::new(TimedHold {
            ops,
            inner: Boxed(inner),
            since: now,
            lost,
        })
    })
}

impl<L: ?Sized + Lock> CheckedLock<L> {
    fn check(&self, id: &str) -> Result<()> {
        check_id(self.ops.backend, "lock id", id)
    }

    /// The outcome of an acquire or try_acquire begun at `start`, recorded: with the wait, if
    /// it granted (`got` tells).
    fn granted<T>(
        &self,
        op: Op,
        id: &str,
        (start, now): (Instant, Instant),
        granted: Result<T>,
        got: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        let took = now.saturating_duration_since(start);
        // The wait is the acquire's own time, recorded with it.
        let wait = granted.as_ref().is_ok_and(got);
        let wait = wait.then_some((&self.ops.wait, took));
        op.record_with(took, granted.as_ref().err(), wait);
        granted.map_err(|e| e.in_context(op.backend, op.operation, id))
    }

    /// The acquire of a lock that cannot be granted at once: queued, or through a failure.
    async fn acquire_waiting(
        &self,
        (span, start): (tracing::Span, Instant),
        id: &str,
        opts: LockOptions,
    ) -> Result<LockGuard> {
        let op = self.ops.acquire;
        let check = self.check(id);
        let granted = in_span_async(span, async {
            check?;
            let lost = |g: &LockGuard, now| g.is_lost_at(now);
            until_granted(opts.wait, lost, |wait| {
                let mut opts = opts.clone();
                opts.wait = wait;
                self.inner.acquire(id, opts)
            })
            .await
        })
        .await;
        let (granted, now) = match granted {
            Ok((guard, now)) => (Ok(guard), now),
            Err(e) => (Err(e), Instant::now()),
        };
        let guard = self.granted(op, id, (start, now), granted, |_| true)?;
        Ok(timed(self.ops, guard, now))
    }
}

impl<L: ?Sized + GrantNow> CheckedLock<L> {
    /// A grant the backend can make at once, in the operation's `span`, timed (see
    /// [`GrantNow`]).
    fn grant_now(&self, span: &tracing::Span, id: &str) -> Option<LockGuard> {
        self.check(id).ok()?;
        in_span(span, || self.inner.timed_grant(self.ops, id))
    }

    /// Records an immediate grant: no wait, no I/O, no time of its own (see the module doc),
    /// so nothing to subtract.
    fn granted_now(&self, op: Op) {
        let zero = Duration::ZERO;
        op.record_with(zero, None, Some((&self.ops.wait, zero)));
    }
}

#[async_trait]
impl<L: ?Sized + GrantNow + 'static> Lock for CheckedLock<L> {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let op = self.ops.acquire;
        let span = op.span(id);
        if let Some(guard) = self.grant_now(&span, id) {
            self.granted_now(op);
            return Ok(guard);
        }
        // One clock reading for the start, one at the grant: the operation's time, the wait
        // and the start of the hold all come from them.
        let start = Instant::now();
        // Boxed apart, so the future of the common case above stays small.
        Box::pin(self.acquire_waiting((span, start), id, opts)).await
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let op = self.ops.try_acquire;
        let span = op.span(id);
        if let Some(guard) = self.grant_now(&span, id) {
            self.granted_now(op);
            return Ok(Some(guard));
        }
        let start = Instant::now();
        let check = self.check(id);
        let granted = in_span_async(span, async {
            check?;
            self.inner.try_acquire(id).await
        });
        let granted = Box::pin(granted).await;
        let now = Instant::now();
        let guard = self.granted(op, id, (start, now), granted, Option::is_some)?;
        Ok(guard.map(|g| timed(self.ops, g, now)))
    }

    async fn release(&self, id: &str) -> Result<()> {
        (self.ops.release)
            .checked(id, self.check(id), self.inner.release(id))
            .await
    }

    fn grant_now(&self, _: &str) -> Option<LockGuard> {
        // A wrapper's callers go through acquire, which takes the backend's fast path.
        None
    }

    async fn holder(&self, id: &str) -> Result<Option<String>> {
        self.check(id)?;
        let holder = self.inner.holder(id).await;
        holder.map_err(|e| e.in_context(self.ops.backend, "lock.holder", id))
    }
}

/// What a [`TimedHold`] wraps: a boxed [`HeldLock`] of any backend, or an in-process one.
/// (`id` is the guard's lock id, `lost` its loss signal.)
trait Backing: Send + Sync + 'static {
    /// Whether [`release_now`](Backing::release_now) always releases. If not, a guard's
    /// `release_now` leaves it to `release`, so that the operation still has one span.
    const RELEASES_NOW: bool;

    fn release_now(&mut self, id: &str, lost: &LossSignal) -> Option<Result<()>>;
    fn release<'a>(&'a mut self, id: &'a str, lost: &'a LossSignal) -> BoxFuture<'a, Result<()>>;
    fn release_in_background(self, id: &str);
}

/// A network backend's side of a guard.
struct Boxed(Box<dyn HeldLock>);

impl Backing for Boxed {
    const RELEASES_NOW: bool = false;

    fn release_now(&mut self, id: &str, _: &LossSignal) -> Option<Result<()>> {
        self.0.release_now(id)
    }

    fn release<'a>(&'a mut self, id: &'a str, _: &'a LossSignal) -> BoxFuture<'a, Result<()>> {
        self.0.release(id)
    }

    fn release_in_background(self, id: &str) {
        self.0.release_in_background(id);
    }
}

struct InProcess<H>(H);

impl<H: InProcessHeld> Backing for InProcess<H> {
    const RELEASES_NOW: bool = true;

    fn release_now(&mut self, id: &str, lost: &LossSignal) -> Option<Result<()>> {
        Some(self.0.release_held(id, lost))
    }

    fn release<'a>(&'a mut self, id: &'a str, lost: &'a LossSignal) -> BoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(self.0.release_held(id, lost)))
    }

    fn release_in_background(self, _: &str) {
        self.0.release_held_in_background();
    }
}

/// The backend side of a guard, timed.
struct TimedHold<H> {
    ops: &'static LockOps,
    inner: H,
    /// When it was granted.
    since: Instant,
    lost: LossSignal,
}

impl<H: Backing> TimedHold<H> {
    /// The release's span, naming the lock (made only if a subscriber listens).
    fn release_span(&self, id: &str) -> tracing::Span {
        if !tracing::level_enabled!(tracing::Level::DEBUG) {
            return tracing::Span::none();
        }
        self.ops.release.span(id)
    }

    /// Why the hold was lost, if it was by `now`: asked before the release, which ends the
    /// signal.
    fn loss(&self, now: Instant) -> Option<String> {
        self.lost.is_lost_at(now).then(|| self.lost.reason())?
    }

    /// The hold ended at `start`, when the release began (which then took `took`): counts its
    /// loss (`lost`), and records `released`, the outcome of the release.
    fn ended(
        &self,
        (start, took): (Instant, Duration),
        lost: Option<String>,
        released: Result<()>,
    ) -> Result<()> {
        if let Some(reason) = lost {
            count_lost(self.ops.backend, "lock", &reason);
        }
        let held = start.saturating_duration_since(self.since);
        let op = self.ops.release;
        op.record_with(took, released.as_ref().err(), Some((&self.ops.hold, held)));
        released.map_err(|e| e.in_context(op.backend, op.operation, ""))
    }
}

#[async_trait]
impl<H: Backing> HeldLock for TimedHold<H> {
    async fn release(&mut self, id: &str) -> Result<()> {
        let start = Instant::now();
        let lost = self.loss(start);
        let span = self.release_span(id);
        let released = match in_span(&span, || self.inner.release_now(id, &self.lost)) {
            Some(released) => released,
            None => in_span_async(span, self.inner.release(id, &self.lost)).await,
        };
        self.ended((start, start.elapsed()), lost, released)
    }

    fn release_now(&mut self, id: &str) -> Option<Result<()>> {
        if !H::RELEASES_NOW {
            return None;
        }
        // Read for the loss and the end of the hold; a release done at once has no time of
        // its own (see the module doc).
        let now = Instant::now();
        let lost = self.loss(now);
        let span = self.release_span(id);
        let released = in_span(&span, || self.inner.release_now(id, &self.lost))?;
        Some(self.ended((now, Duration::ZERO), lost, released))
    }

    fn release_in_background(self: Box<Self>, id: &str) {
        let now = Instant::now();
        if let Some(reason) = self.loss(now) {
            count_lost(self.ops.backend, "lock", &reason);
        }
        observe(&self.ops.hold, now.saturating_duration_since(self.since));
        self.inner.release_in_background(id);
    }
}

/// Wraps a backend's raw Leader handle (the group was checked when the handle was made).
pub fn leader(backend: &'static str, inner: Arc<dyn Leader>) -> Arc<dyn Leader> {
    Arc::new(CheckedLeader { backend, inner })
}

/// Checks the election `group`, then makes the backend's raw handle with `make` and wraps it.
pub fn leader_for<L: Leader + 'static>(
    backend: &'static str,
    group: &str,
    make: impl FnOnce() -> L,
) -> Result<Arc<dyn Leader>> {
    check_id(backend, "election group", group)?;
    Ok(leader(backend, Arc::new(make())))
}

struct CheckedLeader {
    backend: &'static str,
    inner: Arc<dyn Leader>,
}

#[async_trait]
impl Leader for CheckedLeader {
    fn group(&self) -> &str {
        self.inner.group()
    }

    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected> {
        let check = check_id(self.backend, "candidate id", candidate)
            .and_then(|()| validate_value(&opts.value).map_err(|e| e.with_backend(self.backend)));
        let revoked = |e: &Elected, now| e.revocation_signal().is_lost_at(now);
        let campaign = until_granted(opts.wait, revoked, |wait| {
            let mut opts = opts.clone();
            opts.wait = wait;
            self.inner.elect(candidate, opts)
        });
        let campaign = async { campaign.await.map(|(elected, _)| elected) };
        let elected = op(self.backend, "leader", "leader.elect")
            .checked(self.group(), check, campaign)
            .await?;
        let (backend, group) = (self.backend, self.group().to_string());
        let revoked = elected.revocation_signal();
        Ok(elected.map_leadership(|inner| {
            Box::new(CheckedLeadership {
                backend,
                group,
                inner,
                revoked,
            })
        }))
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        op(self.backend, "leader", "leader.leader")
            .run(self.group(), self.inner.leader())
            .await
    }

    async fn follow(&self) -> Result<FollowStream> {
        let (backend, group) = (self.backend, self.group().to_string());
        let stream = op(backend, "leader", "leader.follow")
            .run(&group, self.inner.follow())
            .await?;
        Ok(stream
            .map(move |item| item.map_err(|e| e.in_context(backend, "leader.follow", &group)))
            .boxed())
    }
}

/// The backend side of a leadership, checked and counted.
struct CheckedLeadership {
    backend: &'static str,
    group: String,
    inner: Box<dyn Leadership>,
    /// The signal of the current term (reelect replaces it).
    revoked: LossSignal,
}

#[async_trait]
impl Leadership for CheckedLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let check = validate_value(value).map_err(|e| e.with_backend(self.backend));
        op(self.backend, "leader", "leader.proclaim")
            .checked(&self.group, check, self.inner.proclaim(value))
            .await
    }

    async fn resign(&mut self) -> Result<()> {
        count_loss(self.backend, "leader", &self.revoked);
        op(self.backend, "leader", "leader.resign")
            .run(&self.group, self.inner.resign())
            .await
    }

    fn resign_in_background(self: Box<Self>) {
        count_loss(self.backend, "leader", &self.revoked);
        self.inner.resign_in_background();
    }

    async fn reelect(&mut self) -> Result<(u64, LossSignal)> {
        count_loss(self.backend, "leader", &self.revoked);
        let (term, revoked) = op(self.backend, "leader", "leader.reelect")
            .run(&self.group, self.inner.reelect())
            .await?;
        self.revoked = revoked.clone();
        Ok((term, revoked))
    }
}

/// Makes a backend's job store its Task handle: workers run on sync-kit's
/// [machinery](crate::task) and waits time out here, the same for every backend.
pub fn task<S: JobStore>(backend: &'static str, store: S) -> Arc<dyn Task> {
    Arc::new(CheckedTask { backend, store })
}

struct CheckedTask<S> {
    backend: &'static str,
    store: S,
}

#[async_trait]
impl<S: JobStore> Task for CheckedTask<S> {
    async fn submit(&self, job: Job) -> Result<JobId> {
        let name = job.name.clone();
        let check = job.validate().map_err(|e| e.with_backend(self.backend));
        op(self.backend, "task", "task.submit")
            .checked(&name, check, self.store.submit(job))
            .await
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        op(self.backend, "task", "task.status")
            .run(&id.0, self.store.status(id))
            .await
    }

    async fn wait(&self, id: &JobId, timeout: Option<Duration>) -> Result<JobStatus> {
        let wait = wait_for_job(self.backend, &id.0, timeout, self.store.wait(id));
        op(self.backend, "task", "task.wait").run(&id.0, wait).await
    }

    async fn work(
        &self,
        name: &str,
        handler: Arc<dyn Handler>,
        opts: WorkerOptions,
    ) -> Result<Worker> {
        let check = check_id(self.backend, "job name", name)
            .and_then(|()| opts.validate().map_err(|e| e.with_backend(self.backend)));
        let start = start_worker(self.backend, &self.store, name, handler, opts);
        op(self.backend, "task", "task.work")
            .checked(name, check, start)
            .await
    }
}

/// Wraps a backend's raw Map handle (the map name was checked when the handle was made).
pub fn map(backend: &'static str, inner: Arc<dyn Map>) -> Arc<dyn Map> {
    Arc::new(CheckedMap { backend, inner })
}

/// Checks the map `name`, then makes the backend's raw handle with `make` and wraps it.
pub fn map_for<M: Map + 'static>(
    backend: &'static str,
    name: &str,
    make: impl FnOnce() -> M,
) -> Result<Arc<dyn Map>> {
    check_id(backend, "map name", name)?;
    Ok(map(backend, Arc::new(make())))
}

struct CheckedMap {
    backend: &'static str,
    inner: Arc<dyn Map>,
}

impl CheckedMap {
    fn check_key(&self, key: &str) -> Result<()> {
        check_id(self.backend, "map key", key)
    }

    fn check_write(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_key(key)?;
        validate_value(value).map_err(|e| e.with_backend(self.backend))
    }

    /// `key` of this map, as its operation's span and errors name it.
    fn at<'a>(&'a self, key: &'a str) -> At<'a> {
        let map = Some(self.inner.name());
        At { id: key, map }
    }
}

#[async_trait]
impl Map for CheckedMap {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn read(&self, key: &str) -> Result<Option<Entry>> {
        op(self.backend, "map", "map.read")
            .checked(self.at(key), self.check_key(key), self.inner.read(key))
            .await
    }

    async fn write(&self, key: &str, value: &[u8]) -> Result<Version> {
        op(self.backend, "map", "map.write")
            .checked(
                self.at(key),
                self.check_write(key, value),
                self.inner.write(key, value),
            )
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        op(self.backend, "map", "map.delete")
            .checked(self.at(key), self.check_key(key), self.inner.delete(key))
            .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version> {
        let cas = self.inner.compare_and_swap(key, expected, value);
        op(self.backend, "map", "map.compare_and_swap")
            .checked(self.at(key), self.check_write(key, value), cas)
            .await
    }

    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        let cad = self.inner.compare_and_delete(key, expected);
        op(self.backend, "map", "map.compare_and_delete")
            .checked(self.at(key), self.check_key(key), cad)
            .await
    }

    async fn entries(&self) -> Result<Vec<Entry>> {
        op(self.backend, "map", "map.entries")
            .run(self.at(self.name()), self.inner.entries())
            .await
    }
}

/// Wraps a backend's raw Time handle.
pub fn time(backend: &'static str, inner: Arc<dyn Time>) -> Arc<dyn Time> {
    Arc::new(CheckedTime { backend, inner })
}

struct CheckedTime {
    backend: &'static str,
    inner: Arc<dyn Time>,
}

#[async_trait]
impl Time for CheckedTime {
    async fn now_interval(&self) -> Result<TimeInterval> {
        op(self.backend, "time", "time.now_interval")
            .run("", self.inner.now_interval())
            .await
    }

    async fn now(&self) -> Result<SystemTime> {
        Ok(self.now_interval().await?.midpoint())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use metrics::{Counter, Gauge, Histogram, KeyName, Recorder, SharedString, Unit};
    use sync_core::Backend;

    use super::*;

    /// Notes every metric it is handed, as `name{label values}`.
    #[derive(Default)]
    struct Seen(Mutex<Vec<String>>);

    impl Seen {
        fn note(&self, key: &Key) {
            let labels: Vec<&str> = key.labels().map(|l| l.value()).collect();
            let seen = format!("{}{{{}}}", key.name(), labels.join(","));
            crate::locked(&self.0).push(seen);
        }

        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *crate::locked(&self.0))
        }
    }

    impl Recorder for Seen {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.note(key);
            Counter::noop()
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.note(key);
            Gauge::noop()
        }

        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.note(key);
            Histogram::noop()
        }
    }

    #[tokio::test]
    async fn a_retry_that_times_out_names_the_whole_wait_and_the_failure_before() {
        let mut tries = 0;
        let answer = until_granted(
            Some(Duration::from_secs(3)),
            |_: &(), _| false,
            |left| {
                tries += 1;
                let first = tries == 1;
                async move {
                    Err(if first {
                        Error::new(ErrorKind::Unavailable, "etcdserver: no leader")
                    } else {
                        let left = left.unwrap_or_default();
                        Error::new(ErrorKind::Timeout, format!("not granted within {left:?}"))
                    })
                }
            },
        )
        .await;
        let err = answer.expect_err("never granted");
        assert_eq!(err.kind(), ErrorKind::Timeout);
        let text = err.to_string();
        assert!(
            text.contains("within 3s") && text.contains("no leader"),
            "{text}"
        );
    }

    /// Notes every span it is offered as `operation id`, up to DEBUG.
    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<Vec<String>>>);

    /// The `operation` and `id` fields of a span.
    #[derive(Default)]
    struct Fields(String, String);

    impl tracing::field::Visit for Fields {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            match field.name() {
                "operation" => self.0 = value.to_string(),
                "id" => self.1 = value.to_string(),
                _ => {}
            }
        }

        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }

    impl tracing::Subscriber for Spans {
        fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
            *meta.level() <= tracing::Level::DEBUG
        }

        fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            let mut fields = Fields::default();
            span.record(&mut fields);
            if span.metadata().name() == "sync" {
                crate::locked(&self.0).push(format!("{} {}", fields.0, fields.1));
            }
            tracing::span::Id::from_u64(1)
        }

        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {}
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_lock_operation_has_its_span_once_a_subscriber_listens() -> Result<()> {
        let client = sync_local::Cluster::new().client(Default::default())?;
        let lock = client.lock()?;
        // Nobody listens: no span is built (checked before the macro), and nothing breaks.
        lock.acquire("a", LockOptions::new())
            .await?
            .release()
            .await?;

        let spans = Spans::default();
        let _listening = tracing::subscriber::set_default(spans.clone());
        let held = lock.acquire("a", LockOptions::new()).await?;
        assert!(lock.try_acquire("a").await?.is_none());
        held.release().await?;
        assert_eq!(
            crate::locked(&spans.0).clone(),
            ["lock.acquire a", "lock.try_acquire a", "lock.release a"]
        );
        Ok(())
    }

    /// A lock as a network backend's looks to the checked layer: nothing is granted or
    /// released at once. (It grants every id: only the spans matter here.)
    struct Remote;

    /// Keeps the grant's trigger, as a backend's monitor would.
    struct RemoteHeld(#[allow(dead_code)] sync_core::raw::LossTrigger);

    #[async_trait]
    impl HeldLock for RemoteHeld {
        async fn release(&mut self, _: &str) -> Result<()> {
            Ok(())
        }

        fn release_in_background(self: Box<Self>, _: &str) {}
    }

    #[async_trait]
    impl Lock for Remote {
        async fn acquire(&self, id: &str, _: LockOptions) -> Result<LockGuard> {
            let (trigger, lost) = sync_core::raw::loss_signal();
            Ok(LockGuard::new(id, 1, lost, Box::new(RemoteHeld(trigger))))
        }

        async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
            self.acquire(id, LockOptions::new()).await.map(Some)
        }

        async fn release(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_network_backends_operations_have_one_span_each() -> Result<()> {
        let lock = super::lock("remote", Arc::new(Remote));
        let spans = Spans::default();
        let _listening = tracing::subscriber::set_default(spans.clone());
        let held = lock.acquire("a", LockOptions::new()).await?;
        let other = lock.try_acquire("b").await?;
        held.release().await?;
        drop(other);
        assert_eq!(
            crate::locked(&spans.0).clone(),
            ["lock.acquire a", "lock.try_acquire b", "lock.release a"]
        );
        Ok(())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_recorder_installed_after_the_handle_sees_every_lock_metric() -> Result<()> {
        let client = sync_local::Cluster::new().client(Default::default())?;
        let lock = client.lock()?;
        // Before any recorder: recorded nowhere, and nothing kept from it.
        lock.acquire("a", LockOptions::new())
            .await?
            .release()
            .await?;

        for _ in 0..2 {
            let seen = Seen::default();
            let _installed = metrics::set_default_local_recorder(&seen);
            lock.acquire("a", LockOptions::new())
                .await?
                .release()
                .await?;
            let held = lock.acquire("b", LockOptions::new()).await?;
            assert!(lock.try_acquire("b").await?.is_none());
            held.release().await?;
            let err = lock.try_acquire("").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert_eq!(
                seen.take(),
                [
                    "sync_operations_total{local,lock,lock.acquire}",
                    "sync_operation_seconds{local,lock,lock.acquire}",
                    "sync_lock_wait_seconds{local}",
                    "sync_operations_total{local,lock,lock.release}",
                    "sync_operation_seconds{local,lock,lock.release}",
                    "sync_lock_hold_seconds{local}",
                    "sync_operations_total{local,lock,lock.acquire}",
                    "sync_operation_seconds{local,lock,lock.acquire}",
                    "sync_lock_wait_seconds{local}",
                    // Busy: no wait recorded.
                    "sync_operations_total{local,lock,lock.try_acquire}",
                    "sync_operation_seconds{local,lock,lock.try_acquire}",
                    "sync_operations_total{local,lock,lock.release}",
                    "sync_operation_seconds{local,lock,lock.release}",
                    "sync_lock_hold_seconds{local}",
                    "sync_operations_total{local,lock,lock.try_acquire}",
                    "sync_operation_seconds{local,lock,lock.try_acquire}",
                    "sync_errors_total{local,lock,lock.try_acquire,invalid argument}",
                ]
            );
        }
        Ok(())
    }
}
