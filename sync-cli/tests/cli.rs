//! Live tests of the `syncctl` binary: locks that exclude across processes and survive (or
//! hand over after) a killed holder, a lock lost from outside ending its command, exclusion
//! with `etcdctl lock` and `consul lock`, clean one-line errors, and a smoke test of the map,
//! task, elect/leader and time commands.
//!
//! Each backend's cases need its URL in `SYNC_TEST_ETCD`, `SYNC_TEST_REDIS`,
//! `SYNC_TEST_REDIS_CLUSTER`, `SYNC_TEST_CONSUL` or `SYNC_TEST_NTP`; without it they show as
//! ignored, or fail with `SYNC_REQUIRE_LIVE=1`. The interop cases also need `etcdctl` (3.4) on
//! PATH and the `consul` binary (on PATH or where `cargo xtask services up consul` put it);
//! breaking a redis lock needs `redis-cli`.

#[path = "cli/errors.rs"]
mod errors;
#[path = "cli/harness.rs"]
mod harness;
#[path = "cli/interop.rs"]
mod interop;
#[path = "cli/lock.rs"]
mod lock;
#[path = "cli/procs.rs"]
mod procs;
#[path = "cli/services.rs"]
mod services;
#[path = "cli/smoke.rs"]
mod smoke;

fn main() -> std::process::ExitCode {
    let mut cases = Vec::new();
    lock::cases(&mut cases);
    interop::cases(&mut cases);
    errors::cases(&mut cases);
    smoke::cases(&mut cases);
    harness::run(cases)
}
