//! Pub/sub for waiters: one subscription per channel per client, however many waiters share
//! it. Messages arrive as RESP3 pushes on the client's connection; each channel has a counter
//! that a message bumps, so a waiter that read the counter before it tried cannot miss a
//! release that came after. A lost connection bumps every channel (messages may have been
//! missed while it was down); so does a replaced one, after its subscriptions were made again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{PushInfo, PushKind, Value};
use sync_kit::locked;
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use crate::{BACKEND, conn::Conn};

struct Channel {
    bump: watch::Sender<u64>,
    waiters: usize,
}

pub(crate) struct Hub {
    channels: Mutex<HashMap<String, Channel>>,
    sync: mpsc::UnboundedSender<Sync>,
}

/// Asks the subscriber task to bring one channel's subscription in line with its waiters;
/// `done` hears when it has (with whether the server confirmed).
struct Sync {
    channel: String,
    done: Option<oneshot::Sender<bool>>,
}

/// A waiter's interest in a channel: `changed` resolves after a message published since the
/// last `mark`.
pub(crate) struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    rx: watch::Receiver<u64>,
    /// Whether the server confirmed the subscription: without it, messages may be missed and
    /// the waiter polls sooner.
    pub(crate) confirmed: bool,
}

impl Hub {
    pub(crate) fn start(
        conn: Conn,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        replaced: mpsc::UnboundedReceiver<()>,
        killed: watch::Receiver<bool>,
    ) -> Arc<Hub> {
        let (sync, requests) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub {
            channels: Mutex::new(HashMap::new()),
            sync,
        });
        let subscriber = Subscriber {
            hub: Arc::downgrade(&hub),
            conn,
            subscribed: HashMap::new(),
        };
        tokio::spawn(subscriber.run(requests, replaced, killed.clone()));
        tokio::spawn(dispatcher(Arc::downgrade(&hub), pushes, killed));
        hub
    }

    /// Subscribes to `channel` (once per client) and returns when the server confirmed it, or
    /// with `confirmed` false when it could not.
    pub(crate) async fn subscribe(self: &Arc<Hub>, channel: &str) -> Subscription {
        let rx = {
            let mut channels = locked(&self.channels);
            let entry = channels
                .entry(channel.to_string())
                .or_insert_with(|| Channel {
                    bump: watch::channel(0).0,
                    waiters: 0,
                });
            entry.waiters += 1;
            entry.bump.subscribe()
        };
        // Built before the wait, so a caller that stops waiting still drops its interest.
        let mut sub = Subscription {
            hub: self.clone(),
            channel: channel.to_string(),
            rx,
            confirmed: false,
        };
        let (done, confirmed) = oneshot::channel();
        let _ = self.sync.send(Sync {
            channel: channel.to_string(),
            done: Some(done),
        });
        sub.confirmed = confirmed.await.unwrap_or(false);
        sub
    }

    fn bump(&self, channel: &str) {
        if let Some(c) = locked(&self.channels).get(channel) {
            c.bump.send_modify(|n| *n += 1);
        }
    }

    fn bump_all(&self) {
        for c in locked(&self.channels).values() {
            c.bump.send_modify(|n| *n += 1);
        }
    }

    fn wanted(&self, channel: &str) -> bool {
        locked(&self.channels)
            .get(channel)
            .is_some_and(|c| c.waiters > 0)
    }

    fn all_wanted(&self) -> Vec<String> {
        locked(&self.channels).keys().cloned().collect()
    }
}

impl Subscription {
    /// Forgets the messages seen so far: call it before looking at the state the channel
    /// announces changes of.
    pub(crate) fn mark(&mut self) {
        self.rx.borrow_and_update();
    }

    /// Resolves once a message came after the last [`mark`](Subscription::mark).
    pub(crate) async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = locked(&self.hub.channels);
        if let Some(c) = channels.get_mut(&self.channel) {
            c.waiters -= 1;
            if c.waiters == 0 {
                channels.remove(&self.channel);
            }
        }
        drop(channels);
        let _ = self.hub.sync.send(Sync {
            channel: std::mem::take(&mut self.channel),
            done: None,
        });
    }
}

/// How long a subscription outlives its last waiter: the next contended acquire of the same
/// id (a lock passed around) then costs no SUBSCRIBE and UNSUBSCRIBE.
const LINGER: Duration = Duration::from_secs(5);

/// Sends SUBSCRIBE and UNSUBSCRIBE one at a time, so that they reach the server in the order
/// the waiters came and went.
struct Subscriber {
    hub: std::sync::Weak<Hub>,
    conn: Conn,
    /// The channels subscribed to: in use (None) or without waiters since (Some).
    subscribed: HashMap<String, Option<Instant>>,
}

/// What the subscriber does next.
enum Next {
    Sync(Sync),
    Resubscribe,
    Sweep,
}

impl Subscriber {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Sync>,
        mut replaced: mpsc::UnboundedReceiver<()>,
        mut killed: watch::Receiver<bool>,
    ) {
        loop {
            let sweep = self.next_sweep();
            let next = tokio::select! {
                _ = killed.wait_for(|k| *k) => return,
                r = requests.recv() => match r {
                    Some(r) => Next::Sync(r),
                    None => return,
                },
                Some(()) = replaced.recv() => Next::Resubscribe,
                () = sleep_until(sweep) => Next::Sweep,
            };
            let alive = match next {
                Next::Sync(r) => self.sync(r).await,
                Next::Resubscribe => self.resubscribe().await,
                Next::Sweep => self.sweep().await,
            };
            if !alive {
                return;
            }
        }
    }

    /// When the oldest idle subscription is due to go.
    fn next_sweep(&self) -> Option<Instant> {
        self.subscribed
            .values()
            .flatten()
            .min()
            .map(|idle| *idle + LINGER)
    }

    /// Brings one channel in line with its waiters. False once the hub is gone.
    async fn sync(&mut self, request: Sync) -> bool {
        let Some(hub) = self.hub.upgrade() else {
            return false;
        };
        let wanted = hub.wanted(&request.channel);
        drop(hub);
        let ok = match (wanted, self.subscribed.get_mut(&request.channel)) {
            (true, None) => match self.conn.subscribe(&request.channel).await {
                Ok(()) => self
                    .subscribed
                    .insert(request.channel.clone(), None)
                    .is_none(),
                Err(e) => {
                    tracing::debug!(backend = BACKEND, error = %e, "subscribe failed");
                    false
                }
            },
            (true, Some(idle)) => {
                *idle = None;
                true
            }
            (false, Some(idle)) => {
                idle.get_or_insert_with(Instant::now);
                true
            }
            (false, None) => true,
        };
        if let Some(done) = request.done {
            let _ = done.send(ok);
        }
        true
    }

    /// Unsubscribes from the channels idle for [`LINGER`] and still without waiters. False
    /// once the hub is gone.
    async fn sweep(&mut self) -> bool {
        let Some(hub) = self.hub.upgrade() else {
            return false;
        };
        let now = Instant::now();
        let due: Vec<String> = self
            .subscribed
            .iter()
            .filter(|(channel, idle)| {
                idle.is_some_and(|t| now >= t + LINGER) && !hub.wanted(channel)
            })
            .map(|(channel, _)| channel.clone())
            .collect();
        drop(hub);
        for channel in due {
            self.subscribed.remove(&channel);
            if let Err(e) = self.conn.unsubscribe(&channel).await {
                tracing::debug!(backend = BACKEND, error = %e, "unsubscribe failed");
            }
        }
        true
    }

    /// The connection was replaced: subscribes to every wanted channel on the new one, then
    /// wakes every waiter (a release may have been published meanwhile). False once the hub
    /// is gone.
    async fn resubscribe(&mut self) -> bool {
        let Some(hub) = self.hub.upgrade() else {
            return false;
        };
        self.subscribed.clear();
        for channel in hub.all_wanted() {
            match self.conn.subscribe(&channel).await {
                Ok(()) => {
                    self.subscribed.insert(channel, None);
                }
                Err(e) => tracing::debug!(backend = BACKEND, error = %e, "resubscribe failed"),
            }
        }
        hub.bump_all();
        true
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns pushes into bumps of the channels' counters.
async fn dispatcher(
    hub: std::sync::Weak<Hub>,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut killed: watch::Receiver<bool>,
) {
    loop {
        let push = tokio::select! {
            _ = killed.wait_for(|k| *k) => return,
            p = pushes.recv() => match p { Some(p) => p, None => return },
        };
        let Some(hub) = hub.upgrade() else { return };
        match push.kind {
            PushKind::Message => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    if let Ok(channel) = std::str::from_utf8(channel) {
                        hub.bump(channel);
                    }
                }
            }
            PushKind::Disconnection => hub.bump_all(),
            _ => {}
        }
    }
}
