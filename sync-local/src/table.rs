//! The server-side table Lock and Leader share: per key at most one holder (a lock's grant, a
//! group's reign), a wake-up for waiters when a key frees, and a session-end callback that
//! frees the key, and fires the holder's loss signal, when the holder's session ends.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use sync_core::raw::{LossTrigger, loss_signal_until};
use sync_core::{LossSignal, Result};
use sync_kit::locked;
use tokio::{sync::Notify, time::Instant};

use crate::{client::ClientInner, server::Shared};

/// What a primitive keeps in a key's slot beside its holder.
pub(crate) trait SlotState: Default + Send + 'static {
    /// Whether a slot stays in the table once free; if not, freeing removes it.
    const KEEP_FREE: bool = false;

    /// This primitive's table of `shared`, for the session-end callback (which holds only a
    /// weak reference to the cluster).
    fn table(shared: &Shared) -> &Table<Self>;

    /// Called under the table lock when the holder goes (released or lost).
    fn freed(&mut self) {}

    /// Logs that the holder of `key` lost it because its session ended.
    fn log_lost(key: &str, token: u64, reason: &str);
}

/// Every slot of one primitive in a cluster, by namespaced key.
#[derive(Default)]
pub(crate) struct Table<S> {
    slots: Mutex<HashMap<String, Slot<S>>>,
    freed: Notify,
}

#[derive(Default)]
struct Slot<S> {
    holder: Option<Holder>,
    state: S,
}

struct Holder {
    token: u64,
    session: u64,
    registration: u64,
    trigger: LossTrigger,
}

impl<S: SlotState> Table<S> {
    /// Waits until `key` is granted to `client`'s session: its token and loss signal, or None
    /// once `deadline` passes. `init` runs on the slot's state, with the token, when granted.
    pub(crate) async fn grant(
        &self,
        client: &ClientInner,
        key: &str,
        deadline: Option<Instant>,
        init: impl Fn(&mut S, u64),
    ) -> Result<Option<(u64, LossSignal)>> {
        loop {
            // Subscribe before looking, so a release between the look and the wait wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(granted) = self.try_grant(client, key, &init)? {
                return Ok(Some(granted));
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, freed).await.is_err() {
                        return Ok(None);
                    }
                }
                None => freed.await,
            }
        }
    }

    /// Grants `key` to `client`'s session if it is free (see [`grant`](Table::grant)). The
    /// tokens come from the cluster's revision counter. The loss callback is registered under
    /// the table lock, so a session that ends at any point either never sees this grant or
    /// fires its signal.
    pub(crate) fn try_grant(
        &self,
        client: &ClientInner,
        key: &str,
        init: impl Fn(&mut S, u64),
    ) -> Result<Option<(u64, LossSignal)>> {
        let shared = &client.shared;
        loop {
            let session = client.session()?;
            let mut slots = locked(&self.slots);
            if slots.get(key).is_some_and(|s| s.holder.is_some()) {
                return Ok(None);
            }
            // Bound to the session's safe deadline: a holder paused past it sees the loss.
            let Some(deadline) = shared.session_deadline(session) else {
                continue;
            };
            let token = shared.next_revision();
            let (trigger, signal) = loss_signal_until(deadline);
            let on_end = {
                let weak = Arc::downgrade(shared);
                let key = key.to_string();
                Box::new(move |reason: &str| lose::<S>(&weak, &key, token, reason))
            };
            // The session may have been revoked since `session()` looked: this contender never
            // held anything, so it retries on a fresh session instead of reporting a loss.
            let Ok(registration) = shared.on_session_end(session, on_end) else {
                continue;
            };
            let slot = slots.entry(key.to_string()).or_default();
            slot.holder = Some(Holder {
                token,
                session,
                registration,
                trigger,
            });
            init(&mut slot.state, token);
            return Ok(Some((token, signal)));
        }
    }

    /// Frees `key` if `token` still holds it, and forgets its session-end callback. False when
    /// it no longer held.
    pub(crate) fn release(&self, shared: &Shared, key: &str, token: u64) -> bool {
        match self.free(key, token, None) {
            Some(holder) => {
                shared.cancel_on_end(holder.session, holder.registration);
                true
            }
            None => false,
        }
    }

    /// Runs `f` on the state of `key` while it is held — by `token`, if given. None when not.
    pub(crate) fn if_held<R>(
        &self,
        key: &str,
        token: Option<u64>,
        f: impl FnOnce(&mut S) -> R,
    ) -> Option<R> {
        let mut slots = locked(&self.slots);
        let slot = slots.get_mut(key)?;
        let holder = slot.holder.as_ref()?;
        if token.is_some_and(|t| t != holder.token) {
            return None;
        }
        Some(f(&mut slot.state))
    }

    /// Runs `f` on the state of `key`, making its slot if there is none.
    pub(crate) fn with_state<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> R {
        let mut slots = locked(&self.slots);
        f(&mut slots.entry(key.to_string()).or_default().state)
    }

    /// Frees `key` if `token` still holds it and returns its holder. With `lost`, the holder's
    /// signal fires under the table lock, so it hears of the loss before anyone else can be
    /// granted the key.
    fn free(&self, key: &str, token: u64, lost: Option<&str>) -> Option<Holder> {
        let mut slots = locked(&self.slots);
        let slot = slots.get_mut(key)?;
        if slot.holder.as_ref().is_none_or(|h| h.token != token) {
            return None;
        }
        let holder = slot.holder.take()?;
        if let Some(reason) = lost {
            holder.trigger.fire(reason);
        }
        slot.state.freed();
        if !S::KEEP_FREE {
            slots.remove(key);
        }
        drop(slots);
        self.freed.notify_waiters();
        Some(holder)
    }
}

/// Session-end callback: the holder hears of the loss before the key frees for others.
fn lose<S: SlotState>(shared: &Weak<Shared>, key: &str, token: u64, reason: &str) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    if S::table(&shared).free(key, token, Some(reason)).is_some() {
        S::log_lost(key, token, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Cluster, Config};

    fn slots<S>(table: &Table<S>) -> usize {
        locked(&table.slots).len()
    }

    #[tokio::test]
    async fn a_free_slot_leaves_the_table_unless_its_state_is_kept() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let (inner, shared) = (&client.inner, &client.inner.shared);
        let (token, _) = shared
            .locks
            .try_grant(inner, "k", |_, _| {})
            .unwrap()
            .expect("free");
        assert!(
            shared
                .locks
                .try_grant(inner, "k", |_, _| {})
                .unwrap()
                .is_none(),
            "held"
        );
        assert!(
            !shared.locks.release(shared, "k", token + 1),
            "a stale token"
        );
        assert!(shared.locks.release(shared, "k", token));
        assert_eq!(slots(&shared.locks), 0);
        let (term, _) = shared
            .elections
            .try_grant(inner, "g", |_, _| {})
            .unwrap()
            .expect("free");
        assert!(shared.elections.release(shared, "g", term));
        assert_eq!(slots(&shared.elections), 1, "followers keep the group");
    }

    #[tokio::test]
    async fn a_session_end_fires_the_loss_and_frees_the_key() {
        let cluster = Cluster::new();
        let a = cluster.client(Config::default()).expect("client");
        let b = cluster.client(Config::default()).expect("client");
        let locks = &cluster.shared.locks;
        let (token, lost) = locks
            .try_grant(&a.inner, "k", |_, _| {})
            .unwrap()
            .expect("free");
        a.revoke();
        assert!(lost.is_lost());
        let (next, _) = locks
            .try_grant(&b.inner, "k", |_, _| {})
            .unwrap()
            .expect("freed");
        assert!(next > token, "tokens strictly increase");
        assert!(
            !locks.release(&cluster.shared, "k", token),
            "the lost grant"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_granted_on_release_or_gives_up_at_its_deadline() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let (inner, shared) = (&client.inner, &client.inner.shared);
        let (token, _) = shared
            .locks
            .try_grant(inner, "k", |_, _| {})
            .unwrap()
            .expect("free");
        let soon = Instant::now() + Duration::from_millis(20);
        let gave_up = shared.locks.grant(inner, "k", Some(soon), |_, _| {}).await;
        assert!(gave_up.unwrap().is_none());
        let waiter = shared.locks.grant(inner, "k", None, |_, _| {});
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert!(shared.locks.release(shared, "k", token));
        assert!(waiter.await.unwrap().is_some());
    }
}
