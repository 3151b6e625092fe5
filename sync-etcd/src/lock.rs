//! Lock on etcd: etcd's `concurrency.Mutex`, on the contention in [`crate::contention`]. The
//! fencing token is the contender key's create revision.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, Result};
use sync_kit::locked;
use tracing::Instrument;

use crate::{
    BACKEND,
    client::ClientInner,
    contention::{Contender, Holding, contend, try_contend},
};

/// Held grants through one handle, per prefix, oldest first (for the seed's `release(id)`).
type Mine = Arc<Mutex<HashMap<String, Vec<Arc<Slot>>>>>;

struct Slot {
    holding: Mutex<Option<Holding>>,
}

pub(crate) struct EtcdLock {
    client: Arc<ClientInner>,
    mine: Mine,
}

impl EtcdLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        EtcdLock {
            client,
            mine: Default::default(),
        }
    }

    fn prefix(&self, id: &str) -> Result<String> {
        self.client.check_alive()?;
        Ok(self.client.contender_prefix(id))
    }

    fn guard(&self, id: &str, prefix: String, c: Contender) -> LockGuard {
        let holding = Holding::start(c);
        let (token, lost) = (holding.rev as u64, holding.lost.clone());
        let slot = Arc::new(Slot {
            holding: Mutex::new(Some(holding)),
        });
        locked(&self.mine)
            .entry(prefix.clone())
            .or_default()
            .push(slot.clone());
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        LockGuard::new(
            id,
            token,
            lost,
            Box::new(EtcdHeld {
                mine: self.mine.clone(),
                prefix,
                id: id.to_string(),
                slot,
            }),
        )
    }
}

fn forget(mine: &Mine, prefix: &str, slot: &Arc<Slot>) {
    let mut mine = locked(mine);
    if let Some(slots) = mine.get_mut(prefix) {
        slots.retain(|s| !Arc::ptr_eq(s, slot));
        if slots.is_empty() {
            mine.remove(prefix);
        }
    }
}

fn not_held(id: &str, why: &str) -> Error {
    Error::new(ErrorKind::NotHeld, why.to_string())
        .with_backend(BACKEND)
        .with_id(id)
}

#[async_trait]
impl Lock for EtcdLock {
    #[tracing::instrument(level = "debug", skip(self, opts), fields(backend = BACKEND, primitive = "lock"))]
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let prefix = self.prefix(id)?;
        let c = contend(&self.client, "lock", id, &prefix, Vec::new(), opts.wait).await?;
        Ok(self.guard(id, prefix, c))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let prefix = self.prefix(id)?;
        Ok(try_contend(&self.client, id, &prefix, Vec::new())
            .await?
            .map(|c| self.guard(id, prefix, c)))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn release(&self, id: &str) -> Result<()> {
        let prefix = self.prefix(id)?;
        let holding = {
            let mut mine = locked(&self.mine);
            let slot = mine
                .get_mut(&prefix)
                .and_then(|s| (!s.is_empty()).then(|| s.remove(0)));
            if mine.get(&prefix).is_some_and(Vec::is_empty) {
                mine.remove(&prefix);
            }
            slot.and_then(|s| locked(&s.holding).take())
        };
        match holding {
            Some(h) => h.release(id).await,
            None => Err(not_held(id, "this handle holds no such lock")),
        }
    }
}

struct EtcdHeld {
    mine: Mine,
    prefix: String,
    id: String,
    slot: Arc<Slot>,
}

#[async_trait]
impl HeldLock for EtcdHeld {
    async fn release(&mut self) -> Result<()> {
        let span =
            tracing::debug_span!("release", backend = BACKEND, primitive = "lock", id = %self.id);
        forget(&self.mine, &self.prefix, &self.slot);
        let holding = locked(&self.slot.holding).take();
        match holding {
            Some(h) => h.release(&self.id).instrument(span).await,
            None => Err(not_held(
                &self.id,
                "the lock was already released through the handle",
            )),
        }
    }

    fn release_in_background(self: Box<Self>) {
        forget(&self.mine, &self.prefix, &self.slot);
        // Dropping the holding spawns the delete (it never blocks).
        drop(locked(&self.slot.holding).take());
    }
}
