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
            Client::connect(through_the_proxy(config)?).await
        },
    )
}

/// Through the suite's fault proxy, the URL's hosts are the proxy's, one per node in the
/// nodes' order; the nodes still announce their own addresses, which must lead through the
/// proxy as well.
fn through_the_proxy(mut config: Config) -> sync_core::Result<Config> {
    let Ok(url) = std::env::var("SYNC_TEST_REDIS_CLUSTER") else {
        return Ok(config);
    };
    let nodes = Config::from_url(&url)?.endpoints;
    if nodes == config.endpoints {
        return Ok(config);
    }
    for (node, proxy) in nodes.iter().zip(config.endpoints.clone()) {
        config = config.with_address(node.clone(), proxy);
    }
    Ok(config)
}
