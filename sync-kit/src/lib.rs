//! # sync-kit
//!
//! What every backend of the `sync` toolkit shares, written once so that a backend crate holds
//! only its protocol code. Users do not need this crate to use a backend, except for the
//! [typed map](typed::TypedMap): serde values as JSON over any backend's [`Map`](sync_core::Map).
#![deny(missing_docs)]

pub mod typed;

use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex, recovering the data if a panicking thread poisoned it: every critical
/// section of the backends keeps its state consistent and never panics half-way.
///
/// ```
/// let m = std::sync::Mutex::new(1);
/// *sync_kit::locked(&m) += 1;
/// assert_eq!(*sync_kit::locked(&m), 2);
/// ```
pub fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The message of a panic payload (`&str` or `String`), or a placeholder for any other payload.
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
/// assert_eq!(sync_kit::panic_message(payload.as_ref()), "boom 1");
/// ```
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(non-string payload)")
}

/// Whether retrying `e` cannot help: the credentials or rights were refused, or the request
/// itself is wrong. A loop that meets one reports it and stops, instead of asking again.
///
/// ```
/// use sync_core::{Error, ErrorKind};
/// assert!(sync_kit::refused_for_good(&Error::new(ErrorKind::Unauthorized, "403")));
/// assert!(!sync_kit::refused_for_good(&Error::new(ErrorKind::Unavailable, "down")));
/// ```
pub fn refused_for_good(e: &sync_core::Error) -> bool {
    use sync_core::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::Unauthorized | ErrorKind::InvalidArgument | ErrorKind::Unsupported
    )
}

pub mod checked;
pub mod clock;
pub mod follow;
pub mod held;
pub mod retry;
pub mod task;
pub mod turns;

/// The instant `after` from now; a wait too long for the clock (`Duration::MAX`) means never,
/// instead of the panic of `Instant + Duration` overflowing.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let never = sync_kit::deadline(Duration::MAX);
/// assert!(never > tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365));
/// # }
/// ```
pub fn deadline(after: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 24 * 3600))
}
