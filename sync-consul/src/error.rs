//! How a request to the agent failed, and whether it may have been applied.

use sync_core::{Error, ErrorKind};

use crate::BACKEND;

/// A failed request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Not applied: never sent, or answered in a way that says so.
    Sure(Error),
    /// Sent, and the answer lost or late: it may have been applied.
    Unknown(Error),
    /// The agent answered with an HTTP error status; a 5xx may come after the write was
    /// applied (the agent gave up waiting for the servers).
    Status { code: u16, error: Error },
}

impl Failure {
    pub(crate) fn sure(e: Error) -> Failure {
        Failure::Sure(e)
    }

    /// A transport error: before anything was sent (refused connection) it is sure,
    /// afterwards unknown.
    pub(crate) fn transport(what: &str, e: reqwest::Error) -> Failure {
        let why = describe(&e);
        // Nothing was sent before the connection stood.
        let sent = !e.is_connect();
        let error = Error::new(ErrorKind::Unavailable, format!("{what}: {why}"))
            .with_backend(BACKEND)
            .with_source(e);
        if sent {
            Failure::Unknown(tls_refusal(error))
        } else {
            Failure::Sure(tls_refusal(error))
        }
    }

    /// An HTTP error status and its body.
    pub(crate) fn status(what: &str, code: u16, body: &[u8]) -> Failure {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let kind = match code {
            403 => ErrorKind::Unauthorized,
            401 => ErrorKind::Unauthorized,
            404 => ErrorKind::NotFound,
            429 | 500..=599 => ErrorKind::Unavailable,
            400 | 413 => ErrorKind::InvalidArgument,
            _ => ErrorKind::Backend,
        };
        let hint = if kind == ErrorKind::Unauthorized {
            " (check the ACL token)"
        } else {
            ""
        };
        let error = Error::new(
            kind,
            format!("{what}: consul answered {code}: {text}{hint}"),
        )
        .with_backend(BACKEND);
        Failure::Status { code, error }
    }

    /// Whether the request may have been applied.
    pub(crate) fn unknown(&self) -> bool {
        match self {
            Failure::Sure(_) => false,
            Failure::Unknown(_) => true,
            Failure::Status { code, .. } => *code >= 500,
        }
    }

    /// The error to hand on.
    pub(crate) fn error(self) -> Error {
        match self {
            Failure::Sure(e) | Failure::Unknown(e) | Failure::Status { error: e, .. } => e,
        }
    }

    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            Failure::Sure(e) | Failure::Unknown(e) | Failure::Status { error: e, .. } => e.kind(),
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        f.error()
    }
}

/// The error and its causes in one line (reqwest's own message hides the cause); a cause
/// whose text is already there (hyper's include their own) is said once.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A certificate refused by either side is a setup mistake, never Unavailable.
fn tls_refusal(e: Error) -> Error {
    let text = e.to_string();
    let (kind, why) = if text.contains("invalid peer certificate") || text.contains("UnknownIssuer")
    {
        (
            ErrorKind::InvalidArgument,
            ": the agent's TLS certificate was refused here (check ca_file and the host name)",
        )
    } else if text.contains("alert") && text.contains("ertificate") {
        (
            ErrorKind::Unauthorized,
            ": the agent refused this client's TLS certificate, or wants one (cert_file, key_file)",
        )
    } else {
        return e;
    };
    Error::new(kind, format!("{}{why}", e.message())).with_backend(BACKEND)
}

/// `Closed`: the client was closed or killed.
pub(crate) fn closed() -> Error {
    Error::new(ErrorKind::Closed, "client is closed or was killed").with_backend(BACKEND)
}
