//! Every rejection path, the cache, the refresh and the combination, against a crafted-reply
//! responder on loopback (no live server needed).

mod common;

use std::{
    error::Error as _,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use common::{Reply, Responder};
use sync_core::{Backend, Error, ErrorKind, Time};
use sync_ntp::{Client, Config, ReplyError, SyncError};

fn config(servers: &[&Responder]) -> Config {
    Config::new(servers.iter().map(|r| r.server())).with_timeout(Duration::from_millis(300))
}

/// The per-server failures behind an Unavailable error.
fn failures(e: &Error) -> Vec<ReplyError> {
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let source = e
        .source()
        .and_then(|s| s.downcast_ref::<SyncError>())
        .unwrap_or_else(|| panic!("no SyncError source in {e:?}"));
    source.failures.iter().map(|f| f.error.clone()).collect()
}

async fn rejected(reply: Reply) -> (Error, ReplyError) {
    let responder = Responder::start(reply).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let err = client.time().unwrap().now_interval().await.unwrap_err();
    let fs = failures(&err);
    assert_eq!(fs.len(), 1, "{err}");
    assert_eq!(responder.queries(), 1);
    (err, fs[0].clone())
}

#[tokio::test]
async fn kiss_of_death() {
    for code in ["RATE", "DENY"] {
        let (err, why) = rejected(Reply::Kiss(code)).await;
        match why {
            ReplyError::KissOfDeath { code: got } => assert_eq!(got, code),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains(&format!("kiss-of-death \"{code}")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn stratum_16() {
    let (err, why) = rejected(Reply::Stratum16).await;
    assert_eq!(why, ReplyError::Stratum { stratum: 16 });
    assert!(err.to_string().contains("stratum 16"), "{err}");
}

#[tokio::test]
async fn leap_indicator_3() {
    let (err, why) = rejected(Reply::Leap3).await;
    assert_eq!(why, ReplyError::Unsynchronized);
    assert!(err.to_string().contains("leap indicator 3"), "{err}");
}

#[tokio::test]
async fn root_distance_too_large() {
    let (err, why) = rejected(Reply::RootDispersionSecs(2)).await;
    match why {
        ReplyError::RootDistance { distance, max } => {
            assert!(distance >= Duration::from_secs(2), "{distance:?}");
            assert_eq!(max, Config::default().max_error);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("root distance"), "{err}");
}

#[tokio::test]
async fn malformed_replies() {
    for (reply, says) in [
        (Reply::Short, "40 bytes, shorter than the 48"),
        (Reply::WrongMode, "mode 3, not 4"),
        (Reply::WrongVersion, "version 2, not 3 or 4"),
        (Reply::ZeroTransmit, "transmit timestamp is zero"),
    ] {
        let (err, why) = rejected(reply.clone()).await;
        assert!(
            matches!(why, ReplyError::Malformed { .. }),
            "{reply:?}: {why:?}"
        );
        assert!(err.to_string().contains(says), "{reply:?}: {err}");
    }
}

#[tokio::test]
async fn a_reply_with_the_wrong_origin_is_discarded_until_the_timeout() {
    let start = Instant::now();
    let (err, why) = rejected(Reply::WrongOrigin).await;
    assert_eq!(
        why,
        ReplyError::Timeout {
            after: Duration::from_millis(300)
        }
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(err.to_string().contains("no reply within 300ms"), "{err}");
}

#[tokio::test]
async fn a_stray_datagram_before_the_reply_does_not_fail_the_query() {
    let responder = Responder::start(Reply::StrayThenGood).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let before = SystemTime::now();
    let iv = client.time().unwrap().now_interval().await.unwrap();
    let after = SystemTime::now();
    assert!(iv.earliest() <= after && iv.latest() >= before, "{iv:?}");
    let report = client.last_sync().unwrap();
    assert!(report.failures.is_empty(), "{report:?}");
    // The stray came 50 ms before the reply: the round trip is the real reply's.
    assert!(
        report.samples[0].round_trip >= Duration::from_millis(50),
        "{report:?}"
    );
    assert_eq!(responder.queries(), 1);
    assert_eq!(client.queries(), 1);
}

#[tokio::test]
async fn an_ipv6_server_is_queried_over_ipv6() {
    // Skipped where the host has no IPv6 loopback.
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback: skipped");
        return;
    }
    let responder = Responder::start_on("[::1]:0", Reply::good()).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let report = client.sync().await.unwrap();
    assert!(report.samples[0].address.is_ipv6(), "{report:?}");
    // An IPv6 server's reference id above stratum 1 is a hash, shown in hex.
    assert_eq!(report.samples[0].reference_id, "0x7F000001");
    assert_eq!(responder.queries(), 1);
}

#[tokio::test]
async fn silent_server_is_unavailable_within_the_timeout() {
    let responder = Responder::start(Reply::Silent).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let start = Instant::now();
    let err = client.time().unwrap().now().await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(
        failures(&err),
        [ReplyError::Timeout {
            after: Duration::from_millis(300)
        }]
    );
    assert!(took < Duration::from_millis(600), "took {took:?}");
    assert!(err.to_string().contains("no reply within 300ms"), "{err}");
}

#[tokio::test]
async fn nothing_listening_is_unavailable_within_the_timeout() {
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let client = Client::connect(
        Config::new([format!("127.0.0.1:{port}")]).with_timeout(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let err = client.time().unwrap().now_interval().await.unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(600));
    match failures(&err).as_slice() {
        [ReplyError::Unreachable { .. } | ReplyError::Timeout { .. }] => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn one_sync_then_ten_thousand_calls_make_no_more_queries() {
    let responder = Responder::start(Reply::good()).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let time = client.time().unwrap();
    let first = time.now_interval().await.unwrap();
    assert_eq!(responder.queries(), 1);
    let start = Instant::now();
    for _ in 0..10_000 {
        let now = time.now().await.unwrap();
        assert!(now >= first.earliest());
    }
    let took = start.elapsed();
    assert_eq!(
        responder.queries(),
        1,
        "10 000 now() calls queried the server"
    );
    assert_eq!(client.queries(), 1);
    eprintln!(
        "10 000 now() calls after one sync: {} query in total, {took:?}",
        responder.queries()
    );
}

#[tokio::test]
async fn concurrent_first_calls_share_one_sync() {
    let responder = Responder::start(Reply::good()).await;
    let client = Client::connect(config(&[&responder])).await.unwrap();
    let time = client.time().unwrap();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let time = time.clone();
            tokio::spawn(async move { time.now_interval().await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(responder.queries(), 1);
}

#[tokio::test]
async fn interval_contains_the_server_time_and_widens_with_drift() {
    // The server is 5 s ahead of this machine: the interval follows the server, not us.
    let responder = Responder::start(Reply::Good {
        offset_ms: 5_000,
        dispersion_us: 1_000,
    })
    .await;
    let client = Client::connect(config(&[&responder]).with_drift_ppm(500.0))
        .await
        .unwrap();
    let time = client.time().unwrap();
    let ahead = Duration::from_secs(5);
    let before = SystemTime::now() + ahead;
    let iv = time.now_interval().await.unwrap();
    let after = SystemTime::now() + ahead;
    let report = client.last_sync().unwrap();
    let sample = &report.samples[0];
    // 16.16 fixed point: within one 1/65536 s step of what the responder meant.
    let step = Duration::from_nanos(15_259);
    assert!(
        sample
            .root_dispersion
            .abs_diff(Duration::from_micros(1_000))
            <= step,
        "{sample:?}"
    );
    assert!((sample.offset_secs - 5.0).abs() < 0.05, "{sample:?}");
    assert!(iv.earliest() <= after && iv.latest() >= before, "{iv:?}");
    assert!(iv.width() >= Duration::from_millis(2), "{iv:?}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = time.now_interval().await.unwrap();
    // 500 ppm of 200 ms is 100 µs on each side.
    let grown = later.width() - iv.width();
    assert!(grown >= Duration::from_micros(200), "grew {grown:?}");
    assert!(grown < Duration::from_millis(5), "grew {grown:?}");
    assert!(
        time.after(SystemTime::now() + Duration::from_secs(4))
            .await
            .unwrap()
    );
    assert!(
        time.before(SystemTime::now() + Duration::from_secs(6))
            .await
            .unwrap()
    );
    assert_eq!(responder.queries(), 1);
}

#[tokio::test]
async fn servers_are_combined_and_bad_ones_reported() {
    let good_a = Responder::start(Reply::good()).await;
    let good_b = Responder::start(Reply::Good {
        offset_ms: 0,
        dispersion_us: 5_000,
    })
    .await;
    let kissing = Responder::start(Reply::Kiss("RATE")).await;
    let liar = Responder::start(Reply::Good {
        offset_ms: 60_000,
        dispersion_us: 100,
    })
    .await;
    let client = Client::connect(config(&[&good_a, &good_b, &kissing, &liar]))
        .await
        .unwrap();
    let before = SystemTime::now();
    let report = client.sync().await.unwrap();
    let after = SystemTime::now();
    let used: Vec<_> = report.samples.iter().map(|s| s.server.clone()).collect();
    assert_eq!(used, [good_a.server(), good_b.server()]);
    let rejected: Vec<_> = report
        .failures
        .iter()
        .map(|f| (f.server.clone(), f.error.clone()))
        .collect();
    assert!(
        rejected.contains(&(liar.server(), ReplyError::Falseticker)),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|(s, e)| *s == kissing.server() && matches!(e, ReplyError::KissOfDeath { .. })),
        "{rejected:?}"
    );
    // The intersection is no wider than the narrowest agreeing server's interval (carried to
    // the latest reply's instant, which adds a few nanoseconds of drift allowance).
    let narrowest = report.samples.iter().map(|s| s.error).min().unwrap();
    assert!(
        report.error <= narrowest + Duration::from_micros(1),
        "{report:?}"
    );
    assert!(report.interval.earliest() <= after && report.interval.latest() >= before);
}

#[tokio::test]
async fn two_disagreeing_servers_are_unavailable() {
    let a = Responder::start(Reply::good()).await;
    let b = Responder::start(Reply::Good {
        offset_ms: 60_000,
        dispersion_us: 100,
    })
    .await;
    let client = Client::connect(config(&[&a, &b])).await.unwrap();
    let err = client.time().unwrap().now_interval().await.unwrap_err();
    assert_eq!(
        failures(&err),
        [ReplyError::Falseticker, ReplyError::Falseticker]
    );
}

#[tokio::test]
async fn refresh_runs_in_the_background_and_stops_on_drop() {
    let responder = Responder::start(Reply::good()).await;
    let client = Client::connect(config(&[&responder]).with_interval(Duration::from_secs(1)))
        .await
        .unwrap();
    let time: Arc<dyn Time> = client.time().unwrap();
    time.now().await.unwrap();
    assert_eq!(responder.queries(), 1);
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), responder.wait_for_queries(2))
        .await
        .expect("the refresh did not run after one interval");
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "refreshed too early"
    );
    assert_eq!(responder.queries(), 2);
    drop(time);
    drop(client);
    let after_drop = responder.queries();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        responder.queries(),
        after_drop,
        "the refresh outlived the handles"
    );
}

#[tokio::test]
async fn stale_cache_with_failing_servers_is_unavailable_not_local_time() {
    let responder = Responder::start(Reply::Good {
        offset_ms: 0,
        dispersion_us: 9_000,
    })
    .await;
    let max_error = Duration::from_millis(10);
    let drift_ppm = 500.0;
    let client = Client::connect(
        config(&[&responder])
            .with_max_error(max_error)
            .with_drift_ppm(drift_ppm),
    )
    .await
    .unwrap();
    let time = client.time().unwrap();
    time.now_interval().await.unwrap();
    let error = client.last_sync().unwrap().error;
    responder.set(Reply::Silent);
    // Still within the maximum error: the cached interval answers, no query.
    time.now_interval().await.unwrap();
    assert_eq!(responder.queries(), 1);
    // Wait until the drift allowance pushes the error past the maximum.
    let margin = (max_error - error).as_secs_f64();
    tokio::time::sleep(
        Duration::from_secs_f64(margin / (drift_ppm / 1e6)) + Duration::from_millis(50),
    )
    .await;
    let err = time.now_interval().await.unwrap_err();
    assert_eq!(
        failures(&err),
        [ReplyError::Timeout {
            after: Duration::from_millis(300)
        }]
    );
    assert_eq!(responder.queries(), 2);
    // Within the hold-off, callers get the error at once without querying again.
    let err = time.now().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        err.to_string()
            .contains("exceeds the maximum acceptable error"),
        "{err}"
    );
    assert_eq!(responder.queries(), 2);
    // The server answers again: synchronized time is back.
    responder.set(Reply::good());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    time.now_interval().await.unwrap();
    assert_eq!(responder.queries(), 3);
}

#[tokio::test]
async fn invalid_config_is_rejected_by_connect() {
    let err = Client::connect(Config::new(["h:0"])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let err = Client::connect(Config::new(["h"]).with_max_error(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at least 1µs"), "{err}");
}

#[tokio::test]
async fn deny_and_rstr_stop_all_queries_to_that_server() {
    for code in ["DENY", "RSTR"] {
        let responder = Responder::start(Reply::Kiss(code)).await;
        let client = Client::connect(config(&[&responder])).await.unwrap();
        for _ in 0..3 {
            let err = client.sync().await.unwrap_err();
            assert_eq!(
                failures(&err),
                [ReplyError::KissOfDeath { code: code.into() }]
            );
        }
        // RFC 4330 §8: the client stops sending packets to that server.
        assert_eq!(responder.queries(), 1, "{code}");
        // Even once it would answer again.
        responder.set(Reply::good());
        assert!(client.sync().await.is_err());
        assert_eq!(responder.queries(), 1, "{code}");
    }
}

#[tokio::test]
async fn rate_backs_off_that_server_while_the_others_serve() {
    let kissing = Responder::start(Reply::Kiss("RATE")).await;
    let good = Responder::start(Reply::good()).await;
    let client = Client::connect(config(&[&kissing, &good])).await.unwrap();
    for _ in 0..3 {
        let report = client.sync().await.unwrap();
        assert_eq!(report.samples.len(), 1, "{report:?}");
        assert!(
            matches!(&report.failures[..], [f] if f.error == ReplyError::KissOfDeath { code: "RATE".into() }),
            "{report:?}"
        );
    }
    // The kissing server was asked once; the back-off (at least the 64 s interval) holds.
    assert_eq!(kissing.queries(), 1);
    assert_eq!(good.queries(), 3);
}

#[tokio::test]
async fn a_sync_already_too_wide_is_held_off_not_repeated_per_call() {
    // Root distance exactly the maximum error: the reply is accepted, but the interval it
    // gives (plus rounding and drift allowance) is already wider than the maximum.
    let dispersion_raw = 656; // 656 / 65536 s, rounded up to 10 009 766 ns
    let responder = Responder::start(Reply::SlowServer { dispersion_raw }).await;
    let max_error = Duration::from_nanos(10_009_766);
    let client = Client::connect(config(&[&responder]).with_max_error(max_error))
        .await
        .unwrap();
    let time = client.time().unwrap();
    let err = time.now_interval().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(
        err.to_string()
            .contains("exceeds the maximum acceptable error"),
        "{err}"
    );
    assert_eq!(responder.queries(), 1);
    let report = client.last_sync().unwrap();
    assert_eq!(report.samples[0].round_trip, Duration::ZERO, "{report:?}");
    // Within the hold-off, further calls fail at once without querying again.
    for _ in 0..100 {
        let err = time.now().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
    assert_eq!(responder.queries(), 1);
    // After it, one call syncs again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(time.now().await.is_err());
    assert_eq!(responder.queries(), 2);
}
