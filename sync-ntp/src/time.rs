//! The [`Time`] handle over a [`Client`](crate::Client).

use std::sync::Arc;

use async_trait::async_trait;
use sync_core::{Result, Time, TimeInterval};
use tracing::Instrument;

use crate::{BACKEND, PRIMITIVE, client::Inner};

/// Synchronized time: the cached combined interval carried forward on the carry clock
/// (`CLOCK_MONOTONIC_RAW` on Linux), widened by the drift allowance since the last sync and
/// across a pending leap second. No network round trip between syncs.
/// `now`, `after` and `before` are the trait's defaults over `now_interval`.
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
}
