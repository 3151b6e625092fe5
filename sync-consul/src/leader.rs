//! Leader election on Consul: the lock mechanism on the group's key `<ns>/<group>/.leader`,
//! whose value is the term, the candidate and its value; the term is the ModifyIndex of the
//! acquiring write. `follow` waits on the key with blocking queries.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use sync_core::raw::Leadership;
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, FollowStream, Leader, LeaderInfo, LossSignal, Result,
};
use sync_kit::follow::{Follow, Next};
use sync_kit::locked;

use crate::{
    BACKEND,
    api::{KvEntry, KvOp, Txn},
    client::ClientInner,
    contend::{Contender, Grant, release},
};

/// A leader key's value: the term, the escaped candidate, the value, separated by newlines.
/// Until the first proclamation the term is `~` and a nonce: the acquiring write's ModifyIndex
/// is not known before it is made, and the nonce makes that write a new one (see
/// [`nonce`](crate::contend::nonce)).
fn encode(term: Option<u64>, candidate: &str, value: &[u8]) -> Vec<u8> {
    let term = term.map_or_else(
        || format!("~{}", crate::contend::nonce()),
        |t| t.to_string(),
    );
    let mut out = format!("{term}\n{}\n", sync_core::id::escape(candidate)).into_bytes();
    out.extend_from_slice(value);
    out
}

fn decode(entry: &KvEntry) -> Option<LeaderInfo> {
    entry.session.as_ref()?;
    let mut parts = entry.value.splitn(3, |b| *b == b'\n');
    let term = std::str::from_utf8(parts.next()?).ok()?;
    let candidate = sync_core::id::unescape(std::str::from_utf8(parts.next()?).ok()?)?;
    let value = parts.next()?.to_vec();
    let term = if term.starts_with('~') {
        entry.modify_index
    } else {
        term.parse().ok()?
    };
    Some(LeaderInfo::new(candidate, term, value))
}

pub(crate) struct ConsulLeader {
    client: Arc<ClientInner>,
    group: String,
    key: String,
}

impl ConsulLeader {
    pub(crate) fn new(client: Arc<ClientInner>, group: &str) -> Self {
        ConsulLeader {
            key: client.leader_key(group),
            client,
            group: group.to_string(),
        }
    }
}

/// Campaigns until elected (or `wait` passes).
async fn campaign(
    client: &Arc<ClientInner>,
    group: &str,
    key: &str,
    candidate: &str,
    value: &[u8],
    wait: Option<Duration>,
) -> Result<Grant> {
    let payload = encode(None, candidate, value);
    Contender {
        client,
        key,
        value: &payload,
    }
    .wait(&format!("election {group:?}"), wait)
    .await
    .map_err(|e| e.with_id(group))
}

/// The current leader, and the index to block on for the next change.
async fn read_leader(
    client: &ClientInner,
    key: &str,
    index: u64,
) -> Result<(Option<LeaderInfo>, u64)> {
    let read = client.api.get("reading the leader", key, index).await?;
    Ok((read.value.as_ref().and_then(decode), read.index))
}

#[async_trait]
impl Leader for ConsulLeader {
    fn group(&self) -> &str {
        &self.group
    }

    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected> {
        let grant = campaign(
            &self.client,
            &self.group,
            &self.key,
            candidate,
            &opts.value,
            opts.wait,
        )
        .await?;
        tracing::debug!(backend = BACKEND, group = %self.group, candidate, term = grant.token, "elected");
        Ok(Elected::new(
            candidate,
            grant.token,
            grant.lost.clone(),
            Box::new(ConsulLeadership {
                client: self.client.clone(),
                group: self.group.clone(),
                key: self.key.clone(),
                candidate: candidate.to_string(),
                value: Mutex::new(opts.value),
                index: Mutex::new(Some(grant.token)),
                grant: Some(grant),
            }),
        ))
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.client.check_alive()?;
        Ok(read_leader(&self.client, &self.key, 0)
            .await
            .map_err(|e| e.with_id(&self.group))?
            .0)
    }

    async fn follow(&self) -> Result<FollowStream> {
        self.client.check_alive()?;
        let (first, index) = read_leader(&self.client, &self.key, 0)
            .await
            .map_err(|e| e.with_id(&self.group))?;
        let (follow, stream) = Follow::open(first);
        let follower = Follower {
            client: self.client.clone(),
            key: self.key.clone(),
            follow,
        };
        tokio::spawn(follower.run(index));
        Ok(stream)
    }
}

struct Follower {
    client: Arc<ClientInner>,
    key: String,
    follow: Follow,
}

impl Follower {
    /// Blocks on the leader key's index and reports the leader whenever it changed. Ends when
    /// the stream is dropped, the client killed, or a read refused for good.
    async fn run(mut self, mut index: u64) {
        let mut killed = self.client.killed();
        loop {
            let read = tokio::select! {
                r = read_leader(&self.client, &self.key, index.max(1)) => r,
                () = self.follow.closed() => return,
                _ = killed.wait_for(|k| *k) => return,
            };
            if let Ok((_, at)) = &read {
                // An index that goes back (a restored server) starts the wait over.
                index = if *at < index { 0 } else { *at };
            }
            match self.follow.report(read.map(|(info, _)| info)).await {
                Next::Wait => {}
                Next::Retry => tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = killed.wait_for(|k| *k) => return,
                },
                Next::Stop => return,
            }
        }
    }
}

struct ConsulLeadership {
    client: Arc<ClientInner>,
    group: String,
    key: String,
    candidate: String,
    value: Mutex<Vec<u8>>,
    /// The key's ModifyIndex as this leadership last wrote it, which its release is guarded
    /// by; None for good once a proclamation's outcome was unknown.
    index: Mutex<Option<u64>>,
    grant: Option<Grant>,
}

impl ConsulLeadership {
    fn lost(&self, why: &str) -> Error {
        Error::new(ErrorKind::LockLost, why.to_string())
            .with_backend(BACKEND)
            .with_id(&self.group)
    }
}

#[async_trait]
impl Leadership for ConsulLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let grant = self
            .grant
            .as_ref()
            .ok_or_else(|| self.lost("this leadership was resigned"))?;
        let payload = encode(Some(grant.token), &self.candidate, value);
        let session = &grant.session.id;
        // The session check first: a lock by this session would otherwise take a key its
        // session lost.
        let ops = [
            KvOp::check_session(&self.key, session),
            KvOp::lock(&self.key, session, &payload),
        ];
        // Writing the same value twice is harmless: an unanswered proclamation is resent once.
        let mut resent = false;
        let answer = loop {
            match self.client.api.txn("proclaiming", &ops).await {
                Ok(answer) => break answer,
                Err(f) if f.unknown() && !resent => {
                    resent = true;
                    *locked(&self.index) = None;
                }
                Err(f) => return Err(f.error().with_id(&self.group)),
            }
        };
        let entries = match answer {
            Txn::Done(entries) => entries,
            Txn::RolledBack(_) => {
                return Err(
                    self.lost("leadership was lost: its session ended or another took the key")
                );
            }
        };
        {
            let mut index = locked(&self.index);
            let written = entries.get(1).cloned().flatten().map(|e| e.modify_index);
            *index = index.and(written);
        }
        *locked(&self.value) = value.to_vec();
        Ok(())
    }

    async fn resign(&mut self) -> Result<()> {
        let Some(grant) = self.grant.take() else {
            return Ok(());
        };
        let safe = !grant.lost.is_lost();
        self.client.sessions.forget(&grant.registration);
        let index = *locked(&self.index);
        let held = release(&self.client, &self.key, &grant.session.id, index, safe)
            .await
            .map_err(|e| e.with_id(&self.group))?;
        drop(grant.turn);
        if held {
            Ok(())
        } else {
            Err(self.lost("leadership was already lost at resignation"))
        }
    }

    fn resign_in_background(mut self: Box<Self>) {
        if let Some(grant) = self.grant.take() {
            let index = *locked(&self.index);
            crate::lock::give_back_in_background(
                self.client.clone(),
                self.group.clone(),
                self.key.clone(),
                grant,
                index,
            );
        }
    }

    async fn reelect(&mut self) -> Result<(u64, LossSignal)> {
        if let Some(g) = self.grant.as_ref().filter(|g| !g.lost.is_lost()) {
            return Ok((g.token, g.lost.clone()));
        }
        if let Some(old) = self.grant.take() {
            self.client.sessions.forget(&old.registration);
            let index = *locked(&self.index);
            let _ = release(&self.client, &self.key, &old.session.id, index, false).await;
            drop(old.turn);
        }
        let value = locked(&self.value).clone();
        let grant = campaign(
            &self.client,
            &self.group,
            &self.key,
            &self.candidate,
            &value,
            None,
        )
        .await?;
        let out = (grant.token, grant.lost.clone());
        *locked(&self.index) = Some(grant.token);
        self.grant = Some(grant);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &[u8], session: Option<&str>) -> KvEntry {
        KvEntry {
            key: "k".into(),
            flags: 0,
            value: value.to_vec(),
            session: session.map(String::from),
            lock_index: 1,
            create_index: 5,
            modify_index: 9,
        }
    }

    #[test]
    fn values_round_trip_with_and_without_a_term() {
        let fresh = entry(&encode(None, "a\nb", b"v\n1"), Some("s"));
        assert_ne!(encode(None, "c", b""), encode(None, "c", b""));
        assert_eq!(
            decode(&fresh),
            Some(LeaderInfo::new("a\nb", 9, b"v\n1".to_vec()))
        );
        let proclaimed = entry(&encode(Some(7), "c", b""), Some("s"));
        assert_eq!(
            decode(&proclaimed),
            Some(LeaderInfo::new("c", 7, Vec::new()))
        );
        // A key no session holds has no leader.
        assert_eq!(decode(&entry(&encode(None, "c", b""), None)), None);
    }
}
