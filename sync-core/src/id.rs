//! Id rules: what a lock id, election group, map key or job name may be, and how it is
//! escaped into a backend key.
//!
//! An id is any non-empty UTF-8 string of at most [`MAX_ID_LEN`] bytes without NUL. Backends
//! escape ids with [`escape`] before building keys, so two different ids never share a key
//! range, and an id made only of `[A-Za-z0-9._-]` maps to itself (so other clients using the
//! same name interoperate).

use std::borrow::Cow;

use crate::{Error, Result};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 512;

/// The longest namespace accepted, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 256;

/// Checks an id. `what` names it in the error ("lock id", "map key"…).
///
/// ```
/// use sync_core::id::validate;
/// assert!(validate("lock id", "orders").is_ok());
/// let err = validate("lock id", "").unwrap_err();
/// assert!(err.to_string().contains("must not be empty"));
/// ```
pub fn validate(what: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Error::invalid(format!(
            "{what} is {} bytes; the maximum is {MAX_ID_LEN}",
            id.len()
        )));
    }
    if id.contains('\0') {
        return Err(Error::invalid(format!("{what} must not contain NUL")));
    }
    Ok(())
}

/// Checks a namespace (the first key segment of every handle): at most
/// [`MAX_NAMESPACE_LEN`] bytes, no NUL, and no `/`.
///
/// A namespace is one segment because ids map to themselves: were `tenant/a` a namespace, it
/// would lie inside the key range of lock `a` in namespace `tenant`, and the two would block
/// each other. Use `tenant-a` or `tenant.a` instead. The empty namespace (keys at the top level,
/// for interoperating with `etcdctl lock` or `consul lock`) shares its ids with the names of
/// every other namespace: keep it for that use.
///
/// ```
/// use sync_core::id::validate_namespace;
/// assert!(validate_namespace("tenant-a").is_ok());
/// let err = validate_namespace("tenant/a").unwrap_err();
/// assert!(err.to_string().contains("must not contain '/'"));
/// ```
pub fn validate_namespace(ns: &str) -> Result<()> {
    if ns.len() > MAX_NAMESPACE_LEN {
        return Err(Error::invalid(format!(
            "namespace is {} bytes; the maximum is {MAX_NAMESPACE_LEN}",
            ns.len()
        )));
    }
    if ns.contains('\0') {
        return Err(Error::invalid("namespace must not contain NUL"));
    }
    if ns.contains('/') {
        return Err(Error::invalid(format!(
            "namespace {ns:?} must not contain '/': a nested namespace would share keys with \
             its parent's ids (use '-' or '.')"
        )));
    }
    Ok(())
}

/// The bytes an id keeps as they are, `[A-Za-z0-9._-]`, by value: one look-up a byte, as
/// every grant escapes its id.
const PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        plain[b] = c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
        b += 1;
    }
    plain
};

fn is_plain(b: u8) -> bool {
    PLAIN[usize::from(b)]
}

/// Escapes an id into one key segment: bytes outside `[A-Za-z0-9._-]` become `%XX`.
///
/// The mapping is injective and its output never holds `/`, so distinct ids get disjoint key
/// ranges.
///
/// ```
/// use sync_core::id::escape;
/// assert_eq!(escape("orders-1.v2"), "orders-1.v2");
/// assert_eq!(escape("a/b"), "a%2Fb");
/// assert_eq!(escape("a%2Fb"), "a%252Fb");
/// assert_eq!(escape("a*"), "a%2A");
/// ```
pub fn escape(id: &str) -> Cow<'_, str> {
    if id.bytes().all(is_plain) {
        return Cow::Borrowed(id);
    }
    let mut out = String::with_capacity(id.len() * 3);
    for b in id.bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// Reverses [`escape`]. Returns `None` for text that [`escape`] cannot have produced.
pub fn unescape(key: &str) -> Option<String> {
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = key.get(i + 1..i + 3)?;
                let b = u8::from_str_radix(hex, 16).ok()?;
                if is_plain(b) || hex.chars().any(|c| c.is_ascii_lowercase()) {
                    return None;
                }
                out.push(b);
                i += 3;
            }
            b if is_plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// Joins a namespace and escaped segments with `/`, skipping an empty namespace.
///
/// ```
/// use sync_core::id::key;
/// assert_eq!(key("sync", &["lock", "a/b"]), "sync/lock/a%2Fb");
/// assert_eq!(key("", &["a"]), "a");
/// ```
pub fn key(namespace: &str, ids: &[&str]) -> String {
    let mut out = String::from(namespace);
    for id in ids {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(&escape(id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_ids_never_share_a_prefix() {
        let ids = ["a", "a/b", "a%2Fb", "a*", "a b", "ä", "a.", "a%", "%41"];
        let keys: Vec<String> = ids.iter().map(|i| format!("{}/", escape(i))).collect();
        for (i, a) in keys.iter().enumerate() {
            for (j, b) in keys.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a.as_str()), "{a} is a prefix of {b}");
                }
            }
        }
    }

    #[test]
    fn escape_round_trips() {
        for id in ["a", "a/b", "a%2Fb", "ünï/cødé", "x y*z", "%"] {
            assert_eq!(unescape(&escape(id)).as_deref(), Some(id));
        }
        assert_eq!(unescape("a/b"), None);
        assert_eq!(unescape("%41"), None, "plain bytes are never escaped");
        assert_eq!(unescape("%2f"), None, "escapes are upper case");
    }

    #[test]
    fn limits_are_named() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let err = validate("lock id", &long).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("512"), "{err}");
        assert!(validate("lock id", &"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate("lock id", "a\0b").is_err());
        assert!(validate_namespace("").is_ok());
        assert!(validate_namespace("/x").is_err());
        assert!(validate_namespace("a/b").is_err());
    }
}
