//! etcd's own counts of what it was asked, from its Prometheus `/metrics`.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `/metrics` of `endpoint`.
pub async fn metrics(endpoint: &str) -> Result<String, String> {
    let authority = super::authority(endpoint);
    let mut stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// The value of the unlabelled metric `name` (a gauge such as the server's watcher count).
pub async fn gauge(endpoint: &str, name: &str) -> Result<u64, String> {
    let body = metrics(endpoint).await?;
    let value = body
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .ok_or_else(|| format!("no {name} at {endpoint}/metrics"))?;
    let value: f64 = value.trim().parse().map_err(|e| format!("{name}: {e}"))?;
    Ok(value as u64)
}

/// `grpc_server_started_total` per method for the KV, Lease (unary) and Watch services.
pub async fn counters(endpoint: &str) -> Result<BTreeMap<String, u64>, String> {
    per_method(endpoint, "grpc_server_started_total", None).await
}

/// The requests etcd at `endpoint` answered OK, per method (`grpc_server_handled_total`):
/// unlike a request started, one answered is applied.
#[allow(dead_code)] // Not every test binary counts answers.
pub async fn answered(endpoint: &str) -> Result<BTreeMap<String, u64>, String> {
    per_method(endpoint, "grpc_server_handled_total", Some("OK")).await
}

/// The requests etcd at `endpoint` refused for want of rights, per method.
#[allow(dead_code)] // Not every test binary counts refusals.
pub async fn refused(endpoint: &str) -> Result<BTreeMap<String, u64>, String> {
    per_method(
        endpoint,
        "grpc_server_handled_total",
        Some("PermissionDenied"),
    )
    .await
}

/// Counter `metric` per method for the KV, Lease and Watch services; with `code`, only the
/// requests answered with it.
async fn per_method(
    endpoint: &str,
    metric: &str,
    code: Option<&str>,
) -> Result<BTreeMap<String, u64>, String> {
    let body = metrics(endpoint).await?;
    let mut out = BTreeMap::new();
    let start = format!("{metric}{{");
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(&start) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let (Some(method), Some(service)) = (label("grpc_method"), label("grpc_service")) else {
            continue;
        };
        let services = [
            "etcdserverpb.KV",
            "etcdserverpb.Lease",
            "etcdserverpb.Watch",
        ];
        if !services.contains(&service.as_str())
            || code.is_some_and(|c| label("grpc_code").as_deref() != Some(c))
        {
            continue;
        }
        let value: f64 = value.trim().parse().map_err(|e| format!("{line}: {e}"))?;
        *out.entry(method).or_default() += value as u64;
    }
    // Every etcd has answered a Txn by now, but not necessarily with `code`.
    if code.is_none() && !out.contains_key("Txn") {
        return Err(format!(
            "no {metric}{{grpc_method=\"Txn\"}} at {endpoint}/metrics"
        ));
    }
    Ok(out)
}

pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// The requests etcd at `endpoint` handled, per method, over the next `window`.
#[allow(dead_code)] // Not every test binary counts over a window.
pub async fn over(
    endpoint: &str,
    window: std::time::Duration,
) -> Result<BTreeMap<String, u64>, String> {
    let before = counters(endpoint).await?;
    tokio::time::sleep(window).await;
    Ok(delta(&before, &counters(endpoint).await?))
}
