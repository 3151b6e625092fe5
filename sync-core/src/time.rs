//! Synchronized time with a stated uncertainty.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::{Error, Result};

/// A span `[earliest, latest]` that contains true time, TrueTime-style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeInterval {
    earliest: SystemTime,
    latest: SystemTime,
}

impl TimeInterval {
    /// An interval; InvalidArgument if `earliest` is after `latest`.
    pub fn new(earliest: SystemTime, latest: SystemTime) -> Result<Self> {
        if earliest > latest {
            return Err(Error::invalid("time interval: earliest is after latest"));
        }
        Ok(TimeInterval { earliest, latest })
    }

    /// The interval `[t - error, t + error]`.
    pub fn around(t: SystemTime, error: Duration) -> Self {
        let earliest = t.checked_sub(error).unwrap_or(SystemTime::UNIX_EPOCH);
        let latest = t.checked_add(error).unwrap_or(t);
        TimeInterval { earliest, latest }
    }

    /// The earliest possible true time.
    pub fn earliest(&self) -> SystemTime {
        self.earliest
    }

    /// The latest possible true time.
    pub fn latest(&self) -> SystemTime {
        self.latest
    }

    /// The midpoint, the best single estimate.
    pub fn midpoint(&self) -> SystemTime {
        self.earliest + self.width() / 2
    }

    /// `latest - earliest`.
    pub fn width(&self) -> Duration {
        self.latest
            .duration_since(self.earliest)
            .unwrap_or_default()
    }

    /// True when `t` has certainly passed.
    pub fn after(&self, t: SystemTime) -> bool {
        self.earliest > t
    }

    /// True when `t` has certainly not arrived.
    pub fn before(&self, t: SystemTime) -> bool {
        self.latest < t
    }

    /// True when `t` lies in the interval.
    pub fn contains(&self, t: SystemTime) -> bool {
        self.earliest <= t && t <= self.latest
    }
}

/// Synchronized wall time.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::{sync::Arc, time::SystemTime};
/// use sync_core::{Backend, Time};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let time: Arc<dyn Time> = client.time()?;
/// let start = SystemTime::now();
/// let now = time.now_interval().await?;
/// assert!(now.earliest() <= now.latest());
/// assert!(!now.before(start));
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Time: Send + Sync {
    /// An interval that contains true time given the sources' stated error.
    async fn now_interval(&self) -> Result<TimeInterval>;

    /// The best estimate of now (the interval's midpoint).
    async fn now(&self) -> Result<SystemTime> {
        Ok(self.now_interval().await?.midpoint())
    }

    /// True when `t` has certainly passed.
    async fn after(&self, t: SystemTime) -> Result<bool> {
        Ok(self.now_interval().await?.after(t))
    }

    /// True when `t` has certainly not arrived.
    async fn before(&self, t: SystemTime) -> Result<bool> {
        Ok(self.now_interval().await?.before(t))
    }
}
