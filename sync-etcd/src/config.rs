//! Configuration of the etcd backend: endpoints, namespace, lease TTL, auth and TLS.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::{Error, Result};

use crate::BACKEND;

/// The shortest lease TTL accepted: 2 s.
///
/// etcd grants no lease shorter than its `minLeaseTTL`, which is 1.5 election timeouts
/// (`3 * electionTicks / 2 * heartbeat-interval`): with the default 100 ms heartbeat and 1 s
/// election timeout that is 1.5 s, which etcd rounds up to whole seconds — 2 s. A lease asked
/// for with a shorter TTL would silently be granted 2 s, so this crate refuses it instead.
/// etcd leases are whole seconds, so a TTL with a fractional second is refused as well.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// The longest lease TTL etcd grants (its `MaxLeaseTTL`, 9,000,000,000 s).
pub const MAX_TTL: Duration = Duration::from_secs(9_000_000_000);

/// The TLS settings (with the `tls` cargo feature): PEM files for the CA, and optionally the
/// client certificate and key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM file of the CA that signed the server certificates (system roots are not used).
    pub ca_file: Option<String>,
    /// PEM file of the client certificate (mutual TLS).
    pub cert_file: Option<String>,
    /// PEM file of the client key (mutual TLS).
    pub key_file: Option<String>,
    /// The server name to verify, when it differs from the endpoint host.
    pub domain: Option<String>,
}

/// How a [`Client`](crate::Client) connects and behaves.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Config {
    /// etcd endpoints, `host:port` or `http://host:port` (`https://` with TLS).
    pub endpoints: Vec<String>,
    /// Key prefix of every handle (default `sync`). With `""`, locks and elections use exactly
    /// the key layout of etcd's `concurrency.Mutex` / `etcdctl lock` and
    /// `concurrency.Election` / `etcdctl elect`.
    pub namespace: String,
    /// The lease TTL: a dead client's locks free after about this long. Whole seconds, at
    /// least [`MIN_TTL`].
    #[serde(with = "sync_core::serde_millis")]
    pub ttl: Duration,
    /// User name for etcd authentication.
    pub user: Option<String>,
    /// Password for etcd authentication.
    pub password: Option<String>,
    /// TLS settings; `None` for plain HTTP/2. Needs the `tls` cargo feature.
    pub tls: Option<TlsConfig>,
    /// How long connecting may take.
    #[serde(with = "sync_core::serde_millis")]
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            namespace: "sync".to_string(),
            ttl: Duration::from_secs(10),
            user: None,
            password: None,
            tls: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::invalid(format!("bad percent escape in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| Error::invalid(format!("{s:?} is not UTF-8")).with_source(e))
}

impl Config {
    /// Parses `etcd://[user:password@]h1:2379,h2:2379[/namespace][?ttl_ms=N&connect_timeout_ms=N]`.
    ///
    /// `etcds://` selects TLS (the `tls` feature; `ca_file`, `cert_file`, `key_file` and
    /// `domain` may be given as query parameters). Without a path the namespace is `sync`; the
    /// path `/` alone selects the empty namespace (etcd's own key layout).
    ///
    /// ```
    /// let c = sync_etcd::Config::from_url("etcd://u:p%40ss@h1:2379,h2:2379/tenant-a?ttl_ms=3000").unwrap();
    /// assert_eq!(c.endpoints, ["http://h1:2379", "http://h2:2379"]);
    /// assert_eq!(c.namespace, "tenant-a");
    /// assert_eq!(c.password.as_deref(), Some("p@ss"));
    /// assert_eq!(c.ttl, std::time::Duration::from_secs(3));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        let bad = |why: String| {
            Error::invalid(format!("bad etcd url {url:?}: {why}")).with_backend(BACKEND)
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected etcd://hosts/namespace".into()))?;
        let tls = match scheme {
            "etcd" => false,
            "etcds" => true,
            other => {
                return Err(bad(format!(
                    "scheme {other:?}; expected etcd:// or etcds://"
                )));
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let mut config = Config::default();
        let hosts = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                config.user = Some(percent_decode(user)?);
                config.password = password.map(percent_decode).transpose()?;
                hosts
            }
            None => authority,
        };
        let http = if tls { "https" } else { "http" };
        config.endpoints = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("{http}://{h}"))
            .collect();
        if config.endpoints.is_empty() {
            return Err(bad("no endpoints".into()));
        }
        if let Some(path) = path {
            config.namespace = percent_decode(path.trim_end_matches('/'))?;
        }
        let mut tls_config = TlsConfig::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v)?;
            let ms = || {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|e| bad(format!("{k}={v} is not milliseconds")).with_source(e))
            };
            match k {
                "ttl_ms" => config.ttl = ms()?,
                "connect_timeout_ms" => config.connect_timeout = ms()?,
                "ca_file" => tls_config.ca_file = Some(v),
                "cert_file" => tls_config.cert_file = Some(v),
                "key_file" => tls_config.key_file = Some(v),
                "domain" => tls_config.domain = Some(v),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?}; known: ttl_ms, connect_timeout_ms, \
                         ca_file, cert_file, key_file, domain"
                    )));
                }
            }
        }
        if tls {
            config.tls = Some(tls_config);
        } else if tls_config != TlsConfig::default() {
            return Err(bad("TLS parameters need the etcds:// scheme".into()));
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the endpoints.
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

    /// Sets the lease TTL.
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

    /// Sets the TLS settings.
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks endpoints, namespace and TTL.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid("at least one endpoint is needed").with_backend(BACKEND));
        }
        sync_core::id::validate_namespace(&self.namespace).map_err(|e| e.with_backend(BACKEND))?;
        sync_core::raw::validate_ttl(BACKEND, self.ttl, MIN_TTL)?;
        if self.ttl > MAX_TTL {
            return Err(Error::invalid(format!(
                "ttl is {:?}; etcd's maximum is {MAX_TTL:?}",
                self.ttl
            ))
            .with_backend(BACKEND));
        }
        if self.ttl.subsec_nanos() != 0 {
            return Err(Error::invalid(format!(
                "ttl is {:?}; etcd leases are whole seconds (at least {MIN_TTL:?})",
                self.ttl
            ))
            .with_backend(BACKEND));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid("connect_timeout must be above zero").with_backend(BACKEND));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid("a password needs a user").with_backend(BACKEND));
        }
        #[cfg(not(feature = "tls"))]
        if self.tls.is_some() {
            return Err(Error::new(
                sync_core::ErrorKind::Unsupported,
                "TLS needs sync-etcd's `tls` cargo feature",
            )
            .with_backend(BACKEND));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_limits_are_named() {
        let err = Config::default()
            .with_ttl(Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert_eq!(err.kind(), sync_core::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("at least 2s"), "{err}");
        let err = Config::default()
            .with_ttl(Duration::from_millis(2500))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("whole seconds"), "{err}");
        assert!(
            Config::default()
                .with_ttl(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            Config::default()
                .with_ttl(Duration::from_secs(2))
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn serde_round_trip() {
        let c = Config::from_url("etcd://u:p@h1:1,h2:2/ns?ttl_ms=3000").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"ttl\":3000"), "{json}");
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
        let partial: Config = serde_json::from_str(r#"{"namespace":"x"}"#).unwrap();
        assert_eq!(partial.namespace, "x");
        assert_eq!(partial.ttl, Config::default().ttl);
    }

    #[test]
    fn urls() {
        let c = Config::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(c.namespace, "sync");
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379"]);
        let c = Config::from_url("etcd://127.0.0.1:2379/").unwrap();
        assert_eq!(c.namespace, "");
        let c = Config::from_url("etcd://a:1,b:2/x.y").unwrap();
        assert_eq!(c.namespace, "x.y");
        assert_eq!(c.endpoints.len(), 2);
        let nested = Config::from_url("etcd://a:1/x/y").unwrap_err();
        assert!(
            nested.to_string().contains("must not contain '/'"),
            "{nested}"
        );
        assert!(Config::from_url("consul://a").is_err());
        assert!(Config::from_url("etcd://").is_err());
        assert!(Config::from_url("etcd://a:1?ttl_ms=1000").is_err());
        assert!(Config::from_url("etcd://a:1?bogus=1").is_err());
        assert!(Config::from_url("etcd://a:1?ca_file=x").is_err());
    }
}
