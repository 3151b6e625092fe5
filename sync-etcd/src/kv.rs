//! The KV API with retries of requests that never left (the balanced channel may pick an
//! endpoint that is down); anything that may have reached etcd is returned as is.

/// What the etcd client answers.
type EtcdResult<T> = std::result::Result<T, etcd_client::Error>;

/// Awaits `$call` (a request future, made afresh each attempt) up to `$tries` times while its
/// error says it was never delivered, pausing a little longer after each attempt; each attempt
/// gets at most `$timeout` (an endpoint that accepts and never answers fails the call).
macro_rules! retried {
    ($tries:expr, $timeout:expr, $call:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            match $crate::kv::answered_within($timeout, $call).await {
                Err(e) if $crate::error::not_delivered(&e) && attempt < $tries => {
                    tracing::debug!(backend = $crate::BACKEND, attempt, error = %e, "request not delivered; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(5 * attempt as u64)).await;
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use retried;

/// `request`, failed with a timeout (Unavailable, never resent: it may have been applied)
/// when no answer comes within `limit`.
pub(crate) async fn answered_within<T>(
    limit: std::time::Duration,
    request: impl std::future::Future<Output = EtcdResult<T>>,
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

/// The KV client with [`retried!`] around every call.
pub(crate) struct Kv {
    kv: etcd_client::KvClient,
    tries: usize,
    timeout: std::time::Duration,
}

impl Kv {
    /// `tries`: how often an undelivered request is sent in all; `timeout`: how long one
    /// attempt may wait for its answer.
    pub(crate) fn new(kv: etcd_client::KvClient, tries: usize, timeout: std::time::Duration) -> Kv {
        Kv { kv, tries, timeout }
    }

    pub(crate) async fn get(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::GetOptions>,
    ) -> EtcdResult<etcd_client::GetResponse> {
        let key = key.into();
        retried!(
            self.tries,
            self.timeout,
            self.kv.get(key.clone(), opts.clone())
        )
    }

    /// Takes the value by reference: each attempt needs its own copy anyway.
    pub(crate) async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: &[u8],
        opts: Option<etcd_client::PutOptions>,
    ) -> EtcdResult<etcd_client::PutResponse> {
        let key = key.into();
        retried!(
            self.tries,
            self.timeout,
            self.kv.put(key.clone(), value.to_vec(), opts.clone())
        )
    }

    pub(crate) async fn delete(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::DeleteOptions>,
    ) -> EtcdResult<etcd_client::DeleteResponse> {
        let key = key.into();
        retried!(
            self.tries,
            self.timeout,
            self.kv.delete(key.clone(), opts.clone())
        )
    }

    pub(crate) async fn txn(
        &mut self,
        txn: etcd_client::Txn,
    ) -> EtcdResult<etcd_client::TxnResponse> {
        retried!(self.tries, self.timeout, self.kv.txn(txn.clone()))
    }
}
