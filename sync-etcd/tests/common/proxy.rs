//! A loopback TCP proxy in front of etcd that injects real network faults: cut every
//! connection (and refuse new ones), drop every answer while requests still arrive, or hold
//! back the request that carries a given key until released.

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Forward,
    /// Forwards requests, discards every answer: etcd acts, the client never hears of it.
    DropAnswers,
    /// Closes every connection and every new one at once: requests fail.
    Cut,
}

/// Holding back one request: armed with a byte pattern, then holding the chunk that
/// completed it, then released.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hold {
    Idle,
    Armed(Vec<u8>),
    Holding,
}

pub struct Proxy {
    /// `http://127.0.0.1:<port>`, for a client config.
    pub endpoint: String,
    mode: watch::Sender<Mode>,
    hold: Arc<watch::Sender<Hold>>,
}

impl Proxy {
    /// Starts forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Result<Proxy, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("proxy bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mode = watch::channel(Mode::Forward).0;
        let hold = Arc::new(watch::channel(Hold::Idle).0);
        tokio::spawn(accept(
            listener,
            upstream.to_string(),
            mode.subscribe(),
            hold.clone(),
        ));
        Ok(Proxy {
            endpoint: format!("http://{addr}"),
            mode,
            hold,
        })
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Holds back the next request whose bytes contain `pattern` (a key) until
    /// [`Proxy::release`]; [`Proxy::held`] tells when it is held.
    pub fn hold_next(&self, pattern: impl Into<Vec<u8>>) {
        self.hold.send_replace(Hold::Armed(pattern.into()));
    }

    /// Waits until the armed request is held.
    pub async fn held(&self) {
        let mut rx = self.hold.subscribe();
        let _ = rx.wait_for(|h| *h == Hold::Holding).await;
    }

    /// Sends the held request on (and disarms).
    pub fn release(&self) {
        self.hold.send_replace(Hold::Idle);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: String,
    mode: watch::Receiver<Mode>,
    hold: Arc<watch::Sender<Hold>>,
) {
    while let Ok((inbound, _)) = listener.accept().await {
        if *mode.borrow() == Mode::Cut {
            // Dropped at once: the client's connection attempt fails.
            continue;
        }
        let Ok(outbound) = TcpStream::connect(&upstream).await else {
            continue;
        };
        let (ri, wi) = inbound.into_split();
        let (ro, wo) = outbound.into_split();
        tokio::spawn(pump(ri, wo, mode.clone(), Some(hold.clone())));
        tokio::spawn(pump(ro, wi, mode.clone(), None));
    }
}

/// Copies one direction. `hold` is set for the client-to-etcd direction.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    hold: Option<Arc<watch::Sender<Hold>>>,
) {
    let answers = hold.is_none();
    let mut buf = vec![0u8; 16 * 1024];
    // The end of what came before, so a pattern split across reads is still found.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Both pumps of a connection return: its sockets close.
            _ = mode.wait_for(|m| *m == Mode::Cut) => return,
        };
        let chunk = &buf[..n];
        if let Some(hold) = &hold {
            hold_if_armed(hold, &mut tail, chunk).await;
        }
        match *mode.borrow() {
            Mode::Cut => return,
            Mode::DropAnswers if answers => continue,
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}

/// If a hold is armed and `tail + chunk` contains its pattern, marks it held and waits for
/// the release.
async fn hold_if_armed(hold: &watch::Sender<Hold>, tail: &mut Vec<u8>, chunk: &[u8]) {
    let pattern = match &*hold.borrow() {
        Hold::Armed(p) => p.clone(),
        _ => {
            tail.clear();
            return;
        }
    };
    tail.extend_from_slice(chunk);
    let found = tail.windows(pattern.len()).any(|w| w == pattern.as_slice());
    let keep = tail.len().min(pattern.len().saturating_sub(1));
    tail.drain(..tail.len() - keep);
    if !found {
        return;
    }
    let armed = hold.send_if_modified(|h| {
        let armed = matches!(h, Hold::Armed(_));
        if armed {
            *h = Hold::Holding;
        }
        armed
    });
    if armed {
        let _ = hold.subscribe().wait_for(|h| *h != Hold::Holding).await;
    }
}
