//! The client handle: one etcd connection, its current session (lease) and local queues, the
//! handle factory, and the fault hooks.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use etcd_client::{ConnectOptions, WatchOptions};
use sync_core::{
    Backend, Capabilities, Capability, Error, ErrorKind, Faults, Leader, Lock, Map, Result, Task,
};
use sync_kit::checked;
use tokio::sync::watch;

use crate::{
    BACKEND, Config,
    endpoints::Endpoints,
    kv::{Kv, Sender},
    leader::EtcdLeader,
    lock::EtcdLock,
    map::EtcdMap,
    task::EtcdTask,
    watch::{Delivery, Ended, Watches},
};
// Re-exported for the modules that import them from here.
pub(crate) use crate::{error::etcd_err, session::Session};

/// A connection to etcd with one lease (the TTL's "session"), shared by every handle made
/// from it. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> sync_core::Result<()> {
/// use sync_core::{Backend, LockOptions};
///
/// let client = sync_etcd::Client::connect(sync_etcd::Config::from_url("etcd://127.0.0.1:2379/app")?).await?;
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
    endpoints: Arc<Endpoints>,
    pub(crate) config: Config,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// Set once by `kill`: every background task of this client stops.
    killed: watch::Sender<bool>,
    /// The one watch stream every watch of this client shares.
    pub(crate) watches: Watches,
    /// Bounds the deletes of dropped guards' keys in flight: dropping thousands of guards at
    /// once queues them instead of sending thousands of requests (and holding their buffers).
    pub(crate) background_deletes: Arc<tokio::sync::Semaphore>,
}

/// Deletes of dropped guards' keys in flight per client, at most.
const BACKGROUND_DELETES: usize = 64;

impl ClientInner {
    /// A handle on `endpoints` with no session yet.
    pub(crate) fn new(endpoints: Endpoints, config: Config) -> Arc<ClientInner> {
        let endpoints = Arc::new(endpoints);
        let killed = watch::channel(false).0;
        let sender = Sender {
            endpoints: endpoints.clone(),
            tries: tries(&config),
            timeout: config.request_timeout,
        };
        let watches = Watches::new(sender, killed.subscribe());
        Arc::new(ClientInner {
            endpoints,
            config,
            session: tokio::sync::Mutex::new(None),
            killed,
            watches,
            background_deletes: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_DELETES)),
        })
    }

    /// The live session, granting a new lease if the last one ended. Fails once killed.
    pub(crate) async fn session(&self) -> Result<Arc<Session>> {
        self.check_alive()?;
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.ended.is_lost()) {
            return Ok(s.clone());
        }
        if let Some(old) = slot.take() {
            // Its holders were told they lost; make sure the server agrees (it may not have
            // expired the lease yet when renewals merely failed for a while).
            old.stop_renewing();
            old.revoke_in_background(&self.sender(), self.killed());
        }
        let session = Session::grant(&self.sender(), self.config.ttl, self.killed()).await?;
        let session = Arc::new(session);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// The KV API, on the current endpoint (see [`Sender`]).
    pub(crate) fn kv(&self) -> Kv {
        Kv::new(self.sender())
    }

    /// How requests are sent: to the current endpoint, within the request timeout.
    pub(crate) fn sender(&self) -> Sender {
        Sender {
            endpoints: self.endpoints.clone(),
            tries: tries(&self.config),
            timeout: self.config.request_timeout,
        }
    }

    /// Waits for the first event of a watch on `key`: true when one arrived, false when the
    /// watch was cancelled (compaction) or failed (then after a short pause, so a failing
    /// server is not spun on). Also false when the client moved to another endpoint (a stalled
    /// member sends no events and no error either; the lease keepalive finds it out within a
    /// third of the TTL), and after `trust` without an event. On false the caller re-checks by
    /// reading.
    pub(crate) async fn watch_once(
        &self,
        key: impl Into<Vec<u8>>,
        opts: WatchOptions,
        trust: Duration,
    ) -> bool {
        matches!(self.watch_first(key, opts, trust).await, Watched::Event)
    }

    /// The first response with events of a watch on `key` (on the client's shared stream),
    /// or why there was none within `trust`: see [`Watched`].
    pub(crate) async fn watch_first(
        &self,
        key: impl Into<Vec<u8>>,
        opts: WatchOptions,
        trust: Duration,
    ) -> Watched {
        let watch = self.watches.once(key.into(), opts);
        match tokio::time::timeout(trust, watch.wait()).await {
            Ok(Delivery::Events(_)) => Watched::Event,
            Ok(Delivery::Ended(why)) => self.ended(why).await,
            Err(_) => Watched::Interrupted,
        }
    }

    /// What an ended watch means to its owner; after a failure, only once a short pause has
    /// passed, so a failing server is not spun on.
    pub(crate) async fn ended(&self, why: Ended) -> Watched {
        match why {
            Ended::Cancelled => Watched::Cancelled,
            Ended::Moved => Watched::Interrupted,
            Ended::Failed => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Watched::Interrupted
            }
        }
    }

    /// How long a waiter trusts a watch without an event before it reads again.
    pub(crate) fn recheck_every(&self) -> Duration {
        (2 * self.config.request_timeout).max(self.config.ttl)
    }

    /// A receiver that turns true when the client is killed.
    pub(crate) fn killed(&self) -> watch::Receiver<bool> {
        self.killed.subscribe()
    }

    pub(crate) fn is_killed(&self) -> bool {
        *self.killed.borrow()
    }

    /// `Closed` once the client was killed: a dead process makes no more calls.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.is_killed() {
            return Err(
                Error::new(ErrorKind::Closed, "client is closed or was killed")
                    .with_backend(BACKEND),
            );
        }
        Ok(())
    }

    /// `<namespace>/` or `` for the empty namespace.
    pub(crate) fn ns_prefix(&self) -> String {
        if self.config.namespace.is_empty() {
            String::new()
        } else {
            format!("{}/", self.config.namespace)
        }
    }
}

/// How often a request that was never delivered is sent: enough to try every endpoint.
fn tries(config: &Config) -> usize {
    2 * config.endpoints.len() + 2
}

/// How a watch for one event ended.
pub(crate) enum Watched {
    /// An event came.
    Event,
    /// etcd cancelled the watch (its start revision was compacted): re-read before watching
    /// again.
    Cancelled,
    /// Nothing was seen: the stream failed, the client moved, or the trust ran out. A watch
    /// from the same revision misses nothing (unless that was compacted meanwhile: then it is
    /// cancelled).
    Interrupted,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let session = self.session.get_mut().take();
        if let Some(s) = session {
            s.stop_renewing();
            if !*self.killed.borrow() && !s.ended.is_lost() {
                s.end("client closed");
                // Free everything this client held at once rather than after a TTL.
                s.revoke_in_background(&self.sender(), self.killed());
            }
        }
    }
}

impl Client {
    /// Connects to etcd and grants this handle's lease.
    #[tracing::instrument(level = "debug", skip(config), fields(backend = BACKEND, primitive = "client", endpoints = ?config.endpoints, namespace = %config.namespace))]
    pub async fn connect(config: Config) -> Result<Client> {
        config.validate()?;
        // HTTP/2 pings find a dead connection; etcd refuses pings more often than every 5 s.
        // Requests (watches included) to a member cut off from the quorum fail at once
        // instead of sitting silently on it.
        let mut options = ConnectOptions::new()
            .with_require_leader(true)
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(user) = &config.user {
            // etcd's auth tokens expire (its --auth-token-ttl, 5 min by default): without a
            // refresh every call after that is Unauthorized, release included.
            options = options
                .with_user(user.clone(), config.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        #[cfg(feature = "tls")]
        let mut probe = None;
        #[cfg(feature = "tls")]
        if config.tls {
            let tls = config.clone();
            let (built, checked) = tokio::task::spawn_blocking(move || crate::tls::check(&tls))
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Backend, "the task reading the TLS files failed")
                        .with_backend(BACKEND)
                        .with_source(e)
                })??;
            options = options.with_tls(built);
            probe = Some(checked);
        }
        let endpoints = Endpoints::new(config.endpoints.clone(), options, config.connect_timeout);
        let inner = ClientInner::new(endpoints, config);
        let connected =
            async {
                // With auth this authenticates: bad credentials are named here.
                inner.endpoints.pick().await.map_err(|e| {
                    etcd_err(format!("connecting to {:?}", inner.config.endpoints), e)
                })?;
                inner.session().await
            };
        match connected.await {
            Ok(_) => Ok(Client { inner }),
            #[cfg(feature = "tls")]
            Err(e) if e.kind() == ErrorKind::Unavailable && probe.is_some() => {
                Err(diagnosed(e, probe).await)
            }
            Err(e) => Err(e),
        }
    }

    /// Parses `url` (see [`Config::from_url`]) and connects.
    pub async fn from_url(url: &str) -> Result<Client> {
        Client::connect(Config::from_url(url)?).await
    }

    /// The config this client was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The current lease id (hex, as it appears in contender keys).
    pub async fn lease_id(&self) -> Result<String> {
        Ok(self.inner.session().await?.lease_hex())
    }

    /// Fault injection: the client "dies". Renewals stop and nothing is released; its
    /// watches, monitors and workers stop; etcd expires the lease about one TTL after the last
    /// renewal. Every later call fails with `Closed`.
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "client"))]
    pub async fn kill(&self) {
        self.inner.killed.send_replace(true);
        if let Some(s) = self.inner.session.lock().await.as_ref() {
            // What it held is lost (its holders are told, as a dead process would be by
            // nothing), and nothing is released.
            s.end("client killed");
        }
    }

    /// Revokes this client's lease on the server now. The holders learn of it first (their
    /// `lost()` fires before the request is sent); the next call grants a new lease.
    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "client"))]
    pub async fn revoke(&self) -> Result<()> {
        let current = self.inner.session.lock().await.clone();
        match current {
            Some(s) => s.revoke(&self.inner.sender(), "lease revoked").await,
            None => Ok(()),
        }
    }
}

/// A failed first call over TLS, told apart from an outage by a handshake of its own: a
/// certificate refused by either side is not worth retrying (see `tls::Probe`).
#[cfg(feature = "tls")]
async fn diagnosed(e: Error, probe: Option<crate::tls::Probe>) -> Error {
    let Some(probe) = probe else { return e };
    match tokio::task::spawn_blocking(move || probe.diagnose()).await {
        Ok(Some((kind, why))) => Error::new(kind, format!("{}: {why}", e.message()))
            .with_backend(BACKEND)
            .with_source(e),
        _ => e,
    }
}

/// Time is not an etcd primitive.
const CAPABILITIES: Capabilities = Capabilities::all().without(Capability::Time);

#[async_trait]
impl Backend for Client {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn ttl(&self) -> Option<Duration> {
        Some(self.inner.config.ttl)
    }

    fn lock(&self) -> Result<Arc<dyn Lock>> {
        let raw = Arc::new(EtcdLock::new(self.inner.clone()));
        Ok(checked::lock(BACKEND, raw))
    }

    fn leader(&self, group: &str) -> Result<Arc<dyn Leader>> {
        checked::leader_for(BACKEND, group, || {
            EtcdLeader::new(self.inner.clone(), group)
        })
    }

    fn task(&self) -> Result<Arc<dyn Task>> {
        Ok(checked::task(BACKEND, EtcdTask::new(self.inner.clone())))
    }

    fn map(&self, name: &str) -> Result<Arc<dyn Map>> {
        checked::map_for(BACKEND, name, || EtcdMap::new(self.inner.clone(), name))
    }

    /// Stops every background task and revokes the lease, so everything this client held
    /// frees now; later calls fail with Closed.
    async fn close(&self) -> Result<()> {
        self.inner.killed.send_replace(true);
        let session = self.inner.session.lock().await.take();
        match session {
            Some(s) => s.revoke(&self.inner.sender(), "client closed").await,
            None => Ok(()),
        }
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
