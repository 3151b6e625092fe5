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

#[test]
fn consul_url_toml_and_json_agree() {
    same(
        "consul://h1:18500/billing?token=s3cret&datacenter=dc2&ttl=15s&lock_delay=1s",
        r#"
            backend = "consul"
            address = "h1:18500"
            namespace = "billing"
            token = "s3cret"
            datacenter = "dc2"
            ttl = "15s"
            lock_delay = "1s"
        "#,
        r#"{"backend": "consul", "address": "h1:18500", "namespace": "billing",
            "token": "s3cret", "datacenter": "dc2", "ttl": "15s", "lock_delay": "1s"}"#,
    );
    // consuls:// is HTTPS, on Consul's HTTPS port unless another is given.
    same(
        "consuls://h1/billing",
        r#"
            backend = "consul"
            address = "h1:8501"
            namespace = "billing"
            tls = true
        "#,
        r#"{"backend": "consul", "address": "h1:8501", "namespace": "billing", "tls": true}"#,
    );
}

#[test]
fn each_scheme_reaches_its_backend() {
    for (url, backend) in [
        ("local://", "local"),
        ("etcd://h:2379", "etcd"),
        ("ntp://h", "ntp"),
        ("redis://h:6379", "redis"),
        ("redis+cluster://h:1,h:2", "redis"),
        ("consul://h:8500", "consul"),
        ("consuls://h", "consul"),
        ("CONSUL://h", "consul"),
    ] {
        let config = Config::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(config.backend(), backend, "{url}");
    }
    assert!(Config::from_url("consuls://h").unwrap() != Config::from_url("consul://h").unwrap());
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
    assert_names(
        &msg,
        &[
            "\"nope\"",
            "local://",
            "etcd://",
            "ntp://",
            "redis://",
            "consul://",
            "consuls://",
        ],
    );
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert_names(&refused("no-scheme-here"), &["scheme://"]);
}

/// Every scheme a backend answers to: parsed when this build has its feature, otherwise refused
/// naming the feature. The tests turn on local, etcd, ntp, redis and consul, but the workspace
/// may unify more features in (or a build fewer), so each case asks [`sync_any::schemes`].
#[test]
fn a_scheme_whose_feature_is_off_names_the_feature() {
    let on = sync_any::schemes();
    for scheme in ["consul", "consuls", "etcd", "redis"] {
        assert!(
            on.contains(&scheme),
            "the tests turn on the feature of {scheme}:// ({on:?})"
        );
    }
    for (scheme, feature) in [
        ("consul", "consul"),
        ("consuls", "consul"),
        ("etcds", "etcd-tls"),
        ("rediss", "redis-tls"),
        ("rediss+cluster", "redis-tls"),
    ] {
        // etcds:// takes its CA by file (read at connect, not here).
        let query = if scheme == "etcds" {
            "?ca_file=ca.pem"
        } else {
            ""
        };
        let url = format!("{scheme}://h:1{query}");
        if on.contains(&scheme) {
            assert!(Config::from_url(&url).is_ok(), "{url}");
            continue;
        }
        let msg = refused(&url);
        assert_names(&msg, &[&format!("`{feature}` cargo feature"), "consul://"]);
    }
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
    assert_names(
        &refused("consul://h?lockdelay=1s"),
        &["lockdelay", "lock_delay", "ttl"],
    );
}

#[test]
fn bad_duration_is_named() {
    assert_names(
        &refused("etcd://h:2379?ttl=5 parsecs"),
        &["ttl", "5 parsecs"],
    );
    assert_names(&refused("local://?ttl=fast"), &["ttl", "fast"]);
    assert_names(&refused("consul://h?ttl=soon"), &["ttl", "soon"]);
    // Consul's shortest session TTL, never clamped.
    assert_names(&refused("consul://h?ttl=5s"), &["ttl", "10s"]);
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
    assert_names(&refused("consul://"), &["host"]);
}

#[test]
fn namespace_with_a_slash_is_refused() {
    assert_names(
        &refused("etcd://h:2379/tenant/a"),
        &["must not contain '/'"],
    );
    assert_names(&refused("local://c/tenant/a"), &["must not contain '/'"]);
    assert_names(
        &refused("consul://h:8500/tenant/a"),
        &["must not contain '/'"],
    );
}

#[test]
fn unknown_backend_tag_in_a_config_names_the_known_ones() {
    let err = serde_json::from_str::<Config>(r#"{"backend": "zookeeper"}"#)
        .expect_err("no such backend")
        .to_string();
    assert_names(
        &err,
        &["zookeeper", "local", "etcd", "ntp", "redis", "consul"],
    );
}
