//! Map on Redis: one hash per map, all its keys under the map's hash tag `{ns:map:<name>}`.
//!
//! | key | holds |
//! | --- | --- |
//! | `{ns:map:<name>}` | hash: map key → write id (16 hex digits), version, `\n`, value |
//! | `{ns:map:<name>}:version` | the last version issued in this map (kept an hour) |
//! | `{ns:map:<name>}:w:<write id>` | a marker: what write `<write id>` did (kept a minute) |
//!
//! Every change is one script over one slot. Versions come from the per-map counter and never
//! fall below the server's clock in milliseconds × 1024 (as fencing tokens do, see the crate
//! docs), so they strictly increase per key, across a delete and re-create, and (on the
//! same assumptions about the servers' clocks) even after Redis lost its data.
//!
//! A change whose answer is lost is sent again as the very same call, with the same write id,
//! and the script answers a resend of a change it already applied with what that change did:
//! it finds its write id in the entry, or, when another change displaced the entry since, the
//! marker that change left for it. Markers are only left for entries younger than
//! [`MARKER_LIFE`] (the version tells their age), and by deletes, so a map whose entries
//! change rarely holds almost none. The connection replaces itself after a timeout or an
//! answer that was not its call's (see [`Conn::eval`](crate::conn::Conn::eval)).

use std::{sync::Arc, sync::LazyLock, time::Duration};

use async_trait::async_trait;
use redis::Script;
use sync_core::{Entry, Error, ErrorKind, Map, Result, Version};
use tokio::time::Instant;

use crate::{
    BACKEND,
    client::ClientInner,
    error::{outcome_unknown, redis_err, unexpected},
};

/// How long a marker lives: far longer than [`RESOLVE_WITHIN`], so clock rates and the age
/// estimate from a version never cut it short.
const MARKER_LIFE: Duration = Duration::from_secs(60);

/// How long after its first send a change may still be resolved by sending it again; a
/// resend's answer that it did not apply is trusted only within this time, while markers
/// surely exist.
const RESOLVE_WITHIN: Duration = Duration::from_secs(30);

/// How often a change whose answer is lost is sent in all.
const SENDS: u32 = 3;

/// Length of a write id (hex digits) at the head of an entry.
const WID_LEN: usize = 16;

/// Lua helpers of the map scripts. `KEYS[1]` is always the map's hash.
const MAP_LUA: &str = r#"
local function wid_of(e) return string.sub(e, 1, 16) end
local function version_of(e)
  local nl = string.find(e, '\n', 17, true)
  if not nl then error('not an entry of a sync map') end
  return string.sub(e, 17, nl - 1)
end
local function at(e) return e and version_of(e) or '0' end
local function floor_now()
  local t = redis.call('TIME')
  return (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) * 1024
end
-- Leaves a marker for the write of a displaced entry if its writer may still be resolving a
-- lost answer: the entry is younger than the marker life (its version is at least the clock
-- floor when it was written, so the age is never overestimated).
local function displaced(e, floor, life)
  if e and floor - tonumber(version_of(e)) < life * 1024 then
    redis.call('SET', KEYS[1] .. ':w:' .. wid_of(e), version_of(e), 'PX', life)
  end
end
"#;

/// Writes one key. KEYS: hash, version counter, this write's marker. ARGV: key, write id,
/// value, expected version ('' any, '0' absent), marker life ms. Returns `{1, version}` when
/// written (also for a resend of a write already applied), `{0, version or '0'}` on a
/// mismatch.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    crate::keys::script(
        "",
        &format!(
            "{MAP_LUA}{}",
            r#"
local e = redis.call('HGET', KEYS[1], ARGV[1])
if e and wid_of(e) == ARGV[2] then return {1, version_of(e)} end
local done = redis.call('GET', KEYS[3])
if done then return {1, done} end
if ARGV[4] ~= '' and at(e) ~= ARGV[4] then return {0, at(e)} end
local floor = floor_now()
local v = string.format('%.0f', math.max(tonumber(redis.call('GET', KEYS[2]) or '0') + 1, floor))
redis.call('SET', KEYS[2], v, 'PX', 3600000)
displaced(e, floor, tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. v .. '\n' .. ARGV[3])
return {1, v}
"#
        ),
    )
});

/// Deletes one key. KEYS: hash, this delete's marker. ARGV: key, expected version ('' any),
/// marker life ms. Returns `{1, version deleted}` (also for a resend of a delete already
/// applied), `{0, '0'}` when absent, `{-1, version or '0'}` on a mismatch.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    crate::keys::script(
        "",
        &format!(
            "{MAP_LUA}{}",
            r#"
local done = redis.call('GET', KEYS[2])
if done then return {1, done} end
local e = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and at(e) ~= ARGV[2] then return {-1, at(e)} end
if not e then return {0, '0'} end
local life = tonumber(ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
displaced(e, floor_now(), life)
redis.call('SET', KEYS[2], version_of(e), 'PX', life)
return {1, version_of(e)}
"#
        ),
    )
});

/// One entry's raw value. KEYS: hash. ARGV: key.
static READ_ONE: LazyLock<Script> = LazyLock::new(|| {
    crate::keys::script("no-writes", "return redis.call('HGET', KEYS[1], ARGV[1])")
});

/// Every entry, as key, raw value, key, raw value… KEYS: hash.
static READ_ALL: LazyLock<Script> =
    LazyLock::new(|| crate::keys::script("no-writes", "return redis.call('HGETALL', KEYS[1])"));

pub(crate) struct RedisMap {
    client: Arc<ClientInner>,
    name: String,
    /// The hash of the entries; also the hash tag of every key of this map.
    hash: String,
    /// The last version issued.
    counter: String,
}

/// One change sent through [`RedisMap::send`].
struct Change<'a> {
    what: &'static str,
    key: &'a str,
    script: &'a Script,
    keys: &'a [&'a str],
    args: &'a [&'a [u8]],
}

impl RedisMap {
    pub(crate) fn new(client: Arc<ClientInner>, name: &str) -> Self {
        let hash = client.keys.tag("map", name);
        RedisMap {
            counter: format!("{hash}:version"),
            hash,
            client,
            name: name.to_string(),
        }
    }

    fn marker(&self, wid: &str) -> String {
        format!("{}:w:{wid}", self.hash)
    }

    /// Conflict: the key is at `found` (0: absent), not at `expected` (None: absent).
    fn conflict(key: &str, expected: Option<Version>, found: Version) -> Error {
        let show = |v: Option<Version>| match v {
            None => "absent".to_string(),
            Some(v) => format!("at version {v}"),
        };
        let found = (found != 0).then_some(found);
        Error::new(
            ErrorKind::Conflict,
            format!(
                "expected the key {}, found it {}",
                show(expected),
                show(found)
            ),
        )
        .with_backend(BACKEND)
        .with_id(key)
    }

    /// Writes `value` if the key is as expected; the new version.
    async fn put(&self, key: &str, expect: Expect, value: &[u8]) -> Result<Version> {
        self.put_as(&write_id(), key, expect, value).await
    }

    /// [`put`](Self::put) with write id `wid`: a call with the same id is the same write.
    async fn put_as(&self, wid: &str, key: &str, expect: Expect, value: &[u8]) -> Result<Version> {
        self.client.check_alive()?;
        let marker = self.marker(wid);
        let (expected, life) = (expect.arg(), MARKER_LIFE.as_millis().to_string());
        let change = Change {
            what: match expect {
                Expect::Any => "writing",
                _ => "compare-and-swap",
            },
            key,
            script: &PUT,
            keys: &[&self.hash, &self.counter, &marker],
            args: &[
                key.as_bytes(),
                wid.as_bytes(),
                value,
                expected.as_bytes(),
                life.as_bytes(),
            ],
        };
        match self.send(&change).await? {
            (1, version) => Ok(version),
            (_, found) => Err(Self::conflict(key, expect.version(), found)),
        }
    }

    /// Deletes the key if it is as expected: true when deleted, false when absent.
    async fn remove(&self, key: &str, expect: Expect) -> Result<bool> {
        self.remove_as(&write_id(), key, expect).await
    }

    /// [`remove`](Self::remove) with write id `wid`: a call with the same id is the same
    /// delete.
    async fn remove_as(&self, wid: &str, key: &str, expect: Expect) -> Result<bool> {
        self.client.check_alive()?;
        let marker = self.marker(wid);
        let (expected, life) = (expect.arg(), MARKER_LIFE.as_millis().to_string());
        let change = Change {
            what: match expect {
                Expect::Any => "deleting",
                _ => "compare-and-delete",
            },
            key,
            script: &DELETE,
            keys: &[&self.hash, &marker],
            args: &[key.as_bytes(), expected.as_bytes(), life.as_bytes()],
        };
        match self.send(&change).await? {
            (1, _) => Ok(true),
            (0, _) => Ok(false),
            (_, found) => Err(Self::conflict(key, expect.version(), found)),
        }
    }

    /// Runs a change's script; its answer is `{status, version}`, status 1 when applied.
    ///
    /// When the answer is lost (the call may have applied), the same call goes again: the
    /// script answers a resend of a change it applied with what it did, so a resend never
    /// applies twice. A resend's answer that it did not apply proves the first send did not
    /// either only within [`RESOLVE_WITHIN`] of it, while any marker it left surely exists;
    /// later, or after [`SENDS`] sends, the outcome is unknown and the error says so.
    async fn send(&self, change: &Change<'_>) -> Result<(i64, Version)> {
        let first = Instant::now();
        let mut sends = 0;
        loop {
            sends += 1;
            let sent = self
                .client
                .conn
                .eval(change.script, change.keys, change.args);
            match sent.await {
                Ok((status, version)) => {
                    let version: String = version;
                    let parsed = parse_version(&version)
                        .ok_or_else(|| unexpected(change.what, format!("version {version:?}")))?;
                    if sends > 1 && status != 1 && first.elapsed() >= RESOLVE_WITHIN {
                        return Err(self.unknown(change));
                    }
                    return Ok((status, parsed));
                }
                Err(e)
                    if outcome_unknown(&e)
                        && sends < SENDS
                        && first.elapsed() < RESOLVE_WITHIN
                        && self.client.may_resend(first) =>
                {
                    tracing::warn!(backend = BACKEND, map = %self.name, id = change.key, error = %e, "{} unanswered; sending it again to learn whether it applied", change.what);
                }
                // After a send whose outcome was unknown, a later error reply settles nothing.
                Err(e) if outcome_unknown(&e) || sends > 1 => {
                    let what = format!("{} (whether it applied is unknown)", change.what);
                    return Err(redis_err(what, e).with_id(change.key));
                }
                Err(e) => return Err(redis_err(change.what, e).with_id(change.key)),
            }
        }
    }

    /// Runs a read-only script, once more if the connection dropped under it or its answer
    /// was lost: a read changes nothing.
    async fn look<T: redis::FromRedisValue>(
        &self,
        what: &str,
        id: &str,
        script: &Script,
        args: &[&[u8]],
    ) -> Result<T> {
        let keys = [self.hash.as_str()];
        match self.client.conn.eval(script, &keys, args).await {
            Err(e) if outcome_unknown(&e) => self.client.conn.eval(script, &keys, args).await,
            other => other,
        }
        .map_err(|e| redis_err(what, e).with_id(id))
    }

    /// Unavailable: a resend answered too late to prove that the first send did not apply.
    fn unknown(&self, change: &Change<'_>) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "{}: the answer was lost and the resend answered after {RESOLVE_WITHIN:?}; \
                 whether it applied is unknown",
                change.what
            ),
        )
        .with_backend(BACKEND)
        .with_id(change.key)
    }
}

/// What a change expects of the key.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Any,
    Absent,
    At(Version),
}

impl Expect {
    /// As the scripts take it: `''` any, `'0'` absent (no version is 0), else the version.
    fn arg(self) -> String {
        match self {
            Expect::Any => String::new(),
            Expect::Absent => "0".to_string(),
            Expect::At(v) => v.to_string(),
        }
    }

    /// The version expected, for a Conflict's message (None: absent).
    fn version(self) -> Option<Version> {
        match self {
            Expect::At(v) => Some(v),
            _ => None,
        }
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive, map and key.
#[async_trait]
impl Map for RedisMap {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&self, key: &str) -> Result<Option<Entry>> {
        self.client.check_alive()?;
        let raw: Option<Vec<u8>> = self
            .look("reading", key, &READ_ONE, &[key.as_bytes()])
            .await?;
        raw.map(|raw| parse_entry(key, &raw)).transpose()
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
            // No key is ever at version 0 (and "0" means absent to the script).
            Some(0) => return Err(Self::conflict(key, expected, 0)),
            Some(v) => Expect::At(v),
        };
        self.put(key, expect, value).await
    }

    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        // No key is ever at version 0 (and "0" means absent to the script).
        if expected == 0 {
            return Err(Self::conflict(key, Some(expected), 0));
        }
        self.remove(key, Expect::At(expected)).await.map(|_| ())
    }

    /// One HGETALL: a consistent snapshot of the whole map in one reply, so a map is meant to
    /// stay small enough to be read at once (its values are at most
    /// [`MAX_VALUE_LEN`](sync_core::MAX_VALUE_LEN) each; the reply holds them all).
    async fn entries(&self) -> Result<Vec<Entry>> {
        self.client.check_alive()?;
        let raw: Vec<(String, Vec<u8>)> = self.look("listing", &self.name, &READ_ALL, &[]).await?;
        let mut out = raw
            .iter()
            .map(|(key, raw)| parse_entry(key, raw))
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// A fresh write id: 64 random bits as 16 hex digits. (A v4 uuid's fixed version and variant
/// bits lie at different places in its two halves, so their xor is all random.)
fn write_id() -> String {
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{:016x}", hi ^ lo)
}

fn parse_version(text: &str) -> Option<Version> {
    text.parse().ok()
}

/// An entry as stored: write id, version, `\n`, value.
fn parse_entry(key: &str, raw: &[u8]) -> Result<Entry> {
    let bad = || unexpected("reading", format!("{key:?} is not an entry of a sync map"));
    let rest = raw.get(WID_LEN..).ok_or_else(bad)?;
    let nl = rest.iter().position(|b| *b == b'\n').ok_or_else(bad)?;
    let version = std::str::from_utf8(&rest[..nl])
        .ok()
        .and_then(parse_version)
        .filter(|v| *v != 0)
        .ok_or_else(bad)?;
    Ok(Entry::new(key, rest[nl + 1..].to_vec(), version))
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::{Client, Config};

    #[test]
    fn entries_parse() {
        let e = parse_entry("k", b"0123456789abcdef1777\nva\nlue").unwrap();
        assert_eq!((e.version, e.value.as_slice()), (1777, &b"va\nlue"[..]));
        let empty = parse_entry("k", b"0123456789abcdef5\n").unwrap();
        assert_eq!((empty.version, empty.value.len()), (5, 0));
        assert!(parse_entry("k", b"short").is_err());
        assert!(parse_entry("k", b"0123456789abcdef0\nx").is_err());
    }

    #[test]
    fn write_ids_are_hex_of_fixed_length() {
        let (a, b) = (write_id(), write_id());
        assert_eq!(a.len(), WID_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    /// A map on the Redis of `SYNC_TEST_REDIS` in a fresh namespace; None (skipped) without
    /// it, unless `SYNC_REQUIRE_LIVE=1`.
    async fn live(name: &str) -> Option<RedisMap> {
        let Ok(url) = std::env::var("SYNC_TEST_REDIS") else {
            let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "SYNC_REQUIRE_LIVE=1 but SYNC_TEST_REDIS is not set"
            );
            eprintln!("skipped: SYNC_TEST_REDIS is not set");
            return None;
        };
        let namespace = format!("unit-{}", uuid::Uuid::new_v4().simple());
        let config = Config::from_url(&url).unwrap().with_namespace(namespace);
        let client = Client::connect(config).await.unwrap();
        Some(RedisMap::new(client.inner.clone(), name))
    }

    async fn now(map: &RedisMap, key: &str) -> (Vec<u8>, Version) {
        let e = map.read(key).await.unwrap().unwrap();
        (e.value, e.version)
    }

    /// A resend (same write id) answers what the first send did, whether its entry still
    /// stands or another change displaced it since, and never applies twice.
    #[tokio::test]
    async fn resends_answer_what_the_first_send_did() -> Result<()> {
        let Some(map) = live("resend").await else {
            return Ok(());
        };
        let w = write_id();
        let v1 = map.put_as(&w, "k", Expect::Any, b"a").await?;
        assert_eq!(map.put_as(&w, "k", Expect::Any, b"a").await?, v1);
        let v2 = map.write("k", b"b").await?;
        assert!(v2 > v1);
        assert_eq!(map.put_as(&w, "k", Expect::Any, b"a").await?, v1);
        assert_eq!(now(&map, "k").await, (b"b".to_vec(), v2));

        let w = write_id();
        let v3 = map.put_as(&w, "k", Expect::At(v2), b"c").await?;
        let v4 = map.write("k", b"d").await?;
        assert_eq!(map.put_as(&w, "k", Expect::At(v2), b"c").await?, v3);
        assert_eq!(now(&map, "k").await, (b"d".to_vec(), v4));

        let w = write_id();
        assert!(map.remove_as(&w, "k", Expect::At(v4)).await?);
        let v5 = map.compare_and_swap("k", None, b"e").await?;
        assert!(v5 > v4, "a re-created key's version {v5} is not above {v4}");
        assert!(map.remove_as(&w, "k", Expect::At(v4)).await?);
        assert_eq!(now(&map, "k").await, (b"e".to_vec(), v5));

        let w = write_id();
        assert!(map.remove_as(&w, "k", Expect::Any).await?);
        map.write("k", b"f").await?;
        assert!(map.remove_as(&w, "k", Expect::Any).await?);
        assert_eq!(now(&map, "k").await.0, b"f");
        map.delete("k").await?;
        Ok(())
    }

    /// Versions lie above the server clock's floor; a displaced young entry leaves a marker
    /// for a minute, an old one none.
    #[tokio::test]
    async fn markers_only_for_young_entries() -> Result<()> {
        let Some(map) = live("markers").await else {
            return Ok(());
        };
        let conn = &map.client.conn;
        let exists = |key: String| async move {
            conn.query::<i64>(redis::cmd("EXISTS").arg(key))
                .await
                .unwrap()
                == 1
        };
        let old = write_id();
        let entry = format!("{old}1024\nx");
        let hset = redis::cmd("HSET")
            .arg(&map.hash)
            .arg("k")
            .arg(entry)
            .clone();
        conn.query::<i64>(&hset).await.unwrap();
        let v = map.write("k", b"y").await?;
        assert!(
            !exists(map.marker(&old)).await,
            "an old entry left a marker"
        );

        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            (v / 1024).abs_diff(ms) < 60_000,
            "version {v} is not near {ms} ms × 1024"
        );
        let raw: Vec<u8> = conn
            .query(redis::cmd("HGET").arg(&map.hash).arg("k"))
            .await
            .unwrap();
        let young = String::from_utf8(raw[..WID_LEN].to_vec()).unwrap();
        map.delete("k").await?;
        assert!(
            exists(map.marker(&young)).await,
            "a young entry left no marker"
        );
        let ttl: i64 = conn
            .query(redis::cmd("PTTL").arg(map.marker(&young)))
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= MARKER_LIFE.as_millis() as i64,
            "marker ttl {ttl}"
        );
        Ok(())
    }
}
