//! The conformance suite against the in-process backend. Always runs (no endpoint needed):
//! `cargo test -p sync-local --test conformance [FILTER]`.

use std::{
    collections::HashMap,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use sync_conformance::{Capability, Client, Harness};
use sync_core::{Leader, Lock, Map, Task, Time};
use sync_local::{Cluster, Config};

/// Short, so TTL-scaled cases (expiry, redelivery, failover) finish in seconds.
const TTL: Duration = Duration::from_secs(1);

/// One cluster ("server") per namespace, i.e. per case, so cases share no state.
#[derive(Default)]
struct LocalHarness {
    clusters: Mutex<HashMap<String, Cluster>>,
}

#[async_trait]
impl Harness for LocalHarness {
    async fn client(&self, namespace: &str) -> sync_core::Result<Box<dyn Client>> {
        let cluster = self
            .clusters
            .lock()
            .unwrap()
            .entry(namespace.to_string())
            .or_default()
            .clone();
        let client = cluster.client(Config::default().with_namespace(namespace).with_ttl(TTL))?;
        Ok(Box::new(LocalClient(client)))
    }

    fn capabilities(&self) -> Vec<Capability> {
        Capability::ALL.to_vec()
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}

struct LocalClient(sync_local::Client);

#[async_trait]
impl Client for LocalClient {
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
        Ok(self.0.time())
    }

    async fn kill(&self) -> sync_core::Result<()> {
        self.0.kill();
        Ok(())
    }

    async fn revoke(&self) -> sync_core::Result<()> {
        self.0.revoke();
        Ok(())
    }
}

fn main() -> ExitCode {
    sync_conformance::run("local", None, |_| Ok(Arc::new(LocalHarness::default())))
}
