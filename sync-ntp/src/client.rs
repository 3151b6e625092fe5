//! The client: queries every server, combines the good replies, caches the result on the
//! monotonic clock and refreshes it in the background.

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use sync_core::{Backend, Capabilities, Capability, Error, ErrorKind, Result, Time, TimeInterval};
use sync_kit::locked;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{
    BACKEND, PRIMITIVE,
    combine::{Span, select},
    config::{Config, normalize_server},
    query::{ReplyError, Sample, query},
    time::NtpTime,
};

/// After a sync in which every server failed, further on-demand syncs wait this long, so that
/// callers of an unreachable pool get their error at once instead of each querying again.
const RETRY_HOLDOFF: Duration = Duration::from_secs(1);

/// How a server that sent a kiss-of-death is treated (RFC 4330 §8, RFC 5905 §7.4): after DENY
/// or RSTR it is never queried again; after RATE it is left alone for a back-off that doubles
/// with each RATE kiss (from the sync interval up to NTP's longest poll).
#[derive(Debug, Clone)]
struct Kissed {
    code: String,
    /// Not queried before this instant; `None`: never again.
    until: Option<Instant>,
    backoff: Duration,
}

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
    /// The local monotonic and wall clocks read together as the sync that gave `span` began
    /// (wall first): time the monotonic clock missed since (a suspend) shows as the wall clock
    /// running ahead of it.
    clocks: Option<(Instant, SystemTime)>,
    report: Option<SyncReport>,
    /// The last sync's failure and when it happened, while no later sync succeeded.
    failure: Option<(Instant, Failure)>,
    /// Per server (by index, one slot each from the start), the kiss-of-death it last sent,
    /// while it applies.
    kissed: Vec<Option<Kissed>>,
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
            let state = State {
                span: None,
                clocks: None,
                report: None,
                failure: None,
                kissed: vec![None; servers.len()],
            };
            let inner = Arc::new(Inner {
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

    /// The cached span carried to `now`, whatever its error.
    fn carried(&self, now: Instant) -> Option<Span> {
        let (span, clocks) = {
            let state = locked(&self.state);
            (state.span?, state.clocks)
        };
        // The wall clock is read after `now` (so that the gap below is never understated).
        let wall = SystemTime::now();
        Some(carry(&span, self.config.drift_ppm, clocks, now, wall))
    }

    /// The cached span carried to `now`, if its error is still acceptable.
    fn current(&self, now: Instant) -> Option<Span> {
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
        if let Some(span) = self.current(Instant::now()) {
            return interval_of(&span);
        }
        let _one = self.syncing.lock().await;
        // Another caller may have synced while this one waited.
        if let Some(span) = self.current(Instant::now()) {
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
        let now = Instant::now();
        let error = match self.carried(now) {
            Some(span) if span.half_width() <= self.config.max_error => return interval_of(&span),
            span => span.map_or(Duration::MAX, |s| s.half_width()),
        };
        // Hold further on-demand syncs off, as after a failed one: otherwise every call would
        // query the servers again.
        locked(&self.state).failure = Some((now, Failure::TooWide(error)));
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

    /// Queries every server and installs the combined result. The caller holds `syncing`.
    async fn sync_now(&self) -> Result<SyncReport> {
        let max_error = self.config.max_error;
        // The local clocks as the sync begins (wall first): a suspend from here on, even one
        // during the exchange, shows in `carry` as the wall clock running ahead.
        let clocks_wall = SystemTime::now();
        let start = Instant::now();
        let kissed = locked(&self.state).kissed.clone();
        let outcomes = futures::future::join_all(
            self.servers
                .iter()
                .zip(kissed)
                .map(|(server, kissed)| self.query_server(server, kissed, start)),
        )
        .await;
        self.note_kisses(&outcomes);

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
        let combined = select(&spans, self.config.drift_ppm);
        let Some(combined) = combined else {
            for (server, _, _) in &good {
                failures.push(ServerFailure {
                    server: (*server).clone(),
                    error: ReplyError::Falseticker,
                });
            }
            let e = SyncError { failures };
            locked(&self.state).failure = Some((Instant::now(), Failure::Servers(e.clone())));
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
        let now = Instant::now();
        let mut state = locked(&self.state);
        state.span = Some(combined.span);
        state.clocks = Some((start, clocks_wall));
        state.report = Some(report.clone());
        let error = combined.span.at(now, self.config.drift_ppm).half_width();
        state.failure = (error > max_error).then_some((now, Failure::TooWide(error)));
        Ok(report)
    }

    /// One server's part of a sync: skipped while a kiss-of-death applies, else resolved and
    /// queried, each within the timeout.
    async fn query_server<'a>(
        &self,
        server: &'a String,
        kissed: Option<Kissed>,
        start: Instant,
    ) -> (
        &'a String,
        std::result::Result<(SocketAddr, Sample), ReplyError>,
    ) {
        let timeout = self.config.timeout;
        if let Some(k) = kissed.filter(|k| k.until.is_none_or(|until| start < until)) {
            tracing::debug!(server = %server, code = %k.code, "not queried: it sent a kiss-of-death");
            return (server, Err(ReplyError::KissOfDeath { code: k.code }));
        }
        // The resolver (a blocking getaddrinfo) is bounded by the timeout too: a slow DNS server
        // must not hold the sync, and every caller waiting on it, any longer.
        let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host(server.as_str()));
        let unreachable = |reason: String| (server, Err(ReplyError::Unreachable { reason }));
        let addr = match lookup.await {
            Ok(Ok(mut addrs)) => addrs.next(),
            Ok(Err(e)) => return unreachable(format!("could not resolve: {e}")),
            Err(_) => return unreachable(format!("could not resolve within {timeout:?}")),
        };
        let Some(addr) = addr else {
            return unreachable("the name resolved to no address".into());
        };
        let result = query(
            addr,
            timeout,
            self.config.max_error,
            self.config.drift_ppm,
            &self.queries,
        )
        .await
        .map(|s| (addr, s));
        (server, result)
    }

    /// Remembers the kisses-of-death of this sync, and forgets those of servers that answered.
    fn note_kisses<T>(&self, outcomes: &[(&String, std::result::Result<T, ReplyError>)]) {
        let now = Instant::now();
        let mut state = locked(&self.state);
        for (i, (_, outcome)) in outcomes.iter().enumerate() {
            let slot = &mut state.kissed[i];
            match outcome {
                Err(ReplyError::KissOfDeath { code }) => {
                    let until_set = slot
                        .as_ref()
                        .is_some_and(|k| k.until.is_none_or(|u| now < u));
                    if until_set {
                        // Skipped this time: the remembered kiss still applies.
                        continue;
                    }
                    *slot = kiss(slot.take(), code, now, self.config.interval);
                    if let Some(k) = slot {
                        tracing::warn!(
                            server = %self.servers[i],
                            code = %k.code,
                            until = ?k.until.map(|u| u - now),
                            "NTP server sent a kiss-of-death; not querying it for now"
                        );
                    }
                }
                Ok(_) => *slot = None,
                Err(_) => {}
            }
        }
    }
}

/// The state after a kiss-of-death `code` at `now`: DENY and RSTR forever, RATE for a doubling
/// back-off, any other code for this sync only.
fn kiss(previous: Option<Kissed>, code: &str, now: Instant, interval: Duration) -> Option<Kissed> {
    match code {
        "DENY" | "RSTR" => Some(Kissed {
            code: code.to_string(),
            until: None,
            backoff: Duration::ZERO,
        }),
        "RATE" => {
            let backoff = previous
                .map_or(interval, |k| k.backoff.saturating_mul(2))
                .clamp(interval, crate::config::MAX_INTERVAL);
            Some(Kissed {
                code: code.to_string(),
                until: Some(now + backoff),
                backoff,
            })
        }
        _ => None,
    }
}

/// Below this, the wall clock running ahead of the monotonic clock is the time between reading
/// the two (they advance alike on Linux, slewed together), not a suspend.
const MISSED_TIME_FLOOR: Duration = Duration::from_millis(1);

/// `span` carried to the monotonic instant `now` with the drift allowance, and its upper end
/// moved by however much more the wall clock advanced than the monotonic clock since `clocks`
/// (monotonic, wall) were read, when that is over [`MISSED_TIME_FLOOR`]: the monotonic clock
/// stops while the machine is suspended, true time does not. (A wall clock stepped forward only
/// widens the interval, to be safe; once that exceeds the maximum error the next call syncs
/// again.)
fn carry(
    span: &Span,
    ppm: f64,
    clocks: Option<(Instant, SystemTime)>,
    now: Instant,
    wall: SystemTime,
) -> Span {
    let mut carried = span.at(now, ppm);
    if let Some((mono_at, wall_at)) = clocks {
        let mono = now.saturating_duration_since(mono_at).as_nanos() as i128;
        let walled = match wall.duration_since(wall_at) {
            Ok(d) => d.as_nanos() as i128,
            Err(_) => 0,
        };
        let missed = walled - mono;
        if missed > MISSED_TIME_FLOOR.as_nanos() as i128 {
            carried.hi += missed;
        }
    }
    carried
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
    use super::*;

    #[test]
    fn time_the_monotonic_clock_missed_widens_the_upper_end() {
        let t = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = Span {
            at: t,
            lo: 1_000,
            hi: 3_000,
        };
        let later = t + Duration::from_secs(10);
        let clocks = Some((t, wall));
        // Both clocks advanced alike: only the drift allowance (1 ppm of 10 s = 10 µs).
        let same = carry(&span, 1.0, clocks, later, wall + Duration::from_secs(10));
        assert_eq!(same, span.at(later, 1.0));
        // The machine slept an hour: the monotonic clock saw 10 s, the wall clock an hour more.
        let slept = carry(&span, 1.0, clocks, later, wall + Duration::from_secs(3_610));
        assert_eq!(slept.lo, same.lo);
        assert_eq!(slept.hi, same.hi + 3_600_000_000_000);
        // Reading the two clocks a few microseconds apart is not a suspend.
        let read = carry(
            &span,
            1.0,
            clocks,
            later,
            wall + Duration::from_micros(10_000_050),
        );
        assert_eq!(read, same);
        // A wall clock stepped back changes nothing; no clock pair, nothing to compare.
        let back = carry(&span, 1.0, clocks, later, wall - Duration::from_secs(5));
        assert_eq!(back, same);
        assert_eq!(carry(&span, 1.0, None, later, wall), same);
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
