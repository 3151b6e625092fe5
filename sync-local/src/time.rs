//! Time on the in-process backend: the system clock with a configured uncertainty.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sync_core::{Result, Time, TimeInterval};

pub(crate) struct LocalTime {
    uncertainty: Duration,
}

impl LocalTime {
    pub(crate) fn new(uncertainty: Duration) -> Self {
        LocalTime { uncertainty }
    }
}

#[async_trait]
impl Time for LocalTime {
    async fn now_interval(&self) -> Result<TimeInterval> {
        Ok(TimeInterval::around(SystemTime::now(), self.uncertainty))
    }
}
