//! One URL and one TOML/JSON config per backend parse into equal configs; bad input is
//! refused with a message naming the problem.

use sync_any::Config;

/// The URL, the TOML and the JSON say the same; all three must parse into one config.
fn same(url: &str, toml_text: &str, json: &str) {
    let from_url = Config::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let from_toml: Config =
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{toml_text}: {e}"));
    let from_json: Config = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    assert_eq!(from_url, from_toml, "{url} vs TOML");
    assert_eq!(from_url, from_json, "{url} vs JSON");
    // And a config written out reads back the same.
    let written = serde_json::to_string(&from_url).unwrap();
    assert_eq!(
        serde_json::from_str::<Config>(&written).unwrap(),
        from_url,
        "{written}"
    );
}

#[test]
fn local_url_toml_and_json_agree() {
    same(
        "local://tests/tenant-a?ttl=1500ms&time_uncertainty=5ms",
        r#"
            backend = "local"
            cluster = "tests"
            namespace = "tenant-a"
            ttl = "1.5s"
            time_uncertainty = "5ms"
        "#,
        r#"{"backend": "local", "cluster": "tests", "namespace": "tenant-a",
            "ttl": "1500ms", "time_uncertainty": "5ms"}"#,
    );
}

#[test]
fn etcd_url_toml_and_json_agree() {
    same(
        "etcd://app:s%40cret@h1:2379,h2:2379/billing?ttl=5s&connect_timeout=2s",
        r#"
            backend = "etcd"
            endpoints = ["http://h1:2379", "http://h2:2379"]
            namespace = "billing"
            user = "app"
            password = "s@cret"
            ttl = "5s"
            connect_timeout = "2s"
        "#,
        r#"{"backend": "etcd", "endpoints": ["http://h1:2379", "http://h2:2379"],
            "namespace": "billing", "user": "app", "password": "s@cret",
            "ttl": "5s", "connect_timeout": "2s"}"#,
    );
}

#[test]
fn ntp_url_toml_and_json_agree() {
    same(
        "ntp://a.example:123,b.example?interval=64s&timeout=500ms&max_error=250ms&drift_ppm=20",
        r#"
            backend = "ntp"
            servers = ["a.example:123", "b.example:123"]
            interval = "64s"
            timeout = "500ms"
            max_error = "250ms"
            drift_ppm = 20.0
        "#,
        r#"{"backend": "ntp", "servers": ["a.example:123", "b.example:123"],
            "interval": "1m 4s", "timeout": "500ms", "max_error": "250ms", "drift_ppm": 20.0}"#,
    );
}

/// The error of `url`, which must be InvalidArgument.
fn refused(url: &str) -> String {
    let err = Config::from_url(url).expect_err(url);
    assert_eq!(
        err.kind(),
        sync_core::ErrorKind::InvalidArgument,
        "{url}: {err}"
    );
    err.to_string()
}

fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} does not name {part:?}");
    }
}

#[test]
fn unknown_scheme_names_the_known_ones() {
    let msg = refused("nope://x");
    assert_names(&msg, &["\"nope\"", "local://", "etcd://", "ntp://"]);
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_names(&refused("no-scheme-here"), &["scheme://"]);
}

#[test]
fn unknown_key_names_the_known_ones() {
    assert_names(
        &refused("etcd://h:2379?tll=5s"),
        &["tll", "ttl", "connect_timeout"],
    );
    assert_names(&refused("local://?bogus=1"), &["bogus", "ttl"]);
    assert_names(
        &refused("ntp://h?interval_s=5"),
        &["interval_s", "interval"],
    );
}

#[test]
fn bad_duration_is_named() {
    assert_names(
        &refused("etcd://h:2379?ttl=5 parsecs"),
        &["ttl", "5 parsecs"],
    );
    assert_names(&refused("local://?ttl=fast"), &["ttl", "fast"]);
    let err = serde_json::from_str::<Config>(r#"{"backend": "local", "ttl": 1500}"#)
        .expect_err("a bare number is not a duration")
        .to_string();
    assert!(err.contains("duration"), "{err}");
}

#[test]
fn empty_host_list_is_named() {
    assert_names(&refused("etcd://"), &["host"]);
    assert_names(&refused("etcd:///ns"), &["host"]);
    assert_names(&refused("ntp://"), &["empty"]);
    assert_names(&refused("etcd://a:1,,b:2"), &["empty"]);
}

#[test]
fn namespace_with_a_slash_is_refused() {
    assert_names(
        &refused("etcd://h:2379/tenant/a"),
        &["must not contain '/'"],
    );
    assert_names(&refused("local://c/tenant/a"), &["must not contain '/'"]);
}

#[test]
fn unknown_backend_tag_in_a_config_names_the_known_ones() {
    let err = serde_json::from_str::<Config>(r#"{"backend": "zookeeper"}"#)
        .expect_err("no such backend")
        .to_string();
    assert_names(&err, &["zookeeper", "local", "etcd", "ntp"]);
}
