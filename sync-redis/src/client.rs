//! The client handle: one multiplexed connection (or the cluster client), the pub/sub hub, the
//! renewer of held keys, the handle factory and the fault hooks.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use sync_core::{Backend, Capabilities, Capability, Faults, Leader, Lock, Map, Result, Task};
use sync_kit::checked;
use tokio::sync::{mpsc, watch};

use crate::{
    BACKEND, Config,
    conn::{Conn, open},
    error::{closed, redis_err},
    hub::Hub,
    keys::Keys,
    leader::RedisLeader,
    lock::RedisLock,
    map::RedisMap,
    renew::Renewals,
    task::RedisTask,
};
use sync_kit::turns::Turns;

/// A connection to Redis (a server or a cluster) shared by every handle made from it. Cheap to
/// clone.
///
/// ```no_run
/// # async fn demo() -> sync_core::Result<()> {
/// use sync_core::{Backend, LockOptions};
///
/// let client = sync_redis::Client::from_url("redis://127.0.0.1:6379/app").await?;
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
    pub(crate) conn: Conn,
    pub(crate) keys: Keys,
    pub(crate) hub: Arc<Hub>,
    pub(crate) renewals: Renewals,
    /// Contenders for one key through this client take turns: see [`Turns`].
    pub(crate) turns: Turns,
    /// Unique to this client: with a sequence number, every contender's owner id.
    id: String,
    seq: AtomicU64,
    /// Set once by `kill` or `close`: every background task of this client stops.
    killed: watch::Sender<bool>,
}

impl ClientInner {
    /// A new owner id for one contender: unique across clients and over time, fixed length
    /// (scripts compare the first [`OWNER_LEN`](crate::keys::OWNER_LEN) bytes of a value).
    pub(crate) fn owner(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{:08x}", self.id, n & 0xffff_ffff)
    }

    /// Whether a call first sent at `first`, whose answer was lost, may be sent again: a
    /// resend helps when an answer went missing on a live connection (the connection is new by
    /// then), not when the server stopped answering, so resends stop after two request
    /// timeouts.
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
}

impl Client {
    /// Connects with `config` (validated first). Fails with Unavailable when no server
    /// answers, Unauthorized when the credentials are refused.
    pub async fn connect(config: Config) -> Result<Client> {
        config.validate()?;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (replaced_tx, replaced_rx) = mpsc::unbounded_channel();
        let opening = open(&config, push_tx, replaced_tx);
        let conn = tokio::time::timeout(config.connect_timeout, opening)
            .await
            .map_err(|_| {
                sync_core::Error::new(
                    sync_core::ErrorKind::Unavailable,
                    format!(
                        "connecting to {} took longer than {:?}",
                        config.endpoints.join(","),
                        config.connect_timeout
                    ),
                )
                .with_backend(BACKEND)
            })?
            .map_err(|e| redis_err(format!("connecting to {}", config.endpoints.join(",")), e))?;
        // Proves the connection and the credentials now, not at the first lock.
        conn.query::<String>(&redis::cmd("PING"))
            .await
            .map_err(|e| redis_err("PING after connecting", e))?;
        let killed = watch::channel(false).0;
        let hub = Hub::start(conn.clone(), push_rx, replaced_rx, killed.subscribe());
        let renewals = Renewals::start(conn.clone(), config.ttl, killed.subscribe());
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Client {
            inner: Arc::new(ClientInner {
                keys: Keys::new(&config.namespace),
                config,
                conn,
                hub,
                renewals,
                turns: Turns::default(),
                id,
                seq: AtomicU64::new(0),
                killed,
            }),
        })
    }

    /// [`Config::from_url`] then [`Client::connect`].
    pub async fn from_url(url: &str) -> Result<Client> {
        Client::connect(Config::from_url(url)?).await
    }

    /// The client "dies": renewals stop and nothing is released, so its locks free one TTL
    /// later; its own holders see the loss, and every later call fails with Closed.
    pub async fn kill(&self) {
        self.inner.killed.send_replace(true);
        self.inner.renewals.stop();
    }

    /// Ends every lock and leadership this client holds on the server now. The holders learn
    /// of it first; the client stays usable.
    pub async fn revoke(&self) -> Result<()> {
        self.inner.renewals.release_all("lease revoked").await
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
            Arc::new(RedisLock::new(self.inner.clone())),
        ))
    }

    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        self.inner.check_alive()?;
        checked::check_id(BACKEND, "election group", group)?;
        Ok(checked::leader(
            BACKEND,
            Arc::new(RedisLeader::new(self.inner.clone(), group)),
        ))
    }

    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        self.inner.check_alive()?;
        checked::check_id(BACKEND, "map name", name)?;
        Ok(checked::map(
            BACKEND,
            Arc::new(RedisMap::new(self.inner.clone(), name)),
        ))
    }

    fn task(&self) -> Result<Arc<dyn Task>> {
        self.inner.check_alive()?;
        Ok(checked::task(BACKEND, RedisTask::new(self.inner.clone())))
    }

    async fn close(&self) -> Result<()> {
        if self.inner.is_killed() {
            return Ok(());
        }
        let released = self.inner.renewals.release_all("client closed").await;
        self.inner.killed.send_replace(true);
        self.inner.renewals.stop();
        released
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
