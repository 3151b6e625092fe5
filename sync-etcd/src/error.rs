//! etcd client errors as `sync_core` errors, and which of them are safe to send again.

use sync_core::{Error, ErrorKind};

use crate::BACKEND;

/// Maps an etcd client error to a `sync_core` error kind, with the client error as source.
pub(crate) fn etcd_err(what: impl Into<String>, e: etcd_client::Error) -> Error {
    let mut what = what.into();
    // A certificate refused, by either side, is a setup mistake: never Unavailable.
    #[cfg(feature = "tls")]
    if let Some((kind, why)) = crate::tls::rejection(&e) {
        return Error::new(kind, format!("{what}: {why}"))
            .with_backend(BACKEND)
            .with_source(e);
    }
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

/// Whether a request surely never reached etcd, so it is safe to send again — on another
/// endpoint: only a failure to connect proves that. A status etcd itself sent (say "request
/// timed out, possibly due to connection lost", which may well have committed) has no source;
/// only a local transport failure does, and its chain must show the connect that failed.
pub(crate) fn not_delivered(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if i32::from(status.code()) != UNAVAILABLE {
        return false;
    }
    let mut next = std::error::Error::source(status);
    while let Some(err) = next {
        if is_connect_failure(err) {
            return true;
        }
        next = err.source();
    }
    false
}

/// A connect that failed: refused, unreachable, or the transport saying it never connected.
fn is_connect_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{
        AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable,
    };
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return matches!(
            io.kind(),
            ConnectionRefused | AddrNotAvailable | HostUnreachable | NetworkUnreachable
        );
    }
    let text = err.to_string();
    text.starts_with("tcp connect error") || text.starts_with("error trying to connect")
}

/// Whether no answer came within the request timeout (see [`answered_within`]): the request
/// may or may not have reached etcd.
///
/// [`answered_within`]: crate::kv::answered_within
pub(crate) fn timed_out(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::IoError(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// Whether etcd itself answered "unavailable" (it has no leader, or lost track of a
/// proposal): the member is up, the cluster is not there yet. Transport failures, also
/// Unavailable, carry their cause as the status's source.
pub(crate) fn leaderless(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if i32::from(s.code()) == UNAVAILABLE && std::error::Error::source(s).is_none())
}

/// Whether a request may have been applied although the caller saw an error: the transport
/// failed, or no answer came in time — and it was not proven undelivered. Such a write is
/// resolved (read back, or resent where resending is idempotent), never just retried blindly.
pub(crate) fn answer_lost(e: &etcd_client::Error) -> bool {
    let maybe_sent = match e {
        etcd_client::Error::IoError(_) | etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(i32::from(s.code()), 1 | 2 | 4 | 14),
        _ => false,
    };
    maybe_sent && !not_delivered(e)
}

/// Whether etcd refused a request for want of rights or credentials: no retry changes that.
/// (An expired token is refreshed by the client and never gets here; a refresh refused, the
/// password changed or the user gone, comes back as etcd's answer to the login.)
pub(crate) fn refused_for_good(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if matches!(i32::from(status.code()), 7 | 16)
            || status.message().contains("permission denied")
            || status.message().contains("authentication failed"))
}

/// Whether etcd answered that a lease does not exist (expired or revoked): a definite refusal
/// of the write that named it.
pub(crate) fn lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(status)
        if status.message().contains("lease not found"))
}

/// gRPC's Unavailable, by number: etcd-client does not re-export tonic's `Code`.
const UNAVAILABLE: i32 = 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_etcd_sent_is_never_proven_undelivered() {
        // etcd's own answer when a proposal's fate is unknown: it may have committed.
        let lost = tonic::Status::unavailable(
            "etcdserver: request timed out, possibly due to connection lost",
        );
        assert!(!not_delivered(&etcd_client::Error::GRpcStatus(lost)));
        let connect_word = tonic::Status::unavailable("error trying to connect: it says so");
        assert!(
            !not_delivered(&etcd_client::Error::GRpcStatus(connect_word)),
            "no source, no proof"
        );
    }

    #[test]
    fn refused_rights_and_credentials_are_for_good() {
        let refused = |status| refused_for_good(&etcd_client::Error::GRpcStatus(status));
        assert!(refused(tonic::Status::permission_denied(
            "etcdserver: permission denied"
        )));
        // etcd's answer to a login with a changed password, as a failed token refresh
        // returns it.
        assert!(refused(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password"
        )));
        assert!(!refused(tonic::Status::unavailable(
            "etcdserver: no leader"
        )));
        assert!(!refused(tonic::Status::invalid_argument(
            "etcdserver: duplicate key given in txn request"
        )));
    }

    #[tokio::test]
    async fn a_refused_connect_is_proven_undelivered() {
        // Nothing listens on port 1 of loopback: the connect itself fails.
        let etcd = etcd_client::Client::connect(["http://127.0.0.1:1"], None)
            .await
            .expect("a lazy channel");
        let err = etcd
            .kv_client()
            .get("k", None)
            .await
            .expect_err("nothing listens");
        assert!(not_delivered(&err), "{err:?}");
    }
}
