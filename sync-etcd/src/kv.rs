//! Sending requests: each to the current endpoint, within the request timeout, resent when it
//! surely never left (or, for a read, when it went unanswered); anything that may have reached
//! etcd is returned as is for the caller to resolve.

use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    BACKEND,
    endpoints::Endpoints,
    error::{not_delivered, timed_out},
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

/// `request`, failed with a timeout (Unavailable, never resent: it may have been applied)
/// when no answer comes within `limit`.
pub(crate) async fn answered_within<T>(
    limit: Duration,
    request: impl Future<Output = EtcdResult<T>>,
) -> EtcdResult<T> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            Err(etcd_client::Error::IoError(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within the request timeout ({limit:?}); it may have been applied"
                ),
            )))
        })
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
