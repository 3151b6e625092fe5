//! Leader election on etcd, with the layout of etcd's `concurrency.Election`: candidates are
//! contender keys `<ns>/<escaped group>/<lease-hex>` whose value is the proclaimed value; the
//! leader is the key with the lowest create revision, and its create revision is the term.
//!
//! The candidate id travels inside the value: `\0sync\0<candidate>\0<value>`. A leader elected
//! by another client (`etcdctl elect NAME PROPOSAL`, a Go `concurrency.Election`) shows with its
//! proposal as both the candidate (lossy UTF-8) and the value.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, WatchOptions};
use sync_core::raw::Leadership;
use sync_core::{
    ElectOptions, Elected, Error, ErrorKind, FollowStream, Leader, LeaderInfo, LossSignal, Result,
};
use tracing::Instrument;

use sync_kit::follow::{Follow, Next};
use sync_kit::locked;

use crate::{
    BACKEND,
    client::ClientInner,
    contention::{Holding, contend, first_created},
    error::etcd_err,
};

const MAGIC: &[u8] = b"\0sync\0";

fn encode(candidate: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + candidate.len() + 1 + value.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(candidate.as_bytes());
    out.push(0);
    out.extend_from_slice(value);
    out
}

fn decode(raw: &[u8]) -> (String, Vec<u8>) {
    if let Some(rest) = raw.strip_prefix(MAGIC) {
        if let Some(nul) = rest.iter().position(|b| *b == 0) {
            return (
                String::from_utf8_lossy(&rest[..nul]).into_owned(),
                rest[nul + 1..].to_vec(),
            );
        }
    }
    (String::from_utf8_lossy(raw).into_owned(), raw.to_vec())
}

/// The current leader of `prefix` and the revision it was read at.
async fn read_leader(
    client: &ClientInner,
    group: &str,
    prefix: &str,
) -> Result<(Option<LeaderInfo>, i64)> {
    let resp = client
        .kv()
        .get(prefix, Some(first_created()))
        .await
        .map_err(|e| etcd_err("reading the leader", e).with_id(group))?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
    let info = resp.kvs().first().map(|kv| {
        let (candidate, value) = decode(kv.value());
        LeaderInfo::new(candidate, kv.create_revision() as u64, value)
    });
    Ok((info, rev))
}

pub(crate) struct EtcdLeader {
    client: Arc<ClientInner>,
    group: String,
    prefix: String,
}

impl EtcdLeader {
    pub(crate) fn new(client: Arc<ClientInner>, group: &str) -> Self {
        let prefix = client.contender_prefix(group);
        EtcdLeader {
            client,
            group: group.to_string(),
            prefix,
        }
    }
}

/// Campaigns until elected (or the wait runs out).
async fn campaign(
    client: &Arc<ClientInner>,
    group: &str,
    prefix: &str,
    candidate: &str,
    value: &[u8],
    wait: Option<std::time::Duration>,
) -> Result<Holding> {
    let c = contend(
        client,
        "leadership",
        group,
        prefix,
        encode(candidate, value),
        wait,
    )
    .await?;
    Ok(Holding::start(c))
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and group.
#[async_trait]
impl Leader for EtcdLeader {
    fn group(&self) -> &str {
        &self.group
    }

    async fn elect(&self, candidate: &str, opts: ElectOptions) -> Result<Elected> {
        self.client.check_alive()?;
        let holding = campaign(
            &self.client,
            &self.group,
            &self.prefix,
            candidate,
            &opts.value,
            opts.wait,
        )
        .await?;
        let (term, lost) = (holding.rev as u64, holding.lost.clone());
        tracing::debug!(backend = BACKEND, group = %self.group, candidate, term, "elected");
        Ok(Elected::new(
            candidate,
            term,
            lost,
            Box::new(EtcdLeadership {
                client: self.client.clone(),
                group: self.group.clone(),
                prefix: self.prefix.clone(),
                candidate: candidate.to_string(),
                value: Mutex::new(opts.value),
                holding: Some(holding),
            }),
        ))
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.client.check_alive()?;
        Ok(read_leader(&self.client, &self.group, &self.prefix)
            .await?
            .0)
    }

    async fn follow(&self) -> Result<FollowStream> {
        self.client.check_alive()?;
        let (first, rev) = read_leader(&self.client, &self.group, &self.prefix).await?;
        let (follow, stream) = Follow::open(first);
        tokio::spawn(follow_task(
            self.client.clone(),
            self.group.clone(),
            self.prefix.clone(),
            rev,
            follow,
        ));
        Ok(stream)
    }
}

/// Watches the group's prefix; on every change re-reads the leader and reports it. Ends when
/// the stream is dropped, the client killed, or a read refused for good.
async fn follow_task(
    client: Arc<ClientInner>,
    group: String,
    prefix: String,
    mut rev: i64,
    mut follow: Follow,
) {
    let mut killed = client.killed();
    loop {
        let changed = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        tokio::select! {
            _ = client.watch_once(prefix.as_str(), changed, client.recheck_every()) => {}
            // A watch can sit silently on a member cut off from the quorum: re-read anyway.
            _ = tokio::time::sleep(crate::contention::FALLBACK_POLL) => {}
            _ = follow.closed() => return,
            _ = killed.wait_for(|k| *k) => return,
        }
        let read = read_leader(&client, &group, &prefix).await;
        if let Ok((_, at)) = &read {
            rev = *at;
        }
        match follow.report(read.map(|(info, _)| info)).await {
            Next::Wait => {}
            Next::Retry => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
            Next::Stop => return,
        }
    }
}

struct EtcdLeadership {
    client: Arc<ClientInner>,
    group: String,
    prefix: String,
    candidate: String,
    value: Mutex<Vec<u8>>,
    holding: Option<Holding>,
}

impl EtcdLeadership {
    fn lost_error(&self, why: &str) -> Error {
        Error::new(ErrorKind::LockLost, why.to_string())
            .with_backend(BACKEND)
            .with_id(&self.group)
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive and group.
#[async_trait]
impl Leadership for EtcdLeadership {
    async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let Some(h) = self.holding.as_ref() else {
            return Err(self.lost_error("leadership was resigned"));
        };
        if h.lost.is_lost() {
            return Err(self.lost_error("leadership was lost"));
        }
        let key = h.key.text();
        let txn = Txn::new()
            .when([Compare::create_revision(&*key, CompareOp::Equal, h.rev)])
            .and_then([TxnOp::put(
                key,
                encode(&self.candidate, value),
                Some(PutOptions::new().with_lease(h.session.lease)),
            )]);
        let resp = self
            .client
            .kv()
            .txn(txn)
            .await
            .map_err(|e| etcd_err("proclaiming", e).with_id(&self.group))?;
        if !resp.succeeded() {
            return Err(self.lost_error("leadership was lost (the candidate key is gone)"));
        }
        *locked(&self.value) = value.to_vec();
        Ok(())
    }

    async fn resign(&mut self) -> Result<()> {
        let holding = self.holding.take();
        match holding {
            Some(h) => h.release(&self.group).await,
            None => Err(
                Error::new(ErrorKind::NotHeld, "leadership was already resigned")
                    .with_backend(BACKEND)
                    .with_id(&self.group),
            ),
        }
    }

    fn resign_in_background(self: Box<Self>) {
        // Dropping the holding spawns the delete of the candidate key.
    }

    async fn reelect(&mut self) -> Result<(u64, LossSignal)> {
        if let Some(h) = self.holding.as_ref().filter(|h| !h.lost.is_lost()) {
            return Ok((h.rev as u64, h.lost.clone()));
        }
        // Deletes the old key (if any) first: the local turn orders it before the new campaign.
        drop(self.holding.take());
        let value = locked(&self.value).clone();
        let holding = campaign(&self.client, &self.group, &self.prefix, &self.candidate, &value, None)
            .instrument(tracing::debug_span!("reelect", backend = BACKEND, primitive = "leader", id = %self.group))
            .await?;
        let out = (holding.rev as u64, holding.lost.clone());
        self.holding = Some(holding);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        assert_eq!(
            decode(&encode("node-1", b"v")),
            ("node-1".to_string(), b"v".to_vec())
        );
        assert_eq!(decode(&encode("n", b"")), ("n".to_string(), Vec::new()));
        assert_eq!(decode(b"plain"), ("plain".to_string(), b"plain".to_vec()));
    }
}
