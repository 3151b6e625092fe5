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
use redis::{
    Cmd, FromRedisValue, ProtocolVersion, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};
use sync_core::{Backend, Capabilities, Capability, Faults, Leader, Lock, Map, Result};
use sync_kit::checked;
use tokio::sync::{mpsc, watch};

use crate::{
    BACKEND, Config,
    error::{closed, redis_err},
    hub::Hub,
    keys::Keys,
    leader::RedisLeader,
    lock::RedisLock,
    map::RedisMap,
    renew::Renewals,
};

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
    /// Unique to this client: with a sequence number, every contender's owner id.
    id: String,
    seq: AtomicU64,
    /// Set once by `kill` or `close`: every background task of this client stops.
    killed: watch::Sender<bool>,
}

/// The standalone connection (it reconnects by itself) or the cluster client.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Sends `cmd`; errors keep the client error (see [`redis_err`] for the kinds).
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        cmd.query_async(&mut self.clone()).await
    }

    /// Runs `script` with `keys` and `args` (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let mut call = script.prepare_invoke();
        for k in keys {
            call.key(*k);
        }
        for a in args {
            call.arg(*a);
        }
        call.invoke_async(&mut self.clone()).await
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self.clone() {
            Conn::Single(mut c) => c.subscribe(channel).await,
            Conn::Cluster(mut c) => c.subscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self.clone() {
            Conn::Single(mut c) => c.unsubscribe(channel).await,
            Conn::Cluster(mut c) => c.unsubscribe(channel).await,
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ClientInner {
    /// A new owner id for one contender: unique across clients and over time, fixed length
    /// (scripts compare the first [`OWNER_LEN`](crate::keys::OWNER_LEN) bytes of a value).
    pub(crate) fn owner(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{:08x}", self.id, n & 0xffff_ffff)
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
        let conn = tokio::time::timeout(config.connect_timeout, open(&config, push_tx))
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
        let hub = Hub::start(conn.clone(), push_rx, killed.subscribe());
        let renewals = Renewals::start(conn.clone(), config.ttl, killed.subscribe());
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Client {
            inner: Arc::new(ClientInner {
                keys: Keys::new(&config.namespace),
                config,
                conn,
                hub,
                renewals,
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

/// The connection for `config`, RESP3 so that pub/sub messages arrive as pushes on the same
/// connection, which resubscribes by itself after a reconnect.
async fn open(
    config: &Config,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
) -> RedisResult<Conn> {
    let infos = config
        .endpoints
        .iter()
        .map(|e| connection_info(config, e))
        .collect::<RedisResult<Vec<_>>>()?;
    #[cfg(feature = "tls")]
    let certs = crate::tls::certificates(config).await?;
    if config.cluster {
        let builder = ClusterClientBuilder::new(infos);
        #[cfg(feature = "tls")]
        let builder = match certs {
            Some(certs) => builder.certs(certs),
            None => builder,
        };
        let client = builder
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushes)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.request_timeout)
            // Resends are harmless (every write is idempotent), but an unanswered request
            // must fail within about one timeout.
            .retries(1)
            .build()?;
        return Ok(Conn::Cluster(client.get_async_connection().await?));
    }
    let info = infos.into_iter().next().expect("validated: one endpoint");
    #[cfg(feature = "tls")]
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs)?,
        None => redis::Client::open(info)?,
    };
    #[cfg(not(feature = "tls"))]
    let client = redis::Client::open(info)?;
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.request_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1))
        .set_push_sender(pushes)
        .set_automatic_resubscription();
    Ok(Conn::Single(
        ConnectionManager::new_with_config(client, manager).await?,
    ))
}

fn connection_info(config: &Config, endpoint: &str) -> RedisResult<redis::ConnectionInfo> {
    use redis::IntoConnectionInfo;
    let scheme = if config.tls { "rediss" } else { "redis" };
    let info = format!("{scheme}://{endpoint}").into_connection_info()?;
    let mut redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3)
        .set_db(config.db);
    if let Some(user) = &config.user {
        redis = redis.set_username(user);
    }
    if let Some(password) = &config.password {
        redis = redis.set_password(password);
    }
    Ok(info.set_redis_settings(redis))
}

#[async_trait]
impl Backend for Client {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
            .without(Capability::Time)
            .without(Capability::Task)
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
