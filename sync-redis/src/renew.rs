//! The renewer of a client's held keys: one task per client renews every held lock and
//! leadership every third of the TTL, in one script call per cluster node (one in all on a
//! server), and signals each key's loss.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sync_core::raw::{LeaseClock, LossTrigger, loss_signal_until};
use sync_core::{LossSignal, Result};
use sync_kit::locked;
use tokio::{sync::watch, task::AbortHandle, time::Instant};

use crate::{
    BACKEND,
    conn::Conn,
    error::redis_err,
    keys::{RELEASE, RENEW, slot},
};

/// A key this client holds.
struct Held {
    key: Arc<str>,
    owner: Arc<str>,
    channel: Arc<str>,
    trigger: LossTrigger,
    clock: LeaseClock,
}

type Table = Arc<Mutex<HashMap<u64, Held>>>;

pub(crate) struct Renewals {
    held: Table,
    next: AtomicU64,
    conn: Conn,
    ttl: Duration,
    task: Mutex<Option<AbortHandle>>,
}

const PAST_DEADLINE: &str = "the lease's safe deadline passed without a confirmed renewal";

/// How far before the key's expiry the holder stops trusting it: the key is only known to be
/// held until the renewal's send time plus the TTL, and the server's clock may run a little
/// fast.
pub(crate) fn safety_margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(100))
}

impl Renewals {
    pub(crate) fn start(conn: Conn, ttl: Duration, killed: watch::Receiver<bool>) -> Renewals {
        let held: Table = Default::default();
        let renewer = Renewer {
            held: held.clone(),
            conn: conn.clone(),
            ttl,
        };
        let task = tokio::spawn(renewer.run(killed)).abort_handle();
        Renewals {
            held,
            next: AtomicU64::new(0),
            conn,
            ttl,
            task: Mutex::new(Some(task)),
        }
    }

    /// Adds a key granted by a request sent at `sent`: it is safe until `sent` + TTL − margin
    /// unless renewed. Returns its registration and loss signal. After `stop`, the signal is
    /// lost at once.
    pub(crate) fn register(
        &self,
        key: &str,
        owner: &str,
        channel: &str,
        sent: Instant,
    ) -> (u64, LossSignal) {
        let clock = LeaseClock::new(sent + self.ttl - safety_margin(self.ttl));
        let (trigger, signal) = loss_signal_until(clock.deadline());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if locked(&self.task).is_none() {
            trigger.fire("client is closed or was killed");
            return (id, signal);
        }
        let held = Held {
            key: key.into(),
            owner: owner.into(),
            channel: channel.into(),
            trigger,
            clock,
        };
        locked(&self.held).insert(id, held);
        (id, signal)
    }

    /// Stops renewing a key (its holder releases it). Whether it was still registered.
    pub(crate) fn forget(&self, id: u64) -> bool {
        locked(&self.held).remove(&id).is_some()
    }

    /// Ends every held key: the holders learn first, then the keys are deleted (owner-checked)
    /// and the releases published.
    pub(crate) async fn release_all(&self, reason: &str) -> Result<()> {
        let all: Vec<Held> = locked(&self.held).drain().map(|(_, h)| h).collect();
        for h in &all {
            h.trigger.fire(reason);
        }
        let deletes = all.iter().map(|h| {
            let conn = self.conn.clone();
            async move {
                conn.eval::<i64>(
                    &RELEASE,
                    &[&h.key],
                    &[h.owner.as_bytes(), h.channel.as_bytes()],
                )
                .await
            }
        });
        for r in futures::future::join_all(deletes).await {
            r.map_err(|e| redis_err("releasing a held key", e))?;
        }
        Ok(())
    }

    /// Stops the renewer: every signal it guards is lost.
    pub(crate) fn stop(&self) {
        if let Some(task) = locked(&self.task).take() {
            task.abort();
        }
        locked(&self.held).clear();
    }
}

struct Renewer {
    held: Table,
    conn: Conn,
    ttl: Duration,
}

/// Clears the table when the renewer ends, however it ends (abort, panic): dropping the clocks
/// and triggers loses every signal.
struct ClearOnDrop(Table);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        locked(&self.0).clear();
    }
}

/// One key of a renewal call: registration, key, owner.
type Due = (u64, Arc<str>, Arc<str>);

impl Renewer {
    async fn run(self, mut killed: watch::Receiver<bool>) {
        let _clear = ClearOnDrop(self.held.clone());
        let every = self.ttl / 3;
        let retry = (self.ttl / 10).min(Duration::from_millis(250));
        let mut pause = every;
        let mut nodes = None;
        loop {
            tokio::select! {
                _ = killed.wait_for(|k| *k) => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = if self.renew_all(&mut nodes).await {
                every
            } else {
                retry
            };
        }
    }

    /// One round: every held key, in one call per cluster node (one in all on a server).
    /// False if any call failed.
    async fn renew_all(&self, nodes: &mut Option<Nodes>) -> bool {
        self.drop_expired();
        let due: Vec<Due> = locked(&self.held)
            .iter()
            .map(|(id, h)| (*id, h.key.clone(), h.owner.clone()))
            .collect();
        if due.is_empty() {
            return true;
        }
        if !self.conn.is_cluster() {
            return self.renew(due).await;
        }
        if nodes.is_none() {
            *nodes = Nodes::read(&self.conn).await;
        }
        let groups = group_by_node(due, nodes.as_ref());
        let calls = groups.into_iter().map(|g| self.renew(g));
        let ok = futures::future::join_all(calls)
            .await
            .into_iter()
            .all(|ok| ok);
        if !ok {
            // Slots may have moved: read the map again next round.
            *nodes = None;
        }
        ok
    }

    /// Renews one group in one call; confirms the renewed keys' deadlines and fires the loss of
    /// the keys found gone or owned by another.
    async fn renew(&self, group: Vec<Due>) -> bool {
        let sent = Instant::now();
        // Only the first key is declared: Redis Cluster refuses declared keys of several
        // slots, while the script may touch undeclared keys of its node (see RENEW).
        let first = [&*group[0].1];
        let ttl_ms = self.ttl.as_millis().to_string();
        let mut args: Vec<&[u8]> = vec![ttl_ms.as_bytes()];
        for d in &group {
            args.extend([d.1.as_bytes(), d.2.as_bytes()]);
        }
        let gone: Vec<usize> = match self.conn.eval(&RENEW, &first, &args).await {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(backend = BACKEND, error = %e, keys = group.len(), "renewal failed");
                return false;
            }
        };
        let safe_until = sent + self.ttl - safety_margin(self.ttl);
        let mut held = locked(&self.held);
        for i in &gone {
            if let Some(h) = i.checked_sub(1).and_then(|i| group.get(i)) {
                if let Some(h) = held.remove(&h.0) {
                    tracing::warn!(backend = BACKEND, key = %h.key, "held key gone or taken over");
                    h.trigger.fire(
                        "the key is gone or held by another owner (it expired, or redis lost it)",
                    );
                }
            }
        }
        // A loss is final: a key whose deadline passed before this answer stays lost (it is
        // not renewed again), even though the answer shows it was still held.
        let now = Instant::now();
        for d in &group {
            match held.get(&d.0) {
                Some(h) if h.trigger.signal().is_lost_at(now) => {
                    if let Some(h) = held.remove(&d.0) {
                        h.trigger.fire(PAST_DEADLINE);
                    }
                }
                Some(h) => h.clock.confirm(safe_until),
                None => {}
            }
        }
        true
    }

    /// Keys whose safe deadline passed are lost already (their signals read the clock); they
    /// are not renewed again.
    fn drop_expired(&self) {
        let now = Instant::now();
        locked(&self.held).retain(|_, h| !h.trigger.signal().is_lost_at(now));
    }
}

/// Which cluster node serves each slot range (from `CLUSTER SLOTS`), so a renewal call can
/// carry every key one node holds.
pub(crate) struct Nodes {
    ranges: Vec<(u16, u16, String)>,
}

impl Nodes {
    async fn read(conn: &Conn) -> Option<Nodes> {
        let reply: redis::Value = conn.query(redis::cmd("CLUSTER").arg("SLOTS")).await.ok()?;
        let redis::Value::Array(ranges) = reply else {
            return None;
        };
        let ranges = ranges.iter().filter_map(range).collect();
        Some(Nodes { ranges })
    }

    fn node(&self, slot: u16) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(from, to, _)| (*from..=*to).contains(&slot))
            .map(|(_, _, node)| node.as_str())
    }
}

/// One `CLUSTER SLOTS` entry: `[from, to, [host, port, …], replicas…]`.
fn range(entry: &redis::Value) -> Option<(u16, u16, String)> {
    use redis::Value::{Array, BulkString, Int, SimpleString};
    let Array(parts) = entry else { return None };
    let (Int(from), Int(to), Array(primary)) = (parts.first()?, parts.get(1)?, parts.get(2)?)
    else {
        return None;
    };
    let host = match primary.first()? {
        BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleString(s) => s.clone(),
        _ => return None,
    };
    let Int(port) = primary.get(1)? else {
        return None;
    };
    Some((
        u16::try_from(*from).ok()?,
        u16::try_from(*to).ok()?,
        format!("{host}:{port}"),
    ))
}

/// The keys grouped by the node serving their slot; by slot where the map is unknown (a call
/// must not span nodes, and one slot is always on one node).
fn group_by_node(due: Vec<Due>, nodes: Option<&Nodes>) -> Vec<Vec<Due>> {
    let mut groups: BTreeMap<String, Vec<Due>> = BTreeMap::new();
    for d in due {
        let slot = slot(&d.1);
        let node = nodes
            .and_then(|n| n.node(slot))
            .map_or_else(|| format!("slot {slot}"), str::to_string);
        groups.entry(node).or_default().push(d);
    }
    groups.into_values().collect()
}
