//! The client's one Consul session: created at connect, renewed every half TTL, watched with a
//! blocking query so that its invalidation is seen at once, and replaced when it is gone. Every
//! key the client holds is held by it; each held key has its own loss signal, bound to the
//! session's safe deadline (the last confirmed renewal's send time plus the TTL, minus a
//! margin), which does not count on Consul taking up to twice the TTL to invalidate it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sync_core::raw::{LeaseClock, LossTrigger, loss_signal_until};
use sync_core::{Error, LossSignal, Result};
use sync_kit::{locked, turns::Turns};
use tokio::{sync::watch, time::Instant};

use crate::{
    BACKEND,
    api::{Api, KvEntry, KvOp, MAX_TXN_OPS, Txn},
    error::closed,
    fence::Fence,
};

/// How far before the safe end of a renewal the holders stop trusting it: the session is only
/// known to live until the renewal's send time plus the TTL, and the servers' clocks may run a
/// little fast.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    ttl / 5
}

/// How soon a failed renewal is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// A key held through a session.
struct Held {
    key: String,
    trigger: LossTrigger,
    /// Unlocked rather than deleted on close: a task claim, whose released key is how the
    /// other workers learn that its job needs a new attempt.
    keep: bool,
}

/// One Consul session of this client.
pub(crate) struct Session {
    pub(crate) id: String,
    clock: LeaseClock,
    /// The clock's deadline, for the renewer to read.
    safe_until: Mutex<Instant>,
    /// When the renewer renews it next.
    due: Mutex<Instant>,
    held: Mutex<HashMap<u64, Held>>,
    /// Set once the session is known gone or given up: later registrations are lost at once.
    ended: Mutex<Option<String>>,
    /// What its grants check, so that one arriving late fails.
    pub(crate) fence: Fence,
    /// The per-key local turns of the contenders granting under this session: Consul grants
    /// a key again to the session holding it. A holder lost with the session keeps its turn
    /// here only; the next session's contenders take turns of their own.
    pub(crate) turns: Turns,
    /// Turns true when the session ends (see [`Session::ended`]).
    ended_tx: watch::Sender<bool>,
}

impl Session {
    fn new(id: String, sent: Instant, ttl: Duration, fence_prefix: &str) -> Session {
        let safe_until = sent + ttl - safety_margin(ttl);
        Session {
            fence: Fence::new(fence_prefix, &id),
            id,
            clock: LeaseClock::new(safe_until),
            safe_until: Mutex::new(safe_until),
            // Creating it was its first renewal.
            due: Mutex::new(sent + ttl / 2),
            held: Mutex::default(),
            ended: Mutex::default(),
            turns: Turns::default(),
            ended_tx: watch::channel(false).0,
        }
    }

    /// Resolves once the session has ended (known gone, given up, or its client closed).
    pub(crate) async fn ended(&self) {
        let _ = self.ended_tx.subscribe().wait_for(|e| *e).await;
    }

    /// Ends the session for its holders: each learns `reason`.
    fn end(&self, reason: &str) {
        let mut ended = locked(&self.ended);
        if ended.is_none() {
            *ended = Some(reason.to_string());
        }
        let held: Vec<Held> = locked(&self.held).drain().map(|(_, h)| h).collect();
        drop(ended);
        for h in held {
            h.trigger.fire(reason);
        }
        self.ended_tx.send_replace(true);
    }

    fn is_ended(&self) -> bool {
        locked(&self.ended).is_some()
    }

    /// Whether the session may still live: not known gone, and its safe deadline not passed
    /// (once it has, the renewer destroys it, so what it holds is released either way).
    pub(crate) fn alive(&self) -> bool {
        !self.is_ended() && Instant::now() < *locked(&self.safe_until)
    }
}

/// Registers and forgets held keys, and hands out the live session.
pub(crate) struct Sessions {
    api: Arc<Api>,
    name: String,
    /// `<ns>/:fence/`: where each session's grant fence is.
    fence_prefix: String,
    ttl: Duration,
    lock_delay: Duration,
    current: Mutex<Option<Arc<Session>>>,
    /// Serializes replacing the session.
    creating: tokio::sync::Mutex<()>,
    next: AtomicU64,
    killed: watch::Receiver<bool>,
    /// Woken when a new session replaces the old one (the renewer watches the new one).
    replaced: watch::Sender<u64>,
}

/// A registration: which session holds the key and its number there.
#[derive(Clone)]
pub(crate) struct Registration {
    pub(crate) session: Arc<Session>,
    pub(crate) number: u64,
}

impl Sessions {
    /// Creates the first session (proving the agent answers and the token may) and starts
    /// renewing it.
    pub(crate) async fn start(
        api: Arc<Api>,
        name: String,
        fence_prefix: String,
        ttl: Duration,
        lock_delay: Duration,
        killed: watch::Receiver<bool>,
    ) -> Result<Arc<Sessions>> {
        let sessions = Arc::new(Sessions {
            api,
            name,
            fence_prefix,
            ttl,
            lock_delay,
            current: Mutex::default(),
            creating: tokio::sync::Mutex::new(()),
            next: AtomicU64::new(0),
            killed,
            replaced: watch::channel(0).0,
        });
        sessions.current().await?;
        tokio::spawn(sessions.clone().renew_loop());
        tokio::spawn(sessions.clone().watch_loop());
        Ok(sessions)
    }

    /// The live session, creating one if there is none.
    pub(crate) async fn current(&self) -> Result<Arc<Session>> {
        if *self.killed.borrow() {
            return Err(closed());
        }
        if let Some(s) = locked(&self.current).clone() {
            return Ok(s);
        }
        let _creating = self.creating.lock().await;
        if let Some(s) = locked(&self.current).clone() {
            return Ok(s);
        }
        let sent = Instant::now();
        let id = self
            .api
            .session_create(&self.name, self.ttl, self.lock_delay)
            .await
            .map_err(Error::from)?;
        tracing::debug!(backend = BACKEND, session = %id, "session created");
        let session = Arc::new(Session::new(id, sent, self.ttl, &self.fence_prefix));
        *locked(&self.current) = Some(session.clone());
        self.replaced.send_modify(|n| *n += 1);
        Ok(session)
    }

    /// The session `session` is gone or given up: its holders learn `reason`, and the next
    /// grant gets a new one. A session given up while Consul may still have it (`destroy`) is
    /// destroyed in the background, so that its keys free.
    pub(crate) fn end(&self, session: &Arc<Session>, reason: &str, destroy: bool) {
        {
            let mut current = locked(&self.current);
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
                *current = None;
            }
        }
        session.end(reason);
        // Its late grants fail on the ended session from now on.
        crate::fence::remove_in_background(self.api.clone(), session);
        if destroy {
            let api = self.api.clone();
            let (id, ttl) = (session.id.clone(), self.ttl);
            tokio::spawn(async move {
                let until = Instant::now() + 2 * ttl;
                // After two TTLs without a renewal Consul has ended it anyway.
                while Instant::now() < until {
                    if api.session_destroy(&id).await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(RENEW_RETRY).await;
                }
            });
        }
    }

    /// Registers `key`, granted under `session` by a request sent at `sent`. Its loss signal
    /// fires when the session ends, the key is found held by another, or the session's safe
    /// deadline passes.
    pub(crate) fn register(&self, session: &Arc<Session>, key: &str) -> (Registration, LossSignal) {
        self.register_with(session, key, false)
    }

    /// [`Sessions::register`] for a key that closing the client unlocks instead of deleting.
    pub(crate) fn register_kept(
        &self,
        session: &Arc<Session>,
        key: &str,
    ) -> (Registration, LossSignal) {
        self.register_with(session, key, true)
    }

    fn register_with(
        &self,
        session: &Arc<Session>,
        key: &str,
        keep: bool,
    ) -> (Registration, LossSignal) {
        let (trigger, signal) = loss_signal_until(session.clock.deadline());
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let registration = Registration {
            session: session.clone(),
            number,
        };
        // Inserted under `ended`'s lock, which `Session::end` holds while it drains: a key
        // registered as the session ends is either drained or sees the end here.
        let ended = locked(&session.ended);
        match ended.clone() {
            Some(reason) => trigger.fire(reason),
            None => {
                let held = Held {
                    key: key.to_string(),
                    trigger,
                    keep,
                };
                locked(&session.held).insert(number, held);
            }
        }
        drop(ended);
        (registration, signal)
    }

    /// Stops watching a key (its holder releases it). Whether it was still registered.
    pub(crate) fn forget(&self, registration: &Registration) -> bool {
        locked(&registration.session.held)
            .remove(&registration.number)
            .is_some()
    }

    /// Fires a held key's loss (found held by another, or gone).
    fn lose(&self, session: &Session, number: u64, reason: &str) {
        if let Some(h) = locked(&session.held).remove(&number) {
            h.trigger.fire(reason);
        }
    }

    /// Ends the session on the server: every key it holds frees (after the lock-delay), the
    /// holders learn `reason` first. A new session serves later grants.
    pub(crate) async fn revoke(&self, reason: &str) -> Result<()> {
        let Some(session) = locked(&self.current).clone() else {
            return Ok(());
        };
        self.end(&session, reason, false);
        self.api
            .session_destroy(&session.id)
            .await
            .map_err(Error::from)
    }

    /// Releases every held key, then destroys the session (the client closes).
    pub(crate) async fn close(&self, reason: &str) -> Result<()> {
        let Some(session) = locked(&self.current).take() else {
            return Ok(());
        };
        let keys: Vec<(String, bool)> = locked(&session.held)
            .values()
            .map(|h| (h.key.clone(), h.keep))
            .collect();
        session.end(reason);
        let release = |(k, keep): &(String, bool)| {
            let id = &session.id;
            let free = if *keep {
                KvOp::unlock(k, id)
            } else {
                KvOp::delete(k)
            };
            [KvOp::check_session(k, id), free]
        };
        // Releasing the keys first frees them at once; destroying the session alone would
        // hold them for the lock-delay.
        for chunk in keys.chunks(MAX_TXN_OPS / 2) {
            let ops: Vec<KvOp> = chunk.iter().flat_map(release).collect();
            // A transaction rolled back is no Err: test for it too.
            let done = matches!(
                self.api.txn("releasing held keys", &ops).await,
                Ok(Txn::Done(_))
            );
            if !done {
                // One key held by another fails them all: release one at a time.
                for k in chunk {
                    let _ = self.api.txn("releasing a held key", &release(k)).await;
                }
            }
        }
        let destroyed = self.api.session_destroy(&session.id).await;
        crate::fence::remove_in_background(self.api.clone(), &session);
        destroyed.map_err(Error::from)
    }

    /// Stops everything (the client was killed): holders learn at once, nothing is released.
    pub(crate) fn stop(&self) {
        if let Some(session) = locked(&self.current).take() {
            session.end("client is closed or was killed");
        }
    }

    fn is_killed(&self) -> bool {
        *self.killed.borrow()
    }

    /// Renews the live session every half TTL (sooner again after a failure), then checks
    /// that Consul still gives each held key to it.
    async fn renew_loop(self: Arc<Self>) {
        let mut killed = self.killed.clone();
        let mut replaced = self.replaced.subscribe();
        loop {
            replaced.borrow_and_update();
            let Some(session) = locked(&self.current).clone() else {
                // Replaced lazily by the next grant; nothing is held meanwhile.
                tokio::select! {
                    _ = replaced.changed() => continue,
                    _ = killed.wait_for(|k| *k) => return,
                }
            };
            let due = *locked(&session.due);
            if Instant::now() >= due {
                let nap = self.renew_once(&session).await;
                *locked(&session.due) = Instant::now() + nap;
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                _ = replaced.changed() => {}
                _ = killed.wait_for(|k| *k) => return,
            }
        }
    }

    /// One renewal and key check; how long until the next.
    async fn renew_once(&self, session: &Arc<Session>) -> Duration {
        if session.is_ended() || self.is_killed() {
            return Duration::ZERO;
        }
        let sent = Instant::now();
        match self.api.session_renew(&session.id).await {
            Ok(true) => {
                let safe_until = sent + self.ttl - safety_margin(self.ttl);
                session.clock.confirm(safe_until);
                {
                    let mut last = locked(&session.safe_until);
                    *last = (*last).max(safe_until);
                }
                self.check_keys(session).await;
                self.ttl / 2
            }
            Ok(false) => {
                self.end(session, "the session was invalidated", false);
                Duration::ZERO
            }
            Err(e) => {
                tracing::debug!(backend = BACKEND, error = %e.error(), "session renewal failed");
                let safe_until = *locked(&session.safe_until);
                if Instant::now() >= safe_until {
                    // Consul may still have it: destroy it so its keys do not stay held.
                    self.end(
                        session,
                        "the session's safe deadline passed without a confirmed renewal",
                        true,
                    );
                }
                RENEW_RETRY
            }
        }
    }

    /// Reads every held key (consistent) and fires the loss of each that another session
    /// holds or that is gone.
    async fn check_keys(&self, session: &Arc<Session>) {
        let held: Vec<(u64, String)> = locked(&session.held)
            .iter()
            .map(|(n, h)| (*n, h.key.clone()))
            .collect();
        for chunk in held.chunks(MAX_TXN_OPS) {
            let ops: Vec<KvOp> = chunk.iter().map(|(_, k)| KvOp::get(k)).collect();
            match self.api.txn("checking held keys", &ops).await {
                Ok(Txn::Done(entries)) => self.check_read(session, chunk, entries),
                Ok(Txn::RolledBack(errors)) => {
                    for e in errors {
                        if let Some((number, _)) = chunk.get(e.op_index) {
                            self.lose(session, *number, "the key was deleted by another");
                        }
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Fires the loss of each of the `held` keys that `entries` (their reads) do not give to
    /// `session`. Consul leaves out, without an error, the reads the ACL token may not make:
    /// a key missing from the answer can no longer be watched over.
    fn check_read(&self, session: &Session, held: &[(u64, String)], entries: Vec<Option<KvEntry>>) {
        let mut read: HashMap<String, KvEntry> = (entries.into_iter().flatten())
            .map(|e| (e.key.clone(), e))
            .collect();
        for (number, key) in held {
            let reason = match read.remove(key) {
                Some(e) if e.session.as_deref() == Some(&session.id) => continue,
                Some(_) => "the key is held by another session",
                None => "reading the key back was refused (the ACL token may no longer read it)",
            };
            self.lose(session, *number, reason);
        }
    }

    /// Waits on the live session with blocking queries, so that its invalidation (destroyed,
    /// or expired) is seen at once rather than at the next renewal.
    async fn watch_loop(self: Arc<Self>) {
        let mut killed = self.killed.clone();
        let mut replaced = self.replaced.subscribe();
        loop {
            replaced.borrow_and_update();
            let Some(session) = locked(&self.current).clone() else {
                tokio::select! {
                    _ = replaced.changed() => continue,
                    _ = killed.wait_for(|k| *k) => return,
                }
            };
            tokio::select! {
                () = self.watch(&session) => {}
                _ = replaced.changed() => {}
                _ = killed.wait_for(|k| *k) => return,
            }
        }
    }

    /// Returns once `session` is gone (and ended here) or replaced.
    async fn watch(&self, session: &Arc<Session>) {
        let mut index = 0;
        let mut backoff = Duration::from_millis(100);
        while !session.is_ended() {
            match self.api.session_exists(&session.id, index).await {
                Ok(read) if !read.value => {
                    self.end(session, "the session was invalidated", false);
                    return;
                }
                Ok(read) => {
                    // An index that goes back (a restored server) starts the wait over.
                    index = if read.index < index { 0 } else { read.index };
                    backoff = Duration::from_millis(100);
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
