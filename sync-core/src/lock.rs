//! Distributed lock.

use std::time::Duration;

use async_trait::async_trait;

use crate::{LossSignal, Result};

/// Options for [`Lock::acquire`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LockOptions {
    /// How long to wait for the lock; `None` waits until it is granted.
    pub wait: Option<Duration>,
}

impl LockOptions {
    /// Default options: wait forever.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds the wait; past it, acquire fails with [`ErrorKind::Timeout`](crate::ErrorKind).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}

/// A distributed mutual-exclusion lock.
///
/// Every acquire is an independent contender, even on one handle. The handle's lease (its
/// TTL) is renewed in the background while any guard lives; if the process dies, the lock frees
/// after about one TTL.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::{sync::Arc, time::Duration};
/// use sync_core::{Backend, Lock, LockOptions};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let lock: Arc<dyn Lock> = client.lock()?;
///
/// let guard = lock.acquire("orders", LockOptions::new()).await?;
/// assert!(lock.try_acquire("orders").await?.is_none(), "held elsewhere");
/// let token = guard.fencing_token(); // pass this to the resource you protect
/// guard.release().await?;
///
/// let again = lock
///     .acquire("orders", LockOptions::new().with_wait(Duration::from_secs(1)))
///     .await?;
/// assert!(again.fencing_token() > token);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Lock: Send + Sync {
    /// Waits until the lock `id` is held by this caller. Dropping the future cancels the wait
    /// and leaves nothing behind.
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard>;

    /// Takes the lock if it is free right now; `None` when it is held elsewhere.
    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>>;

    /// Releases the oldest guard of `id` held through this handle (the seed's `Release(id)`).
    /// [`ErrorKind::NotHeld`](crate::ErrorKind) if this handle holds none.
    async fn release(&self, id: &str) -> Result<()>;

    /// Who holds `id` now, as far as the backend can tell, in words for people (progress
    /// messages, `syncctl`), e.g. `etcd lease 694d81a3c2b1 (token 1042)`. `Ok(None)` when
    /// nobody holds it, and from backends that cannot tell (the default).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
    /// use sync_core::{Backend, LockOptions};
    ///
    /// let backend = sync_local::Client::connect(Default::default())?;
    /// let lock = backend.lock()?;
    /// let guard = lock.acquire("orders", LockOptions::new()).await?;
    /// if let Some(who) = lock.holder("orders").await? {
    ///     println!("orders is held by {who}");
    /// }
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    async fn holder(&self, id: &str) -> Result<Option<String>> {
        let _ = id;
        Ok(None)
    }

    /// A grant that needs neither a wait nor any I/O, if one can be had right now — for an
    /// in-process backend, whose uncontended grant is one look at a table, so that a caller
    /// ([`acquire`](Lock::acquire) of a wrapper) need not build and box a future for it.
    /// `None` means "go through `acquire`/`try_acquire`", which also report any error; the
    /// default always says so. A grant made here follows the same rules as any other (it
    /// never overtakes a queued waiter).
    fn grant_now(&self, id: &str) -> Option<LockGuard> {
        let _ = id;
        None
    }
}

/// The backend side of a held lock, boxed inside a [`LockGuard`].
///
/// Each method is handed the guard's lock id, so the backend side need not keep a copy of its
/// own (it names the id in errors and logs).
#[async_trait]
pub trait HeldLock: Send + Sync + 'static {
    /// Releases the lock `id`; `NotHeld` or `LockLost` if it was no longer held.
    async fn release(&mut self, id: &str) -> Result<()>;

    /// Releases without waiting (called from `Drop`): must not block, so it spawns or sends.
    fn release_in_background(self: Box<Self>, id: &str);

    /// Releases at once, if that needs neither a wait nor any I/O (an in-process backend):
    /// the outcome of [`release`](HeldLock::release) without its future. `None` means "call
    /// `release`" (nothing was done); the default always says so.
    fn release_now(&mut self, id: &str) -> Option<Result<()>> {
        let _ = id;
        None
    }
}

/// Proof of holding a lock. Dropping it releases the lock in the background.
#[must_use = "dropping the guard releases the lock"]
pub struct LockGuard {
    /// Boxed rather than a `String`: a guard is one word smaller, for callers holding many.
    id: Box<str>,
    token: u64,
    lost: LossSignal,
    inner: Option<Box<dyn HeldLock>>,
}

impl LockGuard {
    /// Built by backends.
    pub fn new(
        id: impl Into<String>,
        token: u64,
        lost: LossSignal,
        inner: Box<dyn HeldLock>,
    ) -> Self {
        LockGuard {
            id: id.into().into_boxed_str(),
            token,
            lost,
            inner: Some(inner),
        }
    }

    /// The lock id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A number that strictly increases with each grant of this id: pass it to the protected
    /// resource so it can refuse writes from a stale holder.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// Resolves (with the reason) as soon as this holder can no longer be sure it holds.
    pub async fn lost(&self) -> String {
        self.lost.wait().await
    }

    /// Whether the lock has been lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// [`is_lost`](LockGuard::is_lost) with the clock already read (see
    /// [`LossSignal::is_lost_at`]).
    pub fn is_lost_at(&self, now: tokio::time::Instant) -> bool {
        self.lost.is_lost_at(now)
    }

    /// A clone of the loss signal, to watch from another task.
    pub fn loss_signal(&self) -> LossSignal {
        self.lost.clone()
    }

    /// For wrappers around a backend (sync-kit's checking layer): replaces the backend side of
    /// the guard, keeping its id, token and loss signal.
    pub fn map_held(mut self, f: impl FnOnce(Box<dyn HeldLock>) -> Box<dyn HeldLock>) -> Self {
        self.inner = self.inner.take().map(f);
        self
    }

    /// Releases the lock and reports whether it was still held.
    pub async fn release(mut self) -> Result<()> {
        let Some(mut inner) = self.inner.take() else {
            return Ok(());
        };
        // An in-process release needs no future (the backend's would be boxed).
        match inner.release_now(&self.id) {
            Some(released) => released,
            None => inner.release(&self.id).await,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.release_in_background(&self.id);
        }
    }
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("id", &self.id)
            .field("token", &self.token)
            .field("lost", &self.lost.is_lost())
            .finish()
    }
}
