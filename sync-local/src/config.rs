//! Configuration of the in-process backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::url::BackendUrl;
use sync_core::{Error, Result};

/// The shortest TTL the local backend accepts.
pub const MIN_TTL: Duration = Duration::from_millis(50);

/// How a [`Client`](crate::Client) behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Which in-process cluster `connect` joins: clients of one name share state.
    pub cluster: String,
    /// Key prefix of every handle (default `sync`).
    pub namespace: String,
    /// The session lease: a killed client's locks free after about this long.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The uncertainty the Time primitive states around the system clock.
    #[serde(with = "humantime_serde")]
    pub time_uncertainty: Duration,
    /// How long a finished job's status stays readable; after that `status` answers NotFound.
    #[serde(with = "humantime_serde")]
    pub job_retention: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: String::new(),
            namespace: "sync".to_string(),
            ttl: Duration::from_secs(10),
            time_uncertainty: Duration::ZERO,
            job_retention: crate::JOB_RETENTION,
        }
    }
}

impl Config {
    /// Parses `local://[cluster][/namespace][?ttl=1s&time_uncertainty=5ms]`: the query keys
    /// are the field names, durations human-readable as in JSON. Without a path the namespace
    /// is `sync`; a lone `/` is the empty namespace.
    ///
    /// ```
    /// let c = sync_local::Config::from_url("local://tests/tenant-a?ttl=500ms").unwrap();
    /// assert_eq!((c.cluster.as_str(), c.namespace.as_str()), ("tests", "tenant-a"));
    /// assert_eq!(c.ttl, std::time::Duration::from_millis(500));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        Self::parse_url(url).map_err(|e| e.with_backend(crate::BACKEND))
    }

    fn parse_url(url: &str) -> Result<Config> {
        let (url, mut config) =
            BackendUrl::parse_config::<Config>(url, &["local"], &["cluster", "namespace"])?;
        url.reject_credentials()?;
        config.cluster = match url.hosts.as_slice() {
            [] => String::new(),
            [cluster] => cluster.clone(),
            _ => {
                return Err(Error::invalid(
                    "a local:// url names one cluster, not several",
                ));
            }
        };
        if let Some(namespace) = url.namespace {
            config.namespace = namespace;
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

    /// Sets how long finished jobs stay readable (default [`JOB_RETENTION`](crate::JOB_RETENTION)).
    pub fn with_job_retention(mut self, retention: Duration) -> Self {
        self.job_retention = retention;
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
        sync_core::raw::validate_ttl(crate::BACKEND, self.ttl, MIN_TTL)?;
        if self.job_retention.is_zero() {
            return Err(Error::invalid("job_retention is 0s; it must be above zero")
                .with_backend(crate::BACKEND));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_json_give_the_same_config() {
        let from_url =
            Config::from_url("local://tests/tenant-a?ttl=2s&time_uncertainty=5ms").unwrap();
        let from_json: Config = serde_json::from_str(
            r#"{"cluster":"tests","namespace":"tenant-a","ttl":"2s","time_uncertainty":"5ms"}"#,
        )
        .unwrap();
        assert_eq!(from_url, from_json);
        let json = serde_json::to_string(&from_url).unwrap();
        assert!(json.contains(r#""ttl":"2s""#), "{json}");
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), from_url);
    }

    #[test]
    fn urls() {
        let c = Config::from_url("local://").unwrap();
        assert_eq!(c, Config::default());
        let c = Config::from_url("local:///").unwrap();
        assert_eq!((c.cluster.as_str(), c.namespace.as_str()), ("", ""));
        let c = Config::from_url("local:///x?time_uncertainty=1ms").unwrap();
        assert_eq!((c.cluster.as_str(), c.namespace.as_str()), ("", "x"));
        assert_eq!(c.time_uncertainty, Duration::from_millis(1));
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
            assert_eq!(err.backend(), Some(crate::BACKEND), "{url}: {err}");
            err.to_string()
        };
        assert!(msg("etcd://x").contains("expected local://"));
        assert!(msg("local://?ttl_ms=500").contains("unknown field `ttl_ms`"));
        assert!(msg("local://?ttl=fast").contains("ttl=\"fast\""));
        assert!(msg("local://?ttl=10ms").contains("at least 50ms"));
        assert!(msg("local://?namespace=x").contains("`namespace`"));
        assert!(msg("local://a,b").contains("one cluster"));
        assert!(msg("local://u:pw@c").contains("no user or password"));
        assert!(msg("local://c/a/b").contains("must not contain '/'"));
    }
}
