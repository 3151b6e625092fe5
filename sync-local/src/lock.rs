//! Lock on the in-process backend.

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, LossSignal, Result};

use crate::{
    BACKEND,
    client::ClientInner,
    server::Shared,
    table::{Asker, SlotState, Table},
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
    /// The namespaced key of every id up to the id itself (`<ns>/lock/`).
    prefix: String,
    /// This handle, as the table records it for the seed's `release(id)`.
    owner: u64,
}

/// Handle numbers (0 means no handle).
static HANDLES: AtomicU64 = AtomicU64::new(1);

impl LocalLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        // Ends with the separator the id follows.
        let prefix = client.key(&["lock", ""]);
        LocalLock {
            client,
            prefix,
            owner: HANDLES.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The namespaced key of `id`, made in one allocation.
    fn key(&self, id: &str) -> Arc<str> {
        thread_local! {
            static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
        }
        SCRATCH.with_borrow_mut(|key| {
            key.clear();
            key.push_str(&self.prefix);
            key.push_str(&sync_core::id::escape(id));
            Arc::from(key.as_str())
        })
    }

    fn asker(&self) -> Asker<'_> {
        Asker {
            client: &self.client,
            owner: self.owner,
        }
    }

    /// The guard of a new grant.
    fn guard(&self, id: &str, key: Arc<str>, grant: u64, signal: LossSignal) -> LockGuard {
        let inner = LocalHeld {
            client: self.client.clone(),
            key,
            id_at: self.prefix.len(),
            grant,
            lost: signal.clone(),
        };
        tracing::debug!(backend = BACKEND, id, token = grant, "lock acquired");
        LockGuard::new(id, grant, signal, Box::new(inner))
    }
}

fn not_held(id: &str, lost: bool) -> Error {
    let (kind, why) = if lost {
        (ErrorKind::LockLost, "the lock was lost before release")
    } else {
        (ErrorKind::NotHeld, "the lock is not held by this guard")
    };
    Error::new(kind, why).with_backend(BACKEND).with_id(id)
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and id.
#[async_trait]
impl Lock for LocalLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let key = self.key(id);
        let deadline = opts.wait.map(sync_kit::deadline);
        let locks = &self.client.shared.locks;
        let granted = locks.grant(self.asker(), &key, deadline, |_, _| {}).await?;
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
        Ok(self.guard(id, key, grant, signal))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let key = self.key(id);
        let locks = &self.client.shared.locks;
        let granted = locks.try_grant(self.asker(), &key, |_, _| {})?;
        Ok(granted.map(|(grant, signal)| self.guard(id, key, grant, signal)))
    }

    /// An uncontended grant is one look at the table: no future needed.
    fn grant_now(&self, id: &str) -> Option<LockGuard> {
        let key = self.key(id);
        let locks = &self.client.shared.locks;
        let (grant, signal) = locks.try_grant(self.asker(), &key, |_, _| {}).ok()??;
        Some(self.guard(id, key, grant, signal))
    }

    async fn release(&self, id: &str) -> Result<()> {
        self.client.check_open()?;
        // A lock is exclusive, so this handle holds at most one live grant of `id`.
        if self
            .client
            .shared
            .locks
            .release_owned(&self.key(id), self.owner)
        {
            return Ok(());
        }
        Err(
            Error::new(ErrorKind::NotHeld, "this handle holds no such lock")
                .with_backend(BACKEND)
                .with_id(id),
        )
    }
}

struct LocalHeld {
    /// Keeps the session (and its renewal) alive while the guard lives.
    client: Arc<ClientInner>,
    key: Arc<str>,
    /// Where the escaped id starts in `key` (the id is needed only for errors).
    id_at: usize,
    grant: u64,
    lost: LossSignal,
}

impl LocalHeld {
    fn id(&self) -> String {
        let escaped = self.key.get(self.id_at..).unwrap_or_default();
        sync_core::id::unescape(escaped).unwrap_or_else(|| escaped.to_string())
    }

    fn release_grant(&self) -> bool {
        self.client.shared.locks.release(&self.key, self.grant)
    }

    fn release_here(&self) -> Result<()> {
        // A killed client releases nothing: its lock frees when its session expires.
        self.client.check_open().map_err(|e| e.with_id(self.id()))?;
        if self.release_grant() {
            return Ok(());
        }
        Err(not_held(&self.id(), self.lost.is_lost()))
    }
}

#[async_trait]
impl HeldLock for LocalHeld {
    async fn release(&mut self) -> Result<()> {
        self.release_here()
    }

    fn release_now(&mut self) -> Option<Result<()>> {
        Some(self.release_here())
    }

    fn release_in_background(self: Box<Self>) {
        // Freeing in-process state never blocks, so it happens right here.
        if self.client.is_killed() {
            // A dead process drops nothing: the lock frees when its session expires.
            return;
        }
        self.release_grant();
    }
}
