//! Leader election on the in-process backend.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use async_trait::async_trait;
use sync_core::raw::{Leadership, LossTrigger, loss_signal};
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, FollowStream, Leader, LeaderInfo, LossSignal, Result,
};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::{
    BACKEND,
    client::{ClientInner, Shared, locked},
};

/// Every election group of a cluster, by namespaced key.
#[derive(Default)]
pub(crate) struct ElectionTable {
    groups: Mutex<HashMap<String, Group>>,
    resigned: Notify,
}

struct Group {
    reign: Option<Reign>,
    /// What followers see; groups are never removed, so followers' streams stay connected.
    published: watch::Sender<Option<LeaderInfo>>,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            reign: None,
            published: watch::channel(None).0,
        }
    }
}

struct Reign {
    info: LeaderInfo,
    session: u64,
    registration: u64,
    trigger: LossTrigger,
}

impl ElectionTable {
    /// Ends the reign `term` of `key` if it is still current, returning its session and
    /// registration. With `lost`, the leader's signal fires under the table lock, so it hears of
    /// the loss before anyone else can be elected.
    fn end(&self, key: &str, term: u64, lost: Option<&str>) -> Option<(u64, u64)> {
        let mut groups = locked(&self.groups);
        let group = groups.get_mut(key)?;
        if group.reign.as_ref().is_none_or(|r| r.info.term != term) {
            return None;
        }
        let reign = group.reign.take()?;
        if let Some(reason) = lost {
            reign.trigger.fire(reason);
        }
        group.published.send_replace(None);
        drop(groups);
        self.resigned.notify_waiters();
        Some((reign.session, reign.registration))
    }

    fn current(&self, key: &str) -> Option<LeaderInfo> {
        let groups = locked(&self.groups);
        groups
            .get(key)
            .and_then(|g| g.reign.as_ref().map(|r| r.info.clone()))
    }
}

/// One group's election as seen from one client: shared by the handle and its leaderships.
#[derive(Clone)]
struct Campaign {
    client: Arc<ClientInner>,
    group: String,
    key: String,
}

impl Campaign {
    fn shared(&self) -> &Arc<Shared> {
        &self.client.shared
    }

    /// Err(Closed), naming the group, once the client was killed.
    fn check_open(&self) -> Result<()> {
        self.client.check_open().map_err(|e| e.with_id(&self.group))
    }

    /// Waits until `candidate` reigns; returns its term and revocation signal.
    async fn win(
        &self,
        candidate: &str,
        value: Vec<u8>,
        wait: Option<std::time::Duration>,
    ) -> Result<(u64, LossSignal)> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            let resigned = self.shared().elections.resigned.notified();
            tokio::pin!(resigned);
            resigned.as_mut().enable();
            if let Some(won) = self.try_win(candidate, &value)? {
                return Ok(won);
            }
            match deadline {
                Some(d) => tokio::time::timeout_at(d, resigned).await.map_err(|_| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("not elected within {:?}", wait.unwrap_or_default()),
                    )
                    .with_backend(BACKEND)
                    .with_id(&self.group)
                })?,
                None => resigned.await,
            }
        }
    }

    fn try_win(&self, candidate: &str, value: &[u8]) -> Result<Option<(u64, LossSignal)>> {
        let shared = self.shared();
        loop {
            let session = self.client.session()?;
            let mut groups = locked(&shared.elections.groups);
            let group = groups.entry(self.key.clone()).or_default();
            if group.reign.is_some() {
                return Ok(None);
            }
            let term = shared.next_revision();
            let (trigger, signal) = loss_signal();
            let on_end = {
                let weak = Arc::downgrade(shared);
                let key = self.key.clone();
                Box::new(move |reason: &str| depose(&weak, &key, term, reason))
            };
            // The session may have been revoked since `session()` looked: this candidate never
            // led, so it retries on a fresh session instead of reporting a loss.
            let Ok(registration) = shared.on_session_end(session, on_end) else {
                continue;
            };
            let info = LeaderInfo::new(candidate, term, value.to_vec());
            group.published.send_replace(Some(info.clone()));
            group.reign = Some(Reign {
                info,
                session,
                registration,
                trigger,
            });
            tracing::info!(backend = BACKEND, group = %self.group, candidate, term, "elected");
            return Ok(Some((term, signal)));
        }
    }
}

/// Session-end callback: the leader hears of the loss before anyone else can be elected.
fn depose(shared: &Weak<Shared>, key: &str, term: u64, reason: &str) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    if shared.elections.end(key, term, Some(reason)).is_some() {
        tracing::warn!(backend = BACKEND, key, term, reason, "leadership revoked");
    }
}

pub(crate) struct LocalLeader {
    campaign: Campaign,
}

impl LocalLeader {
    pub(crate) fn new(client: Arc<ClientInner>, group: &str) -> Self {
        let key = client.key(&["leader", group]);
        LocalLeader {
            campaign: Campaign {
                client,
                group: group.to_string(),
                key,
            },
        }
    }
}

#[async_trait]
impl Leader for LocalLeader {
    fn group(&self) -> &str {
        &self.campaign.group
    }

    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected> {
        let span = tracing::debug_span!("elect", backend = BACKEND, primitive = "leader", id = %self.campaign.group, candidate);
        async {
            sync_core::id::validate("candidate id", candidate)
                .map_err(|e| e.with_backend(BACKEND))?;
            let (term, signal) = self
                .campaign
                .win(candidate, opts.value.clone(), opts.wait)
                .await?;
            let inner = LocalLeadership {
                campaign: self.campaign.clone(),
                candidate: candidate.to_string(),
                term,
                revoked: signal.clone(),
                value: Mutex::new(opts.value),
            };
            Ok(Elected::new(candidate, term, signal, Box::new(inner)))
        }
        .instrument(span)
        .await
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "leader", id = %self.campaign.group))]
    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.campaign.check_open()?;
        Ok(self.campaign.shared().elections.current(&self.campaign.key))
    }

    #[tracing::instrument(level = "debug", skip(self), fields(backend = BACKEND, primitive = "leader", id = %self.campaign.group))]
    async fn follow(&self) -> Result<FollowStream> {
        self.campaign.check_open()?;
        let rx = {
            let mut groups = locked(&self.campaign.shared().elections.groups);
            let group = groups.entry(self.campaign.key.clone()).or_default();
            group.published.subscribe()
        };
        let first = rx.borrow().clone();
        let changes = futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let now = rx.borrow_and_update().clone();
            Some((Ok(now), rx))
        });
        let stream = futures::stream::StreamExt::chain(futures::stream::iter([Ok(first)]), changes);
        Ok(Box::pin(stream))
    }
}

struct LocalLeadership {
    campaign: Campaign,
    candidate: String,
    term: u64,
    revoked: LossSignal,
    /// The last proclaimed value, carried into a re-election.
    value: Mutex<Vec<u8>>,
}

impl LocalLeadership {
    fn not_leading(&self) -> Error {
        let (kind, msg) = if self.revoked.is_lost() {
            (ErrorKind::LockLost, "leadership was revoked")
        } else {
            (ErrorKind::NotHeld, "this candidate no longer leads")
        };
        Error::new(kind, msg)
            .with_backend(BACKEND)
            .with_id(&self.campaign.group)
    }

    fn step_down(&self) -> Result<()> {
        // A killed client resigns nothing: its leadership ends when its session expires.
        self.campaign.check_open()?;
        let shared = self.campaign.shared();
        match shared.elections.end(&self.campaign.key, self.term, None) {
            Some((session, registration)) => {
                shared.cancel_on_end(session, registration);
                tracing::info!(backend = BACKEND, group = %self.campaign.group, term = self.term, "resigned");
                Ok(())
            }
            None => Err(self.not_leading()),
        }
    }
}

#[async_trait]
impl Leadership for LocalLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        self.campaign.check_open()?;
        let mut groups = locked(&self.campaign.shared().elections.groups);
        let group = groups.get_mut(&self.campaign.key);
        let Some(group) =
            group.filter(|g| g.reign.as_ref().is_some_and(|r| r.info.term == self.term))
        else {
            return Err(self.not_leading());
        };
        let info = LeaderInfo::new(self.candidate.clone(), self.term, value.to_vec());
        group.published.send_replace(Some(info.clone()));
        if let Some(reign) = group.reign.as_mut() {
            reign.info = info;
        }
        *locked(&self.value) = value.to_vec();
        Ok(())
    }

    async fn resign(&mut self) -> Result<()> {
        self.step_down()
    }

    fn resign_in_background(self: Box<Self>) {
        // In-process state is freed at once; not leading any more is not an error here.
        let _ = self.step_down();
    }

    async fn reelect(&mut self) -> Result<(u64, LossSignal)> {
        self.campaign.check_open()?;
        let current = self.campaign.shared().elections.current(&self.campaign.key);
        // A fired signal means the reign is ending even if the table still shows it.
        if current.as_ref().is_some_and(|c| c.term == self.term) && !self.revoked.is_lost() {
            return Ok((self.term, self.revoked.clone()));
        }
        let value = locked(&self.value).clone();
        let (term, signal) = self.campaign.win(&self.candidate, value, None).await?;
        self.term = term;
        self.revoked = signal.clone();
        Ok((term, signal))
    }
}
