//! The loss signal behind [`LockGuard::lost`](crate::LockGuard::lost) and
//! [`Elected::revoked`](crate::Elected::revoked).
//!
//! A signal is lost when its trigger fires (the backend learned of the loss), when its trigger
//! is dropped (whoever guarded it is gone), or — for a signal bound to a lease — as soon as the
//! monotonic clock passes the lease's safe deadline, or the lease's renewer is gone. The
//! deadline is computed on every check, so a holder whose process was paused past its TTL sees
//! the loss on its first check, before any background task has had a chance to run.

use tokio::{sync::watch, time::Instant};

/// The sending half, kept by the backend. Dropping it without firing counts as a loss
/// ("signal dropped"), so a crashed renewal task can never leave a holder believing it holds.
#[derive(Debug)]
pub struct LossTrigger {
    tx: watch::Sender<Option<String>>,
    deadline: Option<LeaseDeadline>,
}

/// The receiving half: resolves once the holder can no longer be sure it holds.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (trigger, signal) = sync_core::raw::loss_signal();
/// assert!(!signal.is_lost());
/// trigger.fire("lease revoked");
/// assert_eq!(signal.wait().await, "lease revoked");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LossSignal {
    rx: watch::Receiver<Option<String>>,
    deadline: Option<LeaseDeadline>,
}

/// A connected trigger and signal, lost only when fired or dropped.
pub fn loss_signal() -> (LossTrigger, LossSignal) {
    let (tx, rx) = watch::channel(None);
    (
        LossTrigger { tx, deadline: None },
        LossSignal { rx, deadline: None },
    )
}

/// A connected trigger and signal that is also lost once `lease`'s safe deadline passes or its
/// renewer ([`LeaseClock`]) is gone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use std::time::Duration;
/// use sync_core::raw::{LeaseClock, loss_signal_until};
/// use tokio::time::Instant;
///
/// let clock = LeaseClock::new(Instant::now() + Duration::from_secs(2));
/// let (_trigger, signal) = loss_signal_until(clock.deadline());
/// clock.confirm(Instant::now() + Duration::from_secs(4)); // a renewal was confirmed
/// tokio::time::advance(Duration::from_secs(3)).await;
/// assert!(!signal.is_lost());
/// // No task needs to run for the holder to see it: the check reads the clock.
/// tokio::time::advance(Duration::from_secs(2)).await;
/// assert!(signal.is_lost());
/// # }
/// ```
pub fn loss_signal_until(lease: LeaseDeadline) -> (LossTrigger, LossSignal) {
    let (tx, rx) = watch::channel(None);
    (
        LossTrigger {
            tx,
            deadline: Some(lease.clone()),
        },
        LossSignal {
            rx,
            deadline: Some(lease),
        },
    )
}

impl LossTrigger {
    /// Fires the signal with a reason. Only the first reason is kept.
    pub fn fire(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.tx.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(reason);
            true
        });
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// Another receiver of the same signal.
    pub fn signal(&self) -> LossSignal {
        LossSignal {
            rx: self.tx.subscribe(),
            deadline: self.deadline.clone(),
        }
    }
}

const DROPPED: &str = "signal dropped";
const PAST_DEADLINE: &str = "the lease's safe deadline passed without a confirmed renewal";
const NO_RENEWER: &str = "the lease's renewer stopped";

impl LossSignal {
    /// Waits for the loss and returns its reason.
    pub async fn wait(&self) -> String {
        let mut rx = self.rx.clone();
        let mut lease = self.deadline.clone();
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            let until = lease.as_ref().and_then(LeaseDeadline::get);
            let lease_changed = async {
                match lease.as_mut() {
                    Some(l) => l.changed().await,
                    None => std::future::pending().await,
                }
            };
            let passed = async {
                match until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = rx.changed() => {}
                () = lease_changed => {}
                () = passed => {}
            }
        }
    }

    /// Whether the loss has happened: fired, the trigger gone, or the lease's safe deadline
    /// passed (read from the monotonic clock now, not from a flag a task sets).
    pub fn is_lost(&self) -> bool {
        self.reason().is_some()
    }

    /// The reason, once lost.
    pub fn reason(&self) -> Option<String> {
        if let Some(r) = self.rx.borrow().clone() {
            return Some(r);
        }
        if self.rx.has_changed().is_err() {
            return Some(DROPPED.to_string());
        }
        let lease = self.deadline.as_ref()?;
        if lease.renewer_gone() {
            return Some(NO_RENEWER.to_string());
        }
        lease
            .get()
            .filter(|at| Instant::now() >= *at)
            .map(|_| PAST_DEADLINE.to_string())
    }

    /// The safe deadline of the lease this signal is bound to, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.as_ref().and_then(LeaseDeadline::get)
    }
}

/// The renewer's side of a lease's safe deadline: the backend's keepalive owns it and moves the
/// deadline forward after each confirmed renewal. Dropping it (the renewer died) loses every
/// signal bound to it.
#[derive(Debug)]
pub struct LeaseClock {
    tx: watch::Sender<Instant>,
}

/// A lease's safe deadline as the holders see it (cheap to clone).
#[derive(Debug, Clone)]
pub struct LeaseDeadline {
    rx: watch::Receiver<Instant>,
}

impl LeaseClock {
    /// A lease that is safe until `safe_until`.
    pub fn new(safe_until: Instant) -> Self {
        LeaseClock {
            tx: watch::channel(safe_until).0,
        }
    }

    /// A renewal was confirmed: the lease is safe until `safe_until` (never moved backwards).
    pub fn confirm(&self, safe_until: Instant) {
        self.tx.send_if_modified(|at| {
            let later = safe_until > *at;
            if later {
                *at = safe_until;
            }
            later
        });
    }

    /// The deadline, for the signals of what this lease holds.
    pub fn deadline(&self) -> LeaseDeadline {
        LeaseDeadline {
            rx: self.tx.subscribe(),
        }
    }
}

impl LeaseDeadline {
    /// The current safe deadline (None once the renewer is gone).
    fn get(&self) -> Option<Instant> {
        (!self.renewer_gone()).then(|| *self.rx.borrow())
    }

    fn renewer_gone(&self) -> bool {
        self.rx.has_changed().is_err()
    }

    async fn changed(&mut self) {
        // An error means the renewer is gone, which `reason` reports on the next turn.
        let _ = self.rx.changed().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dead_renewer_loses_every_signal() {
        let clock = LeaseClock::new(Instant::now() + Duration::from_secs(60));
        let (_a, a) = loss_signal_until(clock.deadline());
        let (_b, b) = loss_signal_until(clock.deadline());
        assert!(!a.is_lost() && !b.is_lost());
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.wait().await }
        });
        drop(clock);
        assert_eq!(a.reason().as_deref(), Some(NO_RENEWER));
        assert!(b.is_lost());
        assert_eq!(waiting.await.unwrap(), NO_RENEWER);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_resolves_at_the_deadline_and_follows_renewals() {
        let start = Instant::now();
        let clock = LeaseClock::new(start + Duration::from_secs(2));
        let (_trigger, signal) = loss_signal_until(clock.deadline());
        let waiting = tokio::spawn({
            let signal = signal.clone();
            async move { (signal.wait().await, Instant::now()) }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        clock.confirm(start + Duration::from_secs(5));
        clock.confirm(start + Duration::from_secs(3)); // never backwards
        let (reason, at) = waiting.await.unwrap();
        assert_eq!(reason, PAST_DEADLINE);
        assert_eq!(at, start + Duration::from_secs(5));
        assert_eq!(signal.deadline(), Some(start + Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn a_fired_signal_keeps_its_first_reason() {
        let clock = LeaseClock::new(Instant::now() + Duration::from_secs(60));
        let (trigger, signal) = loss_signal_until(clock.deadline());
        trigger.fire("revoked");
        trigger.fire("again");
        assert_eq!(signal.wait().await, "revoked");
        assert!(trigger.signal().is_lost());
    }
}
