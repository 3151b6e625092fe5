//! # sync-ntp
//!
//! Synchronized wall time for the `sync` toolkit from one or more NTP servers, stated as an
//! interval that contains true time (DESIGN §3 Time), behind
//! [`sync_core::Time`].
//!
//! - Every sync queries all configured servers. A reply is rejected — with its own
//!   [`ReplyError`] — for a kiss-of-death, stratum 0 or ≥ 16, leap indicator 3, a root distance
//!   above the maximum acceptable error, or a malformed packet (short, wrong mode or version,
//!   zero transmit timestamp). A datagram whose origin timestamp does not echo our request's
//!   random nonce, or too malformed to tell, is not an answer: it is discarded while the wait
//!   for the real one goes on. After a DENY or RSTR kiss the server is not queried again, after
//!   RATE not for a back-off that doubles per kiss (RFC 4330 §8); a server listed twice is a
//!   configuration error (it would vote twice).
//! - Each good reply states `offset ± error` with offset = ((T2−T1)+(T3−T4))/2 and
//!   error = round trip / 2 + root delay / 2 + root dispersion: the interval at T4 is
//!   [T3 − root distance, T2 + (T4 − T1) + root distance], in exact integer nanoseconds (1 ns
//!   outwards for rounding; T1 cancels out, so the local wall clock does not matter), its upper
//!   end also allowing for drift over T4 − T1. The replies are combined
//!   Marzullo-style: the result is the hull of every point that a strict majority of the
//!   servers' intervals contain, so it contains true time whenever a majority of the servers
//!   are right; servers whose intervals miss it are falsetickers.
//! - The result is cached against the monotonic clock (`std::time::Instant`): `now()` and
//!   `now_interval()` cost no network round trip between syncs, and the interval widens by
//!   `drift_ppm` of the time since the sync (and its upper end by any time over 1 ms that the
//!   wall clock advanced beyond the monotonic clock, which stops while the machine sleeps). The resolver
//!   is bounded by the query timeout. A background task refreshes it every `interval`
//!   and stops when the last handle is dropped. The first call syncs on demand.
//! - Never silent local time: when every server fails and the widened interval would exceed
//!   `max_error`, calls fail with [`ErrorKind::Unavailable`](sync_core::ErrorKind::Unavailable)
//!   (its source a [`SyncError`] listing each server's failure).
//!
//! The crate speaks SNTP (RFC 4330 / RFC 5905 client mode) itself, one UDP socket per query:
//! the error bound needs each reply's root delay and root dispersion, which the `rsntp` crate
//! does not expose.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
//! use std::time::Duration;
//! use sync_core::{Backend, ErrorKind};
//!
//! // A server that never answers: Unavailable within the timeout, never local time.
//! let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
//! let url = format!("ntp://{}?timeout=200ms", silent.local_addr().unwrap());
//! let client = sync_ntp::Client::from_url(&url).await?;
//! let err = client.time()?.now_interval().await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Unavailable);
//! assert!(err.to_string().contains("no reply within 200ms"));
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod client;
mod combine;
pub mod config;
mod query;
mod time;

pub use client::{Client, ServerFailure, ServerSample, SyncError, SyncReport};
pub use config::Config;
pub use query::ReplyError;

/// The backend name in errors and spans.
pub const BACKEND: &str = "ntp";

/// The primitive name in spans.
const PRIMITIVE: &str = "time";
