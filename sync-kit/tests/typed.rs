//! TypedMap over the in-process backend.

use std::{collections::BTreeMap, sync::Arc};

use serde::{Deserialize, Serialize};
use sync_core::{Backend, ErrorKind, Map, Result};
use sync_kit::typed::TypedMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    n: u64,
}

fn map(name: &str) -> Result<Arc<dyn Map>> {
    sync_local::Cluster::new()
        .client(Default::default())?
        .map(name)
}

#[tokio::test]
async fn round_trips_with_versions() -> Result<()> {
    let counters: TypedMap<Counter> = TypedMap::new(map("counters")?);
    assert_eq!(counters.read("a").await?, None);
    let v1 = counters
        .compare_and_swap("a", None, &Counter { n: 1 })
        .await?;
    let err = counters
        .compare_and_swap("a", None, &Counter { n: 9 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let v2 = counters.write("b", &Counter { n: 2 }).await?;
    let v3 = counters
        .update("a", |c| Counter {
            n: c.map_or(0, |c| c.n) + 10,
        })
        .await?;
    assert_ne!(v3, v1);
    assert_eq!(counters.read("a").await?, Some((Counter { n: 11 }, v3)));
    assert_eq!(
        counters.entries().await?,
        vec![
            ("a".to_string(), Counter { n: 11 }, v3),
            ("b".to_string(), Counter { n: 2 }, v2)
        ]
    );
    assert!(counters.delete("a").await?);
    assert!(!counters.delete("a").await?);
    Ok(())
}

#[tokio::test]
async fn concurrent_updates_are_not_lost() -> Result<()> {
    let counters: TypedMap<Counter> = TypedMap::new(map("counters")?);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let counters = counters.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    counters
                        .update("hits", |c| Counter {
                            n: c.map_or(0, |c| c.n) + 1,
                        })
                        .await?;
                }
                Ok::<_, sync_core::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("no panic")?;
    }
    assert_eq!(counters.read("hits").await?.map(|(c, _)| c.n), Some(80));
    Ok(())
}

#[tokio::test]
async fn a_foreign_value_is_a_backend_error_naming_key_and_type() -> Result<()> {
    let raw = map("mixed")?;
    let v = raw.write("bad", b"not json").await?;
    let typed: TypedMap<Counter> = TypedMap::new(Arc::clone(&raw));

    let err = typed.read("bad").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    let text = err.to_string();
    assert!(text.contains("bad") && text.contains("Counter"), "{text}");
    assert!(std::error::Error::source(&err).is_some());

    let err = typed.entries().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    assert_eq!(err.id(), Some("bad"));

    // update aborts without overwriting what it could not read
    let err = typed.update("bad", |_| Counter { n: 0 }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend);
    let entry = raw.read("bad").await?.expect("still there");
    assert_eq!(
        (entry.value.as_slice(), entry.version),
        (&b"not json"[..], v)
    );
    Ok(())
}

#[tokio::test]
async fn an_unencodable_value_is_invalid_and_writes_nothing() -> Result<()> {
    // JSON object keys must be strings.
    let typed: TypedMap<BTreeMap<(u8, u8), u8>> = TypedMap::new(map("pairs")?);
    let value = BTreeMap::from([((1, 2), 3)]);
    for err in [
        typed.write("k", &value).await.unwrap_err(),
        typed.compare_and_swap("k", None, &value).await.unwrap_err(),
        typed.update("k", |_| value.clone()).await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(std::error::Error::source(&err).is_some());
    }
    assert!(typed.inner().read("k").await?.is_none());
    Ok(())
}
