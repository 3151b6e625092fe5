//! # sync-core
//!
//! The contract of the `sync` toolkit: object-safe async traits for distributed
//! synchronization primitives — [`Lock`], [`Leader`], [`Task`], [`Time`], [`Map`] — their
//! option builders, one [`Error`] type with semantic [kinds](ErrorKind), the [id rules](id) and
//! the [URL grammar](url) of backend configs.
//!
//! A connected backend client is a [`Backend`]: the factory of its primitives' handles, with
//! its [capabilities](Capabilities), lease TTL and (for tests) [fault hooks](Faults). Every
//! backend crate's `Client` implements it, and `sync-any` picks one by URL or config at run
//! time, so code written against `Arc<dyn Backend>` runs on any of them. What only backend
//! implementers need (the backend side of guards and workers, the loss trigger, shared checks)
//! is under [`raw`].
//!
//! This crate has no network code and no runtime logic. Code written against the traits lives
//! in its own crates: the `Cron` driver in `sync-cron`, the serde `TypedMap` and the shared
//! backend machinery in `sync-kit`.
#![deny(missing_docs)]

mod backend;
mod error;
pub mod id;
mod leader;
mod lock;
mod map;
mod signal;
mod task;
mod time;
pub mod url;

pub use backend::{Backend, Capabilities, Capability, Faults};
pub use error::{Error, ErrorKind, Result};
pub use leader::{ElectOptions, Elected, FollowStream, Leader, LeaderInfo};
pub use lock::{Lock, LockGuard, LockOptions};
pub use map::{Entry, ITERATE_IN_FLIGHT, MAX_VALUE_LEN, Map, Version};
pub use signal::LossSignal;
pub use task::{
    Handler, HandlerError, Job, JobContext, JobId, JobState, JobStatus, MAX_PAYLOAD_LEN, Task,
    Worker, WorkerOptions,
};
pub use time::{Time, TimeInterval};

/// What backends implement and call, kept out of the crate root, which shows what a user needs:
/// the backend side of guards, leaderships and workers, the loss trigger, and the shared checks.
pub mod raw {
    pub use crate::backend::unsupported;
    pub use crate::leader::Leadership;
    pub use crate::lock::HeldLock;
    pub use crate::map::validate_value;
    pub use crate::signal::{
        LeaseClock, LeaseDeadline, LossTrigger, loss_signal, loss_signal_under, loss_signal_until,
    };
    pub use crate::task::WorkerControl;

    use crate::{Error, Result};

    /// Validates a lease TTL against a backend's minimum: zero or below `min` is
    /// InvalidArgument naming the limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// let err = sync_core::raw::validate_ttl("consul", Duration::from_secs(5), Duration::from_secs(10));
    /// assert!(err.unwrap_err().to_string().contains("at least 10s"));
    /// ```
    pub fn validate_ttl(
        backend: &'static str,
        ttl: std::time::Duration,
        min: std::time::Duration,
    ) -> Result<()> {
        if ttl.is_zero() || ttl < min {
            return Err(
                Error::invalid(format!("ttl is {ttl:?}; it must be at least {min:?}"))
                    .with_backend(backend),
            );
        }
        Ok(())
    }
}
