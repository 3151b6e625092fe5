//! The endpoints of one client, each with its own connection, and the one requests go to now.
//!
//! etcd-client's balanced channel spreads requests over every endpoint and cannot be told to
//! avoid one: a member that accepts and never answers (stopped, or stalled on its disk) keeps
//! getting a share of the calls, and each of those waits out the request timeout. Here every
//! request goes to the current endpoint; one that leaves a request undelivered or unanswered is
//! passed over for the next, so a stalled member costs one request timeout, once.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use etcd_client::ConnectOptions;
use tokio::sync::OnceCell;

use crate::{
    BACKEND,
    error::{not_delivered, timed_out},
    kv::{EtcdResult, answered_within},
};

pub(crate) struct Endpoints {
    urls: Vec<String>,
    options: ConnectOptions,
    /// How long connecting one endpoint (and authenticating on it) may take.
    connect_timeout: Duration,
    clients: Vec<OnceCell<etcd_client::Client>>,
    current: AtomicUsize,
    /// Counts the moves from one endpoint to another: a watch open on the old one may sit
    /// there silently, so watchers re-open theirs when it changes.
    moves: tokio::sync::watch::Sender<u64>,
}

impl Endpoints {
    /// Nothing is dialled yet: each endpoint connects when it is first picked.
    pub(crate) fn new(
        urls: Vec<String>,
        options: ConnectOptions,
        connect_timeout: Duration,
    ) -> Self {
        let clients = urls.iter().map(|_| OnceCell::new()).collect();
        Endpoints {
            urls,
            options,
            connect_timeout,
            clients,
            current: AtomicUsize::new(0),
            moves: tokio::sync::watch::channel(0).0,
        }
    }

    /// The current endpoint (its index, for [`pass_over`](Self::pass_over)) and its client,
    /// connecting it first if need be. An endpoint that cannot be reached is passed over;
    /// any other failure (bad credentials) is returned at once, as is the last failure when no
    /// endpoint can be reached.
    pub(crate) async fn pick(&self) -> EtcdResult<(usize, &etcd_client::Client)> {
        let start = self.current.load(Ordering::Acquire);
        let count = self.clients.len();
        let mut last = None;
        for step in 0..count {
            let index = (start + step) % count;
            match self.connect(index).await {
                Ok(client) => {
                    if step > 0 {
                        self.move_to(start, index);
                    }
                    return Ok((index, client));
                }
                Err(e) if not_delivered(&e) || timed_out(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| etcd_client::Error::InvalidArgs("no endpoints".into())))
    }

    /// Moves on from endpoint `index` after a request to it went undelivered or unanswered.
    /// Only if it is still the current one: concurrent failures move on once, not once each.
    pub(crate) fn pass_over(&self, index: usize) {
        let next = (index + 1) % self.clients.len();
        if self.move_to(index, next) {
            tracing::warn!(
                backend = BACKEND,
                from = %self.urls[index],
                to = %self.urls[next],
                "endpoint did not deliver or answer; moving to the next"
            );
        }
    }

    /// How many endpoints there are.
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// Makes endpoint `index` the current one: it just answered when others did not.
    pub(crate) fn prefer(&self, index: usize) {
        let now = self.current.swap(index, Ordering::AcqRel);
        if now != index {
            self.moves.send_modify(|n| *n += 1);
        }
    }

    /// Changes whenever the client moves to another endpoint.
    pub(crate) fn moves(&self) -> tokio::sync::watch::Receiver<u64> {
        self.moves.subscribe()
    }

    /// Moves from endpoint `from` to `to` if `from` is still the current one; whether it did.
    fn move_to(&self, from: usize, to: usize) -> bool {
        let moved = from != to
            && self
                .current
                .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if moved {
            self.moves.send_modify(|n| *n += 1);
        }
        moved
    }

    /// Endpoint `index`'s client, borrowed: a request clones only the service client it uses
    /// (cloning the whole client clones every service's channel). Without auth etcd-client
    /// dials lazily and this is immediate; with auth it authenticates, which gets at most the
    /// connect timeout.
    pub(crate) async fn connect(&self, index: usize) -> EtcdResult<&etcd_client::Client> {
        if let Some(client) = self.clients[index].get() {
            return Ok(client);
        }
        // Boxed: the dial's future is kilobytes, and every request's future would carry it.
        let dial = self.clients[index].get_or_try_init(|| {
            let dial =
                etcd_client::Client::connect([&self.urls[index]], Some(self.options.clone()));
            answered_within(self.connect_timeout, dial)
        });
        Box::pin(dial).await
    }
}
