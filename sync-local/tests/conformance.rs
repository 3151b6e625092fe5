//! The conformance suite against the in-process backend. Always runs (no endpoint needed):
//! `cargo test -p sync-local --test conformance [FILTER]`.

use std::time::Duration;

use sync_local::{Client, Config};

fn main() -> std::process::ExitCode {
    sync_conformance::run("local", None, |_url, namespace| async move {
        // One cluster ("server") per case, so cases share no state; a short TTL keeps the
        // expiry, redelivery and failover cases quick.
        let config = Config::default()
            .with_cluster(&namespace)
            .with_namespace(namespace)
            .with_ttl(Duration::from_secs(1))
            .with_job_retention(sync_conformance::JOB_RETENTION);
        Client::connect(config)
    })
}
