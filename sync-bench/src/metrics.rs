//! etcd's own count of the requests it served: `grpc_server_started_total` (one per unary call
//! or stream opened, by method) and `grpc_server_msg_received_total` (messages on streams,
//! here the lease keep-alives) and `process_cpu_seconds_total` (the CPU time etcd spent) from
//! its Prometheus `/metrics` endpoint.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Methods that open a stream rather than make one request.
const STREAMS: [&str; 4] = ["Watch", "LeaseKeepAlive", "Observe", "Snapshot"];

/// A snapshot of etcd's gRPC counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// `grpc_server_started_total` by method name (all services).
    pub started: BTreeMap<String, u64>,
    /// `grpc_server_msg_received_total` by method name (all services).
    pub received: BTreeMap<String, u64>,
    /// `process_cpu_seconds_total`: etcd's CPU time so far.
    pub cpu_seconds: f64,
    /// This process's CPU time so far (not from etcd): see [`own_cpu_seconds`].
    pub client_cpu_seconds: f64,
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cost {
    /// Unary requests (every method but the streaming ones).
    pub requests: u64,
    /// Watch streams opened.
    pub watch_streams: u64,
    /// Lease keep-alive messages received on keep-alive streams.
    pub keepalives: u64,
    /// Calls started, by method.
    pub by_method: BTreeMap<String, u64>,
    /// CPU time etcd spent, in seconds: a cost that, unlike throughput, a busy machine barely
    /// moves.
    pub cpu_seconds: f64,
    /// CPU time this (client) process spent, in seconds.
    pub client_cpu_seconds: f64,
}

impl Cost {
    /// Adds what `other` counted (a later slice of the same measurement).
    pub fn add(&mut self, other: &Cost) {
        self.requests += other.requests;
        self.watch_streams += other.watch_streams;
        self.keepalives += other.keepalives;
        for (method, n) in &other.by_method {
            *self.by_method.entry(method.clone()).or_default() += n;
        }
        self.cpu_seconds += other.cpu_seconds;
        self.client_cpu_seconds += other.client_cpu_seconds;
    }
}

impl Counters {
    /// Parses the Prometheus text format, keeping the two counter families.
    pub fn parse(text: &str) -> Counters {
        let mut out = Counters::default();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("process_cpu_seconds_total ") {
                out.cpu_seconds = v.trim().parse().unwrap_or(0.0);
                continue;
            }
            let (map, rest) = if let Some(rest) = line.strip_prefix("grpc_server_started_total{") {
                (&mut out.started, rest)
            } else if let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") {
                (&mut out.received, rest)
            } else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let method = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("grpc_method=\""))
                .map(|v| v.trim_end_matches('"').to_string());
            let (Some(method), Ok(value)) = (method, value.trim().parse::<f64>()) else {
                continue;
            };
            *map.entry(method).or_default() += value as u64;
        }
        out
    }

    /// What was counted from `before` to `self`.
    pub fn since(&self, before: &Counters) -> Cost {
        let diff = |after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>| {
            after
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
                .filter(|(_, v)| *v > 0)
                .collect::<BTreeMap<_, _>>()
        };
        let by_method = diff(&self.started, &before.started);
        let received = diff(&self.received, &before.received);
        Cost {
            requests: by_method
                .iter()
                .filter(|(m, _)| !STREAMS.contains(&m.as_str()))
                .map(|(_, v)| v)
                .sum(),
            watch_streams: by_method.get("Watch").copied().unwrap_or(0),
            keepalives: received.get("LeaseKeepAlive").copied().unwrap_or(0),
            by_method,
            cpu_seconds: (self.cpu_seconds - before.cpu_seconds).max(0.0),
            client_cpu_seconds: (self.client_cpu_seconds - before.client_cpu_seconds).max(0.0),
        }
    }
}

/// CPU time this process's threads have run so far (each thread's `schedstat`), in seconds:
/// the client side of a cost, with nanosecond precision.
pub fn own_cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Reads `/metrics` from an etcd at `authority` (`host:port`) over plain HTTP/1.0.
pub async fn fetch(authority: &str) -> Result<Counters, String> {
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority} for /metrics: {e}"))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("{authority}/metrics: {e}"))?;
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .map_err(|e| format!("{authority}/metrics: {e}"))?;
    let mut counters = Counters::parse(&body);
    counters.client_cpu_seconds = own_cpu_seconds();
    if !counters.started.contains_key("Range") && !counters.started.contains_key("Txn") {
        return Err(format!(
            "{authority}/metrics has no grpc_server_started_total for Range or Txn"
        ));
    }
    Ok(counters)
}

/// The `host:port` of the first endpoint of an `etcd://` URL (`etcd://h:p,h2:p/ns?…`).
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hosts = rest.split(['/', '?']).next().unwrap_or(rest);
    let first = hosts.split(',').next().unwrap_or(hosts);
    if first.contains(':') {
        first.to_string()
    } else {
        format!("{first}:2379")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
# HELP grpc_server_started_total Total number of RPCs started on the server.
grpc_server_started_total{grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 10
grpc_server_started_total{grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"} 4
grpc_server_started_total{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"} 2
grpc_server_started_total{grpc_method="Lock",grpc_service="v3lockpb.Lock",grpc_type="unary"} 1
grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"} 7
process_cpu_seconds_total 1.5
"#;

    #[test]
    fn parses_and_subtracts() {
        let before = Counters::parse(SAMPLE);
        assert_eq!(before.started["Range"], 10);
        assert_eq!(before.started["Lock"], 1);
        let after = Counters::parse(
            &SAMPLE
                .replace("} 10", "} 12")
                .replace("} 2\n", "} 3\n")
                .replace("} 7", "} 9")
                .replace("} 1\n", "} 2\n")
                .replace(" 1.5", " 2.25"),
        );
        let cost = after.since(&before);
        assert_eq!(cost.requests, 3, "{cost:?}");
        assert_eq!(cost.watch_streams, 1);
        assert_eq!(cost.keepalives, 2);
        assert_eq!(cost.cpu_seconds, 0.75);
    }

    #[test]
    fn authority_of_urls() {
        assert_eq!(authority("etcd://127.0.0.1:52379"), "127.0.0.1:52379");
        assert_eq!(authority("etcd://u:p@h:1,h2:2/ns?ttl=5s"), "h:1");
        assert_eq!(authority("etcd://h/ns"), "h:2379");
    }
}
