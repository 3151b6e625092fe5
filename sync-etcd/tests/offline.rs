//! Behaviour that needs no etcd: argument checks and an unreachable endpoint.

use std::time::Duration;

use sync_core::ErrorKind;
use sync_etcd::{Client, Config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_unavailable() {
    let config = Config::from_url("etcd://127.0.0.1:1/x?connect_timeout=300ms").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), Client::connect(config))
        .await
        .expect("connect must give up, not hang")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(err.backend(), Some("etcd"));
    assert!(
        std::error::Error::source(&err).is_some(),
        "the client error is attached"
    );
}

#[tokio::test]
async fn ttl_under_the_etcd_minimum_is_rejected_before_connecting() {
    let err = Client::connect(Config::default().with_ttl(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("at least 2s"), "{err}");
    let err = Client::from_url("etcd://127.0.0.1:2379/ns?ttl=1500ms")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn bad_urls_are_invalid_arguments() {
    for url in [
        "http://h:1",
        "etcd://",
        "etcd://h:1/ns?what=1",
        "etcd://h:1//ns",
    ] {
        let err = Config::from_url(url).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{url}: {err}");
    }
}

#[cfg(not(feature = "tls"))]
#[test]
fn tls_without_the_feature_is_unsupported() {
    let err = Config::from_url("etcds://h:2379/ns").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
}
