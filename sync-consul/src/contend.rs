//! Taking a lock key (a lock or a leadership) under the client's session and giving it back:
//! the `/v1/txn` grant, the blocking wait on the key, and the clean-up of a grant whose answer
//! never came.
//!
//! Consul grants a key again to the session that holds it, so two contenders of one session
//! would both "win": a grant keeps its session's local turn for its key until it is released.
//! A session that ends takes its turns with it: the next session's contenders do not wait
//! for holders lost with the old one.

use std::{sync::Arc, time::Duration};

use futures::FutureExt;
use sync_core::{Error, ErrorKind, LossSignal, Result};
use sync_kit::turns::Turn;
use tokio::time::Instant;

use crate::{
    BACKEND,
    api::{KvOp, Txn, unexpected},
    client::ClientInner,
    error::closed,
    fence,
    session::{Registration, Session},
};

/// A granted key, registered with its session.
pub(crate) struct Grant {
    /// The ModifyIndex of the acquiring write: the fencing token, or the leader's term.
    pub(crate) token: u64,
    pub(crate) session: Arc<Session>,
    pub(crate) registration: Registration,
    pub(crate) lost: LossSignal,
    /// No other contender of this client may take the key while it is held.
    pub(crate) turn: Arc<Turn>,
}

/// A value unique to one grant: Consul does not rewrite an entry whose value, flags and
/// session are unchanged, so the grant's write must change the value for its ModifyIndex (the
/// fencing token) to be new.
pub(crate) fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What one try found.
enum Tried {
    Granted(u64),
    /// Another session holds it.
    Busy,
    /// Its last holder's session was invalidated less than the lock-delay ago.
    LockDelay,
    /// The session this try used is gone.
    SessionGone,
    /// The session's grant fence moved since this client last read it.
    Fenced,
}

/// One contender for one key.
pub(crate) struct Contender<'a> {
    pub(crate) client: &'a Arc<ClientInner>,
    pub(crate) key: &'a str,
    pub(crate) value: &'a [u8],
}

impl Contender<'_> {
    /// Tries once without waiting: None when another holds the key (or a local contender has
    /// the turn).
    pub(crate) async fn try_once(&self) -> Result<Option<Grant>> {
        self.client.check_alive()?;
        let mut held: Option<(Arc<Session>, Arc<Turn>)> = None;
        loop {
            let session = self.client.sessions.current().await?;
            let turn = match held.take() {
                Some((s, turn)) if Arc::ptr_eq(&s, &session) => turn,
                _ => match session.turns.take(self.key).now_or_never() {
                    Some(turn) => Arc::new(turn),
                    None => return Ok(None),
                },
            };
            held = Some((session.clone(), turn.clone()));
            match self.try_with(&session, &turn).await? {
                Tried::Granted(token) => return Ok(Some(self.grant(session, token, turn))),
                Tried::Busy | Tried::LockDelay => return Ok(None),
                Tried::SessionGone => self.session_gone(&session),
                Tried::Fenced => fence::refresh(self.client, &session).await?,
            }
        }
    }

    /// Waits until granted: tries, then blocks on the key until it changes and tries again.
    /// `wait` bounds it (Timeout). Outages are ridden out within the bound.
    pub(crate) async fn wait(&self, what: &str, wait: Option<Duration>) -> Result<Grant> {
        let started = Instant::now();
        let deadline = wait.map_or_else(|| sync_kit::deadline(Duration::MAX), sync_kit::deadline);
        let timed_out = || {
            Error::new(
                ErrorKind::Timeout,
                format!("{what} still held by another after {:?}", started.elapsed()),
            )
            .with_backend(BACKEND)
        };
        let mut killed = self.client.killed();
        let mut delay = Backoff::default();
        let mut outage = Backoff::default();
        let mut held: Option<(Arc<Session>, Arc<Turn>)> = None;
        loop {
            let step = async {
                let (session, turn) = self.turn_in_current(held.take()).await?;
                let tried = self.try_with(&session, &turn).await;
                Ok::<_, Error>((session, turn, tried))
            };
            let stepped = tokio::select! {
                r = step => r,
                () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
            };
            let nap = match stepped {
                // No session to take a turn in (Consul unreachable): ride it out.
                Err(e) if e.kind() == ErrorKind::Unavailable => outage.next(),
                Err(e) => return Err(e),
                Ok((session, turn, tried)) => {
                    held = Some((session.clone(), turn.clone()));
                    match tried {
                        Ok(Tried::Granted(token)) => return Ok(self.grant(session, token, turn)),
                        Ok(Tried::SessionGone) => {
                            held = None;
                            self.session_gone(&session);
                            continue;
                        }
                        Ok(Tried::Fenced) => match fence::refresh(self.client, &session).await {
                            Ok(()) => continue,
                            Err(e) if e.kind() == ErrorKind::Unavailable => outage.next(),
                            Err(e) => return Err(e),
                        },
                        Ok(Tried::LockDelay) => delay.next(),
                        Ok(Tried::Busy) => {
                            outage = Backoff::default();
                            delay = Backoff::default();
                            let changed = self.changed();
                            tokio::select! {
                                r = changed => match r {
                                    Ok(()) => Duration::ZERO,
                                    Err(e) if e.kind() == ErrorKind::Unavailable => outage.next(),
                                    Err(e) => return Err(e),
                                },
                                () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::Unavailable => {
                            tracing::debug!(backend = BACKEND, error = %e, "waiting through an outage");
                            outage.next()
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            // A zero sleep still waits for the next timer tick (a millisecond): a key that
            // changed is tried again at once.
            if nap.is_zero() {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(nap) => {}
                () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
                _ = killed.wait_for(|k| *k) => return Err(closed()),
            }
        }
    }

    /// The client's current session and this contender's turn on the key among that
    /// session's contenders: `held` is kept while its session is still the current one. A
    /// wait for the turn whose session ends moves on to the next session, so a holder lost
    /// with its session holds up no one.
    async fn turn_in_current(
        &self,
        mut held: Option<(Arc<Session>, Arc<Turn>)>,
    ) -> Result<(Arc<Session>, Arc<Turn>)> {
        loop {
            let session = self.client.sessions.current().await?;
            match held.take() {
                Some((s, turn)) if Arc::ptr_eq(&s, &session) => return Ok((session, turn)),
                _ => {}
            }
            tokio::select! {
                turn = session.turns.take(self.key) => return Ok((session, Arc::new(turn))),
                () = session.ended() => {}
            }
        }
    }

    fn session_gone(&self, session: &Arc<Session>) {
        self.client
            .sessions
            .end(session, "the session was invalidated", false);
    }

    fn grant(&self, session: Arc<Session>, token: u64, turn: Arc<Turn>) -> Grant {
        let (registration, lost) = self.client.sessions.register(&session, self.key);
        Grant {
            token,
            session,
            registration,
            lost,
            turn,
        }
    }

    /// One grant transaction: check the session's grant fence, lock the key for the session,
    /// and read it back in the same transaction for the acquiring write's index. An answer
    /// lost is sent again (a grant is re-entrant for its session), and once one comes the
    /// fence is moved, so the lost send fails should it arrive later. If none comes, the fence
    /// is moved and the key released in the background, keeping the turn until then.
    async fn try_with(&self, session: &Arc<Session>, turn: &Arc<Turn>) -> Result<Tried> {
        let ops = [
            session.fence.check(),
            KvOp::lock(self.key, &session.id, self.value),
            KvOp::get(self.key),
        ];
        let first = Instant::now();
        let mut cleanup = Cleanup::armed(self.client, self.key, session, turn);
        // Once a send's outcome is unknown, the grant may exist whatever later sends say.
        let mut ambiguous = false;
        let answer = loop {
            match self.client.api.txn("taking the key", &ops).await {
                Ok(answer) => break answer,
                Err(f) if f.unknown() && self.client.may_resend(first) => {
                    ambiguous = true;
                    tracing::debug!(backend = BACKEND, error = %f.kind(), "grant unanswered, sending again");
                }
                Err(f) => {
                    if !ambiguous && !f.unknown() {
                        cleanup.disarm();
                    }
                    return Err(f.error());
                }
            }
        };
        // Still armed: a caller that stops waiting now gets the clean-up.
        if ambiguous {
            fence::move_fence(self.client, session).await;
        }
        cleanup.disarm();
        match answer {
            // A passed check-not-exists returns no entry: the read is the last one.
            Txn::Done(entries) => {
                let entry = entries.last().cloned().flatten().ok_or_else(|| {
                    unexpected("taking the key", "the transaction read nothing back")
                })?;
                if entry.session.as_deref() != Some(session.id.as_str()) {
                    return Err(unexpected("taking the key", "granted to another session"));
                }
                Ok(Tried::Granted(entry.modify_index))
            }
            Txn::RolledBack(errors) if errors.iter().any(|e| e.op_index == 0) => Ok(Tried::Fenced),
            Txn::RolledBack(errors) => {
                let what = errors.first().map(|e| e.what.as_str()).unwrap_or_default();
                if what.contains("lock delay") {
                    Ok(Tried::LockDelay)
                } else if what.contains("invalid session") {
                    Ok(Tried::SessionGone)
                } else if what.contains("already held") {
                    Ok(Tried::Busy)
                } else {
                    Err(unexpected("taking the key", what))
                }
            }
        }
    }

    /// Returns when the key changes: at once if nobody holds it, else after a blocking query
    /// on its index ends (a change, or the query's wait).
    async fn changed(&self) -> Result<()> {
        let api = &self.client.api;
        let read = api.get("waiting for the key", self.key, 0).await?;
        if read.value.as_ref().is_none_or(|e| e.session.is_none()) {
            return Ok(());
        }
        api.get("waiting for the key", self.key, read.index.max(1))
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}

/// Gives back a held key: deletes it if `session` still holds it. True if it was held.
/// `index`: the key's ModifyIndex as the grant left it, when known: the delete applies only
/// at it, so a send that arrives late, after a later grant of the key to the same session,
/// deletes nothing. `safe`: the holder had not lost it when it began; a key found gone after
/// a resend then counts as released (only this session could have deleted it before the loss).
pub(crate) async fn release(
    client: &ClientInner,
    key: &str,
    session: &str,
    index: Option<u64>,
    safe: bool,
) -> Result<bool> {
    let free = index.map_or_else(|| KvOp::delete(key), |i| KvOp::delete_cas(key, i));
    let ops = [KvOp::check_session(key, session), free];
    let mut resent = false;
    loop {
        match client.api.txn("releasing the key", &ops).await {
            Ok(Txn::Done(_)) => return Ok(true),
            Ok(Txn::RolledBack(_)) => return Ok(safe && resent),
            Err(f) if f.unknown() && !resent => resent = true,
            Err(f) => return Err(f.error()),
        }
    }
}

/// Releases, in the background, a key a grant may have taken when its answer never came (or
/// the caller stopped waiting for it), keeping the local turn until done: a later local
/// contender would otherwise be granted the same key again and then lose it to this clean-up.
/// The session's fence moves first, so that the grant fails should it arrive after that.
struct Cleanup {
    job: Option<CleanupJob>,
}

/// What a clean-up needs: the key, the session the grant was sent under, and the turn.
struct CleanupJob {
    client: Arc<ClientInner>,
    key: String,
    session: Arc<Session>,
    turn: Arc<Turn>,
}

impl Cleanup {
    fn armed(
        client: &Arc<ClientInner>,
        key: &str,
        session: &Arc<Session>,
        turn: &Arc<Turn>,
    ) -> Cleanup {
        Cleanup {
            job: Some(CleanupJob {
                client: client.clone(),
                key: key.to_string(),
                session: session.clone(),
                turn: turn.clone(),
            }),
        }
    }

    fn disarm(&mut self) {
        self.job = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(job) = self.job.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let CleanupJob {
                client,
                key,
                session,
                turn,
            } = job;
            fence::move_fence(&client, &session).await;
            // Session-checked: sending it again is harmless, and the session's end frees the
            // key anyway.
            for _ in 0..5 {
                if client.is_killed()
                    || release(&client, &key, &session.id, None, false)
                        .await
                        .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(turn);
        });
    }
}

/// Pauses between tries: 100 ms doubling to 1 s (an outage, or a lock-delay whose end Consul
/// does not tell).
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        now
    }
}
