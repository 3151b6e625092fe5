//! Lock on Consul: the key `<ns>/<id>/.lock`, acquired under the client's session with the
//! flags of Consul's `api.Lock` (so `consul lock <ns>/<id> cmd` and this library exclude each
//! other), released by a session-checked delete.

use std::sync::Arc;

use async_trait::async_trait;
use sync_core::raw::HeldLock;
use sync_core::{Error, ErrorKind, Lock, LockGuard, LockOptions, Result};
use sync_kit::held::{HeldGrants, Slot};

use crate::{
    BACKEND,
    client::ClientInner,
    contend::{Contender, Grant, release},
};

pub(crate) struct ConsulLock {
    client: Arc<ClientInner>,
    mine: HeldGrants<Grant>,
}

impl ConsulLock {
    pub(crate) fn new(client: Arc<ClientInner>) -> Self {
        ConsulLock {
            client,
            mine: Default::default(),
        }
    }

    /// A contender writing `nonce`: Consul leaves an entry rewritten with what it holds
    /// untouched, ModifyIndex included, so a grant that re-takes a key its session still holds
    /// (a release that failed) would get the last grant's fencing token again.
    fn contender<'a>(&'a self, key: &'a str, nonce: &'a str) -> Contender<'a> {
        Contender {
            client: &self.client,
            key,
            value: nonce.as_bytes(),
        }
    }

    fn guard(&self, id: &str, key: String, grant: Grant) -> LockGuard {
        let (token, lost) = (grant.token, grant.lost.clone());
        let slot = self.mine.insert(id, grant);
        tracing::debug!(backend = BACKEND, id, token, "lock acquired");
        LockGuard::new(
            id,
            token,
            lost,
            Box::new(ConsulHeld {
                client: self.client.clone(),
                mine: self.mine.clone(),
                key,
                slot,
            }),
        )
    }
}

#[async_trait]
impl Lock for ConsulLock {
    async fn acquire(&self, id: &str, opts: LockOptions) -> Result<LockGuard> {
        let key = self.client.lock_key(id);
        let nonce = crate::contend::nonce();
        let grant = self
            .contender(&key, &nonce)
            .wait(&format!("lock {id:?}"), opts.wait)
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(self.guard(id, key, grant))
    }

    async fn try_acquire(&self, id: &str) -> Result<Option<LockGuard>> {
        let key = self.client.lock_key(id);
        let nonce = crate::contend::nonce();
        let tried = self
            .contender(&key, &nonce)
            .try_once()
            .await
            .map_err(|e| e.with_id(id))?;
        Ok(tried.map(|grant| self.guard(id, key, grant)))
    }

    /// The holding session, which `/v1/session/info` and `/v1/session/destroy` take, and the
    /// fencing token of its grant.
    async fn holder(&self, id: &str) -> Result<Option<String>> {
        let key = self.client.lock_key(id);
        let read = self.client.api.get("reading the holder", &key, 0).await;
        let entry = read.map_err(|e| Error::from(e).with_id(id))?.value;
        Ok(entry.and_then(|e| {
            let session = e.session?;
            Some(format!(
                "consul session {session} (token {})",
                e.modify_index
            ))
        }))
    }

    async fn release(&self, id: &str) -> Result<()> {
        self.client.check_alive()?;
        match self.mine.take_oldest(id) {
            Some(g) => give_back(&self.client, id, &self.client.lock_key(id), g).await,
            None => Err(not_held(id, "this handle holds no such lock")),
        }
    }
}

/// Releases `grant`: LockLost if it was no longer held.
pub(crate) async fn give_back(
    client: &ClientInner,
    id: &str,
    key: &str,
    grant: Grant,
) -> Result<()> {
    // Read before the session lets go of the signal (which then counts as lost).
    let safe = !grant.lost.is_lost();
    client.sessions.forget(&grant.registration);
    let was_held = release(client, key, &grant.session.id, Some(grant.token), safe)
        .await
        .map_err(|e| e.with_id(id))?;
    drop(grant.turn);
    if was_held {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::LockLost,
        "the lock was no longer held at release: its session ended or another took the key",
    )
    .with_backend(BACKEND)
    .with_id(id))
}

/// Releases `grant` in the background (a dropped guard), at the key's `index` if known.
pub(crate) fn give_back_in_background(
    client: Arc<ClientInner>,
    id: String,
    key: String,
    grant: Grant,
    index: Option<u64>,
) {
    let safe = !grant.lost.is_lost();
    client.sessions.forget(&grant.registration);
    // Without a runtime the key stays until the session ends (the client closes or dies).
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if let Err(e) = release(&client, &key, &grant.session.id, index, safe).await {
            tracing::debug!(backend = BACKEND, id = %id, error = %e, "background release failed");
        }
        drop(grant.turn);
    });
}

fn not_held(id: &str, why: &str) -> Error {
    Error::new(ErrorKind::NotHeld, why.to_string())
        .with_backend(BACKEND)
        .with_id(id)
}

struct ConsulHeld {
    client: Arc<ClientInner>,
    mine: HeldGrants<Grant>,
    key: String,
    slot: Arc<Slot<Grant>>,
}

#[async_trait]
impl HeldLock for ConsulHeld {
    async fn release(&mut self, id: &str) -> Result<()> {
        match self.mine.take(&self.slot) {
            Some(g) => give_back(&self.client, id, &self.key, g).await,
            None => Err(not_held(
                id,
                "the lock was already released through the handle",
            )),
        }
    }

    fn release_in_background(self: Box<Self>, id: &str) {
        if let Some(grant) = self.mine.take(&self.slot) {
            let index = Some(grant.token);
            give_back_in_background(
                self.client.clone(),
                id.to_string(),
                self.key.clone(),
                grant,
                index,
            );
        }
    }
}
