//! Task on etcd: a job queue whose claims are bound to the worker's lease, so a dead worker's
//! jobs are redelivered when its lease expires.
//!
//! Keys under `<ns>/:task/`:
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `jobs/<id>` | JSON: the job and its status, without payload and output | none |
//! | `payloads/<id>` | the payload, raw (deleted once the job ended) | none |
//! | `outputs/<id>` | the output, raw, once Succeeded | none |
//! | `queue/<escaped name>/<id>` | earliest start (unix ms) | none |
//! | `claims/<id>` | the claiming worker | the worker client's lease |
//! | `inflight/<id>` | empty | none |
//!
//! Payload and output bytes are kept raw beside the record rather than in its JSON (where bytes
//! are arrays of numbers, about 4x larger), so a payload or output of up to
//! [`MAX_PAYLOAD_LEN`](sync_core::MAX_PAYLOAD_LEN) stays well within etcd's request limit (1.5 MiB by default).
//!
//! Submitting writes the record, the payload and the queue entry in one transaction. A worker
//! claims a job in one transaction guarded by the record's mod revision: record → Running
//! (attempts + 1), queue entry deleted, claim (with its lease) and in-flight marker written,
//! payload read. A claim whose answer is lost (it may have committed) is settled before the
//! worker answers: fenced if it has not committed, taken up if it did on this worker's lease.
//! Finishing is one transaction guarded by the same mod revision: record →
//! Succeeded (output written) / Failed / Queued (retry, queue entry re-written), claim and
//! marker deleted (and the payload, once the job ended). An output over [`MAX_PAYLOAD_LEN`](sync_core::MAX_PAYLOAD_LEN)
//! fails the attempt. Workers page through the whole queue, oldest first, until they find a
//! startable entry, so delayed retries at its head never hold up newer jobs. Every worker watches `claims/` for
//! deletions (and rescans every few seconds as a safety net); an in-flight marker whose claim
//! is gone belongs to a dead worker, and its job is queued again (or Failed when out of
//! attempts). `wait` watches the record.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sync_core::{
    Error, ErrorKind, Job, JobContext, JobId, JobState, JobStatus, LossSignal, Result,
};
use sync_kit::task::{
    Claimed, JobQueue, JobStore, Next, Outcome, apply_outcome, apply_worker_loss,
};
use tokio::{sync::watch, time::Instant};

use crate::{
    BACKEND,
    client::{ClientInner, Session, etcd_err},
    lease::RollingLease,
};

/// The safety-net rescan of orphaned claims and the longest a worker sleeps without a watch
/// event before looking at its queue again.
const SAFETY_NET: Duration = Duration::from_secs(5);

/// How long the reaper lets claim deletions accumulate before rescanning: every finished job
/// deletes a claim, and one rescan reads every in-flight marker and claim, so a burst of
/// finished jobs costs one rescan rather than one each.
const REAP_DEBOUNCE: Duration = Duration::from_millis(250);

/// The error message of a job record that is not valid JSON.
const UNREADABLE_RECORD: &str = "the job record is not valid JSON";

/// How many queue entries a worker reads per request while scanning its queue.
const SCAN_LIMIT: i64 = 64;

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
    fn payload(&self, id: &str) -> String {
        format!("{}payloads/{}", self.root, sync_core::id::escape(id))
    }
    fn output(&self, id: &str) -> String {
        format!("{}outputs/{}", self.root, sync_core::id::escape(id))
    }
    /// The guard of every change to a job: its record is still at mod revision `rev`.
    fn record_at(&self, id: &str, rev: i64) -> Compare {
        Compare::mod_revision(self.record(id), CompareOp::Equal, rev)
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

    /// The status of `id` with its output, and the revision read at: the record and the
    /// output in one consistent read.
    async fn read_status(&self, id: &str) -> Result<Option<(JobStatus, i64)>> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.keys.record(id), None),
            TxnOp::get(self.keys.output(id), None),
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

#[async_trait]
impl JobStore for EtcdTask {
    type Queue = EtcdQueue;

    #[tracing::instrument(level = "debug", skip(self, job), fields(backend = BACKEND, primitive = "task", id = %job.name))]
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

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "task"))]
    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        self.shared.check_job_id(id)?;
        match self.shared.read_status(&id.0).await? {
            Some((status, _)) => Ok(status),
            None => Err(Shared::not_found(&id.0)),
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "task"))]
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
        Ok(EtcdQueue {
            shared: self.shared.clone(),
            prefix: self.shared.keys.queue_prefix(name),
            ahead: Default::default(),
        })
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
                TxnOp::delete(keys.queue(name, probe), None::<DeleteOptions>),
                TxnOp::put(keys.claim(probe), "", None),
                TxnOp::put(keys.inflight_of(probe), "", None),
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

/// One job name's queue, as a worker of this client sees it.
pub(crate) struct EtcdQueue {
    shared: Arc<Shared>,
    prefix: String,
    /// Startable jobs from the last scan, records read, not yet tried: the next claims try
    /// them first, one request each, before the queue is read again. A stale one (claimed by
    /// another worker, or changed) fails its claim's guard and is dropped.
    ahead: std::sync::Mutex<std::collections::VecDeque<Candidate>>,
}

#[async_trait]
impl JobQueue for EtcdQueue {
    type Claim = Claim;

    async fn claim(&self, _name: &str) -> Result<Claimed<Claim>> {
        let session = self.shared.client.session().await?;
        while let Some(candidate) = self.next_ahead() {
            if let Some(claim) = claim_candidate(&self.shared, &session, candidate).await? {
                return Ok(Claimed::Job(claim.0, claim.1));
            }
        }
        let (claim, rev, wake) = claim_one(&self.shared, &self.prefix, &self.ahead).await?;
        if let Some((claim, ctx)) = claim {
            return Ok(Claimed::Job(claim, ctx));
        }
        // Watching from the revision the queue was read at misses no entry written since.
        let shared = self.shared.clone();
        let prefix = self.prefix.clone();
        let wake = wake.unwrap_or_else(|| Instant::now() + SAFETY_NET);
        Ok(Claimed::Empty(Box::pin(async move {
            let changed = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            tokio::select! {
                _ = shared.client.watch_once(prefix.as_str(), changed, SAFETY_NET), if rev > 0 => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        })))
    }

    async fn finish(&self, claim: Claim, outcome: Outcome) {
        record_outcome(&self.shared, claim, outcome).await;
    }

    async fn closed(&self) {
        let _ = self.shared.client.killed().wait_for(|k| *k).await;
    }

    fn chores(self: Arc<Self>, stop: watch::Receiver<bool>) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(reaper(self.shared.clone(), stop)))
    }
}

impl EtcdQueue {
    fn next_ahead(&self) -> Option<Candidate> {
        sync_kit::locked(&self.ahead).pop_front()
    }
}

/// A claimed job with the context its handler gets: the claim's revision fences the attempt,
/// and its lease's end is the claim's end.
fn with_context(mut claim: Claim) -> (Claim, JobContext) {
    let token = u64::try_from(claim.rev).unwrap_or_default();
    let mut ctx = JobContext::new(
        JobId(claim.id.clone()),
        &claim.record.job,
        claim.record.status.attempts,
    )
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
    record: Record,
    /// The job's payload, read in the claim's transaction.
    payload: Vec<u8>,
    /// The record's mod revision after the claim: finishing is guarded by it.
    rev: i64,
    /// Fires when the lease the claim was written with ends (the claim goes with it).
    lease_ended: LossSignal,
}

/// A startable queue entry with its job's record, read in one batch with its neighbours.
pub(crate) struct Candidate {
    /// The queue entry's key.
    entry: Vec<u8>,
    id: String,
    record: Record,
    /// The record's mod revision when read: the claim is guarded by it.
    mod_rev: i64,
}

/// Claims a startable job of the queue, paging through it (oldest first) until one is
/// claimed or the queue is exhausted. Each page's startable entries have their records read
/// in one request; they are tried from a random place in the page (so workers spread over
/// the queue rather than race for its head), and those not tried are left in `ahead` for the
/// next claims. Returns the claim (if any), the revision the queue was first read at
/// (watching for changes from there misses nothing), and when the earliest delayed retry seen
/// becomes startable.
async fn claim_one(
    shared: &Shared,
    queue_prefix: &str,
    ahead: &std::sync::Mutex<std::collections::VecDeque<Candidate>>,
) -> Result<(Option<(Claim, JobContext)>, i64, Option<Instant>)> {
    let client = &shared.client;
    let session = client.session().await?;
    let now = now_ms();
    let mut wake: Option<u64> = None;
    let mut first_rev = 0;
    // Pages continue after the last entry seen, in create-revision order.
    let mut after_create_rev = 0;
    loop {
        let mut opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(SCAN_LIMIT);
        if after_create_rev > 0 {
            opts = opts.with_min_create_revision(after_create_rev + 1);
        }
        let resp = client
            .kv()
            .get(queue_prefix, Some(opts))
            .await
            .map_err(|e| etcd_err("reading the queue", e))?;
        if first_rev == 0 {
            first_rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        }
        let mut startable = Vec::new();
        for kv in resp.kvs() {
            after_create_rev = after_create_rev.max(kv.create_revision());
            let not_before: u64 = std::str::from_utf8(kv.value())
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if not_before > now {
                wake = Some(wake.map_or(not_before, |w| w.min(not_before)));
                continue;
            }
            startable.push(kv);
        }
        let mut candidates = candidates(shared, queue_prefix, &startable).await?;
        if !candidates.is_empty() {
            let start = (uuid::Uuid::new_v4().as_u128() % candidates.len() as u128) as usize;
            candidates.rotate_left(start);
        }
        let mut candidates = candidates.into_iter();
        while let Some(candidate) = candidates.next() {
            if let Some(claim) = claim_candidate(shared, &session, candidate).await? {
                sync_kit::locked(ahead).extend(candidates);
                return Ok((Some(claim), first_rev, None));
            }
        }
        if !resp.more() || resp.kvs().is_empty() {
            break;
        }
    }
    // A corrupt entry (not_before far in the future) must not overflow the clock.
    let wake = wake.map(|w| sync_kit::deadline(Duration::from_millis(w.saturating_sub(now))));
    Ok((None, first_rev, wake))
}

/// The claimable jobs of `entries` (startable queue entries), their records read in one
/// request. An entry without a record is dropped; one whose job already ended is dropped,
/// guarded by the record; one whose record cannot be read is skipped (it must not block every
/// job queued behind it).
async fn candidates(
    shared: &Shared,
    queue_prefix: &str,
    entries: &[&etcd_client::KeyValue],
) -> Result<Vec<Candidate>> {
    let ids: Vec<(&etcd_client::KeyValue, String)> = entries
        .iter()
        .filter_map(|kv| {
            let escaped = std::str::from_utf8(kv.key())
                .ok()?
                .strip_prefix(queue_prefix)?;
            Some((*kv, sync_core::id::unescape(escaped)?))
        })
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let reads = ids
        .iter()
        .map(|(_, id)| TxnOp::get(shared.keys.record(id), None))
        .collect::<Vec<_>>();
    let resp = shared
        .client
        .kv()
        .txn(Txn::new().and_then(reads))
        .await
        .map_err(|e| etcd_err("reading the queued jobs", e))?;
    let mut out = Vec::new();
    for ((kv, id), op) in ids.into_iter().zip(resp.op_responses()) {
        let TxnOpResponse::Get(got) = op else {
            continue;
        };
        let Some(record_kv) = got.kvs().first() else {
            // An entry without a record: drop it.
            let _ = shared.client.kv().delete(kv.key().to_vec(), None).await;
            continue;
        };
        let mod_rev = record_kv.mod_revision();
        let record = match Shared::decode(&id, record_kv.value()) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "skipping a job whose record cannot be read");
                continue;
            }
        };
        if record.status.state == JobState::Queued {
            out.push(Candidate {
                entry: kv.key().to_vec(),
                id,
                record,
                mod_rev,
            });
        } else if record.status.state.is_final() {
            // A stale entry (the job already ended): drop it, guarded by the record.
            let stale = Txn::new()
                .when([shared.keys.record_at(&id, mod_rev)])
                .and_then([TxnOp::delete(kv.key().to_vec(), None::<DeleteOptions>)]);
            let _ = shared.client.kv().txn(stale).await;
        }
    }
    Ok(out)
}

/// Tries to claim `candidate` (None if it is no longer claimable: claimed by another worker
/// first, or changed since it was read).
async fn claim_candidate(
    shared: &Shared,
    session: &Session,
    candidate: Candidate,
) -> Result<Option<(Claim, JobContext)>> {
    let client = &shared.client;
    let Candidate {
        entry,
        id,
        mut record,
        mod_rev,
    } = candidate;
    let queued = record.clone();
    record.status.state = JobState::Running;
    record.status.attempts = record.status.attempts.saturating_add(1);
    let keys = &shared.keys;
    let txn = Txn::new()
        .when([
            keys.record_at(&id, mod_rev),
            Compare::create_revision(keys.claim(&id), CompareOp::Equal, 0),
        ])
        .and_then([
            TxnOp::put(keys.record(&id), shared.encode(&record)?, None),
            TxnOp::delete(entry, None::<DeleteOptions>),
            TxnOp::put(
                keys.claim(&id),
                session.lease_hex(),
                Some(PutOptions::new().with_lease(session.lease)),
            ),
            TxnOp::put(keys.inflight_of(&id), "", None),
            TxnOp::get(keys.payload(&id), None),
        ]);
    let done = match client.kv().txn(txn).await {
        Ok(done) => done,
        // A lease gone before the keepalive noticed (the next claim uses a new one), or a
        // request that never left: surely not claimed.
        Err(e) if session.end_if_lease_gone(&e) || crate::error::not_delivered(&e) => {
            return Err(etcd_err("claiming the job", e).with_id(&id));
        }
        // The claim may have committed: find out before answering.
        Err(e) => {
            tracing::warn!(backend = BACKEND, job = %id, error = %e, "the claim's answer was lost; resolving it");
            let attempt = record.status.attempts;
            let resolved = resolve_claim(shared, session, &id, mod_rev, &queued, attempt).await?;
            return Ok(resolved.map(with_context));
        }
    };
    if !done.succeeded() {
        return Ok(None);
    }
    let rev = done.header().map(|h| h.revision()).unwrap_or_default();
    // Submit keeps the payload beside the record (`record.job.payload` is empty), until the
    // job ends.
    let payload = take_first_value(&mut done.op_responses(), 4).unwrap_or_default();
    tracing::debug!(backend = BACKEND, job = %id, attempt = record.status.attempts, "job claimed");
    Ok(Some(with_context(Claim {
        id,
        record,
        payload,
        rev,
        lease_ended: session.ended.clone(),
    })))
}

/// Settles a claim of `id` whose answer was lost: it may have committed, or may still be in
/// flight. One txn either fences it — the record still at `mod_rev` with no claim is rewritten
/// unchanged (`queued`), so the claim fails its guard should it arrive later — or reads the
/// record, the claim and the payload. The claim is ours if its key is on this session's lease
/// and the record is Running at `attempt`: it is returned as if answered. Retried with
/// backoff while the lease lives (what it holds ends with it); an error no retry cures gives
/// up whatever may be ours.
async fn resolve_claim(
    shared: &Shared,
    session: &Session,
    id: &str,
    mod_rev: i64,
    queued: &Record,
    attempt: u32,
) -> Result<Option<Claim>> {
    let keys = &shared.keys;
    let fence = Txn::new()
        .when([
            keys.record_at(id, mod_rev),
            Compare::create_revision(keys.claim(id), CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(keys.record(id), shared.encode(queued)?, None)])
        .or_else([
            TxnOp::get(keys.record(id), None),
            TxnOp::get(keys.claim(id), None),
            TxnOp::get(keys.payload(id), None),
        ]);
    let mut failures = 0u32;
    let resp = loop {
        let err = match shared.client.kv().txn(fence.clone()).await {
            Ok(resp) => break resp,
            Err(e) => etcd_err("resolving a claim whose answer was lost", e).with_id(id),
        };
        shared.client.check_alive()?;
        if err.kind() != ErrorKind::Unavailable {
            release_if_ours(shared, session, id).await;
            return Err(err);
        }
        if session.ended.is_lost() {
            return Err(err);
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(Duration::from_millis(200) * failures.min(25)).await;
    };
    if resp.succeeded() {
        // Fenced: the claim did not commit, and never will.
        return Ok(None);
    }
    let mut ops = resp.op_responses();
    let first = |op: Option<&TxnOpResponse>| match op {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| (kv.lease(), kv.mod_revision())),
        _ => None,
    };
    let Some((_, rev)) = first(ops.first()) else {
        return Ok(None);
    };
    if first(ops.get(1)).map(|(lease, _)| lease) != Some(session.lease) {
        return Ok(None);
    }
    let record = match take_first_value(&mut ops, 0).map(|v| Shared::decode(id, &v)) {
        Some(Ok(r)) if r.status.state == JobState::Running && r.status.attempts == attempt => r,
        // Our claim, but not over this attempt: impossible, and never left standing.
        _ => {
            release_if_ours(shared, session, id).await;
            return Ok(None);
        }
    };
    tracing::info!(backend = BACKEND, job = %id, attempt, "the claim whose answer was lost is ours");
    Ok(Some(Claim {
        id: id.to_string(),
        record,
        payload: take_first_value(&mut ops, 2).unwrap_or_default(),
        rev,
        lease_ended: session.ended.clone(),
    }))
}

/// Deletes the claim of `id` if it is on this session's lease, so the reapers redeliver the
/// job (best effort: if it fails, the claim still ends with the lease).
async fn release_if_ours(shared: &Shared, session: &Session, id: &str) {
    let claim = shared.keys.claim(id);
    let txn = Txn::new()
        .when([Compare::lease(
            claim.as_str(),
            CompareOp::Equal,
            session.lease,
        )])
        .and_then([TxnOp::delete(claim, None::<DeleteOptions>)]);
    if let Err(e) = shared.client.kv().txn(txn).await {
        tracing::warn!(backend = BACKEND, job = %id, error = %e, "releasing a claim whose answer was lost failed; it ends with the lease");
    }
}

/// Records an attempt's outcome, unless the claim was lost meanwhile.
async fn record_outcome(shared: &Shared, claim: Claim, mut outcome: Outcome) {
    let Claim {
        id,
        mut record,
        rev,
        lease_ended,
        ..
    } = claim;
    let attempt = record.status.attempts;
    let mut downgraded = false;
    let mut transient_failures = 0u32;
    let mut lease_refreshes = 0u32;
    loop {
        if shared.client.is_killed() {
            return;
        }
        let lease = match shared.retention_lease().await {
            Ok(lease) => lease,
            // As for the outcome's own write: keep trying while the claim's lease may live;
            // once it ended the claim went with it and the job is redelivered.
            Err(e) if e.kind() == ErrorKind::Unavailable && !lease_ended.is_lost() => {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "granting the retention lease failed; retrying");
                transient_failures = transient_failures.saturating_add(1);
                tokio::time::sleep(Duration::from_millis(200) * transient_failures.min(25)).await;
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
            // etcd is unreachable: keep trying while the claim's lease may live. Once it has
            // ended the claim goes with it and the reapers redeliver the job.
            ErrorKind::Unavailable if lease_ended.is_lost() => {
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "recording the outcome failed and the claim's lease ended; the job will be redelivered");
                return;
            }
            ErrorKind::Unavailable => {
                transient_failures = transient_failures.saturating_add(1);
                tracing::warn!(backend = BACKEND, job = %id, error = %err, "recording the outcome failed; retrying");
                let backoff = Duration::from_millis(200) * transient_failures.min(25);
                tokio::time::sleep(backoff).await;
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

/// The transaction that records an attempt's outcome, guarded by the claim's revision:
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
    Ok(Txn::new().when([keys.record_at(id, rev)]).and_then(ops))
}

/// Deletes the claim of `id` so the reapers redeliver the job — only while the record is still
/// at this attempt's revision `rev`, so a newer attempt's claim is never touched (best effort:
/// if it fails, the claim still ends with this worker's lease).
async fn release_claim(shared: &Shared, id: &str, rev: i64) {
    let keys = &shared.keys;
    let txn = Txn::new()
        .when([keys.record_at(id, rev)])
        .and_then([TxnOp::delete(keys.claim(id), None::<DeleteOptions>)]);
    if let Err(e) = shared.client.kv().txn(txn).await {
        tracing::warn!(backend = BACKEND, job = %id, error = %e, "releasing the claim failed; it ends with the lease");
    }
}

/// Requeues jobs whose claim vanished while Running: pushed by a watch on claim deletions
/// (debounced by [`REAP_DEBOUNCE`]), with a periodic rescan as a safety net.
async fn reaper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut killed = shared.client.killed();
    loop {
        let rev = match reap_orphans(&shared).await {
            Ok(rev) => rev,
            Err(e) => {
                tracing::debug!(backend = BACKEND, error = %e, "scanning for orphaned claims failed");
                0
            }
        };
        let deleted = async {
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1)
                .with_filters([WatchFilterType::NoPut]);
            shared
                .client
                .watch_once(shared.keys.claims(), opts, SAFETY_NET)
                .await;
            tokio::time::sleep(REAP_DEBOUNCE).await;
        };
        tokio::select! {
            _ = deleted, if rev > 0 => {}
            _ = tokio::time::sleep(SAFETY_NET) => {}
            _ = stopped(&mut stop, &mut killed) => return,
        }
    }
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
    let ids = |op: Option<&TxnOpResponse>, prefix: &str| -> Vec<String> {
        match op {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(kv.key())
                        .ok()?
                        .strip_prefix(prefix)
                        .map(String::from)
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    let inflight = ids(ops.first(), &keys.inflight());
    let claims: HashSet<String> = ids(ops.get(1), &keys.claims()).into_iter().collect();
    for escaped in inflight.iter().filter(|i| !claims.contains(*i)) {
        if let Some(id) = sync_core::id::unescape(escaped) {
            if let Err(e) = requeue_orphan(shared, &id).await {
                tracing::warn!(backend = BACKEND, job = %id, error = %e, "requeueing an orphaned job failed");
            }
        }
    }
    Ok(rev)
}

/// Deletes the in-flight marker of `id` only while its record is still at `rev`: a worker may
/// have claimed the job since it was read, and its marker is what lets a reaper redeliver the
/// job should that worker die.
async fn drop_stale_marker(shared: &Shared, id: &str, rev: i64) -> Result<()> {
    let keys = &shared.keys;
    let txn = Txn::new()
        .when([keys.record_at(id, rev)])
        .and_then([TxnOp::delete(keys.inflight_of(id), None::<DeleteOptions>)]);
    shared
        .client
        .kv()
        .txn(txn)
        .await
        .map_err(|e| etcd_err("deleting a stale in-flight marker", e).with_id(id))?;
    Ok(())
}

async fn requeue_orphan(shared: &Shared, id: &str) -> Result<()> {
    let keys = &shared.keys;
    let kv = || shared.client.kv();
    let Some((mut record, mod_rev)) = shared.read(id).await? else {
        // Mod revision 0: the record is still absent.
        return drop_stale_marker(shared, id, 0).await;
    };
    if record.status.state != JobState::Running {
        return drop_stale_marker(shared, id, mod_rev).await;
    }
    let attempts = record.status.attempts;
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
        ops.push(TxnOp::put(keys.queue(&record.job.name, id), "0", None));
    }
    let txn = Txn::new()
        .when([
            keys.record_at(id, mod_rev),
            Compare::create_revision(keys.claim(id), CompareOp::Equal, 0),
        ])
        .and_then(ops);
    let resp = kv().txn(txn).await.map_err(|e| {
        if crate::error::lease_not_found(&e) {
            // Not awaited here: the next pass grants a fresh lease.
            shared.retention.try_forget();
        }
        etcd_err("requeueing the job", e).with_id(id)
    })?;
    if resp.succeeded() {
        tracing::warn!(backend = BACKEND, job = %id, attempts, redelivered = !out_of_attempts, "a worker died holding the job");
    }
    Ok(())
}
