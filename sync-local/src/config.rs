//! Configuration of the in-process backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::{Error, Result};

/// The shortest TTL the local backend accepts.
pub const MIN_TTL: Duration = Duration::from_millis(50);

/// How a [`Client`](crate::Client) behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Config {
    /// Which in-process cluster `connect` joins: clients of one name share state.
    pub cluster: String,
    /// Key prefix of every handle (default `sync`).
    pub namespace: String,
    /// The session lease: a killed client's locks free after about this long.
    #[serde(with = "sync_core::serde_millis")]
    pub ttl: Duration,
    /// The uncertainty the Time primitive states around the system clock.
    #[serde(with = "sync_core::serde_millis")]
    pub time_uncertainty: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: String::new(),
            namespace: "sync".to_string(),
            ttl: Duration::from_secs(10),
            time_uncertainty: Duration::ZERO,
        }
    }
}

impl Config {
    /// Parses `local://[cluster][/namespace][?ttl_ms=N&uncertainty_ms=N]`.
    ///
    /// ```
    /// let c = sync_local::Config::from_url("local://tests/tenant-a?ttl_ms=500").unwrap();
    /// assert_eq!((c.cluster.as_str(), c.namespace.as_str()), ("tests", "tenant-a"));
    /// assert_eq!(c.ttl, std::time::Duration::from_millis(500));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid(format!("bad local url {url:?}")).with_source(e))?;
        if parsed.scheme() != "local" {
            return Err(Error::invalid(format!(
                "url {url:?} has scheme {:?}; expected local://",
                parsed.scheme()
            )));
        }
        let mut config = Config {
            cluster: parsed.host_str().unwrap_or_default().to_string(),
            ..Config::default()
        };
        let path = parsed.path().trim_matches('/');
        if !path.is_empty() {
            config.namespace = path.to_string();
        }
        for (k, v) in parsed.query_pairs() {
            let ms = || {
                v.parse::<u64>().map(Duration::from_millis).map_err(|e| {
                    Error::invalid(format!("{k}={v} in {url:?} is not milliseconds")).with_source(e)
                })
            };
            match k.as_ref() {
                "ttl_ms" => config.ttl = ms()?,
                "uncertainty_ms" => config.time_uncertainty = ms()?,
                other => {
                    return Err(Error::invalid(format!(
                        "unknown parameter {other:?} in {url:?}; known: ttl_ms, uncertainty_ms"
                    )));
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the session TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the cluster name used by [`Client::connect`](crate::Client::connect).
    pub fn with_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = cluster.into();
        self
    }

    /// Sets the uncertainty of the Time primitive.
    pub fn with_time_uncertainty(mut self, uncertainty: Duration) -> Self {
        self.time_uncertainty = uncertainty;
        self
    }

    /// Checks the namespace and TTL.
    pub fn validate(&self) -> Result<()> {
        sync_core::id::validate_namespace(&self.namespace)
            .map_err(|e| e.with_backend(crate::BACKEND))?;
        sync_core::raw::validate_ttl(crate::BACKEND, self.ttl, MIN_TTL)
    }
}
