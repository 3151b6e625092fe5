//! A counting HTTP/1.1 proxy: forwards every connection to the agent and logs each request
//! (method, path, query) the moment its head has arrived, before forwarding it, so that a
//! request is logged before its answer can reach the client. Only the request direction is
//! parsed (request heads, then `Content-Length` or chunked bodies); answers are copied as
//! bytes. A client without pipelining (reqwest, Go's net/http) sends its next request only
//! after the answer to the last, so the log is exact.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// One request as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Without the query.
    pub path: String,
    pub query: String,
}

impl Request {
    /// `PUT /v1/txn`.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// The log, and a count that wakes whoever waits for a request.
#[derive(Default)]
struct Log {
    requests: Mutex<Vec<Request>>,
    count: watch::Sender<usize>,
}

impl Log {
    fn push(&self, request: Request) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        requests.push(request);
        self.count.send_replace(requests.len());
    }

    fn snapshot(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub struct CountingProxy {
    addr: SocketAddr,
    log: Arc<Log>,
    accept: JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on a free loopback port, forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<CountingProxy, String> {
        let upstream = tokio::net::lookup_host(upstream)
            .await
            .map_err(|e| format!("resolving {upstream}: {e}"))?
            .next()
            .ok_or_else(|| format!("no address for {upstream}"))?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("starting the counting proxy: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let log = Arc::new(Log::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, log.clone()));
        Ok(CountingProxy { addr, log, accept })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests were logged so far: a mark for [`since`](Self::since).
    pub fn mark(&self) -> usize {
        *self.log.count.borrow()
    }

    /// The requests logged after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Request> {
        self.log.snapshot().split_off(mark)
    }

    /// Waits (up to `limit`) for a request after `mark` that `wanted` accepts.
    pub async fn wait_for(
        &self,
        mark: usize,
        limit: Duration,
        wanted: impl Fn(&Request) -> bool,
    ) -> Result<Request, String> {
        let mut count = self.log.count.subscribe();
        let found = tokio::time::timeout(limit, async {
            loop {
                count.borrow_and_update();
                if let Some(r) = self.since(mark).into_iter().find(&wanted) {
                    return r;
                }
                if count.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
        found.await.map_err(|_| {
            format!(
                "no such request within {limit:?}; seen: {}",
                list(&self.since(mark))
            )
        })
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `PUT /v1/txn, GET /v1/kv/a`.
pub fn list(requests: &[Request]) -> String {
    let shown: Vec<String> = requests.iter().map(Request::to_string).collect();
    format!("[{}]", shown.join(", "))
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, log: Arc<Log>) {
    // Each connection's tasks end with it; the proxy's end stops new ones.
    while let Ok((client, _)) = listener.accept().await {
        tokio::spawn(serve(client, upstream, log.clone()));
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, log: Arc<Log>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let answers = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut requests = BufReader::new(client_read);
    while let Ok(true) = forward_request(&mut requests, &mut server_write, &log).await {}
    let _ = server_write.shutdown().await;
    let _ = answers.await;
}

/// Forwards one request (head and body) and logs it; false at the connection's end.
async fn forward_request<R, W>(
    from: &mut BufReader<R>,
    to: &mut W,
    log: &Log,
) -> Result<bool, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let head = read_head(from).await?;
    if head.is_empty() {
        return Ok(false);
    }
    let (request, body) = parse_head(&head)?;
    log.push(request);
    to.write_all(head.as_bytes()).await.map_err(err)?;
    match body {
        Body::Length(n) => copy_exactly(from, to, n).await?,
        Body::Chunked => copy_chunked(from, to).await?,
    }
    to.flush().await.map_err(err)?;
    Ok(true)
}

fn err(e: std::io::Error) -> String {
    e.to_string()
}

/// The head up to and including its blank line; empty at the connection's end.
async fn read_head<R: AsyncRead + Unpin>(from: &mut BufReader<R>) -> Result<String, String> {
    let mut head = String::new();
    loop {
        let n = from.read_line(&mut head).await.map_err(err)?;
        if n == 0 {
            return Ok(String::new());
        }
        if head.ends_with("\r\n\r\n") || head == "\r\n" {
            return Ok(head);
        }
    }
}

enum Body {
    Length(u64),
    Chunked,
}

fn parse_head(head: &str) -> Result<(Request, Body), String> {
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("not an HTTP request line: {first:?}"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut body = Body::Length(0);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            body = Body::Length(value.parse().map_err(|_| format!("bad length {value:?}"))?);
        } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            body = Body::Chunked;
        }
    }
    let request = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
    };
    Ok((request, body))
}

async fn copy_exactly<R, W>(from: &mut BufReader<R>, to: &mut W, n: u64) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy(&mut from.take(n), to).await.map_err(err)?;
    if copied != n {
        return Err(format!("the body ended after {copied} of {n} bytes"));
    }
    Ok(())
}

/// A chunked body: each `size\r\n data\r\n`, then `0\r\n`, trailers and a blank line.
async fn copy_chunked<R, W>(from: &mut BufReader<R>, to: &mut W) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut line = String::new();
        from.read_line(&mut line).await.map_err(err)?;
        to.write_all(line.as_bytes()).await.map_err(err)?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(hex, 16).map_err(|_| format!("bad chunk size {hex:?}"))?;
        if size == 0 {
            let trailers = read_head(from).await?;
            return to.write_all(trailers.as_bytes()).await.map_err(err);
        }
        // The data and its CRLF.
        copy_exactly(from, to, size + 2).await?;
    }
}
