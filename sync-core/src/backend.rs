//! The seam every backend plugs into: one object-safe [`Backend`] per connected client, so a
//! program can pick etcd, Consul, Redis, NTP or the in-process backend from configuration.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::{Error, ErrorKind, Leader, Lock, Map, Result, Task, Time};

/// Something a backend can do. The conformance suite reports a case as unsupported when its
/// backend lacks what the case needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Capability {
    /// [`Backend::lock`].
    Lock,
    /// [`Backend::leader`].
    Leader,
    /// [`Backend::task`].
    Task,
    /// [`Backend::map`].
    Map,
    /// [`Backend::time`].
    Time,
    /// [`Faults::kill`]: the client dies without releasing anything.
    KillClient,
    /// [`Faults::revoke`]: the client's lease or session ends on the server.
    RevokeSession,
}

impl Capability {
    /// Every capability, in declaration order.
    pub const ALL: [Capability; 7] = [
        Capability::Lock,
        Capability::Leader,
        Capability::Task,
        Capability::Map,
        Capability::Time,
        Capability::KillClient,
        Capability::RevokeSession,
    ];

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of [`Capability`]s.
///
/// ```
/// use sync_core::{Capabilities, Capability};
/// let caps = Capabilities::none().with(Capability::Lock).with(Capability::Map);
/// assert!(caps.contains(Capability::Lock));
/// assert!(!caps.contains(Capability::Time));
/// assert_eq!(caps.iter().collect::<Vec<_>>(), [Capability::Lock, Capability::Map]);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u16);

impl Capabilities {
    /// The empty set.
    pub const fn none() -> Self {
        Capabilities(0)
    }

    /// Every capability.
    pub const fn all() -> Self {
        let mut caps = Capabilities::none();
        let mut i = 0;
        while i < Capability::ALL.len() {
            caps = caps.with(Capability::ALL[i]);
            i += 1;
        }
        caps
    }

    /// This set plus `cap`.
    pub const fn with(self, cap: Capability) -> Self {
        Capabilities(self.0 | cap.bit())
    }

    /// This set without `cap`.
    pub const fn without(self, cap: Capability) -> Self {
        Capabilities(self.0 & !cap.bit())
    }

    /// Whether `cap` is in the set.
    pub const fn contains(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }

    /// The capabilities in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL
            .into_iter()
            .filter(move |c| self.contains(*c))
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// One connected client of a backend: the factory of its primitives' handles, all sharing the
/// client's connection and lease.
///
/// Every backend crate's `Client` implements it; `sync-any` returns it as `Arc<dyn Backend>`
/// for a URL or a config, so the same code runs on any backend.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::sync::Arc;
/// use sync_core::{Backend, Capability, LockOptions};
///
/// let backend: Arc<dyn Backend> = Arc::new(sync_local::Client::connect(Default::default())?);
/// assert!(backend.capabilities().contains(Capability::Lock));
/// let guard = backend.lock()?.acquire("orders", LockOptions::new()).await?;
/// println!("{} granted token {}", backend.name(), guard.fencing_token());
/// guard.release().await?;
/// backend.close().await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// The backend's name as it appears in errors and traces (`"etcd"`, `"local"`…).
    fn name(&self) -> &'static str;

    /// What this backend provides.
    fn capabilities(&self) -> Capabilities;

    /// The liveness lease of this client (the TTL): a dead holder's locks free after about
    /// this long. `None` for a backend without leases (NTP).
    fn ttl(&self) -> Option<Duration>;

    /// The lock handle.
    fn lock(&self) -> Result<Arc<dyn Lock>> {
        Err(unsupported(self.name(), "locks"))
    }

    /// A leader-election handle bound to `group`.
    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        let _ = group;
        Err(unsupported(self.name(), "leader election"))
    }

    /// The task handle: submit jobs and run workers.
    fn task(&self) -> Result<Arc<dyn Task>> {
        Err(unsupported(self.name(), "tasks"))
    }

    /// The map called `name`.
    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        let _ = name;
        Err(unsupported(self.name(), "maps"))
    }

    /// The synchronized time source.
    fn time(&self) -> Result<Arc<dyn Time>> {
        Err(unsupported(self.name(), "synchronized time"))
    }

    /// Ends the client: its lease is given up (so what it held frees now rather than after a
    /// TTL) and later calls fail with [`ErrorKind::Closed`].
    async fn close(&self) -> Result<()>;

    /// Fault hooks for tests, where the backend has them.
    fn faults(&self) -> Option<&dyn Faults> {
        None
    }
}

/// Fault injection for tests: what a crashed process and a revoked lease look like.
#[async_trait]
pub trait Faults: Send + Sync {
    /// The client "dies": it stops renewing and releases nothing, so its lease expires about
    /// one TTL later; every later call fails with [`ErrorKind::Closed`].
    async fn kill(&self) -> Result<()>;

    /// The client's lease or session is revoked on the server now; holders learn of it first.
    async fn revoke(&self) -> Result<()>;
}

/// The error a backend returns for a primitive it does not provide.
pub fn unsupported(backend: &'static str, what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the {backend} backend has no {what}"),
    )
    .with_backend(backend)
}

macro_rules! forward_backend {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<B: Backend + ?Sized> Backend for $ptr<B> {
            fn name(&self) -> &'static str {
                (**self).name()
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            fn ttl(&self) -> Option<Duration> {
                (**self).ttl()
            }
            fn lock(&self) -> Result<Arc<dyn Lock>> {
                (**self).lock()
            }
            fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
                (**self).leader(group)
            }
            fn task(&self) -> Result<Arc<dyn Task>> {
                (**self).task()
            }
            fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
                (**self).map(name)
            }
            fn time(&self) -> Result<Arc<dyn Time>> {
                (**self).time()
            }
            async fn close(&self) -> Result<()> {
                (**self).close().await
            }
            fn faults(&self) -> Option<&dyn Faults> {
                (**self).faults()
            }
        }
    )*};
}

forward_backend!(Arc, Box);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        let all = Capabilities::all();
        assert_eq!(all.iter().count(), Capability::ALL.len());
        let no_time = all.without(Capability::Time);
        assert!(!no_time.contains(Capability::Time));
        assert!(no_time.contains(Capability::RevokeSession));
        assert_eq!(Capabilities::none().iter().count(), 0);
        assert_eq!(
            format!("{:?}", Capabilities::none().with(Capability::Map)),
            "{Map}"
        );
    }
}
