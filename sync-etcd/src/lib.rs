//! # sync-etcd
//!
//! The etcd v3 backend of the `sync` toolkit: [`Lock`](sync_core::Lock),
//! [`Leader`](sync_core::Leader), [`Map`](sync_core::Map) and [`Task`](sync_core::Task) on
//! one etcd connection with one lease per [`Client`].
//!
//! ## Keys
//!
//! With namespace `ns` (default `sync`; see [`Config::namespace`]):
//!
//! | primitive | keys |
//! | --- | --- |
//! | lock `id` | `ns/<escaped id>/<lease-hex>` — etcd's `concurrency.Mutex` layout |
//! | election `group` | `ns/<escaped group>/<lease-hex>` — etcd's `concurrency.Election` layout |
//! | map `name` | `ns/:map/<escaped name>/<escaped key>` |
//! | task | `ns/:task/…` (jobs, payloads, outputs, queue, claims) |
//!
//! Escaped ids never contain `:` or `/`, so map and task keys never fall under a lock or
//! election prefix. With the empty namespace, a lock `NAME` and `etcdctl lock NAME` (or a Go
//! `concurrency.Mutex` on `NAME`) exclude each other, and an election `NAME` interoperates with
//! `etcdctl elect NAME`. As in etcd itself, a lock and an election of the same name share a
//! key range, so do not give them the same name.
//!
//! A release deletes its key with a plain delete, as etcd's Mutex does. If that delete goes
//! unanswered, the client sends it again and its later contender keys take the name
//! `<lease-hex>-<n>`: the first delete, should etcd apply it late, then finds nothing to
//! delete rather than a later holding of the same lock under the same name. An acquire whose
//! create goes unanswered fails; its key is deleted, the name is retired the same way, and if
//! etcd applies that create late after all, the client deletes the key it leaves (until the
//! client's lease ends), so it cannot block the lock.
//!
//! ## Leases
//!
//! Each [`Client`] holds one lease (TTL at least [`MIN_TTL`], whole seconds), renewed every
//! TTL/3 by one keepalive task shared by all its locks and elections. A guard's `lost()` fires
//! when etcd answers a renewal with TTL 0, when the contender key is deleted, or when renewals
//! keep failing until the last confirmed expiry minus a safety margin.
//!
//! [`Client::kill`] and [`Client::revoke`] are fault hooks for tests: a client that dies
//! without releasing anything, and a lease revoked on the server.
//!
//! ## Connecting
//!
//! [`Config::from_url`] takes `etcd://[user[:password]@]h1:2379,h2:2379[/namespace][?ttl=5s]`,
//! whose query keys are the [`Config`] field names; several endpoints are balanced, and a
//! request that could not be delivered to the endpoint picked (connection refused) is sent
//! again, so one node down does not fail calls. User/password authentication is config; etcd's
//! auth tokens expire (`--auth-token-ttl`), and the client gets a new one when a request or a
//! watch is refused for it (a watch stream keeps the token it was opened with, so a new
//! stream is opened). TLS
//! (`etcds://…?ca_file=…&cert_file=…&key_file=…&tls_domain=…`) needs the `tls` cargo feature.
//! With TLS, `ca_file` is required (system and webpki roots are not used: etcd is served with
//! a private CA); [`Client::connect`] reads and checks the PEM files before dialling and names
//! the file and the problem (missing, empty, not PEM, a key where a certificate belongs, a
//! client certificate without its key or with another key).
//! Client errors map to [`ErrorKind`](sync_core::ErrorKind)s: `Unavailable` for connect and
//! transport failures, `Unauthorized` for rejected credentials or permissions or a client
//! certificate the server refuses, `InvalidArgument` for a server certificate refused here (or
//! an endpoint that does not speak TLS), `Backend` otherwise — with the client error as the
//! source.
//!
//! ## Task
//!
//! Jobs are records under `ns/:task/jobs/`, queued under `ns/:task/queue/<name>/`; a worker
//! claims one in a transaction that also writes `ns/:task/claims/<id>` with its client's
//! lease. When a worker dies its lease expires, the claim vanishes, and the other workers
//! (watching claim deletions, with a periodic rescan as a safety net) queue the job again.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> sync_core::Result<()> {
//! use sync_core::{Backend, LockOptions};
//!
//! let client = sync_etcd::Client::from_url("etcd://127.0.0.1:2379/app").await?;
//! let guard = client.lock()?.acquire("orders", LockOptions::new()).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod client;
mod config;
mod contention;
mod endpoints;
mod error;
mod kv;
mod leader;
mod lease;
mod lock;
mod map;
mod session;
mod task;
#[cfg(feature = "tls")]
mod tls;
mod watch;

pub use client::Client;
pub use config::{Config, MAX_TTL, MIN_TTL};

/// The backend name used in errors and traces.
pub const BACKEND: &str = "etcd";
