//! The conformance suite against a live Consul agent: `SYNC_TEST_CONSUL=consul://127.0.0.1:8500
//! cargo test -p sync-consul --test conformance [FILTER]`. Without the variable every case
//! shows as ignored.
//!
//! Consul's session TTL is at least 10 s, so the cases that wait for an expiry take tens of
//! seconds each: run many at once (`-- --test-threads 64`), as `cargo xtask test` does.

use std::time::Duration;

use sync_consul::{Client, Config};

fn main() -> std::process::ExitCode {
    sync_conformance::run(
        "consul",
        Some("SYNC_TEST_CONSUL"),
        |url, namespace| async move {
            let config = Config::from_url(&url)?
                .with_namespace(namespace)
                .with_ttl(Duration::from_secs(10))
                // The suite checks that a dead holder's lock frees within two TTLs.
                .with_lock_delay(Duration::ZERO)
                .with_job_retention(sync_conformance::JOB_RETENTION)
                .with_request_timeout(Duration::from_secs(3));
            Client::connect(config).await
        },
    )
}
