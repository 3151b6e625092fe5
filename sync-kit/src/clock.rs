//! The host's own clock as a [`Time`] source, with the uncertainty the caller states for it.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sync_core::{Error, Result, Time, TimeInterval};

/// The system clock as a [`Time`] source: `now_interval()` is `[now - uncertainty, now +
/// uncertainty]` around [`SystemTime::now`].
///
/// It is exactly as good as the host's clock: the interval contains true time only while the
/// host's clock is within the stated uncertainty of it (say, kept so by an NTP daemon whose
/// bound you know). It cannot notice a clock that is further off. Where that matters, use a
/// source that measures its error, such as `sync-ntp`'s.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::time::Duration;
/// use sync_core::{ErrorKind, Time};
/// use sync_kit::clock::SystemClock;
///
/// let clock = SystemClock::new(Duration::from_millis(50))?;
/// let now = clock.now_interval().await?;
/// assert_eq!(now.width(), Duration::from_millis(100));
///
/// // The default states no uncertainty: the host's clock taken at its word.
/// assert_eq!(SystemClock::default().uncertainty(), Duration::ZERO);
///
/// let err = SystemClock::new(Duration::from_secs(2 * 86_400)).unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidArgument);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock {
    uncertainty: Duration,
}

impl SystemClock {
    /// The largest uncertainty accepted: a clock that may be off by more than a day is no
    /// clock to schedule by.
    pub const MAX_UNCERTAINTY: Duration = Duration::from_secs(86_400);

    /// The system clock, stated to be within `uncertainty` of true time. More than
    /// [`MAX_UNCERTAINTY`](Self::MAX_UNCERTAINTY) is InvalidArgument.
    pub fn new(uncertainty: Duration) -> Result<SystemClock> {
        if uncertainty > Self::MAX_UNCERTAINTY {
            return Err(Error::invalid(format!(
                "system clock uncertainty is {uncertainty:?}; it must be at most {:?}",
                Self::MAX_UNCERTAINTY
            )));
        }
        Ok(SystemClock { uncertainty })
    }

    /// The stated uncertainty (half the interval's width).
    pub fn uncertainty(&self) -> Duration {
        self.uncertainty
    }
}

#[async_trait]
impl Time for SystemClock {
    async fn now_interval(&self) -> Result<TimeInterval> {
        Ok(TimeInterval::around(SystemTime::now(), self.uncertainty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sync_core::ErrorKind;

    #[tokio::test]
    async fn the_interval_is_now_plus_minus_the_uncertainty() {
        let clock = SystemClock::new(Duration::from_secs(1)).unwrap();
        let before = SystemTime::now();
        let now = clock.now_interval().await.unwrap();
        let after = SystemTime::now();
        assert_eq!(now.width(), Duration::from_secs(2));
        let mid = now.midpoint();
        assert!(before <= mid && mid <= after, "{now:?}");

        let exact = SystemClock::default().now_interval().await.unwrap();
        assert_eq!(exact.width(), Duration::ZERO);
    }

    #[test]
    fn an_uncertainty_over_the_limit_is_named() {
        assert!(SystemClock::new(SystemClock::MAX_UNCERTAINTY).is_ok());
        let err =
            SystemClock::new(SystemClock::MAX_UNCERTAINTY + Duration::from_nanos(1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let msg = err.to_string();
        assert!(
            msg.contains("uncertainty") && msg.contains("86400s"),
            "{msg}"
        );
    }
}
