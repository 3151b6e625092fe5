//! The grants a lock handle holds, per id, oldest first: what the seed's `release(id)` on the
//! handle gives back, while each guard can still release its own grant. Whichever release
//! comes first takes the grant; the other finds it gone.
//!
//! ```
//! use sync_kit::held::HeldGrants;
//!
//! let held = HeldGrants::default();
//! let first = held.insert("orders", 1);
//! let _second = held.insert("orders", 2);
//! assert_eq!(held.take_oldest("orders"), Some(1)); // release("orders") on the handle
//! assert_eq!(held.take(&first), None); // the guard finds its grant already released
//! ```

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use smallvec::SmallVec;

use crate::locked;

/// One grant's place: emptied by whichever release comes first.
#[derive(Debug)]
pub struct Slot<T> {
    /// The map's key (one copy per id, however many grants).
    id: Arc<str>,
    grant: Mutex<Option<T>>,
}

/// Oldest first; one grant (the usual case) needs no allocation of its own.
type ById<T> = HashMap<Arc<str>, SmallVec<[Arc<Slot<T>>; 1]>>;

/// A handle's held grants by id, oldest first. Cheap to clone (shared).
#[derive(Debug)]
pub struct HeldGrants<T> {
    by_id: Arc<Mutex<ById<T>>>,
}

impl<T> Default for HeldGrants<T> {
    fn default() -> Self {
        HeldGrants {
            by_id: Default::default(),
        }
    }
}

impl<T> Clone for HeldGrants<T> {
    fn clone(&self) -> Self {
        HeldGrants {
            by_id: self.by_id.clone(),
        }
    }
}

impl<T> Slot<T> {
    /// The id the grant was inserted with.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl<T> HeldGrants<T> {
    /// Adds a grant of `id`; its slot is the guard's. An `id` passed as an `Arc<str>` becomes
    /// the map's key as it is (no copy of the text) if the id is new.
    pub fn insert<K: AsRef<str> + Into<Arc<str>>>(&self, id: K, grant: T) -> Arc<Slot<T>> {
        let mut by_id = locked(&self.by_id);
        let id = match by_id.get_key_value(id.as_ref()) {
            Some((id, _)) => id.clone(),
            None => id.into(),
        };
        let slot = Arc::new(Slot {
            id: id.clone(),
            grant: Mutex::new(Some(grant)),
        });
        by_id.entry(id).or_default().push(slot.clone());
        slot
    }

    /// Takes the oldest grant of `id` still held (the seed's `release(id)`).
    pub fn take_oldest(&self, id: &str) -> Option<T> {
        let slot = {
            let mut by_id = locked(&self.by_id);
            let slots = by_id.get_mut(id)?;
            let slot = (!slots.is_empty()).then(|| slots.remove(0));
            if slots.is_empty() {
                by_id.remove(id);
            }
            slot?
        };
        locked(&slot.grant).take()
    }

    /// Takes the guard's own grant, if no release took it before.
    pub fn take(&self, slot: &Arc<Slot<T>>) -> Option<T> {
        let mut by_id = locked(&self.by_id);
        if let Some(slots) = by_id.get_mut(&slot.id) {
            slots.retain(|s| !Arc::ptr_eq(s, slot));
            if slots.is_empty() {
                by_id.remove(&slot.id);
            }
        }
        drop(by_id);
        locked(&slot.grant).take()
    }
}
