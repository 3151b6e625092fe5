//! etcd client errors as `sync_core` errors, and which of them are safe to send again.

use sync_core::{Error, ErrorKind};

use crate::BACKEND;

/// Maps an etcd client error to a `sync_core` error kind, with the client error as source.
pub(crate) fn etcd_err(what: impl Into<String>, e: etcd_client::Error) -> Error {
    let mut what = what.into();
    let kind = match &e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            ErrorKind::Unavailable
        }
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            match i32::from(status.code()) {
                // etcd refuses a request over its --max-request-bytes (1.5 MiB by default)
                // with InvalidArgument, or, past that plus its gRPC overhead allowance, with
                // ResourceExhausted: bad input, never worth retrying.
                3 | 8
                    if message.contains("request is too large")
                        || message.contains("larger than max") =>
                {
                    what.push_str(
                        ": the request exceeds etcd's --max-request-bytes (1.5 MiB by default)",
                    );
                    ErrorKind::InvalidArgument
                }
                // FailedPrecondition: credentials given to an etcd that has no auth. A setup
                // mistake to name, not a server fault (and never worth retrying).
                9 if message.contains("authentication is not enabled") => {
                    what.push_str(
                        ": a user and password were given, but authentication is not enabled \
                         on this etcd; remove them from the config",
                    );
                    ErrorKind::InvalidArgument
                }
                // Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
                1 | 4 | 8 | 14 => ErrorKind::Unavailable,
                // Unknown, from the transport (a connection closed under the request).
                2 if message.contains("transport error") => ErrorKind::Unavailable,
                // PermissionDenied, Unauthenticated
                7 | 16 => ErrorKind::Unauthorized,
                // etcd answers a bad user or password with InvalidArgument.
                _ if message.contains("authentication failed")
                    || message.contains("permission denied")
                    || message.contains("invalid auth token")
                    || message.contains("user name is empty") =>
                {
                    ErrorKind::Unauthorized
                }
                _ => ErrorKind::Backend,
            }
        }
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            ErrorKind::InvalidArgument
        }
        _ => ErrorKind::Backend,
    };
    Error::new(kind, what).with_backend(BACKEND).with_source(e)
}

/// Whether a request surely never reached etcd (the connection to the endpoint the channel
/// picked could not be made), so it is safe to send again — on another endpoint.
pub(crate) fn not_delivered(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == 14 && status.message().contains("connect")
        }
        _ => false,
    }
}
