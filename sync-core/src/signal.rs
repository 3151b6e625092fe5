//! The loss signal behind [`LockGuard::lost`](crate::LockGuard::lost) and
//! [`Elected::revoked`](crate::Elected::revoked).

use tokio::sync::watch;

/// The sending half, kept by the backend. Dropping it without firing counts as a loss
/// ("signal dropped"), so a crashed renewal task can never leave a holder believing it holds.
#[derive(Debug)]
pub struct LossTrigger {
    tx: watch::Sender<Option<String>>,
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
}

/// A connected trigger and signal.
pub fn loss_signal() -> (LossTrigger, LossSignal) {
    let (tx, rx) = watch::channel(None);
    (LossTrigger { tx }, LossSignal { rx })
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
        }
    }
}

impl LossSignal {
    /// Waits for the loss and returns its reason.
    pub async fn wait(&self) -> String {
        let mut rx = self.rx.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "signal dropped".to_string(),
        }
    }

    /// Whether the loss has happened (or the trigger is gone).
    pub fn is_lost(&self) -> bool {
        self.rx.borrow().is_some() || self.rx.has_changed().is_err()
    }

    /// The reason, once lost.
    pub fn reason(&self) -> Option<String> {
        if let Some(r) = self.rx.borrow().clone() {
            return Some(r);
        }
        self.rx
            .has_changed()
            .is_err()
            .then(|| "signal dropped".to_string())
    }
}
