//! Lock on etcd: etcd's `concurrency.Mutex`, on the contention in [`crate::contention`]. The
//! fencing token is the contender key's create revision.

use std::sync::Arc;

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, Result};
use sync_kit::held::{HeldGrants, Slot};

use crate::{
    BACKEND,
    client::ClientInner,
    contention::{Contender, Holding, contend, first_created, try_contend},
    error::etcd_err,
};

pub(crate) struct EtcdLock {
    client: Arc<ClientInner>,
    /// Held grants through this handle, per prefix (for the seed's `release(id)`).
    mine: HeldGrants<Holding>,
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

    fn guard(&self, id: &str, c: Contender) -> LockGuard {
        let holding = Holding::start(c);
        let (token, lost) = (holding.rev as u64, holding.lost.clone());
        // The local queue's copy of the prefix, not a second one.
        let slot = self.mine.insert(holding.prefix(), holding);
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        LockGuard::new(
            id,
            token,
            lost,
            Box::new(EtcdHeld {
                mine: self.mine.clone(),
                slot,
            }),
        )
    }
}

fn not_held(id: &str, why: &str) -> Error {
    Error::new(ErrorKind::NotHeld, why.to_string())
        .with_backend(BACKEND)
        .with_id(id)
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and id.
#[async_trait]
impl Lock for EtcdLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let prefix = self.prefix(id)?;
        let c = contend(&self.client, "lock", id, &prefix, Vec::new(), opts.wait).await?;
        Ok(self.guard(id, c))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let prefix = self.prefix(id)?;
        Ok(try_contend(&self.client, id, &prefix, Vec::new())
            .await?
            .map(|c| self.guard(id, c)))
    }

    /// The oldest contender's lease, which `etcdctl lease timetolive` and `lease revoke`
    /// take, and its fencing token.
    async fn holder(&self, id: &str) -> Result<Option<String>> {
        let prefix = self.prefix(id)?;
        let resp = self.client.kv().get(prefix, Some(first_created())).await;
        let resp = resp.map_err(|e| etcd_err("reading the holder", e).with_id(id))?;
        Ok(resp.kvs().first().map(|kv| {
            format!(
                "etcd lease {:x} (token {})",
                kv.lease(),
                kv.create_revision()
            )
        }))
    }

    async fn release(&self, id: &str) -> Result<()> {
        let prefix = self.prefix(id)?;
        match self.mine.take_oldest(&prefix) {
            Some(h) => h.release(id).await,
            None => Err(not_held(id, "this handle holds no such lock")),
        }
    }
}

struct EtcdHeld {
    mine: HeldGrants<Holding>,
    /// Its id is the contender prefix (`<ns>/<escaped id>/`).
    slot: Arc<Slot<Holding>>,
}

#[async_trait]
impl HeldLock for EtcdHeld {
    async fn release(&mut self, id: &str) -> Result<()> {
        match self.mine.take(&self.slot) {
            Some(h) => h.release(id).await,
            None => Err(not_held(
                id,
                "the lock was already released through the handle",
            )),
        }
    }

    fn release_in_background(self: Box<Self>, _: &str) {
        // Dropping the holding spawns the delete (it never blocks).
        drop(self.mine.take(&self.slot));
    }
}
