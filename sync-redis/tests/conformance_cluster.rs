//! The conformance suite against a live Redis Cluster, cases named `redis_cluster::…`:
//! `SYNC_TEST_REDIS_CLUSTER=redis+cluster://h1:p1,h2:p2 cargo test -p sync-redis --test
//! conformance_cluster [FILTER]`. Without the variable every case shows as ignored.

use std::time::Duration;

use sync_redis::{Client, Config};

fn main() -> std::process::ExitCode {
    sync_conformance::run(
        "redis_cluster",
        Some("SYNC_TEST_REDIS_CLUSTER"),
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
