//! The connection every handle of a client shares: one multiplexed connection to a server, or
//! the cluster client. Every script call carries a nonce its answer must start with.
//!
//! A multiplexed connection pairs answers with requests by their order. If an answer is lost
//! while the connection stays up (a proxy that drops it), every later request on that
//! connection would get the answer of the one before it. A call whose answer is not its own
//! therefore fails as "outcome unknown" (it was applied: the server answers in order), and the
//! connection is replaced; so is one after a timeout, since a server that stopped answering
//! leaves it just as unusable.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use redis::{
    Cmd, FromRedisValue, ProtocolVersion, RedisError, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterClientBuilder},
    cluster_async::ClusterConnection,
};
use tokio::sync::mpsc;

use crate::{BACKEND, Config};

/// The client's connection. Cheap to clone.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(Arc<Single>),
    Cluster(Arc<Clustered>),
}

/// A Redis Cluster's client, whose connections are made anew when one may be out of step.
pub(crate) struct Clustered {
    client: ClusterClient,
    /// The connections in use (None while they are being made anew) and how many were
    /// replaced before.
    current: RwLock<(u64, Option<ClusterConnection>)>,
    /// One rebuild at a time.
    rebuilding: tokio::sync::Mutex<()>,
    replaced: mpsc::UnboundedSender<()>,
}

/// A standalone server's connection, replaced by a fresh one when it may be out of step.
pub(crate) struct Single {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection in use and how many were replaced before it.
    current: RwLock<(u64, ConnectionManager)>,
    /// Told of each replacement: the subscriptions are made again on the new connection.
    replaced: mpsc::UnboundedSender<()>,
}

/// One request's view of the connection: what it was sent on.
#[derive(Clone)]
enum Link {
    Single(u64, ConnectionManager),
    Cluster(u64, ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(_, c) => c.req_packed_command(cmd),
            Link::Cluster(_, c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(_, c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(_, c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(_, c) => c.get_db(),
            Link::Cluster(_, c) => c.get_db(),
        }
    }
}

/// Every script call's nonce: unique within the process.
static NONCE: AtomicU64 = AtomicU64::new(1);

impl Conn {
    async fn link(&self) -> RedisResult<Link> {
        match self {
            Conn::Single(s) => {
                let (generation, c) = &*s.current.read().unwrap_or_else(|p| p.into_inner());
                Ok(Link::Single(*generation, c.clone()))
            }
            Conn::Cluster(c) => c.link().await,
        }
    }

    /// Replaces the connection `link` went out on, unless that happened already.
    fn replace(&self, link: &Link) {
        match (self, link) {
            (Conn::Single(s), Link::Single(generation, _)) => s.replace(*generation),
            (Conn::Cluster(c), Link::Cluster(generation, _)) => c.replace(*generation),
            _ => {}
        }
    }

    /// Sends a plain command (reads and set-up only: writes go through scripts).
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        let mut link = self.link().await?;
        let answer = cmd.query_async(&mut link).await;
        if answer.as_ref().is_err_and(RedisError::is_timeout) {
            self.replace(&link);
        }
        answer
    }

    /// Runs `script` (made by [`script`](crate::keys::script)) with `keys` and `args`, plus a
    /// nonce its answer must start with (EVALSHA, loading it on NOSCRIPT). An answer that is
    /// not this call's is an error whose outcome is unknown, and the connection is replaced.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> RedisResult<T> {
        let nonce = NONCE.fetch_add(1, Ordering::Relaxed).to_string();
        let mut call = script.prepare_invoke();
        for k in keys {
            call.key(*k);
        }
        for a in args {
            call.arg(*a);
        }
        call.arg(&nonce);
        let mut link = self.link().await?;
        let answer = match call.invoke_async::<Value>(&mut link).await {
            Ok(answer) => answer,
            Err(e) => {
                if e.is_timeout() {
                    self.replace(&link);
                }
                return Err(e);
            }
        };
        match own_answer(answer, &nonce) {
            Some(value) => Ok(T::from_redis_value(value)?),
            None => {
                self.replace(&link);
                Err(out_of_step())
            }
        }
    }

    pub(crate) async fn subscribe(&self, channel: &str) -> RedisResult<()> {
        match self.link().await? {
            Link::Single(_, mut c) => c.subscribe(channel).await,
            Link::Cluster(_, mut c) => c.subscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> RedisResult<()> {
        match self.link().await? {
            Link::Single(_, mut c) => c.unsubscribe(channel).await,
            Link::Cluster(_, mut c) => c.unsubscribe(channel).await,
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl Single {
    fn replace(&self, generation: u64) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.0 != generation {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(fresh) => {
                tracing::info!(
                    backend = BACKEND,
                    "connection out of step or unanswered: replaced"
                );
                *current = (generation + 1, fresh);
                let _ = self.replaced.send(());
            }
            Err(e) => tracing::warn!(backend = BACKEND, error = %e, "replacing the connection"),
        }
    }
}

impl Clustered {
    /// The connections in use, made anew first if they were dropped.
    async fn link(&self) -> RedisResult<Link> {
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        let _one = self.rebuilding.lock().await;
        if let Some(link) = self.current_link() {
            return Ok(link);
        }
        let fresh = self.client.get_async_connection().await?;
        let generation = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            current.1 = Some(fresh.clone());
            current.0
        };
        tracing::info!(backend = BACKEND, "cluster connections made anew");
        let _ = self.replaced.send(());
        Ok(Link::Cluster(generation, fresh))
    }

    fn current_link(&self) -> Option<Link> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        let c = current.1.clone()?;
        Some(Link::Cluster(current.0, c))
    }

    fn replace(&self, generation: u64) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.0 == generation && current.1.is_some() {
            *current = (generation + 1, None);
        }
    }
}

/// Resolves the addresses of `Config::address_map` to their targets, others as usual.
struct AddressMap(std::collections::HashMap<(String, u16), std::net::SocketAddr>);

impl redis::io::AsyncDNSResolver for AddressMap {
    fn resolve<'a, 'b: 'a>(
        &'a self,
        host: &'b str,
        port: u16,
    ) -> RedisFuture<'a, Box<dyn Iterator<Item = std::net::SocketAddr> + Send + 'a>> {
        Box::pin(async move {
            if let Some(to) = self.0.get(&(host.to_string(), port)) {
                let one: Box<dyn Iterator<Item = _> + Send> = Box::new(std::iter::once(*to));
                return Ok(one);
            }
            let found: Vec<_> = tokio::net::lookup_host((host, port)).await?.collect();
            let all: Box<dyn Iterator<Item = _> + Send> = Box::new(found.into_iter());
            Ok(all)
        })
    }
}

fn address_map(config: &Config) -> AddressMap {
    let parse = |a: &str| a.parse::<std::net::SocketAddr>().ok();
    AddressMap(
        config
            .address_map
            .iter()
            .filter_map(|(from, to)| {
                let from = parse(from)?;
                Some(((from.ip().to_string(), from.port()), parse(to)?))
            })
            .collect(),
    )
}

/// The script's own answer: `[nonce, answer]` (`[nonce]` for a nil answer).
fn own_answer(answer: Value, nonce: &str) -> Option<Value> {
    let Value::Array(mut items) = answer else {
        return None;
    };
    let first = items.first()?;
    let ours = match first {
        Value::BulkString(b) => b == nonce.as_bytes(),
        Value::SimpleString(s) => s == nonce,
        _ => false,
    };
    if !ours || items.len() > 2 {
        return None;
    }
    Some(if items.len() == 2 {
        items.pop().unwrap_or(Value::Nil)
    } else {
        Value::Nil
    })
}

/// The error of a call that got another request's answer: its own was lost, so whether it
/// was applied is unknown (an I/O error, as a lost answer is).
fn out_of_step() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the answer was another request's: this one's was lost, the connection is replaced",
    ))
}

/// The connection for `config`, RESP3 so that pub/sub messages arrive as pushes on the same
/// connection; `replaced` hears when the standalone connection is replaced.
pub(crate) async fn open(
    config: &Config,
    pushes: mpsc::UnboundedSender<redis::PushInfo>,
    replaced: mpsc::UnboundedSender<()>,
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
            .async_dns_resolver(address_map(config))
            // Resends are harmless (every write is idempotent), but an unanswered request
            // must fail within about one timeout.
            .retries(1)
            .build()?;
        let first = client.get_async_connection().await?;
        return Ok(Conn::Cluster(Arc::new(Clustered {
            client,
            current: RwLock::new((0, Some(first))),
            rebuilding: tokio::sync::Mutex::new(()),
            replaced,
        })));
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
        .set_max_delay(std::time::Duration::from_secs(1))
        .set_push_sender(pushes)
        .set_automatic_resubscription();
    let first = ConnectionManager::new_with_config(client.clone(), manager.clone()).await?;
    // A replacement is made while calls wait: its connecting counts against a request's time.
    let connect = config.connect_timeout.min(config.request_timeout);
    Ok(Conn::Single(Arc::new(Single {
        client,
        config: manager.set_connection_timeout(Some(connect)),
        current: RwLock::new((0, first)),
        replaced,
    })))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_its_own_answer_is_taken() {
        let ours = Value::Array(vec![Value::BulkString(b"7".to_vec()), Value::Int(1)]);
        assert_eq!(own_answer(ours, "7"), Some(Value::Int(1)));
        let nil = Value::Array(vec![Value::BulkString(b"7".to_vec())]);
        assert_eq!(own_answer(nil, "7"), Some(Value::Nil));
        let other = Value::Array(vec![Value::BulkString(b"6".to_vec()), Value::Int(1)]);
        assert_eq!(own_answer(other, "7"), None);
        assert_eq!(own_answer(Value::Int(1), "7"), None);
    }
}
