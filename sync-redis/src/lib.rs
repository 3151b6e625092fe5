//! # sync-redis
//!
//! The Redis backend of the `sync` toolkit: [`Lock`](sync_core::Lock) and
//! [`Leader`](sync_core::Leader) on one multiplexed connection to a Redis server, or on the
//! cluster client of a Redis Cluster (Redis 7 or later).
//!
//! ## Keys
//!
//! With namespace `ns` (default `sync`; see [`Config::namespace`]), every key of one lock or
//! election shares the hash tag `{ns:<kind>:<escaped id>}`, so each script touches one slot:
//!
//! | key | holds |
//! | --- | --- |
//! | `{ns:lock:<id>}` | the holder: owner id, fencing token, payload; expires after the TTL |
//! | `{ns:lock:<id>}:fence` | the last fencing token issued (kept an hour after the last grant) |
//! | `{ns:lock:<id>}:changed` | the pub/sub channel of releases |
//! | `{ns:leader:<group>}…` | the same for an election; the payload is the candidate and its value |
//! | `{ns:map:<name>}…` | a map: a hash of its entries, `:version`, and `:w:<id>` write markers |
//!
//! ## Locks
//!
//! A grant is one script: if the key is free, it sets it with the TTL (`SET … PX`) and takes
//! the next fencing token. A release is an owner-checked delete that publishes on the
//! channel; waiters subscribe before they try again, so no release is missed, and also wake at
//! the holder's expiry (a dead holder publishes nothing) and on a safety-net poll
//! ([`Config::poll`]). An uncontended acquire and release cost one round trip each.
//!
//! Each [`Client`] renews every key it holds every third of the TTL in one script call (one per
//! slot on a cluster). A guard's `lost()` fires when a renewal finds the key gone or held by
//! another owner, and as soon as the monotonic clock passes the last confirmed renewal's send
//! time plus the TTL minus a safety margin.
//!
//! ## Fencing when Redis loses data
//!
//! Tokens never fall below a floor from the server's clock (`TIME` in milliseconds × 1024), so
//! after a restart without persistence, or a failover to a replica that had not seen the last
//! grants, the next token is still larger than every token issued before. That assumes the
//! clock of the server granting after the loss is not behind the one that granted before, and
//! that no id is granted more than 1024 times in one millisecond.
//!
//! What fencing cannot undo: between the data loss and the holder's next renewal (at most a
//! third of the TTL later), another contender can be granted the same lock while the old
//! holder still believes it holds it; its `lost()` fires at that renewal. Protect the resource
//! with the fencing token, or run Redis with `appendonly yes` / `appendfsync always`, or keep a
//! restarted Redis out of service for one TTL (Redlock's "delayed restart").
//!
//! ## Connecting
//!
//! [`Config::from_url`] takes `redis://[user:password@]host:port[/namespace][?db=0&ttl=5s]`,
//! `rediss://…` (TLS, the `tls` feature), and `redis+cluster://h1:p1,h2:p2[/namespace]` for a
//! Redis Cluster. Rejected credentials are `Unauthorized` at connect; connection failures and
//! timeouts `Unavailable`.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> sync_core::Result<()> {
//! use sync_core::{Backend, LockOptions};
//!
//! let client = sync_redis::Client::from_url("redis://127.0.0.1:6379/app").await?;
//! let guard = client.lock()?.acquire("orders", LockOptions::new()).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod client;
mod config;
mod contend;
mod error;
mod hub;
mod keys;
mod leader;
mod lock;
mod map;
mod renew;
#[cfg(feature = "tls")]
mod tls;

pub use client::Client;
pub use config::{Config, MAX_TTL, MIN_TTL};

/// The backend name used in errors and traces.
pub const BACKEND: &str = "redis";
