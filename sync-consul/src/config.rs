//! Configuration of the Consul backend: the agent's address, token, datacenter, namespace, the
//! session's TTL and lock-delay, TLS and the timeouts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::url::BackendUrl;
use sync_core::{Error, Result};

use crate::BACKEND;

/// The shortest session TTL Consul accepts: 10 s.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// The longest session TTL Consul accepts: one day.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// The longest lock-delay Consul applies: 60 s (it caps longer ones silently).
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// How a [`Client`](crate::Client) connects and behaves.
///
/// The fields are flat, so each is a query key of [`Config::from_url`] as well as a JSON or
/// TOML key: `{"address": "h:8500", "ttl": "15s"}` and `consul://h:8500?ttl=15s` are the same
/// config.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// `host:port` of the Consul agent's HTTP API.
    pub address: String,
    /// Talk HTTPS (`consuls://`).
    pub tls: bool,
    /// ACL token sent with every request (`X-Consul-Token`).
    pub token: Option<String>,
    /// Datacenter of every request; the agent's own when unset.
    pub datacenter: Option<String>,
    /// Prefix of every key (default `sync`); empty for keys at the top level, as `consul lock`
    /// writes them.
    pub namespace: String,
    /// The session TTL: a dead holder's locks free between one and two TTLs after its last
    /// renewal (Consul invalidates lazily), plus the lock-delay. [`MIN_TTL`] to [`MAX_TTL`],
    /// whole seconds. The client renews every half TTL.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long Consul keeps a lock from anyone after its holder's session was invalidated
    /// (15 s, Consul's default; at most [`MAX_LOCK_DELAY`]; whole milliseconds). It gives a
    /// holder that was cut off time to notice before another is granted the lock. A release
    /// by the holder is not delayed.
    #[serde(with = "humantime_serde")]
    pub lock_delay: Duration,
    /// How long connecting may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one request may wait for its answer (a blocking query: its wait plus this): an
    /// agent that accepts and never answers fails the call (Unavailable) instead of hanging
    /// it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The longest wait of one blocking query (Consul's `wait`, at most 10 minutes); a waiter
    /// asks again after it.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    /// How long a finished job (record and output) stays readable.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// With TLS: PEM file of the CA that signed the agent's certificate. Without it, the
    /// system's roots are trusted.
    pub ca_file: Option<String>,
    /// With TLS: PEM file of the client certificate (mutual TLS, with `key_file`).
    pub cert_file: Option<String>,
    /// With TLS: PEM file of the client key (mutual TLS, with `cert_file`).
    pub key_file: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("lock_delay", &self.lock_delay)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("wait", &self.wait)
            .field("job_retention", &self.job_retention)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: "127.0.0.1:8500".to_string(),
            tls: false,
            token: None,
            datacenter: None,
            namespace: "sync".to_string(),
            ttl: Duration::from_secs(15),
            lock_delay: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            wait: Duration::from_secs(60),
            job_retention: Duration::from_secs(3600),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

const SCHEMES: [&str; 2] = ["consul", "consuls"];

impl Config {
    /// Parses `consul://host[:port][/namespace][?token=…&datacenter=dc1&ttl=15s…]`, or
    /// `consuls://…` for HTTPS. The query keys are the field names, durations human-readable
    /// as in JSON. A port defaults to 8500 (8501 with TLS); the namespace to `sync`, and a lone
    /// `/` is the empty namespace.
    ///
    /// ```
    /// let c = sync_consul::Config::from_url("consul://h/app?token=s3cret&lock_delay=1s").unwrap();
    /// assert_eq!((c.address.as_str(), c.namespace.as_str()), ("h:8500", "app"));
    /// assert_eq!(c.token.as_deref(), Some("s3cret"));
    /// assert_eq!(c.lock_delay, std::time::Duration::from_secs(1));
    /// let err = sync_consul::Config::from_url("consul://h?ttl=5s").unwrap_err();
    /// assert!(err.to_string().contains("at least 10s"));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        Self::parse_url(url).map_err(|e| e.with_backend(BACKEND))
    }

    fn parse_url(url: &str) -> Result<Config> {
        let (url, mut config) =
            BackendUrl::parse_config::<Config>(url, &SCHEMES, &["address", "namespace", "tls"])?;
        url.reject_credentials()?;
        config.tls = url.scheme == "consuls";
        let hosts = url.require_hosts()?;
        if hosts.len() > 1 {
            return Err(Error::invalid(format!(
                "{} hosts given; a client talks to one Consul agent (the local one, usually)",
                hosts.len()
            )));
        }
        config.address = with_port(&hosts[0], if config.tls { 8501 } else { 8500 });
        if let Some(namespace) = url.namespace {
            config.namespace = namespace;
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the agent's `host:port`.
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the ACL token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Sets the datacenter.
    pub fn with_datacenter(mut self, datacenter: impl Into<String>) -> Self {
        self.datacenter = Some(datacenter.into());
        self
    }

    /// Sets the session TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the lock-delay.
    pub fn with_lock_delay(mut self, lock_delay: Duration) -> Self {
        self.lock_delay = lock_delay;
        self
    }

    /// Sets how long one request may wait for its answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the longest wait of one blocking query.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets how long finished jobs stay readable.
    pub fn with_job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
        self
    }

    /// Turns HTTPS on or off.
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the PEM file of the CA that signed the agent's certificate (with TLS).
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

    /// Checks the address, namespace, TTL, lock-delay, timeouts and TLS.
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|e| e.with_backend(BACKEND))
    }

    fn check(&self) -> Result<()> {
        sync_core::url::check_host(&self.address)
            .map_err(|e| Error::invalid(format!("address {:?}: {}", self.address, e.message())))?;
        sync_core::id::validate_namespace(&self.namespace)?;
        sync_core::raw::validate_ttl(BACKEND, self.ttl, MIN_TTL)?;
        if self.ttl > MAX_TTL || self.ttl.subsec_nanos() != 0 {
            return Err(Error::invalid(format!(
                "ttl is {:?}; Consul takes whole seconds, at most {MAX_TTL:?}",
                self.ttl
            )));
        }
        if self.lock_delay > MAX_LOCK_DELAY || self.lock_delay.subsec_nanos() % 1_000_000 != 0 {
            return Err(Error::invalid(format!(
                "lock_delay is {:?}; it must be whole milliseconds, at most {MAX_LOCK_DELAY:?} \
                 (Consul's cap)",
                self.lock_delay
            )));
        }
        for (name, d) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(format!("{name} must be above zero")));
            }
        }
        if self.wait < Duration::from_secs(1) || self.wait > Duration::from_secs(600) {
            return Err(Error::invalid(format!(
                "wait is {:?}; it must be 1s to 10m (Consul's longest blocking query)",
                self.wait
            )));
        }
        if self.job_retention < Duration::from_secs(1) {
            return Err(Error::invalid(format!(
                "job_retention is {:?}; it must be at least 1s",
                self.job_retention
            )));
        }
        if let Some(dc) = &self.datacenter
            && (dc.is_empty()
                || !dc
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
        {
            return Err(Error::invalid(format!(
                "datacenter {dc:?} must be letters, digits, '-', '_' or '.'"
            )));
        }
        if let Some(token) = &self.token
            && token.bytes().any(|b| b.is_ascii_control())
        {
            return Err(Error::invalid("token must not hold control characters"));
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
                    "{key} needs TLS: use a consuls:// url or set tls"
                ))),
                None => Ok(()),
            };
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(Error::invalid(
                "mutual TLS needs both cert_file and key_file",
            ));
        }
        Ok(())
    }

    /// `http://host:port` or `https://host:port`.
    pub(crate) fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }
}

/// `host` with `port` when it has none.
fn with_port(host: &str, port: u16) -> String {
    let has_port = match host.rsplit_once(']') {
        Some((_, rest)) => rest.starts_with(':'),
        None => host.contains(':'),
    };
    if has_port {
        host.to_string()
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Config::from_url("consul://127.0.0.1:18500").unwrap();
        assert_eq!((c.namespace.as_str(), c.tls), ("sync", false));
        assert_eq!(c.base_url(), "http://127.0.0.1:18500");
        assert_eq!(Config::from_url("consul://h/").unwrap().namespace, "");
        assert_eq!(Config::from_url("consuls://h").unwrap().address, "h:8501");
        assert_eq!(
            Config::from_url("consul://[::1]").unwrap().address,
            "[::1]:8500"
        );
        for bad in [
            "consul://a:1,b:2",
            "consul://h?ttl=5s",
            "consul://h?ttl=10500ms",
            "consul://h?ttl=2d",
            "consul://h?lock_delay=61s",
            "consul://h?bogus=1",
            "consul://u:p@h",
            "consul://h?wait=0s",
            "consul://h?datacenter=a%20b",
            "redis://h",
            "consul://h:0",
            "consul://h?ca_file=%2Fca.pem",
        ] {
            let err = Config::from_url(bad).unwrap_err();
            assert_eq!(
                err.kind(),
                sync_core::ErrorKind::InvalidArgument,
                "{bad}: {err}"
            );
        }
        let err = Config::from_url("consul://h?ttl=9s").unwrap_err();
        assert!(err.to_string().contains("ttl"), "{err}");
    }

    #[test]
    fn url_and_json_give_the_same_config() {
        let from_url = Config::from_url("consul://a:1/ns?ttl=20s&lock_delay=0s").unwrap();
        let from_json: Config = serde_json::from_str(
            r#"{"address":"a:1","namespace":"ns","ttl":"20s","lock_delay":"0s"}"#,
        )
        .unwrap();
        assert_eq!(from_url, from_json);
    }

    #[test]
    fn debug_hides_the_token() {
        let c = Config::default().with_token("s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
