//! Map cases (DESIGN §3 Map).

use std::sync::{Arc, Mutex};

use sync_core::{ErrorKind, Map};

use crate::{
    CaseResult, Ctx, Failure, ensure, expect_kind, fail,
    spans::{Seen, spans_of},
    within,
};

fn num(v: Option<&[u8]>) -> u64 {
    v.and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn value(map: &dyn Map, key: &str) -> Result<Option<Vec<u8>>, Failure> {
    Ok(map.read(key).await?.map(|e| e.value))
}

/// Read, write, re-read, overwrite and delete one key, seen from a second client: versions are
/// never 0 and grow with each write, delete reports whether the key existed, and `entries`
/// lists what is there.
pub async fn crud(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (m, other) = (a.map("crud")?, b.map("crud")?);
    ensure!(m.name() == "crud", "name() is {:?}", m.name());

    ensure!(
        m.read("k").await?.is_none(),
        "a fresh map has a value for k"
    );
    let v1 = m.write("k", b"one").await?;
    ensure!(v1 != 0, "a write returned version 0");
    let e = other.read("k").await?;
    ensure!(
        e.as_ref()
            .map(|e| (e.key.as_str(), e.value.as_slice(), e.version))
            == Some(("k", &b"one"[..], v1)),
        "after writing \"one\" at version {v1}, another client read {e:?}"
    );
    let v2 = other.write("k", b"two").await?;
    ensure!(v2 > v1, "version went from {v1} to {v2} on overwrite");
    ensure!(
        m.read("k").await?.map(|e| (e.value, e.version)) == Some((b"two".to_vec(), v2)),
        "the overwrite is not visible"
    );

    m.write("other", b"x").await?;
    let keys: Vec<String> = m.entries().await?.into_iter().map(|e| e.key).collect();
    ensure!(
        keys == ["k", "other"],
        "entries() listed {keys:?}, expected [\"k\", \"other\"] in key order"
    );
    ensure!(
        a.map("crud-2")?.read("k").await?.is_none(),
        "a differently named map sees this map's key"
    );

    ensure!(
        m.delete("k").await?,
        "delete of an existing key returned false"
    );
    ensure!(m.read("k").await?.is_none(), "a deleted key still reads");
    ensure!(
        !other.delete("k").await?,
        "delete of an absent key returned true"
    );
    Ok(())
}

/// Compare-and-swap and compare-and-delete only apply at the expected version: a stale
/// version, `None` on an existing key, or a version on an absent key is Conflict and changes
/// nothing.
pub async fn compare_and_swap_conflict(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (m, other) = (a.map("cas")?, b.map("cas")?);

    let v1 = m.compare_and_swap("k", None, b"1").await?;
    let v2 = other.compare_and_swap("k", Some(v1), b"2").await?;
    ensure!(v2 > v1, "CAS went from version {v1} to {v2}");

    expect_kind(
        "CAS with a stale version",
        m.compare_and_swap("k", Some(v1), b"stale").await,
        ErrorKind::Conflict,
    )?;
    expect_kind(
        "CAS expecting absent on an existing key",
        m.compare_and_swap("k", None, b"absent").await,
        ErrorKind::Conflict,
    )?;
    expect_kind(
        "compare_and_delete with a stale version",
        m.compare_and_delete("k", v1).await,
        ErrorKind::Conflict,
    )?;
    ensure!(
        m.read("k").await?.map(|e| (e.value, e.version)) == Some((b"2".to_vec(), v2)),
        "a conflicting CAS or compare_and_delete changed the key"
    );

    m.compare_and_delete("k", v2).await?;
    ensure!(
        other.read("k").await?.is_none(),
        "compare_and_delete at the current version left the key"
    );
    expect_kind(
        "CAS expecting a version on an absent key",
        m.compare_and_swap("k", Some(v2), b"back").await,
        ErrorKind::Conflict,
    )?;
    ensure!(
        m.read("k").await?.is_none(),
        "a conflicting CAS created the key"
    );
    Ok(())
}

/// Four tasks over two clients each apply 25 increments with `update` (a CAS retry loop) to
/// one key: the result is exactly 100, no increment lost.
pub async fn concurrent_update_exact(ctx: &Ctx) -> CaseResult {
    const TASKS: usize = 4;
    const EACH: u64 = 25;
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let maps = [a.map("counter")?, b.map("counter")?];
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let map = maps[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                map.update("n", |old| (num(old) + 1).to_string().into_bytes())
                    .await?;
            }
            Ok::<_, sync_core::Error>(())
        }));
    }
    for t in tasks {
        within(ctx.prompt() * 10, "the increments finishing", t).await???;
    }
    let n = num(value(maps[0].as_ref(), "n").await?.as_deref());
    ensure!(
        n == TASKS as u64 * EACH,
        "{TASKS} tasks × {EACH} increments gave {n}"
    );
    Ok(())
}

/// `iterate` writes back what the callback changes (here: doubling even numbers) and leaves
/// the rest untouched (same version), visiting each key once, and returns the changed count.
pub async fn iterate_writes_back_changes(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let m = client.map("iterate")?;
    let mut versions = Vec::new();
    for i in 1..=6u64 {
        versions.push(m.write(&format!("k{i}"), i.to_string().as_bytes()).await?);
    }
    let mut visited = Vec::new();
    let changed = m
        .iterate(|key, value| {
            visited.push(key.to_string());
            let n = num(Some(value));
            (n % 2 == 0).then(|| (n * 2).to_string().into_bytes())
        })
        .await?;
    ensure!(
        changed == 3,
        "iterate reported {changed} changed entries, expected 3"
    );
    ensure!(
        visited == ["k1", "k2", "k3", "k4", "k5", "k6"],
        "iterate visited {visited:?}"
    );
    for i in 1..=6u64 {
        let e = m.read(&format!("k{i}")).await?;
        let Some(e) = e else {
            fail!("k{i} disappeared");
        };
        let (expect, same_version) = if i % 2 == 0 {
            (i * 2, false)
        } else {
            (i, true)
        };
        ensure!(
            num(Some(&e.value)) == expect,
            "k{i} is {:?}, expected {expect}",
            String::from_utf8_lossy(&e.value)
        );
        ensure!(
            (e.version == versions[i as usize - 1]) == same_version,
            "k{i}: version {} (was {}); an untouched entry must keep its version, a changed one \
             must get a new one",
            e.version,
            versions[i as usize - 1]
        );
    }
    Ok(())
}

/// `iterate` holds no lock across its callback: while the callback runs on key `a`, another
/// client writes `b` and `a` itself, promptly; the write-back of the stale `a` then conflicts
/// and the callback runs again on the fresh value, whose result is what is stored.
pub async fn iterate_holds_no_locks(ctx: &Ctx) -> CaseResult {
    let (a, b) = (ctx.client().await?, ctx.client().await?);
    let (m, other) = (a.map("nolock")?, b.map("nolock")?);
    m.write("a", b"1").await?;
    m.write("b", b"1").await?;

    let (in_callback_tx, mut in_callback) = tokio::sync::mpsc::unbounded_channel();
    let (writes_done_tx, writes_done) = std::sync::mpsc::channel::<()>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let limit = ctx.prompt();
    let iteration = {
        let (m, seen) = (m.clone(), seen.clone());
        let rt = tokio::runtime::Handle::current();
        // The callback is synchronous and must block until the other client has written, so
        // it runs on a blocking thread, not a runtime worker.
        tokio::task::spawn_blocking(move || {
            rt.block_on(m.iterate(move |key, value| {
                let v = num(Some(value));
                seen.lock().unwrap().push((key.to_string(), v));
                if key != "a" {
                    return None;
                }
                if v == 1 {
                    let _ = in_callback_tx.send(());
                    // Bounded: if the other writes never finish, the case fails below.
                    let _ = writes_done.recv_timeout(limit * 2);
                }
                Some((v * 2).to_string().into_bytes())
            }))
        })
    };

    within(
        limit,
        "iterate's callback starting on a",
        in_callback.recv(),
    )
    .await?;
    within(
        limit,
        "another client writing b during iterate",
        other.write("b", b"7"),
    )
    .await??;
    within(
        limit,
        "another client writing a during iterate",
        other.write("a", b"100"),
    )
    .await??;
    let _ = writes_done_tx.send(());

    let changed = within(limit * 4, "iterate finishing", iteration).await???;
    ensure!(
        changed == 1,
        "iterate reported {changed} changes, expected 1"
    );
    let seen = seen.lock().unwrap().clone();
    let on_a: Vec<u64> = seen
        .iter()
        .filter(|(k, _)| k == "a")
        .map(|(_, v)| *v)
        .collect();
    ensure!(
        on_a == [1, 100],
        "the callback saw a = {on_a:?}; expected the stale 1, then (after the conflict) the \
         fresh 100"
    );
    ensure!(
        value(other.as_ref(), "a").await?.as_deref() == Some(&b"200"[..]),
        "a should be 200 (the fresh 100 doubled), is {:?}",
        value(other.as_ref(), "a").await?
    );
    ensure!(
        value(m.as_ref(), "b").await?.as_deref() == Some(&b"7"[..]),
        "b lost the other client's write"
    );
    Ok(())
}

/// Each map operation shows a `tracing` subscriber exactly one span (DESIGN §2), `sync`, with
/// the operation, the key and the map's name; the backend nests no second span in it.
pub async fn one_span_per_operation(ctx: &Ctx) -> CaseResult {
    let client = ctx.client().await?;
    let m = client.map("spans")?;
    m.write("warm-up", b"x").await?;
    let (done, seen) = spans_of(async {
        let v = m.write("k", b"1").await?;
        m.read("k").await?;
        let v = m.compare_and_swap("k", Some(v), b"2").await?;
        m.compare_and_delete("k", v).await?;
        m.delete("warm-up").await?;
        m.entries().await?;
        Ok::<_, Failure>(())
    })
    .await;
    done?;
    let expected = [
        ("map.write", "k"),
        ("map.read", "k"),
        ("map.compare_and_swap", "k"),
        ("map.compare_and_delete", "k"),
        ("map.delete", "warm-up"),
        ("map.entries", "spans"),
    ]
    .map(|(op, id)| Seen::op(op, id).in_map("spans"));
    ensure!(
        seen == expected,
        "the spans opened were {seen:#?}, expected {expected:#?}"
    );
    Ok(())
}
