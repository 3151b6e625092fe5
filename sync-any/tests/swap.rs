//! The swap example tells the same story on every backend: on the in-process backend always,
//! and on etcd when `SYNC_TEST_ETCD` names one (required under `SYNC_REQUIRE_LIVE=1`).

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

#[tokio::test]
async fn etcd_tells_the_local_story() {
    let Some(url) = std::env::var("SYNC_TEST_ETCD")
        .ok()
        .filter(|v| !v.is_empty())
    else {
        let required = std::env::var("SYNC_REQUIRE_LIVE").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "SYNC_REQUIRE_LIVE=1 but SYNC_TEST_ETCD is not set"
        );
        eprintln!("SYNC_TEST_ETCD is not set: the etcd story is not told");
        return;
    };
    let local = story("local://").await;
    let etcd = story(&format!("{}/swap-test", url.trim_end_matches('/'))).await;
    assert_eq!(shared(&etcd), shared(&local));
    assert!(
        etcd.contains(&"Time: not provided by this backend".to_string()),
        "{etcd:#?}"
    );
}

#[tokio::test]
async fn an_unknown_scheme_fails_in_one_line_naming_the_known_ones() {
    let err = swap::story("nope://x", |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "{err}");
    for scheme in ["local://", "etcd://", "ntp://"] {
        assert!(err.contains(scheme), "{err}");
    }
}
