//! Redis client errors as `sync_core` errors, and which of them leave a write's outcome unknown.

use redis::{RedisError, ServerErrorKind};
use sync_core::{Error, ErrorKind};

use crate::BACKEND;

/// Maps a redis client error to a `sync_core` error kind, with the client error as source.
pub(crate) fn redis_err(what: impl Into<String>, e: RedisError) -> Error {
    let what = what.into();
    let code = e.code().unwrap_or_default();
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
