//! Consul: sync-consul against plain HTTP doing the minimal requests on one live session
//! ("raw": `/v1/txn` lock + get, then `/v1/txn` check-session + delete, which is what a grant
//! with a fencing token and a session-checked release need) and Consul's own `api.Lock` recipe
//! done by hand ("peer": a session per lock, a read, `PUT ?acquire=`, a monitoring read;
//! `PUT ?release=`, the session destroyed in the background). Map's raw is `/v1/txn` set and
//! cas and `GET ?recurse`; Task's a queue of plain keys claimed and finished by `/v1/txn`.
//!
//! Requests per op are counted by a loopback proxy in front of the agent, one per
//! implementation, so that other users of a shared agent do not blur the count; every
//! implementation talks through its own proxy, so the extra hop is in all their latencies.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine;
use futures::{StreamExt, TryFutureExt, TryStreamExt, stream};
use serde::Deserialize;
use serde_json::{Value, json};
use sync_bench::report::{Better, Report, Row, Sample};
use sync_core::{Backend, ElectOptions, ITERATE_IN_FLIGHT, Job, JobContext, WorkerOptions};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc, oneshot},
};

use crate::{
    Ctx, OrMsg, Result,
    etcd::{latency, push},
    redis::{AbortOnDrop, Contended, handoff_after, sync_cycle, timed},
    scenario, unique,
};

const B: &str = "consul";
/// Requests a round sets off in the background (the peer's session destroy and monitor
/// reads) land within this, so they are counted.
const SETTLE: Duration = Duration::from_millis(150);
/// Every implementation's session TTL: Consul's least.
const TTL: Duration = Duration::from_secs(10);
/// The `Flags` of a lock key, as Consul's `api.Lock` and `consul lock` write and check them.
const LOCK_FLAGS: u64 = 0x2ddc_cbc0_58a5_0c18;
/// `api.Lock`'s LockWaitTime: the wait of its blocking reads (the raw waiter's too).
const LOCK_WAIT: Duration = Duration::from_secs(15);
/// `api.Lock`'s DefaultLockRetryTime: its pause after an `?acquire=` was refused and the key
/// then read free (it takes that for a lock-delay).
const LOCK_RETRY: Duration = Duration::from_secs(5);
/// Consul's wait for a blocking read that names none (`api.Lock`'s monitor).
const SERVER_WAIT: Duration = Duration::from_secs(300);
/// How long a request may take, beyond a blocking read's wait.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Contenders on one id. Fewer than etcd's and Redis's 64: see the row's note.
const CLIENTS: usize = 32;
/// The contenders of etcd's and Redis's one-id scenarios.
const CONTENDERS: usize = 64;
/// Consul's `limits.http_max_conns_per_client` default (the dev agent's too).
const AGENT_CONNS_PER_CLIENT: usize = 200;
/// Writes in flight while a scenario fills a map or a queue (not timed).
const FILL_IN_FLIGHT: usize = 32;
/// The route the proxy records when it cannot follow a connection's requests.
const UNPARSED: &str = "unparsed";

pub(crate) async fn run(ctx: Ctx, url: &str, report: &mut Report) {
    let c = match Consul::new(ctx, url).await {
        Ok(c) => c,
        Err(e) => return crate::skip(report, B, "*", &e),
    };
    scenario(report, B, "uncontended acquire+release", c.uncontended()).await;
    scenario(report, B, "handoff", c.handoff()).await;
    let one_id = format!("{CLIENTS} clients on one id");
    scenario(report, B, &one_id, c.one_id()).await;
    scenario(report, B, "elect/resign", c.elect()).await;
    scenario(report, B, "Map", c.map()).await;
    scenario(report, B, "Task jobs/s", c.task_throughput()).await;
    scenario(report, B, "Task submit→start", c.task_latency()).await;
    for (name, why) in [
        (
            "one client holding N locks",
            "not written for Consul yet (one session holds them all; nothing per key to renew)",
        ),
        ("Cron requests per tick", "not written for Consul yet"),
    ] {
        if crate::selected(name) {
            crate::skip(report, B, name, why);
        }
    }
}

/// HTTP requests a proxy passed, by route (`PUT txn`, `GET kv?index`…).
#[derive(Debug, Clone, Default, PartialEq)]
struct Reqs(BTreeMap<String, u64>);

impl Reqs {
    fn add(&mut self, route: String) {
        *self.0.entry(route).or_default() += 1;
    }

    fn since(&self, before: &Reqs) -> Reqs {
        let delta = self
            .0
            .iter()
            .map(|(r, n)| {
                (
                    r.clone(),
                    n.saturating_sub(before.0.get(r).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        Reqs(delta)
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `req/op GET kv 0.010, PUT txn 2.000`.
    fn per_op(&self, ops: usize) -> String {
        let ops = ops.max(1) as f64;
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(route, n)| format!("{route} {:.3}", *n as f64 / ops))
            .collect();
        format!("req/op {}", parts.join(", "))
    }
}

fn with_reqs(mut s: Sample, reqs: &Reqs, ops: usize) -> Sample {
    s.requests_per_op = Some(reqs.total() as f64 / ops.max(1) as f64);
    s.detail = reqs.per_op(ops);
    s
}

/// `tasks` tasks looping `op(i)` until `window` is over: the ops each finished. Unlike the
/// Redis bench's `contend`, what is still in flight at the end is dropped (every
/// implementation here cleans up after a dropped op), so a peer asleep for its retry time does
/// not hold the round open.
async fn contend_until<F, Fut, T>(tasks: usize, window: Duration, op: F) -> Result<Contended>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + window;
    let counts = futures::future::try_join_all((0..tasks).map(|i| {
        let op = &op;
        async move {
            let mut n = 0;
            loop {
                tokio::select! {
                    r = op(i) => {
                        r?;
                        n += 1;
                    }
                    () = tokio::time::sleep_until(deadline) => return Ok::<_, String>(n),
                }
            }
        }
    }))
    .await?;
    Ok(Contended {
        counts,
        took: started.elapsed(),
    })
}

fn throughput(c: Contended, reqs: &Reqs, peak_conns: usize) -> Sample {
    let total: usize = c.counts.iter().sum();
    let mut s = with_reqs(
        Sample::value(total as f64 / c.took.as_secs_f64()),
        reqs,
        total,
    );
    let (min, max) = (
        c.counts.iter().min().unwrap_or(&0),
        c.counts.iter().max().unwrap_or(&0),
    );
    s.detail = format!(
        "{}; per-client ops min/max {min}/{max}; peak connections {peak_conns}",
        s.detail
    );
    s
}

/// `PUT /v1/kv/a/b?acquire=s&flags=1` → `PUT kv?acquire`: the method and the endpoint, with
/// what makes a request a different operation (a KV lock verb, a blocking `index`).
fn route(method: &str, target: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut parts = path.strip_prefix("/v1/").unwrap_or(path).split('/');
    let first = parts.next().unwrap_or_default();
    let endpoint = match first {
        "session" | "agent" | "catalog" | "health" => {
            format!("{first}/{}", parts.next().unwrap_or_default())
        }
        _ => first.to_string(),
    };
    let params: Vec<&str> = query
        .split('&')
        .filter_map(|kv| kv.split('=').next())
        .collect();
    let verb = ["acquire", "release", "index", "recurse"]
        .into_iter()
        .find(|p| params.contains(p));
    match verb {
        Some(v) => format!("{method} {endpoint}?{v}"),
        None => format!("{method} {endpoint}"),
    }
}

/// Follows the client's side of one HTTP/1.1 connection: request heads, and bodies skipped
/// by their Content-Length. A chunked body (which nothing here sends) ends the following.
#[derive(Debug, Default)]
struct Requests {
    head: Vec<u8>,
    body_left: usize,
    lost: bool,
}

impl Requests {
    /// Feeds what the client sent next; the routes of the requests whose heads ended in it.
    fn feed(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut routes = Vec::new();
        while !bytes.is_empty() && !self.lost {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let before = self.head.len();
            self.head.extend_from_slice(bytes);
            let from = before.saturating_sub(3);
            let Some(end) = self.head[from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| from + p + 4)
            else {
                break;
            };
            let head = std::mem::take(&mut self.head);
            match parse_head(&head[..end]) {
                Some((route, body)) => {
                    routes.push(route);
                    self.body_left = body;
                }
                None => {
                    routes.push(UNPARSED.to_string());
                    self.lost = true;
                }
            }
            bytes = &bytes[end - before..];
        }
        routes
    }
}

/// A request head's route and body length; None for what this does not follow.
fn parse_head(head: &[u8]) -> Option<(String, usize)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?, first.next()?);
    let mut body = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            body = value.parse().ok()?;
        } else if name == "transfer-encoding" && !value.eq_ignore_ascii_case("identity") {
            return None;
        }
    }
    Some((route(method, target), body))
}

/// A loopback TCP proxy in front of the agent that counts the HTTP requests through it, and
/// the connections open to the agent at once.
struct Proxy {
    addr: String,
    seen: Arc<Mutex<Reqs>>,
    conns: Arc<Conns>,
    _accept: AbortOnDrop,
}

/// Connections open through a proxy, now and at most since the last reset.
#[derive(Debug, Default)]
struct Conns {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Conns {
    fn opened(&self) {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }

    /// The peak since the last reset, and a new count from what is open now.
    fn take_peak(&self) -> usize {
        self.peak
            .swap(self.open.load(Ordering::SeqCst), Ordering::SeqCst)
    }
}

impl Proxy {
    async fn start(upstream: &str) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .or_msg("binding the counting proxy")?;
        let addr = listener
            .local_addr()
            .or_msg("the counting proxy's address")?
            .to_string();
        let seen = Arc::new(Mutex::new(Reqs::default()));
        let conns = Arc::new(Conns::default());
        let accept = tokio::spawn(accept(
            listener,
            upstream.to_string(),
            seen.clone(),
            conns.clone(),
        ));
        Ok(Proxy {
            addr,
            seen,
            conns,
            _accept: AbortOnDrop(accept),
        })
    }

    fn snapshot(&self) -> Reqs {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn accept(
    listener: TcpListener,
    upstream: String,
    seen: Arc<Mutex<Reqs>>,
    conns: Arc<Conns>,
) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let (upstream, seen, conns) = (upstream.clone(), seen.clone(), conns.clone());
                tokio::spawn(async move {
                    conns.opened();
                    forward(client, upstream, seen).await;
                    conns.closed();
                });
            }
            // Out of descriptors, say: the client's connect fails and says so.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One connection: the client's bytes counted and passed on, the agent's passed back; each
/// side's end passed on to the other.
async fn forward(client: TcpStream, upstream: String, seen: Arc<Mutex<Reqs>>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        let _ = count_and_copy(&mut from_client, &mut to_server, &seen).await;
        let _ = to_server.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}

async fn count_and_copy(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    seen: &Mutex<Reqs>,
) -> std::io::Result<()> {
    let mut requests = Requests::default();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        // Counted before it is passed on, so a request is in the count once it can be served.
        let begun = requests.feed(&buf[..n]);
        if !begun.is_empty() {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            begun.into_iter().for_each(|r| seen.add(r));
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// The agent, as `SYNC_TEST_CONSUL` names it.
struct Agent {
    address: String,
    token: Option<String>,
    datacenter: Option<String>,
}

/// A KV entry as the agent returns it (only what the recipes look at).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Pair {
    key: String,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    modify_index: u64,
}

/// How a KV read is made.
struct Read {
    /// Past this index (a blocking read) when not 0.
    index: u64,
    /// The blocking read's wait; Consul's default when None.
    wait: Option<Duration>,
    consistent: bool,
    /// Every key under the path.
    recurse: bool,
}

/// Plain HTTP to the agent, as the raw client and the peer send it: one reqwest client (its
/// own connection pool) per simulated client.
#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
    datacenter: Option<String>,
}

/// An answer: status, `X-Consul-Index` (0 if none), body.
struct Answer {
    status: u16,
    index: u64,
    body: Vec<u8>,
}

impl Http {
    fn new(agent: &Agent, address: &str) -> Result<Http> {
        // rustls without roots (plain HTTP needs none): the default TLS backend loads the
        // system's roots on every build, tens of ms each, and a scenario builds dozens.
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tcp_nodelay(true)
            .build()
            .or_msg("building an HTTP client")?;
        Ok(Http {
            client,
            base: format!("http://{address}/v1"),
            token: agent.token.clone(),
            datacenter: agent.datacenter.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, format!("{}/{path}", self.base))
            .timeout(REQUEST_TIMEOUT);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(dc) = &self.datacenter {
            req = req.query(&[("dc", dc)]);
        }
        req
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Answer> {
        let res = req.send().await.or_msg(what)?;
        let status = res.status().as_u16();
        let index = res
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let body = res.bytes().await.or_msg(what)?.to_vec();
        Ok(Answer {
            status,
            index,
            body,
        })
    }

    /// Sends and wants a 200.
    async fn ok(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Vec<u8>> {
        let a = self.send(what, req).await?;
        if a.status != 200 {
            let text = String::from_utf8_lossy(&a.body);
            return Err(format!("{what}: HTTP {}: {}", a.status, text.trim()));
        }
        Ok(a.body)
    }

    async fn session_create(&self, body: Value) -> Result<String> {
        let req = self
            .request(reqwest::Method::PUT, "session/create")
            .body(body.to_string());
        let body = self.ok("creating a session", req).await?;
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = serde_json::from_slice(&body).or_msg("creating a session")?;
        Ok(created.id)
    }

    async fn session_renew(&self, id: &str) -> Result<()> {
        let req = self.request(reqwest::Method::PUT, &format!("session/renew/{id}"));
        self.ok("renewing a session", req).await.map(drop)
    }

    async fn session_destroy(&self, id: &str) -> Result<()> {
        let req = self.request(reqwest::Method::PUT, &format!("session/destroy/{id}"));
        self.ok("destroying a session", req).await.map(drop)
    }

    /// A transaction: the results (200), or Consul's reasons for rolling it back (409).
    async fn txn(&self, ops: &Value) -> Result<std::result::Result<Vec<Value>, String>> {
        let req = self
            .request(reqwest::Method::PUT, "txn")
            .body(ops.to_string());
        let a = self.send("/v1/txn", req).await?;
        let answer: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        match a.status {
            200 => Ok(Ok(answer["Results"]
                .as_array()
                .cloned()
                .unwrap_or_default())),
            409 => Ok(Err(answer["Errors"].to_string())),
            s => Err(format!(
                "/v1/txn: HTTP {s}: {}",
                String::from_utf8_lossy(&a.body)
            )),
        }
    }

    /// Reads `key`; past `index` (a blocking read, for at most `wait` or Consul's default)
    /// when it is not 0. The entry, and the index to block on next.
    async fn get(
        &self,
        key: &str,
        index: u64,
        wait: Option<Duration>,
        consistent: bool,
    ) -> Result<(Option<Pair>, u64)> {
        let read = Read {
            index,
            wait,
            consistent,
            recurse: false,
        };
        let (mut pairs, at) = self.read(key, read).await?;
        Ok((pairs.pop(), at))
    }

    /// Every key under `prefix` (default consistency), past `index` when it is not 0: the
    /// entries and the index to block on next.
    async fn list(&self, prefix: &str, index: u64) -> Result<(Vec<Pair>, u64)> {
        let read = Read {
            index,
            wait: Some(LOCK_WAIT),
            consistent: false,
            recurse: true,
        };
        self.read(prefix, read).await
    }

    async fn read(&self, key: &str, read: Read) -> Result<(Vec<Pair>, u64)> {
        let Read {
            index,
            wait,
            consistent,
            recurse,
        } = read;
        let mut req = self.request(reqwest::Method::GET, &format!("kv/{key}"));
        if consistent {
            req = req.query(&[("consistent", "")]);
        }
        if recurse {
            req = req.query(&[("recurse", "")]);
        }
        if index > 0 {
            let longest = wait.unwrap_or(SERVER_WAIT);
            req = req
                .query(&[("index", index.to_string())])
                .timeout(longest + longest / 16 + REQUEST_TIMEOUT);
            if let Some(wait) = wait {
                req = req.query(&[("wait", format!("{}ms", wait.as_millis()))]);
            }
        }
        let a = self.send("reading the key", req).await?;
        let pairs = match a.status {
            200 => serde_json::from_slice(&a.body).or_msg("reading the key")?,
            404 => Vec::new(),
            s => return Err(format!("reading {key}: HTTP {s}")),
        };
        Ok((pairs, a.index.max(1)))
    }

    /// `/v1/txn` set (`index` None) or cas at `index` of `key`: its new ModifyIndex, which
    /// `PUT /v1/kv` would not return. Err on a conflict.
    async fn put(&self, key: &str, value: &[u8], index: Option<u64>) -> Result<u64> {
        let value = base64::engine::general_purpose::STANDARD.encode(value);
        let op = match index {
            None => json!({"KV": {"Verb": "set", "Key": key, "Value": value}}),
            Some(i) => json!({"KV": {"Verb": "cas", "Key": key, "Value": value, "Index": i}}),
        };
        match self.txn(&json!([op])).await? {
            Ok(results) => results
                .first()
                .and_then(|r| r["KV"]["ModifyIndex"].as_u64())
                .ok_or_else(|| format!("raw: writing {key} returned no index")),
            Err(why) => Err(format!("raw: writing {key}: {why}")),
        }
    }

    /// `PUT /v1/kv/<key>?acquire=<session>&flags=…` with the value: whether it was granted.
    async fn acquire(&self, key: &str, session: &str, value: &[u8]) -> Result<bool> {
        self.lock_verb("acquire", key, session, value).await
    }

    /// `PUT /v1/kv/<key>?release=<session>&flags=…`: whether the session held it.
    async fn release(&self, key: &str, session: &str, value: &[u8]) -> Result<bool> {
        self.lock_verb("release", key, session, value).await
    }

    async fn lock_verb(&self, verb: &str, key: &str, session: &str, value: &[u8]) -> Result<bool> {
        let flags = LOCK_FLAGS.to_string();
        let req = self
            .request(reqwest::Method::PUT, &format!("kv/{key}"))
            .query(&[(verb, session), ("flags", flags.as_str())])
            .body(value.to_vec());
        let body = self.ok(&format!("?{verb}="), req).await?;
        Ok(body.trim_ascii() == b"true")
    }

    /// Deletes every key under `prefix`.
    async fn delete_tree(&self, prefix: &str) -> Result<()> {
        let req = self
            .request(reqwest::Method::DELETE, &format!("kv/{prefix}"))
            .query(&[("recurse", "")]);
        self.ok("cleaning up", req).await.map(drop)
    }
}

/// What one raw grant transaction found.
enum Tried {
    Granted(u64),
    Held,
    /// A lock-delay is in force (never here: every session has none).
    Delayed,
}

/// The raw client: one live session (TTL, no lock-delay, behaviour release, no node checks,
/// renewed every half TTL) and the fewest requests a lock with a fencing token needs.
#[derive(Clone)]
struct RawSession {
    http: Http,
    id: String,
    _renewer: Arc<AbortOnDrop>,
}

impl RawSession {
    async fn create(http: Http) -> Result<RawSession> {
        let id = http
            .session_create(json!({
                "Name": "sync-bench raw",
                "TTL": format!("{}s", TTL.as_secs()),
                "LockDelay": "0s",
                "Behavior": "release",
                "NodeChecks": [],
            }))
            .await?;
        let (h, session) = (http.clone(), id.clone());
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(TTL / 2).await;
                if let Err(e) = h.session_renew(&session).await {
                    eprintln!("sync-bench consul: raw session: {e}");
                }
            }
        });
        Ok(RawSession {
            http,
            id,
            _renewer: Arc::new(AbortOnDrop(renewer)),
        })
    }

    async fn destroy(&self) {
        let _ = self.http.session_destroy(&self.id).await;
    }

    /// `/v1/txn`: lock `key` for the session and read it back for the grant's index.
    async fn try_lock(&self, key: &str, value: &[u8]) -> Result<Tried> {
        let value = base64::engine::general_purpose::STANDARD.encode(value);
        let ops = json!([
            {"KV": {"Verb": "lock", "Key": key, "Value": value, "Flags": LOCK_FLAGS, "Session": self.id}},
            {"KV": {"Verb": "get", "Key": key}},
        ]);
        match self.http.txn(&ops).await? {
            Ok(results) => results
                .get(1)
                .and_then(|r| r["KV"]["ModifyIndex"].as_u64())
                .map(Tried::Granted)
                .ok_or_else(|| "raw: the grant read nothing back".to_string()),
            Err(why) if why.contains("already held") => Ok(Tried::Held),
            Err(why) if why.contains("lock delay") => Ok(Tried::Delayed),
            Err(why) => Err(format!("raw: grant rolled back: {why}")),
        }
    }

    /// Tries until granted; while another holds the key, blocks on it until it is free.
    async fn lock(&self, key: &str, value: &[u8]) -> Result<u64> {
        loop {
            match self.try_lock(key, value).await? {
                Tried::Granted(token) => return Ok(token),
                Tried::Held => self.wait_free(key).await?,
                Tried::Delayed => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A read for the key's index, then blocking reads past it for as long as it is held: a
    /// wake-up that finds it held again blocks again without a grant try.
    async fn wait_free(&self, key: &str) -> Result<()> {
        let mut index = 0;
        loop {
            let (pair, at) = self.http.get(key, index, Some(LOCK_WAIT), false).await?;
            if pair.is_none_or(|p| p.session.is_none()) {
                return Ok(());
            }
            // An index that went back (a restored agent) starts over.
            index = if at < index { 0 } else { at };
        }
    }

    /// `/v1/txn`: check that the session holds `key`, and delete it.
    async fn unlock(&self, key: &str) -> Result<()> {
        let ops = json!([
            {"KV": {"Verb": "check-session", "Key": key, "Session": self.id}},
            {"KV": {"Verb": "delete", "Key": key}},
        ]);
        match self.http.txn(&ops).await? {
            Ok(_) => Ok(()),
            Err(why) => Err(format!("raw: {key} was not ours at release: {why}")),
        }
    }

    /// Acquires and releases at once; when it was granted.
    async fn cycle(&self, key: &str) -> Result<Instant> {
        self.lock(key, b"").await?;
        let granted = Instant::now();
        self.unlock(key).await?;
        Ok(granted)
    }

    /// Claims a listed job of the raw queue in one `/v1/txn`: the entry still at the index it
    /// was listed at (`check-index`: Consul's `delete-cas` succeeds on an absent key), deleted,
    /// and `<ns>/raw/r/<id>` locked for the session. False when another worker took it.
    async fn claim(&self, ns: &str, job: &Pair) -> Result<bool> {
        let ops = json!([
            {"KV": {"Verb": "check-index", "Key": job.key, "Index": job.modify_index}},
            {"KV": {"Verb": "delete", "Key": job.key}},
            {"KV": {"Verb": "lock", "Key": claim_key(ns, &job.key), "Value": "", "Session": self.id}},
        ]);
        Ok(self.http.txn(&ops).await?.is_ok())
    }

    /// Finishes a claimed job in one `/v1/txn`: the claim still the session's, deleted, and
    /// `<ns>/raw/d/<id>` written.
    async fn finish(&self, ns: &str, job: &Pair) -> Result<()> {
        let claim = claim_key(ns, &job.key);
        let id = job.key.rsplit('/').next().unwrap_or_default();
        let ops = json!([
            {"KV": {"Verb": "check-session", "Key": claim, "Session": self.id}},
            {"KV": {"Verb": "delete", "Key": claim}},
            {"KV": {"Verb": "set", "Key": format!("{ns}/raw/d/{id}"), "Value": ""}},
        ]);
        match self.http.txn(&ops).await? {
            Ok(_) => Ok(()),
            Err(why) => Err(format!("raw: finishing {}: {why}", job.key)),
        }
    }
}

/// The peer: Consul's Go `api.Lock` (as of 1.8) with its defaults, done by hand over HTTP.
/// `Lock()` creates a session (renewed every half TTL, destroyed when the lock is given up),
/// reads the key, blocks on it while another holds it, `PUT ?acquire=`; a refusal it checks
/// with a read: held → block, free → sleep [`LOCK_RETRY`]. Once held, a monitor reads the
/// key (consistent, blocking after the first) until the session no longer holds it.
/// `Unlock()` is `PUT ?release=` and closes the session's renewer, which destroys it.
#[derive(Clone)]
struct ApiLock {
    http: Http,
    key: String,
    value: Vec<u8>,
}

/// A held `api.Lock`: dropping it stops the renewer, which destroys the session.
struct ApiHeld {
    session: String,
    _stop: oneshot::Sender<()>,
}

impl ApiLock {
    async fn lock(&self) -> Result<ApiHeld> {
        // Its defaults (name, behaviour, node checks), with the bench's TTL and no lock-delay.
        let session = self
            .http
            .session_create(json!({
                "Name": "Consul API Lock",
                "TTL": format!("{}s", TTL.as_secs()),
                "LockDelay": "0s",
            }))
            .await?;
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(renew_periodic(self.http.clone(), session.clone(), stopped));
        let held = ApiHeld {
            session,
            _stop: stop,
        };
        self.wait_and_acquire(&held.session).await?;
        tokio::spawn(monitor(
            self.http.clone(),
            self.key.clone(),
            held.session.clone(),
        ));
        Ok(held)
    }

    async fn wait_and_acquire(&self, session: &str) -> Result<()> {
        let mut index = 0;
        loop {
            let (pair, at) = self
                .http
                .get(&self.key, index, Some(LOCK_WAIT), false)
                .await?;
            if let Some(p) = &pair {
                if p.flags != LOCK_FLAGS {
                    return Err(format!("peer: {} is not a lock key", self.key));
                }
                if p.session.as_deref() == Some(session) {
                    return Ok(());
                }
                if p.session.is_some() {
                    index = at;
                    continue;
                }
            }
            if self.http.acquire(&self.key, session, &self.value).await? {
                return Ok(());
            }
            let (pair, at) = self.http.get(&self.key, 0, Some(LOCK_WAIT), false).await?;
            if pair.is_some_and(|p| p.session.is_some()) {
                index = at;
                continue;
            }
            tokio::time::sleep(LOCK_RETRY).await;
            index = 0;
        }
    }

    async fn unlock(&self, held: ApiHeld) -> Result<()> {
        // api.Lock ignores the answer; the bench checks it, for the same one request.
        if !self
            .http
            .release(&self.key, &held.session, &self.value)
            .await?
        {
            return Err(format!("peer: {} was not ours at release", self.key));
        }
        Ok(())
    }

    /// Acquires and releases at once; when it was granted.
    async fn cycle(&self) -> Result<Instant> {
        let held = self.lock().await?;
        let granted = Instant::now();
        self.unlock(held).await?;
        Ok(granted)
    }
}

/// `Session.RenewPeriodic`: renews every half TTL; destroys the session when told to stop
/// (or when its sender is dropped).
async fn renew_periodic(http: Http, session: String, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(TTL / 2) => {
                if http.session_renew(&session).await.is_err() {
                    return;
                }
            }
            _ = &mut stop => {
                let _ = http.session_destroy(&session).await;
                return;
            }
        }
    }
}

/// `api.Lock`'s monitorLock: consistent reads of the key, blocking (Consul's default wait)
/// after the first, until the session no longer holds it.
async fn monitor(http: Http, key: String, session: String) {
    let mut index = 0;
    while let Ok((Some(p), at)) = http.get(&key, index, None, true).await {
        if p.session.as_deref() != Some(session.as_str()) {
            return;
        }
        index = at;
    }
}

/// `<ns>/raw/r/<id>` of the queue entry `key`.
fn claim_key(ns: &str, key: &str) -> String {
    format!("{ns}/raw/r/{}", key.rsplit('/').next().unwrap_or_default())
}

/// One raw queue worker, as the etcd bench's: lists the queue once, starts at its share of it
/// (so workers do not race for the head), and claims job by job with `concurrency` claims in
/// flight, each followed by its finish. Lists again when its list runs out or a claim finds
/// its job taken, until the queue is empty.
async fn raw_worker(
    session: RawSession,
    ns: &str,
    w: usize,
    workers: usize,
    concurrency: usize,
    done: Arc<AtomicUsize>,
) -> Result<()> {
    let queue = format!("{ns}/raw/q/");
    loop {
        let (mut listed, _) = session.http.list(&queue, 0).await?;
        if listed.is_empty() {
            return Ok(());
        }
        let share = listed.len() * w / workers;
        listed.rotate_left(share);
        let listed = Mutex::new(VecDeque::from(listed));
        let slots = (0..concurrency).map(|_| async {
            loop {
                let next = listed.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some(job) = next else {
                    return Ok::<_, String>(());
                };
                if !session.claim(ns, &job).await? {
                    // Taken by another worker: the rest of this listing likely is too.
                    listed.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    continue;
                }
                session.finish(ns, &job).await?;
                done.fetch_add(1, Ordering::SeqCst);
            }
        });
        futures::future::try_join_all(slots).await?;
    }
}

/// An idle raw worker: a blocking list of the queue wakes it; it claims each entry listed
/// (sending when it started one on `started`) and finishes it. Runs until aborted.
async fn raw_idle_worker(
    session: RawSession,
    ns: String,
    started: mpsc::UnboundedSender<Instant>,
) -> Result<()> {
    let queue = format!("{ns}/raw/q/");
    let mut index = 0;
    loop {
        let (listed, at) = session.http.list(&queue, index).await?;
        index = if at < index { 0 } else { at };
        for job in listed {
            if session.claim(&ns, &job).await? {
                let _ = started.send(Instant::now());
                session.finish(&ns, &job).await?;
            }
        }
    }
}

struct Consul {
    ctx: Ctx,
    url: String,
    agent: Agent,
    /// Straight to the agent, uncounted: clean-up.
    admin: Http,
    sync: Proxy,
    raw: Proxy,
    peer: Proxy,
}

impl Consul {
    async fn new(ctx: Ctx, url: &str) -> Result<Consul> {
        let config = sync_consul::Config::from_url(url).or_msg("SYNC_TEST_CONSUL")?;
        if config.tls {
            return Err("the bench takes a plain consul:// agent".into());
        }
        let agent = Agent {
            address: config.address.clone(),
            token: config.token.clone(),
            datacenter: config.datacenter.clone(),
        };
        let admin = Http::new(&agent, &agent.address)?;
        // Proves the agent answers before anything is timed.
        admin.get("sync-bench/probe", 0, None, false).await?;
        Ok(Consul {
            ctx,
            url: url.to_string(),
            sync: Proxy::start(&agent.address).await?,
            raw: Proxy::start(&agent.address).await?,
            peer: Proxy::start(&agent.address).await?,
            agent,
            admin,
        })
    }

    fn pick<T>(&self, quick: T, full: T) -> T {
        self.ctx.pick(quick, full)
    }

    /// A sync-consul client through the sync proxy: the bench's TTL, no lock-delay.
    async fn lib(&self, ns: &str) -> Result<sync_consul::Client> {
        let config = sync_consul::Config::from_url(&self.url)
            .or_msg("consul url")?
            .with_address(self.sync.addr.clone())
            .with_namespace(ns)
            .with_ttl(TTL)
            .with_lock_delay(Duration::ZERO);
        sync_consul::Client::connect(config)
            .await
            .or_msg("connecting sync-consul")
    }

    async fn raw_session(&self) -> Result<RawSession> {
        RawSession::create(Http::new(&self.agent, &self.raw.addr)?).await
    }

    fn api_lock(&self, key: String, value: &[u8]) -> Result<ApiLock> {
        Ok(ApiLock {
            http: Http::new(&self.agent, &self.peer.addr)?,
            key,
            value: value.to_vec(),
        })
    }

    /// Runs `f`, and counts the requests through `proxy` meanwhile (plus [`SETTLE`]).
    async fn counted<T>(
        &self,
        proxy: &Proxy,
        f: impl Future<Output = Result<T>>,
    ) -> Result<(T, Reqs)> {
        let before = proxy.snapshot();
        let out = f.await?;
        tokio::time::sleep(SETTLE).await;
        let reqs = proxy.snapshot().since(&before);
        if reqs.0.contains_key(UNPARSED) {
            return Err("the counting proxy lost track of a connection's requests".into());
        }
        Ok((out, reqs))
    }

    /// Runs `op` `n` times one after the other; what each call returned (its latency) and the
    /// requests counted.
    async fn clocked(
        &self,
        proxy: &Proxy,
        n: usize,
        mut op: impl AsyncFnMut() -> Result<Duration>,
    ) -> Result<(Vec<Duration>, Reqs)> {
        self.counted(proxy, async {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                lat.push(op().await?);
            }
            Ok(lat)
        })
        .await
    }

    async fn cleanup(&self, ns: &str) {
        if let Err(e) = self.admin.delete_tree(ns).await {
            eprintln!("sync-bench consul: {e}");
        }
    }

    async fn uncontended(&self) -> Result<Vec<Row>> {
        let n = self.pick(50, 500);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let lock = lib.lock().or_msg("lock handle")?;
        let raw = self.raw_session().await?;
        let key = format!("{ns}/raw/one/.lock");
        let peer = self.api_lock(format!("{ns}/peer/one/.lock"), b"")?;
        let mut row = Row::new(B, "uncontended acquire+release", "p50 µs", Better::Lower)
            .with_raw("txn lock+get, txn check-session+delete")
            .with_peer("api.Lock recipe")
            .with_note(format!(
                "{n} sequential ops per round, one id; every session TTL {} s, no lock-delay; \
                 raw on one live session; peer: session create, GET, PUT ?acquire=, then PUT \
                 ?release=, with its monitor's reads and the session destroy in the background",
                TTL.as_secs()
            ));
        // Warm-up: connections open before anything is counted.
        sync_cycle(&lock, "one").await?;
        raw.cycle(&key).await?;
        peer.cycle().await?;
        for _ in 0..self.ctx.rounds {
            let (lat, reqs) = self
                .clocked(&self.sync, n, async || {
                    timed(sync_cycle(&lock, "one")).await
                })
                .await?;
            row.sync.rounds.push(with_reqs(latency(&lat), &reqs, n));
            let (lat, reqs) = self
                .clocked(&self.raw, n, async || timed(raw.cycle(&key)).await)
                .await?;
            push(&mut row.raw, with_reqs(latency(&lat), &reqs, n));
            let (lat, reqs) = self
                .clocked(&self.peer, n, async || timed(peer.cycle()).await)
                .await?;
            push(&mut row.peer, with_reqs(latency(&lat), &reqs, n));
        }
        lib.close().await.or_msg("close")?;
        raw.destroy().await;
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn handoff(&self) -> Result<Vec<Row>> {
        let n = self.pick(8, 40);
        let wait = Duration::from_millis(30);
        let ns = unique("bench");
        let (a, b) = (self.lib(&ns).await?, self.lib(&ns).await?);
        let (la, lb) = (
            a.lock().or_msg("lock handle")?,
            b.lock().or_msg("lock handle")?,
        );
        let (ra, rb) = (self.raw_session().await?, self.raw_session().await?);
        let key = format!("{ns}/raw/handoff/.lock");
        let peer_key = format!("{ns}/peer/handoff/.lock");
        let (pa, pb) = (
            self.api_lock(peer_key.clone(), b"")?,
            self.api_lock(peer_key, b"")?,
        );
        let mut row = Row::new(
            B,
            "handoff (release → waiter granted)",
            "p50 µs",
            Better::Lower,
        )
        .with_raw("txn delete → the waiter's blocking GET → its txn lock+get")
        .with_peer("api.Lock: PUT ?release= → the waiter's blocking GET → PUT ?acquire=")
        .with_note(format!(
            "{n} handoffs per round between two clients (sessions); the waiter waits {} ms \
             first; req/op counts the whole cycle of both; raw reads in the default \
             consistency mode, sync-consul with ?consistent",
            wait.as_millis()
        ));
        // Warm-up: every client's connections open before anything is timed.
        for (lock, raw, peer) in [(&la, &ra, &pa), (&lb, &rb, &pb)] {
            sync_cycle(lock, "handoff").await?;
            raw.cycle(&key).await?;
            peer.cycle().await?;
        }
        for _ in 0..self.ctx.rounds {
            let (lat, reqs) = self
                .clocked(&self.sync, n, async || {
                    let g = la
                        .acquire("handoff", sync_core::LockOptions::new())
                        .await
                        .or_msg("acquire")?;
                    let lb = lb.clone();
                    let waiter = tokio::spawn(async move { sync_cycle(&lb, "handoff").await });
                    handoff_after(wait, g.release(), waiter).await
                })
                .await?;
            row.sync.rounds.push(with_reqs(latency(&lat), &reqs, n));

            let (lat, reqs) = self
                .clocked(&self.raw, n, async || {
                    if !matches!(ra.try_lock(&key, b"").await?, Tried::Granted(_)) {
                        return Err("raw: the handoff key was taken".into());
                    }
                    let (rb, key2) = (rb.clone(), key.clone());
                    let waiter = tokio::spawn(async move { rb.cycle(&key2).await });
                    handoff_after(wait, ra.unlock(&key), waiter).await
                })
                .await?;
            push(&mut row.raw, with_reqs(latency(&lat), &reqs, n));

            let (lat, reqs) = self
                .clocked(&self.peer, n, async || {
                    let held = pa.lock().await?;
                    let pb = pb.clone();
                    let waiter = tokio::spawn(async move { pb.cycle().await });
                    handoff_after(wait, pa.unlock(held), waiter).await
                })
                .await?;
            push(&mut row.peer, with_reqs(latency(&lat), &reqs, n));
        }
        a.close().await.or_msg("close")?;
        b.close().await.or_msg("close")?;
        ra.destroy().await;
        rb.destroy().await;
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn one_id(&self) -> Result<Vec<Row>> {
        let window = self.pick(Duration::from_millis(500), Duration::from_secs(5));
        let ns = unique("bench");
        let key = format!("{ns}/raw/one/.lock");
        let peer_key = format!("{ns}/peer/one/.lock");
        let mut row = Row::new(
            B,
            format!("{CLIENTS} clients on one id"),
            "ops/s",
            Better::Higher,
        )
        .with_raw("txn lock+get, waits by blocking GET; txn check-session+delete")
        .with_peer("api.Lock recipe, a session per lock")
        .with_note(format!(
            "{CLIENTS} clients, each its own HTTP connections and session(s), made afresh for \
             each implementation's part of a round (not {CONTENDERS}: the agent takes {} \
             connections per client address, shared with everyone on it, and a sync-consul \
             client holds two while it waits: the session watch and the key's blocking read); \
             {:.1} s per round, ops still in flight at its end dropped and not counted (the \
             peer's 5 s sleeps would hold a round open long past it); raw waits for the \
             key to be free before it tries again; the peer sleeps {} s after a refused \
             ?acquire= on a key it then reads free (api.Lock's DefaultLockRetryTime)",
            AGENT_CONNS_PER_CLIENT,
            window.as_secs_f64(),
            LOCK_RETRY.as_secs()
        ));
        for _ in 0..self.ctx.rounds {
            row.sync.rounds.push(self.one_id_sync(&ns, window).await?);
            push(&mut row.raw, self.one_id_raw(&key, window).await?);
            push(&mut row.peer, self.one_id_peer(&peer_key, window).await?);
        }
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn one_id_sync(&self, ns: &str, window: Duration) -> Result<Sample> {
        let libs = futures::future::try_join_all((0..CLIENTS).map(|_| self.lib(ns))).await?;
        let locks = libs
            .iter()
            .map(|c| c.lock())
            .collect::<sync_core::Result<Vec<_>>>()
            .or_msg("lock handle")?;
        let sample = self
            .contended(&self.sync, window, |i| {
                let lock = locks[i].clone();
                async move { sync_cycle(&lock, "one").await }
            })
            .await;
        futures::future::join_all(libs.iter().map(|c| c.close())).await;
        sample
    }

    async fn one_id_raw(&self, key: &str, window: Duration) -> Result<Sample> {
        let raws = futures::future::try_join_all((0..CLIENTS).map(|_| self.raw_session())).await?;
        let sample = self
            .contended(&self.raw, window, |i| {
                let raw = raws[i].clone();
                async move { raw.cycle(key).await }
            })
            .await;
        futures::future::join_all(raws.iter().map(|r| r.destroy())).await;
        sample
    }

    async fn one_id_peer(&self, key: &str, window: Duration) -> Result<Sample> {
        let peers = (0..CLIENTS)
            .map(|_| self.api_lock(key.to_string(), b""))
            .collect::<Result<Vec<_>>>()?;
        self.contended(&self.peer, window, |i| {
            let peer = peers[i].clone();
            async move { peer.cycle().await }
        })
        .await
    }

    /// [`CLIENTS`] tasks looping `op(i)` for `window`: their throughput, with the requests and
    /// the most connections open at once through `proxy` meanwhile.
    async fn contended<F, Fut, T>(&self, proxy: &Proxy, window: Duration, op: F) -> Result<Sample>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        proxy.conns.take_peak();
        let (c, reqs) = self
            .counted(proxy, contend_until(CLIENTS, window, op))
            .await?;
        Ok(throughput(c, &reqs, proxy.conns.take_peak()))
    }

    async fn elect(&self) -> Result<Vec<Row>> {
        let n = self.pick(30, 300);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let leader = lib.leader("group").or_msg("leader handle")?;
        let raw = self.raw_session().await?;
        let key = format!("{ns}/raw/group/.leader");
        let peer = self.api_lock(format!("{ns}/peer/group/.leader"), b"me")?;
        let mut row = Row::new(B, "elect + resign, uncontended", "p50 µs", Better::Lower)
            .with_raw("txn lock+get, txn check-session+delete")
            .with_peer("api.Lock recipe")
            .with_note(format!(
                "{n} sequential elect/resign per round; raw and peer write the candidate as \
                 the key's value (the peer as Consul's leader-election guide does: session \
                 create, GET, PUT ?acquire=; PUT ?release=)"
            ));
        leader
            .elect("me", ElectOptions::new())
            .await
            .or_msg("warm-up")?
            .resign()
            .await
            .or_msg("warm-up")?;
        for _ in 0..self.ctx.rounds {
            let (lat, reqs) = self
                .clocked(&self.sync, n, async || {
                    let t = Instant::now();
                    let e = leader
                        .elect("me", ElectOptions::new())
                        .await
                        .or_msg("elect")?;
                    e.resign().await.or_msg("resign")?;
                    Ok(t.elapsed())
                })
                .await?;
            row.sync.rounds.push(with_reqs(latency(&lat), &reqs, n));
            let (lat, reqs) = self
                .clocked(&self.raw, n, async || {
                    let t = Instant::now();
                    raw.lock(&key, b"me").await?;
                    raw.unlock(&key).await?;
                    Ok(t.elapsed())
                })
                .await?;
            push(&mut row.raw, with_reqs(latency(&lat), &reqs, n));
            let (lat, reqs) = self
                .clocked(&self.peer, n, async || timed(peer.cycle()).await)
                .await?;
            push(&mut row.peer, with_reqs(latency(&lat), &reqs, n));
        }
        lib.close().await.or_msg("close")?;
        raw.destroy().await;
        self.cleanup(&ns).await;
        Ok(vec![row.finish()])
    }

    async fn map(&self) -> Result<Vec<Row>> {
        let keys = self.pick(300, 10_000);
        let n = self.pick(50, 500);
        let scans = self.pick(3, 5);
        let ns = unique("bench");
        let lib = self.lib(&ns).await?;
        let map = lib.map("bench").or_msg("map handle")?;
        let raw = Http::new(&self.agent, &self.raw.addr)?;
        let prefix = format!("{ns}/raw/map/");
        // Both maps hold `keys` entries before anything is timed.
        stream::iter(0..keys)
            .map(|i| {
                let map = map.clone();
                async move { map.write(&format!("k{i:06}"), b"0").await }
            })
            .buffer_unordered(FILL_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("filling the map")?;
        stream::iter(0..keys)
            .map(|i| {
                let (raw, key) = (&raw, format!("{prefix}k{i:06}"));
                async move { raw.put(&key, b"0", None).await }
            })
            .buffer_unordered(FILL_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        let mut write = Row::new(B, "Map write", "p50 µs", Better::Lower)
            .with_raw("txn set")
            .with_note(format!(
                "{n} sequential writes of one key per round; raw writes by /v1/txn, which \
                 returns the new version (PUT /v1/kv does not)"
            ));
        let mut cas = Row::new(B, "Map compare-and-swap", "p50 µs", Better::Lower)
            .with_raw("txn cas at the last ModifyIndex")
            .with_note(format!(
                "{n} sequential swaps of one key, each on the last version"
            ));
        let mut entries = Row::new(
            B,
            format!("Map entries() over {keys} keys"),
            "p50 ms",
            Better::Lower,
        )
        .with_raw("one GET ?recurse")
        .with_note(format!(
            "{scans} scans per round; raw reads in the default consistency mode, sync-consul \
             with ?consistent"
        ));
        let mut iterate = Row::new(
            B,
            format!("Map iterate rewriting {keys} keys"),
            "s",
            Better::Lower,
        )
        .with_raw(format!(
            "one GET ?recurse + a txn cas per key, {ITERATE_IN_FLIGHT} in flight"
        ))
        .with_note("one pass per round; req/op is per key");
        let hot = format!("{prefix}hot");
        for round in 0..self.ctx.rounds {
            let (lat, reqs) = self
                .clocked(&self.sync, n, async || {
                    timed(map.write("hot", b"v").map_err(|e| e.to_string())).await
                })
                .await?;
            write.sync.rounds.push(with_reqs(latency(&lat), &reqs, n));
            let (lat, reqs) = self
                .clocked(&self.raw, n, async || {
                    timed(raw.put(&hot, b"v", None)).await
                })
                .await?;
            push(&mut write.raw, with_reqs(latency(&lat), &reqs, n));

            let mut version = map.read("hot").await.or_msg("read")?.map(|e| e.version);
            let (lat, reqs) = self
                .clocked(&self.sync, n, async || {
                    let t = Instant::now();
                    let swapped = map.compare_and_swap("hot", version, b"v").await;
                    version = Some(swapped.or_msg("compare_and_swap")?);
                    Ok(t.elapsed())
                })
                .await?;
            cas.sync.rounds.push(with_reqs(latency(&lat), &reqs, n));
            let mut index = raw
                .get(&hot, 0, None, false)
                .await?
                .0
                .map(|p| p.modify_index);
            let (lat, reqs) = self
                .clocked(&self.raw, n, async || {
                    let t = Instant::now();
                    index = Some(raw.put(&hot, b"v", Some(index.unwrap_or(0))).await?);
                    Ok(t.elapsed())
                })
                .await?;
            push(&mut cas.raw, with_reqs(latency(&lat), &reqs, n));

            let (lat, reqs) = self
                .clocked(&self.sync, scans, async || {
                    let t = Instant::now();
                    let all = map.entries().await.or_msg("entries")?;
                    if all.len() < keys {
                        return Err(format!("entries: {} of {keys}", all.len()));
                    }
                    Ok(t.elapsed())
                })
                .await?;
            entries
                .sync
                .rounds
                .push(in_ms(with_reqs(latency(&lat), &reqs, scans)));
            let (lat, reqs) = self
                .clocked(&self.raw, scans, async || {
                    let t = Instant::now();
                    let (all, _) = raw.list(&prefix, 0).await?;
                    if all.len() < keys {
                        return Err(format!("GET ?recurse: {} of {keys}", all.len()));
                    }
                    Ok(t.elapsed())
                })
                .await?;
            push(
                &mut entries.raw,
                in_ms(with_reqs(latency(&lat), &reqs, scans)),
            );

            let value = format!("r{round}");
            let (took, reqs) = self
                .counted(&self.sync, async {
                    let t = Instant::now();
                    let changed = map
                        .iterate(|_, _| Some(value.as_bytes().to_vec()))
                        .await
                        .or_msg("iterate")?;
                    if changed < keys {
                        return Err(format!("iterate changed {changed} of {keys}"));
                    }
                    Ok(t.elapsed())
                })
                .await?;
            let s = Sample::value(took.as_secs_f64());
            iterate.sync.rounds.push(with_reqs(s, &reqs, keys));
            let (took, reqs) = self
                .counted(&self.raw, async {
                    let t = Instant::now();
                    let (all, _) = raw.list(&prefix, 0).await?;
                    stream::iter(all)
                        .map(|p| {
                            let (raw, value) = (&raw, value.as_bytes());
                            async move { raw.put(&p.key, value, Some(p.modify_index)).await }
                        })
                        .buffer_unordered(ITERATE_IN_FLIGHT)
                        .try_collect::<Vec<_>>()
                        .await?;
                    Ok(t.elapsed())
                })
                .await?;
            let s = Sample::value(took.as_secs_f64());
            push(&mut iterate.raw, with_reqs(s, &reqs, keys));
        }
        lib.close().await.or_msg("close")?;
        self.cleanup(&ns).await;
        Ok(vec![
            write.finish(),
            cas.finish(),
            entries.finish(),
            iterate.finish(),
        ])
    }

    async fn task_throughput(&self) -> Result<Vec<Row>> {
        const CONCURRENCY: usize = 8;
        let jobs = self.pick(60, 2000);
        let mut rows: Vec<(usize, Row)> = [1usize, 2, 4]
            .into_iter()
            .map(|w| {
                let row = Row::new(
                    B,
                    format!("Task: {jobs} queued no-op jobs, {w} worker(s) × {CONCURRENCY}"),
                    "jobs/s",
                    Better::Higher,
                )
                .with_raw("queue: a listing per worker, then a claim txn + a finish txn per job")
                .with_note(
                    "timed from the workers' start to the last job's end; req/op per job \
                     while working (submits not counted); raw: a queue entry per job (PUT), \
                     claimed by check-index + delete + lock of a claim key for the worker's \
                     session",
                );
                (w, row)
            })
            .collect();
        for round in 0..self.ctx.rounds {
            for (workers, row) in &mut rows {
                let ns = unique("bench");
                let s = self
                    .lib_jobs(&ns, round, *workers, jobs, CONCURRENCY)
                    .await?;
                row.sync.rounds.push(s);
                let s = self.raw_jobs(&ns, *workers, jobs, CONCURRENCY).await?;
                push(&mut row.raw, s);
                self.cleanup(&ns).await;
            }
        }
        Ok(rows.into_iter().map(|(_, r)| r.finish()).collect())
    }

    async fn lib_jobs(
        &self,
        ns: &str,
        round: usize,
        workers: usize,
        jobs: usize,
        concurrency: usize,
    ) -> Result<Sample> {
        let submitter = self.lib(ns).await?;
        let task = submitter.task().or_msg("task handle")?;
        let name = format!("noop-{round}");
        stream::iter(0..jobs)
            .map(|i| {
                let (task, name) = (task.clone(), name.clone());
                async move { task.submit(Job::new(name, i.to_le_bytes().to_vec())).await }
            })
            .buffer_unordered(FILL_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
            .or_msg("submit")?;
        let clients = futures::future::try_join_all((0..workers).map(|_| self.lib(ns))).await?;
        let done = Arc::new(AtomicUsize::new(0));
        let all = Arc::new(Notify::new());
        let ((took, handles), reqs) = self
            .counted(&self.sync, async {
                let started = Instant::now();
                let mut handles = Vec::new();
                for c in &clients {
                    let (d, a) = (done.clone(), all.clone());
                    let handler = Arc::new(move |_job: JobContext| {
                        if d.fetch_add(1, Ordering::SeqCst) + 1 == jobs {
                            a.notify_one();
                        }
                        async { Ok(Vec::new()) }
                    });
                    let options = WorkerOptions::new().with_concurrency(concurrency);
                    let task = c.task().or_msg("task handle")?;
                    handles.push(task.work(&name, handler, options).await.or_msg("work")?);
                }
                tokio::time::timeout(Duration::from_secs(600), all.notified())
                    .await
                    .or_msg("waiting for the jobs")?;
                Ok((started.elapsed(), handles))
            })
            .await?;
        for h in handles {
            h.stop().await;
        }
        for c in clients {
            let _ = c.close().await;
        }
        let _ = submitter.close().await;
        let s = Sample::value(jobs as f64 / took.as_secs_f64());
        Ok(with_reqs(s, &reqs, jobs))
    }

    async fn raw_jobs(
        &self,
        ns: &str,
        workers: usize,
        jobs: usize,
        concurrency: usize,
    ) -> Result<Sample> {
        let submitter = Http::new(&self.agent, &self.raw.addr)?;
        stream::iter(0..jobs)
            .map(|i| {
                let (http, key) = (&submitter, format!("{ns}/raw/q/{i:08}"));
                async move { http.put(&key, &i.to_le_bytes(), None).await }
            })
            .buffer_unordered(FILL_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        let sessions =
            futures::future::try_join_all((0..workers).map(|_| self.raw_session())).await?;
        let done = Arc::new(AtomicUsize::new(0));
        let (took, reqs) = self
            .counted(&self.raw, async {
                let started = Instant::now();
                let runs = sessions
                    .iter()
                    .enumerate()
                    .map(|(w, s)| raw_worker(s.clone(), ns, w, workers, concurrency, done.clone()));
                futures::future::try_join_all(runs).await?;
                Ok(started.elapsed())
            })
            .await?;
        futures::future::join_all(sessions.iter().map(|s| s.destroy())).await;
        let finished = done.load(Ordering::SeqCst);
        if finished != jobs {
            return Err(format!("raw queue: {finished} of {jobs} jobs done"));
        }
        let s = Sample::value(jobs as f64 / took.as_secs_f64());
        Ok(with_reqs(s, &reqs, jobs))
    }

    async fn task_latency(&self) -> Result<Vec<Row>> {
        let n = self.pick(10, 50);
        let gap = Duration::from_millis(20);
        let mut row = Row::new(
            B,
            "Task submit → handler start, idle worker",
            "p50 µs",
            Better::Lower,
        )
        .with_raw("PUT → the worker's blocking GET ?recurse → claim txn")
        .with_note(format!(
            "{n} jobs per round, one at a time, {} ms apart; one worker × concurrency 8; req/op \
             counts the submit and the worker's requests",
            gap.as_millis()
        ));
        for round in 0..self.ctx.rounds {
            let ns = unique("bench");
            row.sync
                .rounds
                .push(self.lib_latency(&ns, round, n, gap).await?);
            push(&mut row.raw, self.raw_latency(&ns, n, gap).await?);
            self.cleanup(&ns).await;
        }
        Ok(vec![row.finish()])
    }

    async fn lib_latency(&self, ns: &str, round: usize, n: usize, gap: Duration) -> Result<Sample> {
        let submitter = self.lib(ns).await?;
        let worker_client = self.lib(ns).await?;
        let task = submitter.task().or_msg("task handle")?;
        let (tx, mut started) = mpsc::unbounded_channel();
        let name = format!("latency-{round}");
        let handler = Arc::new(move |_job: JobContext| {
            let _ = tx.send(Instant::now());
            async { Ok(Vec::new()) }
        });
        let worker = worker_client
            .task()
            .or_msg("task handle")?
            .work(&name, handler, WorkerOptions::new().with_concurrency(8))
            .await
            .or_msg("work")?;
        // The worker is idle, blocked on its queue, before the first submit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (lat, reqs) = self
            .clocked(&self.sync, n, async || {
                let t0 = Instant::now();
                task.submit(Job::new(name.as_str(), vec![1]))
                    .await
                    .or_msg("submit")?;
                let t1 = started_within(&mut started).await?;
                tokio::time::sleep(gap).await;
                Ok(t1.saturating_duration_since(t0))
            })
            .await?;
        worker.stop().await;
        let _ = worker_client.close().await;
        let _ = submitter.close().await;
        Ok(with_reqs(latency(&lat), &reqs, n))
    }

    async fn raw_latency(&self, ns: &str, n: usize, gap: Duration) -> Result<Sample> {
        let submitter = Http::new(&self.agent, &self.raw.addr)?;
        let session = self.raw_session().await?;
        let (tx, mut started) = mpsc::unbounded_channel();
        let worker = AbortOnDrop(tokio::spawn({
            let (session, ns) = (session.clone(), ns.to_string());
            async move {
                if let Err(e) = raw_idle_worker(session, ns, tx).await {
                    eprintln!("sync-bench consul: raw worker: {e}");
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut i = 0u32;
        let (lat, reqs) = self
            .clocked(&self.raw, n, async || {
                i += 1;
                let t0 = Instant::now();
                submitter
                    .put(&format!("{ns}/raw/q/{i:08}"), &[1], None)
                    .await?;
                let t1 = started_within(&mut started).await?;
                tokio::time::sleep(gap).await;
                Ok(t1.saturating_duration_since(t0))
            })
            .await?;
        drop(worker);
        session.destroy().await;
        Ok(with_reqs(latency(&lat), &reqs, n))
    }
}

/// When a handler started, within 30 s.
async fn started_within(started: &mut mpsc::UnboundedReceiver<Instant>) -> Result<Instant> {
    tokio::time::timeout(Duration::from_secs(30), started.recv())
        .await
        .or_msg("waiting for the handler")?
        .ok_or_else(|| "the worker ended".to_string())
}

/// A latency sample in milliseconds rather than microseconds.
fn in_ms(mut s: Sample) -> Sample {
    s.value /= 1000.0;
    s.p99 = s.p99.map(|v| v / 1000.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_the_endpoint_and_the_kv_verb() {
        assert_eq!(route("PUT", "/v1/txn"), "PUT txn");
        assert_eq!(
            route("PUT", "/v1/kv/a/b?acquire=s&flags=7"),
            "PUT kv?acquire"
        );
        assert_eq!(route("PUT", "/v1/kv/a?release=s"), "PUT kv?release");
        assert_eq!(
            route("GET", "/v1/kv/a?consistent=&index=9&wait=15000ms"),
            "GET kv?index"
        );
        assert_eq!(route("GET", "/v1/kv/a?consistent="), "GET kv");
        assert_eq!(route("PUT", "/v1/session/renew/abc"), "PUT session/renew");
        assert_eq!(
            route("GET", "/v1/session/info/abc?index=3"),
            "GET session/info?index"
        );
    }

    #[test]
    fn requests_are_counted_across_reads_and_bodies_skipped() {
        let a = "PUT /v1/txn HTTP/1.1\r\nhost: x\r\nContent-Length: 15\r\n\r\nGET /v1/kv/";
        let b = "\r\n\r\nGET /v1/kv/k?index=4 HTTP/1.1\r\n\r";
        let c = "\nPUT /v1/session/destroy/s HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
        let mut r = Requests::default();
        // The body (15 bytes, over two reads) looks like a request; it is skipped.
        assert_eq!(r.feed(a.as_bytes()), vec!["PUT txn"]);
        assert_eq!(r.feed(b.as_bytes()), Vec::<String>::new());
        assert_eq!(
            r.feed(c.as_bytes()),
            vec!["GET kv?index", "PUT session/destroy"]
        );
        // A head split anywhere, even inside its terminator, is one request.
        let whole = "GET /v1/kv/k HTTP/1.1\r\n\r\n";
        for cut in 1..whole.len() {
            let mut r = Requests::default();
            let mut got = r.feed(&whole.as_bytes()[..cut]);
            got.extend(r.feed(&whole.as_bytes()[cut..]));
            assert_eq!(got, vec!["GET kv"], "cut at {cut}");
        }
    }

    #[test]
    fn a_chunked_body_is_reported_not_guessed() {
        let mut r = Requests::default();
        let head = "PUT /v1/txn HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert_eq!(r.feed(head.as_bytes()), vec![UNPARSED]);
        assert!(r.feed(b"GET /v1/kv/k HTTP/1.1\r\n\r\n").is_empty());
    }

    #[test]
    fn request_counts_per_op() {
        let mut before = Reqs::default();
        before.add("PUT txn".into());
        let mut after = before.clone();
        for r in ["PUT txn", "PUT txn", "GET kv?index"] {
            after.add(r.into());
        }
        let d = after.since(&before);
        assert_eq!(d.total(), 3);
        assert_eq!(d.per_op(2), "req/op GET kv?index 0.500, PUT txn 1.000");
    }
}
