//! The server-side table Lock and Leader share: per key at most one holder (a lock's grant, a
//! group's reign), a first-come-first-served queue of waiters, and a session-end callback that
//! frees, and fires the loss signal of, everything a session held.
//!
//! A release wakes only the first waiter of its key, and the key stays reserved for that waiter
//! (a newcomer queues behind it), so waiters are granted in arrival order, one wake-up per grant.
//! An uncontended grant or release is one critical section on the table.

use std::{
    collections::{HashSet, VecDeque},
    future::poll_fn,
    sync::{Arc, Mutex, MutexGuard, Weak},
    task::{Poll, Waker},
};

use hashbrown::HashMap;
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
    /// Whether a slot stays in the table once free; if not, freeing may remove it.
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

/// Free slots kept (see [`Inner::keep_free`]) before a sweep removes them all, at least: more
/// in a bigger table, so that a sweep visits at most about two slots per free one kept.
const KEPT_FREE: usize = 64;

#[derive(Default)]
struct Inner<S> {
    /// Hashed with foldhash (hashbrown's default) rather than std's SipHash: several times
    /// faster on short keys, and still seeded per process, so ids chosen by users cannot be
    /// made to collide at will. Looked up by `&str`: only a new slot allocates its key.
    slots: HashMap<Arc<str>, Slot<S>>,
    /// Slots kept free since the last sweep (an upper bound of how many are free now).
    kept: usize,
    /// Sessions whose end this table has a callback for: one per session, not one per grant.
    watched: HashSet<u64>,
    /// The session of the last grant (one of `watched`): while it is its client's live
    /// session, that client's grants need neither the look-up nor its session lock.
    last: Option<Arc<Session>>,
    next_waiter: u64,
    /// The last token granted: tokens (fencing tokens, terms) come from this per-table
    /// counter, read under the table lock, so each strictly increases per key.
    token: u64,
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

/// A grant: its token and loss signal, and the key as the table keeps it (cloning it
/// allocates nothing).
pub(crate) type Granted = (u64, LossSignal, Arc<str>);

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

    /// Free, and not kept for its state: a sweep may remove it.
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
                match inner.take_watched(asker, &session, key, ours, &init) {
                    Ok((token, signal, _)) => {
                        place.id = None;
                        return Poll::Ready(Ok((token, signal)));
                    }
                    Err(Refused::SessionEnded) => continue,
                    Err(Refused::Busy) => {}
                }
                let inner = &mut *inner;
                let slot = inner.slots.entry_ref(&**key).or_default();
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
        key: &str,
        init: impl Fn(&mut S, u64),
    ) -> Result<Option<Granted>> {
        asker.client.check_open()?;
        if let Some(took) = self.lock().take_as_last(asker, key, &init) {
            return Ok(took.ok());
        }
        loop {
            let session = asker.client.session_state()?;
            let took = self.lock().take_watched(asker, &session, key, None, &init);
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

    /// The token and session of `key`'s holder, if it is held.
    pub(crate) fn holder(&self, key: &str) -> Option<(u64, u64)> {
        let inner = self.lock();
        let holder = inner.slots.get(key)?.holder.as_ref()?;
        Some((holder.token, holder.session))
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
        f(&mut inner.slots.entry_ref(key).or_default().state)
    }

    /// Frees `key` if `held` accepts its holder, and wakes its first waiter.
    fn free_if(&self, key: &str, held: impl FnOnce(&Holder) -> bool) -> bool {
        let mut inner = self.lock();
        let Some(slot) = inner.slots.get_mut(key) else {
            return false;
        };
        let Some(holder) = slot.holder.take_if(|h| held(h)) else {
            return false;
        };
        slot.state.freed();
        let waker = slot.wake_first();
        if slot.unused() {
            inner.keep_free();
        }
        drop(inner);
        // The trigger drops outside the lock: a released grant's signal reads as dropped.
        drop(holder);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Session-end callback: every key `session` held is lost. Each holder's signal fires under
    /// the table lock, so it hears of the loss before anyone else can be granted the key.
    fn end(&self, session: u64, reason: &str) {
        let mut lost = Vec::new();
        let mut wakers = Vec::new();
        {
            let mut inner = self.lock();
            inner.watched.remove(&session);
            if inner.last.as_ref().is_some_and(|s| s.id == session) {
                inner.last = None;
            }
            // A sweep too: every free slot goes.
            inner.kept = 0;
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
    /// A slot just became free (and [`unused`](Slot::unused)). It is kept, so that the next
    /// grant of its key reuses the slot and its key; once more were kept than the table holds
    /// in use (or [`KEPT_FREE`]), a sweep removes every free one. So free slots never
    /// outnumber those in use by much, and a sweep costs a few steps per slot kept.
    fn keep_free(&mut self) {
        self.kept += 1;
        if self.kept > KEPT_FREE.max(self.slots.len() / 2) {
            self.slots.retain(|_, slot| !slot.unused());
            self.kept = 0;
        }
    }

    /// [`take`](Inner::take) on the session of the last grant, if it is the asker's live
    /// session: no session lock, no look-up. None when it is not (ask the client).
    fn take_as_last(
        &mut self,
        asker: Asker<'_>,
        key: &str,
        init: &impl Fn(&mut S, u64),
    ) -> Option<std::result::Result<Granted, Refused>> {
        let current = asker.client.current_session();
        let session = self.last.take_if(|s| s.id == current && s.alive());
        let session = session?;
        let took = self.take(asker, &session, key, None, init);
        self.last = Some(session);
        Some(took)
    }

    /// [`take`](Inner::take), once this table has a callback for the end of `session`.
    fn take_watched(
        &mut self,
        asker: Asker<'_>,
        session: &Arc<Session>,
        key: &str,
        waiter: Option<u64>,
        init: &impl Fn(&mut S, u64),
    ) -> std::result::Result<Granted, Refused> {
        if self.last.as_ref().is_none_or(|s| s.id != session.id) {
            self.watch(asker, session)?;
            self.last = Some(session.clone());
        }
        self.take(asker, session, key, waiter, init)
    }

    /// Registers this table's session-end callback for `session`, once per session.
    fn watch(&mut self, asker: Asker<'_>, session: &Session) -> std::result::Result<(), Refused> {
        if self.watched.contains(&session.id) {
            return Ok(());
        }
        let shared = &asker.client.shared;
        let weak = Arc::downgrade(shared);
        let id = session.id;
        let on_end = Box::new(move |reason: &str| end::<S>(&weak, id, reason));
        if shared.on_session_end(id, on_end).is_err() {
            return Err(Refused::SessionEnded);
        }
        self.watched.insert(id);
        Ok(())
    }

    /// Grants `key` to `session` if it is free and no earlier waiter is owed it; `waiter` is
    /// the asker's place in the queue, if it has one (it leaves the queue when granted). The
    /// session must be watched.
    fn take(
        &mut self,
        asker: Asker<'_>,
        session: &Session,
        key: &str,
        waiter: Option<u64>,
        init: &impl Fn(&mut S, u64),
    ) -> std::result::Result<Granted, Refused> {
        // Checked under the table lock: a session that ends later frees this grant through
        // its callback, which takes this lock; one that already ended is never granted to.
        if !session.alive() {
            return Err(Refused::SessionEnded);
        }
        // One look-up; a slot made here is free and has no waiters, so it is granted at once.
        let mut entry = self.slots.entry_ref(key).or_default_entry();
        let slot = entry.get_mut();
        let first = slot.waiters.front().map(|w| w.id);
        if slot.holder.is_some() || first.is_some_and(|f| Some(f) != waiter) {
            return Err(Refused::Busy);
        }
        self.token += 1;
        let token = self.token;
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
        Ok((token, signal, entry.key().clone()))
    }
}

/// A waiter's place in its key's queue: dropping it (the wait was cancelled, timed out or
/// failed) leaves the queue, passes a wake-up it got on to the next waiter, and frees the
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
            inner.keep_free();
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

    /// The slots in use (free ones may be kept for reuse until a sweep).
    fn slots<S: SlotState>(table: &Table<S>) -> usize {
        let inner = locked(&table.inner);
        inner.slots.values().filter(|s| !s.unused()).count()
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
        let (token, _, _) = (shared.locks)
            .try_grant(me(&client), &k, |_, _| {})
            .unwrap()
            .expect("free");
        let again = shared.locks.try_grant(me(&client), &k, |_, _| {});
        assert!(again.unwrap().is_none(), "held");
        assert!(!shared.locks.release("k", token + 1), "a stale token");
        assert!(shared.locks.release("k", token));
        assert_eq!(slots(&shared.locks), 0);
        let g = key("g");
        let (term, _, _) = (shared.elections)
            .try_grant(me(&client), &g, |_, _| {})
            .unwrap()
            .expect("free");
        assert!(shared.elections.release("g", term));
        assert_eq!(slots(&shared.elections), 1, "followers keep the group");
    }

    #[tokio::test]
    async fn a_freed_slot_is_reused_and_free_slots_are_swept() {
        let client = Cluster::new().client(Config::default()).expect("client");
        let locks = &client.inner.shared.locks;
        let grant = |k: &str| locks.try_grant(me(&client), k, |_, _| {}).unwrap().unwrap();
        let (token, _, first) = grant("k");
        assert!(locks.release("k", token));
        let (token, _, again) = grant("k");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the free slot's key was not reused"
        );
        assert!(locks.release("k", token));

        // Held locks stay; free slots are swept once they outnumber them.
        let held: Vec<_> = (0..200).map(|i| grant(&format!("held-{i}"))).collect();
        for i in 0..10 * KEPT_FREE {
            let k = format!("gone-{i}");
            let (token, _, _) = grant(&k);
            assert!(locks.release(&k, token));
        }
        let all = locked(&locks.inner).slots.len();
        assert!(all <= 200 + 200 / 2 + 2, "{all} slots for 200 locks in use");
        assert_eq!(slots(locks), 200);
        drop(held);
    }

    #[tokio::test]
    async fn a_session_end_fires_the_loss_and_frees_the_key() {
        let cluster = Cluster::new();
        let a = cluster.client(Config::default()).expect("client");
        let b = cluster.client(Config::default()).expect("client");
        let locks = &cluster.shared.locks;
        let k = key("k");
        let (token, lost, _) = locks
            .try_grant(me(&a), &k, |_, _| {})
            .unwrap()
            .expect("free");
        a.revoke();
        assert!(lost.is_lost());
        let (next, _, _) = locks
            .try_grant(me(&b), &k, |_, _| {})
            .unwrap()
            .expect("freed");
        assert!(next > token, "tokens strictly increase");
        assert!(!locks.release("k", token), "the lost grant");
        // A's next grant is on a new session, which the table also hears the end of.
        let (_, lost, _) = locks
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
        let (token, _, _) = locks
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
        let ((ta, _, _), (tb, _, _)) = (grant(&a), grant(&b));
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
        let (mut token, _, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
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
        let (token, _, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
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
        let (token, _, _) = (locks.try_grant(me(&client), &k, |_, _| {}))
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
