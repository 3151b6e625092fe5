//! The in-process cluster, its sessions, and the client handle.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use sync_core::{
    Backend, Capabilities, Error, ErrorKind, Faults, Leader, Lock, Map, Result, Task, Time,
};
use tokio::{task::AbortHandle, time::Instant};

use crate::{
    BACKEND, Config, leader::LocalLeader, lock::LocalLock, map::LocalMap, task::LocalTask,
    time::LocalTime,
};

/// Called once when a session ends, with the reason.
pub(crate) type OnEnd = Box<dyn FnOnce(&str) + Send>;

/// Re-exported for the modules that import it from here.
pub(crate) use sync_kit::locked;

/// An in-process "server": the state every client of it shares. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// let cluster = sync_local::Cluster::new();
/// let a = cluster.client(sync_local::Config::default())?;
/// let b = cluster.client(sync_local::Config::default())?;
/// let guard = a.lock().acquire("job", Default::default()).await?;
/// assert!(b.lock().try_acquire("job").await?.is_none());
/// # drop(guard); Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Cluster {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// State shared by the clients of one cluster. Each primitive keeps its own table.
#[derive(Default)]
pub(crate) struct Shared {
    revision: AtomicU64,
    sessions: Mutex<Sessions>,
    pub(crate) locks: crate::lock::LockTable,
    pub(crate) elections: crate::leader::ElectionTable,
    pub(crate) maps: crate::map::MapTable,
    pub(crate) jobs: crate::task::JobTable,
}

#[derive(Default)]
struct Sessions {
    next_id: u64,
    next_reg: u64,
    live: HashMap<u64, HashMap<u64, OnEnd>>,
}

impl Shared {
    /// A cluster-wide counter: fencing tokens, terms and versions all come from it, so each
    /// strictly increases.
    pub(crate) fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn open_session(&self) -> u64 {
        let mut s = locked(&self.sessions);
        s.next_id += 1;
        let id = s.next_id;
        s.live.insert(id, HashMap::new());
        id
    }

    /// Registers `f` to run when `session` ends. Err(LockLost) if it already ended.
    pub(crate) fn on_session_end(&self, session: u64, f: OnEnd) -> Result<u64> {
        let mut s = locked(&self.sessions);
        s.next_reg += 1;
        let reg = s.next_reg;
        match s.live.get_mut(&session) {
            Some(callbacks) => {
                callbacks.insert(reg, f);
                Ok(reg)
            }
            None => Err(Error::new(ErrorKind::LockLost, "session has ended").with_backend(BACKEND)),
        }
    }

    /// Forgets a registration (the resource was released normally).
    pub(crate) fn cancel_on_end(&self, session: u64, reg: u64) {
        if let Some(callbacks) = locked(&self.sessions).live.get_mut(&session) {
            callbacks.remove(&reg);
        }
    }

    pub(crate) fn session_alive(&self, session: u64) -> bool {
        locked(&self.sessions).live.contains_key(&session)
    }

    /// Ends a session: its callbacks run outside the sessions lock, so they may take the
    /// primitives' tables.
    pub(crate) fn end_session(&self, session: u64, reason: &str) {
        let callbacks = locked(&self.sessions).live.remove(&session);
        if let Some(callbacks) = callbacks {
            tracing::debug!(backend = BACKEND, session, reason, "session ended");
            let mut callbacks: Vec<_> = callbacks.into_iter().collect();
            callbacks.sort_by_key(|(reg, _)| *reg);
            for (_, f) in callbacks {
                f(reason);
            }
        }
    }
}

static NAMED: OnceLock<Mutex<HashMap<String, Cluster>>> = OnceLock::new();

impl Cluster {
    /// A new, empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how long a finished job's status stays readable (default
    /// [`JOB_RETENTION`](crate::JOB_RETENTION)); after that `status` answers NotFound.
    pub fn with_job_retention(self, retention: std::time::Duration) -> Self {
        self.shared.jobs.set_retention(retention);
        self
    }

    /// The process-wide cluster called `name` (what `local://name` connects to).
    pub fn named(name: &str) -> Cluster {
        let all = NAMED.get_or_init(Default::default);
        locked(all).entry(name.to_string()).or_default().clone()
    }

    /// A new client with its own session. Must be called inside a tokio runtime (the session's
    /// keepalive runs on it).
    pub fn client(&self, config: Config) -> Result<Client> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "sync-local clients must be created inside a tokio runtime",
            )
            .with_backend(BACKEND));
        }
        let inner = Arc::new(ClientInner {
            shared: self.shared.clone(),
            config,
            killed: Arc::new(AtomicBool::new(false)),
            session: Mutex::new(None),
        });
        inner.session()?;
        Ok(Client { inner })
    }
}

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
    session: Mutex<Option<SessionHandle>>,
}

struct SessionHandle {
    id: u64,
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
        self.check_open()?;
        let mut slot = locked(&self.session);
        if let Some(s) = slot.as_ref().filter(|s| self.shared.session_alive(s.id)) {
            return Ok(s.id);
        }
        let id = self.shared.open_session();
        let keepalive = spawn_keepalive(
            Arc::downgrade(&self.shared),
            id,
            self.config.ttl,
            self.killed.clone(),
        );
        *slot = Some(SessionHandle { id, keepalive });
        Ok(id)
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
            self.shared.end_session(s.id, "client closed");
        }
    }
}

/// Renews the session every TTL/3 until killed, and ends it once its deadline passes without
/// renewal (the in-process stand-in for a server-side lease expiry).
fn spawn_keepalive(
    shared: Weak<Shared>,
    session: u64,
    ttl: std::time::Duration,
    killed: Arc<AtomicBool>,
) -> AbortHandle {
    let task = tokio::spawn(async move {
        let mut deadline = Instant::now() + ttl;
        loop {
            let renew_at = Instant::now() + ttl / 3;
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
                deadline = Instant::now() + ttl;
            }
        }
    });
    task.abort_handle()
}

impl Client {
    /// Joins the process-wide cluster named in `config` (see [`Config::from_url`]).
    pub fn connect(config: Config) -> Result<Client> {
        Cluster::named(&config.cluster.clone()).client(config)
    }

    /// The config this client was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A Lock handle on this client's session.
    pub fn lock(&self) -> Arc<dyn Lock> {
        Arc::new(LocalLock::new(self.inner.clone()))
    }

    /// A Leader handle bound to election `group`.
    pub fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        sync_core::id::validate("election group", group).map_err(|e| e.with_backend(BACKEND))?;
        Ok(Arc::new(LocalLeader::new(self.inner.clone(), group)))
    }

    /// A Task handle: submit jobs and run workers.
    pub fn task(&self) -> Arc<dyn Task> {
        Arc::new(LocalTask::new(self.inner.clone()))
    }

    /// Seed parity: a pool that runs plain closure [`Command`](crate::Command)s, `pool` at once.
    pub fn commands(&self, pool: usize) -> Result<crate::CommandPool> {
        crate::CommandPool::new(self, pool)
    }

    /// A Map handle for the map called `name`.
    pub fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        sync_core::id::validate("map name", name).map_err(|e| e.with_backend(BACKEND))?;
        Ok(Arc::new(LocalMap::new(self.inner.clone(), name)))
    }

    /// The Time primitive: the system clock with the configured uncertainty.
    pub fn time(&self) -> Arc<dyn Time> {
        Arc::new(LocalTime::new(self.inner.config.time_uncertainty))
    }

    /// Fault injection: the client "dies". It stops renewing and releases nothing; its session
    /// ends about one TTL after the last renewal, and every later call fails with `Closed`.
    pub fn kill(&self) {
        self.inner.killed.store(true, Ordering::SeqCst);
    }

    /// Fault injection: the session is revoked now, as a server-side lease revoke would do.
    /// Holders' `lost()` fire and their locks free at once; the next call opens a new session.
    pub fn revoke(&self) {
        let current = locked(&self.inner.session).as_ref().map(|s| s.id);
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
        Ok(Client::lock(self))
    }

    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        Client::leader(self, group)
    }

    fn task(&self) -> Result<Arc<dyn Task>> {
        Ok(Client::task(self))
    }

    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        Client::map(self, name)
    }

    fn time(&self) -> Result<Arc<dyn Time>> {
        Ok(Client::time(self))
    }

    /// Ends the session now (everything it held frees at once); later calls fail with Closed.
    async fn close(&self) -> Result<()> {
        let session = locked(&self.inner.session).take();
        self.inner.killed.store(true, Ordering::SeqCst);
        if let Some(s) = session {
            s.keepalive.abort();
            self.inner.shared.end_session(s.id, "client closed");
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
