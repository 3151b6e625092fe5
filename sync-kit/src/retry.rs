//! How long a background loop (a worker's claims, its queue's sync, its reaper) waits before it
//! asks the backend again after a failure.

use std::time::Duration;

use sync_core::Error;

use crate::refused_for_good;

/// The pause after each failure of a background loop. A transient failure (the backend
/// unreachable) is retried after the loop's own pause, so an outage ends quickly for it. A
/// refusal no retry can fix (rights revoked, until an operator gives them back) waits twice as
/// long after each one, up to [`Retry::REFUSED_MAX`], and is logged as an error once per run: a
/// worker left without rights asks once per loop every 30 s, not twice a second.
///
/// ```
/// use std::time::Duration;
/// use sync_core::{Error, ErrorKind};
/// use sync_kit::retry::Retry;
///
/// let mut retry = Retry::new(Duration::from_millis(500));
/// let down = Error::new(ErrorKind::Unavailable, "down");
/// let refused = Error::new(ErrorKind::Unauthorized, "403");
/// assert_eq!(retry.after(&down, "claiming"), Duration::from_millis(500));
/// assert_eq!(retry.after(&refused, "claiming"), Duration::from_millis(500));
/// assert_eq!(retry.after(&refused, "claiming"), Duration::from_secs(1));
/// for _ in 0..10 {
///     retry.after(&refused, "claiming");
/// }
/// assert_eq!(retry.after(&refused, "claiming"), Retry::REFUSED_MAX);
/// retry.succeeded();
/// assert_eq!(retry.after(&refused, "claiming"), Duration::from_millis(500));
/// ```
#[derive(Debug, Clone)]
pub struct Retry {
    base: Duration,
    /// The last pause after a refusal; zero outside a run of refusals.
    refused: Duration,
}

impl Retry {
    /// The longest pause after a refusal.
    pub const REFUSED_MAX: Duration = Duration::from_secs(30);

    /// Retries after `base`, and after ever longer pauses while refused.
    pub fn new(base: Duration) -> Retry {
        Retry {
            base,
            refused: Duration::ZERO,
        }
    }

    /// The pause after failure `e` of the loop doing `what` (named in the log).
    pub fn after(&mut self, e: &Error, what: &str) -> Duration {
        if !refused_for_good(e) {
            return self.base;
        }
        if self.refused.is_zero() {
            tracing::error!(error = %e, what, "refused; asking again ever less often, up to every 30 s, until the rights are back");
            self.refused = self.base;
        } else {
            self.refused = (self.refused * 2).min(Self::REFUSED_MAX);
        }
        self.refused
    }

    /// The loop got through: a later refusal starts again from the base pause.
    pub fn succeeded(&mut self) {
        self.refused = Duration::ZERO;
    }
}
