//! What a fired job is told: the [`Firing`] that Cron writes into the job's labels.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sync_core::{Error, Result, TimeInterval};

/// The label holding the schedule's name.
pub(crate) const SCHEDULE: &str = "cron.schedule";
/// The label holding the firing leader's term.
pub(crate) const TERM: &str = "cron.term";
/// The label holding the tick, in milliseconds since the Unix epoch.
pub(crate) const TICK: &str = "cron.tick";
/// The label holding the fired-at interval's earliest time, in ms (rounded down).
pub(crate) const EARLIEST: &str = "cron.earliest";
/// The label holding the fired-at interval's latest time, in ms (rounded up).
pub(crate) const LATEST: &str = "cron.latest";

/// One firing of a schedule, as Cron hands it to the job: read it from the job's labels with
/// [`Firing::from_labels`] (a handler's `JobContext::labels`, or a `JobStatus`'s).
///
/// Cron labels every job it submits with:
///
/// | label | value |
/// | --- | --- |
/// | `cron.schedule` | the schedule's name |
/// | `cron.term` | the term of the leader that fired it |
/// | `cron.tick` | the tick, in milliseconds since the Unix epoch (rounded down) |
/// | `cron.earliest`, `cron.latest` | the interval that the Cron's time source returned when the tick was fired, in milliseconds since the Unix epoch, rounded outward (earliest down, latest up) |
///
/// The tick was fired only once the interval's earliest time had reached it, so
/// `interval.earliest() >= tick` always holds, and if the time source is honest (its interval
/// contains true time) the job was submitted no earlier than its tick. The interval's width is
/// how sure the firing leader was of the time.
///
/// ```
/// use std::{collections::BTreeMap, time::{Duration, UNIX_EPOCH}};
/// use sync_cron::Firing;
///
/// let labels: BTreeMap<String, String> = [
///     ("cron.schedule", "report"),
///     ("cron.term", "7"),
///     ("cron.tick", "1700000000000"),
///     ("cron.earliest", "1700000000004"),
///     ("cron.latest", "1700000000030"),
/// ]
/// .into_iter()
/// .map(|(k, v)| (k.to_string(), v.to_string()))
/// .collect();
/// let firing = Firing::from_labels(&labels)?;
/// assert_eq!((firing.schedule.as_str(), firing.term), ("report", 7));
/// assert_eq!(firing.tick, UNIX_EPOCH + Duration::from_millis(1_700_000_000_000));
/// assert!(firing.interval.earliest() >= firing.tick);
/// assert_eq!(firing.interval.width(), Duration::from_millis(26));
///
/// let err = Firing::from_labels(&BTreeMap::new()).unwrap_err();
/// assert!(err.to_string().contains("cron.schedule"), "{err}");
/// # Ok::<(), sync_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Firing {
    /// The schedule's name.
    pub schedule: String,
    /// The term of the leader that fired the tick.
    pub term: u64,
    /// The tick, to the millisecond (rounded down).
    pub tick: SystemTime,
    /// The interval the Cron's time source returned when it fired the tick, to the
    /// millisecond (rounded outward).
    pub interval: TimeInterval,
}

impl Firing {
    /// The firing described by a job's labels. A label that is missing or malformed is
    /// [`ErrorKind::InvalidArgument`](sync_core::ErrorKind::InvalidArgument) naming it (a
    /// job submitted by something other than a Cron, or by a Cron older than the
    /// `cron.earliest` and `cron.latest` labels).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Firing> {
        let schedule = get(labels, SCHEDULE)?.to_string();
        let term = number(labels, TERM)?;
        let tick = time(labels, TICK)?;
        let earliest = time(labels, EARLIEST)?;
        let latest = time(labels, LATEST)?;
        let interval = TimeInterval::new(earliest, latest).map_err(|_| {
            Error::invalid(format!(
                "cron labels {EARLIEST} ({}) and {LATEST} ({}) are not an interval: \
                 the earliest is after the latest",
                labels[EARLIEST], labels[LATEST]
            ))
        })?;
        Ok(Firing {
            schedule,
            term,
            tick,
            interval,
        })
    }
}

fn get<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str> {
    labels.get(key).map(String::as_str).ok_or_else(|| {
        Error::invalid(format!(
            "cron label {key} is missing: not a job fired by sync-cron (or by an older version)"
        ))
    })
}

fn number(labels: &BTreeMap<String, String>, key: &str) -> Result<u64> {
    let value = get(labels, key)?;
    value.parse().map_err(|_| {
        Error::invalid(format!(
            "cron label {key} is {value:?}; it must be an unsigned 64-bit integer"
        ))
    })
}

fn time(labels: &BTreeMap<String, String>, key: &str) -> Result<SystemTime> {
    let ms = number(labels, key)?;
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .ok_or_else(|| {
            Error::invalid(format!(
                "cron label {key} is {ms} ms since the Unix epoch, beyond the times this \
                 platform represents"
            ))
        })
}

/// The labels of a firing of tick `tick_ms` by `term` at `now`, as [`Firing::from_labels`]
/// reads them.
pub(crate) fn labels(
    name: &str,
    term: u64,
    tick_ms: u64,
    now: &TimeInterval,
) -> [(&'static str, String); 5] {
    [
        (SCHEDULE, name.to_string()),
        (TERM, term.to_string()),
        (TICK, tick_ms.to_string()),
        (EARLIEST, crate::schedule::to_ms(now.earliest()).to_string()),
        (LATEST, ceil_ms(now.latest()).to_string()),
    ]
}

/// Milliseconds since the Unix epoch, rounded up (0 before the epoch).
fn ceil_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
        u64::try_from(ms).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::ErrorKind;

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn labels_round_outward_and_read_back() {
        let now = TimeInterval::new(
            at_ms(1_000) + Duration::from_micros(700),
            at_ms(2_000) + Duration::from_micros(200),
        )
        .unwrap();
        let labels: BTreeMap<String, String> = labels("s", 3, 999, &now)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let firing = Firing::from_labels(&labels).unwrap();
        assert_eq!(firing.schedule, "s");
        assert_eq!(firing.term, 3);
        assert_eq!(firing.tick, at_ms(999));
        assert_eq!(firing.interval.earliest(), at_ms(1_000));
        assert_eq!(firing.interval.latest(), at_ms(2_001));
        assert_eq!(ceil_ms(at_ms(5)), 5, "a whole millisecond stays");
    }

    #[test]
    fn bad_labels_are_named() {
        let mut labels: BTreeMap<String, String> = labels(
            "s",
            3,
            999,
            &TimeInterval::around(at_ms(1_000), Duration::ZERO),
        )
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let check = |labels: &BTreeMap<String, String>, needle: &str| {
            let err = Firing::from_labels(labels).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.to_string().contains(needle), "{err}");
        };
        labels.insert(TERM.into(), "-1".into());
        check(&labels, "cron.term");
        labels.insert(TERM.into(), "1".into());
        labels.insert(EARLIEST.into(), "3000".into());
        check(&labels, "not an interval");
        labels.remove(LATEST);
        check(&labels, "cron.latest is missing");
        labels.insert(LATEST.into(), u64::MAX.to_string());
        labels.insert(TICK.into(), u64::MAX.to_string());
        let result = Firing::from_labels(&labels);
        // u64::MAX ms is representable on some platforms and not on others; never a panic.
        if let Err(err) = result {
            assert!(err.to_string().contains("cron."), "{err}");
        }
    }
}
