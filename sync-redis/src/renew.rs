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
    client::Conn,
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
        loop {
            tokio::select! {
                _ = killed.wait_for(|k| *k) => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = if self.renew_all().await { every } else { retry };
        }
    }

    /// One round: every held key, grouped by slot on a cluster. False if any call failed.
    async fn renew_all(&self) -> bool {
        self.drop_expired();
        let due: Vec<Due> = locked(&self.held)
            .iter()
            .map(|(id, h)| (*id, h.key.clone(), h.owner.clone()))
            .collect();
        if due.is_empty() {
            return true;
        }
        let groups: Vec<Vec<Due>> = if self.conn.is_cluster() {
            let mut by_slot: BTreeMap<u16, Vec<Due>> = BTreeMap::new();
            for d in due {
                by_slot.entry(slot(&d.1)).or_default().push(d);
            }
            by_slot.into_values().collect()
        } else {
            vec![due]
        };
        let calls = groups.into_iter().map(|g| self.renew(g));
        futures::future::join_all(calls)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    /// Renews one group in one call; confirms the renewed keys' deadlines and fires the loss of
    /// the keys found gone or owned by another.
    async fn renew(&self, group: Vec<Due>) -> bool {
        let sent = Instant::now();
        let keys: Vec<&str> = group.iter().map(|d| &*d.1).collect();
        let ttl_ms = self.ttl.as_millis().to_string();
        let mut args: Vec<&[u8]> = vec![ttl_ms.as_bytes()];
        args.extend(group.iter().map(|d| d.2.as_bytes()));
        let gone: Vec<usize> = match self.conn.eval(&RENEW, &keys, &args).await {
            Ok(gone) => gone,
            Err(e) => {
                tracing::warn!(backend = BACKEND, error = %e, keys = keys.len(), "renewal failed");
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
        for d in &group {
            if let Some(h) = held.get(&d.0) {
                h.clock.confirm(safe_until);
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
