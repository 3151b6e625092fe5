//! One watch stream per client, shared by every watch the client makes (held keys' monitors,
//! waiters, followers, task workers).
//!
//! etcd multiplexes watches on a stream: each is created with a watch id (chosen here, so the
//! answers need no matching by order) and every response names its watch. A hub task owns the
//! stream: it opens it on the current endpoint when the first watch is added (a client that
//! never watches opens none), adds and cancels watches as messages on it, and routes events.
//! When the stream fails or the client moves to another endpoint, every watch on it ends
//! (`Failed`, `Moved`) and its owner resumes from the revision it watched from (nothing is
//! missed: etcd replays history) or re-reads; the next watch added opens a new stream.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use etcd_client::{WatchOptions, WatchResponse, WatchResponseStream};
use sync_kit::locked;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    BACKEND,
    endpoints::Endpoints,
    error::{not_delivered, timed_out},
    kv::{EtcdResult, answered_within},
};

/// What a watch is told.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// A response with events (in revision order; a stream watch goes on).
    Events(Box<WatchResponse>),
    /// The watch ended; nothing more comes.
    Ended(Ended),
}

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// etcd cancelled it (its start revision was compacted, or it was refused): re-read.
    Cancelled,
    /// The stream failed, could not be opened, or the client is gone.
    Failed,
    /// The client moved to another endpoint: the old stream may sit there silently.
    Moved,
}

/// Where a watch's responses go: a one-shot watch needs a much smaller channel, which counts
/// with thousands of held keys.
enum Sink {
    Once(oneshot::Sender<Delivery>),
    Stream(mpsc::UnboundedSender<Delivery>),
}

impl Sink {
    /// Delivers; None when the watch is done with (receiver gone, or a one-shot used up).
    fn deliver(self, d: Delivery) -> Option<Sink> {
        match self {
            Sink::Once(tx) => {
                let _ = tx.send(d);
                None
            }
            Sink::Stream(tx) => tx.send(d).ok().map(|()| Sink::Stream(tx)),
        }
    }
}

enum Command {
    Add {
        id: i64,
        key: Vec<u8>,
        opts: WatchOptions,
        sink: Sink,
    },
    Remove(i64),
}

/// A message for the stream, sent by its writer task.
enum Outgoing {
    Create(Vec<u8>, WatchOptions),
    Cancel(i64),
}

/// The client's shared watch stream: a handle to its hub task, started with the first watch.
pub(crate) struct Watches {
    commands: mpsc::UnboundedSender<Command>,
    hub: Mutex<Option<Hub>>,
    next_id: AtomicI64,
}

impl Watches {
    pub(crate) fn new(
        endpoints: Arc<Endpoints>,
        timeout: Duration,
        killed: watch::Receiver<bool>,
    ) -> Watches {
        let (commands, rx) = mpsc::unbounded_channel();
        Watches {
            commands,
            hub: Mutex::new(Some(Hub {
                endpoints,
                timeout,
                killed,
                commands: rx,
            })),
            next_id: AtomicI64::new(1),
        }
    }

    /// Watches `key` with `opts` until the first response with events.
    pub(crate) fn once(&self, key: Vec<u8>, opts: WatchOptions) -> Once {
        let (tx, rx) = oneshot::channel();
        let registration = self.add(key, opts, Sink::Once(tx));
        Once {
            rx,
            _registration: registration,
        }
    }

    /// Watches `key` with `opts`, every response with events, until dropped or ended.
    pub(crate) fn stream(&self, key: Vec<u8>, opts: WatchOptions) -> Watching {
        let (tx, rx) = mpsc::unbounded_channel();
        let registration = self.add(key, opts, Sink::Stream(tx));
        Watching {
            rx,
            _registration: registration,
        }
    }

    fn add(&self, key: Vec<u8>, opts: WatchOptions, sink: Sink) -> Registration {
        if let Some(hub) = locked(&self.hub).take() {
            tokio::spawn(hub.run());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A hub that is gone (the client was killed) drops the sink: the watch reads as failed.
        let _ = self.commands.send(Command::Add {
            id,
            key,
            opts: opts.with_watch_id(id),
            sink,
        });
        Registration {
            id,
            commands: self.commands.clone(),
        }
    }
}

/// Cancels its watch when dropped: a message to the hub, never a wait.
struct Registration {
    id: i64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Remove(self.id));
    }
}

/// A watch for its first response with events.
pub(crate) struct Once {
    rx: oneshot::Receiver<Delivery>,
    _registration: Registration,
}

impl Once {
    pub(crate) async fn wait(self) -> Delivery {
        let Once { rx, _registration } = self;
        rx.await.unwrap_or(Delivery::Ended(Ended::Failed))
    }
}

/// A watch for every response with events.
pub(crate) struct Watching {
    rx: mpsc::UnboundedReceiver<Delivery>,
    _registration: Registration,
}

impl Watching {
    /// The next response with events, or why the watch ended (then again on every call).
    pub(crate) async fn next(&mut self) -> Delivery {
        self.rx
            .recv()
            .await
            .unwrap_or(Delivery::Ended(Ended::Failed))
    }
}

type Opening = Pin<Box<dyn Future<Output = EtcdResult<WatchResponseStream>> + Send>>;

/// The stream's state in the hub.
enum Conn {
    Closed,
    Opening(Opening, mpsc::UnboundedSender<Outgoing>),
    Open(Box<WatchResponseStream>, mpsc::UnboundedSender<Outgoing>),
}

impl Conn {
    fn outgoing(&self) -> Option<&mpsc::UnboundedSender<Outgoing>> {
        match self {
            Conn::Closed => None,
            Conn::Opening(_, out) | Conn::Open(_, out) => Some(out),
        }
    }
}

struct Hub {
    endpoints: Arc<Endpoints>,
    timeout: Duration,
    killed: watch::Receiver<bool>,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl Hub {
    async fn run(mut self) {
        let mut watches: HashMap<i64, Sink> = HashMap::new();
        let mut conn = Conn::Closed;
        let mut moves = self.endpoints.moves();
        moves.mark_unchanged();
        let mut killed = self.killed.clone();
        loop {
            tokio::select! {
                biased;
                _ = killed.wait_for(|k| *k) => {
                    end_all(&mut watches, Ended::Failed);
                    return;
                }
                Ok(()) = moves.changed() => {
                    if !matches!(conn, Conn::Closed) {
                        tracing::debug!(backend = BACKEND, watches = watches.len(), "client moved; re-opening the watch stream");
                        conn = self.close();
                        end_all(&mut watches, Ended::Moved);
                    }
                }
                event = conn_event(&mut conn) => match event {
                    ConnEvent::Opened(Ok(responses)) => {
                        if let Conn::Opening(_, out) = std::mem::replace(&mut conn, Conn::Closed) {
                            conn = Conn::Open(Box::new(responses), out);
                        }
                    }
                    ConnEvent::Opened(Err(e)) => {
                        tracing::debug!(backend = BACKEND, error = %e, "opening the watch stream failed");
                        conn = self.close();
                        end_all(&mut watches, Ended::Failed);
                    }
                    ConnEvent::Message(Ok(Some(resp))) => route(resp, &mut watches, &conn),
                    ConnEvent::Message(ended) => {
                        if let Err(e) = &ended {
                            tracing::debug!(backend = BACKEND, error = %e, "the watch stream failed");
                        }
                        conn = self.close();
                        end_all(&mut watches, Ended::Failed);
                    }
                },
                command = self.commands.recv() => match command {
                    None => return,
                    Some(Command::Add { id, key, opts, sink }) => {
                        match conn.outgoing() {
                            Some(out) => {
                                let _ = out.send(Outgoing::Create(key, opts));
                            }
                            None => conn = self.open_with(key, opts),
                        }
                        watches.insert(id, sink);
                    }
                    Some(Command::Remove(id)) => {
                        if watches.remove(&id).is_some() {
                            if let Some(out) = conn.outgoing() {
                                let _ = out.send(Outgoing::Cancel(id));
                            }
                        }
                    }
                },
            }
        }
    }

    fn close(&self) -> Conn {
        Conn::Closed
    }

    /// Starts opening a stream on the current endpoint, with `key`'s watch as its first
    /// message (etcd-client opens a stream with one); later ones queue until it is open.
    fn open_with(&self, key: Vec<u8>, opts: WatchOptions) -> Conn {
        let (out, mut queued) = mpsc::unbounded_channel::<Outgoing>();
        let endpoints = self.endpoints.clone();
        let timeout = self.timeout;
        let opening = async move {
            let (index, client) = endpoints.pick().await?;
            let stream = answered_within(timeout, client.watch_client().watch(key, Some(opts)))
                .await
                .inspect_err(|e| {
                    if not_delivered(e) || timed_out(e) {
                        endpoints.pass_over(index);
                    }
                })?;
            let (mut sender, responses) = stream.split();
            // The writer is its own task so that a full send buffer never stops the hub from
            // reading (etcd stops reading requests while its answers are not read).
            tokio::spawn(async move {
                while let Some(message) = queued.recv().await {
                    let sent = match message {
                        Outgoing::Create(key, opts) => sender.watch(key, Some(opts)).await,
                        Outgoing::Cancel(id) => sender.cancel(id).await,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
            Ok(responses)
        };
        Conn::Opening(Box::pin(opening), out)
    }
}

enum ConnEvent {
    Opened(EtcdResult<WatchResponseStream>),
    Message(EtcdResult<Option<WatchResponse>>),
}

/// The next thing that happens to the stream (never, while it is closed).
async fn conn_event(conn: &mut Conn) -> ConnEvent {
    match conn {
        Conn::Opening(fut, _) => ConnEvent::Opened(fut.await),
        Conn::Open(responses, _) => ConnEvent::Message(responses.message().await),
        Conn::Closed => std::future::pending().await,
    }
}

/// Hands `resp` to its watch.
fn route(resp: WatchResponse, watches: &mut HashMap<i64, Sink>, conn: &Conn) {
    let id = resp.watch_id();
    if resp.canceled() {
        if let Some(sink) = watches.remove(&id) {
            tracing::debug!(
                backend = BACKEND,
                id,
                compacted = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "watch cancelled by etcd"
            );
            sink.deliver(Delivery::Ended(Ended::Cancelled));
        }
        return;
    }
    if resp.events().is_empty() {
        return;
    }
    let Some(sink) = watches.remove(&id) else {
        return;
    };
    match sink.deliver(Delivery::Events(Box::new(resp))) {
        Some(sink) => {
            watches.insert(id, sink);
        }
        None => {
            if let Some(out) = conn.outgoing() {
                let _ = out.send(Outgoing::Cancel(id));
            }
        }
    }
}

fn end_all(watches: &mut HashMap<i64, Sink>, why: Ended) {
    for (_, sink) in watches.drain() {
        sink.deliver(Delivery::Ended(why));
    }
}
