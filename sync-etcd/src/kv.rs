//! The KV API with retries of requests that never left (the balanced channel may pick an
//! endpoint that is down); anything that may have reached etcd is returned as is.

/// What the etcd client answers.
type EtcdResult<T> = std::result::Result<T, etcd_client::Error>;

/// Evaluates `$call` (an awaited request) up to `$tries` times while its error says it was
/// never delivered, pausing a little longer after each attempt.
macro_rules! retried {
    ($tries:expr, $call:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            match $call {
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

/// The KV client with [`retried!`] around every call.
pub(crate) struct Kv {
    kv: etcd_client::KvClient,
    tries: usize,
}

impl Kv {
    /// `tries`: how often an undelivered request is sent in all.
    pub(crate) fn new(kv: etcd_client::KvClient, tries: usize) -> Kv {
        Kv { kv, tries }
    }

    pub(crate) async fn get(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::GetOptions>,
    ) -> EtcdResult<etcd_client::GetResponse> {
        let key = key.into();
        retried!(self.tries, self.kv.get(key.clone(), opts.clone()).await)
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
            self.kv.put(key.clone(), value.to_vec(), opts.clone()).await
        )
    }

    pub(crate) async fn delete(
        &mut self,
        key: impl Into<Vec<u8>>,
        opts: Option<etcd_client::DeleteOptions>,
    ) -> EtcdResult<etcd_client::DeleteResponse> {
        let key = key.into();
        retried!(self.tries, self.kv.delete(key.clone(), opts.clone()).await)
    }

    pub(crate) async fn txn(
        &mut self,
        txn: etcd_client::Txn,
    ) -> EtcdResult<etcd_client::TxnResponse> {
        retried!(self.tries, self.kv.txn(txn.clone()).await)
    }
}
