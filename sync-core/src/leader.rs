//! Leader election.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::{LossSignal, Result};

/// Options for [`Leader::elect`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ElectOptions {
    /// How long to wait to become leader; `None` waits until elected.
    pub wait: Option<Duration>,
    /// The value followers see once this candidate leads (see [`Elected::proclaim`]).
    pub value: Vec<u8>,
}

impl ElectOptions {
    /// Default options: wait forever, empty value.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bounds the wait; past it, elect fails with [`ErrorKind::Timeout`](crate::ErrorKind).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The initial proclaimed value.
    pub fn with_value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = value.into();
        self
    }
}

/// Who leads a group, as followers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaderInfo {
    /// The leading candidate's id.
    pub candidate: String,
    /// The leadership's term: strictly increases across leaderships of the group.
    pub term: u64,
    /// The last proclaimed value.
    pub value: Vec<u8>,
}

impl LeaderInfo {
    /// Built by backends.
    pub fn new(candidate: impl Into<String>, term: u64, value: Vec<u8>) -> Self {
        LeaderInfo {
            candidate: candidate.into(),
            term,
            value,
        }
    }
}

/// A stream of leader changes: `None` while the group has no leader.
pub type FollowStream = BoxStream<'static, Result<Option<LeaderInfo>>>;

/// Leader election within one group; the handle is bound to its group.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::sync::Arc;
/// use sync_core::{Backend, ElectOptions, Leader};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let leader: Arc<dyn Leader> = client.leader("billing")?;
///
/// let elected = leader.elect("node-1", ElectOptions::new()).await?;
/// elected.proclaim(b"http://node-1:8080").await?;
/// let now = leader.leader().await?.expect("a leader");
/// assert_eq!((now.candidate.as_str(), now.term), ("node-1", elected.term()));
/// elected.resign().await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Leader: Send + Sync {
    /// The election group of this handle.
    fn group(&self) -> &str;

    /// Waits until `candidate` leads the group.
    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected>;

    /// The current leader, if any.
    async fn leader(&self) -> Result<Option<LeaderInfo>>;

    /// Leader changes, starting with the current state. Never reports two leaders at once.
    /// A failed read is reported once and retried; an error no retry can fix (Unauthorized,
    /// InvalidArgument) is the stream's last item.
    async fn follow(&self) -> Result<FollowStream>;
}

/// The backend side of a leadership, boxed inside an [`Elected`].
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Updates the value followers see.
    async fn proclaim(&self, value: &[u8]) -> Result<()>;

    /// Steps down so the next candidate is elected promptly.
    async fn resign(&mut self) -> Result<()>;

    /// Steps down without waiting (called from `Drop`): must not block.
    fn resign_in_background(self: Box<Self>);

    /// Campaigns again with the same candidate id after a loss; returns the new term and loss
    /// signal. Returns the current ones at once if still leading.
    async fn reelect(&mut self) -> Result<(u64, LossSignal)>;
}

/// Leadership of a group. Dropping it resigns in the background.
#[must_use = "dropping Elected resigns leadership"]
pub struct Elected {
    candidate: String,
    term: u64,
    revoked: LossSignal,
    inner: Option<Box<dyn Leadership>>,
}

impl Elected {
    /// Built by backends.
    pub fn new(
        candidate: impl Into<String>,
        term: u64,
        revoked: LossSignal,
        inner: Box<dyn Leadership>,
    ) -> Self {
        Elected {
            candidate: candidate.into(),
            term,
            revoked,
            inner: Some(inner),
        }
    }

    /// The candidate id.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// The term: a fencing token that strictly increases across leaderships of the group.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Resolves (with the reason) once leadership is lost.
    pub async fn revoked(&self) -> String {
        self.revoked.wait().await
    }

    /// Whether leadership has been lost.
    pub fn is_revoked(&self) -> bool {
        self.revoked.is_lost()
    }

    /// A clone of the revocation signal, to watch from another task.
    pub fn revocation_signal(&self) -> LossSignal {
        self.revoked.clone()
    }

    /// For wrappers around a backend (sync-kit's checking layer): replaces the backend side of
    /// the leadership, keeping its candidate, term and revocation signal.
    pub fn map_leadership(
        mut self,
        f: impl FnOnce(Box<dyn Leadership>) -> Box<dyn Leadership>,
    ) -> Self {
        self.inner = self.inner.take().map(f);
        self
    }

    /// Updates the value followers see.
    pub async fn proclaim(&self, value: &[u8]) -> Result<()> {
        self.inner().proclaim(value).await
    }

    /// Steps down and hands over to the next candidate.
    pub async fn resign(mut self) -> Result<()> {
        match self.inner.take() {
            Some(mut inner) => inner.resign().await,
            None => Ok(()),
        }
    }

    /// After a loss, waits to lead again (new term); at once if still leading.
    pub async fn reelect(&mut self) -> Result<()> {
        let inner = self
            .inner
            .as_mut()
            .expect("inner is only taken by resign(self)");
        let (term, revoked) = inner.reelect().await?;
        self.term = term;
        self.revoked = revoked;
        Ok(())
    }

    fn inner(&self) -> &dyn Leadership {
        self.inner
            .as_deref()
            .expect("inner is only taken by resign(self)")
    }
}

impl Drop for Elected {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.resign_in_background();
        }
    }
}

impl std::fmt::Debug for Elected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elected")
            .field("candidate", &self.candidate)
            .field("term", &self.term)
            .field("revoked", &self.revoked.is_lost())
            .finish()
    }
}
