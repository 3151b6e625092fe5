//! Rolling leases: one lease granted per window and shared by every key written in that
//! window, never renewed, so keys that only need to live a while (finished jobs, write
//! markers) disappear on their own without a sweeper and without a lease per key.

use std::time::Duration;

use sync_core::Result;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    error::etcd_err,
    kv::{Resend, Sender},
};

/// A lease of `keep` + `window`, granted afresh every `window`: a key written under it lives
/// at least `keep` and at most `keep + window`.
pub(crate) struct RollingLease {
    keep: Duration,
    window: Duration,
    what: &'static str,
    current: Mutex<Option<(i64, Instant)>>,
}

impl RollingLease {
    /// `what` names the lease in errors ("the job retention lease").
    pub(crate) fn new(keep: Duration, window: Duration, what: &'static str) -> Self {
        RollingLease {
            keep,
            window,
            what,
            current: Mutex::new(None),
        }
    }

    /// The lease to write with now, granting a new one through `sender` when the window has
    /// passed (an unanswered grant is sent again: a lease granted unseen just expires).
    pub(crate) async fn get(&self, sender: &Sender) -> Result<i64> {
        let mut slot = self.current.lock().await;
        if let Some((lease, granted)) = *slot {
            if granted.elapsed() < self.window {
                return Ok(lease);
            }
        }
        // Whole seconds, rounded up: a key is never dropped before `keep`.
        let life = self.keep + self.window;
        let ttl = life.as_secs() + u64::from(life.subsec_nanos() > 0);
        let granted = Instant::now();
        let secs = i64::try_from(ttl).unwrap_or(i64::MAX);
        let lease = sender
            .send(Resend::IfUnanswered, |c| {
                let mut leases = c.lease_client();
                async move { leases.grant(secs, None).await }
            })
            .await
            .map_err(|e| etcd_err(format!("granting {}", self.what), e))?
            .id();
        *slot = Some((lease, granted));
        Ok(lease)
    }

    /// Forgets the current lease (etcd no longer has it): the next `get` grants another.
    pub(crate) async fn forget(&self) {
        *self.current.lock().await = None;
    }

    /// [`forget`](Self::forget) without waiting, when the lease is in use right now (then the
    /// next window replaces it anyway).
    pub(crate) fn try_forget(&self) {
        if let Ok(mut slot) = self.current.try_lock() {
            *slot = None;
        }
    }
}
