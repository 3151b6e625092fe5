//! The one URL grammar of every backend config, parsed once:
//!
//! ```text
//! scheme://[user[:password]@]host[:port][,host[:port]…][/namespace][?key=value&…]
//! ```
//!
//! [`BackendUrl::parse`] splits and percent-decodes a URL and checks what the grammar itself
//! can check: hosts and ports, IPv6 literals in brackets, a one-segment namespace. A backend
//! then checks its scheme ([`BackendUrl::expect_scheme`]) and reads the query into its serde
//! `Config` ([`BackendUrl::query_into`]), so query keys are exactly the `Config`'s field names
//! and a duration reads the same (`2s`, `500ms`) in a URL, in JSON and in TOML.
//! [`BackendUrl::parse_config`] takes these three steps in one call.
//!
//! ```
//! use std::time::Duration;
//! use sync_core::url::BackendUrl;
//!
//! #[derive(Debug, Default, serde::Deserialize)]
//! #[serde(default, deny_unknown_fields)]
//! struct Config {
//!     namespace: String,
//!     #[serde(with = "humantime_serde")]
//!     ttl: Duration,
//! }
//!
//! let (url, mut config) = BackendUrl::parse_config::<Config>(
//!     "etcd://u:p%40ss@h1:2379,[::1]:2379/tenant-a?ttl=5s",
//!     &["etcd", "etcds"],
//!     &["namespace"],
//! )?;
//! assert_eq!(url.hosts, ["h1:2379", "[::1]:2379"]);
//! assert_eq!(url.password.as_deref(), Some("p@ss"));
//! config.namespace = url.namespace.clone().unwrap_or_default();
//! assert_eq!((config.namespace.as_str(), config.ttl), ("tenant-a", Duration::from_secs(5)));
//! # Ok::<(), sync_core::Error>(())
//! ```
//!
//! Errors are InvalidArgument and name the part at fault; they never repeat the URL, which may
//! hold a password. Backends add their name with [`Error::with_backend`].

use std::borrow::Cow;
use std::fmt;

use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// A URL split along the grammar, every part percent-decoded.
///
/// Its `Debug` shows `<redacted>` in place of the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackendUrl {
    /// The scheme, lower-cased (`etcd`, `etcds`, `ntp`, `local`…).
    pub scheme: String,
    /// The user, if the URL has a `user@` part.
    pub user: Option<String>,
    /// The password, if the URL has a `user:password@` part.
    pub password: Option<String>,
    /// The hosts in order, each `host` or `host:port` as written (an IPv6 literal in brackets,
    /// `[::1]:2379`); empty for `scheme://` or `scheme:///namespace`.
    pub hosts: Vec<String>,
    /// The path: `None` without one, `Some("")` for a lone `/`, else one namespace segment.
    pub namespace: Option<String>,
    /// The query pairs in order. As in HTML forms, `+` in the query is a space (write `%2B`
    /// for a plus sign); elsewhere `+` is itself.
    pub query: Vec<(String, String)>,
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendUrl")
            .field("scheme", &self.scheme)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hosts", &self.hosts)
            .field("namespace", &self.namespace)
            .field("query", &self.query)
            .finish()
    }
}

impl BackendUrl {
    /// Splits and decodes `url`. A missing `://`, an empty host entry, a port outside 1 to
    /// 65535, an IPv6 address outside brackets, a namespace with a `/`, and a bad percent
    /// escape or non-UTF-8 text are InvalidArgument errors naming the problem.
    ///
    /// ```
    /// use sync_core::url::BackendUrl;
    ///
    /// let url = BackendUrl::parse("ntp://a:123,b?timeout=1s")?;
    /// assert_eq!(url.hosts, ["a:123", "b"]);
    /// assert_eq!(url.namespace, None);
    /// assert_eq!(url.query, [("timeout".to_string(), "1s".to_string())]);
    /// assert_eq!(BackendUrl::parse("local://")?.hosts, Vec::<String>::new());
    ///
    /// let err = BackendUrl::parse("etcd://h:99999").unwrap_err();
    /// assert!(err.to_string().contains("the port must be 1 to 65535"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn parse(url: &str) -> Result<BackendUrl> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| Error::invalid("the url has no `://`; expected scheme://hosts…"))?;
        let (rest, query) = split_off(rest, '?');
        let (authority, path) = split_off(rest, '/');
        // The last `@` ends the user part: a host never holds one.
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let (user, password) = parse_userinfo(userinfo)?;
        Ok(BackendUrl {
            scheme: parse_scheme(scheme)?,
            user,
            password,
            hosts: parse_hosts(hosts)?,
            namespace: path.map(parse_namespace).transpose()?,
            query: query.map(parse_query).transpose()?.unwrap_or_default(),
        })
    }

    /// The first steps of every backend's `Config::from_url` in one call: [`parse`](Self::parse)
    /// `url`, [check its scheme](Self::expect_scheme) is one of `schemes`, and
    /// [read its query](Self::query_into) into the backend's `Config` (`structural` as there).
    /// The backend then takes what it needs from the returned URL (hosts, namespace,
    /// credentials) and validates the result by its own rules.
    ///
    /// ```
    /// use sync_core::url::BackendUrl;
    ///
    /// #[derive(Debug, Default, serde::Deserialize)]
    /// #[serde(default, deny_unknown_fields)]
    /// struct Config {
    ///     servers: Vec<String>,
    ///     retries: u32,
    /// }
    ///
    /// let (url, config) = BackendUrl::parse_config::<Config>("ntp://a,b?retries=3", &["ntp"], &["servers"])?;
    /// assert_eq!((url.hosts.len(), config.retries), (2, 3));
    /// let err = BackendUrl::parse_config::<Config>("http://a", &["ntp"], &["servers"]).unwrap_err();
    /// assert!(err.to_string().contains("expected ntp://"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn parse_config<T: DeserializeOwned>(
        url: &str,
        schemes: &[&str],
        structural: &[&str],
    ) -> Result<(BackendUrl, T)> {
        let url = BackendUrl::parse(url)?;
        url.expect_scheme(schemes)?;
        let config = url.query_into(structural)?;
        Ok((url, config))
    }

    /// Checks the scheme is one of `accepted`; the error names them.
    ///
    /// ```
    /// use sync_core::url::BackendUrl;
    ///
    /// let url = BackendUrl::parse("http://h:2379")?;
    /// let err = url.expect_scheme(&["etcd", "etcds"]).unwrap_err();
    /// assert!(err.to_string().contains("expected etcd:// or etcds://"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn expect_scheme(&self, accepted: &[&str]) -> Result<()> {
        if accepted.contains(&self.scheme.as_str()) {
            return Ok(());
        }
        let expected = accepted
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(" or ");
        Err(Error::invalid(format!(
            "the url's scheme is {}://; expected {expected}",
            self.scheme
        )))
    }

    /// The hosts, for a backend that needs at least one; "the host list is empty" otherwise.
    ///
    /// ```
    /// use sync_core::url::BackendUrl;
    ///
    /// let err = BackendUrl::parse("etcd:///ns")?.require_hosts().unwrap_err();
    /// assert!(err.to_string().contains("the host list is empty"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn require_hosts(&self) -> Result<&[String]> {
        if self.hosts.is_empty() {
            return Err(Error::invalid(
                "the host list is empty; expected scheme://host[:port][,host[:port]…]",
            ));
        }
        Ok(&self.hosts)
    }

    /// Checks the URL has no `user[:password]@` part, for a backend without authentication.
    ///
    /// ```
    /// use sync_core::url::BackendUrl;
    ///
    /// let err = BackendUrl::parse("ntp://u:secret@h")?.reject_credentials().unwrap_err();
    /// assert!(err.to_string().contains("no user"));
    /// assert!(!err.to_string().contains("secret"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn reject_credentials(&self) -> Result<()> {
        if self.user.is_some() || self.password.is_some() {
            return Err(Error::invalid(format!(
                "{}:// urls take no user or password",
                self.scheme
            )));
        }
        Ok(())
    }

    /// Deserializes the query into a backend's `Config` with `serde_urlencoded`, so the keys
    /// are the serde field names. Meant for a `Config` with `#[serde(default,
    /// deny_unknown_fields)]`: fields the query does not name keep their defaults.
    ///
    /// `structural` lists the fields the URL's structure sets (hosts, namespace, user,
    /// password, a TLS flag set by the scheme): naming one in the query is an error, so
    /// neither copy silently wins. An unknown key, a repeated key or a bad value (`ttl=2x`)
    /// is InvalidArgument naming the key.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sync_core::url::BackendUrl;
    ///
    /// #[derive(Debug, Default, serde::Deserialize)]
    /// #[serde(default, deny_unknown_fields)]
    /// struct Config {
    ///     namespace: String,
    ///     #[serde(with = "humantime_serde")]
    ///     ttl: Duration,
    /// }
    ///
    /// let query = |url| BackendUrl::parse(url)?.query_into::<Config>(&["namespace"]);
    /// assert_eq!(query("local://?ttl=1m+30s")?.ttl, Duration::from_secs(90));
    /// assert!(query("local://?ttl=2x").unwrap_err().to_string().contains("ttl=\"2x\""));
    /// let err = query("local://?bogus=1").unwrap_err();
    /// assert!(err.to_string().contains("unknown field `bogus`"));
    /// assert!(query("local://?namespace=a").unwrap_err().to_string().contains("`namespace`"));
    /// # Ok::<(), sync_core::Error>(())
    /// ```
    pub fn query_into<T: DeserializeOwned>(&self, structural: &[&str]) -> Result<T> {
        if let Some((key, _)) = self
            .query
            .iter()
            .find(|(k, _)| structural.contains(&k.as_str()))
        {
            return Err(Error::invalid(format!(
                "query key `{key}` is set by the url itself (its scheme, user, password, hosts \
                 or path), not by the query"
            )));
        }
        from_pairs(&self.query).map_err(|e| self.query_error::<T>(e))
    }

    /// Names the pair at fault: the first that fails on its own (a bad value, an unknown
    /// key), else the whole query (a repeated key).
    fn query_error<T: DeserializeOwned>(&self, whole: Error) -> Error {
        self.query
            .iter()
            .find_map(|pair| {
                let alone = from_pairs::<T>(std::slice::from_ref(pair)).err()?;
                let (key, value) = pair;
                Some(Error::invalid(format!(
                    "query {key}={value:?}: {}",
                    alone.message()
                )))
            })
            .unwrap_or_else(|| Error::invalid(format!("the query: {}", whole.message())))
    }
}

/// Deserializes decoded pairs. serde_urlencoded reads encoded text, so they are encoded again.
fn from_pairs<T: DeserializeOwned>(pairs: &[(String, String)]) -> Result<T> {
    let encoded = serde_urlencoded::to_string(pairs)
        .map_err(|e| Error::invalid(e.to_string()).with_source(e))?;
    serde_urlencoded::from_str(&encoded).map_err(|e| Error::invalid(e.to_string()).with_source(e))
}

fn split_off(s: &str, separator: char) -> (&str, Option<&str>) {
    match s.split_once(separator) {
        Some((before, after)) => (before, Some(after)),
        None => (s, None),
    }
}

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`. Case does not matter.
fn parse_scheme(scheme: &str) -> Result<String> {
    let mut chars = scheme.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !well_formed {
        // Not echoed: text before a stray `://` may be anything, a password included.
        return Err(Error::invalid(
            "the url's scheme must be a letter, then letters, digits, '+', '-' or '.'",
        ));
    }
    Ok(scheme.to_ascii_lowercase())
}

fn parse_userinfo(userinfo: Option<&str>) -> Result<(Option<String>, Option<String>)> {
    let Some(userinfo) = userinfo else {
        return Ok((None, None));
    };
    let (user, password) = split_off(userinfo, ':');
    Ok((
        Some(decode(user, "the user")?),
        password.map(|p| decode(p, "the password")).transpose()?,
    ))
}

fn parse_hosts(hosts: &str) -> Result<Vec<String>> {
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    hosts
        .split(',')
        .map(|host| {
            check_host(host)?;
            Ok(host.to_string())
        })
        .collect()
}

/// Checks one `host[:port]` entry: not empty, an IPv6 literal in brackets, a port 1 to 65535.
/// For backends whose config also takes endpoints outside a URL, so both follow one rule.
///
/// ```
/// assert!(sync_core::url::check_host("h:2379").is_ok());
/// let err = sync_core::url::check_host("h:99999").unwrap_err();
/// assert!(err.to_string().contains("the port must be 1 to 65535"));
/// ```
pub fn check_host(entry: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid(format!("host {entry:?}: {why}")));
    if entry.is_empty() {
        return Err(Error::invalid(
            "the host list has an empty entry (a stray ',')",
        ));
    }
    if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains a space or control character");
    }
    let port = if let Some(rest) = entry.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return bad("has '[' without ']'");
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("is not an IPv6 address inside '[…]'");
        }
        match after {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return bad("has text after ']' that is not ':port'"),
            },
        }
    } else {
        match entry.split_once(':') {
            None => None,
            Some((_, port)) if port.contains(':') => {
                return bad("an IPv6 address must be in brackets, as in [::1]:2379");
            }
            Some(("", _)) => return bad("has a port but no host"),
            Some((_, port)) => Some(port),
        }
    };
    match port {
        Some(port) if !is_port(port) => bad("the port must be 1 to 65535"),
        _ => Ok(()),
    }
}

fn is_port(port: &str) -> bool {
    // Digits only: `u16::from_str` would also take "+80".
    port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn parse_namespace(path: &str) -> Result<String> {
    let namespace = decode(path, "the namespace")?;
    crate::id::validate_namespace(&namespace)?;
    Ok(namespace)
}

fn parse_query(query: &str) -> Result<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = split_off(pair, '=');
            let key = decode_form(key, "a query key")?;
            let value = decode_form(value.unwrap_or_default(), &format!("query key `{key}`"))?;
            Ok((key, value))
        })
        .collect()
}

/// [`decode`] with `+` as a space, as serde_urlencoded (and every HTML form) reads a query.
fn decode_form(raw: &str, what: &str) -> Result<String> {
    decode(&raw.replace('+', " "), what)
}

/// Percent-decodes one part; `what` names it in errors, which never echo the text (it may be
/// a password).
fn decode(raw: &str, what: &str) -> Result<String> {
    // percent_decode_str passes a malformed escape through as it is; that hides typos.
    let escapes_well_formed = raw.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_well_formed {
        return Err(Error::invalid(format!(
            "{what} has a '%' not followed by two hex digits"
        )));
    }
    percent_decode_str(raw)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|e| {
            Error::invalid(format!("{what} is not UTF-8 once percent-decoded")).with_source(e)
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ErrorKind;

    fn rejects(url: &str, problem: &str) {
        let err = BackendUrl::parse(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url}: {err}");
        assert!(err.to_string().contains(problem), "{url}: {err}");
    }

    #[test]
    fn user_and_password_are_percent_decoded() {
        let url = BackendUrl::parse("etcd://us%20er:p%40ss%3Aw+rd@h:2379").unwrap();
        assert_eq!(url.user.as_deref(), Some("us er"));
        assert_eq!(url.password.as_deref(), Some("p@ss:w+rd"));
        let url = BackendUrl::parse("etcd://root@h").unwrap();
        assert_eq!((url.user.as_deref(), url.password), (Some("root"), None));
    }

    #[test]
    fn debug_redacts_the_password() {
        let url = BackendUrl::parse("etcd://u:hunter2@h").unwrap();
        let debug = format!("{url:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn several_hosts_and_ipv6() {
        let url = BackendUrl::parse("ETCD://h1:2379,h2,[::1]:2379,[fe80::1]").unwrap();
        assert_eq!(url.scheme, "etcd");
        assert_eq!(url.hosts, ["h1:2379", "h2", "[::1]:2379", "[fe80::1]"]);
    }

    #[test]
    fn namespace_empty_namespace_or_none() {
        let ns = |url: &str| BackendUrl::parse(url).unwrap().namespace;
        assert_eq!(ns("etcd://h/tenant-a").as_deref(), Some("tenant-a"));
        assert_eq!(ns("etcd://h/a%20b?ttl=1s").as_deref(), Some("a b"));
        assert_eq!(ns("etcd://h/").as_deref(), Some(""));
        assert_eq!(ns("etcd://h/?ttl=1s").as_deref(), Some(""));
        assert_eq!(ns("etcd://h"), None);
        assert_eq!(ns("etcd://h?ttl=1s"), None);
        assert_eq!(ns("local:///x").as_deref(), Some("x"));
    }

    #[test]
    fn query_pairs_are_decoded_in_order() {
        let url = BackendUrl::parse("x://h?b=1+2&a=%2B&&c&d=").unwrap();
        let pairs: Vec<(&str, &str)> = url
            .query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(pairs, [("b", "1 2"), ("a", "+"), ("c", ""), ("d", "")]);
    }

    #[test]
    fn rejections_name_the_problem() {
        rejects("h1:2379", "no `://`");
        rejects("://h", "scheme");
        rejects("1tp://h", "scheme");
        rejects("etcd://a,,b", "empty entry");
        rejects("etcd://a,", "empty entry");
        rejects("etcd://,a", "empty entry");
        rejects("etcd://h:0", "the port must be 1 to 65535");
        rejects("etcd://h:65536", "the port must be 1 to 65535");
        rejects("etcd://h:+80", "the port must be 1 to 65535");
        rejects("etcd://h:", "the port must be 1 to 65535");
        rejects("etcd://h:x", "the port must be 1 to 65535");
        rejects("etcd://[::1]:0", "the port must be 1 to 65535");
        rejects("etcd://:2379", "no host");
        rejects("etcd://h:99999", "the port must be 1 to 65535");
        rejects("etcd://h:abc", "the port must be 1 to 65535");
        rejects("etcd://h:-1", "the port must be 1 to 65535");
        rejects("etcd://h:1,h:65536", "the port must be 1 to 65535");
        rejects("etcd://:0", "no host");
        rejects("etcd://::1", "IPv6 address must be in brackets");
        rejects("etcd://fe80::1:2379", "IPv6 address must be in brackets");
        rejects("etcd://[::1", "without ']'");
        rejects("etcd://[nope]:1", "not an IPv6 address");
        rejects("etcd://[::1]x", "not ':port'");
        rejects("etcd://h/a/b", "must not contain '/'");
        rejects("etcd://h/a%2Fb", "must not contain '/'");
        rejects(
            "etcd://h/a%zz",
            "the namespace has a '%' not followed by two hex digits",
        );
        rejects("etcd://h/%ff", "the namespace is not UTF-8");
        rejects("etcd://u%4:p@h", "the user has a '%'");
        rejects("x://h?a%=1", "a query key has a '%'");
        rejects("x://h?ttl=%c3%28", "query key `ttl` is not UTF-8");
    }

    #[test]
    fn errors_never_echo_the_password() {
        for url in [
            "etcd://u:s3cret%zz@h",
            "etcd://u:s3cret%ff@h",
            "etcd://u:s3cret@h:0",
            "etcd:/u:s3cret@h",
            "et cd s3cret://h",
        ] {
            let err = BackendUrl::parse(url).unwrap_err();
            assert!(!err.to_string().contains("s3cret"), "{url}: {err}");
        }
    }

    #[test]
    fn hosts_may_be_absent_but_then_are_not_there_to_require() {
        let url = BackendUrl::parse("local://").unwrap();
        assert!(url.hosts.is_empty());
        let err = url.require_hosts().unwrap_err();
        assert!(err.to_string().contains("the host list is empty"), "{err}");
        let url = BackendUrl::parse("etcd://u:p@/ns").unwrap();
        assert!(url.require_hosts().is_err());
        assert_eq!(
            BackendUrl::parse("etcd://a")
                .unwrap()
                .require_hosts()
                .unwrap(),
            ["a"]
        );
    }

    #[test]
    fn scheme_check_names_the_accepted_schemes() {
        let url = BackendUrl::parse("redis://h").unwrap();
        let err = url.expect_scheme(&["etcd", "etcds"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("scheme is redis://; expected etcd:// or etcds://"),
            "{err}"
        );
        assert!(url.expect_scheme(&["redis", "rediss"]).is_ok());
    }

    #[test]
    fn credentials_can_be_refused() {
        assert!(
            BackendUrl::parse("ntp://h")
                .unwrap()
                .reject_credentials()
                .is_ok()
        );
        let err = BackendUrl::parse("ntp://u@h")
            .unwrap()
            .reject_credentials()
            .unwrap_err();
        assert!(
            err.to_string().contains("take no user or password"),
            "{err}"
        );
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Config {
        namespace: String,
        #[serde(with = "humantime_serde")]
        ttl: Duration,
        ratio: f64,
        file: Option<String>,
    }

    fn query(url: &str) -> Result<Config> {
        BackendUrl::parse(url)?.query_into(&["namespace"])
    }

    #[test]
    fn query_keys_are_the_field_names() {
        let c = query("x://h?ttl=500ms&ratio=2.5&file=%2Fetc%2Fca.pem").unwrap();
        assert_eq!(c.ttl, Duration::from_millis(500));
        assert_eq!(c.ratio, 2.5);
        assert_eq!(c.file.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(query("x://h").unwrap(), Config::default());
    }

    #[test]
    fn query_errors_name_the_key() {
        let msg = |url: &str| {
            let err = query(url).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url}: {err}");
            err.to_string()
        };
        let m = msg("x://h?ratio=1&ttl=2x");
        assert!(
            m.contains("ttl=\"2x\"") && m.contains("expected a duration"),
            "{m}"
        );
        let m = msg("x://h?ttl");
        assert!(m.contains("ttl=\"\""), "{m}");
        let m = msg("x://h?ratio=fast");
        assert!(m.contains("ratio=\"fast\""), "{m}");
        let m = msg("x://h?bogus=1");
        assert!(m.contains("unknown field `bogus`, expected one of"), "{m}");
        let m = msg("x://h?ttl=1s&ttl=2s");
        assert!(m.contains("duplicate field `ttl`"), "{m}");
        let m = msg("x://h?namespace=a");
        assert!(
            m.contains("query key `namespace` is set by the url itself"),
            "{m}"
        );
    }
}
