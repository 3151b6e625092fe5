//! A fault-injecting TCP proxy on loopback, for every network backend's cases: clients
//! connect through it to the real server, and a case switches it, for real, between passing
//! traffic, freezing (connections stay open, nothing is forwarded: a stalled endpoint or a
//! paused network), resetting (every connection is cut and new ones are refused at once), and
//! dropping responses (requests reach the server, answers never come back: the ambiguous
//! commit). Independently of the fault, it can hold back one request, the next chunk a client
//! sends that contains a given byte pattern, until the case releases it: a request delayed in
//! flight, at a moment the case chooses.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::AbortHandle,
};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Keep every connection open and forward nothing, either way.
    Freeze,
    /// Cut every connection; refuse new ones.
    Reset,
    /// Forward requests to the server; throw its answers away.
    DropResponses,
}

/// Holding back one request: armed with a byte pattern, then holding the chunk that completed
/// it, then idle again once released.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    Idle,
    Armed(Vec<u8>),
    Holding,
}

/// A running proxy; dropping it stops it and cuts its connections.
#[derive(Debug)]
pub struct FaultProxy {
    addrs: Vec<SocketAddr>,
    fault: Arc<watch::Sender<Fault>>,
    hold: Arc<watch::Sender<Hold>>,
    accept: Vec<AbortHandle>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        Self::start_all(&[upstream]).await
    }

    /// One proxy in front of several servers (every node of a cluster): a listening address
    /// per server, one fault and one hold shared by all of them, so a case's fault reaches a
    /// client whichever node it talks to.
    pub async fn start_all(upstreams: &[SocketAddr]) -> io::Result<FaultProxy> {
        let fault = Arc::new(watch::channel(Fault::Pass).0);
        let hold = Arc::new(watch::channel(Hold::Idle).0);
        let mut addrs = Vec::new();
        let mut accept = Vec::new();
        for upstream in upstreams {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
            addrs.push(listener.local_addr()?);
            let task = accept_loop(listener, *upstream, fault.clone(), hold.clone());
            accept.push(tokio::spawn(task).abort_handle());
        }
        Ok(FaultProxy {
            addrs,
            fault,
            hold,
            accept,
        })
    }

    /// The address clients connect to (the first server's, with several).
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The addresses clients connect to, one per server, in the servers' order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Switches every connection, present and future, to `fault`.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Arms a hold: the next chunk any client sends (on any connection, present or future)
    /// whose bytes contain `pattern` is not forwarded until [`FaultProxy::release`]; nor is
    /// anything after it on that connection. The pattern is found even when it spans two
    /// reads; the chunk held is the one that completes it. An empty pattern holds the next
    /// chunk sent. Arming again replaces a pattern not yet seen; answers are never held.
    pub fn hold_next(&self, pattern: impl Into<Vec<u8>>) {
        self.hold.send_replace(Hold::Armed(pattern.into()));
    }

    /// Waits until the armed hold holds its chunk (at once if it already does). Never returns
    /// if nothing matching is sent: bound it with a timeout.
    pub async fn held(&self) {
        let mut hold = self.hold.subscribe();
        let _ = hold.wait_for(|h| *h == Hold::Holding).await;
    }

    /// Forwards the held chunk (under whatever fault is set by then) and disarms: a hold armed
    /// but not yet holding is cancelled.
    pub fn release(&self) {
        self.hold.send_replace(Hold::Idle);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        for accept in &self.accept {
            accept.abort();
        }
        // Connections end when they see the proxy gone.
        self.fault.send_replace(Fault::Reset);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    hold: Arc<watch::Sender<Hold>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if *fault.borrow() == Fault::Reset {
            drop(client);
            continue;
        }
        let fault = fault.subscribe();
        let hold = HoldPoint::new(hold.clone());
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                relay(client, server, fault, hold).await;
            }
        });
    }
}

/// Pumps both directions until either side closes or the proxy resets.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: watch::Receiver<Fault>,
    hold: HoldPoint,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let requests = pump(client_read, server_write, fault.clone(), Some(hold));
    let answers = pump(server_read, client_write, fault, None);
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

/// Copies `from` to `to` as the fault (and, for requests, the hold) allows. `hold` is given
/// for the client-to-server direction only: without it this pumps answers.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut fault: watch::Receiver<Fault>,
    mut hold: Option<HoldPoint>,
) -> io::Result<()> {
    let answers = hold.is_none();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While frozen nothing is read, so nothing moves and the sender's buffers fill.
        let now = *fault
            .wait_for(|f| *f != Fault::Freeze)
            .await
            .map_err(|_| io::Error::other("proxy stopped"))?;
        if now == Fault::Reset {
            return Ok(());
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            _ = fault.changed() => continue,
        };
        if n == 0 {
            return Ok(());
        }
        if let Some(hold) = &mut hold {
            hold.pass(&buf[..n]).await;
        }
        match *fault.borrow() {
            Fault::Reset => return Ok(()),
            Fault::DropResponses if answers => continue,
            // A chunk read just as the freeze began is held until it thaws.
            _ => {}
        }
        if *fault.borrow() == Fault::Freeze {
            let thawed = *fault
                .wait_for(|f| *f != Fault::Freeze)
                .await
                .map_err(|_| io::Error::other("proxy stopped"))?;
            match thawed {
                Fault::Reset => return Ok(()),
                Fault::DropResponses if answers => continue,
                _ => {}
            }
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// One connection's view of the proxy's hold, on its request direction.
struct HoldPoint {
    hold: Arc<watch::Sender<Hold>>,
    /// The end of what this connection sent before, so a pattern split across reads is found.
    tail: Vec<u8>,
}

impl HoldPoint {
    fn new(hold: Arc<watch::Sender<Hold>>) -> HoldPoint {
        HoldPoint {
            hold,
            tail: Vec::new(),
        }
    }

    /// Returns at once unless a hold is armed and `chunk` completes its pattern; then marks
    /// the hold as holding and returns when it is released.
    async fn pass(&mut self, chunk: &[u8]) {
        let armed = match &*self.hold.borrow() {
            Hold::Armed(pattern) => pattern.clone(),
            _ => {
                self.tail.clear();
                return;
            }
        };
        if self.completes(&armed, chunk) && self.take_hold() {
            let mut hold = self.hold.subscribe();
            let _ = hold.wait_for(|h| *h != Hold::Holding).await;
        }
    }

    /// Whether `pattern` occurs in the kept tail followed by `chunk`; keeps the new tail.
    fn completes(&mut self, pattern: &[u8], chunk: &[u8]) -> bool {
        self.tail.extend_from_slice(chunk);
        let found = pattern.is_empty() || self.tail.windows(pattern.len()).any(|w| w == pattern);
        let keep = self.tail.len().min(pattern.len().saturating_sub(1));
        self.tail.drain(..self.tail.len() - keep);
        found
    }

    /// Turns the armed hold into holding; false if another connection (or a release) got
    /// there first.
    fn take_hold(&self) -> bool {
        self.hold.send_if_modified(|h| {
            let armed = matches!(h, Hold::Armed(_));
            if armed {
                *h = Hold::Holding;
            }
            armed
        })
    }
}

/// `url` with its host list replaced by `addr` (user, namespace and query kept): a client of
/// the same backend that goes through the proxy.
///
/// ```
/// let url = sync_conformance::proxy::through("etcd://u:p@h1:2379,h2:2379/ns?ttl=2s", "127.0.0.1:4000".parse().unwrap());
/// assert_eq!(url, "etcd://u:p@127.0.0.1:4000/ns?ttl=2s");
/// ```
pub fn through(url: &str, addr: SocketAddr) -> String {
    through_all(url, &[addr])
}

/// `url` with its hosts replaced by `addrs` (a proxy's, one per server), in order.
pub fn through_all(url: &str, addrs: &[SocketAddr]) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    let hosts: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
    format!(
        "{scheme}://{}{}{tail}",
        userinfo.unwrap_or_default(),
        hosts.join(",")
    )
}

/// Every host of `url` as a socket address (the servers a proxy stands in front of); None
/// without hosts or when one does not resolve.
pub fn hosts(url: &str) -> Option<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let parsed = sync_core::url::BackendUrl::parse(url).ok()?;
    let addrs = parsed
        .hosts
        .iter()
        .map(|h| h.to_socket_addrs().ok()?.next())
        .collect::<Option<Vec<_>>>()?;
    (!addrs.is_empty()).then_some(addrs)
}
