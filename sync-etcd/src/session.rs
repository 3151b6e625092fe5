//! The lease behind a client's TTL (its "session"): granting it, and the keepalive that renews
//! it and signals its loss.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use sync_core::raw::{LeaseClock, LossTrigger};
use sync_core::{LossSignal, Result};
use sync_kit::turns::Turns;
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use crate::{
    BACKEND,
    endpoints::Endpoints,
    error::{etcd_err, lease_not_found, not_delivered, refused_for_good, timed_out},
    kv::Sender,
};

/// One lease and the signal that it is gone (or no longer certain).
pub(crate) struct Session {
    pub(crate) lease: i64,
    /// The TTL etcd granted.
    ttl: Duration,
    /// Lost when the lease is: bound to its safe deadline, which each confirmed renewal moves
    /// forward, and to the keepalive. What the lease holds has its signal under this one.
    pub(crate) ended: LossSignal,
    trigger: Arc<LossTrigger>,
    keepalive: AbortHandle,
    /// Which names this session's contender keys take (see [`Session::retire_key_names`]).
    key_names: AtomicU32,
    /// The per-id local turns of the contenders writing with this lease: two of them would
    /// write one key name. A holder lost with its lease keeps its turn here only; the next
    /// session's contenders write other names and take turns of their own.
    pub(crate) turns: Turns,
}

impl Session {
    /// Grants a lease of `ttl` through `sender` and starts renewing it until it ends or
    /// `killed` turns true.
    pub(crate) async fn grant(
        sender: &Sender,
        ttl: Duration,
        killed: watch::Receiver<bool>,
    ) -> Result<Session> {
        let granted_at = Instant::now();
        // A grant unanswered for a whole TTL is of no use; one granted unseen just expires
        // (a TTL, which is short), so an unanswered grant may be sent again, hedged. The
        // deadline counts from the first send: a later one's lease lives longer, not shorter.
        let sender = Sender {
            timeout: sender.timeout.min(ttl),
            ..sender.clone()
        };
        let secs = ttl.as_secs() as i64;
        let grant = |c: &etcd_client::Client| {
            let mut leases = c.lease_client();
            async move { leases.grant(secs, None).await }
        };
        let grant = (sender.send_hedged(grant, || {}).await)
            .map_err(|e| etcd_err("granting the lease", e))?;
        let granted_ttl = Duration::from_secs(grant.ttl().max(1) as u64);
        let lease = grant.id();
        // Owned by the keepalive alone: if it dies, every signal bound to the lease is lost.
        let clock = LeaseClock::new(granted_at + granted_ttl - safety_margin(granted_ttl));
        let (trigger, ended) = sync_core::raw::loss_signal_until(clock.deadline());
        let trigger = Arc::new(trigger);
        let renewer = Renewer {
            endpoints: sender.endpoints.clone(),
            lease,
            ttl: granted_ttl,
            patience: (granted_ttl / 3).min(sender.timeout),
            on: None,
            hedge: false,
            stream: None,
        };
        let keepalive = tokio::spawn(keepalive(
            renewer,
            granted_at,
            clock,
            trigger.clone(),
            killed,
        ))
        .abort_handle();
        tracing::debug!(backend = BACKEND, lease = format!("{lease:x}"), ttl = ?granted_ttl, "lease granted");
        Ok(Session {
            lease,
            ttl: granted_ttl,
            ended,
            trigger,
            keepalive,
            key_names: AtomicU32::new(0),
            turns: Turns::default(),
        })
    }

    /// Marks the lease as gone (etcd said so); the next call grants a new one.
    pub(crate) fn end(&self, reason: &str) {
        self.trigger.fire(reason);
        self.keepalive.abort();
    }

    /// Stops renewing without telling the holders: a killed client just goes silent.
    pub(crate) fn stop_renewing(&self) {
        self.keepalive.abort();
    }

    /// Ends the session for `reason` (its holders learn of it before the request is sent),
    /// then revokes the lease on the server, so what it held frees now.
    pub(crate) async fn revoke(&self, sender: &Sender, reason: &str) -> Result<()> {
        self.end(reason);
        let lease = self.lease;
        // Revoking twice changes nothing: the second answer is "not found".
        let revoke = |c: &etcd_client::Client| {
            let mut leases = c.lease_client();
            async move { leases.revoke(lease).await }
        };
        let revoked = sender.send_hedged(revoke, || {}).await;
        match revoked {
            Err(e) if !lease_not_found(&e) => Err(etcd_err("revoking the lease", e)),
            _ => Ok(()),
        }
    }

    /// Revokes the lease in the background, so what it held frees at once rather than after a
    /// TTL, retrying until etcd answers (see [`revoke_until_answered`]). Call it only once
    /// renewals have stopped. Needs a tokio runtime; without one the lease simply expires.
    pub(crate) fn revoke_in_background(&self, sender: &Sender, killed: watch::Receiver<bool>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(revoke_until_answered(
                sender.clone(),
                self.lease,
                self.ttl,
                killed,
            ));
        }
    }

    /// Ends the session if `e` says etcd no longer has its lease (a write with it failed before
    /// the keepalive noticed), so the next call grants a new one. True if it did.
    pub(crate) fn end_if_lease_gone(&self, e: &etcd_client::Error) -> bool {
        let gone = crate::error::lease_not_found(e);
        if gone {
            self.end("lease not found");
        }
        gone
    }

    /// The lease id as etcd's concurrency package writes it in keys.
    pub(crate) fn lease_hex(&self) -> String {
        format!("{:x}", self.lease)
    }

    /// The generation of contender key names: 0 (etcd's `<prefix><lease-hex>`) until a delete
    /// of a contender key went unanswered.
    pub(crate) fn key_names(&self) -> u32 {
        self.key_names.load(Ordering::Acquire)
    }

    /// Called when a delete of a contender key went unanswered: etcd may still apply it later,
    /// so no key of this session may take that name again. Contender keys are then deleted
    /// without comparing their create revision: a late delete finds either its own key or
    /// nothing.
    pub(crate) fn retire_key_names(&self) {
        self.key_names.fetch_add(1, Ordering::AcqRel);
    }
}

/// Revokes `lease`, retrying with backoff until etcd answers (revoked, or not found). A
/// lease whose renewals failed may still live on the server: renewals that got no answer may
/// have reached it, and an etcd restart or leader change extends every lease by its TTL, so
/// no clock tells from here that it is gone. Stops when the client is killed (a dead process
/// revokes nothing); once the client is dropped, one `ttl` after it started (renewals had
/// stopped by then), the lease is expired unless etcd restarted.
async fn revoke_until_answered(
    sender: Sender,
    lease: i64,
    ttl: Duration,
    killed: watch::Receiver<bool>,
) {
    let lease_hex = format!("{lease:x}");
    let expired_by = Instant::now() + ttl;
    let mut attempt = 0u32;
    loop {
        let revoke = |c: &etcd_client::Client| {
            let mut leases = c.lease_client();
            async move { leases.revoke(lease).await }
        };
        let revoked = sender.send_hedged(revoke, || {}).await;
        let e = match revoked {
            Ok(_) => return,
            Err(e) if lease_not_found(&e) => return,
            // No rights to revoke it (to delete its keys): with renewals stopped it expires.
            Err(e) if refused_for_good(&e) => {
                tracing::warn!(backend = BACKEND, lease = %lease_hex, error = %e, "revoking the lease was refused; it expires within its TTL");
                return;
            }
            Err(e) => e,
        };
        let client_gone = killed.has_changed().is_err();
        if *killed.borrow() || (client_gone && Instant::now() >= expired_by) {
            tracing::warn!(backend = BACKEND, lease = %lease_hex, error = %e, "revoking the old lease failed; giving up");
            return;
        }
        attempt = attempt.saturating_add(1);
        tracing::warn!(backend = BACKEND, lease = %lease_hex, attempt, error = %e, "revoking the old lease failed; retrying");
        tokio::time::sleep(Duration::from_millis(200) * attempt.min(25)).await;
    }
}

/// Renews the lease every TTL/3 over one keepalive stream (reopened on error; on every
/// endpoint at once when its own failed or went silent). Fires the session's signal when etcd answers
/// TTL 0 (expired or revoked), or when renewals have failed until the safe deadline: the last
/// confirmed expiry minus a safety margin.
async fn keepalive(
    mut renewer: Renewer,
    granted_at: Instant,
    clock: LeaseClock,
    trigger: Arc<LossTrigger>,
    mut killed: watch::Receiver<bool>,
) {
    let (ttl, patience) = (renewer.ttl, renewer.patience);
    let margin = safety_margin(ttl);
    let lease_hex = format!("{:x}", renewer.lease);
    let work = async {
        let mut safe_until = granted_at + ttl - margin;
        loop {
            let now = Instant::now();
            if now >= safe_until {
                tracing::warn!(backend = BACKEND, lease = %lease_hex, "lease renewal failing past the safe deadline");
                trigger.fire("lease renewal failing past the safe deadline");
                return;
            }
            let sent = now;
            let attempt =
                tokio::time::timeout_at(safe_until.min(sent + patience), renewer.renew()).await;
            let next = match attempt {
                Ok(Ok(secs)) if secs <= 0 => {
                    tracing::warn!(backend = BACKEND, lease = %lease_hex, "lease expired or revoked");
                    trigger.fire("lease expired or revoked (keepalive answered TTL 0)");
                    return;
                }
                Ok(Ok(secs)) => {
                    safe_until = sent + Duration::from_secs(secs as u64) - margin;
                    clock.confirm(safe_until);
                    sent + ttl / 3
                }
                Ok(Err(e)) => {
                    tracing::warn!(backend = BACKEND, lease = %lease_hex, error = %e, "lease renewal failed; retrying");
                    renewer.failed(not_delivered(&e) || timed_out(&e));
                    Instant::now() + Duration::from_millis(200)
                }
                Err(_) => {
                    tracing::warn!(backend = BACKEND, lease = %lease_hex, "lease renewal timed out; retrying on the next endpoint");
                    renewer.failed(true);
                    Instant::now()
                }
            };
            tokio::time::sleep_until(next.min(safe_until)).await;
        }
    };
    tokio::select! {
        _ = work => {}
        _ = killed.wait_for(|k| *k) => {
            trigger.fire("client killed");
        }
    }
}

/// One lease's keepalive stream and the endpoint it is (being) opened on.
struct Renewer {
    endpoints: Arc<Endpoints>,
    lease: i64,
    ttl: Duration,
    /// How long a renewal may go unanswered before it is tried elsewhere.
    patience: Duration,
    /// The endpoint of the stream, or of the attempt to open one.
    on: Option<usize>,
    /// Whether the next stream is opened on every endpoint at once (after a failure).
    hedge: bool,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Renewer {
    /// One renewal: the TTL etcd answered (0 = the lease is gone).
    async fn renew(&mut self) -> std::result::Result<i64, etcd_client::Error> {
        if let Some((keeper, responses)) = self.stream.as_mut() {
            keeper.keep_alive().await?;
            return match responses.message().await? {
                Some(resp) => Ok(resp.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "keepalive stream ended".into(),
                )),
            };
        }
        let opened = if self.hedge {
            self.open_on_every_endpoint().await
        } else {
            let (index, client) = self.endpoints.pick().await?;
            self.on = Some(index);
            client.lease_client().keep_alive(self.lease).await
        };
        // Opening the stream sends the first renewal and reads its answer.
        match opened {
            Ok(opened) => {
                self.stream = Some(opened);
                self.hedge = false;
                // It renewed the lease to its granted TTL (the answer's TTL is not handed out).
                Ok(self.ttl.as_secs().max(1) as i64)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Opens a keepalive stream on every endpoint at once and keeps the first that renews
    /// (renewing twice is harmless); that endpoint becomes the client's current one. After a
    /// renewal went unanswered no single endpoint is to be trusted: the next in line may be
    /// the stalled member, or wait on it as its leader, and the lease cannot wait out one
    /// request timeout per endpoint.
    async fn open_on_every_endpoint(
        &mut self,
    ) -> std::result::Result<(LeaseKeeper, LeaseKeepAliveStream), etcd_client::Error> {
        let mut opening = tokio::task::JoinSet::new();
        for index in 0..self.endpoints.len() {
            let (endpoints, lease) = (self.endpoints.clone(), self.lease);
            opening.spawn(async move {
                let opened = match endpoints.connect(index).await {
                    Ok(client) => client.lease_client().keep_alive(lease).await,
                    Err(e) => Err(e),
                };
                (index, opened)
            });
        }
        let mut last = None;
        while let Some(joined) = opening.join_next().await {
            let Ok((index, opened)) = joined else {
                continue;
            };
            match opened {
                Ok(stream) => {
                    self.on = Some(index);
                    self.endpoints.prefer(index);
                    return Ok(stream);
                }
                // A definite "gone" from any member settles it.
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(m));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            etcd_client::Error::LeaseKeepAliveError("no endpoint could be reached".into())
        }))
    }

    /// Drops the stream after a failed or silent renewal; `endpoint_at_fault` moves the client
    /// on from the stream's endpoint, so the next stream opens on a live one.
    fn failed(&mut self, endpoint_at_fault: bool) {
        self.stream = None;
        self.hedge = true;
        if let (true, Some(index)) = (endpoint_at_fault, self.on.take()) {
            self.endpoints.pass_over(index);
        }
    }
}

/// How long before the lease's last confirmed expiry its holders give it up: etcd's and this
/// host's clocks may drift apart, and the loss must reach the holder before another grant.
fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(300))
}
