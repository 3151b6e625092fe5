//! Lock on Redis: one key per id, granted by a script with `SET NX PX` semantics and a fencing
//! counter, renewed by the client's renewer, released by an owner-checked delete that
//! publishes the release to the waiters.

use std::sync::Arc;

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, Result};
use sync_kit::held::{HeldGrants, Slot};

use crate::{
    BACKEND,
    client::ClientInner,
    contend::{Contender, Grant, release},
    error::redis_err,
    keys::HeldKeys,
};

pub(crate) struct RedisLock {
    client: Arc<ClientInner>,
    mine: HeldGrants<Grant>,
}

impl RedisLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        RedisLock {
            client,
            mine: Default::default(),
        }
    }

    fn contender<'a>(&'a self, keys: &'a HeldKeys) -> Contender<'a> {
        Contender {
            client: &self.client,
            keys,
            payload: b"",
            announce: false,
        }
    }

    fn guard(&self, id: &str, keys: HeldKeys, grant: Grant) -> LockGuard {
        let (token, lost) = (grant.token, grant.lost.clone());
        let slot = self.mine.insert(id, grant);
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        LockGuard::new(
            id,
            token,
            lost,
            Box::new(RedisHeld {
                client: self.client.clone(),
                mine: self.mine.clone(),
                keys,
                slot,
            }),
        )
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and id.
#[async_trait]
impl Lock for RedisLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let keys = self.client.keys.lock(id);
        let grant = self
            .contender(&keys)
            .wait(&format!("lock {id:?}"), opts.wait)
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(self.guard(id, keys, grant))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let keys = self.client.keys.lock(id);
        let tried = self
            .contender(&keys)
            .try_once()
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(tried.ok().map(|grant| self.guard(id, keys, grant)))
    }

    /// The holding client's id (the first 32 characters of the owner written in the key), the
    /// fencing token, and how long the key lives unless renewed.
    async fn holder(&self, id: &str) -> Result<Option<String>> {
        self.client.check_alive()?;
        let keys = self.client.keys.lock(id);
        let conn = &self.client.conn;
        let read = |e| redis_err("reading the holder", e).with_id(id);
        let value: Option<Vec<u8>> = conn
            .query(redis::cmd("GET").arg(&keys.key))
            .await
            .map_err(read)?;
        let pttl: i64 = conn
            .query(redis::cmd("PTTL").arg(&keys.key))
            .await
            .map_err(read)?;
        Ok(value.map(|v| describe_holder(&v, pttl)))
    }

    async fn release(&self, id: &str) -> Result<()> {
        self.client.check_alive()?;
        match self.mine.take_oldest(id) {
            Some(g) => give_back(&self.client, id, &self.client.keys.lock(id), g).await,
            None => Err(not_held(id, "this handle holds no such lock")),
        }
    }
}

/// Releases `grant`: NotHeld/LockLost if it was no longer held.
async fn give_back(client: &ClientInner, id: &str, keys: &HeldKeys, grant: Grant) -> Result<()> {
    // Read before the renewer lets go of the signal (which then counts as lost).
    let safe = !grant.lost.is_lost();
    client.renewals.forget(grant.registration);
    let was_held = release(client, keys, &grant.owner, safe)
        .await
        .map_err(|e| e.with_id(id))?;
    if was_held {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::LockLost,
        "the lock was no longer held at release: it expired or redis lost it",
    )
    .with_backend(BACKEND)
    .with_id(id))
}

/// A lock key's value (`owner` of 40 characters, the token, `\n`, the payload) in words.
fn describe_holder(value: &[u8], pttl: i64) -> String {
    let text = String::from_utf8_lossy(value);
    let client = text.get(..32).unwrap_or(&text);
    let token = text.get(40..).and_then(|rest| rest.split('\n').next());
    let mut said = format!("redis client {client}");
    if let Some(token) = token {
        said += &format!(" (token {token}");
        if pttl >= 0 {
            said += &format!(", expires in {pttl} ms unless renewed");
        }
        said += ")";
    }
    said
}

fn not_held(id: &str, why: &str) -> Error {
    Error::new(ErrorKind::NotHeld, why.to_string())
        .with_backend(BACKEND)
        .with_id(id)
}

struct RedisHeld {
    client: Arc<ClientInner>,
    mine: HeldGrants<Grant>,
    keys: HeldKeys,
    slot: Arc<Slot<Grant>>,
}

#[async_trait]
impl HeldLock for RedisHeld {
    async fn release(&mut self, id: &str) -> Result<()> {
        match self.mine.take(&self.slot) {
            Some(g) => give_back(&self.client, id, &self.keys, g).await,
            None => Err(not_held(
                id,
                "the lock was already released through the handle",
            )),
        }
    }

    fn release_in_background(self: Box<Self>, id: &str) {
        let Some(grant) = self.mine.take(&self.slot) else {
            return;
        };
        let safe = !grant.lost.is_lost();
        self.client.renewals.forget(grant.registration);
        // Without a runtime the key simply expires one TTL later.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let id = id.to_string();
        runtime.spawn(async move {
            if let Err(e) = release(&self.client, &self.keys, &grant.owner, safe).await {
                tracing::debug!(backend = BACKEND, id, error = %e, "background release failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_is_its_client_token_and_expiry() {
        let value = format!("{}{:08x}1234\npayload", "c".repeat(32), 7);
        assert_eq!(
            describe_holder(value.as_bytes(), 900),
            format!(
                "redis client {} (token 1234, expires in 900 ms unless renewed)",
                "c".repeat(32)
            )
        );
        assert_eq!(describe_holder(b"short", -1), "redis client short");
    }
}
