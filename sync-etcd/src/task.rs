//! Task on etcd: a job queue whose claims are bound to the worker's lease, so a dead worker's
//! jobs are redelivered when its lease expires.
//!
//! Keys under `<ns>/:task/`:
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `jobs/<id>` | JSON: the job and its status as of its last ended attempt, without payload and output | none (the retention lease once final) |
//! | `payloads/<id>` | the payload, raw (deleted once the job ended) | none |
//! | `outputs/<id>` | the output, raw, once Succeeded | the retention lease |
//! | `queue/<escaped name>/<id>` | earliest start (unix ms) | none |
//! | `claims/<id>` | the claiming worker's lease (hex) and a nonce of its claim request | the worker client's lease |
//! | `inflight/<id>` | empty | none |
//! | `workers/<escaped name>/<nonce>` | empty: a worker taking jobs of that name | the worker client's lease |
//!
//! Payload and output bytes are kept raw beside the record rather than in its JSON (where bytes
//! are arrays of numbers, about 4x larger), so a payload or output of up to
//! [`MAX_PAYLOAD_LEN`](sync_core::MAX_PAYLOAD_LEN) stays well within etcd's request limit (1.5 MiB by default).
//!
//! Submitting writes the record, the payload and the queue entry in one transaction.
//!
//! Each worker keeps a copy of its queue and of the list of its name's workers: read once (the
//! same request registers the worker, again with each new session), then kept current by
//! watches on the client's shared watch stream (and read again every [`RESYNC`] as a safety
//! net), so a new job reaches every worker as a watch event and costs no request to find. Only one worker tries a new job at once: the one whose place in the
//! sorted list of workers is the job id's hash modulo their number; the next one in the list
//! tries it [`GRACE`] later should it still be queued (its first choice busy, or dead), and so
//! on. A queue entry seen in a (re)read of the queue is old: any worker tries it at once.
//!
//! A claim needs no read: up to the worker's free permits are claimed in one transaction of
//! nested transactions, one per job, each guarded by its queue entry's mod revision (as the
//! watch event or the read carried it) and by the absence of a claim, so a stale candidate
//! fails alone: queue entry deleted, claim (with the worker's lease) and in-flight marker
//! written, record and payload read. The record is not touched: a job is Running while its
//! in-flight marker exists, its attempt being the record's attempts + 1, which `status` reads
//! in its one transaction. The claim's revision is the attempt's fencing token. A claim whose
//! answer is lost (it may have committed) is settled before the worker answers: each of its
//! jobs whose queue entry is still at the revision claimed is fenced (the entry is rewritten,
//! so the claim fails its guard should it arrive later); any other is the worker's if its claim
//! key carries this request's nonce.
//!
//! Finishing is one transaction guarded by the claim's mod revision (the claim revision): record
//! → Succeeded (output written) / Failed / Queued (retry, queue entry re-written with its
//! earliest start), claim and marker deleted (and the payload, once the job ended). An output
//! over [`MAX_PAYLOAD_LEN`](sync_core::MAX_PAYLOAD_LEN) fails the attempt. Delayed entries are
//! skipped until due, so they never hold up newer jobs. Every worker watches deletions of claims
//! and markers: a claim deleted without its marker (a lease ended, a claim given up) leaves an
//! orphaned marker, and a rescan of markers and claims (also every [`RESYNC`] as a safety net)
//! queues its job again, or fails it when out of attempts — guarded by the marker's revision,
//! the absence of a claim and of a queue entry (a marker beside a queue entry is stale, and
//! merely deleted). `wait` watches the record.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions, WatchResponse,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sync_core::{
    Error, ErrorKind, Job, JobContext, JobId, JobState, JobStatus, LossSignal, Result,
};
use sync_kit::retry::Retry;
use sync_kit::task::{
    Claimed, JobQueue, JobStore, Next, Outcome, apply_outcome, apply_worker_loss,
};
use tokio::{sync::watch, time::Instant};

use crate::{
    BACKEND,
    client::{ClientInner, Session, etcd_err},
    lease::RollingLease,
    watch::Delivery,
};

/// The longest `wait` trusts a watch on the record without reading it again.
const SAFETY_NET: Duration = Duration::from_secs(5);

/// The safety net of a worker's copy of its queue and of the reaper: both read everything
/// again this often, whatever their watches said.
const RESYNC: Duration = Duration::from_secs(15);

/// How long after a job's queue entry appeared the next worker in line tries it, should the
/// worker it fell to not have taken it (busy, or dead).
const GRACE: Duration = Duration::from_millis(100);

/// How long the reaper lets claim deletions accumulate before rescanning, so a lease ending
/// with many claims costs one rescan.
const REAP_DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a worker rests after reading its queue failed.
const RESYNC_RETRY: Duration = Duration::from_millis(500);

/// The error message of a job record that is not valid JSON.
const UNREADABLE_RECORD: &str = "the job record is not valid JSON";

/// How many queue entries a worker reads per request while reading its queue.
const SCAN_LIMIT: i64 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    job: Job,
    status: JobStatus,
}

/// The value of the first key read by the get at `ops[i]`, moved out (no copy of a payload or
/// output).
fn take_first_value(ops: &mut [TxnOpResponse], i: usize) -> Option<Vec<u8>> {
    match ops.get_mut(i) {
        Some(TxnOpResponse::Get(g)) => g
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1),
        _ => None,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

struct Keys {
    root: String,
}

impl Keys {
    fn record(&self, id: &str) -> String {
        format!("{}jobs/{}", self.root, sync_core::id::escape(id))
    }
    fn queue_prefix(&self, name: &str) -> String {
        format!("{}queue/{}/", self.root, sync_core::id::escape(name))
    }
    fn queue(&self, name: &str, id: &str) -> String {
        format!("{}{}", self.queue_prefix(name), sync_core::id::escape(id))
    }
    fn claims(&self) -> String {
        format!("{}claims/", self.root)
    }
    fn claim(&self, id: &str) -> String {
        format!("{}{}", self.claims(), sync_core::id::escape(id))
    }
    fn inflight(&self) -> String {
        format!("{}inflight/", self.root)
    }
    fn inflight_of(&self, id: &str) -> String {
        format!("{}{}", self.inflight(), sync_core::id::escape(id))
    }
    /// The end of the range of claims and in-flight markers (nothing else sorts between).
    fn inflight_end(&self) -> String {
        format!("{}inflight0", self.root)
    }
    fn workers(&self, name: &str) -> String {
        format!("{}workers/{}/", self.root, sync_core::id::escape(name))
    }
    fn payload(&self, id: &str) -> String {
        format!("{}payloads/{}", self.root, sync_core::id::escape(id))
    }
    fn output(&self, id: &str) -> String {
        format!("{}outputs/{}", self.root, sync_core::id::escape(id))
    }
    /// The guard of every change an attempt makes: its claim, written at revision `rev`,
    /// still stands (a claim key is never rewritten: a new claim is a new key).
    fn claim_at(&self, id: &str, rev: i64) -> Compare {
        Compare::mod_revision(self.claim(id), CompareOp::Equal, rev)
    }
}

struct Shared {
    client: Arc<ClientInner>,
    keys: Keys,
    /// The lease finished jobs are written with: one per eighth of the retention, so a
    /// finished job lives between one and 9/8 retentions.
    retention: RollingLease,
}

impl Shared {
    /// The lease to write a finished job with.
    async fn retention_lease(&self) -> Result<i64> {
        self.retention.get(&self.client.sender()).await
    }

    /// Drops the cached retention lease (etcd no longer has it).
    async fn forget_retention_lease(&self) {
        self.retention.forget().await;
    }

    fn encode(&self, record: &Record) -> Result<Vec<u8>> {
        serde_json::to_vec(record).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding the job record")
                .with_backend(BACKEND)
                .with_source(e)
        })
    }

    fn decode(id: &str, value: &[u8]) -> Result<Record> {
        serde_json::from_slice(value).map_err(|e| {
            Error::new(ErrorKind::Backend, UNREADABLE_RECORD)
                .with_backend(BACKEND)
                .with_id(id)
                .with_source(e)
        })
    }

    /// The record of `id` and its mod revision, if any (the status's output is not filled in:
    /// see [`Shared::read_status`]).
    async fn read(&self, id: &str) -> Result<Option<(Record, i64)>> {
        let resp = self
            .client
            .kv()
            .get(self.keys.record(id), None)
            .await
            .map_err(|e| etcd_err("reading the job", e).with_id(id))?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((Self::decode(id, kv.value())?, kv.mod_revision()))),
        }
    }

    /// The status of `id` with its output, and the revision read at: the record, the output
    /// and the in-flight marker in one consistent read. A job is Running while its marker
    /// exists (the record is written only when an attempt ends), at attempt attempts + 1.
    async fn read_status(&self, id: &str) -> Result<Option<(JobStatus, i64)>> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.record(id), None),
            TxnOp::get(self.keys.output(id), None),
            TxnOp::get(
                self.keys.inflight_of(id),
                Some(GetOptions::new().with_count_only()),
            ),
        ]);
        let resp = self
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("reading the job", e).with_id(id))?;
        let header_rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut ops = resp.op_responses();
        let Some(value) = take_first_value(&mut ops, 0) else {
            return Ok(None);
        };
        let mut status = Self::decode(id, &value)?.status;
        status.output = take_first_value(&mut ops, 1);
        let running = matches!(ops.get(2), Some(TxnOpResponse::Get(g)) if g.count() > 0);
        if running && status.state == JobState::Queued {
            status.state = JobState::Running;
            status.attempts = status.attempts.saturating_add(1);
        }
        Ok(Some((status, header_rev)))
    }

    fn not_found(id: &str) -> Error {
        Error::new(ErrorKind::NotFound, "no such job in this namespace")
            .with_backend(BACKEND)
            .with_id(id)
    }

    /// `Closed` once killed; NotFound for an id no job can have.
    fn check_job_id(&self, id: &JobId) -> Result<()> {
        self.client.check_alive()?;
        sync_core::id::validate("job id", &id.0).map_err(|e| Self::not_found(&id.0).with_source(e))
    }
}

pub(crate) struct EtcdTask {
    shared: Arc<Shared>,
}

impl EtcdTask {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        let root = format!("{}:task/", client.ns_prefix());
        let keep = client.config.job_retention;
        EtcdTask {
            shared: Arc::new(Shared {
                client,
                keys: Keys { root },
                retention: RollingLease::new(keep, keep / 8, "the job retention lease"),
            }),
        }
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and job.
#[async_trait]
impl JobStore for EtcdTask {
    type Queue = EtcdQueue;

    async fn submit(&self, job: Job) -> Result<JobId> {
        self.shared.client.check_alive()?;
        // A keyed job's id is its key: a second submit of the key finds the first job.
        let id = job
            .key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let mut job = job;
        let payload = std::mem::take(&mut job.payload);
        let record = Record {
            status: JobStatus::queued(JobId(id.clone()), &job),
            job,
        };
        let keys = &self.shared.keys;
        // Only if no job has this id yet: so a resend after a lost answer, or a second submit
        // of the same key, never queues the job twice.
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.record(&id),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(keys.record(&id), self.shared.encode(&record)?, None),
                TxnOp::put(keys.payload(&id), payload, None),
                TxnOp::put(keys.queue(&record.job.name, &id), "0", None),
            ]);
        let resp = self
            .send_submit(txn)
            .await
            .map_err(|e| etcd_err("submitting the job", e).with_id(&record.job.name))?;
        if resp.succeeded() {
            tracing::debug!(backend = BACKEND, job = %id, name = %record.job.name, "job submitted");
        } else {
            tracing::debug!(backend = BACKEND, job = %id, "job key already submitted");
        }
        Ok(JobId(id))
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        self.shared.check_job_id(id)?;
        match self.shared.read_status(&id.0).await? {
            Some((status, _)) => Ok(status),
            None => Err(Shared::not_found(&id.0)),
        }
    }

    async fn wait(&self, id: &JobId) -> Result<JobStatus> {
        self.shared.check_job_id(id)?;
        let shared = &self.shared;
        let key = shared.keys.record(&id.0);
        let mut killed = shared.client.killed();
        loop {
            let Some((status, rev)) = shared.read_status(&id.0).await? else {
                return Err(Shared::not_found(&id.0));
            };
            if status.state.is_final() {
                return Ok(status);
            }
            let changed = WatchOptions::new().with_start_revision(rev + 1);
            tokio::select! {
                _ = shared.client.watch_once(key.as_str(), changed, SAFETY_NET) => {}
                _ = tokio::time::sleep(SAFETY_NET) => {}
                _ = killed.wait_for(|k| *k) => shared.client.check_alive()?,
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "task"))]
    async fn queue(&self, name: &str) -> Result<EtcdQueue> {
        // Fails with Closed once killed, and makes sure a lease exists for the claims.
        self.shared.client.session().await?;
        self.check_claim_rights(name).await?;
        Ok(EtcdQueue::new(self.shared.clone(), name))
    }
}

impl EtcdTask {
    /// Sends a submit txn, again when its answer was lost: it is guarded by the record's
    /// create revision, so however many sends apply, the job is queued once.
    async fn send_submit(
        &self,
        txn: Txn,
    ) -> std::result::Result<etcd_client::TxnResponse, etcd_client::Error> {
        let mut sends = 0;
        loop {
            sends += 1;
            match self.shared.client.kv().txn(txn.clone()).await {
                Err(e) if sends < 3 && crate::error::answer_lost(&e) => {
                    tracing::warn!(backend = BACKEND, error = %e, "submit answer lost; sending it again");
                }
                other => return other,
            }
        }
    }

    /// Fails now, rather than in every later claim, when this client may not claim jobs: a
    /// txn touching what a claim touches, whose guard can never hold, so it writes nothing;
    /// etcd checks the rights of every key a txn names whether or not it applies.
    async fn check_claim_rights(&self, name: &str) -> Result<()> {
        let keys = &self.shared.keys;
        let probe = "rights-probe";
        let txn = Txn::new()
            .when([Compare::version(keys.record(probe), CompareOp::Less, 0)])
            .and_then([
                TxnOp::put(keys.record(probe), "", None),
                TxnOp::get(keys.payload(probe), None),
                TxnOp::delete(keys.queue(name, probe), None::<DeleteOptions>),
                TxnOp::put(keys.claim(probe), "", None),
                TxnOp::put(keys.inflight_of(probe), "", None),
                TxnOp::put(format!("{}{probe}", keys.workers(name)), "", None),
            ]);
        self.shared
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("checking the rights to claim jobs", e).with_id(name))?;
        Ok(())
    }
}

/// One job name's queue, as one worker sees it: a copy of the queue and of the name's
/// workers, kept current by [`EtcdQueue::sync`] (a chore of the worker).
pub(crate) struct EtcdQueue {
    shared: Arc<Shared>,
    /// `queue/<escaped name>/`.
    prefix: String,
    /// `workers/<escaped name>/`.
    workers_prefix: String,
    /// This worker's key under `workers_prefix`.
    me: Vec<u8>,
    view: Mutex<View>,
    /// Bumped on every change to `view`: what an idle claim loop waits on.
    changed: watch::Sender<u64>,
}

/// A worker's copy of its queue and of its name's workers.
#[derive(Default)]
struct View {
    /// The queue entries by create revision (oldest first).
    entries: BTreeMap<i64, Entry>,
    /// The create revision of each entry, by key.
    by_key: HashMap<Vec<u8>, i64>,
    /// The keys of the name's registered workers, sorted: a job's first choice is the one at
    /// its hash modulo their number.
    workers: BTreeSet<Vec<u8>>,
    /// Read at least once (until then this worker claims nothing).
    synced: bool,
    /// Entries whose record cannot be read: skipped (they must not block the queue).
    unreadable: HashSet<Vec<u8>>,
}

/// A queue entry as the copy holds it.
#[derive(Clone)]
struct Entry {
    key: Vec<u8>,
    id: String,
    value: Vec<u8>,
    /// Earliest start (unix ms).
    not_before: u64,
    /// The entry's mod revision: a claim is guarded by it.
    mod_rev: i64,
    /// When this worker learned of it (long ago for one found by reading the queue).
    seen: Instant,
    /// Claimed at `mod_rev` by this worker, or a claim of it failed (taken by another
    /// worker): not tried again unless it changes, or until the next resync.
    tried: bool,
}

impl Entry {
    fn new(prefix: &str, kv: &etcd_client::KeyValue, seen: Instant) -> Option<Entry> {
        let escaped = std::str::from_utf8(kv.key()).ok()?.strip_prefix(prefix)?;
        let id = sync_core::id::unescape(escaped)?;
        let not_before = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Some(Entry {
            key: kv.key().to_vec(),
            id,
            value: kv.value().to_vec(),
            not_before,
            mod_rev: kv.mod_revision(),
            seen,
            tried: false,
        })
    }
}

impl View {
    fn put(&mut self, create_rev: i64, entry: Entry) {
        if let Some(old) = self.by_key.insert(entry.key.clone(), create_rev) {
            if old != create_rev {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(create_rev, entry);
    }

    fn delete(&mut self, key: &[u8]) {
        if let Some(rev) = self.by_key.remove(key) {
            self.entries.remove(&rev);
        }
    }
}

/// The 64-bit FNV-1a hash of `id`: which worker a job falls to first, the same in every
/// process.
fn job_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// How long an entry first seen at `seen` waits before a worker that is `place` in line for
/// its job (0 = its first choice) tries it.
fn turn(seen: Instant, place: u64) -> Instant {
    seen + GRACE * u32::try_from(place).unwrap_or(u32::MAX)
}

/// Long enough ago that every worker's turn for the entry has come.
fn long_ago(now: Instant) -> Instant {
    now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
}

/// A queue entry chosen for a claim.
struct Pick {
    key: Vec<u8>,
    id: String,
    value: Vec<u8>,
    mod_rev: i64,
}

impl EtcdQueue {
    fn new(shared: Arc<Shared>, name: &str) -> EtcdQueue {
        let me = format!(
            "{}{}",
            shared.keys.workers(name),
            uuid::Uuid::new_v4().simple()
        );
        EtcdQueue {
            prefix: shared.keys.queue_prefix(name),
            workers_prefix: shared.keys.workers(name),
            me: me.into_bytes(),
            shared,
            view: Mutex::new(View::default()),
            changed: watch::channel(0).0,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        sync_kit::locked(&self.view)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Up to `max` startable entries this worker may try now, its first choices first (oldest
    /// first), then others whose turn came (from a random place, so that workers taking from
    /// a backlog spread over it); else when one may become startable.
    fn pick(&self, max: usize) -> (Vec<Pick>, Option<Instant>) {
        let view = self.view();
        if !view.synced {
            return (Vec::new(), None);
        }
        let now = Instant::now();
        let now_ms = now_ms();
        let n = view.workers.len() as u64;
        let rank = view
            .workers
            .iter()
            .position(|w| *w == self.me)
            .map(|r| r as u64);
        let mut wake: Option<Instant> = None;
        let mut soonest = |at: Instant| wake = Some(wake.map_or(at, |w| w.min(at)));
        let mut mine = Vec::new();
        let mut others = Vec::new();
        for e in view.entries.values() {
            if e.tried || view.unreadable.contains(&e.key) {
                continue;
            }
            if e.not_before > now_ms {
                // A corrupt entry (far in the future) must not overflow the clock.
                soonest(sync_kit::deadline(Duration::from_millis(
                    e.not_before - now_ms,
                )));
                continue;
            }
            // This worker's place in line for the job: 0 for its first choice; last (n) when
            // it is not registered (yet); 0 for all when no worker is.
            let place = match (n, rank) {
                (0, _) => 0,
                (n, Some(r)) => (r + n - job_hash(&e.id) % n) % n,
                (n, None) => n,
            };
            let at = turn(e.seen, place);
            if place == 0 || at <= now {
                if place == 0 {
                    mine.push(e);
                    if mine.len() >= max {
                        break;
                    }
                } else if others.len() < 4 * max {
                    others.push(e);
                }
            } else {
                soonest(at);
            }
        }
        if !others.is_empty() {
            let start = (uuid::Uuid::new_v4().as_u128() % others.len() as u128) as usize;
            others.rotate_left(start);
        }
        let picks: Vec<Pick> = mine
            .into_iter()
            .chain(others)
            .take(max)
            .map(|e| Pick {
                key: e.key.clone(),
                id: e.id.clone(),
                value: e.value.clone(),
                mod_rev: e.mod_rev,
            })
            .collect();
        (picks, wake)
    }

    /// Marks `picks` as tried: claimed, or taken by another worker (a watch event soon removes
    /// or renews them).
    fn mark_tried(&self, picks: &[Pick]) {
        let mut view = self.view();
        for p in picks {
            if let Some(rev) = view.by_key.get(&p.key).copied() {
                if let Some(e) = view.entries.get_mut(&rev) {
                    if e.mod_rev == p.mod_rev {
                        e.tried = true;
                    }
                }
            }
        }
    }

    /// Reads the queue and the workers (one request for a queue of up to [`SCAN_LIMIT`]
    /// entries) into the copy, registering this worker with `register`'s lease in the same
    /// request if given; the revision read at.
    async fn read(&self, register: Option<&Session>) -> Result<i64> {
        let client = &self.shared.client;
        let page = |from: &str, rev: i64| {
            let mut opts = GetOptions::new()
                .with_range(prefix_end(&self.prefix))
                .with_sort(SortTarget::Key, SortOrder::Ascend)
                .with_limit(SCAN_LIMIT);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            TxnOp::get(from.to_string(), Some(opts))
        };
        let mut ops = Vec::with_capacity(3);
        if let Some(session) = register {
            let opts = PutOptions::new().with_lease(session.lease);
            ops.push(TxnOp::put(self.me.clone(), "", Some(opts)));
        }
        ops.push(page(&self.prefix, 0));
        ops.push(TxnOp::get(
            self.workers_prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ));
        let resp = client
            .kv()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| {
                if let Some(session) = register {
                    session.end_if_lease_gone(&e);
                }
                etcd_err("reading the queue", e)
            })?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut entries = Vec::new();
        let mut workers = BTreeSet::new();
        let mut more = false;
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        if let Some(g) = gets.next() {
            more = g.more();
            entries.extend(g.kvs().iter().cloned());
        }
        if let Some(g) = gets.next() {
            workers.extend(g.kvs().iter().map(|kv| kv.key().to_vec()));
        }
        // The rest of a long queue, at the same revision.
        while more {
            let Some(last) = entries.last() else { break };
            let mut from = last.key().to_vec();
            from.push(0);
            let from = String::from_utf8_lossy(&from).into_owned();
            let resp = client
                .kv()
                .txn(Txn::new().and_then([page(&from, rev)]))
                .await
                .map_err(|e| etcd_err("reading the queue", e))?;
            more = false;
            if let Some(TxnOpResponse::Get(g)) = resp.op_responses().into_iter().next() {
                more = g.more() && !g.kvs().is_empty();
                entries.extend(g.kvs().iter().cloned());
            }
        }
        let now = Instant::now();
        let mut view = self.view();
        let old = std::mem::take(&mut view.entries);
        view.by_key.clear();
        for kv in &entries {
            let Some(mut e) = Entry::new(&self.prefix, kv, long_ago(now)) else {
                continue;
            };
            // One already known keeps when it was first seen (a failed try is forgotten:
            // a resync is when a worker looks at every entry again).
            if let Some(known) = old.get(&kv.create_revision()).filter(|k| k.key == e.key) {
                e.seen = known.seen;
            }
            view.put(kv.create_revision(), e);
        }
        view.workers = workers;
        view.synced = true;
        drop(view);
        self.bump();
        Ok(rev)
    }

    fn apply_queue(&self, resp: &WatchResponse) {
        let now = Instant::now();
        let mut view = self.view();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some(e) = Entry::new(&self.prefix, kv, now) {
                        view.put(kv.create_revision(), e);
                    }
                }
                EventType::Delete => view.delete(kv.key()),
            }
        }
        drop(view);
        self.bump();
    }

    fn apply_workers(&self, resp: &WatchResponse) {
        let mut view = self.view();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    view.workers.insert(kv.key().to_vec());
                }
                EventType::Delete => {
                    view.workers.remove(kv.key());
                }
            }
        }
        drop(view);
        self.bump();
    }

    /// Registers this worker (again with each new session) and keeps the copy current: reads
    /// it, then applies the watches' events, reading again after a watch ended or every
    /// [`RESYNC`]. Unregisters once stopped.
    async fn sync(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let client = self.shared.client.clone();
        let mut killed = client.killed();
        let mut registered: Option<Arc<Session>> = None;
        let mut retry = Retry::new(RESYNC_RETRY);
        loop {
            // (Re-)registering rides on the read of the queue.
            let mut register = None;
            if registered.as_ref().is_none_or(|s| s.ended.is_lost()) {
                registered = None;
                match client.session().await {
                    Ok(session) => register = Some(session),
                    Err(e) if e.kind() == ErrorKind::Closed => return,
                    Err(e) => {
                        tracing::warn!(backend = BACKEND, error = %e, "no session to register the worker with; retrying");
                    }
                }
            }
            let rev = match self.read(register.as_deref()).await {
                Ok(rev) => {
                    retry.succeeded();
                    registered = register.or(registered);
                    rev
                }
                Err(e) => {
                    tracing::debug!(backend = BACKEND, error = %e, "reading the queue failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry.after(&e, "reading the queue")) => continue,
                        _ = stopped(&mut stop, &mut killed) => break,
                    }
                }
            };
            let from = || {
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1)
            };
            let mut queue = client
                .watches
                .stream(self.prefix.clone().into_bytes(), from());
            let mut workers = client
                .watches
                .stream(self.workers_prefix.clone().into_bytes(), from());
            let resync = tokio::time::sleep(RESYNC);
            tokio::pin!(resync);
            let session_ended = async {
                match registered.as_ref() {
                    Some(s) => {
                        s.ended.wait().await;
                    }
                    // Not registered: try again soon.
                    None => tokio::time::sleep(RESYNC_RETRY).await,
                }
            };
            tokio::pin!(session_ended);
            let ended = loop {
                tokio::select! {
                    d = queue.next() => match d {
                        Delivery::Events(resp) => self.apply_queue(&resp),
                        Delivery::Ended(why) => break Some(why),
                    },
                    d = workers.next() => match d {
                        Delivery::Events(resp) => self.apply_workers(&resp),
                        Delivery::Ended(why) => break Some(why),
                    },
                    _ = &mut resync => break None,
                    _ = &mut session_ended => break None,
                    _ = stopped(&mut stop, &mut killed) => {
                        drop((queue, workers));
                        self.unregister().await;
                        return;
                    }
                }
            };
            drop((queue, workers));
            if let Some(why) = ended {
                client.ended(why).await;
            }
        }
        self.unregister().await;
    }

    /// Deletes this worker's registration, best effort and briefly (else it goes with the
    /// lease): a stopped worker's jobs go to the next in line at once rather than after a
    /// [`GRACE`].
    async fn unregister(&self) {
        let client = &self.shared.client;
        if client.is_killed() {
            return;
        }
        let mut kv = client.kv();
        let _ =
            tokio::time::timeout(Duration::from_secs(1), kv.delete(self.me.clone(), None)).await;
    }
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[async_trait]
impl JobQueue for EtcdQueue {
    type Claim = Claim;

    async fn claim(&self, _name: &str, max: usize) -> Result<Claimed<Claim>> {
        let session = self.shared.client.session().await?;
        // Listen before looking, so a change in between is not missed.
        let mut changed = self.changed.subscribe();
        changed.borrow_and_update();
        let (picks, wake) = self.pick(max.max(1));
        if picks.is_empty() {
            let wake = wake.unwrap_or_else(|| Instant::now() + RESYNC);
            return Ok(Claimed::Empty(Box::pin(async move {
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tokio::time::sleep_until(wake) => {}
                }
            })));
        }
        // A claim that failed (refused, or etcd unreachable) took nothing: its entries are
        // tried again after the worker's pause, not left until the next read of the queue.
        let claims = claim_batch(&self.shared, &session, &picks).await?;
        // Claimed, or taken by another worker: these entries are done with at this revision
        // (the watch's delete event, or a new put, comes soon).
        self.mark_tried(&picks);
        Ok(Claimed::Jobs(claims))
    }

    async fn finish(&self, claim: Claim, outcome: Outcome) {
        record_outcome(&self.shared, claim, outcome).await;
    }

    async fn closed(&self) {
        let _ = self.shared.client.killed().wait_for(|k| *k).await;
    }

    fn chores(self: Arc<Self>, stop: watch::Receiver<bool>) -> Option<BoxFuture<'static, ()>> {
        let reaping = reaper(self.shared.clone(), stop.clone());
        Some(Box::pin(async move {
            futures::join!(self.sync(stop), reaping);
        }))
    }
}

/// A claimed job with the context its handler gets: the claim's revision fences the attempt,
/// and its lease's end is the claim's end.
fn with_context(mut claim: Claim) -> (Claim, JobContext) {
    let token = u64::try_from(claim.rev).unwrap_or_default();
    let mut ctx = JobContext::new(JobId(claim.id.clone()), &claim.record.job, claim.attempt)
        .with_claim(token, claim.lease_ended.clone());
    ctx.payload = std::mem::take(&mut claim.payload);
    (claim, ctx)
}

async fn stopped(stop: &mut watch::Receiver<bool>, killed: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = killed.wait_for(|k| *k) => {}
    }
}

/// A claimed attempt.
pub(crate) struct Claim {
    id: String,
    /// The record as the claim read it (its attempts: those that ended before this one).
    record: Record,
    /// This attempt's number.
    attempt: u32,
    /// The job's payload, read in the claim's transaction.
    payload: Vec<u8>,
    /// The claim's revision: the claim key's mod revision, which finishing is guarded by,
    /// and the attempt's fencing token.
    rev: i64,
    /// Fires when the lease the claim was written with ends (the claim goes with it).
    lease_ended: LossSignal,
}

/// What a claim of one job read in its transaction.
struct Taken {
    record: Option<Vec<u8>>,
    payload: Vec<u8>,
    /// The claim's revision.
    rev: i64,
}

/// Claims `picks` in one transaction, a nested one per job guarded by its queue entry's
/// revision and the absence of a claim: the jobs claimed (those whose guard failed were taken
/// by another worker, or changed).
async fn claim_batch(
    shared: &Shared,
    session: &Session,
    picks: &[Pick],
) -> Result<Vec<(Claim, JobContext)>> {
    let keys = &shared.keys;
    // This request's own mark on its claims: how a lost answer is told apart from another
    // claim on the same lease.
    let token = format!("{}/{}", session.lease_hex(), uuid::Uuid::new_v4().simple());
    let nested = picks.iter().map(|p| {
        TxnOp::txn(
            Txn::new()
                .when([
                    Compare::mod_revision(p.key.clone(), CompareOp::Equal, p.mod_rev),
                    Compare::create_revision(keys.claim(&p.id), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::delete(p.key.clone(), None::<DeleteOptions>),
                    TxnOp::put(
                        keys.claim(&p.id),
                        token.as_str(),
                        Some(PutOptions::new().with_lease(session.lease)),
                    ),
                    TxnOp::put(keys.inflight_of(&p.id), "", None),
                    TxnOp::get(keys.record(&p.id), None),
                    TxnOp::get(keys.payload(&p.id), None),
                ]),
        )
    });
    let txn = Txn::new().and_then(nested.collect::<Vec<_>>());
    let taken: Vec<Option<Taken>> = match shared.client.kv().txn(txn).await {
        Ok(done) => {
            let rev = done.header().map(|h| h.revision()).unwrap_or_default();
            done.op_responses()
                .into_iter()
                .map(|op| match op {
                    TxnOpResponse::Txn(t) if t.succeeded() => {
                        let mut ops = t.op_responses();
                        Some(Taken {
                            record: take_first_value(&mut ops, 3),
                            payload: take_first_value(&mut ops, 4).unwrap_or_default(),
                            rev,
                        })
                    }
                    _ => None,
                })
                .collect()
        }
        // A lease gone before the keepalive noticed (the next claim uses a new one), or a
        // request that never left: surely not claimed.
        Err(e) if session.end_if_lease_gone(&e) || crate::error::not_delivered(&e) => {
            return Err(etcd_err("claiming jobs", e));
        }
        // The claim may have committed: find out before answering.
        Err(e) => {
            tracing::warn!(backend = BACKEND, jobs = picks.len(), error = %e, "the claim's answer was lost; resolving it");
            resolve_claims(shared, session, picks, &token).await?
        }
    };
    let mut out = Vec::new();
    for (p, taken) in picks.iter().zip(taken) {
        let Some(taken) = taken else { continue };
        if let Some(claim) = take_up(shared, session, p, taken).await {
            tracing::debug!(backend = BACKEND, job = %claim.id, attempt = claim.attempt, "job claimed");
            out.push(with_context(claim));
        }
    }
    Ok(out)
}

/// The claim of `p` that committed, if its job is to run: a queue entry without a record, or
/// whose job already ended, was stale and its claim is undone (the entry stays deleted); one
/// whose record cannot be read is undone and its entry put back (the worker that finds it
/// skips it from then on).
async fn take_up(shared: &Shared, session: &Session, p: &Pick, taken: Taken) -> Option<Claim> {
    let record = match taken.record.as_deref().map(|v| Shared::decode(&p.id, v)) {
        Some(Ok(record)) if !record.status.state.is_final() => record,
        Some(Err(e)) => {
            tracing::warn!(backend = BACKEND, job = %p.id, error = %e, "skipping a job whose record cannot be read");
            undo_claim(shared, p, taken.rev, true).await;
            return None;
        }
        _ => {
            undo_claim(shared, p, taken.rev, false).await;
            return None;
        }
    };
    let attempt = record.status.attempts.saturating_add(1);
    Some(Claim {
        id: p.id.clone(),
        record,
        attempt,
        payload: taken.payload,
        rev: taken.rev,
        lease_ended: session.ended.clone(),
    })
}

/// Deletes the claim and the in-flight marker of `p` made at `rev` (and puts its queue entry
/// back if `restore`), best effort.
async fn undo_claim(shared: &Shared, p: &Pick, rev: i64, restore: bool) {
    let keys = &shared.keys;
    let mut ops = vec![
        TxnOp::delete(keys.claim(&p.id), None::<DeleteOptions>),
        TxnOp::delete(keys.inflight_of(&p.id), None::<DeleteOptions>),
    ];
    if restore {
        ops.push(TxnOp::put(p.key.clone(), p.value.clone(), None));
    }
    let txn = Txn::new().when([keys.claim_at(&p.id, rev)]).and_then(ops);
    if let Err(e) = shared.client.kv().txn(txn).await {
        tracing::warn!(backend = BACKEND, job = %p.id, error = %e, "undoing a stale claim failed; the reaper redelivers the job");
    }
}

/// Settles a claim of `picks` whose answer was lost: it may have committed, or may still be in
/// flight. One txn, a nested one per job, either fences the job's claim — its queue entry is
/// still at the revision claimed, so it is rewritten unchanged and the claim fails its guard
/// should it arrive later — or reads its claim, record and payload: the job is ours if its
/// claim key carries `token` on this session's lease. Retried with backoff while the lease
/// lives (what it holds ends with it); an error no retry cures gives up whatever may be ours.
async fn resolve_claims(
    shared: &Shared,
    session: &Session,
    picks: &[Pick],
    token: &str,
) -> Result<Vec<Option<Taken>>> {
    let keys = &shared.keys;
    let nested = picks.iter().map(|p| {
        TxnOp::txn(
            Txn::new()
                .when([Compare::mod_revision(
                    p.key.clone(),
                    CompareOp::Equal,
                    p.mod_rev,
                )])
                .and_then([TxnOp::put(p.key.clone(), p.value.clone(), None)])
                .or_else([
                    TxnOp::get(keys.claim(&p.id), None),
                    TxnOp::get(keys.record(&p.id), None),
                    TxnOp::get(keys.payload(&p.id), None),
                ]),
        )
    });
    let fence = Txn::new().and_then(nested.collect::<Vec<_>>());
    let mut failures = 0u32;
    let resp = loop {
        let err = match shared.client.kv().txn(fence.clone()).await {
            Ok(resp) => break resp,
            Err(e) => etcd_err("resolving a claim whose answer was lost", e),
        };
        shared.client.check_alive()?;
        if err.kind() != ErrorKind::Unavailable {
            release_if_ours(shared, picks, token).await;
            return Err(err);
        }
        if session.ended.is_lost() {
            return Err(err);
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(Duration::from_millis(200) * failures.min(25)).await;
    };
    let mut out = Vec::new();
    for (p, op) in picks.iter().zip(resp.op_responses()) {
        let TxnOpResponse::Txn(t) = op else {
            out.push(None);
            continue;
        };
        if t.succeeded() {
            // Fenced: the claim of this job did not commit, and never will.
            out.push(None);
            continue;
        }
        let mut ops = t.op_responses();
        let claim = match ops.first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| {
                (
                    kv.lease() == session.lease && kv.value() == token.as_bytes(),
                    kv.mod_revision(),
                )
            }),
            _ => None,
        };
        match claim {
            Some((true, rev)) => {
                tracing::info!(backend = BACKEND, job = %p.id, "the claim whose answer was lost is ours");
                out.push(Some(Taken {
                    record: take_first_value(&mut ops, 1),
                    payload: take_first_value(&mut ops, 2).unwrap_or_default(),
                    rev,
                }));
            }
            _ => out.push(None),
        }
    }
    Ok(out)
}

/// Deletes the claims of `picks` that carry `token` (made by a request whose answer was lost),
/// so the reapers redeliver their jobs (best effort: if it fails, the claims still end with the
/// lease).
async fn release_if_ours(shared: &Shared, picks: &[Pick], token: &str) {
    let nested = picks.iter().map(|p| {
        let claim = shared.keys.claim(&p.id);
        TxnOp::txn(
            Txn::new()
                .when([Compare::value(claim.as_str(), CompareOp::Equal, token)])
                .and_then([TxnOp::delete(claim, None::<DeleteOptions>)]),
        )
    });
    let txn = Txn::new().and_then(nested.collect::<Vec<_>>());
    if let Err(e) = shared.client.kv().txn(txn).await {
        tracing::warn!(backend = BACKEND, error = %e, "releasing claims whose answer was lost failed; they end with the lease");
    }
}

/// Records an attempt's outcome, unless the claim was lost meanwhile.
async fn record_outcome(shared: &Shared, claim: Claim, mut outcome: Outcome) {
    let Claim {
        id,
        mut record,
        attempt,
        rev,
        lease_ended,
        ..
    } = claim;
    record.status.attempts = attempt;
    let mut downgraded = false;
    let mut pauses = OutcomePauses::default();
    let mut lease_refreshes = 0u32;
    loop {
        if shared.client.is_killed() {
            return;
        }
        let lease = match shared.retention_lease().await {
            Ok(lease) => lease,
            // As for the outcome's own write: keep trying while the claim's lease may live;
            // once it ended the claim went with it and the job is redelivered.
            Err(e) if pauses.worth_waiting(&e, &lease_ended) => {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "granting the retention lease failed; retrying");
                pauses.wait(&e, &lease_ended).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "no retention lease for the outcome; releasing the claim");
                release_claim(shared, &id, rev).await;
                return;
            }
        };
        let txn = match finish_txn(
            shared,
            &id,
            rev,
            &mut record,
            attempt,
            outcome.clone(),
            lease,
        ) {
            Ok(txn) => txn,
            Err(e) => {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "encoding the outcome failed; releasing the claim");
                release_claim(shared, &id, rev).await;
                return;
            }
        };
        let err = match shared.client.kv().txn(txn).await {
            Ok(resp) if resp.succeeded() => return,
            Ok(_) => {
                tracing::warn!(backend = BACKEND, job = %id, "the claim was lost before the attempt finished; its outcome is dropped");
                return;
            }
            // The retention lease expired under us (a long pause): a definite refusal, so the
            // write is simply made again with a fresh lease.
            Err(e) if crate::error::lease_not_found(&e) && lease_refreshes < 3 => {
                lease_refreshes += 1;
                shared.forget_retention_lease().await;
                continue;
            }
            Err(e) => etcd_err("recording the outcome", e).with_id(&id),
        };
        match err.kind() {
            // etcd unreachable, or the worker's rights revoked: keep trying while the claim's
            // lease may live (giving up would leave the job Running for as long as this
            // worker's lease lives). Once it has ended the claim went with it and the reapers
            // redeliver the job.
            ErrorKind::Unavailable | ErrorKind::Unauthorized if lease_ended.is_lost() => {
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "recording the outcome failed and the claim's lease ended; the job will be redelivered");
                return;
            }
            ErrorKind::Unavailable | ErrorKind::Unauthorized => {
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "recording the outcome failed; retrying");
                pauses.wait(&err, &lease_ended).await;
            }
            // The outcome cannot be stored (an output over etcd's request limit): record the
            // attempt as failed instead, once, so the job is not left Running.
            _ if !downgraded => {
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "the outcome cannot be stored; recording the attempt as failed");
                downgraded = true;
                outcome = Err(format!("the attempt's outcome could not be stored: {err}"));
            }
            // Nothing can be written: give the claim up so the job is redelivered rather than
            // left Running for as long as this worker's lease lives.
            _ => {
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "recording the outcome failed; releasing the claim");
                release_claim(shared, &id, rev).await;
                return;
            }
        }
    }
}

/// The pauses of an outcome's write between failures: 200 ms more after each while etcd is
/// unreachable (up to 5 s), and doubling up to 30 s while refused (the worker's rights
/// revoked, until an operator gives them back).
struct OutcomePauses {
    transient: u32,
    refused: Retry,
}

impl Default for OutcomePauses {
    fn default() -> Self {
        OutcomePauses {
            transient: 0,
            refused: Retry::new(Duration::from_millis(500)),
        }
    }
}

impl OutcomePauses {
    /// Whether failure `e` may pass while the claim lives: an outage or a refusal.
    fn worth_waiting(&self, e: &Error, lease_ended: &LossSignal) -> bool {
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Unauthorized)
            && !lease_ended.is_lost()
    }

    /// Waits out the pause after failure `e`, or until the claim's lease ends.
    async fn wait(&mut self, e: &Error, lease_ended: &LossSignal) {
        let pause = if e.kind() == ErrorKind::Unauthorized {
            self.refused.after(e, "recording a job's outcome")
        } else {
            self.transient = self.transient.saturating_add(1);
            Duration::from_millis(200) * self.transient.min(25)
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = lease_ended.wait() => {}
        }
    }
}

/// The transaction that records an attempt's outcome, guarded by the claim:
/// Succeeded, Failed, or Queued again with a delayed queue entry.
fn finish_txn(
    shared: &Shared,
    id: &str,
    rev: i64,
    record: &mut Record,
    attempt: u32,
    outcome: Outcome,
    retention_lease: i64,
) -> Result<Txn> {
    let keys = &shared.keys;
    let mut requeue_at = None;
    let mut output = None;
    match apply_outcome(&record.job, &mut record.status, attempt, outcome) {
        Next::Succeeded(out) => output = Some(out),
        Next::Retry { delay } => {
            requeue_at = Some(now_ms().saturating_add(delay.as_millis() as u64));
        }
        Next::Failed => {}
    }
    let value = shared.encode(record)?;
    // A final record and its output go when the retention lease expires.
    let kept = requeue_at
        .is_none()
        .then(|| PutOptions::new().with_lease(retention_lease));
    let mut ops = vec![
        TxnOp::put(keys.record(id), value, kept.clone()),
        TxnOp::delete(keys.claim(id), None::<DeleteOptions>),
        TxnOp::delete(keys.inflight_of(id), None::<DeleteOptions>),
    ];
    if let Some(output) = output {
        ops.push(TxnOp::put(keys.output(id), output, kept));
    }
    match requeue_at {
        Some(at) => ops.push(TxnOp::put(
            keys.queue(&record.job.name, id),
            at.to_string(),
            None,
        )),
        // The job ended: nothing reads its payload any more.
        None => ops.push(TxnOp::delete(keys.payload(id), None::<DeleteOptions>)),
    }
    Ok(Txn::new().when([keys.claim_at(id, rev)]).and_then(ops))
}

/// Deletes the claim of `id` so the reapers redeliver the job — only while it is still this
/// attempt's claim (written at `rev`), so a newer attempt's claim is never touched (best effort:
/// if it fails, the claim still ends with this worker's lease).
async fn release_claim(shared: &Shared, id: &str, rev: i64) {
    let keys = &shared.keys;
    let txn = Txn::new()
        .when([keys.claim_at(id, rev)])
        .and_then([TxnOp::delete(keys.claim(id), None::<DeleteOptions>)]);
    if let Err(e) = shared.client.kv().txn(txn).await {
        tracing::warn!(backend = BACKEND, job = %id, error = %e, "releasing the claim failed; it ends with the lease");
    }
}

/// Requeues jobs whose claim vanished while they ran: pushed by a watch on deletions of claims
/// and in-flight markers (a claim deleted without its marker, in the same revision, leaves an
/// orphan: rescanned after [`REAP_DEBOUNCE`]), with a rescan every [`RESYNC`] as a safety net.
/// A finished attempt deletes both at once, so it costs no rescan.
async fn reaper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut killed = shared.client.killed();
    let keys = &shared.keys;
    let mut retry = Retry::new(RESYNC_RETRY);
    loop {
        let (rev, pause) = match reap_orphans(&shared).await {
            Ok(rev) => {
                retry.succeeded();
                (rev, RESYNC_RETRY)
            }
            Err(e) => {
                tracing::debug!(backend = BACKEND, error = %e, "scanning for orphaned claims failed");
                (0, retry.after(&e, "scanning for orphaned claims"))
            }
        };
        if rev == 0 {
            tokio::select! {
                _ = tokio::time::sleep(pause) => continue,
                _ = stopped(&mut stop, &mut killed) => return,
            }
        }
        let opts = WatchOptions::new()
            .with_range(keys.inflight_end())
            .with_start_revision(rev + 1)
            .with_filters([WatchFilterType::NoPut]);
        let mut deletions = shared
            .client
            .watches
            .stream(keys.claims().into_bytes(), opts);
        let resync = tokio::time::sleep(RESYNC);
        tokio::pin!(resync);
        loop {
            tokio::select! {
                d = deletions.next() => match d {
                    Delivery::Events(resp) => {
                        if orphans_left(keys, &resp) {
                            tokio::time::sleep(REAP_DEBOUNCE).await;
                            break;
                        }
                    }
                    Delivery::Ended(why) => {
                        shared.client.ended(why).await;
                        break;
                    }
                },
                _ = &mut resync => break,
                _ = stopped(&mut stop, &mut killed) => return,
            }
        }
    }
}

/// Whether `resp` deleted a claim without deleting its job's in-flight marker in the same
/// revision (a finished attempt deletes both; an ended lease only the claim).
fn orphans_left(keys: &Keys, resp: &WatchResponse) -> bool {
    let claims = keys.claims();
    let markers = keys.inflight();
    let mut claimed = HashSet::new();
    let mut ended = HashSet::new();
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let Ok(key) = std::str::from_utf8(kv.key()) else {
            continue;
        };
        if let Some(id) = key.strip_prefix(claims.as_str()) {
            claimed.insert((kv.mod_revision(), id.to_string()));
        } else if let Some(id) = key.strip_prefix(markers.as_str()) {
            ended.insert((kv.mod_revision(), id.to_string()));
        }
    }
    claimed.difference(&ended).next().is_some()
}

/// One consistent look at in-flight markers and claims; requeues every marker without a
/// claim. Returns the revision it looked at.
async fn reap_orphans(shared: &Shared) -> Result<i64> {
    let keys = &shared.keys;
    let only_keys = || Some(GetOptions::new().with_prefix().with_keys_only());
    let txn = Txn::new().and_then([
        TxnOp::get(keys.inflight(), only_keys()),
        TxnOp::get(keys.claims(), only_keys()),
    ]);
    let resp = shared
        .client
        .kv()
        .txn(txn)
        .await
        .map_err(|e| etcd_err("scanning claims", e))?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
    let ops = resp.op_responses();
    let ids = |op: Option<&TxnOpResponse>, prefix: &str| -> Vec<(String, i64)> {
        match op {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(kv.key())
                        .ok()?
                        .strip_prefix(prefix)
                        .map(|id| (id.to_string(), kv.mod_revision()))
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let inflight = ids(ops.first(), &keys.inflight());
    let claims: HashSet<String> = ids(ops.get(1), &keys.claims())
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for (escaped, marker_rev) in inflight.iter().filter(|(i, _)| !claims.contains(i)) {
        if let Some(id) = sync_core::id::unescape(escaped) {
            if let Err(e) = requeue_orphan(shared, &id, *marker_rev).await {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "requeueing an orphaned job failed");
            }
        }
    }
    Ok(rev)
}

/// Deletes the in-flight marker of `id` only while it is still the one written at
/// `marker_rev` (and, if `queued` names it, while that queue entry exists): a worker may have
/// claimed the job since, and its marker is what lets a reaper redeliver the job should that
/// worker die.
async fn drop_stale_marker(
    shared: &Shared,
    id: &str,
    marker_rev: i64,
    queued: Option<String>,
) -> Result<()> {
    let keys = &shared.keys;
    let mut guard = vec![Compare::mod_revision(
        keys.inflight_of(id),
        CompareOp::Equal,
        marker_rev,
    )];
    if let Some(entry) = queued {
        guard.push(Compare::create_revision(entry, CompareOp::Greater, 0));
    }
    let txn = Txn::new()
        .when(guard)
        .and_then([TxnOp::delete(keys.inflight_of(id), None::<DeleteOptions>)]);
    shared
        .client
        .kv()
        .txn(txn)
        .await
        .map_err(|e| etcd_err("deleting a stale in-flight marker", e).with_id(id))?;
    Ok(())
}

/// Ends the attempt of `id` whose claim is gone while its in-flight marker (written at
/// `marker_rev`) is left: the job is queued again, or Failed when out of attempts. A marker
/// with no running attempt behind it (the job ended, or is queued) is merely deleted.
async fn requeue_orphan(shared: &Shared, id: &str, marker_rev: i64) -> Result<()> {
    let keys = &shared.keys;
    let kv = || shared.client.kv();
    let Some((mut record, mod_rev)) = shared.read(id).await? else {
        return drop_stale_marker(shared, id, marker_rev, None).await;
    };
    if record.status.state.is_final() {
        return drop_stale_marker(shared, id, marker_rev, None).await;
    }
    let entry = keys.queue(&record.job.name, id);
    // The attempt that was lost.
    let attempts = record.status.attempts.saturating_add(1);
    record.status.attempts = attempts;
    let reason = format!("its lease ended during attempt {attempts}");
    let out_of_attempts = !apply_worker_loss(&record.job, &mut record.status, &reason);
    // A job that failed for good is kept for the retention, like any finished job (a lease
    // gone meanwhile fails this txn; the next reaper pass tries again with a fresh one).
    let kept = match out_of_attempts {
        true => Some(PutOptions::new().with_lease(shared.retention_lease().await?)),
        false => None,
    };
    let mut ops = vec![
        TxnOp::put(keys.record(id), shared.encode(&record)?, kept),
        TxnOp::delete(keys.inflight_of(id), None::<DeleteOptions>),
    ];
    if out_of_attempts {
        ops.push(TxnOp::delete(keys.payload(id), None::<DeleteOptions>));
    } else {
        ops.push(TxnOp::put(entry.as_str(), "0", None));
    }
    let txn = Txn::new()
        .when([
            Compare::mod_revision(keys.inflight_of(id), CompareOp::Equal, marker_rev),
            Compare::create_revision(keys.claim(id), CompareOp::Equal, 0),
            Compare::mod_revision(keys.record(id), CompareOp::Equal, mod_rev),
            Compare::create_revision(entry.as_str(), CompareOp::Equal, 0),
        ])
        .and_then(ops)
        .or_else([TxnOp::get(
            entry.as_str(),
            Some(GetOptions::new().with_count_only()),
        )]);
    let resp = kv().txn(txn).await.map_err(|e| {
        if crate::error::lease_not_found(&e) {
            // Not awaited here: the next pass grants a fresh lease.
            shared.retention.try_forget();
        }
        etcd_err("requeueing the job", e).with_id(id)
    })?;
    if resp.succeeded() {
        tracing::warn!(backend = BACKEND, job = %id, attempts, redelivered = !out_of_attempts, "a worker died holding the job");
        return Ok(());
    }
    // The job is queued, not running: the marker is stale.
    let queued =
        matches!(resp.op_responses().first(), Some(TxnOpResponse::Get(g)) if g.count() > 0);
    if queued {
        drop_stale_marker(shared, id, marker_rev, Some(entry)).await?;
    }
    Ok(())
}
