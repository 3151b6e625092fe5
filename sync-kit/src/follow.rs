//! What every backend's `follow()` stream shares: each leader change reported once, the first
//! error of a run of failures, and an error no retry can fix as the stream's last item.

use futures::StreamExt;
use sync_core::{FollowStream, LeaderInfo, Result};

use crate::refused_for_good;
use tokio::sync::mpsc;

/// What a follow task does after a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next change.
    Wait,
    /// The read failed for now: read again after a pause.
    Retry,
    /// The stream was dropped, or it ended on an error no retry can fix.
    Stop,
}

/// The sending side of a follow stream.
pub struct Follow {
    tx: mpsc::Sender<Result<Option<LeaderInfo>>>,
    last: Option<LeaderInfo>,
    failing: bool,
}

impl Follow {
    /// A stream that starts with `first`, and the side a backend's task reports to.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use futures::StreamExt;
    /// use sync_core::{Error, ErrorKind};
    /// use sync_kit::follow::{Follow, Next};
    ///
    /// let (mut follow, mut stream) = Follow::open(None);
    /// let refused = Error::new(ErrorKind::Unauthorized, "no rights");
    /// assert_eq!(follow.report(Err(refused)).await, Next::Stop);
    /// drop(follow);
    /// assert!(stream.next().await.unwrap().unwrap().is_none());
    /// assert!(stream.next().await.unwrap().is_err());
    /// assert!(stream.next().await.is_none(), "the stream ends");
    /// # }
    /// ```
    pub fn open(first: Option<LeaderInfo>) -> (Follow, FollowStream) {
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(Ok(first.clone()));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let follow = Follow {
            tx,
            last: first,
            failing: false,
        };
        (follow, stream.boxed())
    }

    /// Resolves once the stream is dropped.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Reports a read of the leader: a change is sent, the same leader is not; a failure is sent
    /// once per run of failures, and a refusal for good ends the stream.
    pub async fn report(&mut self, read: Result<Option<LeaderInfo>>) -> Next {
        match read {
            Ok(info) => {
                self.failing = false;
                if info == self.last {
                    return Next::Wait;
                }
                self.last = info.clone();
                self.send(Ok(info), Next::Wait).await
            }
            Err(e) if refused_for_good(&e) => {
                tracing::warn!(error = %e, "follow stream ends: the read was refused for good");
                self.send(Err(e), Next::Stop).await;
                Next::Stop
            }
            Err(e) => {
                let first = !std::mem::replace(&mut self.failing, true);
                if first {
                    return self.send(Err(e), Next::Retry).await;
                }
                Next::Retry
            }
        }
    }

    async fn send(&self, item: Result<Option<LeaderInfo>>, then: Next) -> Next {
        match self.tx.send(item).await {
            Ok(()) => then,
            Err(_) => Next::Stop,
        }
    }
}
