//! Redis client errors as `sync_core` errors, and which of them leave a write's outcome unknown.

use redis::{RedisError, ServerErrorKind};
use sync_core::{Error, ErrorKind};

use crate::BACKEND;

/// Maps a redis client error to a `sync_core` error kind, with the client error as source.
pub(crate) fn redis_err(what: impl Into<String>, e: RedisError) -> Error {
    let mut what = what.into();
    let code = e.code().unwrap_or_default();
    // A certificate refused, by either side, is a setup mistake: never Unavailable.
    if let Some((kind, why)) = tls_refusal(&e) {
        what.push_str(why);
        return Error::new(kind, what).with_backend(BACKEND).with_source(e);
    }
    let kind = if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
        || matches!(e.kind(), redis::ErrorKind::Server(ServerErrorKind::NoPerm))
    {
        ErrorKind::Unauthorized
    } else if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            code,
            "LOADING" | "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "BUSY"
        )
        || matches!(e.kind(), redis::ErrorKind::ClusterConnectionNotFound)
    {
        ErrorKind::Unavailable
    } else if matches!(e.kind(), redis::ErrorKind::InvalidClientConfig) {
        ErrorKind::InvalidArgument
    } else {
        ErrorKind::Backend
    };
    Error::new(kind, what).with_backend(BACKEND).with_source(e)
}

/// A TLS handshake that failed over a certificate (rustls's wording): the server's refused here
/// (InvalidArgument), or ours refused by the server (Unauthorized).
fn tls_refusal(e: &RedisError) -> Option<(ErrorKind, &'static str)> {
    let text = e.to_string();
    if text.contains("invalid peer certificate") {
        return Some((
            ErrorKind::InvalidArgument,
            ": the server's TLS certificate was refused here (check ca_file and the host name)",
        ));
    }
    if text.contains("fatal alert") && text.contains("Certificate") {
        return Some((
            ErrorKind::Unauthorized,
            ": the server refused this client's TLS certificate, or wants one (cert_file, key_file)",
        ));
    }
    None
}

/// Whether a write that failed this way may have been applied: its answer was lost or late.
/// Only a refused connection or an error reply proves it was not.
pub(crate) fn outcome_unknown(e: &RedisError) -> bool {
    if e.is_connection_refusal() {
        return false;
    }
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped()
}

/// An error of ours about what the server answered.
pub(crate) fn unexpected(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("{what}: unexpected answer from redis: {detail}"),
    )
    .with_backend(BACKEND)
}

/// `Closed`: the client was closed or killed.
pub(crate) fn closed() -> Error {
    Error::new(ErrorKind::Closed, "client is closed or was killed").with_backend(BACKEND)
}
