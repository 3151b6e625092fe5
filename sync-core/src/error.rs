//! The one error type every backend returns.

use std::fmt;

/// What went wrong, independent of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something out of range: an empty id, a zero TTL, a zero pool.
    InvalidArgument,
    /// A bounded wait ran out.
    Timeout,
    /// The lock or leadership was not held by this caller.
    NotHeld,
    /// The lock or leadership was held but has been lost (lease expired or revoked).
    LockLost,
    /// An optimistic write lost a race (compare-and-swap on a stale version).
    Conflict,
    /// The key, job or entry does not exist.
    NotFound,
    /// The backend could not be reached or did not answer.
    Unavailable,
    /// The backend refused the credentials.
    Unauthorized,
    /// The backend cannot do this.
    Unsupported,
    /// The handle was closed or its session has ended.
    Closed,
    /// Any other backend failure.
    Backend,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Timeout => "timed out",
            ErrorKind::NotHeld => "not held",
            ErrorKind::LockLost => "lock lost",
            ErrorKind::Conflict => "conflict",
            ErrorKind::NotFound => "not found",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Backend => "backend error",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a primitive: a [kind](ErrorKind), a message naming the backend and the id,
/// and the backend client's error as [`source`](std::error::Error::source).
///
/// ```
/// use sync_core::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::Timeout, "waited 5s for the lock")
///     .with_backend("etcd")
///     .with_id("orders");
/// assert_eq!(err.kind(), ErrorKind::Timeout);
/// assert_eq!(err.to_string(), "etcd: orders: timed out: waited 5s for the lock");
/// ```
#[derive(thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    backend: Option<&'static str>,
    operation: Option<&'static str>,
    id: Option<String>,
    #[source]
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a message saying what was wrong.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            backend: None,
            operation: None,
            id: None,
            source: None,
        }
    }

    /// An [`ErrorKind::InvalidArgument`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Names the backend that failed (`"etcd"`, `"local"`…).
    pub fn with_backend(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Names the operation that failed (`"lock.acquire"`, `"map.write"`…).
    pub fn with_operation(mut self, operation: &'static str) -> Self {
        self.operation = Some(operation);
        self
    }

    /// Fills in backend, operation and id where the error does not name them yet.
    ///
    /// ```
    /// use sync_core::{Error, ErrorKind};
    /// let err = Error::new(ErrorKind::NotHeld, "released twice")
    ///     .with_id("orders")
    ///     .in_context("local", "lock.release", "ignored: the id is already named");
    /// assert_eq!(err.to_string(), "local: lock.release: orders: not held: released twice");
    /// ```
    pub fn in_context(mut self, backend: &'static str, operation: &'static str, id: &str) -> Self {
        self.backend.get_or_insert(backend);
        self.operation.get_or_insert(operation);
        if self.id.is_none() && !id.is_empty() {
            self.id = Some(id.to_string());
        }
        self
    }

    /// Names the id (lock id, group, key, job) the operation was about.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Attaches the underlying client error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without backend, id or kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The backend named in the error, if any.
    pub fn backend(&self) -> Option<&'static str> {
        self.backend
    }

    /// The operation named in the error, if any.
    pub fn operation(&self) -> Option<&'static str> {
        self.operation
    }

    /// The id named in the error, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(backend) = self.backend {
            write!(f, "{backend}: ")?;
        }
        if let Some(operation) = self.operation {
            write!(f, "{operation}: ")?;
        }
        if let Some(id) = &self.id {
            write!(f, "{id}: ")?;
        }
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(b) = self.backend {
            d.field("backend", &b);
        }
        if let Some(op) = self.operation {
            d.field("operation", &op);
        }
        if let Some(id) = &self.id {
            d.field("id", id);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
