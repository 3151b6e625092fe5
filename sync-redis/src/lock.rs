//! Lock on Redis: one key per id, granted by a script with `SET NX PX` semantics and a fencing
//! counter, renewed by the client's renewer, released by an owner-checked delete that
//! publishes the release to the waiters.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, LossSignal, Result};
use sync_kit::locked;

use crate::{
    BACKEND,
    client::ClientInner,
    contend::{Contender, Grant, release},
    keys::HeldKeys,
};

/// Held grants through one handle, per id, oldest first (for the seed's `release(id)`).
type Mine = Arc<Mutex<HashMap<String, Vec<Arc<Slot>>>>>;

/// One held grant; emptied by whichever release comes first.
struct Slot {
    grant: Mutex<Option<Grant>>,
}

pub(crate) struct RedisLock {
    client: Arc<ClientInner>,
    mine: Mine,
}

impl RedisLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        RedisLock {
            client,
            mine: Default::default(),
        }
    }

    fn contender<'a>(&'a self, keys: &'a HeldKeys) -> Contender<'a> {
        Contender {
            client: &self.client,
            keys,
            payload: b"",
            announce: false,
            owner: self.client.owner(),
        }
    }

    fn guard(&self, id: &str, keys: HeldKeys, grant: Grant) -> LockGuard {
        let (token, lost) = (grant.token, grant.lost.clone());
        let slot = Arc::new(Slot {
            grant: Mutex::new(Some(grant)),
        });
        locked(&self.mine)
            .entry(id.to_string())
            .or_default()
            .push(slot.clone());
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        LockGuard::new(
            id,
            token,
            lost.clone(),
            Box::new(RedisHeld {
                client: self.client.clone(),
                mine: self.mine.clone(),
                id: id.to_string(),
                keys,
                slot,
                lost,
            }),
        )
    }
}

#[async_trait]
impl Lock for RedisLock {
    #[tracing::instrument(level = "debug", skip(self, opts), fields(backend = BACKEND, primitive = "lock"))]
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let keys = self.client.keys.lock(id);
        let grant = self
            .contender(&keys)
            .wait(&format!("lock {id:?}"), opts.wait)
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(self.guard(id, keys, grant))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let keys = self.client.keys.lock(id);
        let tried = self
            .contender(&keys)
            .try_once()
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(tried.ok().map(|grant| self.guard(id, keys, grant)))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn release(&self, id: &str) -> Result<()> {
        self.client.check_alive()?;
        let slot = {
            let mut mine = locked(&self.mine);
            let slot = mine
                .get_mut(id)
                .and_then(|s| (!s.is_empty()).then(|| s.remove(0)));
            if mine.get(id).is_some_and(Vec::is_empty) {
                mine.remove(id);
            }
            slot
        };
        let grant = slot.and_then(|s| locked(&s.grant).take());
        match grant {
            Some(g) => {
                let lost = g.lost.clone();
                give_back(&self.client, id, &self.client.keys.lock(id), g, &lost).await
            }
            None => Err(not_held(id, "this handle holds no such lock")),
        }
    }
}

/// Releases `grant`: NotHeld/LockLost if it was no longer held.
async fn give_back(
    client: &ClientInner,
    id: &str,
    keys: &HeldKeys,
    grant: Grant,
    lost: &LossSignal,
) -> Result<()> {
    client.renewals.forget(grant.registration);
    let was_held = release(client, keys, &grant.owner, lost)
        .await
        .map_err(|e| e.with_id(id))?;
    if was_held {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::LockLost,
        "the lock was no longer held at release: it expired or redis lost it",
    )
    .with_backend(BACKEND)
    .with_id(id))
}

fn not_held(id: &str, why: &str) -> Error {
    Error::new(ErrorKind::NotHeld, why.to_string())
        .with_backend(BACKEND)
        .with_id(id)
}

fn forget(mine: &Mine, id: &str, slot: &Arc<Slot>) {
    let mut mine = locked(mine);
    if let Some(slots) = mine.get_mut(id) {
        slots.retain(|s| !Arc::ptr_eq(s, slot));
        if slots.is_empty() {
            mine.remove(id);
        }
    }
}

struct RedisHeld {
    client: Arc<ClientInner>,
    mine: Mine,
    id: String,
    keys: HeldKeys,
    slot: Arc<Slot>,
    lost: LossSignal,
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(&mut self) -> Result<()> {
        forget(&self.mine, &self.id, &self.slot);
        let grant = locked(&self.slot.grant).take();
        match grant {
            Some(g) => give_back(&self.client, &self.id, &self.keys, g, &self.lost).await,
            None => Err(not_held(
                &self.id,
                "the lock was already released through the handle",
            )),
        }
    }

    fn release_in_background(self: Box<Self>) {
        forget(&self.mine, &self.id, &self.slot);
        let Some(grant) = locked(&self.slot.grant).take() else {
            return;
        };
        self.client.renewals.forget(grant.registration);
        // Without a runtime the key simply expires one TTL later.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = release(&self.client, &self.keys, &grant.owner, &self.lost).await {
                tracing::debug!(backend = BACKEND, id = %self.id, error = %e, "background release failed");
            }
        });
    }
}
