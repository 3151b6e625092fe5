//! Map on etcd: one key per entry at `<ns>/:map/<escaped name>/<escaped key>`; the version is
//! the key's mod revision, and compare-and-swap is a transaction on it (absent = create
//! revision 0).

use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use sync_core::{Entry, Error, ErrorKind, Map, Result, Version};

use crate::{
    BACKEND,
    client::{ClientInner, etcd_err},
};

pub(crate) struct EtcdMap {
    client: Arc<ClientInner>,
    name: String,
    prefix: String,
}

impl EtcdMap {
    pub(crate) fn new(client: Arc<ClientInner>, name: &str) -> Self {
        let prefix = format!(
            "{}:map/{}/",
            client.ns_prefix(),
            sync_core::id::escape(name)
        );
        EtcdMap {
            client,
            name: name.to_string(),
            prefix,
        }
    }

    fn key(&self, key: &str) -> Result<String> {
        sync_core::id::validate("map key", key).map_err(|e| e.with_backend(BACKEND))?;
        self.client.check_alive()?;
        Ok(format!("{}{}", self.prefix, sync_core::id::escape(key)))
    }

    fn check_value(key: &str, value: &[u8]) -> Result<()> {
        sync_core::validate_value(value).map_err(|e| e.with_backend(BACKEND).with_id(key))
    }

    fn conflict(key: &str, expected: Option<Version>) -> Error {
        let what = match expected {
            Some(v) => format!("the key is no longer at version {v}"),
            None => "the key already exists".to_string(),
        };
        Error::new(ErrorKind::Conflict, what)
            .with_backend(BACKEND)
            .with_id(key)
    }

    fn revision(resp_header: Option<&etcd_client::ResponseHeader>) -> Version {
        resp_header.map(|h| h.revision()).unwrap_or_default() as Version
    }
}

#[async_trait]
impl Map for EtcdMap {
    fn name(&self) -> &str {
        &self.name
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn read(&self, key: &str) -> Result<Option<Entry>> {
        let k = self.key(key)?;
        let resp = self
            .client
            .kv()
            .get(k, None)
            .await
            .map_err(|e| etcd_err("reading", e).with_id(key))?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| Entry::new(key, kv.value().to_vec(), kv.mod_revision() as Version)))
    }

    #[tracing::instrument(level = "debug", skip(self, value), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn write(&self, key: &str, value: &[u8]) -> Result<Version> {
        let k = self.key(key)?;
        Self::check_value(key, value)?;
        let resp = self
            .client
            .kv()
            .put(k, value.to_vec(), None)
            .await
            .map_err(|e| etcd_err("writing", e).with_id(key))?;
        Ok(Self::revision(resp.header()))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn delete(&self, key: &str) -> Result<bool> {
        let k = self.key(key)?;
        let resp = self
            .client
            .kv()
            .delete(k, None)
            .await
            .map_err(|e| etcd_err("deleting", e).with_id(key))?;
        Ok(resp.deleted() > 0)
    }

    #[tracing::instrument(level = "debug", skip(self, value), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version> {
        let k = self.key(key)?;
        Self::check_value(key, value)?;
        let cmp = match expected {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(v) => {
                let v = i64::try_from(v).map_err(|_| Self::conflict(key, expected))?;
                if v == 0 {
                    return Err(Self::conflict(key, expected));
                }
                Compare::mod_revision(k.clone(), CompareOp::Equal, v)
            }
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(k, value.to_vec(), None)]);
        let resp = self
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("compare-and-swap", e).with_id(key))?;
        if !resp.succeeded() {
            return Err(Self::conflict(key, expected));
        }
        Ok(Self::revision(resp.header()))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        let k = self.key(key)?;
        let v = i64::try_from(expected).map_err(|_| Self::conflict(key, Some(expected)))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(k.clone(), CompareOp::Equal, v)])
            .and_then([TxnOp::delete(k, None::<DeleteOptions>)]);
        let resp = self
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("compare-and-delete", e).with_id(key))?;
        if !resp.succeeded() || v == 0 {
            return Err(Self::conflict(key, Some(expected)));
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "map", map = %self.name))]
    async fn entries(&self) -> Result<Vec<Entry>> {
        self.client.check_alive()?;
        let resp = self
            .client
            .kv()
            .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| etcd_err("listing", e).with_id(&self.name))?;
        let mut out: Vec<Entry> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let raw = std::str::from_utf8(kv.key()).ok()?;
                let key = sync_core::id::unescape(raw.strip_prefix(&self.prefix)?)?;
                Some(Entry::new(
                    key,
                    kv.value().to_vec(),
                    kv.mod_revision() as Version,
                ))
            })
            .collect();
        // Sorted by the key itself, not by its escaped form.
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}
