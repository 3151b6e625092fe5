//! # sync-any
//!
//! Pick the backend of the `sync` toolkit at run time, from a URL or a config file, and get
//! it as an [`Arc<dyn Backend>`](sync_core::Backend): the same program then runs on the
//! in-process backend in tests and on etcd in production.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
//! use sync_core::LockOptions;
//!
//! let backend = sync_any::connect("local://?ttl=2s").await?;
//! let guard = backend.lock()?.acquire("orders", LockOptions::new()).await?;
//! println!("{} granted fencing token {}", backend.name(), guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! A [`Config`] is the same choice as data, tagged by `backend`, with the backend's own config
//! fields beside the tag (the query keys of its URL are those field names):
//!
//! ```
//! let json = r#"{"backend": "local", "namespace": "billing", "ttl": "2s"}"#;
//! let config: sync_any::Config = serde_json::from_str(json).unwrap();
//! assert_eq!(config, sync_any::Config::from_url("local:///billing?ttl=2s").unwrap());
//! ```
//!
//! ## Schemes and features
//!
//! One cargo feature per backend; only `local` is on by default.
//!
//! | scheme | feature | backend crate |
//! | --- | --- | --- |
//! | `local://` | `local` | sync-local |
//! | `etcd://` | `etcd` | sync-etcd |
//! | `etcds://` | `etcd-tls` | sync-etcd with TLS |
//! | `ntp://` | `ntp` | sync-ntp |
//! | `redis://`, `redis+cluster://` | `redis` | sync-redis |
//! | `rediss://`, `rediss+cluster://` | `redis-tls` | sync-redis with TLS |
//! | `consul://`, `consuls://` (HTTPS) | `consul` | sync-consul |
//!
//! A URL whose scheme this build does not know, or whose feature is off, is an
//! [`InvalidArgument`](sync_core::ErrorKind::InvalidArgument) error naming the schemes this
//! build knows.
#![deny(missing_docs)]

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sync_core::{Backend, Error, Result};

/// One backend's configuration, tagged by `backend` (`"local"`, `"etcd"`, `"ntp"`, `"redis"`,
/// `"consul"`).
///
/// Deserializes from JSON, TOML or any serde format with the backend's own field names;
/// durations are human-readable (`"2s"`, `"500ms"`), as in URLs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Config {
    /// The in-process backend.
    #[cfg(feature = "local")]
    Local(sync_local::Config),
    /// etcd v3.
    #[cfg(feature = "etcd")]
    Etcd(sync_etcd::Config),
    /// NTP time.
    #[cfg(feature = "ntp")]
    Ntp(sync_ntp::Config),
    /// Redis or Redis Cluster.
    #[cfg(feature = "redis")]
    Redis(sync_redis::Config),
    /// Consul.
    #[cfg(feature = "consul")]
    Consul(sync_consul::Config),
}

/// Every scheme a `sync` backend answers to, with the feature that brings it in.
const SCHEMES: &[(&str, &str)] = &[
    ("local", "local"),
    ("etcd", "etcd"),
    ("etcds", "etcd-tls"),
    ("ntp", "ntp"),
    ("redis", "redis"),
    ("redis+cluster", "redis"),
    ("rediss", "redis-tls"),
    ("rediss+cluster", "redis-tls"),
    // sync-consul's HTTPS needs nothing more (its reqwest always has rustls): one feature.
    ("consul", "consul"),
    ("consuls", "consul"),
];

/// Each feature with whether this build has it.
const FEATURES: &[(&str, bool)] = &[
    ("local", cfg!(feature = "local")),
    ("etcd", cfg!(feature = "etcd")),
    ("etcd-tls", cfg!(feature = "etcd-tls")),
    ("ntp", cfg!(feature = "ntp")),
    ("redis", cfg!(feature = "redis")),
    ("redis-tls", cfg!(feature = "redis-tls")),
    ("consul", cfg!(feature = "consul")),
];

/// Whether this build has the backend behind `feature`.
fn enabled(feature: &str) -> bool {
    FEATURES.iter().any(|(f, on)| *f == feature && *on)
}

/// The schemes this build can connect to, e.g. `["local", "etcd"]`.
pub fn schemes() -> Vec<&'static str> {
    SCHEMES
        .iter()
        .filter(|(_, feature)| enabled(feature))
        .map(|(scheme, _)| *scheme)
        .collect()
}

fn unknown_scheme(url: &str, scheme: &str) -> Error {
    let known = schemes()
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(", ");
    let why = match SCHEMES.iter().find(|(s, _)| *s == scheme) {
        Some((_, feature)) => format!("its backend needs sync-any's `{feature}` cargo feature"),
        None => "no backend answers to it".to_string(),
    };
    let shown = url.split_once("://").map_or(url, |(s, _)| s);
    Error::invalid(format!(
        "unknown scheme {shown:?}: {why}; this build knows {known}"
    ))
}

impl Config {
    /// The backend config of `url`, chosen by its scheme and parsed by that backend.
    pub fn from_url(url: &str) -> Result<Config> {
        let Some((scheme, _)) = url.split_once("://") else {
            return Err(Error::invalid(
                "a backend url starts with scheme:// (local://, etcd://, ntp://…)",
            ));
        };
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            #[cfg(feature = "local")]
            "local" => Ok(Config::Local(sync_local::Config::from_url(url)?)),
            #[cfg(feature = "etcd")]
            "etcd" => Ok(Config::Etcd(sync_etcd::Config::from_url(url)?)),
            #[cfg(feature = "etcd-tls")]
            "etcds" => Ok(Config::Etcd(sync_etcd::Config::from_url(url)?)),
            #[cfg(feature = "ntp")]
            "ntp" => Ok(Config::Ntp(sync_ntp::Config::from_url(url)?)),
            #[cfg(feature = "redis")]
            "redis" | "redis+cluster" => Ok(Config::Redis(sync_redis::Config::from_url(url)?)),
            #[cfg(feature = "redis-tls")]
            "rediss" | "rediss+cluster" => Ok(Config::Redis(sync_redis::Config::from_url(url)?)),
            #[cfg(feature = "consul")]
            "consul" | "consuls" => Ok(Config::Consul(sync_consul::Config::from_url(url)?)),
            other => Err(unknown_scheme(url, other)),
        }
    }

    /// The backend's name (`"local"`, `"etcd"`, `"ntp"`, `"redis"`, `"consul"`).
    pub fn backend(&self) -> &'static str {
        match self {
            #[cfg(feature = "local")]
            Config::Local(_) => sync_local::BACKEND,
            #[cfg(feature = "etcd")]
            Config::Etcd(_) => sync_etcd::BACKEND,
            #[cfg(feature = "ntp")]
            Config::Ntp(_) => sync_ntp::BACKEND,
            #[cfg(feature = "redis")]
            Config::Redis(_) => sync_redis::BACKEND,
            #[cfg(feature = "consul")]
            Config::Consul(_) => sync_consul::BACKEND,
        }
    }

    /// Connects a client of the configured backend.
    pub async fn connect(self) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            #[cfg(feature = "local")]
            Config::Local(c) => Arc::new(sync_local::Client::connect(c)?),
            #[cfg(feature = "etcd")]
            Config::Etcd(c) => Arc::new(sync_etcd::Client::connect(c).await?),
            #[cfg(feature = "ntp")]
            Config::Ntp(c) => Arc::new(sync_ntp::Client::connect(c).await?),
            #[cfg(feature = "redis")]
            Config::Redis(c) => Arc::new(sync_redis::Client::connect(c).await?),
            #[cfg(feature = "consul")]
            Config::Consul(c) => Arc::new(sync_consul::Client::connect(c).await?),
        })
    }
}

/// Connects to the backend named by `url`:
/// `scheme://[user[:password]@]host[:port][,host[:port]…][/namespace][?key=value&…]`.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    Config::from_url(url)?.connect().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known scheme whose feature is off names the feature; tests cannot turn one off, so
    /// the message is checked where it is made.
    #[test]
    fn a_scheme_whose_feature_is_off_names_its_feature() {
        for (scheme, feature) in [
            ("consul", "consul"),
            ("consuls", "consul"),
            ("etcds", "etcd-tls"),
        ] {
            let msg = unknown_scheme(&format!("{scheme}://h"), scheme).to_string();
            assert!(
                msg.contains(&format!("`{feature}` cargo feature")),
                "{scheme}: {msg}"
            );
        }
        let msg = unknown_scheme("zk://h", "zk").to_string();
        assert!(msg.contains("no backend answers to it"), "{msg}");
    }
}
