//! Configuration of the Redis backend: endpoints, standalone or cluster, namespace, TTL, auth,
//! TLS and the timeouts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::url::BackendUrl;
use sync_core::{Error, Result};

use crate::BACKEND;

/// The shortest lock TTL accepted: 500 ms. Renewals run every third of the TTL and each may
/// take up to `request_timeout`; below this a loaded machine loses locks it still holds.
pub const MIN_TTL: Duration = Duration::from_millis(500);

/// The longest TTL accepted: one day. A longer one only delays how soon a dead holder's lock
/// frees; it buys nothing, since renewals keep a living holder's lock anyway.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// How a [`Client`](crate::Client) connects and behaves.
///
/// The fields are flat, so each is a query key of [`Config::from_url`] as well as a JSON or
/// TOML key: `{"endpoints": ["h:6379"], "ttl": "5s"}` and `redis://h:6379?ttl=5s` are the same
/// config.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// `host:port` of the server, or of any number of cluster nodes (`cluster`).
    pub endpoints: Vec<String>,
    /// Talk to a Redis Cluster (`redis+cluster://`): the endpoints are seed nodes.
    pub cluster: bool,
    /// Connect with TLS (`rediss://`, `rediss+cluster://`); needs the `tls` cargo feature.
    pub tls: bool,
    /// ACL user (Redis 6+); with only a password, the `default` user.
    pub user: Option<String>,
    /// Password of the user.
    pub password: Option<String>,
    /// Logical database of a standalone server (a cluster has only 0).
    pub db: i64,
    /// Prefix of every key (default `sync`).
    pub namespace: String,
    /// The lock TTL: a dead holder's locks free after about this long; a living holder renews
    /// every third of it. Whole milliseconds, [`MIN_TTL`] to [`MAX_TTL`].
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long connecting may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one request may wait for its answer: a server that accepts and never answers
    /// fails the call (Unavailable) instead of hanging it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The safety-net poll of a waiter: releases wake waiters through pub/sub and a dead
    /// holder's expiry at its key's TTL; this only bounds a wake-up lost some other way.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// How long a finished job (record and output) stays readable.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// With TLS: PEM file of the CA that signed the server certificate. Without it, the
    /// system's roots are trusted.
    pub ca_file: Option<String>,
    /// With TLS: PEM file of the client certificate (mutual TLS, with `key_file`).
    pub cert_file: Option<String>,
    /// With TLS: PEM file of the client key (mutual TLS, with `cert_file`).
    pub key_file: Option<String>,
    /// Where to connect for a `host:port` a Redis Cluster announces (`{"10.0.0.5:6379":
    /// "127.0.0.1:16379"}`): for a cluster reached through NAT, a tunnel or a proxy, whose
    /// nodes announce addresses this client cannot reach. Config files only, not URLs.
    pub address_map: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoints", &self.endpoints)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("db", &self.db)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("poll", &self.poll)
            .field("job_retention", &self.job_retention)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("address_map", &self.address_map)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: vec!["127.0.0.1:6379".to_string()],
            cluster: false,
            tls: false,
            user: None,
            password: None,
            db: 0,
            namespace: "sync".to_string(),
            ttl: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(3),
            poll: Duration::from_secs(10),
            job_retention: Duration::from_secs(3600),
            ca_file: None,
            cert_file: None,
            key_file: None,
            address_map: Default::default(),
        }
    }
}

const SCHEMES: [&str; 4] = ["redis", "rediss", "redis+cluster", "rediss+cluster"];

impl Config {
    /// Parses `redis://[user[:password]@]host:port[/namespace][?db=0&ttl=5s…]`, `rediss://…`
    /// (TLS), and `redis+cluster://h1:p1,h2:p2[/namespace]` (`rediss+cluster://` with TLS)
    /// for a Redis Cluster given by any of its nodes.
    ///
    /// The query keys are the field names, durations human-readable as in JSON. Unlike the
    /// redis crate's own URLs, the path is the namespace (the key prefix, default `sync`); the
    /// database is the `db` query key. A port defaults to 6379.
    ///
    /// ```
    /// let c = sync_redis::Config::from_url("redis://app:s%40cret@h:6380/tenant-a?db=2&ttl=5s").unwrap();
    /// assert_eq!(c.endpoints, ["h:6380"]);
    /// assert_eq!((c.user.as_deref(), c.password.as_deref()), (Some("app"), Some("s@cret")));
    /// assert_eq!((c.namespace.as_str(), c.db), ("tenant-a", 2));
    /// let c = sync_redis::Config::from_url("redis+cluster://a:7000,b:7001").unwrap();
    /// assert!(c.cluster);
    /// assert_eq!(c.endpoints, ["a:7000", "b:7001"]);
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        Self::parse_url(url).map_err(|e| e.with_backend(BACKEND))
    }

    fn parse_url(url: &str) -> Result<Config> {
        let (url, mut config) = BackendUrl::parse_config::<Config>(
            url,
            &SCHEMES,
            &[
                "endpoints",
                "namespace",
                "user",
                "password",
                "tls",
                "cluster",
            ],
        )?;
        config.tls = url.scheme.starts_with("rediss");
        config.cluster = url.scheme.ends_with("+cluster");
        config.endpoints = url.require_hosts()?.iter().map(|h| with_port(h)).collect();
        if let Some(namespace) = url.namespace {
            config.namespace = namespace;
        }
        config.user = url.user.filter(|u| !u.is_empty());
        config.password = url.password;
        config.validate()?;
        Ok(config)
    }

    /// Sets the endpoints (`host:port`).
    pub fn with_endpoints<S: Into<String>>(
        mut self,
        endpoints: impl IntoIterator<Item = S>,
    ) -> Self {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the lock TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets user and password.
    pub fn with_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Turns TLS on or off (on needs the `tls` feature).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the PEM file of the CA that signed the server certificate (with TLS).
    pub fn with_ca_file(mut self, ca_file: impl Into<String>) -> Self {
        self.ca_file = Some(ca_file.into());
        self
    }

    /// Sets the PEM files of the client certificate and key, for mutual TLS.
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<String>,
        key_file: impl Into<String>,
    ) -> Self {
        self.cert_file = Some(cert_file.into());
        self.key_file = Some(key_file.into());
        self
    }

    /// Connects to `to` wherever the cluster announces `from` (both `ip:port`).
    pub fn with_address(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.address_map.insert(from.into(), to.into());
        self
    }

    /// Sets how long one request may wait for its answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the waiters' safety-net poll.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Sets how long finished jobs stay readable.
    pub fn with_job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
        self
    }

    /// Checks endpoints, namespace, TTL, timeouts and TLS.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| e.with_backend(BACKEND))
    }

    fn check(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid("at least one endpoint is needed"));
        }
        if !self.cluster && self.endpoints.len() > 1 {
            return Err(Error::invalid(format!(
                "{} endpoints given for a standalone server; a Redis Cluster is \
                 redis+cluster://h1:p1,h2:p2 (or `cluster`)",
                self.endpoints.len()
            )));
        }
        for e in &self.endpoints {
            sync_core::url::check_host(e)
                .map_err(|err| Error::invalid(format!("endpoint {e:?}: {}", err.message())))?;
        }
        for (from, to) in &self.address_map {
            for addr in [from, to] {
                addr.parse::<std::net::SocketAddr>().map_err(|_| {
                    Error::invalid(format!(
                        "address_map entry {from:?} -> {to:?}: {addr:?} is not an ip:port"
                    ))
                })?;
            }
        }
        sync_core::id::validate_namespace(&self.namespace)?;
        sync_core::raw::validate_ttl(BACKEND, self.ttl, MIN_TTL)?;
        if self.ttl > MAX_TTL || self.ttl.subsec_nanos() % 1_000_000 != 0 {
            return Err(Error::invalid(format!(
                "ttl is {:?}; it must be whole milliseconds, at most {MAX_TTL:?}",
                self.ttl
            )));
        }
        if !(0..=1_000_000).contains(&self.db) || (self.cluster && self.db != 0) {
            return Err(Error::invalid(format!(
                "db is {}; it must be 0 to 1000000, and 0 on a Redis Cluster",
                self.db
            )));
        }
        for (name, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
            ("poll", self.poll),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(format!("{name} must be above zero")));
            }
        }
        if self.job_retention < Duration::from_secs(1) {
            return Err(Error::invalid(format!(
                "job_retention is {:?}; it must be at least 1s",
                self.job_retention
            )));
        }
        if self.password.is_none() && self.user.is_some() {
            return Err(Error::invalid("a user needs a password"));
        }
        self.check_tls()
    }

    /// TLS files without TLS would be ignored; a certificate without its key refused later.
    fn check_tls(&self) -> Result<()> {
        let files = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ];
        if !self.tls {
            return match files.iter().find(|(_, v)| v.is_some()) {
                Some((key, _)) => Err(Error::invalid(format!(
                    "{key} needs TLS: use a rediss:// url or set tls"
                ))),
                None => Ok(()),
            };
        }
        if !cfg!(feature = "tls") {
            return Err(Error::new(
                sync_core::ErrorKind::Unsupported,
                "TLS (rediss://) needs sync-redis's `tls` cargo feature",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid(
                "mutual TLS needs both cert_file and key_file",
            ));
        }
        Ok(())
    }
}

/// `host` with Redis's default port when it has none.
fn with_port(host: &str) -> String {
    let has_port = match host.rsplit_once(']') {
        Some((_, rest)) => rest.starts_with(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_string()
    } else {
        format!("{host}:6379")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Config::from_url("redis://127.0.0.1:13379").unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.cluster, c.tls),
            ("sync", false, false)
        );
        assert_eq!(Config::from_url("redis://h/").unwrap().namespace, "");
        assert_eq!(Config::from_url("redis://h").unwrap().endpoints, ["h:6379"]);
        assert_eq!(
            Config::from_url("redis://[::1]").unwrap().endpoints,
            ["[::1]:6379"]
        );
        let c = Config::from_url("redis://:pw@h:1").unwrap();
        assert_eq!((c.user, c.password.as_deref()), (None, Some("pw")));
        for bad in [
            "redis://a:1,b:2",
            "redis://h?ttl=100ms",
            "redis://h?ttl=1500us",
            "redis://h?bogus=1",
            "redis+cluster://a:1?db=1",
            "redis://u@h",
            "redis://h?poll=0s",
            "consul://h",
            "redis://h:0",
            "redis://h?ca_file=%2Fca.pem",
        ] {
            let err = Config::from_url(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                sync_core::ErrorKind::InvalidArgument,
                "{bad}: {err}"
            );
        }
        let err = Config::from_url("redis://h?ttl=100ms").unwrap_err();
        assert!(err.to_string().contains("at least 500ms"), "{err}");
    }

    #[test]
    fn address_map_entries_are_ip_ports() {
        let ok = Config::default().with_address("10.0.0.5:6379", "127.0.0.1:16379");
        assert!(ok.validate().is_ok());
        let bad = Config::default().with_address("node-1:6379", "127.0.0.1:16379");
        let err = bad.validate().unwrap_err();
        assert!(err.to_string().contains("is not an ip:port"), "{err}");
    }

    #[test]
    fn url_and_json_give_the_same_config() {
        let from_url = Config::from_url("redis+cluster://a:1,b:2/ns?ttl=5s&poll=30s").unwrap();
        let from_json: Config = serde_json_like(
            r#"{"endpoints":["a:1","b:2"],"cluster":true,"namespace":"ns","ttl":"5s","poll":"30s"}"#,
        );
        assert_eq!(from_url, from_json);
    }

    fn serde_json_like(json: &str) -> Config {
        serde_json::from_str(json).unwrap()
    }
}
