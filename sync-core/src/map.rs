//! A shared key–value map with versions and optimistic concurrency.

use std::time::Duration;

use async_trait::async_trait;

use crate::{Error, ErrorKind, Result};

/// A value's version: changes with every write of the key; never 0.
pub type Version = u64;

/// The longest value accepted by default, in bytes.
pub const MAX_VALUE_LEN: usize = 512 * 1024;

/// Checks a value against [`MAX_VALUE_LEN`]: InvalidArgument naming the limit.
///
/// ```
/// let err = sync_core::raw::validate_value(&vec![0; sync_core::MAX_VALUE_LEN + 1]).unwrap_err();
/// assert!(err.to_string().contains("the maximum is 524288"));
/// ```
pub fn validate_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::invalid(format!(
            "value is {} bytes; the maximum is {MAX_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}

/// One key's value and version.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The version the value was written at.
    pub version: Version,
}

impl Entry {
    /// Built by backends.
    pub fn new(key: impl Into<String>, value: Vec<u8>, version: Version) -> Self {
        Entry {
            key: key.into(),
            value,
            version,
        }
    }
}

/// A shared versioned map. Writes that must not lose a race use
/// [`compare_and_swap`](Map::compare_and_swap), or `update` (on `dyn Map`) which retries it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use std::sync::Arc;
/// use sync_core::{Backend, ErrorKind, Map};
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let map: Arc<dyn Map> = client.map("config")?;
///
/// let v1 = map.write("mode", b"blue").await?;
/// let v2 = map.compare_and_swap("mode", Some(v1), b"green").await?;
/// let stale = map.compare_and_swap("mode", Some(v1), b"red").await.unwrap_err();
/// assert_eq!(stale.kind(), ErrorKind::Conflict);
/// assert_eq!(map.read("mode").await?.map(|e| (e.value, e.version)), Some((b"green".to_vec(), v2)));
///
/// map.update("hits", |old| {
///     let n = old.map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()));
///     (n + 1).to_le_bytes().to_vec()
/// })
/// .await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Map: Send + Sync {
    /// The map's name (its key range inside the namespace).
    fn name(&self) -> &str;

    /// The value and version of `key`, if present.
    async fn read(&self, key: &str) -> Result<Option<Entry>>;

    /// Writes unconditionally; returns the new version. When the backend cannot tell whether
    /// the write was applied (its answer was lost), this fails `Unavailable` and says so:
    /// writing again is the caller's choice. Use [`Map::update`] or `compare_and_swap` for a
    /// write that must apply exactly once.
    async fn write(&self, key: &str, value: &[u8]) -> Result<Version>;

    /// Deletes `key`; false if it was absent.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Writes only if the key is at `expected` (`None`: only if absent). A mismatch is
    /// [`ErrorKind::Conflict`]. Returns the new version.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version>;

    /// Deletes only if the key is at `expected`; a mismatch is [`ErrorKind::Conflict`].
    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()>;

    /// Every entry at the time of the call, sorted by key.
    async fn entries(&self) -> Result<Vec<Entry>>;
}

impl dyn Map + '_ {
    /// Applies `f` to the current value (None if absent) and writes the result with
    /// compare-and-swap, retrying on conflict. Returns the written version.
    pub async fn update<F>(&self, key: &str, mut f: F) -> Result<Version>
    where
        F: FnMut(Option<&[u8]>) -> Vec<u8> + Send,
    {
        self.try_update(key, |current| Ok(f(current))).await
    }

    /// [`update`](Self::update) with a fallible `f`: its error ends the loop before anything
    /// is written.
    pub async fn try_update<F>(&self, key: &str, mut f: F) -> Result<Version>
    where
        F: FnMut(Option<&[u8]>) -> Result<Vec<u8>> + Send,
    {
        let mut backoff = Backoff::default();
        loop {
            let current = self.read(key).await?;
            let next = f(current.as_ref().map(|e| e.value.as_slice()))?;
            match self
                .compare_and_swap(key, current.map(|e| e.version), &next)
                .await
            {
                Err(e) if e.kind() == ErrorKind::Conflict => backoff.wait().await,
                other => return other,
            }
        }
    }

    /// Visits every entry; where `f` returns a new value it is written back with
    /// compare-and-swap, and on conflict `f` runs again on the fresh value. Holds no lock.
    /// Returns how many entries were changed.
    ///
    /// `f` runs on one entry at a time, in key order (a retry after a conflict comes later);
    /// up to [`ITERATE_IN_FLIGHT`] writes are in flight at once, so a large map is not
    /// rewritten one round trip after another. On an error other than a conflict the
    /// iteration stops with it; writes already sent may have been applied.
    pub async fn iterate<F>(&self, mut f: F) -> Result<usize>
    where
        F: FnMut(&str, &[u8]) -> Option<Vec<u8>> + Send,
    {
        use futures::stream::{FuturesUnordered, StreamExt};

        let mut changed = 0;
        let mut entries = self.entries().await?.into_iter();
        let mut writes = FuturesUnordered::new();
        loop {
            while writes.len() < ITERATE_IN_FLIGHT {
                let Some(entry) = entries.next() else { break };
                if let Some(next) = f(&entry.key, &entry.value) {
                    writes.push(self.swap_back(entry, next, Backoff::default()));
                }
            }
            let Some((entry, written, mut backoff)) = writes.next().await else {
                return Ok(changed);
            };
            match written {
                Ok(_) => changed += 1,
                Err(err) if err.kind() == ErrorKind::Conflict => {
                    backoff.wait().await;
                    let fresh = self.read(&entry.key).await?;
                    let retry = fresh.and_then(|e| f(&e.key, &e.value).map(|next| (e, next)));
                    if let Some((fresh, next)) = retry {
                        writes.push(self.swap_back(fresh, next, backoff));
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// One write of [`iterate`](Self::iterate): `next` over `entry` if it is still at its
    /// version, with what is needed to retry it.
    async fn swap_back(
        &self,
        entry: Entry,
        next: Vec<u8>,
        backoff: Backoff,
    ) -> (Entry, Result<Version>, Backoff) {
        let written = self
            .compare_and_swap(&entry.key, Some(entry.version), &next)
            .await;
        (entry, written, backoff)
    }
}

/// How many compare-and-swap writes `iterate` (on `dyn Map`) keeps in flight at once.
pub const ITERATE_IN_FLIGHT: usize = 16;

/// Jittered exponential backoff between compare-and-swap retries.
#[derive(Debug, Default)]
struct Backoff {
    tries: u32,
}

impl Backoff {
    async fn wait(&mut self) {
        self.tries += 1;
        let cap_ms = 1u64 << self.tries.min(6);
        let jitter = rand::random_range(0..=cap_ms * 1000);
        tokio::time::sleep(Duration::from_micros(jitter)).await;
    }
}
