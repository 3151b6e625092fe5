//! The grant fence: a grant whose answer never came may still be applied later (held by a slow
//! agent, a stalled server or the network) — after its contender gave up and released the key,
//! or after the key was granted and released again. It would then lock the key for the
//! client's live session, and nobody would release it until that session ends.
//!
//! So every grant checks the session's fence key, `<ns>/:fence/<session>`, as this client
//! last saw it: absent until a grant of the session first goes unanswered, then rewritten
//! ("moved") each time one does, before the client lets go of what that grant may have taken.
//! A grant sent before a move fails its check if it arrives after it. The key goes when the
//! session ends (a late grant fails on the ended session by then); a client that dies leaves
//! it behind, a few bytes per session that met such a fault.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use crate::{
    BACKEND,
    api::{KvOp, Txn},
    client::ClientInner,
    session::Session,
};

/// One session's fence, as this client last saw it.
pub(crate) struct Fence {
    key: String,
    /// The key's ModifyIndex; 0 while it is absent (an existing key's is never 0).
    index: AtomicU64,
}

impl Fence {
    /// The fence of session `id`, under `prefix` (`<ns>/:fence/`).
    pub(crate) fn new(prefix: &str, id: &str) -> Fence {
        Fence {
            key: format!("{prefix}{id}"),
            index: AtomicU64::new(0),
        }
    }

    /// The check a grant carries: the fence has not moved since this client last saw it.
    pub(crate) fn check(&self) -> KvOp {
        match self.index.load(Ordering::Acquire) {
            0 => KvOp::check_not_exists(&self.key),
            index => KvOp::check_index(&self.key, index),
        }
    }

    /// Whether the key was ever written (and may need deleting).
    pub(crate) fn is_set(&self) -> bool {
        self.index.load(Ordering::Acquire) != 0
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    /// Takes in the index of a move; moves answered out of order keep the newest.
    fn saw(&self, index: u64) {
        self.index.fetch_max(index, Ordering::AcqRel);
    }
}

/// Moves `session`'s fence, so that every grant sent under it so far fails if it arrives from
/// now on. Sent again while its answer is lost (any write moves the fence), until the session
/// ends (its late grants then fail anyway) or the client stops.
pub(crate) async fn move_fence(client: &ClientInner, session: &Session) {
    let op = [KvOp::set(session.fence.key(), b"")];
    let mut pause = Duration::from_millis(100);
    while session.alive() && !client.is_killed() {
        let error = match client.api.txn("moving the grant fence", &op).await {
            Ok(Txn::Done(entries)) => {
                if let Some(entry) = entries.into_iter().flatten().next() {
                    session.fence.saw(entry.modify_index);
                }
                return;
            }
            Ok(Txn::RolledBack(errors)) => format!("{errors:?}"),
            Err(f) if f.unknown() || f.kind() == sync_core::ErrorKind::Unavailable => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(f) => f.error().to_string(),
        };
        tracing::warn!(backend = BACKEND, key = session.fence.key(), error = %error, "moving the grant fence failed: a grant whose answer was lost may still lock its key if it arrives late");
        return;
    }
}

/// Reads `session`'s fence again after a grant failed its check (another grant's answer was
/// lost meanwhile, and the fence moved).
pub(crate) async fn refresh(client: &ClientInner, session: &Session) -> sync_core::Result<()> {
    let read = client
        .api
        .get("reading the grant fence", session.fence.key(), 0)
        .await?;
    match read.value {
        Some(entry) => session.fence.saw(entry.modify_index),
        // Deleted: the session ended.
        None => session.fence.index.store(0, Ordering::Release),
    }
    Ok(())
}

/// Deletes the fence of a session that ended, if it was ever written (best effort).
pub(crate) fn remove_in_background(client: std::sync::Arc<crate::api::Api>, session: &Session) {
    if !session.fence.is_set() {
        return;
    }
    let key = session.fence.key().to_string();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if let Err(e) = client
            .txn("deleting the grant fence", &[KvOp::delete(&key)])
            .await
        {
            tracing::debug!(backend = BACKEND, key, error = %e.error(), "deleting the grant fence failed");
        }
    });
}
