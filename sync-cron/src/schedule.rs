//! When a schedule fires: [`Schedule`] and its tick arithmetic, in UTC and milliseconds.

use std::{
    fmt,
    str::FromStr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, SecondsFormat, Utc};
use sync_core::{Error, Result};

/// The shortest interval accepted by [`Cron::schedule`](crate::Cron::schedule): ticks are
/// recorded in milliseconds.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// When a schedule fires: once, at a fixed interval, or on a cron expression (UTC).
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use sync_cron::Schedule;
///
/// let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
///
/// let every = Schedule::every_from(t0, Duration::from_secs(10));
/// assert_eq!(every.next_after(t0), Some(t0 + Duration::from_secs(10)));
/// assert_eq!(every.next_after(t0 - Duration::from_secs(1)), Some(t0));
///
/// let once = Schedule::once(t0);
/// assert_eq!(once.next_after(t0 - Duration::from_millis(1)), Some(t0));
/// assert_eq!(once.next_after(t0), None);
///
/// // sec min hour day-of-month month day-of-week [year]
/// let hourly = Schedule::cron("0 0 * * * *")?;
/// assert_eq!(hourly.next_after(t0), Some(UNIX_EPOCH + Duration::from_secs(1_700_002_800)));
/// assert!(Schedule::cron("every tuesday").is_err());
/// # Ok::<(), sync_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// A single tick at `at`.
    Once {
        /// The tick.
        at: SystemTime,
    },
    /// Ticks at `start + k·interval` for k = 0, 1, 2…
    Every {
        /// The first tick.
        start: SystemTime,
        /// The time between ticks (at least [`MIN_INTERVAL`] to be scheduled).
        interval: Duration,
    },
    /// Ticks where a cron expression matches, in UTC.
    Cron(CronExpr),
}

/// A parsed cron expression (the `cron` crate's syntax:
/// `sec min hour day-of-month month day-of-week [year]`), evaluated in UTC.
#[derive(Clone)]
pub struct CronExpr {
    parsed: Box<cron::Schedule>,
}

impl CronExpr {
    /// The expression as written.
    pub fn source(&self) -> &str {
        self.parsed.source()
    }
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CronExpr").field(&self.source()).finish()
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.source() == other.source()
    }
}

impl Eq for CronExpr {}

impl Schedule {
    /// One tick at `at`.
    pub fn once(at: SystemTime) -> Schedule {
        Schedule::Once { at }
    }

    /// Every `interval`, starting now by the host's clock: ticks at `now + k·interval`. Since
    /// nothing before registration fires, the first tick fired is `now + interval` (on a
    /// Cron whose time source states an uncertainty, possibly `now` itself: see the
    /// [crate docs](crate#which-ticks-fire)).
    pub fn every(interval: Duration) -> Schedule {
        Schedule::every_from(SystemTime::now(), interval)
    }

    /// Every `interval`, with ticks at `start + k·interval` (k ≥ 0).
    pub fn every_from(start: SystemTime, interval: Duration) -> Schedule {
        Schedule::Every { start, interval }
    }

    /// Parses a cron expression (the `cron` crate's syntax, with seconds:
    /// `sec min hour day-of-month month day-of-week [year]`), evaluated in UTC. A bad
    /// expression is [`ErrorKind::InvalidArgument`](sync_core::ErrorKind::InvalidArgument)
    /// naming it and the parse error.
    pub fn cron(expr: &str) -> Result<Schedule> {
        let parsed = cron::Schedule::from_str(expr).map_err(|e| {
            Error::invalid(format!("cron expression {expr:?} is invalid: {e}")).with_source(e)
        })?;
        Ok(Schedule::Cron(CronExpr {
            parsed: Box::new(parsed),
        }))
    }

    /// The first tick strictly after `t`; `None` when there is none (a one-shot at or before
    /// `t`, a cron expression with no later match, a zero interval past its start, overflow).
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Schedule::Once { at } => (*at > t).then_some(*at),
            Schedule::Every { start, interval } => {
                let Ok(elapsed) = t.duration_since(*start) else {
                    return Some(*start);
                };
                let k = elapsed.as_nanos().checked_div(interval.as_nanos())?;
                nth_tick(*start, *interval, k + 1)
            }
            Schedule::Cron(expr) => {
                let after = to_utc(t)?;
                expr.parsed.after(&after).next().map(SystemTime::from)
            }
        }
    }

    /// The latest tick in `(after, now]`, if any.
    pub(crate) fn latest_between(&self, after: SystemTime, now: SystemTime) -> Option<SystemTime> {
        let tick = match self {
            Schedule::Once { at } => (*at <= now).then_some(*at),
            Schedule::Every { start, interval } => {
                let elapsed = now.duration_since(*start).ok()?;
                match elapsed.as_nanos().checked_div(interval.as_nanos()) {
                    Some(k) => nth_tick(*start, *interval, k),
                    None => Some(*start),
                }
            }
            Schedule::Cron(expr) => {
                // The iterator's backward step is strictly before its starting point.
                let before = to_utc(now.checked_add(Duration::from_nanos(1))?)?;
                expr.parsed.after(&before).next_back().map(SystemTime::from)
            }
        }?;
        (tick > after).then_some(tick)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Schedule::Every { interval, .. } = self {
            if *interval < MIN_INTERVAL {
                return Err(Error::invalid(format!(
                    "interval is {interval:?}; it must be at least {MIN_INTERVAL:?}"
                )));
            }
        }
        Ok(())
    }
}

/// `start + n·interval`, or `None` on overflow.
fn nth_tick(start: SystemTime, interval: Duration, n: u128) -> Option<SystemTime> {
    let nanos = interval.as_nanos().checked_mul(n)?;
    let offset = Duration::new(
        u64::try_from(nanos / 1_000_000_000).ok()?,
        (nanos % 1_000_000_000) as u32,
    );
    start.checked_add(offset)
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Once { at } => write!(f, "once at {}", rfc3339(*at)),
            Schedule::Every { start, interval } => {
                write!(f, "every {interval:?} from {}", rfc3339(*start))
            }
            Schedule::Cron(expr) => write!(f, "cron {:?} (UTC)", expr.source()),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    match to_utc(t) {
        Some(utc) => utc.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => format!("{t:?}"),
    }
}

/// `t` as a chrono UTC time; `None` outside chrono's range (about ±262,000 years), where
/// `DateTime::from(SystemTime)` would panic. Such times come from callers or from a map
/// record, so they must not bring the driver down.
fn to_utc(t: SystemTime) -> Option<DateTime<Utc>> {
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).ok()?, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).ok()?;
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    };
    DateTime::from_timestamp(secs, nanos)
}

/// Milliseconds since the Unix epoch, rounded down (0 before the epoch).
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Millisecond `ms` since the Unix epoch as a time; `None` where the platform cannot
/// represent it (a corrupt record).
pub(crate) fn from_ms(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// The last instant of millisecond `ms`: a tick strictly after it has a later millisecond.
/// `None` when that is not a representable time (a corrupt record).
pub(crate) fn end_of_ms(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms) + Duration::from_nanos(999_999))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::ErrorKind;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const T0: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z

    #[test]
    fn interval_ticks_are_start_plus_k_intervals() {
        let s = Schedule::every_from(at(T0), Duration::from_secs(10));
        assert_eq!(s.next_after(at(T0 - 100)), Some(at(T0)));
        assert_eq!(s.next_after(at(T0)), Some(at(T0 + 10)));
        assert_eq!(s.next_after(at(T0 + 5)), Some(at(T0 + 10)));
        assert_eq!(s.next_after(at(T0 + 10)), Some(at(T0 + 20)));
        assert_eq!(
            s.next_after(at(T0 + 10) - Duration::from_nanos(1)),
            Some(at(T0 + 10))
        );
        assert_eq!(s.next_after(at(T0 + 1_000_005)), Some(at(T0 + 1_000_010)));

        let ms = Schedule::every_from(at(T0), Duration::from_millis(250));
        assert_eq!(
            ms.next_after(at(T0 + 1)),
            Some(at(T0 + 1) + Duration::from_millis(250))
        );

        let zero = Schedule::every_from(at(T0), Duration::ZERO);
        assert_eq!(zero.next_after(at(T0 - 1)), Some(at(T0)));
        assert_eq!(zero.next_after(at(T0)), None);
        assert_eq!(
            Schedule::every_from(SystemTime::UNIX_EPOCH, Duration::MAX).next_after(at(T0)),
            None,
            "overflow is no tick, not a panic"
        );
    }

    #[test]
    fn every_starts_now() {
        let before = SystemTime::now();
        let s = Schedule::every(Duration::from_secs(60));
        let Schedule::Every { start, interval } = s else {
            panic!("not an interval: {s:?}")
        };
        assert!(start >= before && start <= SystemTime::now());
        assert_eq!(interval, Duration::from_secs(60));
        assert_eq!(s.next_after(start), Some(start + interval));
    }

    #[test]
    fn once_ticks_once() {
        let s = Schedule::once(at(T0));
        assert_eq!(s.next_after(at(T0 - 1)), Some(at(T0)));
        assert_eq!(s.next_after(at(T0) - Duration::from_nanos(1)), Some(at(T0)));
        assert_eq!(s.next_after(at(T0)), None);
        assert_eq!(s.next_after(at(T0 + 1)), None);
    }

    #[test]
    fn cron_expressions_are_utc_and_strictly_after() {
        let hourly = Schedule::cron("0 0 * * * *").unwrap();
        // T0 is 22:13:20 UTC; the next full hour is 23:00:00.
        assert_eq!(hourly.next_after(at(T0)), Some(at(T0 + 46 * 60 + 40)));
        let top = at(T0 + 46 * 60 + 40);
        assert_eq!(
            hourly.next_after(top),
            Some(top + Duration::from_secs(3600))
        );
        assert_eq!(
            hourly.next_after(top - Duration::from_millis(1)),
            Some(top),
            "sub-second times before a match still get it"
        );
        assert_eq!(
            hourly.next_after(top + Duration::from_millis(500)),
            Some(top + Duration::from_secs(3600))
        );

        let every_5s = Schedule::cron("*/5 * * * * *").unwrap();
        assert_eq!(every_5s.next_after(at(T0)), Some(at(T0 + 5)));
        assert_eq!(every_5s.next_after(at(T0 + 1)), Some(at(T0 + 5)));

        let past_year = Schedule::cron("0 0 0 1 1 * 2020").unwrap();
        assert_eq!(past_year.next_after(at(T0)), None);
    }

    #[test]
    fn bad_cron_expression_is_named() {
        let err = Schedule::cron("61 * * * * *").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("\"61 * * * * *\""), "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn latest_between_coalesces_missed_ticks() {
        let s = Schedule::every_from(at(T0), Duration::from_secs(10));
        assert_eq!(s.latest_between(at(T0), at(T0 + 35)), Some(at(T0 + 30)));
        assert_eq!(s.latest_between(at(T0), at(T0 + 30)), Some(at(T0 + 30)));
        assert_eq!(s.latest_between(at(T0 + 30), at(T0 + 35)), None);
        assert_eq!(s.latest_between(at(T0 - 50), at(T0 - 1)), None);

        let c = Schedule::cron("*/5 * * * * *").unwrap();
        assert_eq!(c.latest_between(at(T0), at(T0 + 17)), Some(at(T0 + 15)));
        assert_eq!(c.latest_between(at(T0), at(T0 + 15)), Some(at(T0 + 15)));
        assert_eq!(c.latest_between(at(T0 + 15), at(T0 + 19)), None);

        let o = Schedule::once(at(T0));
        assert_eq!(o.latest_between(at(T0 - 1), at(T0 + 5)), Some(at(T0)));
        assert_eq!(o.latest_between(at(T0), at(T0 + 5)), None);
    }

    #[test]
    fn intervals_under_a_millisecond_are_rejected() {
        let err = Schedule::every(Duration::ZERO).validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("1ms"), "{err}");
        assert!(
            Schedule::every(Duration::from_micros(999))
                .validate()
                .is_err()
        );
        assert!(Schedule::every(MIN_INTERVAL).validate().is_ok());
    }
}
