//! The carry clock: what the cached interval is carried forward on between syncs, and what
//! measures each exchange's T4 − T1.
//!
//! On Linux and Android it is `CLOCK_MONOTONIC_RAW`: the hardware oscillator at the rate the
//! kernel calibrated at boot, which neither adjtimex's frequency correction nor slewing (chrony
//! slews `CLOCK_MONOTONIC` at up to 83 333 ppm) touches. Its error is the oscillator's own,
//! which the configured `drift_ppm` bounds. Elsewhere it is std's [`Instant`]: on Apple targets
//! (`CLOCK_UPTIME_RAW`) and Windows (`QueryPerformanceCounter`) that is not slewed either; on
//! other targets it is `CLOCK_MONOTONIC`, which a clock daemon may slew, so there the allowance
//! also covers [`SLEW_PPM`].
//!
//! Like `CLOCK_MONOTONIC`, the carry clock stops while the machine is suspended; the client
//! covers that by comparing it with the wall clock (see `client::carry`).

#[cfg(not(any(target_os = "linux", target_os = "android")))]
use std::time::Instant;
use std::{io, time::Duration};

/// A reading of the carry clock: the time since an arbitrary origin fixed for the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Tick(Duration);

impl Tick {
    /// The carry clock now.
    pub(crate) fn now() -> Tick {
        Tick(imp::read())
    }

    /// `self − earlier`, or `None` if `earlier` is later.
    pub(crate) fn checked_duration_since(self, earlier: Tick) -> Option<Duration> {
        self.0.checked_sub(earlier.0)
    }

    /// `self − earlier`, or zero if `earlier` is later.
    pub(crate) fn saturating_duration_since(self, earlier: Tick) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// `d` later (saturating; only tests carry a tick forward by hand).
    #[cfg(test)]
    pub(crate) fn plus(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(d))
    }
}

/// The carry clock's name, for errors and docs.
pub(crate) const NAME: &str = imp::NAME;

/// How fast, in parts per million, the host's clock daemon may slew the carry clock. Added to
/// the configured oscillator tolerance. Zero where the carry clock is not slewed.
pub(crate) const SLEW_PPM: f64 = imp::SLEW_PPM;

/// Whether the carry clock can be read here: checked once, at connect, so that a kernel or
/// sandbox without it gives a clear error instead of a failure later.
pub(crate) fn probe() -> io::Result<()> {
    imp::probe()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::{io, time::Duration};

    use rustix::time::{ClockId, DynamicClockId, clock_gettime, clock_gettime_dynamic};

    pub(super) const NAME: &str = "CLOCK_MONOTONIC_RAW";
    pub(super) const SLEW_PPM: f64 = 0.0;

    pub(super) fn probe() -> io::Result<()> {
        clock_gettime_dynamic(DynamicClockId::Known(ClockId::MonotonicRaw))
            .map(drop)
            .map_err(io::Error::from)
    }

    pub(super) fn read() -> Duration {
        let ts = clock_gettime(ClockId::MonotonicRaw);
        // Never negative nor out of range; defaults keep this free of panics regardless.
        Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        )
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::{io, sync::OnceLock, time::Duration};

    use super::Instant;

    /// Not slewed on Apple targets (`CLOCK_UPTIME_RAW`) nor on Windows (QPC).
    #[cfg(any(target_vendor = "apple", windows))]
    pub(super) const NAME: &str = "std::time::Instant (not slewed on this target)";
    #[cfg(any(target_vendor = "apple", windows))]
    pub(super) const SLEW_PPM: f64 = 0.0;

    /// `CLOCK_MONOTONIC`, which may be slewed: allow 10 %, Linux's own limit on tick
    /// adjustment, above chrony's 83 333 ppm and the BSD kernels' adjtime and PLL rates.
    #[cfg(not(any(target_vendor = "apple", windows)))]
    pub(super) const NAME: &str = "std::time::Instant (CLOCK_MONOTONIC, slewable)";
    #[cfg(not(any(target_vendor = "apple", windows)))]
    pub(super) const SLEW_PPM: f64 = 100_000.0;

    pub(super) fn probe() -> io::Result<()> {
        Ok(())
    }

    pub(super) fn read() -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;
    use rustix::time::{ClockId, clock_gettime};

    fn read(id: ClockId) -> Duration {
        let ts = clock_gettime(id);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// The carry clock is CLOCK_MONOTONIC_RAW: a tick lies between two raw readings taken around
    /// it. (CLOCK_MONOTONIC, which the host's NTP daemon slews, differs from it by whatever the
    /// daemon corrected since boot — printed, for the record.)
    #[test]
    fn the_carry_clock_is_clock_monotonic_raw() {
        assert!(probe().is_ok());
        assert_eq!(SLEW_PPM, 0.0);
        let before = read(ClockId::MonotonicRaw);
        let tick = Tick::now();
        let after = read(ClockId::MonotonicRaw);
        assert!(
            before <= tick.0 && tick.0 <= after,
            "{before:?} <= {tick:?} <= {after:?}"
        );
        let monotonic = read(ClockId::Monotonic);
        eprintln!(
            "CLOCK_MONOTONIC - CLOCK_MONOTONIC_RAW = {:?} (the slew since boot)",
            monotonic.abs_diff(after)
        );
    }
}
