//! A typed layer over [`Map`]: values are any serde type, stored as JSON.
//!
//! [`TypedMap<T>`] wraps an `Arc<dyn Map>` from any backend. It keeps the map's versions and
//! optimistic concurrency (compare-and-swap, a CAS retry loop in [`update`](TypedMap::update)),
//! and adds the two ways a typed value can fail:
//!
//! - a value that cannot be encoded as JSON (a map with non-string keys, a failing `Serialize`)
//!   is an [`ErrorKind::InvalidArgument`] error, and nothing is written;
//! - a stored value that does not decode as `T` (written by another program, or by an older
//!   version of `T`) is an [`ErrorKind::Backend`] error naming the key and the type, with the
//!   serde error as its [`source`](std::error::Error::source).

use std::{any::type_name, fmt, marker::PhantomData, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};

use sync_core::{Error, ErrorKind, Map, Result, Version};

/// A [`Map`] whose values are `T`, stored as JSON.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> sync_core::Result<()> {
/// use serde::{Deserialize, Serialize};
/// use sync_core::{Backend, ErrorKind};
/// use sync_kit::typed::TypedMap;
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// struct Quota {
///     used: u64,
///     limit: u64,
/// }
///
/// let client = sync_local::Cluster::new().client(Default::default())?;
/// let quotas: TypedMap<Quota> = TypedMap::new(client.map("quotas")?);
///
/// let v1 = quotas.write("alice", &Quota { used: 0, limit: 10 }).await?;
/// assert_eq!(quotas.read("alice").await?, Some((Quota { used: 0, limit: 10 }, v1)));
///
/// // Read-modify-write with compare-and-swap, retried on conflict.
/// quotas
///     .update("alice", |q| {
///         let mut q = q.unwrap_or(Quota { used: 0, limit: 10 });
///         q.used += 1;
///         q
///     })
///     .await?;
///
/// // A stale version loses.
/// let stale = quotas.compare_and_swap("alice", Some(v1), &Quota { used: 9, limit: 10 }).await;
/// assert_eq!(stale.unwrap_err().kind(), ErrorKind::Conflict);
///
/// let all = quotas.entries().await?;
/// assert_eq!(all.len(), 1);
/// assert_eq!((all[0].0.as_str(), all[0].1.used), ("alice", 1));
/// assert!(quotas.delete("alice").await?);
/// # Ok(()) }
/// ```
pub struct TypedMap<T> {
    map: Arc<dyn Map>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for TypedMap<T> {
    fn clone(&self) -> Self {
        TypedMap {
            map: Arc::clone(&self.map),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for TypedMap<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedMap")
            .field("map", &self.map.name())
            .field("type", &type_name::<T>())
            .finish()
    }
}

impl<T> TypedMap<T> {
    /// Wraps a map from any backend.
    pub fn new(map: Arc<dyn Map>) -> Self {
        TypedMap {
            map,
            _type: PhantomData,
        }
    }

    /// The untyped map underneath.
    pub fn inner(&self) -> &Arc<dyn Map> {
        &self.map
    }

    /// Deletes `key`; false if it was absent.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.map.delete(key).await
    }
}

impl<T: Serialize + DeserializeOwned> TypedMap<T> {
    /// The value and version of `key`, if present. A stored value that is not a `T` is an
    /// [`ErrorKind::Backend`] error naming the key and the type.
    pub async fn read(&self, key: &str) -> Result<Option<(T, Version)>> {
        match self.map.read(key).await? {
            Some(entry) => Ok(Some((self.decode(key, &entry.value)?, entry.version))),
            None => Ok(None),
        }
    }

    /// Writes unconditionally; returns the new version.
    pub async fn write(&self, key: &str, value: &T) -> Result<Version> {
        let bytes = self.encode(key, value)?;
        self.map.write(key, &bytes).await
    }

    /// Writes only if the key is at `expected` (`None`: only if absent); a mismatch is
    /// [`ErrorKind::Conflict`]. Returns the new version.
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &T,
    ) -> Result<Version> {
        let bytes = self.encode(key, value)?;
        self.map.compare_and_swap(key, expected, &bytes).await
    }

    /// Applies `f` to the current value (`None` if absent) and writes the result with
    /// compare-and-swap; on conflict `f` runs again on the fresh value. Returns the written
    /// version.
    ///
    /// A stored value that is not a `T`, or a result that cannot be encoded, ends the loop
    /// with an error before anything is written.
    pub async fn update<F>(&self, key: &str, mut f: F) -> Result<Version>
    where
        F: FnMut(Option<T>) -> T + Send,
    {
        self.map
            .try_update(key, |current| {
                let old = current.map(|bytes| self.decode(key, bytes)).transpose()?;
                self.encode(key, &f(old))
            })
            .await
    }

    /// Every entry at the time of the call as `(key, value, version)`, sorted by key. One
    /// value that is not a `T` fails the whole call, naming its key.
    pub async fn entries(&self) -> Result<Vec<(String, T, Version)>> {
        self.map
            .entries()
            .await?
            .into_iter()
            .map(|e| {
                let value = self.decode(&e.key, &e.value)?;
                Ok((e.key, value, e.version))
            })
            .collect()
    }

    fn encode(&self, key: &str, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(value).map_err(|e| {
            Error::invalid(format!(
                "cannot encode a {} as JSON for map {:?}: {e}",
                type_name::<T>(),
                self.map.name()
            ))
            .with_id(key)
            .with_source(e)
        })
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::new(
                ErrorKind::Backend,
                format!(
                    "the value stored under key {key:?} in map {:?} does not decode as {}: {e}",
                    self.map.name(),
                    type_name::<T>()
                ),
            )
            .with_id(key)
            .with_source(e)
        })
    }
}
