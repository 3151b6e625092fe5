//! The client handle: a participant in a [`Cluster`](crate::Cluster) with its own session.

use std::sync::{
    Arc, RwLock, Weak,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use async_trait::async_trait;
use sync_core::raw::LeaseClock;
use sync_core::{
    Backend, Capabilities, Error, ErrorKind, Faults, Leader, Lock, Map, Result, Task, Time,
};
use sync_kit::checked;
use tokio::{task::AbortHandle, time::Instant};

use crate::{
    BACKEND, Cluster, Config, leader::LocalLeader, lock::LocalLock, map::LocalMap, task::LocalTask,
    time::LocalTime,
};
// Re-exported for the modules that import them from here.
pub(crate) use crate::server::{Session, Shared};
pub(crate) use sync_kit::locked;

/// A connection to a [`Cluster`] with one session (the lease that TTL refers to), shared by
/// every handle made from it. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("namespace", &self.inner.config.namespace)
            .field("ttl", &self.inner.config.ttl)
            .finish_non_exhaustive()
    }
}

pub(crate) struct ClientInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: Config,
    killed: Arc<AtomicBool>,
    /// Read on a grant the table cannot bind to the session of its last grant, written only
    /// when a session opens or ends.
    session: RwLock<Option<SessionHandle>>,
    /// The id of the session last opened (0 for none), readable without that lock.
    current: AtomicU64,
}

struct SessionHandle {
    state: Arc<Session>,
    keepalive: AbortHandle,
}

impl ClientInner {
    /// Err(Closed) once the client was killed: a dead process makes no calls, releases nothing.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.killed.load(Ordering::SeqCst) {
            return Err(
                Error::new(ErrorKind::Closed, "client is closed or was killed")
                    .with_backend(BACKEND),
            );
        }
        Ok(())
    }

    /// Whether the client was killed.
    pub(crate) fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// The live session, opening a new one if the last was revoked. Fails once killed.
    pub(crate) fn session(&self) -> Result<u64> {
        self.session_state().map(|s| s.id)
    }

    /// The live session (see [`session`](ClientInner::session)), for a grant bound to it.
    pub(crate) fn session_state(&self) -> Result<Arc<Session>> {
        self.check_open()?;
        {
            let slot = self.session.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = slot.as_ref().filter(|s| s.state.alive()) {
                return Ok(s.state.clone());
            }
        }
        let mut slot = self.session.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref().filter(|s| s.state.alive()) {
            return Ok(s.state.clone());
        }
        // Owned by the keepalive alone: if it dies, every signal bound to the session is lost.
        let clock = LeaseClock::new(after(self.config.ttl));
        let state = self.shared.open_session(clock.deadline());
        self.current.store(state.id, Ordering::SeqCst);
        let keepalive = spawn_keepalive(
            Arc::downgrade(&self.shared),
            state.id,
            self.config.ttl,
            clock,
            self.killed.clone(),
        );
        *slot = Some(SessionHandle {
            state: state.clone(),
            keepalive,
        });
        Ok(state)
    }

    /// The id of the session last opened, live or not (0 for none): a session of that id
    /// that is still alive is the live one.
    pub(crate) fn current_session(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// The id of the current session, live or not, if one was opened.
    fn session_id(&self) -> Option<u64> {
        let slot = self.session.read().unwrap_or_else(|p| p.into_inner());
        slot.as_ref().map(|s| s.state.id)
    }

    /// Namespaced key for `parts`, each escaped.
    pub(crate) fn key(&self, parts: &[&str]) -> String {
        sync_core::id::key(&self.config.namespace, parts)
    }
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let slot = self
            .session
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = slot {
            if self.killed.load(Ordering::SeqCst) {
                // A killed client's session must still expire one TTL after its last renewal,
                // as a crashed process's lease does: its keepalive (which holds only a weak
                // reference to the cluster) keeps running to end it. Aborting it here would
                // leave the session, and every lock, leadership and job claim on it, forever.
                return;
            }
            s.keepalive.abort();
            self.shared.end_session(s.state.id, "client closed");
        }
    }
}

/// Renews the session every TTL/3 until killed, and ends it once its deadline passes without
/// renewal (the in-process stand-in for a server-side lease expiry).
fn spawn_keepalive(
    shared: Weak<Shared>,
    session: u64,
    ttl: std::time::Duration,
    clock: LeaseClock,
    killed: Arc<AtomicBool>,
) -> AbortHandle {
    let task = tokio::spawn(async move {
        let mut deadline = after(ttl);
        loop {
            let renew_at = after(ttl / 3);
            let killed_now = killed.load(Ordering::SeqCst);
            tokio::time::sleep_until(if killed_now {
                deadline
            } else {
                renew_at.min(deadline)
            })
            .await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if !shared.session_alive(session) {
                return;
            }
            if Instant::now() >= deadline {
                shared.end_session(session, "session expired (ttl passed without renewal)");
                return;
            }
            if !killed.load(Ordering::SeqCst) {
                deadline = after(ttl);
                clock.confirm(deadline);
            }
        }
    });
    task.abort_handle()
}

/// `ttl` from now; a TTL too long for the clock (`Duration::MAX`) means never.
fn after(ttl: std::time::Duration) -> Instant {
    sync_kit::deadline(ttl)
}

impl Client {
    /// A new client of `shared` with its own session (see [`Cluster::client`]).
    pub(crate) fn join(shared: Arc<Shared>, config: Config) -> Result<Client> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "sync-local clients must be created inside a tokio runtime",
            )
            .with_backend(BACKEND));
        }
        let inner = Arc::new(ClientInner {
            shared,
            config,
            killed: Arc::new(AtomicBool::new(false)),
            session: RwLock::new(None),
            current: AtomicU64::new(0),
        });
        inner.session()?;
        Ok(Client { inner })
    }

    /// Joins the process-wide cluster named in `config` (see [`Config::from_url`]).
    pub fn connect(config: Config) -> Result<Client> {
        Cluster::named(&config.cluster.clone()).client(config)
    }

    /// The config this client was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Seed parity: a pool that runs plain closure [`Command`](crate::Command)s, `pool` at once.
    pub fn commands(&self, pool: usize) -> Result<crate::CommandPool> {
        crate::CommandPool::new(self, pool)
    }

    /// Fault injection: the client "dies". It stops renewing and releases nothing; its session
    /// ends about one TTL after the last renewal, and every later call fails with `Closed`.
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::SeqCst);
    }

    /// Fault injection: the session is revoked now, as a server-side lease revoke would do.
    /// Holders' `lost()` fire and their locks free at once; the next call opens a new session.
    pub fn revoke(&self) {
        let current = self.inner.session_id();
        if let Some(id) = current {
            self.inner.shared.end_session(id, "session revoked");
        }
    }

    /// Whether [`kill`](Client::kill) was called.
    pub fn is_killed(&self) -> bool {
        self.inner.killed.load(Ordering::SeqCst)
    }
}

/// Every primitive, and both fault hooks.
const CAPABILITIES: Capabilities = Capabilities::all();

#[async_trait]
impl Backend for Client {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn ttl(&self) -> Option<std::time::Duration> {
        Some(self.inner.config.ttl)
    }

    fn lock(&self) -> Result<Arc<dyn Lock>> {
        let raw = Arc::new(LocalLock::new(self.inner.clone()));
        Ok(checked::lock_in_process(BACKEND, raw))
    }

    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        checked::leader_for(BACKEND, group, || {
            LocalLeader::new(self.inner.clone(), group)
        })
    }

    fn task(&self) -> Result<Arc<dyn Task>> {
        Ok(checked::task(BACKEND, LocalTask::new(self.inner.clone())))
    }

    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        checked::map_for(BACKEND, name, || LocalMap::new(self.inner.clone(), name))
    }

    /// The system clock with the configured uncertainty.
    fn time(&self) -> Result<Arc<dyn Time>> {
        let raw = Arc::new(LocalTime::new(self.inner.config.time_uncertainty));
        Ok(checked::time(BACKEND, raw))
    }

    /// Ends the session now (everything it held frees at once); later calls fail with Closed.
    async fn close(&self) -> Result<()> {
        let session = (self.inner.session.write())
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.killed.store(true, Ordering::SeqCst);
        if let Some(s) = session {
            s.keepalive.abort();
            self.inner.shared.end_session(s.state.id, "client closed");
        }
        Ok(())
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

#[async_trait]
impl Faults for Client {
    async fn kill(&self) -> Result<()> {
        Client::kill(self);
        Ok(())
    }

    async fn revoke(&self) -> Result<()> {
        Client::revoke(self);
        Ok(())
    }
}
