//! Contenders for one key on one client take turns locally, so that only one of them at a time
//! talks to the server: a release then wakes one waiter per client, not every waiting task,
//! and a backend whose grants are re-entrant per client (a Consul session, an etcd lease) cannot
//! grant one key to two local contenders.
//!
//! Turns are handed over in arrival order, one wake-up per hand-over. A key costs one map entry
//! while anyone holds or waits for its turn, and nothing after: a client holding thousands of
//! keys keeps no lock or queue per key beside that entry.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use crate::locked;

type Shared = Arc<Mutex<State>>;

/// The local turns of one client, by key.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let turns = sync_kit::turns::Turns::default();
/// let first = turns.take("orders").await;
/// assert!(turns.try_take("orders").is_none());
/// let mut second = Box::pin(turns.take("orders"));
/// assert!(futures::poll!(second.as_mut()).is_pending());
/// drop(first);
/// let _second = second.await;
/// # }
/// ```
#[derive(Default)]
pub struct Turns {
    state: Shared,
}

#[derive(Default)]
struct State {
    by_key: HashMap<Arc<str>, Queue>,
    next_ticket: u64,
}

/// One key's turn: whether a contender has it, and who waits for it, oldest first.
#[derive(Default)]
struct Queue {
    taken: bool,
    /// Made only while some contender waits: most keys never see a second one. Boxed so that
    /// the map's entry stays two words (an empty `VecDeque` alone is four).
    #[allow(clippy::box_collection)]
    waiting: Option<Box<VecDeque<Waiter>>>,
}

struct Waiter {
    ticket: u64,
    waker: Option<Waker>,
}

impl Queue {
    /// Free for a newcomer: nobody has it and nobody waits.
    fn is_free(&self) -> bool {
        !self.taken && self.waiting.is_none()
    }

    fn first(&mut self) -> Option<&mut Waiter> {
        self.waiting.as_mut().and_then(|w| w.front_mut())
    }

    /// Removes `ticket` from the waiters; says whether it was the first.
    fn leave(&mut self, ticket: u64) -> bool {
        let Some(waiting) = self.waiting.as_mut() else {
            return false;
        };
        let at = waiting.iter().position(|w| w.ticket == ticket);
        if let Some(at) = at {
            waiting.remove(at);
        }
        if waiting.is_empty() {
            self.waiting = None;
        }
        at == Some(0)
    }

    /// Keeps `waker` to wake waiter `ticket` with (queued again if it was not found).
    fn set_waker(&mut self, ticket: u64, waker: &Waker) {
        let waiting = self.waiting.get_or_insert_default();
        match waiting.iter_mut().find(|w| w.ticket == ticket) {
            Some(w) if w.waker.as_ref().is_some_and(|old| old.will_wake(waker)) => {}
            Some(w) => w.waker = Some(waker.clone()),
            None => waiting.push_back(Waiter {
                ticket,
                waker: Some(waker.clone()),
            }),
        }
    }

    /// The waker of the first waiter, if the turn is free for it.
    fn wake_first(&mut self) -> Option<Waker> {
        if self.taken {
            return None;
        }
        self.first().and_then(|w| w.waker.take())
    }
}

impl State {
    /// The map's key for `key` and its queue (made if new).
    fn queue(&mut self, key: &str) -> (Arc<str>, &mut Queue) {
        let key = match self.by_key.get_key_value(key) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(key),
        };
        let queue = self.by_key.entry(key.clone()).or_default();
        (key, queue)
    }

    /// Forgets `key` once nobody has its turn or waits for it.
    fn forget_if_free(&mut self, key: &str) {
        if self.by_key.get(key).is_some_and(Queue::is_free) {
            self.by_key.remove(key);
        }
    }

    /// Gives the turn of `key` back: to the first waiter (the waker returned), or forgets it.
    fn hand_over(&mut self, key: &str) -> Option<Waker> {
        let queue = self.by_key.get_mut(key)?;
        queue.taken = false;
        let waker = queue.wake_first();
        self.forget_if_free(key);
        waker
    }
}

impl Turns {
    /// Waits for the turn to contend for `key` (at once when no other local contender has it
    /// or waits for it). Cancel-safe: a dropped wait leaves nothing behind.
    pub fn take(&self, key: &str) -> Take {
        let mut state = locked(&self.state);
        let ticket = state.next_ticket;
        let (key, queue) = state.queue(key);
        let ticket = if queue.is_free() {
            queue.taken = true;
            None
        } else {
            let waiter = Waiter {
                ticket,
                waker: None,
            };
            queue.waiting.get_or_insert_default().push_back(waiter);
            state.next_ticket += 1;
            Some(ticket)
        };
        Take {
            state: self.state.clone(),
            key: Some(key),
            ticket,
        }
    }

    /// The turn for `key` if it is free now (nobody has it, nobody waits for it).
    pub fn try_take(&self, key: &str) -> Option<Turn> {
        let mut state = locked(&self.state);
        let (key, queue) = state.queue(key);
        if !queue.is_free() {
            return None;
        }
        queue.taken = true;
        Some(Turn {
            state: self.state.clone(),
            key,
        })
    }

    /// How many keys have a turn taken or waited for.
    pub fn len(&self) -> usize {
        locked(&self.state).by_key.len()
    }

    /// Whether no key has a turn taken or waited for.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The wait for a turn (see [`Turns::take`]).
pub struct Take {
    state: Shared,
    /// None once the turn was returned.
    key: Option<Arc<str>>,
    /// The place in the queue; None once the turn is this wait's.
    ticket: Option<u64>,
}

impl Future for Take {
    type Output = Turn;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Turn> {
        let this = self.get_mut();
        let Some(key) = this.key.as_ref() else {
            panic!("a turn's wait polled after it was granted");
        };
        if let Some(ticket) = this.ticket {
            let mut state = locked(&this.state);
            // A waiter's queue lasts as long as it waits; made again here only to stay safe.
            let queue = state.by_key.entry(key.clone()).or_default();
            let first = queue.first().map(|w| w.ticket);
            if queue.taken || first.is_some_and(|t| t != ticket) {
                queue.set_waker(ticket, cx.waker());
                return Poll::Pending;
            }
            queue.leave(ticket);
            queue.taken = true;
            this.ticket = None;
        }
        let Some(key) = this.key.take() else {
            unreachable!("checked above");
        };
        Poll::Ready(Turn {
            state: this.state.clone(),
            key,
        })
    }
}

impl Drop for Take {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let waker = {
            let mut state = locked(&self.state);
            match self.ticket {
                // Granted but never returned: the turn goes back.
                None => state.hand_over(&key),
                Some(ticket) => {
                    let queue = state.by_key.get_mut(&*key);
                    let waker = queue.and_then(|q| {
                        let was_first = q.leave(ticket);
                        // The turn may have been handed to this one: the next is woken instead.
                        was_first.then(|| q.wake_first()).flatten()
                    });
                    state.forget_if_free(&key);
                    waker
                }
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The turn to contend for one key; the next local contender's starts when it is dropped.
pub struct Turn {
    state: Shared,
    key: Arc<str>,
}

impl Turn {
    /// The key, as the turns' map keeps it (a clone shares its text).
    pub fn key(&self) -> &Arc<str> {
        &self.key
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let waker = locked(&self.state).hand_over(&self.key);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_one_at_a_time_and_forgotten_after() {
        let turns = Turns::default();
        let first = turns.take("k").await;
        let mut second = Box::pin(turns.take("k"));
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop(first);
        let second = second.await;
        drop(second);
        assert!(turns.is_empty());
        // A cancelled wait leaves nothing behind either.
        let held = turns.take("k").await;
        drop(Box::pin(turns.take("k")));
        drop(held);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_cancelled_after_the_holder_left_leaves_nothing() {
        let turns = Turns::default();
        let held = turns.take("a").await;
        let mut waiter = Box::pin(turns.take("a"));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        // Handed to the waiter, which is then cancelled before it runs.
        drop(held);
        drop(waiter);
        assert!(turns.is_empty(), "the queue of a gone key leaked");
    }

    #[tokio::test]
    async fn a_cancelled_first_waiter_passes_the_turn_on() {
        let turns = Turns::default();
        let held = turns.take("a").await;
        let mut first = Box::pin(turns.take("a"));
        let mut second = Box::pin(turns.take("a"));
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop(held);
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second)
            .await
            .expect("the second waiter was woken");
        assert_eq!(turns.len(), 1);
        drop(second);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn a_newcomer_queues_behind_a_woken_waiter() {
        let turns = Turns::default();
        let held = turns.take("a").await;
        let mut waiter = Box::pin(turns.take("a"));
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(held);
        // The waiter was woken but has not run: the turn is its, not a newcomer's.
        assert!(turns.try_take("a").is_none());
        let mut late = Box::pin(turns.take("a"));
        assert!(futures::poll!(late.as_mut()).is_pending());
        let turn = waiter.await;
        assert!(futures::poll!(late.as_mut()).is_pending());
        drop(turn);
        drop(late.await);
        assert!(turns.is_empty());
    }

    #[tokio::test]
    async fn waiters_are_served_in_arrival_order() {
        let turns = Arc::new(Turns::default());
        let held = turns.take("a").await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let wait = turns.take("a");
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let turn = wait.await;
                locked(&order).push(i);
                drop(turn);
            }));
        }
        drop(held);
        for t in tasks {
            t.await.expect("waiter");
        }
        assert_eq!(*locked(&order), vec![0, 1, 2, 3, 4]);
        assert!(turns.is_empty());
    }

    #[test]
    fn a_granted_wait_dropped_unpolled_gives_the_turn_back() {
        let turns = Turns::default();
        drop(turns.take("a"));
        assert!(turns.is_empty());
        assert!(turns.try_take("a").is_some());
    }
}
