//! Combining several servers' intervals (the hull of what a strict majority contains) and
//! carrying the result forward on the carry clock ([`Tick`]) with a growing drift allowance.
//!
//! Times are integer nanoseconds since the Unix epoch (`i128`), so nothing rounds away a bound.

use std::time::Duration;

use crate::clock::Tick;

/// One server's statement: at carry-clock tick `at`, true time lies in `[lo, hi]` (Unix ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub at: Tick,
    pub lo: i128,
    pub hi: i128,
}

/// Nanoseconds of drift allowance over `elapsed` at `ppm`, rounded up.
pub(crate) fn drift_ns(elapsed: Duration, ppm: f64) -> i128 {
    let ns = elapsed.as_nanos() as f64 * ppm / 1e6;
    if ns.is_finite() && ns > 0.0 {
        ns.ceil() as i128
    } else {
        0
    }
}

impl Span {
    /// The same statement carried to `to`: both ends move by the carry-clock time between the
    /// two ticks, and the span widens by the drift allowance over it on each side. (`to` may
    /// be slightly earlier than `at` when a sync lands between a caller reading the clock and
    /// reading the cache.)
    pub fn at(&self, to: Tick, ppm: f64) -> Span {
        let (elapsed, sign) = match to.checked_duration_since(self.at) {
            Some(d) => (d, 1),
            None => (self.at.saturating_duration_since(to), -1),
        };
        let e = sign * elapsed.as_nanos() as i128;
        let d = drift_ns(elapsed, ppm);
        Span {
            at: to,
            lo: self.lo + e - d,
            hi: self.hi + e + d,
        }
    }

    /// Half the width, rounded up.
    pub fn half_width(&self) -> Duration {
        let w = (self.hi - self.lo).max(0);
        let half = w / 2 + w % 2;
        Duration::from_nanos(u64::try_from(half).unwrap_or(u64::MAX))
    }
}

/// The outcome of [`select`]: the combined span, and which inputs agree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Combined {
    pub span: Span,
    pub agree: Vec<bool>,
}

/// Combines the servers' spans (Marzullo-style intersection, RFC 5905 §11.2.1 bound): the hull
/// of every point that a strict majority of spans contain. If a strict majority of the servers
/// are truechimers (their spans contain true time), true time is such a point, so the result
/// contains it — unlike the single region of largest overlap, which a colluding minority can
/// move away from true time. `None` when no point has a majority. All inputs are first carried to
/// the latest instant among them; spans that do not meet the result are falsetickers.
pub(crate) fn select(spans: &[Span], ppm: f64) -> Option<Combined> {
    let reference = spans.iter().map(|s| s.at).max()?;
    let spans: Vec<Span> = spans.iter().map(|s| s.at(reference, ppm)).collect();
    let majority = spans.len() as i32 / 2 + 1;
    // (value, +1 for a start, -1 for an end); starts sort before ends at equal values, so
    // intervals that touch share that point.
    let mut edges: Vec<(i128, i32)> = spans.iter().flat_map(|s| [(s.lo, 1), (s.hi, -1)]).collect();
    edges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let (mut count, mut lo, mut hi) = (0i32, None, None);
    for &(value, kind) in &edges {
        if kind == -1 && count >= majority {
            hi = Some(value);
        }
        count += kind;
        if kind == 1 && count >= majority && lo.is_none() {
            lo = Some(value);
        }
    }
    let (lo, hi) = (lo?, hi?);
    let agree = spans.iter().map(|s| s.lo <= hi && s.hi >= lo).collect();
    Some(Combined {
        span: Span {
            at: reference,
            lo,
            hi,
        },
        agree,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(at: Tick, lo: i128, hi: i128) -> Span {
        Span { at, lo, hi }
    }

    #[test]
    fn intersection_of_agreeing_servers() {
        let t = Tick::now();
        // Points at least two of the three contain: a single falseticker cannot mislead it.
        let c = select(&[span(t, 0, 10), span(t, 5, 20), span(t, 8, 12)], 0.0).unwrap();
        assert_eq!((c.span.lo, c.span.hi), (5, 12));
        let two = select(&[span(t, 0, 10), span(t, 5, 20)], 0.0).unwrap();
        assert_eq!((two.span.lo, two.span.hi), (5, 10));
        assert_eq!(c.agree, [true, true, true]);
    }

    #[test]
    fn falseticker_is_outvoted() {
        let t = Tick::now();
        let c = select(&[span(t, 0, 10), span(t, 5, 20), span(t, 100, 110)], 0.0).unwrap();
        assert_eq!((c.span.lo, c.span.hi), (5, 10));
        assert_eq!(c.agree, [true, true, false]);
    }

    #[test]
    fn no_majority_is_none() {
        let t = Tick::now();
        assert!(select(&[span(t, 0, 10), span(t, 20, 30)], 0.0).is_none());
        assert!(select(&[], 0.0).is_none());
        let one = select(&[span(t, 3, 9)], 0.0).unwrap();
        assert_eq!((one.span.lo, one.span.hi), (3, 9));
    }

    #[test]
    fn touching_intervals_agree() {
        let t = Tick::now();
        let c = select(&[span(t, 0, 10), span(t, 10, 20)], 0.0).unwrap();
        assert_eq!((c.span.lo, c.span.hi), (10, 10));
    }

    #[test]
    fn a_colluding_minority_cannot_exclude_true_time() {
        let t = Tick::now();
        // True time 5.5: three honest spans, two falsetickers that overlap the wide honest ones.
        let spans = [
            span(t, 0, 10),
            span(t, 0, 10),
            span(t, 5, 6),
            span(t, 0, 1),
            span(t, 0, 1),
        ];
        let c = select(&spans, 0.0).unwrap();
        assert!(c.span.lo <= 5 && 6 <= c.span.hi, "{:?}", c.span);
        assert_eq!(c.agree, [true; 5]);
    }

    #[test]
    fn tied_regions_give_their_hull() {
        let t = Tick::now();
        let c = select(&[span(t, 0, 10), span(t, 0, 1), span(t, 9, 10)], 0.0).unwrap();
        assert_eq!((c.span.lo, c.span.hi), (0, 10));
    }

    #[test]
    fn carried_forward_with_drift() {
        let t = Tick::now();
        let later = t.plus(Duration::from_secs(10));
        // 100 ppm over 10 s = 1 ms each side.
        let s = span(t, 0, 2).at(later, 100.0);
        assert_eq!(s.lo, 10_000_000_000 - 1_000_000);
        assert_eq!(s.hi, 10_000_000_002 + 1_000_000);
        assert_eq!(s.half_width(), Duration::from_nanos(1_000_001));
        // And backwards, for a caller whose clock reading predates the sync.
        let back = span(later, 0, 2).at(t, 100.0);
        assert_eq!((back.lo, back.hi), (-10_001_000_000, -9_998_999_998));
        // Samples taken at different instants are compared at the latest one.
        let c = select(
            &[span(t, 0, 4), span(later, 10_000_000_000, 10_000_000_010)],
            0.0,
        )
        .unwrap();
        assert_eq!((c.span.lo, c.span.hi), (10_000_000_000, 10_000_000_004));
        assert_eq!(c.span.at, later);
    }
}
