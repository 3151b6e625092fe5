//! The client: resolves every server name to its addresses and queries each address, combines
//! the good replies, caches the result on the carry clock and refreshes it in the background.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use sync_core::{Backend, Capabilities, Capability, Error, ErrorKind, Result, Time, TimeInterval};
use sync_kit::locked;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    BACKEND, PRIMITIVE,
    clock::{self, Tick},
    combine::{Span, select},
    config::{Config, MAX_ADDRESSES_PER_SERVER, normalize_server},
    leap::{self, Leap, PendingLeap},
    query::{ReplyError, Sample, query},
    time::NtpTime,
};

/// After a sync in which every server failed, further on-demand syncs wait this long, so that
/// callers of an unreachable pool get their error at once instead of each querying again.
const RETRY_HOLDOFF: Duration = Duration::from_secs(1);

/// The most addresses whose kiss-of-death is remembered (a pool's names rotate through many);
/// beyond it the longest-remembered are forgotten first.
const MAX_KISSED: usize = 256;

/// How a server that sent a kiss-of-death is treated (RFC 4330 §8, RFC 5905 §7.4): after DENY
/// or RSTR it is never queried again; after RATE it is left alone for a back-off that doubles
/// with each RATE kiss (from the sync interval up to NTP's longest poll).
#[derive(Debug, Clone)]
struct Kissed {
    code: String,
    /// Not queried before this instant; `None`: never again.
    until: Option<Instant>,
    backoff: Duration,
    /// When this kiss was received.
    since: Instant,
}

/// One good reply in a [`SyncReport`]: one address of a configured server.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServerSample {
    /// The server as configured (`host:port`).
    pub server: String,
    /// The address queried (one of those the server's name resolved to).
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
    /// The reply's leap indicator: 0, or 1 / 2 for a second inserted / deleted at the end of
    /// the UTC day (3, unsynchronized, is rejected).
    pub leap_indicator: u8,
}

/// One failure in a [`SyncReport`] or [`SyncError`]: a server whose name did not resolve, or
/// one of its addresses whose reply was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerFailure {
    /// The server as configured (`host:port`).
    pub server: String,
    /// The address queried; `None` when the name did not resolve.
    pub address: Option<SocketAddr>,
    /// Why its reply was not used.
    pub error: ReplyError,
}

impl fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            Some(address) if address.to_string() != self.server => {
                write!(f, "{} ({address}): {}", self.server, self.error)
            }
            _ => write!(f, "{}: {}", self.server, self.error),
        }
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
    /// The leap second the agreeing replies announced, if any: across it the interval is
    /// widened by the second (see the crate docs).
    pub leap: Option<PendingLeap>,
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

/// Why the last sync left no usable interval.
#[derive(Debug, Clone)]
enum Failure {
    /// No usable majority answered.
    Servers(SyncError),
    /// The servers answered, but the combined error already exceeds the maximum acceptable
    /// error (a root distance just under it, widened by rounding and drift).
    TooWide(Duration),
}

struct State {
    /// The combined span of the last good sync.
    span: Option<Span>,
    /// The leap second its replies announced.
    leap: Option<Leap>,
    /// The carry clock and the wall clock read together as the sync that gave `span` began
    /// (wall first): time the carry clock missed since (a suspend) shows as the wall clock
    /// running ahead of it.
    clocks: Option<(Tick, SystemTime)>,
    report: Option<SyncReport>,
    /// The last sync's failure and when it happened, while no later sync succeeded.
    failure: Option<(Instant, Failure)>,
    /// Per address, the kiss-of-death it last sent, while it applies (and, for RATE, the
    /// back-off to double at the next).
    kissed: HashMap<SocketAddr, Kissed>,
}

pub(crate) struct Inner {
    config: Config,
    /// The drift allowance in force: the configured oscillator tolerance plus what the host may
    /// slew the carry clock ([`clock::SLEW_PPM`], zero where it is not slewed).
    ppm: f64,
    /// The carry clock ([`Tick::now`]; a test may shift it).
    clock: fn() -> Tick,
    /// The resolver ([`lookup`]; a test may give a name several addresses).
    resolver: Resolver,
    servers: Vec<String>,
    /// The servers joined with commas: the id in errors and spans.
    pub(crate) id: String,
    state: Mutex<State>,
    /// Single flight: one sync at a time; callers that waited reuse its result.
    syncing: tokio::sync::Mutex<()>,
    queries: AtomicU64,
    refresh: Mutex<Option<JoinHandle<()>>>,
    /// Set by [`Backend::close`]: later calls fail with Closed.
    closed: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.refresh.get_mut().ok().and_then(Option::take) {
            task.abort();
        }
    }
}

/// A handle on synchronized time from one or more NTP servers. Cheap to clone; the background
/// refresh stops when the last clone (and every [`time`](Backend::time) handle) is dropped.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::{sync::Arc, time::SystemTime};
/// use sync_core::{Backend, Time};
///
/// let client = sync_ntp::Client::connect(sync_ntp::Config::from_url("ntp://127.0.0.1:11123")?).await?;
/// let time: Arc<dyn Time> = client.time()?;
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
    /// query yet: the first call that needs time syncs on demand. Needs a tokio runtime, and
    /// the carry clock (Unsupported if the kernel will not give `CLOCK_MONOTONIC_RAW`).
    pub async fn connect(config: Config) -> Result<Client> {
        Client::connect_with(config, Tick::now, lookup).await
    }

    /// [`Client::connect`] carrying time on `clock` and resolving names with `resolver`.
    async fn connect_with(
        config: Config,
        clock: fn() -> Tick,
        resolver: Resolver,
    ) -> Result<Client> {
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
            clock::probe().map_err(|e| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "sync-ntp carries time on {}, which cannot be read here",
                        clock::NAME
                    ),
                )
                .with_backend(BACKEND)
                .with_source(e)
            })?;
            let servers = config
                .servers
                .iter()
                .map(|s| normalize_server(s))
                .collect::<Result<Vec<_>>>()?;
            let state = State {
                span: None,
                leap: None,
                clocks: None,
                report: None,
                failure: None,
                kissed: HashMap::new(),
            };
            let inner = Arc::new(Inner {
                ppm: config.drift_ppm + clock::SLEW_PPM,
                clock,
                resolver,
                config,
                id: servers.join(","),
                servers,
                state: Mutex::new(state),
                syncing: tokio::sync::Mutex::new(()),
                queries: AtomicU64::new(0),
                refresh: Mutex::new(None),
                closed: AtomicBool::new(false),
            });
            let task = runtime.spawn(refresh(Arc::downgrade(&inner), inner.config.interval));
            *locked(&inner.refresh) = Some(task);
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

    /// Syncs now with every server's addresses (regardless of the cache) and reports what was
    /// found.
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
        locked(&self.inner.state).report.clone()
    }

    /// How many requests this client has sent to servers so far.
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }
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

pub(crate) fn interval_of(span: &Span) -> Result<TimeInterval> {
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

    /// The cached span carried to `now`, whatever its error.
    fn carried(&self, now: Tick) -> Option<Span> {
        let (span, leap, clocks) = {
            let state = locked(&self.state);
            (state.span?, state.leap, state.clocks)
        };
        // The wall clock is read after `now` (so that the gap below is never understated).
        let wall = SystemTime::now();
        Some(carry(&span, leap.as_ref(), self.ppm, clocks, now, wall))
    }

    /// The cached span carried to `now`, if its error is still acceptable.
    fn current(&self, now: Tick) -> Option<Span> {
        self.carried(now)
            .filter(|span| span.half_width() <= self.config.max_error)
    }

    /// The interval now: from the cache, or after an on-demand sync.
    pub(crate) async fn interval(&self) -> Result<TimeInterval> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Closed, "client is closed")
                .with_backend(BACKEND)
                .with_id(self.id.clone()));
        }
        if let Some(span) = self.current((self.clock)()) {
            return interval_of(&span);
        }
        let _one = self.syncing.lock().await;
        // Another caller may have synced while this one waited.
        if let Some(span) = self.current((self.clock)()) {
            return interval_of(&span);
        }
        let recent_failure = locked(&self.state)
            .failure
            .as_ref()
            .filter(|(at, _)| at.elapsed() < RETRY_HOLDOFF)
            .map(|(_, e)| e.clone());
        match recent_failure {
            Some(Failure::Servers(e)) => return Err(self.stale_error(e)),
            Some(Failure::TooWide(error)) => return Err(self.too_wide(error)),
            None => {}
        }
        self.sync_now().await?;
        let error = match self.carried((self.clock)()) {
            Some(span) if span.half_width() <= self.config.max_error => return interval_of(&span),
            span => span.map_or(Duration::MAX, |s| s.half_width()),
        };
        // Hold further on-demand syncs off, as after a failed one: otherwise every call would
        // query the servers again.
        locked(&self.state).failure = Some((Instant::now(), Failure::TooWide(error)));
        Err(self.too_wide(error))
    }

    fn too_wide(&self, error: Duration) -> Error {
        self.unavailable(
            format!(
                "the synchronized error {error:?} exceeds the maximum acceptable error {:?}",
                self.config.max_error
            ),
            None,
        )
    }

    fn stale_error(&self, e: SyncError) -> Error {
        let had_sync = locked(&self.state).span.is_some();
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

    /// Resolves every server, queries each of their addresses and installs the combined
    /// result. The caller holds `syncing`.
    async fn sync_now(&self) -> Result<SyncReport> {
        let max_error = self.config.max_error;
        // The local clocks as the sync begins (wall first): a suspend from here on, even one
        // during the exchange, shows in `carry` as the wall clock running ahead.
        let clocks_wall = SystemTime::now();
        let clocks_tick = (self.clock)();
        let start = Instant::now();
        let resolved =
            futures::future::join_all(self.servers.iter().map(|s| self.resolve(s))).await;
        let (sources, mut failures) = expand(&self.servers, resolved);
        let kissed = locked(&self.state).kissed.clone();
        let outcomes = futures::future::join_all(
            sources
                .iter()
                .map(|source| self.query_source(source, kissed.get(&source.address), start)),
        )
        .await;
        self.note_kisses(&sources, &outcomes);

        let mut good: Vec<(&Source, Sample)> = Vec::new();
        for (source, outcome) in sources.iter().zip(outcomes) {
            match outcome {
                Ok(sample) => good.push((source, sample)),
                Err(error) => {
                    let (server, address) = (source.server, source.address);
                    tracing::warn!(%server, %address, %error, "NTP reply rejected");
                    failures.push(source.failure(error));
                }
            }
        }
        let spans: Vec<Span> = good.iter().map(|(_, s)| s.span).collect();
        let Some(combined) = select(&spans, self.ppm) else {
            for (source, _) in &good {
                failures.push(source.failure(ReplyError::Falseticker));
            }
            let e = SyncError { failures };
            locked(&self.state).failure = Some((Instant::now(), Failure::Servers(e.clone())));
            return Err(self.unavailable(e.to_string(), Some(e)));
        };
        let mut samples = Vec::new();
        for ((source, s), agrees) in good.into_iter().zip(&combined.agree) {
            if !agrees {
                let (server, address) = (source.server, source.address);
                tracing::warn!(%server, %address, "NTP server is a falseticker; ignored");
                failures.push(source.failure(ReplyError::Falseticker));
                continue;
            }
            samples.push(ServerSample {
                server: source.server.to_string(),
                address: source.address,
                offset_secs: s.offset,
                round_trip: s.round_trip,
                root_delay: s.root_delay,
                root_dispersion: s.root_dispersion,
                error: s.span.half_width(),
                stratum: s.stratum,
                reference_id: s.reference_id,
                leap_indicator: s.leap,
            });
        }
        let leap = leap::pending(&combined.span, samples.iter().map(|s| s.leap_indicator));
        let as_of_sync = leap.map_or(combined.span, |l| l.apply(combined.span));
        let report = SyncReport {
            samples,
            failures,
            interval: interval_of(&as_of_sync)?,
            error: as_of_sync.half_width(),
            leap: leap.and_then(|l| l.public()),
        };
        if let Some(leap) = &report.leap {
            tracing::info!(?leap, "NTP servers announce a leap second");
        }
        tracing::debug!(
            error = ?report.error,
            servers = report.samples.len(),
            rejected = report.failures.len(),
            "NTP sync"
        );
        let clocks = Some((clocks_tick, clocks_wall));
        let now = (self.clock)();
        let error = carry(
            &combined.span,
            leap.as_ref(),
            self.ppm,
            clocks,
            now,
            SystemTime::now(),
        )
        .half_width();
        let mut state = locked(&self.state);
        state.span = Some(combined.span);
        state.leap = leap;
        state.clocks = clocks;
        state.report = Some(report.clone());
        state.failure = (error > max_error).then_some((Instant::now(), Failure::TooWide(error)));
        Ok(report)
    }

    /// The addresses `server` resolves to, within the timeout: the resolver (a blocking
    /// getaddrinfo) must not hold the sync, and every caller waiting on it, any longer.
    async fn resolve(&self, server: &str) -> std::result::Result<Vec<SocketAddr>, ReplyError> {
        let timeout = self.config.timeout;
        let unreachable = |reason: String| Err(ReplyError::Unreachable { reason });
        match tokio::time::timeout(timeout, (self.resolver)(server.to_string())).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => unreachable(format!("could not resolve: {e}")),
            Err(_) => unreachable(format!("could not resolve within {timeout:?}")),
        }
    }

    /// One address's part of a sync: skipped while a kiss-of-death applies, else queried.
    async fn query_source(
        &self,
        source: &Source<'_>,
        kissed: Option<&Kissed>,
        start: Instant,
    ) -> std::result::Result<Sample, ReplyError> {
        if let Some(k) = kissed.filter(|k| k.until.is_none_or(|until| start < until)) {
            let (server, address, code) = (source.server, source.address, &k.code);
            tracing::debug!(%server, %address, %code, "not queried: it sent a kiss-of-death");
            return Err(ReplyError::KissOfDeath {
                code: k.code.clone(),
            });
        }
        query(
            source.address,
            self.config.timeout,
            self.config.max_error,
            self.ppm,
            self.clock,
            &self.queries,
        )
        .await
    }

    /// Remembers the kisses-of-death of this sync, and forgets those of addresses that
    /// answered.
    fn note_kisses<T>(
        &self,
        sources: &[Source<'_>],
        outcomes: &[std::result::Result<T, ReplyError>],
    ) {
        let now = Instant::now();
        let mut state = locked(&self.state);
        for (source, outcome) in sources.iter().zip(outcomes) {
            let address = source.address;
            match outcome {
                Err(ReplyError::KissOfDeath { code }) => {
                    let until_set = state
                        .kissed
                        .get(&address)
                        .is_some_and(|k| k.until.is_none_or(|u| now < u));
                    if until_set {
                        // Skipped this time: the remembered kiss still applies.
                        continue;
                    }
                    let previous = state.kissed.remove(&address);
                    if let Some(k) = kiss(previous, code, now, self.config.interval) {
                        tracing::warn!(
                            server = %source.server,
                            %address,
                            code = %k.code,
                            until = ?k.until.map(|u| u - now),
                            "NTP server sent a kiss-of-death; not querying it for now"
                        );
                        state.kissed.insert(address, k);
                    }
                }
                Ok(_) => {
                    state.kissed.remove(&address);
                }
                Err(_) => {}
            }
        }
        while state.kissed.len() > MAX_KISSED {
            let oldest = state.kissed.iter().min_by_key(|(_, k)| k.since);
            let Some(oldest) = oldest.map(|(a, _)| *a) else {
                break;
            };
            state.kissed.remove(&oldest);
        }
    }
}

/// How many of a name's resolved addresses are looked at: more than enough to find
/// [`MAX_ADDRESSES_PER_SERVER`] not already given by another name.
const MAX_RESOLVED: usize = 64;

/// Resolves `host:port` to its addresses.
type Resolver = fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;

/// The system resolver (getaddrinfo, on tokio's blocking pool).
fn lookup(server: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
    Box::pin(async move {
        let addrs = tokio::net::lookup_host(server).await?;
        Ok(addrs.take(MAX_RESOLVED).collect())
    })
}

/// One address to query: a source, with one vote in the combination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source<'a> {
    /// The server as configured, whose name gave the address.
    server: &'a str,
    address: SocketAddr,
}

impl Source<'_> {
    fn failure(&self, error: ReplyError) -> ServerFailure {
        ServerFailure {
            server: self.server.to_string(),
            address: Some(self.address),
            error,
        }
    }
}

/// The sources of a sync, from each server's resolution (`resolved`, in the order of
/// `servers`): up to [`MAX_ADDRESSES_PER_SERVER`] addresses per name, so that one name (a pool)
/// can give a majority, each address once however many names give it (the first name owns it:
/// an address votes once). A name that did not resolve, or resolved to no address, is a
/// failure; one whose addresses all belong to earlier names gives no source.
fn expand(
    servers: &[String],
    resolved: Vec<std::result::Result<Vec<SocketAddr>, ReplyError>>,
) -> (Vec<Source<'_>>, Vec<ServerFailure>) {
    let mut sources: Vec<Source<'_>> = Vec::new();
    let mut failures = Vec::new();
    for (server, addresses) in servers.iter().zip(resolved) {
        let addresses = match addresses {
            Ok(a) if a.is_empty() => Err(ReplyError::Unreachable {
                reason: "the name resolved to no address".into(),
            }),
            other => other,
        };
        match addresses {
            Ok(addresses) => {
                let mut taken = 0;
                for address in addresses {
                    if taken == MAX_ADDRESSES_PER_SERVER {
                        break;
                    }
                    if sources.iter().any(|s| s.address == address) {
                        tracing::debug!(%server, %address, "already queried for another name");
                        continue;
                    }
                    sources.push(Source { server, address });
                    taken += 1;
                }
            }
            Err(error) => failures.push(ServerFailure {
                server: server.clone(),
                address: None,
                error,
            }),
        }
    }
    (sources, failures)
}

/// The state after a kiss-of-death `code` at `now`: DENY and RSTR forever, RATE for a doubling
/// back-off, any other code for this sync only.
fn kiss(previous: Option<Kissed>, code: &str, now: Instant, interval: Duration) -> Option<Kissed> {
    match code {
        "DENY" | "RSTR" => Some(Kissed {
            code: code.to_string(),
            until: None,
            backoff: Duration::ZERO,
            since: now,
        }),
        "RATE" => {
            let backoff = previous
                .map_or(interval, |k| k.backoff.saturating_mul(2))
                .clamp(interval, crate::config::MAX_INTERVAL);
            Some(Kissed {
                code: code.to_string(),
                until: Some(now + backoff),
                backoff,
                since: now,
            })
        }
        _ => None,
    }
}

/// Up to this much more than the drift allowance, the wall clock running ahead of the carry
/// clock is the time between reading the two, not a suspend.
const MISSED_TIME_FLOOR: Duration = Duration::from_millis(1);

/// `span` carried to the carry-clock tick `now` with the drift allowance, its upper end moved by
/// however much more the wall clock advanced than the carry clock since `clocks` (carry, wall)
/// were read when that exceeds the allowance (which covers the carry clock's own rate error) by
/// [`MISSED_TIME_FLOOR`] — the carry clock stops while the machine is suspended, true time does
/// not — and widened across a pending `leap` second. (A wall clock stepped or slewed forward
/// only widens the interval, to be safe; once that exceeds the maximum error the next call syncs
/// again.)
fn carry(
    span: &Span,
    leap: Option<&Leap>,
    ppm: f64,
    clocks: Option<(Tick, SystemTime)>,
    now: Tick,
    wall: SystemTime,
) -> Span {
    let mut carried = span.at(now, ppm);
    if let Some((tick_at, wall_at)) = clocks {
        let elapsed = now.saturating_duration_since(tick_at);
        let walled = match wall.duration_since(wall_at) {
            Ok(d) => d.as_nanos() as i128,
            Err(_) => 0,
        };
        let missed = walled - elapsed.as_nanos() as i128;
        let allowed = crate::combine::drift_ns(elapsed, ppm) + MISSED_TIME_FLOOR.as_nanos() as i128;
        if missed > allowed {
            carried.hi += missed;
        }
    }
    match leap {
        Some(leap) => leap.apply(carried),
        None => carried,
    }
}

#[async_trait]
impl Backend for Client {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::none().with(Capability::Time)
    }

    /// NTP has no lease.
    fn ttl(&self) -> Option<Duration> {
        None
    }

    /// The cached, drift-widened interval of the last sync (see the crate docs).
    fn time(&self) -> Result<Arc<dyn Time>> {
        let raw = Arc::new(NtpTime::new(self.inner.clone()));
        Ok(sync_kit::checked::time(BACKEND, raw))
    }

    /// Stops the background refresh; later calls fail with Closed.
    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::SeqCst);
        if let Some(task) = locked(&self.inner.refresh).take() {
            task.abort();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use tokio::net::UdpSocket;

    use super::*;
    use crate::query::tests::to_ntp;

    /// A server on loopback answering every request as a stratum-2 server `ahead` of our wall
    /// clock, with a 10 ms root dispersion; it counts the requests.
    async fn responder(ahead: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let queries = Arc::new(AtomicU64::new(0));
        let counted = queries.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut p = [0u8; 48];
                p[0] = 4 << 3 | 4;
                p[1] = 2;
                p[8..12].copy_from_slice(&655u32.to_be_bytes());
                if n >= 48 {
                    p[24..32].copy_from_slice(&buf[40..48]);
                }
                let now = to_ntp(SystemTime::now() + ahead);
                p[32..40].copy_from_slice(&now.to_be_bytes());
                p[40..48].copy_from_slice(&now.to_be_bytes());
                let _ = socket.send_to(&p, from).await;
            }
        });
        (addr, queries)
    }

    fn ns(t: SystemTime) -> i128 {
        t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i128
    }

    /// How far the shifted carry clock is ahead of the real one, in ns.
    static SHIFT: AtomicU64 = AtomicU64::new(0);

    fn shifted() -> Tick {
        Tick::now().plus(Duration::from_nanos(SHIFT.load(Ordering::SeqCst)))
    }

    /// The interval is carried on the carry clock, with the oscillator tolerance as the
    /// allowance: carry-clock time (here shifted by 100 s, which neither `Instant` nor the wall
    /// clock sees) moves it by exactly that, less or more the default 200 ppm (plus, where the
    /// carry clock may be slewed, the slew) on each side. Past the maximum error, the next call
    /// syncs again.
    #[tokio::test]
    async fn the_interval_is_carried_on_the_carry_clock_with_the_oscillator_tolerance() {
        let (addr, queries) = responder(Duration::ZERO).await;
        let config = Config::new([addr.to_string()])
            .with_timeout(Duration::from_millis(300))
            .with_max_error(crate::config::MAX_MAX_ERROR);
        assert_eq!(config.drift_ppm, crate::config::DEFAULT_DRIFT_PPM);
        let client = Client::connect_with(config, shifted, lookup).await.unwrap();
        let ppm = client.inner.ppm;
        assert_eq!(ppm, 200.0 + clock::SLEW_PPM);
        let time = client.time().unwrap();
        let started = Instant::now();
        let first = time.now_interval().await.unwrap();
        let shift = Duration::from_secs(100);
        SHIFT.store(shift.as_nanos() as u64, Ordering::SeqCst);
        let carried = time.now_interval().await.unwrap();
        // Real time between the two readings of the carry clock: at most this.
        let real = started.elapsed().as_nanos() as i128;
        assert_eq!(queries.load(Ordering::SeqCst), 1);

        // 20 ms on Linux: 200 ppm of 100 s.
        let drift = (shift.as_nanos() as f64 * ppm / 1e6) as i128;
        let moved = ns(carried.earliest()) - ns(first.earliest());
        let expected = shift.as_nanos() as i128 - drift;
        assert!(
            (expected - 2..=expected + real).contains(&moved),
            "moved {moved} ns, expected {expected} (+ up to {real} of real time)"
        );
        let grown = ns(carried.latest())
            - ns(carried.earliest())
            - (ns(first.latest()) - ns(first.earliest()));
        let real_drift = (real as f64 * 2.0 * ppm / 1e6) as i128;
        assert!(
            (2 * drift - 2..=2 * drift + real_drift + 2).contains(&grown),
            "grew {grown} ns, expected {} (+ up to {real_drift} over the real time)",
            2 * drift
        );

        // 200 ppm of 1 000 000 s is 200 s, over the 60 s maximum error: the next call syncs
        // again and the interval is narrow once more.
        SHIFT.store(1_000_000_000_000_000, Ordering::SeqCst);
        let resynced = time.now_interval().await.unwrap();
        assert_eq!(queries.load(Ordering::SeqCst), 2);
        assert!(
            resynced.width() < Duration::from_millis(100),
            "{resynced:?}"
        );
    }

    /// The addresses the fake pool name resolves to.
    static POOL: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

    fn pool(name: String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        assert_eq!(name, "pool.test:123");
        let addrs = POOL.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }

    /// One name resolving to five addresses: the first four are queried, each a source with its
    /// own vote, so the name alone outvotes its liar; the fifth is not queried.
    #[tokio::test]
    async fn one_name_gives_a_source_per_address_up_to_the_bound() {
        let mut servers = Vec::new();
        for ahead in [0, 0, 60, 0, 0] {
            servers.push(responder(Duration::from_secs(ahead)).await);
        }
        *POOL.lock().unwrap() = servers.iter().map(|(a, _)| *a).collect();
        let config = Config::new(["pool.test"]).with_timeout(Duration::from_millis(300));
        let client = Client::connect_with(config, Tick::now, pool).await.unwrap();
        let before = SystemTime::now();
        let report = client.sync().await.unwrap();
        let after = SystemTime::now();
        let used: Vec<_> = report.samples.iter().map(|s| s.address).collect();
        assert_eq!(
            used,
            [servers[0].0, servers[1].0, servers[3].0],
            "{report:?}"
        );
        assert!(report.samples.iter().all(|s| s.server == "pool.test:123"));
        assert_eq!(
            report.failures,
            [ServerFailure {
                server: "pool.test:123".into(),
                address: Some(servers[2].0),
                error: ReplyError::Falseticker,
            }]
        );
        assert!(
            report.failures[0]
                .to_string()
                .starts_with(&format!("pool.test:123 ({}): falseticker", servers[2].0)),
            "{}",
            report.failures[0]
        );
        let queried: Vec<_> = servers
            .iter()
            .map(|(_, q)| q.load(Ordering::SeqCst))
            .collect();
        assert_eq!(queried, [1, 1, 1, 1, 0]);
        assert_eq!(client.queries(), 4);
        assert!(report.interval.earliest() <= after && report.interval.latest() >= before);
    }

    #[test]
    fn expansion_is_bounded_per_name_and_gives_each_address_once() {
        let a = |last: u8| SocketAddr::from(([192, 0, 2, last], 123));
        let servers: Vec<String> = ["a:123", "b:123", "c:123", "d:123", "e:123"]
            .map(String::from)
            .into();
        let unreachable = ReplyError::Unreachable {
            reason: "could not resolve: no such host".into(),
        };
        let resolved = vec![
            // A repeat within the name, then more than the bound.
            Ok(vec![a(1), a(1), a(2), a(3), a(4), a(5), a(6)]),
            // One address a's name already gave: only the new one counts.
            Ok(vec![a(2), a(7)]),
            Err(unreachable.clone()),
            Ok(vec![]),
            // Only addresses already given: no source, and no failure either.
            Ok(vec![a(7), a(1)]),
        ];
        let (sources, failures) = expand(&servers, resolved);
        let got: Vec<_> = sources.iter().map(|s| (s.server, s.address)).collect();
        assert_eq!(
            got,
            [
                ("a:123", a(1)),
                ("a:123", a(2)),
                ("a:123", a(3)),
                ("a:123", a(4)),
                ("b:123", a(7)),
            ]
        );
        assert_eq!(MAX_ADDRESSES_PER_SERVER, 4);
        let failed: Vec<_> = failures
            .iter()
            .map(|f| (f.server.as_str(), f.address, f.error.to_string()))
            .collect();
        assert_eq!(
            failed,
            [
                ("c:123", None, unreachable.to_string()),
                (
                    "d:123",
                    None,
                    "unreachable: the name resolved to no address".into()
                ),
            ]
        );
    }

    #[test]
    fn time_the_carry_clock_missed_widens_the_upper_end() {
        let t = Tick::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = Span {
            at: t,
            lo: 1_000,
            hi: 3_000,
        };
        let later = t.plus(Duration::from_secs(10));
        let clocks = Some((t, wall));
        // Both clocks advanced alike: only the drift allowance (100 ppm of 10 s = 1 ms).
        let same = carry(
            &span,
            None,
            100.0,
            clocks,
            later,
            wall + Duration::from_secs(10),
        );
        assert_eq!(same, span.at(later, 100.0));
        // The wall clock ran ahead by less than the allowance (the carry clock's oscillator is
        // slow, within its tolerance) plus the floor: nothing more.
        let slow = wall + Duration::from_micros(10_001_900);
        assert_eq!(carry(&span, None, 100.0, clocks, later, slow), same);
        // The machine slept an hour: the carry clock saw 10 s, the wall clock an hour more.
        let slept = carry(
            &span,
            None,
            100.0,
            clocks,
            later,
            wall + Duration::from_secs(3_610),
        );
        assert_eq!(slept.lo, same.lo);
        assert_eq!(slept.hi, same.hi + 3_600_000_000_000);
        // A wall clock stepped back changes nothing; no clock pair, nothing to compare.
        let back = carry(
            &span,
            None,
            100.0,
            clocks,
            later,
            wall - Duration::from_secs(5),
        );
        assert_eq!(back, same);
        assert_eq!(carry(&span, None, 100.0, None, later, wall), same);
    }

    #[test]
    fn kisses_of_death() {
        let now = Instant::now();
        let every = Duration::from_secs(64);
        let deny = kiss(None, "DENY", now, every).unwrap();
        assert_eq!(deny.until, None);
        assert_eq!(kiss(None, "RSTR", now, every).unwrap().until, None);
        let rate = kiss(None, "RATE", now, every).unwrap();
        assert_eq!(rate.until, Some(now + every));
        let again = kiss(Some(rate), "RATE", now, every).unwrap();
        assert_eq!(again.until, Some(now + 2 * every));
        let capped = kiss(
            Some(Kissed {
                code: "RATE".into(),
                until: None,
                backoff: crate::config::MAX_INTERVAL,
                since: now,
            }),
            "RATE",
            now,
            every,
        )
        .unwrap();
        assert_eq!(capped.backoff, crate::config::MAX_INTERVAL);
        // Other codes (INIT, STEP, …) fail this sync only.
        assert!(kiss(None, "INIT", now, every).is_none());
    }
}
