//! The contention Lock and Leader share: the layout and algorithm of etcd's
//! `concurrency.Mutex` and `concurrency.Election`.
//!
//! A contender writes `<prefix><lease-hex>` (prefix `<ns>/<escaped id>/`) with the handle's
//! lease in one transaction that also reads the older contenders' keys; it owns the prefix
//! (holds the lock, leads the group) when its key has the lowest create revision under the
//! prefix. Otherwise it waits for the older ones' deletes (etcd's `waitDeletes`): it watches
//! the newest older key only, is granted on its delete event with no read when that was the
//! only older one, and reads again otherwise. The key's create revision is the fencing token
//! (the term). Contenders of one id on one handle writing with one lease share that key name,
//! so they take turns in that lease's per-id local queue first (a lease that ends takes its
//! queue with it: the next lease's contenders write other names). A key is deleted with a plain delete; after one that went
//! unanswered, the handle's keys take a new name (see [`ContenderKey`]), so a delete that etcd
//! applies late never finds a later holding. So do they after a create that went unanswered,
//! and a late create of the old name is deleted when it lands.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use sync_core::{Error, ErrorKind, LossSignal, Result};
use sync_kit::turns::Turn;

use crate::{
    BACKEND,
    client::ClientInner,
    error::{answer_lost, etcd_err, refused_for_good},
    session::Session,
    watch::{Delivery, Registration},
};

impl ClientInner {
    /// The contender prefix of a lock id or election group: `<ns>/<escaped id>/`.
    pub(crate) fn contender_prefix(&self, id: &str) -> String {
        format!("{}{}/", self.ns_prefix(), sync_core::id::escape(id))
    }

    /// Waits for this handle's turn on `prefix` among the contenders of its current session
    /// (None when `try_only` and it is taken); the session with it. A wait whose session ends
    /// moves on to the next one: a holder lost with its lease holds up no one. Cancelling the
    /// wait gives the place up.
    pub(crate) async fn local_turn(
        &self,
        prefix: &str,
        try_only: bool,
    ) -> Result<Option<(Arc<Session>, Turn)>> {
        loop {
            let session = self.session().await?;
            if try_only {
                return Ok(session.turns.try_take(prefix).map(|t| (session, t)));
            }
            tokio::select! {
                turn = session.turns.take(prefix) => return Ok(Some((session, turn))),
                _ = session.ended.wait() => {}
            }
        }
    }
}

/// The safety-net re-check while waiting on a watch (push is the normal path).
pub(crate) const FALLBACK_POLL: Duration = Duration::from_secs(10);

/// A contender that owns its prefix (lock or leadership), before monitoring starts.
pub(crate) struct Contender {
    client: Arc<ClientInner>,
    key: ContenderKey,
    rev: i64,
    session: Arc<Session>,
    turn: Turn,
}

/// Deletes a contender key in the background unless disarmed: what makes a dropped acquire
/// future leave nothing behind. It first waits for the creating transaction (so the delete
/// cannot overtake it) and keeps the local turn until the delete is done. A failing delete is
/// retried until the key is gone or its lease ended: a key left on a lease that is still
/// renewed would block every other contender for as long as this process lives. If the create
/// went unanswered, the key's name is retired and a late create of it is swept up (see
/// [`sweep_late_create`]).
struct Cleanup {
    client: Arc<ClientInner>,
    key: ContenderKey,
    /// The session (lease) the key is written with.
    session: Arc<Session>,
    /// The create request while it is unanswered: polled by the acquire, and by the
    /// background cleanup if the acquire is dropped first, so its answer is never lost.
    txn: Option<CreateTxn>,
    /// The create went unanswered: etcd may still apply it, later than the delete.
    create_unanswered: bool,
    turn: Option<Turn>,
    armed: bool,
}

type CreateTxn = std::pin::Pin<
    Box<
        dyn Future<Output = std::result::Result<etcd_client::TxnResponse, etcd_client::Error>>
            + Send,
    >,
>;

impl Cleanup {
    fn disarm(mut self) -> Turn {
        self.armed = false;
        self.turn.take().expect("turn is only taken here")
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed || self.client.is_killed() {
            return;
        }
        let (txn, turn, key) = (self.txn.take(), self.turn.take(), self.key.text());
        let (client, session) = (self.client.clone(), self.session.clone());
        let mut unanswered = self.create_unanswered;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Some(txn) = txn {
                    unanswered = txn.await.as_ref().is_err_and(answer_lost);
                }
                if unanswered {
                    // Before the turn goes: no later contender of this client takes the name.
                    session.retire_key_names();
                }
                let what = "a cancelled contender key";
                let deleted_at = delete_in_background(&client, &key, &session, what).await;
                drop(turn);
                if let (true, Some(rev)) = (unanswered, deleted_at) {
                    // Held weakly: a dropped client ends its lease, and the sweep with it.
                    let weak = Arc::downgrade(&client);
                    drop(client);
                    sweep_late_create(weak, &key, &session, rev + 1).await;
                }
            });
        }
    }
}

/// The oldest key under a prefix: its owner (lock holder or leader).
pub(crate) fn first_created() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
}

/// Contends for `prefix` until it owns it; `wait` bounds the wait (`None` = forever; past it,
/// Timeout naming `what`).
pub(crate) async fn contend(
    client: &Arc<ClientInner>,
    what: &str,
    id: &str,
    prefix: &str,
    value: Vec<u8>,
    wait: Option<Duration>,
) -> Result<Contender> {
    let fut = contend_inner(client, id, prefix, value, false);
    let owned = match wait {
        Some(limit) => tokio::time::timeout(limit, fut).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("{what} not granted within {limit:?}"),
            )
            .with_backend(BACKEND)
            .with_id(id)
        })?,
        None => fut.await,
    }?;
    // Only a try (`try_only`) comes back without owning.
    owned.ok_or_else(|| {
        Error::new(ErrorKind::Backend, "no contender")
            .with_backend(BACKEND)
            .with_id(id)
    })
}

/// Takes `prefix` if no one else owns it right now (None when held elsewhere).
pub(crate) async fn try_contend(
    client: &Arc<ClientInner>,
    id: &str,
    prefix: &str,
    value: Vec<u8>,
) -> Result<Option<Contender>> {
    contend_inner(client, id, prefix, value, true).await
}

async fn contend_inner(
    client: &Arc<ClientInner>,
    id: &str,
    prefix: &str,
    value: Vec<u8>,
    try_only: bool,
) -> Result<Option<Contender>> {
    let Some((session, cleanup, resp)) = create_key(client, id, prefix, value, try_only).await?
    else {
        return Ok(None);
    };
    let key = cleanup.key.text();
    let (rev, standing) = positions(&resp, id)?;
    if !matches!(standing, Standing::Owner) {
        if try_only {
            // Foreground delete; on failure the armed cleanup retries in the background.
            let mut kv = client.kv();
            let deleted = kv.delete_once_written(key, || session.retire_key_names());
            deleted.await.map_err(|e| {
                retire_if_unanswered(&session, &e);
                etcd_err("deleting the contender key", e).with_id(id)
            })?;
            drop(cleanup.disarm());
            return Ok(None);
        }
        let known = match standing {
            Standing::Below(below) => Some(below),
            _ => None,
        };
        wait_for_lower(client, id, prefix, &key, rev, &session, known).await?;
    }
    let name = cleanup.key.clone();
    let turn = cleanup.disarm();
    Ok(Some(Contender {
        client: client.clone(),
        key: name,
        rev,
        session,
        turn,
    }))
}

/// The session a contender key was written with, the armed cleanup of the key (holding the
/// local turn) and etcd's answer.
type Created = (Arc<Session>, Cleanup, etcd_client::TxnResponse);

/// Takes this handle's local turn on `prefix` (None when `try_only` and it is taken), then
/// writes its contender key (see [`ContenderKey`]) unless it exists, reading the prefix's
/// owner in the same transaction.
async fn create_key(
    client: &Arc<ClientInner>,
    id: &str,
    prefix: &str,
    value: Vec<u8>,
    try_only: bool,
) -> Result<Option<Created>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let turn = client.local_turn(prefix, try_only).await;
        let Some((session, turn)) = turn.map_err(|e| e.with_id(id))? else {
            return Ok(None);
        };
        let key = ContenderKey::of(turn.key(), &session);
        let txn = contender_txn(&key.text(), prefix, value.clone(), session.lease);
        let mut kv = client.kv();
        // Polled right here rather than in a task of its own (a hand-off to another thread
        // and back per acquire); only a dropped acquire moves it to the background.
        let mut cleanup = Cleanup {
            client: client.clone(),
            key,
            session: session.clone(),
            txn: Some(Box::pin(async move { kv.txn(txn).await })),
            create_unanswered: false,
            turn: Some(turn),
            armed: true,
        };
        let answer = cleanup.txn.as_mut().expect("set above").await;
        cleanup.txn = None;
        cleanup.create_unanswered = answer.as_ref().is_err_and(answer_lost);
        match answer {
            Ok(resp) => return Ok(Some((session, cleanup, resp))),
            // The lease ended before the keepalive noticed: retry once on a new one, in its
            // turns.
            Err(e) if attempt < 2 && session.end_if_lease_gone(&e) => {
                drop(cleanup.disarm());
            }
            Err(e) => return Err(etcd_err("creating the contender key", e).with_id(id)),
        }
    }
}

/// Creates `key` with `lease` if it does not exist, and reads how many contenders are older
/// and the newest of them (see [`Below`]): the new key is the newest under the prefix, so
/// every other key is older. If it exists (a retry after an
/// unknown outcome, or a key of this lease left over), adopts it: writes this contender's
/// value (its create revision, the token, stays) and reads it back, so a leader never shows
/// the value of an earlier campaign, and reads the prefix's owner.
fn contender_txn(key: &str, prefix: &str, value: Vec<u8>, lease: i64) -> Txn {
    let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
    // This key, then the newest older one; `count` is the whole prefix.
    let newest = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(2)
        .with_keys_only();
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([put.clone(), TxnOp::get(prefix, Some(newest))])
        .or_else([
            put,
            TxnOp::get(key, None),
            TxnOp::get(prefix, Some(first_created().with_keys_only())),
        ])
}

/// Where a new contender stands.
enum Standing {
    /// Its key is the oldest: it owns the prefix.
    Owner,
    /// Other contenders are older.
    Below(Below),
    /// Not known without a read (an adopted key that is not the oldest).
    Unknown,
}

/// What a waiting contender knows of the contenders older than it, at revision `at`. It
/// watches only the newest of them (etcd's `waitDeletes`), so a release wakes one waiter, not
/// the whole queue. No older key can appear later (revisions only grow), so when that one was
/// the only one, its delete makes this contender the owner with no read; otherwise it reads
/// again after the delete.
struct Below {
    /// The newest older contender's key.
    newest: Vec<u8>,
    /// How many older contenders there were at `at`.
    count: i64,
    at: i64,
}

impl Below {
    /// From a read of the contenders older than this one (newest first), `count` of them in
    /// all, at revision `at`; None when there are none.
    fn read(kvs: &[etcd_client::KeyValue], count: i64, at: i64) -> Option<Below> {
        let newest = kvs.first()?.key().to_vec();
        Some(Below { newest, count, at })
    }
}

/// From the answer of [`contender_txn`]: the contender key's create revision, and where it
/// stands.
fn positions(resp: &etcd_client::TxnResponse, id: &str) -> Result<(i64, Standing)> {
    let ops = resp.op_responses();
    let get = |i: usize| match ops.get(i) {
        Some(TxnOpResponse::Get(g)) => Some(g),
        _ => None,
    };
    let first_rev = |i: usize| get(i)?.kvs().first().map(|kv| kv.create_revision());
    let (rev, standing) = if resp.succeeded() {
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        let standing = match get(1) {
            Some(g) if g.count() <= 1 => Standing::Owner,
            // This key first, then the newest older one.
            Some(g) => {
                match Below::read(g.kvs().get(1..).unwrap_or_default(), g.count() - 1, rev) {
                    Some(below) => Standing::Below(below),
                    None => Standing::Unknown,
                }
            }
            None => Standing::Unknown,
        };
        (rev, standing)
    } else {
        let rev = first_rev(1).unwrap_or_default();
        let standing = if first_rev(2).is_some_and(|o| o == rev) {
            Standing::Owner
        } else {
            Standing::Unknown
        };
        (rev, standing)
    };
    if rev <= 0 {
        return Err(Error::new(
            ErrorKind::Backend,
            "etcd returned no revision for the contender key",
        )
        .with_backend(BACKEND)
        .with_id(id));
    }
    Ok((rev, standing))
}

/// Waits until no contender older than `rev` is left under `prefix` (etcd's `waitDeletes`),
/// starting from what `known` tells (else from a read). Like etcd's Mutex it makes sure our
/// own `key` survived the wait when it reads; when the watch alone decides, a delete of the
/// key meanwhile is found by the held key's monitor, which watches from `rev`.
async fn wait_for_lower(
    client: &Arc<ClientInner>,
    id: &str,
    prefix: &str,
    key: &str,
    rev: i64,
    session: &Session,
    mut known: Option<Below>,
) -> Result<()> {
    let mut killed = client.killed();
    loop {
        let below = match known.take() {
            Some(below) => below,
            None => match read_below(client, id, prefix, key, rev).await? {
                Some(below) => below,
                None => return Ok(()),
            },
        };
        let waited = tokio::select! {
            w = wait_below(client, below) => w,
            reason = session.ended.wait() => {
                return Err(Error::new(ErrorKind::LockLost, format!("the lease ended while waiting: {reason}"))
                    .with_backend(BACKEND)
                    .with_id(id));
            }
            _ = killed.wait_for(|k| *k) => {
                return Err(Error::new(ErrorKind::Closed, "client was killed").with_backend(BACKEND).with_id(id));
            }
            _ = tokio::time::sleep(FALLBACK_POLL) => {
                tracing::debug!(backend = BACKEND, id, "fallback re-check while waiting");
                Waited::Unsure
            }
        };
        if let Waited::Owner = waited {
            return Ok(());
        }
    }
}

/// The contenders older than `rev` (see [`Below::read`]), after checking that `key` is
/// still this contender's; None when there are none. It reads from the member's own state
/// (no quorum round): an answer at `rev` or later holds every older contender's create, so an
/// absent one is truly gone, and one still present is only waited for; an earlier answer
/// (a member behind) is read again through the quorum.
async fn read_below(
    client: &ClientInner,
    id: &str,
    prefix: &str,
    key: &str,
    rev: i64,
) -> Result<Option<Below>> {
    let mut local = true;
    loop {
        let resp = Box::pin(client.kv().txn(below_txn(prefix, key, rev, local)))
            .await
            .map_err(|e| etcd_err("reading the contenders", e).with_id(id))?;
        let at = resp.header().map(|h| h.revision()).unwrap_or_default();
        if local && at < rev {
            local = false;
            continue;
        }
        let ops = resp.op_responses();
        let get = |i: usize| match ops.get(i) {
            Some(TxnOpResponse::Get(g)) => Some(g),
            _ => None,
        };
        let own = get(1)
            .and_then(|g| g.kvs().first())
            .map(|kv| kv.create_revision());
        if own != Some(rev) {
            return Err(Error::new(
                ErrorKind::LockLost,
                "the contender key was deleted while waiting",
            )
            .with_backend(BACKEND)
            .with_id(id));
        }
        let older = get(0);
        let count = older.map(|g| g.count()).unwrap_or_default();
        return Ok(Below::read(
            older.map(|g| g.kvs()).unwrap_or_default(),
            count,
            at,
        ));
    }
}

/// Reads the newest contender older than `rev` (and how many there are) and `key`; from the
/// member's own state when `local`.
fn below_txn(prefix: &str, key: &str, rev: i64, local: bool) -> Txn {
    let mut older = GetOptions::new()
        .with_prefix()
        .with_max_create_revision(rev - 1)
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(1)
        .with_keys_only();
    let mut own = GetOptions::new().with_keys_only();
    if local {
        older = older.with_serializable();
        own = own.with_serializable();
    }
    Txn::new().and_then([TxnOp::get(prefix, Some(older)), TxnOp::get(key, Some(own))])
}

/// What a waiter learned from its watch.
enum Waited {
    /// Every older contender is gone.
    Owner,
    /// Not conclusive: read again.
    Unsure,
}

/// Watches the newest older contender's key for its delete from `below.at` on: the owner
/// then when it was the only older one, else unsure.
async fn wait_below(client: &ClientInner, below: Below) -> Waited {
    let watch = client
        .watches
        .once(below.newest, deleted_from(below.at + 1));
    match tokio::time::timeout(client.recheck_every(), watch.wait()).await {
        Ok(Delivery::Events(_)) if below.count == 1 => Waited::Owner,
        Ok(Delivery::Events(_)) => Waited::Unsure,
        Ok(Delivery::Ended(why)) => {
            client.ended(why).await;
            Waited::Unsure
        }
        Err(_) => Waited::Unsure,
    }
}

/// A watch for deletes from revision `from` on. NoPut: every event the server sends is a
/// delete.
fn deleted_from(from: i64) -> WatchOptions {
    WatchOptions::new()
        .with_start_revision(from)
        .with_filters([WatchFilterType::NoPut])
}

/// A contender key, `<prefix><lease-hex>` as etcd's concurrency package writes it, or
/// `<prefix><lease-hex>-<n>` once its session retired the names before (see
/// [`Session::retire_key_names`]). Kept as its parts: the prefix is the local turn's, so a
/// held key keeps no string of its own (a client may hold thousands).
#[derive(Clone)]
pub(crate) struct ContenderKey {
    prefix: Arc<str>,
    lease: i64,
    generation: u32,
}

impl ContenderKey {
    #[cfg(test)]
    pub(crate) fn new(prefix: &str, lease: i64) -> ContenderKey {
        ContenderKey {
            prefix: prefix.into(),
            lease,
            generation: 0,
        }
    }

    /// The key `session` writes under `prefix` now.
    fn of(prefix: &Arc<str>, session: &Session) -> ContenderKey {
        ContenderKey {
            prefix: prefix.clone(),
            lease: session.lease,
            generation: session.key_names(),
        }
    }

    /// The key, written out (for a request).
    pub(crate) fn text(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for ContenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:x}", self.prefix, self.lease)?;
        match self.generation {
            0 => Ok(()),
            n => write!(f, "-{n}"),
        }
    }
}

/// An owned contender key being monitored: its loss signal fires when the lease ends (TTL 0,
/// revoked, renewals failing past the safe deadline), when the key is deleted, or when the
/// client is killed.
pub(crate) struct Holding {
    client: Arc<ClientInner>,
    /// Shared with its monitor.
    pub(crate) key: ContenderKey,
    pub(crate) rev: i64,
    /// The session (lease) the key was written with.
    pub(crate) session: Arc<Session>,
    pub(crate) lost: LossSignal,
    /// Its key's watch in the client's watch hub, which fires the loss on the key's delete;
    /// the lease's loss reaches it through the session's signal.
    monitor: Option<Registration>,
    turn: Option<Turn>,
    armed: bool,
}

impl Holding {
    /// The contender prefix, as the client's local turns keep it.
    pub(crate) fn prefix(&self) -> Arc<str> {
        self.key.prefix.clone()
    }

    pub(crate) fn start(c: Contender) -> Holding {
        // Under the session's signal: the lease's end (and its safe deadline) needs nothing
        // per key.
        let (trigger, lost) = sync_core::raw::loss_signal_under(&c.session.ended);
        let monitor = c.client.watches.monitor(c.key.clone(), c.rev, trigger);
        Holding {
            client: c.client,
            key: c.key,
            rev: c.rev,
            session: c.session,
            lost,
            monitor: Some(monitor),
            turn: Some(c.turn),
            armed: true,
        }
    }

    /// Deletes the key. `LockLost` if it was lost (or gone) before.
    pub(crate) async fn release(mut self, id: &str) -> Result<()> {
        // Read before the monitor goes: the hub drops its trigger with it.
        let was_lost = self.lost.is_lost();
        drop(self.monitor.take());
        // A plain delete, as etcd's Mutex sends it: this key's name was never written before
        // by this session, and it is not written again if the delete goes unanswered, so a
        // delete applied late (sent to a member that stalled and then woke up) can only find
        // this holding's key or nothing.
        let key = self.key.text();
        // Stays armed until the delete is known to be done: if this future is dropped
        // mid-request, `Drop` finishes the release in the background instead of leaving the
        // key (and so the lock) held by a live lease.
        // Sent again when unanswered. Finding the key gone then is no sign of loss: an
        // earlier send may have deleted it.
        let mut resent = false;
        let session = &self.session;
        let result = (self.client.kv())
            .delete_once_written(key, || {
                resent = true;
                session.retire_key_names();
            })
            .await;
        match result {
            Ok(resp) => {
                self.armed = false;
                if was_lost || (resp.deleted() == 0 && !resent) {
                    let reason = self
                        .lost
                        .reason()
                        .unwrap_or_else(|| "the key was gone".into());
                    return Err(Error::new(
                        ErrorKind::LockLost,
                        format!("lost before release: {reason}"),
                    )
                    .with_backend(BACKEND)
                    .with_id(id));
                }
                Ok(())
            }
            // Refused for good: the key would stay, on a lease this process keeps renewing.
            // The lease ends instead; this guard and every other on it are lost.
            Err(e) if refused_for_good(&e) => {
                self.armed = false;
                let err = etcd_err("deleting the key on release", e).with_id(id);
                let reason = format!("the lock could not be released: {err}");
                // Ending the lease loses this guard (and every other on it) with the reason.
                give_up_lease(&self.client, &self.session, &reason);
                Err(err)
            }
            // Still armed: dropping `self` keeps trying in the background, holding the local
            // turn until the key is gone.
            Err(e) => Err(etcd_err("deleting the key on release", e).with_id(id)),
        }
    }
}

/// Deletes a released key in the background, keeping the local turn until it is gone, so the
/// next local contender (same lease, so the same key name) never finds it and adopts it with
/// its old create revision (a reused fencing token). Retries until the delete succeeds or the
/// lease the key was written with has ended (a later contender then uses a new lease, hence a
/// new key, and the old lease is revoked).
fn spawn_delete(client: &Arc<ClientInner>, key: String, turn: Option<Turn>, session: Arc<Session>) {
    if client.is_killed() {
        // A dead process releases nothing: the lease expiry frees the key.
        return;
    }
    let client = client.clone();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            delete_in_background(&client, &key, &session, "a released key").await;
            drop(turn);
        });
    }
}

/// [`delete_until_gone`] from a background task, once one of the client's background
/// deletes is free. Its future is boxed only then: a task waiting its turn stays small (a
/// task is allocated aligned, and glibc reuses no freed one for the next).
async fn delete_in_background(
    client: &ClientInner,
    key: &str,
    session: &Session,
    what: &str,
) -> Option<i64> {
    let _permit = client.background_deletes.acquire().await;
    Box::pin(delete_until_gone(client, key, session, what)).await
}

/// Deletes `key` (`what`, for the log), retrying with backoff until the delete succeeds or
/// the lease the key was written with has ended (the key then goes with the lease, which the
/// client revokes). A delete etcd refuses for good (the user lost its rights) ends the lease
/// instead: see [`give_up_lease`]. The revision of the delete that succeeded, if one did.
async fn delete_until_gone(
    client: &ClientInner,
    key: &str,
    session: &Session,
    what: &str,
) -> Option<i64> {
    let mut kv = client.kv();
    let lease_ended = &session.ended;
    let mut attempt = 0u32;
    loop {
        let deleted = kv.delete_once_written(key, || session.retire_key_names());
        match deleted.await {
            Ok(resp) => return resp.header().map(|h| h.revision()),
            Err(e) if lease_ended.is_lost() => {
                tracing::warn!(backend = BACKEND, key, error = %e, "deleting {what} failed; it ends with its lease");
                return None;
            }
            Err(e) if refused_for_good(&e) => {
                give_up_lease(
                    client,
                    session,
                    &format!("deleting {what} was refused: {e}"),
                );
                return None;
            }
            Err(e) => {
                retire_if_unanswered(session, &e);
                attempt = attempt.saturating_add(1);
                tracing::warn!(backend = BACKEND, key, attempt, error = %e, "deleting {what} failed; retrying");
                let pause = Duration::from_millis(200) * attempt.min(25);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = lease_ended.wait() => {}
                }
            }
        }
    }
}

/// Deletes `key` should its create, which went unanswered, be applied after all: etcd may
/// apply a request held by a stalled member or a frozen path late, after the cleanup's delete
/// (done at revision `from` - 1). Its name is retired, so no contender of this client owns
/// it, and left alone it would block every other contender for as long as this process
/// renews its lease. Watches from `from` until the key appears, or the lease or the client
/// ends (a late create on an ended lease fails). Keeps no client alive meanwhile.
async fn sweep_late_create(client: Weak<ClientInner>, key: &str, session: &Session, mut from: i64) {
    let Some(mut killed) = client.upgrade().map(|c| c.killed()) else {
        return;
    };
    loop {
        let watch = match client.upgrade() {
            Some(c) => c.watches.once(key.as_bytes().to_vec(), put_from(from)),
            None => return,
        };
        let delivery = tokio::select! {
            d = watch.wait() => d,
            _ = session.ended.wait() => return,
            _ = killed.wait_for(|k| *k) => return,
        };
        let Some(client) = client.upgrade() else {
            return;
        };
        if let Delivery::Ended(why) = delivery {
            client.ended(why).await;
            // Missed nothing only if it is not there now: read it, and watch on from there.
            match client.kv().get(key, None).await {
                Ok(resp) if resp.count() == 0 => {
                    from = resp.header().map_or(from, |h| h.revision() + 1);
                    continue;
                }
                Ok(_) => {}
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        tracing::warn!(
            backend = BACKEND,
            key,
            "a contender key whose create went unanswered was written late; deleting it"
        );
        delete_in_background(&client, key, session, "a contender key created late").await;
        return;
    }
}

/// A watch for puts from revision `from` on.
fn put_from(from: i64) -> WatchOptions {
    WatchOptions::new()
        .with_start_revision(from)
        .with_filters([WatchFilterType::NoDelete])
}

/// After a delete of a contender key of `session` failed with `e`: if etcd may still apply
/// it, the key's name is not used again.
fn retire_if_unanswered(session: &Session, e: &etcd_client::Error) {
    if answer_lost(e) {
        session.retire_key_names();
    }
}

/// Ends `session` because a key on it cannot be deleted: every holder on the lease is told it
/// lost (a key that cannot be released would otherwise block everyone for as long as this
/// process renews its lease), renewals stop, and the lease is revoked, or, if etcd refuses
/// that too, expires within a TTL.
fn give_up_lease(client: &ClientInner, session: &Session, reason: &str) {
    tracing::warn!(backend = BACKEND, lease = %session.lease_hex(), reason, "a key cannot be deleted; ending its lease");
    session.end(reason);
    session.revoke_in_background(&client.sender(), client.killed());
}

impl Drop for Holding {
    fn drop(&mut self) {
        drop(self.monitor.take());
        if self.armed {
            spawn_delete(
                &self.client,
                self.key.text(),
                self.turn.take(),
                self.session.clone(),
            );
        }
    }
}
