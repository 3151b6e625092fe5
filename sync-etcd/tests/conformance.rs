//! The conformance suite against a live etcd: `SYNC_TEST_ETCD=etcd://127.0.0.1:2379 cargo test
//! -p sync-etcd --test conformance [FILTER]`. Without the variable every case shows as ignored.

use sync_etcd::{Client, Config, MIN_TTL};

fn main() -> std::process::ExitCode {
    sync_conformance::run(
        "etcd",
        Some("SYNC_TEST_ETCD"),
        |url, namespace| async move {
            // The shortest lease etcd grants keeps the expiry and failover cases quick.
            let config = Config::from_url(&url)?
                .with_namespace(namespace)
                .with_ttl(MIN_TTL)
                .with_job_retention(sync_conformance::JOB_RETENTION)
                .with_request_timeout(std::time::Duration::from_secs(3));
            Client::connect(config).await
        },
    )
}
