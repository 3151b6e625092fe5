//! Leader election on the in-process backend.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sync_core::raw::Leadership;
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, FollowStream, Leader, LeaderInfo, LossSignal, Result,
};
use tokio::sync::watch;

use sync_kit::locked;

use crate::{
    BACKEND,
    client::ClientInner,
    server::Shared,
    table::{Asker, SlotState, Table},
};

/// Every election group of a cluster, by namespaced key; the holder of a group is its leader
/// and the token its term.
pub(crate) type ElectionTable = Table<Group>;

/// What followers see; groups are never removed, so followers' streams stay connected.
pub(crate) struct Group {
    published: watch::Sender<Option<LeaderInfo>>,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            published: watch::channel(None).0,
        }
    }
}

impl Group {
    fn publish(&self, info: Option<LeaderInfo>) {
        self.published.send_replace(info);
    }
}

impl SlotState for Group {
    const KEEP_FREE: bool = true;

    fn table(shared: &Shared) -> &Table<Self> {
        &shared.elections
    }

    fn freed(&mut self) {
        self.publish(None);
    }

    fn log_lost(key: &str, term: u64, reason: &str) {
        tracing::warn!(backend = BACKEND, key, term, reason, "leadership revoked");
    }
}

/// One group's election as seen from one client: shared by the handle and its leaderships.
#[derive(Clone)]
struct Campaign {
    client: Arc<ClientInner>,
    group: String,
    key: Arc<str>,
}

impl Campaign {
    fn elections(&self) -> &ElectionTable {
        &self.client.shared.elections
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
        let deadline = wait.map(sync_kit::deadline);
        let reign = |group: &mut Group, term| {
            group.publish(Some(LeaderInfo::new(candidate, term, value.clone())));
        };
        let elections = self.elections();
        let asker = Asker {
            client: &self.client,
            owner: 0,
        };
        let won = elections.grant(asker, &self.key, deadline, reign).await?;
        let (term, signal) = won.ok_or_else(|| {
            Error::new(
                ErrorKind::Timeout,
                format!("not elected within {:?}", wait.unwrap_or_default()),
            )
            .with_backend(BACKEND)
            .with_id(&self.group)
        })?;
        tracing::info!(backend = BACKEND, group = %self.group, candidate, term, "elected");
        Ok((term, signal))
    }

    /// The current leader.
    fn current(&self) -> Option<LeaderInfo> {
        let info = |g: &mut Group| g.published.borrow().clone();
        self.elections().if_held(&self.key, None, info).flatten()
    }

    /// Whether `term` is the current reign.
    fn reigns(&self, term: u64) -> bool {
        self.elections()
            .if_held(&self.key, Some(term), |_| ())
            .is_some()
    }
}

pub(crate) struct LocalLeader {
    campaign: Campaign,
}

impl LocalLeader {
    pub(crate) fn new(client: Arc<ClientInner>, group: &str) -> Self {
        let key = Arc::from(client.key(&["leader", group]));
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

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.campaign.check_open()?;
        Ok(self.campaign.current())
    }

    async fn follow(&self) -> Result<FollowStream> {
        self.campaign.check_open()?;
        let subscribe = |g: &mut Group| g.published.subscribe();
        let rx = (self.campaign.elections()).with_state(&self.campaign.key, subscribe);
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
        if !(self.campaign.elections()).release(&self.campaign.key, self.term) {
            return Err(self.not_leading());
        }
        tracing::info!(backend = BACKEND, group = %self.campaign.group, term = self.term, "resigned");
        Ok(())
    }
}

#[async_trait]
impl Leadership for LocalLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        self.campaign.check_open()?;
        let info = LeaderInfo::new(self.candidate.clone(), self.term, value.to_vec());
        // The value is kept under the table lock, so it is always the one last published.
        let publish = |g: &mut Group| {
            g.publish(Some(info));
            *locked(&self.value) = value.to_vec();
        };
        let elections = self.campaign.elections();
        let shown = elections.if_held(&self.campaign.key, Some(self.term), publish);
        shown.ok_or_else(|| self.not_leading())
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
        // A fired signal means the reign is ending even if the table still shows it.
        if self.campaign.reigns(self.term) && !self.revoked.is_lost() {
            return Ok((self.term, self.revoked.clone()));
        }
        let value = locked(&self.value).clone();
        let (term, signal) = self.campaign.win(&self.candidate, value, None).await?;
        self.term = term;
        self.revoked = signal.clone();
        Ok((term, signal))
    }
}
