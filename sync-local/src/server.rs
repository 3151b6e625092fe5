//! The in-process "server": a cluster's shared state, its sessions, and the callbacks that run
//! when a session ends.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use sync_core::{Error, ErrorKind, Result, raw::LeaseDeadline};
use sync_kit::locked;

use crate::{BACKEND, Client, Config};

/// Called once when a session ends, with the reason.
pub(crate) type OnEnd = Box<dyn FnOnce(&str) + Send>;

/// An in-process "server": the state every client of it shares. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use sync_core::Backend;
///
/// let cluster = sync_local::Cluster::new();
/// let a = cluster.client(sync_local::Config::default())?;
/// let b = cluster.client(sync_local::Config::default())?;
/// let guard = a.lock()?.acquire("job", Default::default()).await?;
/// assert!(b.lock()?.try_acquire("job").await?.is_none());
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
    live: HashMap<u64, Live>,
}

/// A live session: what runs when it ends, and what its clients see of it.
struct Live {
    callbacks: HashMap<u64, OnEnd>,
    state: Arc<Session>,
}

/// What a client keeps of its session, so that a grant needs no look-up in the session table.
pub(crate) struct Session {
    pub(crate) id: u64,
    /// Cleared when the session ends, before its callbacks run.
    alive: AtomicBool,
    /// The safe deadline, for the loss signals of what the session holds.
    pub(crate) deadline: LeaseDeadline,
}

impl Session {
    /// Whether the session has not ended yet. Read under a table's lock, true means the
    /// session's end callbacks (which take that lock) have not run yet for that table.
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Shared {
    /// A cluster-wide counter: map versions and job claim tokens come from it, so each
    /// strictly increases (lock tokens and terms come from their table's own counter).
    pub(crate) fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Opens a new session with no callbacks yet.
    pub(crate) fn open_session(&self, deadline: LeaseDeadline) -> Arc<Session> {
        let mut s = locked(&self.sessions);
        s.next_id += 1;
        let state = Arc::new(Session {
            id: s.next_id,
            alive: AtomicBool::new(true),
            deadline,
        });
        let live = Live {
            callbacks: HashMap::new(),
            state: state.clone(),
        };
        s.live.insert(state.id, live);
        state
    }

    /// The safe deadline of `session`, for the loss signals of what it holds; None once ended.
    pub(crate) fn session_deadline(&self, session: u64) -> Option<LeaseDeadline> {
        locked(&self.sessions)
            .live
            .get(&session)
            .map(|l| l.state.deadline.clone())
    }

    /// Registers `f` to run when `session` ends. Err(LockLost) if it already ended.
    pub(crate) fn on_session_end(&self, session: u64, f: OnEnd) -> Result<u64> {
        let mut s = locked(&self.sessions);
        s.next_reg += 1;
        let reg = s.next_reg;
        match s.live.get_mut(&session) {
            Some(live) => {
                live.callbacks.insert(reg, f);
                Ok(reg)
            }
            None => Err(Error::new(ErrorKind::LockLost, "session has ended").with_backend(BACKEND)),
        }
    }

    /// Forgets a registration (the resource was released normally).
    pub(crate) fn cancel_on_end(&self, session: u64, reg: u64) {
        if let Some(live) = locked(&self.sessions).live.get_mut(&session) {
            live.callbacks.remove(&reg);
        }
    }

    pub(crate) fn session_alive(&self, session: u64) -> bool {
        locked(&self.sessions).live.contains_key(&session)
    }

    /// Ends a session: its callbacks run outside the sessions lock, so they may take the
    /// primitives' tables.
    pub(crate) fn end_session(&self, session: u64, reason: &str) {
        let callbacks = {
            let mut s = locked(&self.sessions);
            let live = s.live.remove(&session);
            if let Some(live) = &live {
                live.state.alive.store(false, Ordering::SeqCst);
            }
            live
        };
        if let Some(Live { callbacks, .. }) = callbacks {
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

    /// The process-wide cluster called `name` (what `local://name` connects to).
    pub fn named(name: &str) -> Cluster {
        let all = NAMED.get_or_init(Default::default);
        locked(all).entry(name.to_string()).or_default().clone()
    }

    /// A new client with its own session. Must be called inside a tokio runtime (the session's
    /// keepalive runs on it).
    pub fn client(&self, config: Config) -> Result<Client> {
        Client::join(self.shared.clone(), config)
    }
}
