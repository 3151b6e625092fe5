//! Contenders for one key on one client take turns locally, so that only one of them at a time
//! talks to the server: a release then wakes one waiter per client, not every waiting task,
//! and a backend whose grants are re-entrant per client (a Consul session) cannot grant one
//! key to two local contenders.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::locked;
use tokio::sync::OwnedMutexGuard;

type Gate = Arc<tokio::sync::Mutex<()>>;

/// The local turns of one client, by key.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let turns = sync_kit::turns::Turns::default();
/// let first = turns.take("orders").await;
/// let mut second = Box::pin(turns.take("orders"));
/// assert!(futures::poll!(second.as_mut()).is_pending());
/// drop(first);
/// let _second = second.await;
/// # }
/// ```
#[derive(Default)]
pub struct Turns {
    gates: Arc<Mutex<HashMap<String, Gate>>>,
}

/// The turn to contend for one key; the next local contender's starts when it is dropped.
pub struct Turn {
    gates: Arc<Mutex<HashMap<String, Gate>>>,
    key: String,
    gate: Gate,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for the turn to contend for `key` (at once when no other local contender has it).
    /// Cancel-safe: a dropped wait leaves nothing behind.
    pub async fn take(&self, key: &str) -> Turn {
        let gate = locked(&self.gates)
            .entry(key.to_string())
            .or_default()
            .clone();
        let mut turn = Turn {
            gates: self.gates.clone(),
            key: key.to_string(),
            gate: gate.clone(),
            guard: None,
        };
        turn.guard = Some(gate.lock_owned().await);
        turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut gates = locked(&self.gates);
        // The map's and ours: no other contender waits for this key.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_one_at_a_time_and_forgotten_after() {
        let turns = Turns::default();
        let first = turns.take("k").await;
        let mut second = Box::pin(turns.take("k"));
        assert!(futures::poll!(second.as_mut()).is_pending());
        drop(first);
        let second = second.await;
        drop(second);
        assert!(locked(&turns.gates).is_empty());
        // A cancelled wait leaves nothing behind either.
        let held = turns.take("k").await;
        drop(Box::pin(turns.take("k")));
        drop(held);
        assert!(locked(&turns.gates).is_empty());
    }
}
