//! The conformance suite against a live Redis: `SYNC_TEST_REDIS=redis://127.0.0.1:6379 cargo
//! test -p sync-redis --test conformance [FILTER]`. Without the variable every case shows as
//! ignored.

use std::time::Duration;

use sync_redis::{Client, Config};

fn main() -> std::process::ExitCode {
    sync_conformance::run(
        "redis",
        Some("SYNC_TEST_REDIS"),
        |url, namespace| async move {
            let config = Config::from_url(&url)?
                .with_namespace(namespace)
                .with_ttl(Duration::from_secs(2))
                .with_job_retention(sync_conformance::JOB_RETENTION)
                .with_request_timeout(Duration::from_secs(3));
            Client::connect(config).await
        },
    )
}
