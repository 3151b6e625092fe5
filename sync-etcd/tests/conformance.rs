//! The conformance suite against a live etcd: `SYNC_TEST_ETCD=http://127.0.0.1:2379 cargo test
//! -p sync-etcd --test conformance [FILTER]`. Without the variable every case shows as ignored.

use std::{process::ExitCode, sync::Arc, time::Duration};

use async_trait::async_trait;
use sync_conformance::{Capability, Client, Harness};
use sync_core::{Error, ErrorKind, Leader, Lock, Map, Task, Time};
use sync_etcd::Config;

/// The shortest lease etcd grants, so TTL-scaled cases (expiry, redelivery, failover) are quick.
const TTL: Duration = sync_etcd::MIN_TTL;

struct EtcdHarness {
    endpoints: Vec<String>,
}

#[async_trait]
impl Harness for EtcdHarness {
    async fn client(&self, namespace: &str) -> sync_core::Result<Box<dyn Client>> {
        let config = Config::default()
            .with_endpoints(self.endpoints.clone())
            .with_namespace(namespace)
            .with_ttl(TTL);
        Ok(Box::new(EtcdClient(
            sync_etcd::Client::connect(config).await?,
        )))
    }

    fn capabilities(&self) -> Vec<Capability> {
        // Time is not an etcd primitive.
        vec![
            Capability::Lock,
            Capability::Leader,
            Capability::Map,
            Capability::Task,
            Capability::Cron,
            Capability::KillClient,
            Capability::RevokeSession,
        ]
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}

struct EtcdClient(sync_etcd::Client);

fn unsupported(what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("{what} is not provided by this harness"),
    )
    .with_backend(sync_etcd::BACKEND)
}

#[async_trait]
impl Client for EtcdClient {
    fn lock(&self) -> sync_core::Result<Arc<dyn Lock>> {
        Ok(self.0.lock())
    }

    fn leader(&self, group: &str) -> sync_core::Result<Arc<dyn Leader>> {
        self.0.leader(group)
    }

    fn task(&self) -> sync_core::Result<Arc<dyn Task>> {
        Ok(self.0.task())
    }

    fn map(&self, name: &str) -> sync_core::Result<Arc<dyn Map>> {
        self.0.map(name)
    }

    fn time(&self) -> sync_core::Result<Arc<dyn Time>> {
        Err(unsupported("time"))
    }

    async fn kill(&self) -> sync_core::Result<()> {
        self.0.kill().await;
        Ok(())
    }

    async fn revoke(&self) -> sync_core::Result<()> {
        self.0.revoke().await
    }
}

fn main() -> ExitCode {
    sync_conformance::run("etcd", Some("SYNC_TEST_ETCD"), |endpoint| {
        let endpoint = endpoint.unwrap_or_default();
        let endpoints = endpoint
            .split(',')
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        Ok(Arc::new(EtcdHarness { endpoints }))
    })
}
