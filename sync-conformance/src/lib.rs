//! # sync-conformance
//!
//! The behaviour cases every `sync` backend must pass, written once against the `sync-core`
//! traits, and the [runner](run) each backend crate calls from its `tests/conformance.rs`.
//!
//! A backend implements [`Harness`] (how to make independent clients in a namespace, what it
//! supports, its lease TTL) and [`Client`] (its handles, plus the fault hooks `kill` and
//! `revoke`), then hands a constructor to [`run`]:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn make_harness(_endpoint: Option<String>) -> sync_core::Result<Arc<dyn sync_conformance::Harness>> {
//! #     Err(sync_core::Error::new(sync_core::ErrorKind::Unsupported, "an example"))
//! # }
//! fn main() -> std::process::ExitCode {
//!     sync_conformance::run("etcd", Some("SYNC_TEST_ETCD"), make_harness)
//! }
//! ```
//!
//! Each case is a plain `pub async fn(&Ctx) -> Result<(), Failure>` in the module of its
//! primitive ([`lock`], [`leader`], [`task`], [`map`], [`cron`], [`time`]), so a backend can also
//! call one directly while debugging. Cases wait on events with bounded timeouts, never on fixed
//! sleeps, and their time bounds scale with [`Harness::ttl`].
#![deny(missing_docs)]

use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use sync_core::{Leader, Lock, Map, Task, Time};

pub mod cron;
pub mod leader;
pub mod lock;
pub mod map;
mod runner;
pub mod task;
pub mod time;

pub use runner::{Case, cases, run};

/// What a backend supports; a case needing something missing is reported unsupported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// [`Client::lock`].
    Lock,
    /// [`Client::leader`].
    Leader,
    /// [`Client::task`].
    Task,
    /// [`Client::map`].
    Map,
    /// [`Client::time`].
    Time,
    /// The Cron driver of `sync-core` over this backend's Leader, Task and Map.
    Cron,
    /// [`Client::kill`] simulates a dead process.
    KillClient,
    /// [`Client::revoke`] ends a lease/session on the server side.
    RevokeSession,
}

impl Capability {
    /// Every capability, for a backend that supports everything.
    pub const ALL: [Capability; 8] = [
        Capability::Lock,
        Capability::Leader,
        Capability::Task,
        Capability::Map,
        Capability::Time,
        Capability::Cron,
        Capability::KillClient,
        Capability::RevokeSession,
    ];
}

/// How a backend makes clients for the cases.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A new independent client (its own lease/session) whose keys live under `namespace`.
    async fn client(&self, namespace: &str) -> sync_core::Result<Box<dyn Client>>;

    /// What this backend supports.
    fn capabilities(&self) -> Vec<Capability>;

    /// The lease TTL clients are configured with; time bounds in cases scale with it.
    fn ttl(&self) -> Duration;
}

/// One participant: its own lease/session, its handles, and fault hooks.
#[async_trait]
pub trait Client: Send + Sync {
    /// The lock handle.
    fn lock(&self) -> sync_core::Result<Arc<dyn Lock>>;
    /// A leader handle bound to `group`.
    fn leader(&self, group: &str) -> sync_core::Result<Arc<dyn Leader>>;
    /// The task handle.
    fn task(&self) -> sync_core::Result<Arc<dyn Task>>;
    /// The map `name`.
    fn map(&self, name: &str) -> sync_core::Result<Arc<dyn Map>>;
    /// The time source.
    fn time(&self) -> sync_core::Result<Arc<dyn Time>>;
    /// Simulates the process dying: stops renewing, releases nothing.
    async fn kill(&self) -> sync_core::Result<()>;
    /// Revokes the client's lease/session on the server side.
    async fn revoke(&self) -> sync_core::Result<()>;
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

/// Extra time added to TTL-scaled bounds: scheduling, network round trips, a watch firing.
pub const SLACK: Duration = Duration::from_secs(2);

/// Per-case context: the harness, the case's own random namespace, and its time bounds.
pub struct Ctx {
    harness: Arc<dyn Harness>,
    namespace: String,
}

impl Ctx {
    /// A context in a fresh random namespace.
    pub fn new(harness: Arc<dyn Harness>) -> Self {
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
    pub fn client(&self) -> impl Future<Output = Result<Box<dyn Client>, Failure>> + Send + '_ {
        let at = std::panic::Location::caller();
        async move {
            self.harness
                .client(&self.namespace)
                .await
                .map_err(|e| Failure::located(format_args!("creating a client: {e}"), at))
        }
    }

    /// The backend's lease TTL.
    pub fn ttl(&self) -> Duration {
        self.harness.ttl()
    }

    /// How long something pushed (a release, a resignation, a revocation, a job) may take to
    /// be seen: [`SLACK`], independent of the TTL.
    pub fn prompt(&self) -> Duration {
        SLACK
    }

    /// How long after a holder dies its lease may take to expire: one TTL, plus another TTL
    /// (Consul may take up to twice the TTL to invalidate a session) or [`SLACK`], whichever is
    /// longer.
    pub fn expiry(&self) -> Duration {
        self.ttl() + self.ttl().max(SLACK)
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
