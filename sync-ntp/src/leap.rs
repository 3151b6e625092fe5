//! Leap seconds announced by the servers, and the widening that keeps true time inside the
//! carried interval across one.
//!
//! Unix time does not count leap seconds: across an inserted second (leap indicator 1) it
//! repeats the day's last second, across a deleted one (indicator 2) it skips it. The carry
//! clock counts every second, so an interval carried across the leap would be a second ahead of
//! true Unix time (insert) or behind it (delete). Whether and exactly when the server's clock
//! (or its upstream, or a smearing one) applies the second is not known, so the interval is
//! widened to cover both: once its upper end reaches the leap, its lower end moves a second
//! earlier (insert) or its upper end a second later (delete), until the next sync, whose reply
//! is in post-leap time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::combine::Span;

/// Nanoseconds in a UTC day (Unix time has no leap seconds).
const DAY_NS: i128 = 86_400 * 1_000_000_000;
/// Nanoseconds in the leap second.
const SECOND_NS: i128 = 1_000_000_000;

/// A leap second the servers announced for the end of the UTC day of the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingLeap {
    /// The midnight (UTC) that ends the day of the sync, where the second is inserted or
    /// deleted (a deleted second is the one just before it).
    pub midnight: SystemTime,
    /// A server agreeing with the majority announced an inserted second (leap indicator 1).
    pub insert: bool,
    /// A server agreeing with the majority announced a deleted second (leap indicator 2).
    pub delete: bool,
}

/// The leap the leap indicators of the agreeing replies announce, for the synced span
/// `span`: the end of the UTC day that contains its lower end. `None` when none announces one.
/// One reply suffices: widening is always safe, and a server that knows of a leap its peers do
/// not is likelier right than wrong.
pub(crate) fn pending(span: &Span, indicators: impl IntoIterator<Item = u8>) -> Option<Leap> {
    let (mut insert, mut delete) = (false, false);
    for li in indicators {
        insert |= li == 1;
        delete |= li == 2;
    }
    (insert || delete).then(|| Leap {
        midnight: (span.lo.div_euclid(DAY_NS) + 1) * DAY_NS,
        insert,
        delete,
    })
}

/// [`PendingLeap`] in Unix nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leap {
    pub midnight: i128,
    pub insert: bool,
    pub delete: bool,
}

impl Leap {
    /// `span` (the synced span carried on the carry clock, which counts the leap second)
    /// widened to contain true Unix time whether or not the leap has happened.
    pub(crate) fn apply(&self, mut span: Span) -> Span {
        // Insert: true time drops back a second when carried time reaches midnight.
        if self.insert && span.hi >= self.midnight {
            span.lo -= SECOND_NS;
        }
        // Delete: true time jumps a second ahead when carried time reaches 23:59:59.
        if self.delete && span.hi >= self.midnight - SECOND_NS {
            span.hi += SECOND_NS;
        }
        span
    }

    /// The public form; `None` if the midnight is out of `SystemTime`'s range.
    pub(crate) fn public(&self) -> Option<PendingLeap> {
        let d = Duration::from_nanos(u64::try_from(self.midnight.unsigned_abs()).ok()?);
        let midnight = if self.midnight >= 0 {
            UNIX_EPOCH.checked_add(d)
        } else {
            UNIX_EPOCH.checked_sub(d)
        }?;
        Some(PendingLeap {
            midnight,
            insert: self.insert,
            delete: self.delete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Tick;

    /// 2017-01-01T00:00:00Z, after the last inserted leap second so far.
    const M: i128 = 1_483_228_800 * 1_000_000_000;
    const MS: i128 = 1_000_000;

    fn span(lo: i128, hi: i128) -> Span {
        Span {
            at: Tick::now(),
            lo,
            hi,
        }
    }

    #[test]
    fn the_leap_is_at_the_end_of_the_day_of_the_sync() {
        let s = span(M - 300 * MS, M - 299 * MS);
        assert_eq!(pending(&s, [0, 0]), None);
        let leap = pending(&s, [0, 1]).unwrap();
        assert_eq!((leap.midnight, leap.insert, leap.delete), (M, true, false));
        let leap = pending(&span(M - DAY_NS + 1, M - 1), [2]).unwrap();
        assert_eq!((leap.midnight, leap.insert, leap.delete), (M, false, true));
        // Disagreeing servers: both are allowed for.
        let leap = pending(&s, [1, 2, 0]).unwrap();
        assert!(leap.insert && leap.delete);
        // A sync exactly at midnight belongs to the new day.
        assert_eq!(pending(&span(M, M + 1), [1]).unwrap().midnight, M + DAY_NS);
        // Before 1970 too (floor, not truncation).
        assert_eq!(pending(&span(-1, 0), [1]).unwrap().midnight, 0);
        let public = pending(&s, [1]).unwrap().public().unwrap();
        assert_eq!(
            public.midnight,
            UNIX_EPOCH + Duration::from_secs(1_483_228_800)
        );
    }

    /// True Unix time at carried (leap-counting) time `c`, if the leap happens.
    fn unix(leap: &Leap, c: i128) -> i128 {
        if leap.insert && c >= leap.midnight {
            c - SECOND_NS
        } else if leap.delete && c >= leap.midnight - SECOND_NS {
            c + SECOND_NS
        } else {
            c
        }
    }

    #[test]
    fn the_widened_span_contains_true_time_whether_or_not_the_leap_happens() {
        for (insert, delete) in [(true, false), (false, true)] {
            let leap = Leap {
                midnight: M,
                insert,
                delete,
            };
            // Carried spans of ±50 ms whose centre walks across 23:59:59 and midnight.
            for centre in (-2_000..=2_000).step_by(10).map(|ms| M + ms * MS) {
                let carried = span(centre - 50 * MS, centre + 50 * MS);
                let widened = leap.apply(carried);
                for c in [carried.lo, centre, carried.hi] {
                    for truth in [c, unix(&leap, c)] {
                        assert!(
                            widened.lo <= truth && truth <= widened.hi,
                            "{leap:?}: carried {carried:?}, widened {widened:?}, truth {truth}"
                        );
                    }
                }
                // Only across the leap, and by the second only.
                let crossed = if insert {
                    carried.hi >= M
                } else {
                    carried.hi >= M - SECOND_NS
                };
                let grown = (widened.hi - widened.lo) - (carried.hi - carried.lo);
                assert_eq!(grown, if crossed { SECOND_NS } else { 0 }, "{carried:?}");
            }
        }
    }
}
