//! Shared by the live test binaries: private redis-servers and a libtest-style runner gated on
//! `SYNC_TEST_REDIS`.

#![allow(dead_code)]

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    process::{Child, Command, ExitCode, Stdio},
    time::Duration,
};

use libtest_mimic::{Arguments, Trial};

pub type TestResult = Result<(), String>;
pub type TestFn = fn(String) -> Pin<Box<dyn Future<Output = TestResult> + Send>>;

pub fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub fn unique(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// A loopback port no one listens on now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(err)
}

/// Starts `redis-server` on loopback without persistence, its files in `dir`, with `args`
/// (the ports, TLS…). Does not wait for it.
pub fn redis_server(args: &[&str], dir: &Path) -> Result<Child, String> {
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting redis-server (is it on PATH?): {e}"))
}

/// Runs `tests` with the `SYNC_TEST_REDIS` URL; without it they show as ignored (failed with
/// `SYNC_REQUIRE_LIVE=1`).
pub fn run(tests: &[(&'static str, TestFn)]) -> ExitCode {
    let url = std::env::var("SYNC_TEST_REDIS")
        .ok()
        .filter(|u| !u.is_empty());
    let require = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
    let trials = tests
        .iter()
        .map(|&(name, f)| match url.clone() {
            None => {
                let why = "SYNC_TEST_REDIS is not set: this test needs a live redis".to_string();
                Trial::test(name, move || Err(why.into())).with_ignored_flag(!require)
            }
            Some(url) => Trial::test(name, move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(err)?;
                let out = rt.block_on(async move {
                    tokio::time::timeout(Duration::from_secs(90), f(url))
                        .await
                        .map_err(|_| "timed out after 90s".to_string())?
                });
                rt.shutdown_timeout(Duration::from_secs(1));
                out.map_err(Into::into)
            }),
        })
        .collect();
    libtest_mimic::run(&Arguments::from_args(), trials).exit_code()
}
