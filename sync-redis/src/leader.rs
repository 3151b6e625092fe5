//! Leader election on Redis: the lock mechanism on the group's key, whose payload is the
//! candidate and its value; the term is the fencing token. Every grant, proclamation and
//! resignation is published on the group's channel, which `follow` listens to.

use std::{
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use redis::Script;
use sync_core::raw::Leadership;
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, FollowStream, Leader, LeaderInfo, LossSignal, Result,
};
use sync_kit::follow::{Follow, Next};
use sync_kit::locked;

use crate::{
    BACKEND,
    client::ClientInner,
    contend::{Contender, Grant, release},
    error::redis_err,
    keys::{HeldKeys, HeldValue, PROCLAIM},
};

/// The leader's value and its key's remaining TTL in one read.
static READ: LazyLock<Script> = LazyLock::new(|| {
    crate::keys::script(
        "no-writes",
        "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}",
    )
});

/// The payload of a leader key: the escaped candidate (no newline), a newline, the value.
fn encode(candidate: &str, value: &[u8]) -> Vec<u8> {
    let mut out = sync_core::id::escape(candidate).into_owned().into_bytes();
    out.push(b'\n');
    out.extend_from_slice(value);
    out
}

fn decode(held: HeldValue) -> Option<LeaderInfo> {
    let nl = held.payload.iter().position(|b| *b == b'\n')?;
    let candidate = sync_core::id::unescape(std::str::from_utf8(&held.payload[..nl]).ok()?)?;
    Some(LeaderInfo::new(
        candidate,
        held.token,
        held.payload[nl + 1..].to_vec(),
    ))
}

pub(crate) struct RedisLeader {
    client: Arc<ClientInner>,
    group: String,
    keys: HeldKeys,
}

impl RedisLeader {
    pub(crate) fn new(client: Arc<ClientInner>, group: &str) -> Self {
        RedisLeader {
            keys: client.keys.leader(group),
            client,
            group: group.to_string(),
        }
    }
}

/// Campaigns until elected (or `wait` passes).
async fn campaign(
    client: &Arc<ClientInner>,
    group: &str,
    keys: &HeldKeys,
    candidate: &str,
    value: &[u8],
    wait: Option<Duration>,
) -> Result<Grant> {
    let payload = encode(candidate, value);
    Contender {
        client,
        keys,
        payload: &payload,
        announce: true,
    }
    .wait(&format!("election {group:?}"), wait)
    .await
    .map_err(|e| e.with_id(group))
}

/// The current leader and how long until its key expires unless renewed.
async fn read_leader(
    client: &ClientInner,
    keys: &HeldKeys,
) -> Result<(Option<LeaderInfo>, Option<Duration>)> {
    let (value, pttl): (Option<Vec<u8>>, i64) = client
        .conn
        .eval(&READ, &[&keys.key], &[])
        .await
        .map_err(|e| redis_err("reading the leader", e))?;
    let info = value.as_deref().and_then(HeldValue::parse).and_then(decode);
    Ok((info, u64::try_from(pttl).ok().map(Duration::from_millis)))
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and group.
#[async_trait]
impl Leader for RedisLeader {
    fn group(&self) -> &str {
        &self.group
    }

    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected> {
        let grant = campaign(
            &self.client,
            &self.group,
            &self.keys,
            candidate,
            &opts.value,
            opts.wait,
        )
        .await?;
        tracing::debug!(backend = BACKEND, group = %self.group, candidate, term = grant.token, "elected");
        Ok(Elected::new(
            candidate,
            grant.token,
            grant.lost.clone(),
            Box::new(RedisLeadership {
                client: self.client.clone(),
                group: self.group.clone(),
                keys: self.keys.clone(),
                candidate: candidate.to_string(),
                value: Mutex::new(opts.value),
                grant: Some(grant),
            }),
        ))
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.client.check_alive()?;
        Ok(read_leader(&self.client, &self.keys)
            .await
            .map_err(|e| e.with_id(&self.group))?
            .0)
    }

    async fn follow(&self) -> Result<FollowStream> {
        self.client.check_alive()?;
        let mut sub = self.client.hub.subscribe(&self.keys.channel).await;
        sub.mark();
        let (first, expires) = read_leader(&self.client, &self.keys).await?;
        let (follow, stream) = Follow::open(first);
        let follower = Follower {
            client: self.client.clone(),
            keys: self.keys.clone(),
            follow,
        };
        tokio::spawn(follower.run(sub, expires));
        Ok(stream)
    }
}

struct Follower {
    client: Arc<ClientInner>,
    keys: HeldKeys,
    follow: Follow,
}

impl Follower {
    /// On every message on the group's channel (and at the leader key's expiry, and on the
    /// safety-net poll) re-reads the leader and reports it if it changed. Ends when the stream
    /// is dropped, the client killed, or a read refused for good.
    async fn run(mut self, mut sub: crate::hub::Subscription, mut expires: Option<Duration>) {
        let mut killed = self.client.killed();
        loop {
            let poll = self.client.config.poll;
            let nap = expires.map_or(poll, |e| (e + Duration::from_millis(1)).min(poll));
            tokio::select! {
                () = sub.changed() => {}
                () = tokio::time::sleep(nap) => {}
                () = self.follow.closed() => return,
                _ = killed.wait_for(|k| *k) => return,
            }
            sub.mark();
            let read = read_leader(&self.client, &self.keys).await;
            if let Ok((_, at)) = &read {
                expires = *at;
            }
            match self.follow.report(read.map(|(info, _)| info)).await {
                Next::Wait => {}
                Next::Retry => expires = Some(Duration::from_millis(500)),
                Next::Stop => return,
            }
        }
    }
}

struct RedisLeadership {
    client: Arc<ClientInner>,
    group: String,
    keys: HeldKeys,
    candidate: String,
    value: Mutex<Vec<u8>>,
    grant: Option<Grant>,
}

impl RedisLeadership {
    fn lost(&self, why: &str) -> Error {
        Error::new(ErrorKind::LockLost, why.to_string())
            .with_backend(BACKEND)
            .with_id(&self.group)
    }
}

#[async_trait]
impl Leadership for RedisLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let grant = self
            .grant
            .as_ref()
            .ok_or_else(|| self.lost("this leadership was resigned"))?;
        let payload = encode(&self.candidate, value);
        let args: [&[u8]; 3] = [
            grant.owner.as_bytes(),
            &payload,
            self.keys.channel.as_bytes(),
        ];
        let held: i64 = self
            .client
            .conn
            .eval(&PROCLAIM, &[&self.keys.key], &args)
            .await
            .map_err(|e| redis_err("proclaiming", e).with_id(&self.group))?;
        if held != 1 {
            return Err(self.lost("leadership was lost: the key expired or redis lost it"));
        }
        *locked(&self.value) = value.to_vec();
        Ok(())
    }

    async fn resign(&mut self) -> Result<()> {
        let Some(grant) = self.grant.take() else {
            return Ok(());
        };
        let safe = !grant.lost.is_lost();
        self.client.renewals.forget(grant.registration);
        let held = release(&self.client, &self.keys, &grant.owner, safe)
            .await
            .map_err(|e| e.with_id(&self.group))?;
        if held {
            Ok(())
        } else {
            Err(self.lost("leadership was already lost at resignation"))
        }
    }

    fn resign_in_background(mut self: Box<Self>) {
        let Some(grant) = self.grant.take() else {
            return;
        };
        let safe = !grant.lost.is_lost();
        self.client.renewals.forget(grant.registration);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = release(&self.client, &self.keys, &grant.owner, safe).await;
        });
    }

    async fn reelect(&mut self) -> Result<(u64, LossSignal)> {
        if let Some(g) = self.grant.as_ref().filter(|g| !g.lost.is_lost()) {
            return Ok((g.token, g.lost.clone()));
        }
        if let Some(old) = self.grant.take() {
            self.client.renewals.forget(old.registration);
            let _ = release(&self.client, &self.keys, &old.owner, false).await;
        }
        let value = locked(&self.value).clone();
        let grant = campaign(
            &self.client,
            &self.group,
            &self.keys,
            &self.candidate,
            &value,
            None,
        )
        .await?;
        let out = (grant.token, grant.lost.clone());
        self.grant = Some(grant);
        Ok(out)
    }
}
