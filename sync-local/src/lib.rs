//! # sync-local
//!
//! The in-process backend of the `sync` toolkit: every primitive of `sync-core` — Lock, Leader,
//! Task, Map, Time — with the full semantics of the contract (fencing tokens, loss signals,
//! session TTL, retries and redelivery, versions and compare-and-swap), and no network.
//!
//! A [`Cluster`] is the shared state (the "server"); each [`Client`] is a participant with its own
//! session. [`Client::kill`] and [`Client::revoke`] simulate a holder's death and a revoked lease,
//! so loss paths can be tested without a server.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
//! use sync_core::{Backend, LockOptions};
//!
//! let client = sync_local::Client::connect(sync_local::Config::from_url("local://")?)?;
//! let guard = client.lock()?.acquire("orders", LockOptions::new()).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod client;
mod config;
mod leader;
mod lock;
mod map;
mod server;
mod table;
mod task;
mod time;

pub use client::Client;
pub use config::{Config, MIN_TTL};
pub use server::Cluster;
pub use task::{Command, CommandPool, JOB_RETENTION};

/// The backend name used in errors and traces.
pub const BACKEND: &str = "local";
