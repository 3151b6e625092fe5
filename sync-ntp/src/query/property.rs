//! A property test of the wire code over random reply bytes: whatever a datagram holds,
//! checking it never panics, and a reply accepted as a sample never gives an interval that
//! misses the bounds the reply itself states — true time at T4 in
//! [T3 − root distance, T2 + (T4 − T1) + root distance] — recomputed here independently, in
//! exact rational arithmetic (units of 2^-33 ns), from the raw fields.
//!
//! Runs 100 000 replies in the ordinary `cargo test` (about 1.5 s in a debug build).
//! The seed is random and printed on failure; `SYNC_NTP_PROPERTY_SEED=<seed>` replays a run.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{PACKET_LEN, ReplyError, Sent, addressed, sample, timestamp};
use crate::{
    client::interval_of,
    clock::Tick,
    combine::select,
    config::{MAX_DRIFT_PPM, MAX_MAX_ERROR},
    leap,
};

const REPLIES: usize = 100_000;

/// One nanosecond in the units the reference bounds are computed in (2^-33 ns: exact for NTP's
/// 2^-32 s fractions, the 2^-16 s short format and halving the root delay).
const NS: i128 = 1 << 33;
/// Seconds from 1900 to 1970.
const NTP_UNIX_OFFSET: i128 = 2_208_988_800;

/// An NTP timestamp as Unix time in 2^-33 ns, by RFC 4330 §3's rule: a timestamp whose top bit
/// is clear is in era 1 (from 2036).
fn exact(ts: u64) -> i128 {
    let era = if ts >> 63 == 0 { 1i128 << 64 } else { 0 };
    // ts / 2^32 seconds = ts · 1e9 / 2^32 ns = ts · 1e9 · 2 units.
    (i128::from(ts) + era - (NTP_UNIX_OFFSET << 32)) * 1_000_000_000 * 2
}

/// An NTP short-format (16.16) value in 2^-33 ns.
fn exact_short(raw: u32) -> i128 {
    i128::from(raw) * 1_000_000_000 * (1 << 17)
}

#[derive(Debug)]
struct Case {
    reply: Vec<u8>,
    nonce: u64,
    t1: SystemTime,
    elapsed: Duration,
    max_error: Duration,
    ppm: f64,
}

impl Case {
    /// Random bytes, mostly shaped enough to reach the later checks and the interval code.
    fn random(rng: &mut StdRng) -> Case {
        let nonce = rng.random::<u64>().max(1);
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(0..PACKET_LEN),
            1 => rng.random_range(PACKET_LEN..=200),
            _ => PACKET_LEN,
        };
        let mut reply = vec![0u8; len];
        rng.fill(&mut reply[..]);
        let t1 = if rng.random_bool(0.05) {
            UNIX_EPOCH
                - Duration::new(
                    rng.random_range(0..1 << 31),
                    rng.random_range(0..1_000_000_000),
                )
        } else {
            UNIX_EPOCH
                + Duration::new(
                    rng.random_range(0..1 << 32),
                    rng.random_range(0..1_000_000_000),
                )
        };
        let elapsed = match rng.random_range(0..4) {
            0 => Duration::ZERO,
            1 => Duration::from_nanos(rng.random_range(0..60_000_000_000)),
            _ => Duration::from_nanos(rng.random_range(0..50_000_000)),
        };
        if len >= PACKET_LEN && rng.random_bool(0.9) {
            let li = if rng.random_bool(0.05) {
                3
            } else {
                rng.random_range(0..3u8)
            };
            let version = if rng.random_bool(0.95) {
                rng.random_range(3..=4u8)
            } else {
                rng.random_range(0..8u8)
            };
            let mode = if rng.random_bool(0.95) {
                4
            } else {
                rng.random_range(0..8u8)
            };
            reply[0] = li << 6 | version << 3 | mode;
            if rng.random_bool(0.9) {
                reply[1] = rng.random_range(1..16);
            }
            if rng.random_bool(0.9) {
                reply[24..32].copy_from_slice(&nonce.to_be_bytes());
            }
            // Root delay and dispersion mostly under a second, so that most replies pass.
            for at in [4, 8] {
                if rng.random_bool(0.8) {
                    reply[at..at + 2].fill(0);
                }
            }
            // T2 and T3 mostly near each other, as a server's are (either order: a server's
            // processing time may exceed our round trip), at any epoch.
            let t2 = timestamp(&reply, 32);
            let apart = match rng.random_range(0..10) {
                0..=6 => rng.random_range(-(1i64 << 22)..(1i64 << 26)),
                7 | 8 => rng.random_range(-(1i64 << 32)..(1i64 << 33)),
                _ => rng.random(),
            };
            reply[40..48].copy_from_slice(&t2.wrapping_add_signed(apart).to_be_bytes());
            if rng.random_bool(0.01) {
                reply[32..40].fill(0);
            }
            if rng.random_bool(0.01) {
                reply[40..48].fill(0);
            }
        }
        let max_error = if rng.random_bool(0.7) {
            MAX_MAX_ERROR
        } else {
            Duration::from_nanos(rng.random_range(1_000..=60_000_000_000))
        };
        let ppm = rng.random_range(0.0..=MAX_DRIFT_PPM + crate::clock::SLEW_PPM);
        Case {
            reply,
            nonce,
            t1,
            elapsed,
            max_error,
            ppm,
        }
    }

    /// `Ok(true)` if the reply became an interval, `Ok(false)` if it was rightly refused, and
    /// what went wrong otherwise.
    fn check(&self) -> Result<bool, String> {
        let p = &self.reply;
        let well_formed =
            p.len() >= PACKET_LEN && p[0] & 7 == 4 && (3..=4).contains(&(p[0] >> 3 & 7));
        let addressed = addressed(p, self.nonce);
        match (&addressed, well_formed) {
            (Ok(echoes), true) if *echoes == (timestamp(p, 24) == self.nonce) => {}
            (Err(ReplyError::Malformed { .. }), false) => {}
            _ => {
                return Err(format!(
                    "addressed: {addressed:?}, well formed: {well_formed}"
                ));
            }
        }
        if addressed != Ok(true) {
            return Ok(false);
        }

        let sent = Sent {
            t1: self.t1,
            elapsed: self.elapsed,
            received: Tick::now(),
        };
        let server = SocketAddr::from(([192, 0, 2, 1], 123));
        let (li, stratum, t2, t3) = (p[0] >> 6, p[1], timestamp(p, 32), timestamp(p, 40));
        let s = match sample(p, &sent, server, self.max_error, self.ppm) {
            Err(ReplyError::KissOfDeath { .. }) if stratum == 0 => return Ok(false),
            Err(ReplyError::Stratum { .. }) if stratum >= 16 => return Ok(false),
            Err(ReplyError::Unsynchronized) if li == 3 => return Ok(false),
            Err(ReplyError::Malformed { .. }) if t2 == 0 || t3 == 0 => return Ok(false),
            Err(ReplyError::RootDistance { distance, max })
                if distance > max && max == self.max_error =>
            {
                return Ok(false);
            }
            Err(e) => return Err(format!("refused: {e}")),
            Ok(s) if stratum == 0 || stratum >= 16 || li == 3 || t2 == 0 || t3 == 0 => {
                return Err(format!("accepted a reply it must refuse: {s:?}"));
            }
            Ok(s) => s,
        };

        // The reply's own bounds, exactly. If they cross (the server's processing time exceeds
        // our round trip), the reply states its midpoint ± the root distance.
        let root = exact_short(u32::from_be_bytes(p[4..8].try_into().unwrap())) / 2
            + exact_short(u32::from_be_bytes(p[8..12].try_into().unwrap()));
        let (x2, x3) = (exact(t2), exact(t3));
        let e = self.elapsed.as_nanos() as i128 * NS;
        let mid = (x2 + x3 + e) / 2;
        let lower = x3.min(mid) - root;
        let upper = (x2 + e).max(mid) + root;
        let drift = crate::combine::drift_ns(self.elapsed, self.ppm);
        let span = s.span;
        if span.lo * NS > lower || span.hi * NS < upper {
            return Err(format!(
                "the span {span:?} misses the reply's bounds [{}, {}] ns",
                lower / NS,
                upper / NS
            ));
        }
        // And no wider than rounding (a few ns) and the drift over the exchange.
        if span.lo * NS < lower - 4 * NS || span.hi * NS > upper + (4 + drift) * NS {
            return Err(format!(
                "the span {span:?} is wider than the reply's bounds [{}, {}] ns",
                lower / NS,
                upper / NS
            ));
        }

        // The rest of the way to the caller: combined alone, carried not at all, widened by any
        // leap it announces, as a TimeInterval.
        let combined = select(&[span], self.ppm).ok_or("one span has no majority")?;
        let announced = leap::pending(&combined.span, [s.leap]);
        let widened = announced.map_or(combined.span, |l| l.apply(combined.span));
        let interval = interval_of(&widened).map_err(|e| e.to_string())?;
        let ns = |t: SystemTime| match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        if ns(interval.earliest()) * NS > lower || ns(interval.latest()) * NS < upper {
            return Err(format!(
                "the interval {interval:?} misses the reply's bounds"
            ));
        }
        Ok(true)
    }
}

#[test]
fn random_replies_never_panic_nor_miss_their_own_bounds() {
    let seed = std::env::var("SYNC_NTP_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut intervals = 0;
    for i in 0..REPLIES {
        let case = Case::random(&mut rng);
        // A panic inside the wire code fails the test too, with the seed printed here first.
        let checked =
            std::panic::catch_unwind(|| case.check()).unwrap_or_else(|_| Err("panicked".into()));
        match checked {
            Ok(became_interval) => intervals += usize::from(became_interval),
            Err(e) => panic!("SYNC_NTP_PROPERTY_SEED={seed}, reply {i}: {e}\n{case:?}"),
        }
    }
    eprintln!(
        "{REPLIES} random replies (seed {seed}): {intervals} became intervals, \
         each containing the reply's own bounds"
    );
    // The generator must reach the interval code, not only the early refusals.
    assert!(
        intervals > REPLIES / 5,
        "only {intervals} of {REPLIES} became intervals"
    );
}
