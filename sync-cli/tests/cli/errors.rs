//! syncctl's own failures: a bad, unknown or unreachable backend, no backend, a bad TTL (125),
//! and a command that cannot run (126, 127), each said in one line on stderr.

use std::time::Duration;

use crate::{
    harness::{Case, Live, TestResult},
    procs::{Scratch, output, syncctl},
    services::{self, unique},
};

/// Failing must not hang: not even on an unreachable backend.
const LIMIT: Duration = Duration::from_secs(30);

pub fn cases(out: &mut Vec<Case>) {
    let backends = [
        ("unparsable_url", "etcd://[::1"),
        ("unknown_scheme", "zk://h"),
        ("not_a_url", "not a url"),
        ("unreachable_etcd", "etcd://127.0.0.1:1/x"),
        ("unreachable_redis", "redis://127.0.0.1:1"),
        ("unreachable_consul", "consul://127.0.0.1:1"),
    ];
    for (what, url) in backends {
        out.push(Case::offline(
            format!("errors::{what}_exits_125"),
            move || bad_backend_exits_125(url),
        ));
    }
    out.push(Case::offline(
        "errors::lock_without_backend_refuses_local".into(),
        lock_without_backend_refuses_local,
    ));
    out.push(Case::offline(
        "errors::bad_ttl_is_named".into(),
        bad_ttl_is_named,
    ));
    out.push(Case::live(
        "errors::command_not_found_127_not_executable_126::etcd".into(),
        Live::Etcd,
        command_cannot_run,
    ));
}

/// `syncctl ARGS` exits `code` within [`LIMIT`] with one error line (even with
/// RUST_BACKTRACE=1): the line.
async fn fails(backend: Option<&str>, args: &[&str], code: i32) -> Result<String, String> {
    let mut command = syncctl(backend, args);
    command.env("RUST_BACKTRACE", "1");
    output(command, LIMIT).await?.fails(code)
}

/// `lock X -- true` and `map get m k` on `url` exit 125.
async fn bad_backend_exits_125(url: &str) -> TestResult {
    fails(Some(url), &["lock", "X", "--", "true"], 125).await?;
    fails(Some(url), &["map", "get", "m", "k"], 125).await?;
    Ok(())
}

/// Without --backend, SYNC_BACKEND or --config the backend is local://, where a lock would
/// exclude nobody: refused, saying so.
async fn lock_without_backend_refuses_local() -> TestResult {
    let line = fails(None, &["lock", "X", "--", "true"], 125).await?;
    if !line.contains("local") {
        return Err(format!("the message does not mention local://: {line:?}"));
    }
    Ok(())
}

/// An etcd TTL under its 2 s minimum is refused (before any connection), naming the TTL.
async fn bad_ttl_is_named() -> TestResult {
    let args = ["lock", "X", "--ttl", "1ms", "--", "true"];
    let line = fails(Some("etcd://127.0.0.1:1/x"), &args, 125).await?;
    if !line.to_lowercase().contains("ttl") {
        return Err(format!("the message does not name the ttl: {line:?}"));
    }
    Ok(())
}

/// Holding the lock, a CMD that does not exist is 127 and one that is not executable 126.
async fn command_cannot_run(base: String) -> TestResult {
    let scratch = Scratch::new()?;
    let url = services::url(&base, &unique("cmd"), "");
    let missing = scratch.path("no-such-command");
    let missing = missing.to_string_lossy();
    fails(Some(&url), &["lock", "X", "--", &missing, "arg"], 127).await?;
    let plain = scratch.path("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").map_err(|e| format!("writing {plain:?}: {e}"))?;
    let plain = plain.to_string_lossy();
    fails(Some(&url), &["lock", "X", "--", &plain], 126).await?;
    Ok(())
}
