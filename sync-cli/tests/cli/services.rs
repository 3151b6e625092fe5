//! The live services as the tests reach them besides syncctl: URLs of a namespace, their own
//! tools (etcdctl, redis-cli, consul, Consul's HTTP API), and breaking a hold from outside.

use std::time::Duration;

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::Command,
};

use crate::{harness::Live, procs::output};

/// How long one call of a service's tool may take.
const TOOL_LIMIT: Duration = Duration::from_secs(15);

/// A name no other run uses: `clitest-<what>-<uuid>`.
pub fn unique(what: &str) -> String {
    format!("clitest-{what}-{}", uuid::Uuid::new_v4().simple())
}

/// `base` (a service URL from the environment) with the path `/<ns>` — the empty namespace,
/// the backend's own key layout, when `ns` is empty — and `query` added to its own.
pub fn url(base: &str, ns: &str, query: &str) -> String {
    let (rest, own_query) = base.split_once('?').unwrap_or((base, ""));
    let query: Vec<&str> = [own_query, query]
        .into_iter()
        .filter(|q| !q.is_empty())
        .collect();
    let mut url = format!("{}/{ns}", origin(rest));
    if !query.is_empty() {
        url = format!("{url}?{}", query.join("&"));
    }
    url
}

/// `scheme://authority` of a URL without its query.
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find('/') {
        Some(slash) => &url[..start + slash],
        None => url,
    }
}

/// The first `host:port` of a service URL (`scheme://[user@]h:p[,h:p…][/path][?query]`).
pub fn first_host(base: &str) -> String {
    let origin = origin(base.split('?').next().unwrap_or(base));
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    let hosts = authority.rsplit('@').next().unwrap_or(authority);
    hosts.split(',').next().unwrap_or(hosts).to_string()
}

/// `etcdctl` (API v3) against the etcd of `base`, without the caller's ETCDCTL_* settings.
pub fn etcdctl(base: &str) -> Command {
    let mut command = Command::new("etcdctl");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETCDCTL_")) {
        command.env_remove(k);
    }
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", first_host(base)));
    command
}

/// `redis-cli` against the redis of `base`.
fn redis_cli(base: &str) -> Command {
    let host = first_host(base);
    let (h, p) = host.rsplit_once(':').unwrap_or((&host, "6379"));
    let mut command = Command::new("redis-cli");
    command.args(["-h", h, "-p", p]);
    command
}

/// `consul lock -http-addr=<agent of base> PREFIX SCRIPT`, without the caller's CONSUL_*
/// settings; consul runs SCRIPT with $SHELL.
pub fn consul_lock(base: &str, prefix: &str, script: &str) -> Result<Command, String> {
    let mut command = Command::new(consul_binary()?);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CONSUL_")) {
        command.env_remove(k);
    }
    command
        .arg("lock")
        .arg(format!("-http-addr={}", first_host(base)))
        .args([prefix, script])
        .env("SHELL", "/bin/sh");
    Ok(command)
}

use sync_conformance::tools::consul_binary;

/// `METHOD path` on the Consul agent of `base`, as plain HTTP/1.0: the status and the body.
async fn consul_http(base: &str, method: &str, path: &str) -> Result<(u16, String), String> {
    let agent = first_host(base);
    let call = async {
        let mut stream = tokio::net::TcpStream::connect(&agent).await?;
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: {agent}\r\nContent-Length: 0\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(TOOL_LIMIT, call)
        .await
        .map_err(|_| format!("{method} {path}: no answer within {TOOL_LIMIT:?}"))?
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: answered {answer:?}"))?;
    Ok((status, body.to_string()))
}

/// Makes every hold in namespace `ns` of `live` lost, as an operator (or an expiry) would:
/// what was done, for messages.
pub async fn break_holds(live: Live, base: &str, ns: &str) -> Result<String, String> {
    match live {
        Live::Etcd => revoke_etcd_leases(base, ns).await,
        Live::Redis => delete_redis_leased_keys(base, ns).await,
        Live::Consul => destroy_consul_sessions(base, ns).await,
        other => Err(format!("no way to break a hold on {}", other.name())),
    }
}

/// Revokes the lease of every key under `<ns>/` (its holders' sessions).
async fn revoke_etcd_leases(base: &str, ns: &str) -> Result<String, String> {
    let mut get = etcdctl(base);
    get.args(["get", "--prefix", &format!("{ns}/"), "-w", "json"]);
    let listed = output(get, TOOL_LIMIT).await?.ok()?;
    let json: Value = serde_json::from_str(&listed.stdout)
        .map_err(|e| format!("etcdctl get -w json: {e}: {}", listed.stdout))?;
    // Keys are base64 and leases decimal in this JSON; `lease revoke` takes hex.
    let mut leases: Vec<u64> = json["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| kv["lease"].as_u64())
        .filter(|&lease| lease != 0)
        .collect();
    leases.sort_unstable();
    leases.dedup();
    if leases.is_empty() {
        return Err(format!("no key under {ns}/ has a lease: {}", listed.stdout));
    }
    for lease in &leases {
        let mut revoke = etcdctl(base);
        revoke.args(["lease", "revoke", &format!("{lease:x}")]);
        output(revoke, TOOL_LIMIT).await?.ok()?;
    }
    Ok(format!("revoked etcd lease(s) {leases:x?}"))
}

/// Deletes the keys of `ns` that have a TTL (the held ones).
async fn delete_redis_leased_keys(base: &str, ns: &str) -> Result<String, String> {
    let mut scan = redis_cli(base);
    scan.args(["--scan", "--pattern", &format!("*{ns}*")]);
    let keys = output(scan, TOOL_LIMIT).await?.ok()?.stdout;
    let mut deleted = Vec::new();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let mut pttl = redis_cli(base);
        pttl.args(["pttl", key]);
        let ttl = output(pttl, TOOL_LIMIT).await?.ok()?.stdout;
        if ttl.trim().parse::<i64>().is_ok_and(|ms| ms > 0) {
            let mut del = redis_cli(base);
            del.args(["del", key]);
            output(del, TOOL_LIMIT).await?.ok()?;
            deleted.push(key.to_string());
        }
    }
    if deleted.is_empty() {
        return Err(format!("no key of {ns} has a TTL; its keys: {keys:?}"));
    }
    Ok(format!("deleted redis keys {deleted:?}"))
}

/// Destroys the session of every entry under `<ns>/` that one holds.
async fn destroy_consul_sessions(base: &str, ns: &str) -> Result<String, String> {
    let (status, body) = consul_http(base, "GET", &format!("/v1/kv/{ns}/?recurse")).await?;
    if status != 200 {
        return Err(format!("listing {ns}/: {status} {body}"));
    }
    let entries: Vec<Value> =
        serde_json::from_str(&body).map_err(|e| format!("listing {ns}/: {e}: {body}"))?;
    let mut sessions: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["Session"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    sessions.sort_unstable();
    sessions.dedup();
    if sessions.is_empty() {
        return Err(format!("no entry under {ns}/ is held by a session: {body}"));
    }
    for session in &sessions {
        let path = format!("/v1/session/destroy/{session}");
        let (status, body) = consul_http(base, "PUT", &path).await?;
        if status != 200 || body.trim() != "true" {
            return Err(format!("PUT {path}: {status} {body}"));
        }
    }
    Ok(format!("destroyed consul session(s) {sessions:?}"))
}
