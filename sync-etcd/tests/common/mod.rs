//! Shared by the live test binaries: the endpoint gate and a libtest-style runner.

#![allow(dead_code)]

pub mod metrics;
pub mod private;
pub mod tls;

use std::{future::Future, pin::Pin, process::ExitCode};

use libtest_mimic::{Arguments, Trial};
use sync_conformance::proxy::FaultProxy;

pub type TestResult = Result<(), String>;
pub type TestFn = fn(String) -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

/// The first endpoint (`http://host:port`) of the `SYNC_TEST_ETCD` URL
/// (`etcd://host:port[,host:port…]`).
pub fn endpoint() -> Option<String> {
    let url = std::env::var("SYNC_TEST_ETCD").ok()?;
    let config = sync_etcd::Config::from_url(url.trim()).ok()?;
    config.endpoints.into_iter().next()
}

/// `host:port` of an `http://host:port` endpoint.
pub fn authority(endpoint: &str) -> String {
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// A fault proxy in front of `endpoint`, and the endpoint (`http://127.0.0.1:<port>`) that
/// reaches etcd through it.
pub async fn proxy(endpoint: &str) -> Result<(FaultProxy, String), String> {
    let upstream = tokio::net::lookup_host(authority(endpoint))
        .await
        .map_err(|e| format!("resolving {endpoint}: {e}"))?
        .next()
        .ok_or_else(|| format!("no address for {endpoint}"))?;
    let proxy = FaultProxy::start(upstream)
        .await
        .map_err(|e| format!("starting the fault proxy: {e}"))?;
    let proxied = format!("http://{}", proxy.addr());
    Ok((proxy, proxied))
}

/// A name no other run uses: `sync-<suite>-<what>-<uuid>`.
pub fn unique(suite: &str, what: &str) -> String {
    format!("sync-{suite}-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A config for `endpoint` and `namespace` with the shortest lease etcd grants.
pub fn config(endpoint: &str, namespace: &str) -> sync_etcd::Config {
    sync_etcd::Config::default()
        .with_endpoints([endpoint])
        .with_namespace(namespace)
        .with_ttl(sync_etcd::MIN_TTL)
}

/// A client of `endpoint` in `namespace` (see [`config`]).
pub async fn connect(endpoint: &str, namespace: &str) -> Result<sync_etcd::Client, String> {
    sync_etcd::Client::connect(config(endpoint, namespace))
        .await
        .map_err(|e| e.to_string())
}

/// `etcdctl` (API v3) against `endpoint`, without the user's ETCDCTL_* settings (they are for
/// their own etcd, not this one).
pub fn etcdctl(endpoint: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("etcdctl");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETCDCTL_")) {
        command.env_remove(k);
    }
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"));
    command
}

/// Runs `tests` against the live endpoint; without it they show as ignored (failed with
/// `SYNC_REQUIRE_LIVE=1`).
pub fn run(tests: &[(&'static str, TestFn)], args: Arguments) -> ExitCode {
    let endpoint = endpoint();
    let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    let trials = tests
        .iter()
        .map(|&(name, f)| match endpoint.clone() {
            None => {
                let why =
                    "SYNC_TEST_ETCD is not set to an etcd:// URL: this test needs a live etcd"
                        .to_string();
                Trial::test(name, move || Err(why.into())).with_ignored_flag(!require)
            }
            Some(ep) => Trial::test(name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let out = rt.block_on(async move {
                    tokio::time::timeout(std::time::Duration::from_secs(60), f(ep))
                        .await
                        .map_err(|_| "timed out after 60s".to_string())?
                });
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
                out.map_err(Into::into)
            }),
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
