//! Configuration of the etcd backend: endpoints, namespace, lease TTL, auth and TLS.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::url::BackendUrl;
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

/// How a [`Client`](crate::Client) connects and behaves.
///
/// The fields are flat, so each one is a query key of [`Config::from_url`] as well as a JSON or
/// TOML key: `{"endpoints": ["https://h:2379"], "tls": true, "ca_file": "ca.pem", "ttl": "5s"}`
/// and `etcds://h:2379?ca_file=ca.pem&ttl=5s` are the same config.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// User name for etcd authentication.
    pub user: Option<String>,
    /// Password for etcd authentication.
    pub password: Option<String>,
    /// How long connecting may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long one request may wait for its answer: an endpoint that accepts and never
    /// answers fails the call (Unavailable) instead of hanging it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a finished job (its record and output) stays readable before etcd deletes it:
    /// at least this long, at most an eighth longer. At least [`MIN_TTL`].
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
    /// Connect with TLS (the `etcds://` scheme); needs the `tls` cargo feature.
    pub tls: bool,
    /// With TLS, required: PEM file of the CA that signed the server certificates. System and
    /// webpki roots are not used (etcd is served with a private CA), so TLS without it is
    /// refused by [`Config::validate`]. [`Client::connect`](crate::Client::connect) reads and
    /// checks it (and `cert_file`, `key_file`) before dialling.
    pub ca_file: Option<String>,
    /// With TLS: PEM file of the client certificate (mutual TLS, with `key_file`).
    pub cert_file: Option<String>,
    /// With TLS: PEM file of the client key (mutual TLS, with `cert_file`).
    pub key_file: Option<String>,
    /// With TLS: the server name to verify, when it differs from the endpoint host.
    pub tls_domain: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("ttl", &self.ttl)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("tls_domain", &self.tls_domain)
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
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            job_retention: Duration::from_secs(3600),
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_domain: None,
        }
    }
}

impl Config {
    /// Parses `etcd://[user[:password]@]h1:2379,h2:2379[/namespace][?ttl=5s&connect_timeout=5s]`.
    ///
    /// The query keys are the field names, durations human-readable as in JSON. `etcds://`
    /// selects TLS (the `tls` feature) and https endpoints; only then may `ca_file`,
    /// `cert_file`, `key_file` and `tls_domain` be given. Without a path the namespace is
    /// `sync`; the path `/` alone selects the empty namespace (etcd's own key layout).
    ///
    /// ```
    /// let c = sync_etcd::Config::from_url("etcd://u:p%40ss@h1:2379,h2:2379/tenant-a?ttl=3s").unwrap();
    /// assert_eq!(c.endpoints, ["http://h1:2379", "http://h2:2379"]);
    /// assert_eq!(c.namespace, "tenant-a");
    /// assert_eq!(c.password.as_deref(), Some("p@ss"));
    /// assert_eq!(c.ttl, std::time::Duration::from_secs(3));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        Self::parse_url(url).map_err(|e| e.with_backend(BACKEND))
    }

    fn parse_url(url: &str) -> Result<Config> {
        let (url, mut config) = BackendUrl::parse_config::<Config>(
            url,
            &["etcd", "etcds"],
            &["endpoints", "namespace", "user", "password", "tls"],
        )?;
        config.tls = url.scheme == "etcds";
        let http = if config.tls { "https" } else { "http" };
        config.endpoints = url
            .require_hosts()?
            .iter()
            .map(|host| format!("{http}://{host}"))
            .collect();
        if let Some(namespace) = url.namespace {
            config.namespace = namespace;
        }
        config.user = url.user;
        config.password = url.password;
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

    /// Turns TLS on or off (on needs the `tls` feature and `https://` or bare endpoints).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Sets the PEM file of the CA that signed the server certificates (with TLS).
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

    /// Sets the server name TLS verifies, when it differs from the endpoint host.
    pub fn with_tls_domain(mut self, domain: impl Into<String>) -> Self {
        self.tls_domain = Some(domain.into());
        self
    }

    /// Sets how long one request may wait for its answer.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how long finished jobs stay readable.
    pub fn with_job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
        self
    }

    /// Checks endpoints, namespace and TTL.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid("at least one endpoint is needed").with_backend(BACKEND));
        }
        self.endpoints.iter().try_for_each(|e| check_endpoint(e))?;
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
        if self.job_retention < MIN_TTL || self.job_retention > MAX_TTL {
            return Err(Error::invalid(format!(
                "job_retention is {:?}; it must be at least {MIN_TTL:?} and at most {MAX_TTL:?} \
                 (it is an etcd lease)",
                self.job_retention
            ))
            .with_backend(BACKEND));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::invalid("request_timeout must be above zero").with_backend(BACKEND));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid("connect_timeout must be above zero").with_backend(BACKEND));
        }
        if self.password.is_some() && self.user.is_none() {
            return Err(Error::invalid("a password needs a user").with_backend(BACKEND));
        }
        self.validate_tls()
    }

    /// TLS settings without TLS, or TLS to a plain `http://` endpoint, would be ignored or
    /// refused later; name them now.
    fn validate_tls(&self) -> Result<()> {
        let tls_settings = [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("tls_domain", &self.tls_domain),
        ];
        if !self.tls {
            return match tls_settings.iter().find(|(_, v)| v.is_some()) {
                Some((key, _)) => Err(Error::invalid(format!(
                    "{key} needs TLS: use an etcds:// url or set tls"
                ))
                .with_backend(BACKEND)),
                None => Ok(()),
            };
        }
        if let Some(plain) = self.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(Error::invalid(format!(
                "endpoint {plain:?} is plain http, but tls is set; use https://"
            ))
            .with_backend(BACKEND));
        }
        if !cfg!(feature = "tls") {
            return Err(Error::new(
                sync_core::ErrorKind::Unsupported,
                "TLS needs sync-etcd's `tls` cargo feature",
            )
            .with_backend(BACKEND));
        }
        if self.ca_file.is_none() {
            return Err(Error::invalid(
                "tls needs ca_file, the PEM file of the CA that signed etcd's server \
                 certificate: system and webpki roots are not used",
            )
            .with_backend(BACKEND));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            let (given, path, missing) = match (&self.cert_file, &self.key_file) {
                (Some(path), _) => ("cert_file", path.as_str(), "key_file"),
                (_, path) => ("key_file", path.as_deref().unwrap_or_default(), "cert_file"),
            };
            return Err(Error::invalid(format!(
                "{given} {path:?} is given without {missing}: mutual TLS needs both"
            ))
            .with_backend(BACKEND));
        }
        Ok(())
    }
}

/// One endpoint, `[http[s]://]host[:port][/]`: the same host and port rules as a URL's, so a
/// bad port is named here rather than dialled as port 80.
fn check_endpoint(endpoint: &str) -> Result<()> {
    let authority = ["http://", "https://"]
        .iter()
        .find_map(|scheme| endpoint.strip_prefix(scheme))
        .unwrap_or(endpoint);
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let bad =
        |why: &str| Error::invalid(format!("endpoint {endpoint:?}: {why}")).with_backend(BACKEND);
    if authority.contains('/') {
        return Err(bad("has a path; expected [http[s]://]host[:port]"));
    }
    sync_core::url::check_host(authority).map_err(|e| bad(e.message()))
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
        let c = Config::from_url("etcd://u:p@h1:1,h2:2/ns?ttl=3s").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""ttl":"3s""#), "{json}");
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
        assert!(Config::from_url("etcd://a:1?ttl=1s").is_err());
        assert!(Config::from_url("etcd://a:1?ttl_ms=3000").is_err());
        assert!(Config::from_url("etcd://a:1?bogus=1").is_err());
        assert!(Config::from_url("etcd://a:1?ca_file=x").is_err());
    }

    #[test]
    fn url_and_json_give_the_same_config() {
        let from_url = Config::from_url(
            "etcds://u:p@h1:2379,[::1]:2379/?ttl=5s&connect_timeout=1s&ca_file=%2Fca.pem&tls_domain=etcd",
        );
        let from_json = serde_json::from_str::<Config>(
            r#"{"endpoints":["https://h1:2379","https://[::1]:2379"],"namespace":"","ttl":"5s",
                "user":"u","password":"p","connect_timeout":"1s","tls":true,
                "ca_file":"/ca.pem","tls_domain":"etcd"}"#,
        )
        .unwrap();
        if cfg!(feature = "tls") {
            assert_eq!(from_url.unwrap(), from_json);
        } else {
            let err = from_url.unwrap_err();
            assert_eq!(err.kind(), sync_core::ErrorKind::Unsupported, "{err}");
        }
        let from_url = Config::from_url("etcd://h:1/ns?connect_timeout=300ms").unwrap();
        let from_json = serde_json::from_str::<Config>(
            r#"{"endpoints":["http://h:1"],"namespace":"ns","connect_timeout":"300ms"}"#,
        )
        .unwrap();
        assert_eq!(from_url, from_json);
    }

    #[test]
    fn bad_urls_name_the_problem() {
        let msg = |url: &str| {
            let err = Config::from_url(url).unwrap_err();
            assert_eq!(
                err.kind(),
                sync_core::ErrorKind::InvalidArgument,
                "{url}: {err}"
            );
            assert_eq!(err.backend(), Some(BACKEND), "{url}: {err}");
            err.to_string()
        };
        assert!(msg("consul://a").contains("expected etcd:// or etcds://"));
        assert!(msg("etcd://").contains("the host list is empty"));
        for port in ["0", "99999", "65536", "abc", "-1"] {
            let m = msg(&format!("etcd://a:{port}"));
            assert!(m.contains("1 to 65535") && m.contains(port), "{m}");
        }
        assert!(msg("etcd://:0").contains("no host"));
        assert!(msg("etcd://a?ttl=5").contains("ttl=\"5\""));
        assert!(msg("etcd://a?ttl=2500ms").contains("whole seconds"));
        assert!(msg("etcd://a?bogus=1").contains("unknown field `bogus`"));
        assert!(msg("etcd://a?ca_file=x").contains("ca_file needs TLS"));
        for key in ["endpoints", "namespace", "user", "password", "tls"] {
            let m = msg(&format!("etcd://a?{key}=x"));
            assert!(m.contains(&format!("`{key}`")), "{m}");
        }
        let m = msg("etcd://u:s3cret@a:0");
        assert!(!m.contains("s3cret"), "{m}");
    }

    #[test]
    fn bad_endpoints_set_directly_name_the_problem() {
        let msg = |endpoint: &str| {
            let err = Config::default()
                .with_endpoints([endpoint])
                .validate()
                .unwrap_err();
            assert_eq!(
                err.kind(),
                sync_core::ErrorKind::InvalidArgument,
                "{endpoint}: {err}"
            );
            err.to_string()
        };
        for port in ["0", "99999", "65536", "abc", "-1"] {
            let m = msg(&format!("http://a:{port}"));
            assert!(m.contains("1 to 65535") && m.contains(port), "{m}");
        }
        assert!(msg("http://:2379").contains("no host"));
        assert!(msg("http://a:1/x").contains("has a path"));
        for good in [
            "http://a:1",
            "https://a",
            "http://[::1]:2379",
            "http://a:1/",
            "a:2379",
        ] {
            Config::default()
                .with_endpoints([good])
                .validate()
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[test]
    fn tls_settings_need_tls_and_https() {
        let err = Config::default()
            .with_ca_file("ca.pem")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("ca_file needs TLS"), "{err}");
        let err = Config::default().with_tls(true).validate().unwrap_err();
        assert!(err.to_string().contains("plain http"), "{err}");
    }

    /// TLS without a CA could never connect (no roots are loaded): it is refused up front, as
    /// is half a client identity.
    #[cfg(feature = "tls")]
    #[test]
    fn tls_needs_a_ca_and_both_halves_of_an_identity() {
        let err = Config::from_url("etcds://h:2379").unwrap_err();
        assert_eq!(err.kind(), sync_core::ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("tls needs ca_file"), "{err}");
        let err = Config::from_url("etcds://h:2379?ca_file=ca.pem&cert_file=c.pem").unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"cert_file "c.pem" is given without key_file"#),
            "{err}"
        );
        let err = Config::from_url("etcds://h:2379?ca_file=ca.pem&key_file=k.pem").unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"key_file "k.pem" is given without cert_file"#),
            "{err}"
        );
        Config::from_url("etcds://h:2379?ca_file=ca.pem&cert_file=c.pem&key_file=k.pem").unwrap();
    }
}
