//! Lock on the in-process backend.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, LossSignal, Result};
use tracing::Instrument;

use sync_kit::locked;

use crate::{
    BACKEND,
    client::ClientInner,
    server::Shared,
    table::{SlotState, Table},
};

/// Every held lock of a cluster, by namespaced key.
pub(crate) type LockTable = Table<LockSlot>;

/// A lock keeps nothing beside its holder; a free lock leaves the table.
#[derive(Default)]
pub(crate) struct LockSlot;

impl SlotState for LockSlot {
    fn table(shared: &Shared) -> &Table<Self> {
        &shared.locks
    }

    fn log_lost(key: &str, token: u64, reason: &str) {
        tracing::warn!(backend = BACKEND, key, token, reason, "lock lost");
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

    fn key(&self, id: &str) -> String {
        self.client.key(&["lock", id])
    }

    /// Takes the lock if free.
    fn try_grant(&self, id: &str, key: &str) -> Result<Option<LockGuard>> {
        let locks = &self.client.shared.locks;
        let granted = locks.try_grant(&self.client, key, |_, _| {})?;
        Ok(granted.map(|(grant, signal)| self.guard(id, key, grant, signal)))
    }

    /// The guard of a new grant, remembered for the seed's `release(id)`.
    fn guard(&self, id: &str, key: &str, grant: u64, signal: LossSignal) -> LockGuard {
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
        LockGuard::new(id, grant, signal, Box::new(inner))
    }
}

/// Releases `grant` of `key`: NotHeld or LockLost if it no longer held.
fn release_grant(shared: &Shared, id: &str, key: &str, grant: u64, lost: bool) -> Result<()> {
    if shared.locks.release(shared, key, grant) {
        return Ok(());
    }
    let (kind, why) = if lost {
        (ErrorKind::LockLost, "the lock was lost before release")
    } else {
        (ErrorKind::NotHeld, "the lock is not held by this guard")
    };
    Err(Error::new(kind, why).with_backend(BACKEND).with_id(id))
}

#[async_trait]
impl Lock for LocalLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let span = tracing::debug_span!("acquire", backend = BACKEND, primitive = "lock", id);
        async {
            let key = self.key(id);
            let deadline = opts.wait.map(sync_kit::deadline);
            let locks = &self.client.shared.locks;
            let granted = locks.grant(&self.client, &key, deadline, |_, _| {}).await?;
            let (grant, signal) = granted.ok_or_else(|| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "lock not granted within {:?}",
                        opts.wait.unwrap_or_default()
                    ),
                )
                .with_backend(BACKEND)
                .with_id(id)
            })?;
            Ok(self.guard(id, &key, grant, signal))
        }
        .instrument(span)
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let key = self.key(id);
        self.try_grant(id, &key)
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "lock"))]
    async fn release(&self, id: &str) -> Result<()> {
        let key = self.key(id);
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
    lost: LossSignal,
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
