//! The server-side table Lock and Leader share: per key at most one holder (a lock's grant, a
//! group's reign), a first-come-first-served queue of waiters, and a session-end callback that
//! frees, and fires the loss signal of, everything a session held.
//!
//! A release wakes only the first waiter of its key, and the key stays reserved for that waiter
//! (a newcomer queues behind it), so waiters are granted in arrival order, one wake-up per grant.
//! An uncontended grant or release is one critical section on the table.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::poll_fn,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Poll, Waker},
};

use sync_core::raw::{LossTrigger, loss_signal_until};
use sync_core::{LossSignal, Result};
use sync_kit::locked;
use tokio::time::Instant;

use crate::{
    client::{ClientInner, Session},
    server::Shared,
};

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
    inner: Mutex<Inner<S>>,
}

#[derive(Default)]
struct Inner<S> {
    slots: HashMap<Arc<str>, Slot<S>>,
    /// Sessions whose end this table has a callback for: one per session, not one per grant.
    watched: HashSet<u64>,
    /// The session last found in `watched` (0 for none): a client's grants skip the look-up.
    last_watched: u64,
    next_waiter: u64,
}

#[derive(Default)]
struct Slot<S> {
    holder: Option<Holder>,
    state: S,
    /// Waiting grants, oldest first. While any waits, a free key is the first one's to take.
    waiters: VecDeque<Waiter>,
}

struct Holder {
    token: u64,
    session: u64,
    /// The handle that took it (for a lock's `release(id)`), 0 for none.
    owner: u64,
    trigger: LossTrigger,
}

struct Waiter {
    id: u64,
    /// Taken by the wake-up, so a waiter is woken once per turn.
    waker: Option<Waker>,
}

/// Who asks for a grant: the client (whose session it binds to) and the handle.
#[derive(Clone, Copy)]
pub(crate) struct Asker<'a> {
    pub(crate) client: &'a ClientInner,
    pub(crate) owner: u64,
}

/// Why a look at the table did not grant.
enum Refused {
    /// Held, or reserved for an earlier waiter.
    Busy,
    /// The session ended since it was looked up: look again on a fresh one.
    SessionEnded,
}

impl<S: SlotState> Slot<S> {
    /// Takes the first waiter's waker, if the key is free for it to take.
    fn wake_first(&mut self) -> Option<Waker> {
        if self.holder.is_some() {
            return None;
        }
        self.waiters.front_mut().and_then(|w| w.waker.take())
    }

    fn unused(&self) -> bool {
        !S::KEEP_FREE && self.holder.is_none() && self.waiters.is_empty()
    }
}

impl<S: SlotState> Table<S> {
    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        locked(&self.inner)
    }

    /// Waits until `key` is granted to the asker's session: its token and loss signal, or None
    /// once `deadline` passes. `init` runs on the slot's state, with the token, when granted.
    /// Waiters are granted in arrival order; a dropped wait leaves its queue at once.
    pub(crate) async fn grant(
        &self,
        asker: Asker<'_>,
        key: &Arc<str>,
        deadline: Option<Instant>,
        init: impl Fn(&mut S, u64),
    ) -> Result<Option<(u64, LossSignal)>> {
        let mut place = Place {
            table: self,
            key,
            id: None,
        };
        let wait = poll_fn(|cx| {
            loop {
                let session = asker.client.session_state()?;
                let mut inner = self.lock();
                let ours = place.id;
                match inner.take(asker, &session, key, ours, &init) {
                    Ok(granted) => {
                        place.id = None;
                        return Poll::Ready(Ok(granted));
                    }
                    Err(Refused::SessionEnded) => continue,
                    Err(Refused::Busy) => {}
                }
                let inner = &mut *inner;
                let slot = inner.slots.entry(key.clone()).or_default();
                let waker = Some(cx.waker().clone());
                match ours.and_then(|id| slot.waiters.iter_mut().find(|w| w.id == id)) {
                    Some(w) => w.waker = waker,
                    None => {
                        inner.next_waiter += 1;
                        let id = inner.next_waiter;
                        slot.waiters.push_back(Waiter { id, waker });
                        place.id = Some(id);
                    }
                }
                return Poll::Pending;
            }
        });
        match deadline {
            Some(d) => Ok(tokio::time::timeout_at(d, wait).await.ok().transpose()?),
            None => wait.await.map(Some),
        }
    }

    /// Grants `key` to the asker's session if it is free and nobody waits for it (see
    /// [`grant`](Table::grant)).
    pub(crate) fn try_grant(
        &self,
        asker: Asker<'_>,
        key: &Arc<str>,
        init: impl Fn(&mut S, u64),
    ) -> Result<Option<(u64, LossSignal)>> {
        loop {
            let took = (asker.client)
                .with_session(|session| self.lock().take(asker, session, key, None, &init))?;
            match took {
                Ok(granted) => return Ok(Some(granted)),
                Err(Refused::Busy) => return Ok(None),
                Err(Refused::SessionEnded) => continue,
            }
        }
    }

    /// Frees `key` if `token` still holds it. False when it no longer held.
    pub(crate) fn release(&self, key: &str, token: u64) -> bool {
        self.free_if(key, |h| h.token == token)
    }

    /// Frees `key` if the handle `owner` holds it. False when it did not.
    pub(crate) fn release_owned(&self, key: &str, owner: u64) -> bool {
        owner != 0 && self.free_if(key, |h| h.owner == owner)
    }

    /// Runs `f` on the state of `key` while it is held — by `token`, if given. None when not.
    pub(crate) fn if_held<R>(
        &self,
        key: &str,
        token: Option<u64>,
        f: impl FnOnce(&mut S) -> R,
    ) -> Option<R> {
        let mut inner = self.lock();
        let slot = inner.slots.get_mut(key)?;
        let holder = slot.holder.as_ref()?;
        if token.is_some_and(|t| t != holder.token) {
            return None;
        }
        Some(f(&mut slot.state))
    }

    /// Runs `f` on the state of `key`, making its slot if there is none.
    pub(crate) fn with_state<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> R {
        let mut inner = self.lock();
        f(&mut inner.slots.entry(Arc::from(key)).or_default().state)
    }

    /// Frees `key` if `held` accepts its holder, and wakes its first waiter.
    fn free_if(&self, key: &str, held: impl FnOnce(&Holder) -> bool) -> bool {
        let mut inner = self.lock();
        // Taken out and put back only if still in use: one look-up for a lock nobody awaits.
        let Some((key, mut slot)) = inner.slots.remove_entry(key) else {
            return false;
        };
        let freed = slot.holder.as_ref().is_some_and(held);
        let holder = if freed { slot.holder.take() } else { None };
        let mut waker = None;
        if freed {
            slot.state.freed();
            waker = slot.wake_first();
        }
        if !slot.unused() {
            inner.slots.insert(key, slot);
        }
        drop(inner);
        // The trigger drops outside the lock: a released grant's signal reads as dropped.
        drop(holder);
        if let Some(w) = waker {
            w.wake();
        }
        freed
    }

    /// Session-end callback: every key `session` held is lost. Each holder's signal fires under
    /// the table lock, so it hears of the loss before anyone else can be granted the key.
    fn end(&self, session: u64, reason: &str) {
        let mut lost = Vec::new();
        let mut wakers = Vec::new();
        {
            let mut inner = self.lock();
            inner.watched.remove(&session);
            if inner.last_watched == session {
                inner.last_watched = 0;
            }
            inner.slots.retain(|key, slot| {
                if slot.holder.as_ref().is_some_and(|h| h.session == session) {
                    if let Some(holder) = slot.holder.take() {
                        holder.trigger.fire(reason);
                        lost.push((key.clone(), holder));
                    }
                    slot.state.freed();
                    wakers.extend(slot.wake_first());
                }
                !slot.unused()
            });
        }
        for (key, holder) in lost {
            S::log_lost(&key, holder.token, reason);
        }
        for w in wakers {
            w.wake();
        }
    }
}

impl<S: SlotState> Inner<S> {
    /// Grants `key` to `session` if it is free and no earlier waiter is owed it; `waiter` is
    /// the asker's place in the queue, if it has one (it leaves the queue when granted). The
    /// tokens come from the cluster's revision counter.
    fn take(
        &mut self,
        asker: Asker<'_>,
        session: &Session,
        key: &Arc<str>,
        waiter: Option<u64>,
        init: &impl Fn(&mut S, u64),
    ) -> std::result::Result<(u64, LossSignal), Refused> {
        let shared = &asker.client.shared;
        // Checked under the table lock: a session that ends later frees this grant through
        // its callback, which takes this lock; one that already ended is never granted to.
        if !session.alive() {
            return Err(Refused::SessionEnded);
        }
        if self.last_watched != session.id {
            if !self.watched.contains(&session.id) {
                let weak = Arc::downgrade(shared);
                let id = session.id;
                let on_end = Box::new(move |reason: &str| end::<S>(&weak, id, reason));
                if shared.on_session_end(id, on_end).is_err() {
                    return Err(Refused::SessionEnded);
                }
                self.watched.insert(id);
            }
            self.last_watched = session.id;
        }
        // One look-up; a slot made here is free and has no waiters, so it is granted at once.
        let slot = self.slots.entry(key.clone()).or_default();
        let first = slot.waiters.front().map(|w| w.id);
        if slot.holder.is_some() || first.is_some_and(|f| Some(f) != waiter) {
            return Err(Refused::Busy);
        }
        let token = shared.next_revision();
        // Bound to the session's safe deadline: a holder paused past it sees the loss.
        let (trigger, signal) = loss_signal_until(session.deadline.clone());
        if waiter.is_some() {
            slot.waiters.pop_front();
        }
        slot.holder = Some(Holder {
            token,
            session: session.id,
            owner: asker.owner,
            trigger,
        });
        init(&mut slot.state, token);
        Ok((token, signal))
    }
}

/// A waiter's place in its key's queue: dropping it (the wait was cancelled, timed out or
/// failed) leaves the queue, passes a wake-up it got on to the next waiter, and removes the
/// slot if nothing else is left in it.
struct Place<'a, S: SlotState> {
    table: &'a Table<S>,
    key: &'a Arc<str>,
    id: Option<u64>,
}

impl<S: SlotState> Drop for Place<'_, S> {
    fn drop(&mut self) {
        let Some(id) = self.id else {
            return;
        };
        let mut inner = self.table.lock();
        let Some(slot) = inner.slots.get_mut(&**self.key) else {
            return;
        };
        slot.waiters.retain(|w| w.id != id);
        let waker = slot.wake_first();
        if slot.unused() {
            inner.slots.remove(&**self.key);
        }
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Session-end callback of one table (holding only a weak reference to the cluster).
fn end<S: SlotState>(shared: &Weak<Shared>, session: u64, reason: &str) {
    if let Some(shared) = shared.upgrade() {
        S::table(&shared).end(session, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        task::{Context, Wake},
        time::Duration,
    };

    use super::*;
    use crate::{Cluster, Config};

    fn slots<S>(table: &Table<S>) -> usize {
        locked(&table.inner).slots.len()
    }

    fn me(client: &crate::Client) -> Asker<'_> {
        Asker {
            client: &client.inner,
            owner: 0,
        }
    }

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    /// Counts the wake-ups of one waiter.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Polls `fut` once with a waker that counts into `count`.
    fn poll_counted<F: Future + Unpin>(fut: &mut F, count: &Arc<Count>) -> Poll<F::Output> {
        let waker = Waker::from(count.clone());
        std::pin::Pin::new(fut).poll(&mut Context::from_waker(&waker))
    }

    #[tokio::test]
    async fn a_free_slot_leaves_the_table_unless_its_state_is_kept() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let shared = &client.inner.shared;
        let k = key("k");
        let (token, _) = (shared.locks)
            .try_grant(me(&client), &k, |_, _| {})
            .unwrap()
            .expect("free");
        let again = shared.locks.try_grant(me(&client), &k, |_, _| {});
        assert!(again.unwrap().is_none(), "held");
        assert!(!shared.locks.release("k", token + 1), "a stale token");
        assert!(shared.locks.release("k", token));
        assert_eq!(slots(&shared.locks), 0);
        let g = key("g");
        let (term, _) = (shared.elections)
            .try_grant(me(&client), &g, |_, _| {})
            .unwrap()
            .expect("free");
        assert!(shared.elections.release("g", term));
        assert_eq!(slots(&shared.elections), 1, "followers keep the group");
    }

    #[tokio::test]
    async fn a_session_end_fires_the_loss_and_frees_the_key() {
        let cluster = Cluster::new();
        let a = cluster.client(Config::default()).expect("client");
        let b = cluster.client(Config::default()).expect("client");
        let locks = &cluster.shared.locks;
        let k = key("k");
        let (token, lost) = locks
            .try_grant(me(&a), &k, |_, _| {})
            .unwrap()
            .expect("free");
        a.revoke();
        assert!(lost.is_lost());
        let (next, _) = locks
            .try_grant(me(&b), &k, |_, _| {})
            .unwrap()
            .expect("freed");
        assert!(next > token, "tokens strictly increase");
        assert!(!locks.release("k", token), "the lost grant");
        // A's next grant is on a new session, which the table also hears the end of.
        let (_, lost) = locks
            .try_grant(me(&a), &key("k2"), |_, _| {})
            .unwrap()
            .expect("free");
        a.revoke();
        assert!(lost.is_lost());
        assert_eq!(slots(locks), 1, "only b's grant is left");
    }

    #[tokio::test]
    async fn a_waiter_is_granted_on_release_or_gives_up_at_its_deadline() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let locks = &client.inner.shared.locks;
        let k = key("k");
        let (token, _) = locks
            .try_grant(me(&client), &k, |_, _| {})
            .unwrap()
            .expect("free");
        let soon = Instant::now() + Duration::from_millis(20);
        let gave_up = locks.grant(me(&client), &k, Some(soon), |_, _| {}).await;
        assert!(gave_up.unwrap().is_none());
        let waiter = locks.grant(me(&client), &k, None, |_, _| {});
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        assert!(locks.release("k", token));
        assert!(waiter.await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_release_wakes_one_waiter_of_its_key_only() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let locks = &client.inner.shared.locks;
        let (a, b) = (key("a"), key("b"));
        let grant = |k| locks.try_grant(me(&client), k, |_, _| {}).unwrap().unwrap();
        let ((ta, _), (tb, _)) = (grant(&a), grant(&b));
        let (on_a, on_a2, on_b) = Default::default();
        let mut wait_a = Box::pin(locks.grant(me(&client), &a, None, |_, _| {}));
        let mut wait_a2 = Box::pin(locks.grant(me(&client), &a, None, |_, _| {}));
        let mut wait_b = Box::pin(locks.grant(me(&client), &b, None, |_, _| {}));
        assert!(poll_counted(&mut wait_a, &on_a).is_pending());
        assert!(poll_counted(&mut wait_a2, &on_a2).is_pending());
        assert!(poll_counted(&mut wait_b, &on_b).is_pending());

        assert!(locks.release("a", ta));
        assert_eq!((on_a.get(), on_a2.get(), on_b.get()), (1, 0, 0));
        let Poll::Ready(Ok(Some((ta, _)))) = poll_counted(&mut wait_a, &on_a) else {
            panic!("the first waiter of a was not granted");
        };
        assert!(poll_counted(&mut wait_a2, &on_a2).is_pending());

        assert!(locks.release("b", tb));
        assert_eq!((on_a.get(), on_a2.get(), on_b.get()), (1, 0, 1));
        assert!(locks.release("a", ta));
        assert_eq!((on_a.get(), on_a2.get(), on_b.get()), (1, 1, 1));
        assert!(matches!(
            poll_counted(&mut wait_a2, &on_a2),
            Poll::Ready(Ok(Some(_)))
        ));
        assert!(matches!(
            poll_counted(&mut wait_b, &on_b),
            Poll::Ready(Ok(Some(_)))
        ));
    }

    #[tokio::test]
    async fn waiters_are_granted_in_arrival_order_and_newcomers_queue() {
        let cluster = Cluster::new();
        let client = cluster.client(Config::default()).expect("client");
        let locks = &cluster.shared.locks;
        let k = key("k");
        let (mut token, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
            .unwrap()
            .unwrap();
        let counts: Vec<Arc<Count>> = (0..4).map(|_| Default::default()).collect();
        let mut waits: Vec<_> = (0..4)
            .map(|_| Box::pin(locks.grant(me(&client), &k, None, |_, _| {})))
            .collect();
        for (w, c) in waits.iter_mut().zip(&counts) {
            assert!(poll_counted(w, c).is_pending());
        }
        for (i, (w, c)) in waits.iter_mut().zip(&counts).enumerate() {
            assert!(locks.release("k", token));
            // Reserved for the first waiter: no one else may take it meanwhile.
            let barging = locks.try_grant(me(&client), &k, |_, _| {}).unwrap();
            assert!(
                barging.is_none(),
                "a newcomer took a key owed to waiter {i}"
            );
            let Poll::Ready(Ok(Some((next, _)))) = poll_counted(w, c) else {
                panic!("waiter {i} was not granted in turn");
            };
            assert!(next > token);
            token = next;
            let woken: Vec<usize> = counts.iter().map(|c| c.get()).collect();
            assert_eq!(woken[..=i], vec![1; i + 1], "each woken once, in turn");
            assert!(woken[i + 1..].iter().all(|&n| n == 0), "{woken:?}");
        }
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_state_and_passes_its_turn_on() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let locks = &client.inner.shared.locks;
        let k = key("k");
        let (token, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
            .unwrap()
            .unwrap();
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let mut w1 = Box::pin(locks.grant(me(&client), &k, None, |_, _| {}));
        let mut w2 = Box::pin(locks.grant(me(&client), &k, None, |_, _| {}));
        assert!(poll_counted(&mut w1, &first).is_pending());
        assert!(poll_counted(&mut w2, &second).is_pending());
        assert!(locks.release("k", token));
        assert_eq!((first.get(), second.get()), (1, 0));
        // Woken, then dropped before it took the key: the turn goes to the next waiter.
        drop(w1);
        assert_eq!(second.get(), 1);
        drop(w2);
        assert_eq!(
            slots(locks),
            0,
            "cancelled waiters left their key's slot behind"
        );

        // The same when the key is still held, and with a deadline.
        let (token, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
            .unwrap()
            .unwrap();
        let later = Instant::now() + Duration::from_secs(3600);
        let mut w = Box::pin(locks.grant(me(&client), &k, Some(later), |_, _| {}));
        assert!(poll_counted(&mut w, &first).is_pending());
        drop(w);
        assert!(locks.release("k", token));
        assert_eq!(slots(locks), 0);
        let waiters: usize = (locked(&locks.inner).slots.values())
            .map(|s| s.waiters.len())
            .sum();
        assert_eq!(waiters, 0);
    }
}
