//! Configuration of the NTP backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sync_core::url::BackendUrl;
use sync_core::{Error, Result};

use crate::BACKEND;

/// The port a server without one is queried on.
pub const DEFAULT_PORT: u16 = 123;
/// The most servers one client is configured with.
pub const MAX_SERVERS: usize = 16;
/// The most addresses of one server's name queried as separate sources: a name that resolves
/// to several (a pool) can give a majority on its own, within bounds.
pub const MAX_ADDRESSES_PER_SERVER: usize = 4;
/// The shortest sync interval accepted (be gentle with servers).
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest sync interval accepted (NTP's longest poll, 2^17 s).
pub const MAX_INTERVAL: Duration = Duration::from_secs(1 << 17);
/// The shortest per-query timeout accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest per-query timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The smallest maximum acceptable error accepted.
pub const MIN_MAX_ERROR: Duration = Duration::from_micros(1);
/// The largest maximum acceptable error accepted: beyond this it is not synchronized time.
pub const MAX_MAX_ERROR: Duration = Duration::from_secs(60);
/// The largest drift allowance accepted, in parts per million (NTP's frequency tolerance).
pub const MAX_DRIFT_PPM: f64 = 500.0;
/// The default drift allowance: how far an undisciplined quartz oscillator (with the kernel's
/// boot-time calibration of it) may run off true time, in parts per million. 200 is the
/// worst-case local drift that Google's TrueTime assumes; commodity oscillators are usually
/// within ±50.
pub const DEFAULT_DRIFT_PPM: f64 = 200.0;

/// How a [`Client`](crate::Client) synchronizes.
///
/// ```
/// use std::time::Duration;
/// let c = sync_ntp::Config::from_url("ntp://a.example:123,b.example?interval=64s&timeout=500ms").unwrap();
/// assert_eq!(c.servers, ["a.example:123", "b.example:123"]);
/// assert_eq!(c.interval, Duration::from_secs(64));
/// assert_eq!(c.timeout, Duration::from_millis(500));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The servers, each `host:port` (the port defaults to 123). All are queried on every sync;
    /// a name that resolves to several addresses gives up to [`MAX_ADDRESSES_PER_SERVER`]
    /// sources, each with its own vote.
    pub servers: Vec<String>,
    /// How often the background refresh syncs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one query waits for its reply.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The largest error (half the interval's width) the client will state. A server whose root
    /// distance exceeds it is rejected, and once the error grown since the last good sync exceeds
    /// it, calls fail with Unavailable instead of answering.
    #[serde(with = "humantime_serde")]
    pub max_error: Duration,
    /// How fast the carry clock (`CLOCK_MONOTONIC_RAW` on Linux, which the host's NTP daemon
    /// does not slew) may drift from true time, in parts per million: its oscillator's
    /// tolerance. The error grows by this much of the time elapsed since the last sync. Default
    /// [`DEFAULT_DRIFT_PPM`].
    pub drift_ppm: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            servers: Vec::new(),
            interval: Duration::from_secs(64),
            timeout: Duration::from_secs(1),
            max_error: Duration::from_secs(1),
            drift_ppm: DEFAULT_DRIFT_PPM,
        }
    }
}

impl Config {
    /// A configuration querying `servers` (`host` or `host:port`), defaults otherwise.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        Config {
            servers: servers.into_iter().map(Into::into).collect(),
            ..Config::default()
        }
    }

    /// Parses `ntp://host[:port][,host[:port]…][?key=value&…]`, such as
    /// `ntp://a:123,b?interval=64s&timeout=1s&max_error=1s&drift_ppm=15`: the query keys are the
    /// field names, durations human-readable as in JSON. NTP has no namespace, so a URL with a
    /// path (other than a lone trailing `/`) is refused.
    ///
    /// ```
    /// let c = sync_ntp::Config::from_url("ntp://127.0.0.1:11123?max_error=250ms&drift_ppm=20").unwrap();
    /// assert_eq!(c.servers, ["127.0.0.1:11123"]);
    /// assert_eq!(c.max_error, std::time::Duration::from_millis(250));
    /// let err = sync_ntp::Config::from_url("ntp://h?interval=0s").unwrap_err();
    /// assert!(err.to_string().contains("at least 1s"));
    /// ```
    pub fn from_url(url: &str) -> Result<Config> {
        Self::parse_url(url).map_err(|e| e.with_backend(BACKEND))
    }

    fn parse_url(url: &str) -> Result<Config> {
        let (url, mut config) = BackendUrl::parse_config::<Config>(url, &["ntp"], &["servers"])?;
        url.reject_credentials()?;
        if url.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
            return Err(Error::invalid(
                "ntp urls have no path: NTP has no namespace",
            ));
        }
        config.servers = url
            .require_hosts()?
            .iter()
            .map(|h| normalize_server(h))
            .collect::<Result<_>>()?;
        config.validate()?;
        Ok(config)
    }

    /// Adds a server (`host` or `host:port`).
    pub fn with_server(mut self, server: impl Into<String>) -> Self {
        self.servers.push(server.into());
        self
    }

    /// Sets the background refresh interval.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets the per-query timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the maximum acceptable error.
    pub fn with_max_error(mut self, max_error: Duration) -> Self {
        self.max_error = max_error;
        self
    }

    /// Sets the drift allowance in parts per million.
    pub fn with_drift_ppm(mut self, drift_ppm: f64) -> Self {
        self.drift_ppm = drift_ppm;
        self
    }

    /// Checks every value against its limit; InvalidArgument naming the limit otherwise.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid(msg).with_backend(BACKEND));
        if self.servers.is_empty() {
            return bad("no servers configured; at least 1 is needed".into());
        }
        if self.servers.len() > MAX_SERVERS {
            return bad(format!(
                "{} servers configured; at most {MAX_SERVERS} are allowed",
                self.servers.len()
            ));
        }
        let mut seen = Vec::with_capacity(self.servers.len());
        for s in &self.servers {
            let normalized = normalize_server(s)?;
            // One server listed twice would vote twice, and outvote an honest one.
            if seen.contains(&normalized) {
                return bad(format!(
                    "server {normalized} is listed twice; each server may vote once"
                ));
            }
            seen.push(normalized);
        }
        let range = |name: &str, v: Duration, min: Duration, max: Duration| {
            if v < min || v > max {
                bad(format!(
                    "{name} is {v:?}; it must be at least {min:?} and at most {max:?}"
                ))
            } else {
                Ok(())
            }
        };
        range("interval", self.interval, MIN_INTERVAL, MAX_INTERVAL)?;
        range("timeout", self.timeout, MIN_TIMEOUT, MAX_TIMEOUT)?;
        range("max_error", self.max_error, MIN_MAX_ERROR, MAX_MAX_ERROR)?;
        if !(self.drift_ppm.is_finite() && (0.0..=MAX_DRIFT_PPM).contains(&self.drift_ppm)) {
            return bad(format!(
                "drift_ppm is {}; it must be at least 0 and at most {MAX_DRIFT_PPM}",
                self.drift_ppm
            ));
        }
        Ok(())
    }
}

/// `host` → `host:123`; checks `host:port` is well formed (IPv6 literals in brackets).
pub(crate) fn normalize_server(server: &str) -> Result<String> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "server {server:?}: {why}; expected host or host:port"
        ))
        .with_backend(BACKEND))
    };
    if server.is_empty() {
        return bad("empty");
    }
    if server
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
    {
        return bad("contains a character not allowed in a host");
    }
    let (host, port) = if let Some(rest) = server.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return bad("unclosed '['");
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return bad("junk after ']'"),
            },
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("not an IPv6 address inside '[…]'");
        }
        (format!("[{host}]"), port)
    } else {
        match server.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => return bad("an IPv6 address must be in '[…]'"),
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (server.to_string(), None),
        }
    };
    if host.is_empty() {
        return bad("no host");
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return bad("the port must be 1 to 65535"),
            Ok(p) => p,
        },
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Config::from_url(
            "ntp://a:123,b,[::1]:11123?interval=16s&timeout=250ms&max_error=100ms&drift_ppm=2.5",
        )
        .unwrap();
        assert_eq!(c.servers, ["a:123", "b:123", "[::1]:11123"]);
        assert_eq!(c.interval, Duration::from_secs(16));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(c.max_error, Duration::from_millis(100));
        assert_eq!(c.drift_ppm, 2.5);
        let c = Config::from_url("ntp://127.0.0.1:11123/").unwrap();
        assert_eq!(c.servers, ["127.0.0.1:11123"]);
    }

    #[test]
    fn out_of_range_names_the_limit() {
        let msg = |url: &str| Config::from_url(url).unwrap_err().to_string();
        assert!(msg("ntp://h?interval=0s").contains("at least 1s"));
        assert!(msg("ntp://h?interval=1000000s").contains("at most 131072s"));
        assert!(msg("ntp://h?timeout=0ms").contains("at least 1ms"));
        assert!(msg("ntp://h?timeout=61s").contains("at most 60s"));
        assert!(msg("ntp://h?max_error=0s").contains("max_error"));
        assert!(msg("ntp://h?max_error=61000ms").contains("at most 60s"));
        assert!(msg("ntp://h?drift_ppm=501").contains("at most 500"));
        assert!(msg("ntp://h?drift_ppm=-1").contains("at least 0"));
        assert!(msg("ntp://h?drift_ppm=NaN").contains("drift_ppm"));
        assert!(msg("ntp://h?bogus=1").contains("unknown field `bogus`"));
        assert!(msg("ntp://h?interval=x").contains("interval=\"x\""));
        assert!(msg("http://h").contains("ntp://"));
        assert!(msg("ntp://").contains("empty"));
        assert!(msg("ntp://h:0").contains("1 to 65535"));
        assert!(msg("ntp://h:99999").contains("1 to 65535"));
        assert!(msg("ntp://::1:123").contains("IPv6"));
        assert!(msg("ntp://h/ns").contains("path"));
        let many = (0..17)
            .map(|i| format!("h{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(msg(&format!("ntp://{many}")).contains("at most 16"));
        assert!(msg("ntp://a,a:123").contains("listed twice"));
        assert!(msg("ntp://[::1],[::1]:123").contains("listed twice"));
        let e = Config::default().validate().unwrap_err();
        assert_eq!(e.kind(), sync_core::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("at least 1"));
    }

    #[test]
    fn url_and_json_give_the_same_config() {
        let from_url =
            Config::from_url("ntp://a:123,[::1]:11123?interval=16s&timeout=250ms&drift_ppm=2.5")
                .unwrap();
        let from_json: Config = serde_json::from_str(
            r#"{"servers":["a:123","[::1]:11123"],"interval":"16s","timeout":"250ms","drift_ppm":2.5}"#,
        )
        .unwrap();
        assert_eq!(from_url, from_json);
    }

    #[test]
    fn url_structure_is_not_repeated_in_the_query() {
        let msg = |url: &str| Config::from_url(url).unwrap_err().to_string();
        assert!(msg("ntp://a?servers=b").contains("`servers`"));
        assert!(msg("ntp://u:pw@a").contains("no user or password"));
        assert!(msg("ntp://a/b/c").contains("'/'"));
    }

    #[test]
    fn serde_round_trip() {
        let c = Config::new(["a:1"]).with_interval(Duration::from_secs(5));
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""interval":"5s""#), "{json}");
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        let partial: Config = serde_json::from_str(r#"{"servers":["x"]}"#).unwrap();
        assert_eq!(partial.timeout, Config::default().timeout);
    }
}
