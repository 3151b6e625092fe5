//! The swap example tells the same story on every backend: on the in-process backend always,
//! on etcd when `SYNC_TEST_ETCD` names one and on Consul when `SYNC_TEST_CONSUL` does (each
//! required under `SYNC_REQUIRE_LIVE=1`).

#[allow(dead_code)]
#[path = "../examples/swap.rs"]
mod swap;

async fn story(url: &str) -> Vec<String> {
    let mut lines = Vec::new();
    swap::story(url, |line| lines.push(line))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    lines
}

/// The lines every backend with Lock, Leader, Task and Map must tell alike.
fn shared(lines: &[String]) -> Vec<&String> {
    let steps = ["Lock:", "Leader:", "Task:", "Map:", "closed"];
    lines
        .iter()
        .filter(|l| steps.iter().any(|s| l.starts_with(s)))
        .collect()
}

#[tokio::test]
async fn local_story_holds() {
    let lines = story("local://").await;
    assert_eq!(shared(&lines).len(), 6, "{lines:#?}");
    for line in shared(&lines) {
        assert!(!line.contains("false"), "a check failed: {line}");
    }
    assert!(lines.iter().any(|l| l.starts_with("Time: ")), "{lines:#?}");
}

/// The backend URL in `var`, in namespace `swap-test`; None (the story is not told) when it is
/// unset, a failure when it is unset under `SYNC_REQUIRE_LIVE=1`.
fn live_url(var: &str) -> Option<String> {
    let Some(url) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
        let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
        assert!(!required, "SYNC_REQUIRE_LIVE=1 but {var} is not set");
        eprintln!("{var} is not set: its story is not told");
        return None;
    };
    // The namespace goes before the query (`consul://h:p/?token=…` carries one).
    let (base, query) = url.split_once('?').unwrap_or((&url, ""));
    let base = format!("{}/swap-test", base.trim_end_matches('/'));
    Some(match query {
        "" => base,
        query => format!("{base}?{query}"),
    })
}

#[tokio::test]
async fn etcd_tells_the_local_story() {
    let Some(url) = live_url("SYNC_TEST_ETCD") else {
        return;
    };
    let local = story("local://").await;
    let etcd = story(&url).await;
    assert_eq!(shared(&etcd), shared(&local));
    assert!(
        etcd.contains(&"Time: not provided by this backend".to_string()),
        "{etcd:#?}"
    );
}

/// Consul tells the local story's lines for the primitives it has (the others it says it
/// lacks), and at least the Lock's.
#[tokio::test]
async fn consul_tells_the_local_story_where_it_can() {
    let Some(url) = live_url("SYNC_TEST_CONSUL") else {
        return;
    };
    let local = story("local://").await;
    let consul = story(&url).await;
    // What it lacks it says so; the rest must be the local story's lines.
    let told: Vec<_> = shared(&consul)
        .into_iter()
        .filter(|l| !l.ends_with("not provided by this backend"))
        .collect();
    assert!(told.iter().any(|l| l.starts_with("Lock:")), "{consul:#?}");
    for line in told {
        assert!(
            local.contains(line),
            "{line:?} is not the local story's: {local:#?}"
        );
    }
    assert!(
        consul.contains(&"Time: not provided by this backend".to_string()),
        "{consul:#?}"
    );
}

#[tokio::test]
async fn an_unknown_scheme_fails_in_one_line_naming_the_known_ones() {
    let err = swap::story("nope://x", |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    for scheme in ["local://", "etcd://", "ntp://", "redis://", "consul://"] {
        assert!(err.contains(scheme), "{err}");
    }
}
