//! The client handle: the agent's API, the one session (with its local turns), the handle
//! factory and the fault hooks.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sync_core::{Backend, Capabilities, Capability, Faults, Leader, Lock, Map, Result, Task};
use sync_kit::checked;
use tokio::sync::watch;

use crate::{
    BACKEND, Config, api::Api, error::closed, leader::ConsulLeader, lock::ConsulLock,
    map::ConsulMap, session::Sessions, task::ConsulTask,
};

/// A connection to a Consul agent shared by every handle made from it, with one session that
/// holds every lock and leadership of the client. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> sync_core::Result<()> {
/// use sync_core::{Backend, LockOptions};
///
/// let client = sync_consul::Client::from_url("consul://127.0.0.1:8500/app").await?;
/// let guard = client.lock()?.acquire("orders", LockOptions::new()).await?;
/// println!("fencing token {}", guard.fencing_token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct ClientInner {
    pub(crate) config: Config,
    pub(crate) api: Arc<Api>,
    pub(crate) sessions: Arc<Sessions>,
    /// Set once by `kill` or `close`: every background task of this client stops.
    killed: watch::Sender<bool>,
}

impl ClientInner {
    /// Whether a write first sent at `first`, whose answer was lost, may be sent again: a
    /// resend helps when one answer went missing, not when the agent stopped answering, so
    /// resends stop after two request timeouts.
    pub(crate) fn may_resend(&self, first: tokio::time::Instant) -> bool {
        !self.is_killed() && first.elapsed() < 2 * self.config.request_timeout
    }

    /// A receiver that turns true when the client is killed or closed.
    pub(crate) fn killed(&self) -> watch::Receiver<bool> {
        self.killed.subscribe()
    }

    pub(crate) fn is_killed(&self) -> bool {
        *self.killed.borrow()
    }

    /// `Closed` once the client was killed or closed.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.is_killed() {
            return Err(closed());
        }
        Ok(())
    }

    /// `<ns>/<escaped group>/.leader`.
    pub(crate) fn leader_key(&self, group: &str) -> String {
        format!(
            "{}/.leader",
            sync_core::id::key(&self.config.namespace, &[group])
        )
    }

    /// `<ns>/<escaped id>/.lock`: where `consul lock <ns>/<id>` locks too.
    pub(crate) fn lock_key(&self, id: &str) -> String {
        format!(
            "{}/.lock",
            sync_core::id::key(&self.config.namespace, &[id])
        )
    }
}

/// `<ns>/:fence/`, where the sessions' grant fences are (see [`crate::fence`]).
fn fence_prefix(namespace: &str) -> String {
    // Not `id::key`: it would escape the ':' that keeps fences apart from ids.
    match namespace {
        "" => ":fence/".to_string(),
        ns => format!("{ns}/:fence/"),
    }
}

impl Client {
    /// Connects with `config` (validated first): creates the client's session, which proves
    /// that the agent answers and the token may write sessions. Fails with Unavailable when no
    /// agent answers, Unauthorized when the token is refused.
    pub async fn connect(config: Config) -> Result<Client> {
        config.validate()?;
        let api = Arc::new(Api::new(&config)?);
        let killed = watch::channel(false).0;
        let name = format!("sync client {}", uuid::Uuid::new_v4().simple());
        let starting = Sessions::start(
            api.clone(),
            name,
            fence_prefix(&config.namespace),
            config.ttl,
            config.lock_delay,
            killed.subscribe(),
        );
        let sessions = tokio::time::timeout(config.connect_timeout, starting)
            .await
            .map_err(|_| {
                sync_core::Error::new(
                    sync_core::ErrorKind::Unavailable,
                    format!(
                        "connecting to {} took longer than {:?}",
                        config.address, config.connect_timeout
                    ),
                )
                .with_backend(BACKEND)
            })?;
        let sessions = match sessions {
            Err(e) if config.tls && e.kind() == sync_core::ErrorKind::Unavailable => {
                return Err(crate::api::tls_refusal(&config).await.unwrap_or(e));
            }
            other => other?,
        };
        Ok(Client {
            inner: Arc::new(ClientInner {
                config,
                api,
                sessions,
                killed,
            }),
        })
    }

    /// [`Config::from_url`] then [`Client::connect`].
    pub async fn from_url(url: &str) -> Result<Client> {
        Client::connect(Config::from_url(url)?).await
    }

    /// The client "dies": renewals stop and nothing is released, so its locks free between
    /// one and two TTLs later, plus the lock-delay; its own holders see the loss, and every
    /// later call fails with Closed.
    pub async fn kill(&self) {
        self.inner.killed.send_replace(true);
        self.inner.sessions.stop();
    }

    /// Destroys the client's session on the server: every lock and leadership it holds ends
    /// (free to others after the lock-delay). The holders learn of it first; the client stays
    /// usable with a new session.
    pub async fn revoke(&self) -> Result<()> {
        self.inner.sessions.revoke("session revoked").await
    }

    /// The id of the client's current session (None between an invalidation and the next
    /// grant).
    pub async fn session_id(&self) -> Result<String> {
        Ok(self.inner.sessions.current().await?.id.clone())
    }
}

#[async_trait]
impl Backend for Client {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all().without(Capability::Time)
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.inner.config.ttl)
    }

    fn lock(&self) -> Result<Arc<dyn Lock>> {
        self.inner.check_alive()?;
        Ok(checked::lock(
            BACKEND,
            Arc::new(ConsulLock::new(self.inner.clone())),
        ))
    }

    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        self.inner.check_alive()?;
        checked::check_id(BACKEND, "election group", group)?;
        Ok(checked::leader(
            BACKEND,
            Arc::new(ConsulLeader::new(self.inner.clone(), group)),
        ))
    }

    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        self.inner.check_alive()?;
        checked::check_id(BACKEND, "map name", name)?;
        Ok(checked::map(
            BACKEND,
            Arc::new(ConsulMap::new(self.inner.clone(), name)),
        ))
    }

    fn task(&self) -> Result<Arc<dyn Task>> {
        self.inner.check_alive()?;
        Ok(checked::task(BACKEND, ConsulTask::new(self.inner.clone())))
    }

    async fn close(&self) -> Result<()> {
        if self.inner.is_killed() {
            return Ok(());
        }
        // Closed first, so that no acquire racing the close makes a new session.
        self.inner.killed.send_replace(true);
        self.inner.sessions.close("client closed").await
    }

    fn faults(&self) -> Option<&dyn Faults> {
        Some(self)
    }
}

#[async_trait]
impl Faults for Client {
    async fn kill(&self) -> Result<()> {
        Client::kill(self).await;
        Ok(())
    }

    async fn revoke(&self) -> Result<()> {
        Client::revoke(self).await
    }
}
