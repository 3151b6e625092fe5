//! The conformance suite's time cases live against an NTP server (chronyd from
//! `cargo xtask services up ntp`): `SYNC_TEST_NTP=127.0.0.1:11123 cargo test -p sync-ntp --test
//! conformance`. Without the variable every case shows as ignored (or fails under
//! `SYNC_REQUIRE_LIVE=1`); only Time is supported, everything else is reported unsupported.

use std::{process::ExitCode, sync::Arc, time::Duration};

use async_trait::async_trait;
use sync_conformance::{Capability, Client, Harness};
use sync_core::{Error, ErrorKind, Leader, Lock, Map, Task, Time};

/// Not a lease: NTP has none. Only scales the suite's time bounds.
const TTL: Duration = Duration::from_secs(1);

struct NtpHarness {
    config: sync_ntp::Config,
}

#[async_trait]
impl Harness for NtpHarness {
    async fn client(&self, _namespace: &str) -> sync_core::Result<Box<dyn Client>> {
        let client = sync_ntp::Client::connect(self.config.clone()).await?;
        Ok(Box::new(NtpClient(client)))
    }

    fn capabilities(&self) -> Vec<Capability> {
        vec![Capability::Time]
    }

    fn ttl(&self) -> Duration {
        TTL
    }
}

struct NtpClient(sync_ntp::Client);

fn unsupported(what: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the ntp backend has no {what}"),
    )
    .with_backend(sync_ntp::BACKEND)
}

#[async_trait]
impl Client for NtpClient {
    fn lock(&self) -> sync_core::Result<Arc<dyn Lock>> {
        Err(unsupported("lock"))
    }

    fn leader(&self, _group: &str) -> sync_core::Result<Arc<dyn Leader>> {
        Err(unsupported("leader election"))
    }

    fn task(&self) -> sync_core::Result<Arc<dyn Task>> {
        Err(unsupported("task queue"))
    }

    fn map(&self, _name: &str) -> sync_core::Result<Arc<dyn Map>> {
        Err(unsupported("map"))
    }

    fn time(&self) -> sync_core::Result<Arc<dyn Time>> {
        Ok(self.0.time())
    }

    async fn kill(&self) -> sync_core::Result<()> {
        Err(unsupported("session to kill"))
    }

    async fn revoke(&self) -> sync_core::Result<()> {
        Err(unsupported("session to revoke"))
    }
}

fn main() -> ExitCode {
    sync_conformance::run("ntp", Some("SYNC_TEST_NTP"), |endpoint| {
        let endpoint = endpoint.unwrap_or_default();
        let url = if endpoint.starts_with("ntp://") {
            endpoint
        } else {
            format!("ntp://{endpoint}")
        };
        let config = sync_ntp::Config::from_url(&url)?;
        Ok(Arc::new(NtpHarness { config }))
    })
}
