//! Key layout and the Lua scripts that hold the lock protocol.
//!
//! Every key of one primitive instance shares the hash tag `{<ns>:<kind>:<id>}`, so each script
//! touches one slot and the same code runs on a server and on a Redis Cluster.

use std::sync::LazyLock;

use redis::Script;
use sync_core::id::escape;

/// Length of an owner id: 32 hex digits of the client's uuid and 8 of a sequence number. A
/// held key's value starts with its owner's id; scripts check ownership by comparing them.
pub(crate) const OWNER_LEN: usize = 40;

/// The keys of one lock (or election group).
#[derive(Clone, Debug)]
pub(crate) struct HeldKeys {
    /// The key whose value is `owner token \n payload`, with the TTL.
    pub(crate) key: String,
    /// The last fencing token issued for this id.
    pub(crate) fence: String,
    /// Where releases (and, for elections, every change) are published.
    pub(crate) channel: String,
}

/// Builds the keys of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    ns: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Keys {
        Keys {
            ns: escape(namespace).into_owned(),
        }
    }

    /// `{<ns>:<kind>:<escaped id>}`: escaped ids and namespaces hold neither `{` nor `}` nor
    /// `:`, so two different ids never share a tag.
    pub(crate) fn tag(&self, kind: &str, id: &str) -> String {
        format!("{{{}:{kind}:{}}}", self.ns, escape(id))
    }

    pub(crate) fn lock(&self, id: &str) -> HeldKeys {
        self.held(self.tag("lock", id))
    }

    pub(crate) fn leader(&self, group: &str) -> HeldKeys {
        self.held(self.tag("leader", group))
    }

    fn held(&self, tag: String) -> HeldKeys {
        HeldKeys {
            fence: format!("{tag}:fence"),
            channel: format!("{tag}:changed"),
            key: tag,
        }
    }
}

/// A script of this crate: `body` runs as a function, and its answer comes back behind the
/// nonce [`Conn::eval`](crate::conn::Conn::eval) adds as the last argument (taken off ARGV
/// before `body` runs), so a caller can tell its own answer from another request's. `flags`
/// go on the shebang line (`""` for none).
pub(crate) fn script(flags: &str, body: &str) -> Script {
    let shebang = if flags.is_empty() {
        String::new()
    } else {
        format!("#!lua flags={flags}\n")
    };
    Script::new(&format!(
        "{shebang}local nonce = table.remove(ARGV)\nlocal function body()\n{body}\nend\nreturn {{nonce, body()}}\n"
    ))
}

/// Lua helpers shared by the scripts: the owner check on a held value.
pub(crate) const OWNS: &str = r#"
local function owns(v, owner)
  return v and string.sub(v, 1, #owner) == owner
end
local function token_of(v)
  return tonumber(string.sub(v, 41, string.find(v, '\n', 41, true) - 1))
end
"#;

/// Grants the key to the owner if it is free. KEYS: key, fence. ARGV: owner, ttl ms, payload,
/// channel to publish a grant on ('' for none). Returns `{1, token}` when granted (also when
/// this owner already holds it: a resent grant is answered, not repeated), else `{0, pttl,
/// value}`.
///
/// The token is above both the last one issued (the fence key) and a floor from the server's
/// clock, milliseconds × 1024: if Redis lost its data (a restart without persistence, a
/// failover to a replica that lagged), the fence key is gone too, and the floor still lies
/// above every token issued before, provided the clock of the server granting now is not
/// behind the one that granted then and no id was granted over 1024 times in a millisecond.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        "",
        &format!(
            "{OWNS}{}",
            r#"
local v = redis.call('GET', KEYS[1])
if v then
  if owns(v, ARGV[1]) then return {1, token_of(v)} end
  return {0, redis.call('PTTL', KEYS[1]), v}
end
local now = redis.call('TIME')
local floor = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1024
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = math.max(last + 1, floor)
local text = string.format('%.0f', token)
redis.call('SET', KEYS[2], text, 'PX', 3600000)
redis.call('SET', KEYS[1], ARGV[1] .. text .. '\n' .. ARGV[3], 'PX', ARGV[2])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], 'granted') end
return {1, token}
"#
        ),
    )
});

/// Deletes the key if the owner holds it and publishes the release. KEYS: key. ARGV: owner,
/// channel. Returns 1 if it was held (and is now deleted), 0 if the key is gone, -1 if another
/// owner holds it.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        "",
        &format!(
            "{OWNS}{}",
            r#"
local v = redis.call('GET', KEYS[1])
if owns(v, ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
  return 1
end
if v then return -1 end
return 0
"#
        ),
    )
});

/// Renews every held key of one node in one call. KEYS: the first of them (what routes the
/// call). ARGV: ttl ms, then each key and its owner. Returns the (1-based) positions of the
/// keys no longer held by their owner. Only the first key is declared: a Redis Cluster refuses
/// declared keys of several slots, but lets a script flagged `allow-cross-slot-keys` (Redis 7)
/// touch keys of any slot its node serves.
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        "allow-cross-slot-keys",
        &format!(
            "{OWNS}{}",
            r#"
local gone = {}
for i = 2, #ARGV, 2 do
  local key, owner = ARGV[i], ARGV[i + 1]
  if owns(redis.call('GET', key), owner) then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    gone[#gone + 1] = i / 2
  end
end
return gone
"#
        ),
    )
});

/// Replaces the payload of a held key, keeping its TTL, and publishes the change. KEYS: key.
/// ARGV: owner, payload, channel. Returns 1 if it was held.
pub(crate) static PROCLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        "",
        &format!(
            "{OWNS}{}",
            r#"
local v = redis.call('GET', KEYS[1])
if owns(v, ARGV[1]) then
  local head = string.sub(v, 1, string.find(v, '\n', 41, true))
  redis.call('SET', KEYS[1], head .. ARGV[2], 'KEEPTTL')
  redis.call('PUBLISH', ARGV[3], 'proclaimed')
  return 1
end
return 0
"#
        ),
    )
});

/// A held value, parsed: `owner token \n payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeldValue {
    pub(crate) owner: String,
    pub(crate) token: u64,
    pub(crate) payload: Vec<u8>,
}

impl HeldValue {
    pub(crate) fn parse(v: &[u8]) -> Option<HeldValue> {
        let owner = std::str::from_utf8(v.get(..OWNER_LEN)?).ok()?.to_string();
        let rest = &v[OWNER_LEN..];
        let nl = rest.iter().position(|b| *b == b'\n')?;
        let token = std::str::from_utf8(&rest[..nl]).ok()?.parse().ok()?;
        Some(HeldValue {
            owner,
            token,
            payload: rest[nl + 1..].to_vec(),
        })
    }
}

/// The hash slot of a key (CRC16/XMODEM of its hash tag, mod 16384), as Redis Cluster
/// computes it.
pub(crate) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|b| *b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("123456789"), 0x31C3);
        assert_eq!(slot("{}x"), slot("{}x"));
    }

    #[test]
    fn distinct_ids_get_distinct_tags() {
        let keys = Keys::new("n{s}");
        let tags: Vec<String> = ["a", "a:b", "a}", "{a", "a/b"]
            .iter()
            .map(|id| keys.tag("lock", id))
            .collect();
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(t.matches('{').count(), 1, "{t}");
            assert_eq!(t.matches('}').count(), 1, "{t}");
            assert!(!tags[..i].contains(t), "{t}");
        }
    }

    #[test]
    fn values_parse() {
        let v = format!("{}12345\nleader-a", "o".repeat(OWNER_LEN));
        let held = HeldValue::parse(v.as_bytes()).unwrap();
        assert_eq!(
            (held.token, held.payload.as_slice()),
            (12345, &b"leader-a"[..])
        );
        assert!(HeldValue::parse(b"short").is_none());
    }
}
