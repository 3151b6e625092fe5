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
//!
//! etcd answers each create in the order it was sent. A create it refuses is answered with no
//! watch id (-1), so the hub keeps the creates it sent in order and takes the refused one from
//! the front. A refusal for a stale auth token (the stream keeps the token it was opened with,
//! and etcd checks it on every create) closes the stream; the next one is opened with a fresh
//! token. Any other refusal ends that watch as cancelled, so its owner reads again.
//!
//! Held keys are monitored by the hub itself ([`Watches::monitor`]): no task, channel or
//! timer per held key, only a small entry in the hub, which fires the holder's loss trigger
//! on the key's delete and carries the watch over to every new stream.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use etcd_client::{WatchFilterType, WatchOptions, WatchResponse, WatchResponseStream};
use sync_core::raw::LossTrigger;
use sync_kit::locked;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::AbortHandle,
    time::Instant,
};

use crate::{
    BACKEND,
    contention::ContenderKey,
    endpoints::Endpoints,
    error::{not_delivered, refused_for_good, timed_out},
    kv::{EtcdResult, Kv, Sender, answered_within},
};

/// How long a held key waits before its monitor's watch is added: longer than an uncontended
/// hold or a quick turn in a queue, and short against the 2 s a deleted key's holder is
/// promised to hear of it in.
const MONITOR_GRACE: Duration = Duration::from_millis(500);

/// Graces ending this soon after the one the hub woke for end with it: under a steady stream of
/// short holds the hub wakes about ten times a second, not once per hold.
const GRACE_SLACK: Duration = Duration::from_millis(100);

/// At most this many monitors' creates are sent and not answered yet: a burst of held keys
/// (thousands taken at once) is watched a few at a time rather than queued whole in this
/// client's buffers, which would keep their memory long after.
const CREATES_IN_FLIGHT: usize = 64;

/// The pause before a failed stream is opened again for the monitors, so a failing server is
/// not spun on.
const REOPEN_PAUSE: Duration = Duration::from_millis(200);

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
    /// The young monitors went from none to some: the hub wakes when the first one's grace
    /// ends.
    Young,
    /// A monitored key was read again after etcd cancelled its watch.
    Checked(i64, Checked),
}

/// A held key as its monitor keeps it: what to watch, and the trigger to fire.
pub(crate) struct Monitored {
    /// Shared with the holding.
    key: ContenderKey,
    /// The key's create revision: a key read back with another one is a new key.
    rev: i64,
    /// The revision its watch starts at.
    from: i64,
    /// Its watch id on the stream: its registration's id, until etcd cancels the watch.
    watch: i64,
    trigger: LossTrigger,
    state: MonitorState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MonitorState {
    /// Waiting for a stream to be created on.
    Pending,
    /// Watched on the current stream.
    Created,
    /// Being read again (its watch was cancelled).
    Checking,
}

/// What a re-read of a monitored key found.
pub(crate) enum Checked {
    /// The key with this create revision, at this store revision.
    Found(i64, i64),
    Gone,
    /// etcd refuses this client the key for good (its rights were taken away): it can no
    /// longer tell whether it holds it.
    Refused(String),
}

/// A message for the stream, sent by its writer task.
enum Outgoing {
    Create(Vec<u8>, WatchOptions),
    Cancel(i64),
}

/// The client's shared watch stream: a handle to its hub task, started with the first watch.
pub(crate) struct Watches {
    link: Arc<Link>,
    hub: Mutex<Option<Hub>>,
    /// Watch ids, shared with the hub (which gives a monitor a new one after etcd cancels
    /// its watch: etcd keeps a cancelled id taken on its stream).
    next_id: Arc<AtomicI64>,
}

impl Watches {
    /// The hub sends its requests as `sender` does (it re-reads monitored keys with it).
    pub(crate) fn new(sender: Sender, killed: watch::Receiver<bool>) -> Watches {
        let (commands, rx) = mpsc::unbounded_channel();
        let next_id = Arc::new(AtomicI64::new(1));
        let young = Arc::<Mutex<Young>>::default();
        Watches {
            link: Arc::new(Link {
                commands: commands.clone(),
                young: young.clone(),
            }),
            hub: Mutex::new(Some(Hub {
                endpoints: sender.endpoints.clone(),
                timeout: sender.timeout,
                sender,
                killed,
                commands: rx,
                to_self: commands.downgrade(),
                next_id: next_id.clone(),
                young,
                stale_token: AtomicBool::new(false),
            })),
            next_id,
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

    /// Monitors the held `key` (created at `rev`) until the registration is dropped: fires
    /// `trigger` once the key is deleted. The watch is sent once the key was held for a grace,
    /// from `rev + 1`, so a delete meanwhile is
    /// still seen; it is carried over to every new stream, and a key whose watch etcd cancels
    /// (compacted) is read again.
    pub(crate) fn monitor(
        &self,
        key: ContenderKey,
        rev: i64,
        trigger: LossTrigger,
    ) -> Registration {
        let id = self.start_hub();
        let monitored = Monitored {
            key,
            rev,
            from: rev + 1,
            watch: id,
            trigger,
            state: MonitorState::Pending,
        };
        if locked(&self.link.young).add(id, monitored) {
            let _ = self.link.commands.send(Command::Young);
        }
        Registration {
            id,
            link: self.link.clone(),
        }
    }

    /// Starts the hub if it is not running yet; a new watch id.
    fn start_hub(&self) -> i64 {
        if let Some(hub) = locked(&self.hub).take() {
            tokio::spawn(hub.run());
        }
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn add(&self, key: Vec<u8>, opts: WatchOptions, sink: Sink) -> Registration {
        let id = self.start_hub();
        // A hub that is gone (the client was killed) drops the sink: the watch reads as failed.
        let _ = self.link.commands.send(Command::Add {
            id,
            key,
            opts: opts.with_watch_id(id),
            sink,
        });
        Registration {
            id,
            link: self.link.clone(),
        }
    }
}

/// What registrations share: the way to the hub, and the young monitors.
struct Link {
    commands: mpsc::UnboundedSender<Command>,
    young: Arc<Mutex<Young>>,
}

/// Held keys in their grace, kept beside the hub rather than sent to it: young keys are not
/// watched yet, since most short holds (an uncontended acquire and release, a quick turn in a
/// busy queue) end within the grace, and each watch added and cancelled is work for etcd and
/// for this client. A hold that starts and ends here costs the hub no wake-up either.
#[derive(Default)]
struct Young {
    by_id: HashMap<i64, Monitored>,
    /// When each one's grace ends, oldest first (ids already gone are skipped).
    order: VecDeque<(Instant, i64)>,
    /// The hub knows there are some (it wakes for the first one's grace end).
    told: bool,
}

impl Young {
    /// Adds monitor `id`; true when the hub must be told (there were none).
    fn add(&mut self, id: i64, m: Monitored) -> bool {
        self.by_id.insert(id, m);
        self.order.push_back((Instant::now() + MONITOR_GRACE, id));
        !std::mem::replace(&mut self.told, true)
    }

    /// When the first grace ends.
    fn next(&self) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at)
    }

    /// Takes the monitors whose grace is over by `now`.
    fn grown(&mut self, now: Instant) -> Vec<(i64, Monitored)> {
        let mut grown = Vec::new();
        while let Some(&(at, id)) = self.order.front() {
            if at > now {
                break;
            }
            self.order.pop_front();
            grown.extend(self.by_id.remove(&id).map(|m| (id, m)));
        }
        if self.order.is_empty() {
            self.told = false;
            // A burst (thousands of locks taken at once) leaves nothing allocated behind.
            self.by_id = HashMap::new();
            self.order = VecDeque::new();
        }
        grown
    }
}

/// Cancels its watch when dropped: a message to the hub, never a wait.
pub(crate) struct Registration {
    id: i64,
    link: Arc<Link>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let young = locked(&self.link.young).by_id.remove(&self.id);
        // Dropped outside the lock (it fires the holder's signal).
        if young.is_none() {
            let _ = self.link.commands.send(Command::Remove(self.id));
        }
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
    /// For re-reading monitored keys.
    sender: Sender,
    killed: watch::Receiver<bool>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Where a re-read's answer comes back (weak: the hub ends with the last registration).
    to_self: mpsc::WeakUnboundedSender<Command>,
    next_id: Arc<AtomicI64>,
    young: Arc<Mutex<Young>>,
    /// etcd refused a create for the stream's auth token: the next stream is opened with a
    /// fresh one.
    stale_token: AtomicBool,
}

/// What the hub keeps: the stream, the watches on it and the monitored keys.
struct State {
    conn: Conn,
    watches: HashMap<i64, Sink>,
    /// By registration id.
    monitors: HashMap<i64, Monitored>,
    /// The registration of each monitor whose watch id is another (see [`Monitored::watch`]).
    renamed: HashMap<i64, i64>,
    /// When the monitors' stream is opened again after it was lost.
    reopen_at: Option<Instant>,
    /// The watch ids of the creates sent on this stream and not answered yet, in order.
    creating: VecDeque<i64>,
    /// Pending monitors waiting for fewer creates in flight (some may have gone since).
    queued: VecDeque<i64>,
    /// The re-reads of monitors being checked, by registration id: a monitor that goes
    /// (released, lost, or the hub with it) stops its re-read, which otherwise retries for as
    /// long as etcd cannot be reached.
    checks: HashMap<i64, AbortHandle>,
}

impl Drop for State {
    fn drop(&mut self) {
        self.checks.values().for_each(AbortHandle::abort);
    }
}

impl State {
    /// The next time the hub has something to do on its own.
    fn next_wake(&self, young: Option<Instant>) -> Option<Instant> {
        match (young, self.reopen_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// etcd refuses this client's credentials or rights for good: no held key can be watched
    /// any more, so every holder is told (retrying would log in again and again).
    fn refused(&mut self, e: &etcd_client::Error) {
        let reason = format!("watching the key was refused: {e}");
        let ids: Vec<i64> = self.monitors.keys().copied().collect();
        for id in ids {
            fire(self, id, &reason);
        }
    }

    /// The stream is gone: every watch on it ends, and the monitors wait for the next one,
    /// opened after `pause`.
    fn stream_lost(&mut self, why: Ended, pause: Duration) {
        self.creating.clear();
        end_all(&mut self.watches, why);
        let mut pending = false;
        for m in self.monitors.values_mut() {
            if m.state == MonitorState::Created {
                m.state = MonitorState::Pending;
            }
            pending |= m.state == MonitorState::Pending;
        }
        if pending {
            self.reopen_at = Some(Instant::now() + pause);
        }
    }
}

impl Hub {
    async fn run(mut self) {
        let mut st = State {
            conn: Conn::Closed,
            watches: HashMap::new(),
            monitors: HashMap::new(),
            renamed: HashMap::new(),
            reopen_at: None,
            creating: VecDeque::new(),
            queued: VecDeque::new(),
            checks: HashMap::new(),
        };
        let mut moves = self.endpoints.moves();
        moves.mark_unchanged();
        let mut killed = self.killed.clone();
        loop {
            let wake = st.next_wake(locked(&self.young).next());
            tokio::select! {
                biased;
                _ = killed.wait_for(|k| *k) => {
                    end_all(&mut st.watches, Ended::Failed);
                    // The monitors' triggers go with the hub (the young ones too): their
                    // holders read it as lost.
                    let young = std::mem::take(&mut *locked(&self.young));
                    drop(young);
                    return;
                }
                Ok(()) = moves.changed() => {
                    if !matches!(st.conn, Conn::Closed) {
                        tracing::debug!(backend = BACKEND, watches = st.watches.len(), monitors = st.monitors.len(), "client moved; re-opening the watch stream");
                        st.conn = Conn::Closed;
                        st.stream_lost(Ended::Moved, Duration::ZERO);
                    }
                }
                event = conn_event(&mut st.conn) => match event {
                    ConnEvent::Opened(Ok(responses)) => {
                        if let Conn::Opening(_, out) = std::mem::replace(&mut st.conn, Conn::Closed) {
                            st.conn = Conn::Open(Box::new(responses), out);
                        }
                    }
                    ConnEvent::Opened(Err(e)) => {
                        tracing::debug!(backend = BACKEND, error = %e, "opening the watch stream failed");
                        st.conn = Conn::Closed;
                        if refused_for_good(&e) {
                            st.refused(&e);
                        }
                        st.stream_lost(Ended::Failed, REOPEN_PAUSE);
                    }
                    ConnEvent::Message(Ok(Some(resp))) => {
                        self.route(resp, &mut st);
                        self.send_queued(&mut st);
                    }
                    ConnEvent::Message(ended) => {
                        if let Err(e) = &ended {
                            tracing::debug!(backend = BACKEND, error = %e, "the watch stream failed");
                        }
                        st.conn = Conn::Closed;
                        st.stream_lost(Ended::Failed, REOPEN_PAUSE);
                    }
                },
                () = sleep_until(wake) => self.on_time(&mut st),
                command = self.commands.recv() => match command {
                    None => return,
                    Some(command) => self.command(command, &mut st),
                },
            }
        }
    }

    fn command(&self, command: Command, st: &mut State) {
        match command {
            Command::Add {
                id,
                key,
                opts,
                sink,
            } => {
                self.send_create(st, id, key, opts);
                st.watches.insert(id, sink);
            }
            Command::Remove(id) => {
                if let Some(check) = st.checks.remove(&id) {
                    check.abort();
                }
                let on_stream = match st.monitors.remove(&id) {
                    Some(m) => {
                        st.renamed.remove(&m.watch);
                        (m.state == MonitorState::Created).then_some(m.watch)
                    }
                    None => st.watches.remove(&id).map(|_| id),
                };
                if let (Some(watch), Some(out)) = (on_stream, st.conn.outgoing()) {
                    let _ = out.send(Outgoing::Cancel(watch));
                }
            }
            // The loop's next wake-up now counts the young monitors.
            Command::Young => {}
            Command::Checked(id, found) => {
                st.checks.remove(&id);
                let Some(m) = st
                    .monitors
                    .get_mut(&id)
                    .filter(|m| m.state == MonitorState::Checking)
                else {
                    return;
                };
                match found {
                    Checked::Found(rev, at) if rev == m.rev => {
                        m.from = at + 1;
                        m.state = MonitorState::Pending;
                        // etcd keeps the id of a watch it cancelled taken on its stream.
                        st.renamed.remove(&m.watch);
                        m.watch = self.next_id.fetch_add(1, Ordering::Relaxed);
                        st.renamed.insert(m.watch, id);
                        self.create(id, st);
                    }
                    Checked::Found(..) | Checked::Gone => fire(st, id, "the key was deleted"),
                    Checked::Refused(why) => fire(st, id, &why),
                }
            }
        }
    }

    /// Ends the graces that are over, and re-opens the monitors' stream when it is time.
    fn on_time(&self, st: &mut State) {
        let now = Instant::now();
        let grown = locked(&self.young).grown(now + GRACE_SLACK);
        st.monitors.reserve(grown.len());
        for (id, m) in grown {
            st.monitors.insert(id, m);
            self.create(id, st);
        }
        if st.reopen_at.is_some_and(|at| at <= now) {
            st.reopen_at = None;
            self.create_pending(st);
        }
    }

    /// Sends pending monitor `id`'s watch (opening a stream if there is none, and then also
    /// every other pending monitor's).
    fn create(&self, id: i64, st: &mut State) {
        let Some(m) = st.monitors.get_mut(&id) else {
            return;
        };
        // Sent once per stream: opening one sends the others' already.
        if m.state != MonitorState::Pending {
            return;
        }
        if st.conn.outgoing().is_some() && st.creating.len() >= CREATES_IN_FLIGHT {
            st.queued.push_back(id);
            return;
        }
        m.state = MonitorState::Created;
        let (watch, key, opts) = (
            m.watch,
            m.key.text().into_bytes(),
            monitor_opts(m.watch, m.from),
        );
        if self.send_create(st, watch, key, opts) {
            self.create_pending(st);
        }
    }

    /// Sends watch `watch`'s create on the stream, opening one if there is none (then true).
    fn send_create(&self, st: &mut State, watch: i64, key: Vec<u8>, opts: WatchOptions) -> bool {
        let opened = match st.conn.outgoing() {
            Some(out) => {
                let _ = out.send(Outgoing::Create(key, opts));
                false
            }
            None => {
                st.conn = self.open_with(key, opts);
                st.creating.clear();
                true
            }
        };
        st.creating.push_back(watch);
        opened
    }

    /// Sends the queued monitors' watches while fewer creates than the bound are in flight.
    fn send_queued(&self, st: &mut State) {
        while st.creating.len() < CREATES_IN_FLIGHT && st.conn.outgoing().is_some() {
            let Some(id) = st.queued.pop_front() else {
                return;
            };
            self.create(id, st);
        }
    }

    /// Sends every pending monitor's watch (on a stream that is open or opening), as many as
    /// the bound lets through; the rest are queued.
    fn create_pending(&self, st: &mut State) {
        // Every pending one is walked again here.
        st.queued.clear();
        let pending: Vec<i64> = st
            .monitors
            .iter()
            .filter(|(_, m)| m.state == MonitorState::Pending)
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.create(id, st);
        }
    }

    /// Starts opening a stream on the current endpoint, with `key`'s watch as its first
    /// message (etcd-client opens a stream with one); later ones queue until it is open.
    fn open_with(&self, key: Vec<u8>, opts: WatchOptions) -> Conn {
        let (out, mut queued) = mpsc::unbounded_channel::<Outgoing>();
        let endpoints = self.endpoints.clone();
        let timeout = self.timeout;
        let refresh = self.stale_token.swap(false, Ordering::Relaxed);
        let opening = async move {
            let (index, client) = endpoints.pick().await?;
            if refresh {
                match answered_within(timeout, client.refresh_token()).await {
                    // The credentials are refused: no stream will do.
                    Err(e) if refused_for_good(&e) => return Err(e),
                    // Else the new stream's creates are refused again and this comes back.
                    Err(e) => {
                        tracing::debug!(backend = BACKEND, error = %e, "refreshing the auth token failed");
                    }
                    Ok(()) => {}
                }
            }
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

    /// Hands `resp` to its watch or monitor.
    fn route(&self, resp: WatchResponse, st: &mut State) {
        let Some(watch) = self.answered(&resp, st) else {
            return;
        };
        let id = st.renamed.get(&watch).copied().unwrap_or(watch);
        let Some(m) = st.monitors.get_mut(&id).filter(|m| m.watch == watch) else {
            return route(watch, resp, &mut st.watches, &st.conn);
        };
        if resp.canceled() {
            // Compacted past its start, or refused: read the key again before watching it
            // again.
            log_cancelled(&resp, "held key's watch");
            m.state = MonitorState::Checking;
            let check = self.check(id, m.key.text().into_bytes());
            st.checks.insert(id, check);
        } else if !resp.events().is_empty() {
            fire(st, id, "the key was deleted");
            if let Some(out) = st.conn.outgoing() {
                let _ = out.send(Outgoing::Cancel(watch));
            }
        }
    }

    /// The watch `resp` is for. A create's answer is taken off the creates sent; a refused one
    /// (no id) is the oldest of them. None when there is nothing to route: unknown, or the
    /// stream is being replaced for a stale token.
    fn answered(&self, resp: &WatchResponse, st: &mut State) -> Option<i64> {
        let watch = resp.watch_id();
        if !resp.created() {
            return Some(watch);
        }
        if watch != -1 {
            if let Some(at) = st.creating.iter().position(|w| *w == watch) {
                st.creating.remove(at);
            }
            return Some(watch);
        }
        let refused = st.creating.pop_front()?;
        if stale_token(resp.cancel_reason()) {
            tracing::debug!(
                backend = BACKEND,
                reason = resp.cancel_reason(),
                "the watch stream's auth token is stale; opening a new stream"
            );
            self.stale_token.store(true, Ordering::Relaxed);
            st.conn = Conn::Closed;
            // Paused: a token that cannot be refreshed must not spin the hub.
            st.stream_lost(Ended::Failed, REOPEN_PAUSE);
            return None;
        }
        Some(refused)
    }

    /// Reads monitored `key` again (retrying until etcd answers) and tells the hub.
    fn check(&self, id: i64, key: Vec<u8>) -> AbortHandle {
        let (mut kv, to_hub, mut killed) = (
            Kv::new(self.sender.clone()),
            self.to_self.clone(),
            self.killed.clone(),
        );
        tokio::spawn(async move {
            let read = async {
                loop {
                    match kv.get(key.clone(), None).await {
                        Ok(resp) => {
                            let at = resp.header().map_or(0, |h| h.revision());
                            return match resp.kvs().first() {
                                Some(kv) => Checked::Found(kv.create_revision(), at),
                                None => Checked::Gone,
                            };
                        }
                        // No retry changes that; retrying would ask again for as long as
                        // the process lives.
                        Err(e) if refused_for_good(&e) => {
                            return Checked::Refused(format!("reading the key was refused: {e}"));
                        }
                        Err(e) => {
                            tracing::debug!(backend = BACKEND, error = %e, "checking a held key failed");
                            tokio::time::sleep(REOPEN_PAUSE).await;
                        }
                    }
                }
            };
            tokio::select! {
                found = read => {
                    if let Some(hub) = to_hub.upgrade() {
                        let _ = hub.send(Command::Checked(id, found));
                    }
                }
                _ = killed.wait_for(|k| *k) => {}
            }
        })
        .abort_handle()
    }
}

/// Monitor `id`'s key is gone (or can no longer be watched, `reason` says): its holder is
/// told.
fn fire(st: &mut State, id: i64, reason: &str) {
    if let Some(check) = st.checks.remove(&id) {
        check.abort();
    }
    if let Some(m) = st.monitors.remove(&id) {
        st.renamed.remove(&m.watch);
        tracing::warn!(backend = BACKEND, key = %m.key, token = m.rev, reason, "lost");
        m.trigger.fire(reason);
    }
}

/// A held key's watch: its deletes from `from` on (NoPut: every event is one).
fn monitor_opts(id: i64, from: i64) -> WatchOptions {
    WatchOptions::new()
        .with_start_revision(from)
        .with_filters([WatchFilterType::NoPut])
        .with_watch_id(id)
}

/// Sleeps until `at`; never without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

fn log_cancelled(resp: &WatchResponse, what: &str) {
    tracing::debug!(
        backend = BACKEND,
        id = resp.watch_id(),
        compacted = resp.compact_revision(),
        reason = resp.cancel_reason(),
        "{what} cancelled by etcd"
    );
}

/// Whether etcd refused a create for the token the stream was opened with (expired, or older
/// than a change to users and roles).
fn stale_token(reason: &str) -> bool {
    reason.contains("invalid auth token") || reason.contains("revision of auth store is old")
}

/// Hands `resp`, an answer to watch `id`, to its watch.
fn route(id: i64, resp: WatchResponse, watches: &mut HashMap<i64, Sink>, conn: &Conn) {
    if resp.canceled() {
        if let Some(sink) = watches.remove(&id) {
            log_cancelled(&resp, "watch");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn young_one(young: &mut Young, id: i64) -> (bool, sync_core::LossSignal) {
        let (trigger, signal) = sync_core::raw::loss_signal();
        let m = Monitored {
            key: ContenderKey::new("ns/a/", id),
            rev: id,
            from: id + 1,
            watch: id,
            trigger,
            state: MonitorState::Pending,
        };
        (young.add(id, m), signal)
    }

    #[tokio::test(start_paused = true)]
    async fn young_monitors_grow_up_after_their_grace_and_tell_the_hub_once() {
        let mut young = Young::default();
        let (tell_first, _a) = young_one(&mut young, 1);
        let (tell_second, _b) = young_one(&mut young, 2);
        assert!(tell_first && !tell_second, "the hub is told once per batch");
        // A hold that ended in its grace is gone before it grows up.
        young.by_id.remove(&2);
        assert!(young.grown(Instant::now()).is_empty());
        tokio::time::advance(MONITOR_GRACE).await;
        let grown: Vec<i64> = young
            .grown(Instant::now())
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(grown, vec![1]);
        assert!(young.next().is_none() && !young.told);
        let (tell_again, _c) = young_one(&mut young, 3);
        assert!(tell_again, "the hub is told again after the young ran out");
    }

    #[test]
    fn a_young_monitor_forgotten_with_the_hub_loses_its_hold() {
        let mut young = Young::default();
        let (_, signal) = young_one(&mut young, 1);
        assert!(!signal.is_lost());
        drop(std::mem::take(&mut young));
        assert!(signal.is_lost());
    }
}
