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
use sync_kit::checked::{InProcessHeld, InProcessLock};

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

    /// Runs `f` on the namespaced key of `id`, built in a reused buffer: looking a key up in
    /// the table allocates nothing (the table keeps its own copy).
    fn with_key<R>(&self, id: &str, f: impl FnOnce(&str) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
        }
        let build = |key: &mut String| {
            key.clear();
            key.push_str(&self.prefix);
            key.push_str(&sync_core::id::escape(id));
        };
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut key) => {
                build(&mut key);
                f(&key)
            }
            // Only if `f` came back here: a buffer of its own.
            Err(_) => {
                let mut key = String::new();
                build(&mut key);
                f(&key)
            }
        })
    }

    fn asker(&self) -> Asker<'_> {
        Asker {
            client: &self.client,
            owner: self.owner,
        }
    }

    /// A grant that needs no wait, if the lock is free: its token, signal and backend side.
    fn try_grant(&self, id: &str) -> Result<Option<(u64, LossSignal, Grant)>> {
        let locks = &self.client.shared.locks;
        let granted = self.with_key(id, |key| locks.try_grant(self.asker(), key, |_, _| {}))?;
        Ok(granted.map(|(token, signal, key)| (token, signal, self.grant(id, key, token))))
    }

    /// The backend side of a new grant.
    fn grant(&self, id: &str, key: Arc<str>, token: u64) -> Grant {
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        Grant {
            client: self.client.clone(),
            key,
            token,
        }
    }

    /// The guard of a new grant.
    fn guard(id: &str, grant: Grant, signal: LossSignal) -> LockGuard {
        let token = grant.token;
        let lost = signal.clone();
        LockGuard::new(id, token, signal, Box::new(LocalHeld { grant, lost }))
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
        let key: Arc<str> = self.with_key(id, |key| Arc::from(key));
        let deadline = opts.wait.map(sync_kit::deadline);
        let locks = &self.client.shared.locks;
        let granted = locks.grant(self.asker(), &key, deadline, |_, _| {}).await?;
        let (token, signal) = granted.ok_or_else(|| {
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
        Ok(Self::guard(id, self.grant(id, key, token), signal))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let granted = self.try_grant(id)?;
        Ok(granted.map(|(_, signal, grant)| Self::guard(id, grant, signal)))
    }

    /// An uncontended grant is one look at the table: no future needed.
    fn grant_now(&self, id: &str) -> Option<LockGuard> {
        let (_, signal, grant) = self.try_grant(id).ok()??;
        Some(Self::guard(id, grant, signal))
    }

    /// The holding session, by its number in this process, and the token.
    async fn holder(&self, id: &str) -> Result<Option<String>> {
        self.client.check_open()?;
        let locks = &self.client.shared.locks;
        let held = self.with_key(id, |key| locks.holder(key));
        Ok(held.map(|(token, session)| format!("local session {session} (token {token})")))
    }

    async fn release(&self, id: &str) -> Result<()> {
        self.client.check_open()?;
        // A lock is exclusive, so this handle holds at most one live grant of `id`.
        let locks = &self.client.shared.locks;
        if self.with_key(id, |key| locks.release_owned(key, self.owner)) {
            return Ok(());
        }
        Err(
            Error::new(ErrorKind::NotHeld, "this handle holds no such lock")
                .with_backend(BACKEND)
                .with_id(id),
        )
    }
}

/// Through the checked layer, an uncontended acquire and its release are one table operation
/// each, with the checked layer's state of the guard in the same allocation as [`Grant`].
impl InProcessLock for LocalLock {
    type Held = Grant;

    fn grant_held(&self, id: &str) -> Option<(u64, LossSignal, Grant)> {
        self.try_grant(id).ok()?
    }
}

/// One grant of a lock, the backend side of its guard.
pub(crate) struct Grant {
    /// Keeps the session (and its renewal) alive while the guard lives.
    client: Arc<ClientInner>,
    /// As the table keeps it.
    key: Arc<str>,
    token: u64,
}

impl Grant {
    fn release_grant(&self) -> bool {
        self.client.shared.locks.release(&self.key, self.token)
    }

    /// Releases lock `id` now; `lost` is the grant's signal, which tells a lost lock from one
    /// not held.
    fn release_here(&self, id: &str, lost: &LossSignal) -> Result<()> {
        // A killed client releases nothing: its lock frees when its session expires.
        self.client.check_open().map_err(|e| e.with_id(id))?;
        if self.release_grant() {
            return Ok(());
        }
        Err(not_held(id, lost.is_lost()))
    }

    fn release_in_background(&self) {
        // Freeing in-process state never blocks, so it happens right here.
        if self.client.is_killed() {
            // A dead process drops nothing: the lock frees when its session expires.
            return;
        }
        self.release_grant();
    }
}

impl InProcessHeld for Grant {
    fn release_held(&mut self, id: &str, lost: &LossSignal) -> Result<()> {
        self.release_here(id, lost)
    }

    fn release_held_in_background(self) {
        self.release_in_background();
    }
}

/// The backend side of a guard of the raw handle: a grant and its signal.
struct LocalHeld {
    grant: Grant,
    lost: LossSignal,
}

#[async_trait]
impl HeldLock for LocalHeld {
    async fn release(&mut self, id: &str) -> Result<()> {
        self.grant.release_here(id, &self.lost)
    }

    fn release_now(&mut self, id: &str) -> Option<Result<()>> {
        Some(self.grant.release_here(id, &self.lost))
    }

    fn release_in_background(self: Box<Self>, _: &str) {
        self.grant.release_in_background();
    }
}
