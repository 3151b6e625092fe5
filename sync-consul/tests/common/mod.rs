//! Shared by the live test binaries: a libtest-style runner gated on `SYNC_TEST_CONSUL` (and
//! `SYNC_TEST_CONSUL_ACL`), the test's own calls to the agent, and the `consul` binary.

#![allow(dead_code)]

pub mod counting;
pub mod logs;

use std::{future::Future, pin::Pin, process::ExitCode, time::Duration};

use libtest_mimic::{Arguments, Trial};
use serde_json::Value;
use tokio::time::Instant;

pub type TestResult = Result<(), String>;
pub type TestFn = fn(String) -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A name no other run uses: `sync-live-<what>-<uuid>`.
pub fn unique(what: &str) -> String {
    format!("sync-live-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Which live agent a test needs: the variable that holds its URL.
#[derive(Clone, Copy)]
pub enum Needs {
    /// `SYNC_TEST_CONSUL`: a plain agent.
    Consul,
    /// `SYNC_TEST_CONSUL_ACL`: an agent with ACLs on, its URL carrying the master token.
    Acl,
}

impl Needs {
    fn var(self) -> &'static str {
        match self {
            Needs::Consul => "SYNC_TEST_CONSUL",
            Needs::Acl => "SYNC_TEST_CONSUL_ACL",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Needs::Consul => "a live consul agent",
            Needs::Acl => {
                "a live consul agent with ACLs on, its URL carrying ?token=<master token>"
            }
        }
    }

    fn url(self) -> Option<String> {
        std::env::var(self.var())
            .ok()
            .filter(|u| !u.trim().is_empty())
    }
}

/// Runs `tests` with the URL each needs; without it they show as ignored (failed with
/// `SYNC_REQUIRE_LIVE=1`).
pub fn run(tests: &[(&'static str, Needs, TestFn)]) -> ExitCode {
    let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    let trials = tests
        .iter()
        .map(|&(name, needs, f)| match needs.url() {
            None => {
                let why = format!(
                    "{} is not set: this test needs {}",
                    needs.var(),
                    needs.what()
                );
                Trial::test(name, move || Err(why.into())).with_ignored_flag(!require)
            }
            Some(url) => Trial::test(name, move || block_on(f(url)).map_err(Into::into)),
        })
        .collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}

fn block_on(test: impl Future<Output = TestResult>) -> TestResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(err)?;
    let out = rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(90), test)
            .await
            .map_err(|_| "timed out after 90s".to_string())?
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// The config of a client of the agent at `url` in namespace `ns`: the shortest TTL.
pub fn config(url: &str, ns: &str) -> Result<sync_consul::Config, String> {
    Ok(sync_consul::Config::from_url(url)
        .map_err(err)?
        .with_namespace(ns)
        .with_ttl(sync_consul::MIN_TTL)
        .with_request_timeout(Duration::from_secs(3)))
}

/// A client of the agent at `url` in namespace `ns` ([`config`], `tweak`ed).
pub async fn connect(
    url: &str,
    ns: &str,
    tweak: impl FnOnce(sync_consul::Config) -> sync_consul::Config,
) -> Result<sync_consul::Client, String> {
    sync_consul::Client::connect(tweak(config(url, ns)?))
        .await
        .map_err(err)
}

/// The test's own calls to the agent (plain HTTP, the URL's token), beside the library's.
pub struct Agent {
    http: reqwest::Client,
    /// `host:port` of its HTTP API.
    pub address: String,
    token: Option<String>,
}

impl Agent {
    pub fn from_url(url: &str) -> Result<Agent, String> {
        let config = sync_consul::Config::from_url(url).map_err(err)?;
        Ok(Agent {
            http: reqwest::Client::new(),
            address: config.address,
            token: config.token,
        })
    }

    /// `method /v1/<path>` with an optional JSON body: the status and the body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, String), String> {
        let mut req = self
            .http
            .request(method.clone(), format!("http://{}/v1/{path}", self.address))
            .timeout(Duration::from_secs(10));
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(body) = body {
            req = req.body(body.to_string());
        }
        let res = req
            .send()
            .await
            .map_err(|e| format!("{method} /v1/{path}: {e}"))?;
        let status = res.status().as_u16();
        let text = res.text().await.map_err(err)?;
        Ok((status, text))
    }

    /// `method /v1/<path>`, which must answer 200: its body as JSON.
    pub async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let (status, text) = self.call(method.clone(), path, body).await?;
        if status != 200 {
            return Err(format!("{method} /v1/{path}: {status} {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{method} /v1/{path}: {e}: {text}"))
    }

    /// The entry of `key` (keys here need no escaping), or None.
    pub async fn kv(&self, key: &str) -> Result<Option<Value>, String> {
        let (status, text) = self
            .call(reqwest::Method::GET, &format!("kv/{key}"), None)
            .await?;
        match status {
            404 => Ok(None),
            200 => {
                let entries: Vec<Value> = serde_json::from_str(&text).map_err(err)?;
                Ok(entries.into_iter().next())
            }
            _ => Err(format!("reading {key}: {status} {text}")),
        }
    }

    /// Waits (up to `limit`) until a session holds `key`: its entry.
    pub async fn wait_held(&self, key: &str, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(entry) = self.kv(key).await? {
                if entry["Session"].as_str().is_some_and(|s| !s.is_empty()) {
                    return Ok(entry);
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no session held {key} within {limit:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `consul` binary, found as `cargo xtask` finds it.
pub use sync_conformance::tools::consul_binary;
