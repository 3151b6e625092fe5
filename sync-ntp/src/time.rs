//! The [`Time`] handle over a [`Client`](crate::Client).

use std::{sync::Arc, time::SystemTime};

use async_trait::async_trait;
use sync_core::{Result, Time, TimeInterval};
use tracing::Instrument;

use crate::{BACKEND, PRIMITIVE, client::Inner};

/// Synchronized time: the cached combined interval carried forward on the monotonic clock,
/// widened by the drift allowance since the last sync. No network round trip between syncs.
pub(crate) struct NtpTime {
    inner: Arc<Inner>,
}

impl NtpTime {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        NtpTime { inner }
    }
}

#[async_trait]
impl Time for NtpTime {
    async fn now_interval(&self) -> Result<TimeInterval> {
        let span = tracing::trace_span!(
            "ntp.now_interval",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %self.inner.id
        );
        self.inner.interval().instrument(span).await
    }

    async fn now(&self) -> Result<SystemTime> {
        let span = tracing::trace_span!(
            "ntp.now",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %self.inner.id
        );
        Ok(self.inner.interval().instrument(span).await?.midpoint())
    }

    async fn after(&self, t: SystemTime) -> Result<bool> {
        let span = tracing::trace_span!(
            "ntp.after",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %self.inner.id
        );
        Ok(self.inner.interval().instrument(span).await?.after(t))
    }

    async fn before(&self, t: SystemTime) -> Result<bool> {
        let span = tracing::trace_span!(
            "ntp.before",
            backend = BACKEND,
            primitive = PRIMITIVE,
            id = %self.inner.id
        );
        Ok(self.inner.interval().instrument(span).await?.before(t))
    }
}
