//! The loss signal behind [`LockGuard::lost`](crate::LockGuard::lost) and
//! [`Elected::revoked`](crate::Elected::revoked).
//!
//! A signal is lost when its trigger fires (the backend learned of the loss), when its trigger
//! is dropped (whoever guarded it is gone), or — for a signal bound to a lease — as soon as the
//! monotonic clock passes the lease's safe deadline, or the lease's renewer is gone. The
//! deadline is computed on every check, so a holder whose process was paused past its TTL sees
//! the loss on its first check, before any background task has had a chance to run. A signal
//! made under another (its parent, e.g. the session a lock is held with) is also lost when the
//! parent is, with no task and no registration per signal.

use std::{
    future::pending,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::SeqCst, fence},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

/// The sending half, kept by the backend. Dropping it without firing counts as a loss
/// ("signal dropped"), so a crashed renewal task can never leave a holder believing it holds.
#[derive(Debug)]
pub struct LossTrigger {
    flag: Arc<Flag>,
}

/// The receiving half: resolves once the holder can no longer be sure it holds.
///
/// Cheap to clone and to check: one shared allocation per signal, and no lock is taken to fire
/// or drop it unless some task is waiting on it.
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
    flag: Arc<Flag>,
}

/// What a trigger and its signals share.
#[derive(Debug)]
struct Flag {
    /// [`LIVE`], [`FIRED`] or [`GONE`]; it leaves `LIVE` once and never changes again.
    state: AtomicU8,
    lease: Option<Arc<Lease>>,
    /// A signal this one is lost with (see [`loss_signal_under`]).
    parent: Option<Arc<Flag>>,
    /// Made by the first fire or wait: most signals see neither, and a client may hold
    /// thousands of them, so a live, unwatched signal is this small.
    slow: OnceLock<Box<Slow>>,
}

/// The part of a flag only a fire or a wait needs.
#[derive(Debug, Default)]
struct Slow {
    /// The reason, set before the state becomes `FIRED`.
    reason: OnceLock<String>,
    /// How many tasks are in [`LossSignal::wait`]: with none, firing takes no lock.
    waiting: AtomicUsize,
    notify: Notify,
}

const LIVE: u8 = 0;
const FIRED: u8 = 1;
/// The trigger was dropped without firing.
const GONE: u8 = 2;

impl Flag {
    fn new(lease: Option<Arc<Lease>>, parent: Option<Arc<Flag>>) -> Arc<Self> {
        Arc::new(Flag {
            state: AtomicU8::new(LIVE),
            lease,
            parent,
            slow: OnceLock::new(),
        })
    }

    fn slow(&self) -> &Slow {
        self.slow.get_or_init(Box::default)
    }

    /// Wakes the waiters, if any. Called after the state left `LIVE`. A waiter makes the slow
    /// part, counts itself in, then reads the state; this reads them in the opposite order.
    /// With a fence on both sides, either the waiter sees the new state or this sees it
    /// counted in and notifies it.
    fn wake(&self) {
        fence(SeqCst);
        if let Some(slow) = self.slow.get()
            && slow.waiting.load(SeqCst) > 0
        {
            slow.notify.notify_waiters();
        }
    }
}

/// A connected trigger and signal, lost only when fired or dropped.
pub fn loss_signal() -> (LossTrigger, LossSignal) {
    let flag = Flag::new(None, None);
    (LossTrigger { flag: flag.clone() }, LossSignal { flag })
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
    let flag = Flag::new(Some(lease.lease), None);
    (LossTrigger { flag: flag.clone() }, LossSignal { flag })
}

/// A connected trigger and signal that is also lost whenever `parent` is (with the parent's
/// reason), computed on every check like a lease's deadline: a backend holding many things on
/// one session makes each one's signal under the session's, and the session's loss reaches
/// them all at once, with nothing to register or wake per holder.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use sync_core::raw::{loss_signal, loss_signal_under};
///
/// let (session, session_lost) = loss_signal();
/// let (_held, held_lost) = loss_signal_under(&session_lost);
/// assert!(!held_lost.is_lost());
/// session.fire("lease revoked");
/// assert_eq!(held_lost.wait().await, "lease revoked");
/// # }
/// ```
pub fn loss_signal_under(parent: &LossSignal) -> (LossTrigger, LossSignal) {
    let flag = Flag::new(None, Some(parent.flag.clone()));
    (LossTrigger { flag: flag.clone() }, LossSignal { flag })
}

impl LossTrigger {
    /// Fires the signal with a reason. Only the first reason is kept.
    pub fn fire(&self, reason: impl Into<String>) {
        let flag = &*self.flag;
        if flag.state.load(SeqCst) != LIVE {
            return;
        }
        // Of two racing fires, the first to set the reason wins; both store FIRED.
        let _ = flag.slow().reason.set(reason.into());
        flag.state.store(FIRED, SeqCst);
        flag.wake();
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.flag.state.load(SeqCst) == FIRED
    }

    /// Another receiver of the same signal.
    pub fn signal(&self) -> LossSignal {
        LossSignal {
            flag: self.flag.clone(),
        }
    }
}

impl Drop for LossTrigger {
    fn drop(&mut self) {
        let flag = &*self.flag;
        if flag
            .state
            .compare_exchange(LIVE, GONE, SeqCst, SeqCst)
            .is_ok()
        {
            flag.wake();
        }
    }
}

const DROPPED: &str = "signal dropped";
const PAST_DEADLINE: &str = "the lease's safe deadline passed without a confirmed renewal";
const NO_RENEWER: &str = "the lease's renewer stopped";

/// Why a signal is lost (the reason's text is made only when asked for).
enum Why<'a> {
    Fired(&'a str),
    Dropped,
    NoRenewer,
    PastDeadline,
}

impl LossSignal {
    /// Waits for the loss and returns its reason.
    pub async fn wait(&self) -> String {
        let flag = &*self.flag;
        let slow = flag.slow();
        // Pairs with the fence in `Flag::wake` (see there).
        fence(SeqCst);
        slow.waiting.fetch_add(1, SeqCst);
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, SeqCst);
            }
        }
        let _leave = Leave(&slow.waiting);
        let lease = flag.lease.as_deref();
        loop {
            // Made before the check, so a change after it wakes them.
            let fired = slow.notify.notified();
            let moved = lease.map(|l| l.notify.notified());
            if let Some(reason) = self.reason() {
                return reason;
            }
            let until = lease.and_then(Lease::get);
            let moved = async {
                match moved {
                    Some(m) => m.await,
                    None => pending().await,
                }
            };
            let passed = async {
                match until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => pending().await,
                }
            };
            // Made anew on each turn: a parent lost by its deadline may be renewed after all.
            let parent_lost = async {
                match &flag.parent {
                    // Boxed: the parent's wait is this same function.
                    Some(parent) => {
                        let parent = LossSignal {
                            flag: parent.clone(),
                        };
                        Box::pin(parent.wait()).await;
                    }
                    None => pending().await,
                }
            };
            tokio::select! {
                () = fired => {}
                () = moved => {}
                () = passed => {}
                () = parent_lost => {}
            }
        }
    }

    /// Whether the loss has happened: fired, the trigger gone, or the lease's safe deadline
    /// passed (read from the monotonic clock now, not from a flag a task sets).
    pub fn is_lost(&self) -> bool {
        self.why(None).is_some()
    }

    /// [`is_lost`](LossSignal::is_lost) with the clock already read: `now` is a reading taken
    /// just before (so a caller that times its work reads the clock once for both).
    pub fn is_lost_at(&self, now: Instant) -> bool {
        self.why(Some(now)).is_some()
    }

    /// The reason, once lost.
    pub fn reason(&self) -> Option<String> {
        Some(match self.why(None)? {
            Why::Fired(r) => r.to_string(),
            Why::Dropped => DROPPED.to_string(),
            Why::NoRenewer => NO_RENEWER.to_string(),
            Why::PastDeadline => PAST_DEADLINE.to_string(),
        })
    }

    fn why(&self, now: Option<Instant>) -> Option<Why<'_>> {
        why(&self.flag, now)
    }

    /// The safe deadline of the lease this signal (or its parent) is bound to, if any.
    pub fn deadline(&self) -> Option<Instant> {
        let mut flag = &*self.flag;
        loop {
            if let Some(lease) = flag.lease.as_deref() {
                return lease.get();
            }
            flag = flag.parent.as_deref()?;
        }
    }
}

/// Why `flag` is lost, if it is: its own state first, then its parent's, then its lease.
fn why(flag: &Flag, now: Option<Instant>) -> Option<Why<'_>> {
    let dropped = match flag.state.load(SeqCst) {
        LIVE => false,
        FIRED => {
            let reason = flag.slow.get().and_then(|s| s.reason.get());
            return Some(Why::Fired(reason.map_or("", String::as_str)));
        }
        _ => true,
    };
    // The parent's reason before "dropped": whoever guarded this signal may have let it go
    // because the parent was lost.
    if let Some(lost) = flag.parent.as_deref().and_then(|p| why(p, now)) {
        return Some(lost);
    }
    if dropped {
        return Some(Why::Dropped);
    }
    let lease = flag.lease.as_deref()?;
    // A renewer that stops at the deadline (it gave up) leaves it as the reason.
    if now.unwrap_or_else(Instant::now) >= lease.last() {
        return Some(Why::PastDeadline);
    }
    lease.gone.load(SeqCst).then_some(Why::NoRenewer)
}

/// The renewer's side of a lease's safe deadline: the backend's keepalive owns it and moves the
/// deadline forward after each confirmed renewal. Dropping it (the renewer died) loses every
/// signal bound to it.
#[derive(Debug)]
pub struct LeaseClock {
    lease: Arc<Lease>,
}

/// A lease's safe deadline as the holders see it (cheap to clone).
#[derive(Debug, Clone)]
pub struct LeaseDeadline {
    lease: Arc<Lease>,
}

/// What a lease's clock and its deadlines share.
#[derive(Debug)]
struct Lease {
    /// The first safe deadline; the current one is `ahead` nanoseconds later.
    base: Instant,
    ahead: AtomicU64,
    /// Set when the [`LeaseClock`] is dropped.
    gone: AtomicBool,
    /// Woken on every move of the deadline and when the clock goes.
    notify: Notify,
}

impl Lease {
    /// The current safe deadline (None once the renewer is gone).
    fn get(&self) -> Option<Instant> {
        (!self.gone.load(SeqCst)).then(|| self.last())
    }

    /// The last safe deadline the renewer set, gone or not.
    fn last(&self) -> Instant {
        let ahead = Duration::from_nanos(self.ahead.load(SeqCst));
        // Past what the clock can hold: never, in practice.
        let never = || self.base + Duration::from_secs(100 * 365 * 24 * 3600);
        self.base.checked_add(ahead).unwrap_or_else(never)
    }
}

impl LeaseClock {
    /// A lease that is safe until `safe_until`.
    pub fn new(safe_until: Instant) -> Self {
        LeaseClock {
            lease: Arc::new(Lease {
                base: safe_until,
                ahead: AtomicU64::new(0),
                gone: AtomicBool::new(false),
                notify: Notify::new(),
            }),
        }
    }

    /// A renewal was confirmed: the lease is safe until `safe_until` (never moved backwards).
    pub fn confirm(&self, safe_until: Instant) {
        let lease = &*self.lease;
        let ahead = safe_until.saturating_duration_since(lease.base).as_nanos();
        let ahead = u64::try_from(ahead).unwrap_or(u64::MAX);
        if lease.ahead.fetch_max(ahead, SeqCst) < ahead {
            lease.notify.notify_waiters();
        }
    }

    /// The deadline, for the signals of what this lease holds.
    pub fn deadline(&self) -> LeaseDeadline {
        LeaseDeadline {
            lease: self.lease.clone(),
        }
    }
}

impl Drop for LeaseClock {
    fn drop(&mut self) {
        self.lease.gone.store(true, SeqCst);
        self.lease.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_renewer_stopping_past_the_deadline_leaves_the_deadline_as_reason() {
        let clock = LeaseClock::new(Instant::now() + Duration::from_secs(2));
        let (_t, signal) = loss_signal_until(clock.deadline());
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(clock);
        assert_eq!(signal.reason().as_deref(), Some(PAST_DEADLINE));
        assert_eq!(signal.wait().await, PAST_DEADLINE);
    }

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

    #[tokio::test]
    async fn a_dropped_trigger_wakes_its_waiters_and_a_fired_one_keeps_its_reason() {
        let (trigger, signal) = loss_signal();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let signal = signal.clone();
                tokio::spawn(async move { signal.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(!signal.is_lost() && !trigger.is_fired());
        drop(trigger);
        for w in waiting {
            assert_eq!(w.await.unwrap(), DROPPED);
        }
        assert_eq!(signal.reason().as_deref(), Some(DROPPED));

        let (trigger, signal) = loss_signal();
        trigger.fire("first");
        drop(trigger);
        assert_eq!(signal.reason().as_deref(), Some("first"));
        assert!(signal.is_lost_at(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn is_lost_at_reads_the_given_instant() {
        let start = Instant::now();
        let clock = LeaseClock::new(start + Duration::from_secs(2));
        let (_trigger, signal) = loss_signal_until(clock.deadline());
        assert!(!signal.is_lost_at(start + Duration::from_secs(1)));
        assert!(signal.is_lost_at(start + Duration::from_secs(2)));
        assert!(!signal.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_under_another_is_lost_with_it() {
        let start = Instant::now();
        let clock = LeaseClock::new(start + Duration::from_secs(2));
        let (session, session_lost) = loss_signal_until(clock.deadline());
        let (held, held_lost) = loss_signal_under(&session_lost);
        let (_other, other_lost) = loss_signal_under(&session_lost);
        assert_eq!(held_lost.deadline(), Some(start + Duration::from_secs(2)));
        // Its own loss leaves the parent and its siblings alone.
        held.fire("key deleted");
        assert_eq!(held_lost.reason().as_deref(), Some("key deleted"));
        assert!(!session_lost.is_lost() && !other_lost.is_lost());
        // The parent's reaches a waiter, and is computed on a check.
        let waiting = tokio::spawn({
            let other_lost = other_lost.clone();
            async move { other_lost.wait().await }
        });
        tokio::task::yield_now().await;
        session.fire("lease revoked");
        assert_eq!(other_lost.reason().as_deref(), Some("lease revoked"));
        assert_eq!(waiting.await.unwrap(), "lease revoked");
        // So is the parent's lease deadline.
        let (_s, session_lost) = loss_signal_until(clock.deadline());
        let (_h, held_lost) = loss_signal_under(&session_lost);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(held_lost.reason().as_deref(), Some(PAST_DEADLINE));
        assert_eq!(held_lost.wait().await, PAST_DEADLINE);
    }
}
