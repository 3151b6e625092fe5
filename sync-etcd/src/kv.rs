//! Sending requests: each to the current endpoint, within the request timeout, resent when it
//! surely never left (or, for a read, when it went unanswered); anything that may have reached
//! etcd is returned as is for the caller to resolve.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::time::Instant;

use crate::{
    BACKEND,
    endpoints::Endpoints,
    error::{answer_lost, leaderless, not_delivered, timed_out},
};

/// What the etcd client answers.
pub(crate) type EtcdResult<T> = std::result::Result<T, etcd_client::Error>;

/// Whether a request may be sent again after it went unanswered (it may have been applied).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resend {
    /// Only when it surely never left: a write whose effect must not happen twice.
    IfUndelivered,
    /// Also after the request timeout: reads, and writes whose repetition changes nothing.
    IfUnanswered,
}

/// How requests are sent: where, how often, and how long each attempt may wait.
#[derive(Clone)]
pub(crate) struct Sender {
    pub(crate) endpoints: Arc<Endpoints>,
    /// How often a request is sent in all, at most.
    pub(crate) tries: usize,
    pub(crate) timeout: Duration,
}

impl Sender {
    /// Sends `call` (a request made afresh for each attempt, on the client it is given) to the
    /// current endpoint. An attempt that was not delivered, or not answered within the timeout,
    /// moves the client on to the next endpoint; it is sent again there if it surely never
    /// left, or, with [`Resend::IfUnanswered`], after one timeout (a second would make the call
    /// take more than twice the request timeout).
    pub(crate) async fn send<T, F, Fut>(&self, resend: Resend, mut call: F) -> EtcdResult<T>
    where
        F: FnMut(&etcd_client::Client) -> Fut,
        Fut: Future<Output = EtcdResult<T>>,
    {
        let mut attempt = 0;
        let mut unanswered = 0;
        loop {
            attempt += 1;
            let picked = self.endpoints.pick().await;
            let failed = match picked {
                Ok((index, client)) => {
                    match answered_within(self.timeout, Box::pin(call(client))).await {
                        Err(e) if not_delivered(&e) || timed_out(&e) => {
                            self.endpoints.pass_over(index);
                            e
                        }
                        other => return other,
                    }
                }
                Err(e) => e,
            };
            if timed_out(&failed) {
                unanswered += 1;
            }
            let again = match resend {
                _ if attempt >= self.tries => false,
                _ if not_delivered(&failed) => true,
                Resend::IfUnanswered => unanswered == 1 && timed_out(&failed),
                Resend::IfUndelivered => false,
            };
            if !again {
                return Err(failed);
            }
            tracing::debug!(backend = BACKEND, attempt, error = %failed, "request not delivered or not answered; sending it again");
            tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
        }
    }
}

/// How long a request whose repetition changes nothing waits for its answer before it is
/// sent again elsewhere (see [`Sender::send_hedged`]), at most.
const HEDGE: Duration = Duration::from_secs(1);

/// The sends of one hedged request still out: each with the endpoint it went to.
type InFlight<'a, T> =
    FuturesUnordered<std::pin::Pin<Box<dyn Future<Output = (usize, EtcdResult<T>)> + Send + 'a>>>;

impl Sender {
    /// Sends `call`, a request whose repetition changes nothing (the delete of a key no one
    /// writes again, a lease revoke), so that an endpoint holding it unanswered costs a
    /// second rather than a request timeout: a follower that forwarded it to a leader that
    /// just died never answers, while etcd answers a healthy delete in milliseconds.
    ///
    /// While no answer has come it is sent again on the next endpoint every [`HEDGE`] (a
    /// quarter of the request timeout if that is shorter); at once when a send fails without
    /// an answer; a moment later when etcd answers that it has no leader. The sends already
    /// out stay in flight and the first answer wins. At most `tries` sends that got no
    /// answer, within one request timeout. `resending` runs before each send that follows
    /// one which may have been applied.
    pub(crate) async fn send_hedged<T, F, Fut>(
        &self,
        mut call: F,
        mut resending: impl FnMut(),
    ) -> EtcdResult<T>
    where
        F: FnMut(&etcd_client::Client) -> Fut,
        Fut: Future<Output = EtcdResult<T>> + Send,
    {
        let hedge = HEDGE.min(self.timeout / 4);
        let give_up = Instant::now() + self.timeout;
        let mut out: InFlight<'_, T> = FuturesUnordered::new();
        let (mut sent, mut maybe_applied, mut last) = (0, false, None);
        // When to send next, and the endpoint of the latest send.
        let (mut next_send, mut latest) = (Some(Instant::now()), None);
        loop {
            if let Some(at) = next_send.filter(|at| *at <= Instant::now() && sent < self.tries) {
                sent += 1;
                if maybe_applied {
                    resending();
                }
                match self.endpoints.pick().await {
                    Ok((index, client)) => {
                        latest = Some(index);
                        let request = call(client);
                        out.push(Box::pin(async move { (index, request.await) }));
                    }
                    Err(e) => last = Some(e),
                }
                next_send = Some(at.max(Instant::now()) + hedge);
            }
            if sent >= self.tries && out.is_empty() {
                return Err(last.unwrap_or_else(|| no_answer(self.timeout)));
            }
            let send_at = next_send.filter(|_| sent < self.tries).unwrap_or(give_up);
            let answer = tokio::select! {
                Some(answer) = out.next() => answer,
                _ = tokio::time::sleep_until(send_at), if send_at < give_up => {
                    // Unanswered so far: the endpoint holding it is passed over.
                    if let Some(index) = latest.filter(|_| !out.is_empty()) {
                        self.endpoints.pass_over(index);
                        maybe_applied = true;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(give_up) => {
                    return Err(last.unwrap_or_else(|| no_answer(self.timeout)));
                }
            };
            match answer {
                (index, Err(e)) if not_delivered(&e) || answer_lost(&e) => {
                    maybe_applied |= !not_delivered(&e);
                    if leaderless(&e) {
                        // An answer, not a lost send: it does not count against `tries`,
                        // so an election is waited out up to the timeout.
                        sent -= 1;
                        next_send = Some(Instant::now() + hedge / 4);
                    } else {
                        self.endpoints.pass_over(index);
                        next_send = Some(Instant::now());
                    }
                    last = Some(e);
                }
                (_, answer) => return answer,
            }
        }
    }
}

/// The error of a request that got no answer within `limit`: it may have been applied.
fn no_answer(limit: Duration) -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within the request timeout ({limit:?}); it may have been applied"),
    ))
}

/// `request`, failed with a timeout (Unavailable, never resent: it may have been applied)
/// when no answer comes within `limit`.
pub(crate) async fn answered_within<T>(
    limit: Duration,
    request: impl Future<Output = EtcdResult<T>>,
) -> EtcdResult<T> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| Err(no_answer(limit)))
}

/// The KV API through a [`Sender`]: reads are resent after a timeout, writes only when
/// undelivered.
pub(crate) struct Kv {
    sender: Sender,
}

impl Kv {
    pub(crate) fn new(sender: Sender) -> Kv {
        Kv { sender }
    }

    pub(crate) async fn get(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::GetOptions>,
    ) -> EtcdResult<etcd_client::GetResponse> {
        let key = key.into();
        self.sender
            .send(Resend::IfUnanswered, |c| {
                let (mut kv, key, opts) = (c.kv_client(), key.clone(), opts.clone());
                async move { kv.get(key, opts).await }
            })
            .await
    }

    /// Takes the value by reference: each attempt needs its own copy anyway.
    pub(crate) async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: &[u8],
        opts: Option<etcd_client::PutOptions>,
    ) -> EtcdResult<etcd_client::PutResponse> {
        let key = key.into();
        self.sender
            .send(Resend::IfUndelivered, |c| {
                let (mut kv, key, value) = (c.kv_client(), key.clone(), value.to_vec());
                let opts = opts.clone();
                async move { kv.put(key, value, opts).await }
            })
            .await
    }

    pub(crate) async fn delete(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::DeleteOptions>,
    ) -> EtcdResult<etcd_client::DeleteResponse> {
        let key = key.into();
        self.sender
            .send(Resend::IfUndelivered, |c| {
                let (mut kv, key, opts) = (c.kv_client(), key.clone(), opts.clone());
                async move { kv.delete(key, opts).await }
            })
            .await
    }

    /// Deletes `key`, a key whose name is never written again once a delete of it may have
    /// been applied, so that sending the delete again changes nothing: hedged (see
    /// [`Sender::send_hedged`]). `resending` runs before each send that follows one which may
    /// have been applied (a later answer of "nothing deleted" then proves nothing).
    pub(crate) async fn delete_once_written(
        &mut self,
        key: impl Into<Vec<u8>>,
        resending: impl FnMut(),
    ) -> EtcdResult<etcd_client::DeleteResponse> {
        let key = key.into();
        let call = |c: &etcd_client::Client| {
            let (mut kv, key) = (c.kv_client(), key.clone());
            async move { kv.delete(key, None).await }
        };
        self.sender.send_hedged(call, resending).await
    }

    pub(crate) async fn txn(
        &mut self,
        txn: etcd_client::Txn,
    ) -> EtcdResult<etcd_client::TxnResponse> {
        self.sender
            .send(Resend::IfUndelivered, |c| {
                let (mut kv, txn) = (c.kv_client(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await
    }
}
