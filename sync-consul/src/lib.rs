//! # sync-consul
//!
//! The Consul backend of the `sync` toolkit: [`Lock`](sync_core::Lock) and
//! [`Task`](sync_core::Task) on Consul sessions and KV through one agent's HTTP API (Consul 1.8
//! or later). Time is not a Consul primitive.
//!
//! ## Sessions
//!
//! A [`Client`] creates one session (TTL [`Config::ttl`], at least Consul's 10 s; behaviour
//! `release`; lock-delay [`Config::lock_delay`], Consul's 15 s by default), renews it every
//! half TTL, watches it with a blocking query so that its invalidation is seen at once, and
//! destroys it on [`close`](sync_core::Backend::close). Consul may take up to twice the TTL to
//! invalidate a session that is no longer renewed; a holder does not count on that: its
//! `lost()` fires once the last confirmed renewal's send time plus the TTL, minus a fifth of
//! it, has passed.
//!
//! ## Keys
//!
//! | what | key |
//! | --- | --- |
//! | lock `id` | `<ns>/<escaped id>/.lock` — where `consul lock <ns>/<id>` locks |
//! | election `group` | `<ns>/<escaped group>/.leader`: the term, the candidate and its value |
//! | map `name`, key `k` | `<ns>/:map/<escaped name>/<escaped k>`, version = ModifyIndex |
//! | job `id`: record, payload, output | `<ns>/:task/jobs/<escaped id>/record`, `…/payload/<nonce>`, `…/output/<token>` |
//! | a queued job of handler `name` | `<ns>/:task/queue/<escaped name>/<escaped id>` |
//! | a running attempt (locked by the worker's session) | `<ns>/:task/claims/<escaped id>/<attempt>` |
//! | an ended job, by end time (for the retention sweep) | `<ns>/:task/done/<unix ms>/<escaped id>` |
//! | a session's grant fence (only once one of its grants went unanswered) | `<ns>/:fence/<session>` |
//!
//! Ids are escaped with [`sync_core::id::escape`]: one made only of `[A-Za-z0-9._-]` is
//! itself, so `consul lock sync/orders cmd` and a lock on `orders` in namespace `sync`
//! exclude each other.
//!
//! ## Locks
//!
//! A grant is one `/v1/txn`: check the session's grant fence (see below), `lock` the key for
//! the session, with the flags value of Consul's `api.Lock` (0x2ddccbc058a50c18), and read it
//! back. Its ModifyIndex (the raft index of the
//! acquiring write) is the fencing token. A release is one transaction too: check that the
//! session still holds the key, and delete it. An uncontended acquire and release cost one
//! request each. A waiter blocks on the key's index (a blocking query) and tries again when it
//! changes; after a holder's session was invalidated, Consul refuses every grant for the
//! lock-delay, and waiters retry within a second of its end. Contenders for one id through one
//! session take turns locally (Consul grants a key again to the session holding it): a guard
//! keeps the turn until it is released or dropped, even after its `lost()` fired, so that its
//! release can never delete a later grant of the same session. A session that ends takes its
//! turns with it: contenders under the next session do not wait for guards lost with it.
//!
//! A guard's `lost()` fires when its session is invalidated (destroyed, or expired), when a
//! renewal finds the key deleted or held by another session, or at the safe deadline.
//!
//! ## Tasks
//!
//! A job is a record in KV; while queued, its queue entry (under its handler name) holds a copy
//! of the record, written with it in one transaction, so a worker's one blocking query on the
//! queue is both its wake-up and all it needs to claim: up to its free permits in one
//! transaction that deletes the entries and rewrites the records as Running, both only at the
//! index read (two workers never start one attempt), and locks a claim key per job for the
//! worker client's session. The claim's index is the attempt's fencing token; the session's end
//! is the handler's `lost()`. When a session ends, Consul releases its claim keys: every
//! worker watches the claims with a blocking query and requeues (or fails, when out of
//! attempts) each job whose claim key lost its session. Finished jobs are deleted
//! [`Config::job_retention`] after they ended by a sweep the workers run (Consul KV has no
//! TTL). An uncontended job costs its submitter one transaction, and its worker one queue
//! read, one claim and one finish transaction (details in `src/task.rs`).
//!
//! Consul leaves out of a listing the entries a token may not read, and says nothing; to a
//! worker that would look like an empty queue. So `work()` reads the queue's own key once and
//! fails `Unauthorized` if that is refused, and a running worker whose queue reads empty reads
//! it again at most every 30 s: a token that lost its rights is logged as refused, and the
//! worker asks ever less often (up to every 30 s) until the rights are back. An attempt that
//! ends meanwhile keeps its outcome and writes it once they are (its claim lives on with the
//! session).
//!
//! ## Answers that go missing
//!
//! A grant whose answer is lost is sent again (it is re-entrant for its session) for at most
//! two request timeouts; if no answer comes, the key is released in the background in case it
//! was granted. A release found not held after a resend counts as done when the holder had not
//! lost the lock.
//!
//! A send whose answer was lost may still be applied later, after the client released the
//! key: it would lock it for the client's live session, with nobody to release it. So every
//! grant also checks the session's fence key (`<ns>/:fence/<session>`) as the client last saw
//! it, and the client rewrites that key whenever a grant's send goes unanswered, before it lets
//! go of what the send may have taken: the late send then fails its check. The key is written
//! only after such a fault and deleted when the session ends (a client that dies leaves it).
//! The ACL token therefore needs write on `<ns>/:fence/` as well as on the lock keys.
//!
//! ## Fencing when Consul loses data
//!
//! Tokens are raft indexes: they increase for as long as the servers keep their raft log. A
//! dev agent (`consul agent -dev`) keeps everything in memory and starts its indexes over when
//! restarted; run servers with a data dir where fencing matters.
//!
//! ## Connections
//!
//! Each blocking query holds an HTTP connection for up to [`Config::wait`]: one per client for
//! its session, plus one per waiting acquire, `follow()` stream and task worker. Consul allows
//! 200 connections per client address by default (`limits { http_max_conns_per_client }`) and
//! resets the ones beyond; raise it for processes with many waiters.
//!
//! ## Connecting
//!
//! [`Config::from_url`] takes `consul://host[:port][/namespace][?token=…&datacenter=…&ttl=15s]`
//! and `consuls://…` (HTTPS). A refused token is `Unauthorized`; an agent that cannot be
//! reached or does not answer `Unavailable`.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> sync_core::Result<()> {
//! use sync_core::{Backend, LockOptions};
//!
//! let client = sync_consul::Client::from_url("consul://127.0.0.1:8500/app").await?;
//! let guard = client.lock()?.acquire("orders", LockOptions::new()).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod api;
mod client;
mod config;
mod contend;
mod error;
mod fence;
mod leader;
mod lock;
mod map;
mod session;
mod task;

pub use client::Client;
pub use config::{Config, MAX_LOCK_DELAY, MAX_TTL, MIN_TTL};

/// The backend name used in errors and traces.
pub const BACKEND: &str = "consul";
