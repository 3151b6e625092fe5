//! Map on the in-process backend: a versioned key–value map per namespaced map name.
//!
//! Every write takes its version from the cluster-wide revision counter, so versions strictly
//! increase across the whole cluster and are never 0. Compare-and-swap compares versions under
//! the table lock; nothing is held across an await.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use sync_core::{Entry, Error, ErrorKind, Map, Result, Version};

use crate::{
    BACKEND,
    client::{ClientInner, locked},
};

/// One stored value and the version it was written at.
struct Slot {
    value: Vec<u8>,
    version: Version,
}

/// Every map of a cluster, by namespaced map key (`<ns>/map/<name>`); each map's keys sorted.
#[derive(Default)]
pub(crate) struct MapTable {
    maps: Mutex<HashMap<String, BTreeMap<String, Slot>>>,
}

pub(crate) struct LocalMap {
    client: Arc<ClientInner>,
    name: String,
    /// The map's namespaced key in the [`MapTable`].
    key: String,
}

impl LocalMap {
    pub(crate) fn new(client: Arc<ClientInner>, name: &str) -> Self {
        let key = client.key(&["map", name]);
        LocalMap {
            client,
            name: name.to_string(),
            key,
        }
    }

    /// Fails once the client was killed (a dead process makes no calls).
    fn check_client(&self) -> Result<()> {
        self.client.session().map(|_| ())
    }

    /// Runs `f` on this map's entries under the table lock.
    fn with_map<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Slot>) -> T) -> T {
        let mut maps = locked(&self.client.shared.maps.maps);
        let map = maps.entry(self.key.clone()).or_default();
        let out = f(map);
        if map.is_empty() {
            maps.remove(&self.key);
        }
        out
    }

    /// Stores `value` at `key` under the next cluster revision, which it returns.
    fn put(&self, map: &mut BTreeMap<String, Slot>, key: &str, value: &[u8]) -> Version {
        let version = self.client.shared.next_revision();
        map.insert(
            key.to_string(),
            Slot {
                value: value.to_vec(),
                version,
            },
        );
        version
    }

    fn conflict(key: &str, expected: Option<Version>, actual: Option<Version>) -> Error {
        let show = |v: Option<Version>| v.map_or_else(|| "absent".to_string(), |v| v.to_string());
        Error::new(
            ErrorKind::Conflict,
            format!(
                "expected version {}, found version {}",
                show(expected),
                show(actual)
            ),
        )
        .with_backend(BACKEND)
        .with_id(key)
    }
}

// The checked layer (sync-kit) opens each operation's span, with backend, primitive, map and key.
#[async_trait]
impl Map for LocalMap {
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&self, key: &str) -> Result<Option<Entry>> {
        self.check_client()?;
        let maps = locked(&self.client.shared.maps.maps);
        Ok(maps
            .get(&self.key)
            .and_then(|m| m.get(key))
            .map(|s| Entry::new(key, s.value.clone(), s.version)))
    }

    async fn write(&self, key: &str, value: &[u8]) -> Result<Version> {
        self.check_client()?;
        Ok(self.with_map(|map| self.put(map, key, value)))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.check_client()?;
        Ok(self.with_map(|map| map.remove(key).is_some()))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Version>,
        value: &[u8],
    ) -> Result<Version> {
        self.check_client()?;
        let result = self.with_map(|map| {
            let actual = map.get(key).map(|s| s.version);
            if actual != expected {
                return Err(Self::conflict(key, expected, actual));
            }
            Ok(self.put(map, key, value))
        });
        if let Err(e) = &result {
            tracing::debug!(backend = BACKEND, key, error = %e, "compare-and-swap lost");
        }
        result
    }

    async fn compare_and_delete(&self, key: &str, expected: Version) -> Result<()> {
        self.check_client()?;
        self.with_map(|map| {
            let actual = map.get(key).map(|s| s.version);
            if actual != Some(expected) {
                return Err(Self::conflict(key, Some(expected), actual));
            }
            map.remove(key);
            Ok(())
        })
    }

    async fn entries(&self) -> Result<Vec<Entry>> {
        self.check_client()?;
        let maps = locked(&self.client.shared.maps.maps);
        Ok(maps
            .get(&self.key)
            .map(|m| {
                m.iter()
                    .map(|(k, s)| Entry::new(k.clone(), s.value.clone(), s.version))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use sync_core::{Backend, ErrorKind, MAX_VALUE_LEN, Map};

    use crate::{Cluster, Config};

    fn map(cluster: &Cluster, ns: &str, name: &str) -> Arc<dyn Map> {
        cluster
            .client(Config::default().with_namespace(ns))
            .unwrap()
            .map(name)
            .unwrap()
    }

    #[tokio::test]
    async fn versions_and_compare_and_swap() {
        let cluster = Cluster::new();
        let m = map(&cluster, "t", "m");
        assert_eq!(m.read("k").await.unwrap(), None);
        let v1 = m.compare_and_swap("k", None, b"a").await.unwrap();
        assert!(v1 > 0);
        let err = m.compare_and_swap("k", None, b"b").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(err.to_string().contains("expected version absent"), "{err}");
        assert!(
            err.to_string().contains(&format!("found version {v1}")),
            "{err}"
        );
        let v2 = m.compare_and_swap("k", Some(v1), b"b").await.unwrap();
        assert!(v2 > v1);
        let err = m.compare_and_swap("k", Some(v1), b"c").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(
            err.to_string()
                .contains(&format!("expected version {v1}, found version {v2}"))
        );
        let e = m.read("k").await.unwrap().unwrap();
        assert_eq!(
            (e.key.as_str(), e.value.as_slice(), e.version),
            ("k", &b"b"[..], v2)
        );

        let err = m.compare_and_delete("k", v1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        m.compare_and_delete("k", v2).await.unwrap();
        let err = m.compare_and_delete("k", v2).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert!(err.to_string().contains("found version absent"), "{err}");
        assert!(!m.delete("k").await.unwrap());
        let v3 = m.write("k", b"x").await.unwrap();
        assert!(v3 > v2);
        assert!(m.delete("k").await.unwrap());
    }

    #[tokio::test]
    async fn limits_are_named() {
        let cluster = Cluster::new();
        let m = map(&cluster, "t", "m");
        let big = vec![0u8; MAX_VALUE_LEN + 1];
        let err = m.write("k", &big).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains(&MAX_VALUE_LEN.to_string()),
            "{err}"
        );
        assert_eq!(err.backend(), Some(crate::BACKEND));
        let err = m.compare_and_swap("k", None, &big).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        m.write("k", &vec![0u8; MAX_VALUE_LEN]).await.unwrap();

        let err = m.read("").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("map key"), "{err}");
        assert_eq!(err.backend(), Some(crate::BACKEND));
        assert!(m.write("a\0b", b"x").await.is_err());
        assert!(m.delete(&"x".repeat(513)).await.is_err());
    }

    #[tokio::test]
    async fn shared_per_namespace_and_name() {
        let cluster = Cluster::new();
        let a = map(&cluster, "t", "m");
        let b = map(&cluster, "t", "m");
        let other_ns = map(&cluster, "u", "m");
        let other_name = map(&cluster, "t", "n");
        let v = a.write("k", b"1").await.unwrap();
        assert_eq!(b.read("k").await.unwrap().map(|e| e.version), Some(v));
        assert_eq!(other_ns.read("k").await.unwrap(), None);
        assert_eq!(other_name.read("k").await.unwrap(), None);
        // Keys with separators stay inside their map.
        let ab = map(&cluster, "t", "m/k");
        assert!(ab.entries().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn entries_sorted_and_update() {
        let cluster = Cluster::new();
        let m = map(&cluster, "t", "m");
        for k in ["b", "a/b", "c", "a"] {
            m.write(k, k.as_bytes()).await.unwrap();
        }
        let keys: Vec<String> = m
            .entries()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["a", "a/b", "b", "c"]);

        let mut tasks = Vec::new();
        for _ in 0..8 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    m.update("n", |old| {
                        let n = old.map_or(0, |v| u64::from_le_bytes(v.try_into().unwrap()));
                        (n + 1).to_le_bytes().to_vec()
                    })
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let n = m.read("n").await.unwrap().unwrap().value;
        assert_eq!(u64::from_le_bytes(n.try_into().unwrap()), 80);
    }

    #[tokio::test]
    async fn killed_client_is_closed() {
        let cluster = Cluster::new();
        let client = cluster
            .client(Config::default().with_ttl(Duration::from_millis(100)))
            .unwrap();
        let m = client.map("m").unwrap();
        m.write("k", b"v").await.unwrap();
        client.kill();
        assert_eq!(m.read("k").await.unwrap_err().kind(), ErrorKind::Closed);
        assert_eq!(m.entries().await.unwrap_err().kind(), ErrorKind::Closed);
        // The data outlives the client.
        let other = map(&cluster, "sync", "m");
        assert!(other.read("k").await.unwrap().is_some());
    }
}
