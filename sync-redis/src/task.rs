//! Task on Redis: one stream per job name read through a consumer group, one hash per job, and
//! a claim key per running attempt that the client's renewer keeps alive like a held lock.
//!
//! Every key of a namespace's tasks shares the one hash tag `{<ns>:task:}`, so all of them lie
//! in one slot of a Redis Cluster. A claim has to change the stream of the job's name and the
//! job's record in one script, while `status(id)` must find the record from the id alone (a
//! keyed job's id is the caller's key, so no slot can be encoded in it): one tag per
//! namespace is the layout that allows both. The cost is that a namespace's tasks live on one
//! node; spread load over several namespaces if one node is not enough.
//!
//! | key (after `{ns:task:}:`) | holds |
//! | --- | --- |
//! | `jobs/<id>` | hash: the job (JSON, without payload), payload, state, attempts, last error, output, the last fencing token, the stream entry, the claim's owner; expires a retention after the job ended |
//! | `claims/<id>` | the running attempt's claim: owner, fencing token (a held value); expires a TTL after its last renewal |
//! | `queue/<name>` | stream of the queued jobs' ids, group `workers` |
//! | `delayed/<name>` | sorted set: jobs waiting for a retry, by due time (server ms) |
//! | `running/<name>` | sorted set: jobs with a claim, by when to look at the claim next |
//! | `wake/<name>`, `claimed/<name>`, `done/<id>` | pub/sub channels: queued, claimed, ended |
//!
//! Submitting is one script: it writes the record and adds a stream entry, unless a record
//! with that id exists, so a keyed job is one job and a resend (the id of an unkeyed job is
//! made before sending) changes nothing.
//!
//! Taking jobs is two steps. One script promotes due retries into the stream, takes back
//! deliveries that were never started (XAUTOCLAIM, idle at least a TTL: the worker they went
//! to died or never heard the answer) and reads new entries (XREADGROUP, never BLOCK: that
//! would stall the client's one multiplexed connection). Then a script per entry starts the
//! attempt: only if the entry is the job's current one and the job is queued, it writes the
//! claim key, bumps attempts and the fencing token, and acknowledges and deletes the entry. A
//! stream entry is thus pending only until its attempt starts; a running attempt is watched
//! through its claim key, which the renewer keeps alive while the worker lives, and whose loss
//! is the handler's `JobContext::lost()`.
//!
//! A worker's reaper looks at each claim when it could have expired (the `running` set); a
//! claim found gone puts its job back in the stream, or fails it when out of attempts. A
//! finish is owner-checked against the claim key, so the outcome of an attempt whose claim
//! ended is dropped (the job was, or will be, handed on). A finish Redis cannot take (down,
//! loading, failing over) is sent again until the claim's safe deadline: an attempt that ran
//! is not run again because Redis was briefly away when it ended.
//!
//! Answers that are lost are resolved, not blindly repeated: the start script answers a
//! resend by the same owner with the grant it made (or grants anew the same attempt if that
//! claim expired before its answer came), the finish script answers a resend with the outcome
//! it recorded (the record keeps the token of the finish applied). Every script answers with
//! a nonce sent along, because on a multiplexed connection a lost answer shows up as the next
//! request's answer arriving for this one (answers are paired with requests in order): such a
//! mismatch, or a timeout, makes the connection start afresh before the resend.
//!
//! Workers wake on pub/sub (a submit, a retry or a requeue publishes on the name's channel),
//! at the next delayed retry's due time, and on the safety-net poll.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;
use redis::{FromRedisValue, Script, Value};
use sync_core::{
    Error, ErrorKind, Job, JobContext, JobId, JobState, JobStatus, LossSignal, Result, id::escape,
};
use sync_kit::task::{Claimed, JobQueue, JobStore, Next, Outcome, apply_outcome};
use tokio::{
    sync::{Mutex as AsyncMutex, watch},
    time::Instant,
};

use crate::{
    BACKEND,
    client::ClientInner,
    error::{closed, outcome_unknown, redis_err, unexpected},
    hub::Subscription,
    keys::OWNS,
};

/// The consumer group every worker of a name reads through.
const GROUP: &str = "workers";

/// The one consumer name of every worker: which consumer an entry is pending with means
/// nothing here (an attempt is the claim key's), and a consumer per worker would pile up in
/// the group as processes come and go.
const CONSUMER: &str = "workers";

/// How often a script whose answer was lost is sent again before giving up.
const RESENDS: usize = 3;

/// How long the reaper rests after a failed call.
const REAP_RETRY: Duration = Duration::from_millis(500);

/// Added to the wake-ups at a server time, for clock granularity.
const MARGIN: Duration = Duration::from_millis(5);

/// Lua helpers: the server's clock in ms, and the reply: every script's last ARGV is a nonce
/// that it answers first, so a client can tell its own answer from another request's (see
/// [`Shared::send`]).
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reply(...)
  return {...}
end
"#;

fn script(body: &str) -> Script {
    crate::keys::script("", &format!("{OWNS}{PRELUDE}{body}"))
}

/// A script that writes nothing: it also runs while writes are refused (out of memory, a
/// paused or read-only server).
fn read_script(body: &str) -> Script {
    crate::keys::script("no-writes", &format!("{PRELUDE}{body}"))
}

/// Stores and queues a job unless its id exists. KEYS: record, stream. ARGV: id, escaped id,
/// job JSON, payload, max attempts, wake channel. Returns 1 if queued now.
static SUBMIT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    script(
        r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return reply(0) end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'job', ARGV[3], 'payload', ARGV[4], 'max', ARGV[5],
  'state', 'queued', 'attempts', 0, 'fence', 0, 'entry', entry)
redis.call('PUBLISH', ARGV[6], 'queued')
return reply(1)
"#,
    )
});

/// Finds startable entries. KEYS: stream, delayed. (The records it promotes are named from a
/// prefix, as in the other scripts: Redis lets a script touch keys of its declared keys' slot,
/// which on a cluster is why every task key shares one tag.) ARGV: group, consumer, max, min idle ms
/// of a stranded delivery, record key prefix. Returns `{wake ms (-1: none), {entry, escaped
/// id, …}}`; the wake is computed only when nothing was found.
static TAKE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', KEYS[2], eid)
  local rec = ARGV[5] .. eid
  local f = redis.call('HMGET', rec, 'state', 'entry')
  if f[1] == 'queued' and (not f[2] or f[2] == '') then
    redis.call('HSET', rec, 'entry', redis.call('XADD', KEYS[1], '*', 'job', eid))
  end
end
local max = tonumber(ARGV[3])
local out = {}
local function add(entries)
  for _, e in ipairs(entries) do
    if #out < 2 * max and e[2] then
      out[#out + 1] = e[1]
      out[#out + 1] = e[2][2]
    end
  end
end
add(redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', max)[2])
local want = max - math.floor(#out / 2)
if want > 0 then
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', KEYS[1], '>')
  if r then add(r[1][2]) end
end
if #out > 0 then return reply(-1, out) end
local wake = -1
local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if d[2] then wake = math.max(0, tonumber(d[2]) - now) end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1)
if p[1] then
  local w = math.max(0, tonumber(ARGV[4]) - tonumber(p[1][3]))
  if wake < 0 or w < wake then wake = w end
end
return reply(wake, out)
"#,
    )
});

/// Starts an attempt from a delivered entry. KEYS: record, claim, stream, running. ARGV:
/// owner, ttl ms, entry, group, escaped id, claimed channel. Returns `{0}` when the entry is
/// stale (acknowledged and deleted), else `{1, token, attempt, id, job JSON, payload, claim
/// pttl}`, also to a resend by the same owner.
static START: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    script(
        r#"
local function drop()
  if ARGV[3] ~= '' then
    redis.call('XACK', KEYS[3], ARGV[4], ARGV[3])
    redis.call('XDEL', KEYS[3], ARGV[3])
  end
  return reply(0)
end
local function granted(token)
  local f = redis.call('HMGET', KEYS[1], 'attempts', 'id', 'job', 'payload')
  return reply(1, token, tonumber(f[1]), f[2], f[3], f[4] or '', redis.call('PTTL', KEYS[2]))
end
local held = redis.call('GET', KEYS[2])
if held then
  if owns(held, ARGV[1]) then return granted(token_of(held)) end
  return drop()
end
local f = redis.call('HMGET', KEYS[1], 'state', 'entry', 'owner', 'attempts', 'fence')
local attempts = tonumber(f[4] or '0')
if f[1] == 'running' and f[3] == ARGV[1] then
  -- This owner's grant whose claim expired before its answer came: grant the attempt anew.
elseif f[1] == 'queued' and f[2] == ARGV[3] then
  attempts = attempts + 1
else
  return drop()
end
local now = now_ms()
local token = math.max(tonumber(f[5] or '0') + 1, now * 1024)
local text = string.format('%.0f', token)
redis.call('SET', KEYS[2], ARGV[1] .. text .. '\n', 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'running', 'attempts', attempts, 'fence', text,
  'owner', ARGV[1], 'entry', '')
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), ARGV[5])
drop()
redis.call('PUBLISH', ARGV[6], 'claimed')
return granted(token)
"#,
    )
});

/// Records an attempt's outcome if its claim stands. KEYS: record, claim, delayed, running.
/// ARGV: owner, token, 'ok' | 'retry' | 'failed', output or error, retry delay ms, retention
/// ms, escaped id, wake channel, done channel. Returns 1 if recorded (also to a resend of a
/// finish applied), 0 if the claim had ended.
static FINISH: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    script(
        r#"
if redis.call('HGET', KEYS[1], 'done') == ARGV[2] then return reply(1) end
if not owns(redis.call('GET', KEYS[2]), ARGV[1]) then return reply(0) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[4], ARGV[7])
redis.call('HSET', KEYS[1], 'done', ARGV[2])
if ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], 'state', 'queued', 'error', ARGV[4], 'entry', '')
  redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[5]), ARGV[7])
  redis.call('PUBLISH', ARGV[8], 'retry')
  return reply(1)
end
if ARGV[3] == 'ok' then
  redis.call('HSET', KEYS[1], 'state', 'succeeded', 'output', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[4])
end
redis.call('HDEL', KEYS[1], 'payload')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', ARGV[9], 'done')
return reply(1)
"#,
    )
});

/// Hands on the jobs whose claim ended without a finish. KEYS: running, stream. ARGV: claim
/// key prefix, record key prefix, retention ms, wake channel, done channel prefix. A claim
/// still held is looked at again at its expiry. Returns ms until the next look (-1: none).
static REAP: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    script(
        r#"
local now = now_ms()
local requeued = false
for _, eid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)) do
  local left = redis.call('PTTL', ARGV[1] .. eid)
  if left >= 0 then
    redis.call('ZADD', KEYS[1], now + math.max(left, 1), eid)
  else
    redis.call('ZREM', KEYS[1], eid)
    local rec = ARGV[2] .. eid
    local f = redis.call('HMGET', rec, 'state', 'attempts', 'max')
    if f[1] == 'running' then
      local why = 'worker lost: its claim ended (expired or revoked) before the attempt did'
      if (tonumber(f[2]) or 0) < (tonumber(f[3]) or 1) then
        local entry = redis.call('XADD', KEYS[2], '*', 'job', eid)
        redis.call('HSET', rec, 'state', 'queued', 'error', why, 'entry', entry)
        requeued = true
      else
        redis.call('HSET', rec, 'state', 'failed', 'error', why)
        redis.call('HDEL', rec, 'payload')
        redis.call('PEXPIRE', rec, ARGV[3])
        redis.call('PUBLISH', ARGV[5] .. eid, 'done')
      end
    end
  end
end
if requeued then redis.call('PUBLISH', ARGV[4], 'requeued') end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then return reply(math.max(0, tonumber(first[2]) - now)) end
return reply(-1)
"#,
    )
});

/// Reads a job's status fields. KEYS: record. Returns `{{id, job JSON, state, attempts,
/// error, output}}`.
static READ: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    read_script(
        r#"
return reply(redis.call('HMGET', KEYS[1], 'id', 'job', 'state', 'attempts', 'error', 'output'))
"#,
    )
});

/// The keys of a namespace's tasks, all under one hash tag.
struct TaskKeys {
    tag: String,
}

impl TaskKeys {
    fn record_prefix(&self) -> String {
        format!("{}:jobs/", self.tag)
    }
    fn claim_prefix(&self) -> String {
        format!("{}:claims/", self.tag)
    }
    fn done_prefix(&self) -> String {
        format!("{}:done/", self.tag)
    }
    fn record(&self, eid: &str) -> String {
        format!("{}{eid}", self.record_prefix())
    }
    fn claim(&self, eid: &str) -> String {
        format!("{}{eid}", self.claim_prefix())
    }
    fn done(&self, eid: &str) -> String {
        format!("{}{eid}", self.done_prefix())
    }
    fn name(&self, name: &str) -> NameKeys {
        let (tag, name) = (&self.tag, escape(name));
        NameKeys {
            stream: format!("{tag}:queue/{name}"),
            delayed: format!("{tag}:delayed/{name}"),
            running: format!("{tag}:running/{name}"),
            wake: format!("{tag}:wake/{name}"),
            claimed: format!("{tag}:claimed/{name}"),
        }
    }
}

/// The keys and channels of one job name.
struct NameKeys {
    stream: String,
    delayed: String,
    running: String,
    /// Published on when a job of the name is queued (submit, retry, requeue).
    wake: String,
    /// Published on when an attempt starts (reapers learn when to look) or a claim is revoked.
    claimed: String,
}

struct Shared {
    client: Arc<ClientInner>,
    keys: TaskKeys,
}

impl Shared {
    fn ms(d: Duration) -> String {
        d.as_millis().to_string()
    }

    /// Sends `script` once (the connection checks the answer is this call's: see
    /// [`Conn::eval`](crate::conn::Conn::eval)).
    async fn send(
        &self,
        what: &str,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> std::result::Result<(Vec<Value>, Instant), Failed> {
        self.client.check_alive().map_err(Failed::surely)?;
        let sent = Instant::now();
        match self.client.conn.eval::<Value>(script, keys, args).await {
            Ok(Value::Array(items)) => Ok((items, sent)),
            Ok(other) => Err(Failed::surely(unexpected(what, format!("{other:?}")))),
            Err(e) => Err(Failed {
                maybe_applied: outcome_unknown(&e),
                error: redis_err(what.to_string(), e),
            }),
        }
    }

    /// [`Shared::send`], sent again while the outcome is unknown: for the scripts that answer
    /// a resend with what the first send did, and reads. Also returns when the send that was
    /// answered went out.
    async fn call(
        &self,
        what: &str,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<(Vec<Value>, Instant)> {
        let mut resends = 0;
        let first = Instant::now();
        loop {
            match self.send(what, script, keys, args).await {
                Ok(answer) => return Ok(answer),
                Err(f) if f.maybe_applied && resends < RESENDS && self.client.may_resend(first) => {
                    resends += 1;
                    tracing::debug!(backend = BACKEND, error = %f.error, what, "answer lost; resolving by a resend");
                }
                // After a send whose outcome was unknown, a later error reply settles nothing.
                Err(f) if resends > 0 => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "{what}: whether it applied is unknown ({})",
                            f.error.message()
                        ),
                    )
                    .with_backend(BACKEND));
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// [`Shared::send`] once, for a script whose lost answer is repaired later (a take: its
    /// entries stay pending and are taken back a TTL later; a reaper pass).
    async fn call_once(
        &self,
        what: &str,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Vec<Value>> {
        match self.send(what, script, keys, args).await {
            Ok((answer, _)) => Ok(answer),
            Err(f) => Err(f.error),
        }
    }

    /// The job's status, None if no such record.
    async fn read_status(&self, eid: &str) -> Result<Option<JobStatus>> {
        let record = self.keys.record(eid);
        let (answer, _) = self
            .call("reading the job", &READ, &[&record], &[])
            .await
            .map_err(|e| e.with_id(eid))?;
        let fields: Vec<Option<Vec<u8>>> = convert("reading the job", answer.into_iter().next())?;
        let [id, job, state, attempts, error, output]: [Option<Vec<u8>>; 6] = fields
            .try_into()
            .map_err(|f| unexpected("reading the job", format!("{f:?}")))?;
        let (Some(id), Some(job)) = (id, job) else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        let job = decode_job(&id, &job)?;
        let mut status = JobStatus::queued(JobId(id.clone()), &job);
        status.state = match state.as_deref() {
            Some(b"queued") => JobState::Queued,
            Some(b"running") => JobState::Running,
            Some(b"succeeded") => JobState::Succeeded,
            Some(b"failed") => JobState::Failed,
            other => return Err(unexpected("reading the job's state", format!("{other:?}"))),
        };
        status.attempts = attempts
            .and_then(|a| String::from_utf8_lossy(&a).parse().ok())
            .unwrap_or(0);
        status.last_error = error.map(|e| String::from_utf8_lossy(&e).into_owned());
        if status.state == JobState::Succeeded {
            status.output = Some(output.unwrap_or_default());
        }
        Ok(Some(status))
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

    /// How long a waiter trusts pub/sub before looking again.
    fn poll(&self, sub: &Subscription) -> Duration {
        if sub.confirmed {
            self.client.config.poll
        } else {
            Duration::from_millis(250)
        }
    }
}

/// A failed send, and whether it may have been applied.
struct Failed {
    error: Error,
    maybe_applied: bool,
}

impl Failed {
    /// A failure before anything was sent.
    fn surely(error: Error) -> Failed {
        Failed {
            error,
            maybe_applied: false,
        }
    }
}

/// One value of a script's answer as `T`.
fn convert<T: FromRedisValue>(what: &str, v: Option<Value>) -> Result<T> {
    let v = v.unwrap_or(Value::Nil);
    let shown = format!("{v:?}");
    T::from_redis_value(v).map_err(|_| unexpected(what, shown))
}

fn decode_job(id: &str, json: &[u8]) -> Result<Job> {
    serde_json::from_slice(json).map_err(|e| {
        Error::new(ErrorKind::Backend, "the job record is not valid JSON")
            .with_backend(BACKEND)
            .with_id(id)
            .with_source(e)
    })
}

pub(crate) struct RedisTask {
    shared: Arc<Shared>,
}

impl RedisTask {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        let tag = client.keys.tag("task", "");
        RedisTask {
            shared: Arc::new(Shared {
                client,
                keys: TaskKeys { tag },
            }),
        }
    }
}

#[async_trait]
impl JobStore for RedisTask {
    type Queue = RedisQueue;

    async fn submit(&self, job: Job) -> Result<JobId> {
        let shared = &self.shared;
        shared.client.check_alive()?;
        // Made before sending, so a resend of an unkeyed job finds the job the first made.
        let id = job
            .key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let eid = escape(&id).into_owned();
        let mut job = job;
        let payload = std::mem::take(&mut job.payload);
        let json = serde_json::to_vec(&job).map_err(|e| {
            Error::new(ErrorKind::Backend, "encoding the job")
                .with_backend(BACKEND)
                .with_source(e)
        })?;
        let name = shared.keys.name(&job.name);
        let max = job.max_attempts.to_string();
        let record = shared.keys.record(&eid);
        let args: [&[u8]; 6] = [
            id.as_bytes(),
            eid.as_bytes(),
            &json,
            &payload,
            max.as_bytes(),
            name.wake.as_bytes(),
        ];
        let what = "submitting the job";
        let (answer, _) = shared
            .call(what, &SUBMIT, &[&record, &name.stream], &args)
            .await
            .map_err(|e| e.with_id(&job.name))?;
        let queued: i64 = convert(what, answer.into_iter().next())?;
        tracing::debug!(backend = BACKEND, job = %id, queued = queued == 1, "job submitted");
        Ok(JobId(id))
    }

    async fn status(&self, id: &JobId) -> Result<JobStatus> {
        self.shared.check_job_id(id)?;
        let eid = escape(&id.0);
        self.shared
            .read_status(&eid)
            .await?
            .ok_or_else(|| Shared::not_found(&id.0))
    }

    async fn wait(&self, id: &JobId) -> Result<JobStatus> {
        let shared = &self.shared;
        shared.check_job_id(id)?;
        let eid = escape(&id.0);
        let mut sub = shared.client.hub.subscribe(&shared.keys.done(&eid)).await;
        let mut killed = shared.client.killed();
        let poll = shared.poll(&sub);
        loop {
            sub.mark();
            let status = shared
                .read_status(&eid)
                .await?
                .ok_or_else(|| Shared::not_found(&id.0))?;
            if status.state.is_final() {
                return Ok(status);
            }
            tokio::select! {
                () = sub.changed() => {}
                () = tokio::time::sleep(poll) => {}
                _ = killed.wait_for(|k| *k) => return Err(closed()),
            }
        }
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "task"))]
    async fn queue(&self, name: &str) -> Result<RedisQueue> {
        let shared = &self.shared;
        shared.client.check_alive()?;
        let keys = shared.keys.name(name);
        let wake = shared.client.hub.subscribe(&keys.wake).await;
        Ok(RedisQueue {
            shared: shared.clone(),
            keys,
            poll: shared.poll(&wake),
            wake: Arc::new(AsyncMutex::new(wake)),
        })
    }
}

/// The jobs of one name, as a worker takes them.
pub(crate) struct RedisQueue {
    shared: Arc<Shared>,
    keys: NameKeys,
    /// The name's wake channel, marked before each take.
    wake: Arc<AsyncMutex<Subscription>>,
    poll: Duration,
}

/// One running attempt.
pub(crate) struct RedisClaim {
    id: String,
    eid: String,
    job: Job,
    attempt: u32,
    token: u64,
    owner: String,
    registration: u64,
    /// The claim's loss signal (the handler's `JobContext::lost()`).
    lost: LossSignal,
}

/// A delivered stream entry: its id and the escaped job id.
type Delivery = (String, String);

impl RedisQueue {
    /// Sends the finish script; while Redis is unavailable, again after a pause (100 ms,
    /// doubling up to 1 s) as long as the claim is safe (`until`). Its answer: 1 recorded, 0
    /// the claim had ended.
    async fn send_finish(
        &self,
        keys: &[&str],
        args: &[&[u8]],
        until: Option<Instant>,
    ) -> Result<i64> {
        let what = "finishing a job";
        let mut pause = Duration::from_millis(100);
        let mut killed = self.shared.client.killed();
        loop {
            let e = match self.shared.call(what, &FINISH, keys, args).await {
                Ok((answer, _)) => return convert::<i64>(what, answer.into_iter().next()),
                Err(e) => e,
            };
            let safe = until.is_some_and(|u| Instant::now() + pause < u);
            if e.kind() != ErrorKind::Unavailable || !safe {
                return Err(e);
            }
            tracing::warn!(backend = BACKEND, error = %e, retry_in = ?pause, "recording the attempt failed; retrying while the claim is safe");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = killed.wait_for(|k| *k) => return Err(e),
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Promotes due retries, takes back stranded deliveries and reads new ones: up to `max`
    /// entries, or none and how long until something may be startable.
    async fn take(&self, max: usize) -> Result<(Option<Duration>, Vec<Delivery>)> {
        let shared = &self.shared;
        let (max, idle) = (max.to_string(), Shared::ms(shared.client.config.ttl));
        let prefix = shared.keys.record_prefix();
        let args: [&[u8]; 5] = [
            GROUP.as_bytes(),
            CONSUMER.as_bytes(),
            max.as_bytes(),
            idle.as_bytes(),
            prefix.as_bytes(),
        ];
        let keys = [self.keys.stream.as_str(), self.keys.delayed.as_str()];
        // Sent once: entries delivered by a take whose answer was lost stay pending, and are
        // taken back a TTL later.
        let what = "taking jobs";
        let answer = shared.call_once(what, &TAKE, &keys, &args).await?;
        let (wake, flat): (i64, Vec<String>) = convert(what, Some(Value::Array(answer)))?;
        let wake = u64::try_from(wake).ok().map(Duration::from_millis);
        let entries = flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        Ok((wake, entries))
    }

    /// Starts the attempt of one delivered entry: its claim and context, or None if the
    /// entry was stale.
    async fn start(&self, (entry, eid): &Delivery) -> Result<Option<(RedisClaim, JobContext)>> {
        let shared = &self.shared;
        let owner = shared.client.owner();
        let ttl = shared.client.config.ttl;
        let ttl_ms = Shared::ms(ttl);
        let (record, claim) = (shared.keys.record(eid), shared.keys.claim(eid));
        let keys = [
            record.as_str(),
            claim.as_str(),
            self.keys.stream.as_str(),
            self.keys.running.as_str(),
        ];
        let args: [&[u8]; 6] = [
            owner.as_bytes(),
            ttl_ms.as_bytes(),
            entry.as_bytes(),
            GROUP.as_bytes(),
            eid.as_bytes(),
            self.keys.claimed.as_bytes(),
        ];
        let (reply, sent) = shared
            .call("starting a job", &START, &keys, &args)
            .await
            .map_err(|e| e.with_id(eid))?;
        let Some(grant) = Grant::parse(&reply)? else {
            tracing::debug!(backend = BACKEND, job = %eid, "stale delivery dropped");
            return Ok(None);
        };
        // The script ran after `sent` and found `pttl` left on the claim key (all of the TTL
        // for a claim it made): the key lives at least until `sent` + `pttl`. (A monotonic
        // clock counts from boot, so the subtraction does not fail.)
        let as_if_sent = sent
            .checked_sub(ttl.saturating_sub(grant.pttl))
            .unwrap_or(sent);
        // Decoded before the claim is renewed: a record that does not decode leaves the claim
        // to expire, and the reaper counts the attempt (failing the job at its last one).
        let job = decode_job(&grant.id, &grant.job)?;
        let (registration, lost) =
            shared
                .client
                .renewals
                .register(&claim, &owner, &self.keys.claimed, as_if_sent);
        let mut ctx = JobContext::new(JobId(grant.id.clone()), &job, grant.attempt)
            .with_claim(grant.token, lost.clone());
        ctx.payload = grant.payload;
        let claim = RedisClaim {
            id: grant.id,
            eid: eid.clone(),
            job,
            attempt: grant.attempt,
            token: grant.token,
            owner,
            registration,
            lost,
        };
        Ok(Some((claim, ctx)))
    }

    /// Sleeps until a message on the wake channel (since its last mark), `wake_in`, or the
    /// safety-net poll.
    fn sleeper(&self, wake_in: Option<Duration>) -> BoxFuture<'static, ()> {
        let sub = self.wake.clone();
        let nap = wake_in.map_or(self.poll, |w| (w + MARGIN).min(self.poll));
        Box::pin(async move {
            let mut sub = sub.lock().await;
            tokio::select! {
                () = sub.changed() => {}
                () = tokio::time::sleep(nap) => {}
            }
        })
    }

    /// One reaper pass: how long until the next claim may have ended.
    async fn reap(&self) -> Result<Option<Duration>> {
        let shared = &self.shared;
        let keys = [self.keys.running.as_str(), self.keys.stream.as_str()];
        let (claims, records, done) = (
            shared.keys.claim_prefix(),
            shared.keys.record_prefix(),
            shared.keys.done_prefix(),
        );
        let retention = Shared::ms(shared.client.config.job_retention);
        let args: [&[u8]; 5] = [
            claims.as_bytes(),
            records.as_bytes(),
            retention.as_bytes(),
            self.keys.wake.as_bytes(),
            done.as_bytes(),
        ];
        let what = "looking for ended claims";
        let answer = shared.call_once(what, &REAP, &keys, &args).await?;
        let next: i64 = convert(what, answer.into_iter().next())?;
        Ok(u64::try_from(next).ok().map(Duration::from_millis))
    }

    /// Reaps whenever a claim may have ended: at the earliest look-at time the last pass
    /// returned, and a TTL after hearing of a new claim (or a revoked one); at least every
    /// poll.
    async fn reaper(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let shared = &self.shared;
        let mut heard = shared.client.hub.subscribe(&self.keys.claimed).await;
        let mut killed = shared.client.killed();
        let ttl = shared.client.config.ttl;
        let mut retry = sync_kit::retry::Retry::new(REAP_RETRY);
        loop {
            heard.mark();
            let pause = match self.reap().await {
                Ok(next) => {
                    retry.succeeded();
                    next.map_or(self.poll, |n| (n + MARGIN).min(self.poll))
                }
                Err(e) => {
                    tracing::warn!(backend = BACKEND, error = %e, "reaping ended claims failed; retrying");
                    retry.after(&e, "reaping ended claims")
                }
            };
            let mut until = sync_kit::deadline(pause);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = killed.wait_for(|k| *k) => return,
                    () = heard.changed() => {
                        heard.mark();
                        until = until.min(sync_kit::deadline(ttl + MARGIN));
                    }
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
    }
}

/// A start script's grant.
struct Grant {
    token: u64,
    attempt: u32,
    id: String,
    job: Vec<u8>,
    payload: Vec<u8>,
    /// What was left of the claim key's TTL when the script ran.
    pttl: Duration,
}

impl Grant {
    fn parse(reply: &[Value]) -> Result<Option<Grant>> {
        let bad = || unexpected("starting a job", format!("{reply:?}"));
        match reply {
            [Value::Int(0)] => Ok(None),
            [Value::Int(1), token, attempt, id, job, payload, pttl] => {
                let int = |v: &Value| match v {
                    Value::Int(n) => Some(*n),
                    _ => None,
                };
                let bytes = |v: &Value| Vec::<u8>::from_redis_value(v.clone()).ok();
                Ok(Some(Grant {
                    token: int(token)
                        .and_then(|t| u64::try_from(t).ok())
                        .ok_or_else(bad)?,
                    attempt: int(attempt)
                        .and_then(|a| u32::try_from(a).ok())
                        .ok_or_else(bad)?,
                    id: bytes(id)
                        .map(|i| String::from_utf8_lossy(&i).into_owned())
                        .ok_or_else(bad)?,
                    job: bytes(job).ok_or_else(bad)?,
                    payload: bytes(payload).ok_or_else(bad)?,
                    pttl: int(pttl)
                        .and_then(|p| u64::try_from(p).ok())
                        .map(Duration::from_millis)
                        .unwrap_or_default(),
                }))
            }
            _ => Err(bad()),
        }
    }
}

#[async_trait]
impl JobQueue for RedisQueue {
    type Claim = RedisClaim;

    async fn claim(&self, _name: &str, max: usize) -> Result<Claimed<RedisClaim>> {
        self.shared.client.check_alive()?;
        // Marked before looking, so a job queued meanwhile wakes the sleeper at once.
        self.wake.lock().await.mark();
        let (wake_in, entries) = self.take(max).await?;
        if entries.is_empty() {
            return Ok(Claimed::Empty(self.sleeper(wake_in)));
        }
        let starts = entries.iter().map(|d| self.start(d));
        let mut jobs = Vec::new();
        let mut failed = None;
        for started in futures::future::join_all(starts).await {
            match started {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            // Jobs started are this worker's whatever else failed.
            Some(e) if jobs.is_empty() => Err(e),
            _ => Ok(Claimed::Jobs(jobs)),
        }
    }

    async fn finish(&self, claim: RedisClaim, outcome: Outcome) {
        let shared = &self.shared;
        // Read before the renewals stop, which ends the signal: no longer renewed, the claim
        // stays safe until then.
        let until = claim.lost.deadline().filter(|_| !claim.lost.is_lost());
        shared.client.renewals.forget(claim.registration);
        let mut status = JobStatus::queued(JobId(claim.id.clone()), &claim.job);
        let next = apply_outcome(&claim.job, &mut status, claim.attempt, outcome);
        let error = status.last_error.unwrap_or_default().into_bytes();
        let (kind, data, delay): (&str, Vec<u8>, Duration) = match next {
            Next::Succeeded(output) => ("ok", output, Duration::ZERO),
            Next::Retry { delay } => ("retry", error, delay),
            Next::Failed => ("failed", error, Duration::ZERO),
        };
        let (token, delay_ms) = (claim.token.to_string(), Shared::ms(delay));
        let retention = Shared::ms(shared.client.config.job_retention);
        let (record, key) = (
            shared.keys.record(&claim.eid),
            shared.keys.claim(&claim.eid),
        );
        let done = shared.keys.done(&claim.eid);
        let keys = [
            record.as_str(),
            key.as_str(),
            self.keys.delayed.as_str(),
            self.keys.running.as_str(),
        ];
        let args: [&[u8]; 9] = [
            claim.owner.as_bytes(),
            token.as_bytes(),
            kind.as_bytes(),
            &data,
            delay_ms.as_bytes(),
            retention.as_bytes(),
            claim.eid.as_bytes(),
            self.keys.wake.as_bytes(),
            done.as_bytes(),
        ];
        match self.send_finish(&keys, &args, until).await {
            Ok(1) => tracing::debug!(backend = BACKEND, job = %claim.id, kind, "attempt recorded"),
            Ok(_) => tracing::info!(
                backend = BACKEND,
                job = %claim.id,
                "the claim ended before the attempt did: its outcome is dropped, the job handed on"
            ),
            Err(e) => tracing::warn!(
                backend = BACKEND,
                job = %claim.id,
                error = %e,
                "recording the attempt failed: the claim expires and the job is handed on"
            ),
        }
    }

    async fn closed(&self) {
        let mut killed = self.shared.client.killed();
        let _ = killed.wait_for(|k| *k).await;
    }

    fn chores(self: Arc<Self>, stop: watch::Receiver<bool>) -> Option<BoxFuture<'static, ()>> {
        Some(Box::pin(self.reaper(stop)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Keys, slot};

    #[test]
    fn every_task_key_shares_one_slot() {
        let keys = TaskKeys {
            tag: Keys::new("ns").tag("task", ""),
        };
        let name = keys.name("resize/large");
        let all = [
            keys.record("a%2Fb"),
            keys.claim("order-42"),
            name.stream.clone(),
            name.delayed.clone(),
            name.running.clone(),
        ];
        for k in &all {
            assert_eq!(slot(k), slot(&all[0]), "{k}");
        }
        assert_eq!(name.stream, "{ns:task:}:queue/resize%2Flarge");
        // The fault proxy of the conformance suite finds a claim by this name.
        assert_eq!(keys.claim("order-42"), "{ns:task:}:claims/order-42");
    }

    #[test]
    fn grants_parse() {
        assert!(Grant::parse(&[Value::Int(0)]).unwrap().is_none());
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = [
            Value::Int(1),
            Value::Int(1_839_152_330_281_984),
            Value::Int(2),
            bulk("order-42"),
            bulk("{}"),
            bulk("payload"),
            Value::Int(1500),
        ];
        let grant = Grant::parse(&reply).unwrap().unwrap();
        assert_eq!(
            (
                grant.token,
                grant.attempt,
                grant.id.as_str(),
                grant.payload.as_slice()
            ),
            (1_839_152_330_281_984, 2, "order-42", &b"payload"[..])
        );
        assert_eq!(grant.pttl, Duration::from_millis(1500));
        assert!(Grant::parse(&[Value::Int(-1)]).is_err());
    }
}
