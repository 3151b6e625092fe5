//! # sync-ntp
//!
//! Synchronized wall time for the `sync` toolkit from one or more NTP servers, stated as an
//! interval that contains true time (DESIGN §3 Time), behind
//! [`sync_core::Time`].
//!
//! - Every sync resolves each configured server and queries each address it resolves to, up
//!   to [`MAX_ADDRESSES_PER_SERVER`](config::MAX_ADDRESSES_PER_SERVER) (4) per name, as a
//!   source of its own: one name that resolves to several servers (a pool) can give a majority.
//!   An address votes once: one that two names give is queried once, for the first, and a
//!   server listed twice is a configuration error. Each name therefore counts as many votes as
//!   it has addresses; list a single dual-stack server by one address if it must vote once.
//! - A reply is rejected — with its own [`ReplyError`] — for a kiss-of-death, stratum 0 or
//!   ≥ 16, leap indicator 3, a root distance above the maximum acceptable error, or a malformed
//!   packet (short, wrong mode or version, zero transmit timestamp). A datagram whose origin
//!   timestamp does not echo our request's random nonce, or too malformed to tell, is not an
//!   answer: it is discarded while the wait for the real one goes on. After a DENY or RSTR kiss
//!   the address is not queried again, after RATE not for a back-off that doubles per kiss
//!   (RFC 4330 §8).
//! - Each good reply states `offset ± error` with offset = ((T2−T1)+(T3−T4))/2 and
//!   error = round trip / 2 + root delay / 2 + root dispersion: the interval at T4 is
//!   [T3 − root distance, T2 + (T4 − T1) + root distance], in exact integer nanoseconds (1 ns
//!   outwards for rounding; T1 cancels out, so the local wall clock does not matter), its upper
//!   end also allowing for drift over T4 − T1. The replies are combined
//!   Marzullo-style: the result is the hull of every point that a strict majority of the
//!   sources' intervals contain, so it contains true time whenever a majority of them are
//!   right; sources whose intervals miss it are falsetickers.
//! - **The carry clock.** The result is cached against `CLOCK_MONOTONIC_RAW` on Linux (read
//!   through `rustix`), not `std::time::Instant`: `Instant` is `CLOCK_MONOTONIC`, which the
//!   host's own NTP daemon slews (chrony at up to 83 333 ppm), far beyond any drift allowance,
//!   while the raw clock runs at the oscillator's own rate. Its error is then the oscillator's,
//!   which [`Config::drift_ppm`] bounds: by default 200 ppm
//!   ([`DEFAULT_DRIFT_PPM`](config::DEFAULT_DRIFT_PPM), the worst-case drift Google's TrueTime
//!   assumes; commodity quartz is usually within ±50). **That is the assumption:** the
//!   machine's oscillator, as the kernel calibrated it at boot, keeps within `drift_ppm` of true
//!   time. T4 − T1 of each exchange is measured on the same clock. `now()` and `now_interval()`
//!   cost no network round trip between syncs; the interval widens by `drift_ppm` of the
//!   carry-clock time since the sync on each side, and its upper end also by the time the wall
//!   clock ran ahead of the carry clock beyond that allowance (the carry clock stops while the
//!   machine sleeps).
//!   On Apple targets and Windows the carry clock is `Instant`, which is not slewed there
//!   (`CLOCK_UPTIME_RAW`, `QueryPerformanceCounter`); on other targets `Instant` may be slewed,
//!   so the allowance there adds 100 000 ppm (10 %, Linux's own limit on tick adjustment, above
//!   any daemon's slew rate).
//! - **Leap seconds.** A reply's leap indicator 1 (insert) or 2 (delete) from any source that
//!   agrees with the majority records a leap at the end of the UTC day of the sync
//!   ([`SyncReport::leap`]). Unix time repeats (insert) or skips (delete) that second while the
//!   carry clock does not, and whether and when the servers apply it is not known exactly, so
//!   once the carried interval reaches the leap its lower end moves a second earlier (insert)
//!   or its upper end a second later (delete), until the next sync, whose reply is in post-leap
//!   time. If that makes the error exceed the maximum, calls sync again instead (and fail
//!   Unavailable, never a wrong interval, until a sync past the leap: with a `max_error` under
//!   half a second, about a second around the leap).
//! - The resolver is bounded by the query timeout. A background task refreshes the result every
//!   `interval` and stops when the last handle is dropped. The first call syncs on demand.
//! - Never silent local time: when every server fails and the widened interval would exceed
//!   `max_error`, calls fail with [`ErrorKind::Unavailable`](sync_core::ErrorKind::Unavailable)
//!   (its source a [`SyncError`] listing each server's failure).
//!
//! ## Why its own SNTP client, not `rsntp`
//!
//! The crate speaks SNTP (RFC 4330 / RFC 5905 client mode) itself, one UDP socket per query,
//! rather than use `rsntp`: `rsntp` exposes neither the reply's root delay nor its root
//! dispersion, and without them no honest bound on the error can be computed — the round trip
//! alone says how far the server is from us, not how far the server is from true time. The
//! wire code is small (`query.rs`: one request, the checks above, the four timestamps) and a
//! property test feeds it 100 000 random replies per `cargo test`: it never panics, and no
//! accepted reply gives an interval that misses the bounds the reply itself states.
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
mod clock;
mod combine;
pub mod config;
mod leap;
mod query;
mod time;

pub use client::{Client, ServerFailure, ServerSample, SyncError, SyncReport};
pub use config::Config;
pub use leap::PendingLeap;
pub use query::ReplyError;

/// The backend name in errors and spans.
pub const BACKEND: &str = "ntp";

/// The primitive name in spans.
const PRIMITIVE: &str = "time";
