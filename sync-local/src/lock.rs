//! Lock on the in-process backend.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use async_trait::async_trait;
use sync_core::raw::{HeldLock, LossTrigger, loss_signal};
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, Result};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::{
    BACKEND,
    client::{ClientInner, Shared, locked},
};

/// Every held lock of a cluster, by namespaced key.
#[derive(Default)]
pub(crate) struct LockTable {
    held: Mutex<HashMap<String, Holder>>,
    released: Notify,
}

struct Holder {
    grant: u64,
    session: u64,
    registration: u64,
    trigger: LossTrigger,
}

impl LockTable {
    /// Frees `key` if `grant` still holds it and returns its holder. With `lost`, the holder's
    /// signal fires under the table lock, so it hears of the loss before anyone can be granted.
    fn free(&self, key: &str, grant: u64, lost: Option<&str>) -> Option<Holder> {
        let mut held = locked(&self.held);
        if held.get(key).is_none_or(|h| h.grant != grant) {
            return None;
        }
        let holder = held.remove(key)?;
        if let Some(reason) = lost {
            holder.trigger.fire(reason);
        }
        drop(held);
        self.released.notify_waiters();
        Some(holder)
    }
}

pub(crate) struct LocalLock {
    client: Arc<ClientInner>,
    /// Grants taken through this handle, oldest first, for the seed's `release(id)`.
    mine: Arc<Mutex<HashMap<String, Vec<u64>>>>,
}

impl LocalLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        LocalLock {
            client,
            mine: Default::default(),
        }
    }

    fn key(&self, id: &str) -> Result<String> {
        sync_core::id::validate("lock id", id).map_err(|e| e.with_backend(BACKEND))?;
        Ok(self.client.key(&["lock", id]))
    }

    /// Takes the lock if free. The loss callback is registered under the table lock, so a
    /// session that ends at any point either never sees this grant or fires its signal.
    fn try_grant(&self, id: &str, key: &str) -> Result<Option<LockGuard>> {
        let shared = &self.client.shared;
        let (grant, signal) = loop {
            let session = self.client.session()?;
            let mut held = locked(&shared.locks.held);
            if held.contains_key(key) {
                return Ok(None);
            }
            let grant = shared.next_revision();
            let (trigger, signal) = loss_signal();
            let on_end = {
                let weak = Arc::downgrade(shared);
                let key = key.to_string();
                Box::new(move |reason: &str| lose(&weak, &key, grant, reason))
            };
            // The session may have been revoked since `session()` looked: this contender never
            // held anything, so it retries on a fresh session instead of reporting a loss.
            let Ok(registration) = shared.on_session_end(session, on_end) else {
                continue;
            };
            held.insert(
                key.to_string(),
                Holder {
                    grant,
                    session,
                    registration,
                    trigger,
                },
            );
            break (grant, signal);
        };
        locked(&self.mine)
            .entry(key.to_string())
            .or_default()
            .push(grant);
        let inner = LocalHeld {
            client: self.client.clone(),
            mine: self.mine.clone(),
            id: id.to_string(),
            key: key.to_string(),
            grant,
            lost: signal.clone(),
        };
        tracing::debug!(backend = BACKEND, id, token = grant, "lock acquired");
        Ok(Some(LockGuard::new(id, grant, signal, Box::new(inner))))
    }
}

/// Session-end callback: the holder hears of the loss before the lock is freed for others.
fn lose(shared: &Weak<Shared>, key: &str, grant: u64, reason: &str) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    if shared.locks.free(key, grant, Some(reason)).is_some() {
        tracing::warn!(backend = BACKEND, key, token = grant, reason, "lock lost");
    }
}

/// Releases `grant` of `key`: NotHeld or LockLost if it no longer held.
fn release_grant(shared: &Shared, id: &str, key: &str, grant: u64, lost: bool) -> Result<()> {
    match shared.locks.free(key, grant, None) {
        Some(holder) => {
            shared.cancel_on_end(holder.session, holder.registration);
            Ok(())
        }
        None if lost => Err(
            Error::new(ErrorKind::LockLost, "the lock was lost before release")
                .with_backend(BACKEND)
                .with_id(id),
        ),
        None => Err(
            Error::new(ErrorKind::NotHeld, "the lock is not held by this guard")
                .with_backend(BACKEND)
                .with_id(id),
        ),
    }
}

#[async_trait]
impl Lock for LocalLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let span = tracing::debug_span!("acquire", backend = BACKEND, primitive = "lock", id);
        async {
            let key = self.key(id)?;
            let deadline = opts.wait.map(|w| tokio::time::Instant::now() + w);
            loop {
                // Subscribe before looking, so a release between the look and the wait wakes us.
                let released = self.client.shared.locks.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if let Some(guard) = self.try_grant(id, &key)? {
                    return Ok(guard);
                }
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, released).await.map_err(|_| {
                        Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "lock not granted within {:?}",
                                opts.wait.unwrap_or_default()
                            ),
                        )
                        .with_backend(BACKEND)
                        .with_id(id)
                    })?,
                    None => released.await,
                }
            }
        }
        .instrument(span)
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let key = self.key(id)?;
        self.try_grant(id, &key)
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn release(&self, id: &str) -> Result<()> {
        let key = self.key(id)?;
        self.client.check_open()?;
        let grant = {
            let mut mine = locked(&self.mine);
            let grants = mine.get_mut(&key);
            let grant = grants.and_then(|g| (!g.is_empty()).then(|| g.remove(0)));
            if mine.get(&key).is_some_and(Vec::is_empty) {
                mine.remove(&key);
            }
            grant
        };
        let Some(grant) = grant else {
            return Err(
                Error::new(ErrorKind::NotHeld, "this handle holds no such lock")
                    .with_backend(BACKEND)
                    .with_id(id),
            );
        };
        release_grant(&self.client.shared, id, &key, grant, false)
    }
}

struct LocalHeld {
    /// Keeps the session (and its renewal) alive while the guard lives.
    client: Arc<ClientInner>,
    mine: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    id: String,
    key: String,
    grant: u64,
    lost: sync_core::LossSignal,
}

impl LocalHeld {
    fn forget(&self) {
        let mut mine = locked(&self.mine);
        if let Some(grants) = mine.get_mut(&self.key) {
            grants.retain(|g| *g != self.grant);
            if grants.is_empty() {
                mine.remove(&self.key);
            }
        }
    }
}

#[async_trait]
impl HeldLock for LocalHeld {
    async fn release(&mut self) -> Result<()> {
        self.forget();
        // A killed client releases nothing: its lock frees when its session expires.
        self.client.check_open().map_err(|e| e.with_id(&self.id))?;
        release_grant(
            &self.client.shared,
            &self.id,
            &self.key,
            self.grant,
            self.lost.is_lost(),
        )
    }

    fn release_in_background(self: Box<Self>) {
        // Freeing in-process state never blocks, so it happens right here.
        self.forget();
        if self.client.is_killed() {
            // A dead process drops nothing: the lock frees when its session expires.
            return;
        }
        let _ = release_grant(&self.client.shared, &self.id, &self.key, self.grant, true);
    }
}
