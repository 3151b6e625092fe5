//! # sync-redis
//!
//! The Redis backend of the `sync` toolkit: [`Lock`](sync_core::Lock),
//! [`Leader`](sync_core::Leader), [`Map`](sync_core::Map) and [`Task`](sync_core::Task) on
//! one multiplexed connection to a Redis server, or on the cluster client of a Redis Cluster
//! (Redis 7 or later). Time is not a Redis primitive: the server's `TIME` comes with no
//! statement of its own error, so this backend does not offer it.
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
//! | `{ns:task:}:jobs/<id>` | a job: hash of the job, state, attempts, error, output; expires a retention after it ended |
//! | `{ns:task:}:claims/<id>` | a running attempt's claim, held and renewed like a lock |
//! | `{ns:task:}:queue/<name>` | the stream of a name's queued jobs (group `workers`) |
//! | `{ns:task:}:delayed/<name>`, `…:running/<name>` | sorted sets: retries by due time, claims by when to check them |
//!
//! Every task key of a namespace shares one tag, so a claim changes a name's stream and a
//! job's record in one script, and `status` finds a job from its id alone; the price is that
//! a namespace's tasks live in one slot (one node of a cluster).
//!
//! ## Locks
//!
//! A grant is one script: if the key is free, it sets it with the TTL (`SET … PX`) and takes
//! the next fencing token. A release is an owner-checked delete that publishes on the
//! channel; waiters subscribe before they try again, so no release is missed, and also wake at
//! the holder's expiry (a dead holder publishes nothing) and on a safety-net poll
//! ([`Config::poll`]). An uncontended acquire and release cost one round trip each. Contenders
//! for one id through one client take turns locally, so a release wakes one waiter per client.
//!
//! Each [`Client`] renews every key it holds every third of the TTL in one script call (one per
//! node on a cluster: a script flagged `allow-cross-slot-keys` that declares only its first
//! key). A guard's `lost()` fires when a renewal finds the key gone or held by
//! another owner, and as soon as the monotonic clock passes the last confirmed renewal's send
//! time plus the TTL minus a safety margin.
//!
//! ## Tasks
//!
//! Workers read a name's stream through one consumer group (XREADGROUP, never blocking the
//! shared connection) and start each attempt with a script that writes its claim key; the
//! renewer keeps the claim alive and its loss is the handler's `JobContext::lost()`. A claim
//! that ends without a finish (the worker died) hands the job on; deliveries never started are
//! taken back with XAUTOCLAIM. Retries wait in a sorted set until due; submit, start and
//! finish answer a resend with what the first send did, so a lost answer is resolved, not
//! repeated. See the `task` module for the details.
//!
//! ## Answers that go missing
//!
//! Every script's answer comes back behind a nonce its call sends. A call that gets another
//! request's answer (its own was lost while the connection stayed up), or none within
//! [`Config::request_timeout`], fails as "outcome unknown" and the standalone connection is
//! replaced (and its subscriptions made again). Grants, releases, renewals, map changes and
//! task steps answer a resend with what the first send did, so such a call is resolved by
//! sending it again, for at most two request timeouts.
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
mod conn;
mod contend;
mod error;
mod hub;
mod keys;
mod leader;
mod lock;
mod map;
mod renew;
mod task;
#[cfg(feature = "tls")]
mod tls;

pub use client::Client;
pub use config::{Config, MAX_TTL, MIN_TTL};

/// The backend name used in errors and traces.
pub const BACKEND: &str = "redis";
