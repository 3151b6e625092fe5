//! The client: queries every server, combines the good replies, caches the result on the
//! monotonic clock and refreshes it in the background.

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sync_core::{Error, ErrorKind, Result, Time, TimeInterval};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    BACKEND, PRIMITIVE,
    combine::{Span, marzullo},
    config::{Config, normalize_server},
    query::{ReplyError, Sample, query},
    time::NtpTime,
};

/// After a sync in which every server failed, further on-demand syncs wait this long, so that
/// callers of an unreachable pool get their error at once instead of each querying again.
const RETRY_HOLDOFF: Duration = Duration::from_secs(1);

/// One server's good reply in a [`SyncReport`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServerSample {
    /// The server as configured (`host:port`).
    pub server: String,
    /// The address queried.
    pub address: SocketAddr,
    /// Server clock minus local clock, in seconds: ((T2−T1)+(T3−T4))/2.
    pub offset_secs: f64,
    /// The measured round trip: (T4−T1)−(T3−T2).
    pub round_trip: Duration,
    /// The server's root delay (from the reply).
    pub root_delay: Duration,
    /// The server's root dispersion (from the reply).
    pub root_dispersion: Duration,
    /// The error this reply states: round trip / 2 + root delay / 2 + root dispersion.
    pub error: Duration,
    /// The server's stratum.
    pub stratum: u8,
    /// The server's reference id (a 4-letter code for stratum 1, else its source's address).
    pub reference_id: String,
}

/// One server's failure in a [`SyncReport`] or [`SyncError`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerFailure {
    /// The server as configured (`host:port`).
    pub server: String,
    /// Why its reply was not used.
    pub error: ReplyError,
}

impl fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.server, self.error)
    }
}

/// What one successful sync found.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SyncReport {
    /// The replies that were combined (falsetickers are in `failures`).
    pub samples: Vec<ServerSample>,
    /// The servers whose replies were not used, and why.
    pub failures: Vec<ServerFailure>,
    /// The combined interval as of the sync.
    pub interval: TimeInterval,
    /// Half the combined interval's width as of the sync.
    pub error: Duration,
}

/// Every server failed (or they disagreed); the source of the Unavailable error calls return.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncError {
    /// Each server's failure.
    pub failures: Vec<ServerFailure>,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no usable reply from {} server(s)", self.failures.len())?;
        for (i, failure) in self.failures.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{failure}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SyncError {}

#[derive(Default)]
struct State {
    /// The combined span of the last good sync.
    span: Option<Span>,
    report: Option<SyncReport>,
    /// The last sync's failure and when it happened, while no later sync succeeded.
    failure: Option<(Instant, SyncError)>,
}

pub(crate) struct Inner {
    config: Config,
    servers: Vec<String>,
    /// The servers joined with commas: the id in errors and spans.
    pub(crate) id: String,
    state: Mutex<State>,
    /// Single flight: one sync at a time; callers that waited reuse its result.
    syncing: tokio::sync::Mutex<()>,
    queries: AtomicU64,
    refresh: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.refresh.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// A handle on synchronized time from one or more NTP servers. Cheap to clone; the background
/// refresh stops when the last clone (and every [`time`](Client::time) handle) is dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::{sync::Arc, time::SystemTime};
/// use sync_core::Time;
///
/// let client = sync_ntp::Client::connect(sync_ntp::Config::from_url("ntp://127.0.0.1:11123")?).await?;
/// let time: Arc<dyn Time> = client.time();
/// let now = time.now_interval().await?; // syncs on demand, then no network until the refresh
/// assert!(now.earliest() <= now.latest());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.servers)
            .field("queries", &self.queries())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Validates `config` and starts the background refresh (every `config.interval`). Does not
    /// query yet: the first call that needs time syncs on demand. Needs a tokio runtime.
    pub async fn connect(config: Config) -> Result<Client> {
        let span = tracing::info_span!(
            "ntp.connect",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %config.servers.join(",")
        );
        async move {
            config.validate()?;
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    "sync-ntp needs a tokio runtime for its background refresh",
                )
                .with_backend(BACKEND)
                .with_source(e)
            })?;
            let servers = config
                .servers
                .iter()
                .map(|s| normalize_server(s))
                .collect::<Result<Vec<_>>>()?;
            let inner = Arc::new(Inner {
                config,
                id: servers.join(","),
                servers,
                state: Mutex::new(State::default()),
                syncing: tokio::sync::Mutex::new(()),
                queries: AtomicU64::new(0),
                refresh: Mutex::new(None),
            });
            let task = runtime.spawn(refresh(Arc::downgrade(&inner), inner.config.interval));
            *lock(&inner.refresh) = Some(task);
            Ok(Client { inner })
        }
        .instrument(span)
        .await
    }

    /// Parses `url` ([`Config::from_url`]) and connects.
    pub async fn from_url(url: &str) -> Result<Client> {
        Client::connect(Config::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The Time handle.
    pub fn time(&self) -> Arc<dyn Time> {
        Arc::new(NtpTime::new(self.inner.clone()))
    }

    /// Syncs now with every server (regardless of the cache) and reports what was found.
    /// Unavailable, with a [`SyncError`] as source, if no usable majority answered.
    pub async fn sync(&self) -> Result<SyncReport> {
        let span = tracing::info_span!(
            "ntp.sync",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %self.inner.id
        );
        async {
            let _one = self.inner.syncing.lock().await;
            self.inner.sync_now().await
        }
        .instrument(span)
        .await
    }

    /// What the last successful sync found, if any.
    pub fn last_sync(&self) -> Option<SyncReport> {
        lock(&self.inner.state).report.clone()
    }

    /// How many requests this client has sent to servers so far.
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn refresh(inner: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let span = tracing::debug_span!(
            "ntp.refresh",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %inner.id
        );
        async {
            let _one = inner.syncing.lock().await;
            if let Err(e) = inner.sync_now().await {
                tracing::warn!(error = %e, "background NTP refresh failed; the interval keeps widening");
            }
        }
        .instrument(span)
        .await;
    }
}

fn to_system_time(ns: i128) -> Result<SystemTime> {
    let out = || {
        Error::new(
            ErrorKind::Backend,
            format!("synchronized time {ns} ns from the Unix epoch is out of range"),
        )
        .with_backend(BACKEND)
    };
    let abs = u64::try_from(ns.unsigned_abs()).map_err(|_| out())?;
    let d = Duration::from_nanos(abs);
    if ns >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    }
    .ok_or_else(out)
}

fn interval_of(span: &Span) -> Result<TimeInterval> {
    TimeInterval::new(to_system_time(span.lo)?, to_system_time(span.hi)?)
}

impl Inner {
    fn unavailable(&self, message: String, source: Option<SyncError>) -> Error {
        let e = Error::new(ErrorKind::Unavailable, message)
            .with_backend(BACKEND)
            .with_id(self.id.clone());
        match source {
            Some(s) => e.with_source(s),
            None => e,
        }
    }

    /// The cached span carried to `now`, if its error is still acceptable.
    fn current(&self, now: Instant) -> Option<Span> {
        let span = lock(&self.state).span?.at(now, self.config.drift_ppm);
        (span.half_width() <= self.config.max_error).then_some(span)
    }

    /// The interval now: from the cache, or after an on-demand sync.
    pub(crate) async fn interval(&self) -> Result<TimeInterval> {
        if let Some(span) = self.current(Instant::now()) {
            return interval_of(&span);
        }
        let _one = self.syncing.lock().await;
        // Another caller may have synced while this one waited.
        if let Some(span) = self.current(Instant::now()) {
            return interval_of(&span);
        }
        let recent_failure = lock(&self.state)
            .failure
            .as_ref()
            .filter(|(at, _)| at.elapsed() < RETRY_HOLDOFF)
            .map(|(_, e)| e.clone());
        if let Some(e) = recent_failure {
            return Err(self.stale_error(e));
        }
        match self.sync_now().await {
            Ok(_) => match self.current(Instant::now()) {
                Some(span) => interval_of(&span),
                None => Err(self.unavailable(
                    format!(
                        "the synchronized error exceeds the maximum acceptable error {:?}",
                        self.config.max_error
                    ),
                    None,
                )),
            },
            Err(e) => Err(e),
        }
    }

    fn stale_error(&self, e: SyncError) -> Error {
        let had_sync = lock(&self.state).span.is_some();
        let why = if had_sync {
            format!(
                "the error since the last good sync exceeds the maximum acceptable error {:?}, \
                 and the last sync failed: {e}",
                self.config.max_error
            )
        } else {
            format!("not synchronized: {e}")
        };
        self.unavailable(why, Some(e))
    }

    /// Queries every server and installs the combined result. The caller holds `syncing`.
    async fn sync_now(&self) -> Result<SyncReport> {
        let timeout = self.config.timeout;
        let max_error = self.config.max_error;
        let queries = &self.queries;
        let outcomes = futures::future::join_all(self.servers.iter().map(|server| async move {
            let addr = match tokio::net::lookup_host(server.as_str()).await {
                Ok(mut addrs) => addrs.next(),
                Err(e) => {
                    return (
                        server,
                        Err(ReplyError::Unreachable {
                            reason: format!("could not resolve: {e}"),
                        }),
                    );
                }
            };
            let Some(addr) = addr else {
                return (
                    server,
                    Err(ReplyError::Unreachable {
                        reason: "the name resolved to no address".into(),
                    }),
                );
            };
            let result = query(addr, timeout, max_error, queries)
                .await
                .map(|s| (addr, s));
            (server, result)
        }))
        .await;

        let mut good: Vec<(&String, SocketAddr, Sample)> = Vec::new();
        let mut failures = Vec::new();
        for (server, outcome) in outcomes {
            match outcome {
                Ok((addr, sample)) => good.push((server, addr, sample)),
                Err(error) => {
                    tracing::warn!(server = %server, %error, "NTP reply rejected");
                    failures.push(ServerFailure {
                        server: server.clone(),
                        error,
                    });
                }
            }
        }
        let spans: Vec<Span> = good.iter().map(|(_, _, s)| s.span).collect();
        let combined = marzullo(&spans, self.config.drift_ppm);
        let Some(combined) = combined else {
            for (server, _, _) in &good {
                failures.push(ServerFailure {
                    server: (*server).clone(),
                    error: ReplyError::Falseticker,
                });
            }
            let e = SyncError { failures };
            lock(&self.state).failure = Some((Instant::now(), e.clone()));
            return Err(self.unavailable(e.to_string(), Some(e)));
        };
        let mut samples = Vec::new();
        for ((server, addr, s), agrees) in good.into_iter().zip(&combined.agree) {
            if !agrees {
                tracing::warn!(server = %server, "NTP server is a falseticker; ignored");
                failures.push(ServerFailure {
                    server: server.clone(),
                    error: ReplyError::Falseticker,
                });
                continue;
            }
            samples.push(ServerSample {
                server: server.clone(),
                address: addr,
                offset_secs: s.offset,
                round_trip: s.round_trip,
                root_delay: s.root_delay,
                root_dispersion: s.root_dispersion,
                error: s.span.half_width(),
                stratum: s.stratum,
                reference_id: s.reference_id,
            });
        }
        let report = SyncReport {
            samples,
            failures,
            interval: interval_of(&combined.span)?,
            error: combined.span.half_width(),
        };
        tracing::debug!(
            error = ?report.error,
            servers = report.samples.len(),
            rejected = report.failures.len(),
            "NTP sync"
        );
        let mut state = lock(&self.state);
        state.span = Some(combined.span);
        state.report = Some(report.clone());
        state.failure = None;
        Ok(report)
    }
}
