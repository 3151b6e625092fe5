//! Map on Consul KV: one key per entry at `<ns>/:map/<escaped name>/<escaped key>` (no `<ns>/`
//! in the empty namespace). `:` never appears in an escaped id, so map keys never share a range
//! with lock keys (`<ns>/<escaped id>/.lock`).
//!
//! The version is the entry's ModifyIndex (a raft index: it never recurs for a key, even
//! across a delete and re-create). Every change is one `/v1/txn`: `write` a `set`,
//! `compare_and_swap` a `cas` on the expected index (0: only if absent), `compare_and_delete`
//! a `check-index` then `delete` (Consul's `delete-cas` succeeds on an absent key), `delete` a
//! `get` then `delete` (rolled back when absent). `read` is a consistent GET and `entries()`
//! one consistent recursive GET of the map's prefix: a single snapshot.
//!
//! A value travels base64-encoded in the transaction's JSON, which the agent limits to
//! `txn_max_req_len` (512 KiB by default): values over about 380 KiB are refused with
//! InvalidArgument naming that limit, below the toolkit's own
//! [`MAX_VALUE_LEN`](sync_core::MAX_VALUE_LEN).
//!
//! ## Answers that go missing
//!
//! Every write writes a fresh random nonce as the entry's `Flags`. When a change's answer is
//! lost (it may have applied), the key is read back: our nonce there means it applied, at
//! that entry's ModifyIndex (any later write would have replaced the flags). A change
//! expecting an index that the key still has did not apply yet, and is sent again: only one
//! of two sends can find the key at that index, and the index never comes back once the key
//! moves. Anything else — an unconditional write or delete, a create (absence does come
//! back), a key moved by someone — cannot be told apart from "applied, then changed", so the
//! call fails Unavailable and says that the outcome is unknown: never success for a change
//! that did not apply, never Conflict for one that did. Resolution ends within the client's
//! resend bound ([`ClientInner::may_resend`]), each request within the request timeout.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use sync_core::{Entry, Error, ErrorKind, Map, Result, Version};
use tokio::time::Instant;

use crate::{
    BACKEND,
    api::{KvEntry, KvOp, LOCK_FLAGS, Txn, TxnError, unexpected},
    client::ClientInner,
};

/// How often a change is sent in all (the resend bound in time usually ends it first).
const SENDS: u32 = 3;

/// How often a read is sent in all when its answers are lost.
const READS: u32 = 3;

/// The pause before a read is sent again, times the reads so far.
const READ_PAUSE: Duration = Duration::from_millis(50);

pub(crate) struct ConsulMap {
    client: Arc<ClientInner>,
    name: String,
    /// `<ns>/:map/<escaped name>/`: every entry's key starts with it.
    prefix: String,
}

/// What a change expects of the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Any,
    Absent,
    At(Version),
}

/// What a re-read after a lost answer says of the change.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// It applied, at this version.
    Applied(Version),
    /// It has not applied, and cannot once the key moves: sending it again is safe.
    Pending,
    /// It may or may not have applied.
    Unknown,
}

/// Judges a change by the key as read back after its answer was lost. `nonce`: the flags the
/// change writes (None for a delete).
fn judge(expect: Expect, nonce: Option<u64>, seen: Option<&KvEntry>) -> Verdict {
    match (seen, expect) {
        (Some(e), _) if nonce == Some(e.flags) => Verdict::Applied(e.modify_index),
        // The index a change expects never comes back once the key moves.
        (Some(e), Expect::At(v)) if e.modify_index == v => Verdict::Pending,
        _ => Verdict::Unknown,
    }
}

/// A fresh random nonce for an entry's flags: never 0 (what other clients write) nor the
/// flags of a lock key.
fn nonce() -> u64 {
    loop {
        // A v4 uuid's fixed bits lie at different places in its halves: their xor is random.
        let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
        let n = hi ^ lo;
        if n != 0 && n != LOCK_FLAGS {
            return n;
        }
    }
}

/// The key range of map `name` in namespace `ns`.
fn prefix(ns: &str, name: &str) -> String {
    let name = sync_core::id::escape(name);
    // Not `id::key`: it would escape the ':' that keeps maps apart from ids.
    if ns.is_empty() {
        format!(":map/{name}/")
    } else {
        format!("{ns}/:map/{name}/")
    }
}

/// One change: its transaction and what its resolution needs.
struct Change<'a> {
    what: &'static str,
    /// The map key, for errors.
    key: &'a str,
    /// The Consul key.
    path: &'a str,
    ops: Vec<KvOp>,
    expect: Expect,
    nonce: Option<u64>,
}

/// A change's outcome, settled.
enum Sent {
    Done(Vec<Option<KvEntry>>),
    /// Rolled back on its first send: its condition did not hold.
    RolledBack(Vec<TxnError>),
    /// Its answer was lost and the re-read found it applied, at this version.
    Applied(Version),
}

impl ConsulMap {
    pub(crate) fn new(client: Arc<ClientInner>, name: &str) -> Self {
        ConsulMap {
            prefix: prefix(&client.config.namespace, name),
            client,
            name: name.to_string(),
        }
    }

    fn path(&self, key: &str) -> Result<String> {
        self.client.check_alive()?;
        Ok(format!("{}{}", self.prefix, sync_core::id::escape(key)))
    }

    /// Writes `value` if the key is as expected; the new version.
    async fn put(&self, key: &str, expect: Expect, value: &[u8]) -> Result<Version> {
        let path = self.path(key)?;
        let nonce = nonce();
        let op = match expect {
            Expect::Any => KvOp::set(&path, value),
            Expect::Absent => KvOp::cas(&path, value, 0),
            Expect::At(v) => KvOp::cas(&path, value, v),
        };
        let change = Change {
            what: match expect {
                Expect::Any => "writing",
                _ => "compare-and-swap",
            },
            key,
            path: &path,
            ops: vec![KvOp {
                flags: Some(nonce),
                ..op
            }],
            expect,
            nonce: Some(nonce),
        };
        match self.send(&change).await? {
            Sent::Applied(version) => Ok(version),
            Sent::Done(entries) => match entries.first() {
                Some(Some(e)) if e.modify_index != 0 => Ok(e.modify_index),
                _ => Err(
                    unexpected(change.what, "applied, but no version in the answer").with_id(key),
                ),
            },
            Sent::RolledBack(errors) => Err(self.refused(&change, &errors)),
        }
    }

    /// Deletes the key if it is as expected (`Any` or `At`): true when deleted, false when
    /// it was absent.
    async fn remove(&self, key: &str, expect: Expect) -> Result<bool> {
        let path = self.path(key)?;
        let (what, check) = match expect {
            Expect::At(v) => ("compare-and-delete", KvOp::check_index(&path, v)),
            // `get` rolls the delete back when the key is absent: that is how we learn it.
            _ => ("deleting", KvOp::get(&path)),
        };
        let change = Change {
            what,
            key,
            path: &path,
            ops: vec![check, KvOp::delete(&path)],
            expect,
            nonce: None,
        };
        match self.send(&change).await? {
            Sent::Done(_) | Sent::Applied(_) => Ok(true),
            Sent::RolledBack(errors)
                if expect == Expect::Any && errors.first().is_some_and(|e| e.op_index == 0) =>
            {
                Ok(false)
            }
            Sent::RolledBack(errors) => Err(self.refused(&change, &errors)),
        }
    }

    /// Sends a change. When its answer is lost, the key is read back and the change judged
    /// (see [`judge`]): applied, sent again (only while that is safe, and within the resend
    /// bound), or failed as unknown. Once an answer was lost, every failure is unknown.
    async fn send(&self, change: &Change<'_>) -> Result<Sent> {
        let first = Instant::now();
        let mut lost = false;
        for _ in 0..SENDS {
            let cause = match self.client.api.txn(change.what, &change.ops).await {
                Ok(Txn::Done(entries)) => return Ok(Sent::Done(entries)),
                Ok(Txn::RolledBack(errors)) if !lost => return Ok(Sent::RolledBack(errors)),
                // A resend found the key moved since the re-read: perhaps by an earlier send.
                Ok(Txn::RolledBack(_)) => {
                    return match self.judge(change, first).await? {
                        Verdict::Applied(v) => Ok(Sent::Applied(v)),
                        _ => Err(unknown(change, "the key changed in the meantime")),
                    };
                }
                Err(f) if !f.unknown() && !lost => return Err(f.error().with_id(change.key)),
                Err(f) => f.error(),
            };
            lost = true;
            tracing::warn!(backend = BACKEND, map = %self.name, id = change.key, error = %cause, "{} unanswered; reading the key back", change.what);
            match self.judge(change, first).await? {
                Verdict::Applied(v) => return Ok(Sent::Applied(v)),
                Verdict::Pending if self.client.may_resend(first) => {}
                _ => return Err(unknown(change, cause.message()).with_source(cause)),
            }
        }
        Err(unknown(change, "not answered"))
    }

    /// Reads the key back after a lost answer and judges the change by it; a read that fails
    /// leaves the outcome unknown.
    async fn judge(&self, change: &Change<'_>, first: Instant) -> Result<Verdict> {
        match self.get("reading back", change.path, first).await {
            Ok(seen) => Ok(judge(change.expect, change.nonce, seen.as_ref())),
            Err(e) => Err(unknown(change, e.message()).with_source(e)),
        }
    }

    /// Reads one key (consistent). A read that failed quickly without an answer (a cut
    /// connection) is sent again while the resend bound from `first` allows; one that timed
    /// out is not: the agent is not answering, and the caller learns so within one timeout.
    async fn get(&self, what: &str, path: &str, first: Instant) -> Result<Option<KvEntry>> {
        let quick = self.client.config.request_timeout / 2;
        let mut reads = 0;
        loop {
            reads += 1;
            let sent = Instant::now();
            match self.client.api.get(what, path, 0).await {
                Ok(read) => return Ok(read.value),
                Err(f)
                    if f.unknown()
                        && sent.elapsed() < quick
                        && reads < READS
                        && self.client.may_resend(first) =>
                {
                    tracing::debug!(backend = BACKEND, map = %self.name, error = %f.kind(), "read unanswered, sending again");
                    // A connection cut at once would otherwise be retried in a tight loop.
                    tokio::time::sleep(READ_PAUSE * reads).await;
                }
                Err(f) => return Err(f.error()),
            }
        }
    }

    /// Why a change's condition did not hold: Conflict when its check (the first operation)
    /// failed.
    fn refused(&self, change: &Change<'_>, errors: &[TxnError]) -> Error {
        match errors.first() {
            Some(e) if e.op_index == 0 && change.expect != Expect::Any => {
                conflict(change.key, change.expect)
            }
            e => unexpected(
                change.what,
                e.map_or("rolled back without a reason", |e| e.what.as_str()),
            )
            .with_id(change.key),
        }
    }
}

/// Conflict: the key was not as `expect`ed.
fn conflict(key: &str, expect: Expect) -> Error {
    let why = match expect {
        Expect::At(v) => format!("the key is no longer at version {v}"),
        _ => "the key already exists".to_string(),
    };
    Error::new(ErrorKind::Conflict, why)
        .with_backend(BACKEND)
        .with_id(key)
}

/// Unavailable: a change's answer was lost and whether it applied could not be learnt.
fn unknown(change: &Change<'_>, why: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!(
            "{}: the answer was lost and whether it applied is unknown ({why})",
            change.what
        ),
    )
    .with_backend(BACKEND)
    .with_id(change.key)
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive, map and key.
#[async_trait]
impl Map for ConsulMap {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&self, key: &str) -> Result<Option<Entry>> {
        let path = self.path(key)?;
        let seen = self
            .get("reading", &path, Instant::now())
            .await
            .map_err(|e| e.with_id(key))?;
        Ok(seen.map(|e| Entry::new(key, e.value, e.modify_index)))
    }

    async fn write(&self, key: &str, value: &[u8]) -> Result<Version> {
        self.put(key, Expect::Any, value).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.remove(key, Expect::Any).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version> {
        let expect = match expected {
            None => Expect::Absent,
            // No entry is at index 0, and to Consul's `cas` it means "absent".
            Some(0) => return Err(conflict(key, Expect::At(0))),
            Some(v) => Expect::At(v),
        };
        self.put(key, expect, value).await
    }

    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        if expected == 0 {
            return Err(conflict(key, Expect::At(0)));
        }
        self.remove(key, Expect::At(expected)).await.map(|_| ())
    }

    /// One consistent recursive read of the map's prefix: a single snapshot, sorted by key.
    async fn entries(&self) -> Result<Vec<Entry>> {
        self.client.check_alive()?;
        let read = self
            .client
            .api
            .list("listing", &self.prefix, 0)
            .await
            .map_err(|f| f.error().with_id(&self.name))?;
        Ok(decode(&self.prefix, read.value))
    }
}

/// The map's entries among `listed`, sorted by key: keys that escaping cannot have made
/// (another client's, or deeper) are skipped.
fn decode(prefix: &str, listed: Vec<KvEntry>) -> Vec<Entry> {
    let mut out: Vec<Entry> = listed
        .into_iter()
        .filter_map(|e| {
            let key = sync_core::id::unescape(e.key.strip_prefix(prefix)?)?;
            Some(Entry::new(key, e.value, e.modify_index))
        })
        .collect();
    // By the key itself, not by its escaped form.
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

#[cfg(test)]
mod tests {
    use sync_conformance::proxy::{Fault, FaultProxy};

    use super::*;

    fn entry(key: &str, flags: u64, index: u64) -> KvEntry {
        KvEntry {
            key: key.to_string(),
            flags,
            value: b"v".to_vec(),
            session: None,
            lock_index: 0,
            create_index: 1,
            modify_index: index,
        }
    }

    #[test]
    fn prefixes_keep_maps_apart_from_locks() {
        assert_eq!(prefix("sync", "a/b"), "sync/:map/a%2Fb/");
        assert_eq!(prefix("", "m"), ":map/m/");
        assert!(!sync_core::id::escape("a:b").contains(':'));
    }

    #[test]
    fn our_nonce_means_applied_at_its_index() {
        let e = entry("k", 7, 42);
        for expect in [Expect::Any, Expect::Absent, Expect::At(3)] {
            assert_eq!(judge(expect, Some(7), Some(&e)), Verdict::Applied(42));
        }
    }

    #[test]
    fn only_an_unmoved_index_is_sent_again() {
        let at = entry("k", 0, 5);
        assert_eq!(judge(Expect::At(5), Some(7), Some(&at)), Verdict::Pending);
        assert_eq!(judge(Expect::At(5), None, Some(&at)), Verdict::Pending);
        // Moved: by someone, or by us and then someone.
        assert_eq!(judge(Expect::At(4), Some(7), Some(&at)), Verdict::Unknown);
        assert_eq!(judge(Expect::At(5), Some(7), None), Verdict::Unknown);
        // Absence comes back after a delete; an unconditional change has nothing to check.
        assert_eq!(judge(Expect::Absent, Some(7), None), Verdict::Unknown);
        assert_eq!(judge(Expect::Any, Some(7), Some(&at)), Verdict::Unknown);
        assert_eq!(judge(Expect::Any, None, None), Verdict::Unknown);
    }

    #[test]
    fn nonces_are_never_plain_or_lock_flags() {
        let (a, b) = (nonce(), nonce());
        assert!(a != 0 && a != LOCK_FLAGS);
        assert_ne!(a, b);
    }

    #[test]
    fn listings_decode_sorted_and_skip_foreign_keys() {
        let p = "ns/:map/m/";
        let listed = vec![
            entry("ns/:map/m/b", 0, 3),
            entry("ns/:map/m/a%2Fz", 0, 4),
            entry("ns/:map/m/a", 0, 2),
            entry("ns/:map/m/deeper/x", 0, 5),
            entry("ns/:map/m/bad%2f", 0, 6),
        ];
        let got: Vec<(String, u64)> = decode(p, listed)
            .into_iter()
            .map(|e| (e.key, e.version))
            .collect();
        assert_eq!(got, [("a".into(), 2), ("a/z".into(), 4), ("b".into(), 3)]);
    }

    /// A client in a fresh namespace through a fault proxy to the agent of
    /// `SYNC_TEST_CONSUL`, with a short request timeout, and a map on it; None (skipped)
    /// without the variable, unless `SYNC_REQUIRE_LIVE=1`.
    async fn live(name: &str) -> Option<(crate::Client, FaultProxy, ConsulMap)> {
        let Ok(url) = std::env::var("SYNC_TEST_CONSUL") else {
            let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SYNC_REQUIRE_LIVE=1 but SYNC_TEST_CONSUL is not set"
            );
            eprintln!("skipped: SYNC_TEST_CONSUL is not set");
            return None;
        };
        let upstream = sync_conformance::proxy::hosts(&url).expect("an agent address");
        let proxy = FaultProxy::start_all(&upstream).await.unwrap();
        let through = sync_conformance::proxy::through_all(&url, proxy.addrs());
        let config = crate::Config::from_url(&through)
            .unwrap()
            .with_namespace(format!("unit-{}", uuid::Uuid::new_v4().simple()))
            .with_request_timeout(Duration::from_secs(1));
        let client = crate::Client::connect(config).await.unwrap();
        let map = ConsulMap::new(client.inner.clone(), name);
        Some((client, proxy, map))
    }

    /// A swap held in flight past its timeout is read back as not applied (the key is still
    /// at the expected index), sent again, and applies once: the held first send, let through
    /// afterwards, finds the index gone.
    #[tokio::test]
    async fn a_held_swap_is_sent_again_and_applies_once() -> Result<()> {
        let Some((_client, proxy, map)) = live("held").await else {
            return Ok(());
        };
        let v1 = map.write("k", b"0").await?;
        proxy.hold_next(b"\"Verb\":\"cas\"".to_vec());
        let v2 = map.compare_and_swap("k", Some(v1), b"1").await?;
        proxy.release();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = map.read("k").await?.unwrap();
        assert_eq!((now.value.as_slice(), now.version), (&b"1"[..], v2));
        Ok(())
    }

    /// A compare-and-delete held in flight is sent again the same way.
    #[tokio::test]
    async fn a_held_compare_and_delete_is_sent_again() -> Result<()> {
        let Some((_client, proxy, map)) = live("held-delete").await else {
            return Ok(());
        };
        let v1 = map.write("k", b"0").await?;
        proxy.hold_next(b"\"Verb\":\"check-index\"".to_vec());
        map.compare_and_delete("k", v1).await?;
        proxy.release();
        assert!(map.read("k").await?.is_none());
        Ok(())
    }

    /// An unconditional write held in flight cannot be resolved (it may still apply, and does
    /// once let through): Unavailable, saying the outcome is unknown.
    #[tokio::test]
    async fn a_held_write_is_unknown() -> Result<()> {
        let Some((_client, proxy, map)) = live("held-write").await else {
            return Ok(());
        };
        map.write("k", b"0").await?;
        proxy.hold_next(b"\"Verb\":\"set\"".to_vec());
        let err = map.write("k", b"1").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert!(err.to_string().contains("unknown"), "{err}");
        Ok(())
    }

    /// A create whose answer is dropped is found applied by its nonce.
    #[tokio::test]
    async fn a_create_whose_answer_is_lost_is_found_by_its_nonce() -> Result<()> {
        let Some((_client, proxy, map)) = live("lost-create").await else {
            return Ok(());
        };
        proxy.hold_next(b"\"Verb\":\"cas\"".to_vec());
        let creating = async {
            proxy.held().await;
            proxy.set(Fault::DropResponses);
            proxy.release();
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.set(Fault::Pass);
        };
        let (created, ()) = tokio::join!(map.compare_and_swap("k", None, b"1"), creating);
        let now = map.read("k").await?.unwrap();
        assert_eq!((now.value.as_slice(), now.version), (&b"1"[..], created?));
        Ok(())
    }
}
