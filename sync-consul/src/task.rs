//! Task on Consul KV: a job queue whose running attempts are claim keys locked by the worker
//! client's session, so a dead worker's jobs are redelivered once Consul releases its keys.
//!
//! Keys under `<ns>/:task/` (`:` never appears in an escaped id, so nothing here meets a lock
//! key `<ns>/<escaped id>/.lock`):
//!
//! | key | value |
//! | --- | --- |
//! | `jobs/<id>/record` | JSON: the job (without payload) and its status |
//! | `jobs/<id>/payload/<nonce>` | the payload, raw; one key per submit, deleted once the job ended |
//! | `jobs/<id>/output/<token>` | the output of the attempt with that fencing token, raw |
//! | `queue/<escaped name>/<id>` | while Queued: the record again, byte for byte (written with it) |
//! | `claims/<id>/<attempt>` | while Running: a nonce of the claim request; locked by the worker's session |
//! | `done/<unix ms>/<id>` | empty: the job ended then (written with its last record) |
//!
//! **Queue entries carry the record.** A queue entry is always written in the same
//! transaction as its record, so both have one ModifyIndex. A worker that has read the queue
//! (one blocking query on its name's prefix, which is also how it wakes) thus knows each
//! queued record and its index without another read, and claims up to its free permits in one
//! transaction of four operations per job: delete the entry and rewrite the record as Running
//! (both only at that index, so two workers never start one attempt), lock
//! `claims/<id>/<attempt>` for its session, and read the payload. The claim's ModifyIndex is the
//! attempt's fencing token (and the record's new index). A claim key is new for each attempt,
//! so Consul's lock-delay on the key of a session that ended never holds up the next attempt.
//!
//! **Finishing** is one transaction, guarded by the claim key's index and the record's (both
//! the token; Consul releasing the claim when its session ends gives it a new index): the
//! record becomes Succeeded / Failed (with a `done/` key) or Queued again with its queue entry
//! (a retry, not before its backoff: workers skip it until due), the claim key is deleted (at
//! that index: the guard), and the payload once the job ended. Outputs and payloads up to
//! [`INLINE_MAX`] travel in the transactions; bigger ones (up to
//! [`MAX_PAYLOAD_LEN`](sync_core::MAX_PAYLOAD_LEN), which is Consul's largest value) are
//! written with a plain PUT first, because Consul bounds a whole transaction by the size of one
//! value; their keys are unique to the submit or attempt, so such a write never touches
//! another's.
//!
//! **Redelivery.** When a session ends, Consul releases its claim keys: a claim key without a
//! session is an abandoned attempt. Every worker watches `claims/` with a blocking query, and
//! requeues the job of an abandoned claim (or fails it when out of attempts) in a transaction
//! guarded by the claim's and the record's indexes. Closing a client unlocks its claims rather
//! than deleting them, for the same reason.
//!
//! **Answers that go missing.** A submit is guarded by the record's absence, so it is sent
//! again; a submit found rolled back reads the record to tell its own job (by the payload
//! nonce) from another's with the same key. A claim is never sent again: the worker fences each
//! job it tried (rewrites its entry and record unchanged, at their index, so the claim fails
//! should it still arrive) and reads back the claim of each it could not fence: it is the
//! worker's if locked by its session with this request's nonce. A finish is sent again while
//! the session lives (a resend rolled back means the first one applied or the claim ended).
//!
//! **Retention.** Consul KV has no TTL. Every worker sweeps `done/`: a job that ended more
//! than [`job_retention`](crate::Config::job_retention) ago is deleted with all its keys, in a
//! transaction guarded by the record's index (a keyed job submitted again is left alone).
//! `status` and `wait` treat such a job as gone even before the sweep, and a keyed submit
//! replaces it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use sync_core::{
    Error, ErrorKind, Job, JobContext, JobId, JobState, JobStatus, Result, id::escape,
};
use sync_kit::{
    locked,
    task::{Claimed, JobQueue, JobStore, Next, Outcome, apply_outcome, apply_worker_loss},
};
use tokio::sync::watch;

use crate::{
    BACKEND,
    api::{KvEntry, KvOp, Read, Txn, TxnError, unexpected},
    client::ClientInner,
    session::{Registration, Session},
};

/// The largest payload or output written inside a transaction; bigger ones are PUT first.
const INLINE_MAX: usize = 128 * 1024;

/// The longest `last_error` kept: records (and queue entries, their copies) stay small.
const MAX_ERROR_LEN: usize = 16 * 1024;

/// How long an idle worker trusts its blocking query on the queue before reading it again.
const SAFETY_NET: Duration = Duration::from_secs(10);

/// How often, at most, a worker that finds its queue empty asks whether it may read it at all
/// (Consul leaves out of a listing what the token may not read, and says nothing).
const RIGHTS_EVERY: Duration = Duration::from_secs(30);

/// How long a reaper lets claim changes gather before reading the claims again.
const REAP_DEBOUNCE: Duration = Duration::from_millis(100);

/// How long a loop rests after a failed request before trying again.
const RETRY: Duration = Duration::from_millis(500);

/// Operations per job in a claim transaction (Consul takes 64 per transaction: 16 jobs, the
/// claim loop's largest batch).
const CLAIM_OPS: usize = 4;

/// The most record bytes one claim transaction rewrites (base64 makes them a third more, and
/// Consul bounds a transaction's body by the size of one value, 512 KiB by default).
const CLAIM_BUDGET: usize = 256 * 1024;

/// A contended worker picks at random among this many times its free permits of the oldest
/// startable jobs, so that workers taking from one backlog do not all race for the same job.
const SPREAD: usize = 4;

/// The error message of a job record that is not valid JSON.
const UNREADABLE_RECORD: &str = "the job record is not valid JSON";

/// A job as stored: the job without its payload, its status as of the last change (without
/// output), and where its payload and output are.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    job: Job,
    status: JobStatus,
    /// The nonce of the submit that stored the payload (`jobs/<id>/payload/<nonce>`).
    payload: String,
    /// While Queued for a retry: not before this (unix ms).
    #[serde(default)]
    not_before: u64,
    /// Once Succeeded: the fencing token of the attempt whose output is kept.
    #[serde(default)]
    output: Option<u64>,
    /// Once final: when it ended (unix ms).
    #[serde(default)]
    finished: Option<u64>,
}

impl Record {
    fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| {
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

    /// This record as its next attempt starts.
    fn running(&self) -> Record {
        let mut r = self.clone();
        r.status.state = JobState::Running;
        r.status.attempts = self.status.attempts.saturating_add(1);
        r.not_before = 0;
        r
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Cuts `error` to [`MAX_ERROR_LEN`] bytes (at a character boundary).
fn clip(error: &mut Option<String>) {
    if let Some(e) = error.as_mut().filter(|e| e.len() > MAX_ERROR_LEN) {
        let mut end = MAX_ERROR_LEN;
        while !e.is_char_boundary(end) {
            end -= 1;
        }
        e.truncate(end);
        e.push_str(" […]");
    }
}

/// A random number below `n` (n > 0).
fn random_below(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n as u128) as usize
}

/// The entry of `key` among a transaction's results.
fn entry<'a>(entries: &'a [Option<KvEntry>], key: &str) -> Option<&'a KvEntry> {
    entries.iter().flatten().find(|e| e.key == key)
}

struct Keys {
    root: String,
}

impl Keys {
    fn new(namespace: &str) -> Keys {
        let root = match namespace {
            "" => ":task/".to_string(),
            ns => format!("{ns}/:task/"),
        };
        Keys { root }
    }
    fn job_dir(&self, eid: &str) -> String {
        format!("{}jobs/{eid}/", self.root)
    }
    fn record(&self, eid: &str) -> String {
        format!("{}record", self.job_dir(eid))
    }
    fn payload_dir(&self, eid: &str) -> String {
        format!("{}payload/", self.job_dir(eid))
    }
    fn payload(&self, eid: &str, nonce: &str) -> String {
        format!("{}{nonce}", self.payload_dir(eid))
    }
    fn output_dir(&self, eid: &str) -> String {
        format!("{}output/", self.job_dir(eid))
    }
    fn output(&self, eid: &str, token: u64) -> String {
        format!("{}{token}", self.output_dir(eid))
    }
    fn queue_dir(&self, name: &str) -> String {
        format!("{}queue/{}/", self.root, escape(name))
    }
    fn entry(&self, name: &str, eid: &str) -> String {
        format!("{}{eid}", self.queue_dir(name))
    }
    fn claims_dir(&self) -> String {
        format!("{}claims/", self.root)
    }
    fn claim(&self, eid: &str, attempt: u32) -> String {
        format!("{}{eid}/{attempt}", self.claims_dir())
    }
    fn done_dir(&self) -> String {
        format!("{}done/", self.root)
    }
    fn done(&self, eid: &str, finished: u64) -> String {
        format!("{}{finished:013}/{eid}", self.done_dir())
    }
    /// The escaped id and attempt of a claim key.
    fn parse_claim<'a>(&self, key: &'a str) -> Option<(&'a str, u32)> {
        let rest = key.strip_prefix(&self.claims_dir())?;
        let (eid, attempt) = rest.split_once('/')?;
        Some((eid, attempt.parse().ok()?))
    }
    /// The end time and escaped id of a `done/` key.
    fn parse_done<'a>(&self, key: &'a str) -> Option<(u64, &'a str)> {
        let rest = key.strip_prefix(&self.done_dir())?;
        let (ms, eid) = rest.split_once('/')?;
        Some((ms.parse().ok()?, eid))
    }
}

/// A job as read: its record, the record's index, and its output if Succeeded.
struct Stored {
    record: Record,
    index: u64,
    output: Option<Vec<u8>>,
}

impl Stored {
    fn status(&self) -> JobStatus {
        let mut status = self.record.status.clone();
        if status.state == JobState::Succeeded {
            status.output = Some(self.output.clone().unwrap_or_default());
        }
        status
    }
}

struct Shared {
    client: Arc<ClientInner>,
    keys: Keys,
}

impl Shared {
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

    /// Whether a job that ended at `finished` is past its retention.
    fn expired(&self, record: &Record) -> bool {
        let keep = millis(self.client.config.job_retention);
        record
            .finished
            .is_some_and(|at| at.saturating_add(keep) <= now_ms())
    }

    /// The job `eid`, None if there is none or it is past its retention (then it is deleted
    /// in the background).
    async fn read(self: &Arc<Self>, id: &str, eid: &str) -> Result<Option<Stored>> {
        let Some(stored) = self.read_raw(id, eid).await? else {
            return Ok(None);
        };
        if self.expired(&stored.record) {
            self.remove_in_background(eid, &stored);
            return Ok(None);
        }
        Ok(Some(stored))
    }

    /// The job `eid` in one consistent read (record and output), None if there is none.
    async fn read_raw(&self, id: &str, eid: &str) -> Result<Option<Stored>> {
        let record_key = self.keys.record(eid);
        let ops = [
            KvOp::get(&record_key),
            KvOp::get_tree(&self.keys.output_dir(eid)),
        ];
        let entries = match self.client.api.txn("reading the job", &ops).await {
            Ok(Txn::Done(entries)) => entries,
            // The one thing that fails here: no record.
            Ok(Txn::RolledBack(_)) => return Ok(None),
            Err(f) => return Err(f.error().with_id(id)),
        };
        let Some(found) = entry(&entries, &record_key) else {
            return Err(unexpected("reading the job", "the record read nothing back").with_id(id));
        };
        let record = Record::decode(id, &found.value)?;
        let index = found.modify_index;
        let output = record
            .output
            .and_then(|token| entry(&entries, &self.keys.output(eid, token)))
            .map(|e| e.value.clone());
        Ok(Some(Stored {
            record,
            index,
            output,
        }))
    }

    /// Deletes an ended job and all its keys (but its payloads if `keep_payloads`: a submit
    /// replacing it has stored its own), if its record is still at `index`; else only its
    /// `done/` key, which is then stale. Whether the job was deleted.
    async fn remove(
        &self,
        eid: &str,
        done_key: &str,
        index: u64,
        keep_payloads: bool,
    ) -> Result<bool> {
        let keys = &self.keys;
        let mut ops = vec![
            KvOp::check_index(&keys.record(eid), index),
            KvOp::delete(done_key),
        ];
        if keep_payloads {
            ops.push(KvOp::delete(&keys.record(eid)));
            ops.push(KvOp::delete_tree(&keys.output_dir(eid)));
        } else {
            ops.push(KvOp::delete_tree(&keys.job_dir(eid)));
        }
        let api = &self.client.api;
        match api.txn("deleting an expired job", &ops).await? {
            Txn::Done(_) => Ok(true),
            Txn::RolledBack(_) => {
                let ops = [KvOp::delete_cas(done_key, index)];
                api.txn("deleting a stale end marker", &ops).await?;
                Ok(false)
            }
        }
    }

    fn remove_in_background(self: &Arc<Self>, eid: &str, stored: &Stored) {
        let Some(finished) = stored.record.finished else {
            return;
        };
        let (shared, index) = (self.clone(), stored.index);
        let (eid, done) = (eid.to_string(), self.keys.done(eid, finished));
        tokio::spawn(async move {
            if let Err(e) = shared.remove(&eid, &done, index, false).await {
                tracing::debug!(backend = BACKEND, job = %eid, error = %e, "deleting an expired job failed; the sweep will");
            }
        });
    }

    /// Writes a big value with a plain PUT, again when the answer was lost (the key is unique
    /// to its writer, so a resend changes nothing).
    async fn put(&self, what: &str, key: &str, value: &[u8]) -> Result<()> {
        let first = tokio::time::Instant::now();
        loop {
            match self.client.api.put(what, key, value.to_vec(), None).await {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(unexpected(what, "the agent did not write the value")),
                Err(f) if f.unknown() && self.client.may_resend(first) => {
                    tracing::debug!(backend = BACKEND, what, "answer lost; sending again");
                }
                Err(f) => return Err(f.error()),
            }
        }
    }

    /// Deletes `key`, best effort (what it leaves goes with its job at the retention's end).
    async fn discard(&self, key: &str) {
        if let Err(e) = self
            .client
            .api
            .txn("deleting an unused value", &[KvOp::delete(key)])
            .await
        {
            tracing::debug!(backend = BACKEND, key, error = %e.error(), "deleting an unused value failed");
        }
    }
}

pub(crate) struct ConsulTask {
    shared: Arc<Shared>,
}

impl ConsulTask {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        let keys = Keys::new(&client.config.namespace);
        ConsulTask {
            shared: Arc::new(Shared { client, keys }),
        }
    }
}

/// What a submit transaction found.
enum Submitted {
    /// This submit stored the job.
    Stored,
    /// A job with this id exists (another submit's, or this one's applied before its answer
    /// was lost: then `ours`).
    Exists {
        stored: Option<Box<Stored>>,
        ours: bool,
    },
}

#[async_trait]
impl JobStore for ConsulTask {
    type Queue = ConsulQueue;

    async fn submit(&self, job: Job) -> Result<JobId> {
        let shared = &self.shared;
        shared.client.check_alive()?;
        // A keyed job's id is its key: a second submit of the key finds the first job.
        let id = job
            .key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let eid = escape(&id).into_owned();
        let mut job = job;
        let payload = std::mem::take(&mut job.payload);
        let name = job.name.clone();
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let record = Record {
            status: JobStatus::queued(JobId(id.clone()), &job),
            job,
            payload: nonce.clone(),
            not_before: 0,
            output: None,
            finished: None,
        };
        let value = record.encode()?;
        let keys = &shared.keys;
        let payload_key = keys.payload(&eid, &nonce);
        let spilled = payload.len() > INLINE_MAX;
        if spilled {
            shared
                .put("storing the payload", &payload_key, &payload)
                .await
                .map_err(|e| e.with_id(&name))?;
        }
        let mut ops = vec![
            KvOp::check_not_exists(&keys.record(&eid)),
            KvOp::set(&keys.record(&eid), &value),
            KvOp::set(&keys.entry(&name, &eid), &value),
        ];
        if !spilled {
            ops.push(KvOp::set(&payload_key, &payload));
        }
        // A job past its retention is replaced (a few times at most: another submit may
        // replace it first).
        for _ in 0..3 {
            let old = match self.send_submit(&id, &eid, &ops, &nonce).await? {
                Submitted::Stored => {
                    tracing::debug!(backend = BACKEND, job = %id, %name, "job submitted");
                    return Ok(JobId(id));
                }
                Submitted::Exists { ours: true, .. } => return Ok(JobId(id)),
                // Deleted between the submit and the read: submit again.
                Submitted::Exists { stored: None, .. } => continue,
                Submitted::Exists {
                    stored: Some(old), ..
                } => old,
            };
            let Some(finished) = old.record.finished.filter(|_| shared.expired(&old.record)) else {
                break;
            };
            let done = keys.done(&eid, finished);
            shared
                .remove(&eid, &done, old.index, true)
                .await
                .map_err(|e| e.with_id(&id))?;
        }
        tracing::debug!(backend = BACKEND, job = %id, "job key already submitted");
        if spilled {
            shared.discard(&payload_key).await;
        }
        Ok(JobId(id))
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        self.shared.check_job_id(id)?;
        let eid = escape(&id.0);
        match self.shared.read(&id.0, &eid).await? {
            Some(stored) => Ok(stored.status()),
            None => Err(Shared::not_found(&id.0)),
        }
    }

    async fn wait(&self, id: &JobId) -> Result<JobStatus> {
        let shared = &self.shared;
        shared.check_job_id(id)?;
        let eid = escape(&id.0);
        let record_key = shared.keys.record(&eid);
        let mut killed = shared.client.killed();
        loop {
            let Some(stored) = shared.read(&id.0, &eid).await? else {
                return Err(Shared::not_found(&id.0));
            };
            if stored.record.status.state.is_final() {
                return Ok(stored.status());
            }
            // Every change of the job rewrites its record: block until it moves past this.
            let changed = shared
                .client
                .api
                .get("waiting for the job", &record_key, stored.index);
            let failed = tokio::select! {
                r = changed => r.err(),
                _ = killed.wait_for(|k| *k) => return Err(crate::error::closed()),
            };
            if let Some(f) = failed {
                tracing::debug!(backend = BACKEND, job = %id, error = %f.error(), "waiting for the job failed; reading again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "task"))]
    async fn queue(&self, name: &str) -> Result<ConsulQueue> {
        // Fails with Closed once killed, and makes sure a session exists for the claims.
        self.shared.client.sessions.current().await?;
        let queue = ConsulQueue::new(self.shared.clone(), name);
        queue.check_rights().await?;
        Ok(queue)
    }
}

impl ConsulTask {
    /// Sends a submit transaction, again while its answer is lost: it is guarded by the
    /// record's absence, so however many sends apply, the job is stored once. Rolled back, it
    /// reads the record: the job is this submit's if it names this submit's payload nonce.
    async fn send_submit(
        &self,
        id: &str,
        eid: &str,
        ops: &[KvOp],
        nonce: &str,
    ) -> Result<Submitted> {
        let shared = &self.shared;
        let first = tokio::time::Instant::now();
        loop {
            match shared.client.api.txn("submitting the job", ops).await {
                Ok(Txn::Done(_)) => return Ok(Submitted::Stored),
                Ok(Txn::RolledBack(errors)) => {
                    if errors.iter().any(|e| e.op_index != 0) {
                        return Err(rolled_back("submitting the job", &errors).with_id(id));
                    }
                    let stored = shared.read_raw(id, eid).await?.map(Box::new);
                    let ours = stored.as_ref().is_some_and(|s| s.record.payload == nonce);
                    return Ok(Submitted::Exists { stored, ours });
                }
                Err(f) if f.unknown() && shared.client.may_resend(first) => {
                    tracing::debug!(backend = BACKEND, job = %id, error = %f.error(), "submit answer lost; sending it again");
                }
                Err(f) => return Err(f.error().with_id(id)),
            }
        }
    }
}

/// A transaction rolled back for a reason this client did not expect.
fn rolled_back(what: &str, errors: &[TxnError]) -> Error {
    let why: Vec<&str> = errors.iter().map(|e| e.what.as_str()).collect();
    unexpected(what, why.join("; "))
}

/// One job name's queue as one worker takes from it.
pub(crate) struct ConsulQueue {
    shared: Arc<Shared>,
    /// `queue/<escaped name>/`.
    prefix: String,
    /// The queue as the last blocking query found it: what the next claim starts from.
    fresh: Arc<Mutex<Option<Snapshot>>>,
    /// Entries whose claim failed, by the index they had: not tried again until they change
    /// (taken by another worker, they are soon gone).
    skip: Mutex<HashMap<String, u64>>,
    /// Whether the last claim lost jobs to other workers: then picks are spread.
    contended: AtomicBool,
    /// When the token was last found allowed to read the queue.
    rights_seen: Mutex<Option<tokio::time::Instant>>,
}

/// The queue as one read found it: its entries, and the index to block past.
type Snapshot = Read<Vec<KvEntry>>;

/// A queue entry chosen for a claim.
struct Pick {
    id: String,
    eid: String,
    /// The entry's key and index (the record's too).
    key: String,
    index: u64,
    /// The record as queued, and its bytes.
    record: Record,
    value: Vec<u8>,
}

impl Pick {
    fn attempt(&self) -> u32 {
        self.record.status.attempts.saturating_add(1)
    }
}

/// A claimed attempt.
pub(crate) struct Claim {
    id: String,
    eid: String,
    /// The record as the claim wrote it (Running, this attempt's number).
    record: Record,
    /// The claim key, its ModifyIndex (the fencing token, and the record's index) and its
    /// session.
    key: String,
    token: u64,
    session: Arc<Session>,
    registration: Registration,
}

impl Claim {
    fn attempt(&self) -> u32 {
        self.record.status.attempts
    }
}

impl ConsulQueue {
    fn new(shared: Arc<Shared>, name: &str) -> ConsulQueue {
        ConsulQueue {
            prefix: shared.keys.queue_dir(name),
            shared,
            fresh: Arc::default(),
            skip: Mutex::default(),
            contended: AtomicBool::new(false),
            rights_seen: Mutex::default(),
        }
    }

    /// Fails (Unauthorized) if the token may not read the queue: a listing would just come
    /// back empty, but a read of one key is refused.
    async fn check_rights(&self) -> Result<()> {
        let api = &self.shared.client.api;
        api.get("checking the rights on the queue", &self.prefix, 0)
            .await?;
        *locked(&self.rights_seen) = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// [`check_rights`](Self::check_rights), when the queue reads empty and the last check is
    /// [`RIGHTS_EVERY`] old: so a worker whose rights were taken says so instead of idling.
    async fn check_rights_if_empty(&self, listed: &[KvEntry]) -> Result<()> {
        let due = locked(&self.rights_seen).is_none_or(|at| at.elapsed() >= RIGHTS_EVERY);
        if listed.is_empty() && due {
            self.check_rights().await?;
        }
        Ok(())
    }

    /// The queue: as the last blocking query left it, or read now.
    async fn look(&self) -> Result<Snapshot> {
        if let Some(fresh) = locked(&self.fresh).take() {
            return Ok(fresh);
        }
        let api = &self.shared.client.api;
        Ok(api.list("reading the queue", &self.prefix, 0).await?)
    }

    /// Takes up to `max` startable entries out of `entries` (and [`CLAIM_BUDGET`] bytes of
    /// records, at least one), oldest first (spread at random over the oldest when contended);
    /// else the earliest time (unix ms) a delayed one becomes startable. Only the records of
    /// the oldest entries are read: a long queue costs a sort, not a decode of every record,
    /// per claim.
    fn pick(&self, entries: &mut Vec<KvEntry>, max: usize) -> (Vec<Pick>, Option<u64>) {
        let now = now_ms();
        let mut skip = locked(&self.skip);
        skip.retain(|k, i| entries.iter().any(|e| e.key == *k && e.modify_index == *i));
        // Stable, and all but free on the rest of a listing, which stays in this order.
        entries.sort_by_key(|e| e.create_index);
        let contended = self.contended.load(Ordering::Relaxed);
        let window = if contended { max * SPREAD } else { max };
        let mut due: Option<u64> = None;
        // Each startable entry's place in `entries`, id and record.
        let mut ready = Vec::new();
        for (at, e) in entries.iter().enumerate() {
            if ready.len() == window {
                break;
            }
            if skip.contains_key(&e.key) {
                continue;
            }
            let Some(id) = e
                .key
                .strip_prefix(&self.prefix)
                .and_then(sync_core::id::unescape)
            else {
                continue;
            };
            let record = match Record::decode(&id, &e.value) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(backend = BACKEND, job = %id, error = %err, "skipping a queued job whose record cannot be read");
                    skip.insert(e.key.clone(), e.modify_index);
                    continue;
                }
            };
            if record.not_before > now {
                due = Some(due.map_or(record.not_before, |d| d.min(record.not_before)));
                continue;
            }
            ready.push((at, id, record));
        }
        drop(skip);
        if contended && ready.len() > max {
            let spread = random_below(ready.len());
            ready.rotate_left(spread);
        }
        let mut budget = CLAIM_BUDGET;
        let mut chosen: Vec<_> = ready
            .into_iter()
            .take(max)
            .enumerate()
            .take_while(|(i, (at, ..))| {
                let len = entries[*at].value.len();
                let fits = *i == 0 || len <= budget;
                budget = budget.saturating_sub(len);
                fits
            })
            .map(|(_, chosen)| chosen)
            .collect();
        // Taken out from the back, so the places of the others stay right.
        chosen.sort_by_key(|(at, ..)| std::cmp::Reverse(*at));
        let mut picks: Vec<Pick> = chosen
            .into_iter()
            .map(|(at, id, record)| {
                let e = entries.remove(at);
                Pick {
                    eid: escape(&id).into_owned(),
                    id,
                    index: e.modify_index,
                    key: e.key,
                    record,
                    value: e.value,
                }
            })
            .collect();
        picks.reverse();
        (picks, due)
    }

    /// Resolves once the queue changes past `index` (a blocking query, whose answer the next
    /// claim starts from), at `due` (unix ms), or after the safety net.
    fn sleeper(&self, index: u64, due: Option<u64>) -> BoxFuture<'static, ()> {
        let (client, prefix, fresh) = (
            self.shared.client.clone(),
            self.prefix.clone(),
            self.fresh.clone(),
        );
        let nap = due
            .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
            .map_or(SAFETY_NET, |d| d.min(SAFETY_NET));
        Box::pin(async move {
            let changed = client.api.list("waiting for jobs", &prefix, index.max(1));
            tokio::select! {
                read = changed => match read {
                    Ok(read) => *locked(&fresh) = Some(read),
                    Err(f) => {
                        tracing::debug!(backend = BACKEND, error = %f.error(), "waiting for jobs failed");
                        tokio::time::sleep(RETRY).await;
                    }
                },
                () = tokio::time::sleep(nap) => {}
            }
        })
    }

    /// Claims `picks` under the live session in one transaction; the jobs claimed. A job
    /// whose claim failed (taken by another worker) is dropped and the rest tried again.
    async fn claim_picks(&self, mut picks: Vec<Pick>) -> Result<Vec<(Claim, JobContext)>> {
        let sessions = &self.shared.client.sessions;
        let mut session = sessions.current().await?;
        let mut lost_some = false;
        while !picks.is_empty() {
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            let ops = self.claim_ops(&picks, &session, &nonce)?;
            match self.shared.client.api.txn("claiming jobs", &ops).await {
                Ok(Txn::Done(entries)) => {
                    self.contended.store(lost_some, Ordering::Relaxed);
                    return Ok(self.take_up(picks, &session, &entries, &nonce));
                }
                Ok(Txn::RolledBack(errors)) => {
                    if errors.iter().any(|e| e.what.contains("invalid session")) {
                        sessions.end(&session, "the session was invalidated", false);
                        session = sessions.current().await?;
                        continue;
                    }
                    lost_some = true;
                    picks = self.drop_failed(picks, &errors).await;
                }
                // Never sent again: it may have applied (see `resolve`).
                Err(f) if f.unknown() => {
                    tracing::warn!(backend = BACKEND, jobs = picks.len(), error = %f.error(), "the claim's answer was lost; resolving it");
                    return self.resolve(picks, &session, &nonce).await;
                }
                Err(f) => return Err(f.error()),
            }
        }
        self.contended.store(lost_some, Ordering::Relaxed);
        Ok(Vec::new())
    }

    /// Per job: delete its queue entry and rewrite its record as Running, both only at the
    /// index read; lock its claim key for `session`; read its payload.
    fn claim_ops(&self, picks: &[Pick], session: &Session, nonce: &str) -> Result<Vec<KvOp>> {
        let keys = &self.shared.keys;
        let mut ops = Vec::with_capacity(picks.len() * CLAIM_OPS);
        for p in picks {
            let running = p.record.running().encode()?;
            ops.extend([
                KvOp::delete_cas(&p.key, p.index),
                KvOp::cas(&keys.record(&p.eid), &running, p.index),
                KvOp::lock(
                    &keys.claim(&p.eid, p.attempt()),
                    &session.id,
                    nonce.as_bytes(),
                ),
                KvOp::get(&keys.payload(&p.eid, &p.record.payload)),
            ]);
        }
        Ok(ops)
    }

    /// The picks whose operations did not fail. A failed one is skipped until its entry
    /// changes; one that failed only for want of its payload is failed for good (no attempt
    /// can run it).
    async fn drop_failed(&self, picks: Vec<Pick>, errors: &[TxnError]) -> Vec<Pick> {
        let mut failed: HashMap<usize, Vec<usize>> = HashMap::new();
        for e in errors {
            failed
                .entry(e.op_index / CLAIM_OPS)
                .or_default()
                .push(e.op_index % CLAIM_OPS);
        }
        let mut left = Vec::new();
        for (i, p) in picks.into_iter().enumerate() {
            match failed.get(&i).map(Vec::as_slice) {
                None => left.push(p),
                Some([3]) => self.fail_without_payload(&p).await,
                Some(_) => {
                    locked(&self.skip).insert(p.key.clone(), p.index);
                }
            }
        }
        left
    }

    /// Ends a queued job whose payload is gone as Failed (guarded like a claim).
    async fn fail_without_payload(&self, p: &Pick) {
        tracing::warn!(backend = BACKEND, job = %p.id, "the job's payload is gone; failing it");
        locked(&self.skip).insert(p.key.clone(), p.index);
        let keys = &self.shared.keys;
        let mut record = p.record.clone();
        let finished = now_ms();
        record.status.state = JobState::Failed;
        record.status.last_error = Some("the job's payload is gone".to_string());
        record.finished = Some(finished);
        let Ok(value) = record.encode() else { return };
        let ops = [
            KvOp::delete_cas(&p.key, p.index),
            KvOp::cas(&keys.record(&p.eid), &value, p.index),
            KvOp::set(&keys.done(&p.eid, finished), b""),
        ];
        if let Err(f) = self.shared.client.api.txn("failing a job", &ops).await {
            tracing::warn!(backend = BACKEND, job = %p.id, error = %f.error(), "failing a job without payload failed");
        }
    }

    /// The claims a transaction made (its results found by key), registered with `session`.
    fn take_up(
        &self,
        picks: Vec<Pick>,
        session: &Arc<Session>,
        entries: &[Option<KvEntry>],
        nonce: &str,
    ) -> Vec<(Claim, JobContext)> {
        let keys = &self.shared.keys;
        let mut out = Vec::new();
        for p in picks {
            let claim_key = keys.claim(&p.eid, p.attempt());
            let claimed = entry(entries, &claim_key)
                .filter(|e| e.session.as_deref() == Some(session.id.as_str()));
            let payload = entry(entries, &keys.payload(&p.eid, &p.record.payload));
            match (claimed, payload) {
                (Some(c), Some(payload)) => {
                    let (token, payload) = (c.modify_index, payload.value.clone());
                    out.push(self.started(p, session, claim_key, token, payload));
                }
                _ => {
                    tracing::warn!(backend = BACKEND, job = %p.id, nonce, "a claim's answer lacks the claim or payload; its session's end frees it")
                }
            }
        }
        out
    }

    /// A claimed attempt and its handler's context: the claim's index fences it, its key's
    /// loss (the session's end) is the context's loss signal.
    fn started(
        &self,
        p: Pick,
        session: &Arc<Session>,
        key: String,
        token: u64,
        payload: Vec<u8>,
    ) -> (Claim, JobContext) {
        let (registration, lost) = self.shared.client.sessions.register_kept(session, &key);
        let record = p.record.running();
        let mut ctx = JobContext::new(JobId(p.id.clone()), &record.job, record.status.attempts)
            .with_claim(token, lost);
        ctx.payload = payload;
        tracing::debug!(backend = BACKEND, job = %p.id, attempt = record.status.attempts, token, "job claimed");
        let claim = Claim {
            id: p.id,
            eid: p.eid,
            record,
            key,
            token,
            session: session.clone(),
            registration,
        };
        (claim, ctx)
    }

    /// Settles a claim whose answer was lost: it may have applied, or may still be on its way.
    /// Each job is fenced (entry and record rewritten unchanged, only at the index claimed, so
    /// the claim fails should it arrive later) unless it was already taken; for each taken,
    /// the claim key tells whether it was this request (this session, this nonce). Tried
    /// while the session lives: once it is gone, what it may hold is released, and the
    /// reapers hand the jobs on.
    async fn resolve(
        &self,
        picks: Vec<Pick>,
        session: &Arc<Session>,
        nonce: &str,
    ) -> Result<Vec<(Claim, JobContext)>> {
        let keys = &self.shared.keys;
        let mut open = picks;
        let mut taken = Vec::new();
        while !open.is_empty() {
            let ops: Vec<KvOp> = open
                .iter()
                .flat_map(|p| {
                    [
                        KvOp::cas(&p.key, &p.value, p.index),
                        KvOp::cas(&keys.record(&p.eid), &p.value, p.index),
                    ]
                })
                .collect();
            match self.settle("fencing a lost claim", &ops, session).await? {
                Txn::Done(_) => break,
                Txn::RolledBack(errors) => {
                    let hit: Vec<usize> = errors.iter().map(|e| e.op_index / 2).collect();
                    let (t, o): (Vec<_>, Vec<_>) = open
                        .into_iter()
                        .enumerate()
                        .partition(|(i, _)| hit.contains(i));
                    taken.extend(t.into_iter().map(|(_, p)| p));
                    open = o.into_iter().map(|(_, p)| p).collect();
                }
            }
        }
        if taken.is_empty() {
            tracing::info!(
                backend = BACKEND,
                "the claim whose answer was lost did not apply"
            );
            return Ok(Vec::new());
        }
        let ops: Vec<KvOp> = taken
            .iter()
            .flat_map(|p| {
                [
                    KvOp::get_tree(&keys.claim(&p.eid, p.attempt())),
                    KvOp::get_tree(&keys.payload(&p.eid, &p.record.payload)),
                ]
            })
            .collect();
        let Txn::Done(entries) = self.settle("reading a lost claim", &ops, session).await? else {
            return Err(unexpected("reading a lost claim", "a read was rolled back"));
        };
        let mut out = Vec::new();
        for p in taken {
            let claim_key = keys.claim(&p.eid, p.attempt());
            let ours = entry(&entries, &claim_key).filter(|c| {
                c.session.as_deref() == Some(session.id.as_str()) && c.value == nonce.as_bytes()
            });
            let payload = entry(&entries, &keys.payload(&p.eid, &p.record.payload));
            if let (Some(c), Some(payload)) = (ours, payload) {
                tracing::info!(backend = BACKEND, job = %p.id, "the claim whose answer was lost is ours");
                let (token, payload) = (c.modify_index, payload.value.clone());
                out.push(self.started(p, session, claim_key, token, payload));
            }
        }
        Ok(out)
    }

    /// Runs a transaction of `resolve` until it is answered, while `session` lives.
    async fn settle(&self, what: &str, ops: &[KvOp], session: &Session) -> Result<Txn> {
        let client = &self.shared.client;
        let mut pause = Duration::from_millis(100);
        loop {
            match client.api.txn(what, ops).await {
                Ok(answer) => return Ok(answer),
                Err(f) => {
                    client.check_alive()?;
                    let e = f.error();
                    // Refused (a 403, a 400): asking again changes nothing.
                    if !session.alive() || sync_kit::refused_for_good(&e) {
                        return Err(e);
                    }
                    tracing::warn!(backend = BACKEND, error = %e, what, "retrying");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

#[async_trait]
impl JobQueue for ConsulQueue {
    type Claim = Claim;

    async fn claim(&self, _name: &str, max: usize) -> Result<Claimed<Claim>> {
        self.shared.client.check_alive()?;
        let Snapshot {
            value: mut listed,
            index,
        } = self.look().await?;
        self.check_rights_if_empty(&listed).await?;
        let (picks, due) = self.pick(&mut listed, max.max(1));
        if picks.is_empty() {
            // Blocks past the index of the look just taken: nothing queued since is missed.
            return Ok(Claimed::Empty(self.sleeper(index, due)));
        }
        // The rest of the listing serves the next claims, so a long queue is not read again
        // for every batch: an entry another worker took meanwhile fails its claim's index
        // check and is dropped, and an empty rest reads the queue again.
        if !listed.is_empty() {
            *locked(&self.fresh) = Some(Snapshot {
                value: listed,
                index,
            });
        }
        Ok(Claimed::Jobs(self.claim_picks(picks).await?))
    }

    async fn finish(&self, claim: Claim, outcome: Outcome) {
        record_outcome(&self.shared, &claim, outcome).await;
        self.shared.client.sessions.forget(&claim.registration);
    }

    async fn closed(&self) {
        let _ = self.shared.client.killed().wait_for(|k| *k).await;
    }

    fn chores(self: Arc<Self>, stop: watch::Receiver<bool>) -> Option<BoxFuture<'static, ()>> {
        let (reaping, sweeping) = (
            reaper(self.shared.clone(), stop.clone()),
            sweeper(self.shared.clone(), stop),
        );
        Some(Box::pin(async move {
            futures::join!(reaping, sweeping);
        }))
    }
}

/// How a finish transaction ended.
enum Finished {
    Recorded,
    /// The claim had ended: the outcome is dropped, the job handed on.
    Lost,
    /// Rolled back after a send whose answer was lost: the first send applied, or the claim
    /// ended meanwhile.
    Settled,
}

/// Records an attempt's outcome, unless its claim ended meanwhile. An outcome that cannot be
/// stored is recorded as a failed attempt; if nothing can be, the claim is given up so the
/// job is handed on. A refusal (the token lost its rights) is waited out while the claim
/// lives: giving up would be refused too, and leave the job Running for as long as the
/// worker's session lives.
async fn record_outcome(shared: &Shared, claim: &Claim, mut outcome: Outcome) {
    let mut downgraded = false;
    let mut refusals = sync_kit::retry::Retry::new(RETRY);
    loop {
        let result = match finish_ops(shared, claim, outcome.clone()).await {
            Ok((ops, spilled)) => send_finish(shared, claim, &ops)
                .await
                .map(|done| (done, spilled)),
            Err(e) => Err(e),
        };
        match result {
            Ok((Finished::Recorded, _)) => {
                tracing::debug!(backend = BACKEND, job = %claim.id, attempt = claim.attempt(), "attempt recorded");
                return;
            }
            Ok((Finished::Lost, spilled)) => {
                tracing::warn!(backend = BACKEND, job = %claim.id, "the claim ended before the attempt did; its outcome is dropped");
                if let Some(key) = spilled {
                    shared.discard(&key).await;
                }
                return;
            }
            Ok((Finished::Settled, _)) => return,
            // A big output's PUT failed while the claim may live: try again.
            Err(e)
                if e.kind() == ErrorKind::Unavailable
                    && claim.session.alive()
                    && !shared.client.is_killed() =>
            {
                tracing::warn!(backend = BACKEND, job = %claim.id, error = %e, "storing the outcome failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
            Err(e)
                if e.kind() == ErrorKind::Unauthorized
                    && claim.session.alive()
                    && !shared.client.is_killed() =>
            {
                tracing::warn!(backend = BACKEND, job = %claim.id, error = %e, "recording the outcome was refused; retrying");
                tokio::time::sleep(refusals.after(&e, "recording a job's outcome")).await;
            }
            Err(e) if !downgraded && e.kind() != ErrorKind::Unavailable => {
                tracing::warn!(backend = BACKEND, job = %claim.id, error = %e, "the outcome cannot be stored; recording the attempt as failed");
                downgraded = true;
                outcome = Err(format!("the attempt's outcome could not be stored: {e}"));
            }
            Err(e) => {
                tracing::warn!(backend = BACKEND, job = %claim.id, error = %e, "recording the outcome failed; giving the claim up");
                give_up(shared, claim).await;
                return;
            }
        }
    }
}

/// The finish transaction, guarded (its first two operations) by the claim's and the record's
/// index: Succeeded (with its output and `done/` key), Failed (likewise), or Queued again
/// with its entry. A big output is PUT first: its key is returned.
async fn finish_ops(
    shared: &Shared,
    claim: &Claim,
    outcome: Outcome,
) -> Result<(Vec<KvOp>, Option<String>)> {
    let keys = &shared.keys;
    let mut record = claim.record.clone();
    let next = apply_outcome(&record.job, &mut record.status, claim.attempt(), outcome);
    clip(&mut record.status.last_error);
    let now = now_ms();
    let mut output_op = None;
    let mut spilled = None;
    match next {
        Next::Succeeded(output) => {
            let key = keys.output(&claim.eid, claim.token);
            if output.len() > INLINE_MAX {
                shared.put("storing the output", &key, &output).await?;
                spilled = Some(key);
            } else {
                output_op = Some(KvOp::set(&key, &output));
            }
            record.output = Some(claim.token);
            record.finished = Some(now);
        }
        Next::Retry { delay } => record.not_before = now.saturating_add(millis(delay)),
        Next::Failed => record.finished = Some(now),
    }
    let value = record.encode()?;
    // The claim key is deleted only at its index, the token: once its session ended, Consul
    // released it (a new index), so this one operation both guards and deletes.
    let mut ops = vec![
        KvOp::delete_cas(&claim.key, claim.token),
        KvOp::cas(&keys.record(&claim.eid), &value, claim.token),
    ];
    ops.extend(output_op);
    match record.finished {
        None => ops.push(KvOp::set(&keys.entry(&record.job.name, &claim.eid), &value)),
        Some(at) => {
            ops.push(KvOp::delete_tree(&keys.payload_dir(&claim.eid)));
            ops.push(KvOp::set(&keys.done(&claim.eid, at), b""));
        }
    }
    Ok((ops, spilled))
}

/// Sends a finish transaction; again while Consul is unreachable and the claim's session
/// may live (once it is gone the claim is released and the job handed on).
async fn send_finish(shared: &Shared, claim: &Claim, ops: &[KvOp]) -> Result<Finished> {
    let client = &shared.client;
    let mut unknown = false;
    let mut pause = Duration::from_millis(100);
    loop {
        match client.api.txn("recording the outcome", ops).await {
            Ok(Txn::Done(_)) => return Ok(Finished::Recorded),
            Ok(Txn::RolledBack(_)) if unknown => return Ok(Finished::Settled),
            Ok(Txn::RolledBack(errors)) => {
                // Only the claim's guards fail when the claim ended.
                return match errors.iter().all(|e| e.op_index <= 1) {
                    true => Ok(Finished::Lost),
                    false => Err(rolled_back("recording the outcome", &errors).with_id(&claim.id)),
                };
            }
            Err(f) if f.kind() == ErrorKind::Unavailable && claim.session.alive() => {
                client.check_alive()?;
                unknown |= f.unknown();
                tracing::warn!(backend = BACKEND, job = %claim.id, error = %f.error(), "recording the outcome failed; retrying");
            }
            Err(f) => return Err(f.error().with_id(&claim.id)),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Releases the claim, best effort, so a reaper hands its job on now rather than when the
/// session ends.
async fn give_up(shared: &Shared, claim: &Claim) {
    let ops = [
        KvOp::check_session(&claim.key, &claim.session.id),
        KvOp::unlock(&claim.key, &claim.session.id),
    ];
    if let Err(f) = shared.client.api.txn("giving a claim up", &ops).await {
        tracing::warn!(backend = BACKEND, job = %claim.id, error = %f.error(), "giving the claim up failed; it ends with the session");
    }
}

/// Watches `claims/` with a blocking query and hands on the job of every claim key that
/// lost its session (a worker's session ended).
async fn reaper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut killed = shared.client.killed();
    let prefix = shared.keys.claims_dir();
    let mut index = 0;
    let mut retry = sync_kit::retry::Retry::new(RETRY);
    loop {
        let read = tokio::select! {
            r = shared.client.api.list("watching claims", &prefix, index) => r,
            _ = stopped(&mut stop, &mut killed) => return,
        };
        let pause = match read {
            Ok(read) => {
                // An index that goes back (a restored server) starts the wait over.
                index = if read.index < index { 0 } else { read.index };
                let mut failed = None;
                for c in read
                    .value
                    .iter()
                    .filter(|c| c.session.as_deref().is_none_or(str::is_empty))
                {
                    if let Err(e) = reap(&shared, c).await {
                        tracing::warn!(backend = BACKEND, key = %c.key, error = %e, "handing on an abandoned job failed");
                        failed = Some(e);
                    }
                }
                if let Some(e) = failed {
                    index = 0;
                    retry.after(&e, "handing on an abandoned job")
                } else {
                    retry.succeeded();
                    REAP_DEBOUNCE
                }
            }
            Err(f) => {
                let e = f.error();
                tracing::debug!(backend = BACKEND, error = %e, "watching claims failed");
                index = 0;
                retry.after(&e, "watching claims")
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stopped(&mut stop, &mut killed) => return,
        }
    }
}

/// Hands on the job of the abandoned claim `c`: queued again (or Failed when out of
/// attempts) if its record still runs that attempt, guarded by both indexes; a claim of
/// anything else is stale and deleted.
async fn reap(shared: &Shared, c: &KvEntry) -> Result<()> {
    let keys = &shared.keys;
    let api = &shared.client.api;
    let Some((eid, attempt)) = keys.parse_claim(&c.key) else {
        return Ok(());
    };
    let id = sync_core::id::unescape(eid).unwrap_or_else(|| eid.to_string());
    let read = api.get("reading the job", &keys.record(eid), 0).await?;
    let running = read
        .value
        .as_ref()
        .map(|e| Record::decode(&id, &e.value).map(|r| (r, e.modify_index)))
        .transpose()?
        .filter(|(r, _)| r.status.state == JobState::Running && r.status.attempts == attempt);
    let Some((mut record, index)) = running else {
        api.txn(
            "deleting a stale claim",
            &[KvOp::delete_cas(&c.key, c.modify_index)],
        )
        .await?;
        return Ok(());
    };
    let reason = format!("its session ended during attempt {attempt}");
    let requeue = apply_worker_loss(&record.job, &mut record.status, &reason);
    if !requeue {
        record.finished = Some(now_ms());
    }
    let value = record.encode()?;
    let mut ops = vec![
        KvOp::check_index(&c.key, c.modify_index),
        KvOp::cas(&keys.record(eid), &value, index),
        KvOp::delete(&c.key),
    ];
    match record.finished {
        None => ops.push(KvOp::set(&keys.entry(&record.job.name, eid), &value)),
        Some(at) => {
            ops.push(KvOp::delete_tree(&keys.payload_dir(eid)));
            ops.push(KvOp::set(&keys.done(eid, at), b""));
        }
    }
    if let Txn::Done(_) = api.txn("handing on an abandoned job", &ops).await? {
        tracing::warn!(backend = BACKEND, job = %id, attempt, redelivered = requeue, "a worker's session ended while it ran the job");
    }
    Ok(())
}

/// Deletes jobs past their retention: each pass lists `done/` and sleeps until the next
/// expiry (at least an eighth of the retention, plus a jitter so that the workers of a
/// namespace do not all sweep at once).
async fn sweeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut killed = shared.client.killed();
    let retention = shared.client.config.job_retention;
    let least = retention / 8;
    loop {
        let next = match sweep(&shared).await {
            Ok(next) => next.max(least),
            Err(e) => {
                tracing::debug!(backend = BACKEND, error = %e, "sweeping finished jobs failed");
                RETRY.max(least)
            }
        };
        let jitter = Duration::from_millis(random_below(millis(least).max(1) as usize) as u64);
        tokio::select! {
            () = tokio::time::sleep(next + jitter) => {}
            _ = stopped(&mut stop, &mut killed) => return,
        }
    }
}

/// One sweep: deletes every job past its retention; how long until the next one is.
async fn sweep(shared: &Shared) -> Result<Duration> {
    let keys = &shared.keys;
    let retention = shared.client.config.job_retention;
    let read = shared
        .client
        .api
        .list("listing finished jobs", &keys.done_dir(), 0)
        .await?;
    let now = now_ms();
    let mut next = retention;
    for e in &read.value {
        let Some((finished, eid)) = keys.parse_done(&e.key) else {
            continue;
        };
        let expires = finished.saturating_add(millis(retention));
        if expires > now {
            next = next.min(Duration::from_millis(expires - now));
            continue;
        }
        // The `done/` key was written with the job's last record: at one index.
        match shared.remove(eid, &e.key, e.modify_index, false).await {
            Ok(true) => tracing::debug!(backend = BACKEND, job = %eid, "expired job deleted"),
            Ok(false) => {}
            Err(err) => {
                tracing::debug!(backend = BACKEND, job = %eid, error = %err, "deleting an expired job failed")
            }
        }
    }
    Ok(next)
}

async fn stopped(stop: &mut watch::Receiver<bool>, killed: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.wait_for(|s| *s) => {}
        _ = killed.wait_for(|k| *k) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let keys = Keys::new("ns");
        assert_eq!(keys.claim("a%2Fb", 3), "ns/:task/claims/a%2Fb/3");
        assert_eq!(
            keys.parse_claim("ns/:task/claims/a%2Fb/3"),
            Some(("a%2Fb", 3))
        );
        assert_eq!(keys.parse_claim("ns/:task/claims/a%2Fb"), None);
        let done = keys.done("x", 1_700_000_000_123);
        assert_eq!(done, "ns/:task/done/1700000000123/x");
        assert_eq!(keys.parse_done(&done), Some((1_700_000_000_123, "x")));
        assert_eq!(Keys::new("").record("x"), ":task/jobs/x/record");
        // The fault proxy of the conformance suite finds a claim by this name.
        assert!(keys.claim("order-42", 1).contains("claims/order-42"));
    }

    #[test]
    fn long_errors_are_clipped_at_a_char_boundary() {
        let mut e = Some("é".repeat(MAX_ERROR_LEN));
        clip(&mut e);
        let e = e.unwrap();
        assert!(e.len() <= MAX_ERROR_LEN + 8 && e.ends_with(" […]"));
        let mut short = Some("boom".to_string());
        clip(&mut short);
        assert_eq!(short.as_deref(), Some("boom"));
    }
}
