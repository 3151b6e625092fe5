//! Map on etcd: one key per entry at `<ns>/:map/<escaped name>/<escaped key>`; the version is
//! the key's mod revision, and compare-and-swap is a transaction on it (absent = create
//! revision 0). `entries()` reads the map in pages, every page at the first page's revision:
//! one consistent, sorted snapshot however large the map is.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use sync_core::{Entry, Error, ErrorKind, Map, Result, Version};

use crate::{
    BACKEND,
    client::{ClientInner, etcd_err},
    lease::RollingLease,
};

/// How many entries `entries()` asks etcd for in its first request; later pages are sized from
/// the entry sizes seen so far (see [`PAGE_BYTES`]), up to [`MAX_PAGE`].
const FIRST_PAGE: i64 = 256;

/// The most entries `entries()` asks etcd for per request, however small they are.
const MAX_PAGE: i64 = 8192;

/// The response size `entries()` aims a page at (gRPC refuses to decode more than 4 MiB); the
/// next page's entry count is chosen from the sizes seen so far.
const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// How often a listing starts over when etcd compacted its pinned revision mid-way.
const LIST_RESTARTS: usize = 3;

pub(crate) struct EtcdMap {
    client: Arc<ClientInner>,
    name: String,
    prefix: String,
    /// What write-markers are written with: they only need to outlive a resolution.
    markers: RollingLease,
}

/// How long a write-marker lives at least: far longer than resolving a lost answer takes.
const MARKER_LIFE: Duration = Duration::from_secs(60);

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
            markers: RollingLease::new(MARKER_LIFE, MARKER_LIFE / 2, "the write-marker lease"),
        }
    }

    fn key(&self, key: &str) -> Result<String> {
        self.client.check_alive()?;
        Ok(format!("{}{}", self.prefix, sync_core::id::escape(key)))
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

    /// `expected` as an etcd mod revision. No key is ever at version 0 (or past `i64::MAX`),
    /// so such an expectation is a Conflict without asking etcd.
    fn mod_revision(key: &str, expected: Version) -> Result<i64> {
        match i64::try_from(expected) {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Self::conflict(key, Some(expected))),
        }
    }

    /// Every entry, sorted by key: one range request per page ([`FIRST_PAGE`] entries, then as
    /// many as fit [`PAGE_BYTES`] at the sizes seen so far), continuing after the last key
    /// seen. Every page after the first
    /// is read at the first page's revision, so the result is one consistent snapshot of the
    /// map at that revision, like a single range request. If etcd compacts that revision
    /// before the last page is read, the listing starts over (a few times, then fails).
    async fn list(&self) -> Result<Vec<Entry>> {
        self.client.check_alive()?;
        let mut restarts = 0;
        loop {
            match self.list_once().await {
                Err(e) if is_compacted(&e) && restarts < LIST_RESTARTS => {
                    restarts += 1;
                    tracing::debug!(backend = BACKEND, map = %self.name, "snapshot revision compacted while listing; starting over");
                }
                Err(e) => return Err(etcd_err("listing", e).with_id(&self.name)),
                Ok(mut out) => {
                    // Sorted by the key itself, not by its escaped form.
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    return Ok(out);
                }
            }
        }
    }

    async fn list_once(&self) -> std::result::Result<Vec<Entry>, etcd_client::Error> {
        let mut range_end = self.prefix.as_bytes().to_vec();
        // The prefix ends with '/', so the end of its range is the prefix with '0' last.
        if let Some(last) = range_end.last_mut() {
            *last += 1;
        }
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut limit = FIRST_PAGE;
        let mut out = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(range_end.clone())
                .with_limit(limit);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = match self.client.kv().get(from.clone(), Some(opts)).await {
                // Over gRPC's decode limit: ask for fewer entries (one always fits).
                Err(e) if is_too_large(&e) && limit > 1 => {
                    limit = (limit / 2).max(1);
                    continue;
                }
                other => other?,
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            let kvs = resp.kvs();
            let mut bytes = 0usize;
            for kv in kvs {
                bytes = bytes.saturating_add(kv.key().len() + kv.value().len());
                let Some(key) = std::str::from_utf8(kv.key())
                    .ok()
                    .and_then(|raw| raw.strip_prefix(&self.prefix))
                    .and_then(sync_core::id::unescape)
                else {
                    continue;
                };
                out.push(Entry::new(
                    key,
                    kv.value().to_vec(),
                    kv.mod_revision() as Version,
                ));
            }
            let Some(last) = kvs.last() else { break };
            if !resp.more() {
                break;
            }
            // The next page starts just after the last key seen.
            from = last.key().to_vec();
            from.push(0);
            let average = (bytes / kvs.len()).max(1);
            limit = ((PAGE_BYTES / average) as i64).clamp(1, MAX_PAGE);
        }
        Ok(out)
    }

    /// The write-marker of one swap of `key`: outside the map's range, so listings never see
    /// it; gone with its rolling lease a minute or so later.
    fn marker(&self, key: &str, nonce: &str) -> String {
        format!(
            "{}:mapw/{}/{}/{nonce}",
            self.client.ns_prefix(),
            sync_core::id::escape(&self.name),
            sync_core::id::escape(key)
        )
    }

    /// The version a swap with `nonce` wrote, if it was applied (its marker holds the nonce:
    /// the marker was written in the same txn, at the same revision).
    async fn applied(&self, marker: &str, nonce: &str) -> Result<Option<Version>> {
        let resp = self
            .client
            .kv()
            .get(marker, None)
            .await
            .map_err(|e| etcd_err("resolving a compare-and-swap", e).with_id(&self.name))?;
        Ok(resp
            .kvs()
            .first()
            .filter(|kv| kv.value() == nonce.as_bytes())
            .map(|kv| kv.mod_revision() as Version))
    }

    fn revision(resp_header: Option<&etcd_client::ResponseHeader>) -> Version {
        resp_header.map(|h| h.revision()).unwrap_or_default() as Version
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive, map and key.
#[async_trait]
impl Map for EtcdMap {
    fn name(&self) -> &str {
        &self.name
    }

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

    async fn write(&self, key: &str, value: &[u8]) -> Result<Version> {
        let k = self.key(key)?;
        let resp = self
            .client
            .kv()
            .put(k, value, None)
            .await
            .map_err(|e| etcd_err("writing", e).with_id(key))?;
        Ok(Self::revision(resp.header()))
    }

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

    /// A compare-and-swap applies at most once, and its caller learns whether it did even when
    /// the answer is lost: the txn also writes a write-marker (this write's nonce, on the
    /// client's lease) that a resolution reads back. Resending the same swap is safe: only one
    /// of two sends can find the key at `expected`.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version> {
        let k = self.key(key)?;
        let cmp = match expected {
            None => Compare::create_revision(k.clone(), CompareOp::Equal, 0),
            Some(v) => {
                Compare::mod_revision(k.clone(), CompareOp::Equal, Self::mod_revision(key, v)?)
            }
        };
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let marker = self.marker(key, &nonce);
        let lease = self.markers.get(&self.client.sender()).await?;
        let ops = [
            TxnOp::put(k, value.to_vec(), None),
            TxnOp::put(
                marker.clone(),
                nonce.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ];
        let first = Txn::new().when([cmp.clone()]).and_then(ops.clone());
        // A resend applies only if no earlier send did: the marker exists exactly when one
        // applied (it outlives a delete of the key, so a create is not made twice either).
        let unmarked = Compare::version(marker.clone(), CompareOp::Equal, 0);
        let resend = Txn::new().when([cmp, unmarked]).and_then(ops);
        let mut sends = 0;
        loop {
            sends += 1;
            let txn = if sends == 1 { &first } else { &resend };
            match self.client.kv().txn(txn.clone()).await {
                Ok(resp) if resp.succeeded() => return Ok(Self::revision(resp.header())),
                Ok(_) if sends == 1 => return Err(Self::conflict(key, expected)),
                // A resend found the key moved: by an earlier send of ours, or by another.
                Ok(_) => {
                    return match self.applied(&marker, &nonce).await? {
                        Some(version) => Ok(version),
                        None => Err(Self::conflict(key, expected)),
                    };
                }
                Err(e) if crate::error::answer_lost(&e) => {
                    tracing::warn!(backend = BACKEND, map = %self.name, error = %e, "compare-and-swap answer lost; resolving it");
                    if let Some(version) = self.applied(&marker, &nonce).await? {
                        return Ok(version);
                    }
                    if sends >= AMBIGUOUS_SENDS {
                        return Err(
                            etcd_err("compare-and-swap (not applied so far)", e).with_id(key)
                        );
                    }
                }
                Err(e) => {
                    if crate::error::lease_not_found(&e) {
                        // The marker lease expired under a long pause: the next call grants one.
                        self.markers.forget().await;
                    }
                    return Err(etcd_err("compare-and-swap", e).with_id(key));
                }
            }
        }
    }

    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        let k = self.key(key)?;
        let v = Self::mod_revision(key, expected)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(k.clone(), CompareOp::Equal, v)])
            .and_then([TxnOp::delete(k, None::<DeleteOptions>)]);
        let resp = self
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("compare-and-delete", e).with_id(key))?;
        if !resp.succeeded() {
            return Err(Self::conflict(key, Some(expected)));
        }
        Ok(())
    }

    /// A sorted snapshot of the whole map, read in pages (see [`EtcdMap::list`]).
    async fn entries(&self) -> Result<Vec<Entry>> {
        self.list().await
    }
}

/// How often a compare-and-swap whose answer was lost is sent in all.
const AMBIGUOUS_SENDS: u32 = 3;

/// gRPC refused to decode a response over its message size limit.
fn is_too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("message length too large"))
}

/// etcd no longer has the revision asked for.
fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}
