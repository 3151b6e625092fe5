//! A fault-injecting TCP proxy on loopback, for every network backend's cases: clients
//! connect through it to the real server, and a case switches it, for real, between passing
//! traffic, freezing (connections stay open, nothing is forwarded: a stalled endpoint or a
//! paused network), resetting (every connection is cut and new ones are refused at once), and
//! dropping responses (requests reach the server, answers never come back: the ambiguous
//! commit).

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

/// A running proxy; dropping it stops it and cuts its connections.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    accept: AbortHandle,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let fault = Arc::new(watch::channel(Fault::Pass).0);
        let accept = tokio::spawn(accept_loop(listener, upstream, fault.clone())).abort_handle();
        Ok(FaultProxy {
            addr,
            fault,
            accept,
        })
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches every connection, present and future, to `fault`.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Connections end when they see the proxy gone.
        self.fault.send_replace(Fault::Reset);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if *fault.borrow() == Fault::Reset {
            drop(client);
            continue;
        }
        let fault = fault.subscribe();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                relay(client, server, fault).await;
            }
        });
    }
}

/// Pumps both directions until either side closes or the proxy resets.
async fn relay(client: TcpStream, server: TcpStream, fault: watch::Receiver<Fault>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let requests = pump(client_read, server_write, fault.clone(), false);
    let answers = pump(server_read, client_write, fault, true);
    tokio::select! {
        _ = requests => {}
        _ = answers => {}
    }
}

/// Copies `from` to `to` as the fault allows; `answers` is the server-to-client direction.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut fault: watch::Receiver<Fault>,
    answers: bool,
) -> io::Result<()> {
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

/// `url` with its host list replaced by `addr` (user, namespace and query kept): a client of
/// the same backend that goes through the proxy.
///
/// ```
/// let url = sync_conformance::proxy::through("etcd://u:p@h1:2379,h2:2379/ns?ttl=2s", "127.0.0.1:4000".parse().unwrap());
/// assert_eq!(url, "etcd://u:p@127.0.0.1:4000/ns?ttl=2s");
/// ```
pub fn through(url: &str, addr: SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}{tail}", userinfo.unwrap_or_default())
}

/// The first host of `url` as a socket address (the server a proxy stands in front of).
pub(crate) fn first_host(url: &str) -> Option<SocketAddr> {
    let parsed = sync_core::url::BackendUrl::parse(url).ok()?;
    let host = parsed.hosts.first()?;
    use std::net::ToSocketAddrs;
    host.to_socket_addrs().ok()?.next()
}
