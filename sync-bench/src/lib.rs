//! # sync-bench
//!
//! Side-by-side benchmarks of the `sync` backends, run by `cargo xtask bench [BACKEND…]
//! [--quick]` against live services. Every scenario runs three implementations of the same
//! work, interleaved in rounds in one process (sync, raw, peer, sync, raw, peer…):
//!
//! - **sync**: this workspace's library, through its traits;
//! - **raw**: the same backend's own client doing the fewest requests the work needs;
//! - **peer**: what a user would otherwise pick (etcd's Lock and Election RPCs, rslock for
//!   Redis, Consul's `api.Lock` recipe, tokio's `Mutex` and `mpsc` for the in-process
//!   backend), where one exists.
//!
//! Each row reports the median of the rounds, the ratio sync/baseline per round, and for etcd
//! the requests and watch streams each operation cost, as etcd itself counts them on its
//! Prometheus `/metrics` endpoint (for Redis, the commands it counts in `INFO commandstats`;
//! for Consul, the HTTP requests a counting proxy in front of the agent passed). The library
//! part of this crate is the report (Markdown, JSON, SVG), the statistics and the `/metrics`
//! reader; the scenarios live in the binary. Nothing here asserts anything about speed.

#![deny(missing_docs)]

pub mod metrics;
pub mod report;
pub mod stats;
