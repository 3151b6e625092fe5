//! Taking a held key (a lock or a leadership) and giving it back: the grant script, the wait on
//! the release channel, and the background clean-up of a grant whose answer never came.

use std::{sync::Arc, time::Duration};

use sync_core::{Error, ErrorKind, LossSignal, Result};
use tokio::time::Instant;

use crate::{
    BACKEND,
    client::ClientInner,
    error::{outcome_unknown, redis_err, unexpected},
    keys::{ACQUIRE, HeldKeys, RELEASE},
};

/// A granted key, registered with the renewer.
pub(crate) struct Grant {
    pub(crate) owner: String,
    pub(crate) token: u64,
    pub(crate) registration: u64,
    pub(crate) lost: LossSignal,
}

/// Someone else holds the key.
pub(crate) struct Busy {
    /// Until the holder's key expires unless renewed (None: it has no expiry).
    pub(crate) expires_in: Option<Duration>,
}

/// One contender for one key.
pub(crate) struct Contender<'a> {
    pub(crate) client: &'a Arc<ClientInner>,
    pub(crate) keys: &'a HeldKeys,
    pub(crate) payload: &'a [u8],
    /// Publish the grant on the channel (elections: followers learn of a new leader).
    pub(crate) announce: bool,
}

/// How often a grant whose answer was lost is sent again before giving up.
const RESENDS: usize = 3;

impl Contender<'_> {
    /// Tries once, under an owner id of its own. A grant whose answer is lost is sent again
    /// (the script answers a resend by its owner with the grant it made); if no answer comes,
    /// the key is deleted in the background in case it was granted, and the error returned.
    /// A later try has another owner id, so that clean-up can never delete its grant.
    pub(crate) async fn try_once(&self) -> Result<std::result::Result<Grant, Busy>> {
        self.client.check_alive()?;
        let owner = self.client.owner();
        let sent = Instant::now();
        let mut cleanup = Cleanup::armed(self.client, self.keys, &owner);
        let mut resends = 0;
        // Once a send's outcome is unknown, the grant may exist whatever later sends say.
        let mut ambiguous = false;
        let reply: redis::Value = loop {
            let ttl_ms = self.client.config.ttl.as_millis().to_string();
            let channel = if self.announce {
                self.keys.channel.as_str()
            } else {
                ""
            };
            let args: [&[u8]; 4] = [
                owner.as_bytes(),
                ttl_ms.as_bytes(),
                self.payload,
                channel.as_bytes(),
            ];
            match self
                .client
                .conn
                .eval(&ACQUIRE, &[&self.keys.key, &self.keys.fence], &args)
                .await
            {
                Ok(v) => break v,
                Err(e)
                    if outcome_unknown(&e) && resends < RESENDS && self.client.may_resend(sent) =>
                {
                    resends += 1;
                    ambiguous = true;
                    tracing::debug!(backend = BACKEND, error = %e, "grant unanswered, sending again");
                }
                Err(e) => {
                    ambiguous |= outcome_unknown(&e);
                    if !ambiguous {
                        cleanup.disarm();
                    }
                    let what = if ambiguous {
                        "taking the key (it may have been granted; it is being released)"
                    } else {
                        "taking the key"
                    };
                    return Err(redis_err(what, e));
                }
            }
        };
        cleanup.disarm();
        self.parse(reply, owner, sent)
    }

    fn parse(
        &self,
        reply: redis::Value,
        owner: String,
        sent: Instant,
    ) -> Result<std::result::Result<Grant, Busy>> {
        use redis::Value::{Array, Int};
        let bad = |v: &redis::Value| unexpected("taking the key", format!("{v:?}"));
        let Array(items) = &reply else {
            return Err(bad(&reply));
        };
        match items.as_slice() {
            [Int(1), Int(token)] => {
                let (registration, lost) =
                    self.client
                        .renewals
                        .register(&self.keys.key, &owner, &self.keys.channel, sent);
                Ok(Ok(Grant {
                    owner,
                    token: *token as u64,
                    registration,
                    lost,
                }))
            }
            [Int(0), Int(pttl), ..] => Ok(Err(Busy {
                expires_in: u64::try_from(*pttl).ok().map(Duration::from_millis),
            })),
            _ => Err(bad(&reply)),
        }
    }

    /// Waits until granted: tries, subscribes to the release channel, tries again, then waits
    /// for a release, the holder's expiry, or the safety-net poll, and tries again. `wait`
    /// bounds it (Timeout).
    pub(crate) async fn wait(&self, what: &str, wait: Option<Duration>) -> Result<Grant> {
        let started = Instant::now();
        let deadline = wait.map(sync_kit::deadline);
        // Behind other local contenders for this key: they talk to Redis, this one waits.
        let turn = self.client.turns.take(&self.keys.key);
        let never = sync_kit::deadline(Duration::MAX);
        let _turn = tokio::select! {
            turn = turn => turn,
            () = tokio::time::sleep_until(deadline.unwrap_or(never)) => {
                return Err(timed_out(what, started));
            }
        };
        if let Ok(grant) = self.try_once().await? {
            return Ok(grant);
        }
        let subscribing = self.client.hub.subscribe(&self.keys.channel);
        let mut sub = tokio::select! {
            sub = subscribing => sub,
            () = tokio::time::sleep_until(deadline.unwrap_or(never)) => {
                return Err(timed_out(what, started));
            }
        };
        let mut killed = self.client.killed();
        let mut outage = Backoff::default();
        loop {
            sub.mark();
            let nap = match self.try_once().await {
                Ok(Ok(grant)) => return Ok(grant),
                Ok(Err(busy)) => {
                    outage = Backoff::default();
                    self.nap(&busy, sub.confirmed)
                }
                // A waiter rides out an outage: it keeps waiting, within its bound.
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    tracing::debug!(backend = BACKEND, error = %e, "waiting through an outage");
                    outage.next()
                }
                Err(e) => return Err(e),
            };
            tokio::select! {
                () = sub.changed() => {}
                () = tokio::time::sleep(nap) => {}
                () = tokio::time::sleep_until(deadline.unwrap_or(never)) => {
                    return Err(timed_out(what, started));
                }
                _ = killed.wait_for(|k| *k) => return Err(crate::error::closed()),
            }
        }
    }

    /// How long to wait for a release before trying again: until the holder's key expires
    /// (Redis frees it then; a dead holder publishes nothing), at most the safety-net poll, and
    /// a short poll while the subscription is not confirmed.
    fn nap(&self, busy: &Busy, subscribed: bool) -> Duration {
        let poll = if subscribed {
            self.client.config.poll
        } else {
            Duration::from_millis(250)
        };
        busy.expires_in
            .map_or(poll, |e| (e + Duration::from_millis(1)).min(poll))
    }
}

fn timed_out(what: &str, started: Instant) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("{what} still held by another after {:?}", started.elapsed()),
    )
    .with_backend(BACKEND)
}

/// Pauses between tries while the server is unreachable: 100 ms doubling to 2 s.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        now
    }
}

/// Gives back a held key: deletes it if this owner still holds it and publishes the release.
/// True if it was held. `safe`: the holder had not lost it when it began releasing. A key found
/// gone counts as released when `safe` and the release may have been sent twice (a resend here,
/// or the cluster client's own retry): only this owner could have deleted it before its loss.
pub(crate) async fn release(
    client: &ClientInner,
    keys: &HeldKeys,
    owner: &str,
    safe: bool,
) -> Result<bool> {
    let mut resent = false;
    loop {
        let args: [&[u8]; 2] = [owner.as_bytes(), keys.channel.as_bytes()];
        match client.conn.eval::<i64>(&RELEASE, &[&keys.key], &args).await {
            Ok(1) => return Ok(true),
            Ok(0) => return Ok(safe && (resent || client.conn.is_cluster())),
            Ok(_) => return Ok(false),
            Err(e) if outcome_unknown(&e) && !resent => resent = true,
            Err(e) => return Err(redis_err("releasing the key", e)),
        }
    }
}

/// Deletes, in the background, a key a grant may have taken when its answer never came (or the
/// caller stopped waiting for it): otherwise it would stay held until its TTL ran out.
struct Cleanup {
    job: Option<(Arc<ClientInner>, HeldKeys, String)>,
}

impl Cleanup {
    fn armed(client: &Arc<ClientInner>, keys: &HeldKeys, owner: &str) -> Cleanup {
        Cleanup {
            job: Some((client.clone(), keys.clone(), owner.to_string())),
        }
    }

    fn disarm(&mut self) {
        self.job = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some((client, keys, owner)) = self.job.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let args: [&[u8]; 2] = [owner.as_bytes(), keys.channel.as_bytes()];
            // Each try is owner-checked: sending it again is harmless. The key expires anyway.
            for _ in 0..5 {
                if client.is_killed() {
                    return;
                }
                if client
                    .conn
                    .eval::<i64>(&RELEASE, &[&keys.key], &args)
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}
