//! # sync-conformance
//!
//! The behaviour cases every `sync` backend must pass, written once against the `sync-core`
//! traits, and the [runner](run) each backend crate calls from its `tests/conformance.rs`.
//!
//! A backend's `tests/conformance.rs` hands [`run`] a way to connect a client of its own in a
//! given namespace; everything else (capabilities, the lease TTL, fault hooks) comes through
//! the [`Backend`] trait:
//!
//! ```no_run
//! # use std::time::Duration;
//! fn main() -> std::process::ExitCode {
//!     sync_conformance::run("local", None, |_url, namespace| async move {
//!         let config = sync_local::Config::default()
//!             .with_namespace(&namespace)
//!             .with_ttl(Duration::from_secs(1));
//!         sync_local::Client::connect(config)
//!     })
//! }
//! ```
//!
//! Each case is a plain `pub async fn(&Ctx) -> Result<(), Failure>` in the module of its
//! primitive ([`lock`], [`leader`], [`task`], [`map`], [`cron`], [`time`]), so a backend can also
//! call one directly while debugging. Cases wait on events with bounded timeouts, never on fixed
//! sleeps, and their time bounds scale with the backend's lease TTL ([`Backend::ttl`]).
#![deny(missing_docs)]

use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use sync_core::{Backend, Faults, Leader, Lock, Map, Task, Time};

pub mod cron;
pub mod fault;
pub mod leader;
pub mod limits;
pub mod lock;
pub mod map;
pub mod pause;
pub mod pki;
pub mod proxy;
mod runner;
mod spans;
pub mod task;
pub mod time;
pub mod tools;

use runner::Harness;
pub use runner::{Case, cases, run};
pub use sync_core::{Capabilities, Capability};

/// One participant of a case: a connected [`Backend`] client (its own lease/session) with its
/// handles and fault hooks.
pub struct Client(Arc<dyn Backend>);

impl Client {
    /// The backend client itself.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.0
    }
    /// The lock handle.
    pub fn lock(&self) -> sync_core::Result<Arc<dyn Lock>> {
        self.0.lock()
    }
    /// A leader handle bound to `group`.
    pub fn leader(&self, group: &str) -> sync_core::Result<Arc<dyn Leader>> {
        self.0.leader(group)
    }
    /// The task handle.
    pub fn task(&self) -> sync_core::Result<Arc<dyn Task>> {
        self.0.task()
    }
    /// The map `name`.
    pub fn map(&self, name: &str) -> sync_core::Result<Arc<dyn Map>> {
        self.0.map(name)
    }
    /// The time source.
    pub fn time(&self) -> sync_core::Result<Arc<dyn Time>> {
        self.0.time()
    }
    /// Simulates the process dying: stops renewing, releases nothing.
    pub async fn kill(&self) -> sync_core::Result<()> {
        self.faults()?.kill().await
    }
    /// Revokes the client's lease/session on the server side.
    pub async fn revoke(&self) -> sync_core::Result<()> {
        self.faults()?.revoke().await
    }

    fn faults(&self) -> sync_core::Result<&dyn Faults> {
        self.0
            .faults()
            .ok_or_else(|| sync_core::raw::unsupported(self.0.name(), "fault hooks"))
    }
}

/// Why a case failed: a message with the source location of the check that failed.
///
/// Any error converts into it with `?` (it deliberately does not implement
/// [`std::error::Error`] itself, so the blanket conversion is coherent).
pub struct Failure {
    message: String,
}

impl Failure {
    /// A failure with `message`, located at the caller.
    #[track_caller]
    pub fn new(message: impl fmt::Display) -> Self {
        Failure::located(message, std::panic::Location::caller())
    }

    /// A failure with `message`, located at `at` (a caller captured before an `async` block,
    /// which `#[track_caller]` does not reach).
    fn located(message: impl fmt::Display, at: &std::panic::Location<'_>) -> Self {
        Failure {
            message: format!("{message} (at {}:{})", at.file(), at.line()),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for Failure {
    #[track_caller]
    fn from(e: E) -> Self {
        Failure::new(format_args!("unexpected error: {e}"))
    }
}

/// What a case returns.
pub type CaseResult = Result<(), Failure>;

/// Fails the case with a formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr $(,)?) => {
        if !$cond {
            return Err($crate::Failure::new(concat!("check failed: ", stringify!($cond))));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::Failure::new(format_args!($($arg)+)));
        }
    };
}

/// Fails the case with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::Failure::new(format_args!($($arg)+)))
    };
}

/// Adds what was being done to an error, turning it into a [`Failure`].
pub trait Context<T> {
    /// Wraps the error as "`what`: error".
    fn context(self, what: impl fmt::Display) -> Result<T, Failure>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    #[track_caller]
    fn context(self, what: impl fmt::Display) -> Result<T, Failure> {
        match self {
            Ok(v) => Ok(v),
            Err(e) => Err(Failure::new(format_args!("{what}: {e}"))),
        }
    }
}

/// Checks that `result` failed with `kind`; `what` names the operation in the message.
#[track_caller]
pub fn expect_kind<T: fmt::Debug>(
    what: impl fmt::Display,
    result: sync_core::Result<T>,
    kind: sync_core::ErrorKind,
) -> CaseResult {
    match result {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(Failure::new(format_args!(
            "{what}: expected a {kind:?} error, got {:?} error: {e}",
            e.kind()
        ))),
        Ok(v) => Err(Failure::new(format_args!(
            "{what}: expected a {kind:?} error, got Ok({v:?})"
        ))),
    }
}

/// Checks that `values` (fencing tokens, terms) strictly increase; `what` names them.
#[track_caller]
pub(crate) fn ensure_increasing(what: &str, values: &[u64]) -> CaseResult {
    match values.windows(2).find(|w| w[0] >= w[1]) {
        None => Ok(()),
        Some(w) => Err(Failure::new(format_args!(
            "{what} must strictly increase; got {values:?} ({} then {})",
            w[0], w[1]
        ))),
    }
}

/// The job retention every harness configures (how long a finished job stays readable), so
/// that `task::finished_jobs_disappear_after_retention` can see jobs go.
pub const JOB_RETENTION: Duration = Duration::from_secs(3);

/// Extra time added to TTL-scaled bounds: scheduling, network round trips, a watch firing.
pub const SLACK: Duration = Duration::from_secs(2);

/// Per-case context: the harness, the case's own random namespace, and its time bounds.
pub struct Ctx {
    harness: Arc<Harness>,
    namespace: String,
}

impl Ctx {
    /// A context in a fresh random namespace.
    pub(crate) fn new(harness: Arc<Harness>) -> Self {
        Ctx {
            harness,
            namespace: format!("conformance-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The case's namespace; every client of the case shares it.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A new independent client in the case's namespace.
    #[track_caller]
    pub fn client(&self) -> impl Future<Output = Result<Client, Failure>> + Send + '_ {
        let at = std::panic::Location::caller();
        async move {
            (self.harness.connect)(self.harness.url.clone(), self.namespace.clone())
                .await
                .map(Client)
                .map_err(|e| Failure::located(format_args!("creating a client: {e}"), at))
        }
    }

    /// A new client in the case's namespace, connected by whoever awaits the future (on a
    /// runtime of the case's choosing, e.g. a holder that the case pauses).
    pub fn connect_later(
        &self,
    ) -> futures::future::BoxFuture<'static, sync_core::Result<Arc<dyn Backend>>> {
        (self.harness.connect)(self.harness.url.clone(), self.namespace.clone())
    }

    /// A new client in the case's namespace that reaches the server through a fault proxy of
    /// its own. Only for network backends (cases that need it are `[unsupported]` without a
    /// URL).
    #[track_caller]
    pub fn proxied_client(
        &self,
    ) -> impl Future<Output = Result<(Client, proxy::FaultProxy), Failure>> + Send + '_ {
        let at = std::panic::Location::caller();
        async move {
            let fail = |what: String| Failure::located(what, at);
            let servers = proxy::hosts(&self.harness.url)
                .ok_or_else(|| fail(format!("no server address in {:?}", self.harness.url)))?;
            let proxy = proxy::FaultProxy::start_all(&servers)
                .await
                .map_err(|e| fail(format!("starting the fault proxy: {e}")))?;
            let url = proxy::through_all(&self.harness.url, proxy.addrs());
            let client = (self.harness.connect)(url, self.namespace.clone())
                .await
                .map_err(|e| fail(format!("creating a client through the proxy: {e}")))?;
            Ok((Client(client), proxy))
        }
    }

    /// The backend's lease TTL.
    pub fn ttl(&self) -> Duration {
        self.harness.ttl
    }

    /// How long something pushed (a release, a resignation, a revocation, a job) may take to
    /// be seen: [`SLACK`], independent of the TTL.
    pub fn prompt(&self) -> Duration {
        SLACK
    }

    /// How long after a holder dies its lease may take to expire: one TTL, plus another TTL
    /// (Consul may take up to twice the TTL to invalidate a session) or [`SLACK`], whichever is
    /// longer, plus half the slack for the server to act on the expiry (Consul's invalidation
    /// is a raft write of its own, made when its timer fires at exactly twice the TTL).
    pub fn expiry(&self) -> Duration {
        self.ttl() + self.ttl().max(SLACK) + SLACK / 2
    }
}

/// Waits for `fut`, failing with "`what` did not happen within `limit`" if it takes longer.
#[track_caller]
pub fn within<'a, F>(
    limit: Duration,
    what: impl fmt::Display,
    fut: F,
) -> impl Future<Output = Result<F::Output, Failure>> + Send + 'a
where
    F: Future + Send + 'a,
{
    let at = std::panic::Location::caller();
    let what = what.to_string();
    async move {
        tokio::time::timeout(limit, fut).await.map_err(|_| {
            Failure::located(format_args!("{what}: did not happen within {limit:?}"), at)
        })
    }
}

/// Checks that `fut` does NOT complete within `limit` (a bounded wait that is expected to
/// elapse). The future is polled but not consumed, so it can be awaited afterwards.
#[track_caller]
pub fn stays_pending<'a, F>(
    limit: Duration,
    what: impl fmt::Display,
    fut: &'a mut F,
) -> impl Future<Output = CaseResult> + Send + 'a
where
    F: Future + Unpin + Send,
    F::Output: fmt::Debug,
{
    let at = std::panic::Location::caller();
    let what = what.to_string();
    async move {
        let start = Instant::now();
        match tokio::time::timeout(limit, fut).await {
            Err(_) => Ok(()),
            Ok(out) => Err(Failure::located(
                format_args!(
                    "{what}: happened after {:?} but must not happen within {limit:?}; \
                     result {out:?}",
                    start.elapsed()
                ),
                at,
            )),
        }
    }
}

/// Polls `check` until it returns true, failing after `limit`. Only for conditions that no
/// event announces (a background cleanup); everything else waits on the event itself.
#[track_caller]
pub fn eventually<'a, F, Fut>(
    limit: Duration,
    what: impl fmt::Display,
    mut check: F,
) -> impl Future<Output = CaseResult> + Send + 'a
where
    F: FnMut() -> Fut + Send + 'a,
    Fut: Future<Output = Result<bool, Failure>> + Send,
{
    let at = std::panic::Location::caller();
    let what = what.to_string();
    async move {
        let deadline = Instant::now() + limit;
        let mut pause = Duration::from_millis(5);
        loop {
            if check().await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure::located(
                    format_args!("{what}: still not true after {limit:?}"),
                    at,
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}
